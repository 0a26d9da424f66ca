"""Fold of bounded gate-0 maps (tapernorm/bound.py, passes/bound.py): B gamma_t folds into the consumer linears
exactly and tanh(x c / B [* p]) stays, one Tanh per bounded norm, in the scope above the norm; with and without
position 0's own scale; the bound is live; a bounded LayerNorm is refused naming the layer."""
import pytest
import torch

from tapernorm import taper_layers
from tapernorm.bound import set_bound
from tapernorm.compiler.export_onnx import KVCacheLM, dynamic_shapes, example_inputs
from tapernorm.passes import fold, materialize
from tapernorm.passes.capture import capture
from tapernorm.passes.pipeline import site_results
from tiny_models import kv_capture, make_pos0, prefill_args

aten = torch.ops.aten


def _tanhs(gm) -> int:
    return sum(1 for n in gm.graph.nodes if n.target == aten.tanh.default)


@pytest.mark.parametrize("pos0", [True, False])
def test_bounded_norms_fold_and_keep_one_tanh_each(pos0):
    m = make_pos0("tiny", "all", pos0, embed_scale=20.0)
    bounded = set_bound(m, 1.5, "post_attention")  # the MLP-input norms of both layers
    assert len(bounded) == 2
    w, args, ds, gm, pre, ref = kv_capture(m)
    for fn, status in ((fold, "folded"), (materialize, "materialized")):
        g2, rep = fn(gm, args, dynamic_shapes=ds, original=w)
        assert rep[status] == 5 and rep["skipped"] == 0 and rep["verify"]["ok"], rep["layers"]
        assert _tanhs(g2) == 2
        rows = [r for r in rep["layers"].values() if r.get("bound")]
        assert len(rows) == 2 and all(r["bound"] == 1.5 for r in rows)
        sites = site_results(g2)
        lay = dict(taper_layers(m))
        for name, s in sites.items():
            layer = lay[name.removeprefix("model.")]
            if layer.has_bound:
                assert s.bound_prescale == pytest.approx(float(layer.c) / 1.5, rel=1e-6)
                assert torch.allclose(s.scale, 1.5 * layer.weight_t.double())  # B gamma_t: what folds
            else:
                assert s.bound_prescale is None
        if status == "folded":
            assert rep["graph"]["taper_nodes_after"] == 0 and rep["graph"]["stat_ops_after"] == 0
        with torch.no_grad():
            got = g2(*pre)[0]
        assert torch.allclose(got, ref, atol=1e-5 * max(1.0, float(ref.abs().max()))), float((got - ref).abs().max())


def test_the_bound_is_live():
    """The same model without its bound gives other logits: the Tanh the fold keeps is doing work."""
    m = make_pos0("tiny", "all", True, embed_scale=20.0)
    w, pre = KVCacheLM(m), prefill_args(m)
    with torch.no_grad():
        plain = w(*pre)[0]
        set_bound(m, 0.5, "post_attention")
        bounded = w(*pre)[0]
    assert float((plain - bounded).abs().max()) > 1e-3 * float(plain.abs().max())


def test_bounded_layernorm_is_refused_naming_the_layer():
    m = make_pos0("tiny-gpt2", "all", False)
    set_bound(m, 2.0, r"layers\.0\.")
    w = KVCacheLM(m)
    args, ds = example_inputs(m.config), dynamic_shapes(m.config.n_layers)
    _, rep = fold(capture(w, args, dynamic_shapes=ds), args, dynamic_shapes=ds, original=w)
    skipped = {k: r["reason"] for k, r in rep["layers"].items() if r["status"] == "skipped"}
    assert len(skipped) == 2 and rep["folded"] == 3 and rep["verify"]["ok"]
    assert all(k.split(".")[-2] == "0" or ".0." in k for k in skipped)
    assert all("bounded LayerNorm map" in why and k in why for k, why in skipped.items())


@pytest.mark.parametrize("pos0", [True, False])
def test_per_feature_bounds_fold_exactly(pos0):
    """A B per feature (set_bound_rms, measured in the calibration): the prescale is a (d,) vector, B_i gamma_t
    folds, one Tanh per bounded norm, logits as before the fold."""
    m = make_pos0("tiny", "all", pos0, embed_scale=20.0, bound_rms=(2.0, "post_attention"))
    lay = dict(taper_layers(m))
    assert sum(layer.bound.dim() == 1 for layer in lay.values()) == 2
    w, args, ds, gm, pre, ref = kv_capture(m)
    for fn, status in ((fold, "folded"), (materialize, "materialized")):
        g2, rep = fn(gm, args, dynamic_shapes=ds, original=w)
        assert rep[status] == 5 and rep["verify"]["ok"] and _tanhs(g2) == 2, rep["layers"]
        rows = [r for r in rep["layers"].values() if r.get("bound")]
        assert len(rows) == 2 and all(set(r["bound"]) == {"features", "min", "max"} for r in rows)
        for name, s in site_results(g2).items():
            layer = lay[name.removeprefix("model.")]
            if layer.has_bound:
                assert torch.equal(s.bound_prescale, (layer.c / layer.bound).float())
                assert torch.allclose(s.scale, layer.bound.double() * layer.weight_t.double())
        with torch.no_grad():
            got = g2(*pre)[0]
        assert torch.allclose(got, ref, atol=1e-5 * max(1.0, float(ref.abs().max()))), float((got - ref).abs().max())
