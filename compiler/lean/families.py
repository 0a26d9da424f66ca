"""One small spec per decoder family: how its Hugging Face module names and config map onto the lean graph.

A family that differs from Llama in two attributes is two lines (`LLAMA.but(...)`). The builder
(hf_arch.py) reads everything else from the model itself: the attention modules' `scaling`, `sliding_window`
and `attn_logit_softcapping`, the rotary module's cos/sin, the norms' eps.

    spec field      meaning                                         example
    layers          ModuleList holding the blocks                   "model.layers" / "transformer.h"
    qkv, gate_up    one fused linear instead of q/k/v, gate/up      Phi-3 "self_attn.qkv_proj"
    qkv_layout      fused rows "qkv" (q|k|v) or "per_head" (NeoX)   GPT-NeoX "per_head"
    act             "silu" | "gelu_tanh" | "gelu" ; gated MLP?      Gemma gelu_tanh, gated
    pre_norms       (before attention, before the MLP); None: none  OLMo2 (None, None)
    post_norms      (after attention, after the MLP)                OLMo2, Gemma 2/3
    qk_norms        (q, k) norm module names; qk_norm_heads: per head Qwen3 per head, OLMo2 over all heads
    gain_offset     RMSNorm gain is (offset + w)                    Gemma 1.0
    embed_scale     multiply embeddings by sqrt(hidden)             Gemma
    parallel        attention and MLP read the same input (NeoX)    GPT-NeoX
"""
from __future__ import annotations

from dataclasses import dataclass, replace

__all__ = ["FamilySpec", "SPECS", "NEAREST", "spec_for", "DecoderDims", "dims_of"]


@dataclass(frozen=True)
class DecoderDims:
    """The one config protocol of a compiled decoder: explicit query heads, KV heads and head size.

    Export, runtime.json, genai_config.json and the runtime all read these names (`num_heads` = query heads,
    `num_kv_heads` = the heads the KV cache holds).
    """
    num_layers: int
    num_heads: int
    num_kv_heads: int
    head_dim: int
    hidden: int
    vocab: int
    max_seq_len: int


def _first(cfg, *names, default=None):
    return next((getattr(cfg, n) for n in names if getattr(cfg, n, None) is not None), default)


def dims_of(cfg) -> DecoderDims:
    """DecoderDims of a tapernorm ModelConfig (`dim`, `n_heads`) or a Hugging Face text config."""
    if hasattr(cfg, "num_kv_heads") and hasattr(cfg, "n_layers"):  # compiler.hf_compile.HFCompileConfig
        return DecoderDims(cfg.n_layers, cfg.num_heads, cfg.num_kv_heads, cfg.head_dim, cfg.hidden, cfg.vocab_size,
                           cfg.max_seq_len)
    if hasattr(cfg, "n_layers") and hasattr(cfg, "dim"):  # tapernorm ModelConfig: multi-head attention
        return DecoderDims(cfg.n_layers, cfg.n_heads, cfg.n_heads, cfg.head_dim, cfg.dim, cfg.vocab_size,
                           cfg.max_seq_len)
    heads = int(_first(cfg, "num_attention_heads", "n_head"))
    hidden = int(_first(cfg, "hidden_size", "n_embd"))
    kv = int(_first(cfg, "num_key_value_heads", "num_kv_heads", default=heads))
    if getattr(cfg, "multi_query", False) and not getattr(cfg, "new_decoder_architecture", False):
        kv = 1  # Falcon's original multi-query attention
    return DecoderDims(int(_first(cfg, "num_hidden_layers", "n_layer")), heads, kv,
                       int(_first(cfg, "head_dim", default=hidden // heads)), hidden, int(cfg.vocab_size),
                       int(_first(cfg, "max_position_embeddings", "n_positions", default=2048)))


@dataclass(frozen=True)
class FamilySpec:
    """Module names and structural switches of one decoder family (see the module docstring)."""
    name: str
    layers: str = "model.layers"
    embed: str = "model.embed_tokens"
    positions: str | None = None  # learned position table (GPT-2)
    final_norm: str = "model.norm"
    lm_head: str = "lm_head"
    attn: str = "self_attn"
    q: str = "q_proj"
    k: str = "k_proj"
    v: str = "v_proj"
    o: str = "o_proj"
    qkv: str | None = None
    qkv_layout: str = "qkv"
    mlp_in: tuple[str, ...] = ("mlp.gate_proj", "mlp.up_proj")  # (gate, up) or (fc_in,)
    gate_up: str | None = None
    mlp_out: str = "mlp.down_proj"
    act: str = "silu"
    gated: bool = True
    pre_norms: tuple[str | None, str | None] = ("input_layernorm", "post_attention_layernorm")
    post_norms: tuple[str | None, str | None] = (None, None)
    qk_norms: tuple[str, str] | None = None
    qk_norm_heads: bool = True
    gain_offset: float = 0.0
    embed_scale: bool = False
    parallel: bool = False
    rope: bool = True
    rotary: str | None = "model.rotary_emb"  # the module computing cos/sin (None: DecoderLM's inv_freq)

    def but(self, **kw) -> "FamilySpec":
        """This spec with a few fields changed."""
        return replace(self, **kw)


LLAMA = FamilySpec("llama")
GEMMA = LLAMA.but(name="gemma", act="gelu_tanh", gain_offset=1.0, embed_scale=True)
GEMMA2 = GEMMA.but(name="gemma2", pre_norms=("input_layernorm", "pre_feedforward_layernorm"),
                   post_norms=("post_attention_layernorm", "post_feedforward_layernorm"))
SPECS: dict[str, FamilySpec] = {
    "llama": LLAMA,
    "tapernorm_llama": LLAMA.but(name="tapernorm_llama", layers="layers", embed="embed_tokens", final_norm="norm",
                                  rotary=None),
    "mistral": LLAMA.but(name="mistral"),
    "qwen2": LLAMA.but(name="qwen2"),  # q/k/v biases are read from the graph like any bias
    "qwen3": LLAMA.but(name="qwen3", qk_norms=("q_norm", "k_norm")),
    "olmo2": LLAMA.but(name="olmo2", qk_norms=("q_norm", "k_norm"), qk_norm_heads=False, pre_norms=(None, None),
                       post_norms=("post_attention_layernorm", "post_feedforward_layernorm")),
    "phi3": LLAMA.but(name="phi3", qkv="qkv_proj", gate_up="mlp.gate_up_proj"),
    "granite": LLAMA.but(name="granite"),  # multipliers: hf_arch.granite_scales
    "smollm3": LLAMA.but(name="smollm3"),  # no-rope layers: config.no_rope_layers
    "gemma": GEMMA,
    "gemma2": GEMMA2,
    "gemma3_text": GEMMA2.but(name="gemma3_text", qk_norms=("q_norm", "k_norm")),
    "gpt2": FamilySpec("gpt2", layers="transformer.h", embed="transformer.wte", positions="transformer.wpe",
                       final_norm="transformer.ln_f", attn="attn", qkv="c_attn", o="c_proj", mlp_in=("mlp.c_fc",),
                       mlp_out="mlp.c_proj", act="gelu_tanh", gated=False, pre_norms=("ln_1", "ln_2"), rope=False),
    "tapernorm_gpt2": FamilySpec("tapernorm_gpt2", layers="layers", embed="embed_tokens", positions="embed_positions",
                                 final_norm="norm", mlp_in=("mlp.fc_in",), mlp_out="mlp.fc_out", act="gelu_tanh",
                                 gated=False, rope=False),
    "gpt_neox": FamilySpec("gpt_neox", layers="gpt_neox.layers", embed="gpt_neox.embed_in",
                           final_norm="gpt_neox.final_layer_norm", attn="attention", rotary="gpt_neox.rotary_emb",
                           qkv="query_key_value", qkv_layout="per_head", o="dense", mlp_in=("mlp.dense_h_to_4h",),
                           mlp_out="mlp.dense_4h_to_h", act="gelu", gated=False, parallel=True),
}
# model types without a spec whose nearest family is worth naming in the one-line fallback message
NEAREST = {"qwen2_moe": "qwen2", "qwen3_moe": "qwen3", "mixtral": "mistral", "phimoe": "phi3", "cohere": "llama",
           "cohere2": "llama", "olmo": "olmo2", "stablelm": "gpt_neox", "phi": "phi3", "falcon": "gpt_neox",
           "opt": "gpt2", "starcoder2": "gpt_neox", "deepseek_v3": "llama", "qwen3_next": "qwen3",
           "flex_olmo": "olmo2", "granitemoe": "granite", "gemma3": "gemma3_text"}


def spec_for(model_type: str) -> FamilySpec | None:
    """The spec of `model_type`, or None (the caller names NEAREST.get(model_type) and takes the generic export)."""
    return SPECS.get(model_type)
