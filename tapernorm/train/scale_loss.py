"""The fixed-target scale loss (the explicit output-scale anchor) and its target EMA.

    s(h)   = sqrt(mean_i h_i^2)            per-token RMS of the pre-logit residual (RMS models)
           = sqrt(mean_i (h_i - mu)^2)     per-token standard deviation (LayerNorm models)
    L_aux  = lambda * E_{b,t}[(s(h_bt) - s_tgt)^2]     over non-padding tokens   (form "paper", Eq. 5)
           = lambda * E_{b,t}[(s(h_bt) / s_tgt - 1)^2]   unit-free                 (form "relative")
    s_tgt  = m_n / (1 - (1 - beta)^n),  m_n = (1 - beta) m_{n-1} + beta * mean_batch s   (warmup only)

d s / d h = h / (d * s) (RMS), so the radial component <dL_aux/dh, h> = 2 lambda (s - s_tgt) s / N has
the sign of s - s_tgt: a restoring force (paper Proposition 4.3).

The relative form is the paper's divided by s_tgt^2: the same restoring direction, but lambda no longer
carries the units of s^2, so one lambda means the same pull whatever the activation scale (s_tgt ~ 0.15 at
init_std 0.02 makes the paper's lambda ~44x weaker than the relative one). benchmarks/quality.py sweeps both.
"""
from __future__ import annotations

import torch

from .config import SCALE_FORMS

__all__ = ["scale_stat", "scale_loss", "ScaleTarget", "SCALE_FORMS"]

_EPS = 1e-12  # keeps d s / d h finite at h == 0; far below any real activation scale


def scale_stat(h: torch.Tensor, centered: bool = False) -> torch.Tensor:
    """s(h) per token: (..., d) -> (...); RMS, or the standard deviation if centered (LN models)."""
    hf = h.float() if h.dtype in (torch.float16, torch.bfloat16) else h  # at least fp32
    if centered:
        hf = hf - hf.mean(-1, keepdim=True)
    return torch.sqrt(hf.pow(2).mean(-1) + _EPS)


def scale_loss(h: torch.Tensor, s_tgt: float, lam: float, centered: bool = False,
               mask: torch.Tensor | None = None, form: str = "paper") -> torch.Tensor:
    """lambda * mean over non-padding tokens of (s(h) - s_tgt)^2 ("paper") or (s(h) / s_tgt - 1)^2
    ("relative"); h (B, T, d), mask (B, T) of 0/1."""
    if form == "paper":
        dev = (scale_stat(h, centered) - s_tgt).pow(2)  # (B, T)
    elif form == "relative":
        if not s_tgt > 0:
            raise ValueError(f"relative scale loss needs a positive target, got s_tgt={s_tgt}")
        dev = (scale_stat(h, centered) / s_tgt - 1.0).pow(2)  # (B, T)
    else:
        raise ValueError(f"scale-loss form {form!r} is not one of {SCALE_FORMS}")
    if mask is None:
        return lam * dev.mean()
    m = mask.to(dev.dtype)
    return lam * (dev * m).sum() / m.sum().clamp_min(1.0)


class ScaleTarget:
    """Bias-corrected EMA of the batch-mean s during warmup; frozen at the taper start."""

    def __init__(self, beta: float = 0.1):
        if not 0.0 < beta <= 1.0:
            raise ValueError(f"scale-target EMA weight {beta} must be in (0, 1]")
        self.beta, self.m, self.n, self.frozen = float(beta), 0.0, 0, None

    def update(self, batch_mean_s: float) -> None:
        """m <- (1 - beta) m + beta * s_batch (refused once frozen)."""
        if self.frozen is not None:
            raise ValueError("the scale target is frozen; it is only updated during warmup")
        self.m = (1.0 - self.beta) * self.m + self.beta * float(batch_mean_s)
        self.n += 1

    def value(self) -> float:
        """The frozen target, else the bias-corrected EMA m / (1 - (1 - beta)^n)."""
        if self.frozen is not None:
            return self.frozen
        if self.n == 0:
            raise ValueError("the scale target has seen no batches; run at least one warmup step")
        return self.m / (1.0 - (1.0 - self.beta) ** self.n)

    def freeze(self) -> float:
        """Fix s_tgt at its current bias-corrected value."""
        self.frozen = self.value()
        return self.frozen

    def state_dict(self) -> dict:
        """JSON-ready state (floats are repr-exact in JSON)."""
        return {"beta": self.beta, "m": self.m, "n": self.n, "frozen": self.frozen}

    def load_state_dict(self, d: dict) -> None:
        """Restore from state_dict()."""
        self.beta, self.m, self.n, self.frozen = float(d["beta"]), float(d["m"]), int(d["n"]), d["frozen"]
