"""The bounded gate-0 map (tapernorm/bound.py): B tanh(x c p / B) gamma_t at gate 0, the norm exactly at gate 1,
the blend in between; bounded whatever the input, linear for small inputs; saved and restored with the layer;
set_bound's refusals."""
import pytest
import torch

from tapernorm import TaperError, TaperNorm, calibrate, set_gate, taper_layers
from tapernorm.bound import bound_prescale, set_bound, set_bound_rms

D = 16


def _layer(bound: float = 4.0, pos0: bool = False) -> tuple[torch.nn.Sequential, TaperNorm]:
    layer = TaperNorm(D)
    with torch.no_grad():
        layer.weight.copy_(torch.rand(D, generator=torch.Generator().manual_seed(1)) + 0.5)
    seq = torch.nn.Sequential(layer)
    g = torch.Generator().manual_seed(0)
    calibrate(seq, [torch.randn(3, 7, D, generator=g) * 2 for _ in range(3)], pos0=pos0)
    set_bound(seq, bound, r"^0$")
    return seq.eval(), layer


def test_gate_one_is_the_norm_whatever_the_bound():
    seq, layer = _layer(bound=0.5)
    x = torch.randn(2, 5, D) * 30
    plain = TaperNorm(D)
    plain.load_state_dict({k: v for k, v in layer.state_dict().items()})
    plain.bound.zero_()
    plain.has_bound = False
    assert torch.equal(layer(x), plain(x))


def test_gate_zero_is_b_tanh_and_stays_bounded():
    seq, layer = _layer(bound=4.0)
    set_gate(seq, 0.0)
    x = torch.randn(2, 5, D)
    want = 4.0 * torch.tanh(x * layer.c / 4.0) * layer.weight_t
    assert torch.allclose(layer(x), want, atol=1e-6)
    huge = torch.randn(2, 5, D) * 1e6  # an overflowing token stays within B |gamma_t|
    assert bool((layer(huge).abs() <= 4.0 * layer.weight_t.abs() + 1e-5).all())
    small = torch.randn(2, 5, D) * 1e-3 / float(layer.c)  # |u| << B: the linear map x c gamma_t
    assert torch.allclose(layer(small), small * layer.c * layer.weight_t, rtol=1e-4, atol=0)
    assert bound_prescale(layer) == pytest.approx(float(layer.c) / 4.0)


def test_taper_blends_norm_and_bounded_map():
    seq, layer = _layer(bound=2.0)
    x = torch.randn(2, 5, D) * 3
    set_gate(seq, 1.0)
    normed = layer(x)
    set_gate(seq, 0.0)
    fixed = layer(x)
    set_gate(seq, 0.25)
    assert torch.allclose(layer(x), 0.25 * normed + 0.75 * fixed, atol=1e-6)


def test_position_zero_scale_is_inside_the_tanh():
    seq, layer = _layer(bound=3.0, pos0=True)
    with torch.no_grad():
        layer.c0.fill_(float(layer.c) * 0.25)
    set_gate(seq, 0.0)
    x = torch.randn(2, 5, D) * 4
    y = layer(x)
    want0 = 3.0 * torch.tanh(x[:, 0] * layer.c0 / 3.0) * layer.weight_t
    assert torch.allclose(y[:, 0], want0, atol=1e-6)
    assert torch.allclose(y[:, 1:], 3.0 * torch.tanh(x[:, 1:] * layer.c / 3.0) * layer.weight_t, atol=1e-6)


def test_saved_and_restored_and_older_files_load_unbounded():
    seq, layer = _layer(bound=4.0)
    set_gate(seq, 0.0)
    sd = seq.state_dict()
    back = torch.nn.Sequential(TaperNorm(D))
    back.load_state_dict(sd)
    assert back[0].has_bound and float(back[0].bound) == 4.0 and "bound=4" in repr(back[0])
    x = torch.randn(2, 5, D) * 50
    assert torch.equal(back.eval()(x), seq(x))
    old = {k: v for k, v in sd.items() if not k.endswith("bound")}  # a file written before the bound existed
    back2 = torch.nn.Sequential(TaperNorm(D))
    back2.load_state_dict(old)
    assert not back2[0].has_bound


@pytest.mark.parametrize("bound,match", [(-1.0, "finite number >= 0"), (float("inf"), "finite number >= 0"),
                                         (float("nan"), "finite number >= 0")])
def test_set_bound_refuses_bad_values(bound, match):
    seq, _ = _layer()
    with pytest.raises(TaperError, match=match):
        set_bound(seq, bound, ".")


def test_set_bound_names_a_pattern_that_matches_nothing():
    seq, _ = _layer()
    with pytest.raises(TaperError, match="no TaperNorm matches 'mlp'"):
        set_bound(seq, 2.0, "mlp")
    assert set_bound(seq, 0.0, ".") == ["0"] and not taper_layers(seq)[0][1].has_bound  # 0 turns it off


def _rms_layer(k: float = 4.0, skip: int = 1) -> tuple[torch.nn.Sequential, TaperNorm, torch.Tensor]:
    """A layer with a per-feature bound measured on inputs whose feature i has scale `scale[i]`; position 0 of each
    sequence is a huge sink that calibration leaves out."""
    layer = TaperNorm(D)
    seq = torch.nn.Sequential(layer)
    assert set_bound_rms(seq, k, r"^0$") == ["0"]
    g = torch.Generator().manual_seed(0)
    scale = torch.linspace(0.5, 5.0, D)
    batches = []
    for _ in range(4):
        x = torch.randn(8, 16, D, generator=g) * scale
        x[:, 0] *= 1e3
        batches.append(x)
    calibrate(seq, batches, skip_positions=skip)
    return seq.eval(), layer, scale


def test_per_feature_bound_is_k_times_each_features_rms_of_u():
    _, layer, scale = _rms_layer(k=4.0)
    assert layer.has_bound and layer.bound.shape == (D,)
    ratio = layer.bound / (4.0 * float(layer.c) * scale)  # the RMS of u_i = x_i c is about c * scale_i
    assert float(ratio.min()) > 0.85 and float(ratio.max()) < 1.15, ratio  # the sink position is left out
    assert bound_prescale(layer).shape == (D,) and "bound=per-feature" in repr(layer)


@torch.no_grad()
def test_per_feature_bound_at_gate_zero_squashes_only_outliers():
    seq, layer, scale = _rms_layer(k=4.0)
    set_gate(seq, 0.0)
    x = torch.randn(2, 5, D) * scale
    want = layer.bound * torch.tanh(x * layer.c / layer.bound) * layer.weight_t
    assert torch.allclose(layer(x), want, atol=1e-6)
    lin = x * layer.c * layer.weight_t
    assert float(((layer(x) - lin).abs() / lin.abs().clamp_min(1e-6)).median()) < 0.02  # ordinary values ~linear
    huge = layer(x * 1e6)
    assert bool((huge.abs() <= (layer.bound * layer.weight_t).abs() + 1e-5).all())


def test_per_feature_bound_saved_and_restored_into_a_fresh_layer():
    seq, layer, _ = _rms_layer()
    set_gate(seq, 0.0)
    back = torch.nn.Sequential(TaperNorm(D))
    back.load_state_dict(seq.state_dict())
    assert back[0].has_bound and torch.equal(back[0].bound, layer.bound)
    x = torch.randn(2, 5, D) * 50
    assert torch.equal(back.eval()(x), seq(x))


def test_set_bound_rms_refuses_bad_factors_and_calibrated_layers():
    seq = torch.nn.Sequential(TaperNorm(D))
    for bad in (0.0, -2.0, float("inf"), float("nan")):
        with pytest.raises(TaperError, match="finite number > 0"):
            set_bound_rms(seq, bad, ".")
    calibrated, _ = _layer()
    with pytest.raises(TaperError, match="already calibrated.*before the taper starts"):
        set_bound_rms(calibrated, 4.0, ".")
