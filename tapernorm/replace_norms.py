"""Finding a model's norms and replacing them with TaperNorms equal to them at gate 1 (`taperize`).

Each RMSNorm / LayerNorm variant (plain gain, Gemma's 1 + w, no gain, no bias, gated) is recognised by what it
computes on probe inputs, not by its class name, and refused with one line when TaperNorm cannot represent it.
"""
from __future__ import annotations

import inspect
import math
import re

import torch
import torch.nn as nn

from .layers import TAPER_TYPES, TaperError, TaperLayerNorm, TaperNorm, _TaperBase

__all__ = ["taperize", "find_norms", "find_final_norm", "HEADS_FIRST_NORMS", "set_token_dims", "MLP_NORMS", "mlp_norm_pattern"]

# model_type -> names of the norms it calls on (B, H, T, d): per-head QK-norms applied after q / k move their heads
# before the tokens (`.transpose(1, 2)`), so their TaperNorms get token_dim 2 (tapernorm/pos0.py). Read off each
# family's modeling code (transformers 5); every other norm keeps token_dim 1 ((B, T, d), or per head (B, T, H, d)
# as Qwen3 / OLMo-style QK-norms called before the transpose). Stable LM's per-head LayerNorms sit inside
# `q_layernorm.norms.<i>` (each sees (B, 1, T, d)): a name matches when any of its components is listed.
HEADS_FIRST_NORMS: dict[str, tuple[str, ...]] = {
    "gemma3_text": ("q_norm", "k_norm"), "gemma3": ("q_norm", "k_norm"), "exaone4": ("q_norm", "k_norm"),
    "apertus": ("q_norm", "k_norm"), "phi": ("q_layernorm", "k_layernorm"), "stablelm": ("q_layernorm", "k_layernorm"),
}


# model_type -> the block norms that bound the MLP's input (or, where it has none, its output). At gate 0 a gated MLP
# (SwiGLU / GeGLU) grows quadratically in its input, so an outlier token's residual about squares per layer
# (docs/real_checkpoints.md, section 8); keeping these norms (--keep-mlp-norms) tapers only the attention side.
# Families not listed use _MLP_NORMS_DEFAULT. An empty tuple: one norm per block feeds attention and the MLP alike
# (a parallel block), so there is no attention-only taper.
_MLP_NORMS_DEFAULT = ("post_attention_layernorm", "ln_2")
MLP_NORMS: dict[str, tuple[str, ...]] = {
    "gemma2": ("pre_feedforward_layernorm",), "gemma3": ("pre_feedforward_layernorm",),
    "gemma3_text": ("pre_feedforward_layernorm",), "olmo2": ("post_feedforward_layernorm",),
    "olmo3": ("post_feedforward_layernorm",), "phi": (), "cohere": (), "cohere2": (), "falcon": (), "gptj": (),
}


def mlp_norm_pattern(model: nn.Module) -> str:
    """A `taperize(keep=...)` regular expression matching the norms in front of each block's MLP (MLP_NORMS, by
    model.config.model_type). Raises TaperError for parallel-block families, whose one block norm also feeds
    attention."""
    mt = getattr(getattr(model, "config", None), "model_type", None)
    names = MLP_NORMS.get(mt, _MLP_NORMS_DEFAULT) if isinstance(mt, str) else _MLP_NORMS_DEFAULT
    if not names:
        raise TaperError(f"{mt}: one norm per block feeds both attention and the MLP (a parallel block), so "
                         "--keep-mlp-norms would keep every block norm; taper all of them or keep some by --keep-norms")
    return r"\.(?:" + "|".join(map(re.escape, names)) + r")$"


_FINAL_NORM_NAMES = ("norm", "ln_f", "final_layernorm", "final_norm", "norm_f")


def _is_leaf(m: nn.Module) -> bool:
    return next(m.children(), None) is None


def _is_rms_norm(m: nn.Module) -> bool:
    if isinstance(m, TAPER_TYPES):
        return False
    return isinstance(m, nn.RMSNorm) or ("RMSNorm" in type(m).__name__ and _is_leaf(m))


def _is_layer_norm(m: nn.Module) -> bool:
    if isinstance(m, TAPER_TYPES):
        return False
    return isinstance(m, nn.LayerNorm) or (type(m).__name__.endswith("LayerNorm") and _is_leaf(m))


def find_norms(model: nn.Module) -> list[tuple[str, nn.Module]]:
    """(qualified name, module) of every RMSNorm / LayerNorm not yet tapered, in module order."""
    return [(n, m) for n, m in model.named_modules() if n and (_is_rms_norm(m) or _is_layer_norm(m))]


def find_final_norm(model: nn.Module) -> str | None:
    """Qualified name of the norm feeding the output head: a known final-norm name, else the last norm."""
    norms = [n for n, m in model.named_modules() if n and (_is_rms_norm(m) or _is_layer_norm(m) or isinstance(m, TAPER_TYPES))]
    for n in norms:
        if n.split(".")[-1] in _FINAL_NORM_NAMES and n.count(".") <= 1:
            return n
    return norms[-1] if norms else None


def _norm_eps(m: nn.Module, default: float) -> float | None:
    """The module's epsilon; None for torch's nn.RMSNorm(eps=None) (dtype machine epsilon)."""
    if isinstance(m, nn.RMSNorm):
        return None if m.eps is None else float(m.eps)
    for attr in ("eps", "variance_epsilon", "epsilon", "layer_norm_eps"):
        v = getattr(m, attr, None)
        if isinstance(v, (int, float)):
            return float(v)
    return default


def _feature_dim(m: nn.Module, w) -> int | None:
    if isinstance(w, torch.Tensor):
        return w.numel()
    shape = getattr(m, "normalized_shape", None) or getattr(m, "hidden_size", None) or getattr(m, "dim", None)
    shape = (shape,) if isinstance(shape, int) else tuple(shape or ())
    return shape[0] if len(shape) == 1 else None


def _build(cls, d: int, eps: float, m: nn.Module, offset: float, dtype, device) -> _TaperBase:
    """cls(d) at gate 1 holding m's gain (offset + weight; 1 when m has none, then frozen) and bias (0, frozen)."""
    new = cls(d, eps=eps).to(device)
    for p in new.parameters():  # parameters take the norm's dtype; gate/EMA buffers stay float64
        p.data = p.data.to(dtype)
    w, b = getattr(m, "weight", None), getattr(m, "bias", None)
    with torch.no_grad():
        if w is not None:
            gain = (offset + w.float()).to(dtype)  # Gemma: (1 + w) in float32, as its forward computes it
            new.weight.copy_(gain)
            new.weight_t.copy_(gain)
        else:
            new.weight.requires_grad_(False)
        if cls is TaperLayerNorm:
            if b is not None:
                new.bias.copy_(b)
                new.bias_t.copy_(b)
            else:
                new.bias.requires_grad_(False)
    return new.train(m.training)


@torch.no_grad()
def _probe_diff(m: nn.Module, new: _TaperBase, d: int, dtype, device, gated: bool = False) -> float:
    """max |new(x) - m(x)| / max |m(x)| on fixed probe inputs (small scale too, so eps shows); gated: (x, gate)."""
    g = torch.Generator().manual_seed(0)
    worst = 0.0
    for scale, shift in ((3.0, 0.5), (0.01, 0.002)):
        x = (torch.randn(2, 3, d, generator=g, dtype=torch.float64) * scale + shift).to(device, dtype)
        args = (x, torch.randn(2, 3, d, generator=g, dtype=torch.float64).to(device, dtype)) if gated else (x,)
        ref, got = m(*args), new(*args)
        if not isinstance(ref, torch.Tensor) or ref.shape != got.shape:
            return math.inf
        err = ((got.double() - ref.double()).abs().max() / (ref.double().abs().max() + 1e-12)).item()
        worst = max(worst, err if math.isfinite(err) else math.inf)
    return worst


def _plan_norm(name: str, m: nn.Module, model_dtype, model_device) -> _TaperBase | None:
    """A TaperNorm / TaperLayerNorm equal to norm `m` at gate 1 (checked on probe inputs); None if `m` is no norm.

    RMS norms with a plain gain or Gemma's (1 + w) gain, LayerNorms with or without weight / bias.
    Raises TaperError (one line) for a norm it cannot represent.
    """
    rms, ln = _is_rms_norm(m), _is_layer_norm(m)
    kind = type(m).__name__
    if not (rms or ln):
        if isinstance(m, (nn.GroupNorm, nn.LocalResponseNorm)):
            raise TaperError(f"{name}: {kind} is not an RMSNorm or a LayerNorm; tapernorm cannot taper it")
        return None
    extra = [p for p in list(inspect.signature(m.forward).parameters.values())[1:] if p.kind is not p.VAR_KEYWORD]
    gated = rms and len(extra) == 1 and "gate" in extra[0].name  # RMSNorm(x) * w * act(gate): TaperNormGated
    if extra and not gated:
        raise TaperError(f"{name}: {kind} takes extra inputs ({', '.join(p.name for p in extra)}), e.g. a gated norm; "
                         "TaperNorm cannot represent it")
    w, b = getattr(m, "weight", None), getattr(m, "bias", None)
    if w is not None and (not isinstance(w, torch.Tensor) or w.dim() != 1):
        shape = tuple(w.shape) if isinstance(w, torch.Tensor) else type(w).__name__
        raise TaperError(f"{name}: {kind} has a gain of shape {shape}, not a 1-D per-feature vector; "
                         "TaperNorm cannot represent it")
    if rms and b is not None:
        raise TaperError(f"{name}: {kind} has a bias; TaperNorm (RMS) cannot represent it")
    d = _feature_dim(m, w)
    if d is None and w is None:
        raise TaperError(f"{name}: {kind} has no gain and names no feature size (normalized_shape / hidden_size / "
                         "dim); tapernorm cannot size a TaperNorm for it")
    if d is None:
        raise TaperError(f"{name}: {kind} normalizes over more than one dim; tapernorm tapers norms over the last "
                         "dim only")
    dtype, device = (w.dtype, w.device) if w is not None else (model_dtype, model_device)
    eps = _norm_eps(m, 1e-6 if rms else 1e-5)
    if eps is None:  # nn.RMSNorm(eps=None) uses the input dtype's machine epsilon
        eps = torch.finfo(dtype).eps
    cls = TaperNorm if rms else TaperLayerNorm
    if device.type == "meta" and gated:
        raise TaperError(f"{name}: {kind} is a gated norm on the meta device; taperize it with real weights")
    if device.type == "meta":  # nothing to probe: trust the name
        return _build(cls, d, eps, m, 1.0 if rms and kind.startswith("Gemma") else 0.0, dtype, device)
    # what the name says first, then (1 + w) gains (Gemma, Nemotron's LayerNorm1P), then the other kind
    other = TaperLayerNorm if rms else (TaperNorm if b is None else None)
    offsets = (0.0, 1.0) if w is not None else (0.0,)
    candidates = [(cls, o) for o in offsets] + ([(other, o) for o in offsets] if other is not None else [])
    tol = 1e-5 if dtype in (torch.float32, torch.float64) else 3e-2
    if gated:
        from .gated import plan_gated
        new, diff = plan_gated(name, m, lambda c, o: _build(c, d, eps, m, o, dtype, device),
                               lambda n: _probe_diff(m, n, d, dtype, device, gated=True), tol)
        if new is None:
            raise TaperError(f"{name}: {kind} is a gated norm but not RMSNorm(x) * w * act(gate) with act silu or "
                             f"sigmoid (relative diff {diff:.2g} on a probe input); tapernorm cannot represent it")
        return new
    diffs = []
    for cls, offset in candidates:
        new = _build(cls, d, eps, m, offset, dtype, device)
        try:
            diffs.append(_probe_diff(m, new, d, dtype, device))
        except Exception as e:  # the norm's own forward rejects a plain (..., d) input
            raise TaperError(f"{name}: {kind} fails on a (..., {d}) input ({type(e).__name__}); "
                             "tapernorm cannot taper it") from e
        if diffs[-1] <= tol:
            return new
    raise TaperError(f"{name}: {kind} computes neither an RMSNorm nor a LayerNorm with gain w or 1 + w (relative "
                     f"diff {min(diffs):.2g} on a probe input); tapernorm cannot represent it")


def set_token_dims(model: nn.Module) -> int:
    """Set every TaperNorm's token_dim from the model family (model.config.model_type, HEADS_FIRST_NORMS): 2 for the
    norms that family calls on (B, H, T, d), 1 for the rest. taperize and the HF loaders call it; returns how many
    layers got 2. A model without a known config keeps what its layers say."""
    mt = getattr(getattr(model, "config", None), "model_type", None)
    if not isinstance(mt, str):
        return 0
    heads_first = set(HEADS_FIRST_NORMS.get(mt, ()))
    n = 0
    for name, m in model.named_modules():
        if isinstance(m, TAPER_TYPES):
            m.token_dim = 2 if heads_first & set(name.split(".")) else 1
            n += m.token_dim == 2
    return n


def taperize(model: nn.Module, mode: str = "internal", final_norm: str | None = None,
             keep: str | None = None) -> list[str]:
    """Replace every RMSNorm / LayerNorm in `model` with a TaperNorm / TaperLayerNorm equal to it at gate 1.

    Covers plain-gain RMSNorms, Gemma's (1 + w) RMSNorm (the TaperNorm gain is 1 + w), LayerNorms with
    or without weight / bias (a missing one is a frozen 1 / 0). Each replacement is checked against the
    norm on probe inputs. mode="internal" leaves the final norm (the one feeding the output head) alone;
    "all" tapers it too. `keep`: a regular expression; norms whose qualified name it matches (re.search) stay
    as they are (a partial taper: those stay norms in the compiled graph). Returns the qualified names replaced.
    Each TaperNorm's token_dim comes from the model family (set_token_dims: 2 for Gemma 3's per-head QK-norms).
    Refuses (TaperError) norm types it cannot represent, before changing anything.
    """
    if mode not in ("internal", "all"):
        raise TaperError(f"mode {mode!r} is not one of 'internal', 'all'")
    final = final_norm if final_norm is not None else find_final_norm(model)
    first = next((p for p in model.parameters() if p.is_floating_point()), torch.empty(0))
    if keep:
        try:
            re.compile(keep)
        except re.error as e:
            raise TaperError(f"keep pattern {keep!r} is not a valid regular expression ({e})") from None
    plan, kept = [], []  # check every norm first, so a refusal leaves the model untouched
    for name, m in model.named_modules():
        if not name or isinstance(m, TAPER_TYPES) or (mode == "internal" and name == final):
            continue
        if keep and re.search(keep, name):
            if _is_rms_norm(m) or _is_layer_norm(m):
                kept.append(name)
            continue
        new = _plan_norm(name, m, first.dtype, first.device)
        if new is not None:
            plan.append((name, new))
    if keep and not kept:
        raise TaperError(f"keep pattern {keep!r} matches no norm; norms are named like "
                         f"{', '.join(n for n, _ in plan[:2]) or 'model.layers.0.input_layernorm'}")
    for name, new in plan:
        parent_name, _, child = name.rpartition(".")
        setattr(model.get_submodule(parent_name) if parent_name else model, child, new)
    set_token_dims(model)  # per-head norms on (B, H, T, d): tokens on dim 2 (calibration, c0, position skipping)
    if plan:  # transformers' own save_pretrained now writes a config plain loaders refuse (hf_config.py)
        from .hf_config import guard_hf_config
        guard_hf_config(getattr(model, "config", None))
    return [name for name, _ in plan]

