"""The gate-zero fold on ONNX graphs (onnx-graphsurgeon), usable on models exported by any tool.

Two rules, tried LN first (its Mul would otherwise look like an RMS map feeding an Add):

    ln:   Add(Mul(Sub(x, ReduceMean(x, axes=[-1])), s), beta)  -> consumers   (Mul / Add optional)
    rms:  Mul(x, s)                                            -> consumers

where s (d,) and beta (d,) are constants. Forward: every reader of the map's output, through
row-keeping Reshape / Flatten / Identity (HF GPT-2's Conv1D exports as Reshape -> Gemm), is a
linear with a constant weight, MatMul(y, W (d, out)) [+ Add b] or Gemm(y, B, C) (transA=0).
In ONNX layout (W is (in, out)):

    rms:  W' = s[:, None] * W
    ln:   M  = s[:, None] * W;  W' = M - M.mean(axis=0);  b' = b + beta @ W

(the transpose of passes.fold_math's torch layout, whose functions compute it). Backward, when no linear follows
(post-norms, QK-norms): x is a linear's output h W + b, optionally reshaped to (..., G, d) heads;
output feature f sits at position f % d of group f // d, and

    rms:  W'[:, f] = s[f % d] W[:, f]                            b'_f = s[f % d] b_f
    ln:   W'[:, f] = s[f % d] (W[:, f] - mean_group W)           b'_f = s[f % d] (b_f - mean_group b) + beta[f % d]

Arithmetic in float64, cast to W's dtype. A site folds entirely or not at all (the refusal names the
reason). Norm sites (LN patterns, per-feature vector scales over the input's last dim) are reported
apart from other constant Muls (scalars such as attention scales, broadcasts such as RoPE's
frequencies), which fold when a linear follows and are otherwise listed, not refused.
`fold_onnx_file` checks the result against the original with onnxruntime before writing anything.
"""
from __future__ import annotations

import os
import tempfile
from pathlib import Path

import numpy as np
import onnx
import onnx_graphsurgeon as gs
import torch

from tapernorm.passes.fold_math import fold_linear, fold_linear_rows

from .onnx_io import load_onnx, save_onnx
from .onnx_linear import FLOAT as _FLOAT
from .onnx_linear import const as _const
from .onnx_linear import linear_consumers, matmul_bias_add, producing_linear, read_linear, write_linear
from .onnx_stats import STAT_OPS, _scope, check_statistics
from .onnx_verify import VerifyError, compare_files

__all__ = ["fold_onnx", "fold_onnx_file", "cleanup_onnx", "check_statistics", "STAT_OPS", "VerifyError"]

# -- matching helpers (each returns a value or None; callers turn None into a reason) -----------------
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
    """Feature size from the first consumer's weight (through pass-through ops) when the scale is a scalar."""
    todo = [y]
    while todo:
        t = todo.pop()
        for n in t.outputs:
            if n.op in ("Reshape", "Flatten", "Identity"):
                todo.append(n.outputs[0])
                continue
            w = _const(n.inputs[1]) if n.op in ("MatMul", "Gemm") and len(n.inputs) > 1 else None
            if w is not None and w.ndim == 2:
                return w.shape[1] if n.op == "Gemm" and n.attrs.get("transB", 0) else w.shape[0]
    return None


def _shape(t):
    return list(t.shape) if isinstance(t, gs.Variable) and t.shape is not None else None


def _is_norm(x, s: np.ndarray, rule: str) -> bool:
    """An LN pattern, or a per-feature vector scale over x's last dim (not a scalar, not a broadcast)."""
    if rule == "ln":
        return True
    if s.size <= 1 or any(n != 1 for n in s.shape[:-1]):
        return False
    shape = _shape(x)
    last = shape[-1] if shape else None
    return not isinstance(last, int) or last == s.size


def _reroute(y, x) -> None:
    """Every node reading y reads x instead."""
    for n in list(y.outputs):
        for i, t in enumerate(list(n.inputs)):
            if t is y:
                n.inputs[i] = x


def _fold_forward(graph, x, y, s64, b64, center, d, taken):
    """Fold the map into every linear reading y (through pass-through ops); None or the reason it cannot."""
    found, reason = linear_consumers(graph, y, d, merge=not center)  # heads merged: RMS maps only
    if reason:
        return None, reason
    consumers, tiles = [n for n, _ in found], {id(n): k for n, k in found}
    for n in consumers:
        if b64 is not None and n.op == "Gemm" and len(n.inputs) > 2 and n.inputs[2].name and not n.attrs.get("beta", 1.0):
            return None, f"consumer {n.name} (Gemm) has beta=0 with a C input"
    untied: list[str] = []
    for n in consumers:
        add = matmul_bias_add(graph, n)
        w, b = read_linear(n, add)  # (in, out), effective bias
        beta = (b64 if b64 is not None else np.zeros_like(s64)) if center else None  # LN maps never merge heads
        m, b = _fold_math(fold_linear, w, b, np.tile(s64, tiles[id(n)]), beta)  # merged: row j reads feature j % d
        write_linear(graph, n, m, b, taken, untied, add)
    _reroute(y, x)  # the first readers (linears or pass-through ops) now read x
    return {"consumers": [n.name for n in consumers], "untied": sorted(set(untied))}, None


def _fold_math(fn, w: np.ndarray, b, s64, beta, **kw):
    """passes.fold_math's `fn` (fold_linear / fold_linear_rows) on numpy (in, out) weights, in float64."""
    t = lambda a: None if a is None else torch.from_numpy(np.asarray(a, dtype=np.float64))  # noqa: E731
    wn, bn = fn(t(w), t(b), t(s64), t(beta), layout="in_out", **kw)
    return wn.numpy(), (bn.numpy() if bn is not None else None)


def _fold_backward(graph, x, y, map_nodes, s64, b64, center, d, taken):
    """Fold the map into the rows of the linear producing x (through a head-splitting Reshape); None or why not."""
    if y in graph.outputs:
        return None, f"{y.name} is a graph output"
    if any(id(n) not in map_nodes for n in x.outputs) or x in graph.outputs:
        return None, f"{x.name} is also read outside the map"
    t, r = x, _producer(x, "Reshape")
    if r is not None:
        t = r.inputs[0]
        if len(t.outputs) != 1 or t in graph.outputs:
            return None, f"{t.name} is also read outside the map"
    found, why = producing_linear(t)
    if found is None:
        return None, why
    lin, add = found
    w, b = read_linear(lin, add)
    out = w.shape[1]
    if r is not None:
        src, dst = _shape(t), _shape(x)
        ok = src is not None and dst is not None and len(dst) == len(src) + 1 and dst[:-2] == src[:-1] and \
            src[-1] == out and dst[-1] == d and (not isinstance(dst[-2], int) or dst[-2] * d == out)
        if not ok:
            return None, f"{r.name} (Reshape {src} -> {dst}) does not split {out} features into heads of {d}"
    if out % d:
        return None, f"linear {lin.name} has {out} outputs, not a multiple of the norm's {d}"
    f = torch.arange(out)
    beta = (b64 if b64 is not None else np.zeros(d)) if center else None
    wn, bn = _fold_math(fold_linear_rows, w, b, s64, beta, pos=f % d, group=f // d)
    untied: list[str] = []
    write_linear(graph, lin, wn, bn, taken, untied, add)
    _reroute(y, x)
    return {"producer": lin.name, "untied": sorted(set(untied))}, None


def _try_site(graph, node, rule: str, taken: set):
    """Apply `rule` at `node`: (status, info, is_norm) with status 'folded' | 'refused' | None (no pattern)."""
    if rule == "ln":
        m = _match_ln(node)
        if m is None:
            return None, None, False
        x, s, beta, y = m
        center = True
    else:
        if node.op != "Mul":
            return None, None, False
        x, s, _ = _split_const(node)
        if x is None:
            return None, None, False
        beta, y, center = None, node.outputs[0], False
    norm = _is_norm(x, s, rule)
    if s.size == 1 and (beta is None or beta.size == 1):
        d = _infer_d(graph, y, s)
        if d is None:
            return "refused", f"{node.name}: scalar scale and no MatMul/Gemm consumer with a constant weight", norm
        s = np.full(d, s.reshape(-1)[0], dtype=s.dtype)
    s_vec, b_vec, d, reason = _check_vectors(s, beta)
    if reason:
        return "refused", f"{node.name}: {reason}", norm
    s64 = s_vec.astype(np.float64)
    b64 = b_vec.astype(np.float64) if b_vec is not None else None
    info, fwd = _fold_forward(graph, x, y, s64, b64, center, d, taken)
    direction = "forward"
    if info is None and norm:
        info, bwd = _fold_backward(graph, x, y, _map_nodes(x, y), s64, b64, center, d, taken)
        direction = "backward"
        if info is None:
            return "refused", f"{node.name}: {fwd}; backward: {bwd}", norm
    if info is None:
        return "refused", f"{node.name}: {fwd}", norm
    return "folded", {"rule": rule, "node": node.name, "input": x.name, "direction": direction,
                      "consumers": info.get("consumers", []), **info}, norm


def _map_nodes(x, y) -> set:
    """ids of the nodes between x and y (the map's own ops)."""
    nodes, todo = set(), [y]
    while todo:
        t = todo.pop()
        for n in t.inputs:
            if id(n) not in nodes:
                nodes.add(id(n))
                todo += [i for i in n.inputs if isinstance(i, gs.Variable) and i is not x]
    return nodes


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


def _infer_shapes(model: onnx.ModelProto) -> onnx.ModelProto:
    try:
        return onnx.shape_inference.infer_shapes(model)
    except Exception:  # noqa: BLE001 - >2 GB protos, unknown domains: fold with the shapes the file declares
        return model


def fold_onnx(model: onnx.ModelProto) -> tuple[onnx.ModelProto, dict]:
    """Fold every gate-zero map (per-feature constant Mul, LN centering + Add) into neighbouring linear weights.

    Returns (new model, report {"folded": n norm sites folded, "sites": [...], "refused": [{"node", "reason"}]
    (norm sites kept), "other_muls": {"folded": [...], "kept": [...]} (scalar / broadcast constant Muls),
    "stat_ops_after": n (onnx_stats.check_statistics' count)}); each entry names its "module" when the torch
    exporter's metadata says which. The input model is not modified; IR version, opsets and metadata_props are kept.
    """
    scopes = {n.name: _scope(n) for n in model.graph.node if n.name}
    graph = gs.import_onnx(_infer_shapes(model))
    graph.fold_constants(fold_shapes=False)
    graph.cleanup()
    taken = {t for t in graph.tensors()}
    for i, node in enumerate(graph.nodes):  # reports name sites; give unnamed nodes a name
        node.name = node.name or f"{node.op}_{i}"
    sites, refused, other, other_folded, used = [], [], [], [], set()
    for rule in ("ln", "rms"):
        # longest pattern first: an LN site ending in Add owns its Mul, so visit Adds before Muls
        for node in sorted(graph.nodes, key=lambda n: n.op != "Add"):
            if id(node) in used or node.op not in ("Add", "Mul"):
                continue
            status, info, norm = _try_site(graph, node, rule, taken)
            if status is None:
                continue
            used.add(id(node))
            if rule == "ln" and node.op == "Add":  # its Mul must not be folded alone (half an LN map)
                used.add(id(_producer(_split_const(node)[0], "Mul")))
            module = scopes.get(node.name)  # the torch exporter's module path, when it left one
            if status == "folded":
                (sites if norm else other_folded).append({**info, "module": module})
            else:
                (refused if norm else other).append({"node": node.name, "module": module, "reason": info})
        graph.cleanup()
    graph.cleanup(remove_unused_graph_inputs=False).toposort()
    out = _export_like(graph, model)
    return out, {"folded": len(sites), "sites": sites, "refused": refused,
                 "other_muls": {"folded": other_folded, "kept": other},
                 "stat_ops_after": check_statistics(out, [])["total"]}


def _has_external_data(model: onnx.ModelProto) -> bool:
    return any(t.data_location == onnx.TensorProto.EXTERNAL for t in model.graph.initializer)


def fold_onnx_file(src: str | Path, dst: str | Path, *, verify: bool = True, feeds: dict | None = None,
                   external_data: bool | None = None) -> dict:
    """Fold `src` into `dst`; returns the report (with "verify": ORT max abs diff on random inputs).

    The folded model is written to a temporary file beside `dst`, run against `src` with onnxruntime
    (`feeds`, default random inputs, see onnx_verify.random_feeds), and moved into place only if every
    output matches; on a mismatch nothing is written and VerifyError says by how much.
    `external_data` None keeps the source's choice (weights in `<dst>.data` when `src` had external data
    or the model is over ~1.8 GB); True / False force it.
    """
    src, dst = Path(src), Path(dst)
    raw = onnx.load(str(src), load_external_data=False) if src.is_file() else None
    model = load_onnx(src)
    folded, report = fold_onnx(model)
    if folded.ByteSize() < 2_000_000_000:  # bigger ones are checked from the file by save_onnx
        onnx.checker.check_model(folded)
    if external_data is None:
        external_data = bool(raw is not None and _has_external_data(raw)) or folded.ByteSize() > 1_800_000_000
    dst.parent.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(dir=dst.parent, prefix=".tmp-fold-") as td:
        tmp = Path(td) / dst.name
        save_onnx(folded, tmp, external_data=external_data)
        report["verify"] = compare_files(src, tmp, feeds) if verify else None
        if verify and not report["verify"]["ok"]:
            bad = [o for o in report["verify"]["outputs"] if not o["ok"]]
            raise VerifyError(f"fold_onnx_file: folded graph differs from {src.name}: output {bad[0]['name']} "
                              f"max abs diff {bad[0].get('max_abs_diff', float('nan')):.3g} > tol "
                              f"{bad[0].get('tol', 0.0):.3g}; nothing written to {dst}")
        data = Path(td) / (dst.name + ".data")
        if data.exists():
            os.replace(data, dst.parent / data.name)
        os.replace(tmp, dst)
    report["external_data"] = external_data
    return report
