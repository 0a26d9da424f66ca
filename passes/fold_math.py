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

__all__ = ["taper_map", "fold_linear", "fold_rms_linear", "fold_ln_linear", "apply_taper_map", "fold_linear_rows",
           "fold_experts"]


@torch.no_grad()
def taper_map(layer) -> tuple[torch.Tensor, torch.Tensor | None]:
    """(s, beta_t) of a TaperNorm / TaperLayerNorm in float64: s = c * gamma_t; beta_t is None for RMS. For a
    bounded layer (tapernorm/bound.py) s = B * gamma_t, the per-feature factor after its tanh (passes/bound.py)."""
    k = layer.bound if getattr(layer, "has_bound", False) else layer.c
    s = k.detach().double() * layer.weight_t.detach().double()  # (d,)
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
    if weight.dim() == 3:  # stacked MoE experts: an RMS scale; any bias is left as it is
        if beta is not None:
            raise ValueError("an LN shift into stacked expert weights needs fold_experts (a per-expert shift)")
        return fold_experts(weight, s, None, layout)[0], bias
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


@torch.no_grad()
def fold_linear_rows(weight: torch.Tensor, bias: torch.Tensor | None, s: torch.Tensor,
                     beta: torch.Tensor | None, pos: torch.Tensor, group: torch.Tensor | None = None,
                     layout: str = "out_in"):
    """Fold a gate-zero map that acts on a linear's OUTPUT (a post-norm or QK-norm) into its rows.

    The map reads the linear's output features in groups of d = s.numel() (one per head, or all of
    them): output feature f sits at position pos[f] in [0, d) of group group[f]; pos[f] = -1 marks a
    feature the map does not read (left as is). With y = x W^T + b and, per group, row f:

        RMS:  y_f * s[pos_f]                          -> W'_f = s[pos_f] W_f,            b'_f = s[pos_f] b_f
        LN:   (y_f - mean_group(y)) * s[pos_f] + beta  -> W'_f = s[pos_f] (W_f - mean_g W), b'_f = s[pos_f] (b_f - mean_g b) + beta[pos_f]

    (mean_g over the d rows of f's group; `group` is needed for LN only). Float64 math, cast back
    to the stored dtypes; returns (W', b'), b' created for LN when `bias` is None.
    """
    if layout not in ("out_in", "in_out"):
        raise ValueError(f"layout {layout!r} is not 'out_in' or 'in_out'")
    w = weight.detach().double()
    if layout == "in_out":
        w = w.t()
    w = w.clone()  # (out, in)
    out, d = w.shape[0], s.numel()
    if pos.shape != (out,):
        raise ValueError(f"pos has shape {tuple(pos.shape)}, the linear has {out} outputs")
    rows = (pos >= 0).nonzero().squeeze(1)
    k = pos[rows].long()
    s = s.to(w.device, torch.float64)
    b = bias.detach().double().clone() if bias is not None else None
    if beta is None:
        w[rows] *= s[k, None]
        if b is not None:
            b[rows] *= s[k]
    else:
        if group is None:
            raise ValueError("an LN map needs the group of every output feature")
        gid = group[rows].long()
        n_groups = int(gid.max()) + 1 if rows.numel() else 0
        gmean = torch.zeros(n_groups, w.shape[1], dtype=torch.float64).index_add_(0, gid, w[rows]) / d
        b = b if b is not None else torch.zeros(out, dtype=torch.float64)
        bmean = torch.zeros(n_groups, dtype=torch.float64).index_add_(0, gid, b[rows]) / d
        w[rows] = s[k, None] * (w[rows] - gmean[gid])
        b[rows] = s[k] * (b[rows] - bmean[gid]) + beta.to(torch.float64)[k]
    if layout == "in_out":
        w = w.t()
    new_b = b.to(bias.dtype if bias is not None else weight.dtype) if b is not None else None
    return w.contiguous().to(weight.dtype), new_b


@torch.no_grad()
def fold_experts(weight: torch.Tensor, s: torch.Tensor, beta: torch.Tensor | None = None, layout: str = "out_in"):
    """Fold the map into stacked expert weights W (E, out, in) ("out_in") or (E, in, out) ("in_out").

    Every expert e reads the same map: W'_e = W_e diag(s) (LN: then C, the row-mean subtraction), and the
    LN shift becomes a per-expert output vector shift_e = W_e beta, returned as an (E, out) float64 table
    (None for RMS) for the caller to add to each expert's rows.
    """
    if weight.dim() != 3 or layout not in ("out_in", "in_out"):
        raise ValueError(f"expected stacked (E, ., .) expert weights and a layout, got {tuple(weight.shape)}, {layout!r}")
    w = weight.detach().double()
    if layout == "in_out":
        w = w.transpose(1, 2)  # (E, out, in)
    if w.shape[2] != s.numel():
        raise ValueError(f"scale s has {s.numel()} entries, the experts' input dim is {w.shape[2]}")
    m = w * s.to(w.device, torch.float64)[None, None, :]
    shift = None
    if beta is not None:
        m = m - m.mean(dim=2, keepdim=True)
        shift = w @ beta.to(w.device, torch.float64)  # (E, out)
    if layout == "in_out":
        m = m.transpose(1, 2)
    return m.contiguous().to(weight.dtype), shift
