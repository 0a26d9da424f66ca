"""`tapernorm compile` of gate-0 models whose MLP-input norms taper to the bounded map (tapernorm/bound.py): the
lean graph keeps Mul -> Tanh per bounded norm in front of the folded weights; parity of prompt / decode logits and
greedy tokens (the compile's own check) and of a ragged batch; with and without position 0's own scale; the generic
export and fp16; the report and summary say how many norms are bounded."""
import pytest
import torch

from lean_util import prompt_ids, torch_steps
from tapernorm.bound import set_bound
from tapernorm.checkpoint import save_checkpoint
from tapernorm.compiler.pipeline import compile_checkpoint, summary_text
from tapernorm.runtime import DecoderSession, OrtDecoder, generate_ids
from tiny_models import make_pos0


def _bounded(pos0=True, bound=1.5):
    m = make_pos0("tiny", "all", pos0, embed_scale=20.0)
    assert len(set_bound(m, bound, "post_attention")) == 2
    return m


def _ragged(model, out, variant="model.onnx"):
    rows = [prompt_ids(256, 9), prompt_ids(256, 5, k=11), prompt_ids(256, 2, k=5)]
    ref = [torch_steps(model, p, 3)[0] for p in rows]
    sess = DecoderSession(out, variant=variant, provider="cpu", intra_op_threads=1)
    assert generate_ids(OrtDecoder(sess), rows, max_new_tokens=3).tokens == ref


@pytest.mark.parametrize("pos0", [True, False])
def test_lean_compile_keeps_one_tanh_per_bounded_norm(tmp_path, pos0):
    m = _bounded(pos0)
    save_checkpoint(m, tmp_path / "ckpt")
    rep = compile_checkpoint(tmp_path / "ckpt", tmp_path / "out", parity_tokens=5, unfused=True)
    assert rep["graph"] == "lean" and rep["parity"]["ok"] and rep["statistics_check"]["ok"]
    assert len(rep["folded_layers"]) == 5
    assert rep["bound"] == {"sites": 2, "bound": [1.5], "per_feature": 0, "model.onnx": {"tanh": 2}, "model_unfused.onnx": {"tanh": 2}}
    assert rep["export"]["model.onnx"]["ops"]["Tanh"] == 2
    for g in rep["parity"]["graphs"].values():
        assert g["tokens_identical"] and g["prompt_logits_max_abs_diff"] < 1e-4 * rep["parity"]["logit_scale"]
    assert "bounded maps: 2 norm(s) taper to B tanh(x c / B) (B 1.5), 2 Tanh in model.onnx" in summary_text(rep)
    for v in ("model.onnx", "model_unfused.onnx"):
        _ragged(m, tmp_path / "out", v)


def test_unbounded_model_reports_no_bound(tmp_path):
    save_checkpoint(make_pos0("tiny", "internal", False, embed_scale=20.0), tmp_path / "ckpt")
    rep = compile_checkpoint(tmp_path / "ckpt", tmp_path / "out", parity_tokens=3)
    assert rep["bound"]["sites"] == 0 and "Tanh" not in rep["export"]["model.onnx"]["ops"]
    assert "bounded maps" not in summary_text(rep)


def test_generic_export_and_fp16_with_bounds(tmp_path):
    m = _bounded()
    save_checkpoint(m, tmp_path / "ckpt")
    rep = compile_checkpoint(tmp_path / "ckpt", tmp_path / "gen", parity_tokens=4, graph="generic")
    assert rep["graph"] == "generic" and rep["parity"]["ok"] and rep["bound"]["sites"] == 2
    _ragged(m, tmp_path / "gen")
    rep = compile_checkpoint(tmp_path / "ckpt", tmp_path / "fp16", precision="fp16", parity_tokens=3)
    assert rep["parity"]["ok"] and rep["bound"]["model.onnx"]["tanh"] == 2


def test_lean_compile_with_a_bound_per_feature(tmp_path):
    m = make_pos0("tiny", "all", True, embed_scale=20.0, bound_rms=(2.0, "post_attention"))
    save_checkpoint(m, tmp_path / "ckpt")
    rep = compile_checkpoint(tmp_path / "ckpt", tmp_path / "out", parity_tokens=5)
    assert rep["parity"]["ok"] and len(rep["folded_layers"]) == 5
    assert rep["bound"] == {"sites": 2, "bound": [], "per_feature": 2, "model.onnx": {"tanh": 2}}
    assert "(B per feature at 2), 2 Tanh in model.onnx" in summary_text(rep)
    _ragged(m, tmp_path / "out")
