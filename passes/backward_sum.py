"""Backward fold of an RMS map whose input is a SUM of linear outputs (a post-norm after an MoE block).

FlexOlmo / AFMoE put a norm on the MoE's output: sum_e r_e(t) * expert_e(h_t) (+ a shared expert), gathered
back to token order. At gate 0 the map is a per-feature scale, and s * sum(...) = sum of (s * each term),
so s folds into the output rows of every expert / linear producing a term, as long as everything in
between only adds terms, gathers or reshapes rows, sums over token dims, or scales whole rows (routing
weights), and nothing else reads those values. RMS only: an LN shift would be added once per term.
"""
from __future__ import annotations

import torch
import torch.fx as fx

from .linears import Consumer, as_linear, linear_output
from .match import TaperSite, reads_metadata_only

aten = torch.ops.aten

__all__ = ["sum_terms"]


def _last(n) -> int | None:
    v = n.meta.get("val") if isinstance(n, fx.Node) else None
    return v.shape[-1] if isinstance(v, torch.Tensor) and v.dim() else None


def _expert_output(n: fx.Node) -> Consumer | None:
    if n.op == "call_function" and (n.target == aten.bmm.default or "grouped_mm" in str(n.target)) and n.args:
        c = as_linear(n, n.args[0])
        return c if isinstance(c, Consumer) else None
    return None


def _step(n: fx.Node, d: int):
    """The inputs of n to follow (list) if n passes terms through per feature, else None."""
    t, a = n.target, n.args
    src = a[0] if a and isinstance(a[0], fx.Node) else None
    keeps = src is not None and _last(n) == d and _last(src) == d
    if t == aten.add.Tensor and len(a) == 2 and all(isinstance(x, fx.Node) for x in a) and not n.kwargs:
        return list(a) if all(_last(x) == d for x in a) else None
    if t in (aten.view.default, aten.reshape.default, aten._unsafe_view.default, aten.clone.default,
             aten.alias.default, aten.to.dtype, aten._to_copy.default) and keeps:
        return [src]
    if t == aten.sum.dim_IntList and keeps:
        dims = a[1] if len(a) > 1 else None
        return [src] if dims is not None and all(x % src.meta["val"].dim() != src.meta["val"].dim() - 1
                                                  for x in dims) else None
    if t == aten.index.Tensor and keeps and isinstance(a[1], (list, tuple)) and len(a[1]) < src.meta["val"].dim():
        return [src]
    if t in (aten.mul.Tensor, aten.div.Tensor) and len(a) == 2 and _last(n) == d:
        x, w = a
        if t == aten.mul.Tensor and isinstance(x, fx.Node) and _last(x) == 1 and isinstance(w, fx.Node):
            x, w = w, x  # the per-row factor may come first
        if isinstance(x, fx.Node) and _last(x) == d and (isinstance(w, (int, float)) or _last(w) == 1):
            return [x]
    return None


def sum_terms(site: TaperSite, d: int):
    """(the linears whose outputs add up to the map's input, None) or ([], why not)."""
    leaves, seen, todo = [], {}, [site.input]
    while todo:
        n = todo.pop()
        if n in seen:
            continue
        seen[n] = True
        lin = linear_output(n) or _expert_output(n)
        if lin is not None:
            leaves.append(lin)
            continue
        nxt = _step(n, d) if n.op == "call_function" else None
        if nxt is None:
            what = "a graph input" if n.op == "placeholder" else f"{n.name} ({n.target})"
            return [], f"a term of it comes from {what}, not from a linear"
        todo += nxt
    inside = set(site.nodes)
    for n in seen:  # scaling the terms must not change anything else that reads them
        for u in n.users:
            if u not in seen and u not in inside and not reads_metadata_only(u, n):
                return [], f"{n.name} is also read by {u.name} ({u.target}) outside the sum the norm reads"
    return leaves, None
