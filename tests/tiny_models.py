"""Tiny seeded models for tests, calibrated and (optionally) at gate 0. Import as `from tiny_models import make_tiny`."""
from __future__ import annotations

import torch

from tapernorm import build_model, calibrate, set_gate

VOCAB = 256


def random_batches(n: int = 3, batch: int = 2, seq: int = 12, vocab: int = VOCAB, seed: int = 0):
    """Deterministic random token batches (B, T) for calibration."""
    g = torch.Generator().manual_seed(seed)
    return [torch.randint(0, vocab, (batch, seq), generator=g) for _ in range(n)]


def make_tiny(arch: str = "tiny", mode: str = "internal", gate: float | None = 0.0, seed: int = 0):
    """A tiny reference model in `mode`, calibrated on random tokens, at `gate` (None: leave at 1), eval."""
    torch.manual_seed(seed)
    model = build_model(arch, taper_mode=mode)
    with torch.no_grad():  # non-trivial gains so folds are actually exercised
        for name, p in model.named_parameters():
            if name.endswith(("layernorm.weight", "norm.weight")):
                p.uniform_(0.5, 1.5)
            elif name.endswith(("layernorm.bias", "norm.bias")):
                p.uniform_(-0.2, 0.2)
    if mode != "baseline":
        calibrate(model, random_batches())
        if gate is not None:
            set_gate(model, gate)
    return model.eval()


def sharpen_pos0(model):
    """Random ids have no attention sink (c0 ~ c): make position 0's scale clearly its own (c0 halved)."""
    from tapernorm import taper_layers
    for _, layer in taper_layers(model):
        layer.c0.mul_(0.5)
    return model


def make_pos0(arch: str = "tiny", mode: str = "internal", pos0: bool = True, batches=None, embed_scale: float = 1.0,
              bound_rms: tuple[float, str] | None = None):
    """A tiny reference model (2 heads) calibrated with (or without) position 0's own scale, at gate 0, eval.
    embed_scale multiplies the token embeddings (logits of a useful size, so greedy tokens vary); bound_rms
    (K, pattern) gives the matching norms a per-feature bound, measured in the calibration (tapernorm/bound.py)."""
    torch.manual_seed(0)
    model = build_model(arch, taper_mode=mode, n_heads=2)
    if embed_scale != 1.0:
        with torch.no_grad():
            model.embed_tokens.weight.mul_(embed_scale)
    if bound_rms is not None:
        from tapernorm.bound import set_bound_rms
        set_bound_rms(model, *bound_rms)
    calibrate(model, batches if batches is not None else random_batches(), pos0=pos0)
    set_gate(sharpen_pos0(model) if pos0 else model, 0.0)
    return model.eval()


def make_hf_pos0(model_type: str, hidden: int = 64, layers: int = 2, heads: int = 4, kv_heads: int = 2,
                 embed_scale: float = 1.0, vocab: int = 128, seed: int = 0, **extra):
    """A tiny Hugging Face causal LM from a config (head_dim hidden / heads, GQA heads / kv_heads), tapered "all",
    calibrated with position 0's own scale c0 (sharpened), at gate 0, eval. `model_type` e.g. "llama", "olmo2",
    "qwen3" (per-head QK norms q_norm / k_norm on (B, T, H, head_dim)), "gemma3_text" (on (B, H, T, head_dim):
    token_dim 2); `extra` goes to the config."""
    import pytest
    transformers = pytest.importorskip("transformers")
    from tapernorm import taperize
    transformers.logging.set_verbosity_error()
    cfg = transformers.AutoConfig.for_model(model_type, **{
        "vocab_size": vocab, "hidden_size": hidden, "intermediate_size": hidden * 3 // 2, "num_hidden_layers": layers,
        "num_attention_heads": heads, "num_key_value_heads": kv_heads, "head_dim": hidden // heads,
        "max_position_embeddings": 64, "bos_token_id": 1, "eos_token_id": 2, **extra})
    torch.manual_seed(seed)
    m = transformers.AutoModelForCausalLM.from_config(cfg).eval()
    if embed_scale != 1.0:
        with torch.no_grad():
            m.get_input_embeddings().weight.mul_(embed_scale)
    taperize(m, "all")
    g = torch.Generator().manual_seed(seed + 1)
    calibrate(m, [torch.randint(3, vocab, (2, 12), generator=g) for _ in range(2)],
              forward=lambda mod, b: mod(input_ids=b, use_cache=False), pos0=True)
    set_gate(sharpen_pos0(m), 0.0)
    return m


def prefill_args(model, T: int = 7, seed: int = 9):
    """(ids, mask, positions, empty past) from position 0 for a KVCacheLM around our DecoderLM `model` (B = 2):
    where position 0's factor is not 1."""
    c = model.config
    ids = torch.randint(3, VOCAB, (2, T), generator=torch.Generator().manual_seed(seed))
    past = tuple(torch.zeros(2, c.n_heads, 0, c.head_dim) for _ in range(2 * c.n_layers))
    return ids, torch.ones(2, T, dtype=torch.long), torch.arange(T)[None].expand(2, T).contiguous(), past


def kv_capture(model):
    """(KVCacheLM wrapper, example args, dynamic shapes, captured GraphModule, prefill args, wrapper's prefill
    logits) of our DecoderLM `model`: the setup of the fold tests on cached decoders."""
    from tapernorm.compiler.export_onnx import KVCacheLM, dynamic_shapes, example_inputs
    from tapernorm.passes.capture import capture
    w = KVCacheLM(model)
    args, ds = example_inputs(model.config), dynamic_shapes(model.config.n_layers)
    pre = prefill_args(model)
    with torch.no_grad():
        ref = w(*pre)[0]
    return w, args, ds, capture(w, args, dynamic_shapes=ds), pre, ref
