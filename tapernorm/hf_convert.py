"""Conversions into Hugging Face models: our run dirs (DecoderLM) -> LlamaForCausalLM / GPT2LMHeadModel with
the same TaperNorm state and logits, and FakeLN's eps-hack LayerNorms -> gate-0 TaperLayerNorm.

Weight maps (torch Linear W is (out, in); HF GPT-2's Conv1D stores (in, out)):

    llama   KEY -> model.KEY (lm_head stays; tied to model.embed_tokens)
    gpt2    embed_tokens -> transformer.wte, embed_positions -> transformer.wpe, norm -> transformer.ln_f,
            layers.i.input_layernorm -> transformer.h.i.ln_1, post_attention_layernorm -> ln_2,
            self_attn.{q,k,v}_proj -> attn.c_attn: W = [Wq^T | Wk^T | Wv^T] (d, 3d), b = [bq | bk | bv],
            self_attn.o_proj -> attn.c_proj (Wo^T), mlp.fc_in -> mlp.c_fc (W^T), mlp.fc_out -> mlp.c_proj (W^T)

FakeLN (Baroni et al. 2025) keeps stock GPT-2 files whose LayerNorms have eps = 1e12 and weight
w = gamma * sqrt(eps) / sigma_frozen, so LN(x) = (x - mu) / sqrt(var + eps) * w + b is, to a relative error
of var / (2 eps) (~1e-10, below fp32's resolution), the affine map (x - mu) * (w / sqrt(eps)) + b. That is
TaperLayerNorm's gate-0 map with s = c * gamma_t = w / sqrt(eps) (computed in float64) and beta_t = b.
"""
from __future__ import annotations

import math
from pathlib import Path

import torch
import torch.nn as nn

from .checkpoint import load_checkpoint
from .hf_config import ACT_FIELDS, guard_hf_config, real_attr, run_dir_hf_fields
from .layers import TaperLayerNorm, taper_layers

__all__ = ["run_dir_to_hf", "run_state_to_hf", "hf_state_to_run", "hf_to_decoder", "find_eps_hack", "import_eps_hack",
           "EPS_HACK_MIN"]

EPS_HACK_MIN = 1e6  # a LayerNorm eps at or above this is FakeLN's eps hack (real LayerNorms use ~1e-5)


def _hf_config(mcfg, info: dict):
    """The transformers config equivalent to a run dir's ModelConfig."""
    import transformers
    fields = run_dir_hf_fields(mcfg.to_dict())
    fields.pop(ACT_FIELDS[mcfg.arch], None)  # the load guard; the real activation is the default (silu / gelu_new)
    tok = info.get("tokenizer_path")
    bos = eos = None
    if tok:
        from .hf_config import sp_tokenizer_info
        (bos, eos), _ = sp_tokenizer_info(tok)
    fields.update(bos_token_id=bos, eos_token_id=eos, tie_word_embeddings=True)
    if mcfg.arch == "llama":
        return transformers.LlamaConfig(**fields)
    fields.pop("rope_parameters", None)
    return transformers.GPT2Config(**fields, resid_pdrop=0.0, embd_pdrop=0.0, attn_pdrop=0.0)


def run_state_to_hf(state: dict[str, torch.Tensor], arch: str, n_layers: int) -> dict[str, torch.Tensor]:
    """Our DecoderLM state dict -> the HF model's (see the module docstring for the maps)."""
    if arch == "llama":
        return {(k if k.startswith("lm_head.") else f"model.{k}"): v for k, v in state.items()}
    out: dict[str, torch.Tensor] = {}
    top = {"embed_tokens.": "transformer.wte.", "embed_positions.": "transformer.wpe.", "norm.": "transformer.ln_f.",
           "lm_head.": "lm_head."}
    for k, v in state.items():
        for a, b in top.items():
            if k.startswith(a):
                out[b + k[len(a):]] = v
    for i in range(n_layers):
        src, dst = f"layers.{i}.", f"transformer.h.{i}."
        for k, v in state.items():
            for a, b in (("input_layernorm.", "ln_1."), ("post_attention_layernorm.", "ln_2.")):
                if k.startswith(src + a):
                    out[dst + b + k[len(src + a):]] = v
        q, kk, vv = (f"{src}self_attn.{p}_proj" for p in "qkv")
        out[dst + "attn.c_attn.weight"] = torch.cat([state[q + ".weight"].T, state[kk + ".weight"].T,
                                                      state[vv + ".weight"].T], dim=1).contiguous()  # (d, 3d)
        out[dst + "attn.c_attn.bias"] = torch.cat([state[q + ".bias"], state[kk + ".bias"], state[vv + ".bias"]])
        for a, b in (("self_attn.o_proj", "attn.c_proj"), ("mlp.fc_in", "mlp.c_fc"), ("mlp.fc_out", "mlp.c_proj")):
            out[dst + b + ".weight"] = state[f"{src}{a}.weight"].T.contiguous()  # (in, out)
            out[dst + b + ".bias"] = state[f"{src}{a}.bias"]
    return out


def _hf_name(arch: str, name: str) -> str:
    """A DecoderLM module path -> the HF module path (norms only)."""
    if arch == "llama":
        return f"model.{name}"
    if name == "norm":
        return "transformer.ln_f"
    i, rest = name.split(".")[1], name.split(".", 2)[2]
    return f"transformer.h.{i}." + {"input_layernorm": "ln_1", "post_attention_layernorm": "ln_2"}[rest]


def run_dir_to_hf(run_dir: str | Path) -> nn.Module:
    """A `tapernorm train` model/checkpoint dir as the equivalent HF causal LM (TaperNorm state included), eval."""
    import transformers
    from .hf import apply_taper_layout, load_state_checked
    d = Path(run_dir)
    if (d / "model" / "config.json").is_file():
        d = d / "model"
    model, info = load_checkpoint(d)
    mcfg = model.config
    config = _hf_config(mcfg, info)
    cls = transformers.LlamaForCausalLM if mcfg.arch == "llama" else transformers.GPT2LMHeadModel
    wdtype = next(model.parameters()).dtype
    hf = cls(config).to(wdtype)
    layout = {_hf_name(mcfg.arch, n): {"kind": "ln" if isinstance(m, TaperLayerNorm) else "rms", "eps": m.eps,
                                       "dim": m.dim} for n, m in taper_layers(model)}
    apply_taper_layout(hf, layout, str(d / "config.json"))
    state = {k: v for k, v in model.state_dict().items() if not k.startswith("lm_head.")}  # tied
    load_state_checked(hf, run_state_to_hf(state, mcfg.arch, mcfg.n_layers), str(d))
    from .pos0 import track_if_needed
    track_if_needed(hf)  # c0 layers learn which rows are position 0
    hf.tie_weights()
    return hf.eval()


def find_eps_hack(model: nn.Module, min_eps: float = EPS_HACK_MIN) -> list[str]:
    """Qualified names of nn.LayerNorm layers with eps >= min_eps (FakeLN's eps hack)."""
    return [n for n, m in model.named_modules() if type(m) is nn.LayerNorm and float(m.eps) >= min_eps]


@torch.no_grad()
def import_eps_hack(model: nn.Module, min_eps: float = EPS_HACK_MIN) -> dict:
    """Replace every eps-hack LayerNorm by a gate-0 TaperLayerNorm computing (x - mu) * (w / sqrt(eps)) + b.

    The g = 1 branch keeps the original LayerNorm (weight w, bias b, eps), so the replacement at gate 1 is the
    stock layer bit for bit. Returns {"layers": {name: {"eps", "max_scale"}}, "converted": n}; raises ValueError
    when the model has no such layer.
    """
    names = find_eps_hack(model, min_eps)
    if not names:
        raise ValueError(f"{type(model).__name__} has no LayerNorm with eps >= {min_eps:g}; it is not a FakeLN "
                         "(eps-hack) checkpoint")
    rows = {}
    for name in names:
        ln = model.get_submodule(name)
        if ln.weight is None or ln.bias is None or len(ln.normalized_shape) != 1:
            raise ValueError(f"{name}: eps-hack LayerNorm without affine weight+bias over one dim; cannot convert")
        eps = float(ln.eps)
        new = TaperLayerNorm(ln.weight.numel(), eps=eps).to(device=ln.weight.device)
        for p in new.parameters():
            p.data = p.data.to(ln.weight.dtype)
        s = (ln.weight.double() / math.sqrt(eps))  # the exact gate-0 scale, in float64
        new.weight.copy_(ln.weight)
        new.bias.copy_(ln.bias)
        new.weight_t.copy_(s.to(ln.weight.dtype))
        new.bias_t.copy_(ln.bias)
        new.c.fill_(1.0)
        new.calibrated = True
        new.calibrated_flag.fill_(True)
        new.train(ln.training)
        parent, _, child = name.rpartition(".")
        setattr(model.get_submodule(parent) if parent else model, child, new)
        rows[name] = {"eps": eps, "max_scale": float(s.abs().max())}
    for n in names:
        model.get_submodule(n).set_gate(0.0)
    guard_hf_config(getattr(model, "config", None))
    return {"layers": rows, "converted": len(names)}


def _decoder_config(hf: nn.Module, mode: str):
    """(ModelConfig, None) when our DecoderLM computes the same function as `hf`, else (None, reason)."""
    from .model_config import ModelConfig
    c, name = hf.config, type(hf).__name__
    if not getattr(c, "tie_word_embeddings", False):
        return None, "untied output head"
    if name == "LlamaForCausalLM":
        rope = (getattr(c, "rope_parameters", None) or {})
        heads, d = c.num_attention_heads, c.hidden_size
        bad = [why for ok, why in (
            (c.num_key_value_heads == heads, "grouped-query attention"),
            (not c.attention_bias and not c.mlp_bias, "linear biases"), (real_attr(c, "hidden_act") == "silu", "activation"),
            (rope.get("rope_type", "default") == "default", "RoPE scaling"),
            (getattr(c, "head_dim", d // heads) == d // heads, "head_dim")) if not ok]
        if bad:
            return None, bad[0]
        return ModelConfig(arch="llama", vocab_size=c.vocab_size, dim=d, n_layers=c.num_hidden_layers, n_heads=heads,
                           max_seq_len=c.max_position_embeddings, hidden_dim=c.intermediate_size,
                           norm_eps=c.rms_norm_eps, rope_theta=float(rope.get("rope_theta", 10000.0)),
                           taper_mode=mode), None
    if name == "GPT2LMHeadModel":
        if real_attr(c, "activation_function") not in ("gelu_new", "gelu_pytorch_tanh"):
            return None, "activation"
        if c.scale_attn_by_inverse_layer_idx or not c.scale_attn_weights:
            return None, "attention scaling"
        return ModelConfig(arch="gpt2", vocab_size=c.vocab_size, dim=c.n_embd, n_layers=c.n_layer, n_heads=c.n_head,
                           max_seq_len=c.n_positions, hidden_dim=c.n_inner or 4 * c.n_embd,
                           norm_eps=c.layer_norm_epsilon, taper_mode=mode), None
    return None, f"{name} is not LlamaForCausalLM / GPT2LMHeadModel"


def hf_state_to_run(state: dict[str, torch.Tensor], arch: str, n_layers: int) -> dict[str, torch.Tensor]:
    """The inverse of run_state_to_hf: an HF Llama / GPT-2 state dict -> our DecoderLM's."""
    if arch == "llama":
        return {k[len("model."):] if k.startswith("model.") else k: v for k, v in state.items()}
    out: dict[str, torch.Tensor] = {}
    for k, v in state.items():
        for a, b in (("transformer.wte.", "embed_tokens."), ("transformer.wpe.", "embed_positions."),
                     ("transformer.ln_f.", "norm."), ("lm_head.", "lm_head.")):
            if k.startswith(a):
                out[b + k[len(a):]] = v
    for i in range(n_layers):
        src, dst = f"transformer.h.{i}.", f"layers.{i}."
        for k, v in state.items():
            for a, b in (("ln_1.", "input_layernorm."), ("ln_2.", "post_attention_layernorm.")):
                if k.startswith(src + a):
                    out[dst + b + k[len(src + a):]] = v
        w, bias = state[src + "attn.c_attn.weight"], state[src + "attn.c_attn.bias"]  # (d, 3d), (3d,)
        for j, p in enumerate("qkv"):
            d = w.shape[0]
            out[f"{dst}self_attn.{p}_proj.weight"] = w[:, j * d:(j + 1) * d].T.contiguous()  # (out, in)
            out[f"{dst}self_attn.{p}_proj.bias"] = bias[j * d:(j + 1) * d]
        for a, b in (("attn.c_proj", "self_attn.o_proj"), ("mlp.c_fc", "mlp.fc_in"), ("mlp.c_proj", "mlp.fc_out")):
            out[f"{dst}{b}.weight"] = state[f"{src}{a}.weight"].T.contiguous()
            out[f"{dst}{b}.bias"] = state[f"{src}{a}.bias"]
    return out


@torch.no_grad()
def hf_to_decoder(hf: nn.Module):
    """(DecoderLM, None) computing the same function as an HF Llama (MHA, no biases, tied) or GPT-2 with a
    standard taper layout (every block norm, plus the final norm in "all"), else (None, reason)."""
    from .model import DecoderLM
    names = {n for n, _ in taper_layers(hf)}
    final = "model.norm" if type(hf).__name__ == "LlamaForCausalLM" else "transformer.ln_f"
    mode = "baseline" if not names else ("all" if final in names else "internal")
    cfg, why = _decoder_config(hf, mode)
    if cfg is None:
        return None, why
    model = DecoderLM(cfg)
    want = {_hf_name(cfg.arch, n) for n, _ in taper_layers(model)}
    if want != names:
        return None, "a taper layout other than every block norm (+ the final norm)"
    state = hf_state_to_run({k: v for k, v in hf.state_dict().items() if not k.startswith("lm_head.")},
                            cfg.arch, cfg.n_layers)
    state["lm_head.weight"] = state["embed_tokens.weight"]
    ours = model.state_dict()
    if set(state) != set(ours) or any(tuple(state[k].shape) != tuple(ours[k].shape) for k in ours):
        return None, "weights that do not map onto the reference model"
    dtype = next(hf.parameters()).dtype
    for p in model.parameters():  # parameters take the HF model's dtype; gate / EMA buffers stay float64
        p.data = p.data.to(dtype)
    model.load_state_dict(state, strict=True)
    return model.eval(), None
