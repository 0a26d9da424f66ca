"""TaperNorm for gated RMSNorms (Qwen3-Next, Qwen3.5, Kimi-Linear, OLMo-hybrid): RMSNorm(x) * w * act(gate).

    TaperNormGated(x, gate; g) = TaperNorm(x; g) * act(gate)          act = silu or sigmoid

The norm acts before the gate ("norm before gate"), so calibration reads x exactly as TaperNorm does.
At g == 0 the layer computes (x * act(gate)) * s: the gate product is the child `gating` (a TaperGate),
outside the map, so the passes see the plain per-feature map x' * s and fold s into the linear after it.
"""
from __future__ import annotations

import functools

import torch
import torch.nn as nn
import torch.nn.functional as F

from .layers import TaperNorm

__all__ = ["TaperNormGated", "TaperGate", "plan_gated"]

_ACTS = {"silu": F.silu, "sigmoid": torch.sigmoid}


class TaperGate(nn.Module):
    """x * act(gate), computed in float32 and cast back to x's dtype (as the HF gated norms do)."""

    def __init__(self, act: str = "silu"):
        super().__init__()
        if act not in _ACTS:
            raise ValueError(f"gate activation {act!r} is not one of {sorted(_ACTS)}")
        self.act = act

    def forward(self, x: torch.Tensor, gate: torch.Tensor) -> torch.Tensor:  # x, gate: (..., d)
        return (x.float() * _ACTS[self.act](gate.float())).to(x.dtype)

    def extra_repr(self) -> str:
        return self.act


class TaperNormGated(TaperNorm):
    """A gated RMSNorm that tapers to (x * act(gate)) * (c * gamma_t); see the module docstring."""

    def __init__(self, dim: int, eps: float = 1e-6, beta_ema: float = 0.1, act: str = "silu"):
        super().__init__(dim, eps, beta_ema)
        self.gating = TaperGate(act)

    def forward(self, x: torch.Tensor, gate: torch.Tensor) -> torch.Tensor:  # x, gate: (..., d)
        if self.gate == 0.0:  # no statistic; the gate product stays outside the map
            return super().forward(self.gating(x, gate))
        return self.gating(super().forward(x), gate)


def plan_gated(name: str, m: nn.Module, build, probe, tol: float):
    """A TaperNormGated equal to gated norm `m` on probe inputs, trying silu / sigmoid and w / (1 + w) gains.

    `build(cls, offset)` makes a candidate holding m's gain, `probe(new)` returns its relative diff to m.
    Returns (layer or None, smallest diff).
    """
    best = float("inf")
    for act in ("silu", "sigmoid"):
        for offset in (0.0, 1.0):
            new = build(functools.partial(TaperNormGated, act=act), offset)
            diff = probe(new)
            if diff <= tol:
                return new, diff
            best = min(best, diff)
    return None, best
