"""One small class per architecture family maps the pass library's weights onto the lean graph's ops.

    LlamaLean  RMS pre-norm, RoPE, SwiGLU, no biases: packed QKV MatMul -> GroupQueryAttention(do_rotary,
               cos/sin caches) -> o MatMul; SkipSimplifiedLayerNormalization where a norm is kept; packed
               gate-up MatMul -> Split -> Sigmoid/Mul (ORT fuses to QuickGelu) -> Mul -> down MatMul.
    Gpt2Lean   LayerNorm pre-norm, learned positions, GELU(tanh) MLP, biases: token + position embeddings
               (positions from the mask's cumulative sum), packed QKV MatMul + bias -> GroupQueryAttention,
               SkipLayerNormalization (linear biases ride its bias input), fc_in MatMul -> FastGelu(bias).

A gate-0 norm that the fold removed has no op at all (only the residual Add); an explicit map (the
unfused variant) is a Mul (LN: mean-centre, Mul, Add); a kept norm is the fused Skip form.
"""
from __future__ import annotations

import torch
import torch.nn as nn

from tapernorm.model import Attention, GeluMLP, SwiGLU

from .graph import LeanGraph, MS
from .weights import LeanError, NormSpec

__all__ = ["LlamaLean", "Gpt2Lean", "ARCHS"]


class _LeanArch:
    """Walks a DecoderLM's blocks; subclasses say how to embed, attend and run the MLP."""
    mlp_type: type = nn.Module
    norms_per_block = ("input_layernorm", "post_attention_layernorm")

    def __init__(self, model: nn.Module, linears: dict, norms: dict[str, NormSpec], dtype: torch.dtype):
        self.model, self.cfg, self.lin, self.norms, self.dtype = model, model.config, linears, norms, dtype
        self._check()
        c = self.cfg
        self.g = LeanGraph(c.n_layers, c.n_heads, c.n_heads, c.head_dim, c.vocab_size, dtype)

    def _check(self) -> None:
        if self.cfg.head_dim % 8:
            raise LeanError(f"layers.0.self_attn: head_dim {self.cfg.head_dim} is not a multiple of 8, which "
                            "GroupQueryAttention needs (no GQA-compatible heads); compile with --graph generic")
        for i, layer in enumerate(self.model.layers):
            if type(layer.self_attn) is not Attention:
                raise LeanError(f"layers.{i}.self_attn: {type(layer.self_attn).__name__} is not the reference "
                                "Attention the lean builder maps; compile with --graph generic")
            if type(layer.mlp) is not self.mlp_type:
                raise LeanError(f"layers.{i}.mlp: {type(layer.mlp).__name__} is not {self.mlp_type.__name__} "
                                f"(an activation the {type(self).__name__} builder lacks); compile with --graph generic")
        want = set(self.linear_names())
        extra, missing = sorted(set(self.lin) - want), sorted(want - set(self.lin))
        if extra or missing:
            where = (extra or missing)[0]
            raise LeanError(f"{where}: the captured graph's linears differ from the {type(self).__name__} layout "
                            f"({'unexpected' if extra else 'missing'}: {(extra or missing)[:4]}); "
                            "compile with --graph generic")

    def linear_names(self) -> list[str]:
        """Every linear module path the builder expects in the captured graph."""
        return [f"layers.{i}.{n}" for i in range(self.cfg.n_layers) for n in self.block_linears] + ["lm_head"]

    def w(self, path: str):
        return self.lin[path]

    def build(self) -> LeanGraph:
        """Emit the whole graph; returns the LeanGraph with logits recorded in `self.logits`."""
        g = self.g
        residual, delta, bias = self.embed()
        for i in range(self.cfg.n_layers):
            h, residual = g.norm(self.norms[f"layers.{i}.input_layernorm"], residual, delta, bias)
            delta, bias = self.attention(i, h)
            h, residual = g.norm(self.norms[f"layers.{i}.post_attention_layernorm"], residual, delta, bias)
            delta, bias = self.mlp(i, h)
        h, _ = g.norm(self.norms["norm"], residual, delta, bias)
        w, b = self.w("lm_head")
        self.logits = g.linear("lm_head", g.last_position(h), w, b)  # (B, 1, V)
        return g

    def qkv(self, i: int, h):
        """Packed q|k|v projection (B, T, 3 H D) with the biases where the model has them."""
        p = f"layers.{i}.self_attn"
        ws = [self.w(f"{p}.{n}_proj") for n in "qkv"]
        bias = None if all(b is None for _, b in ws) else torch.cat(
            [b if b is not None else torch.zeros(w.shape[0], dtype=w.dtype) for w, b in ws])
        return self.g.linear(f"{p}.qkv_proj", h, torch.cat([w for w, _ in ws], 0), bias)


class LlamaLean(_LeanArch):
    """RMS / RoPE / SwiGLU decoder (tapernorm's "llama" arch)."""
    mlp_type = SwiGLU
    block_linears = ("self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj", "self_attn.o_proj",
                     "mlp.gate_proj", "mlp.up_proj", "mlp.down_proj")

    def embed(self):
        g, c = self.g, self.cfg
        x = g.op("Gather", [g.weight("embed_tokens.weight", self.model.embed_tokens.weight), g.input_ids],
                 {"axis": 0})  # (B, T, d)
        t = torch.arange(c.max_seq_len, dtype=torch.int64)
        freqs = t[:, None].float() * self.model.inv_freq.float()[None, :]  # (S, D/2) as DecoderLM.embed computes it
        self.cos, self.sin = g.weight("rope.cos_cache", freqs.cos()), g.weight("rope.sin_cache", freqs.sin())
        return x, None, None

    def attention(self, i: int, h):
        w, b = self.w(f"layers.{i}.self_attn.o_proj")
        a = self.g.attention(i, self.qkv(i, h), self.cos, self.sin)
        return self.g.linear(f"layers.{i}.self_attn.o_proj", a, w), b

    def mlp(self, i: int, h):
        g, p = self.g, f"layers.{i}.mlp"
        (wg, _), (wu, _), (wd, bd) = self.w(f"{p}.gate_proj"), self.w(f"{p}.up_proj"), self.w(f"{p}.down_proj")
        gu = g.linear(f"{p}.gate_up_proj", h, torch.cat([wg, wu], 0))  # (B, T, 2 F)
        gate, up = g.op("Split", [gu], {"axis": -1, "num_outputs": 2}, n_out=2)
        act = g.op("Mul", [g.op("Mul", [gate, g.op("Sigmoid", [gate])]), up])  # silu(gate) * up
        return g.linear(f"{p}.down_proj", act, wd), bd


class Gpt2Lean(_LeanArch):
    """LayerNorm / learned positions / GELU decoder (tapernorm's "gpt2" arch)."""
    mlp_type = GeluMLP
    block_linears = ("self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj", "self_attn.o_proj",
                     "mlp.fc_in", "mlp.fc_out")

    def embed(self):
        g = self.g
        tok = g.op("Gather", [g.weight("embed_tokens.weight", self.model.embed_tokens.weight), g.input_ids],
                   {"axis": 0})
        pe = g.op("Gather", [g.weight("embed_positions.weight", self.model.embed_positions.weight), g.positions()],
                  {"axis": 0})  # (B, T, d)
        return pe, tok, None  # first norm: SkipLayerNorm(tok, pe) fuses the add

    def attention(self, i: int, h):
        w, b = self.w(f"layers.{i}.self_attn.o_proj")
        a = self.g.attention(i, self.qkv(i, h), None, None)
        return self.g.linear(f"layers.{i}.self_attn.o_proj", a, w), b

    def mlp(self, i: int, h):
        g, p = self.g, f"layers.{i}.mlp"
        (wi, bi), (wo, bo) = self.w(f"{p}.fc_in"), self.w(f"{p}.fc_out")
        y = g.op("MatMul", [h, g.matmul_weight(f"{p}.fc_in.weight", wi)], name=f"{p}.fc_in")
        ins = [y] if bi is None else [y, g.weight(f"{p}.fc_in.bias", bi)]
        act = g.op("FastGelu", ins, domain=MS)  # gelu_tanh(y + b)
        return g.linear(f"{p}.fc_out", act, wo), bo


ARCHS = {"llama": LlamaLean, "gpt2": Gpt2Lean}
