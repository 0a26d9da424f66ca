"""Hugging Face models with TaperNorm: the save/load contract (docs/CONTRACTS.md, "Hugging Face directories").

    tapernorm.save_pretrained(model, DIR, tokenizer_from=SRC)   a tapered HF model -> DIR
    tapernorm.from_pretrained(DIR)                             any of the three kinds below -> HF model, eval mode

Directory kinds (`dir_kind`):
    "tapered"  written by save_pretrained here: the model's own config.json (+ a "tapernorm_hf" section naming
               every TaperNorm layer, its kind and eps, the mode and the gate), generation_config.json, and
               tapernorm.safetensors: the state dict under the model's own module names (TaperNorm's gamma,
               gamma_t, c and gate buffers included; tied weights once). No model.safetensors on purpose.
    "run"      a `tapernorm train` model/ or checkpoint/ directory (our DecoderLM); loaded as the equivalent
               HF LlamaForCausalLM / GPT2LMHeadModel with the same TaperNorm state (hf_convert.py).
    "hf-tapered"  a tapered model saved with transformers' own model.save_pretrained (TaperNorm tensors inside
               model.safetensors): transformers loads the rest, the TaperNorms are restored from their tensors.
               Plain transformers refuses it: taperize / from_pretrained put the load guard into the live config
               (hf_config.guard_hf_config), so the config.json transformers writes names tapernorm.from_pretrained.
    "hf"       anything else: a plain HF directory or a hub name, loaded by AutoModelForCausalLM.

Plain transformers never loads a "tapered" directory silently wrong: it finds no model.safetensors and raises
(AutoConfig and AutoTokenizer still work on the directory). Run dirs carry hf_config.py's guard instead.
transformers is imported only inside the functions.
"""
from __future__ import annotations

import json
import math
import os
import shutil
from pathlib import Path

import torch
import torch.nn as nn

from .checkpoint import CheckpointError, read_json, shape_matches
from .fileio import ensure_space, save_safetensors, staged_dir, tensor_bytes
from .hf_config import (GUARD, HF_SECTION, TOKENIZER_CONFIG, guard_hf_config, is_guarded, sp_tokenizer_info,
                        unguard_dict)
from .layers import TaperLayerNorm, TaperNorm, find_final_norm, get_gate, taper_layers

__all__ = ["save_pretrained", "from_pretrained", "dir_kind", "taper_spec", "TOKENIZER_FILES", "GUARD"]

# what a saved (tapered or fine-tuned) directory copies from its source; chat_template.jinja is where transformers 5
# keeps an instruct model's chat template (without it, `tapernorm chat` on the compiled model has none)
TOKENIZER_FILES = ("tokenizer.model", "tokenizer.json", TOKENIZER_CONFIG, "special_tokens_map.json",
                   "vocab.json", "merges.txt", "added_tokens.json", "chat_template.jinja")
_FORMAT = 1
WEIGHTS = "tapernorm.safetensors"  # the state dict under the model's own module names


def _read_json(path: Path) -> dict:
    obj = read_json(path, "the file is corrupt, re-save the model")
    if not isinstance(obj, dict):
        raise CheckpointError(f"{path}: must hold a JSON object; re-save the model")
    return obj


def dir_kind(path: str | os.PathLike) -> str:
    """'tapered' (save_pretrained here), 'run' (a tapernorm train dir), 'hf-tapered' (a tapered model saved with
    transformers' own save_pretrained: TaperNorm tensors in model.safetensors) or 'hf' (plain HF dir / hub name)."""
    cfg = Path(path) / "config.json"
    if not cfg.is_file():
        return "hf"
    raw = _read_json(cfg)
    if isinstance(raw.get(HF_SECTION), dict):
        return "tapered"
    if isinstance(raw.get("tapernorm"), dict):
        return "run"
    return "hf-tapered" if _hf_saved_taper_layers(Path(path)) else "hf"


def _hf_saved_taper_layers(d: Path) -> list[str]:
    """Module paths that have TaperNorm tensors (`.gate_value`) in transformers' model.safetensors[.index.json]."""
    index = d / "model.safetensors.index.json"
    if index.is_file():
        keys = list(_read_json(index).get("weight_map", {}))
    elif (d / "model.safetensors").is_file():
        from safetensors import SafetensorError, safe_open
        try:
            with safe_open(str(d / "model.safetensors"), "pt") as f:
                keys = list(f.keys())
        except (SafetensorError, OSError):
            return []
    else:
        return []
    return [k[: -len(".gate_value")] for k in keys if k.endswith(".gate_value")]


def _load_hf_saved(d: Path, dtype=None, **hf_kwargs) -> nn.Module:
    """A tapered model that transformers' own save_pretrained wrote: transformers loads the rest (its key renames
    included), then each TaperNorm is put back at its path and gets its own tensors from the file."""
    from safetensors import safe_open
    from transformers import AutoModelForCausalLM
    import transformers
    from .hf_check import check_loading_info, check_meta_shapes, header_shapes, weight_files
    names = _hf_saved_taper_layers(d)
    raw = _read_json(d / "config.json")
    config = _plain_config(raw, {})  # the guard that transformers' own save wrote is lifted here
    shapes = header_shapes(weight_files(d))  # truncated files refused before transformers reads them
    check_meta_shapes(lambda: AutoModelForCausalLM.from_config(config), shapes, str(d), strict_keys=False)
    verbosity = transformers.logging.get_verbosity()
    transformers.logging.set_verbosity_error()  # the TaperNorm tensors are "unexpected" to it: we load them below
    try:
        model, info = AutoModelForCausalLM.from_pretrained(
            str(d), config=config, **({"dtype": dtype} if dtype else {}), use_safetensors=True,
            output_loading_info=True, **hf_kwargs)
    finally:
        transformers.logging.set_verbosity(verbosity)
    check_loading_info(info, str(d), allowed_unexpected=lambda k: any(k.startswith(n + ".") for n in names))
    files = ([d / f for f in sorted(set(_read_json(d / "model.safetensors.index.json")["weight_map"].values()))]
             if (d / "model.safetensors.index.json").is_file() else [d / "model.safetensors"])
    tensors = {}
    for f in files:
        with safe_open(str(f), "pt") as fh:
            tensors.update({k: fh.get_tensor(k) for k in fh.keys() if any(k.startswith(n + ".") for n in names)})
    layout = {}
    for n in names:
        old = model.get_submodule(n)
        eps = next((float(getattr(old, a)) for a in ("eps", "variance_epsilon", "epsilon")
                    if getattr(old, a, None) is not None), 1e-6)
        layout[n] = {"kind": "ln" if f"{n}.bias_t" in tensors else "rms", "eps": eps, "dim": old.weight.numel()}
    apply_taper_layout(model, layout, str(d / "config.json"))
    for n in names:
        sub = {k[len(n) + 1:]: v for k, v in tensors.items() if k.startswith(n + ".")}
        load_state_checked(model.get_submodule(n), sub, f"{d}: {n}")
    from .pos0 import track_if_needed
    track_if_needed(model)  # c0 layers learn which rows are position 0
    _check_gates(model, {}, str(d))
    return model.eval()


def taper_spec(model: nn.Module) -> dict:
    """The "tapernorm_hf" config section: every TaperNorm layer (kind, eps, dim), the mode and the gate."""
    layers = taper_layers(model)
    if not layers:
        raise CheckpointError("the model has no TaperNorm layers; save it with its own save_pretrained, "
                              "or taperize() it first")
    final = find_final_norm(model)
    names = {n for n, _ in layers}
    mode = "all" if final in names else "internal"
    return {"format": _FORMAT, "mode": mode, "gate": get_gate(model), "final_norm": final,
            "layers": {n: {"kind": "ln" if isinstance(m, TaperLayerNorm) else "rms", "eps": m.eps, "dim": m.dim}
                       for n, m in layers}}


def _copy_tokenizer(src: Path, dst: Path, max_len: int | None) -> list[str]:
    """Copy the tokenizer files of `src` into `dst`; a bare tokenizer.model gets a tokenizer_config.json."""
    copied = []
    for name in TOKENIZER_FILES:
        if (src / name).is_file():
            shutil.copyfile(src / name, dst / name)
            copied.append(name)
    if "tokenizer.model" in copied and TOKENIZER_CONFIG not in copied:
        _, cfg = sp_tokenizer_info(dst / "tokenizer.model", max_len)
        (dst / TOKENIZER_CONFIG).write_text(json.dumps(cfg, indent=2) + "\n")
        copied.append(TOKENIZER_CONFIG)
    return copied


def save_pretrained(model: nn.Module, out_dir: str | os.PathLike, tokenizer_from: str | os.PathLike | None = None,
                    extra: dict | None = None) -> Path:
    """Save a tapered HF causal LM to `out_dir` atomically: its config.json (+ the "tapernorm_hf" section),
    generation_config.json, tapernorm.safetensors (the state dict, tied weights once) and the tokenizer files of
    `tokenizer_from`. `extra` is stored in the section (e.g. the fine-tuning schedule). Refuses non-finite
    weights. Reload with `from_pretrained(out_dir)`."""
    spec = taper_spec(model)
    if extra:
        spec["extra"] = extra
    out = Path(out_dir)
    cfg = model.config
    state, seen = {}, set()
    for k, v in model.state_dict().items():  # our module names exactly; tied weights stored once
        key = (v.data_ptr(), tuple(v.shape), v.dtype)
        if v.numel() and key in seen:
            continue
        seen.add(key)
        state[k] = v.detach().cpu().contiguous()
        if state[k].is_floating_point() and not torch.isfinite(state[k]).all():
            raise CheckpointError(f"refusing to write {out}: weight {k!r} contains NaN or inf (training diverged)")
    ensure_space(out, tensor_bytes(state), f"{out} was left as it was")  # the exact need, before staging
    with staged_dir(out) as tmp:
        model.config.save_pretrained(str(tmp))
        gen = getattr(model, "generation_config", None)
        if gen is not None:
            gen.save_pretrained(str(tmp))
        # not model.safetensors: plain transformers then finds no weights and raises, never loads them wrong
        save_safetensors(state, tmp / WEIGHTS, metadata={"format": "pt", "tapernorm_hf": str(_FORMAT)})
        raw = unguard_dict(_read_json(tmp / "config.json"))  # the real activation: our section marks this dir
        raw[HF_SECTION] = spec
        (tmp / "config.json").write_text(json.dumps(raw, indent=2, sort_keys=True) + "\n")
        if tokenizer_from is not None:
            src = Path(tokenizer_from)
            if not src.is_dir():
                raise FileNotFoundError(f"tokenizer directory {src} does not exist; pass the model's source directory")
            max_len = getattr(cfg, "max_position_embeddings", None) or getattr(cfg, "n_positions", None)
            _copy_tokenizer(src, tmp, max_len)
    return out


def _plain_config(raw: dict, spec: dict):
    """The transformers config of a tapered directory (its config.json without our section)."""
    from transformers import AutoConfig
    d = {k: v for k, v in unguard_dict(raw).items() if k != HF_SECTION}
    model_type = d.pop("model_type", None)
    if not model_type:
        raise CheckpointError("config.json has no model_type; it was not written by tapernorm.save_pretrained")
    for k in ("transformers_version", "architectures"):
        d.pop(k, None)
    return AutoConfig.for_model(model_type, **d)


def _set_module(model: nn.Module, name: str, new: nn.Module) -> None:
    parent, _, child = name.rpartition(".")
    setattr(model.get_submodule(parent) if parent else model, child, new)


def apply_taper_layout(model: nn.Module, layers: dict, where: str) -> None:
    """Replace the norm at each recorded path by an empty TaperNorm / TaperLayerNorm of the recorded kind/eps/dim."""
    for name, row in layers.items():
        try:
            old = model.get_submodule(name)
        except AttributeError:
            raise CheckpointError(f"{where}: TaperNorm layer {name!r} is not a module of "
                                  f"{type(model).__name__}; the config does not match the model") from None
        kind, dim, eps = row.get("kind"), int(row["dim"]), float(row["eps"])
        if kind not in ("rms", "ln"):
            raise CheckpointError(f"{where}: layer {name!r} has kind {kind!r}, expected 'rms' or 'ln'")
        new = (TaperNorm if kind == "rms" else TaperLayerNorm)(dim, eps=eps)
        w = getattr(old, "weight", None)
        if isinstance(w, torch.Tensor):
            for p in new.parameters():
                p.data = p.data.to(w.dtype)
        _set_module(model, name, new)
    if layers:
        guard_hf_config(getattr(model, "config", None))
        from .replace_norms import set_token_dims
        set_token_dims(model)  # not saved: the family says which norms see (B, H, T, d) (old directories too)


def _weight_files(d: Path) -> list[Path]:
    return [d / WEIGHTS]


def _load_tensors(d: Path) -> dict[str, torch.Tensor]:
    from safetensors import SafetensorError
    from safetensors.torch import load_file
    out = {}
    for f in _weight_files(d):
        if not f.is_file():
            raise CheckpointError(f"{f}: missing; a tapered directory needs its safetensors weights")
        try:
            out.update(load_file(str(f)))
        except (SafetensorError, OSError, ValueError, RuntimeError) as e:
            raise CheckpointError(f"{f}: corrupt or truncated safetensors file ({e}); re-save the model") from None
    return out


def load_state_checked(model: nn.Module, tensors: dict, where: str) -> None:
    """load_state_dict that allows only tied aliases to be absent; one-line errors naming the key."""
    state = model.state_dict(keep_vars=True)
    present = {(v.data_ptr(), tuple(v.shape)) for k, v in state.items() if k in tensors}
    missing = [k for k, v in state.items() if k not in tensors and (v.data_ptr(), tuple(v.shape)) not in present]
    unexpected = [k for k in tensors if k not in state]
    if missing or unexpected:
        what = (f"missing {missing[:3]}" if missing else "") + (" and " if missing and unexpected else "") + \
               (f"unexpected {unexpected[:3]}" if unexpected else "")
        raise CheckpointError(f"{where}: weights do not match the model its config describes ({what})")
    for k, v in tensors.items():
        if not shape_matches(k, tuple(v.shape), state):
            raise CheckpointError(f"{where}: key {k!r} has shape {tuple(v.shape)}, the model expects "
                                  f"{tuple(state[k].shape)}")
        if v.is_floating_point() and not torch.isfinite(v).all():
            raise CheckpointError(f"{where}: key {k!r} contains NaN or inf; the checkpoint is unusable")
    model.load_state_dict(tensors, strict=False)  # the post-hook restores gate / calibrated flags


def _check_gates(model: nn.Module, spec: dict, where: str) -> None:
    for name, m in taper_layers(model):
        if m.gate < 1.0 and not m.calibrated:
            raise CheckpointError(f"{where}: {name} holds gate {m.gate} < 1 but c was never calibrated")
    gate, want = get_gate(model), spec.get("gate")
    if want is not None and gate is not None and not math.isclose(float(want), gate, abs_tol=1e-6):
        raise CheckpointError(f"{where}: tapernorm_hf.gate {want} disagrees with the weights' gate buffers ({gate})")


def _load_tapered(d: Path, dtype=None) -> nn.Module:
    from transformers import AutoModelForCausalLM
    raw = _read_json(d / "config.json")
    spec = raw[HF_SECTION]
    if int(spec.get("format", 0)) != _FORMAT or not isinstance(spec.get("layers"), dict):
        raise CheckpointError(f"{d / 'config.json'}: tapernorm_hf format {spec.get('format')!r} is not {_FORMAT}; "
                              "upgrade tapernorm or re-save the model")
    config = _plain_config(raw, spec)
    from .hf_check import check_meta_shapes
    tensors = _load_tensors(d)
    check_meta_shapes(lambda: AutoModelForCausalLM.from_config(config), {k: tuple(v.shape) for k, v in tensors.items()},
                      str(d), strict_keys=False)  # before allocating what the config describes
    wdtype = next((v.dtype for k, v in tensors.items() if v.is_floating_point() and k.endswith("weight")),
                  torch.float32)
    model = AutoModelForCausalLM.from_config(config, dtype=wdtype)
    apply_taper_layout(model, spec["layers"], str(d / "config.json"))
    load_state_checked(model, tensors, str(d))
    from .pos0 import track_if_needed
    track_if_needed(model)  # c0 layers learn which rows are position 0
    _check_gates(model, spec, str(d / "config.json"))
    if dtype is not None:
        model = model.to(dtype)
    return model.eval()


def from_pretrained(name_or_dir: str | os.PathLike, dtype: torch.dtype | None = None, **hf_kwargs) -> nn.Module:
    """Load a tapered HF directory, a tapernorm run dir, or a plain HF directory / hub name as an HF causal LM
    with its TaperNorm state restored exactly; eval mode. `hf_kwargs` go to transformers for plain models."""
    p = Path(name_or_dir)
    if not p.is_dir():
        from .hf_check import looks_like_path
        if p.exists():
            raise NotADirectoryError(f"{p} is a file; pass a Hugging Face model directory or a hub name")
        if looks_like_path(name_or_dir) or p.parent.is_dir() and str(p.parent) not in ("", "."):
            raise FileNotFoundError(f"no such directory: {os.fspath(name_or_dir)}; pass an existing Hugging Face model directory "
                                    "(or a hub name such as org/model)")
    kind = dir_kind(p) if p.is_dir() else "hf"
    if kind == "tapered":
        return _load_tapered(p, dtype)
    if kind == "hf-tapered":
        return _load_hf_saved(p, dtype, **hf_kwargs)
    if kind == "run":
        from .hf_convert import run_dir_to_hf
        model = run_dir_to_hf(p)
        return (model.to(dtype) if dtype is not None else model).eval()
    from transformers import AutoModelForCausalLM
    if p.is_dir() and (p / "config.json").is_file() and is_guarded(_read_json(p / "config.json")):
        raise CheckpointError(f"{p}/config.json carries the tapernorm load guard but no tapernorm section; "
                              "the file was edited by hand, re-save the model")
    kw = dict(hf_kwargs)
    if dtype is not None:
        kw["dtype"] = dtype
    if not p.is_dir():  # a hub name: transformers fetches it; never a pickle
        try:
            return AutoModelForCausalLM.from_pretrained(str(name_or_dir), use_safetensors=True, **kw).eval()
        except OSError as e:
            first = (str(e).strip().splitlines() or [type(e).__name__])[0][:300]
            raise CheckpointError(f"{name_or_dir}: no such local directory, and transformers could not load it as a "
                                  f"hub model ({first}); pass a model directory, or a hub name with network access "
                                  "and safetensors weights") from None
    return _load_plain_dir(p, kw)


def _load_plain_dir(p: Path, kw: dict) -> nn.Module:
    """A plain HF directory through transformers, after hf_check's checks (no pickle, no truncated file, config
    fields and shapes agree with the weights); a key left random, unexpected or resized is refused."""
    import transformers
    from transformers import AutoModelForCausalLM
    from .hf_check import check_loading_info, check_plain_hf_dir
    raw = _read_json(p / "config.json") if (p / "config.json").is_file() else {}
    if not raw:
        raise CheckpointError(f"{p}: no config.json; pass a Hugging Face model directory")
    check_plain_hf_dir(p, raw)
    verbosity = transformers.logging.get_verbosity()
    transformers.logging.set_verbosity_error()  # its "MISSING" table is replaced by check_loading_info's line
    try:
        model, info = AutoModelForCausalLM.from_pretrained(str(p), use_safetensors=True, output_loading_info=True,
                                                           **kw)
    finally:
        transformers.logging.set_verbosity(verbosity)
    check_loading_info(info, str(p))
    return model.eval()
