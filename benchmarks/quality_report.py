"""Summaries and the markdown report of the quality benchmark (pure functions of the run records)."""
from __future__ import annotations

from quality_stats import mean_sd, paired_test

__all__ = ["table_summary", "sweep_summary", "markdown"]

_ARM_TITLES = {"baseline": "Baseline", "internal+aux": "Internal-Taper (+aux)", "all+aux": "All-Taper (+aux)",
               "all-noaux": "All-Taper (no aux)"}


def _stats(runs: list[dict]) -> dict:
    ratio = [r["end_rms_ratio"] for r in runs if r.get("end_rms_ratio") is not None]
    return {"val_loss": mean_sd([r["val_loss"] for r in runs]),
            "end_rms_ratio": mean_sd(ratio) if ratio else None,
            "end_logit_norm": mean_sd([r["end_logit_norm"] for r in runs]),
            "max_logit_norm": mean_sd([r["max_logit_norm"] for r in runs]),
            "seeds": [r["seed"] for r in runs], "val_losses": [r["val_loss"] for r in runs]}


def table_summary(arms: dict[str, list[dict]], ref: str) -> dict:
    """Per arm: mean +- sd of the full-split val loss and end statistics; paired gap to `ref` by seed."""
    out = {}
    for name, runs in arms.items():
        out[name] = _stats(runs)
        if name != ref:
            base = {r["seed"]: r["val_loss"] for r in arms[ref]}
            pairs = [(r["val_loss"], base[r["seed"]]) for r in runs if r["seed"] in base]
            out[name]["vs_" + ref] = paired_test([p[0] for p in pairs], [p[1] for p in pairs])
    return out


def sweep_summary(sweep: dict[tuple, list[dict]], rms_tol: float, cost_max: float) -> dict:
    """Per (mode, form, lambda): end RMS ratio, logit norm, and the loss cost against the same mode without
    the scale loss (paired by seed); `meets_goal` when |ratio - 1| <= rms_tol and cost < cost_max (means).
    `candidates`: (form, lambda) meeting the goal in every swept mode."""
    rows = []
    for (mode, form, lam), runs in sweep.items():
        row = {"mode": mode, "form": form, "lambda": lam, **_stats(runs)}
        if form != "none":
            ref = {r["seed"]: r["val_loss"] for r in sweep[(mode, "none", 0.0)]}
            row["cost_vs_noaux"] = paired_test([r["val_loss"] for r in runs], [ref[r["seed"]] for r in runs])
            ratio = row["end_rms_ratio"]["mean"] if row["end_rms_ratio"] else float("nan")
            row["meets_goal"] = bool(abs(ratio - 1.0) <= rms_tol and row["cost_vs_noaux"]["gap_mean"] < cost_max)
        rows.append(row)
    modes = sorted({r["mode"] for r in rows})
    cands = []
    for form, lam in sorted({(r["form"], r["lambda"]) for r in rows if r["form"] != "none"}):
        ok = [r["meets_goal"] for r in rows if r["form"] == form and r["lambda"] == lam]
        if len(ok) == len(modes) and all(ok):
            cands.append({"form": form, "lambda": lam})
    return {"rows": rows, "candidates": candidates_sorted(cands, rows), "modes": modes}


def candidates_sorted(cands: list[dict], rows: list[dict]) -> list[dict]:
    """Passing (form, lambda) ordered by their largest mean loss cost over the modes (cheapest first)."""
    def worst(c):
        return max(r["cost_vs_noaux"]["gap_mean"] for r in rows if r["form"] == c["form"] and r["lambda"] == c["lambda"])
    return sorted(cands, key=worst)


def _ms(d, scale=1.0, fmt="{:.4f}") -> str:
    if not d:
        return "-"
    return f"{fmt.format(d['mean'] * scale)} +- {fmt.format(d['sd'] * scale)}"


def _gap(t: dict | None) -> str:
    if not t:
        return ""
    p = "" if t["p"] is None else f", p={t['p']:.3f}"
    return f"{t['gap_mean'] * 100:+.2f}% +- {t['gap_sd'] * 100:.2f}{p}"


def markdown(res: dict) -> str:
    """The human-readable report (quality.md)."""
    s, m = res["settings"], res["machine"]
    aux, dflt = s["aux"], s["aux_default"]
    lines = [
        "# Quality: the paper's Table 1, Figures 1-2 and a scale-loss lambda sweep (CPU scale)", "",
        f"{res['date']}; {m['cpu']} ({m['cores']} cores, shared); load avg start {m.get('loadavg_start')}, end "
        f"{m.get('loadavg_end')}; {', '.join(f'{k} {v}' for k, v in res['versions'].items())}; "
        f"{(res['seconds'] or 0) / 60:.1f} min wall for this invocation ({res['runs_cached']} of {len(res['runs'])} runs "
        f"from the cache), {res['train_seconds_total'] / 60:.0f} min of training in all runs.", "",
        f"Settings: {'QUICK (smoke) ' if s['quick'] else ''}Llama-style DecoderLM, depth {s['depth']}, {s['heads']} heads, "
        f"widths {s['widths']}; corpus {s['corpus']} (vocab {s['vocab']}), batch {s['batch_size']} x {s['seq_len']}, "
        f"{s['steps']} steps, AdamW lr {s['lr']} (5% warmup, cosine to 0), taper from the end of warmup to gate 0 at "
        f"the last step; seeds {res['seeds']['table']} (init and data order). +aux arms: scale loss form "
        f"`{aux['scale_form']}`, lambda {aux['scale_lambda']:g} (TrainConfig default: `{dflt['scale_form']}`, "
        f"{dflt['scale_lambda']:g}). Validation loss: the FULL held-out "
        "split, tapered models at gate 0. Gaps: per-seed x / baseline - 1, mean +- sd, paired t-test p.", "",
        "## Table 1 analogue: final validation loss", "",
        "| width | arm | val loss (mean +- sd) | gap vs baseline | end logit norm | end s / s_tgt |",
        "| --- | --- | --- | --- | --- | --- |"]
    for w, arms in res["table1"].items():
        for name, st in arms.items():
            lines.append(f"| {w} | {_ARM_TITLES.get(name, name)} | {_ms(st['val_loss'])} | "
                         f"{_gap(st.get('vs_baseline')) or '-'} | {_ms(st['end_logit_norm'], fmt='{:.1f}')} | "
                         f"{_ms(st['end_rms_ratio'], fmt='{:.2f}')} |")
    lines += ["", "## Has the validation loss flattened?", "",
              "Baseline seed 0: full-split validation loss at the periodic evaluations, and the same run with "
              "twice the steps (its own cosine schedule).", ""]
    for w, f in res["flatness"].items():
        ev = f["baseline_evals"]
        q = [e for e in ev if e["step"] >= 0.75 * s["steps"]]
        drop = (q[0]["val_loss"] - ev[-1]["val_loss"]) / ev[-1]["val_loss"] if q else float("nan")
        best = min(ev, key=lambda e: e["val_loss"])
        pts = ", ".join(f"{e['step']}:{e['val_loss']:.3f}" for e in ev)
        txt = (f"- width {w}: evals {pts}; last quarter "
               f"-{drop * 100:.2f}%; best at step {best['step']}")
        if "horizon" in f:
            h = f["horizon"]
            txt += (f"; {h['steps_2x']} steps: {h['val_loss_2x']:.4f} vs {h['val_loss']:.4f} "
                    f"({h['improvement_2x'] * 100:+.2f}% better with 2x steps)")
        lines.append(txt)
    sw = res["sweep"]
    g = s["goal"]
    lines += ["", f"## Scale-loss lambda sweep (width {s['sweep_width']}, seeds {res['seeds']['sweep']})", "",
              f"Goal: end-of-training pre-logit RMS within {g['rms_within'] * 100:.0f}% of its frozen target and "
              f"validation-loss cost < {g['loss_cost_below'] * 100:.1f}% against the same mode without the loss.", "",
              "| mode | form | lambda | val loss | cost vs no aux | end s / s_tgt | end logit norm | goal |",
              "| --- | --- | --- | --- | --- | --- | --- | --- |"]
    for r in sw["rows"]:
        goal = "" if r["form"] == "none" else ("met" if r["meets_goal"] else "no")
        lines.append(f"| {r['mode']} | {r['form']} | {r['lambda']:g} | {_ms(r['val_loss'])} | "
                     f"{_gap(r.get('cost_vs_noaux')) or '-'} | {_ms(r['end_rms_ratio'], fmt='{:.2f}')} | "
                     f"{_ms(r['end_logit_norm'], fmt='{:.1f}')} | {goal} |")
    c = sw["candidates"]
    mine = [r for r in sw["rows"] if r["form"] == aux["scale_form"] and r["lambda"] == aux["scale_lambda"]]
    verdict = "; ".join(f"{r['mode']}: {'met' if r['meets_goal'] else 'NOT met'}" for r in mine) or "not swept"
    lines += ["", "Meeting the goal in every swept mode (cheapest first): " +
              (", ".join(f"{x['form']} lambda={x['lambda']:g}" for x in c) if c else "none."), "",
              f"Scale loss of the +aux arms: {aux['scale_form']} lambda={aux['scale_lambda']:g} "
              f"-> goal in the sweep: {verdict}. Paper form and relative form are one family at a fixed target "
              "(relative lambda = paper lambda / s_tgt^2); the sweep figure puts both on that axis.", "",
              "## Table 3 analogue (GPT-2 fine-tuning to TaperLN / FakeLN)", "",
              f"{res['table3']['status']}: {res['table3']['reason']}.", "",
              "## Figures", ""] + [f"- ![{f}]({f})" for f in res.get("figures", [])] + [""]
    return "\n".join(lines)
