"""TaperNorm layers (arXiv 2602.10408) and the functions that manage them on any nn.Module.

Row-vector convention, token h in R^d, r(h) = sqrt(||h||^2 / d + eps):

    TaperNorm(h; g) = g * (h / r(h)) * gamma + (1 - g) * c * h * gamma_t
    TaperLN(h; g)   = g * ((h - mu) / sigma * gamma + beta) + (1 - g) * (c * (h - mu) * gamma_t + beta_t)

At g == 1 the layer is exactly the norm; at g == 0 it is the fixed map x * s (LN: (x - mu) * s + beta_t)
with s = c * gamma_t, and no per-token statistic is computed at all.

State that drives Python control flow (the gate and whether c is frozen) lives in plain Python
attributes, so torch.export sees a branch-free graph; it is mirrored into buffers (`gate_value`,
`calibrated_flag`) so that a state dict / safetensors file carries it, and a load hook restores it.
"""
from __future__ import annotations

import inspect
import math
import re
from typing import Iterable

import torch
import torch.nn as nn
import torch.nn.functional as F

from .cap import cap_factor
from .pos0 import _pos0_freeze, _pos0_observe, pos0_factor, track_positions

__all__ = [
    "TaperNorm", "TaperLayerNorm", "TAPER_TYPES", "taperize", "calibrate", "set_gate", "get_gate",
    "taper_layers", "find_final_norm", "begin_calibration", "finish_calibration", "TaperError", "CALIB_STATS",
]


class TaperError(ValueError):
    """A TaperNorm was asked to do something its state does not allow."""


class _TaperBase(nn.Module):
    """Shared state: gate, calibration EMAs, frozen scalar c."""

    def __init__(self, dim: int, eps: float, beta_ema: float = 0.1):
        super().__init__()
        self.dim, self.eps, self.beta_ema = int(dim), float(eps), float(beta_ema)
        self.register_buffer("c", torch.ones(()))
        self.register_buffer("calib_num", torch.zeros((), dtype=torch.float64))
        self.register_buffer("calib_den", torch.zeros((), dtype=torch.float64))
        self.register_buffer("calib_count", torch.zeros((), dtype=torch.int64))
        self.register_buffer("gate_value", torch.ones((), dtype=torch.float64))
        self.register_buffer("calibrated_flag", torch.zeros((), dtype=torch.bool))
        self.register_buffer("c0", torch.zeros(()))  # position 0's own c (attention sink); 0: none
        self.gate: float = 1.0
        self.has_pos0: bool = False  # mirrors c0 > 0 (Python control flow, like gate)
        self.taper_cap: float = 0.0  # training-only guard while 0 < gate < 1 (cap.py); 0: off
        self.cap_anneal: bool = False  # K / gate instead of K
        self.cap_hits: int = 0
        self.cap_seen: int = 0
        self.pos0_rows: torch.Tensor | None = None  # (B, T) bool set per forward by track_positions; None: row 0
        self.calibrated: bool = False
        self.collecting: bool = False
        # calibration options (begin_calibration's; plain attributes, not saved: c and gamma_t carry the result)
        self.calib_skip: int = 0              # leading positions of each sequence left out (attention sinks)
        self.calib_stat: str = "ls"           # "ls": least-squares c; "inv_rms": mean of 1 / r(h) per token
        self.calib_per_feature: bool = False  # least-squares scale per feature, folded into gamma_t at freeze
        self._feat: tuple[torch.Tensor, torch.Tensor] | None = None  # per-feature EMAs (d,), (d,) float64
        self.calib_pos0: bool = False         # calibrate a separate c0 for position 0 (pos0.py)
        self._p0: torch.Tensor | None = None  # EMA of mean 1 / r(h) at position 0, float64
        self.register_load_state_dict_post_hook(_sync_python_state)

    # -- gate -----------------------------------------------------------------------------------
    def set_gate(self, g: float) -> None:
        """Set this layer's gate; 0 < g < 1 and g == 0 need a calibrated c."""
        g = float(g)
        if not (0.0 <= g <= 1.0) or math.isnan(g):
            raise TaperError(f"gate {g!r} is outside [0, 1]; pass a value in [0, 1]")
        if g < 1.0 and not self.calibrated:
            raise TaperError(f"gate {g} < 1 needs a calibrated c; call calibrate() (or train through warmup) first")
        self.gate = g
        self.gate_value.fill_(g)

    # -- calibration ------------------------------------------------------------------------------
    @torch.no_grad()
    def _observe(self, num: torch.Tensor, den: torch.Tensor) -> None:
        """EMA update with new-sample weight beta_ema: m <- (1 - b) m + b x."""
        b = self.beta_ema
        self.calib_num.mul_(1 - b).add_(b * num.double())
        self.calib_den.mul_(1 - b).add_(b * den.double())
        self.calib_count.add_(1)

    @torch.no_grad()
    def _collect(self, xc: torch.Tensor, r_inv: torch.Tensor) -> None:
        """Calibration statistics of one batch: xc (..., T, d) float (centered for LN), r_inv (..., T) = 1 / r(h)."""
        if self.calib_pos0:
            self._p0 = _pos0_observe(self, r_inv)
        k = self.calib_skip
        if k:
            if xc.dim() < 3 or xc.shape[1] <= k:
                raise TaperError(f"calibration skips the first {k} position(s) but got input of shape "
                                 f"{tuple(xc.shape)}; calibrate on (batch, seq > {k}, d) sequences")
            xc, r_inv = xc[:, k:], r_inv[:, k:]  # position is dim 1 (per-head norms: (B, T, H, d))
        if self.calib_stat == "inv_rms":  # sink-robust: a huge token adds ~0 to the mean of 1 / r
            self._observe(r_inv.mean(), torch.ones((), dtype=torch.float64))
        else:
            hg2 = (xc * self.weight.float()).pow(2).sum(-1)  # ||h*gamma||^2 per token
            self._observe((hg2 * r_inv).mean(), hg2.mean())
        if self.calib_per_feature:
            x2 = xc.double().pow(2).reshape(-1, self.dim)  # (N, d)
            num, den = (x2 * r_inv.double().reshape(-1, 1)).mean(0), x2.mean(0)
            b = self.beta_ema
            if self._feat is None:
                self._feat = (torch.zeros_like(num), torch.zeros_like(den))
            self._feat[0].mul_(1 - b).add_(b * num)
            self._feat[1].mul_(1 - b).add_(b * den)

    def calib_tensors(self) -> list[torch.Tensor]:
        """Every calibration EMA (for averaging over ranks before freeze_c)."""
        return [self.calib_num, self.calib_den, *(self._feat or ()), *(() if self._p0 is None else (self._p0,))]

    def calibrated_c(self) -> float:
        """Bias-corrected c* = m_hat_num / m_hat_den (the correction factors cancel in the ratio)."""
        n = int(self.calib_count)
        if n == 0:
            raise TaperError("no calibration batches were observed; run forward passes between "
                             "begin_calibration() and finish_calibration()")
        corr = 1.0 - (1.0 - self.beta_ema) ** n
        num, den = float(self.calib_num) / corr, float(self.calib_den) / corr
        if not den > 0 or not math.isfinite(num / den):
            raise TaperError(f"calibration statistics are degenerate (num={num}, den={den}); feed non-zero inputs")
        return num / den

    @torch.no_grad()
    def freeze_c(self) -> float:
        """Set c from the EMAs, copy gamma -> gamma_t (beta -> beta_t), freeze c. Only once."""
        if self.calibrated:
            raise TaperError("c is already calibrated and frozen; calibrating twice would change a trained map")
        c = self.calibrated_c()
        self.c.fill_(c)
        self.weight_t.copy_(self.weight)
        if self.calib_per_feature and self._feat is not None:  # s_j = gamma_j * sum x_j^2 / r / sum x_j^2
            num, den = self._feat
            cf = torch.where(den > 0, num / den.clamp_min(1e-300), torch.full_like(num, c))
            self.weight_t.copy_((self.weight.double() * cf / c).to(self.weight_t.dtype))
            self._feat = None
        if hasattr(self, "bias_t"):
            self.bias_t.copy_(self.bias)
        if self.calib_pos0:
            _pos0_freeze(self)
        self.calibrated = True
        self.calibrated_flag.fill_(True)
        self.collecting = False
        return c

    def taper_scale(self) -> torch.Tensor:
        """s = c * gamma_t, the per-feature scale of the gate-zero map."""
        return self.c * self.weight_t

    def fixed_map(self, x: torch.Tensor) -> torch.Tensor:
        """The gate-0 branch without beta_t: x * s, times c0 / c on position-0 rows when c0 is set."""
        y = x * self.taper_scale().to(x.dtype)
        return y * pos0_factor(self, x) if self.has_pos0 else y

    def extra_repr(self) -> str:
        extra = f", c0={float(self.c0):.4g}" if self.has_pos0 else ""
        return f"{self.dim}, eps={self.eps}, gate={self.gate}, calibrated={self.calibrated}{extra}"

    def _load_from_state_dict(self, state_dict, prefix, *args, **kwargs):
        state_dict.setdefault(prefix + "c0", torch.zeros(()))  # files written before c0 existed
        super()._load_from_state_dict(state_dict, prefix, *args, **kwargs)


def _sync_python_state(module: _TaperBase, incompatible_keys) -> None:
    module.gate = float(module.gate_value)
    module.calibrated = bool(module.calibrated_flag)
    module.has_pos0 = bool(module.c0 > 0)


class TaperNorm(_TaperBase):
    """RMSNorm that tapers to x * (c * gamma_t). `weight` is gamma, `weight_t` is gamma tilde."""

    def __init__(self, dim: int, eps: float = 1e-6, beta_ema: float = 0.1):
        super().__init__(dim, eps, beta_ema)
        self.weight = nn.Parameter(torch.ones(dim))
        self.weight_t = nn.Parameter(torch.ones(dim))

    def forward(self, x: torch.Tensor) -> torch.Tensor:  # x: (..., d)
        g = self.gate
        if g == 0.0:  # no per-token statistic at all
            return self.fixed_map(x)
        xf = x.float()
        r_inv = torch.rsqrt(xf.pow(2).mean(-1, keepdim=True) + self.eps)  # (..., 1) = 1 / r(h)
        if self.collecting and self.training:
            self._collect(xf, r_inv.squeeze(-1))
        normed = (xf * r_inv).type_as(x) * self.weight
        if g == 1.0:
            return normed
        fixed = self.fixed_map(x)
        if self.taper_cap:
            fixed = fixed * cap_factor(self, r_inv, x)
        return g * normed + (1.0 - g) * fixed


class TaperLayerNorm(_TaperBase):
    """LayerNorm (with bias) that tapers to the affine map (x - mean) * (c * gamma_t) + beta_t."""

    def __init__(self, dim: int, eps: float = 1e-5, beta_ema: float = 0.1):
        super().__init__(dim, eps, beta_ema)
        self.weight = nn.Parameter(torch.ones(dim))
        self.bias = nn.Parameter(torch.zeros(dim))
        self.weight_t = nn.Parameter(torch.ones(dim))
        self.bias_t = nn.Parameter(torch.zeros(dim))

    def forward(self, x: torch.Tensor) -> torch.Tensor:  # x: (..., d)
        g = self.gate
        centered = x - x.mean(-1, keepdim=True)  # linear: kept at g == 0
        if g == 0.0:
            return self.fixed_map(centered) + self.bias_t
        if self.collecting and self.training:
            cf = centered.float()
            self._collect(cf, torch.rsqrt(cf.pow(2).mean(-1) + self.eps))
        normed = F.layer_norm(x, (self.dim,), self.weight, self.bias, self.eps)
        if g == 1.0:
            return normed
        fixed = self.fixed_map(centered)
        if self.taper_cap:
            fixed = fixed * cap_factor(self, torch.rsqrt(centered.float().pow(2).mean(-1, keepdim=True) + self.eps), x)
        return g * normed + (1.0 - g) * (fixed + self.bias_t)


TAPER_TYPES = (TaperNorm, TaperLayerNorm)

# --------------------------------------------------------------------------------------------------
# Whole-model helpers
# --------------------------------------------------------------------------------------------------

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


def taperize(model: nn.Module, mode: str = "internal", final_norm: str | None = None,
             keep: str | None = None) -> list[str]:
    """Replace every RMSNorm / LayerNorm in `model` with a TaperNorm / TaperLayerNorm equal to it at gate 1.

    Covers plain-gain RMSNorms, Gemma's (1 + w) RMSNorm (the TaperNorm gain is 1 + w), LayerNorms with
    or without weight / bias (a missing one is a frozen 1 / 0). Each replacement is checked against the
    norm on probe inputs. mode="internal" leaves the final norm (the one feeding the output head) alone;
    "all" tapers it too. `keep`: a regular expression; norms whose qualified name it matches (re.search) stay
    as they are (a partial taper: those stay norms in the compiled graph). Returns the qualified names replaced.
    Refuses (TaperError) norm types it cannot represent, before changing anything.
    """
    if mode not in ("internal", "all"):
        raise TaperError(f"mode {mode!r} is not one of 'internal', 'all'")
    final = final_norm if final_norm is not None else find_final_norm(model)
    first = next((p for p in model.parameters() if p.is_floating_point()), torch.empty(0))
    plan = []  # check every norm first, so a refusal leaves the model untouched
    for name, m in model.named_modules():
        if not name or isinstance(m, TAPER_TYPES) or (mode == "internal" and name == final):
            continue
        if keep and re.search(keep, name):
            continue
        new = _plan_norm(name, m, first.dtype, first.device)
        if new is not None:
            plan.append((name, new))
    for name, new in plan:
        parent_name, _, child = name.rpartition(".")
        setattr(model.get_submodule(parent_name) if parent_name else model, child, new)
    if plan:  # transformers' own save_pretrained now writes a config plain loaders refuse (hf_config.py)
        from .hf_config import guard_hf_config
        guard_hf_config(getattr(model, "config", None))
    return [name for name, _ in plan]


def taper_layers(model: nn.Module) -> list[tuple[str, _TaperBase]]:
    """(qualified name, layer) for every TaperNorm / TaperLayerNorm in `model`."""
    return [(n, m) for n, m in model.named_modules() if isinstance(m, TAPER_TYPES)]


def set_gate(model: nn.Module, g: float) -> int:
    """Set the one global gate on every TaperNorm layer; returns how many layers were set."""
    layers = taper_layers(model)
    g = float(g)
    if not (0.0 <= g <= 1.0) or math.isnan(g):
        raise TaperError(f"gate {g!r} is outside [0, 1]; pass a value in [0, 1]")
    missing = [n for n, m in layers if g < 1.0 and not m.calibrated]
    if missing:
        raise TaperError(f"gate {g} < 1 needs calibrated layers; not calibrated: {', '.join(missing[:4])}"
                         f"{' ...' if len(missing) > 4 else ''}; call calibrate() first")
    for _, m in layers:
        m.set_gate(g)
    return len(layers)


def get_gate(model: nn.Module) -> float | None:
    """The global gate (None if the model has no TaperNorm); raises if layers disagree."""
    gates = {m.gate for _, m in taper_layers(model)}
    if not gates:
        return None
    if len(gates) > 1:
        raise TaperError(f"TaperNorm layers disagree on the gate: {sorted(gates)}; call set_gate()")
    return gates.pop()


CALIB_STATS = ("ls", "inv_rms")


def begin_calibration(model: nn.Module, skip_positions: int = 0, stat: str = "ls", per_feature: bool = False,
                      pos0: bool = False) -> None:
    """Start collecting c statistics on every uncalibrated layer (needs model.train()).

    Options for checkpoints with attention sinks (a few tokens, usually position 0, with residual RMS ~100x the
    rest; docs/real_checkpoints.md): skip_positions leaves each sequence's first positions out; stat "inv_rms"
    takes c = mean over tokens of 1 / r(h) (a huge token adds ~0) instead of the least-squares fit "ls" (which
    such a token dominates); per_feature fits a least-squares scale per feature and folds it into gamma_t, so
    c * gamma_t is still one per-feature map (the fold is unchanged); pos0 also calibrates position 0's own c0
    (pos0.py: the sink keeps its scale, one (B, T, 1) Mul per norm in the folded graph)."""
    if stat not in CALIB_STATS:
        raise TaperError(f"calibration statistic {stat!r} is not one of {', '.join(CALIB_STATS)}")
    if int(skip_positions) != skip_positions or skip_positions < 0:
        raise TaperError(f"skip_positions must be a non-negative integer, got {skip_positions!r}")
    layers = taper_layers(model)
    already = [n for n, m in layers if m.calibrated]
    if already:
        raise TaperError(f"already calibrated: {', '.join(already[:4])}; c is frozen once set")
    for _, m in layers:
        m.collecting = True
        m.calib_skip, m.calib_stat, m.calib_per_feature = int(skip_positions), stat, bool(per_feature)
        m.calib_pos0 = bool(pos0)
    if pos0:
        track_positions(model)


def finish_calibration(model: nn.Module) -> dict[str, float]:
    """Freeze c on every collecting layer; returns {layer name: c}. Refuses (naming them) layers no batch reached."""
    layers = [(n, m) for n, m in taper_layers(model) if m.collecting]
    unseen = [n for n, m in layers if int(m.calib_count) == 0]
    if unseen and len(unseen) < len(layers):
        raise TaperError(f"calibration never reached {len(unseen)} TaperNorm layer(s): {', '.join(unseen[:4])}"
                         f"{' ...' if len(unseen) > 4 else ''}; the calibration forward does not call them (pass a "
                         "forward= that does, or leave them out of taperize)")
    return {n: m.freeze_c() for n, m in layers}


@torch.no_grad()
def calibrate(model: nn.Module, batches: Iterable, forward=None, skip_positions: int = 0, stat: str = "ls",
              per_feature: bool = False, pos0: bool = False) -> dict[str, float]:
    """Run the taper-start calibration outside a trainer: EMA over `batches`, bias-corrected c,
    copy gamma -> gamma_t (beta -> beta_t), freeze c. `forward(model, batch)` defaults to model(batch).
    skip_positions / stat / per_feature / pos0: begin_calibration's options for checkpoints with attention sinks.

    The gate is held at 1 while collecting. Only the TaperNorm layers are switched to train mode, so a
    model in eval mode calibrates deterministically (no dropout). Returns {layer name: c}.
    """
    if not taper_layers(model):
        raise TaperError("model has no TaperNorm layers; call taperize() first")
    begin_calibration(model, skip_positions, stat, per_feature, pos0)
    layers = [m for _, m in taper_layers(model)]
    was_training = [m.training for m in layers]
    for m in layers:  # only the TaperNorm layers collect; dropout etc. keep the mode the caller set
        m.train()
    try:
        n = 0
        for batch in batches:
            forward(model, batch) if forward is not None else model(batch)
            n += 1
        if n == 0:
            raise TaperError("calibrate() got no batches; pass at least one batch")
        return finish_calibration(model)
    finally:
        for m, t in zip(layers, was_training):
            m.collecting = False
            m.train(t)
