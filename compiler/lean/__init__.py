"""tapernorm.compiler.lean: the lean decode graph (GroupQueryAttention, shared KV buffer, fused Skip norms).

    from tapernorm.compiler.lean import build_lean
    facts = build_lean(model, folded_gm, fold_report, "out/model.onnx", torch.float32)

The weights come from the pass library's GraphModule (fold or materialize); see weights.py.
"""
from .builder import build_lean, lean_model_proto, lean_statistics_check, norm_names, ort_optimized_nodes
from .genai import genai_config, write_genai_config
from .weights import LeanError, NormSpec, linear_weights, norm_spec

__all__ = ["build_lean", "lean_model_proto", "norm_names", "lean_statistics_check", "ort_optimized_nodes", "LeanError", "NormSpec", "linear_weights", "norm_spec",
           "genai_config", "write_genai_config"]
