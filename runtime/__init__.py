"""tapernorm.runtime: run compiled models with onnxruntime, and a static-KV-cache PyTorch reference.

Imports no torch and nothing else of ours: it knows a model only through the compiled directory's
files (model.onnx, runtime.json, tokenizer.model). The PyTorch reference decoder (torch_ref) loads
the core and torch only when one of its names is asked for.
"""
from .sampling import Sampler, SamplingParams, filter_logits, sample_logits
from .session import DecoderSession, ModelDirError, RuntimeConfig, cuda_loadable, resolve_model_path
from .generate import (
    GenerationResult, Generator, OrtDecoder, TextStreamer, generate_ids, iter_tokens, load_tokenizer, pad_prompts,
    stream_ids,
)

__all__ = [
    "DecoderSession", "ModelDirError", "RuntimeConfig", "cuda_loadable", "resolve_model_path",
    "OrtDecoder", "Generator", "GenerationResult", "TextStreamer", "generate_ids", "stream_ids", "iter_tokens",
    "pad_prompts", "load_tokenizer", "SamplingParams", "Sampler", "filter_logits", "sample_logits",
    "StaticDecoder", "TorchRefDecoder", "prefill", "decode_one_token",
]


def __getattr__(name):  # torch_ref imports torch; load it only when asked for
    if name in ("StaticDecoder", "TorchRefDecoder", "prefill", "decode_one_token", "KVCache", "greedy_full_forward"):
        from . import torch_ref
        return getattr(torch_ref, name)
    raise AttributeError(f"module 'tapernorm.runtime' has no attribute {name!r}")
