"""The build stage of compile: fx passes on the captured model, then the ONNX graphs written into the staging dir.

run_passes:   capture -> fold (-> materialize for model_unfused.onnx), each a timed stage.
build_graphs: the lean graph (compiler.lean: GroupQueryAttention, fused Skip norms) or the generic torch.onnx
              export; a lean failure falls back to the generic export when allowed (the passes re-run with
              dynamic shapes, which the generic export needs).
"""
from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import onnx
import torch

from tapernorm.layers import TAPER_TYPES, taper_layers
from tapernorm.passes import fold, materialize
from tapernorm.passes.capture import capture

from .export_onnx import export_onnx
from .lean import LeanError
from .lean.builder import build_lean
from .lean.export import export_lean_pair
from .onnx_fold import check_statistics
from .onnx_io import load_onnx
from .stages import Stages

__all__ = ["LEAN_STREAM_ABOVE", "PassResult", "Built", "run_passes", "build_graphs", "count_norms"]

# lean graphs with more weight bytes than this stream them into external data (`<file>.data`) tensor by tensor
# (an inline file holds them twice more: the ModelProto and its serialization), and skip the ORT node-count pass
LEAN_STREAM_ABOVE = 64 * 2**20


@dataclass
class PassResult:
    """capture -> fold (-> materialize): the GraphModules and the passes' reports; the unfused pair is None
    without --unfused."""
    gm: object
    gm_fold: object
    rep_fold: dict
    gm_unf: object = None
    rep_unf: dict | None = None

    @property
    def folded(self) -> list[str]:
        """Names of the norms the fold removed, sorted."""
        return sorted(n for n, r in self.rep_fold["layers"].items() if r["status"] == "folded")

    def release(self) -> None:
        """Drop the GraphModules (and the weights they hold); the reports stay."""
        self.gm = self.gm_fold = self.gm_unf = None


@dataclass
class Built:
    """What build_graphs wrote: the graph kind it ended with, each file's export facts, the folded graph's
    statistics check, and the passes it built from (re-run when a lean failure fell back to generic)."""
    graph: str
    export_folded: dict
    export_unfused: dict | None
    stats: dict
    passes: PassResult
    lean_error: str | None = None  # why the lean graph was not possible, when it fell back


def run_passes(wrapper, args, ds, unfused: bool, stages: Stages) -> PassResult:
    """capture -> fold (-> materialize with `unfused`), each a stage; `ds` None captures static shapes."""
    stages.begin("capture", "torch.export, " + ("dynamic shapes" if ds is not None else "static shapes"))
    gm = capture(wrapper, args, dynamic_shapes=ds)
    tapered = bool(taper_layers(wrapper))
    stages.begin("fold", "" if tapered else "no TaperNorm: nothing to verify (parity checks ORT vs PyTorch)")
    gm_fold, rep_fold = fold(gm, args, dynamic_shapes=ds, original=wrapper, verify=tapered)
    res = PassResult(gm, gm_fold, rep_fold)
    if unfused:
        stages.begin("materialize", "--unfused")
        res.gm_unf, res.rep_unf = materialize(gm, args, dynamic_shapes=ds, original=wrapper)
    stages.end()
    return res


def count_norms(model) -> int:
    """TaperNorms plus the plain norms left in the model (torch's, and HF's own *RMSNorm classes)."""
    plain = sum(1 for m in model.modules()
                if (isinstance(m, (torch.nn.RMSNorm, torch.nn.LayerNorm)) or type(m).__name__.endswith("RMSNorm"))
                and not isinstance(m, TAPER_TYPES))
    return len(taper_layers(model)) + plain


def _export_lean(model, p: PassResult, out: Path, dtype: torch.dtype, meta: dict,
                 inline_limit: int) -> tuple[dict, dict | None, dict]:
    """The lean model.onnx (and model_unfused.onnx when p has the unfused pair): (facts folded, facts unfused or
    None, statistics check of the folded graph)."""
    limit = min(inline_limit, LEAN_STREAM_ABOVE)
    if p.gm_unf is not None:
        return export_lean_pair(model, p.gm_fold, p.rep_fold, p.gm_unf, p.rep_unf, out, dtype, meta, limit)
    size = sum(q.numel() for q in model.parameters()) * dtype.itemsize
    facts = build_lean(model, p.gm_fold, p.rep_fold, out / "model.onnx", dtype, {**meta, "tapernorm.graph": "folded"},
                       external_data=size > limit)
    load_onnx(out / "model.onnx", load_external_data=False)  # re-read what was written (IR, checker)
    return facts, None, facts["statistics_check"]


def _export_generic(model, p: PassResult, out: Path, dtype: str, meta: dict, inline_limit: int
                    ) -> tuple[dict, dict | None, dict]:
    """The torch.onnx export of the folded GraphModule (and the unfused one): (facts folded, facts unfused or
    None, statistics check of the folded graph, annotated into model.onnx's metadata)."""
    folded, n_norms = p.folded, count_norms(model)
    seen: dict = {}

    def annotate_folded(m: onnx.ModelProto) -> dict:
        seen["stats"] = check_statistics(m, folded, expect_total=0 if len(folded) == n_norms else None)
        return {"tapernorm.statistics_check": seen["stats"], "tapernorm.folded_layers": folded}

    cfg = model.config
    exp_f = export_onnx(p.gm_fold, cfg, out / "model.onnx", dtype, metadata={**meta, "tapernorm.graph": "folded"},
                        annotate=annotate_folded, inline_limit=inline_limit)
    exp_u = None
    if p.gm_unf is not None:
        exp_u = export_onnx(p.gm_unf, cfg, out / "model_unfused.onnx", dtype,
                            metadata={**meta, "tapernorm.graph": "unfused"}, inline_limit=inline_limit)
    for f in ("model.onnx",) + (("model_unfused.onnx",) if exp_u else ()):
        load_onnx(out / f, load_external_data=False)  # re-read what was written (IR, checker)
    return exp_f, exp_u, seen["stats"]


def build_graphs(model, wrapper, args, ds, p: PassResult, out: Path, *, graph: str, dtype: str,
                 graph_dtype: torch.dtype, meta: dict, inline_limit: int, fallback_generic: bool,
                 stages: Stages, log) -> Built:
    """Write model.onnx (and model_unfused.onnx) into `out` as the `graph` kind. A LeanError propagates unless
    `fallback_generic`; then the passes re-run with the dynamic shapes `ds` and the generic export is written."""
    variants = "model.onnx" + (", model_unfused.onnx" if p.gm_unf is not None else "")
    stages.begin("build", f"{graph} graph, {variants}")
    lean_error = None
    if graph == "lean":
        log("build lean model.onnx (folded) and model_unfused.onnx")
        try:
            exp_f, exp_u, stats = _export_lean(model, p, out, graph_dtype, meta, inline_limit)
            return Built("lean", exp_f, exp_u, stats, p)
        except LeanError as e:
            if not fallback_generic:
                raise
            log(f"lean graph not possible ({e}); using --graph generic")
            lean_error = str(e)
            p = run_passes(wrapper, args, ds, p.gm_unf is not None, stages)  # dynamic shapes this time
            stages.begin("build", f"generic graph, {variants}")
    log("export model.onnx (folded)" + (" and model_unfused.onnx" if p.gm_unf is not None else ""))
    exp_f, exp_u, stats = _export_generic(model, p, out, dtype, meta, inline_limit)
    return Built("generic", exp_f, exp_u, stats, p, lean_error)
