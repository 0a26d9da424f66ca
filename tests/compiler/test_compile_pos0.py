"""`tapernorm compile` of gate-0 models with position 0's own scale c0 (tapernorm/pos0.py, passes/pos0.py): the
lean graph keeps one Mul by where(position == 0, c0 / c, 1) per norm (one Equal per graph); parity of prompt and
decode logits and greedy tokens at batch 1 (the compile's own check) and of a ragged batch of 3 (each row's first
real token is its position 0); our DecoderLM (RMS, LN), a Hugging Face Llama (GQA), OLMo2 (post-norms folded
backward, QK-norms), Qwen3 (per-head QK-norms on (B, T, H, d)) and Gemma 3 (per-head QK-norms on (B, H, T, d)), the
generic export, fp16 / int4; a model without c0 compiles with no factor node at all."""
import numpy as np
import pytest
import torch

from lean_util import prompt_ids, torch_steps
from tapernorm import calibrate, set_gate, taper_layers
from tapernorm.checkpoint import save_checkpoint
from tapernorm.compiler.pipeline import compile_checkpoint, summary_text
from tapernorm.runtime import DecoderSession, OrtDecoder, generate_ids
from tiny_models import make_pos0, sharpen_pos0

NONE = {"wheres": 0, "muls": 0, "equal": 0}


def _decoder(arch="tiny", mode="internal", pos0=True):
    return make_pos0(arch, mode, pos0, embed_scale=20.0)  # head_dim 16: rotary inside GroupQueryAttention


def _ragged(model, out, vocab, variant="model.onnx"):
    """Greedy tokens of a ragged batch of 3 through the runtime == each row alone in PyTorch (full forwards)."""
    rows = [prompt_ids(vocab, 9), prompt_ids(vocab, 5, k=11), prompt_ids(vocab, 2, k=5)]
    ref = [torch_steps(model, p, 3)[0] for p in rows]
    sess = DecoderSession(out, variant=variant, provider="cpu", intra_op_threads=1)
    assert generate_ids(OrtDecoder(sess), rows, max_new_tokens=3).tokens == ref


@pytest.mark.parametrize("arch,mode,n,form", [("tiny", "internal", 4, "split"), ("tiny-gpt2", "all", 5, "where")])
def test_lean_compile_with_c0(tmp_path, monkeypatch, arch, mode, n, form):
    """Both factor forms of the lean builder: "split" (the default: one Where over all ratios, one Split) and
    "where" (one Where per ratio); either way one Mul per norm and one Equal."""
    from tapernorm.compiler.lean import graph as lean_graph
    monkeypatch.setattr(lean_graph, "POS0_FORM", form)
    m = _decoder(arch, mode)
    save_checkpoint(m, tmp_path / "ckpt")
    rep = compile_checkpoint(tmp_path / "ckpt", tmp_path / "out", parity_tokens=5, unfused=True)
    assert rep["graph"] == "lean" and rep["parity"]["ok"] and rep["statistics_check"]["ok"]
    want = {"wheres": 1 if form == "split" else n, "muls": n, "equal": 1}
    assert ("Split" in rep["export"]["model.onnx"]["ops"]) == (form == "split")
    assert rep["pos0"] == {"sites": n, "model.onnx": want, "model_unfused.onnx": want}
    assert rep["export"]["model.onnx"]["pos0"] == want
    assert all(k == "none" for k in rep["export"]["model.onnx"]["norms"].values() if k != "rms")
    for g in rep["parity"]["graphs"].values():  # prompt + decode logits, greedy tokens at batch 1
        assert g["tokens_identical"] and g["prompt_logits_max_abs_diff"] < 1e-4 * rep["parity"]["logit_scale"]
    assert f"position 0's own scale: {n} norm(s), {n} per-token Mul(s)" in summary_text(rep)
    for v in ("model.onnx", "model_unfused.onnx"):
        _ragged(m, tmp_path / "out", 256, v)
    if arch == "tiny":
        _genai_agrees(tmp_path / "out")


def _genai_agrees(out):
    """onnxruntime-genai (its own venv and onnxruntime) runs the same lean directory to our loop's tokens."""
    import json
    import os
    import subprocess
    from pathlib import Path
    prompts = [[1, 5, 9, 4], [1, 40, 41, 42]]
    ours = generate_ids(OrtDecoder(DecoderSession(out, provider="cpu", intra_op_threads=1)), prompts,
                        max_new_tokens=5).tokens
    root = Path(__file__).resolve().parents[2]
    genai_py = next((p for p in (os.environ.get("TAPERNORM_GENAI_PYTHON"), str(root / ".venv-genai/bin/python"))
                     if p and Path(p).is_file()), None)
    if genai_py is None:
        return  # no onnxruntime-genai venv here: our loop's parity above is the check
    script = ("import json, sys\nfrom tapernorm.runtime.genai_engine import GenaiEngine\n"
              "print(json.dumps(GenaiEngine(sys.argv[1], threads=1).generate_ids(json.loads(sys.argv[2]), "
              "max_new_tokens=5).tokens))")
    proc = subprocess.run([genai_py, "-c", script, str(out), json.dumps(prompts)], capture_output=True, text=True,
                          timeout=300)
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert json.loads(proc.stdout.strip().splitlines()[-1]) == ours


def test_model_without_c0_compiles_without_factor(tmp_path):
    save_checkpoint(_decoder(pos0=False), tmp_path / "ckpt")
    rep = compile_checkpoint(tmp_path / "ckpt", tmp_path / "out", parity_tokens=3)
    assert rep["parity"]["ok"] and rep["pos0"] == {"sites": 0, "model.onnx": NONE}
    assert rep["export"]["model.onnx"]["pos0"] == NONE and "Where" not in rep["export"]["model.onnx"]["ops"]
    assert "position 0" not in summary_text(rep)


def test_generic_export_with_c0(tmp_path):
    """The generic (dynamo) export keeps the pass's factor on the position_ids input: exact as well."""
    m = _decoder()
    save_checkpoint(m, tmp_path / "ckpt")
    rep = compile_checkpoint(tmp_path / "ckpt", tmp_path / "out", parity_tokens=4, graph="generic")
    assert rep["graph"] == "generic" and rep["parity"]["ok"]
    assert rep["pos0"] == {"sites": 4, "model.onnx": {"wheres": 4, "muls": 4, "equal": 1}}
    _ragged(m, tmp_path / "out", 256)  # left-padded rows: position_ids max(cumsum - 1, 0)


@pytest.mark.parametrize("precision", ["fp16", "int4"])
def test_reduced_precision_with_c0(tmp_path, precision):
    save_checkpoint(_decoder(), tmp_path / "ckpt")
    rep = compile_checkpoint(tmp_path / "ckpt", tmp_path / "out", precision=precision, block_size=16, parity_tokens=3)
    assert rep["parity"]["ok"] and rep["pos0"]["model.onnx"] == {"wheres": 1, "muls": 4, "equal": 1}
    assert rep["dtype"] == ("float16" if precision == "fp16" else "float32")


def _hf(model_type, **extra):
    transformers = pytest.importorskip("transformers")
    from tapernorm import taperize
    transformers.logging.set_verbosity_error()
    cfg = transformers.AutoConfig.for_model(model_type, **{
        "vocab_size": 128, "hidden_size": 64, "intermediate_size": 96, "num_hidden_layers": 2,
        "num_attention_heads": 4, "num_key_value_heads": 2, "max_position_embeddings": 64, "bos_token_id": 1,
        "eos_token_id": 2, **extra})  # head_dim 16, GQA 4 / 2
    torch.manual_seed(0)
    m = transformers.AutoModelForCausalLM.from_config(cfg).eval()
    with torch.no_grad():
        m.get_input_embeddings().weight.mul_(4.0)
    taperize(m, "all")
    g = torch.Generator().manual_seed(1)
    calibrate(m, [torch.randint(3, 128, (2, 12), generator=g) for _ in range(2)],
              forward=lambda mod, b: mod(input_ids=b, use_cache=False), pos0=True)
    set_gate(sharpen_pos0(m), 0.0)
    return m


@pytest.mark.parametrize("family,n", [("llama", 5), ("olmo2", 9)])
def test_hf_compile_with_c0(tmp_path, family, n):
    """A tapered HF directory (save_pretrained) compiles to the lean graph; OLMo2's post-norms fold backward and
    keep the factor after o_proj / down_proj, its QK-norms (over all heads) after q_proj / k_proj."""
    from tapernorm.compiler.hf_compile import HFDecoder
    from tapernorm.hf import save_pretrained
    hf = _hf(family, **({"tie_word_embeddings": True} if family == "llama" else {}))
    save_pretrained(hf, tmp_path / "hf")
    rep = compile_checkpoint(tmp_path / "hf", tmp_path / "out", parity_tokens=5)
    assert rep["graph"] == "lean" and rep["parity"]["ok"], rep.get("hf")
    assert rep["pos0"] == {"sites": n, "model.onnx": {"wheres": 1, "muls": n, "equal": 1}}
    dec = HFDecoder(hf, "all").eval()
    _ragged(dec, tmp_path / "out", 128)
    g = rep["parity"]["graphs"]["model.onnx"]
    assert g["tokens_identical"] and g["decode_logits_max_abs_diff"] < 1e-4 * rep["parity"]["logit_scale"]
    assert np.isfinite(g["prompt_logits_max_abs_diff"])


def _compile_qk_pos0(hf, tmp_path, graph: str, sites: int) -> dict:
    """Save and compile a tiny HF model whose 2 layers' q_norm / k_norm carry c0; assert the 4 QK norms fold backward,
    `sites` factors (lean: one Where, a Mul each, one Equal, in both variants; generic: a Where and a Mul each),
    prompt / decode parity and identical tokens, a ragged batch of 3 through the KV-cache runtime equal to each row
    alone, and (lean) onnxruntime-genai's tokens. Returns the compile report."""
    from tapernorm.compiler.hf_compile import HFDecoder
    from tapernorm.hf import save_pretrained
    save_pretrained(hf, tmp_path / "hf")
    rep = compile_checkpoint(tmp_path / "hf", tmp_path / "out", parity_tokens=5, graph=graph,
                             unfused=graph == "lean")
    assert rep["graph"] == graph and rep["parity"]["ok"], rep.get("hf")
    rows = rep["passes"]["fold"]["layers"]
    qk = {k: r for k, r in rows.items() if k.endswith(("q_norm", "k_norm"))}
    assert len(qk) == 4 and all(r["status"] == "folded" and r["direction"] == "backward" for r in qk.values())
    if graph == "lean":
        want = {"wheres": 1, "muls": sites, "equal": 1}
        assert rep["pos0"] == {"sites": sites, "model.onnx": want, "model_unfused.onnx": want}
    else:
        assert rep["pos0"] == {"sites": sites, "model.onnx": {"wheres": sites, "muls": sites, "equal": 1}}
    for g in rep["parity"]["graphs"].values():
        assert g["tokens_identical"], g
        for k in ("prompt_logits_max_abs_diff", "decode_logits_max_abs_diff"):
            assert g[k] < 1e-4 * rep["parity"]["logit_scale"], (k, g)
    dec = HFDecoder(hf, "all").eval()
    for v in (("model.onnx", "model_unfused.onnx") if graph == "lean" else ("model.onnx",)):
        _ragged(dec, tmp_path / "out", 128, v)
    if graph == "lean":
        _genai_agrees(tmp_path / "out")
    return rep


@pytest.mark.parametrize("graph", ["lean", "generic"])
def test_qwen3_per_head_qk_norms_compile_with_c0(tmp_path, graph):
    """Qwen3's per-head q_norm / k_norm with c0 fold backward into q_proj / k_proj rows and keep one Mul by p each
    (lean: on the (B, T, H d) q / k before rotary; generic: the pass's (B, T, 1, 1) factor): 2 layers x (2 block
    norms + q_norm + k_norm) + the final norm = 9 factors; prompt / decode logits and greedy tokens match PyTorch
    (the compile's check), a ragged batch of 3 through the KV-cache runtime matches each row alone, and
    onnxruntime-genai runs the lean directory to the same tokens."""
    from tiny_models import make_hf_pos0
    hf = make_hf_pos0("qwen3", embed_scale=4.0)  # head_dim 16: rotary inside GroupQueryAttention
    _compile_qk_pos0(hf, tmp_path, graph, sites=9)


@pytest.mark.parametrize("graph", ["lean", "generic"])
def test_gemma3_heads_first_qk_norms_compile_with_c0(tmp_path, graph):
    """Gemma 3 calls q_norm / k_norm on (B, H, T, d) (token_dim 2): c0 is calibrated from position 0 of every head,
    they fold backward into q_proj / k_proj rows and keep one Mul by p each (lean: on the (B, T, H d) q / k before the
    head split and rotary; generic: the pass's (B, 1, T, 1) factor): 2 layers x (4 sandwich norms + q_norm + k_norm)
    + the final norm = 13 factors; prompt / decode logits and greedy tokens match PyTorch (the compile's check, the
    prompt longer than the sliding window 4), a ragged batch of 3 through the KV-cache runtime matches each row
    alone, and onnxruntime-genai runs the lean directory to the same tokens."""
    from tiny_models import make_hf_pos0
    hf = make_hf_pos0("gemma3_text", embed_scale=4.0, sliding_window=4)  # head_dim 16: rotary inside GQA
    assert sum(l.token_dim == 2 for _, l in taper_layers(hf)) == 4
    rep = _compile_qk_pos0(hf, tmp_path, graph, sites=13)
    assert rep["parity"]["prompt_tokens"] > 4  # the prompt is longer than the sliding window
