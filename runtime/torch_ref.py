"""A gpt-fast-style PyTorch reference decoder with a static, preallocated KV cache.

It reuses a DecoderLM's own submodules (embeddings, norms, projections, MLPs, head), so TaperNorm
layers run exactly as in the model, but replaces the growing `torch.cat` cache with per-layer
buffers (B, H, S_max, D) written in place with `index_copy_`. Cache slots are absolute columns
(0..S_max); RoPE / learned positions use `position_ids`, which differ from the slot when a prompt is
left-padded. Used for parity against the ONNX runtime and as the eager baseline in benchmarks.

    dec = StaticDecoder(model, batch=1)
    logits = prefill(dec, ids)                    # (B, V) for the last prompt token
    logits = decode_one_token(dec, next_tok)      # (B, V)
"""
from __future__ import annotations

import torch
import torch.nn as nn
import torch.nn.functional as F

from tapernorm.model import DecoderLM

__all__ = ["KVCache", "StaticDecoder", "TorchRefDecoder", "prefill", "decode_one_token", "greedy_full_forward"]


class KVCache(nn.Module):
    """Preallocated (B, H, S_max, D) key/value buffers for one layer."""

    def __init__(self, batch: int, n_heads: int, max_len: int, head_dim: int, dtype=torch.float32, device=None):
        super().__init__()
        shape = (batch, n_heads, max_len, head_dim)
        self.register_buffer("k_cache", torch.zeros(shape, dtype=dtype, device=device), persistent=False)
        self.register_buffer("v_cache", torch.zeros(shape, dtype=dtype, device=device), persistent=False)

    def update(self, slots: torch.Tensor, k: torch.Tensor, v: torch.Tensor):
        """Write k, v (B, H, T, D) at cache columns `slots` (T,); return the full caches."""
        self.k_cache.index_copy_(2, slots, k)
        self.v_cache.index_copy_(2, slots, v)
        return self.k_cache, self.v_cache


class StaticDecoder(nn.Module):
    """DecoderLM + static caches; `forward(ids, slots, position_ids)` -> logits (B, T, V)."""

    def __init__(self, model: DecoderLM, batch: int = 1, max_len: int | None = None):
        super().__init__()
        if model.training:
            raise ValueError("StaticDecoder needs a model in eval mode; call model.eval() first")
        cfg = model.config
        self.model, self.cfg = model, cfg
        self.batch = batch
        self.max_len = int(max_len or cfg.max_seq_len)
        p = next(model.parameters())
        self.caches = nn.ModuleList(KVCache(batch, cfg.n_heads, self.max_len, cfg.head_dim, p.dtype, p.device)
                                    for _ in range(cfg.n_layers))
        # valid[b, s]: cache column s holds a real (non-padding) token of row b
        self.register_buffer("valid", torch.zeros(batch, self.max_len, dtype=torch.bool, device=p.device),
                             persistent=False)
        self.register_buffer("cols", torch.arange(self.max_len, device=p.device), persistent=False)
        self.length = 0  # columns filled so far
        self.next_pos = None  # (B, 1) position id of the next token

    def reset(self) -> None:
        """Forget the cached sequence (buffers are reused, not reallocated)."""
        self.valid.zero_()
        self.length = 0
        self.next_pos = None

    def _mask(self, slots: torch.Tensor, dtype) -> torch.Tensor:
        """Additive mask (B, 1, T, S_max): causal over columns, padding and unfilled columns masked."""
        allowed = (self.cols[None, :] <= slots[:, None])[None, None] & self.valid[:, None, None, :]
        return torch.zeros(allowed.shape, dtype=dtype, device=slots.device).masked_fill(~allowed, torch.finfo(dtype).min)

    def _attn(self, attn, x, mask, rope, cache: KVCache, slots):
        B, T, _ = x.shape
        q, k, v = attn.qkv(x, rope)  # (B, H, T, D)
        k_all, v_all = cache.update(slots, k, v)  # (B, H, S_max, D)
        y = F.scaled_dot_product_attention(q, k_all, v_all, attn_mask=mask)  # (B, H, T, D)
        return attn.o_proj(y.transpose(1, 2).reshape(B, T, -1))

    def forward(self, input_ids: torch.Tensor, slots: torch.Tensor, position_ids: torch.Tensor) -> torch.Tensor:
        """Run T new tokens (B, T) into cache columns `slots` (T,); returns logits (B, T, V)."""
        m = self.model
        x, rope = m.embed(input_ids, position_ids)  # (B, T, d), RoPE or None
        mask = self._mask(slots, x.dtype)
        for layer, cache in zip(m.layers, self.caches):
            x = x + self._attn(layer.self_attn, layer.input_layernorm(x), mask, rope, cache, slots)
            x = x + layer.mlp(layer.post_attention_layernorm(x))
        return m.head(x)


@torch.no_grad()
def prefill(dec: StaticDecoder, input_ids: torch.Tensor, attention_mask: torch.Tensor | None = None) -> torch.Tensor:
    """Reset and run a (left-padded) prompt (B, T); returns last-position logits (B, V)."""
    B, T = input_ids.shape
    if B != dec.batch:
        raise ValueError(f"prompt batch {B} != decoder batch {dec.batch}; build StaticDecoder(model, batch={B})")
    if T >= dec.max_len:
        raise ValueError(f"prompt of {T} tokens does not fit the {dec.max_len}-token context; shorten the prompt")
    dec.reset()
    if attention_mask is None:
        attention_mask = torch.ones_like(input_ids)
    dec.valid[:, :T] = attention_mask.bool()
    position_ids = (attention_mask.long().cumsum(-1) - 1).clamp_min(0)  # (B, T)
    slots = dec.cols[:T]
    logits = dec(input_ids, slots, position_ids)
    dec.length = T
    dec.next_pos = position_ids[:, -1:] + 1  # (B, 1)
    return logits[:, -1]


@torch.no_grad()
def decode_one_token(dec: StaticDecoder, token: torch.Tensor) -> torch.Tensor:
    """Append one token per row (B,) or (B, 1); returns logits (B, V)."""
    if dec.next_pos is None:
        raise RuntimeError("decode_one_token before prefill; call prefill(dec, prompt) first")
    if dec.length >= dec.max_len:
        raise ValueError(f"the {dec.max_len}-token context is full; stop generating or raise max_len")
    slot = dec.cols[dec.length:dec.length + 1]
    dec.valid[:, dec.length] = True
    logits = dec(token.reshape(dec.batch, 1), slot, dec.next_pos)
    dec.length += 1
    dec.next_pos = dec.next_pos + 1
    return logits[:, -1]


@torch.no_grad()
def greedy_full_forward(model: DecoderLM, input_ids: torch.Tensor, max_new_tokens: int) -> torch.Tensor:
    """Greedy decoding by re-running the full forward on the whole sequence each step (no cache); (B, N)."""
    seq = input_ids
    out = []
    for _ in range(max_new_tokens):
        nxt = model(seq)[:, -1].argmax(-1, keepdim=True)  # (B, 1)
        out.append(nxt)
        seq = torch.cat([seq, nxt], dim=1)
    return torch.cat(out, dim=1)


class TorchRefDecoder:
    """The `start` / `step` decoder interface of runtime.generate over a StaticDecoder (numpy logits)."""

    def __init__(self, model: DecoderLM, batch: int = 1, max_len: int | None = None):
        self.dec = StaticDecoder(model, batch=batch, max_len=max_len)
        self.max_len = self.dec.max_len
        self._tok = torch.zeros(batch, 1, dtype=torch.long)

    @property
    def length(self) -> int:
        """Cache columns filled so far."""
        return self.dec.length

    def start(self, input_ids, attention_mask=None):
        """Prefill (B, T) ids; returns logits (B, V) as float32 numpy."""
        ids = torch.as_tensor(input_ids, dtype=torch.long)
        mask = None if attention_mask is None else torch.as_tensor(attention_mask, dtype=torch.long)
        return prefill(self.dec, ids, mask).float().numpy()

    def step(self, tokens):
        """Feed one token per row (B,); returns logits (B, V) as float32 numpy."""
        self._tok[:, 0] = torch.as_tensor(tokens)
        return decode_one_token(self.dec, self._tok).float().numpy()
