"""genai_config.json: lets onnxruntime-genai (`og.Model(DIR)`) run a compiled lean directory as it is.

The lean graph already has genai's decoder interface (input_ids, attention_mask, past_key_values.%d.key|value
-> logits, present.%d.key|value) and a GroupQueryAttention KV buffer that genai shares between past and
present (`past_present_share_buffer`). The schema below is the one onnxruntime-genai 0.18's model builder
writes (model.decoder.{inputs, outputs, head_size, ...}, search.{max_length, ...}); runtime/genai_engine.py
names the key when an installed genai rejects it.
"""
from __future__ import annotations

import json
from pathlib import Path

from tapernorm.fileio import atomic_write_text

from .families import DecoderDims, dims_of

__all__ = ["genai_config", "write_genai_config", "GENAI_MODEL_TYPE"]

GENAI_MODEL_TYPE = "llama"  # every lean graph has the same plain decoder interface, whatever the family


def genai_config(cfg, *, filename: str = "model.onnx", eos_id: int | None = None, bos_id: int | None = None,
                 provider: str = "cpu", eos_ids: list[int] | None = None) -> dict:
    """The genai_config.json dict for a lean graph of `cfg` (a DecoderLM ModelConfig, an HFCompileConfig or
    DecoderDims). `eos_ids` (every end token, as runtime.json's) becomes a list, which genai stops at, as its
    own builder writes for chat models; else `eos_id`; eos falls back to 0 when the model has none."""
    d = cfg if isinstance(cfg, DecoderDims) else dims_of(cfg)
    ids = [i for i in (eos_ids or ([eos_id] if eos_id is not None else [])) if 0 <= i < d.vocab]  # genai refuses out-of-vocab
    eos = ids[0] if ids else 0
    decoder = {
        "session_options": {"log_id": "onnxruntime-genai", "provider_options": [] if provider == "cpu" else
                            [{"cuda": {}}]},
        "filename": filename, "head_size": d.head_dim, "hidden_size": d.hidden,
        "inputs": {"input_ids": "input_ids", "attention_mask": "attention_mask",
                   "past_key_names": "past_key_values.%d.key", "past_value_names": "past_key_values.%d.value"},
        "outputs": {"logits": "logits", "present_key_names": "present.%d.key",
                    "present_value_names": "present.%d.value"},
        "num_attention_heads": d.num_heads, "num_hidden_layers": d.num_layers, "num_key_value_heads": d.num_kv_heads,
    }
    return {
        "model": {"bos_token_id": bos_id if bos_id is not None and bos_id >= 0 else eos,
                  "context_length": d.max_seq_len, "decoder": decoder, "eos_token_id": ids if len(ids) > 1 else eos, "pad_token_id": eos,
                  "type": GENAI_MODEL_TYPE, "vocab_size": d.vocab},
        "search": {"diversity_penalty": 0.0, "do_sample": False, "early_stopping": True, "length_penalty": 1.0,
                   "max_length": d.max_seq_len, "min_length": 0, "no_repeat_ngram_size": 0, "num_beams": 1,
                   "num_return_sequences": 1, "past_present_share_buffer": True, "repetition_penalty": 1.0,
                   "temperature": 1.0, "top_k": 1, "top_p": 1.0},
    }


def write_genai_config(out_dir: str | Path, cfg, **kw) -> Path:
    """Write `out_dir/genai_config.json` atomically.

    genai's og.Tokenizer reads the tokenizer.json / tokenizer_config.json that compile copies beside it
    (compiler/tokenizer_files.py; run directories get a tokenizer.json converted from SentencePiece).
    """
    out_dir = Path(out_dir)
    atomic_write_text(out_dir / "genai_config.json", json.dumps(genai_config(cfg, **kw), indent=2))
    return out_dir / "genai_config.json"
