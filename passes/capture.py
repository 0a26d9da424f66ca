"""Capture a model as an fx GraphModule the passes can rewrite.

`torch.fx.symbolic_trace` fails on transformers 5.x models, so capture goes through
`torch.export.export(..., strict=False)` and unlifts the result with `.module()`. The GraphModule
that comes back is called like the original (same positional / keyword inputs, same output
structure), holds the parameters as `get_attr` nodes, and keeps `nn_module_stack` metadata on
every node naming the source module path and type (the passes use it to find TaperNorm calls).

A Hugging Face model called without `use_cache` would build a `DynamicCache`, which torch.export
cannot return; `no_cache_default` makes the config's default False for the capture (and for the
reference run), so `fold(model, (ids,))` works as written and the result returns no cache.
"""
from __future__ import annotations

import contextlib
import inspect
import warnings

import torch
import torch.nn as nn

__all__ = ["capture", "CaptureError", "no_cache_default"]


class CaptureError(RuntimeError):
    """torch.export could not capture the model."""


def _passes_use_cache(module: nn.Module, args: tuple, kwargs: dict) -> bool:
    """True if forward takes `use_cache` (or **kwargs) and the call leaves it unset (None or absent)."""
    try:
        sig = inspect.signature(module.forward)
    except (TypeError, ValueError):
        return False
    if "use_cache" not in sig.parameters and not any(p.kind is p.VAR_KEYWORD for p in sig.parameters.values()):
        return False
    try:
        bound = sig.bind_partial(*args, **kwargs).arguments
    except TypeError:
        return False
    return bound.get("use_cache") is None


@contextlib.contextmanager
def no_cache_default(module: nn.Module, args: tuple = (), kwargs: dict | None = None):
    """While inside, every HF config of `module` has use_cache=False, if the call leaves use_cache unset.

    Yields True when it changed a config (so a report can say so), False otherwise; restores on exit.
    """
    changed = []
    if _passes_use_cache(module, tuple(args), dict(kwargs or {})):
        seen = set()
        for m in module.modules():
            cfg = getattr(m, "config", None)
            if cfg is None or id(cfg) in seen or getattr(cfg, "use_cache", None) is not True:
                continue
            seen.add(id(cfg))
            changed.append(cfg)
    for cfg in changed:
        cfg.use_cache = False
    try:
        yield bool(changed)
    finally:
        for cfg in changed:
            cfg.use_cache = True


@contextlib.contextmanager
def _pos0_rows_restored(module: nn.Module):
    """c0 layers' per-call `pos0_rows` (set by their model's pre-hook, tapernorm/pos0.py) is a plain attribute:
    torch.export warns that it was assigned while tracing; silence that one warning and reset it to None after."""
    layers = [m for m in module.modules() if getattr(m, "has_pos0", False)]
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message=r"(?s).*pos0_rows.*were assigned during export")
        try:
            yield
        finally:
            for m in layers:
                m.pos0_rows = None


def capture(module: nn.Module, example_args=(), example_kwargs: dict | None = None,
            dynamic_shapes=None) -> torch.fx.GraphModule:
    """Export `module` (non-strict) on the example inputs and return the unlifted fx GraphModule."""
    if not isinstance(module, nn.Module):
        raise TypeError(f"capture: expected an nn.Module, got {type(module).__name__}")
    if not isinstance(example_args, tuple):
        example_args = (example_args,) if isinstance(example_args, torch.Tensor) else tuple(example_args)
    try:
        with no_cache_default(module, example_args, example_kwargs), _pos0_rows_restored(module):
            ep = torch.export.export(module, example_args, kwargs=example_kwargs or None,
                                     dynamic_shapes=dynamic_shapes, strict=False)
    except Exception as e:  # torch.export raises many types; give one clear line, keep the cause
        first = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        hint = ("leave use_cache out or pass use_cache=False: a cache object is not a tensor output"
                if "Cache" in first else "pass example inputs the model accepts")
        raise CaptureError(f"torch.export could not capture {type(module).__name__}: {first} ({hint})") from e
    gm = ep.module()
    gm.meta.setdefault("tapernorm_source", type(module).__name__)
    return gm
