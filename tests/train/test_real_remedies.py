"""Issue 19's remedies for real checkpoints (attention sinks), on tiny models: sink-robust calibration options,
the per-token norm-input RMS loss, the staged taper schedule; each keeps the gate-0 model foldable and exact."""
import sys
from pathlib import Path

import pytest
import torch

pytest.importorskip("transformers")
sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "hf"))
from hf_models import hf_model, token_batches  # noqa: E402

from tapernorm import TaperError, TaperLayerNorm, TaperNorm, calibrate, set_gate, taper_layers, taperize  # noqa: E402
from tapernorm.train.rms_loss import NormRmsLoss  # noqa: E402
from tapernorm.train.schedule import resolve_schedule  # noqa: E402
from tapernorm.train.staged import StagedGates, block_index  # noqa: E402

D = 16


def _sink_batch(seed=0):
    """(4, 9, D) with position 0 a ~1000x 'massive activation' token, as real checkpoints have."""
    x = torch.randn(4, 9, D, generator=torch.Generator().manual_seed(seed)) * 2
    x[:, 0] *= 1000.0
    return x


def _layer_c(cls, x, **opt):
    layer = cls(D)
    with torch.no_grad():
        layer.weight.copy_(torch.rand(D, generator=torch.Generator().manual_seed(1)) + 0.5)
    seq = torch.nn.Sequential(layer)
    calibrate(seq, [x], **opt)
    return layer


@pytest.mark.parametrize("cls", [TaperNorm, TaperLayerNorm])
def test_skip_positions_equals_calibrating_without_them(cls):
    x = _sink_batch()
    ls_all = _layer_c(cls, x)
    skip = _layer_c(cls, x, skip_positions=1)
    rest = _layer_c(cls, x[:, 1:])
    assert float(skip.c) == pytest.approx(float(rest.c), rel=1e-6)
    assert float(ls_all.c) < 0.05 * float(skip.c)  # the sink dominates the least-squares c: the bug skip fixes


def test_inv_rms_is_the_mean_inverse_rms_and_ignores_a_sink():
    x = _sink_batch()
    layer = _layer_c(TaperNorm, x, stat="inv_rms")
    r_inv = torch.rsqrt(x.pow(2).mean(-1) + layer.eps)
    assert float(layer.c) == pytest.approx(float(r_inv.mean()), rel=1e-5)
    rest = _layer_c(TaperNorm, x[:, 1:], stat="inv_rms")
    assert float(layer.c) == pytest.approx(float(rest.c), rel=0.15)  # the sink adds ~0 to a mean of 1 / r


def test_per_feature_fit_is_folded_into_gamma_t():
    x = _sink_batch()
    layer = _layer_c(TaperNorm, x, per_feature=True)
    r = torch.sqrt(x.double().pow(2).mean(-1, keepdim=True) + layer.eps)
    want = layer.weight.double() * (x.double() ** 2 / r).sum((0, 1)) / (x.double() ** 2).sum((0, 1))
    torch.testing.assert_close((layer.c * layer.weight_t).double(), want, rtol=1e-5, atol=0)
    layer.set_gate(0.0)
    torch.testing.assert_close(layer(x), x * layer.taper_scale())  # still one per-feature map


def test_bad_calibration_options_are_refused():
    with pytest.raises(TaperError, match="statistic"):
        _layer_c(TaperNorm, _sink_batch(), stat="median")
    with pytest.raises(TaperError, match="skip"):
        _layer_c(TaperNorm, _sink_batch(), skip_positions=-1)
    with pytest.raises(TaperError, match="skips the first 9"):
        _layer_c(TaperNorm, _sink_batch(), skip_positions=9)


def _fold_parity(model):
    from tapernorm.passes import fold
    ids = torch.randint(3, 200, (2, 7), generator=torch.Generator().manual_seed(5))
    gm, report = fold(model, (), {"input_ids": ids, "use_cache": False})
    assert report["folded"] == len(taper_layers(model)) and report["skipped"] == 0, report["layers"]
    with torch.no_grad():
        torch.testing.assert_close(gm(input_ids=ids, use_cache=False).logits,
                                   model(input_ids=ids, use_cache=False).logits, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("kind,opt", [("llama", {"skip_positions": 1, "stat": "inv_rms"}),
                                      ("llama", {"per_feature": True, "skip_positions": 1}),
                                      ("gpt2", {"stat": "inv_rms", "per_feature": True})])
def test_every_calibration_remedy_folds_exactly(kind, opt):
    model = hf_model(kind)
    taperize(model, "all")
    calibrate(model, token_batches(), forward=lambda m, b: m(input_ids=b, use_cache=False), **opt)
    set_gate(model, 0.0)
    _fold_parity(model.eval())


def test_rms_loss_is_zero_at_the_calibrated_scale_and_restoring():
    layer = _layer_c(TaperNorm, torch.randn(2, 5, D))
    layer.train()
    loss = NormRmsLoss(torch.nn.Sequential(layer), lam=1.0)
    x = torch.randn(2, 5, D)
    x = (x / x.pow(2).mean(-1, keepdim=True).sqrt() / layer.c).requires_grad_()  # every token at r = 1 / c
    layer(x)
    assert float(loss.loss()) == pytest.approx(0.0, abs=1e-8)
    big = (x.detach() * 3).requires_grad_()
    layer(big)
    val = loss.loss()
    val.backward()
    assert float(val) > 0 and float((big.grad * big).sum()) > 0  # descent shrinks the too-large token
    layer.eval()
    layer(x)
    assert loss.loss() is None  # nothing recorded outside training


def test_staged_gates_taper_block_by_block_and_end_exactly_zero():
    model = hf_model("llama")
    taperize(model, "all")
    calibrate(model, token_batches(), forward=lambda m, b: m(input_ids=b, use_cache=False))
    sched = resolve_schedule(40, warmup=2, taper_start=4, taper_end=34)
    staged = StagedGates(sched, "last", hold=2)
    assert all(g == 1.0 for g in staged.gates(model, 5).values())  # hold
    mid = staged.gates(model, 20)
    assert mid["model.layers.1.input_layernorm"] < mid["model.layers.0.input_layernorm"]  # last block first
    assert block_index("model.layers.12.mlp") == 12 and block_index("model.norm") is None
    staged.apply(model, 34)
    assert {m.gate for _, m in taper_layers(model)} == {0.0}
    _fold_parity(model.eval())
    with pytest.raises(ValueError, match="hold"):
        StagedGates(sched, hold=100)


def test_finetune_with_every_remedy_ends_at_gate_zero_and_folds(tmp_path):
    from hf_models import FT_ARGS, hf_dir

    import tapernorm
    from tapernorm.compiler.cli import main
    src = hf_dir("llama", tmp_path / "src")
    out = tmp_path / "ft"
    assert main(["finetune", str(src), "--out", str(out), "--mode", "all", *FT_ARGS, "--calib-skip", "1",
                 "--calib-stat", "inv_rms", "--calib-per-feature", "--rms-loss", "1.0", "--taper-order", "last",
                 "--taper-hold", "1"]) == 0
    model = tapernorm.from_pretrained(out / "model").eval()
    assert tapernorm.get_gate(model) == 0.0
    _fold_parity(model)


def test_rms_hinge_charges_only_tokens_above_h_times_the_scale():
    layer = _layer_c(TaperNorm, torch.randn(2, 5, D))
    layer.train()
    loss = NormRmsLoss(torch.nn.Sequential(layer), lam=1.0, hinge=2.0)
    x = torch.randn(2, 5, D)
    x = x / x.pow(2).mean(-1, keepdim=True).sqrt() / layer.c  # every token at r = 1 / c
    layer(x * 1.9)  # under the hinge: free, though the symmetric loss would charge it
    assert float(loss.loss()) == 0.0
    big = x.clone()
    big[:, 2] *= 8.0  # one token at 8x the scale: (log 8 - log 2)^2 on 1 of 5 tokens
    layer(big)
    assert float(loss.loss()) == pytest.approx(float(torch.log(torch.tensor(4.0))) ** 2 / 5, rel=1e-4)
    with pytest.raises(ValueError, match="hinge"):
        NormRmsLoss(torch.nn.Sequential(layer), lam=1.0, hinge=0.5)


def test_pos0_calibration_gives_position_zero_its_own_scale():
    x = _sink_batch()
    layer = _layer_c(TaperNorm, x, skip_positions=1, stat="inv_rms", pos0=True)
    r_inv = torch.rsqrt(x.pow(2).mean(-1) + layer.eps)
    assert float(layer.c0) == pytest.approx(float(r_inv[:, 0].mean()), rel=1e-5)
    assert float(layer.c) == pytest.approx(float(r_inv[:, 1:].mean()), rel=1e-5)
    layer.set_gate(0.0)
    with torch.no_grad():
        y = layer(x)
    want0 = x[:, 0] * float(layer.c0) * layer.weight_t  # the sink keeps (about) its normalized size
    torch.testing.assert_close(y[:, 0], want0.detach())
    torch.testing.assert_close(y[:, 1:], (x[:, 1:] * layer.taper_scale()).detach())


def test_taper_cap_bounds_the_fixed_branch_and_leaves_gate_zero_alone():
    from tapernorm.cap import cap_rate, set_cap
    x = _sink_batch()  # position 0 at ~1000x: r * c ~ 1000 with c fitted on the others
    layer = _layer_c(TaperNorm, x, skip_positions=1, stat="inv_rms")
    seq = torch.nn.Sequential(layer)
    assert set_cap(seq, 4.0) == 1
    layer.set_gate(0.5)
    with torch.no_grad():
        y = layer(x)
        normed = x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + layer.eps) * layer.weight
        fixed = (y - 0.5 * normed) / 0.5
    rc = x.pow(2).mean(-1).sqrt() * layer.c  # (B, T)
    want = x * layer.taper_scale() * torch.clamp(4.0 / rc, max=1.0).unsqueeze(-1)
    torch.testing.assert_close(fixed, want.detach(), rtol=1e-4, atol=1e-5)
    assert cap_rate(seq) == pytest.approx(float((rc > 4).float().mean()))  # the sinks, and only them
    assert cap_rate(seq) is None  # reset
    layer.set_gate(0.0)
    with torch.no_grad():
        torch.testing.assert_close(layer(x), (x * layer.taper_scale()).detach())  # no statistic, no cap
    with pytest.raises(ValueError, match="cap"):
        set_cap(seq, 0.5)


def test_finetune_with_the_sink_recipe_ends_at_gate_zero_and_compiles(tmp_path):
    """--calib-pos0, the hinged RMS loss, the cap, a constant lr and a partial taper (--keep-norms): the saved
    model has c0, the kept norms are plain norms, and compile's parity check passes on the mixed graph."""
    import json

    from hf_models import FT_ARGS, hf_dir

    import tapernorm
    from tapernorm.compiler.cli import main
    src = hf_dir("llama", tmp_path / "src")
    out = tmp_path / "ft"
    assert main(["finetune", str(src), "--out", str(out), "--mode", "internal", *FT_ARGS, "--calib-skip", "1",
                 "--calib-stat", "inv_rms", "--calib-per-feature", "--calib-pos0", "--rms-loss", "5",
                 "--rms-hinge", "1.5", "--taper-cap", "2", "--lr-schedule", "constant",
                 "--keep-norms", r"layers\.1\.post_attention"]) == 0
    model = tapernorm.from_pretrained(out / "model").eval()
    layers = dict(taper_layers(model))
    assert "model.layers.1.post_attention_layernorm" not in layers and len(layers) == 3
    assert all(m.gate == 0.0 and float(m.c0) > 0 for m in layers.values())
    assert main(["compile", str(out / "model"), "--out", str(tmp_path / "c")]) == 0
    report = json.loads((tmp_path / "c" / "compile_report.json").read_text())
    assert report["parity"]["ok"] and report["pos0"]["sites"] == 3 and report["pos0"]["model.onnx"]["muls"] == 3
    assert report["parity"]["graphs"]["model.onnx"]["tokens_identical"]


def test_annealed_cap_grows_as_k_over_gate():
    from tapernorm.cap import cap_rate, set_cap
    x = _sink_batch()
    layer = _layer_c(TaperNorm, x, skip_positions=1, stat="inv_rms")
    seq = torch.nn.Sequential(layer)
    rc = x.pow(2).mean(-1).sqrt() * layer.c
    for gate in (0.5, 0.05):
        set_cap(seq, 2.0, anneal=True)
        layer.set_gate(gate)
        with torch.no_grad():
            layer(x)
        assert cap_rate(seq) == pytest.approx(float((rc > 2.0 / gate).float().mean()))


def test_a_late_taper_divergence_points_at_the_sink_remedies_not_the_learning_rate():
    from tapernorm.train.auto_recipe import LATE_TAPER_HINT
    from tapernorm.train.rundir import divergence_message
    msg = divergence_message(180, float("nan"), 1.0, 1e-4, 0.0, (20, 180), False, Path("."), kept="x",
                             late_taper_hint=LATE_TAPER_HINT)
    assert "not stable this far into the taper" in msg and "--calib-pos0" in msg and "\n" not in msg
    early = divergence_message(60, float("nan"), 1.0, 1e-4, 0.9, (20, 180), False, Path("."), kept="x",
                               late_taper_hint=LATE_TAPER_HINT)
    assert "learning rate" in early


def test_keep_pattern_refuses_a_bad_regex_and_one_that_keeps_no_norm():
    model = hf_model("llama")
    with pytest.raises(TaperError, match="not a valid regular expression"):
        taperize(model, "internal", keep="layers.(1")
    with pytest.raises(TaperError, match="matches no norm; norms are named like model.layers.0"):
        taperize(model, "internal", keep=r"layers\.1\.mlp")
    assert not taper_layers(model)  # nothing was replaced
    names = taperize(model, "internal", keep=r"layers\.1\.post_attention")
    assert "model.layers.1.post_attention_layernorm" not in names and "model.layers.1.input_layernorm" in names


def test_a_non_finite_result_at_gate_zero_names_the_taper_remedies(tmp_path, monkeypatch):
    import tapernorm.train.finetune as ft
    from hf_models import FT_ARGS, hf_dir
    calls = []
    real = ft.evaluate_chunks

    def overflow_after(*a, **k):  # the held-out loss before is real, after is what an overflowing model gives
        calls.append(1)
        return real(*a, **k) if len(calls) == 1 else float("nan")
    monkeypatch.setattr(ft, "evaluate_chunks", overflow_after)
    with pytest.raises(ft.TrainingDiverged, match=r"at gate 0 a pretrained checkpoint.*--calib-pos0"):
        ft.finetune(ft.FinetuneConfig(model=str(hf_dir("llama", tmp_path / "src")), out_dir=str(tmp_path / "ft"),
                                      mode="internal", **dict(zip(
                                          ["steps", "taper_start", "taper_end", "warmup_steps", "seq_len", "batch_size",
                                           "lr", "max_docs", "eval_batches"],
                                          [int(v) if v.isdigit() else float(v) for v in FT_ARGS[1::2]]))))
    assert not (tmp_path / "ft" / "model").exists()
