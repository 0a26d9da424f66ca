"""compiler/parity.py's float64 second opinion: when fp32 parity misses, PyTorch in float64 decides whether the graph
or the float32 reference is off (a model ill-conditioned on the prompt), as the fold's own check does."""
import numpy as np
import pytest
import torch

from tiny_models import make_tiny
from tapernorm.checkpoint import save_checkpoint
from tapernorm.compiler import pipeline
from tapernorm.compiler.parity import float64_opinion
from tapernorm.compiler.pipeline import ParityError, compile_checkpoint
from tapernorm.passes.verify import F64_SLACK


def _triple(tokens, shift=0.0, seed=0):
    rng = np.random.default_rng(seed)
    full = rng.normal(size=(3, 16)) * 10
    steps = [rng.normal(size=16) * 10 for _ in tokens]
    return list(tokens), [s + shift for s in steps], full + shift


def test_float64_decides_between_the_graph_and_a_float32_reference_that_rounding_moved():
    exact = _triple([1, 2, 3])
    ref32 = ([1, 5, 6], [s + 0.7 for s in exact[1]], exact[2] + 0.7)  # float32 PyTorch: 0.7 off, another token
    graph = {"model.onnx": (exact[2][-1:] + 1e-4, [1, 2, 3], [s + 1e-4 for s in exact[1]])}  # the graph: right
    ok = float64_opinion(ref32, exact, graph, tol=0.01)
    assert ok["ok"] and not ok["float32_torch_tokens_identical"] and ok["float64_tokens"] == [1, 2, 3]
    assert ok["float32_torch_err"] == pytest.approx(0.7) and ok["bound"] == pytest.approx(F64_SLACK * 0.7 + 0.01)
    wrong = {"model.onnx": (exact[2][-1:] + 9.0, [1, 2, 4], [s + 9.0 for s in exact[1]])}
    bad = float64_opinion(ref32, exact, wrong, tol=0.01)
    assert not bad["ok"] and "greedy token 2 is 4 vs float64 PyTorch 3" in bad["why"]
    assert "model.onnx is 9 from PyTorch's float64 logits, PyTorch's float32 0.7" in bad["why"]


def _skew_float32_reference(monkeypatch, also_float64=False):
    """pipeline.torch_reference with its float32 answer (and, with also_float64, its float64 one) moved by 2% of
    the largest logit: past the fp32 tolerance."""
    real = pipeline.torch_reference

    def skewed(model, ids, n):
        tokens, steps, full = real(model, ids, n)
        if next(model.parameters()).dtype == torch.float32 or also_float64:
            d = 0.02 * max(1.0, float(np.abs(full).max()))
            steps, full = [s + d for s in steps], full + d
        return tokens, steps, full
    monkeypatch.setattr(pipeline, "torch_reference", skewed)


@pytest.fixture(scope="module")
def ckpt(tmp_path_factory):
    path = tmp_path_factory.mktemp("p64") / "ckpt"
    model = make_tiny("tiny", "internal", gate=0.0)
    with torch.no_grad():
        model.embed_tokens.weight.mul_(20)
    save_checkpoint(model, path)
    return path


def test_a_compile_whose_float32_reference_is_off_passes_on_float64(ckpt, tmp_path, monkeypatch):
    _skew_float32_reference(monkeypatch)
    report = compile_checkpoint(ckpt, tmp_path / "out", parity_tokens=4)
    p64 = report["parity"]["float64"]
    assert report["parity"]["ok"] and p64["ok"] and p64["graphs"]["model.onnx"]["tokens_identical"]
    assert p64["graphs"]["model.onnx"]["err_vs_float64"] < 1e-3 * report["parity"]["logit_scale"] < p64["bound"]


def test_a_graph_far_from_float64_still_fails_naming_both_distances(ckpt, tmp_path, monkeypatch):
    _skew_float32_reference(monkeypatch, also_float64=True)  # both references agree: the graph is the odd one
    with pytest.raises(ParityError, match=r"nothing written.*float64 second opinion: model\.onnx is .* from "
                                          r"PyTorch's float64 logits, PyTorch's float32 .*\(bound"):
        compile_checkpoint(ckpt, tmp_path / "out", parity_tokens=4)
    assert not (tmp_path / "out").exists()


def test_no_memory_for_float64_is_a_reason_not_a_crash(ckpt, tmp_path, monkeypatch):
    _skew_float32_reference(monkeypatch)
    monkeypatch.setenv("TAPERNORM_COMPILE_MEMORY", "1K")
    monkeypatch.setattr(pipeline, "check_fits", lambda *a, **k: None)  # the up-front estimate would refuse 1K
    with pytest.raises(ParityError, match=r"float64 second opinion: a float64 copy needs .* GiB free"):
        compile_checkpoint(ckpt, tmp_path / "out", parity_tokens=4)
