"""What counts as a linear in a captured graph, and how to give one new weights.

Three forms compute y = x W^T + b with W, b stored parameters (get_attr nodes):

    aten.linear(x, W, b?)                          nn.Linear                 W (out, in)  "out_in"
    aten.addmm(b, x2d, W)                          HF Conv1D (GPT-2)         W (in, out)  "in_out"
    aten.matmul(x, T(W)) [+ add(., b)]             x @ W.T (Falcon)          W (out, in)  "out_in"
    aten.matmul(x, W)    [+ add(., b)]             x @ W                     W (in, out)  "in_out"
    grouped_mm(x, T(W3), offs)                     MoE experts               W3 (E, out, in) "out_in"
    aten.linear(x, W3[e])                          one expert of a stack     W3 (E, out, in) "out_in"
    aten.bmm(x (E, T, in), W3)                     experts as a batch        W3 (E, in, out) "in_out"

(T = numpy_T / t / permute([1, 0]) / transpose(0, 1) of the parameter). `as_linear` matches a node
reading an activation as such a linear's input; `linear_output` matches a node that IS such a
linear's output (for folds into the rows). `write_linear` stores new weights, in place when the
storage is read by nothing else, else as a fresh attribute, and rewires the graph.
"""
from __future__ import annotations

from dataclasses import dataclass, field

import torch
import torch.fx as fx

from .graph_utils import register_tensor

aten = torch.ops.aten

__all__ = ["Consumer", "as_linear", "linear_output", "get_attr_tensor", "StorageIndex", "storage_uses", "is_embedding_use",
           "read_linear", "write_linear", "weight_readers", "is_expert_matmul", "add_expert_shift"]

_METADATA_ONLY = {op for op in (getattr(getattr(aten, "_assert_tensor_metadata", None), "default", None),) if op}
_TRANSPOSES = {aten.t.default, aten.numpy_T.default, aten.permute.default, aten.transpose.int}


@dataclass
class Consumer:
    """A linear node: y = x W^T + b (see the module docstring for the forms)."""
    node: fx.Node  # linear / addmm / matmul
    layout: str  # "out_in" or "in_out": how W is stored
    weight: fx.Node  # get_attr
    bias: fx.Node | None  # get_attr or None
    module_path: str = ""
    via: list = field(default_factory=list)  # row-only ops between the norm output and this node
    weight_view: fx.Node | None = None  # the transpose between the parameter and matmul
    bias_add: fx.Node | None = None  # matmul's separate bias add
    remapped: bool = False  # views between the norm and this linear regroup features (e.g. merge heads)
    scale_index: torch.Tensor | None = None  # then: the norm position of each input column

    @property
    def out(self) -> fx.Node:
        """The node holding x W^T + b."""
        return self.bias_add if self.bias_add is not None else self.node


def get_attr_tensor(gm: torch.nn.Module, target: str) -> torch.Tensor:
    """The tensor a get_attr target names."""
    obj = gm
    for part in target.split("."):
        obj = getattr(obj, part)
    return obj


def _param(n) -> bool:
    return isinstance(n, fx.Node) and n.op == "get_attr"


def _path(node: fx.Node) -> str:
    stack = node.meta.get("nn_module_stack") or {}
    return list(stack.values())[-1][0] if stack else ""


def _is_transpose(n) -> bool:
    if not (isinstance(n, fx.Node) and n.op == "call_function" and n.target in _TRANSPOSES and _param(n.args[0])):
        return False
    if n.target == aten.permute.default:
        return list(n.args[1]) == [1, 0]
    if n.target == aten.transpose.int:
        return sorted(a % 2 for a in n.args[1:3]) == [0, 1]
    return True


def _matmul_bias(mm: fx.Node) -> fx.Node | None:
    """The add(mm, b) right after a matmul when mm has no other reader and b is a stored vector."""
    if len(mm.users) != 1:
        return None
    add = next(iter(mm.users))
    if add.op != "call_function" or add.target != aten.add.Tensor or len(add.args) != 2 or add.kwargs:
        return None
    other = add.args[1] if add.args[0] is mm else add.args[0]
    ov, mv = other.meta.get("val") if _param(other) else None, mm.meta.get("val")
    if not (isinstance(ov, torch.Tensor) and isinstance(mv, torch.Tensor) and ov.dim() == 1 and ov.shape[0] == mv.shape[-1]):
        return None
    return add


def _matmul_linear(user: fx.Node, src: fx.Node | None):
    x, w = user.args[0], user.args[1]
    if src is not None and (x is not src or w is src):
        return f"{user.name} ({user.target}) does not read it as the input of x @ W"
    if _param(w):
        view, layout, wnode = None, "in_out", w
    elif _is_transpose(w):
        view, layout, wnode = w, "out_in", w.args[0]
    else:
        return f"{user.name} ({user.target}): right operand is computed in the graph, not a stored parameter"
    wv = wnode.meta.get("val")
    if isinstance(wv, torch.Tensor) and wv.dim() != 2:
        return f"{user.name} ({user.target}): weight {wnode.target} is not 2-D"
    add = _matmul_bias(user)
    bias = None
    if add is not None:
        bias = add.args[1] if add.args[0] is user else add.args[0]
    return Consumer(node=user, layout=layout, weight=wnode, bias=bias, module_path=_path(user),
                    weight_view=view, bias_add=add)


def _grouped_linear(user: fx.Node, src: fx.Node):
    """MoE experts: grouped_mm(x_sorted, W (E, in, out) or transpose(W (E, out, in)), offsets), no bias."""
    desc = f"{user.name} ({user.target})"
    if not user.args or user.args[0] is not src or any(a is src for a in user.args[1:]):
        return f"{desc} does not read it as the tokens of a grouped matmul"
    w = user.args[1]
    if _param(w):
        view, layout, wnode = None, "in_out", w
    elif isinstance(w, fx.Node) and w.target == aten.transpose.int and _param(w.args[0]) and \
            sorted(a % 3 for a in w.args[1:3]) == [1, 2]:
        view, layout, wnode = w, "out_in", w.args[0]
    else:
        return f"{desc}: expert weights are computed in the graph, not a stored (E, ., .) parameter"
    wv = wnode.meta.get("val")
    if not (isinstance(wv, torch.Tensor) and wv.dim() == 3):
        return f"{desc}: expert weights {wnode.target} are not 3-D"
    return Consumer(node=user, layout=layout, weight=wnode, bias=None, module_path=_path(user), weight_view=view)


_CASTS = {op for op in (getattr(aten.to, "dtype", None), getattr(aten._to_copy, "default", None)) if op is not None}


def _same_dtype_cast(w) -> bool:
    """w = param.to(its own dtype) (e.g. a router's self.weight.float() on a float32 model)."""
    if not (isinstance(w, fx.Node) and w.op == "call_function" and w.target in _CASTS and _param(w.args[0])):
        return False
    a, b = w.args[0].meta.get("val"), w.meta.get("val")
    return isinstance(a, torch.Tensor) and isinstance(b, torch.Tensor) and a.dtype == b.dtype and a.device == b.device


def _expert_select(w) -> bool:
    """w = stacked_param[e] (aten.select on dim 0 of a 3-D parameter): one expert's (out, in) weight."""
    if not (isinstance(w, fx.Node) and w.op == "call_function" and w.target == aten.select.int and _param(w.args[0])):
        return False
    pv = w.args[0].meta.get("val")
    return isinstance(pv, torch.Tensor) and pv.dim() == 3 and w.args[1] == 0


def _bmm_linear(user: fx.Node, src: fx.Node):
    """Experts as one batched matmul: bmm(x (E, T, in), W (E, in, out)) with W a stored parameter."""
    desc = f"{user.name} ({user.target})"
    if user.args[0] is not src or user.args[1] is src:
        return f"{desc} does not read it as the left operand"
    w = user.args[1]
    view = None
    if _same_dtype_cast(w):
        view, w = w, w.args[0]
    wv = w.meta.get("val") if _param(w) else None
    if not (isinstance(wv, torch.Tensor) and wv.dim() == 3):
        return f"{desc}: right operand is not a stored 3-D parameter"
    return Consumer(node=user, layout="in_out", weight=w, bias=None, module_path=_path(user), weight_view=view)


def as_linear(user: fx.Node, src: fx.Node):
    """Match `user` as a linear reading `src` as its input: Consumer, a reason (str), or None (not a linear)."""
    desc = f"{user.name} ({user.target})"
    if user.target == aten.linear.default:
        if user.args[0] is not src or any(a is src for a in user.args[1:]) or user.kwargs:
            return f"{desc} reads it as a weight, not as the input"
        w, b = user.args[1], (user.args[2] if len(user.args) > 2 else None)
        layout = "out_in"
    elif user.target == aten.addmm.default:
        if len(user.args) != 3 or user.kwargs or user.args[1] is not src or user.args[2] is src or user.args[0] is src:
            return f"{desc} is not a plain addmm(bias, x, W) on it"
        b, w = user.args[0], user.args[2]
        layout = "in_out"
    elif user.target == aten.matmul.default:
        return _matmul_linear(user, src)
    elif "grouped_mm" in str(user.target):
        return _grouped_linear(user, src)
    elif user.target == aten.bmm.default:
        return _bmm_linear(user, src)
    else:
        return None  # not a linear at all
    view = None
    if _same_dtype_cast(w) or _expert_select(w):
        view, w = w, w.args[0]
    if not _param(w):
        return f"{desc}: weight is computed in the graph, not a stored parameter"
    if b is not None and not _param(b):
        return f"{desc}: bias is computed in the graph, not a stored parameter"
    return Consumer(node=user, layout=layout, weight=w, bias=b, module_path=_path(user), weight_view=view)


def linear_output(node: fx.Node) -> Consumer | None:
    """The linear whose output `node` is (linear, addmm, matmul or matmul's bias add), else None."""
    if node.op != "call_function":
        return None
    if node.target == aten.add.Tensor:
        for mm in node.args:
            if isinstance(mm, fx.Node) and mm.target == aten.matmul.default:
                c = _matmul_linear(mm, None)
                if isinstance(c, Consumer) and c.bias_add is node:
                    return c
        return None
    if node.target == aten.matmul.default:
        c = _matmul_linear(node, None)
        return c if isinstance(c, Consumer) and c.bias_add is None else None
    if node.target in (aten.linear.default, aten.addmm.default):
        src = node.args[0] if node.target == aten.linear.default else node.args[1]
        c = as_linear(node, src) if isinstance(src, fx.Node) else None
        return c if isinstance(c, Consumer) else None
    return None


class StorageIndex:
    """get_attr target -> storage pointer, each looked up once (module getattr chains are slow).

    Share one across a pass's sites: a fold asks for storage users once per site and per linear, and
    resolving every attribute each time made the pass quadratic in the number of sites. A write that
    gives an existing target a new tensor must call `forget(target)` (write_linear does); new targets
    are looked up when first met. Node users are always read live from the graph.
    """

    def __init__(self, gm: fx.GraphModule):
        self.gm, self._keys = gm, {}

    def key(self, target: str) -> int | None:
        """The storage pointer of the tensor `target` names (None: not a tensor)."""
        if target not in self._keys:
            t = get_attr_tensor(self.gm, target)
            self._keys[target] = t.untyped_storage().data_ptr() if isinstance(t, torch.Tensor) else None
        return self._keys[target]

    def forget(self, target: str) -> None:
        """`target` now names another tensor: look it up again next time."""
        self._keys.pop(target, None)


def storage_uses(gm: fx.GraphModule, index: StorageIndex | None = None) -> dict[int, list[tuple[fx.Node, fx.Node]]]:
    """Storage pointer -> [(get_attr node, user node)] over every used get_attr tensor (`index`: cached pointers)."""
    index = index if index is not None else StorageIndex(gm)
    uses: dict[int, list] = {}
    for n in gm.graph.nodes:
        if n.op != "get_attr" or not n.users:
            continue
        key = index.key(n.target)
        if key is None:
            continue
        for u in n.users:
            if u.target not in _METADATA_ONLY:  # reads dtype / shape only, which a fold keeps
                uses.setdefault(key, []).append((n, u))
    return uses


def is_embedding_use(get_attr: fx.Node, user: fx.Node) -> bool:
    """True if `user` reads `get_attr` as an embedding table (a gather: the table is left bit-identical)."""
    return user.target == aten.embedding.default and user.args[0] is get_attr and \
        all(a is not get_attr for a in user.args[1:])


def weight_readers(c: Consumer) -> set:
    """The nodes that read c's weight get_attr as part of this linear."""
    return {c.weight_view if c.weight_view is not None else c.node}


def read_linear(gm, c: Consumer) -> tuple[torch.Tensor, torch.Tensor | None]:
    """(W as stored, b or None): the tensors the graph reads now."""
    w = get_attr_tensor(gm, c.weight.target)
    return w, (get_attr_tensor(gm, c.bias.target) if c.bias is not None else None)


def _exclusive(node: fx.Node, readers: set, uses, index: StorageIndex) -> bool:
    return set(node.users) <= readers and all(g is node for g, _ in uses.get(index.key(node.target), []))


def _new_attr(gm, qualname: str, value: torch.Tensor, like: torch.Tensor, created: list) -> fx.Node:
    name = register_tensor(gm, qualname, value, parameter=isinstance(like, torch.nn.Parameter))
    created.append(name)
    with gm.graph.inserting_before(next(iter(gm.graph.nodes))):  # with the other get_attr nodes, at the top
        return gm.graph.get_attr(name)


def _store(gm, node, new, old, readers, uses, created, index: StorageIndex) -> fx.Node:
    """Put `new` where `node` reads: in place of the attribute if exclusive, else as a fresh attribute."""
    if new is old:
        return node
    if _exclusive(node, readers, uses, index):
        register_tensor(gm, node.target, new, parameter=isinstance(old, torch.nn.Parameter), fresh=False)
        index.forget(node.target)
        return node
    return _new_attr(gm, node.target + "_folded", new, old, created)


def write_linear(gm: fx.GraphModule, group: list[Consumer], w2: torch.Tensor, b2: torch.Tensor | None,
                 readers: set, index: StorageIndex | None = None) -> tuple[set, list]:
    """Give every linear in `group` (same weight / bias nodes) the weight w2 and bias b2.

    `readers`: the nodes allowed to share the old attribute (it is replaced in place only when nothing
    else reads its storage). `index`: the pass's shared StorageIndex (kept up to date here).
    Returns (released attr names, created attr names).
    """
    index = index if index is not None else StorageIndex(gm)
    uses, created, released = storage_uses(gm, index), [], set()
    c0 = group[0]
    w_old, b_old = read_linear(gm, c0)
    w_node = _store(gm, c0.weight, w2, w_old, readers, uses, created, index)
    if c0.bias is not None:
        b_node = _store(gm, c0.bias, b2, b_old, readers, uses, created, index)
    elif b2 is not None:
        owner, _, leaf = c0.weight.target.rpartition(".")
        b_node = _new_attr(gm, f"{owner}.bias" if owner else f"{leaf}_bias", b2, w_old, created)
    else:
        b_node = None
    for c in group:
        _set_weight(gm, c, w_node)
        _set_bias(gm, c, b_node)
        for old in (c.weight, c.bias):
            if old is not None and old not in (w_node, b_node):
                released.add(old.target)
    return released, created


def _set_weight(gm, c: Consumer, w_node: fx.Node) -> None:
    if w_node is c.weight:
        return
    if c.weight_view is not None:
        with gm.graph.inserting_before(c.node):
            v = gm.graph.call_function(c.weight_view.target, (w_node, *c.weight_view.args[1:]), c.weight_view.kwargs)
        v.meta.update(c.weight_view.meta)
        c.node.args = tuple(v if a is c.weight_view else a for a in c.node.args)
        c.weight_view = v
    else:
        args = list(c.node.args)
        args[2 if c.node.target == aten.addmm.default else 1] = w_node
        c.node.args = tuple(args)
    c.weight = w_node


def _set_bias(gm, c: Consumer, b_node: fx.Node | None) -> None:
    if b_node is None or b_node is c.bias:
        return
    if c.node.target == aten.linear.default:
        c.node.args = (*c.node.args[:2], b_node)
    elif c.node.target == aten.addmm.default:
        c.node.args = (b_node, *c.node.args[1:])
    elif c.bias_add is not None:
        c.bias_add.args = tuple(b_node if a is c.bias else a for a in c.bias_add.args)
    else:  # matmul without a bias: add one after it
        with gm.graph.inserting_after(c.node):
            add = gm.graph.call_function(aten.add.Tensor, (c.node, b_node))
        add.meta.update({k: v for k, v in c.node.meta.items() if k in ("nn_module_stack", "val", "stack_trace")})
        c.node.replace_all_uses_with(add, delete_user_cb=lambda u: u is not add)
        c.bias_add = add
    c.bias = b_node



def is_expert_matmul(c: Consumer) -> bool:
    """True for experts computed together: grouped_mm (rows sorted by expert, offsets) or bmm (E, T, .)."""
    return c.node.target == aten.bmm.default or "grouped_mm" in str(c.node.target)


def add_expert_shift(gm: fx.GraphModule, c: Consumer, table: torch.Tensor) -> str:
    """After expert matmul c, add table[e] (E, out) to every row of expert e; returns the new attribute name.

    grouped_mm: row i belongs to expert searchsorted(offsets, i, right=True) (offsets = cumulative row counts);
    bmm: the (E, T, out) output gets table[:, None, :].
    """
    g = gm.graph
    owner = c.weight.target.rpartition(".")[0]
    name = register_tensor(gm, f"{owner}.expert_shift" if owner else f"{c.weight.target}_expert_shift",
                           table if c.node.target != aten.bmm.default else table[:, None, :], parameter=False)
    with g.inserting_after(c.node):
        tab = g.get_attr(name)
    if c.node.target == aten.bmm.default:
        with g.inserting_after(tab):
            add = g.call_function(aten.add.Tensor, (c.node, tab))
    else:
        x, offs = c.node.args[0], c.node.args[2]
        ov = offs.meta.get("val")
        with g.inserting_after(tab):
            n = g.call_function(aten.sym_size.int, (x, 0))
        with g.inserting_after(n):
            rows = g.call_function(aten.arange.default, (n,), {"dtype": ov.dtype, "device": ov.device})
        with g.inserting_after(rows):
            e = g.call_function(aten.searchsorted.Tensor, (offs, rows), {"right": True})
        with g.inserting_after(e):
            e = g.call_function(aten.clamp.default, (e, None, table.shape[0] - 1))
        with g.inserting_after(e):
            per_row = g.call_function(aten.index.Tensor, (tab, [e]))
        with g.inserting_after(per_row):
            add = g.call_function(aten.add.Tensor, (c.node, per_row))
    add.meta.update({k: v for k, v in c.node.meta.items() if k in ("nn_module_stack", "val", "stack_trace")})
    c.node.replace_all_uses_with(add, delete_user_cb=lambda u: u is not add)
    return name
