"""Capture a model as an fx GraphModule the passes can rewrite.

`torch.fx.symbolic_trace` fails on transformers 5.x models, so capture goes through
`torch.export.export(..., strict=False)` and unlifts the result with `.module()`. The GraphModule
that comes back is called like the original (same positional / keyword inputs, same output
structure), holds the parameters as `get_attr` nodes, and keeps `nn_module_stack` metadata on
every node naming the source module path and type (the passes use it to find TaperNorm calls).
"""
from __future__ import annotations

import torch
import torch.nn as nn

__all__ = ["capture", "CaptureError"]


class CaptureError(RuntimeError):
    """torch.export could not capture the model."""


def capture(module: nn.Module, example_args=(), example_kwargs: dict | None = None,
            dynamic_shapes=None) -> torch.fx.GraphModule:
    """Export `module` (non-strict) on the example inputs and return the unlifted fx GraphModule."""
    if not isinstance(module, nn.Module):
        raise TypeError(f"capture: expected an nn.Module, got {type(module).__name__}")
    if not isinstance(example_args, tuple):
        example_args = (example_args,) if isinstance(example_args, torch.Tensor) else tuple(example_args)
    try:
        ep = torch.export.export(module, example_args, kwargs=example_kwargs or None,
                                 dynamic_shapes=dynamic_shapes, strict=False)
    except Exception as e:  # torch.export raises many types; give one clear line, keep the cause
        first = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        raise CaptureError(
            f"torch.export could not capture {type(module).__name__}: {first} "
            "(pass example inputs the model accepts, e.g. use_cache=False for HF models)") from e
    gm = ep.module()
    gm.meta.setdefault("tapernorm_source", type(module).__name__)
    return gm
