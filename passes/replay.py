"""Replay the view ops of a captured graph on index tensors: which feature lands where.

Between a linear and a norm (or a norm and a linear) sit views, transposes, splits + getitem, slices,
selects and casts. Running those same ops on a tensor of feature indices (or norm positions) shaped
like the real activation says, for every element, where it came from. Dynamic dims are replayed at the
example's sizes (SymInt hints).
"""
from __future__ import annotations

import operator

import torch
import torch.fx as fx

aten = torch.ops.aten

__all__ = ["replayable", "replay", "concrete_dim", "aten_ops", "MOVES", "CASTS"]


def aten_ops(*names: str) -> set:
    """The aten overloads named "op.overload" that exist in this torch build."""
    out = set()
    for n in names:
        op, _, overload = n.partition(".")
        packet = getattr(aten, op, None)
        if packet is not None and hasattr(packet, overload):
            out.add(getattr(packet, overload))
    return out


# ops that only move / select / regroup elements (replayable on an index tensor)
MOVES = aten_ops("view.default", "reshape.default", "_unsafe_view.default", "transpose.int", "permute.default",
             "unsqueeze.default", "squeeze.dim", "squeeze.dims", "squeeze.default", "split.Tensor",
             "split_with_sizes.default", "chunk.default", "unbind.int", "slice.Tensor", "select.int",
             "narrow.default", "clone.default", "alias.default", "contiguous.default", "detach.default",
             "expand.default", "flatten.using_ints") | {operator.getitem}
CASTS = aten_ops("to.dtype", "_to_copy.default", "to.dtype_layout")


def _concrete(a):
    """Node args with example values: SymInt nodes -> their hint, lists recursively."""
    if isinstance(a, fx.Node):
        v = a.meta.get("val")
        if isinstance(v, torch.SymInt):
            return concrete_dim(v)
        if isinstance(v, int):
            return v
        raise ValueError(f"{a.name} is not a shape value")
    if isinstance(a, (list, tuple)):
        return type(a)(_concrete(x) for x in a)
    return a


def concrete_dim(s) -> int:
    """An int for a (Sym)Int dim: the example's size for a dynamic one."""
    return int(s.node.hint) if isinstance(s, torch.SymInt) else int(s)


def replayable(n: fx.Node) -> bool:
    """True if n only moves elements of its first argument (or casts it), so `replay` can run it on indices."""
    if n.op != "call_function" or not n.args or not isinstance(n.args[0], fx.Node):
        return False
    if n.target in CASTS:
        return not n.kwargs.get("device") and all(not isinstance(a, torch.device) for a in n.args[1:])
    return n.target in MOVES and not any(a is n.args[0] for a in n.args[1:])


def replay(n: fx.Node, idx):
    """Node n's op applied to `idx` in place of its first argument (casts are the identity)."""
    if n.target in CASTS:
        return idx
    args = (idx, *(_concrete(a) for a in n.args[1:]))
    if n.target is operator.getitem:
        return idx[args[1]]
    return n.target(*args, **{k: _concrete(v) for k, v in n.kwargs.items()})


