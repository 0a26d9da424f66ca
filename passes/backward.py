"""Backward fold: a gate-zero map that reads a linear's OUTPUT folds into that linear's rows.

Post-norms / sandwich norms (Gemma2/3, OLMo2: a norm on o_proj / down_proj's output before the
residual add) and QK-norms (Qwen3, Gemma3: per head on q/k_proj(x).view(..., H, hd); OLMo2: over
all heads) have no linear after them, but a linear right before: at gate 0 the map is a per-feature
scale (LN: group centering, scale, shift) of that linear's output features, so it folds into W's
rows and b (fold_math.fold_linear_rows), before RoPE ever sees it.

Which output feature lands where: the ops between the linear and the norm (views, transposes,
split + getitem, slices, selects, casts) are replayed on a tensor of feature indices shaped like
the linear's output. The map may fold only if every feature the norm reads sits at one fixed
position of the norm's last dim (and, for LN, in one fixed group), and no other reader of the
linear's output (a sibling split, a slice) sees any of those features.
"""
from __future__ import annotations

import torch
import torch.fx as fx

from .fold_math import fold_linear_rows, taper_map
from .fold import module_path, sharing_refusal
from .graph_utils import erase_site_nodes
from .linears import Consumer, StorageIndex, get_attr_tensor, linear_output, read_linear, weight_readers, write_linear
from .backward_sum import sum_terms
from .match import TaperSite, reads_metadata_only
from .replay import concrete_dim as _concrete_dim
from .replay import replay as _replay
from .replay import replayable as _replayable

aten = torch.ops.aten

__all__ = ["plan_backward", "apply_backward", "BackwardPlan"]


class BackwardPlan:
    """A site that folds into the rows of `linear`: output feature f -> norm position pos[f] (-1: not read).
    Or, for a sum of linear outputs, into the rows of every linear in `leaves` (pos is then None)."""

    def __init__(self, linear: Consumer, pos: torch.Tensor | None, group: torch.Tensor | None, untied: list,
                 leaves: list | None = None):
        self.linear, self.pos, self.group, self.untied, self.leaves = linear, pos, group, untied, leaves or []


_SUM_HEADS = {aten.add.Tensor, aten.view.default, aten.reshape.default, aten._unsafe_view.default, aten.sum.dim_IntList,
              aten.to.dtype, aten._to_copy.default, aten.index.Tensor, aten.mul.Tensor}


def _plan_sum(gm, site: TaperSite, leaves: list, d: int, untie_embeddings: bool, index):
    for c in leaves:
        w = get_attr_tensor(gm, c.weight.target)
        n_out = w.shape[-2] if c.layout == "out_in" else w.shape[-1]
        if w.dim() not in (2, 3) or n_out != d or not w.is_floating_point():
            return None, f"{c.node.name}'s weight {tuple(w.shape)} does not produce {d} features"
    untied: list = []
    reason = sharing_refusal(gm, site.name, leaves, untie_embeddings, untied, index)
    if reason:
        return None, reason.split(": ", 1)[1]
    return BackwardPlan(leaves[0], None, None, untied, leaves), None


def _features(v) -> torch.Tensor:
    if isinstance(v, torch.Tensor):
        return v.reshape(-1)
    return torch.cat([_features(x) for x in v]) if v else torch.empty(0, dtype=torch.long)


def _chain(site: TaperSite):
    """(the linear whose output the map reads, the ops from its output to the map's input) or a reason."""
    n, chain = site.input, []
    while True:
        lin = linear_output(n)
        if lin is not None:
            return lin, list(reversed(chain))
        if not _replayable(n):
            what = "a graph input" if n.op == "placeholder" else f"{n.name} ({n.target})"
            return None, f"its input comes from {what}, not from a linear (through views)"
        chain.append(n)
        n = n.args[0]


def plan_backward(gm: fx.GraphModule, site: TaperSite, untie_embeddings: bool = True,
                  index: StorageIndex | None = None):
    """(BackwardPlan, None) if the site's map folds into the rows of the linear producing its input, else (None, reason).
    `index`: a StorageIndex shared by the pass's sites (None: a fresh one)."""
    if site.pos0 and site.kind == "ln":  # passes/pos0.py: p after the rows fold would scale beta_t too
        return None, ("an LN map with position 0's own scale c0 cannot fold into the rows of the linear before it "
                      "(the factor c0 / c would scale beta_t too)")
    lin, chain = _chain(site)
    d = site.module.weight_t.numel()
    if lin is None:
        if site.kind != "rms" or site.input.op != "call_function" or site.input.target not in _SUM_HEADS:
            return None, chain
        leaves, why = sum_terms(site, d)  # a post-norm on an MoE's weighted sum of expert outputs
        if why:
            return None, f"{chain}; nor is it a sum of linear outputs: {why}"
        return _plan_sum(gm, site, leaves, d, untie_embeddings, index)
    w = get_attr_tensor(gm, lin.weight.target)
    out_val = lin.out.meta.get("val")
    if not isinstance(out_val, torch.Tensor) or w.dim() != 2 or not w.is_floating_point():
        return None, f"linear {lin.node.name} has no 2-D floating weight / known output shape"
    n_out = w.shape[0] if lin.layout == "out_in" else w.shape[1]
    if _concrete_dim(out_val.shape[-1]) != n_out:
        return None, f"linear {lin.node.name}'s output has {out_val.shape[-1]} features, its weight {n_out}"
    where = module_path(lin.node) or lin.node.name
    try:
        path = [lin.out, *chain]
        shape = [_concrete_dim(s) for s in out_val.shape]  # dynamic dims: replay at the example's sizes
        vals = {lin.out: torch.arange(n_out).expand(shape).contiguous()}
        for n in chain:
            vals[n] = _replay(n, vals[n.args[0]])
        J = vals[site.input]
        if not isinstance(J, torch.Tensor) or J.shape[-1] != d:
            return None, f"the ops from {where} to the norm do not give rows of {d} features"
        rows = J.reshape(-1, d)
        read = torch.zeros(n_out, dtype=torch.bool)
        read[rows.reshape(-1)] = True
        inside = set(site.nodes)
        for i, n in enumerate(path):  # other readers of the linear's output must see none of the norm's features
            nxt = path[i + 1] if i + 1 < len(path) else None
            for u in n.users:
                if u is nxt or (n is site.input and u in inside) or reads_metadata_only(u, n):
                    continue
                if not _replayable(u) or u.args[0] is not n:
                    return None, (f"{where}'s output also reaches {u.name} ({u.target}) outside the norm; "
                                  "folding into its rows would change that reader")
                if read[_features(_replay(u, vals[n]))].any():
                    return None, f"{u.name} ({u.target}) also reads features of {where} that the norm scales"
    except (RuntimeError, ValueError, IndexError, TypeError) as e:
        return None, f"could not follow the ops from {where} to the norm ({type(e).__name__}: {str(e).splitlines()[0]})"
    k = torch.arange(d).expand_as(rows)
    pos = torch.full((n_out,), -1, dtype=torch.long)
    pos[rows.reshape(-1)] = k.reshape(-1)
    if not torch.equal(pos[rows], k):
        return None, f"an output feature of {where} reaches different positions of the norm"
    srt = rows.sort(1).values
    if d > 1 and not bool((srt[:, 1:] != srt[:, :-1]).all()):
        return None, f"a norm row reads one output feature of {where} twice"
    first = srt[:, 0]
    group = torch.full((n_out,), -1, dtype=torch.long)
    group[rows.reshape(-1)] = first[:, None].expand_as(rows).reshape(-1)
    if not torch.equal(group[rows], first[:, None].expand_as(rows)):
        return None, f"output features of {where} are normalized in changing groups"
    group = torch.unique(group, return_inverse=True)[1] - (1 if bool((group < 0).any()) else 0)
    untied: list = []
    reason = sharing_refusal(gm, site.name, [lin], untie_embeddings, untied, index)
    if reason:
        return None, reason.split(": ", 1)[1]
    return BackwardPlan(lin, pos, group, untied), None


def apply_backward(gm: fx.GraphModule, site: TaperSite, plan: BackwardPlan,
                   index: StorageIndex | None = None) -> tuple[set[str], list[str]]:
    """Fold the site's map into the linear's rows, bypass the map, erase it; returns (released, created) attr names.
    `index`: a StorageIndex shared by the pass's sites (None: a fresh one)."""
    index = index if index is not None else StorageIndex(gm)
    s64, beta64 = taper_map(site.module)
    released, created = set(), []
    groups: dict = {}
    for c in plan.leaves or [plan.linear]:  # linears sharing a weight are scaled once
        groups.setdefault((c.weight, c.bias, c.layout), []).append(c)
    readers = set().union(*(weight_readers(c) | {c.node} | ({c.bias_add} if c.bias_add is not None else set())
                            for g in groups.values() for c in g))
    for group in groups.values():
        lin = group[0]
        w, b = read_linear(gm, lin)
        if w.dim() == 3:  # stacked experts: (E, out, in) scales dim 1, (E, in, out) dim 2
            view = [1, -1, 1] if lin.layout == "out_in" else [1, 1, -1]
            w2, b2 = (w.double() * s64.view(view)).to(w.dtype), b
        else:
            pos = plan.pos if plan.pos is not None else torch.arange(s64.numel())
            w2, b2 = fold_linear_rows(w, b, s64, beta64, pos, plan.group, layout=lin.layout)
        rel, new = write_linear(gm, group, w2, b2, readers, index)
        released |= rel
        created += new
    site.output.replace_all_uses_with(site.input)
    released |= erase_site_nodes(gm, site.nodes)
    return released, created
