"""The paper's quality experiments at CPU scale: Table 1 (validation-loss gaps of the taper modes), Figures
1-2 (training loss, logit chasing, gradient-norm clustering) and a lambda sweep of the scale loss.

Table 1 arms: Baseline, Internal-Taper (+aux), All-Taper (+aux), All-Taper (no aux), each at every width
and seed; the +aux arms use the TrainConfig default scale loss (or --aux-form/--aux-lambda). Every run ends with
the validation loss on the FULL held-out split (summary.json); gaps to the baseline are paired by seed
(same init seed and data order) and tested with a paired t-test. The sweep trains Internal- and All-Taper
at one width over lambda for both scale-loss forms, against the same mode without the loss, and checks
the goal: pre-logit RMS within 20% of its frozen target at the end, at < 0.5% validation-loss cost.
Flatness: the baseline's periodic full-split evaluations (last quarter of training) and a 2x-steps baseline.

    .venv/bin/python benchmarks/quality.py              # default: ~1 h on 2 free cores
    .venv/bin/python benchmarks/quality.py --quick      # smoke run, minutes
    .venv/bin/python benchmarks/quality.py --aux-form paper --aux-lambda 0.1 --save --name quality_paper_form
Runs are cached in --work by a hash of their settings (an interrupted benchmark continues where it stopped).
Writes quality.json, quality.md and quality_*.png into a scratch directory (benchmarks/results/ with --save).
"""
from __future__ import annotations

import argparse
import dataclasses
import sys
import time
from datetime import datetime, timezone
from pathlib import Path

from bench_common import RESULTS, add_output_args, library_versions, loadavg, machine_info, output_dir, write_results
from quality_runs import Arm, run_all, run_key
from quality_stats import mean_sd, paired_test
from quality_report import markdown, sweep_summary, table_summary



def table_arms(a) -> list[Arm]:
    """Table 1's arms; the +aux ones use --aux-form / --aux-lambda (default: the TrainConfig defaults)."""
    return [Arm("baseline", "baseline", False), Arm("internal+aux", "internal", True, a.aux_lambda, a.aux_form),
            Arm("all+aux", "all", True, a.aux_lambda, a.aux_form), Arm("all-noaux", "all", False)]

GOAL_RMS_TOL, GOAL_COST = 0.20, 0.005


def _args(argv):
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--quick", action="store_true", help="smoke settings (minutes): 1 width, 2 seeds, short runs")
    p.add_argument("--widths", type=int, nargs="+", default=None, help="model widths (default 32 64)")
    p.add_argument("--depth", type=int, default=None, help="blocks (default 2)")
    p.add_argument("--heads", type=int, default=4)
    p.add_argument("--seeds", type=int, default=None, help="seeds per Table-1 arm (default 3)")
    p.add_argument("--steps", type=int, default=None, help="optimizer steps per run (default 3000)")
    p.add_argument("--batch-size", type=int, default=16)
    p.add_argument("--seq-len", type=int, default=64)
    p.add_argument("--lr", type=float, default=3e-3)
    p.add_argument("--vocab", type=int, default=256)
    p.add_argument("--corpus", default="builtin")
    p.add_argument("--max-chars", type=int, default=None, help="truncate each corpus document (default: none)")
    p.add_argument("--eval-points", type=int, default=8, help="periodic full-split evaluations per run")
    p.add_argument("--sweep-width", type=int, default=None, help="width of the lambda sweep (default: the first)")
    p.add_argument("--sweep-seeds", type=int, default=None, help="seeds per sweep arm (default 2)")
    p.add_argument("--sweep-paper", type=float, nargs="*", default=None,
                   help="lambdas of the paper form (s - s_tgt)^2 (default 0.1 1 10)")
    p.add_argument("--sweep-relative", type=float, nargs="*", default=None,
                   help="lambdas of the relative form (s / s_tgt - 1)^2 (default 0.1 1)")
    p.add_argument("--aux-form", choices=["paper", "relative"], default=None,
                   help="scale-loss form of Table 1's +aux arms (default: TrainConfig's)")
    p.add_argument("--aux-lambda", type=float, default=None, help="their lambda (default: TrainConfig's)")
    p.add_argument("--no-horizon", action="store_true", help="skip the 2x-steps baseline flatness check")
    p.add_argument("--no-figures", action="store_true", help="write only the JSON and markdown")
    p.add_argument("--workers", type=int, default=2, help="training processes (one torch thread each)")
    p.add_argument("--work", default="runs/quality", help="run cache directory")
    add_output_args(p)
    p.add_argument("--name", default="quality", help="file stem of the JSON / markdown / figures in that directory")
    a = p.parse_args(argv)
    q = a.quick
    defaults = dict(widths=[16] if q else [32, 64], depth=2, seeds=2 if q else 3, steps=40 if q else 3000,
                    sweep_seeds=2, sweep_paper=[1.0] if q else [0.1, 1.0, 10.0],
                    sweep_relative=[0.1] if q else [0.1, 1.0])
    for k, v in defaults.items():
        if getattr(a, k) is None:
            setattr(a, k, v)
    from tapernorm.train.config import TrainConfig
    a.aux_form = a.aux_form or TrainConfig.scale_form
    a.aux_lambda = TrainConfig.scale_lambda if a.aux_lambda is None else a.aux_lambda
    a.sweep_width = a.sweep_width or a.widths[0]
    a.sweep_seeds = min(a.sweep_seeds, a.seeds)
    if a.steps < 20:
        p.error(f"--steps {a.steps} is too short for warmup + taper; use at least 20")
    return a


def _base_cfg(a, tok: str) -> dict:
    from tapernorm.train.config import TrainConfig
    return TrainConfig(preset="tiny", n_layers=a.depth, n_heads=a.heads, corpus=a.corpus, max_chars=a.max_chars,
                       vocab_size=a.vocab, tokenizer=tok, seq_len=a.seq_len, batch_size=a.batch_size, lr=a.lr,
                       steps=a.steps, eval_every=max(1, a.steps // a.eval_points), eval_batches=10**9,
                       ckpt_every=0, progress=False, overwrite=True).to_dict()


def _jobs(a, base: dict, work: Path) -> tuple[dict, dict]:
    """All runs, deduplicated by settings, in the order they are trained (flatness check, Table 1, then the
    sweep seed by seed, so a cut-short benchmark has whole seeds): {key: job}; and {(group, ...): key}."""
    jobs, index = {}, {}

    def add(tag, arm: Arm, width: int, seed: int, steps: int | None = None):
        cfg = {**base, **arm.overrides(), "dim": width, "seed": seed}
        if not arm.aux:  # lambda and form do nothing without the loss: pinned, so the cache ignores their defaults
            cfg.update(scale_lambda=0.1, scale_form="paper")
        if steps:
            cfg.update(steps=steps, eval_every=max(1, steps // a.eval_points))
        key = run_key(cfg)
        cfg["out_dir"] = str(work / key)
        jobs.setdefault(key, {"cfg": cfg, "key": key, "label": f"{arm.name} w{width} s{seed} T{cfg['steps']}",
                              "meta": {"arm": arm.name, "width": width, "seed": seed}})
        index[tag] = key

    for w in a.widths if not a.no_horizon else ():
        add(("horizon", w), table_arms(a)[0], w, 0, steps=2 * a.steps)
    for s in range(a.seeds):
        for w in a.widths:
            for arm in table_arms(a):
                add(("table", w, arm.name, s), arm, w, s)
    for s in range(a.sweep_seeds):
        for mode in ("internal", "all"):
            add(("sweep", mode, "none", 0.0, s), Arm(f"{mode}-noaux", mode, False), a.sweep_width, s)
            for form, lams in (("paper", a.sweep_paper), ("relative", a.sweep_relative)):
                for lam in lams:
                    add(("sweep", mode, form, lam, s), Arm(f"{mode}+{form}{lam:g}", mode, True, lam, form),
                        a.sweep_width, s)
    return jobs, index


def main(argv=None) -> int:
    a = _args(argv)
    t0, machine = time.time(), machine_info()
    from tapernorm.data import load_corpus, train_tokenizer
    from tapernorm.train.config import TrainConfig
    work = Path(a.work).resolve()
    work.mkdir(parents=True, exist_ok=True)
    tok = work / f"tokenizer_{a.corpus.replace('/', '_').replace(':', '_')}_{a.vocab}_{a.max_chars}.model"
    if not tok.is_file():
        train_tokenizer(load_corpus(a.corpus, None, a.max_chars), a.vocab, out_path=tok)
    base = _base_cfg(a, str(tok))
    jobs, index = _jobs(a, base, work)
    print(f"quality benchmark: {len(jobs)} runs of {a.steps} steps on {a.workers} workers, cache {work}", flush=True)
    recs = dict(zip(jobs, run_all(list(jobs.values()), workers=a.workers)))

    def rec(tag):
        return recs[index[tag]]

    table = {w: {arm.name: [rec(("table", w, arm.name, s)) for s in range(a.seeds)] for arm in table_arms(a)}
             for w in a.widths}
    sweep = {}
    for mode in ("internal", "all"):
        for form, lams in (("none", [0.0]), ("paper", a.sweep_paper), ("relative", a.sweep_relative)):
            for lam in lams:
                sweep[(mode, form, lam)] = [rec(("sweep", mode, form, lam, s)) for s in range(a.sweep_seeds)]
    horizon = {}
    if not a.no_horizon:
        for w in a.widths:
            v1, v2 = table[w]["baseline"][0]["val_loss"], rec(("horizon", w))["val_loss"]
            horizon[w] = {"steps": a.steps, "val_loss": v1, "steps_2x": 2 * a.steps, "val_loss_2x": v2,
                          "improvement_2x": 1.0 - v2 / v1}
    defaults = TrainConfig()
    result = {
        "benchmark": "quality", "date": datetime.now(timezone.utc).isoformat(timespec="seconds"),
        "machine": {**machine, "loadavg_end": loadavg()},
        "versions": library_versions(("torch", "numpy", "sentencepiece")),
        "settings": {**vars(a), "train_config_base": {k: v for k, v in base.items() if k not in ("out_dir",)},
                     "aux": {"scale_lambda": a.aux_lambda, "scale_form": a.aux_form},
                     "aux_default": {"scale_lambda": defaults.scale_lambda, "scale_form": defaults.scale_form},
                     "goal": {"rms_within": GOAL_RMS_TOL, "loss_cost_below": GOAL_COST}},
        "seeds": {"table": list(range(a.seeds)), "sweep": list(range(a.sweep_seeds))},
        "table1": {str(w): table_summary(table[w], "baseline") for w in a.widths},
        "flatness": {str(w): {"baseline_evals": table[w]["baseline"][0]["evals"],
                              **({"horizon": horizon[w]} if w in horizon else {})} for w in a.widths},
        "sweep": sweep_summary(sweep, GOAL_RMS_TOL, GOAL_COST),
        "table3": _table3_status(),
        "seconds": None, "train_seconds_total": sum(r["seconds"] for r in recs.values()),
        "runs_cached": sum(bool(r.get("cached")) for r in recs.values()), "runs": {k: {kk: vv for kk, vv in r.items() if kk != "curves"} for k, r in recs.items()},
    }
    stem = output_dir(a) / a.name
    from quality_plots import plot_all
    figs = [] if a.no_figures else plot_all({w: table[w] for w in a.widths}, sweep, stem)
    result["figures"] = [f.name for f in figs]
    result["seconds"] = time.time() - t0
    md = markdown(result)
    write_results(stem, result, md)
    print(md)
    print(f"wrote {stem.with_suffix('.json')}, {stem.with_suffix('.md')} and {len(figs)} figures")
    return 0


def _table3_status() -> dict:
    """Table 3 (GPT-2 fine-tuning to TaperLN / FakeLN) is its own benchmark: quality_table3.py."""
    done = (RESULTS / "quality_table3.json").is_file()
    return {"status": "separate benchmark", "reason": "benchmarks/quality_table3.py pre-trains a small GPT-2 and "
            "fine-tunes it with tapernorm.train.finetune; results in quality_table3.md" if done else
            "benchmarks/quality_table3.py has not been run on this machine yet"}


if __name__ == "__main__":
    sys.exit(main())
