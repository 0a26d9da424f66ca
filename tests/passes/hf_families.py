"""Tiny Hugging Face decoders, one per norm variant, built from configs (hidden 32, 1 layer, vocab 128).

`build(family)` returns the model in eval mode with its norm gains / shifts randomised (so a fold that
drops or misplaces a scale shows in the logits), before taperize.
"""
from __future__ import annotations

import torch

VOCAB = 128
BASE = dict(vocab_size=VOCAB, hidden_size=32, intermediate_size=64, num_hidden_layers=1, num_attention_heads=4,
            num_key_value_heads=2, max_position_embeddings=64, pad_token_id=0, bos_token_id=1, eos_token_id=2)

# family id -> (model_type, extra config, what it exercises)
FAMILIES = {
    "llama": ("llama", {}, "RMSNorm pre-norms"),
    "mistral": ("mistral", {}, "RMSNorm pre-norms"),
    "qwen2": ("qwen2", {}, "RMSNorm, qkv biases"),
    "phi3": ("phi3", {}, "fused qkv / gate_up"),
    "gemma": ("gemma", {"head_dim": 8}, "(1 + w) RMSNorm"),
    "gemma2": ("gemma2", {"head_dim": 8}, "(1 + w), sandwich norms: post-norms fold into o_proj / down_proj rows"),
    "gemma3": ("gemma3_text", {"head_dim": 8}, "(1 + w), sandwich norms, per-head QK-norms"),
    "qwen3": ("qwen3", {"head_dim": 8}, "per-head QK-norms fold into q_proj / k_proj rows"),
    "olmo2": ("olmo2", {}, "QK-norms over all heads, post-norms"),
    "qwen3_moe": ("qwen3_moe", {"head_dim": 8, "num_experts": 4, "num_experts_per_tok": 2, "moe_intermediate_size": 32},
                  "QK-norms, MoE experts (grouped matmul over stacked weights, token gather)"),
    "deepseek_v3": ("deepseek_v3", {"num_key_value_heads": 4, "qk_rope_head_dim": 4, "qk_nope_head_dim": 8,
                                    "v_head_dim": 8, "kv_lora_rank": 16, "q_lora_rank": 16, "n_routed_experts": 4,
                                    "num_experts_per_tok": 2, "moe_intermediate_size": 32, "n_group": 1,
                                    "topk_group": 1}, "latent attention: q_a / kv_a norms between two linears"),
    "qwen3_next": ("qwen3_next", {"head_dim": 8, "num_hidden_layers": 2, "layer_types": ["linear_attention",
                                                                                       "full_attention"]},
                   "gated RMSNorm in linear attention, per head, then heads merged; (1 + w) gains, QK-norms"),
    "phimoe": ("phimoe", {"num_local_experts": 4, "num_experts_per_tok": 2},
               "LayerNorm into grouped experts: the shift becomes a per-expert output vector"),
    "flex_olmo": ("flex_olmo", {"num_experts": 4, "num_experts_per_tok": 2},
                  "post-norm on an MoE's weighted expert sum: folds into every expert's down rows"),
    "olmo": ("olmo", {}, "LayerNorm without weight or bias"),
    "cohere": ("cohere", {}, "bias-free LayerNorm, one norm feeds attention and MLP"),
    "falcon": ("falcon", {"bias": True}, "x @ W.T linears, LN feeding attention and MLP"),
    "falcon_new": ("falcon", {"new_decoder_architecture": True, "num_kv_heads": 2}, "ln_attn / ln_mlp"),
    "gpt_neox": ("gpt_neox", {}, "LayerNorm, parallel residual"),
    "stablelm": ("stablelm", {}, "LayerNorm"),
    "phi": ("phi", {}, "one LayerNorm feeds attention and MLP"),
    "opt": ("opt", {"ffn_dim": 64, "word_embed_proj_dim": 32}, "LayerNorm with biases"),
    "gpt2": ("gpt2", {"n_positions": 64}, "Conv1D (addmm) linears"),
}


def build(family: str, seed: int = 0) -> torch.nn.Module:
    """The tiny HF CausalLM of `family`, eval mode, norm gains in [0.5, 1.5] (Gemma: w in [-0.5, 0.5]), shifts +-0.2."""
    import transformers
    from transformers import AutoConfig, AutoModelForCausalLM
    transformers.logging.set_verbosity_error()
    model_type, extra, _ = FAMILIES[family]
    kw = {**BASE, **extra}
    cfg = AutoConfig.for_model(model_type, **kw)
    torch.manual_seed(seed)
    model = AutoModelForCausalLM.from_config(cfg).eval()
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, m in model.named_modules():
            kind = type(m).__name__
            if not ("RMSNorm" in kind or kind.endswith("LayerNorm")):
                continue
            w, b = getattr(m, "weight", None), getattr(m, "bias", None)
            if isinstance(w, torch.Tensor):
                offset = -1.0 if kind.startswith("Gemma") else 0.0  # Gemma's gain is 1 + w
                w.copy_(torch.rand(w.shape, generator=g) + 0.5 + offset)
            if isinstance(b, torch.Tensor):
                b.copy_(torch.rand(b.shape, generator=g) * 0.4 - 0.2)
    return model


def token_batches(n: int = 3, seed: int = 0, shape=(2, 8)):
    """Random token batches (ids >= 3, clear of pad / bos / eos)."""
    g = torch.Generator().manual_seed(seed)
    return [torch.randint(3, VOCAB, shape, generator=g) for _ in range(n)]
