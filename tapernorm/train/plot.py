"""Training curves to PNG, one quantity family per panel so every curve can be read:

    1. loss: train CE and validation CE (left axis), the scale loss on its own log axis (right)
    2. the gate g
    3. the learning rate (own panel: with the default schedule it has the gate's cosine shape)
    4. scale: logit norm (left axis) and pre-logit RMS s(h) with its frozen target (right axis)
"""
from __future__ import annotations

import json
import os
from pathlib import Path

from .state import read_log

__all__ = ["plot_run", "MATPLOTLIB_HINT"]

MATPLOTLIB_HINT = "tapernorm plot needs matplotlib: pip install 'tapernorm[plot]' (or pip install matplotlib)"


def _title(run: Path, steps: int) -> str:
    """'preset, mode-taper, N steps' from the run's saved settings (falls back to the step count)."""
    for p in (run / "checkpoint" / "trainer_state.json",):
        try:
            c = json.loads(p.read_text())["train_config"]
            aux = (f", scale loss lambda={c.get('scale_lambda')} ({c.get('scale_form', 'paper')})" if c.get("scale_loss")
                   else ", no scale loss")
            return f"{c.get('preset')} | mode {c.get('mode')}{aux} | {c.get('steps')} steps"
        except (OSError, ValueError, KeyError, TypeError):
            continue
    return f"training run, {steps} steps"


def plot_run(run_dir: str | os.PathLike, out: str | os.PathLike | None = None) -> Path:
    """Read RUN/log.jsonl and write a 4-panel PNG (default RUN/curves.png) atomically; returns its path."""
    run = Path(run_dir)
    log = run / "log.jsonl"
    if not log.is_file():
        raise FileNotFoundError(f"{log} does not exist; pass the --out directory of a `tapernorm train` run")
    recs = read_log(log)
    tr = [r for r in recs if r.get("kind", "train") == "train"]
    ev = [r for r in recs if r.get("kind") == "eval"]
    if not tr:
        raise ValueError(f"{log} has no training steps to plot; train for at least one step")
    try:  # a missing or broken matplotlib (pyplot's own imports included) is one line with the install hint
        import matplotlib
        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        raise RuntimeError(MATPLOTLIB_HINT) from None
    except Exception as e:  # e.g. a numpy ABI mismatch inside matplotlib
        why = " ".join(str(e).split())[:200]
        raise RuntimeError(f"{MATPLOTLIB_HINT} (matplotlib is installed but failed to import: "
                           f"{type(e).__name__}: {why})") from None

    steps = [r["step"] for r in tr]
    fig, ax = plt.subplots(4, 1, figsize=(8, 12), sharex=True)
    ax[0].plot(steps, [r["ce"] for r in tr], lw=0.8, color="tab:blue", label="train CE")
    if ev:
        ax[0].plot([r["step"] for r in ev], [r["val_loss"] for r in ev], "o-", color="tab:green", label="val CE")
    ax[0].set_ylabel("cross-entropy")
    handles, labels = ax[0].get_legend_handles_labels()
    aux = [(s, r["scale_loss"]) for s, r in zip(steps, tr) if r.get("scale_loss")]
    if aux:
        ax0r = ax[0].twinx()
        ax0r.plot([a for a, _ in aux], [b for _, b in aux], lw=0.8, color="tab:red", label="scale loss (right, log)")
        ax0r.set_yscale("log")
        ax0r.set_ylabel("scale loss", color="tab:red")
        h, lab = ax0r.get_legend_handles_labels()
        handles, labels = handles + h, labels + lab
    ax[0].legend(handles, labels, loc="lower center", bbox_to_anchor=(0.5, 1.0), ncol=3, frameon=False)

    # gate and LR each get a panel: with the default schedule both are cosines to 0 at the last step
    ax[1].plot(steps, [r["gate"] if r.get("gate") is not None else 1.0 for r in tr], lw=2.0, color="tab:purple")
    ax[1].set_ylim(-0.05, 1.05)
    ax[1].set_ylabel("gate g")
    ax[2].plot(steps, [r["lr"] for r in tr], lw=1.2, color="tab:gray")
    ax[2].set_ylabel("learning rate")
    ax[2].ticklabel_format(axis="y", style="sci", scilimits=(-2, 2))

    ax[3].plot(steps, [r["logit_norm"] for r in tr], color="tab:blue", label="logit norm")
    ax[3].set_ylabel("logit norm", color="tab:blue")
    ax[3].set_xlabel("step")
    rms = ax[3].twinx()  # pre-logit RMS is orders of magnitude smaller: its own axis
    rms.plot(steps, [r["prelogit_rms"] for r in tr], color="tab:orange", label="pre-logit RMS s(h) (right)")
    tgt = [(s, r["s_tgt"]) for s, r in zip(steps, tr) if r.get("s_tgt") is not None]
    if tgt:
        rms.plot([a for a, _ in tgt], [b for _, b in tgt], ":", color="tab:orange", label="frozen target s_tgt (right)")
    rms.set_ylabel("pre-logit RMS", color="tab:orange")
    h1, l1 = ax[3].get_legend_handles_labels()
    h2, l2 = rms.get_legend_handles_labels()
    ax[3].legend(h1 + h2, l1 + l2, loc="lower center", bbox_to_anchor=(0.5, 1.0), ncol=3, frameon=False)
    fig.suptitle(_title(run, len(steps)))
    fig.tight_layout()
    dst = Path(out) if out is not None else run / "curves.png"
    dst.parent.mkdir(parents=True, exist_ok=True)
    tmp = dst.with_name(f".{dst.stem}.tmp-{os.getpid()}.png")
    try:
        fig.savefig(tmp, dpi=100)
        os.replace(tmp, dst)
    except OSError as e:  # a full disk: one line naming the figure, no partial temp file left
        tmp.unlink(missing_ok=True)
        from ..fileio import disk_full_error, is_disk_full
        if is_disk_full(e):
            raise disk_full_error(dst, None, "the previous figure is kept" if dst.exists() else "nothing was written"
                                  ) from None
        raise
    finally:
        plt.close(fig)
    return dst
