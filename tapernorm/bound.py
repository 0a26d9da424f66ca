"""A bounded gate-0 map: the remedy for tapering the norms in front of gated MLPs on real checkpoints.

At gate 0 a TaperNorm is the linear map x * c * gamma_t. In front of a gated MLP (SwiGLU / GeGLU), whose output
grows with the square of its input, one outlier token's residual then about squares per layer and overflows
(docs/real_checkpoints.md, sections 7-8). A layer with a bound B > 0 uses instead

    F(h_t) = B * tanh(u_t / B) * gamma_t,      u_t = h_t * c * p_t      (p_t: position 0's c0 / c, else 1)

an elementwise soft clip of the normalized value u. For |u| << B it is the linear map (tanh(z) = z - z^3/3 + ...:
at |u| = B / 4 the map is 2% below linear); no entry of F exceeds B * |gamma_t|, so the MLP's input is bounded
whatever the residual. No per-token statistic is computed: two elementwise ops (a Mul and a Tanh) replace the
norm's reduction. The per-feature factor B * gamma_t still folds exactly into the consumer linears:

    W (B tanh(u / B) * gamma_t) = (W diag(B gamma_t)) tanh(u / B),

so the folded graph keeps Mul(h, c p / B) -> Tanh in front of the folded weights (compiler/lean). At gate 1 the
layer is the norm exactly, whatever B; in between it blends the norm with F as the unbounded layer does.
"""
from __future__ import annotations

import re

import torch
import torch.nn as nn

from .pos0 import pos0_factor

__all__ = ["bounded_map", "set_bound", "set_bound_rms", "bound_prescale", "bound_json"]


def bounded_map(layer, x: torch.Tensor) -> torch.Tensor:
    """B * tanh(x * c * p / B) * gamma_t for `layer` (a TaperNorm / TaperLayerNorm with bound B > 0), x (..., d)."""
    b = layer.bound.to(x.dtype)
    u = x * (layer.c / layer.bound).to(x.dtype)  # (..., d) = x * c / B
    if layer.has_pos0:
        u = u * pos0_factor(layer, x)
    return torch.tanh(u) * (b * layer.weight_t.to(x.dtype))


def bound_prescale(layer) -> torch.Tensor:
    """c / B as the float32 value the layer's forward multiplies by (computed in the buffers' dtype): the Mul in
    front of the Tanh in the folded graph (times p on position-0 rows); shape () or (d,) for a per-feature bound."""
    return (layer.c / layer.bound).detach().to(torch.float32)


def bound_json(t: torch.Tensor) -> float | dict:
    """A bound (or its prescale) for a JSON report: the float of a scalar; {"features", "min", "max"} per feature."""
    t = t.detach().to(torch.float64)
    if t.dim() == 0:
        return float(t)
    return {"features": int(t.numel()), "min": float(t.min()), "max": float(t.max())}


@torch.no_grad()
def set_bound(model: nn.Module, bound: float, pattern: str) -> list[str]:
    """Give every TaperNorm whose qualified name matches `pattern` (re.search) the bound B (0: none); returns the
    names set. Raises TaperError for a negative or non-finite B, or when no TaperNorm matches."""
    from .layers import TaperError
    b = float(bound)
    if not (b >= 0.0) or b == float("inf"):
        raise TaperError(f"bound {bound!r} is not a finite number >= 0; pass e.g. 32 (0 turns it off)")
    layers = _matching(model, pattern)
    for _, m in layers:
        m.bound = torch.full((), b, dtype=m.bound.dtype, device=m.bound.device)
        m.has_bound = b > 0
    return [n for n, _ in layers]


def set_bound_rms(model: nn.Module, k: float, pattern: str) -> list[str]:
    """A per-feature bound for every uncalibrated TaperNorm matching `pattern`: at calibration's end each feature i
    gets B_i = k * RMS(u_i), the RMS of its normalized value u = x c over the calibration tokens (sink positions
    left out as c's calibration leaves them). A feature in its ordinary range stays in tanh's linear part
    (k = 4: 2% below linear at one RMS), an outlier feature of an outlier token is squashed. Returns the names."""
    from .layers import TaperError
    kf = float(k)
    if not (kf > 0.0) or kf == float("inf"):
        raise TaperError(f"per-feature bound factor {k!r} is not a finite number > 0; pass e.g. 4")
    layers = _matching(model, pattern)
    late = [n for n, m in layers if m.calibrated]
    if late:
        raise TaperError(f"{late[0]} is already calibrated; a per-feature bound is measured during calibration, so "
                         "set it before the taper starts")
    for _, m in layers:
        m.bound_rms = kf
    return [n for n, _ in layers]


def _matching(model: nn.Module, pattern: str) -> list[tuple[str, nn.Module]]:
    """The (name, TaperNorm) pairs whose name matches `pattern` (re.search); TaperError when none does."""
    from .layers import TaperError, taper_layers
    layers = [(n, m) for n, m in taper_layers(model) if re.search(pattern, n)]
    if not layers:
        raise TaperError(f"no TaperNorm matches {pattern!r}; the bound applies to tapered norms (check --keep-norms)")
    return layers
