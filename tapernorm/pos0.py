"""Position 0's own scale c0: the attention-sink remedy for tapering real checkpoints.

Pretrained LLMs write a "massive activation" into position 0 (the attention sink): its residual RMS is ~100x
every other token's, and nearly the same vector whatever the token (docs/real_checkpoints.md). One fixed map
cannot serve both, so a layer calibrated with `pos0=True` also keeps c0 = mean over sequences of 1 / r(h_0),
and its fixed map becomes

    F(h_t) = h_t * c * gamma_t * p_t,   p_t = c0 / c if position(t) == 0 else 1.

p_t is a per-token scalar, so it commutes with the consumer linears: s = c * gamma_t still folds into them,
and the gate-0 graph keeps one (B, T, 1) Mul per norm, p computed once from the position ids. In decode steps
(position > 0) p is 1.

Which rows are position 0: `pos0_rows` (B, T) bool, set per forward by the pre-hook `track_positions` adds to
the model (from position_ids, cache_position or the KV cache's length); without it, row 0 of every sequence
(a full-sequence forward from position 0, which is what training and calibration run).

Which axis of the layer's input holds the tokens: the layer's `token_dim` (`token_axis`). 1 for (B, T, d) and for
per-head norms called before the heads move forward, (B, T, H, d) (Qwen3's q_norm / k_norm); 2 for QK-norms called
on (B, H, T, d) (Gemma 3, ...): `taperize` and the loaders set it from the model family (replace_norms.py's
HEADS_FIRST_NORMS), never from shapes (H == T would be ambiguous). p is then (B, 1, T, 1).
"""
from __future__ import annotations

import torch
import torch.nn as nn

__all__ = ["pos0_factor", "track_positions", "pos0_ratio", "token_axis"]


def token_axis(layer, ndim: int) -> int:
    """The token axis of a rank-`ndim` input of `layer`: its `token_dim` (1: (B, T, d) / (B, T, H, d); 2: per-head
    (B, H, T, d)) for batched inputs (rank >= 3), 0 for an unbatched (T, d)."""
    if ndim < 3:
        return 0
    t = int(getattr(layer, "token_dim", 1))
    if not 1 <= t <= ndim - 2:
        from .layers import TaperError
        raise TaperError(f"TaperNorm token_dim {t} does not fit an input of rank {ndim} (tokens must sit between "
                         f"the batch dim 0 and the feature dim {ndim - 1}); set token_dim to 1 or re-taperize")
    return t


@torch.no_grad()
def _pos0_observe(layer, r_inv: torch.Tensor) -> torch.Tensor:
    """EMA (the layer's beta_ema) of mean 1 / r(h) at position 0 (index 0 of the layer's token axis); r_inv (B, T),
    per head (B, T, H) or (B, H, T) (token_dim 2). Returns the updated EMA."""
    if r_inv.dim() < 2:
        from .layers import TaperError
        raise TaperError(f"position-0 calibration needs (batch, seq, d) inputs, got 1 / r of shape "
                         f"{tuple(r_inv.shape)}")
    m = r_inv.select(token_axis(layer, r_inv.dim() + 1), 0).double().mean()  # every head of position 0
    b = layer.beta_ema
    prev = layer._p0 if layer._p0 is not None else torch.zeros((), dtype=torch.float64, device=m.device)
    return prev.mul(1 - b).add(b * m)


@torch.no_grad()
def _pos0_freeze(layer) -> None:
    """c0 from the EMA (bias correction as for c); called by freeze_c."""
    n = int(layer.calib_count)
    if layer._p0 is None or n == 0:
        return
    c0 = float(layer._p0) / layer.ema_correction()
    layer.c0.fill_(c0)
    layer.has_pos0 = c0 > 0
    layer._p0 = None


def pos0_ratio(layer) -> torch.Tensor:
    """c0 / c: position 0's factor on top of the ordinary fixed map (scalar tensor)."""
    return layer.c0 / layer.c


def pos0_factor(layer, x: torch.Tensor) -> torch.Tensor:
    """p for x (B, T, d), per head (B, T, H, d) or (B, H, T, d) (the layer's token_dim), or (T, d): c0 / c on
    position-0 rows, 1 elsewhere, in x's dtype, shaped to broadcast over x: tokens on x's token axis, batch on dim 0,
    1 elsewhere ((B, T, 1), (B, T, 1, 1), (B, 1, T, 1); (T, 1[, 1]) without a mask)."""
    tdim = token_axis(layer, x.dim())
    rows = layer.pos0_rows
    if rows is None:  # a full-sequence forward: row 0 is position 0
        rows = torch.arange(x.shape[tdim], device=x.device) == 0  # (T,)
    ratio = pos0_ratio(layer).to(device=x.device, dtype=torch.float32)
    one = torch.ones((), device=x.device, dtype=torch.float32)
    rows = rows if rows.device == x.device else rows.to(x.device)  # no op when shared: graphs see one mask
    p = torch.where(rows, ratio, one)  # (B, T), (1, T) or (T,)
    for _ in range(tdim - 1 if p.dim() == 2 else 0):  # heads before tokens: (B, 1, T)
        p = p.unsqueeze(1)
    for _ in range(x.dim() - 1 - tdim):  # the features (and heads after the tokens)
        p = p.unsqueeze(-1)
    return p.to(x.dtype)


def _past_length(past) -> int:
    """Tokens already in a KV cache: an HF Cache or our list of (k, v) (B, H, P, D)."""
    if past is None:
        return 0
    if hasattr(past, "get_seq_length"):
        return int(past.get_seq_length())
    try:
        return int(past[0][0].shape[-2]) if len(past) else 0
    except (TypeError, IndexError, AttributeError):
        return 0


def _is_positions(t, ids) -> bool:
    """True if positional argument `t` looks like position_ids (B, T) for input_ids `ids` (B, T)."""
    return (isinstance(t, torch.Tensor) and isinstance(ids, torch.Tensor) and t.dim() == 2 and ids.dim() == 2
            and not t.is_floating_point() and t.dtype != torch.bool and t.shape[-1] == ids.shape[-1])


def _rows_from_call(args, kwargs) -> torch.Tensor | None:
    """(B, T) or (1, T) bool position-0 mask of one model call, or None for 'row 0' (no cache, no ids)."""
    pos = kwargs.get("position_ids")
    ids = kwargs.get("input_ids", args[0] if args else None)
    if pos is None and len(args) > 2 and _is_positions(args[2], ids):  # DecoderLM / HF order: ids, mask, positions
        pos = args[2]
    if pos is not None:
        return pos == 0
    cache_pos = kwargs.get("cache_position")
    if cache_pos is not None:
        return (cache_pos == 0).reshape(1, -1)
    if ids is None:
        ids = kwargs.get("inputs_embeds")
    past = kwargs.get("past_key_values", kwargs.get("cache", args[3] if len(args) > 3 else None))
    if ids is not None and _past_length(past) > 0:
        return torch.zeros(1, ids.shape[1], dtype=torch.bool, device=ids.device)
    return None


def track_positions(model: nn.Module) -> None:
    """Add (once) a forward pre-hook on `model` that tells its c0 layers which rows are position 0 each call.

    Needed for cached decoding in PyTorch (HF generate, our DecoderLM with past_key_values) of a model with c0;
    a no-op for models without c0. Serves the TaperNorms the model has when this is called (their c0 may be set
    later, at calibration)."""
    if getattr(model, "_tapernorm_pos0_hook", None) is not None:
        return
    from .layers import taper_layers
    taper = [m for _, m in taper_layers(model)]  # found once, not on every forward

    def hook(_mod, args, kwargs):
        layers = [m for m in taper if m.has_pos0]
        if layers:
            rows = _rows_from_call(args, kwargs)
            for m in layers:
                m.pos0_rows = rows
        return None

    model._tapernorm_pos0_hook = model.register_forward_pre_hook(hook, with_kwargs=True)


def track_if_needed(model: nn.Module) -> bool:
    """track_positions(model) when a loaded model has c0 layers (loaders call this on the whole model, once its
    weights are in; a hook on a lone TaperNorm would overwrite the rows its model's hook sets); returns whether it
    did."""
    from .layers import taper_layers
    if any(m.has_pos0 for _, m in taper_layers(model)):
        track_positions(model)
        return True
    return False
