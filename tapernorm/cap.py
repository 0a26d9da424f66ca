"""A training-only guard for the taper: cap each token's fixed-branch size while 0 < gate < 1.

During the taper a TaperNorm mixes g * h / r(h) * gamma with (1 - g) * F(h), F the fixed map. A token whose RMS
is K times the calibrated scale (r(h) * c = K; an attention-sink candidate in a real checkpoint) reaches the next
attention / MLP through F about K times too large, and one such token can overflow a whole forward pass long
before the model has learned to avoid it (docs/real_checkpoints.md). With a cap K the fixed branch becomes

    F_K(h) = F(h) * min(1, K / (r(h) * c_t)),   c_t = c0 at position 0 (pos0.py), c elsewhere,

and with `cap_anneal` K grows as the gate falls, K_g = K / g: 2 at gate 1, 20 at gate 0.1, 2e4 at 1e-4, so the cap
fades into gate 0 instead of vanishing there and the model sees (and learns from) ever larger tokens.

which uses r(h), already computed for the normalized branch. At gate 0 there is no r(h) and no cap: the gate-0
model is the plain fixed map, folds exactly, and `finetune`'s evaluation at gate 0 shows whether any token still
needed the cap. Each layer counts the tokens it capped (`cap_hits` / `cap_seen`) so the run can log how often
the guard acted; pair it with the RMS loss (rms_loss.py, hinge) that teaches the model not to need it.
"""
from __future__ import annotations

import torch

__all__ = ["cap_factor", "cap_rate", "set_cap"]


def cap_factor(layer, r_inv: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
    """min(1, K / (r * c_t)) of shape r_inv's (..., T, 1) for layer.taper_cap = K; counts the capped tokens."""
    from .pos0 import pos0_factor
    k = layer.taper_cap / max(layer.gate, 1e-12) if layer.cap_anneal else layer.taper_cap
    rc = layer.c.float() / r_inv  # (..., T, 1) = r(h) * c
    if layer.has_pos0:
        rc = rc * pos0_factor(layer, x).float()
    with torch.no_grad():  # a tensor sum: no device sync per norm; cap_rate reads it once per log line
        layer.cap_hits = layer.cap_hits + (rc > k).sum()
        layer.cap_seen += rc.numel()
    return (k / rc).clamp(max=1.0).to(x.dtype)


def set_cap(model: torch.nn.Module, k: float, anneal: bool = False) -> int:
    """Set the cap K (0: off; anneal: K / gate) on every TaperNorm of `model`; returns how many layers."""
    from .layers import taper_layers
    if not (k == 0 or k >= 1):
        raise ValueError(f"taper cap {k} must be 0 (off) or >= 1 (a factor over the calibrated scale)")
    layers = taper_layers(model)
    for _, m in layers:
        m.taper_cap, m.cap_anneal = float(k), bool(anneal)
    return len(layers)


def cap_rate(model: torch.nn.Module, reset: bool = True) -> float | None:
    """Fraction of token-norm evaluations capped since the last reset (None if nothing was seen)."""
    from .layers import taper_layers
    hits = seen = 0
    for _, m in taper_layers(model):
        hits, seen = hits + m.cap_hits, seen + m.cap_seen
        if reset:
            m.cap_hits = m.cap_seen = 0
    return int(hits) / seen if seen else None
