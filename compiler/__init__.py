"""tapernorm.compiler: layers, models, training, capture, ONNX export and the compile driver."""
from .tapernorm import (
    TAPER_TYPES, TaperError, TaperLayerNorm, TaperNorm, calibrate, find_final_norm, get_gate, set_gate,
    taper_layers, taperize,
)
from .model import ConfigError, DecoderLM, ModelConfig, PRESETS, build_model, preset

__all__ = [
    "TaperNorm", "TaperLayerNorm", "TAPER_TYPES", "TaperError", "taperize", "calibrate", "set_gate", "get_gate",
    "taper_layers", "find_final_norm", "ModelConfig", "DecoderLM", "PRESETS", "preset", "build_model", "ConfigError",
]
