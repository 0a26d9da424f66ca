"""Tapering on a real checkpoint (issue 19): SmolLM2-135M-Instruct fine-tuned with no taper, Internal-Taper and
All-Taper under the remedies of docs/real_checkpoints.md, all with the same corpus, tokens and schedule.

Per variant: held-out CE (the fine-tune's validation split: text not trained on) before and after, the mean logit
norm and the pre-logit RMS (the final norm's input) at the end, or the step it diverged at. Then the tapered
variants that finished are folded and compiled (`tapernorm compile`) and run with `tapernorm generate`: greedy
continuations and chat answers beside the fine-tuned baseline's (transformers' greedy generate).

    nice -n 10 .venv/bin/python benchmarks/quality_real.py --quick --save      # ~30-40 min on 2 shared cores
    nice -n 10 .venv/bin/python benchmarks/quality_real.py --save              # bounded to ~2 h on 2 cores
    nice -n 10 .venv/bin/python benchmarks/quality_real.py --long --variants baseline-constant,internal-sink-attn-long --save
                                                                                 # 2400 steps, ~55-65 min per variant
    .venv/bin/python benchmarks/quality_real.py --issue --max-chars 0 --variants baseline-auto,internal-auto,all-auto --save
                                                                                 # the issue's command at the defaults
    .venv/bin/python benchmarks/quality_real.py --variants baseline,internal-robust --steps 20 --no-compile
    .venv/bin/python benchmarks/quality_real.py --long --merge a,b --baseline-from benchmarks/results/X.json --save
                                       # per-tag results (--tag a, --tag b) in one file, the baseline from a committed one
"""
from __future__ import annotations

import argparse
import dataclasses
import json
import os
import re
import subprocess
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from bench_common import add_output_args, library_versions, machine_info, output_dir, write_results  # noqa: E402
from real_checkpoint import smollm2_dir  # noqa: E402

from tapernorm.train.finetune_cli import SINK_RECIPE  # noqa: E402  (torch-free)

ROBUST = {"calib_stat": "inv_rms", "calib_skip": 1, "rms_loss": 1.0}
# the sink recipe (docs/real_checkpoints.md, section 5): position 0's own c0, a robust per-feature map for the rest,
# the one-sided RMS loss and the training-only cap; a hold at gate 1 (fraction of the taper span), constant lr
SINK = {**SINK_RECIPE, "hold_frac": 0.2}  # = --recipe sink, plus the hold
KEEP6 = {"keep_norms": r"layers\.(4|9|14|19|24|29)\.post_attention_layernorm"}  # 6 of 60 internal norms stay
LONG_SINK = {**SINK_RECIPE, "taper_hold": 100}  # the 2400-step runs: a fixed hold of 100 steps


def _per_feature(mode: str, k: float, scope: str, end_frac: float = 2 / 3) -> dict:
    """Sections 11-12's runs: AE's schedule, every norm tapered, the norms of `scope` (all | mlp) bounded per feature
    at k x RMS (--recipe sink --taper-bound-rms k --taper-bound-scope scope); the taper ends at end_frac of the run."""
    return {"mode": mode, **LONG_SINK, "recipe": "sink", "taper_bound_rms": k, "taper_bound_scope": scope,
            "end_frac": end_frac, "lr_schedule": "cosine"}


VARIANTS: dict[str, dict] = {
    "internal-sink": {"mode": "internal", **SINK},
    "all-sink": {"mode": "all", **SINK},
    "internal-sink-keep6": {"mode": "internal", **SINK, **KEEP6},
    "all-sink-keep6": {"mode": "all", **SINK, **KEEP6},
    # the layers whose tokens the cap caught (1-10: sink candidates; 27-29: the last, fastest-growing residuals)
    "internal-sink-keepends": {"mode": "internal", **SINK, "keep_norms": r"layers\.([1-9]|10|27|28|29)\."},
    # the last third, where the tokens that still needed the cap at the end were (docs, section 5.2: E10)
    "internal-sink-keeplate": {"mode": "internal", **SINK, "keep_norms": r"layers\.(19|2\d)\."},
    # the 2400-step run of docs/real_checkpoints.md section 7 (with --long): a fixed hold of 100 steps
    "internal-sink-long": {"mode": "internal", **LONG_SINK},
    # the attention-side taper (section 8): the norms in front of the MLPs stay, so no SwiGLU squares an outlier
    "internal-sink-attn": {"mode": "internal", "recipe": "sink-attn", "end_frac": 2 / 3, "hold_frac": 0.2},
    "all-sink-attn": {"mode": "all", "recipe": "sink-attn", "end_frac": 2 / 3, "hold_frac": 0.2},
    # `tapernorm finetune`'s defaults: --recipe auto (sink-attn on SmolLM2, chosen by measuring its sinks) and the
    # recipe's own taper end (2/3 of the run), no hold
    "internal-default": {"mode": "internal", "recipe": "auto", "own_taper_end": True},
    "all-default": {"mode": "all", "recipe": "auto", "own_taper_end": True},
    # --recipe auto on the setting's own schedule (with --issue: the issue's command exactly, section 9.2's D runs)
    "baseline-auto": {"mode": "baseline", "recipe": "auto"},
    "internal-auto": {"mode": "internal", "recipe": "auto"},
    "all-auto": {"mode": "all", "recipe": "auto"},
    # with --long, section 8's AA / AB: LA's settings with the MLP norms kept, spelled as the regex that
    # --keep-mlp-norms means on Llama (so --reuse recognises those runs' summaries)
    "internal-sink-attn-long": {"mode": "internal", **LONG_SINK, "keep_norms": "post_attention_layernorm"},
    "all-sink-attn-long": {"mode": "all", **LONG_SINK, "keep_norms": "post_attention_layernorm"},
    # with --long, section 8's AC / AD: the same, but the taper ends at step 1600 and the last 800 steps train at gate 0
    "internal-sink-attn-tail": {"mode": "internal", **LONG_SINK, "keep_norms": "post_attention_layernorm",
                                "end_frac": 2 / 3},
    "all-sink-attn-tail": {"mode": "all", **LONG_SINK, "keep_norms": "post_attention_layernorm", "end_frac": 2 / 3},
    # section 8.6's AE: AC with the lr decaying (cosine, to 0 at the last step); compare with "baseline" (cosine too)
    "internal-sink-attn-tail-cosine": {"mode": "internal", **LONG_SINK, "keep_norms": "post_attention_layernorm",
                                       "end_frac": 2 / 3, "lr_schedule": "cosine"},
    "all-sink-attn-tail-cosine": {"mode": "all", **LONG_SINK, "keep_norms": "post_attention_layernorm",
                                  "end_frac": 2 / 3, "lr_schedule": "cosine"},
    # section 10's runs: every norm tapers (none kept), AE's schedule. BI / BA: the MLP-input norms to the bounded map
    # B tanh(x c / B) (--taper-bound 32); both stop at gate 0 (section 10.3). BI2 / BA2: every tapered norm bounded.
    "internal-sink-bound-tail-cosine": {"mode": "internal", **LONG_SINK, "recipe": "sink", "taper_bound": 32.0,
                                        "taper_bound_scope": "mlp", "end_frac": 2 / 3, "lr_schedule": "cosine"},
    "all-sink-bound-tail-cosine": {"mode": "all", **LONG_SINK, "recipe": "sink", "taper_bound": 32.0,
                                   "taper_bound_scope": "mlp", "end_frac": 2 / 3, "lr_schedule": "cosine"},
    "internal-sink-boundall-tail-cosine": {"mode": "internal", **LONG_SINK, "recipe": "sink", "taper_bound": 32.0,
                                           "taper_bound_scope": "all", "end_frac": 2 / 3, "lr_schedule": "cosine"},
    "all-sink-boundall-tail-cosine": {"mode": "all", **LONG_SINK, "recipe": "sink", "taper_bound": 32.0,
                                      "taper_bound_scope": "all", "end_frac": 2 / 3, "lr_schedule": "cosine"},
    # every norm bounded per feature at 4x its RMS (--taper-bound-rms 4; docs/real_checkpoints.md section 11)
    "internal-sink-boundrms-tail-cosine": _per_feature("internal", 4.0, "all"),
    "all-sink-boundrms-tail-cosine": _per_feature("all", 4.0, "all"),
    # section 12: the attention-input norms unbounded as in AE (only the MLP-input norms bounded), and tighter Ks
    "internal-sink-boundrmsmlp-tail-cosine": _per_feature("internal", 4.0, "mlp"),
    "all-sink-boundrmsmlp-tail-cosine": _per_feature("all", 4.0, "mlp"),
    "internal-sink-boundrms3-tail-cosine": _per_feature("internal", 3.0, "all"),
    "internal-sink-boundrms2-tail-cosine": _per_feature("internal", 2.0, "all"),
    # ... and half the run at gate 0 (the taper ends at step 1200 of 2400 instead of 1600)
    "internal-sink-boundrms-halftail-cosine": _per_feature("internal", 4.0, "all", 1 / 2),
    "internal-sink-boundrms3-halftail-cosine": _per_feature("internal", 3.0, "all", 1 / 2),
    "baseline": {"mode": "baseline"},
    "baseline-constant": {"mode": "baseline", "lr_schedule": "constant"},  # the sink recipes' lr schedule
    "internal": {"mode": "internal"},                                     # the paper's recipe as it was
    "internal-robust": {"mode": "internal", **ROBUST},
    "internal-robust-staged": {"mode": "internal", **ROBUST, "taper_order": "last"},
    "all-robust": {"mode": "all", **ROBUST},
    "all-robust-noscale": {"mode": "all", **ROBUST, "scale_loss": False},
    "internal-robust-hold": {"mode": "internal", **ROBUST, "taper_hold": 14},   # taper 22..36 in --quick
    "internal-ls-staged": {"mode": "internal", "taper_order": "last"},
}
DEFAULT_VARIANTS = "baseline,internal,internal-sink,all-sink,internal-default,all-default"
PROMPTS = ["The capital of France is", "def fibonacci(n):"]
CHATS = ["What is the capital of France?", "Give me two tips for sleeping better."]
# (steps, warmup, taper start, taper end, seq, batch, eval batches); --long also trains in bf16 autocast
SETTINGS = {"quick": (200, 10, 20, 180, 64, 2, 8), "full": (400, 10, 40, 360, 64, 4, 16),
            "long": (2400, 10, 20, 2400, 64, 2, 12), "issue": (150, 10, 20, 120, 128, 4, 8)}


def _settings(args) -> dict:
    T, W, t0, t1, L, B, E = SETTINGS[_setting(args)]
    if args.steps:
        f = args.steps / T
        T, W, t0, t1 = args.steps, max(1, round(W * f)), max(1, round(t0 * f)), max(1, round(t1 * f))
    return {"steps": T, "warmup_steps": W, "taper_start": t0, "taper_end": t1, "seq_len": L, "batch_size": B,
            "eval_batches": E, "lr": args.lr, "corpus": "builtin", "max_chars": args.max_chars or None, "seed": 0,
            **({"bf16": True} if args.long else {})}


def _setting(args) -> str:
    picked = [k for k in ("quick", "long", "issue") if getattr(args, k, False)]
    if len(picked) > 1:
        raise SystemExit("quality_real: pass one of --quick, --long and --issue")
    return picked[0] if picked else "full"


def reusable(run_dir: Path, cfg) -> dict | None:
    """run_dir/summary.json when its fine-tune had exactly cfg's settings (out_dir aside; fields newer than the run
    at their defaults) and its model is there; else None."""
    from tapernorm.train.finetune_cli import AUTO, FinetuneConfig
    try:
        summary = json.loads((run_dir / "summary.json").read_text())
    except (OSError, ValueError):
        return None
    chosen = (summary.get("recipe_auto") or {}).get("recipe")
    if cfg.recipe == AUTO and chosen:  # auto measures the same checkpoint the same way: compare what it chose
        cfg = dataclasses.replace(cfg, recipe=chosen)
    want = cfg.with_recipe().to_dict()
    had = FinetuneConfig(recipe="paper").with_recipe().to_dict() | summary.get("config", {})  # older runs: defaults
    had["recipe"] = had["recipe"] or "paper"  # older runs wrote "" for no recipe
    skip = {"out_dir", "overwrite"} | ({"taper_bound_scope"} if not (want["taper_bound"] or want["taper_bound_rms"])
                                       else set())  # the scope means nothing without a bound (its default moved)
    same = all(had[k] == v for k, v in want.items() if k not in skip)
    if not (same and (run_dir / "model" / "config.json").is_file()):
        return None
    print(f"[quality_real] reusing {run_dir} (same settings)", file=sys.stderr, flush=True)
    return {**summary, "model_dir": str(run_dir / "model"), "reused": True}


def variant_config(name: str, opts: dict, settings: dict, work: Path):
    """(FinetuneConfig, the options as run) of one variant: its fractions turned into steps."""
    from tapernorm.train.finetune_cli import FinetuneConfig
    opts = {"recipe": "paper", **opts}  # a variant without a recipe spells out its method: never auto
    if opts.pop("own_taper_end", False):  # the recipe's taper end, as `tapernorm finetune` has it by default
        settings = {k: v for k, v in settings.items() if k != "taper_end"}
    if "end_frac" in opts:  # the taper ends at this fraction of the run; the rest trains at gate 0
        opts["taper_end"] = round(opts.pop("end_frac") * settings["steps"])
    if "hold_frac" in opts:  # the hold scales with the schedule
        end = opts.get("taper_end", settings["taper_end"])
        opts["taper_hold"] = round(opts.pop("hold_frac") * (end - settings["taper_start"]))
    cfg = FinetuneConfig(model=str(smollm2_dir()), out_dir=str(work / name), overwrite=True, **{**settings, **opts})
    return cfg, opts


def run_variant(name: str, opts: dict, settings: dict, work: Path, reuse: bool = False) -> dict:
    """One fine-tune in-process (or, with reuse, a finished one of the same settings in work / name); a divergence
    (any error) is recorded with its one-line message."""
    from tapernorm.train.finetune import finetune
    cfg, opts = variant_config(name, opts, settings, work)
    t = time.time()
    s = reusable(work / name, cfg) if reuse else None
    try:
        s = s or finetune(cfg)
    except Exception as e:  # noqa: BLE001 - recorded, the other variants go on
        return {"variant": name, "options": opts, "ok": False, "error": f"{type(e).__name__}: {str(e)[:300]}",
                "seconds": round(time.time() - t, 1)}
    res = {"variant": name, "options": opts, "ok": True, "val_before": s["val_loss_before"],
           "val_after": s["val_loss_after"], "seconds": s["seconds"] if s.get("reused") else round(time.time() - t, 1),
           "model_dir": s["model_dir"], "reused": bool(s.get("reused")), "recipe": s.get("config", {}).get("recipe")}
    res.update(end_stats(Path(s["model_dir"]), settings))
    res["ok"] = all(v == v and abs(v) != float("inf") for v in (res["val_after"], res["logit_norm"]))
    return res


def end_stats(model_dir: Path, settings: dict) -> dict:
    """Mean logit norm and pre-logit RMS (the final norm's input) over the held-out chunks."""
    import torch
    from tapernorm.data import load_corpus, tokenize_corpus, val_batches
    from tapernorm.hf import from_pretrained
    from tapernorm.layers import find_final_norm
    from tapernorm.train.finetune import load_text_tokenizer
    model = from_pretrained(str(model_dir)).eval()
    tok = load_text_tokenizer(str(smollm2_dir()))
    docs = load_corpus(settings["corpus"], None, settings["max_chars"])
    data = tokenize_corpus(docs, tok, settings["seq_len"], 0.1)
    h: list = []
    norm = model.get_submodule(find_final_norm(model))
    hook = norm.register_forward_pre_hook(lambda m, i: h.append(i[0].float().pow(2).mean(-1).sqrt().mean()))
    ratios: dict = {}  # per tapered norm: position 0's input RMS / the median of the other positions'
    hooks = [m.register_forward_pre_hook(lambda m, i, n=n: ratios.setdefault(n, []).append(_sink_ratio(i[0])))
             for n, m in model.named_modules() if "Norm" in type(m).__name__ and n != find_final_norm(model)]
    ln = []
    with torch.no_grad():
        for x, _ in val_batches(data.val, settings["batch_size"], settings["seq_len"], settings["eval_batches"]):
            ln.append(model(input_ids=x, use_cache=False).logits.float().norm(dim=-1).mean())
    hook.remove()
    for k in hooks:
        k.remove()
    worst = max(ratios, key=lambda n: sum(ratios[n]), default=None)
    return {"logit_norm": float(torch.stack(ln).mean()), "prelogit_rms": float(torch.stack(h).mean()),
            "sink_ratio_max": sum(ratios[worst]) / len(ratios[worst]) if worst else None, "sink_layer": worst}


def _sink_ratio(x) -> float:
    r = x.detach().float().pow(2).mean(-1).sqrt()  # (B, T)
    return float(r[:, 0].mean() / r[:, 1:].median())


def _cli(*a: str, timeout: int = 1800) -> subprocess.CompletedProcess:
    env = {**os.environ, "OMP_NUM_THREADS": "2"}
    return subprocess.run([sys.executable, "-m", "tapernorm.compiler.cli", *a], capture_output=True, text=True,
                          timeout=timeout, env=env)


def compile_and_run(model_dir: Path, out: Path, new_tokens: int) -> dict:
    """tapernorm compile, then greedy continuations and chat answers with tapernorm generate (1 thread)."""
    t = time.time()
    p = _cli("compile", str(model_dir), "--out", str(out))
    res = {"compile_rc": p.returncode, "compile_seconds": round(time.time() - t, 1),
           "compile_tail": (p.stdout + p.stderr).strip().splitlines()[-3:]}
    if p.returncode != 0:
        return res
    gen = {}
    for prompt, chat in [(q, False) for q in PROMPTS] + [(q, True) for q in CHATS]:
        g = _cli("generate", str(out), "--prompt", prompt, "--max-new-tokens", str(new_tokens), "--threads", "2",
                 "--quiet-prompt", *(["--chat"] if chat else []), timeout=600)
        gen[("chat: " if chat else "") + prompt] = g.stdout.strip() if g.returncode == 0 else "ERROR " + g.stderr[-200:]
    res["generations"] = gen
    return res


def baseline_generations(model_dir: Path, new_tokens: int) -> dict:
    """The same prompts, greedy, with transformers on the fine-tuned baseline (plain HF directory)."""
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer
    tok = AutoTokenizer.from_pretrained(str(smollm2_dir()))
    model = AutoModelForCausalLM.from_pretrained(str(model_dir), dtype=torch.float32).eval()
    out = {}
    for prompt, chat in [(q, False) for q in PROMPTS] + [(q, True) for q in CHATS]:
        if chat:
            ids = tok.apply_chat_template([{"role": "user", "content": prompt}], add_generation_prompt=True,
                                          return_tensors="pt", return_dict=True)["input_ids"]
        else:
            ids = tok(prompt, return_tensors="pt")["input_ids"]
        with torch.no_grad():
            y = model.generate(ids, max_new_tokens=new_tokens, do_sample=False)
        out[("chat: " if chat else "") + prompt] = tok.decode(y[0, ids.shape[1]:], skip_special_tokens=True).strip()
    return out


def _origin(r: dict) -> str:
    """Where a row's fine-tune came from, when it did not run in this invocation."""
    return f" (from {r['from_file']})" if r.get("from_file") else " (reused)" if r.get("reused") else ""


def _fmt(v) -> str:
    return "-" if v is None else f"{v:.1f}"


def _markdown(result: dict) -> str:
    s = result["settings"]
    flag = next((f" (--{k})" for k in ("quick", "long", "issue") if result.get(k)), "")
    lines = [f"# Tapering on SmolLM2-135M-Instruct (issue 19){flag}", "",
             f"Fine-tune: builtin corpus, {s['steps']} steps (LR warmup {s['warmup_steps']}, taper "
             f"{s['taper_start']}..{s['taper_end']}), seq {s['seq_len']}, batch {s['batch_size']}, lr {s['lr']}; "
             f"held-out CE over {s['eval_batches']} validation batches (text not trained on). "
             f"Machine: {result['machine'].get('cpu', '?')}, load avg at start {result['machine'].get('loadavg_start')}.", "",
             "| variant | options | CE before | CE after | vs baseline | logit norm | pre-logit RMS | sink ratio | s |",
             "|---|---|---|---|---|---|---|---|---|"]
    base = next((r for r in result["runs"] if r["options"].get("mode") == "baseline" and r["ok"]), None)
    for r in result["runs"]:
        opts = ", ".join(f"{k}={v}" for k, v in r["options"].items() if k != "mode") or "-"
        if r.get("recipe") and r["options"].get("recipe") != r["recipe"]:  # auto: what it chose
            opts += f" (ran {r['recipe']})"
        opts = opts.replace("|", "\\|")
        if not r["ok"]:
            err = r.get("error") or f"non-finite (CE {r.get('val_after')})"
            m = re.search(r"diverged at step (\d+): (loss|gradient norm) (\S+) at gate ([\d.e-]+)", err)
            err = f"step {m.group(1)}, {m.group(2)} {m.group(3)}, gate {float(m.group(4)):.3g}" if m else err
            lines.append(f"| {r['variant']} | {opts} | - | diverged: {err} "
                         f"| - | - | - | - | {r['seconds']:.0f} |")
            continue
        rel = f"{100 * (r['val_after'] / base['val_after'] - 1):+.2f}%" if base else "-"
        lines.append(f"| {r['variant']} | {opts} | {r['val_before']:.4f} | {r['val_after']:.4f} | {rel} | "
                     f"{r['logit_norm']:.1f} | {r['prelogit_rms']:.2f} | {_fmt(r.get('sink_ratio_max'))} | "
                     f"{r['seconds']:.0f}{_origin(r)} |")
    gens = result.get("generations", {})
    if gens:
        lines += ["", "## Greedy outputs (baseline: transformers; tapered: folded, compiled, `tapernorm generate`)", ""]
        for name, g in gens.items():
            lines.append(f"### {name}")
            if "compile_rc" in g:
                lines.append(f"compile rc {g['compile_rc']} in {g['compile_seconds']} s: "
                             + " / ".join(g.get("compile_tail", [])))
            for p, text in g.get("generations", g).items() if isinstance(g, dict) else ():
                if p.startswith("compile"):
                    continue
                lines.append(f"- **{p}** -> {json.dumps(text)[:400]}")
            lines.append("")
    return "\n".join(lines) + "\n"


def committed_baseline(path: Path, settings: dict) -> tuple[list, dict]:
    """([the baseline run], {its generations}) of a committed result file with exactly these settings, marked with
    the file it came from; SystemExit with one line when the file has other settings or no finished baseline."""
    try:
        old = json.loads(path.read_text())
    except (OSError, ValueError) as e:
        raise SystemExit(f"quality_real: cannot read the baseline file {path}: {e}")
    if old.get("settings") != settings:
        raise SystemExit(f"quality_real: {path} was run with other settings ({old.get('settings')}); its baseline "
                         "is no comparison for these runs")
    run = next((r for r in old["runs"] if r["options"].get("mode") == "baseline" and r["ok"]), None)
    if run is None:
        raise SystemExit(f"quality_real: {path} has no finished baseline run")
    gens = {k: v for k, v in old.get("generations", {}).items() if k == run["variant"]}
    return [{**run, "from_file": path.name}], gens


def merge(out: Path, base: str, tags: list[str], baseline_from: Path | None = None) -> int:
    """One result (runs and generations in tag order) from the per-tag files of parallel runs; with baseline_from,
    the baseline row (and its answers) of that committed file of the same settings goes first."""
    files = [out / f"{base}_{t}.json" for t in tags]
    missing = [f for f in files if not f.is_file()]
    if missing:
        raise SystemExit(f"quality_real: no result file {missing[0]}; run that tag (same --quick/--long, --out) first")
    parts = [json.loads(f.read_text()) for f in files]
    runs, gens = committed_baseline(baseline_from, parts[0]["settings"]) if baseline_from else ([], {})
    result = {**parts[0], "runs": runs + [r for p in parts for r in p["runs"]], "merged_from": tags,
              "generations": {**gens, **{k: v for p in parts for k, v in p.get("generations", {}).items()}},
              "machine_per_part": [p["machine"] for p in parts]}
    write_results(out / base, result, _markdown(result))
    print(_markdown(result))
    return 0


def main() -> int:
    """Run the variants, then compile and run the tapered ones that finished."""
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--quick", action="store_true", help="200 steps at seq 64, batch 2 (default: 400 at batch 4)")
    ap.add_argument("--long", action="store_true", help="2400 steps at seq 64, batch 2, bf16 (~65 min per variant)")
    ap.add_argument("--issue", action="store_true",
                    help="issue 19's command: 150 steps, taper 20..120, seq 128, batch 4, fp32 (with --max-chars 0)")
    ap.add_argument("--variants", default=DEFAULT_VARIANTS, help=f"comma list of {', '.join(VARIANTS)}")
    ap.add_argument("--steps", type=int, default=0, help="override the step count (schedule scales with it)")
    ap.add_argument("--lr", type=float, default=1e-4)
    ap.add_argument("--max-chars", type=int, default=400_000, help="corpus characters (0: the whole builtin corpus)")
    ap.add_argument("--new-tokens", type=int, default=24)
    ap.add_argument("--reuse", action="store_true",
                    help="take a variant's fine-tune from WORK/<variant> when its summary.json has the same settings")
    ap.add_argument("--no-compile", action="store_true", help="skip folding / compiling / generating")
    ap.add_argument("--tag", default="", help="suffix of the result files (variants run in parallel processes)")
    ap.add_argument("--merge", default="", help="comma list of tags: merge their result files into one, run nothing")
    ap.add_argument("--baseline-from", type=Path, default=None,
                    help="with --merge: take the baseline row from this committed result file of the same settings")
    add_output_args(ap)
    args = ap.parse_args()
    out = output_dir(args)
    base = {"quick": "quality_real_quick", "long": "quality_real_long", "full": "quality_real",
            "issue": "quality_real_issue"}[_setting(args)]
    if args.merge:
        return merge(out, base, [t.strip() for t in args.merge.split(",") if t.strip()], args.baseline_from)
    names = [v.strip() for v in args.variants.split(",") if v.strip()]
    bad = [v for v in names if v not in VARIANTS]
    if bad:
        ap.error(f"unknown variant(s) {bad}; pick from {', '.join(VARIANTS)}")
    work = Path(os.environ.get("TAPERNORM_BENCH_WORK", "runs/quality_real"))
    settings = _settings(args)
    result = {"settings": settings, "quick": args.quick, "long": args.long, "issue": args.issue, "machine": machine_info(),
              "versions": library_versions(("torch", "transformers", "onnxruntime", "onnx")), "runs": [],
              "generations": {}}
    stem = out / (base + (f"_{args.tag}" if args.tag else ""))
    for name in names:
        print(f"[quality_real] {name} ...", file=sys.stderr, flush=True)
        r = run_variant(name, VARIANTS[name], settings, work, args.reuse)
        print(f"[quality_real] {name}: {json.dumps({k: v for k, v in r.items() if k != 'options'})}", file=sys.stderr,
              flush=True)
        result["runs"].append(r)
        write_results(stem, result, _markdown(result))
    if not args.no_compile:
        for r in result["runs"]:
            if not r["ok"]:
                continue
            print(f"[quality_real] generate {r['variant']} ...", file=sys.stderr, flush=True)
            if r["options"].get("mode") == "baseline":
                result["generations"][r["variant"]] = baseline_generations(Path(r["model_dir"]), args.new_tokens)
            else:
                result["generations"][r["variant"]] = compile_and_run(Path(r["model_dir"]), work / (r["variant"] + "_onnx"),
                                                                      args.new_tokens)
            write_results(stem, result, _markdown(result))
    print(_markdown(result))
    return 0


if __name__ == "__main__":
    sys.exit(main())
