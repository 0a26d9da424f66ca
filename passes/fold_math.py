"""Pure weight math for folding a gate-zero TaperNorm into the linears that consume it.

No graph code here (compare torch/nn/utils/fusion.py). Convention: a linear is y = x W^T + b with
W of shape (out, in); HF GPT-2's Conv1D stores W^T, shape (in, out) ("in_out" layout).

Gate-zero maps, per token x in R^d, with s = c * gamma_t:

    RMS:  n(x) = x * s
    LN:   n(x) = (x - mean(x)) * s + beta_t = C x * s + beta_t,   C = I - 1 1^T / d

Folding n into y = n(x) W^T + b:

    RMS:  W' = W diag(s)                = W * s[None, :]
          b' = b
    LN:   M  = W diag(s)
          W' = M C = M - M.mean(dim=1, keepdim=True)     (row-mean subtraction)
          b' = b + W beta_t                               (a bias is created when b is None)

so that y = x W'^T + b' exactly (in exact arithmetic). All arithmetic runs in float64 and the
results are cast back to the stored dtype of W (fp32, fp16, bf16).
"""
from __future__ import annotations

import torch

__all__ = ["taper_map", "fold_linear", "fold_rms_linear", "fold_ln_linear", "apply_taper_map"]


@torch.no_grad()
def taper_map(layer) -> tuple[torch.Tensor, torch.Tensor | None]:
    """(s, beta_t) of a TaperNorm / TaperLayerNorm in float64: s = c * gamma_t; beta_t is None for RMS."""
    s = layer.c.detach().double() * layer.weight_t.detach().double()  # (d,)
    beta = getattr(layer, "bias_t", None)
    return s, (beta.detach().double() if beta is not None else None)


@torch.no_grad()
def apply_taper_map(x: torch.Tensor, s: torch.Tensor, beta: torch.Tensor | None = None) -> torch.Tensor:
    """Reference gate-zero map on x (..., d) in float64: x * s (RMS) or (x - mean(x)) * s + beta (LN)."""
    x = x.double()
    if beta is None:
        return x * s.double()
    return (x - x.mean(-1, keepdim=True)) * s.double() + beta.double()


@torch.no_grad()
def fold_rms_linear(weight: torch.Tensor, bias: torch.Tensor | None, s: torch.Tensor):
    """RMS fold: W' = W * s[None, :], b' = b. W is (out, in); returns (W', b') in W's / b's dtype."""
    return fold_linear(weight, bias, s, None)


@torch.no_grad()
def fold_ln_linear(weight: torch.Tensor, bias: torch.Tensor | None, s: torch.Tensor, beta: torch.Tensor):
    """LN fold: W' = M - M.mean(1, keepdim=True) with M = W * s[None, :]; b' = b + W @ beta."""
    return fold_linear(weight, bias, s, beta)


@torch.no_grad()
def fold_linear(weight: torch.Tensor, bias: torch.Tensor | None, s: torch.Tensor,
                beta: torch.Tensor | None = None, layout: str = "out_in"):
    """Fold the gate-zero map (s, beta) into a linear; layout "out_in" (nn.Linear) or "in_out" (Conv1D).

    Returns (W', b') with W' in `weight`'s dtype/layout/device and b' in `bias`'s dtype (or `weight`'s
    dtype when a bias is created for the LN shift). b' is `bias` itself (same object) when unchanged.
    """
    if layout not in ("out_in", "in_out"):
        raise ValueError(f"layout {layout!r} is not 'out_in' or 'in_out'")
    if weight.dim() != 2:
        raise ValueError(f"weight must be 2-D, got shape {tuple(weight.shape)}")
    w = weight.detach().double()
    if layout == "in_out":
        w = w.t()  # (out, in)
    d = w.shape[1]
    if s.shape != (d,):
        raise ValueError(f"scale s has shape {tuple(s.shape)}, the linear's input dim is {d}")
    m = w * s.to(w.device, torch.float64)[None, :]  # (out, in) = W diag(s)
    new_bias = bias
    if beta is not None:
        if beta.shape != (d,):
            raise ValueError(f"shift beta has shape {tuple(beta.shape)}, the linear's input dim is {d}")
        m = m - m.mean(dim=1, keepdim=True)  # M C: absorbs the centering
        shift = w @ beta.to(w.device, torch.float64)  # (out,) = W beta_t
        b64 = shift if bias is None else bias.detach().double() + shift
        new_bias = b64.to(bias.dtype if bias is not None else weight.dtype)
    if layout == "in_out":
        m = m.t()
    return m.contiguous().to(weight.dtype), new_bias
