"""Figures of the quality benchmark (PNG, written atomically next to the results):

    <stem>_fig1a_loss.png    training cross-entropy per arm, and minus the baseline, per width (paper Fig. 1(a))
    <stem>_fig1b_scale.png   logit norm and pre-logit RMS s / s_tgt over steps            (paper Fig. 1(b))
    <stem>_fig2_grads.png    gradient norm by parameter group over steps, per arm         (paper Fig. 2)
    <stem>_sweep.png         lambda sweep: end s / s_tgt and loss cost vs the effective relative lambda
                             (paper form: lambda / s_tgt^2), per form and mode
Lines are the mean over seeds of the binned curves; shading spans the seeds' min to max.
"""
from __future__ import annotations

import os
from pathlib import Path

__all__ = ["plot_all"]

_COLORS = {"baseline": "tab:blue", "internal+aux": "tab:green", "all+aux": "tab:orange", "all-noaux": "tab:red"}


def _plt():
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    return plt


def _save(fig, path: Path) -> Path:
    tmp = path.with_name(f".{path.stem}.tmp-{os.getpid()}.png")
    fig.savefig(tmp, dpi=90)
    os.replace(tmp, path)
    return path


def _band(ax, runs: list[dict], key: str, color: str, label: str, norm_key: str | None = None) -> None:
    """Mean over seeds (line) and min-max (shade) of one binned curve."""
    steps = runs[0]["curves"]["step"]
    ys = []
    for r in runs:
        y = r["curves"][key]
        if norm_key:
            y = [v / r[norm_key] for v in y]
        ys.append(y)
    n = min(len(y) for y in ys)
    mean = [sum(y[i] for y in ys) / len(ys) for i in range(n)]
    ax.plot(steps[:n], mean, color=color, lw=1.3, label=label)
    if len(ys) > 1:
        ax.fill_between(steps[:n], [min(y[i] for y in ys) for i in range(n)], [max(y[i] for y in ys) for i in range(n)],
                        color=color, alpha=0.2, lw=0)


def _diff_to_baseline(ax, arms: dict[str, list[dict]]) -> None:
    """Per arm, mean over seeds of (binned train CE - the same seed's baseline CE): the gaps Fig. 1(a) hides."""
    base = {r["seed"]: r["curves"]["ce"] for r in arms.get("baseline", [])}
    for arm, runs in arms.items():
        if arm == "baseline" or not base:
            continue
        pairs = [[a - b for a, b in zip(r["curves"]["ce"], base[r["seed"]])] for r in runs if r["seed"] in base]
        n = min(len(d) for d in pairs)
        steps = runs[0]["curves"]["step"][:n]
        ax.plot(steps, [sum(d[i] for d in pairs) / len(pairs) for i in range(n)], color=_COLORS.get(arm, "k"),
                lw=1.2, label=arm)
    ax.axhline(0.0, color=_COLORS["baseline"], lw=1.0)
    ax.legend(fontsize=8)


def _eff_lambda(form: str, lam: float, runs: list[dict]) -> float:
    """The relative-form lambda with the same pull: lambda / s_tgt^2 for the paper form (mean s_tgt of the runs)."""
    if form == "relative":
        return lam
    s = sum(r["s_tgt"] for r in runs) / len(runs)
    return lam / (s * s)


def plot_all(table: dict[int, dict[str, list[dict]]], sweep: dict[tuple, list[dict]], stem: Path) -> list[Path]:
    """Write the four figures for `table` ({width: {arm: [records]}}) and `sweep`; returns their paths."""
    plt = _plt()
    stem = Path(stem)
    stem.parent.mkdir(parents=True, exist_ok=True)
    widths = list(table)
    out = []

    fig, axs = plt.subplots(2, len(widths), figsize=(5.5 * len(widths), 7), squeeze=False, sharex="col")
    for j, w in enumerate(widths):
        ax = axs[0][j]
        for arm, runs in table[w].items():
            _band(ax, runs, "ce", _COLORS.get(arm, "k"), arm)
        ces = [v for runs in table[w].values() for r in runs for v in r["curves"]["ce"]]
        lo = min(ces)
        ax.set_ylim(lo - 0.05, lo + 1.5)  # the late-training region, where the arms differ
        ax.set(title=f"width {w}: training cross-entropy", ylabel="train CE")
        ax.legend()
        _diff_to_baseline(axs[1][j], table[w])
        axs[1][j].set(title="minus the baseline (same seed and batches)", xlabel="step", ylabel="train CE difference")
    fig.tight_layout()
    out.append(_save(fig, stem.with_name(stem.name + "_fig1a_loss.png")))
    plt.close(fig)

    fig, axs = plt.subplots(2, len(widths), figsize=(5.5 * len(widths), 7), squeeze=False, sharex="col")
    for j, w in enumerate(widths):
        for arm, runs in table[w].items():
            _band(axs[0][j], runs, "logit_norm", _COLORS.get(arm, "k"), arm)
            _band(axs[1][j], runs, "prelogit_rms", _COLORS.get(arm, "k"), arm, norm_key="s_tgt")
        axs[0][j].set(title=f"width {w}: logit norm ||z||", ylabel="mean per-token logit norm")
        axs[1][j].axhspan(0.8, 1.2, color="gray", alpha=0.15, label="target +-20%")
        axs[1][j].set(title="pre-logit RMS / frozen target", ylabel="s(h) / s_tgt", xlabel="step", yscale="log")
        axs[0][j].legend()
        axs[1][j].legend(fontsize=8)
    fig.tight_layout()
    out.append(_save(fig, stem.with_name(stem.name + "_fig1b_scale.png")))
    plt.close(fig)

    w = widths[-1]
    groups = sorted(k for k in next(iter(table[w].values()))[0]["curves"] if k.startswith("grad_norm_"))
    fig, axs = plt.subplots(1, len(groups), figsize=(4.2 * len(groups), 3.8), squeeze=False)
    for ax, gk in zip(axs[0], groups):
        for arm, runs in table[w].items():
            _band(ax, runs, gk, _COLORS.get(arm, "k"), arm)
        ax.set(title=f"width {w}: {gk[len('grad_norm_'):]} gradient norm", xlabel="step", yscale="log")
    axs[0][0].legend(fontsize=8)
    fig.tight_layout()
    out.append(_save(fig, stem.with_name(stem.name + "_fig2_grads.png")))
    plt.close(fig)

    fig, axs = plt.subplots(1, 2, figsize=(11, 4))
    styles = {"internal": "-", "all": "--"}
    for (mode, form) in sorted({(k[0], k[1]) for k in sweep if k[1] != "none"}):
        keys = sorted(k for k in sweep if k[0] == mode and k[1] == form)
        lams = [_eff_lambda(form, k[2], sweep[k]) for k in keys]
        ratio = [sum(r["end_rms_ratio"] for r in sweep[k]) / len(sweep[k]) for k in keys]
        ref = {r["seed"]: r["val_loss"] for r in sweep[(mode, "none", 0.0)]}
        cost = [100 * sum(r["val_loss"] / ref[r["seed"]] - 1 for r in sweep[k]) / len(sweep[k]) for k in keys]
        color = "tab:purple" if form == "paper" else "tab:olive"
        axs[0].plot(lams, ratio, styles[mode], marker="o", color=color, label=f"{mode}, {form}")
        axs[1].plot(lams, cost, styles[mode], marker="o", color=color, label=f"{mode}, {form}")
    axs[0].axhspan(0.8, 1.2, color="gray", alpha=0.15)
    xl = "effective relative lambda (paper form: lambda / s_tgt^2)"
    axs[0].set(xscale="log", yscale="log", xlabel=xl, ylabel="end s / s_tgt", title="scale held (goal: shaded)")
    axs[1].axhline(0.5, color="gray", ls=":")
    axs[1].set(xscale="log", xlabel=xl, ylabel="val loss cost vs no aux (%)", title="loss cost (goal < 0.5%)")
    axs[0].legend(fontsize=8)
    fig.tight_layout()
    out.append(_save(fig, stem.with_name(stem.name + "_sweep.png")))
    plt.close(fig)
    return out
