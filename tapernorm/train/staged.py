"""A per-layer (staged) taper schedule beside the paper's single global gate.

The paper tapers every norm with one gate. FakeLN removes norms one layer at a time, so the model adapts to each
removal before the next. Here the blocks' norms taper in `order` ("first": block 0 first; "last": the last block
first), each by its own cosine over a window of `window` x the taper span; the windows' starts are spaced evenly
so the first starts at t0 + hold and the last ends at t1. With hold > 0 the gate stays 1 for `hold` steps after
calibration (the RMS loss, rms_loss.py, already acts there). From t1 on every gate is exactly 0, so the model is
the same gate-0 model the global schedule gives and folds the same way.

    gate_l(t) = cosine from 1 at a_l to 0 at a_l + w,   a_l = t0 + hold + rank_l * (t1 - t0 - hold - w) / (L - 1)
"""
from __future__ import annotations

import math
import re

import torch.nn as nn

from ..layers import taper_layers
from .schedule import TaperSchedule

__all__ = ["StagedGates", "block_index"]

_BLOCK = re.compile(r"\.(\d+)\.")


def block_index(name: str) -> int | None:
    """The block number in a qualified module name (model.layers.7.input_layernorm -> 7); None outside blocks."""
    m = _BLOCK.search("." + name + ".")
    return int(m.group(1)) if m else None


class StagedGates:
    """Per-layer gates for a TaperSchedule: `gates(model, t)` -> {layer name: gate}; `apply(model, t)` sets them."""

    def __init__(self, schedule: TaperSchedule, order: str = "first", window: float = 0.3, hold: int = 0):
        if order not in ("first", "last", "global"):
            raise ValueError(f"staged order {order!r} is not one of first, last, global")
        if not 0.0 < window <= 1.0:
            raise ValueError(f"staged window {window} must be in (0, 1]: a fraction of the taper span")
        span = schedule.taper_end - schedule.taper_start
        if not 0 <= hold <= span:
            raise ValueError(f"taper hold {hold} must be in [0, taper span {span}]; lower --taper-hold")
        self.schedule, self.order, self.window, self.hold = schedule, order, float(window), int(hold)

    def windows(self, names: list[str]) -> dict[str, tuple[float, float]]:
        """(start, end) of each layer's cosine; layers outside blocks (a final norm) go with the last stage."""
        s = self.schedule
        a0, t1 = s.taper_start + self.hold, s.taper_end
        blocks = sorted({b for b in map(block_index, names) if b is not None})
        if self.order == "global" or len(blocks) < 2:
            return {n: (a0, t1) for n in names}
        w = max(1.0, self.window * (t1 - a0))
        ranks = {b: (i if self.order == "first" else len(blocks) - 1 - i) for i, b in enumerate(blocks)}
        step = (t1 - a0 - w) / (len(blocks) - 1)
        out = {}
        for n in names:
            b = block_index(n)
            r = ranks[b] if b is not None else len(blocks) - 1
            out[n] = (a0 + r * step, a0 + r * step + w)
        return out

    def gates(self, model: nn.Module, t: int) -> dict[str, float]:
        """The gate of every TaperNorm of `model` at step t (exactly 0 from the taper end on)."""
        names = [n for n, _ in taper_layers(model)]
        if t >= self.schedule.taper_end:
            return {n: 0.0 for n in names}
        if t < self.schedule.taper_start:
            return {n: 1.0 for n in names}
        return {n: _cos_gate(t, a, b) for n, (a, b) in self.windows(names).items()}

    def apply(self, model: nn.Module, t: int) -> float:
        """Set every layer's gate for step t; returns the mean gate (for logs)."""
        g = self.gates(model, t)
        for n, m in taper_layers(model):
            m.set_gate(g[n])
        return sum(g.values()) / max(1, len(g))


def _cos_gate(t: float, a: float, b: float) -> float:
    if t < a:
        return 1.0
    if t >= b:
        return 0.0
    return 0.5 * (1.0 + math.cos(math.pi * (t - a) / (b - a)))
