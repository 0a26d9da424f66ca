"""Helpers of precision.py: held-out perplexity through onnxruntime, int4 reconstruction error per linear,
bytes of weights a decode step reads."""
from __future__ import annotations

import hashlib
from pathlib import Path

import numpy as np
import onnx
import onnxruntime as ort
from onnx import numpy_helper

from tapernorm.compiler.quantize import dequantize_nbits, quantizable_matmuls

__all__ = ["all_position_logits", "perplexity", "matched_linears", "step_weight_bytes"]

MATMUL_OPS = ("MatMul", "MatMulNBits", "Gemm")


def all_position_logits(path: Path, cache: Path) -> Path:
    """`path` itself when its logits cover every position; for a lean graph (logits of the last position only,
    metadata tapernorm.logits=last) a copy in `cache` with that GatherND bypassed: same weights, same ops."""
    m = onnx.load(str(path), load_external_data=False)
    if {p.key: p.value for p in m.metadata_props}.get("tapernorm.logits") != "last":
        return path
    cache.mkdir(parents=True, exist_ok=True)
    out = cache / (hashlib.sha1(str(path.resolve()).encode()).hexdigest()[:12] + ".onnx")
    if out.is_file() and out.stat().st_mtime >= path.stat().st_mtime:
        return out
    m = onnx.load(str(path))
    gather = next(n for n in m.graph.node if n.op_type == "GatherND")
    src, dst = gather.input[0], gather.output[0]
    for n in m.graph.node:
        n.input[:] = [src if i == dst else i for i in n.input]
    m.graph.node.remove(gather)
    logits = next(o for o in m.graph.output if o.name == "logits")
    logits.type.tensor_type.shape.dim[1].dim_param = "sequence_length"
    onnx.save_model(m, str(out))
    return out


def _feeds(sess, ids: list[int], head_dim: int) -> dict:
    """One row, empty KV cache (1, kv_heads, 0, head_dim), mask of ones, positions 0..T-1."""
    T = len(ids)
    types = {"tensor(float)": np.float32, "tensor(float16)": np.float16}
    feeds = {}
    for i in sess.get_inputs():
        if i.name == "input_ids":
            feeds[i.name] = np.asarray([ids], np.int64 if "int64" in i.type else np.int32)
        elif i.name == "attention_mask":
            feeds[i.name] = np.ones((1, T), np.int64 if "int64" in i.type else np.int32)
        elif i.name == "position_ids":
            feeds[i.name] = np.arange(T, dtype=np.int64)[None]
        elif i.name.startswith("past_key_values"):
            feeds[i.name] = np.zeros((1, i.shape[1], 0, head_dim), types[i.type])
    return feeds


def perplexity(path: Path, ids: list[int], chunk: int, threads: int, head_dim: int = 64, ref: dict | None = None
               ) -> dict:
    """exp(mean next-token NLL) over `ids` in windows of `chunk` tokens, each from an empty cache.

    `ref` (a dict): the first call stores its first window's logits there; later calls report their drift from
    them (max |logit diff|, mean KL(ref || this), top-1 agreement) on that window."""
    so = ort.SessionOptions()
    so.intra_op_num_threads, so.inter_op_num_threads, so.log_severity_level = threads, 1, 3
    sess = ort.InferenceSession(str(path), so, providers=["CPUExecutionProvider"])
    nll, count = 0.0, 0
    for s in range(0, len(ids) - 1, chunk):
        win = ids[s:s + chunk]
        if len(win) < 2:
            break
        logits = sess.run(["logits"], _feeds(sess, win, head_dim))[0][0].astype(np.float64)  # (T, V)
        logits = logits[:-1]
        if ref is not None and s == 0:
            drift = _drift(ref, logits)
        lse = np.log(np.exp(logits - logits.max(-1, keepdims=True)).sum(-1)) + logits.max(-1)
        nll += float((lse - logits[np.arange(len(win) - 1), win[1:]]).sum())
        count += len(win) - 1
    return {"ppl": float(np.exp(nll / count)), "nll": nll / count, "tokens_scored": count, "file": str(path),
            **(drift if ref is not None else {})}


def _drift(ref: dict, logits: np.ndarray) -> dict:
    """Logit drift of (T, V) `logits` from ref["logits"] (stored on first use)."""
    if "logits" not in ref:
        ref["logits"] = logits
        return {"drift_reference": True}
    r = ref["logits"]

    def logp(x):
        return x - (np.log(np.exp(x - x.max(-1, keepdims=True)).sum(-1, keepdims=True)) + x.max(-1, keepdims=True))
    lr, lx = logp(r), logp(logits)
    return {"max_abs_logit_diff_vs_fp32_baseline": float(np.abs(logits - r).max()),
            "logit_scale_fp32_baseline": float(np.abs(r).max()),
            "mean_kl_vs_fp32_baseline": float((np.exp(lr) * (lr - lx)).sum(-1).mean()),
            "top1_agreement_vs_fp32_baseline": float((logits.argmax(-1) == r.argmax(-1)).mean())}


def _fp32_weights(path: Path) -> list[tuple[str, np.ndarray]]:
    m = onnx.load(str(path))
    inits = {t.name: t for t in m.graph.initializer}
    return [(layer, numpy_helper.to_array(inits[n.input[1]]).astype(np.float32))
            for n, layer, _, _ in quantizable_matmuls(m)]


def _int4_weights(path: Path) -> list[np.ndarray]:
    m = onnx.load(str(path))
    return [dequantize_nbits(m, n) for n in m.graph.node if n.op_type == "MatMulNBits"]


def matched_linears(fp32_folded, fp32_unfused, q_folded, q_unfused) -> dict:
    """Relative Frobenius error of every linear after int4, folded (W' = diag(s) W) against unfolded (W).

    Each argument is (dir, file). Linears are matched by graph order (same architecture and exporter; shapes
    checked). `s` per input row is recovered exactly from the two fp32 weights. Reported per linear:
    folded ||Q(W') - W'|| / ||W'||, unfused ||Q(W) - W|| / ||W||, and unfused_effective ||diag(s)(Q(W) - W)|| /
    ||W'||: the unfused graph's error as it reaches the output ((x * s) Q(W)), the figure to compare with folded.
    """
    wf, wu = _fp32_weights(Path(fp32_folded[0]) / fp32_folded[1]), _fp32_weights(Path(fp32_unfused[0]) / fp32_unfused[1])
    qf, qu = _int4_weights(Path(q_folded[0]) / q_folded[1]), _int4_weights(Path(q_unfused[0]) / q_unfused[1])
    if not (len(wf) == len(wu) == len(qf) == len(qu)):
        raise ValueError(f"linear counts differ: {len(wf)}, {len(wu)}, {len(qf)}, {len(qu)}")
    rows, tot = [], {"f_err": 0.0, "u_err": 0.0, "ue_err": 0.0, "f_norm": 0.0, "u_norm": 0.0}
    for i, ((name, a), (_, b), qa, qb) in enumerate(zip(wf, wu, qf, qu)):
        if a.shape != b.shape or qa.shape != a.shape or qb.shape != b.shape:
            raise ValueError(f"linear {i} ({name}): shapes differ {a.shape} {b.shape} {qa.shape} {qb.shape}")
        s = (a * b).sum(1) / np.maximum((b * b).sum(1), 1e-30)  # (K,) exact: a = diag(s) b
        ef, eu = np.linalg.norm(qa - a), np.linalg.norm(qb - b)
        eue = np.linalg.norm(s[:, None] * (qb - b))
        na, nb = np.linalg.norm(a), np.linalg.norm(b)
        rows.append({"index": i, "layer": name, "K": a.shape[0], "N": a.shape[1],
                     "folded": bool(np.abs(s - 1).max() > 1e-6), "s_min": float(s.min()), "s_max": float(s.max()),
                     "rel_folded": float(ef / na), "rel_unfused": float(eu / nb), "rel_unfused_effective": float(eue / na)})
        for k, v in (("f_err", ef**2), ("u_err", eu**2), ("ue_err", eue**2), ("f_norm", na**2), ("u_norm", nb**2)):
            tot[k] += float(v)
    folded_rows = [r for r in rows if r["folded"]]
    worse = sum(r["rel_folded"] > r["rel_unfused_effective"] for r in folded_rows)
    return {"linears": rows, "n_folded_linears": len(folded_rows), "folded_worse_than_unfused_effective": worse,
            "overall_rel_folded": (tot["f_err"] / tot["f_norm"]) ** 0.5,
            "overall_rel_unfused": (tot["u_err"] / tot["u_norm"]) ** 0.5,
            "overall_rel_unfused_effective": (tot["ue_err"] / tot["f_norm"]) ** 0.5,
            "median_ratio_folded_over_unfused_effective": float(np.median(
                [r["rel_folded"] / r["rel_unfused_effective"] for r in folded_rows])) if folded_rows else None}


def step_weight_bytes(path: Path) -> int:
    """Bytes of the initializers every decode step reads: the inputs of MatMul / MatMulNBits / Gemm nodes
    (packed weights, scales, zero points; a table shared with a quantized embedding counted once)."""
    m = onnx.load(str(path), load_external_data=False)
    sizes = {t.name: int(np.prod(t.dims, dtype=np.int64))
             * np.dtype(onnx.helper.tensor_dtype_to_np_dtype(t.data_type)).itemsize for t in m.graph.initializer}
    used = {i for n in m.graph.node if n.op_type in MATMUL_OPS for i in n.input if i in sizes}
    return sum(sizes[i] for i in used)
