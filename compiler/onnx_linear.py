"""Linears in an ONNX graph (onnx-graphsurgeon): find them before or after a gate-zero map, give them new weights.

A linear is MatMul(h, W) (W a constant (in, out)), optionally followed by Add(., b) with a constant
(out,) b, or Gemm(h, B, C?) (transA=0; B constant, C constant or absent). Weights are handled in
(in, out) float64 here and written back in the stored layout and dtype, always as new constants
(a weight that other nodes read keeps its old values for them: "untied").
"""
from __future__ import annotations

import numpy as np
import onnx_graphsurgeon as gs

__all__ = ["const", "new_const", "linear_consumers", "producing_linear", "matmul_bias_add", "read_linear",
           "write_linear", "FLOAT"]

FLOAT = (np.float16, np.float32, np.float64)
# ops that pass whole rows of d features through unchanged (checked per node by _keeps_rows)
_PASS = ("Reshape", "Flatten", "Identity")


def const(t) -> np.ndarray | None:
    """The value of a constant tensor, else None."""
    return t.values if isinstance(t, gs.Constant) else None


def new_const(name: str, value: np.ndarray, taken: set) -> gs.Constant:
    """A constant with a name not yet in `taken` (which it joins)."""
    base, i = name, 0
    while name in taken:
        i += 1
        name = f"{base}_{i}"
    taken.add(name)
    return gs.Constant(name, np.ascontiguousarray(value))


def _last(t) -> int | None:
    shape = getattr(t, "shape", None)
    return shape[-1] if shape and isinstance(shape[-1], int) else None


def _keeps_rows(n, d: int, merge: bool = False):
    """1 if pass-through node `n` keeps rows of d features whole; k if (merge allowed) a Reshape merges k
    consecutive rows of d into one row of k * d (heads merged); else why not (str)."""
    if n.op == "Identity":
        return 1
    out = n.outputs[0]
    if n.op == "Reshape":
        last = _last(out)
        if last is None and len(n.inputs) > 1 and const(n.inputs[1]) is not None:
            shape = const(n.inputs[1]).reshape(-1)
            last = int(shape[-1]) if shape.size and shape[-1] > 0 else None
        if last == d:
            return 1
        src, dst = getattr(n.inputs[0], "shape", None), getattr(out, "shape", None)
        if merge and src is not None and dst is not None and len(src) >= 2 and isinstance(src[-2], int) and \
                src[-1] == d and list(dst[:-1]) == list(src[:-2]) and last == src[-2] * d:
            return src[-2]
        return f"{n.name} (Reshape) output's last dim is {last}, not {d}"
    rank = len(n.inputs[0].shape) if getattr(n.inputs[0], "shape", None) is not None else None
    axis = n.attrs.get("axis", 1)
    if rank is not None and axis % rank == rank - 1:
        return 1
    return f"{n.name} (Flatten axis={axis}) merges features of rows"


def linear_info(n, reader) -> tuple[np.ndarray | None, str | None]:
    """(W as stored, None) if node n is a linear reading `reader` as its input, else (None, reason)."""
    if n.op not in ("MatMul", "Gemm") or n.inputs[0] is not reader:
        return None, f"consumer {n.name} is {n.op}, not MatMul/Gemm reading it as the activation"
    w = const(n.inputs[1])
    if n.op == "Gemm" and n.attrs.get("transA", 0):
        return None, f"consumer {n.name} (Gemm) has transA=1"
    if w is None or w.ndim != 2:
        return None, f"consumer {n.name} ({n.op}) has no constant 2-D weight"
    if n.op == "Gemm" and len(n.inputs) > 2 and n.inputs[2].name and const(n.inputs[2]) is None:
        return None, f"consumer {n.name} (Gemm) has a non-constant C"
    if w.dtype.type not in FLOAT:
        return None, f"consumer {n.name} weight is {w.dtype}, not floating point"
    return w, None


def _w_in_out(n) -> np.ndarray:
    w = const(n.inputs[1]).astype(np.float64)
    return w.T if n.op == "Gemm" and n.attrs.get("transB", 0) else w


def linear_consumers(graph, y, d: int, merge: bool = False):
    """([(linear, tile)], None) if every reader of y, through row-keeping Reshape / Flatten / Identity (and,
    when `merge`, Reshapes merging heads: the linear then reads `tile` copies of the d features side by side),
    is a linear with a constant (tile * d, out) weight; else ([], reason)."""
    if not y.outputs:
        return [], f"{y.name} has no consumers"
    found, todo = [], [(y, 1)]
    while todo:
        t, tile = todo.pop()
        if t in graph.outputs:
            return [], f"{t.name} is a graph output"
        for n in t.outputs:
            if n.op in _PASS and n.inputs[0] is t:
                k = _keeps_rows(n, d * tile, merge)
                if isinstance(k, str):
                    return [], f"consumer {k}"
                todo.append((n.outputs[0], tile * k))
                continue
            w, why = linear_info(n, t)
            if why:
                return [], why
            if _w_in_out(n).shape[0] != d * tile:
                return [], f"consumer {n.name} weight {n.inputs[1].name} is {w.shape}, in-dim not {d * tile}"
            found.append((n, tile))
    return found, None


def producing_linear(t):
    """(linear node, bias Add or None) computing tensor t = h W + b, or (None, reason)."""
    add = None
    if isinstance(t, gs.Variable) and len(t.inputs) == 1 and t.inputs[0].op == "Add":
        add = t.inputs[0]
        a, b = add.inputs
        mm, c = (a, b) if const(b) is not None else (b, a)
        if const(c) is None or not (isinstance(mm, gs.Variable) and len(mm.inputs) == 1 and mm.inputs[0].op == "MatMul"):
            return None, f"{t.name} comes from Add, not from a linear"
        if len(mm.outputs) != 1:
            return None, f"{mm.name} (a MatMul output) is read by more than its bias Add"
        t = mm
    if not (isinstance(t, gs.Variable) and len(t.inputs) == 1):
        return None, f"{t.name} is a graph input, not a linear's output"
    n = t.inputs[0]
    w, why = linear_info(n, n.inputs[0] if n.inputs else None)
    if why:
        return None, f"{t.name} comes from {n.op} ({n.name}), not from a MatMul/Gemm with a constant weight"
    if add is not None:
        c = const(add.inputs[1] if const(add.inputs[1]) is not None else add.inputs[0])
        if c.size != _w_in_out(n).shape[1] or any(s != 1 for s in c.shape[:-1]):
            return None, f"{add.name}: bias of shape {c.shape} is not a per-output vector"
    return (n, add), None


def matmul_bias_add(graph, n):
    """The Add(MatMul output, constant (out,) bias) right after MatMul n, when it is the output's only reader."""
    if n.op != "MatMul":
        return None
    out = n.outputs[0]
    nxt = out.outputs[0] if len(out.outputs) == 1 and out not in graph.outputs else None
    if nxt is None or nxt.op != "Add":
        return None
    other = nxt.inputs[1] if nxt.inputs[0] is out else nxt.inputs[0]
    c = const(other)
    w_out = const(n.inputs[1]).shape[1]
    if c is None or c.size != w_out or any(d != 1 for d in c.shape[:-1]) or c.dtype.type not in FLOAT:
        return None
    return nxt


def read_linear(n, add=None) -> tuple[np.ndarray, np.ndarray | None]:
    """(W (in, out), effective bias (out,) or None) in float64: Gemm's alpha / beta applied."""
    w = _w_in_out(n)
    if n.op == "Gemm":
        w = w * float(n.attrs.get("alpha", 1.0))
        if len(n.inputs) > 2 and n.inputs[2].name:
            c = const(n.inputs[2]).astype(np.float64).reshape(-1) * float(n.attrs.get("beta", 1.0))
            return w, (np.full(w.shape[1], c[0]) if c.size == 1 else c.copy())
        return w, None
    if add is not None:
        c = const(add.inputs[1] if const(add.inputs[1]) is not None else add.inputs[0])
        return w, c.astype(np.float64).reshape(-1)
    return w, None


def write_linear(graph, n, w_io: np.ndarray, b: np.ndarray | None, taken: set, untied: list, add=None) -> None:
    """Store W (in, out) and bias b (out,) (float64, Gemm alpha / beta already applied) into linear n."""
    w_t = const(n.inputs[1])
    if len(n.inputs[1].outputs) > 1:
        untied.append(n.inputs[1].name)
    dtype = w_t.dtype
    if n.op == "Gemm":
        w_io = w_io / float(n.attrs.get("alpha", 1.0))
    stored = w_io.T if n.op == "Gemm" and n.attrs.get("transB", 0) else w_io
    n.inputs[1] = new_const(f"{n.inputs[1].name}_tnfold", stored.astype(dtype), taken)
    if b is None:
        return
    if n.op == "Gemm":
        beta = float(n.attrs.get("beta", 1.0))
        if len(n.inputs) > 2 and n.inputs[2].name and beta != 0.0:
            c = const(n.inputs[2])
            n.inputs[2] = new_const(f"{n.inputs[2].name}_tnfold", (b / beta).astype(c.dtype), taken)
        else:
            n.attrs["beta"] = 1.0
            c_new = new_const(f"{n.name}_tnfold_bias", b.astype(dtype), taken)
            if len(n.inputs) > 2:
                n.inputs[2] = c_new
            else:
                n.inputs.append(c_new)
        return
    if add is not None:  # MatMul: its constant-bias Add takes it, else one is inserted
        idx = 1 if const(add.inputs[1]) is not None else 0
        c = const(add.inputs[idx])
        add.inputs[idx] = new_const(f"{add.inputs[idx].name}_tnfold", b.reshape(c.shape).astype(c.dtype), taken)
        return
    out = n.outputs[0]
    mid = gs.Variable(f"{out.name}_tnfold_mm", dtype=out.dtype, shape=out.shape)
    n.outputs[0] = mid
    graph.nodes.append(gs.Node("Add", f"{n.name}_tnfold_bias", inputs=[mid, new_const(f"{n.name}_tnfold_b", b.astype(dtype), taken)],
                               outputs=[out]))
