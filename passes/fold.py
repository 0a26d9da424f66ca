"""Fold pass: push a materialized gate-zero map into every linear that consumes it, or into none.

For each accepted site (see match.site_refusal) whose consumers, through row-only ops (views that
keep the feature dim, slices over tokens, eval dropout, alias), are all linears (`aten.linear`,
or `aten.addmm` for HF Conv1D with W stored (in, out)) on stored parameters, the weights are
replaced by fold_math.fold_linear's W', b' (LN: a bias is created where there was none), the
consumers read the norm's input directly and the map's nodes are erased.

Weights are never modified in place: a folded weight is a new tensor. A weight whose storage is
also read elsewhere is folded only when the other readers are embedding lookups (a tied lm_head):
then the head gets its own folded copy, the embedding keeps the original bit-for-bit, and the
report lists the untied weight. Any other sharing keeps the explicit map, with the reason.
"""
from __future__ import annotations

import torch
import torch.fx as fx

from .fold_math import fold_linear, taper_map
from .graph_utils import erase_site_nodes, register_tensor
from .match import Consumer, TaperSite, find_consumers, get_attr_tensor, is_embedding_use, storage_uses

__all__ = ["plan_fold", "apply_fold"]


def _storage(gm, node: fx.Node) -> int:
    return get_attr_tensor(gm, node.target).untyped_storage().data_ptr()


def plan_fold(gm: fx.GraphModule, site: TaperSite, untie_embeddings: bool = True):
    """(consumers, untied weight targets, None) if the site can fold into all its consumers, else ([], [], reason)."""
    d = site.module.weight_t.numel()
    consumers, _, reason = find_consumers(site, d)
    if reason:
        return [], [], reason
    uses = storage_uses(gm)
    weight_of = {c.node: c.weight for c in consumers}
    untied = []
    for c in consumers:
        w = get_attr_tensor(gm, c.weight.target)
        if w.dim() != 2 or (w.shape[1] if c.layout == "out_in" else w.shape[0]) != d:
            return [], [], f"{site.name}: {c.node.name} weight {c.weight.target} has shape {tuple(w.shape)}, not (*, {d})"
        if not w.is_floating_point():
            return [], [], f"{site.name}: {c.node.name} weight {c.weight.target} is {w.dtype}, not floating point"
        others = [(g, u) for g, u in uses.get(_storage(gm, c.weight), []) if weight_of.get(u) is not g]
        if not others:
            continue
        lookups = [u for g, u in others if is_embedding_use(g, u)]
        if len(lookups) == len(others) and untie_embeddings:
            if c.weight.target not in untied:
                untied.append(c.weight.target)
            continue
        g, u = next((g, u) for g, u in others if not (untie_embeddings and is_embedding_use(g, u)))
        where = _module_path(u) or u.name
        return [], [], (f"{site.name}: weight {c.weight.target} is shared with {u.name} ({u.target}) in {where}, "
                        "which this norm does not feed; folding would need a separate copy, keeping the explicit map")
    return consumers, untied, None


def _module_path(node: fx.Node) -> str:
    stack = node.meta.get("nn_module_stack") or {}
    return list(stack.values())[-1][0] if stack else ""


def _exclusive(gm, node: fx.Node, readers: set, uses) -> bool:
    """True if the get_attr `node` and its storage are read only by `readers`."""
    return set(node.users) <= readers and all(g is node for g, _ in uses.get(_storage(gm, node), []))


def apply_fold(gm: fx.GraphModule, site: TaperSite, consumers: list[Consumer]) -> tuple[set[str], list[str]]:
    """Rewrite the consumers' weights, bypass the map, erase it; returns (released attr names, new attr names)."""
    s64, beta64 = taper_map(site.module)
    uses = storage_uses(gm)
    readers = {c.node for c in consumers}
    done: dict[tuple, tuple[fx.Node, fx.Node | None]] = {}
    released, created = set(), []
    for c in consumers:
        key = (c.weight, c.bias, c.layout)
        if key not in done:
            w = get_attr_tensor(gm, c.weight.target)
            b = get_attr_tensor(gm, c.bias.target) if c.bias is not None else None
            w2, b2 = fold_linear(w, b, s64, beta64, layout=c.layout)
            done[key] = (_store(gm, c.weight, c.weight.target, w2, w, readers, uses, created),
                         _store(gm, c.bias, c.bias.target, b2, b, readers, uses, created) if c.bias is not None else
                         (_new_attr(gm, c.weight.target.rpartition(".")[0] + ".bias", b2, w, created)
                          if b2 is not None else None))
        w_node, b_node = done[key]
        args = list(c.node.args)
        if c.layout == "out_in":
            args[1] = w_node
            if b_node is not None:
                args = args[:2] + [b_node]
        else:
            args[2], args[0] = w_node, b_node
        for old in (c.weight, c.bias):
            if old is not None and old not in (w_node, b_node):
                released.add(old.target)
        c.node.args = tuple(args)
    site.output.replace_all_uses_with(site.input)
    released |= erase_site_nodes(gm, site.nodes)
    return released, created


def _store(gm, node: fx.Node, target: str, new: torch.Tensor, old: torch.Tensor, readers, uses, created) -> fx.Node:
    """Put `new` where `node` reads: in place of the attribute if exclusive, else as a fresh attribute."""
    if new is old:
        return node
    is_param = isinstance(old, torch.nn.Parameter)
    if _exclusive(gm, node, readers, uses):
        register_tensor(gm, target, new, parameter=is_param, fresh=False)
        return node
    return _new_attr(gm, target + "_folded", new, old, created)


def _new_attr(gm, qualname: str, value: torch.Tensor, like: torch.Tensor, created) -> fx.Node:
    name = register_tensor(gm, qualname, value, parameter=isinstance(like, torch.nn.Parameter))
    created.append(name)
    with gm.graph.inserting_before(next(iter(gm.graph.nodes))):  # with the other get_attr nodes, at the top
        return gm.graph.get_attr(name)
