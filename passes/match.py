"""Find TaperNorm call sites in an exported GraphModule and the linears that consume them.

A call site is the set of `call_function` nodes whose `nn_module_stack` holds one TaperNorm /
TaperLayerNorm entry (one entry key per call). Its input is the one activation it reads from
outside the scope; its output is the one node used outside the scope. The gate, calibration and
eval state are read from the source module (Python attributes, not the graph).
"""
from __future__ import annotations

import operator
import re
from dataclasses import dataclass

import torch
import torch.fx as fx
import torch.nn as nn

from tapernorm.layers import TAPER_TYPES, TaperLayerNorm

from .bound import bound_problem, is_bounded
from .linears import Consumer, as_linear, get_attr_tensor, is_embedding_use, storage_uses
from .pos0 import is_pos0_rows, pos0_problem
from .replay import aten_ops as _ops
from .replay import replayable

aten = torch.ops.aten

__all__ = ["TaperSite", "Consumer", "find_sites", "site_refusal", "find_consumers", "get_attr_tensor",
           "storage_uses", "is_embedding_use", "stat_ops", "reads_metadata_only", "HARMLESS_READERS", "taper_classes",
           "GATE_NAME"]


# per-token statistics a gate-0 RMS map must not compute (LN keeps exactly one mean: its centering)
_STAT_OPS = _ops("mean.dim", "mean.default", "rsqrt.default", "sqrt.default", "pow.Tensor_Scalar", "var.correction",
                 "var_mean.correction", "native_layer_norm.default", "layer_norm.default", "rms_norm.default",
                 "_fused_rms_norm.default", "sum.dim_IntList", "norm.ScalarOpt_dim")
# ops that only move / drop whole tokens (rows); a per-feature affine map commutes with them
_ROW_VIEWS = {aten.view.default, aten.reshape.default, aten._unsafe_view.default} | _ops("flatten.using_ints")
_ROW_IDENTITY = _ops("alias.default", "clone.default", "detach.default", "lift_fresh_copy.default")
_CASTS = _ops("to.dtype", "_to_copy.default", "to.dtype_layout", "type_as.default")
_ROW_SPLITS = _ops("split.Tensor", "split_with_sizes.default", "chunk.default")
_ROW_DIM_OPS = {aten.slice.Tensor, aten.select.int, aten.index_select.default}
# readers that check only metadata (dtype, shape), unchanged by a fold
HARMLESS_READERS = _ops("_assert_tensor_metadata.default", "new_zeros.default", "new_ones.default", "new_empty.default",
                        "new_full.default", "zeros_like.default", "ones_like.default", "empty_like.default",
                        "full_like.default", "sym_size.int")


def stat_ops(gm: fx.GraphModule) -> int:
    """Nodes computing a per-token statistic (mean, rsqrt, sqrt, pow, var, fused norms) anywhere in gm."""
    return sum(1 for n in gm.graph.nodes if n.op == "call_function" and n.target in _STAT_OPS)


@dataclass
class TaperSite:
    """One call of a TaperNorm layer in the graph."""
    name: str  # module path (plus "@k" for the k-th extra call of the same module)
    path: str
    module: nn.Module
    nodes: list  # call_function nodes of the scope, graph order
    input: fx.Node | None = None
    output: fx.Node | None = None
    problem: str | None = None  # structural reason the site cannot be rewritten
    rows: fx.Node | None = None  # c0 layers (passes/pos0.py): the position-0 mask read from outside, if any

    @property
    def pos0(self) -> bool:
        """True if the layer has position 0's own scale c0 (one per-token factor p beside the map)."""
        return bool(getattr(self.module, "has_pos0", False))

    @property
    def kind(self) -> str:
        return "ln" if type(self.module) is TaperLayerNorm else "rms"


def taper_classes() -> set:
    """TaperNorm, TaperLayerNorm and every subclass (e.g. tapernorm.gated.TaperNormGated)."""
    out, todo = set(), list(TAPER_TYPES)
    while todo:
        t = todo.pop()
        if t not in out:
            out.add(t)
            todo += t.__subclasses__()
    return out


GATE_NAME = "tapernorm.gated.TaperGate"


def _type_name(t) -> str:
    return t if isinstance(t, str) else f"{t.__module__}.{t.__qualname__}"


def _resolve(root: nn.Module, path: str) -> tuple[nn.Module | None, str]:
    """The submodule at an nn_module_stack path (ModuleList slices like `layers.slice(None, 2, None).0` dropped)."""
    for p in (path, re.sub(r"(^|\.)slice\([^)]*\)(?=\.|$)", "", path).strip(".")):
        try:
            return root.get_submodule(p), p
        except AttributeError:
            continue
    return None, path


def find_sites(gm: fx.GraphModule, original: nn.Module) -> tuple[list[TaperSite], list[tuple[str, nn.Module]]]:
    """All TaperNorm call sites in `gm` (resolved against `original`), and the layers never called."""
    taper_names = {_type_name(t) for t in taper_classes()}
    by_key: dict[str, list] = {}
    key_path: dict[str, str] = {}
    for node in gm.graph.nodes:
        if node.op != "call_function":
            continue
        stack = node.meta.get("nn_module_stack") or {}
        if stack and _type_name(list(stack.values())[-1][1]) == GATE_NAME:
            continue  # a gated norm's x * act(gate): outside the map
        for key, (path, typ) in reversed(list(stack.items())):
            if _type_name(typ) in taper_names:
                by_key.setdefault(key, []).append(node)
                key_path[key] = path
                break
    sites, seen = [], {}
    for key, nodes in by_key.items():
        module, path = _resolve(original, key_path[key])
        k = seen.get(path, 0)
        seen[path] = k + 1
        name = path if k == 0 else f"{path}@{k}"
        site = TaperSite(name=name, path=path, module=module, nodes=nodes)
        if module is None or not isinstance(module, TAPER_TYPES):
            site.problem = f"module path {path!r} does not resolve to a TaperNorm in the source module"
        else:
            _bind_io(site)
        sites.append(site)
    called = {id(s.module) for s in sites}
    uncalled = [(n, m) for n, m in original.named_modules() if isinstance(m, TAPER_TYPES) and id(m) not in called]
    return sites, uncalled


def _bind_io(site: TaperSite) -> None:
    inside = set(site.nodes)
    inputs, outputs = [], []
    for n in site.nodes:
        for a in n.all_input_nodes:
            if a not in inside and a.op != "get_attr" and a not in inputs:
                inputs.append(a)
        if any(u not in inside for u in n.users):
            outputs.append(n)
    if site.pos0:  # the position-0 mask (bool) is the factor's input, not an activation
        rows = [a for a in inputs if is_pos0_rows(a)]
        inputs = [a for a in inputs if not is_pos0_rows(a)]
        if len(rows) > 1:
            site.problem = f"traced call reads {len(rows)} boolean masks; a c0 layer reads one position-0 mask"
            return
        site.rows = rows[0] if rows else None
    if len(inputs) != 1 or len(outputs) != 1:
        site.problem = (f"traced call has {len(inputs)} activation inputs and {len(outputs)} outputs; "
                        "expected one of each")
        return
    site.input, site.output = inputs[0], outputs[0]


def site_refusal(site: TaperSite) -> str | None:
    """Why this site cannot be rewritten (gate, calibration, mode, structure), or None if it can."""
    m = site.module
    if m is None or not isinstance(m, TAPER_TYPES):
        return f"{site.name}: {site.problem}"
    if not m.calibrated:
        return f"{site.name}: not calibrated (c is not frozen); run calibrate() before folding"
    if m.gate != 0.0:
        return f"{site.name}: gate {m.gate:g}, fold needs gate 0"
    if m.training:
        return f"{site.name}: in training mode; call model.eval() before folding"
    if site.problem:
        return f"{site.name}: {site.problem}"
    if site.pos0 and (why := pos0_problem(site)):
        return f"{site.name}: {why}"
    if is_bounded(site) and (why := bound_problem(site)):
        return f"{site.name}: {why}"
    stats = [n for n in site.nodes if n.target in _STAT_OPS]
    want = 1 if site.kind == "ln" else 0  # LN keeps its (linear) centering mean
    if len(stats) != want:
        return f"{site.name}: traced call computes {len(stats)} per-token statistics, the gate-0 map has {want}"
    xv, ov = site.input.meta.get("val"), site.output.meta.get("val")
    d = m.weight_t.numel()
    if not (isinstance(xv, torch.Tensor) and isinstance(ov, torch.Tensor)) or xv.shape[-1] != d or ov.shape != xv.shape \
            or ov.dtype != xv.dtype:
        return f"{site.name}: input/output shapes do not match a per-feature map over {d} features"
    return None


def _last_dim(node: fx.Node) -> int | None:
    v = node.meta.get("val")
    return v.shape[-1] if isinstance(v, torch.Tensor) and v.dim() > 0 else None


def reads_metadata_only(user: fx.Node, src: fx.Node) -> bool:
    """True if `user` reads only src's dtype / shape (asserts, new_zeros, `other.type_as(src)`)."""
    if user.target in HARMLESS_READERS:
        return True
    return user.target == aten.type_as.default and user.args[0] is not src and user.args[1] is src


def _is_row_op(node: fx.Node, d: int, kind: str = "ln") -> bool:
    """True if `node` (reading its first arg) only moves / drops whole rows of width d (for an RMS map, also
    a scale by a constant number, which commutes with x * s)."""
    t, src = node.target, node.args[0] if node.args else None
    if not isinstance(src, fx.Node):
        return False
    if t is operator.getitem:  # one piece of a token split
        return src.target in _ROW_SPLITS and isinstance(node.args[1], int)
    sv = src.meta.get("val")
    if not isinstance(sv, torch.Tensor) or any(a is src for a in node.args[1:]):
        return False
    if t in _ROW_SPLITS:  # split / chunk along a token dim
        dim = node.args[2] if len(node.args) > 2 else node.kwargs.get("dim", 0)
        return isinstance(dim, int) and dim % sv.dim() != sv.dim() - 1
    if t in _ROW_IDENTITY:
        return True
    if t in _CASTS:  # a cast to the dtype it already has
        nv = node.meta.get("val")
        return isinstance(nv, torch.Tensor) and nv.dtype == sv.dtype and nv.device == sv.device
    if t in (aten.mul.Tensor, aten.div.Tensor) and kind == "rms" and len(node.args) == 2 and not node.kwargs:
        other = node.args[1]  # a number, or a per-token factor (..., 1) such as Llama 4's router scores
        ov = other.meta.get("val") if isinstance(other, fx.Node) else None
        return isinstance(other, (int, float)) or (isinstance(ov, torch.Tensor) and ov.dim() >= 1 and ov.shape[-1] == 1
                                                   and _last_dim(node) == d)
    if t == aten.expand.default:  # broadcast over token dims, features kept
        return _last_dim(node) == d and sv.shape[-1] == d
    if t == aten.repeat.default:  # tokens repeated (Llama 4's experts), features not
        reps = node.args[1] if len(node.args) > 1 else None
        return isinstance(reps, (list, tuple)) and len(reps) == sv.dim() and reps[-1] == 1 and _last_dim(node) == d
    if t == aten.index.Tensor:  # a gather of tokens (MoE dispatch): indexes leading dims only
        idx = node.args[1] if len(node.args) > 1 else None
        return isinstance(idx, (list, tuple)) and len(idx) < sv.dim() and _last_dim(node) == d
    if t == aten.dropout.default:
        return len(node.args) >= 3 and node.args[2] is False
    if t in _ROW_VIEWS:
        return _last_dim(node) == d and sv.shape[-1] == d
    if t in _ROW_DIM_OPS:
        dim = node.args[1] if len(node.args) > 1 else node.kwargs.get("dim", 0)
        return isinstance(dim, int) and dim % sv.dim() != sv.dim() - 1 and _last_dim(node) == d
    return False


def find_consumers(site: TaperSite, d: int) -> tuple[list[Consumer], list[fx.Node], str | None]:
    """Linear consumers reached from the site output through row-only ops, the row ops, or a refusal."""
    consumers, via, stack = [], [], [(site.output, [], False)]
    while stack:
        src, path, remapped = stack.pop()
        for user in list(src.users):
            if reads_metadata_only(user, src):  # dtype / shape, which the fold keeps
                continue
            if user.op == "output":
                return [], [], f"{site.name}: its output is a graph output; keeping the explicit map"
            match = as_linear(user, src) if user.op == "call_function" else None
            if isinstance(match, Consumer):
                match.via, match.remapped = path, remapped
                consumers.append(match)
            elif isinstance(match, str):
                return [], [], f"{site.name}: consumer {match}; keeping the explicit map"
            elif user.op == "call_function" and _is_row_op(user, d, site.kind):
                via.append(user)
                stack.append((user, path + [user], remapped))
            elif site.kind == "rms" and replayable(user):  # regroups features (merging heads): replayed later
                via.append(user)
                stack.append((user, path + [user], True))
            else:
                return [], [], (f"{site.name}: consumer {user.name} ({user.target}) is not a linear "
                                "(fold needs every consumer to be one); keeping the explicit map")
    if not consumers:
        return [], [], f"{site.name}: no linear consumer found; keeping the explicit map"
    return consumers, via, None
