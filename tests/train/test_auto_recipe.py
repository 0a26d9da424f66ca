"""`--recipe auto` (the default) and tapernorm.sinks: a tiny model has no attention sinks and gets the paper's method;
one given a massive activation gets sink-attn (sink for a parallel block), and finetune records the choice."""
import dataclasses
import json
import sys
from pathlib import Path

import pytest
import torch

pytest.importorskip("transformers")
sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "hf"))
sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "passes"))
from hf_families import build  # noqa: E402

from tapernorm.sinks import SINK_RATIO, SinkReport, find_sinks  # noqa: E402
from tapernorm.train.auto_recipe import AutoChoice, choose_recipe, pick, settle_choice  # noqa: E402
from tapernorm.train.finetune_cli import SINK_ATTN_RECIPE, FinetuneConfig  # noqa: E402

SINK_TOKEN = 7


def _with_sink(model, token: int = SINK_TOKEN, scale: float = 500.0):
    """The model with token's input embedding scaled: a massive activation at every position holding it."""
    with torch.no_grad():
        model.get_input_embeddings().weight[token] *= scale
    return model


def _stream(n: int = 512, every: int = 32) -> torch.Tensor:
    """A 1-D id stream with SINK_TOKEN at the start of every `every`-token chunk, as a BOS would be."""
    g = torch.Generator().manual_seed(0)
    ids = torch.randint(10, 60, (n,), generator=g)
    ids[::every] = SINK_TOKEN
    return ids


def test_a_model_without_sinks_has_a_small_spread():
    model = build("llama").eval()
    report = find_sinks(model, [torch.randint(10, 60, (2, 32))])
    assert not report.found and report.norms_over == 0 and report.ratio < 5
    assert report.norms == 3 and report.threshold == SINK_RATIO  # one layer's 2 norms, and the final norm


def test_a_massive_activation_is_found_at_its_position():
    model = _with_sink(build("llama")).eval()
    ids = torch.randint(10, 60, (2, 32))
    ids[:, 5] = SINK_TOKEN
    report = find_sinks(model, [ids])
    assert report.found and report.position == 5 and report.ratio > 100
    assert "position 5" in report.line() and "\n" not in report.line()


def test_find_sinks_refuses_no_batches_and_no_norms():
    with pytest.raises(ValueError, match="at least one batch"):
        find_sinks(build("llama"), [])
    with pytest.raises(ValueError, match="has no RMSNorm / LayerNorm"):
        find_sinks(torch.nn.Linear(2, 2), [torch.zeros(1, 2)])


@pytest.mark.parametrize("family,found,recipe", [("llama", False, "paper"), ("llama", True, "sink-attn"),
                                                 ("phi", True, "sink"), ("phi", False, "paper")])
def test_pick_follows_the_sinks_and_the_block_layout(family, found, recipe):
    report = SinkReport("model.layers.1.input_layernorm", 177.0 if found else 2.0, 0, int(found), 5, SINK_RATIO)
    assert pick(report, build(family)).recipe == recipe


def test_choose_recipe_fills_the_config_from_the_measurement():
    cfg = FinetuneConfig(model="m", steps=30, seq_len=32, batch_size=4)
    plain, choice = choose_recipe(cfg, build("llama"), _stream(), verbose=False)
    assert choice.recipe == plain.recipe == "paper" and not plain.keep_mlp_norms and plain.resolved_steps()[3] == 29
    sunk, choice = choose_recipe(cfg, _with_sink(build("llama")), _stream(), verbose=False)
    assert choice.recipe == sunk.recipe == "sink-attn" and choice.sinks.position == 0
    assert {k: getattr(sunk, k) for k in SINK_ATTN_RECIPE} == SINK_ATTN_RECIPE and sunk.resolved_steps()[3] == 20
    given = dataclasses.replace(cfg, recipe="paper", rms_loss=2.0)  # not auto: nothing measured
    assert choose_recipe(given, _with_sink(build("llama")), _stream(), verbose=False) == (given.with_recipe(), None)


@pytest.mark.slow
def test_finetune_by_default_picks_sink_attn_for_a_model_with_sinks(tmp_path, capsys):
    """The default run on a checkpoint whose most frequent token is a massive activation: tapers the attention side
    only, says so in one line, and records the measurement in summary.json."""
    import transformers
    from hf_models import FT_ARGS, hf_dir
    from tapernorm.compiler.cli import main
    from tapernorm.data import load_corpus, tokenize_corpus
    from tapernorm.train.finetune import load_text_tokenizer
    src = hf_dir("llama", tmp_path / "src")
    stream = tokenize_corpus(load_corpus("builtin", 40), load_text_tokenizer(src), 32, 0.1).train
    model = transformers.AutoModelForCausalLM.from_pretrained(src)
    _with_sink(model, token=int(stream.bincount().argmax()), scale=50.0).save_pretrained(src)
    out = tmp_path / "ft"
    rc = main(["finetune", str(src), "--out", str(out), "--mode", "internal", *FT_ARGS])
    line = next(ln for ln in capsys.readouterr().err.splitlines() if "--recipe auto" in ln)
    summary = json.loads((out / "summary.json").read_text()) if rc == 0 else None
    assert "sink-attn" in line, line
    assert rc == 0 and summary["config"]["recipe"] == "sink-attn" and summary["config"]["keep_mlp_norms"]
    assert summary["recipe_auto"]["sinks"]["norms_over"] > 0
    assert not any("post_attention" in n for n in summary["tapered_layers"])


def test_a_short_sink_run_gets_a_note_with_the_measured_figures():
    from tapernorm.train.auto_recipe import short_run_note
    short = FinetuneConfig(model="m", steps=150, taper_start=20, recipe="sink-attn").check()
    assert "130 steps from the taper start" in short_run_note(short) and "+31%" in short_run_note(short)
    assert short_run_note(dataclasses.replace(short, steps=2400)) is None
    assert short_run_note(dataclasses.replace(short, recipe="paper").check()) is None
    assert short_run_note(dataclasses.replace(short, mode="baseline")) is None


def test_the_late_taper_hint_does_not_suggest_the_recipe_that_just_ran():
    from tapernorm.train.auto_recipe import LATE_TAPER_HINT, late_taper_hint
    assert late_taper_hint("paper") == LATE_TAPER_HINT and "try --recipe sink-attn" in LATE_TAPER_HINT
    assert "already had --recipe sink-attn" in late_taper_hint("sink-attn") and "\n" not in late_taper_hint("sink-attn")


def test_every_rank_takes_rank_0s_choice():
    """Under torchrun one model needs one recipe: a rank that measured otherwise trains with rank 0's, and says so."""
    report = SinkReport("model.layers.0.input_layernorm", 40.0, 0, 3, 4, SINK_RATIO)
    mine = AutoChoice("sink-attn", "attention sinks", report)
    assert settle_choice(mine, "sink-attn") is mine
    other = settle_choice(mine, "paper")
    assert other.recipe == "paper" and "rank 0's choice" in other.reason and other.sinks is report
