"""Markdown table and PNG chart of a bench_peers.py result."""
from __future__ import annotations

from pathlib import Path

ORDER = ["lean_folded", "lean_unfused", "lean_baseline", "generic_folded", "lean_folded_genai",
         "lean_folded_ourloop_genai_ort", "genai_builder",
         "torch_compile", "eager", "lean_folded_aa"]


def markdown(res: dict) -> str:
    """The results page: settings, per-variant table, paired ratios, overhead, bandwidth, norm share."""
    s, m, v, bw = res["settings"], res["machine"], res["versions"], res["bandwidth"]
    out = ["# Decode peers (same weights, lockstep, greedy)", "",
           "**Partial results: the run was still going or stopped early.**  " if res.get("partial") else "",
           f"{s['label']}  " if s.get("label") else "",
           f"Machine: {m['cpu']}, {m['cores']} cores (shared), {m['platform']}; load avg at start "
           f"{m['loadavg_start']}, end {m.get('loadavg_end')}.  ",
           "Versions: " + ", ".join(f"{k} {x}" for k, x in v.items()) + ".  ",
           f"Settings: depth {s['depth']}, head_dim {s['head_dim']} (heads = width / head_dim), vocab {s['vocab']}, context {s['max_seq']}, prompt "
           f"{s['prompt_len']}, {s['new_tokens']} new tokens ({s['new_tokens'] - 1} timed decode steps), "
           f"{s['rounds']} rounds (+{s['warmup']} warm-up), threads {s['threads']} (ORT intra-op and genai; inter-op "
           "1, no spinning; torch), fp32, CPU, random weights, All-Taper at gate 0 (baseline: same weights, RMSNorm).",
           "",
           f"Memory-bandwidth probe (numpy, 1 thread, {bw['mb']} MB): copy {bw['copy_gb_s']:.1f} GB/s (read + write), "
           f"read {bw['read_gb_s']:.1f} GB/s; at the end: copy {res['bandwidth_end']['copy_gb_s']:.1f}, read "
           f"{res['bandwidth_end']['read_gb_s']:.1f}. GB/s of a variant = (linear weights + KV cache at the mean "
           "context) per step / step time; small models sit partly in cache, so it can exceed DRAM bandwidth.", "",
           "Ratios are medians over rounds of paired ratios (tok/s of the first / tok/s of the second in the same "
           "round) [p25, p75] [min, max]; the A/A row is the noise floor.", ""]
    for c in res["configs"]:
        out += [f"## width {c['width']}, batch {c['batch']}", "",
                "| variant | tok/s | ms/step | GB/s | % of read BW | ORT nodes | greedy agree |", "|---|---|---|---|---|---|---|"]
        for name in [n for n in ORDER if n in c["variants"]]:
            d = c["variants"][name]
            key = "lean_folded" if name.startswith("lean_folded") else name
            nodes = c["ort_nodes"].get(key, {}).get("nodes", "")
            ag = "" if d["greedy_agreement_with_lean_folded"] is None else f"{d['greedy_agreement_with_lean_folded']:.2f}"
            out.append(f"| {name} | {d['tok_s']:.0f} | {d['ms_per_step']:.3f} | {d['gb_s']:.1f} | "
                       f"{100 * d['gb_s'] / bw['read_gb_s']:.0f}% | {nodes} | {ag} |")
        out += ["", "| comparison | x (median) | [p25, p75] | [min, max] |", "|---|---|---|---|"]
        for name, r in c["ratios"].items():
            out.append(f"| {name} | x{r['median']:.3f} | [{r['p25']:.3f}, {r['p75']:.3f}] | [{r['min']:.3f}, "
                       f"{r['max']:.3f}] |")
        oh, pr, est = c["our_loop_overhead_us"], c["norm_profile"], c["cuda_launch_estimate"]
        out += ["", f"Our loop (lean folded): step {oh['step_us_median']:.0f} us, of which run_with_iobinding "
                f"{oh['run_us_median']:.0f} us; per-step Python overhead {oh['median']:.0f} us "
                f"[{oh['min']:.0f}, {oh['max']:.0f}].  ",
                f"Norm share of the baseline's decode step (ORT profiler): {pr['norm_share_of_kernels']:.1%} "
                f"({pr['norm_us_per_step']:.1f} of {pr['kernel_us_per_step']:.0f} us kernel time per step) - the "
                f"fold's ceiling; measured fold gain (lean_folded / lean_baseline) "
                f"x{c['ratios'].get('lean_folded / lean_baseline (fold gain)', {}).get('median', float('nan')):.3f}.  ",
                f"CUDA launch-count estimate: {est['baseline_kernels']} vs {est['folded_kernels']} kernels per step, "
                f"fold gain <= x{est['fold_gain_if_launch_bound']:.3f} if launch-bound ({est['note']}).", ""]
        if c.get("twin_max_abs_logit_diff") is not None:
            out.append(f"HF twin for genai's builder: max |logit diff| vs the tapernorm model "
                       f"{c['twin_max_abs_logit_diff']:.2e}.")
        if c.get("torch_compile_s"):
            out.append(f"torch.compile warm-up (compile) {c['torch_compile_s']:.0f} s.")
        out.append("")
    for e in res.get("errors", []):
        out.append(f"Width {e['width']} failed: {e['error']}")
    return "\n".join(out) + "\n"


def chart(res: dict, path: Path) -> None:
    """Grouped bars of tok/s per variant for every (width, batch)."""
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    cfgs = res["configs"]
    names = [n for n in ORDER if any(n in c["variants"] for c in cfgs) and n != "lean_folded_aa"]
    fig, ax = plt.subplots(figsize=(max(7, 2.2 * len(cfgs)), 5.2))
    w = 0.8 / len(names)
    for i, n in enumerate(names):
        ys = [c["variants"].get(n, {}).get("tok_s", 0) for c in cfgs]
        ax.bar([j + i * w for j in range(len(cfgs))], ys, w, label=n)
    ax.set_xticks([j + 0.4 - w / 2 for j in range(len(cfgs))])
    ax.set_xticklabels([f"w{c['width']} B{c['batch']}" for c in cfgs])
    ax.set_ylabel("decode tok/s (batch total)")
    ax.set_yscale("log")
    ax.set_title("Decode throughput, same weights (CPU, fp32, %d thread)" % res["settings"]["threads"])
    ax.legend(fontsize=7, ncol=4, loc="upper center", bbox_to_anchor=(0.5, -0.1))
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


if __name__ == "__main__":  # re-render the page and chart from a results JSON: peers_report.py results/peers.json
    import json
    import sys

    from bench_common import write_results
    from peers_common import recompute_ratios
    src = Path(sys.argv[1])
    result = json.loads(src.read_text())
    for c in result["configs"]:
        recompute_ratios(c)
    write_results(src.with_suffix(""), result, markdown(result))
    chart(result, src.with_suffix(".png"))
