"""ONNX files on disk: atomic save (inline or external data), validated load, the IR version ORT accepts.

onnx 1.23 writes IR version 14 and onnxruntime 1.31/1.32 loads at most 13, so
every file we write is lowered to `max_ir_version()`, probed once from the installed runtime.
"""
from __future__ import annotations

import functools
import os
import tempfile
from pathlib import Path

import onnx

from tapernorm.fileio import atomic_write_bytes

__all__ = ["max_ir_version", "save_onnx", "load_onnx", "save_ir_model", "lazy_initializer", "EXTERNAL_ALIGNMENT",
           "stream_initializers", "write_onnx_header"]

EXTERNAL_ALIGNMENT = 65536  # external tensors start at 64 KiB offsets: onnxruntime can memory-map them


@functools.lru_cache(maxsize=None)
def max_ir_version() -> int:
    """Highest ONNX IR version the installed onnxruntime loads (probed with a one-node model)."""
    import onnxruntime as ort
    from onnx import TensorProto, helper

    x = helper.make_tensor_value_info("x", TensorProto.FLOAT, [1])
    y = helper.make_tensor_value_info("y", TensorProto.FLOAT, [1])
    graph = helper.make_graph([helper.make_node("Identity", ["x"], ["y"])], "probe", [x], [y])
    for ir in range(onnx.IR_VERSION, 6, -1):
        m = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
        m.ir_version = ir
        try:
            ort.InferenceSession(m.SerializeToString(), providers=["CPUExecutionProvider"])
            return ir
        except Exception:  # noqa: BLE001 - "Unsupported model IR version" and friends
            continue
    raise RuntimeError(f"onnxruntime {ort.__version__} loads no IR version in 7..{onnx.IR_VERSION}; reinstall onnxruntime")


def save_onnx(model: onnx.ModelProto, path: str | Path, external_data: bool = False) -> None:
    """Write atomically: inline (tmp + os.replace) or, for big models, `<name>.data` beside it first."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    if external_data:
        data_name = path.name + ".data"
        with tempfile.TemporaryDirectory(dir=path.parent, prefix=".tmp-onnx-") as td:
            tmp = Path(td) / path.name
            onnx.save_model(model, tmp, save_as_external_data=True, all_tensors_to_one_file=True,
                            location=data_name, size_threshold=1024)
            onnx.checker.check_model(str(tmp))
            os.replace(Path(td) / data_name, path.parent / data_name)
            os.replace(tmp, path)
        return
    atomic_write_bytes(path, model.SerializeToString())


def lazy_initializer(t, dtype, name: str, transpose: bool = False):
    """An onnx_ir tensor that converts the torch tensor `t` (any float dtype, bf16 included) to `dtype` (and
    transposes a 2-D weight) only when its bytes are written: save_ir_model / stream_initializers then write one
    converted tensor at a time, instead of the whole model being held converted (and again as a ModelProto).
    `t` may be a list of tensors stacked along dim 0 when written (a fused q|k|v or gate|up weight: the stacked
    copy exists only while it is written)."""
    import torch
    import onnx_ir as ir
    from onnx_ir.tensor_adapters import TorchTensor

    parts = list(t) if isinstance(t, (list, tuple)) else [t]
    shape = (sum(int(p.shape[0]) for p in parts), *parts[0].shape[1:]) if parts[0].dim() else ()
    shape = tuple(shape[::-1]) if transpose else tuple(shape)

    def convert():
        w = torch.cat([p.detach() for p in parts], 0) if len(parts) > 1 else parts[0].detach()
        w = w.t() if transpose else w
        return TorchTensor(w.to(dtype).contiguous(), name=name)

    ir_dtype = TorchTensor(parts[0].new_empty(0, dtype=dtype)).dtype  # the graph dtype, nothing converted yet
    return ir.LazyTensor(convert, dtype=ir_dtype, shape=ir.Shape(shape), name=name)


def save_ir_model(model, path: str | Path, external_data: bool, progress=None) -> int:
    """Write an onnx_ir Model atomically, streaming its initializers tensor by tensor into `<name>.data`
    (64 KiB-aligned, so onnxruntime can memory-map them) when `external_data`; returns the bytes written.

    Lazy initializers (lazy_initializer) are converted as they are written, so the peak is about one tensor
    (onnx_ir keeps at most 256 MiB in flight). `progress(done, total)` is called after each tensor.
    """
    import onnx_ir as ir

    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    data_name = path.name + ".data"

    done = [0]

    def callback(tensor, info):  # invocations, not info.index: onnx_ir may write out of order
        done[0] += 1
        if progress is not None:
            progress(done[0], info.total)

    with tempfile.TemporaryDirectory(dir=path.parent, prefix=".tmp-onnx-") as td:
        tmp = Path(td) / path.name
        if external_data:
            ir.save(model, tmp, external_data=data_name, size_threshold_bytes=1024, callback=callback,
                    max_in_flight_bytes=256 * 2**20, alignment=EXTERNAL_ALIGNMENT)
            os.replace(Path(td) / data_name, path.parent / data_name)
        else:
            ir.save(model, tmp)
        os.replace(tmp, path)
    return path.stat().st_size + ((path.parent / data_name).stat().st_size if external_data else 0)


def stream_initializers(model, data_path: str | Path) -> int:
    """Move every initializer of the onnx_ir Model (>= 1 KiB) into `data_path`, tensor by tensor, and leave
    external-data references in its place (onnx_ir's unload_from_model, 64 KiB-aligned): a later ir.to_proto is
    then only the graph. Lazy initializers are converted as they are written. A tqdm bar on a terminal."""
    import onnx_ir as ir

    from .stages import progress

    data_path = Path(data_path)
    n = sum(1 for v in model.graph.initializers.values()
            if v.const_value is not None and v.const_value.nbytes >= 1024)
    bar = progress(range(n), f"write {data_path.name}", total=n, min_items=64)
    update = getattr(bar, "update", None)
    ir.external_data.unload_from_model(model, data_path.parent, data_path.name, size_threshold_bytes=1024,
                                       callback=(lambda t, info: update(1)) if update else None,
                                       max_in_flight_bytes=256 * 2**20, alignment=EXTERNAL_ALIGNMENT)
    if update:
        bar.close()
    return data_path.stat().st_size if data_path.is_file() else 0


def write_onnx_header(model: onnx.ModelProto, path: str | Path) -> None:
    """Write a ModelProto whose weights are already in external data beside `path`, atomically, then check it."""
    path = Path(path)
    atomic_write_bytes(path, model.SerializeToString())
    onnx.checker.check_model(str(path))


def load_onnx(path: str | Path, load_external_data: bool = True) -> onnx.ModelProto:
    """Load and validate an ONNX file with one-line errors for missing, truncated or too-new files."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"{path}: no such ONNX file; run `tapernorm compile CHECKPOINT --out DIR` first")
    try:
        model = onnx.load(str(path), load_external_data=load_external_data)
    except Exception as e:  # DecodeError, missing external data, ...
        raise ValueError(f"{path}: not a readable ONNX model (truncated or corrupt: {type(e).__name__}); "
                         "re-run tapernorm compile") from None
    if not model.graph.node:
        raise ValueError(f"{path}: ONNX model has an empty graph (truncated file?); re-run tapernorm compile")
    if model.ir_version > max_ir_version():
        import onnxruntime as ort
        raise ValueError(f"{path}: ONNX IR version {model.ir_version} is newer than onnxruntime {ort.__version__} "
                         f"accepts (<= {max_ir_version()}); re-export with tapernorm compile or upgrade onnxruntime")
    try:
        onnx.checker.check_model(model if load_external_data else str(path))
    except onnx.checker.ValidationError as e:
        raise ValueError(f"{path}: onnx.checker rejects the model: {str(e).splitlines()[0]}") from None
    return model
