"""Materialize pass: replace each gate-zero TaperNorm call with its explicit map, no statistic.

    RMS:  n = mul(x, s)
    LN:   n = add(mul(sub(x, mean(x, -1, keepdim)), s), beta_t)

s = c * gamma_t (and beta_t) are computed in float64 from the source module and stored as constants
in x's dtype. The result is the "unfused" graph the benchmark compares against; the fold pass then
pushes these maps into the consuming linears.

A layer with position 0's own scale c0 also gets one per-token factor p (B, T, 1) (passes/pos0.py): on the
map's output for RMS (out = (x * s) * p), on its input for LN (x * p, before the shift).
"""
from __future__ import annotations

import torch
import torch.fx as fx

from .bound import is_bounded, materialize_bounded
from .fold_math import taper_map
from .graph_utils import erase_site_nodes, register_tensor
from .match import TaperSite
from .pos0 import pos0_factor_node, scope_above

aten = torch.ops.aten

__all__ = ["materialize_site"]


def _new_node(graph: fx.Graph, target, args, like: fx.Node, val=None) -> fx.Node:
    n = graph.call_function(target, args)
    for k in ("nn_module_stack", "stack_trace", "source_fn_stack"):
        if k in like.meta:
            n.meta[k] = like.meta[k]
    if val is not None:
        n.meta["val"] = val
    return n


def materialize_site(gm: fx.GraphModule, site: TaperSite) -> set[str]:
    """Rewrite one (already accepted) site in place; updates site.nodes/output; returns released attr names."""
    if is_bounded(site):  # tanh(x * a [* p]) above the norm, then the site x * s' (passes/bound.py)
        return materialize_bounded(gm, site)
    x, out = site.input, site.output
    xv = x.meta["val"]
    s64, beta64 = taper_map(site.module)
    owner = site.path + "."
    s_name = register_tensor(gm, owner + "taper_scale", s64.to(xv.dtype), parameter=False)
    b_name = register_tensor(gm, owner + "taper_shift", beta64.to(xv.dtype), parameter=False) \
        if beta64 is not None else None
    g = gm.graph
    with g.inserting_after(out):
        s_node = g.get_attr(s_name)
    new = [s_node]
    if site.pos0 and site.kind == "ln":  # p on the map's input: before the shift (passes/pos0.py)
        p = pos0_factor_node(gm, site, site.rows, x, s_node)
        with g.inserting_before(s_node):
            x = site.input = scope_above(g.call_function(aten.mul.Tensor, (x, p)), out, xv)
    with g.inserting_after(s_node):
        if site.kind == "rms":
            y = _new_node(g, aten.mul.Tensor, (x, s_node), out, out.meta.get("val"))
            new.append(y)
        else:
            b_node = g.get_attr(b_name)
            with g.inserting_after(b_node):
                mean = _new_node(g, aten.mean.dim, (x, [-1], True), out)
                with g.inserting_after(mean):
                    cen = _new_node(g, aten.sub.Tensor, (x, mean), out, xv)
                with g.inserting_after(cen):
                    sc = _new_node(g, aten.mul.Tensor, (cen, s_node), out, xv)
                with g.inserting_after(sc):
                    y = _new_node(g, aten.add.Tensor, (sc, b_node), out, out.meta.get("val"))
            new += [b_node, mean, cen, sc, y]
    result = y
    if site.pos0 and site.kind == "rms":  # p on the map's output: outside the site, a per-token factor
        p = pos0_factor_node(gm, site, site.rows, x, y)
        with g.inserting_after(y):
            result = scope_above(g.call_function(aten.mul.Tensor, (y, p)), out, out.meta.get("val"))
    out.replace_all_uses_with(result)
    released = erase_site_nodes(gm, site.nodes)
    site.nodes = [n for n in new if n.op == "call_function"]
    site.output = y
    return released

