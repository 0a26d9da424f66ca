"""Markdown for benchmarks/precision.py's result dict."""
from __future__ import annotations

PRECS = ("fp32", "int8", "int4")


def _ppl_table(r: dict) -> list[str]:
    ppl = r["perplexity"]
    lines = ["| precision | baseline | folded | unfused | genai builder | folded / genai |", "|---|---|---|---|---|---|"]
    for p in PRECS:
        g = ppl[f"genai_{p}"]["ppl"]
        cells = [f"{ppl[f'{k}_{p}']['ppl']:.3f}" for k in ("baseline", "folded", "unfused")]
        lines.append(f"| {p} | " + " | ".join(cells) + f" | {g:.3f} | {ppl[f'folded_{p}']['ppl'] / g:.4f} |")
    return lines


def _drift_table(r: dict) -> list[str]:
    lines = ["| graph | max abs logit diff | mean KL(fp32 baseline, graph) | top-1 agreement |", "|---|---|---|---|"]
    for name, v in r["perplexity"].items():
        if "mean_kl_vs_fp32_baseline" in v:
            lines.append(f"| {name} | {v['max_abs_logit_diff_vs_fp32_baseline']:.3g} | "
                         f"{v['mean_kl_vs_fp32_baseline']:.4f} | {v['top1_agreement_vs_fp32_baseline']:.3f} |")
    return lines


def _recon(r: dict) -> list[str]:
    rec = r["int4_reconstruction"]
    kinds: dict[str, list] = {}
    for row in rec["linears"]:
        if not row["folded"]:
            continue
        kinds.setdefault(f"K={row['K']} N={row['N']}", []).append(row)
    lines = [f"Folded linears: {rec['n_folded_linears']}; folded int4 error larger than the unfused graph's effective "
             f"error in {rec['folded_worse_than_unfused_effective']} of them; median ratio folded / unfused-effective "
             f"{rec['median_ratio_folded_over_unfused_effective']:.3f}.",
             f"Overall (all linears, energy-weighted): folded {rec['overall_rel_folded']:.4f}, unfused "
             f"{rec['overall_rel_unfused']:.4f}, unfused effective {rec['overall_rel_unfused_effective']:.4f}.", "",
             "| linear shape (folded ones) | n | rel. error folded | unfused (own basis) | unfused effective | s range |",
             "|---|---|---|---|---|---|"]
    for k, rows in kinds.items():
        def mean(key):
            return sum(x[key] for x in rows) / len(rows)
        lines.append(f"| {k} | {len(rows)} | {mean('rel_folded'):.4f} | {mean('rel_unfused'):.4f} | "
                     f"{mean('rel_unfused_effective'):.4f} | {min(x['s_min'] for x in rows):.3g} .. "
                     f"{max(x['s_max'] for x in rows):.3g} |")
    return lines


def _speed(r: dict) -> list[str]:
    if not r.get("speed"):
        return ["(speed not run: --skip-speed)"]
    lines = []
    for b, res in r["speed"].items():
        lines += [f"**{b}**", "", "| variant | tok/s | ms/step | weight MB/step | weight GB/s |", "|---|---|---|---|---|"]
        for n, v in res["variants"].items():
            lines.append(f"| {n} | {v['tok_s']:.1f} | {v['step_ms']:.1f} | {v['weight_mb_per_step']:.0f} | "
                         f"{v['weight_gb_s']:.2f} |")
        lines += ["", "| paired ratio (tok/s) | median | p25 | p75 | min | max | n |", "|---|---|---|---|---|---|---|"]
        for n, s in res["ratios"].items():
            lines.append(f"| {n} | {s['median']:.3f} | {s['p25']:.3f} | {s['p75']:.3f} | {s['min']:.3f} | "
                         f"{s['max']:.3f} | {s['n']} |")
        lines.append("")
    return lines


def markdown(r: dict) -> str:
    """The results page."""
    t, h, s = r["tapered"], r["held_out"], r["settings"]
    graphs = {k: v["graph"] for k, v in r["compile"].items()}
    return "\n".join([
        "# Precision: fp32 / int8 / int4 on SmolLM2-135M-Instruct (issue 16)", "",
        f"Machine: {r['machine']['cpu']}, {r['machine']['cores']} cores (shared, load at start "
        f"{r['machine']['loadavg_start']}); versions {r['versions']}; {r['seconds']:.0f} s.",
        f"Settings: {s}.", "",
        f"Our graphs: {graphs} (what `tapernorm compile` produced for this checkpoint at this commit). int8/int4 = "
        f"`compiler.quantize.quantize_file` on compile's fp32 files (what `compile --precision` runs): MatMulNBits, "
        f"block {s['block_size']}, symmetric, accuracy level {s['accuracy_level']}, lm_head quantized, embedding "
        f"kept fp32. genai: onnxruntime-genai's builder `-p P -e cpu` defaults (block 32, symmetric, accuracy level "
        f"4, lm_head quantized, tied embedding as int4 GatherBlockQuantized at int4).", "",
        f"Tapered rows: {t.get('kind')}; mode {t['mode']}, {t['tapered_norms']} norms; gate-0 logits finite: "
        f"{t['gate0_logits_finite']}. {t.get('why', '')}", "",
        f"Held-out text: {h['files']} at commit {h['commit']} ({h['chars']} chars, {h['tokens_available']} tokens; "
        f"first {h['tokens_used']} scored, windows of {s['chunk']} from an empty cache). Written in 2026 by this "
        "project, after SmolLM2's training data was collected, never published: the words are new to the model, "
        "the subject (ML / ONNX engineering prose) is not.", "",
        "## Held-out perplexity", "", *_ppl_table(r), "",
        "Drift from the fp32 baseline graph on the first held-out window (max |logit| there: "
        f"{next((v['logit_scale_fp32_baseline'] for v in r['perplexity'].values() if 'logit_scale_fp32_baseline' in v), 0):.3g}):",
        "", *_drift_table(r), "",
        "Other int4 settings, baseline vs folded (held-out perplexity; block : accuracy level, 0 = unset):", "",
        "| setting | baseline | folded | folded / baseline |", "|---|---|---|---|",
        *[f"| {k.split('_int4_')[1]} | {v:.3f} | {r['int4_variants'][k.replace('baseline', 'folded')]:.3f} | "
          f"{r['int4_variants'][k.replace('baseline', 'folded')] / v:.4f} |"
          for k, v in r.get("int4_variants", {}).items() if k.startswith("baseline")], "",
        "## int4 reconstruction error per linear (relative Frobenius), folded vs unfolded", "", *_recon(r), "",
        "## Decode speed, lockstep (ours: our loop on this venv's onnxruntime; genai: its build + loop)", "",
        f"Our graphs timed: {r.get('speed_graphs')}. Prompt {s['prompt_len']} random tokens, {s['steps']} steps "
        f"timed per run, {s['rounds']} rounds, order reshuffled each round, {s['threads']} threads each, thread "
        "spinning at onnxruntime's default on both sides. "
        "Weight GB/s = bytes of the MatMul / MatMulNBits initializers (one decode step reads each once) / step time.",
        "",
        *_speed(r), ""])
