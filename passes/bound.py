"""Bounded gate-0 maps (tapernorm/bound.py) in the fx passes: pattern -> check -> rewrite.

A gate-0 TaperNorm with a bound B > 0 computes, per token t,

    F(h_t) = tanh(h_t * a * p_t) * s'        a = c / B,  s' = B * gamma_t,  p_t = c0 / c at position 0 else 1

The tanh is elementwise and not linear, so it stays; the per-feature factor after it is a plain RMS map, which
folds exactly like an unbounded one:

    W F(h) + b = (W diag(s')) tanh(h * a * p) + b.

So the rewrite splits a site in two: a pre-map u = tanh(h * a [* p]) in the scope above the norm (it is not part
of the site, as position 0's factor is not), and the site proper y = u * s', which the fold pass folds forward
into the consumers. Backward folds are refused for bounded sites (the tanh sits between a producer and the map).
A bounded TaperLayerNorm is refused with its name: its centering comes before the tanh, and no fold has that
form yet.
"""
from __future__ import annotations

import torch
import torch.fx as fx

from tapernorm.bound import bound_json, bound_prescale

from .fold_math import taper_map
from .graph_utils import erase_site_nodes, register_tensor
from .pos0 import pos0_factor_node, scope_above

aten = torch.ops.aten

__all__ = ["is_bounded", "bound_problem", "materialize_bounded"]


def is_bounded(site) -> bool:
    """True if the site's layer tapers to the bounded map (bound > 0)."""
    return bool(getattr(site.module, "has_bound", False))


def bound_problem(site) -> str | None:
    """Why a bounded site's traced call is not the bounded gate-0 form, or None if it is."""
    if site.kind != "rms":
        return ("bounded LayerNorm map: its centering comes before the tanh, which no fold expresses yet; "
                "taper this norm without --taper-bound")
    tanhs = [n for n in site.nodes if n.target == aten.tanh.default]
    if len(tanhs) != 1:
        return f"traced call has {len(tanhs)} tanh ops; a bounded map at gate 0 has exactly one"
    b, d = site.module.bound, site.module.weight_t.shape[-1]
    if not (bool((b > 0).all()) and float(site.module.c) > 0):
        return f"bound {bound_json(b)} / c {float(site.module.c):g} is not a positive pair"
    if b.dim() > 1 or (b.dim() == 1 and b.shape[0] != d):
        return f"bound of shape {tuple(b.shape)} is neither one B nor one per feature ({d},)"
    return None


def _after(g: fx.Graph, prev: fx.Node, target, args, like: fx.Node, val) -> fx.Node:
    with g.inserting_after(prev):
        return scope_above(g.call_function(target, args), like, val)


def materialize_bounded(gm: fx.GraphModule, site) -> set[str]:
    """Rewrite an accepted bounded site: the pre-map tanh(x * a [* p]) above the norm, then the site y = u * s'.
    Updates site.input (the tanh), site.output / site.nodes (the Mul by s'); returns released attr names."""
    x, out = site.input, site.output
    xv, m, g = x.meta["val"], site.module, gm.graph
    a = bound_prescale(m).to(xv.dtype)  # () or (d,)
    a_name = register_tensor(gm, site.path + ".bound_prescale", a, parameter=False)
    s64, _ = taper_map(m)  # B * gamma_t for a bounded layer
    s_name = register_tensor(gm, site.path + ".taper_scale", s64.to(xv.dtype), parameter=False)
    with g.inserting_after(out):
        a_node = scope_above(g.get_attr(a_name), out)
    u = _after(g, a_node, aten.mul.Tensor, (x, a_node), out, xv)
    if site.pos0:  # p before the tanh: position 0's scale is part of the bounded argument
        p = pos0_factor_node(gm, site, site.rows, x, u)  # inserted before u, reads x only
        u = _after(g, u, aten.mul.Tensor, (u, p), out, xv)
    t = _after(g, u, aten.tanh.default, (u,), out, xv)
    with g.inserting_after(t):
        s_node = g.get_attr(s_name)
    with g.inserting_after(s_node):
        y = g.call_function(aten.mul.Tensor, (t, s_node))
    for k in ("nn_module_stack", "stack_trace", "source_fn_stack"):  # the site proper: in the norm's scope
        if k in out.meta:
            y.meta[k] = out.meta[k]
    y.meta["val"] = out.meta.get("val")
    out.replace_all_uses_with(y)
    released = erase_site_nodes(gm, site.nodes)
    site.nodes, site.input, site.output = [y], t, y
    return released
