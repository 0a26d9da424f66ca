"""TaperNorm / TaperLayerNorm: both limits against torch's own norms, taperize on our and HF models."""
import pytest
import torch
import torch.nn as nn

from tapernorm import (
    TaperError, TaperLayerNorm, TaperNorm, build_model, calibrate, get_gate, set_gate, taper_layers, taperize,
)

D = 48


def _rand_rms():
    rms = nn.RMSNorm(D, eps=1e-6)
    nn.init.normal_(rms.weight, 1.0, 0.3)
    tn = TaperNorm(D, eps=1e-6)
    tn.weight.data.copy_(rms.weight)
    return rms, tn


def _rand_ln():
    ln = nn.LayerNorm(D, eps=1e-5)
    nn.init.normal_(ln.weight, 1.0, 0.3)
    nn.init.normal_(ln.bias, 0.0, 0.3)
    tl = TaperLayerNorm(D, eps=1e-5)
    tl.weight.data.copy_(ln.weight)
    tl.bias.data.copy_(ln.bias)
    return ln, tl


def _calibrate_layer(layer, x):
    layer.collecting = True
    layer.train()
    layer(x)
    return layer.freeze_c()


def test_gate_one_is_rmsnorm():
    rms, tn = _rand_rms()
    x = torch.randn(4, 7, D) * 3
    assert (tn(x) - rms(x)).abs().max() <= 1e-6


def test_gate_one_is_layernorm():
    ln, tl = _rand_ln()
    x = torch.randn(4, 7, D) * 3 + 1
    assert (tl(x) - ln(x)).abs().max() <= 1e-6


def test_gate_zero_rms_is_diagonal_map_without_statistics(monkeypatch):
    _, tn = _rand_rms()
    x = torch.randn(3, 5, D)
    _calibrate_layer(tn, x)
    tn.eval()
    tn.set_gate(0.0)
    with torch.no_grad():
        tn.weight_t.mul_(1.1)  # gamma_t trains away from gamma
    expected = x * (tn.c * tn.weight_t)
    # no per-token statistic: forbid the reductions a norm would need
    for fn in ("mean", "rsqrt", "sqrt", "var", "std"):
        monkeypatch.setattr(torch.Tensor, fn, lambda *a, **k: (_ for _ in ()).throw(AssertionError("statistic")))
    torch.testing.assert_close(tn(x), expected, rtol=0, atol=0)


def test_gate_zero_ln_is_affine_map():
    _, tl = _rand_ln()
    x = torch.randn(3, 5, D) + 2
    _calibrate_layer(tl, x)
    tl.eval()
    tl.set_gate(0.0)
    expected = (x - x.mean(-1, keepdim=True)) * (tl.c * tl.weight_t) + tl.bias_t
    torch.testing.assert_close(tl(x), expected, rtol=0, atol=0)


def test_intermediate_gate_mixes_branches():
    rms, tn = _rand_rms()
    x = torch.randn(2, 3, D)
    _calibrate_layer(tn, x)
    tn.set_gate(0.3)
    expected = 0.3 * rms(x) + 0.7 * x * tn.c * tn.weight_t
    torch.testing.assert_close(tn(x), expected)


def test_calibration_is_least_squares_c():
    """c* = E[||h g||^2 / r] / E[||h g||^2]; with one batch the EMA bias correction is exact."""
    _, tn = _rand_rms()
    x = torch.randn(6, 9, D) * 2
    c = _calibrate_layer(tn, x)
    hg2 = (x * tn.weight.detach()).pow(2).sum(-1).double()
    r = torch.sqrt(x.pow(2).mean(-1) + tn.eps).double()
    assert c == pytest.approx(float((hg2 / r).mean() / hg2.mean()), rel=1e-6)
    # and c minimises || c h gamma - h gamma / r ||^2 over the batch (the least-squares property)
    w = tn.weight.detach()
    loss = lambda cc: float(((cc * x * w) - (x / r[..., None].float()) * w).pow(2).sum())
    assert loss(c) <= min(loss(c * 1.01), loss(c * 0.99))


def test_gate_outside_unit_interval_refused():
    _, tn = _rand_rms()
    for bad in (-0.1, 1.5, float("nan")):
        with pytest.raises(TaperError, match="outside"):
            tn.set_gate(bad)


def test_gate_below_one_needs_calibration():
    _, tn = _rand_rms()
    with pytest.raises(TaperError, match="calibrat"):
        tn.set_gate(0.5)


def test_calibrating_twice_refused():
    model = build_model("tiny", taper_mode="internal")
    batches = [torch.randint(0, 256, (2, 8))]
    calibrate(model, batches)
    before = {n: m.c.clone() for n, m in taper_layers(model)}
    with pytest.raises(TaperError, match="already calibrated"):
        calibrate(model, batches)
    assert all(torch.equal(before[n], m.c) for n, m in taper_layers(model))


def test_state_dict_round_trip_restores_gate_and_calibration():
    model = build_model("tiny", taper_mode="all")
    calibrate(model, [torch.randint(0, 256, (2, 8))])
    set_gate(model, 0.0)
    fresh = build_model("tiny", taper_mode="all")
    fresh.load_state_dict(model.state_dict())
    assert get_gate(fresh) == 0.0
    assert all(m.calibrated for _, m in taper_layers(fresh))


@pytest.mark.parametrize("arch", ["tiny", "tiny-gpt2"])
@pytest.mark.parametrize("mode,count", [("internal", 4), ("all", 5)])
def test_taperize_reference_model_identity_at_gate_one(arch, mode, count):
    torch.manual_seed(0)
    model = build_model(arch).eval()
    ids = torch.randint(0, 256, (2, 10))
    before = model(ids)
    replaced = taperize(model, mode)
    assert len(replaced) == count and ("norm" in replaced) == (mode == "all")
    torch.testing.assert_close(model(ids), before, rtol=0, atol=1e-5)


def _tiny_hf_llama():
    from transformers import LlamaConfig, LlamaForCausalLM
    cfg = LlamaConfig(vocab_size=128, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                      num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=64,
                      tie_word_embeddings=True)
    return LlamaForCausalLM(cfg).eval()


def _tiny_hf_gpt2():
    from transformers import GPT2Config, GPT2LMHeadModel
    cfg = GPT2Config(vocab_size=128, n_embd=32, n_layer=2, n_head=4, n_positions=64,
                     resid_pdrop=0.0, embd_pdrop=0.0, attn_pdrop=0.0)
    return GPT2LMHeadModel(cfg).eval()


@pytest.mark.parametrize("make,final", [(_tiny_hf_llama, "model.norm"), (_tiny_hf_gpt2, "transformer.ln_f")])
@pytest.mark.parametrize("mode", ["internal", "all"])
def test_taperize_hf_models_identity_at_gate_one(make, final, mode):
    pytest.importorskip("transformers")
    torch.manual_seed(0)
    model = make()
    for n, p in model.named_parameters():  # non-trivial gains
        if "norm" in n or "ln_" in n:
            p.data.uniform_(0.5, 1.5)
    ids = torch.randint(0, 128, (2, 9))
    with torch.no_grad():
        before = model(ids).logits
        replaced = taperize(model, mode)
        after = model(ids).logits
    assert (final in replaced) == (mode == "all")
    assert len(replaced) == 4 + (mode == "all")
    assert (after - before).abs().max() <= 1e-5
    calibrate(model, [ids], forward=lambda m, b: m(b))
    set_gate(model, 0.0)
    assert get_gate(model) == 0.0


def test_taperize_refuses_unrepresentable_norm():
    class Gemma3RMSNorm(nn.Module):  # scales by (1 + weight)
        def __init__(self):
            super().__init__()
            self.weight = nn.Parameter(torch.zeros(8))
            self.eps = 1e-6

    m = nn.Sequential(nn.Linear(8, 8), Gemma3RMSNorm(), nn.Linear(8, 8), nn.GroupNorm(2, 8))
    with pytest.raises(TaperError, match=r"1: Gemma3RMSNorm"):
        taperize(m, "all")
    with pytest.raises(TaperError, match="mode"):
        taperize(m, "some")


def test_taperize_refusal_changes_nothing():
    m = nn.Sequential(nn.RMSNorm(8, eps=1e-6), nn.Linear(8, 8), nn.LayerNorm((2, 4)))  # over two dims
    with pytest.raises(TaperError, match=r"^2: LayerNorm has a gain of shape \(2, 4\), not a 1-D"):
        taperize(m, "all")
    assert type(m[0]) is nn.RMSNorm


def test_taperize_torch_rmsnorm_default_eps_identity():
    rms = nn.RMSNorm(D)  # eps=None: torch uses the dtype's machine epsilon
    nn.init.normal_(rms.weight, 1.0, 0.3)
    m = nn.Sequential(rms, nn.Linear(D, D))
    x = torch.randn(2, 3, D) * 0.01  # small RMS makes a wrong eps visible
    before = m(x)
    taperize(m, "all")
    assert (m(x) - before).abs().max() <= 1e-6


def test_calibrate_eval_model_is_deterministic_with_dropout():
    class Net(nn.Module):
        def __init__(self):
            super().__init__()
            self.drop = nn.Dropout(0.5)
            self.norm = nn.RMSNorm(D, eps=1e-6)
            self.head = nn.Linear(D, 4)

        def forward(self, x):
            return self.head(self.norm(self.drop(x)))

    batches = [torch.randn(4, 5, D) for _ in range(3)]
    cs = []
    for seed in (0, 1):
        torch.manual_seed(seed)
        net = Net().eval()
        torch.manual_seed(0)
        nn.init.normal_(net.norm.weight, 1.0, 0.3)
        taperize(net, "all")
        cs.append(calibrate(net, batches)["norm"])
        assert not net.training and not net.drop.training and not net.norm.training
    assert cs[0] == cs[1]


def test_calibration_that_misses_a_layer_names_it_and_freezes_nothing():
    class TwoNorms(nn.Module):
        def __init__(self):
            super().__init__()
            self.used, self.unused = nn.RMSNorm(8, eps=1e-6), nn.RMSNorm(8, eps=1e-6)

        def forward(self, x):
            return self.used(x)

    m = TwoNorms()
    taperize(m, "all")
    with pytest.raises(TaperError, match=r"^calibration never reached 1 TaperNorm layer\(s\): unused; "):
        calibrate(m, [torch.randn(2, 3, 8)])
    assert not m.used.calibrated and not m.unused.calibrated and not m.used.collecting
