"""build_lean: pass-library GraphModule + report -> lean ONNX file (see graph.py for the interface)."""
from __future__ import annotations

import json
from pathlib import Path

import onnx
import onnx_ir as ir
import torch
import torch.fx as fx
import torch.nn as nn

from ..onnx_io import max_ir_version, save_onnx
from .arch import ARCHS
from .weights import LeanError, linear_weights, norm_spec

__all__ = ["build_lean", "lean_model_proto", "norm_names", "lean_statistics_check", "ort_optimized_nodes"]

STAT_OPS = ("ReduceMean", "Pow", "Sqrt", "Reciprocal", "SimplifiedLayerNormalization", "LayerNormalization",
            "SkipSimplifiedLayerNormalization", "SkipLayerNormalization", "RMSNormalization")


def norm_names(cfg) -> list[str]:
    """Every norm module path of a DecoderLM, in graph order."""
    return [f"layers.{i}.{n}" for i in range(cfg.n_layers)
            for n in ("input_layernorm", "post_attention_layernorm")] + ["norm"]


def lean_model_proto(model: nn.Module, gm: fx.GraphModule, report: dict, dtype: torch.dtype,
                     metadata: dict[str, str] | None = None) -> tuple[onnx.ModelProto, dict]:
    """The lean graph of `model` with the weights of `gm` (fold or materialize output) and its pass `report`.

    Returns (ModelProto, facts: per-norm kinds and node counts). Raises LeanError (one line naming the
    layer) for a model the builder cannot express.
    """
    model = getattr(model, "model", model)  # accept the KVCacheLM wrapper
    cfg = getattr(model, "config", None)
    arch = ARCHS.get(getattr(cfg, "arch", None))
    if arch is None:
        raise LeanError(f"{type(model).__name__}: no lean builder for arch {getattr(cfg, 'arch', None)!r} "
                        f"(have {sorted(ARCHS)}); compile with --graph generic")
    rows = report.get("layers", {})
    norms = {n: norm_spec(model, n, rows) for n in norm_names(cfg)}
    builder = arch(model, linear_weights(gm), norms, dtype)
    g = builder.build()
    meta = {"tapernorm.graph_kind": "lean", "tapernorm.kv_cache": "shared", "tapernorm.logits": "last",
            **{k: str(v) for k, v in (metadata or {}).items()}}
    irm = g.model(builder.logits, meta, max_ir_version())
    proto = ir.to_proto(irm)
    ops: dict[str, int] = {}
    for node in proto.graph.node:
        ops[node.op_type] = ops.get(node.op_type, 0) + 1
    kinds = {n: s.kind for n, s in norms.items()}
    stats = lean_statistics_check(proto, [n for n, k in kinds.items() if k == "none"], kinds)
    proto.metadata_props.add(key="tapernorm.statistics_check", value=json.dumps(stats, sort_keys=True))
    facts = {"arch": cfg.arch, "norms": kinds, "nodes": len(proto.graph.node), "ops": dict(sorted(ops.items())),
             "statistics_check": stats}
    return proto, facts


def build_lean(model: nn.Module, gm: fx.GraphModule, report: dict, path: str | Path, dtype: torch.dtype,
               metadata: dict[str, str] | None = None, external_data: bool | None = None) -> dict:
    """Write the lean graph to `path` atomically (external data when the weights near protobuf's 2 GB)."""
    proto, facts = lean_model_proto(model, gm, report, dtype, metadata)
    size = sum(len(t.raw_data) for t in proto.graph.initializer)
    external = size > 2**31 - 2**27 if external_data is None else external_data
    if not external:
        onnx.checker.check_model(proto)
    save_onnx(proto, path, external_data=external)
    facts.update(path=str(path), ir_version=proto.ir_version, external_data=external,
                 opset={o.domain or "ai.onnx": o.version for o in proto.opset_import},
                 bytes=Path(path).stat().st_size + (Path(str(path) + ".data").stat().st_size if external else 0))
    return facts





def lean_statistics_check(proto: onnx.ModelProto, folded_layers: list[str], norms: dict[str, str]) -> dict:
    """No statistic op may belong to a folded layer (lean nodes are named after their norm's module path).

    Same keys as compiler.onnx_fold.check_statistics. `norms` maps each norm path to its NormSpec kind;
    a "map_ln" site's ReduceMean is the map's mean-centering, not a statistic, and is not counted.
    """
    folded = {f[len("model."):] if f.startswith("model.") else f for f in folded_layers}
    offending: dict[str, list[str]] = {}
    by_op: dict[str, int] = {}
    total = 0
    for n in proto.graph.node:
        layer = n.name.split("/")[0]
        if n.op_type not in STAT_OPS or norms.get(layer) == "map_ln":
            continue
        total += 1
        by_op[n.op_type] = by_op.get(n.op_type, 0) + 1
        if layer in folded:
            offending.setdefault(layer, []).append(f"{n.name} ({n.op_type})")
    reason = None
    if offending:
        first = next(iter(offending))
        reason = f"folded layer {first} still computes statistics: {', '.join(offending[first][:3])}"
    return {"ok": reason is None, "offending": offending, "total": total, "by_op": by_op, "unattributed": 0,
            "folded_layers": list(folded_layers), "reason": reason}


def ort_optimized_nodes(path: str | Path, provider: str = "cpu") -> dict:
    """Node count and op histogram of `path` after onnxruntime's full graph optimization (one thread)."""
    import tempfile

    import onnxruntime as ort

    with tempfile.TemporaryDirectory(prefix="tapernorm-ortopt-") as td:
        so = ort.SessionOptions()
        so.intra_op_num_threads, so.log_severity_level = 1, 3
        so.optimized_model_filepath = str(Path(td) / "opt.onnx")
        providers = (["CUDAExecutionProvider"] if provider == "cuda" else []) + ["CPUExecutionProvider"]
        ort.InferenceSession(str(path), so, providers=providers)
        opt = onnx.load(so.optimized_model_filepath, load_external_data=False)
    ops: dict[str, int] = {}
    for node in opt.graph.node:
        ops[node.op_type] = ops.get(node.op_type, 0) + 1
    return {"nodes": len(opt.graph.node), "ops": dict(sorted(ops.items())), "level": "all"}
