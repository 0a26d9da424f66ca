"""Compile Hugging Face causal LMs through the same pipeline as our own model.

`load_for_compile(DIR)` is the one place compile_checkpoint loads a model:
    a tapernorm run dir          -> load_checkpoint (DecoderLM)
    a tapered HF dir             -> tapernorm.from_pretrained, wrapped in HFDecoder
    a plain HF dir               -> the same; FakeLN eps-hack LayerNorms become gate-0 TaperLayerNorm first
The HF model itself is what compile captures and folds; the lean builder (compiler.lean) reads the folded
weights by their HF module names with the family's spec, so no conversion to our DecoderLM is involved.

HFDecoder gives an HF model DecoderLM's call shape and config, so KVCacheLM, capture, fold / materialize,
the generic dynamo export (HF / genai I/O names, KV cache), parity and runtime.json are shared unchanged:

    forward(input_ids (B, T), attention_mask (B, P+T), position_ids (B, T), past_key_values, use_cache)
        -> logits (B, T, V), or (logits, presents) with presents[i] = (k, v) each (B, H_kv, P+T, D)

The cache goes through transformers' DynamicCache built from the flat past tensors (each layer concatenates the
new k/v), which torch.export captures with dynamic batch / sequence / past lengths.
"""
from __future__ import annotations

import inspect
import json
from dataclasses import dataclass
from pathlib import Path

import torch
import torch.nn as nn

from tapernorm.checkpoint import CheckpointError, load_checkpoint
from tapernorm.hf import dir_kind, from_pretrained
from tapernorm.hf_config import HF_SECTION
from tapernorm.hf_convert import find_eps_hack, import_eps_hack
from tapernorm.layers import get_gate, taper_layers

__all__ = ["HFDecoder", "HFCompileConfig", "load_for_compile", "is_hf_dir"]


@dataclass
class HFCompileConfig:
    """What export / parity / runtime.json read from a model config.

    num_heads: query heads; num_kv_heads: the heads the KV cache holds; `n_heads` (the name export and the
    runtime's runtime.json use for the cache's heads) is num_kv_heads.
    """
    n_layers: int
    num_heads: int
    num_kv_heads: int
    head_dim: int
    vocab_size: int
    max_seq_len: int
    arch: str
    taper_mode: str
    hidden: int = 0

    @property
    def n_heads(self) -> int:
        """The KV cache's heads (export's / runtime.json's `n_heads`)."""
        return self.num_kv_heads


def _first(cfg, *names, default=None):
    for n in names:
        v = getattr(cfg, n, None)
        if v is not None:
            return v
    return default


def compile_config(model: nn.Module, taper_mode: str) -> HFCompileConfig:
    """HFCompileConfig of an HF causal LM (text config), with the KV heads and head dim its cache uses."""
    c = model.config.get_text_config() if hasattr(model.config, "get_text_config") else model.config
    heads = int(_first(c, "num_attention_heads", "n_head"))
    hidden = int(_first(c, "hidden_size", "n_embd"))
    kv = int(_first(c, "num_key_value_heads", "num_kv_heads", default=heads))
    if getattr(c, "multi_query", False) and not getattr(c, "new_decoder_architecture", False):
        kv = 1  # Falcon's original multi-query attention
    return HFCompileConfig(
        n_layers=int(_first(c, "num_hidden_layers", "n_layer")),
        num_heads=heads, num_kv_heads=kv,
        head_dim=int(_first(c, "head_dim", default=hidden // heads)),
        vocab_size=int(c.vocab_size),
        max_seq_len=int(_first(c, "max_position_embeddings", "n_positions", default=2048)),
        arch=str(c.model_type), taper_mode=taper_mode, hidden=hidden)


class HFDecoder(nn.Module):
    """DecoderLM's interface around an HF causal LM (see the module docstring)."""

    def __init__(self, hf_model: nn.Module, taper_mode: str = "internal"):
        super().__init__()
        self.hf = hf_model
        self.config = compile_config(hf_model, taper_mode)
        # transformers >= 5.2x names the cache argument `cache` (past_key_values still works, with a warning)
        self._cache_kw = "cache" if "cache" in inspect.signature(hf_model.forward).parameters else "past_key_values"
        self.train(hf_model.training)

    def forward(self, input_ids, attention_mask=None, position_ids=None, past_key_values=None, use_cache=False):
        from transformers import DynamicCache
        cache = None
        if past_key_values is not None:  # [(k, v)] per layer, each (B, H_kv, P, D)
            cache = DynamicCache(ddp_cache_data=[(k, v) for k, v in past_key_values])
        want_cache = use_cache or past_key_values is not None
        out = self.hf(input_ids=input_ids, attention_mask=attention_mask, position_ids=position_ids,
                      use_cache=want_cache, **{self._cache_kw: cache})
        if not want_cache:
            return out.logits
        new = out.get("cache") if "cache" in out else out.past_key_values
        presents = [(layer.keys, layer.values) for layer in new.layers]
        return out.logits, presents


def is_hf_dir(path: str | Path) -> bool:
    """True for a directory compile loads through transformers (tapered or plain HF), not a run dir."""
    p = Path(path)
    return p.is_dir() and (p / "config.json").is_file() and dir_kind(p) in ("tapered", "hf-tapered", "hf")


@torch.no_grad()
def _import_fakeln(model: nn.Module, log) -> dict | None:
    """Convert eps-hack LayerNorms (if any); returns the report with the max |logit diff| on a probe batch."""
    if not find_eps_hack(model):
        return None
    g = torch.Generator().manual_seed(0)
    vocab = int(model.config.get_text_config().vocab_size)
    ids = torch.randint(0, vocab, (2, 16), generator=g)  # (B, T) probe tokens
    before = model(input_ids=ids, use_cache=False).logits
    rep = import_eps_hack(model)
    after = model(input_ids=ids, use_cache=False).logits
    rep["max_abs_diff"] = float((after - before).abs().max())
    rep["logit_scale"] = float(before.abs().max())
    log(f"FakeLN eps hack: {rep['converted']} LayerNorm(s) -> gate-0 TaperLayerNorm, max |logit diff| "
        f"{rep['max_abs_diff']:.2e} (logits up to {rep['logit_scale']:.2f})")
    return rep


def _load_hf(p: Path, kind: str, log) -> nn.Module:
    """The HF model, its weights memory-mapped in the checkpoint's dtype (compiler/load.py) where the directory's
    keys are the model's own; else through tapernorm.from_pretrained (transformers' loader)."""
    from .load import MmapUnsupported, load_hf_mmap
    if kind in ("tapered", "hf"):
        try:
            return load_hf_mmap(p, kind)
        except MmapUnsupported as e:
            log(f"note: weights not memory-mapped ({e}); loading through transformers")
    return from_pretrained(p)


def load_for_compile(path: str | Path, log=None) -> tuple[nn.Module, dict]:
    """(model with DecoderLM's interface, info) for a run dir, a tapered HF dir or a plain (FakeLN) HF dir."""
    log = log or (lambda msg: None)
    p = Path(path)
    if not is_hf_dir(p):
        return load_checkpoint(p)
    kind = dir_kind(p)
    try:
        raw = json.loads((p / "config.json").read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise CheckpointError(f"{p / 'config.json'}: not valid JSON ({e})") from None
    try:
        hf = _load_hf(p, kind, log)
    except (OSError, ValueError, KeyError) as e:
        if isinstance(e, CheckpointError):
            raise
        first = (str(e).strip().splitlines() or [type(e).__name__])[0][:300]
        raise CheckpointError(f"{p}: transformers could not load it as a causal LM ({first})") from None
    fakeln = _import_fakeln(hf, log) if kind == "hf" else None
    if not taper_layers(hf):
        log(f"note: {p} has no TaperNorm layers; nothing to fold (compiling it as it is)")
    mode = raw.get(HF_SECTION, {}).get("mode") or ("fakeln" if fakeln else "baseline")
    model = HFDecoder(hf, mode).eval()
    tok = p / "tokenizer.model"
    info = {"dir": str(p), "config": model.config, "config_json": raw, "gate": get_gate(hf),
            "tokenizer_path": str(tok) if tok.is_file() else None,
            "hf": {"kind": kind, "class": type(hf).__name__, "model_type": model.config.arch, "fakeln": fakeln}}
    return model, info
