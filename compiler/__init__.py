"""tapernorm.compiler: capture-to-ONNX export, ONNX-level passes, the compile driver with parity, the CLI.

May import the core, `tapernorm.passes` and `tapernorm.runtime`; nothing imports the compiler.

    from tapernorm.compiler import compile_checkpoint
    report = compile_checkpoint("runs/tiny/model", "out/tiny")

Names load their module on first use, so `tapernorm generate` (whose CLI lives here) never pays for torch.
"""
from __future__ import annotations

from tapernorm.lazy import lazy_exports

_EXPORTS = {
    "pipeline": ["compile_checkpoint", "CompileError", "ParityError"],
    "export_onnx": ["export_onnx", "KVCacheLM"],
    "onnx_io": ["load_onnx", "save_onnx", "max_ir_version"],
    "onnx_fold": ["fold_onnx", "fold_onnx_file", "check_statistics", "cleanup_onnx"],
}
__getattr__, __dir__, __all__ = lazy_exports(__name__, _EXPORTS)
