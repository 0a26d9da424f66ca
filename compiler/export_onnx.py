"""DecoderLM (or a folded GraphModule of it) -> ONNX with an explicit KV cache.

One graph serves prefill and decode, with Hugging Face / onnxruntime-genai names:

    inputs   input_ids int64 (batch, seq), attention_mask int64 (batch, past+seq),
             position_ids int64 (batch, seq), past_key_values.{i}.key|value (batch, heads, past, head_dim)
    outputs  logits (batch, seq, vocab), present.{i}.key|value (batch, heads, past+seq, head_dim)

Traps handled here: example dims of 0/1 get specialized, so we export with
batch=2, seq=3, past=4 and then check the written dims are symbolic; onnx 1.23 writes an IR version
newer than onnxruntime accepts, so we probe the runtime and lower it; protobuf caps inline models at
2 GB, so big models go to external data.
"""
from __future__ import annotations

import contextlib
import io
import json
import logging
import warnings
import tempfile
from pathlib import Path

import numpy as np
import onnx
import torch
import torch.nn as nn
from torch.export import Dim

from tapernorm.fileio import atomic_write_text

from .onnx_fold import cleanup_onnx
from .onnx_io import load_onnx, max_ir_version, save_onnx
__all__ = [
    "KVCacheLM", "DTYPES", "io_names", "example_inputs", "dynamic_shapes", "export_onnx", "check_io",
    "max_ir_version", "load_onnx", "save_onnx", "runtime_config", "write_runtime_json", "empty_past_feeds",
    "set_metadata", "INLINE_LIMIT", "quiet_export",
]

DTYPES = {"float32": torch.float32, "float16": torch.float16, "bfloat16": torch.bfloat16}
ONNX_ELEM = {"float32": onnx.TensorProto.FLOAT, "float16": onnx.TensorProto.FLOAT16,
             "bfloat16": onnx.TensorProto.BFLOAT16}
INLINE_LIMIT = 2**31 - 2**27  # bytes of weights above which we write external data (protobuf caps at 2 GB)
DIM_NAMES = ("batch_size", "sequence_length", "past_sequence_length", "total_sequence_length")


class KVCacheLM(nn.Module):
    """(input_ids, attention_mask, position_ids, flat past k/v) -> (logits, *flat presents) around a DecoderLM."""

    def __init__(self, model: nn.Module):
        super().__init__()
        self.model = model
        self.n_layers = int(model.config.n_layers)
        self.train(model.training)

    def forward(self, input_ids, attention_mask, position_ids, past_key_values):
        past = [(past_key_values[2 * i], past_key_values[2 * i + 1]) for i in range(self.n_layers)]
        logits, presents = self.model(input_ids, attention_mask, position_ids, past, use_cache=True)
        flat = [t for kv in presents for t in kv]  # k0, v0, k1, v1, ... each (B, H, P+T, D)
        return (logits, *flat)


def io_names(n_layers: int) -> tuple[list[str], list[str]]:
    """(input names, output names) in graph order."""
    kv = [f"{i}.{k}" for i in range(n_layers) for k in ("key", "value")]
    return (["input_ids", "attention_mask", "position_ids"] + [f"past_key_values.{s}" for s in kv],
            ["logits"] + [f"present.{s}" for s in kv])


def example_inputs(cfg, batch: int = 2, seq: int = 3, past: int = 4, dtype: str = "float32") -> tuple:
    """Export example args; every dynamic dim >= 2 so torch.export does not specialize it."""
    g = torch.Generator().manual_seed(0)
    ids = torch.randint(0, cfg.vocab_size, (batch, seq), generator=g)  # (B, T)
    mask = torch.ones(batch, past + seq, dtype=torch.long)  # (B, P+T)
    pos = torch.arange(past, past + seq).unsqueeze(0).expand(batch, seq).contiguous()  # (B, T)
    kv = tuple(torch.randn(batch, cfg.n_heads, past, cfg.head_dim, generator=g).to(DTYPES[dtype])
               for _ in range(2 * cfg.n_layers))  # each (B, H, P, D)
    return ids, mask, pos, kv


def dynamic_shapes(n_layers: int) -> tuple:
    """torch.export dynamic_shapes matching example_inputs (positional form, valid for the wrapper and its GraphModule)."""
    batch, seq, past = Dim("batch_size"), Dim("sequence_length"), Dim("past_sequence_length")
    # attention_mask's length equals past + seq; export derives that relation itself (Dim.DYNAMIC),
    # and we rename the symbol to total_sequence_length afterwards.
    return ({0: batch, 1: seq}, {0: batch, 1: Dim.DYNAMIC}, {0: batch, 1: seq},
            tuple({0: batch, 2: past} for _ in range(2 * n_layers)))


def _dims(vi) -> list:
    return [d.dim_param or d.dim_value for d in vi.type.tensor_type.shape.dim]


def _rename_dims(model: onnx.ModelProto, mapping: dict[str, str]) -> None:
    for vi in list(model.graph.input) + list(model.graph.output) + list(model.graph.value_info):
        for d in vi.type.tensor_type.shape.dim:
            if d.dim_param in mapping:
                d.dim_param = mapping[d.dim_param]


def _normalize_dims(model: onnx.ModelProto) -> None:
    """Give attention_mask / present the genai name total_sequence_length (export writes s53 / 'a + b')."""
    mapping = {}
    for vi in model.graph.input:
        if vi.name == "attention_mask":
            p = vi.type.tensor_type.shape.dim[1].dim_param
            if p:
                mapping[p] = "total_sequence_length"
    for vi in model.graph.output:
        if vi.name.startswith("present."):
            p = vi.type.tensor_type.shape.dim[2].dim_param
            if p and p not in DIM_NAMES:
                mapping[p] = "total_sequence_length"
    _rename_dims(model, mapping)


def check_io(model: onnx.ModelProto, cfg, dtype: str = "float32") -> dict:
    """Verify names, element types and that batch/seq/past dims are symbolic; returns {name: dims}."""
    want_in, want_out = io_names(cfg.n_layers)
    got_in = [i.name for i in model.graph.input]
    got_out = [o.name for o in model.graph.output]
    if got_in != want_in or got_out != want_out:
        raise ValueError(f"ONNX I/O names {got_in + got_out} differ from the contract {want_in + want_out}")
    H, D, V, fe = cfg.n_heads, cfg.head_dim, cfg.vocab_size, ONNX_ELEM[dtype]
    expect = {"input_ids": (onnx.TensorProto.INT64, ["b", "t"]), "attention_mask": (onnx.TensorProto.INT64, ["b", "a"]),
              "position_ids": (onnx.TensorProto.INT64, ["b", "t"]), "logits": (fe, ["b", "t", V])}
    for n in want_in[3:]:
        expect[n] = (fe, ["b", H, "p", D])
    for n in want_out[1:]:
        expect[n] = (fe, ["b", H, "a", D])
    dims = {}
    for vi in list(model.graph.input) + list(model.graph.output):
        elem, shape = expect[vi.name]
        got = _dims(vi)
        dims[vi.name] = got
        if vi.type.tensor_type.elem_type != elem:
            raise ValueError(f"ONNX {vi.name}: element type {onnx.TensorProto.DataType.Name(vi.type.tensor_type.elem_type)}"
                             f", expected {onnx.TensorProto.DataType.Name(elem)}")
        if len(got) != len(shape):
            raise ValueError(f"ONNX {vi.name}: rank {len(got)} dims {got}, expected rank {len(shape)}")
        for g, s in zip(got, shape):
            if isinstance(s, int) and g != s:
                raise ValueError(f"ONNX {vi.name}: dims {got}, expected {shape}")
            if isinstance(s, str) and not isinstance(g, str):
                raise ValueError(f"ONNX {vi.name}: dims {got} has a fixed size where a symbolic dim is needed "
                                 "(export specialized it; export with example dims >= 2)")
    return dims


def set_metadata(model: onnx.ModelProto, props: dict[str, str]) -> None:
    """Set (replace) string metadata_props entries."""
    keep = [p for p in model.metadata_props if p.key not in props]
    del model.metadata_props[:]
    model.metadata_props.extend(keep)
    for k, v in props.items():
        model.metadata_props.add(key=k, value=v if isinstance(v, str) else json.dumps(v, sort_keys=True))


@contextlib.contextmanager
def quiet_export():
    """Silence torch.onnx's progress prints, warnings and registration logs (errors still raise)."""
    log = logging.getLogger("torch.onnx")
    level = log.level
    log.setLevel(logging.ERROR)
    try:
        with warnings.catch_warnings(), contextlib.redirect_stdout(io.StringIO()):
            warnings.simplefilter("ignore")
            yield
    finally:
        log.setLevel(level)


def _weight_bytes(module: nn.Module) -> int:
    seen, total = set(), 0
    for t in list(module.parameters()) + list(module.buffers()):
        if t.data_ptr() not in seen:
            seen.add(t.data_ptr())
            total += t.numel() * t.element_size()
    return total


def export_onnx(module: nn.Module, cfg, path: str | Path, dtype: str = "float32", metadata: dict | None = None,
                inline_limit: int = INLINE_LIMIT, annotate=None) -> dict:
    """Export a KVCacheLM (or a GraphModule captured from one) to `path`; returns facts about the file.

    `annotate(model_proto) -> dict` (optional) runs on the final graph before it is written; its
    result is stored in metadata_props (e.g. the statistics check).
    """
    if dtype not in DTYPES:
        raise ValueError(f"dtype {dtype!r} is not one of {sorted(DTYPES)}")
    Path(path).parent.mkdir(parents=True, exist_ok=True)
    args = example_inputs(cfg, dtype=dtype)
    names_in, names_out = io_names(cfg.n_layers)
    with quiet_export():
        prog = torch.onnx.export(module, args, dynamic_shapes=dynamic_shapes(cfg.n_layers), input_names=names_in,
                                 output_names=names_out, dynamo=True, optimize=True, external_data=False,
                                 verbose=False)
    external = _weight_bytes(module) > inline_limit
    if external:  # the proto cannot hold the weights: let torch write external data, then patch the header
        with tempfile.TemporaryDirectory(dir=Path(path).parent, prefix=".tmp-export-") as td:
            prog.save(str(Path(td) / "m.onnx"), external_data=True)
            model = onnx.load(str(Path(td) / "m.onnx"), load_external_data=True)
    else:
        model = prog.model_proto
    _normalize_dims(model)
    model, cleanup = cleanup_onnx(model)  # graphsurgeon cleanup + toposort (node metadata kept)
    model.ir_version = min(model.ir_version, max_ir_version())
    dims = check_io(model, cfg, dtype)
    props = {"tapernorm.dtype": dtype, **(metadata or {})}
    if annotate is not None:
        props.update(annotate(model))
    set_metadata(model, props)
    if not external:
        onnx.checker.check_model(model)
    save_onnx(model, path, external_data=external)
    return {"path": str(path), "ir_version": model.ir_version,
            "opset": {o.domain or "ai.onnx": o.version for o in model.opset_import},
            "nodes": len(model.graph.node), "external_data": external, "dims": dims, "cleanup": cleanup,
            "bytes": Path(path).stat().st_size + (Path(str(path) + ".data").stat().st_size if external else 0)}


def runtime_config(cfg, dtype: str = "float32", eos_id: int | None = None, bos_id: int | None = None) -> dict:
    """The runtime.json contents (genai_config-like): what a decoder session needs to bind the cache.

    Heads are explicit (compiler.lean.DecoderDims): `num_heads` (query heads), `num_kv_heads` (the cache's heads,
    RuntimeConfig.num_kv_heads). There is no `n_heads`: ModelConfig.n_heads means query heads, and one name has one
    meaning (the runtime still reads an older file's `n_heads` as the cache's heads)."""
    from .lean.families import dims_of
    d = dims_of(cfg)
    return {"n_layers": cfg.n_layers, "num_heads": d.num_heads,
            "num_kv_heads": d.num_kv_heads, "head_dim": cfg.head_dim,
            "vocab_size": cfg.vocab_size, "max_seq_len": cfg.max_seq_len, "dtype": dtype,
            "eos_id": eos_id, "bos_id": bos_id}


def write_runtime_json(out_dir: str | Path, cfg, dtype: str = "float32", eos_id: int | None = None,
                       bos_id: int | None = None) -> Path:
    """Write `out_dir/runtime.json` atomically."""
    path = Path(out_dir) / "runtime.json"
    atomic_write_text(path, json.dumps(runtime_config(cfg, dtype, eos_id, bos_id), indent=2))
    return path


def empty_past_feeds(cfg, batch: int, dtype: str = "float32") -> dict:
    """past_key_values.* feeds of length 0 (the first step), as numpy arrays."""
    npdt = {"float32": np.float32, "float16": np.float16}.get(dtype)
    if npdt is None:
        raise ValueError(f"no numpy dtype for {dtype!r}; bind bfloat16 caches with OrtValue instead")
    return {n: np.zeros((batch, cfg.n_heads, 0, cfg.head_dim), npdt) for n in io_names(cfg.n_layers)[0][3:]}
