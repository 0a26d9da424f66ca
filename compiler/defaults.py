"""Compile defaults shared by the driver and the command line (torch-free, so the CLI can show them)."""
from __future__ import annotations

__all__ = ["DTYPE_NAMES", "DEFAULT_PROMPT", "PARITY_TOKENS"]

DTYPE_NAMES = ("bfloat16", "float16", "float32")  # export dtypes; export_onnx.DTYPES maps them to torch
DEFAULT_PROMPT = "Once upon a time"
PARITY_TOKENS = 8  # greedy tokens that must match PyTorch
