"""tapernorm: train with TaperNorm, fold gate-zero norms, export to ONNX, decode with ONNX Runtime.

The pipeline reads top to bottom: `tapernorm.compiler` (layers, models, training, capture, export),
`tapernorm.passes` (fx graph rewrites), `tapernorm.runtime` (ONNX Runtime and PyTorch decoders).
"""

__version__ = "0.1.0"
