"""Position 0's own scale (c0, tapernorm/pos0.py) in the fx passes: pattern -> check -> rewrite.

A gate-0 TaperNorm with c0 (`has_pos0`) computes, per token t,

    RMS:  F(h_t) = h_t * s * p_t                               s = c * gamma_t
    LN:   F(h_t) = (h_t - mean h_t) * s * p_t + beta_t          p_t = c0 / c if position(t) == 0 else 1

p_t is one scalar per token, so it commutes with every per-feature and per-row linear map:

    forward fold   (p x) W'^T + b'  = F(x) W^T + b    for W' = W diag(s) (LN: then C), b' = b (+ W beta_t):
                   the Mul by p goes on the linear's INPUT, so a consumer bias (b, or the created W beta_t) is
                   never scaled by p: exact with any bias.
    backward fold  RMS post-norm on y = x W^T + b:  (x W'^T + b') * p  with W' = diag(s) W, b' = s * b: exact.
                   LN post-norm: (y - mean y) * s * p + beta_t; the rows fold gives b' = s (b - mean b) + beta_t,
                   and the Mul by p after it would scale beta_t too: NOT exact, refused (keeps the explicit map).

So the passes keep one Mul by p (B, T, 1) per site and fold s (and beta_t) exactly as without c0:

    RMS:  y = x * s; out = y * p         (p on the map's output: a per-token factor the forward fold passes
                                          through, and the backward fold leaves after the producer linear)
    LN:   xp = x * p; out = (xp - mean xp) * s + beta_t      (p on the map's input, before the shift)

p = where(rows, c0 / c, 1).unsqueeze(-1), computed in float32 and cast to x's dtype exactly as the layer's
`pos0_factor` does, its tokens on the layer's token axis (`token_dim`, tapernorm/pos0.py). Per-head norms get one
more axis: Qwen3's q_norm / k_norm on q_proj(x).view(B, T, H, d) (token_dim 1) p (B, T, 1, 1); Gemma 3's on
q_proj(x).view(B, T, H, d).transpose(1, 2) = (B, H, T, d) (token_dim 2) p (B, 1, T, 1). Either way they fold
backward into the projection's rows as without c0 (RMS: exact, the Mul by p stays between the projection's view
and RoPE). Other layouts are refused with the layer's name: inputs of rank 5 or more, and a 4-D input whose token
axis does not hold the position mask's tokens (a token_dim that does not match how the model calls the norm).
`rows` (B, T) / (1, T) bool is the position-0 mask the model's pre-hook (pos0.track_positions) computed from
position_ids (one node shared by every layer), or, for a site traced without it, arange(T) == 0.
"""
from __future__ import annotations

import torch
import torch.fx as fx

from tapernorm.pos0 import pos0_ratio, token_axis

from .graph_utils import register_tensor

aten = torch.ops.aten

__all__ = ["pos0_ratio_value", "pos0_problem", "pos0_factor_node", "is_pos0_rows", "scope_above"]


def pos0_ratio_value(module) -> torch.Tensor:
    """c0 / c of a layer as the float32 scalar its forward uses (computed in the buffers' dtype, then float32)."""
    return pos0_ratio(module).detach().to(torch.float32).reshape(())


def is_pos0_rows(node: fx.Node) -> bool:
    """True if `node` is a bool tensor (the position-0 mask a c0 layer reads from outside its scope)."""
    v = node.meta.get("val")
    return isinstance(v, torch.Tensor) and v.dtype == torch.bool and v.dim() in (1, 2)


def pos0_problem(site) -> str | None:
    """Why a c0 site's traced call is not the gate-0 form with one position-0 factor, or None if it is."""
    wheres = [n for n in site.nodes if n.target in (aten.where.self, aten.where.ScalarOther, aten.where.ScalarSelf)]
    if len(wheres) != 1:
        return f"traced call has {len(wheres)} where ops; a c0 layer at gate 0 has exactly one (its position-0 factor)"
    xv = site.input.meta.get("val") if site.input is not None else None
    if not isinstance(xv, torch.Tensor) or xv.dim() not in (2, 3, 4):
        return (f"input of shape {tuple(getattr(xv, 'shape', ()))} is not (B, T, d), (T, d) or, per head, "
                "(B, T, H, d) / (B, H, T, d); position 0's own scale needs one token axis before the features")
    tdim = int(getattr(site.module, "token_dim", 1)) if xv.dim() >= 3 else 0
    if not 0 <= tdim <= xv.dim() - 2:
        return f"token_dim {tdim} does not fit the input of shape {tuple(xv.shape)}"
    rv = site.rows.meta.get("val") if site.rows is not None else None
    if xv.dim() == 4 and isinstance(rv, torch.Tensor) and str(rv.shape[-1]) != str(xv.shape[tdim]):
        return (f"per-head input of shape {tuple(xv.shape)} does not have the position mask's {rv.shape[-1]} tokens "
                f"on its token_dim {tdim}; position 0's own scale needs (B, T, H, d) with token_dim 1 or "
                "(B, H, T, d) with token_dim 2 (set by taperize from the model family)")
    if float(site.module.c0) <= 0 or float(site.module.c) <= 0:
        return f"c0 {float(site.module.c0):g} / c {float(site.module.c):g} is not a positive ratio"
    return None


def scope_above(node: fx.Node, like: fx.Node, val=None) -> fx.Node:
    """Give a new node `like`'s source location, in the scope ABOVE the norm (so it is not part of the site)."""
    stack = dict(like.meta.get("nn_module_stack") or {})
    if stack:
        stack.pop(list(stack)[-1])
    node.meta["nn_module_stack"] = stack
    for k in ("stack_trace", "source_fn_stack"):
        if k in like.meta:
            node.meta[k] = like.meta[k]
    if val is not None:
        node.meta["val"] = val
    return node


def _fake(x_val):
    """The fake mode of x's example value (None when the graph carries plain tensors)."""
    from torch._guards import detect_fake_mode
    return detect_fake_mode([x_val])


def _unsq(val, v, dim: int = -1):
    """The example value of v.unsqueeze(dim) (None without one)."""
    return val(lambda: v.unsqueeze(dim)) if v is not None else None


def pos0_factor_node(gm: fx.GraphModule, site, rows: fx.Node | None, x: fx.Node, like: fx.Node) -> fx.Node:
    """Insert p = where(rows, c0 / c, 1), unsqueezed to broadcast over x (x's dtype; (B, T, 1), (T, 1), per head
    (B, T, 1, 1) for x (B, T, H, d) or (B, 1, T, 1) for x (B, H, T, d), token_dim 2) before `like`; returns it.
    `rows` None: arange(T) == 0 over x's token axis (a full-sequence call from position 0)."""
    xv = x.meta["val"]
    g, mode = gm.graph, _fake(xv)
    tdim = token_axis(site.module, xv.dim())  # as tapernorm/pos0.py's pos0_factor: the layer's token_dim
    ratio = pos0_ratio_value(site.module)
    name = register_tensor(gm, site.path + ".pos0_ratio", ratio, parameter=False)

    def val(fn):
        if mode is None:
            return None
        with mode:
            return fn()

    given = rows is not None  # the model's (B, T) / (1, T) mask; else arange(T) == 0 (T,)
    with g.inserting_before(like):
        if rows is None:
            T = xv.shape[tdim]
            if isinstance(T, torch.SymInt):
                T = scope_above(g.call_function(aten.sym_size.int, (x, tdim)), like, T)
            ar = scope_above(g.call_function(aten.arange.default, (T,), {"device": xv.device}), like,
                       val(lambda: torch.arange(xv.shape[tdim], device=xv.device)))
            rows = scope_above(g.call_function(aten.eq.Scalar, (ar, 0)), like, val(lambda: ar.meta["val"] == 0))
        r = scope_above(g.get_attr(name), like)
        rv = rows.meta.get("val")
        rows_2d = rv.dim() == 2 if rv is not None else given
        r_fake = val(lambda: mode.from_tensor(ratio)) if mode is not None else ratio
        w = scope_above(g.call_function(aten.where.ScalarOther, (rows, r, 1.0)), like,
                  val(lambda: torch.where(rv, r_fake, 1.0)) if rv is not None else None)
        p = w
        for _ in range(tdim - 1 if rows_2d else 0):  # heads before tokens: (B, 1, T)
            p = scope_above(g.call_function(aten.unsqueeze.default, (p, 1)), like, _unsq(val, p.meta.get("val"), 1))
        for _ in range(xv.dim() - 1 - tdim):  # (B, T, 1); per head (B, T, 1, 1) or (B, 1, T, 1)
            p = scope_above(g.call_function(aten.unsqueeze.default, (p, -1)), like, _unsq(val, p.meta.get("val")))
        if xv.dtype != torch.float32:
            p = scope_above(g.call_function(aten._to_copy.default, (p,), {"dtype": xv.dtype}), like,
                      val(lambda: p.meta["val"].to(xv.dtype)) if p.meta.get("val") is not None else None)
    return p
