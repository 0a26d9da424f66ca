"""tapernorm: train with TaperNorm, fold gate-zero norms, export to ONNX, decode with ONNX Runtime.

The package reads like the pipeline; each arrow is the only direction imports go:

    tapernorm (core)      layers, reference model, checkpoints, file I/O, data; `tapernorm.train`: the trainer
      -> tapernorm.passes     torch.fx rewrites (capture, fold, materialize, verify); imports only the core
      -> tapernorm.compiler   ONNX export, ONNX passes, compile driver with parity, the CLI; imports everything
    tapernorm.runtime     onnxruntime sessions, decode loop, sampling; imports none of the above, no torch

    import tapernorm
    tapernorm.taperize(model, mode="internal")

The names below load their module on first use (PEP 562), so `import tapernorm.runtime` stays free
of torch: importing the package root costs nothing.
"""
from __future__ import annotations

from .lazy import lazy_exports

__version__ = "0.1.0"

_EXPORTS = {
    "layers": ["TaperNorm", "TaperLayerNorm", "TAPER_TYPES", "TaperError", "taperize", "calibrate", "set_gate",
               "get_gate", "taper_layers", "find_final_norm", "begin_calibration", "finish_calibration"],
    "model": ["ModelConfig", "DecoderLM", "PRESETS", "preset", "build_model", "ConfigError"],
    "checkpoint": ["save_checkpoint", "load_checkpoint", "CheckpointError"],
    "data": ["Tokenizer", "train_tokenizer", "load_corpus"],
    "hf": ["from_pretrained", "save_pretrained"],
}
__getattr__, __dir__, __all__ = lazy_exports(__name__, _EXPORTS)
__all__ = [*__all__, "__version__"]
