"""What the lean builder reads: per-linear weights from the pass library's GraphModule, per-norm specs.

The fx passes stay the one place where folding is decided and computed. The builder never folds:

- linear weights come from the folded (or materialized) GraphModule: every linear node (passes.linears'
  forms) is keyed by its source module path (nn_module_stack) less the wrapper prefix, and its weight / bias
  are the tensors that node reads (`lm_head.weight_folded` for an untied, folded head);
- each norm site gets a `NormSpec` from the passes' typed SiteResult: `folded` -> no op at all,
  `materialized` -> the explicit gate-0 map the passes computed (s, beta_t), a plain RMSNorm / LayerNorm ->
  a kept (Skip) norm; anything else (a TaperNorm whose gate is not 0) is a LeanError naming the layer.
  A TaperNorm with position 0's own scale c0 (tapernorm/pos0.py) also carries `pos0` = c0 / c, read from the
  model: the graph multiplies the normed value by where(position == 0, c0 / c, 1) (graph.py, `pos0_factor`).
  A bounded TaperNorm (tapernorm/bound.py) carries `prescale` = c / B: the graph computes tanh(x * c / B [* p])
  and then the folded (or explicit) per-feature factor B * gamma_t.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.fx as fx
import torch.nn as nn

from tapernorm.bound import bound_json, bound_prescale
from tapernorm.layers import TAPER_TYPES
from tapernorm.passes.linears import linear_output, read_linear
from tapernorm.passes.pipeline import SiteResult
from tapernorm.passes.pos0 import pos0_ratio_value

__all__ = ["LeanError", "NormSpec", "linear_weights", "norm_spec", "WRAPPER_PREFIX"]

WRAPPER_PREFIX = "model."  # KVCacheLM holds the DecoderLM as `.model` (and HFDecoder the HF model as `.hf`)


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
    pos0: float | None = None  # c0 / c of a TaperNorm with position 0's own scale: x * where(pos == 0, pos0, 1)
    prescale: torch.Tensor | None = None  # a = c / B, () or (d,), of a bounded map (bound.py): tanh(x * a [* p])

    @property
    def is_noop(self) -> bool:
        """True if the graph emits nothing for this norm (folded, no position-0 factor, no bound)."""
        return self.kind == "none" and self.pos0 is None and self.prescale is None


def linear_weights(gm: fx.GraphModule, prefix: str = WRAPPER_PREFIX) -> dict[str, tuple[torch.Tensor, torch.Tensor | None]]:
    """{module path less `prefix` (e.g. "model.layers.0.self_attn.q_proj"): (W (out, in), b (out,) or None)}.

    Every linear form passes.linears knows (aten.linear, Conv1D's addmm, x @ W.T) is read by its own
    `linear_output` / `read_linear`, so what counts as a linear is decided in one place.
    """
    out: dict = {}
    for node in gm.graph.nodes:
        c = linear_output(node)
        if c is None:
            continue
        path = c.module_path or node.name
        path = path[len(prefix):] if path.startswith(prefix) else path
        w, b = read_linear(gm, c)
        w = w.detach().t() if c.layout == "in_out" else w.detach()  # (out, in)
        if path in out:
            raise LeanError(f"{path}: called more than once in the captured graph; the lean graph maps each "
                            "linear once (compile with --graph generic)")
        out[path] = (w, b.detach() if b is not None else None)
    return out


def _kept_norm(name: str, m: nn.Module, gain_offset: float) -> NormSpec | None:
    """A plain (untapered) RMSNorm / LayerNorm, torch's or a Hugging Face class; None for anything else."""
    w = getattr(m, "weight", None)
    if isinstance(m, nn.LayerNorm) or type(m).__name__.endswith("LayerNorm") and hasattr(m, "bias"):
        if w is None or getattr(m, "bias", None) is None:
            raise LeanError(f"{name}: LayerNorm without weight and bias; the lean graph needs both "
                            "(compile with --graph generic)")
        return NormSpec(name, "ln", w.detach(), m.bias.detach(), float(m.eps))
    if isinstance(m, nn.RMSNorm) or type(m).__name__.endswith("RMSNorm"):
        if not isinstance(w, torch.Tensor):
            raise LeanError(f"{name}: RMSNorm without a gain; the lean graph needs one (compile with --graph generic)")
        eps = next((getattr(m, a) for a in ("variance_epsilon", "eps", "epsilon") if getattr(m, a, None) is not None),
                   None)
        eps = eps if eps is not None else torch.finfo(w.dtype).eps
        return NormSpec(name, "rms", w.detach().double() + gain_offset, None, float(eps))
    return None


def _pos0(name: str, m: nn.Module, site: SiteResult) -> float | None:
    """c0 / c (float32) of a gate-0 TaperNorm with position 0's own scale, read from the model (c0, c buffers);
    the passes' SiteResult must agree (a folded graph without the factor would be silently wrong)."""
    ratio = float(pos0_ratio_value(m)) if getattr(m, "has_pos0", False) else None
    if (ratio is None) != (site.pos0 is None) or (ratio is not None and ratio != site.pos0):
        raise LeanError(f"{name}: the model's position-0 scale (c0 / c = {ratio}) differs from what the passes saw "
                        f"({site.pos0}); re-run the fold on this model")
    return ratio


def _prescale(name: str, m: nn.Module, site: SiteResult) -> torch.Tensor | None:
    """c / B (() or (d,)) of a bounded gate-0 TaperNorm (tapernorm/bound.py), read from the model; the passes
    must agree."""
    a = bound_prescale(m) if getattr(m, "has_bound", False) else None
    b = site.bound_prescale
    if (a is None) != (b is None) or (a is not None and not torch.equal(a, b)):
        raise LeanError(f"{name}: the model's bound prescale (c / B = {_show(a)}) differs from what the passes saw "
                        f"({_show(b)}); re-run the fold on this model")
    return a


def _show(a: torch.Tensor | None):
    return None if a is None else bound_json(a)


def norm_spec(name: str, m: nn.Module, site: SiteResult | None, gain_offset: float = 0.0) -> NormSpec:
    """The NormSpec of norm module `m` (at builder path `name`) from the passes' typed result for its site."""
    if isinstance(m, TAPER_TYPES):
        status = site.status if site is not None else None
        ln = type(m).__name__ == "TaperLayerNorm"
        p0 = _pos0(name, m, site) if status in ("folded", "materialized") else None
        a = _prescale(name, m, site) if status in ("folded", "materialized") else None
        if status == "folded":
            return NormSpec(name, "none", eps=m.eps, pos0=p0, prescale=a)
        if status == "materialized":
            return NormSpec(name, "map_ln" if ln else "map_rms", site.scale, site.shift, m.eps, p0, a)
        why = (site.reason if site is not None else None) or f"gate {m.gate:g} is not 0"
        raise LeanError(f"{name}: {type(m).__name__} is not at gate 0 ({why}); its blend of norm and map has no "
                        "fused op in the lean graph - finish the taper, or compile with --graph generic")
    spec = _kept_norm(name, m, gain_offset)
    if spec is None:
        raise LeanError(f"{name}: norm type {type(m).__name__} has no lean op (RMSNorm, LayerNorm and TaperNorm at "
                        "gate 0 do); compile with --graph generic")
    return spec
