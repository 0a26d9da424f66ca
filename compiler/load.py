"""Loading a checkpoint for compile without copying it: safetensors headers, memory-mapped tensors, a fit estimate.

    checkpoint_tensors(DIR)   every tensor's name, dtype, shape and file, read from the headers (no data)
    checkpoint_dtype(DIR)     the floating dtype most weight bytes are stored in ("bfloat16", "float32", ...)
    mmap_safetensors(FILE)    {name: tensor} viewing one private (copy-on-write) memory map of the file: no copy,
                              the checkpoint's own dtype; pages are read from disk as the tensors are touched
    estimate_compile_bytes    the peak resident memory a compile is expected to need, by stage
    check_fits(DIR, dtype)    refuses (CompileFitError, one line) before anything is loaded when that estimate
                              exceeds the memory available (MemAvailable, or TAPERNORM_COMPILE_MEMORY)

A safetensors file is an 8-byte little-endian header length, a JSON header {name: {dtype, shape, data_offsets}}
and the raw little-endian tensor bytes; no pickle is involved.
"""
from __future__ import annotations

import json
import mmap
import os
from dataclasses import dataclass
from pathlib import Path

import torch

from tapernorm.checkpoint import read_safetensors_header, read_safetensors_layout

__all__ = ["TensorInfo", "checkpoint_tensors", "checkpoint_dtype", "mmap_safetensors", "FitEstimate",
           "estimate_compile_bytes", "check_fits", "CompileFitError", "available_memory", "MEMORY_ENV",
           "safetensors_files", "load_hf_mmap", "MmapUnsupported"]

MEMORY_ENV = "TAPERNORM_COMPILE_MEMORY"  # bytes (suffix K/M/G allowed) a compile may use; default MemAvailable
_DTYPES = {"F64": torch.float64, "F32": torch.float32, "F16": torch.float16, "BF16": torch.bfloat16,
           "I64": torch.int64, "I32": torch.int32, "I16": torch.int16, "I8": torch.int8, "U8": torch.uint8,
           "BOOL": torch.bool}


class CompileFitError(ValueError):
    """The compile would not fit in memory (raised before loading; the message has the estimate and the fix)."""


@dataclass(frozen=True)
class TensorInfo:
    """One tensor as a safetensors header describes it."""
    name: str
    dtype: torch.dtype
    shape: tuple[int, ...]
    file: str

    @property
    def numel(self) -> int:
        n = 1
        for s in self.shape:
            n *= s
        return n


def safetensors_files(d: str | os.PathLike) -> list[Path]:
    """The weight files of a checkpoint directory: a sharded index's files, else every *.safetensors in it."""
    d = Path(d)
    index = d / "model.safetensors.index.json"
    if index.is_file():
        try:
            shards = sorted(set(json.loads(index.read_text())["weight_map"].values()))
        except (json.JSONDecodeError, KeyError, TypeError, AttributeError):
            raise ValueError(f"{index}: not a safetensors index (no weight_map); re-save the model") from None
        return [d / s for s in shards]
    return sorted(d.glob("*.safetensors"))


def checkpoint_tensors(d: str | os.PathLike) -> list[TensorInfo]:
    """Every tensor of the directory's safetensors files, from their headers only."""
    out = []
    for f in safetensors_files(d):
        head = read_safetensors_header(f)
        for name, h in head.items():
            dt = _DTYPES.get(h.get("dtype"))
            if dt is None:
                raise ValueError(f"{f}: tensor {name} has dtype {h.get('dtype')!r}, which compile does not read")
            out.append(TensorInfo(name, dt, tuple(int(s) for s in h["shape"]), str(f)))
    return out


def checkpoint_dtype(d: str | os.PathLike) -> str | None:
    """Name of the floating dtype holding most of the directory's weight bytes (None without safetensors)."""
    by: dict[torch.dtype, int] = {}
    for t in checkpoint_tensors(d):
        if t.dtype.is_floating_point:
            by[t.dtype] = by.get(t.dtype, 0) + t.numel * t.dtype.itemsize
    return str(max(by, key=by.get)).removeprefix("torch.") if by else None


def mmap_safetensors(path: str | os.PathLike) -> dict[str, torch.Tensor]:
    """{name: tensor} as zero-copy views of a private memory map of `path` (its own dtypes and shapes).

    The map is copy-on-write (MAP_PRIVATE): writing a tensor never changes the file. It stays mapped as long
    as any of the tensors lives.
    """
    path = Path(path)
    head, start = read_safetensors_layout(path)
    size = path.stat().st_size
    if size == start:
        return {}
    with open(path, "rb") as fh:
        mm = mmap.mmap(fh.fileno(), 0, access=mmap.ACCESS_COPY)
    out = {}
    for name, h in head.items():
        dt = _DTYPES.get(h.get("dtype"))
        begin, end = (int(x) for x in h["data_offsets"])
        shape = tuple(int(s) for s in h["shape"])
        if dt is None or begin > end or start + end > size:
            raise ValueError(f"{path}: tensor {name} has a bad dtype or data range (truncated file?); re-save it")
        n = end - begin
        if n == 0:
            out[name] = torch.empty(shape, dtype=dt)
            continue
        flat = torch.frombuffer(mm, dtype=dt, count=n // dt.itemsize, offset=start + begin)  # (numel,)
        out[name] = flat.view(shape)
    return out


@dataclass
class FitEstimate:
    """Expected peak of a compile: `peak_bytes` = weights in the compute dtype x `factor` + `overhead_bytes`."""
    params: int
    checkpoint_dtype: str | None
    compute_dtype: str
    compute_bytes: int
    factor: float
    overhead_bytes: int
    peak_bytes: int


# measured peak / compute-dtype weight bytes (benchmarks/results/compile_scale.md); overhead: torch + ORT + graph
PEAK_FACTOR = 2.0
OVERHEAD = 1_200 * 2**20


def estimate_compile_bytes(d: str | os.PathLike, dtype: str = "float32") -> FitEstimate:
    """The peak resident memory a compile of directory `d` into `dtype` is expected to need."""
    tensors = checkpoint_tensors(d)
    params = sum(t.numel for t in tensors if t.dtype.is_floating_point)
    compute = params * getattr(torch, dtype).itemsize
    peak = int(compute * PEAK_FACTOR) + OVERHEAD
    return FitEstimate(params, checkpoint_dtype(d), dtype, compute, PEAK_FACTOR, OVERHEAD, peak)


def _parse_bytes(text: str) -> int:
    t = text.strip().upper().removesuffix("B").removesuffix("I")
    mult = {"K": 2**10, "M": 2**20, "G": 2**30, "T": 2**40}.get(t[-1:], 1)
    return int(float(t[:-1] if t[-1:] in "KMGT" else t) * mult)


def available_memory() -> tuple[int | None, str]:
    """(bytes a compile may use, where that figure came from): $TAPERNORM_COMPILE_MEMORY, else MemAvailable."""
    env = os.environ.get(MEMORY_ENV)
    if env:
        try:
            return _parse_bytes(env), MEMORY_ENV
        except ValueError:
            raise CompileFitError(f"{MEMORY_ENV}={env!r} is not a byte count (e.g. 8G, 512M)") from None
    try:
        for line in open("/proc/meminfo"):
            if line.startswith("MemAvailable:"):
                return int(line.split()[1]) * 1024, "MemAvailable in /proc/meminfo"
    except OSError:
        pass
    return None, "unknown"


def _count(n: int) -> str:
    return f"{n / 1e9:.2f}B" if n >= 1e9 else f"{n / 1e6:.1f}M" if n >= 1e6 else str(n)


def check_fits(d: str | os.PathLike, dtype: str = "float32") -> FitEstimate | None:
    """The estimate for compiling `d` into `dtype`; CompileFitError if it exceeds the memory available."""
    if not safetensors_files(d):
        return None
    est = estimate_compile_bytes(d, dtype)
    limit, source = available_memory()
    if limit is not None and est.peak_bytes > limit:
        gib = 2**30
        hint = ("--dtype float16 halves the weights' share" if dtype == "float32" else
                "a smaller --dtype will not help further")
        raise CompileFitError(
            f"{d}: compiling {_count(est.params)} parameters into {dtype} needs about {est.peak_bytes / gib:.1f} GiB "
            f"({est.factor:g}x the {est.compute_bytes / gib:.1f} GiB of {dtype} weights + "
            f"{est.overhead_bytes / gib:.1f} GiB), but only {limit / gib:.1f} GiB is available ({source}); {hint}, or compile on a machine with more "
            f"memory (set {MEMORY_ENV} to change the limit). Nothing was loaded or written")
    return est


class MmapUnsupported(ValueError):
    """The directory's weight names are not the model's own (transformers renames them on load): load it through
    transformers instead."""


def load_hf_mmap(d: str | os.PathLike, kind: str) -> torch.nn.Module:
    """A "tapered" or plain "hf" directory as an HF causal LM whose weights *are* views of the memory-mapped
    safetensors files (checkpoint dtype, no copy), TaperNorm layout and gates restored, after the same checks as
    tapernorm.from_pretrained (format, config size fields and shapes against the headers). Raises MmapUnsupported
    when the file's keys are not the model's own (then use from_pretrained), CheckpointError for a bad checkpoint.
    """
    from transformers import AutoModelForCausalLM
    from transformers.initialization import no_init_weights

    from tapernorm.checkpoint import CheckpointError, read_json
    from tapernorm.hf import HF_SECTION, apply_taper_layout
    from tapernorm.hf import _check_gates, _plain_config  # the loader's own helpers: the same layout rules
    from tapernorm.hf_check import check_plain_hf_dir

    d = Path(d)
    raw = read_json(d / "config.json", "re-save the model")
    if kind == "tapered":
        spec = raw[HF_SECTION]
        if int(spec.get("format", 0)) != 1 or not isinstance(spec.get("layers"), dict):
            raise MmapUnsupported(f"{d}: tapernorm_hf format {spec.get('format')!r}")  # from_pretrained says why
        files = [d / "tapernorm.safetensors"]
    else:
        spec = {}
        check_plain_hf_dir(d, raw)  # no pickle, no truncated file, config fields agree with the headers
        files = safetensors_files(d)
    tensors: dict[str, torch.Tensor] = {}
    for f in files:
        if not f.is_file():
            raise CheckpointError(f"{f}: missing; the directory needs its safetensors weights")
        tensors.update(mmap_safetensors(f))
    wdtype = next((v.dtype for k, v in tensors.items() if v.is_floating_point() and k.endswith("weight")),
                  torch.float32)
    with no_init_weights():  # torch.empty storage, never written: costs no resident memory, replaced below
        model = AutoModelForCausalLM.from_config(_plain_config(raw, spec), dtype=wdtype)
    if spec:
        apply_taper_layout(model, spec["layers"], str(d / "config.json"))
    _assign(model, tensors, str(d))
    if spec:
        _check_gates(model, spec, str(d / "config.json"))
    return model.eval()


_EXP_MASK = {torch.bfloat16: (torch.int16, 0x7F80), torch.float16: (torch.int16, 0x7C00),
             torch.float32: (torch.int32, 0x7F800000)}


def _all_finite(t: torch.Tensor) -> bool:
    """No inf / NaN in `t`: an all-ones exponent field, tested on the bits (integer ops; torch.isfinite on bf16 is
    several times slower on CPU)."""
    if t.dtype not in _EXP_MASK:
        return bool(torch.isfinite(t).all())
    itype, mask = _EXP_MASK[t.dtype]
    bits = t.reshape(-1).view(itype)
    return not bool((bits & mask).eq_(mask).any()) if bits.numel() else True


def _assign(model: torch.nn.Module, tensors: dict, where: str) -> None:
    """Check keys / shapes / finiteness (as tapernorm.hf.load_state_checked does), then make the parameters *be*
    the tensors (load_state_dict assign=True: no copy) and re-tie tied weights."""
    from tapernorm.checkpoint import CheckpointError, shape_matches

    if hasattr(model, "tie_weights"):
        model.tie_weights()  # tied aliases (lm_head -> embed_tokens) are stored once; see them as such
    state = model.state_dict(keep_vars=True)
    present = {(v.data_ptr(), tuple(v.shape)) for k, v in state.items() if k in tensors}
    missing = [k for k, v in state.items() if k not in tensors and (v.data_ptr(), tuple(v.shape)) not in present]
    unexpected = [k for k in tensors if k not in state]
    if missing or unexpected:
        raise MmapUnsupported(f"{where}: the weight names are not {type(model).__name__}'s own (missing "
                              f"{missing[:3]}, unexpected {unexpected[:3]})")
    for k, v in tensors.items():
        if not shape_matches(k, tuple(v.shape), state):
            raise CheckpointError(f"{where}: key {k!r} has shape {tuple(v.shape)}, the model expects "
                                  f"{tuple(state[k].shape)}")
        if v.is_floating_point() and not _all_finite(v):
            raise CheckpointError(f"{where}: key {k!r} contains NaN or inf; the checkpoint is unusable")
    tied = [k for k in state if k not in tensors]
    model.load_state_dict(tensors, strict=False, assign=True)  # the TaperNorm post-hook restores gate flags
    from tapernorm.pos0 import track_if_needed
    track_if_needed(model)  # c0 layers learn which rows are position 0
    if tied and hasattr(model, "tie_weights"):
        model.tie_weights()
