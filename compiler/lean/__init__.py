"""tapernorm.compiler.lean: the lean decode graph (GroupQueryAttention, shared KV buffer, fused Skip norms).

    from tapernorm.compiler.lean import build_lean
    facts = build_lean(model, folded_gm, None, "out/model.onnx", torch.float32)

`model` is a DecoderLM, an HFDecoder (compiler.hf_compile) or KVCacheLM around either; the weights come from
the pass library's GraphModule keyed by module names (weights.py), one FamilySpec per family (families.py).
"""
from .builder import build_lean, lean_model_proto, lean_statistics_check, norm_names, norm_paths, ort_optimized_nodes
from .families import NEAREST, SPECS, DecoderDims, FamilySpec, dims_of, spec_for
from .genai import genai_config, write_genai_config
from .weights import LeanError, NormSpec, linear_weights, norm_spec

__all__ = ["build_lean", "lean_model_proto", "norm_names", "norm_paths", "lean_statistics_check",
           "ort_optimized_nodes", "LeanError", "NormSpec", "linear_weights", "norm_spec", "genai_config",
           "write_genai_config", "FamilySpec", "SPECS", "NEAREST", "spec_for", "DecoderDims", "dims_of"]
