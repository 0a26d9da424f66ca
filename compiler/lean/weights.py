"""What the lean builder reads: per-linear weights from the pass library's GraphModule, per-norm specs.

The fx passes stay the one place where folding is decided and computed. The builder never folds:

- linear weights come from the folded (or materialized) GraphModule: every `aten.linear` / `aten.addmm`
  node is keyed by its source module path (nn_module_stack), and its weight / bias are the tensors that
  node reads (`lm_head.weight_folded` for an untied, folded head);
- each norm site gets a `NormSpec` from the pass report: `folded` -> no op at all, `materialized` ->
  the explicit gate-0 map (s, beta_t from passes.fold_math.taper_map), a plain RMSNorm / LayerNorm ->
  a kept (Skip) norm; anything else (a TaperNorm whose gate is not 0) is a LeanError naming the layer.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.fx as fx
import torch.nn as nn

from tapernorm.layers import TAPER_TYPES
from tapernorm.passes.fold_math import taper_map

__all__ = ["LeanError", "NormSpec", "linear_weights", "norm_spec", "WRAPPER_PREFIX"]

WRAPPER_PREFIX = "model."  # KVCacheLM holds the DecoderLM as `.model`
_LINEAR_OPS = {torch.ops.aten.linear.default: "out_in", torch.ops.aten.addmm.default: "in_out"}


class LeanError(ValueError):
    """The lean builder cannot express this model (names the layer and the reason; --graph generic can)."""


@dataclass
class NormSpec:
    """One norm site as the lean graph emits it.

    kind: "rms" | "ln" (kept norm: Skip[Simplified]LayerNormalization), "none" (folded away),
    "map_rms" (x * s) | "map_ln" ((x - mean x) * s + beta) for an explicit gate-0 map.
    """
    name: str
    kind: str
    weight: torch.Tensor | None = None  # gamma (kept) or s (map), (d,)
    bias: torch.Tensor | None = None  # beta (kept LN) or beta_t (map_ln), (d,)
    eps: float = 1e-6


def _source_path(node: fx.Node) -> str | None:
    stack = node.meta.get("nn_module_stack") or {}
    if not stack:
        return None
    path = list(stack.values())[-1][0]
    return path[len(WRAPPER_PREFIX):] if path.startswith(WRAPPER_PREFIX) else path


def _attr(gm: fx.GraphModule, node) -> torch.Tensor | None:
    if node is None:
        return None
    if not (isinstance(node, fx.Node) and node.op == "get_attr"):
        raise LeanError(f"{node}: a linear reads a computed weight, not a stored parameter; the lean graph needs "
                        "stored weights (compile with --graph generic)")
    obj = gm
    for part in node.target.split("."):
        obj = getattr(obj, part)
    return obj.detach()


def linear_weights(gm: fx.GraphModule) -> dict[str, tuple[torch.Tensor, torch.Tensor | None]]:
    """{module path (e.g. "layers.0.self_attn.q_proj"): (W (out, in), b (out,) or None)} from a pass GraphModule."""
    out: dict = {}
    for node in gm.graph.nodes:
        layout = _LINEAR_OPS.get(node.target) if node.op == "call_function" else None
        if layout is None:
            continue
        path = _source_path(node) or node.name
        if layout == "out_in":
            w, b = _attr(gm, node.args[1]), _attr(gm, node.args[2] if len(node.args) > 2 else None)
        else:  # addmm(bias, x, W (in, out))
            b, w = _attr(gm, node.args[0]), _attr(gm, node.args[2]).t()
        if path in out:
            raise LeanError(f"{path}: called more than once in the captured graph; the lean graph maps each "
                            "linear once (compile with --graph generic)")
        out[path] = (w, b)
    return out


def norm_spec(model: nn.Module, name: str, report_rows: dict) -> NormSpec:
    """The NormSpec of the norm module `name` (a DecoderLM path) given the pass report's layer rows."""
    m = model.get_submodule(name)
    row = report_rows.get(WRAPPER_PREFIX + name) or report_rows.get(name)
    if isinstance(m, TAPER_TYPES):
        status = (row or {}).get("status")
        ln = type(m).__name__ == "TaperLayerNorm"
        if status == "folded":
            return NormSpec(name, "none", eps=m.eps)
        if status == "materialized":
            s, beta = taper_map(m)
            return NormSpec(name, "map_ln" if ln else "map_rms", s, beta, m.eps)
        why = (row or {}).get("reason") or f"gate {m.gate:g} is not 0"
        raise LeanError(f"{name}: {type(m).__name__} is not at gate 0 ({why}); its blend of norm and map has no "
                        "fused op in the lean graph - finish the taper, or compile with --graph generic")
    if isinstance(m, nn.RMSNorm):
        if m.weight is None:
            raise LeanError(f"{name}: RMSNorm without a gain; the lean graph needs elementwise_affine=True")
        eps = m.eps if m.eps is not None else torch.finfo(m.weight.dtype).eps
        return NormSpec(name, "rms", m.weight.detach(), None, float(eps))
    if isinstance(m, nn.LayerNorm):
        if m.weight is None or m.bias is None:
            raise LeanError(f"{name}: LayerNorm without weight and bias; the lean graph needs both")
        return NormSpec(name, "ln", m.weight.detach(), m.bias.detach(), float(m.eps))
    raise LeanError(f"{name}: norm type {type(m).__name__} has no lean op (RMSNorm, LayerNorm and TaperNorm at "
                    "gate 0 do); compile with --graph generic")
