"""The gate-zero fold on ONNX graphs (onnx-graphsurgeon), usable on models exported by any tool.

Two rules, tried LN first (its Mul would otherwise look like an RMS map feeding an Add):

    ln:   Add(Mul(Sub(x, ReduceMean(x, axes=[-1])), s), beta)  -> consumers   (Mul / Add optional)
    rms:  Mul(x, s)                                            -> consumers

where s (d,) and beta (d,) are constants and every consumer of the map's output is a linear with a
constant weight: MatMul(y, W (d, out)) or Gemm(y, B, C) (transA=0). In ONNX layout (W is (in, out)):

    rms:  W' = s[:, None] * W
    ln:   M  = s[:, None] * W;  W' = M - M.mean(axis=0);  b' = b + beta @ W

(the transpose of DESIGN.md section 2's torch-layout table). Arithmetic in float64, cast to W's dtype.
A site folds into every consumer or none (the refusal names the reason). A weight read by other
nodes gets its own folded copy (reported as untied). The map's nodes become dead and cleanup()
removes them. `cleanup_onnx` is the plain cleanup + toposort pass (run on every
tapernorm export). `check_statistics` verifies that folded layers keep no normalization statistics.
"""
from __future__ import annotations

import ast

import numpy as np
import onnx
import onnx_graphsurgeon as gs

from .onnx_io import load_onnx, save_onnx

__all__ = ["fold_onnx", "fold_onnx_file", "cleanup_onnx", "check_statistics", "STAT_OPS"]

STAT_OPS = ("ReduceMean", "Pow", "Sqrt", "Reciprocal", "SimplifiedLayerNormalization", "LayerNormalization",
            "SkipSimplifiedLayerNormalization", "SkipLayerNormalization", "RMSNormalization")
_FLOAT = (np.float16, np.float32, np.float64)


# -- matching helpers (each returns a value or None; callers turn None into a reason) -----------------
def _const(t) -> np.ndarray | None:
    return t.values if isinstance(t, gs.Constant) else None


def _producer(t, op: str):
    if isinstance(t, gs.Variable) and len(t.inputs) == 1 and t.inputs[0].op == op:
        return t.inputs[0]
    return None


def _split_const(node) -> tuple:
    """(variable input, constant value, constant tensor) of a binary op with one constant side, else Nones."""
    a, b = node.inputs
    if _const(b) is not None and _const(a) is None:
        return a, _const(b), b
    if _const(a) is not None and _const(b) is None:
        return b, _const(a), a
    return None, None, None


def _feature_vector(v: np.ndarray, d: int | None) -> np.ndarray | None:
    """v as a (d,) float vector if it only varies along the last dim (or is a scalar), else None."""
    if v.dtype.type not in _FLOAT or any(n != 1 for n in v.shape[:-1]):
        return None
    flat = v.reshape(-1)
    if d is not None and flat.size == 1:
        return np.full(d, flat[0], dtype=v.dtype)
    return flat if d is None or flat.size == d else None


def _reduces_last_axis(rm, rank: int | None) -> bool:
    axes = rm.attrs.get("axes")
    if axes is None and len(rm.inputs) > 1:
        axes = _const(rm.inputs[1])
    if axes is None or not rm.attrs.get("keepdims", 1):
        return False
    axes = [int(a) for a in np.asarray(axes).reshape(-1)]
    return axes == [-1] or (rank is not None and axes == [rank - 1])


# -- consumers ---------------------------------------------------------------------------------------
def _linear_consumers(graph, y, d: int):
    """([(node, W (in, out) float64 view info)], None) if every consumer of y is a foldable linear, else ([], reason)."""
    if y in graph.outputs:
        return [], f"{y.name} is a graph output"
    if not y.outputs:
        return [], f"{y.name} has no consumers"
    found = []
    for n in y.outputs:
        if n.op == "MatMul" and n.inputs[0] is y:
            w = _const(n.inputs[1])
            if w is None or w.ndim != 2:
                return [], f"consumer {n.name} (MatMul) has no constant 2-D weight"
            if w.shape[0] != d:
                return [], f"consumer {n.name} weight {n.inputs[1].name} is {w.shape}, not ({d}, out)"
        elif n.op == "Gemm" and n.inputs[0] is y:
            w = _const(n.inputs[1])
            if n.attrs.get("transA", 0):
                return [], f"consumer {n.name} (Gemm) has transA=1"
            if w is None or w.ndim != 2:
                return [], f"consumer {n.name} (Gemm) has no constant weight B"
            if (w.shape[1] if n.attrs.get("transB", 0) else w.shape[0]) != d:
                return [], f"consumer {n.name} weight {n.inputs[1].name} is {w.shape}, in-dim not {d}"
            if len(n.inputs) > 2 and n.inputs[2].name and _const(n.inputs[2]) is None:
                return [], f"consumer {n.name} (Gemm) has a non-constant C"
        else:
            return [], f"consumer {n.name} is {n.op}, not MatMul/Gemm reading it as the activation"
        if w.dtype.type not in _FLOAT:
            return [], f"consumer {n.name} weight is {w.dtype}, not floating point"
        found.append(n)
    return found, None


# -- rewrite -----------------------------------------------------------------------------------------
def _new_const(name: str, value: np.ndarray, taken: set) -> gs.Constant:
    base, i = name, 0
    while name in taken:
        i += 1
        name = f"{base}_{i}"
    taken.add(name)
    return gs.Constant(name, np.ascontiguousarray(value))


def _rewrite_consumer(graph, n, x, s64, beta64, center: bool, taken: set, untied: list) -> None:
    """Make linear `n` read x with folded weights (and bias for beta)."""
    w_t = n.inputs[1]
    w = w_t.values
    trans = n.op == "Gemm" and n.attrs.get("transB", 0)
    w_io = w.T.astype(np.float64) if trans else w.astype(np.float64)  # (in, out)
    m = s64[:, None] * w_io
    if center:
        m = m - m.mean(axis=0, keepdims=True)
    shared = len(w_t.outputs) > 1
    if shared:
        untied.append(w_t.name)
    n.inputs[1] = _new_const(f"{w_t.name}_tnfold", (m.T if trans else m).astype(w.dtype), taken)
    n.inputs[0] = x
    if beta64 is None:
        return
    db = beta64 @ w_io  # (out,) = beta @ W
    if n.op == "Gemm":
        alpha, beta_attr = float(n.attrs.get("alpha", 1.0)), float(n.attrs.get("beta", 1.0))
        if len(n.inputs) > 2 and n.inputs[2].name:
            c = n.inputs[2].values  # beta_attr != 0 here: _try_site refuses Gemm beta=0 with a C input
            c_new = c.astype(np.float64) + alpha / beta_attr * db
            n.inputs[2] = _new_const(f"{n.inputs[2].name}_tnfold", c_new.astype(c.dtype), taken)
        else:
            n.attrs["beta"] = 1.0
            n.inputs.append(_new_const(f"{n.name}_tnfold_bias", (alpha * db).astype(w.dtype), taken))
        return
    out = n.outputs[0]  # MatMul: fold into a following constant-bias Add, else insert one
    add = out.outputs[0] if len(out.outputs) == 1 and out not in graph.outputs else None
    if add is not None and add.op == "Add":
        other = add.inputs[1] if add.inputs[0] is out else add.inputs[0]
        b = _const(other)
        if b is not None and b.dtype == w.dtype and b.shape[-1:] == (w_io.shape[1],) and b.size == w_io.shape[1]:
            idx = list(add.inputs).index(other)
            add.inputs[idx] = _new_const(f"{other.name}_tnfold", (b.astype(np.float64) + db.reshape(b.shape)).astype(b.dtype), taken)
            return
    mid = gs.Variable(f"{out.name}_tnfold_mm", dtype=out.dtype, shape=out.shape)
    n.outputs[0] = mid
    graph.nodes.append(gs.Node("Add", f"{n.name}_tnfold_bias", inputs=[mid, _new_const(f"{n.name}_tnfold_b", db.astype(w.dtype), taken)],
                               outputs=[out]))


# -- rules: pattern + check (None or a reason) + rewrite ---------------------------------------------
def _match_ln(node):
    """For an Add/Mul node: (x, s, beta, map output) of the gate-zero LN pattern ending there, else None."""
    beta = None
    mul = node
    if node.op == "Add":
        v, c, _ = _split_const(node)
        mul = _producer(v, "Mul") if v is not None else None
        if mul is None:
            return None
        beta = c
    if mul.op != "Mul":
        return None
    v, s, _ = _split_const(mul)
    sub = _producer(v, "Sub") if v is not None else None
    if sub is None:
        return None
    x, centered_mean = sub.inputs
    rm = _producer(centered_mean, "ReduceMean")
    if rm is None or rm.inputs[0] is not x:
        return None
    rank = len(x.shape) if isinstance(x, gs.Variable) and x.shape is not None else None
    if not _reduces_last_axis(rm, rank):
        return None
    return x, s, beta, node.outputs[0]


def _check_vectors(s, beta):
    d = s.size if s.ndim and s.size > 1 else (beta.size if beta is not None and beta.size > 1 else None)
    s_vec = _feature_vector(s, d)
    if s_vec is None:
        return None, None, None, f"scale constant of shape {s.shape} is not a per-feature (last-dim) vector"
    if d is None:
        d = s_vec.size
    b_vec = None
    if beta is not None:
        b_vec = _feature_vector(beta, d)
        if b_vec is None:
            return None, None, None, f"shift constant of shape {beta.shape} is not a per-feature vector of size {d}"
    return s_vec, b_vec, d, None


def _infer_d(graph, y, s) -> int | None:
    """Feature size from the first consumer's weight when the scale is a scalar."""
    for n in y.outputs:
        w = _const(n.inputs[1]) if n.op in ("MatMul", "Gemm") and len(n.inputs) > 1 else None
        if w is not None and w.ndim == 2:
            return w.shape[1] if n.op == "Gemm" and n.attrs.get("transB", 0) else w.shape[0]
    return None


def _try_site(graph, node, rule: str, taken: set):
    """Apply `rule` at `node`: ('folded', info) | ('refused', reason) | (None, None) when no pattern."""
    if rule == "ln":
        m = _match_ln(node)
        if m is None:
            return None, None
        x, s, beta, y = m
        center = True
    else:
        if node.op != "Mul":
            return None, None
        x, s, _ = _split_const(node)
        if x is None:
            return None, None
        beta, y, center = None, node.outputs[0], False
    if s.size == 1 and (beta is None or beta.size == 1):
        d = _infer_d(graph, y, s)
        if d is None:
            return "refused", f"{node.name}: scalar scale and no MatMul/Gemm consumer with a constant weight"
        s = np.full(d, s.reshape(-1)[0], dtype=s.dtype)
    s_vec, b_vec, d, reason = _check_vectors(s, beta)
    if reason:
        return "refused", f"{node.name}: {reason}"
    consumers, reason = _linear_consumers(graph, y, d)
    if reason:
        return "refused", f"{node.name}: {reason}"
    for n in consumers:
        if b_vec is not None and n.op == "Gemm" and len(n.inputs) > 2 and n.inputs[2].name and not n.attrs.get("beta", 1.0):
            return "refused", f"{node.name}: consumer {n.name} (Gemm) has beta=0 with a C input"
    untied: list[str] = []
    s64 = s_vec.astype(np.float64)
    b64 = b_vec.astype(np.float64) if b_vec is not None else None
    for n in consumers:
        _rewrite_consumer(graph, n, x, s64, b64, center, taken, untied)
    return "folded", {"rule": rule, "node": node.name, "input": x.name, "consumers": [n.name for n in consumers],
                      "untied": sorted(set(untied))}


def _export_like(graph, model: onnx.ModelProto) -> onnx.ModelProto:
    """gs graph -> ModelProto keeping `model`'s IR version, opsets, metadata and node metadata."""
    out = gs.export_onnx(graph)
    out.ir_version = model.ir_version
    del out.opset_import[:]
    out.opset_import.extend(model.opset_import)
    out.metadata_props.extend(model.metadata_props)
    meta = {n.name: n.metadata_props for n in model.graph.node if n.name and n.metadata_props}
    for n in out.graph.node:  # graphsurgeon drops node metadata (the exporter's name scopes): restore it
        if n.name in meta and not n.metadata_props:
            n.metadata_props.extend(meta[n.name])
    for attr in ("producer_name", "producer_version", "domain", "model_version", "doc_string"):
        setattr(out, attr, getattr(model, attr))
    return out


def cleanup_onnx(model: onnx.ModelProto) -> tuple[onnx.ModelProto, dict]:
    """graphsurgeon cleanup (dead nodes / tensors; graph inputs kept) + toposort; returns (model, report).

    The input model is not modified; IR version, opsets and (node) metadata are kept.
    """
    graph = gs.import_onnx(model)
    n_before, init_before = len(graph.nodes), len(model.graph.initializer)
    graph.cleanup(remove_unused_graph_inputs=False).toposort()
    out = _export_like(graph, model)
    return out, {"nodes_before": n_before, "nodes_after": len(out.graph.node),
                 "initializers_before": init_before, "initializers_after": len(out.graph.initializer),
                 "toposorted": True}


def fold_onnx(model: onnx.ModelProto) -> tuple[onnx.ModelProto, dict]:
    """Fold every per-feature constant Mul (and LN centering + Add) into following MatMul/Gemm weights.

    Returns (new model, report {"folded": n, "sites": [...], "refused": [{"node", "reason"}]}).
    The input model is not modified; IR version, opsets and metadata_props are kept.
    """
    graph = gs.import_onnx(model)
    graph.fold_constants(fold_shapes=False)
    graph.cleanup()
    taken = {t for t in graph.tensors()}
    for i, node in enumerate(graph.nodes):  # reports name sites; give unnamed nodes a name
        node.name = node.name or f"{node.op}_{i}"
    sites, refused, used = [], [], set()
    for rule in ("ln", "rms"):
        # longest pattern first: an LN site ending in Add owns its Mul, so visit Adds before Muls
        for node in sorted(graph.nodes, key=lambda n: n.op != "Add"):
            if id(node) in used or node.op not in ("Add", "Mul"):
                continue
            status, info = _try_site(graph, node, rule, taken)
            if status is None:
                continue
            used.add(id(node))
            if rule == "ln" and node.op == "Add":  # its Mul must not be folded alone (half an LN map)
                used.add(id(_producer(_split_const(node)[0], "Mul")))
            if status == "folded":
                sites.append(info)
            else:
                refused.append({"node": node.name, "reason": info})
        graph.cleanup()
    graph.cleanup(remove_unused_graph_inputs=False).toposort()
    out = _export_like(graph, model)
    return out, {"folded": len(sites), "sites": sites, "refused": refused}


def fold_onnx_file(src: str, dst: str) -> dict:
    """Fold `src` into `dst` (written atomically, inline weights); returns the report."""
    model, report = fold_onnx(load_onnx(src))
    onnx.checker.check_model(model)
    save_onnx(model, dst)
    return report


# -- statistics checker -------------------------------------------------------------------------------
def _scope(node) -> str | None:
    """Innermost module path from the torch exporter's name_scopes metadata (None when absent)."""
    for p in node.metadata_props:
        if p.key == "pkg.torch.onnx.name_scopes":
            try:
                scopes = ast.literal_eval(p.value)  # a Python list literal of str
            except (ValueError, SyntaxError):
                return None
            mods = [s for s in scopes[:-1] if s]
            return mods[-1] if mods else ""
    return None


def _matches(scope: str, layer: str) -> bool:
    return scope == layer or scope.endswith("." + layer) or f".{layer}." in f".{scope}." or scope.startswith(layer + ".")


def check_statistics(model: onnx.ModelProto, folded_layers: list[str], expect_total: int | None = None) -> dict:
    """Check no normalization-statistic op (STAT_OPS) belongs to a folded layer.

    Nodes are attributed to layers through the torch exporter's name_scopes metadata. `expect_total`
    (optional) bounds the statistic ops allowed in the whole graph (e.g. 0 for a fully folded model),
    which also covers nodes without metadata. Returns {"ok", "offending": {layer: [node names]},
    "total": n, "by_op": {...}, "unattributed": n, "reason"}.
    """
    offending: dict[str, list[str]] = {}
    by_op: dict[str, int] = {}
    total = unattributed = 0
    for n in model.graph.node:
        if n.op_type not in STAT_OPS:
            continue
        total += 1
        by_op[n.op_type] = by_op.get(n.op_type, 0) + 1
        scope = _scope(n)
        if scope is None:
            unattributed += 1
            continue
        for layer in folded_layers:
            if _matches(scope, layer):
                offending.setdefault(layer, []).append(f"{n.name} ({n.op_type})")
    reason = None
    if offending:
        first = next(iter(offending))
        reason = f"folded layer {first} still computes statistics: {', '.join(offending[first][:3])}"
    elif expect_total is not None and total > expect_total:
        reason = f"{total} statistic ops remain ({by_op}), at most {expect_total} expected"
    return {"ok": reason is None, "offending": offending, "total": total, "by_op": by_op,
            "unattributed": unattributed, "folded_layers": list(folded_layers), "reason": reason}
