"""Training curves to PNG: loss (train CE, scale loss, validation), gate and LR, logit norm and pre-logit RMS."""
from __future__ import annotations

import os
from pathlib import Path

from .trainstate import read_log

__all__ = ["plot_run"]


def plot_run(run_dir: str | os.PathLike, out: str | os.PathLike | None = None) -> Path:
    """Read RUN/log.jsonl and write a 3-panel PNG (default RUN/curves.png) atomically; returns its path."""
    run = Path(run_dir)
    log = run / "log.jsonl"
    if not log.is_file():
        raise FileNotFoundError(f"{log} does not exist; pass the --out directory of a `tapernorm train` run")
    recs = read_log(log)
    tr = [r for r in recs if r.get("kind", "train") == "train"]
    ev = [r for r in recs if r.get("kind") == "eval"]
    if not tr:
        raise ValueError(f"{log} has no training steps to plot; train for at least one step")
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    steps = [r["step"] for r in tr]
    fig, ax = plt.subplots(3, 1, figsize=(7, 9), sharex=True)
    ax[0].plot(steps, [r["ce"] for r in tr], lw=0.8, label="train CE")
    if any(r.get("scale_loss") for r in tr):
        ax[0].plot(steps, [r["scale_loss"] for r in tr], lw=0.8, label="scale loss")
    if ev:
        ax[0].plot([r["step"] for r in ev], [r["val_loss"] for r in ev], "o-", label="val CE")
    ax[0].set_ylabel("loss")
    ax[0].legend()
    ax[1].plot(steps, [r["gate"] if r.get("gate") is not None else 1.0 for r in tr], label="gate g")
    lrs = [r["lr"] for r in tr]
    peak = max(lrs) or 1.0
    ax[1].plot(steps, [v / peak for v in lrs], "--", label=f"lr / {peak:.2g}")
    ax[1].set_ylim(-0.05, 1.05)
    ax[1].set_ylabel("schedule")
    ax[1].legend()
    ax[2].plot(steps, [r["logit_norm"] for r in tr], label="logit norm")
    ax[2].set_ylabel("logit norm")
    ax[2].set_xlabel("step")
    rms = ax[2].twinx()  # pre-logit RMS is orders of magnitude smaller: its own axis
    rms.plot(steps, [r["prelogit_rms"] for r in tr], color="tab:orange", label="pre-logit RMS s(h)")
    rms.set_ylabel("pre-logit RMS")
    h1, l1 = ax[2].get_legend_handles_labels()
    h2, l2 = rms.get_legend_handles_labels()
    ax[2].legend(h1 + h2, l1 + l2)
    fig.suptitle(str(run.name))
    fig.tight_layout()
    dst = Path(out) if out is not None else run / "curves.png"
    dst.parent.mkdir(parents=True, exist_ok=True)
    tmp = dst.with_name(f".{dst.stem}.tmp-{os.getpid()}.png")
    fig.savefig(tmp, dpi=100)
    plt.close(fig)
    os.replace(tmp, dst)
    return dst
