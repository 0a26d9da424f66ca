"""Gate and learning-rate schedules (pure functions of the step index).

Steps are numbered t = 0, 1, ..., T - 1; the value for step t is the one used by the forward /
optimizer update of step t. With the default taper end t1 = T - 1 the last update is taken at a gate
of exactly 0.0, so the trained model is at gate 0 and foldable.

    gate(t) = 1                                          t <  t0          (hold; calibration window)
            = 0.5 * (1 + cos(pi * (t - t0) / (t1 - t0)))  t0 <= t < t1     (cosine taper)
            = 0.0                                        t >= t1          (exactly zero)

    lr(t)   = lr_max * (t + 1) / W                        t <  W           (linear warmup)
            = lr_max * 0.5 * (1 + cos(pi * (t - W) / (T - W)))   t >= W    (cosine to zero at T)
"""
from __future__ import annotations

import math
from dataclasses import dataclass

__all__ = ["warmup_steps", "gate_at", "lr_at", "TaperSchedule", "resolve_schedule"]


def warmup_steps(total_steps: int, warmup_frac: float = 0.05) -> int:
    """W = max(1, round(warmup_frac * T)): the number of LR-warmup steps (at least one)."""
    if total_steps <= 0:
        raise ValueError(f"total steps must be positive, got {total_steps}")
    if not 0.0 <= warmup_frac < 1.0:
        raise ValueError(f"warmup fraction {warmup_frac} is outside [0, 1); pass e.g. 0.05")
    return max(1, int(round(warmup_frac * total_steps)))


def gate_at(step: int, taper_start: int, taper_end: int) -> float:
    """Gate for step t: 1 before t0, cosine 0.5 * (1 + cos(pi (t - t0) / (t1 - t0))) on [t0, t1), exactly 0.0 from t1."""
    if taper_end < taper_start:
        raise ValueError(f"taper end {taper_end} is before taper start {taper_start}")
    if step >= taper_end:
        return 0.0
    if step < taper_start:
        return 1.0
    frac = (step - taper_start) / (taper_end - taper_start)
    return 0.5 * (1.0 + math.cos(math.pi * frac))


def lr_at(step: int, lr_max: float, warmup: int, total_steps: int) -> float:
    """LR for step t: lr_max * (t + 1) / W during warmup, then lr_max * 0.5 * (1 + cos(pi (t - W) / (T - W)))."""
    if step < warmup:
        return lr_max * (step + 1) / warmup
    span = max(1, total_steps - warmup)
    frac = min(1.0, (step - warmup) / span)
    return lr_max * 0.5 * (1.0 + math.cos(math.pi * frac))


@dataclass(frozen=True)
class TaperSchedule:
    """Resolved schedule: T total steps, W warmup steps, taper from t0 to t1."""
    total_steps: int
    warmup: int
    taper_start: int
    taper_end: int

    def gate(self, step: int) -> float:
        """Gate used at `step` (see module docstring)."""
        return gate_at(step, self.taper_start, self.taper_end)

    def lr(self, step: int, lr_max: float) -> float:
        """Learning rate used at `step`."""
        return lr_at(step, lr_max, self.warmup, self.total_steps)

    def final_gate(self) -> float:
        """Gate of the model after the last step (the gate as trained)."""
        return self.gate(self.total_steps)


def resolve_schedule(total_steps: int, warmup_frac: float = 0.05, warmup: int | None = None,
                     taper_start: int | None = None, taper_end: int | None = None) -> TaperSchedule:
    """Fill defaults (W from warmup_frac, t0 = W, t1 = T - 1) and check 1 <= t0 <= t1 <= T."""
    W = warmup if warmup is not None else warmup_steps(total_steps, warmup_frac)
    if not 0 <= W < total_steps:
        raise ValueError(f"warmup steps {W} must be in [0, total steps {total_steps}); lower --warmup-steps")
    t0 = W if taper_start is None else int(taper_start)
    t1 = total_steps - 1 if taper_end is None else int(taper_end)
    if t0 < 1:
        raise ValueError(f"taper start {t0} must be >= 1: calibration needs at least one step at gate 1")
    if not t0 <= t1 <= total_steps:
        raise ValueError(f"need taper start {t0} <= taper end {t1} <= total steps {total_steps}; "
                         "fix --taper-start / --taper-end")
    return TaperSchedule(total_steps, W, t0, t1)
