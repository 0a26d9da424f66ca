"""The compile driver's lean step: model.onnx (folded) and model_unfused.onnx as lean graphs, checked."""
from __future__ import annotations

from pathlib import Path

import torch

from ..onnx_io import load_onnx
from .builder import build_lean, ort_optimized_nodes

__all__ = ["export_lean_pair", "optimized_counts"]


def export_lean_pair(model, gm_fold, rep_fold: dict, gm_unf, rep_unf: dict, out: Path, dtype: torch.dtype,
                     meta: dict, inline_limit: int) -> tuple[dict, dict, dict]:
    """Write out/model.onnx (weights of the fold) and out/model_unfused.onnx (explicit maps); returns
    (facts folded, facts unfused, statistics check of the folded graph). Raises LeanError before writing
    anything when the model has a shape the builder cannot express."""
    facts = {}
    for name, gm, rep, tag in (("model.onnx", gm_fold, rep_fold, "folded"),
                               ("model_unfused.onnx", gm_unf, rep_unf, "unfused")):
        size = sum(p.numel() * p.element_size() for p in model.parameters())
        facts[name] = build_lean(model, gm, rep, out / name, dtype, {**meta, "tapernorm.graph": tag},
                                 external_data=size > inline_limit)
        load_onnx(out / name, load_external_data=False)  # re-read what was written (IR, checker)
    return facts["model.onnx"], facts["model_unfused.onnx"], facts["model.onnx"]["statistics_check"]


def optimized_counts(out: Path, files=("model.onnx", "model_unfused.onnx")) -> dict:
    """{file: node count + op histogram after ORT's full optimization} for the compile report."""
    return {f: ort_optimized_nodes(out / f) for f in files if (out / f).is_file()}
