"""An auxiliary loss that pulls each tapered norm's input RMS, per token, toward its calibrated scale.

At gate 0 a TaperNorm is the fixed map x * c * gamma_t: right for a token whose RMS r(h) is 1 / c, off by the
factor r(h) * c for any other token. Real checkpoints carry a few tokens (attention sinks, usually position 0)
whose residual RMS is ~100x the rest (docs/real_checkpoints.md); at gate 0 they reach the next attention / MLP
~100x too large and the residual overflows. This loss asks every token to sit near the calibrated scale:

    L_rms = lambda * mean over calibrated tapered norms l, tokens t of (log(r(h_lt) * c_l))^2

Unit-free (one lambda for every layer whatever its scale) and symmetric in over- and undershoot. With a hinge
H > 1 it is one-sided and only outliers pay: (max(0, log(r(h_lt) * c_l) - log H))^2, tokens more than H times
the calibrated scale. Those are what overflow at gate 0 (a token at 10x reaches a quadratic MLP 10x too large);
tokens below it only shrink, so the hinge leaves the ordinary spread, and the CE, alone. It is zero
before calibration (no c yet) and adds no module to the model: the gate-0 model folds exactly as without it.
"""
from __future__ import annotations

import math

import torch
import torch.nn as nn

from ..layers import TaperLayerNorm, taper_layers

__all__ = ["NormRmsLoss", "add_rms_loss"]


class NormRmsLoss:
    """Forward pre-hooks on every TaperNorm of `model` that record its input while training; `loss()` is L_rms
    over the last forward. `skip_positions` leaves each sequence's first positions out (as calibration may)."""

    def __init__(self, model: nn.Module, lam: float, skip_positions: int = 0, hinge: float = 0.0):
        if not lam >= 0:
            raise ValueError(f"rms-loss lambda must be >= 0, got {lam}")
        if not (hinge == 0 or hinge >= 1):
            raise ValueError(f"rms-loss hinge must be 0 (off) or >= 1 (a factor over the calibrated scale), got {hinge}")
        self.lam, self.skip = float(lam), int(skip_positions)
        self.log_hinge = math.log(hinge) if hinge else None
        self._seen: list[tuple[torch.Tensor, torch.Tensor, bool, int]] = []  # (input, c, centered, token_dim)
        self._hooks = [m.register_forward_pre_hook(self._record) for _, m in taper_layers(model)] if lam > 0 else []
        self.log: list[float] = []

    def _record(self, m, inp) -> None:
        if m.training and m.calibrated:
            self._seen.append((inp[0], m.c, isinstance(m, TaperLayerNorm), getattr(m, "token_dim", 1)))

    def clear(self) -> None:
        """Forget the recorded inputs (call before each forward)."""
        self._seen.clear()

    def loss(self) -> torch.Tensor | None:
        """L_rms over the inputs recorded since clear(); None when nothing calibrated was recorded."""
        if not self._seen:
            return None
        terms = []
        for x, c, centered, tdim in self._seen:  # x (B, T, d); per head (B, T, H, d), (B, H, T, d) (token_dim 2)
            xf = x.float()
            if self.skip and xf.dim() >= 3:
                xf = xf[(slice(None),) * tdim + (slice(self.skip, None),)]  # positions on the layer's token axis
            if centered:
                xf = xf - xf.mean(-1, keepdim=True)
            log_r = 0.5 * torch.log(xf.pow(2).mean(-1) + 1e-12)  # (B, T)
            dev = log_r + torch.log(c.float())  # log(r * c) (B, T)
            if self.log_hinge is not None:
                dev = torch.relu(dev - self.log_hinge)
            terms.append(dev.pow(2).mean())
        self._seen.clear()
        out = self.lam * torch.stack(terms).mean()
        self.log.append(float(out.detach()))
        return out

    def remove(self) -> None:
        """Drop the hooks."""
        for h in self._hooks:
            h.remove()
        self._hooks = []


def add_rms_loss(out, rms: NormRmsLoss, return_outputs: bool, accumulation: int = 1):
    """A Trainer.compute_loss result with L_rms (divided by the accumulation steps, like the CE) added."""
    extra = rms.loss()
    if extra is None:
        return out
    extra = extra / accumulation
    return (out[0] + extra, *out[1:]) if return_outputs else out + extra
