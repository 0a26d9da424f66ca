"""--keep-mlp-norms (an attention-side taper: the norms in front of the MLPs stay) and --recipe (the real-checkpoint
remedies as one flag): which norms each family keeps, how a recipe fills the flags, and that a fine-tune with
`--recipe sink-attn` compiles with parity on the mixed graph."""
import dataclasses
import json
import sys
from pathlib import Path

import pytest

pytest.importorskip("transformers")
sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "hf"))
sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "passes"))
from hf_families import build  # noqa: E402

from tapernorm import TaperError, taper_layers, taperize  # noqa: E402
from tapernorm.replace_norms import mlp_norm_pattern  # noqa: E402
from tapernorm.train.finetune_cli import BASE, RECIPES, FinetuneConfig  # noqa: E402

# family -> the block norms --keep-mlp-norms keeps (1 layer each; "internal" leaves the final norm alone too)
KEPT = {"llama": ["model.layers.0.post_attention_layernorm"], "gpt2": ["transformer.h.0.ln_2"],
        "gpt_neox": ["gpt_neox.layers.0.post_attention_layernorm"],
        "gemma2": ["model.layers.0.pre_feedforward_layernorm"],  # its post_attention_layernorm is a post-norm
        "gemma3": ["model.layers.0.pre_feedforward_layernorm"],
        "olmo2": ["model.layers.0.post_feedforward_layernorm"]}  # no norm before its MLP: the one after it


@pytest.mark.parametrize("family", sorted(KEPT))
def test_keep_mlp_norms_keeps_exactly_the_mlp_side_norm(family):
    model = build(family)
    norms = {n for n, m in model.named_modules() if "Norm" in type(m).__name__}
    tapered = taperize(model, "all", keep=mlp_norm_pattern(model))
    assert sorted(norms - set(tapered)) == KEPT[family]
    assert {n for n, _ in taper_layers(model)} == set(tapered)


@pytest.mark.parametrize("family", ["phi", "cohere", "falcon"])
def test_parallel_blocks_refuse_an_attention_only_taper_in_one_line(family):
    with pytest.raises(TaperError, match="one norm per block feeds both attention and the MLP") as e:
        mlp_norm_pattern(build(family))
    assert "\n" not in str(e.value)


def test_a_recipe_fills_only_the_flags_left_at_their_defaults():
    cfg = FinetuneConfig(model="m", steps=10, recipe="sink-attn", rms_loss=5.0, calib_skip=2).with_recipe()
    assert (cfg.rms_loss, cfg.calib_skip) == (5.0, 2)  # given: kept
    assert cfg.calib_pos0 and cfg.keep_mlp_norms and cfg.taper_cap == 2.0 and cfg.lr_schedule == "cosine"
    assert cfg.taper_end_frac == 2 / 3 and cfg.resolved_steps() == (10, 1, 1, 7)  # the last third at gate 0
    plain = FinetuneConfig(model="m", steps=10, recipe="paper").with_recipe()  # the paper's method
    assert {k: getattr(plain, k) for k in BASE} == BASE and plain.lr_schedule == "cosine"
    assert plain.resolved_steps() == (10, 1, 1, 9)
    assert FinetuneConfig(model="m", steps=10, recipe="").with_recipe() == dataclasses.replace(plain, recipe="")
    assert set(RECIPES["sink-attn"]) - set(RECIPES["sink"]) == {"keep_mlp_norms", "taper_end_frac"}
    with pytest.raises(ValueError, match="--recipe 'fast' is not one of auto, paper, sink, sink-attn"):
        FinetuneConfig(model="m", steps=10, recipe="fast").with_recipe()


def test_a_flag_given_with_the_base_value_still_beats_the_recipe():
    """`--recipe sink-attn --lr-schedule cosine --no-calib-pos0` trains with cosine and without c0: a given flag
    wins even when its value is the one the method has without a recipe."""
    import argparse
    from tapernorm.train.finetune_cli import add_cli, config_from_args
    ap = argparse.ArgumentParser()
    add_cli(ap.add_subparsers())
    args = ap.parse_args(["finetune", "m", "--steps", "10", "--recipe", "sink-attn", "--taper-end-frac", "1",
                          "--no-calib-pos0", "--rms-loss", "0"])
    cfg = config_from_args(args).check()
    assert (cfg.taper_end_frac, cfg.calib_pos0, cfg.rms_loss) == (1.0, False, 0.0)  # given
    assert cfg.keep_mlp_norms and cfg.taper_cap == 2.0 and cfg.calib_stat == "inv_rms"  # the recipe's
    plain = config_from_args(ap.parse_args(["finetune", "m", "--steps", "10", "--recipe", "paper"])).check()
    assert plain.lr_schedule == "cosine" and plain.rms_loss == 0.0 and not plain.keep_mlp_norms
    auto = config_from_args(ap.parse_args(["finetune", "m", "--steps", "10"])).check()  # auto: filled once the
    assert auto.recipe == "auto" and auto.lr_schedule is None                          # model is seen


@pytest.mark.slow
def test_finetune_with_the_sink_attn_recipe_tapers_the_attention_side_and_compiles(tmp_path):
    """The saved model has TaperNorms with c0 on the attention inputs only; compile folds them into q / k / v
    and keeps the MLP norms as norms, with parity."""
    import tapernorm
    from hf_models import FT_ARGS, hf_dir
    from tapernorm.compiler.cli import main
    out = tmp_path / "ft"
    assert main(["finetune", str(hf_dir("llama", tmp_path / "src")), "--out", str(out), "--mode", "all", *FT_ARGS,
                 "--recipe", "sink-attn"]) == 0
    summary = json.loads((out / "summary.json").read_text())
    assert summary["config"]["keep_mlp_norms"] and summary["config"]["calib_pos0"]
    layers = dict(taper_layers(tapernorm.from_pretrained(out / "model")))
    assert sorted(layers) == ["model.layers.0.input_layernorm", "model.layers.1.input_layernorm", "model.norm"]
    assert all(m.gate == 0.0 and float(m.c0) > 0 for m in layers.values())
    assert main(["compile", str(out / "model"), "--out", str(tmp_path / "c")]) == 0
    report = json.loads((tmp_path / "c" / "compile_report.json").read_text())
    assert report["parity"]["ok"] and report["pos0"]["sites"] == 3 and len(report["folded_layers"]) == 3
    assert report["parity"]["graphs"]["model.onnx"]["tokens_identical"]


def test_auto_refuses_flags_that_only_fail_under_the_recipe_it_may_pick():
    """--steps 300 --taper-hold 250: fine for the paper's taper (to step 299), too long for sink-attn's (to 200)."""
    with pytest.raises(ValueError, match=r"--taper-hold 250 is longer .* \(under --recipe sink-attn, which the "
                                         r"default --recipe auto picks"):
        FinetuneConfig(model="m", steps=300, taper_hold=250).check()
    assert FinetuneConfig(model="m", steps=300, taper_hold=250, recipe="paper").check().taper_hold == 250
