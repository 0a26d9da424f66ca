"""The lean decode graph (compiler.lean) against PyTorch: prompt and decode logits, greedy tokens, for the
llama (RMS, RoPE in GroupQueryAttention or a separate RotaryEmbedding for small heads) and gpt2 (LN)
families, folded / unfused / baseline; what each norm becomes; ragged batches; fp16; one-line refusals."""
import numpy as np
import onnx
import pytest
import torch

from lean_util import build_lean_dir, lean_model, prompt_ids, torch_steps
from tapernorm.compiler.lean import LeanError, lean_model_proto
from tapernorm.compiler.lean.builder import ort_optimized_nodes
from tapernorm.compiler.pipeline import ort_greedy
from tapernorm.runtime import DecoderSession, OrtDecoder, generate_ids
from tapernorm.runtime.shared_kv import SharedKVDecoder

CASES = [("tiny", "internal", 2), ("tiny", "all", 4), ("tiny", "baseline", 2),
         ("tiny-gpt2", "internal", 4), ("tiny-gpt2", "all", 2), ("tiny-gpt2", "baseline", 4)]


def _decode(sess, prompt, n_new):
    assert isinstance(OrtDecoder(sess), SharedKVDecoder)
    return ort_greedy(sess, prompt, n_new)  # the compile's own parity loop


@pytest.mark.parametrize("arch,mode,heads", CASES, ids=[f"{a}-{m}-h{h}" for a, m, h in CASES])
def test_lean_parity_and_norm_ops(tmp_path, arch, mode, heads):
    model = lean_model(arch, mode, heads)
    facts = build_lean_dir(model, tmp_path)
    prompt = prompt_ids(model.config.vocab_size)
    ref_toks, ref_logits = torch_steps(model, prompt, 6)
    scale = max(1.0, max(float(np.abs(x).max()) for x in ref_logits))
    for f in ("model.onnx", "model_unfused.onnx"):
        sess = DecoderSession(tmp_path, variant=f, provider="cpu", intra_op_threads=1)
        assert sess.kv_shared and sess.graph_kind == "lean" and "position_ids" not in sess.input_names
        toks, logits = _decode(sess, prompt, 6)
        assert toks == ref_toks, f
        assert max(float(np.abs(a - b).max()) for a, b in zip(logits, ref_logits)) < 1e-4 * scale, f
    kinds_f, kinds_u = facts["folded"]["norms"], facts["unfused"]["norms"]
    n_taper = {"baseline": 0, "internal": 4, "all": 5}[mode]
    assert sum(k == "none" for k in kinds_f.values()) == n_taper  # folded: no op at all
    assert sum(k.startswith("map_") for k in kinds_u.values()) == n_taper  # unfused: the explicit map
    assert facts["folded"]["statistics_check"]["ok"]
    ops = facts["folded"]["ops"]
    skip = "SkipSimplifiedLayerNormalization" if arch == "tiny" else "SkipLayerNormalization"
    assert ops.get("GroupQueryAttention") == 2 and ops.get(skip, 0) == {"baseline": 4 if arch == "tiny" else 5,
                                                                         "internal": 1, "all": 0}[mode]
    opt = ort_optimized_nodes(tmp_path / "model.onnx")
    assert opt["nodes"] <= facts["folded"]["nodes"] and opt["ops"]["GroupQueryAttention"] == 2


def test_ragged_batch_matches_single_rows(tmp_path):
    model = lean_model("tiny", "internal", 2)
    build_lean_dir(model, tmp_path, variants=("folded",))
    sess = DecoderSession(tmp_path, provider="cpu", intra_op_threads=1)
    a, b = prompt_ids(256, 9), prompt_ids(256, 5, k=11)
    both = generate_ids(OrtDecoder(sess), [a, b], max_new_tokens=5).tokens  # left-padded by pad_prompts
    assert both == [torch_steps(model, p, 5)[0] for p in (a, b)]
    assert generate_ids(OrtDecoder(sess), [a, a], max_new_tokens=5).tokens == [both[0], both[0]]


def test_decoder_binds_once(tmp_path):
    """The KV buffers and the logits buffer are the same objects at every step; presents are the pasts."""
    model = lean_model("tiny", "all", 2)
    build_lean_dir(model, tmp_path, variants=("folded",))
    sess = DecoderSession(tmp_path, provider="cpu", intra_op_threads=1)
    dec = OrtDecoder(sess)
    dec.start(np.asarray([prompt_ids(256)]))
    kv, logits = list(dec._kv), dec._logits
    for t in range(4):
        dec.step(np.asarray([t]))
    assert all(x is y for x, y in zip(kv, dec._kv)) and dec._logits is logits and dec.length == 14
    assert np.abs(dec._kv_host[0][0, :, :14]).sum() > 0 and not dec._kv_host[0][0, :, 14:].any()
    with pytest.raises(ValueError, match="max_len 65 exceeds model.onnx's 64-token context"):
        OrtDecoder(sess, max_len=65)
    short = OrtDecoder(sess, max_len=12)
    short.start(np.asarray([prompt_ids(256)]))  # 10 tokens
    short.step(np.asarray([1]))
    short.step(np.asarray([1]))  # 12: the buffer is full
    with pytest.raises(ValueError, match="12-token context is full"):
        short.step(np.asarray([1]))


def test_fp16_lean_runs_on_cpu(tmp_path):
    model = lean_model("tiny", "internal", 2).to(torch.float16)
    prompt = prompt_ids(256)
    ref = torch_steps(model, prompt, 4)[0]
    build_lean_dir(model, tmp_path, variants=("folded",), dtype=torch.float16)
    sess = DecoderSession(tmp_path, provider="cpu", intra_op_threads=1)
    assert sess.np_dtype == np.float16
    assert generate_ids(OrtDecoder(sess), [prompt], max_new_tokens=4).tokens[0] == ref


def test_unexpressible_models_are_one_line(tmp_path):
    from tapernorm.passes import fold
    from tapernorm.compiler.export_onnx import KVCacheLM, dynamic_shapes, example_inputs
    model = lean_model("tiny", "internal", 2, gate=0.5)
    w = KVCacheLM(model)
    args, ds = example_inputs(model.config), dynamic_shapes(2)
    gm, rep = fold(w, args, dynamic_shapes=ds)
    with pytest.raises(LeanError, match=r"^layers\.0\.input_layernorm: TaperNorm is not at gate 0.*--graph generic"):
        lean_model_proto(model, gm, rep, torch.float32)
    model = lean_model("tiny", "baseline", 2)

    class Relu(torch.nn.Module):
        def __init__(self, mlp):
            super().__init__()
            self.fc = mlp.gate_proj

        def forward(self, x):
            return torch.relu(self.fc(x)) @ self.fc.weight

    model.layers[1].mlp = Relu(model.layers[1].mlp)
    w = KVCacheLM(model)
    gm, rep = fold(w, args, dynamic_shapes=ds)
    with pytest.raises(LeanError, match=r"^layers\.1\.mlp\b.*linears differ from the tapernorm_llama spec.*--graph generic") as e:
        lean_model_proto(model, gm, rep, torch.float32)
    assert "\n" not in str(e.value)


def test_lean_graph_is_checked_onnx(tmp_path):
    model = lean_model("tiny-gpt2", "internal", 2)
    build_lean_dir(model, tmp_path, variants=("folded",))
    m = onnx.load(str(tmp_path / "model.onnx"))
    onnx.checker.check_model(m)
    props = {p.key: p.value for p in m.metadata_props}
    assert props["tapernorm.kv_cache"] == "shared" and props["tapernorm.graph_kind"] == "lean"
    assert [i.name for i in m.graph.input][:2] == ["input_ids", "attention_mask"]
    assert [o.name for o in m.graph.output][:2] == ["logits", "present.0.key"]
