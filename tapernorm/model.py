"""Reference decoders: a Llama-style pre-norm model (RMSNorm, RoPE, SwiGLU, no biases) and a
GPT-2-style LayerNorm variant (learned positions, GELU MLP, biases). Both have tied embeddings,
no dropout, HF-style module names, and an explicit KV cache interface:

    forward(input_ids (B, T), attention_mask (B, P+T), position_ids (B, T), past_key_values)
        -> logits (B, T, V)                              if past_key_values is None and not use_cache
        -> (logits, presents)                            otherwise; presents[i] = (k, v), each (B, H, P+T, D)
"""
from __future__ import annotations

import dataclasses
import math

import torch
import torch.nn as nn
import torch.nn.functional as F

from .layers import taperize
from .model_config import PRESETS, ConfigError, ModelConfig, preset

__all__ = ["ModelConfig", "DecoderLM", "PRESETS", "preset", "build_model", "ConfigError"]


def rotate_half(x: torch.Tensor) -> torch.Tensor:
    """(x1, x2) -> (-x2, x1) on the last dim (the non-interleaved RoPE convention)."""
    x1, x2 = x.chunk(2, dim=-1)
    return torch.cat((-x2, x1), dim=-1)


class Attention(nn.Module):
    """Multi-head causal self-attention with an explicit (k, v) cache."""

    def __init__(self, cfg: ModelConfig):
        super().__init__()
        bias = cfg.arch == "gpt2"
        self.n_heads, self.head_dim = cfg.n_heads, cfg.head_dim
        self.q_proj = nn.Linear(cfg.dim, cfg.dim, bias=bias)
        self.k_proj = nn.Linear(cfg.dim, cfg.dim, bias=bias)
        self.v_proj = nn.Linear(cfg.dim, cfg.dim, bias=bias)
        self.o_proj = nn.Linear(cfg.dim, cfg.dim, bias=bias)

    def qkv(self, x, rope):
        """Project x (B, T, d) to per-head q, k, v (B, H, T, D), RoPE applied to q and k."""
        B, T, _ = x.shape
        q = self.q_proj(x).view(B, T, self.n_heads, self.head_dim).transpose(1, 2)  # (B, H, T, D)
        k = self.k_proj(x).view(B, T, self.n_heads, self.head_dim).transpose(1, 2)  # (B, H, T, D)
        v = self.v_proj(x).view(B, T, self.n_heads, self.head_dim).transpose(1, 2)  # (B, H, T, D)
        if rope is not None:
            cos, sin = rope  # (B, 1, T, D)
            q = q * cos + rotate_half(q) * sin
            k = k * cos + rotate_half(k) * sin
        return q, k, v

    def forward(self, x, mask, rope, past):
        B, T, _ = x.shape
        q, k, v = self.qkv(x, rope)
        if past is not None:
            k = torch.cat([past[0], k], dim=2)  # (B, H, P+T, D)
            v = torch.cat([past[1], v], dim=2)
        y = F.scaled_dot_product_attention(q, k, v, attn_mask=mask)  # (B, H, T, D)
        y = y.transpose(1, 2).reshape(B, T, -1)
        return self.o_proj(y), (k, v)


class SwiGLU(nn.Module):
    """down(silu(gate(x)) * up(x))."""

    def __init__(self, cfg: ModelConfig):
        super().__init__()
        self.gate_proj = nn.Linear(cfg.dim, cfg.hidden_dim, bias=False)
        self.up_proj = nn.Linear(cfg.dim, cfg.hidden_dim, bias=False)
        self.down_proj = nn.Linear(cfg.hidden_dim, cfg.dim, bias=False)

    def forward(self, x):
        return self.down_proj(F.silu(self.gate_proj(x)) * self.up_proj(x))


class GeluMLP(nn.Module):
    """fc_out(gelu_tanh(fc_in(x))), GPT-2 style."""

    def __init__(self, cfg: ModelConfig):
        super().__init__()
        self.fc_in = nn.Linear(cfg.dim, cfg.hidden_dim)
        self.fc_out = nn.Linear(cfg.hidden_dim, cfg.dim)

    def forward(self, x):
        return self.fc_out(F.gelu(self.fc_in(x), approximate="tanh"))


def _make_norm(cfg: ModelConfig) -> nn.Module:
    if cfg.arch == "gpt2":
        return nn.LayerNorm(cfg.dim, eps=cfg.norm_eps)
    return nn.RMSNorm(cfg.dim, eps=cfg.norm_eps)


class Block(nn.Module):
    """Pre-norm residual block: x + attn(norm(x)); x + mlp(norm(x))."""

    def __init__(self, cfg: ModelConfig):
        super().__init__()
        self.input_layernorm = _make_norm(cfg)
        self.self_attn = Attention(cfg)
        self.post_attention_layernorm = _make_norm(cfg)
        self.mlp = GeluMLP(cfg) if cfg.arch == "gpt2" else SwiGLU(cfg)

    def forward(self, x, mask, rope, past):
        a, present = self.self_attn(self.input_layernorm(x), mask, rope, past)
        x = x + a
        x = x + self.mlp(self.post_attention_layernorm(x))
        return x, present


class DecoderLM(nn.Module):
    """Decoder-only LM; `hidden()` gives the pre-logit residual stream (the final norm's input)."""

    def __init__(self, cfg: ModelConfig):
        super().__init__()
        self.config = cfg
        self.embed_tokens = nn.Embedding(cfg.vocab_size, cfg.dim)
        if cfg.arch == "gpt2":
            self.embed_positions = nn.Embedding(cfg.max_seq_len, cfg.dim)
        else:
            inv_freq = 1.0 / (cfg.rope_theta ** (torch.arange(0, cfg.head_dim, 2).float() / cfg.head_dim))
            self.register_buffer("inv_freq", inv_freq, persistent=False)
        self.layers = nn.ModuleList(Block(cfg) for _ in range(cfg.n_layers))
        self.norm = _make_norm(cfg)
        self.lm_head = nn.Linear(cfg.dim, cfg.vocab_size, bias=False)
        self.lm_head.weight = self.embed_tokens.weight  # tied
        self.apply(self._init_weights)
        for n, p in self.named_parameters():
            if n.endswith(("o_proj.weight", "down_proj.weight", "fc_out.weight")):
                nn.init.normal_(p, 0.0, cfg.init_std / math.sqrt(2 * cfg.n_layers))
        if cfg.taper_mode != "baseline":
            taperize(self, cfg.taper_mode, final_norm="norm")

    def _init_weights(self, m):
        if isinstance(m, (nn.Linear, nn.Embedding)):
            nn.init.normal_(m.weight, 0.0, self.config.init_std)
            if getattr(m, "bias", None) is not None:
                nn.init.zeros_(m.bias)

    def _mask(self, attention_mask, B, T, P, device, dtype):
        """Additive mask (B, 1, T, P+T): causal, and padding from attention_mask (B, P+T)."""
        q_pos = torch.arange(T, device=device).unsqueeze(1) + P  # (T, 1)
        k_pos = torch.arange(P + T, device=device).unsqueeze(0)  # (1, P+T)
        allowed = (k_pos <= q_pos).unsqueeze(0).unsqueeze(0)  # (1, 1, T, P+T)
        if attention_mask is not None:
            allowed = allowed & attention_mask.bool()[:, None, None, :]
        return torch.zeros(allowed.shape, device=device, dtype=dtype).masked_fill(~allowed, torch.finfo(dtype).min)

    def embed(self, input_ids, position_ids):
        """Token (+ learned position) embeddings (B, T, d), and RoPE (cos, sin) each (B, 1, T, D) or None."""
        x = self.embed_tokens(input_ids)  # (B, T, d)
        if self.config.arch == "gpt2":
            return x + self.embed_positions(position_ids), None
        freqs = position_ids[..., None].float() * self.inv_freq  # (B, T, D/2)
        emb = torch.cat((freqs, freqs), dim=-1).unsqueeze(1)  # (B, 1, T, D)
        return x, (emb.cos().to(x.dtype), emb.sin().to(x.dtype))

    def hidden(self, input_ids, attention_mask=None, position_ids=None, past_key_values=None):
        """Run embeddings and blocks; returns (h (B, T, d) before the final norm, presents)."""
        B, T = input_ids.shape
        P = past_key_values[0][0].shape[2] if past_key_values is not None else 0
        if position_ids is None:
            position_ids = torch.arange(P, P + T, device=input_ids.device).unsqueeze(0).expand(B, T)
        x, rope = self.embed(input_ids, position_ids)
        mask = self._mask(attention_mask, B, T, P, x.device, x.dtype)
        presents = []
        for i, layer in enumerate(self.layers):
            x, present = layer(x, mask, rope, past_key_values[i] if past_key_values is not None else None)
            presents.append(present)
        return x, presents

    def head(self, h):
        """Final norm + output head: (B, T, d) -> logits (B, T, V)."""
        return self.lm_head(self.norm(h))

    def forward(self, input_ids, attention_mask=None, position_ids=None, past_key_values=None, use_cache=False):
        h, presents = self.hidden(input_ids, attention_mask, position_ids, past_key_values)
        logits = self.head(h)
        if past_key_values is None and not use_cache:
            return logits
        return logits, presents


def build_model(cfg: ModelConfig | str, **overrides) -> DecoderLM:
    """A fresh DecoderLM from a ModelConfig or a preset name."""
    if isinstance(cfg, str):
        cfg = preset(cfg, **overrides)
    elif overrides:
        cfg = dataclasses.replace(cfg, **overrides)
    return DecoderLM(cfg)
