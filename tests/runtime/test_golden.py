"""Golden greedy decode (llama2.c style): a fixed seeded tiny model and prompt must keep producing these
exact tokens in eager PyTorch, the static-KV-cache decoder, and the compiled folded and unfused ONNX graphs.
A change to the model, the fold or the export that shifts any token fails here. If a deliberate change
(e.g. a new init) moves them, regenerate with GOLDEN_PRINT=1 and say why in the commit."""
import os

import torch

from rt_util import compiled_tiny_dir, tiny_model_cached
from tapernorm.runtime import DecoderSession, OrtDecoder, generate_ids
from tapernorm.runtime.torch_ref import TorchRefDecoder, greedy_full_forward

PROMPT = [[5, 17, 99, 42, 7, 230, 64]]
GOLDEN = [152, 27, 54, 252, 36, 157, 64, 54, 96, 152, 129, 252, 152, 217, 103, 166]


def test_golden_greedy_tokens():
    model = tiny_model_cached("tiny", "internal")  # seeded, gate 0, Internal-Taper
    eager = greedy_full_forward(model, torch.tensor(PROMPT), 16)[0].tolist()
    if os.environ.get("GOLDEN_PRINT"):
        print("GOLDEN =", eager)
    assert eager == GOLDEN
    assert generate_ids(TorchRefDecoder(model), PROMPT, max_new_tokens=16).tokens[0] == GOLDEN
    d = compiled_tiny_dir("tiny", "internal")
    for variant in ("model.onnx", "model_unfused.onnx"):
        sess = DecoderSession(d, variant=variant, provider="cpu", intra_op_threads=1)
        assert generate_ids(OrtDecoder(sess), PROMPT, max_new_tokens=16).tokens[0] == GOLDEN, variant
