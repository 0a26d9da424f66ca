"""tapernorm.runtime: run compiled models with onnxruntime, and a static-KV-cache PyTorch reference.

Imports no torch and nothing else of ours: it knows a model only through the compiled directory's
files (model.onnx, runtime.json, tokenizer.json / tokenizer.model, chat template). Every name is loaded on
first use (so `tapernorm --help` and `tapernorm bench --help` import neither numpy nor onnxruntime); the
PyTorch reference decoder (torch_ref) loads the core and torch only when one of its names is asked for.
"""
import importlib

_WHERE = {
    "Sampler": "sampling", "SamplingParams": "sampling", "filter_logits": "sampling", "sample_logits": "sampling",
    "DecoderSession": "session", "ModelDirError": "session", "RuntimeConfig": "session", "cuda_loadable": "session",
    "resolve_model_path": "session",
    "GenerationResult": "generate", "Generator": "generate", "OrtDecoder": "generate", "TextModel": "generate",
    "generate_ids": "generate", "greedy_block": "generate", "iter_tokens": "generate", "pad_prompts": "generate", "stream_ids": "generate",
    "TextStreamer": "tokenizer", "load_tokenizer": "tokenizer", "PromptRules": "tokenizer",
    "StopStrings": "tokenizer", "ChatTemplate": "chat", "load_chat_template": "chat",
    "StaticDecoder": "torch_ref", "TorchRefDecoder": "torch_ref", "prefill": "torch_ref",
    "decode_one_token": "torch_ref", "KVCache": "torch_ref", "greedy_full_forward": "torch_ref",
}

__all__ = [n for n in _WHERE if n not in ("KVCache", "greedy_full_forward")]


def __getattr__(name):
    mod = _WHERE.get(name)
    if mod is None:
        raise AttributeError(f"module 'tapernorm.runtime' has no attribute {name!r}")
    return getattr(importlib.import_module(f".{mod}", __name__), name)
