"""Models for the pass tests: a user module with fused qkv / gate-up, tiny HF Llama and GPT-2, taperized."""
from __future__ import annotations

import torch
import torch.nn as nn
import torch.nn.functional as F

from tapernorm import TaperLayerNorm, TaperNorm, calibrate, set_gate, taperize

VOCAB = 256


class FusedBlock(nn.Module):
    """A user's own block: TaperNorm -> fused qkv linear; TaperLayerNorm -> fused gate-up (no bias)."""

    def __init__(self, d: int = 16, hidden: int = 32):
        super().__init__()
        self.norm1 = TaperNorm(d)
        self.qkv = nn.Linear(d, 3 * d)
        self.proj = nn.Linear(d, d)
        self.norm2 = TaperLayerNorm(d)
        self.gate_up = nn.Linear(d, 2 * hidden, bias=False)
        self.down = nn.Linear(hidden, d)

    def forward(self, x):  # x: (B, T, d)
        q, k, v = self.qkv(self.norm1(x)).chunk(3, dim=-1)
        x = x + self.proj(F.scaled_dot_product_attention(q, k, v, is_causal=True))
        g, u = self.gate_up(self.norm2(x)).chunk(2, dim=-1)
        return x + self.down(F.silu(g) * u)


def seeded_gains(model: nn.Module, seed: int = 0) -> None:
    """Non-trivial norm gains / shifts so folds are exercised."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for m in model.modules():
            if isinstance(m, (TaperNorm, TaperLayerNorm)):
                m.weight.copy_(torch.rand(m.weight.shape, generator=g) + 0.5)
                if isinstance(m, TaperLayerNorm):
                    m.bias.copy_(torch.rand(m.bias.shape, generator=g) * 0.4 - 0.2)


def float_batches(d: int, n: int = 3, seed: int = 0):
    g = torch.Generator().manual_seed(seed)
    return [torch.randn(2, 6, d, generator=g) * 2 + 0.5 for _ in range(n)]


def make_fused(gate: float | None = 0.0, d: int = 16) -> FusedBlock:
    """FusedBlock, calibrated on random inputs, at `gate`, eval."""
    torch.manual_seed(0)
    m = FusedBlock(d)
    seeded_gains(m)
    calibrate(m, float_batches(d))
    if gate is not None:
        set_gate(m, gate)
    return m.eval()


def _token_batches(n=3, seed=0):
    g = torch.Generator().manual_seed(seed)
    return [torch.randint(0, VOCAB, (2, 8), generator=g) for _ in range(n)]


def make_hf(kind: str, mode: str = "all", gate: float = 0.0) -> nn.Module:
    """Tiny HF LlamaForCausalLM ("llama", tied embeddings) or GPT2LMHeadModel ("gpt2"), taperized, calibrated."""
    import transformers
    transformers.logging.set_verbosity_error()
    torch.manual_seed(0)
    if kind == "llama":
        cfg = transformers.LlamaConfig(vocab_size=VOCAB, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                                       num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=64,
                                       tie_word_embeddings=True)
        model = transformers.LlamaForCausalLM(cfg)
    else:
        cfg = transformers.GPT2Config(vocab_size=VOCAB, n_embd=32, n_layer=2, n_head=4, n_positions=64,
                                      bos_token_id=0, eos_token_id=0)
        model = transformers.GPT2LMHeadModel(cfg)
    model.eval()
    taperize(model, mode)
    seeded_gains(model)
    calibrate(model, _token_batches(), forward=lambda m, b: m(input_ids=b, use_cache=False))
    set_gate(model, gate)
    return model.eval()
