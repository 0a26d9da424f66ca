"""build_lean: pass-library GraphModule -> lean ONNX file for any family with a spec (see graph.py for the interface)."""
from __future__ import annotations

import json
from dataclasses import asdict
from pathlib import Path

import onnx
import onnx_ir as ir
import torch
import torch.fx as fx
import torch.nn as nn

from tapernorm.passes.pipeline import site_results

from ..onnx_io import max_ir_version, save_onnx, stream_initializers, write_onnx_header
from ..onnx_stats import check_statistics, pos0_counts
from .families import NEAREST, SPECS, FamilySpec, dims_of, spec_for
from .hf_arch import SpecLean
from .weights import LeanError, linear_weights, norm_spec

__all__ = ["build_lean", "lean_model_proto", "norm_names", "norm_paths", "lean_statistics_check",
           "ort_optimized_nodes"]


def _source(model: nn.Module):
    """(spec, root module holding the HF / DecoderLM names, config, DecoderDims) of a model handed to compile."""
    if type(model).__name__ == "KVCacheLM":
        model = model.model
    hf = getattr(model, "hf", None)
    if isinstance(hf, nn.Module):  # HFDecoder: the Hugging Face model under .hf
        cfg = hf.config.get_text_config() if hasattr(hf.config, "get_text_config") else hf.config
        mtype, root = str(cfg.model_type), hf
    else:
        cfg = getattr(model, "config", None)
        mtype, root = f"tapernorm_{getattr(cfg, 'arch', None)}", model
    spec = spec_for(mtype)
    if spec is None:
        near = NEAREST.get(mtype)
        raise LeanError(f"model_type {mtype!r}: no lean spec" + (f" (nearest family: {near})" if near else "")
                        + "; compile with --graph generic")
    return spec, root, cfg, dims_of(cfg)


def norm_paths(spec: FamilySpec, n_layers: int) -> list[str]:
    """Every norm module path the spec's graph reads, in graph order."""
    per = [n for n in (*spec.pre_norms, *spec.post_norms) if n] + \
        [f"{spec.attn}.{n}" for n in (spec.qk_norms or ())]
    return [f"{spec.layers}.{i}.{n}" for i in range(n_layers) for n in per] + [spec.final_norm]


def norm_names(cfg) -> list[str]:
    """Every norm module path of a tapernorm DecoderLM (`cfg` its ModelConfig), in graph order."""
    return norm_paths(SPECS[f"tapernorm_{cfg.arch}"], cfg.n_layers)


def _prefix(paths, lm_head: str) -> str:
    """The wrapper prefix of the captured module names (KVCacheLM `model.`, HFDecoder `hf.`)."""
    for pre in ("model.hf.", "hf.", "model.", ""):
        if pre + lm_head in paths:
            return pre
    raise LeanError(f"{lm_head}: the output head is not a linear in the captured graph; compile with --graph generic")


def lean_model_proto(model: nn.Module, gm: fx.GraphModule, report: dict | None, dtype: torch.dtype,
                     metadata: dict[str, str] | None = None, data_path: Path | None = None
                     ) -> tuple[onnx.ModelProto, dict]:
    """The lean graph of `model` (a DecoderLM, an HFDecoder, or KVCacheLM around either) with the weights of
    `gm` (fold or materialize output, whose typed site results say what each norm became).

    `report` is accepted for callers of the old signature and not read. Returns (ModelProto, facts: family,
    per-norm kinds, node counts, statistics check). Raises LeanError (one line naming the layer / key) for a
    model the builder cannot express.
    """
    spec, root, cfg, dims = _source(model)
    raw = linear_weights(gm, prefix="")
    pre = _prefix(raw, spec.lm_head)
    lin = {k[len(pre):]: v for k, v in raw.items() if k.startswith(pre)}
    sites = {k[len(pre):]: v for k, v in site_results(gm).items() if k.startswith(pre)}
    norms = {}
    for path in norm_paths(spec, dims.num_layers):
        try:
            m = root.get_submodule(path)
        except AttributeError:
            raise LeanError(f"{path}: no such norm module; the {spec.name} spec does not match this model "
                            "(compile with --graph generic)") from None
        norms[path] = norm_spec(path, m, sites.get(path), spec.gain_offset)
    builder = SpecLean(spec, root, dims, cfg, lin, norms, dtype)
    g = builder.build()
    meta = {"tapernorm.graph_kind": "lean", "tapernorm.kv_cache": "shared", "tapernorm.logits": "last",
            "tapernorm.family": spec.name, **{k: str(v) for k, v in (metadata or {}).items()}}
    irm = g.model(builder.logits, meta, max_ir_version())
    if data_path is not None:  # weights streamed to external data one tensor at a time: the proto is the graph only
        stream_initializers(irm, data_path)
    proto = ir.to_proto(irm)
    ops: dict[str, int] = {}
    for node in proto.graph.node:
        ops[node.op_type] = ops.get(node.op_type, 0) + 1
    kinds = {n: s.kind for n, s in norms.items()}
    stats = lean_statistics_check(proto, [n for n, k in kinds.items() if k == "none"], kinds)
    proto.metadata_props.add(key="tapernorm.statistics_check", value=json.dumps(stats, sort_keys=True))
    facts = {"arch": getattr(cfg, "arch", None) or spec.name, "family": spec.name, "dims": asdict(dims),
             "norms": kinds, "nodes": len(proto.graph.node), "ops": dict(sorted(ops.items())),
             "statistics_check": stats, "pos0": pos0_counts(proto)}
    return proto, facts


def build_lean(model: nn.Module, gm: fx.GraphModule, report: dict, path: str | Path, dtype: torch.dtype,
               metadata: dict[str, str] | None = None, external_data: bool | None = None) -> dict:
    """Write the lean graph to `path` (external data when the weights near protobuf's 2 GB: streamed tensor by
    tensor into `<name>.data` while the graph is built, never held whole as a ModelProto)."""
    path = Path(path)
    size = sum(p.numel() for p in model.parameters()) * dtype.itemsize
    external = size > 2**31 - 2**27 if external_data is None else external_data
    proto, facts = lean_model_proto(model, gm, report, dtype, metadata,
                                    data_path=path.with_name(path.name + ".data") if external else None)
    if external:
        write_onnx_header(proto, path)
    else:
        onnx.checker.check_model(proto)
        save_onnx(proto, path)
    facts.update(path=str(path), ir_version=proto.ir_version, external_data=external,
                 opset={o.domain or "ai.onnx": o.version for o in proto.opset_import},
                 bytes=Path(path).stat().st_size + (Path(str(path) + ".data").stat().st_size if external else 0))
    return facts





def lean_statistics_check(proto: onnx.ModelProto, folded_layers: list[str], norms: dict[str, str]) -> dict:
    """No statistic op may belong to a folded layer: compiler.onnx_stats.check_statistics with lean attribution
    (nodes are named after their norm's module path); a "map_ln" site's ReduceMean is the map's mean-centering,
    not a statistic, and is not counted."""
    def layer(n):
        return n.name.split("/")[0]
    return check_statistics(proto, list(folded_layers), scope=layer, ignore=lambda n: norms.get(layer(n)) == "map_ln")


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
