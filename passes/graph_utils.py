"""Small GraphModule surgery helpers shared by the passes: attributes, node erasure, cleanup."""
from __future__ import annotations

import torch
import torch.fx as fx
import torch.nn as nn

__all__ = ["has_attr", "register_tensor", "erase_site_nodes", "drop_unused_attrs", "cleanup", "graph_check"]


def _owner(gm: nn.Module, qualname: str, create: bool) -> tuple[nn.Module, str]:
    *parents, leaf = qualname.split(".")
    mod = gm
    for p in parents:
        nxt = getattr(mod, p, None)
        if not isinstance(nxt, nn.Module):
            if not create:
                raise AttributeError(qualname)
            nxt = nn.Module()
            setattr(mod, p, nxt)
        mod = nxt
    return mod, leaf


def has_attr(gm: nn.Module, qualname: str) -> bool:
    """True if `qualname` names an existing attribute path on gm."""
    obj = gm
    for part in qualname.split("."):
        if not hasattr(obj, part):
            return False
        obj = getattr(obj, part)
    return True


def register_tensor(gm: fx.GraphModule, qualname: str, value: torch.Tensor, parameter: bool = True,
                    fresh: bool = True) -> str:
    """Store `value` on gm at `qualname` (a fresh unique name if taken and `fresh`); returns the name used."""
    name, k = qualname, 1
    while fresh and has_attr(gm, name):
        name, k = f"{qualname}_{k}", k + 1
    mod, leaf = _owner(gm, name, create=True)
    if leaf in mod._parameters:
        del mod._parameters[leaf]
    if leaf in mod._buffers:
        del mod._buffers[leaf]
    if parameter:
        mod.register_parameter(leaf, nn.Parameter(value.detach(), requires_grad=False))
    else:
        mod.register_buffer(leaf, value.detach())
    return name


def erase_site_nodes(gm: fx.GraphModule, nodes: list[fx.Node]) -> set[str]:
    """Erase `nodes` (reverse order; each must be unused outside the set); returns get_attr targets they read."""
    released = set()
    for n in reversed(nodes):
        if n.users:
            raise RuntimeError(f"internal: node {n.name} still has users {list(n.users)} after the rewrite")
        released.update(a.target for a in n.all_input_nodes if a.op == "get_attr")
        gm.graph.erase_node(n)
    return released


def drop_unused_attrs(gm: fx.GraphModule, candidates: set[str]) -> list[str]:
    """Erase unused get_attr nodes, then delete each candidate attribute no get_attr node reads anymore."""
    for n in list(gm.graph.nodes):
        if n.op == "get_attr" and not n.users:
            gm.graph.erase_node(n)
    used = {n.target for n in gm.graph.nodes if n.op == "get_attr"}
    dropped = []
    for name in sorted(candidates - used):
        try:
            mod, leaf = _owner(gm, name, create=False)
        except AttributeError:
            continue
        for table in (mod._parameters, mod._buffers):
            if leaf in table:
                del table[leaf]
                dropped.append(name)
    return dropped


def cleanup(gm: fx.GraphModule, recompile: bool = True) -> fx.GraphModule:
    """Dead-code elimination, lint, recompile (`recompile=False`: the caller recompiles, e.g. a PassManager)."""
    gm.graph.eliminate_dead_code()
    gm.graph.lint()
    if recompile:
        gm.recompile()
    return gm


def graph_check(gm: nn.Module) -> None:
    """Invariants checked after every pass: the graph lints and every get_attr resolves to a tensor/module."""
    if not isinstance(gm, fx.GraphModule):
        raise TypeError(f"expected a GraphModule, got {type(gm).__name__}")
    gm.graph.lint()
    for n in gm.graph.nodes:
        if n.op == "get_attr":
            obj = gm
            for part in n.target.split("."):
                obj = getattr(obj, part, None)
                if obj is None:
                    raise RuntimeError(f"graph check: get_attr {n.name} -> {n.target!r} does not resolve")
