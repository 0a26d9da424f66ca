"""onnxruntime-genai runs what we compile from a Hugging Face directory: og.Model on a lean HF compile gives our
runtime's greedy tokens (run through the genai venv's python; skipped, saying why, where there is none)."""
import json
import os
import subprocess
from pathlib import Path

import pytest
import torch

from tapernorm.compiler.pipeline import compile_checkpoint
from tapernorm.runtime import DecoderSession, OrtDecoder, generate_ids

ROOT = Path(__file__).resolve().parents[2]
GENAI_PY = next((p for p in (os.environ.get("TAPERNORM_GENAI_PYTHON"), str(ROOT / ".venv-genai" / "bin" / "python"))
                 if p and Path(p).is_file()), None)
SCRIPT = """
import json, sys
import onnxruntime_genai as og
m = og.Model(sys.argv[1])
out = []
for p in json.loads(sys.argv[2]):
    params = og.GeneratorParams(m)
    params.set_search_options(max_length=len(p) + 6, min_length=len(p) + 6, do_sample=False)
    g = og.Generator(m, params)
    g.append_tokens(p)
    toks = []
    while not g.is_done():
        g.generate_next_token()
        toks.append(int(g.get_next_tokens()[0]))
    out.append(toks)
print(json.dumps(out))
"""


def _hf_dir(root: Path, model_type: str, **extra) -> Path:
    import transformers
    from transformers import AutoConfig, AutoModelForCausalLM
    transformers.logging.set_verbosity_error()
    cfg = AutoConfig.for_model(model_type, vocab_size=128, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                               num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=64,
                               bos_token_id=1, eos_token_id=2, pad_token_id=0, **extra)
    torch.manual_seed(0)
    m = AutoModelForCausalLM.from_config(cfg).eval()
    with torch.no_grad():
        m.get_input_embeddings().weight.mul_(4.0)
    m.save_pretrained(root / "hf")
    return root / "hf"


@pytest.mark.skipif(GENAI_PY is None, reason="no onnxruntime-genai venv (set TAPERNORM_GENAI_PYTHON or create "
                                             ".venv-genai, see README: onnxruntime-genai engine)")
@pytest.mark.parametrize("model_type,extra", [("llama", {"tie_word_embeddings": True}),
                                              ("qwen3", {"head_dim": 16})])
def test_genai_runs_lean_hf_compile(tmp_path, model_type, extra):
    rep = compile_checkpoint(_hf_dir(tmp_path, model_type, **extra), tmp_path / "out", parity_tokens=4)
    assert rep["graph"] == "lean" and (tmp_path / "out" / "genai_config.json").is_file()
    conf = json.loads((tmp_path / "out" / "genai_config.json").read_text())["model"]["decoder"]
    assert (conf["num_attention_heads"], conf["num_key_value_heads"], conf["head_size"]) == (4, 2, 16)
    prompts = [[1, 5, 6, 7, 8, 9], [1, 40, 41]]
    sess = DecoderSession(tmp_path / "out", provider="cpu", intra_op_threads=1)
    ours = [generate_ids(OrtDecoder(sess), [p], max_new_tokens=6).tokens[0] for p in prompts]
    proc = subprocess.run([GENAI_PY, "-c", SCRIPT, str(tmp_path / "out"), json.dumps(prompts)], capture_output=True,
                          text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert json.loads(proc.stdout.strip().splitlines()[-1]) == ours
