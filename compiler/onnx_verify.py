"""Check a rewritten ONNX file against the original with onnxruntime on random inputs.

`random_feeds` builds inputs from the graph's declared inputs: every symbolic dim gets one value
(dims named like `past*` get 0, so an empty KV cache and a mask as long as the sequence agree),
integer inputs named like `*mask*` are ones, `*position*` count up, other integer inputs are
token ids below the vocabulary size of the embedding they index. `compare_files` runs both files
(graph optimizations off, so ORT's own fusions cannot hide a difference) and returns the max abs
diff per output with a pass / fail against a dtype-aware tolerance.
"""
from __future__ import annotations

from pathlib import Path

import numpy as np
import onnx

__all__ = ["random_feeds", "compare_files", "VerifyError"]

# (atol, rtol) per output element type: pass when max|new - ref| <= atol + rtol * max|ref|
_TOL = {onnx.TensorProto.FLOAT: (1e-5, 1e-4), onnx.TensorProto.DOUBLE: (1e-9, 1e-7),
        onnx.TensorProto.FLOAT16: (2e-3, 1e-2), onnx.TensorProto.BFLOAT16: (2e-2, 4e-2)}


class VerifyError(RuntimeError):
    """The rewritten ONNX graph's outputs differ from the original's (nothing was written)."""


def _vocab(model: onnx.ModelProto, name: str) -> int:
    """Rows of the initializer a Gather reads with input `name` as indices (2 when none does)."""
    inits = {i.name: i for i in model.graph.initializer}
    for n in model.graph.node:
        if n.op_type == "Gather" and len(n.input) > 1 and n.input[1] == name and n.input[0] in inits:
            return int(inits[n.input[0]].dims[0])
    return 2


def random_feeds(model: onnx.ModelProto, dim: int = 3, seed: int = 0) -> dict:
    """Random inputs for every graph input (see the module docstring); `dim` fills symbolic dims."""
    from onnx import helper
    rng = np.random.default_rng(seed)
    inits = {i.name for i in model.graph.initializer}
    feeds = {}
    for vi in model.graph.input:
        if vi.name in inits:
            continue
        t = vi.type.tensor_type
        shape = []
        for d in t.shape.dim:
            if d.HasField("dim_value"):
                shape.append(d.dim_value)
            else:
                shape.append(0 if "past" in d.dim_param.lower() else dim)
        dtype = helper.tensor_dtype_to_np_dtype(t.elem_type)
        name = vi.name.lower()
        if np.issubdtype(dtype, np.integer):
            if "mask" in name:
                v = np.ones(shape, dtype)
            elif "position" in name:
                v = np.broadcast_to(np.arange(shape[-1] if shape else 1), shape).astype(dtype)
            else:
                v = rng.integers(0, _vocab(model, vi.name), size=shape).astype(dtype)
        elif dtype == np.bool_:
            v = np.ones(shape, dtype)
        else:
            v = rng.standard_normal(shape).astype(dtype)
        feeds[vi.name] = np.ascontiguousarray(v)
    return feeds


def _session(path: str):
    import onnxruntime as ort
    so = ort.SessionOptions()
    so.graph_optimization_level = ort.GraphOptimizationLevel.ORT_DISABLE_ALL
    so.intra_op_num_threads = 1
    so.log_severity_level = 3
    return ort.InferenceSession(str(path), so, providers=["CPUExecutionProvider"])


def compare_files(ref_path: str | Path, new_path: str | Path, feeds: dict | None = None) -> dict:
    """Run both files on `feeds` (default: random_feeds of the original); {"ok", "max_abs_diff", "outputs": [...]}.

    Raises ValueError (one line) when the original cannot run on the feeds.
    """
    ref_sess = _session(str(ref_path))
    if feeds is None:
        feeds = random_feeds(onnx.load(str(ref_path), load_external_data=False))
    try:
        ref = ref_sess.run(None, feeds)
    except Exception as e:  # ORT raises its own exception types
        first = (str(e).strip().splitlines() or [type(e).__name__])[0]
        raise ValueError(f"verify: the original {Path(ref_path).name} does not run on random inputs ({first}); "
                         "pass feeds= with inputs it accepts, or verify=False") from e
    new = _session(str(new_path)).run(None, feeds)
    types = {o.name: o.type.tensor_type.elem_type for o in onnx.load(str(ref_path), load_external_data=False).graph.output}
    rows, worst, ok = [], 0.0, True
    for meta, r, n in zip(ref_sess.get_outputs(), ref, new):
        r, n = np.asarray(r), np.asarray(n)
        if r.shape != n.shape:
            rows.append({"name": meta.name, "ok": False, "reason": f"shape {r.shape} -> {n.shape}"})
            ok = False
            continue
        if np.issubdtype(r.dtype, np.floating):
            diff = float(np.abs(n.astype(np.float64) - r.astype(np.float64)).max()) if r.size else 0.0
            atol, rtol = _TOL.get(types.get(meta.name), (1e-5, 1e-4))
            tol = atol + rtol * (float(np.abs(r).max()) if r.size else 0.0)
        else:
            diff, tol = (0.0 if np.array_equal(r, n) else float("inf")), 0.0
        good = bool(np.isfinite(diff) and diff <= tol)
        rows.append({"name": meta.name, "shape": list(r.shape), "max_abs_diff": diff, "tol": tol, "ok": good})
        worst, ok = max(worst, diff), ok and good
    return {"ok": ok, "max_abs_diff": worst, "outputs": rows,
            "inputs": {k: list(v.shape) for k, v in feeds.items()}, "providers": ref_sess.get_providers()}
