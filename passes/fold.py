"""Fold pass: push a materialized gate-zero map into every linear that consumes it, or into none.

For each accepted site (see match.site_refusal) whose consumers, through row-only ops (views that
keep the feature dim, slices over tokens, eval dropout, alias), are all linears (see linears.py:
`aten.linear`, `aten.addmm` for HF Conv1D with W stored (in, out), `x @ W.T` / `x @ W` matmuls on
a parameter) on stored parameters, the weights are replaced by fold_math.fold_linear's W', b'
(LN: a bias is created where there was none), the consumers read the norm's input directly and
the map's nodes are erased. A map no linear consumes may still fold backwards into the linear
that produces its input (passes/backward.py).

Weights are never modified in place: a folded weight is a new tensor. A weight whose storage is
also read elsewhere is folded only when the other readers are embedding lookups (a tied lm_head):
then the head gets its own folded copy, the embedding keeps the original bit-for-bit, and the
report lists the untied weight. Any other sharing keeps the explicit map, with the reason.
"""
from __future__ import annotations

import torch
import torch.fx as fx

from .fold_math import fold_experts, fold_linear, taper_map
from .graph_utils import erase_site_nodes
from .linears import Consumer, StorageIndex, add_expert_shift, get_attr_tensor, is_embedding_use, is_expert_matmul, \
    read_linear, storage_uses, weight_readers, write_linear
from .match import TaperSite, find_consumers
from .replay import concrete_dim, replay, replayable

aten = torch.ops.aten

__all__ = ["plan_fold", "apply_fold", "sharing_refusal"]


def module_path(node: fx.Node) -> str:
    """The innermost nn_module_stack path of a node ("" when none)."""
    stack = node.meta.get("nn_module_stack") or {}
    return list(stack.values())[-1][0] if stack else ""


def sharing_refusal(gm, site_name: str, linears: list[Consumer], untie_embeddings: bool, untied: list,
                    index: StorageIndex | None = None):
    """None if every linear's weight is read only by `linears` (or by embedding lookups, to untie), else why not.
    `index`: the pass's shared StorageIndex (one is made when None)."""
    index = index if index is not None else StorageIndex(gm)
    uses = storage_uses(gm, index)
    mine = set().union(*(weight_readers(c) for c in linears))
    for c in linears:
        others = [(g, u) for g, u in uses.get(index.key(c.weight.target), []) if u not in mine]
        if not others:
            continue
        if untie_embeddings and all(is_embedding_use(g, u) for g, u in others):
            if c.weight.target not in untied:
                untied.append(c.weight.target)
            continue
        g, u = next((g, u) for g, u in others if not (untie_embeddings and is_embedding_use(g, u)))
        where = module_path(u) or u.name
        return (f"{site_name}: weight {c.weight.target} is shared with {u.name} ({u.target}) in {where}, "
                "which this norm does not feed; folding would need a separate copy, keeping the explicit map")
    return None


def _column_positions(site: TaperSite, c: Consumer, d: int):
    """(norm position of each of c's input columns, None) by replaying the views in between, or (None, why)."""
    def scale_only(n):  # x * number or x * per-token factor (..., 1) (a c0 layer's p): moves nothing
        other = n.args[1] if len(n.args) > 1 else None
        ov = other.meta.get("val") if isinstance(other, fx.Node) else None
        return n.target in (aten.mul.Tensor, aten.div.Tensor) and (
            isinstance(other, (int, float)) or (isinstance(ov, torch.Tensor) and ov.dim() >= 1 and ov.shape[-1] == 1))

    bad = next((n for n in c.via if not (replayable(n) or scale_only(n))), None)
    if bad is not None:
        return None, f"the ops to {c.node.name} regroup features and {bad.name} ({bad.target}) cannot be replayed"
    try:
        pos = torch.arange(d).expand([concrete_dim(s) for s in site.output.meta["val"].shape]).contiguous()
        for n in c.via:
            pos = pos if scale_only(n) else replay(n, pos)
    except (RuntimeError, ValueError, IndexError, TypeError, KeyError) as e:
        return None, f"could not follow the views to {c.node.name} ({type(e).__name__})"
    rows = pos.reshape(-1, pos.shape[-1])
    if not bool((rows == rows[:1]).all()):
        return None, f"the views to {c.node.name} give its columns different norm positions from row to row"
    return rows[0].clone(), None


def plan_fold(gm: fx.GraphModule, site: TaperSite, untie_embeddings: bool = True, index: StorageIndex | None = None):
    """(consumers, untied weight targets, None) if the site can fold into all its consumers, else ([], [], reason).
    `index`: a StorageIndex shared by the pass's sites (None: a fresh one)."""
    d = site.module.weight_t.numel()
    consumers, _, reason = find_consumers(site, d)
    if reason:
        return [], [], reason
    for c in consumers:
        if c.remapped:
            c.scale_index, why = _column_positions(site, c, d)
            if why:
                return [], [], f"{site.name}: {why}; keeping the explicit map"
        n_in = len(c.scale_index) if c.scale_index is not None else d
        w = get_attr_tensor(gm, c.weight.target)
        if w.dim() not in (2, 3) or w.shape[-1 if c.layout == "out_in" else -2] != n_in:
            return [], [], f"{site.name}: {c.node.name} weight {c.weight.target} has shape {tuple(w.shape)}, not (*, {n_in})"
        if w.dim() == 3 and site.kind == "ln" and not (is_expert_matmul(c) and c.bias is None):
            return [], [], (f"{site.name}: {c.node.name} reads stacked expert weights {tuple(w.shape)} one expert at "
                            "a time: the LN shift would need a per-expert bias it does not have; keeping the explicit map")
        if not w.is_floating_point():
            return [], [], f"{site.name}: {c.node.name} weight {c.weight.target} is {w.dtype}, not floating point"
    seen: dict = {}
    for c in consumers:  # linears sharing a weight must see the same column scales
        key = (c.weight, c.bias, c.layout)
        prev = seen.setdefault(key, c.scale_index)
        if (prev is None) != (c.scale_index is None) or (prev is not None and not torch.equal(prev, c.scale_index)):
            return [], [], f"{site.name}: {c.weight.target} is read with two different feature orders; keeping the explicit map"
    untied: list = []
    reason = sharing_refusal(gm, site.name, consumers, untie_embeddings, untied, index)
    if reason:
        return [], [], reason
    return consumers, untied, None


def apply_fold(gm: fx.GraphModule, site: TaperSite, consumers: list[Consumer],
               index: StorageIndex | None = None) -> tuple[set[str], list[str]]:
    """Rewrite the consumers' weights, bypass the map, erase it; returns (released attr names, new attr names).
    `index`: a StorageIndex shared by the pass's sites (None: a fresh one)."""
    index = index if index is not None else StorageIndex(gm)
    s64, beta64 = taper_map(site.module)
    readers = set().union(*(weight_readers(c) for c in consumers)) | {c.node for c in consumers}
    groups: dict[tuple, list[Consumer]] = {}
    for c in consumers:  # linears sharing weight + bias nodes get one folded copy
        groups.setdefault((c.weight, c.bias, c.layout), []).append(c)
    released, created = set(), []
    for group in groups.values():
        w, b = read_linear(gm, group[0])
        idx = group[0].scale_index  # views regrouped the features: column j holds norm position idx[j]
        shift = None
        if w.dim() == 3 and beta64 is not None:  # LN into experts: the shift becomes a per-expert output vector
            w2, shift = fold_experts(w, s64, beta64, layout=group[0].layout)
            b2 = b
        else:
            w2, b2 = fold_linear(w, b, s64 if idx is None else s64[idx], beta64, layout=group[0].layout)
        rel, new = write_linear(gm, group, w2, b2, readers | {g.bias_add for g in group if g.bias_add is not None},
                                index)
        for c in group if shift is not None else []:
            new.append(add_expert_shift(gm, c, shift.to(w.dtype)))
        released |= rel
        created += new
    site.output.replace_all_uses_with(site.input)
    released |= erase_site_nodes(gm, site.nodes)
    return released, created
