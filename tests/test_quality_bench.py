"""The quality benchmark (benchmarks/quality.py) runs end to end on a smoke setting and records versions,
seeds, settings and the machine; its hand-written paired t-test matches textbook values. No quality
threshold is asserted: quality figures live in benchmarks/results/quality.md."""
import json
import subprocess
import sys
from pathlib import Path

import pytest

BENCH = Path(__file__).resolve().parents[1] / "benchmarks"
sys.path.insert(0, str(BENCH))

from quality_stats import paired_test, t_sf_two_sided  # noqa: E402


@pytest.mark.parametrize("t, df, p", [(2.776, 4, 0.05), (12.706, 1, 0.05), (2.228, 10, 0.05), (1.0, 2, 0.42265),
                                      (-4.303, 2, 0.05)])
def test_t_distribution_two_sided_p(t, df, p):
    assert t_sf_two_sided(t, df) == pytest.approx(p, abs=2e-4)


def test_paired_test_on_relative_gaps():
    r = paired_test([1.01, 1.02, 1.015], [1.0, 1.0, 1.0])
    assert r["gap_mean"] == pytest.approx(0.015) and r["gap_sd"] == pytest.approx(0.005)
    assert r["t"] == pytest.approx(5.19615, rel=1e-4) and r["df"] == 2 and r["p"] == pytest.approx(0.0351, abs=2e-4)
    assert paired_test([1.0], [2.0])["p"] is None
    with pytest.raises(ValueError, match="equally many"):
        paired_test([1.0, 2.0], [1.0])


def test_quality_quick_writes_results(tmp_path):
    cmd = [sys.executable, str(BENCH / "quality.py"), "--quick", "--steps", "20", "--widths", "16", "--seeds", "2",
           "--sweep-seeds", "1", "--max-chars", "3000", "--no-horizon", "--workers", "1", "--eval-points", "2",
           "--work", str(tmp_path / "work"), "--out", str(tmp_path), "--name", "q"]
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=900)
    assert proc.returncode == 0, proc.stderr[-3000:]
    res = json.loads((tmp_path / "q.json").read_text())
    assert res["machine"]["cores"] and res["versions"]["torch"] and res["seeds"]["table"] == [0, 1]
    s = res["settings"]
    assert s["steps"] == 20 and s["aux"]["scale_form"] == s["aux_default"]["scale_form"]
    arms = res["table1"]["16"]
    assert set(arms) == {"baseline", "internal+aux", "all+aux", "all-noaux"}
    assert arms["all+aux"]["vs_baseline"]["n"] == 2 and arms["baseline"]["val_loss"]["n"] == 2
    assert {(r["mode"], r["form"]) for r in res["sweep"]["rows"]} >= {("internal", "paper"), ("all", "relative")}
    assert all(r["val_tokens"] > 0 for r in res["runs"].values())
    for f in res["figures"]:
        assert (tmp_path / f).stat().st_size > 0
    assert "Table 1 analogue" in (tmp_path / "q.md").read_text()


def test_quality_table3_quick_writes_results(tmp_path):
    """Pre-train a tiny GPT-2, fine-tune it to Internal/All-TaperLN, the FakeLN surrogate and a plain continuation."""
    cmd = [sys.executable, str(BENCH / "quality_table3.py"), "--quick", "--pretrain-steps", "8", "--ft-schedule", "6",
           "1", "1", "4", "--max-chars", "20000", "--work", str(tmp_path / "work"), "--out", str(tmp_path), "--name", "t3"]
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=900)
    assert proc.returncode == 0, proc.stderr[-3000:]
    res = json.loads((tmp_path / "t3.json").read_text())
    assert res["machine"]["cores"] and res["versions"]["transformers"] and res["seeds"] == [0]
    assert set(res["rows"]) == {"baseline-continued", "internal-taperln", "all-taperln", "fakeln-epshack"}
    assert res["fakeln_sigma_bar"] and all(v > 0 for v in res["fakeln_sigma_bar"].values())


def test_fakeln_eps_hack_matches_fixed_std_layernorm():
    """LayerNorm with eps 1e12 and weight * 1e6 / sigma equals (x - mu) / sigma * weight + bias."""
    import torch
    from quality_table3 import EPS_HACK
    torch.manual_seed(0)
    ln = torch.nn.LayerNorm(16)
    torch.nn.init.normal_(ln.weight)
    torch.nn.init.normal_(ln.bias)
    x = torch.randn(3, 5, 16) * 2.5
    sigma = 2.3
    ref = (x - x.mean(-1, keepdim=True)) / sigma * ln.weight + ln.bias
    with torch.no_grad():
        ln.weight.mul_(EPS_HACK ** 0.5 / sigma)
    ln.eps = EPS_HACK
    assert torch.allclose(ln(x), ref, atol=1e-5)


def test_quality_real_reuses_only_a_finished_run_with_the_same_settings(tmp_path):
    """--reuse takes WORK/<variant> when its summary.json config equals the variant's (recipe resolved, out_dir
    aside, fields newer than the run at their defaults) and its model is there; anything else runs again."""
    import dataclasses

    import quality_real as q
    from tapernorm.train.finetune_cli import FinetuneConfig
    cfg = FinetuneConfig(model="m", out_dir="x", steps=40, mode="internal", recipe="sink-attn")
    saved = {k: v for k, v in dataclasses.asdict(cfg.with_recipe()).items() if k not in ("recipe", "keep_mlp_norms")}
    run = tmp_path / "run"
    (run / "model").mkdir(parents=True)
    (run / "summary.json").write_text(json.dumps({"config": {**saved, "out_dir": "elsewhere"}, "seconds": 5.0}))
    assert q.reusable(run, cfg) is None  # the run did not keep the MLP norms (keep_mlp_norms missing: False)
    (run / "summary.json").write_text(json.dumps({"config": {**saved, "keep_mlp_norms": True, "recipe": "sink-attn"},
                                                  "seconds": 5.0}))
    assert q.reusable(run, cfg) is None  # no model/config.json
    (run / "model" / "config.json").write_text("{}")
    got = q.reusable(run, cfg)
    assert got["reused"] and got["model_dir"] == str(run / "model") and got["seconds"] == 5.0
    assert q.reusable(run, dataclasses.replace(cfg, steps=41)) is None
    assert q.reusable(run, dataclasses.replace(cfg, taper_bound_scope="mlp"))["reused"]  # no bound: scope is inert
    assert q.reusable(run, dataclasses.replace(cfg, taper_bound_rms=3.0)) is None


def test_quality_real_issue_setting_is_the_issue_command_at_the_defaults(tmp_path, monkeypatch):
    """--issue --max-chars 0: the issue's schedule on the whole corpus; the *-auto variants leave the recipe to
    finetune's measurement, and --reuse compares a finished auto run by the recipe it chose."""
    import argparse
    import dataclasses

    import quality_real as q
    monkeypatch.setattr(q, "smollm2_dir", lambda: Path("m"))
    ns = argparse.Namespace(quick=False, long=False, issue=True, steps=0, lr=1e-4, max_chars=0)
    st = q._settings(ns)
    assert [st[k] for k in ("steps", "warmup_steps", "taper_start", "taper_end", "seq_len", "batch_size",
                            "eval_batches")] == [150, 10, 20, 120, 128, 4, 8] and st["max_chars"] is None
    cfg, opts = q.variant_config("internal-auto", q.VARIANTS["internal-auto"], st, tmp_path)
    assert cfg.recipe == "auto" and cfg.resolved_steps() == (150, 10, 20, 120)
    plain, _ = q.variant_config("internal", q.VARIANTS["internal"], st, tmp_path)
    assert plain.recipe == "paper"  # a variant without a recipe never measures
    ran = dataclasses.replace(cfg, recipe="sink-attn").with_recipe()
    run = tmp_path / "internal-auto"
    (run / "model").mkdir(parents=True)
    (run / "model" / "config.json").write_text("{}")
    (run / "summary.json").write_text(json.dumps({"config": dataclasses.asdict(ran), "seconds": 1.0,
                                                  "recipe_auto": {"recipe": "sink-attn"}}))
    assert q.reusable(run, cfg)["reused"]
    (run / "summary.json").write_text(json.dumps({"config": dataclasses.asdict(ran), "seconds": 1.0,
                                                  "recipe_auto": {"recipe": "paper"}}))
    assert q.reusable(run, cfg) is None


def test_quality_real_merge_takes_a_committed_baseline_only_of_the_same_settings(tmp_path):
    """--merge TAGS --baseline-from FILE: the committed file's finished baseline row (and its answers) goes first,
    marked with the file; a file of other settings, or without a baseline, is refused with one line."""
    import quality_real as q
    st = {"steps": 40, "warmup_steps": 2, "taper_start": 4, "taper_end": 30, "seq_len": 64, "batch_size": 2,
          "eval_batches": 2, "lr": 1e-4}
    row = {"variant": "internal-x", "options": {"mode": "internal"}, "ok": True, "val_before": 3.0, "val_after": 1.2,
           "logit_norm": 9.0, "prelogit_rms": 2.0, "seconds": 7.0}
    base = {**row, "variant": "baseline", "options": {"mode": "baseline"}, "val_after": 1.0}
    answers = {"compile_rc": 0, "compile_seconds": 1.0, "generations": {"p": "Paris."}}
    part = {"settings": st, "machine": {}, "runs": [row], "generations": {"internal-x": answers}}
    (tmp_path / "quality_real_long_a.json").write_text(json.dumps(part))
    committed = tmp_path / "committed.json"
    committed.write_text(json.dumps({"settings": st, "runs": [base], "generations": {"baseline": {"p": "Paris"}}}))
    assert q.merge(tmp_path, "quality_real_long", ["a"], committed) == 0
    got = json.loads((tmp_path / "quality_real_long.json").read_text())
    assert [r["variant"] for r in got["runs"]] == ["baseline", "internal-x"]
    assert got["runs"][0]["from_file"] == "committed.json" and list(got["generations"]) == ["baseline", "internal-x"]
    md = (tmp_path / "quality_real_long.md").read_text()
    assert "+20.00%" in md and "(from committed.json)" in md
    committed.write_text(json.dumps({"settings": {**st, "steps": 41}, "runs": [base]}))
    with pytest.raises(SystemExit, match="other settings"):
        q.merge(tmp_path, "quality_real_long", ["a"], committed)
    committed.write_text(json.dumps({"settings": st, "runs": [row]}))
    with pytest.raises(SystemExit, match="no finished baseline"):
        q.merge(tmp_path, "quality_real_long", ["a"], committed)


def test_quality_real_bounded_variants_spell_out_their_scope():
    """A bounded variant names its --taper-bound-scope, so a changed default never changes a recorded run (BI / BA
    of docs/real_checkpoints.md section 10 bounded only the MLP side)."""
    import quality_real as q
    bounded = {n: v for n, v in q.VARIANTS.items() if v.get("taper_bound") or v.get("taper_bound_rms")}
    assert bounded and all("taper_bound_scope" in v for v in bounded.values())
    assert q.VARIANTS["internal-sink-bound-tail-cosine"]["taper_bound_scope"] == "mlp"
