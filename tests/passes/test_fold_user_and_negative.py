"""A user's module with fused qkv / gate-up, and every case the fold must refuse (left as is, with a reason)."""
import json

import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F

from passes_models import float_batches, make_fused, seeded_gains
from tapernorm import TaperLayerNorm, TaperNorm, calibrate, set_gate
from tapernorm.passes import VerifyError, fold, materialize

aten = torch.ops.aten
X = (torch.randn(2, 6, 16, generator=torch.Generator().manual_seed(7)),)


def _close(gm, model, x=X):
    with torch.no_grad():
        torch.testing.assert_close(gm(*x), model(*x), rtol=1e-5, atol=1e-5)


def test_fused_qkv_and_gate_up_fold():
    model = make_fused()
    gm, report = fold(model, X)
    assert report["folded"] == 2
    assert report["layers"]["norm1"]["consumers"] == ["qkv"]
    assert report["layers"]["norm2"]["consumers"] == ["gate_up"]
    lin = {n.args[1].target: n for n in gm.graph.nodes if n.target == aten.linear.default}
    assert lin["qkv.weight"].args[0].op == "placeholder"  # qkv reads x directly
    assert len(lin["gate_up.weight"].args) == 3  # LN shift became a new bias on the bias-free gate_up
    assert not any(n.target in (aten.mean.dim, aten.rsqrt.default) for n in gm.graph.nodes)
    _close(gm, model)
    assert [p["name"] for p in report["passes"]] == ["detect", "materialize", "fold", "cleanup"]


def test_gate_half_is_left_alone():
    model = make_fused(gate=0.5)
    gm, report = fold(model, X)
    assert report["folded"] == 0 and report["skipped"] == 2
    assert report["layers"]["norm1"]["reason"] == "norm1: gate 0.5, fold needs gate 0"
    assert report["layers"]["norm1"]["status"] == "skipped"
    assert any(n.target == aten.rsqrt.default for n in gm.graph.nodes)  # the norm is still there
    _close(gm, model)


def test_uncalibrated_layer_is_left_alone():
    model = make_fused()
    model.norm2 = TaperLayerNorm(16).eval()  # added after calibration: gate 1, c not frozen
    gm, report = fold(model, X)
    assert report["layers"]["norm1"]["status"] == "folded"
    row = report["layers"]["norm2"]
    assert row["status"] == "skipped" and "not calibrated" in row["reason"] and row["reason"].startswith("norm2:")
    _close(gm, model)


def test_training_mode_is_refused():
    model = make_fused().train()
    with pytest.raises(ValueError, match="training mode"):
        fold(model, X)
    with pytest.raises(ValueError, match="training mode"):
        materialize(model, X)
    model.eval()
    model.norm1.train()  # one layer left in training mode
    gm, report = fold(model, X)
    assert "training mode" in report["layers"]["norm1"]["reason"]
    assert report["layers"]["norm1"]["status"] == "skipped" and report["layers"]["norm2"]["status"] == "folded"


class NormInto(nn.Module):
    """norm(x) feeding `how`: a linear plus something a linear fold cannot absorb."""

    def __init__(self, how: str, d: int = 16):
        super().__init__()
        self.how, self.norm, self.lin, self.other = how, TaperNorm(d), nn.Linear(d, d), nn.Linear(d, d)

    def forward(self, x):
        y = self.norm(x)
        if self.how == "silu":
            return self.lin(y) + F.silu(y)
        if self.how == "residual":
            return y + self.lin(y)
        if self.how == "output":
            return self.lin(y), y
        if self.how == "shared":  # the same weight also reads the raw input
            return self.lin(y) + self.lin(x)
        if self.how == "weight":  # the norm output is used as a weight
            return F.linear(x, y[0, :16, :])
        raise ValueError(self.how)


def _norm_into(how):
    torch.manual_seed(0)
    m = NormInto(how)
    seeded_gains(m)
    calibrate(m, float_batches(16))
    set_gate(m, 0.0)
    return m.eval()


@pytest.mark.parametrize("how,expect", [
    ("silu", "silu"), ("residual", "add"), ("output", "graph output"), ("shared", "shared with"),
    ("weight", "as a weight"),
])
def test_unfoldable_consumer_keeps_explicit_map(how, expect):
    model = _norm_into(how)
    gm, report = fold(model, X)
    row = report["layers"]["norm"]
    assert row["status"] == "materialized" and report["folded"] == 0, row
    assert expect in row["reason"] and row["reason"].startswith("norm: ") and "keeping the explicit map" in row["reason"]
    scoped = [n.target for n in gm.graph.nodes if n.op == "call_function" and any(p == "norm" for p, _ in (n.meta.get("nn_module_stack") or {}).values())]
    assert scoped == [aten.mul.Tensor]  # the explicit x * s map, no statistic
    assert gm.get_parameter("lin.weight") is model.lin.weight  # nothing folded into the linear
    _close(gm, model)
    json.dumps(report)


def test_tied_head_not_untied_when_disallowed():
    from tiny_models import make_tiny
    model = make_tiny("tiny", "all")
    gm, report = fold(model, (torch.randint(0, 256, (2, 5)),), untie_embeddings=False)
    assert report["folded"] == 4 and report["layers"]["norm"]["status"] == "materialized"
    assert "shared with" in report["layers"]["norm"]["reason"] and "embedding" in report["layers"]["norm"]["reason"]


def test_wrong_fold_fails_loudly(monkeypatch):
    import importlib
    fold_mod = importlib.import_module("tapernorm.passes.fold")  # the module (the package exports a function `fold`)
    real = fold_mod.fold_linear

    def off_by_one_percent(w, b, s, beta=None, layout="out_in"):
        return real(w, b, s * 1.01, beta, layout)

    monkeypatch.setattr(fold_mod, "fold_linear", off_by_one_percent)
    with pytest.raises(VerifyError, match="max abs diff"):
        fold(make_fused(), X)


def test_graph_is_checked_after_each_pass(monkeypatch):
    import importlib
    pipeline = importlib.import_module("tapernorm.passes.pipeline")
    real = pipeline.drop_unused_attrs

    def drop_too_much(gm, released):  # a broken cleanup: removes a weight the graph still reads
        out = real(gm, released)
        del gm.get_submodule("proj")._parameters["weight"]
        return out

    monkeypatch.setattr(pipeline, "drop_unused_attrs", drop_too_much)
    with pytest.raises(RuntimeError, match=r"^fold: .*'CleanupPass'.*: RuntimeError: .*proj.weight.*(nonexistent|does not resolve)"):
        fold(make_fused(), X)
