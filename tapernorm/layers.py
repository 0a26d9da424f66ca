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

import math
from typing import Iterable

import torch
import torch.nn as nn
import torch.nn.functional as F

from .bound import bounded_map
from .cap import cap_factor
from .pos0 import _pos0_freeze, _pos0_observe, pos0_factor, token_axis, track_positions

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
        self.register_buffer("bound", torch.zeros(()))  # B of the bounded map (bound.py); 0: the plain linear map
        self.gate: float = 1.0
        self.has_pos0: bool = False  # mirrors c0 > 0 (Python control flow, like gate)
        self.has_bound: bool = False  # mirrors bound > 0
        self.taper_cap: float = 0.0  # training-only guard while 0 < gate < 1 (cap.py); 0: off
        self.cap_anneal: bool = False  # K / gate instead of K
        self.cap_hits: int | torch.Tensor = 0  # capped tokens since cap_rate's last reset (a tensor once counted)
        self.cap_seen: int = 0
        self.pos0_rows: torch.Tensor | None = None  # (B, T) bool set per forward by track_positions; None: row 0
        self.token_dim: int = 1  # tokens' axis of a batched input: 1 (B, T[, H], d); 2 per head (B, H, T, d) (pos0.py)
        self.calibrated: bool = False
        self.collecting: bool = False
        # calibration options (begin_calibration's; plain attributes, not saved: c and gamma_t carry the result)
        self.calib_skip: int = 0              # leading positions of each sequence left out (attention sinks)
        self.calib_stat: str = "ls"           # "ls": least-squares c; "inv_rms": mean of 1 / r(h) per token
        self.calib_per_feature: bool = False  # least-squares scale per feature, folded into gamma_t at freeze
        self._feat: tuple[torch.Tensor, torch.Tensor] | None = None  # per-feature EMAs (d,), (d,) float64
        self.calib_pos0: bool = False         # calibrate a separate c0 for position 0 (pos0.py)
        self.bound_rms: float = 0.0           # > 0: at freeze, bound = K * c * RMS of each feature (bound.py)
        self._x2: torch.Tensor | None = None  # EMA of each feature's mean x^2 (d,) float64, for bound_rms
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
            t = token_axis(self, xc.dim())  # 1; per-head (B, H, T, d) norms: 2
            if xc.dim() < 3 or xc.shape[t] <= k:
                raise TaperError(f"calibration skips the first {k} position(s) but got input of shape "
                                 f"{tuple(xc.shape)}; calibrate on (batch, seq > {k}, d) sequences")
            xc, r_inv = xc.narrow(t, k, xc.shape[t] - k), r_inv.narrow(t, k, xc.shape[t] - k)
        if self.calib_stat == "inv_rms":  # sink-robust: a huge token adds ~0 to the mean of 1 / r
            self._observe(r_inv.mean(), torch.ones((), dtype=torch.float64))
        else:
            hg2 = (xc * self.weight.float()).pow(2).sum(-1)  # ||h*gamma||^2 per token
            self._observe((hg2 * r_inv).mean(), hg2.mean())
        if self.calib_per_feature:
            x2 = xc.double().pow(2).reshape(-1, self.dim)  # (N, d)
            num, den = (x2 * r_inv.double().reshape(-1, 1)).mean(0), x2.mean(0)
            prev = self._feat or (None, None)
            self._feat = (_ema(prev[0], num, self.beta_ema), _ema(prev[1], den, self.beta_ema))
        if self.bound_rms > 0:
            self._x2 = _ema(self._x2, xc.double().pow(2).reshape(-1, self.dim).mean(0), self.beta_ema)

    def calib_tensors(self) -> list[torch.Tensor]:
        """Every calibration EMA (for averaging over ranks before freeze_c)."""
        return [self.calib_num, self.calib_den, *(self._feat or ()), *(() if self._p0 is None else (self._p0,)),
                *(() if self._x2 is None else (self._x2,))]

    def ema_correction(self) -> float:
        """1 - (1 - beta_ema)^n after n calibration batches: an EMA started at 0, divided by it, is unbiased."""
        return 1.0 - (1.0 - self.beta_ema) ** int(self.calib_count)

    def calibrated_c(self) -> float:
        """Bias-corrected c* = m_hat_num / m_hat_den (the correction factors cancel in the ratio)."""
        n = int(self.calib_count)
        if n == 0:
            raise TaperError("no calibration batches were observed; run forward passes between "
                             "begin_calibration() and finish_calibration()")
        corr = self.ema_correction()
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
        if self.bound_rms > 0:
            self._freeze_bound_rms(c)
        self.calibrated = True
        self.calibrated_flag.fill_(True)
        self.collecting = False
        return c

    def _freeze_bound_rms(self, c: float) -> None:
        """bound_i = K * c * RMS(x_i) over the calibration tokens (bias-corrected EMA): each feature's own bound."""
        if self._x2 is None:
            raise TaperError("a per-feature bound needs calibration batches; none were observed")
        rms = (self._x2 / self.ema_correction()).sqrt()
        rms = torch.where(rms > 0, rms, rms[rms > 0].mean() if bool((rms > 0).any()) else torch.ones_like(rms))
        self.bound = (self.bound_rms * c * rms).to(self.c.dtype)  # (d,)
        self.has_bound, self._x2 = True, None

    def taper_scale(self) -> torch.Tensor:
        """s = c * gamma_t, the per-feature scale of the gate-zero map."""
        return self.c * self.weight_t

    def fixed_map(self, x: torch.Tensor) -> torch.Tensor:
        """The gate-0 branch without beta_t: x * s, times c0 / c on position-0 rows when c0 is set; with a bound B
        (bound.py) B * tanh(x * c * p / B) * gamma_t instead."""
        if self.has_bound:
            return bounded_map(self, x)
        y = x * self.taper_scale().to(x.dtype)
        return y * pos0_factor(self, x) if self.has_pos0 else y

    def extra_repr(self) -> str:
        extra = f", c0={float(self.c0):.4g}" if self.has_pos0 else ""
        extra += f", token_dim={self.token_dim}" if self.token_dim != 1 else ""
        extra += f", bound={_bound_repr(self.bound)}" if self.has_bound else ""
        return f"{self.dim}, eps={self.eps}, gate={self.gate}, calibrated={self.calibrated}{extra}"

    def _load_from_state_dict(self, state_dict, prefix, *args, **kwargs):
        state_dict.setdefault(prefix + "c0", torch.zeros(()))  # files written before c0 existed
        b = state_dict.setdefault(prefix + "bound", torch.zeros(()))  # ... or before the bound
        if isinstance(b, torch.Tensor) and b.shape != self.bound.shape:  # a per-feature bound (d,) or a scalar one
            self.bound = torch.zeros(b.shape, dtype=self.bound.dtype, device=self.bound.device)
        super()._load_from_state_dict(state_dict, prefix, *args, **kwargs)


def _sync_python_state(module: _TaperBase, incompatible_keys) -> None:
    module.gate = float(module.gate_value)
    module.calibrated = bool(module.calibrated_flag)
    module.has_pos0 = bool(module.c0 > 0)
    module.has_bound = bool((module.bound > 0).any())


def _ema(m: torch.Tensor | None, x: torch.Tensor, b: float) -> torch.Tensor:
    """m <- (1 - b) m + b x, starting from zeros."""
    m = torch.zeros_like(x) if m is None else m
    return m.mul_(1 - b).add_(b * x)


def _bound_repr(bound: torch.Tensor) -> str:
    return f"{float(bound):g}" if bound.dim() == 0 else f"per-feature {float(bound.min()):.3g}..{float(bound.max()):.3g}"


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
# Whole-model helpers (norm replacement: replace_norms.py)
# --------------------------------------------------------------------------------------------------


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


from .replace_norms import find_final_norm, taperize  # noqa: E402  (re-exported: the module needs the classes above)
