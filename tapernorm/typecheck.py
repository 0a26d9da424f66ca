"""Field type checks for settings read from JSON or passed in code: the error names the field.

Torch-free. Used by TrainConfig (flags, API, a resumed run's saved settings) and by checkpoint loading
(config.json's `tapernorm` section), so `"dim": "32"` is reported as the field `dim`, not as a
formatting error deep inside the model.
"""
from __future__ import annotations

import types
import typing

__all__ = ["field_type_error"]

_NAMES = {int: "an integer", float: "a number", str: "a string", bool: "true or false", type(None): "null"}


def _matches(v, t) -> bool:
    origin, args = typing.get_origin(t), typing.get_args(t)
    if origin in (typing.Union, types.UnionType):
        return any(_matches(v, a) for a in args)
    if origin is tuple:
        return (isinstance(v, (list, tuple)) and len(v) == len(args)
                and all(_matches(x, a) for x, a in zip(v, args)))
    if t is bool:
        return isinstance(v, bool)
    if t is int:
        return isinstance(v, int) and not isinstance(v, bool)
    if t is float:
        return isinstance(v, (int, float)) and not isinstance(v, bool)
    if t in (str, type(None)):
        return isinstance(v, t)
    return True  # a type this check does not know: left to the consumer


def _describe(t) -> str:
    origin, args = typing.get_origin(t), typing.get_args(t)
    if origin in (typing.Union, types.UnionType):
        return " or ".join(_describe(a) for a in args)
    if origin is tuple:
        return f"a list of {len(args)} {'numbers' if all(a is float for a in args) else 'values'}"
    return _NAMES.get(t, getattr(t, "__name__", str(t)))


def _json_kind(v) -> str:
    for t in (bool, int, float, str, type(None)):
        if isinstance(v, t):
            return _NAMES[t]
    return {list: "a list", tuple: "a list", dict: "an object"}.get(type(v), type(v).__name__)


def field_type_error(cls, values: dict) -> str | None:
    """'FIELD is VALUE (KIND) but must be TYPE' for the first field of dataclass `cls` in `values` whose value
    has the wrong type, else None (unknown keys are not this function's concern)."""
    hints = typing.get_type_hints(cls)
    for k, v in values.items():
        t = hints.get(k)
        if t is not None and not _matches(v, t):
            return f"{k} is {v!r} ({_json_kind(v)}) but must be {_describe(t)}"
    return None
