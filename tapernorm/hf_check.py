"""A Hugging Face directory's config checked against its checkpoint before anything is allocated or loaded.

    check_plain_hf_dir(DIR)     (plain "hf" kind, before transformers loads it)
        * weights: model.safetensors (or its index and shards); a directory with only a pickle checkpoint
          (pytorch_model.bin, ...) is refused (tapernorm never unpickles: convert it to safetensors first);
        * every safetensors file's header is read (no tensor data) and its length checked against the file:
          a truncated download is one line naming the file, not a traceback from deep inside a loader;
        * every size field the architecture needs is in config.json (a config without num_hidden_layers would
          otherwise become transformers' default of 32 layers, 30 of them randomly initialised);
        * the model the config describes is built on the meta device (no memory) and its tensor shapes are
          compared with the header's: a config claiming width 100000 for width-32 weights is refused before
          40 GB are allocated; keys the model has and the file lacks are refused too.
    check_loading_info(info, where)   after transformers' from_pretrained(output_loading_info=True): a missing
        (randomly initialised), unexpected or mismatched key is one line naming it.
    check_meta_shapes(model_fn, shapes, where)   the meta-device comparison on its own (tapered dirs).
"""
from __future__ import annotations

import os
import re
from pathlib import Path

import torch

from .checkpoint import CheckpointError, read_json, read_safetensors_header

__all__ = ["check_plain_hf_dir", "check_loading_info", "check_meta_shapes", "weight_files", "PICKLE_FILES",
           "missing_size_fields"]

PICKLE_FILES = ("pytorch_model.bin", "pytorch_model.bin.index.json", "model.pt", "model.pth", "pytorch_model.pt")
# the size fields whose silent default changes the model (std names; a config class may alias them)
SIZE_FIELDS = ("vocab_size", "hidden_size", "num_hidden_layers", "num_attention_heads", "intermediate_size",
               "max_position_embeddings")
_LAYER = re.compile(r"(?:^|\.)(?:layers|h|layer|blocks|decoder\.layers)\.(\d+)\.")


def weight_files(d: Path) -> list[Path]:
    """The safetensors files of an HF directory (the shards of model.safetensors.index.json, or
    model.safetensors); a pickle-only or weightless directory is a one-line CheckpointError."""
    index = d / "model.safetensors.index.json"
    if index.is_file():
        idx = read_json(index, "the index is corrupt; re-download or re-save the model")
        shards = sorted(set((idx.get("weight_map") or {}).values())) if isinstance(idx, dict) else []
        if not shards:
            raise CheckpointError(f"{index}: no weight_map; re-download or re-save the model")
        missing = [s for s in shards if not (d / s).is_file()]
        if missing:
            raise CheckpointError(f"{d / missing[0]}: missing ({len(missing)} of {len(shards)} shards named by "
                                  f"{index.name}); re-download the model")
        return [d / s for s in shards]
    if (d / "model.safetensors").is_file():
        return [d / "model.safetensors"]
    pickles = [n for n in PICKLE_FILES if (d / n).is_file()] + sorted(p.name for p in d.glob("pytorch_model-*.bin"))
    if pickles:
        raise CheckpointError(
            f"{d} has only a pickle checkpoint ({pickles[0]}); tapernorm does not unpickle checkpoints (loading one "
            "can run arbitrary code): convert it to safetensors first, e.g. in a trusted environment "
            "`AutoModelForCausalLM.from_pretrained(DIR).save_pretrained(DIR)` writes model.safetensors")
    raise CheckpointError(f"{d} has no model.safetensors (nor model.safetensors.index.json); "
                          "pass a Hugging Face model directory with its safetensors weights")


def header_shapes(files: list[Path]) -> dict[str, tuple[int, ...]]:
    """{tensor name: shape} from the safetensors headers (each file checked for truncation)."""
    shapes: dict[str, tuple[int, ...]] = {}
    for f in files:
        shapes.update({k: tuple(v["shape"]) for k, v in read_safetensors_header(f).items()})
    return shapes


def _layers_in(shapes: dict) -> int | None:
    idx = [int(m.group(1)) for k in shapes for m in [_LAYER.search(k)] if m]
    return max(idx) + 1 if idx else None


def missing_size_fields(raw: dict) -> list[str]:
    """Size fields the config class of raw["model_type"] would fill with a default because config.json lacks
    them (in any of their spellings); [] when the model type is unknown to transformers."""
    from transformers import CONFIG_MAPPING
    mt = raw.get("model_type")
    if not isinstance(mt, str) or mt not in CONFIG_MAPPING or isinstance(raw.get("text_config"), dict):
        return []
    cls = CONFIG_MAPPING[mt]
    amap = dict(getattr(cls, "attribute_map", {}) or {})
    try:
        default = cls()
    except Exception:  # a config class that cannot be built empty: nothing to compare with
        return []
    out = []
    for f in SIZE_FIELDS:
        real = amap.get(f, f)
        names = {f, real} | {k for k, v in amap.items() if v == real}
        if any(n in raw for n in names):
            continue
        if getattr(default, real, None) is not None and real in default.to_dict():
            out.append(real)
    return out


def check_meta_shapes(build, shapes: dict[str, tuple[int, ...]], where: str, strict_keys: bool = True) -> None:
    """Build the model with `build()` on the meta device (no memory) and compare its tensor shapes with the
    checkpoint's `shapes`. Shapes of shared keys must agree; with `strict_keys`, when every checkpoint key is a
    model key (no renaming loader in between), a model key the checkpoint lacks (tied aliases aside) is refused."""
    try:
        with torch.device("meta"):
            model = build()
    except Exception:  # an architecture whose init cannot run on the meta device: transformers' own load decides
        return
    state = model.state_dict(keep_vars=True)
    for k, v in state.items():
        if k in shapes and tuple(v.shape) != shapes[k]:
            raise CheckpointError(f"{where}: tensor {k!r} has shape {shapes[k]} in the checkpoint but the config "
                                  f"describes {tuple(v.shape)}; the config does not match the weights (nothing "
                                  "was allocated)")
    if not strict_keys or any(k not in state for k in shapes):
        return
    groups: dict[int, list[str]] = {}
    for k, v in state.items():
        groups.setdefault(id(v), []).append(k)
    missing = [k for k, v in state.items() if not any(a in shapes for a in groups[id(v)])]
    if missing:
        extra = f" (and {len(missing) - 1} more)" if len(missing) > 1 else ""
        raise CheckpointError(f"{where}: the checkpoint has no tensor {missing[0]!r}{extra} that the model its config "
                              "describes needs (it would be randomly initialised); the config does not match the "
                              "weights")


def check_plain_hf_dir(d: Path, raw: dict) -> dict[str, tuple[int, ...]]:
    """All pre-load checks of a plain HF directory (see the module docstring); returns the header shapes."""
    files = weight_files(d)
    shapes = header_shapes(files)
    cfg_path = d / "config.json"
    missing = missing_size_fields(raw)
    if missing:
        from transformers import CONFIG_MAPPING
        default = getattr(CONFIG_MAPPING[raw["model_type"]](), missing[0])
        layers = _layers_in(shapes)
        hint = f" (the weights have {layers} layers)" if layers and "layer" in missing[0] else ""
        raise CheckpointError(f"{cfg_path}: no {missing[0]!r}{hint}; transformers would use its default "
                              f"{default} and build a model that does not match the checkpoint: add the field "
                              f"to config.json")
    from transformers import AutoConfig, AutoModelForCausalLM
    try:
        config = AutoConfig.from_pretrained(str(d))
    except (OSError, ValueError, KeyError, TypeError) as e:
        first = (str(e).strip().splitlines() or [type(e).__name__])[0][:300]
        raise CheckpointError(f"{cfg_path}: transformers cannot read this config ({first})") from None
    check_meta_shapes(lambda: AutoModelForCausalLM.from_config(config), shapes, str(d))
    return shapes


def check_loading_info(info: dict, where: str, allowed_unexpected=lambda k: False) -> None:
    """One line for any key transformers left randomly initialised (missing), ignored (unexpected) or resized."""
    missing = sorted(info.get("missing_keys") or ())
    unexpected = sorted(k for k in (info.get("unexpected_keys") or ()) if not allowed_unexpected(k))
    mismatched = sorted(info.get("mismatched_keys") or (), key=str)
    if missing:
        raise CheckpointError(f"{where}: the checkpoint has no tensor {missing[0]!r}"
                              f"{f' (and {len(missing) - 1} more)' if len(missing) > 1 else ''}; transformers would "
                              "initialise it randomly: the config does not match the weights")
    if unexpected:
        raise CheckpointError(f"{where}: the checkpoint's tensor {unexpected[0]!r}"
                              f"{f' (and {len(unexpected) - 1} more)' if len(unexpected) > 1 else ''} has no place in "
                              "the model its config describes; the config does not match the weights")
    if mismatched:
        raise CheckpointError(f"{where}: tensor shapes do not match the config ({str(mismatched[0])[:200]})")
    errors = info.get("error_msgs") or []
    if errors:
        raise CheckpointError(f"{where}: loading failed ({str(errors[0]).splitlines()[0][:300]})")


def looks_like_path(name: str | os.PathLike) -> bool:
    """A string meant as a local path rather than a hub repo id ("org/name")."""
    s = os.fspath(name)
    return (s.startswith((".", "/", "~")) or s.endswith(("/", os.sep)) or s.count("/") > 1 or "\\" in s
            or os.sep in s and os.sep != "/")
