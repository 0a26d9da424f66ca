"""Calibration against the closed-form least-squares c, and Propositions 4.1-4.3 as numeric identities."""
import pytest
import torch
import torch.nn.functional as F

from tapernorm import TaperError, TaperLayerNorm, TaperNorm, build_model, calibrate, set_gate
from tapernorm.train.scale_loss import ScaleTarget, scale_loss, scale_stat

D = 24


def _batches(n=5, seed=0, centered_shift=0.0):
    g = torch.Generator().manual_seed(seed)
    # batches with different scales so the EMA weighting and its bias correction matter
    return [torch.randn(3, 7, D, generator=g, dtype=torch.float64) * (0.5 + i) + centered_shift for i in range(n)]


def _ema_ratio(nums, dens, beta):
    m_n = m_d = 0.0
    for a, b in zip(nums, dens):
        m_n, m_d = (1 - beta) * m_n + beta * a, (1 - beta) * m_d + beta * b
    corr = 1 - (1 - beta) ** len(nums)
    return (m_n / corr) / (m_d / corr)


@pytest.mark.parametrize("kind", ["rms", "ln"])
def test_calibrate_matches_closed_form_c(kind):
    layer = (TaperNorm(D, eps=1e-6) if kind == "rms" else TaperLayerNorm(D, eps=1e-5)).double()
    with torch.no_grad():
        layer.weight.uniform_(0.5, 1.5)
        if kind == "ln":
            layer.bias.uniform_(-0.3, 0.3)
    gamma = layer.weight.detach().clone()
    batches = _batches(centered_shift=0.7 if kind == "ln" else 0.0)
    nums, dens = [], []
    for h in batches:
        if kind == "ln":
            h = h - h.mean(-1, keepdim=True)
        r = torch.sqrt(h.pow(2).mean(-1) + layer.eps)  # r(h) (RMS) or sigma(h) (LN)
        hg2 = (h * gamma).pow(2).sum(-1)  # ||h * gamma||^2
        nums.append(float((hg2 / r).mean()))
        dens.append(float(hg2.mean()))
    expected = _ema_ratio(nums, dens, layer.beta_ema)
    got = calibrate(layer, batches)[""]
    assert got == pytest.approx(expected, rel=1e-6)
    assert float(layer.c) == pytest.approx(expected, rel=1e-6)
    assert torch.equal(layer.weight_t, layer.weight)  # gamma -> gamma_t copied
    # one batch: c is exactly the least-squares fit of the linear branch to the normalized branch
    one = TaperNorm(D, eps=1e-6).double()
    with torch.no_grad():
        one.weight.copy_(gamma)
    h = batches[2]
    calibrate(one, [h])
    a = (h / torch.sqrt(h.pow(2).mean(-1, keepdim=True) + 1e-6) * gamma).reshape(-1, 1)
    b = (h * gamma).reshape(-1, 1)
    c_ls = torch.linalg.lstsq(b, a).solution.item()
    assert float(one.c) == pytest.approx(c_ls, rel=1e-6)
    with pytest.raises(TaperError, match="already calibrated"):
        calibrate(one, [h])  # calibrating twice is refused


def _radial(model, h, logits_fn, targets):
    h = h.clone().requires_grad_(True)
    loss = F.cross_entropy(logits_fn(h).flatten(0, 1), targets.flatten())
    (g,) = torch.autograd.grad(loss, h)
    return (g * h).sum(-1).detach(), g  # <dL/dh_bt, h_bt> per token


def test_prop_4_1_no_radial_gradient_through_final_norm():
    torch.manual_seed(0)
    model = build_model("tiny", taper_mode="internal").double()
    model.norm.eps = 0.0  # exact 0-homogeneity (eps > 0 leaves an O(eps / r^2) radial term)
    with torch.no_grad():
        model.norm.weight.uniform_(0.5, 1.5)
    h = torch.randn(2, 6, 32, dtype=torch.float64) * 3
    targets = torch.randint(0, 256, (2, 6))
    rad, g = _radial(model, h, model.head, targets)
    assert g.abs().max() > 1e-4  # a real gradient...
    assert rad.abs().max() < 1e-12 * g.norm()  # ...with no radial component


def test_prop_4_2_ce_with_positive_margin_grows_norm_without_final_norm():
    torch.manual_seed(0)
    model = build_model("tiny", taper_mode="all").double()
    calibrate(model, [torch.randint(0, 256, (2, 8))])
    set_gate(model, 0.0)  # head is now the linear map h -> lm_head(h * s): no final norm
    h = torch.randn(2, 6, 32, dtype=torch.float64)
    with torch.no_grad():
        targets = model.head(h).argmax(-1)  # positive margin: the target logit is the largest
    rad, g = _radial(model, h, model.head, targets)
    assert (rad < 0).all()  # gradient descent (h -= lr * g) increases ||h||
    h2 = h - 1e-2 * g
    assert (h2.norm(dim=-1) > h.norm(dim=-1)).all()
    with torch.no_grad():
        assert model.head(h2).norm(dim=-1).mean() > model.head(h).norm(dim=-1).mean()  # logit chasing


@pytest.mark.parametrize("centered", [False, True])
def test_prop_4_3_scale_loss_radial_force_has_sign_of_s_minus_target(centered):
    g = torch.Generator().manual_seed(0)
    h = (torch.randn(4, 5, D, generator=g, dtype=torch.float64) * torch.linspace(0.2, 3, 5).view(1, 5, 1)) + 0.4
    s = scale_stat(h, centered)
    s_tgt, lam = float(s.median()), 0.3
    hh = h.clone().requires_grad_(True)
    (grad,) = torch.autograd.grad(scale_loss(hh, s_tgt, lam, centered), hh)
    direction = h - h.mean(-1, keepdim=True) if centered else h  # LN: the mean-centred vector
    rad = (grad * direction).sum(-1)
    expected = 2 * lam * (s - s_tgt) * s / s.numel()  # closed form: d s/d h = direction / (d s)
    assert torch.allclose(rad, expected, rtol=1e-6, atol=1e-15)
    assert torch.equal(torch.sign(rad), torch.sign(s - s_tgt))
    if centered:  # the restoring force lives in the mean-zero subspace
        assert grad.sum(-1).abs().max() < 1e-12


def test_scale_loss_ignores_padding_and_target_is_bias_corrected_ema():
    h = torch.ones(1, 3, 4)
    h[0, 2] *= 100.0
    mask = torch.tensor([[1, 1, 0]])
    assert float(scale_loss(h, 1.0, 1.0, mask=mask)) == pytest.approx(0.0, abs=1e-9)
    t = ScaleTarget(0.1)
    for v in (2.0, 4.0):
        t.update(v)
    m = 0.9 * 0.1 * 2.0 + 0.1 * 4.0
    assert t.value() == pytest.approx(m / (1 - 0.9 ** 2))
    frozen = t.freeze()
    with pytest.raises(ValueError, match="frozen"):
        t.update(1.0)
    assert t.value() == frozen
