"""Checkpoints in the Hugging Face layout, written atomically and validated on load.

    DIR/config.json          {"model_type", "architectures", "tapernorm": ModelConfig dict,
                              "taper": {"mode", "gate"}, "torch_dtype", ...extra}
    DIR/model.safetensors    state dict; tied weights (lm_head = embed_tokens) stored once
    DIR/tokenizer.model      SentencePiece model (optional)
    DIR/trainer_state.json   step, optimizer hyperparameters, EMA state, config (optional, for resume)
    DIR/trainer_state.safetensors   optimizer moments and RNG states (optional, for resume)

Everything is written into a temporary sibling directory which then replaces DIR atomically
(tapernorm.fileio), so a crash never leaves a half-written checkpoint, and weights with NaN or inf are
never written. A checkpoint with trainer state carries one random `checkpoint_id` in both config.json
and trainer_state.json; `load_resume` refuses a pair that does not match (files from two different saves).
Nothing is unpickled: tensors are safetensors, the rest is JSON.
"""
from __future__ import annotations

import json
import math
import os
import secrets
import shutil
import struct
from pathlib import Path

import torch
import torch.nn as nn

from .model import ConfigError, DecoderLM, ModelConfig
from .fileio import ensure_space, save_safetensors, staged_dir, tensor_bytes
from .layers import get_gate, taper_layers
from .hf_config import TOKENIZER_CONFIG, run_dir_hf_fields, sp_tokenizer_info
from .typecheck import field_type_error
from .tokenizer_json import write_tokenizer_json

__all__ = ["CheckpointError", "save_checkpoint", "load_checkpoint", "load_trainer_state", "load_resume", "read_config",
           "read_json", "shape_matches", "read_safetensors_header", "read_safetensors_layout"]

CONFIG, WEIGHTS, TOKENIZER = "config.json", "model.safetensors", "tokenizer.model"
STATE_JSON, STATE_TENSORS = "trainer_state.json", "trainer_state.safetensors"
_RESERVED = {"model_type", "architectures", "tapernorm", "taper", "torch_dtype", "checkpoint_id"}


class CheckpointError(ValueError):
    """A checkpoint is missing, corrupt, or does not match its config."""


def _tied_aliases(model: nn.Module) -> dict[str, str]:
    """{alias key: canonical key} for state-dict entries sharing storage with an earlier entry."""
    seen, alias = {}, {}
    for k, v in model.state_dict(keep_vars=True).items():
        key = (v.data_ptr(), tuple(v.shape), v.dtype)
        if v.numel() and key in seen:
            alias[k] = seen[key]
        else:
            seen[key] = k
    return alias


def _write_json(path: Path, obj: dict) -> None:
    path.write_text(json.dumps(obj, indent=2, sort_keys=False, allow_nan=False) + "\n")


def save_checkpoint(model: DecoderLM, out_dir: str | os.PathLike, tokenizer_path: str | os.PathLike | None = None,
                    extra: dict | None = None, trainer_state: dict | None = None) -> Path:
    """Write config.json + model.safetensors (+ tokenizer.model, + trainer state) into out_dir atomically.

    `extra` keys are merged into config.json. `trainer_state` = {"json": dict, "tensors": {name: Tensor}}.
    """
    out = Path(out_dir)
    cfg: ModelConfig = model.config
    if extra and _RESERVED & set(extra):
        raise ValueError(f"extra config keys {sorted(_RESERVED & set(extra))} are reserved; rename them")
    if tokenizer_path is not None and not Path(tokenizer_path).is_file():
        raise FileNotFoundError(f"tokenizer file {tokenizer_path} does not exist; pass the run's tokenizer.model")
    alias = _tied_aliases(model)
    state = {k: v.detach().cpu().contiguous() for k, v in model.state_dict().items() if k not in alias}
    bad = next((k for k, v in state.items() if v.is_floating_point() and not torch.isfinite(v).all()), None)
    if bad is not None:
        raise CheckpointError(f"refusing to write {out}: weight {bad!r} contains NaN or inf (training diverged); "
                              "the previous checkpoint there is kept")
    dtype = str(next(model.parameters()).dtype).replace("torch.", "")
    config = {
        "model_type": f"tapernorm_{cfg.arch}",
        "architectures": ["DecoderLM"],
        "tapernorm": cfg.to_dict(),
        "taper": {"mode": cfg.taper_mode, "gate": get_gate(model)},
        "torch_dtype": dtype,
        "tie_word_embeddings": bool(alias),
        **(extra or {}),
    }
    # HF fields (architecture, BOS/EOS, the load guard when plain transformers would load it wrong): hf_config.py
    tok_ids, tok_cfg = (sp_tokenizer_info(tokenizer_path, cfg.max_seq_len) if tokenizer_path is not None
                        else ((None, None), None))
    config = {**run_dir_hf_fields(cfg.to_dict(), *tok_ids), **config}
    ckpt_id = secrets.token_hex(8) if trainer_state is not None else None
    if ckpt_id:
        config["checkpoint_id"] = ckpt_id
    need = tensor_bytes(state) + tensor_bytes(trainer_state.get("tensors", {}) if trainer_state else {}) + (
        3 * Path(tokenizer_path).stat().st_size if tokenizer_path is not None else 0)  # the copy + tokenizer.json
    ensure_space(out, need, f"{out} was left as it was")  # before staging: the exact need, not a half-written file
    with staged_dir(out) as tmp:
        _write_json(tmp / CONFIG, config)
        save_safetensors(state, tmp / WEIGHTS, metadata={"format": "pt", "tied": json.dumps(alias)})
        if tokenizer_path is not None:
            shutil.copyfile(tokenizer_path, tmp / TOKENIZER)
            _write_json(tmp / TOKENIZER_CONFIG, tok_cfg)
            write_tokenizer_json(tmp, tok_cfg)  # for tokenizers-only readers (genai); needs transformers
        if trainer_state is not None:
            _write_json(tmp / STATE_JSON, {**trainer_state.get("json", {}), "checkpoint_id": ckpt_id})
            tensors = {k: v.detach().cpu().contiguous() for k, v in trainer_state.get("tensors", {}).items()}
            save_safetensors(tensors, tmp / STATE_TENSORS)
    return out


def read_json(path: Path, fix: str):
    """Parse a JSON file; an unreadable one is a one-line CheckpointError ending with `fix`."""
    try:
        return json.loads(Path(path).read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise CheckpointError(f"{path}: not valid JSON ({e}); {fix}") from None


def read_config(ckpt_dir: str | os.PathLike) -> dict:
    """Parse and minimally validate DIR/config.json."""
    d = Path(ckpt_dir)
    if not d.is_dir():
        raise CheckpointError(f"checkpoint directory {d} does not exist; pass a directory written by `tapernorm train`")
    p = d / CONFIG
    if not p.is_file():
        raise CheckpointError(f"{p}: missing; a checkpoint needs config.json + model.safetensors")
    cfg = read_json(p, "the file is corrupt, re-save the checkpoint")
    if not isinstance(cfg, dict) or not isinstance(cfg.get("tapernorm"), dict):
        raise CheckpointError(f"{p}: no 'tapernorm' model-config section; not a tapernorm checkpoint "
                              "(pass the model/ or checkpoint/ directory of a `tapernorm train` run)")
    return cfg


_MAX_HEADER = 100 << 20  # bytes; safetensors itself refuses larger headers


def read_safetensors_header(path: str | os.PathLike) -> dict[str, dict]:
    """{tensor name: {"dtype", "shape", "data_offsets"}} of a safetensors file, reading only its header; a file
    shorter than its header says (an interrupted download or copy) is a one-line CheckpointError."""
    return read_safetensors_layout(path)[0]


def read_safetensors_layout(path: str | os.PathLike) -> tuple[dict[str, dict], int]:
    """(read_safetensors_header's dict, byte offset where the tensor data starts: data_offsets count from it)."""
    path = Path(path)
    bad = f"{path}: corrupt or truncated safetensors file"
    fix = "an interrupted download or copy? re-download or re-save it"
    try:
        size = path.stat().st_size
        with open(path, "rb") as f:
            head = f.read(8)
            n = struct.unpack("<Q", head)[0] if len(head) == 8 else None
            if n is None or n > min(size - 8, _MAX_HEADER):
                raise CheckpointError(f"{bad} ({size} bytes, too short for its header); {fix}")
            header = json.loads(f.read(n))
    except (json.JSONDecodeError, UnicodeDecodeError):
        raise CheckpointError(f"{bad} (its header is not valid JSON); {fix}") from None
    except FileNotFoundError:
        raise CheckpointError(f"{path}: missing; re-download or re-save the model") from None
    if not isinstance(header, dict):
        raise CheckpointError(f"{bad} (its header is not a JSON object); {fix}")
    header.pop("__metadata__", None)
    try:
        end = max((int(v["data_offsets"][1]) for v in header.values()), default=0)
        for v in header.values():
            v["shape"] = [int(x) for x in v["shape"]]
    except (KeyError, TypeError, ValueError, IndexError):
        raise CheckpointError(f"{bad} (a header entry has no shape / data_offsets); {fix}") from None
    if 8 + n + end > size:
        raise CheckpointError(f"{bad} (the file has {size} bytes, its header describes {8 + n + end}); {fix}")
    return header, 8 + n


def _check_shapes_before_allocating(cfg: ModelConfig, header: dict, wpath: Path, cfg_path: Path) -> None:
    """Compare the shapes of the model `cfg` describes (built on the meta device: no memory) with the file's."""
    with torch.device("meta"):
        meta = DecoderLM(cfg)
    sd = meta.state_dict()
    for k, v in sd.items():
        if k in header and not shape_matches(k, tuple(header[k]["shape"]), sd):
            raise CheckpointError(f"{wpath}: key {k!r} has shape {tuple(header[k]['shape'])} but {cfg_path} implies "
                                  f"{tuple(v.shape)}; the config does not match the weights (nothing was allocated)")


def shape_matches(key: str, shape: tuple, expected: dict) -> bool:
    """The file's shape is the model's; a TaperNorm's `bound` may also hold one B per feature (its weight's shape)."""
    want = tuple(expected[key].shape)
    if shape == want:
        return True
    sibling = expected.get(key[:-len("bound")] + "weight_t") if key.endswith(".bound") else None
    return sibling is not None and want == () and shape == tuple(sibling.shape)


def _open_safetensors(path: Path) -> dict[str, torch.Tensor]:
    from safetensors import SafetensorError
    from safetensors.torch import load_file
    if not path.is_file():
        raise CheckpointError(f"{path}: missing; a checkpoint needs config.json + model.safetensors")
    try:
        return load_file(str(path))
    except (SafetensorError, OSError, ValueError, RuntimeError) as e:
        raise CheckpointError(f"{path}: corrupt or truncated safetensors file ({e}); re-save the checkpoint") from None


def _validate(path: Path, tensors: dict, expected: dict, cfg_path: Path) -> None:
    """Precise key / shape / dtype / finiteness checks of file tensors against the model built from config."""
    missing = [k for k in expected if k not in tensors]
    unexpected = [k for k in tensors if k not in expected]
    if missing or unexpected:
        parts = []
        if missing:
            parts.append(f"missing key{'s' if len(missing) > 1 else ''} {missing[:3]}{' ...' if len(missing) > 3 else ''}")
        if unexpected:
            parts.append(f"unexpected key{'s' if len(unexpected) > 1 else ''} {unexpected[:3]}"
                         f"{' ...' if len(unexpected) > 3 else ''}")
        raise CheckpointError(f"{path}: {' and '.join(parts)} for the model described by {cfg_path}; "
                              "the config does not match the weights")
    for k, want in expected.items():
        got = tensors[k]
        if not shape_matches(k, tuple(got.shape), expected):
            raise CheckpointError(f"{path}: key {k!r} has shape {tuple(got.shape)} but {cfg_path} implies "
                                  f"{tuple(want.shape)}; the config does not match the weights")
        if got.dtype != want.dtype:
            raise CheckpointError(f"{path}: key {k!r} has dtype {got.dtype} but the model expects {want.dtype}")
        if got.is_floating_point() and not torch.isfinite(got).all():
            raise CheckpointError(f"{path}: key {k!r} contains NaN or inf; the checkpoint is unusable")


def load_checkpoint(ckpt_dir: str | os.PathLike, map_location: str | torch.device = "cpu") -> tuple[DecoderLM, dict]:
    """Load a checkpoint dir -> (DecoderLM in eval mode, info). Raises CheckpointError naming file and key."""
    d = Path(ckpt_dir)
    raw = read_config(d)
    cfg_path = d / CONFIG
    wrong = field_type_error(ModelConfig, raw["tapernorm"])
    if wrong:
        raise CheckpointError(f"{cfg_path}: tapernorm.{wrong}; fix that value or re-save the checkpoint")
    try:
        cfg = ModelConfig.from_dict(raw["tapernorm"])
    except (ConfigError, TypeError) as e:
        raise CheckpointError(f"{cfg_path}: invalid model config ({e})") from None
    taper = raw.get("taper", {})
    if taper.get("mode", cfg.taper_mode) != cfg.taper_mode:
        raise CheckpointError(f"{cfg_path}: taper.mode {taper.get('mode')!r} disagrees with tapernorm.taper_mode "
                              f"{cfg.taper_mode!r}")
    wpath = d / WEIGHTS
    if wpath.is_file():
        _check_shapes_before_allocating(cfg, read_safetensors_header(wpath), wpath, cfg_path)
    model = DecoderLM(cfg)
    dtype = getattr(torch, str(raw.get("torch_dtype", "float32")), None)
    if not isinstance(dtype, torch.dtype) or not dtype.is_floating_point:
        raise CheckpointError(f"{cfg_path}: torch_dtype {raw.get('torch_dtype')!r} is not a floating dtype")
    if dtype != torch.float32:
        for p in model.parameters():
            p.data = p.data.to(dtype)
    alias = _tied_aliases(model)
    expected = {k: v for k, v in model.state_dict().items() if k not in alias}
    tensors = _open_safetensors(wpath)
    _validate(wpath, tensors, expected, cfg_path)
    for k, canon in alias.items():
        tensors[k] = tensors[canon]
    model.load_state_dict(tensors, strict=True)  # post-hook restores gate / calibrated flags
    from .pos0 import track_if_needed
    track_if_needed(model)  # c0 layers learn which rows are position 0
    for name, m in taper_layers(model):
        if not 0.0 <= m.gate <= 1.0:
            raise CheckpointError(f"{wpath}: key {name + '.gate_value'!r} holds gate {m.gate}, outside [0, 1]")
        if m.gate < 1.0 and not m.calibrated:
            raise CheckpointError(f"{wpath}: key {name + '.gate_value'!r} holds gate {m.gate} < 1 but "
                                  f"{name + '.calibrated_flag'!r} says c was never calibrated")
    gate = get_gate(model)
    want_gate = taper.get("gate")
    if want_gate is not None and gate is not None and not math.isclose(float(want_gate), gate, abs_tol=1e-6):
        raise CheckpointError(f"{cfg_path}: taper.gate {want_gate} disagrees with the weights' gate buffers ({gate})")
    model.to(map_location).eval()
    tok = d / TOKENIZER
    info = {"dir": str(d), "config": cfg, "config_json": raw, "gate": gate,
            "tokenizer_path": str(tok) if tok.is_file() else None}
    return model, info


def load_trainer_state(ckpt_dir: str | os.PathLike) -> dict:
    """{"json": dict, "tensors": {name: Tensor}} saved by save_checkpoint(trainer_state=...)."""
    d = Path(ckpt_dir)
    jp, tp = d / STATE_JSON, d / STATE_TENSORS
    if not jp.is_file() or not tp.is_file():
        raise CheckpointError(f"{d}: no trainer state ({STATE_JSON} + {STATE_TENSORS}); it cannot be resumed")
    js = read_json(jp, "the trainer state is corrupt, so the run cannot be resumed: start over with --overwrite "
                       "or use a new --out")
    return {"json": js, "tensors": _open_safetensors(tp)}


def load_resume(ckpt_dir: str | os.PathLike, map_location: str | torch.device = "cpu") -> tuple[DecoderLM, dict, dict]:
    """(model, info, trainer state) of one resumable checkpoint; refuses weights and trainer state that come
    from two different saves (their `checkpoint_id`s differ)."""
    d = Path(ckpt_dir)
    state = load_trainer_state(d)
    model, info = load_checkpoint(d, map_location)
    a, b = state["json"].get("checkpoint_id"), info["config_json"].get("checkpoint_id")
    if a != b:
        raise CheckpointError(f"{d}: {STATE_JSON} (checkpoint {a}) and {CONFIG} (checkpoint {b}) come from different "
                              "saves; the run cannot be resumed consistently: start over with --overwrite or a new --out")
    return model, info, state
