"""ONNX files on disk: atomic save (inline or external data), validated load, the IR version ORT accepts.

onnx 1.23 writes IR version 14 and onnxruntime 1.31/1.32 loads at most 13 (DESIGN.md section 3), so
every file we write is lowered to `max_ir_version()`, probed once from the installed runtime.
"""
from __future__ import annotations

import functools
import os
import tempfile
from pathlib import Path

import onnx

from tapernorm.fileio import atomic_write_bytes

__all__ = ["max_ir_version", "save_onnx", "load_onnx"]


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
