"""Weight-only int8 / int4 quantization of a written ONNX decoder (MatMul -> MatMulNBits), and the fp16 cast.

Post-processing, not a builder step: `quantize_file(src, dst, QuantSpec(bits=4))` takes any fp32 graph that
compile wrote (the lean graph or the generic dynamo export), so the fold has already happened in fp32 and the
quantizer sees the folded weights W' = W diag(s).

Which quantizer: onnxruntime's maintained `MatMulNBitsQuantizer` (onnxruntime.quantization.matmul_nbits_quantizer,
the "DEFAULT" RTN algorithm backed by MLAS' C++ block quantizer), the same one onnxruntime-genai's model builder
calls. Nothing is packed by hand here; `dequantize_nbits` below only *reads* its layout back (for the
reconstruction-error figures of benchmarks/precision.py), and the tests check it against onnxruntime's kernel.

Choices (onnxruntime-genai's CPU defaults where they apply):
- symmetric blocks along K, block size 32, accuracy level 4 on CPU (int8 activations in the MatMulNBits
  kernel), 0 elsewhere (the attribute is left out);
- every MatMul that reads a 2-D constant weight is quantized, lm_head included (genai quantizes lm_head by
  default too); `quantize_lm_head=False` keeps it in fp32;
- the token embedding stays a float Gather. genai's int4 build of a tied model shares lm_head's int4 blocks
  with the embedding (GatherBlockQuantized); after a fold of the final norm lm_head is W diag(s), no longer the
  embedding, so there is nothing to share, and a decode step gathers only B rows of the table: it costs file
  size, not decode bandwidth.
- a block size must divide every K exactly: the quantizer would otherwise zero-pad the last block silently;
  that is a one-line QuantizeError naming the layer. MatMulNBits wants a power of two >= 16.
"""
from __future__ import annotations

import logging
from dataclasses import asdict, dataclass, field
from pathlib import Path

import numpy as np
import onnx
from onnx import numpy_helper

from .onnx_io import load_onnx, max_ir_version, save_onnx

__all__ = ["QuantSpec", "QuantReport", "QuantizeError", "quantize_model", "quantize_file", "quantizable_matmuls",
           "check_block_size", "dequantize_nbits", "cast_fp16_file", "BLOCK_SIZES", "INLINE_BYTES"]

BLOCK_SIZES = (16, 32, 64, 128, 256)  # what MatMulNBits and genai's builder accept
INLINE_BYTES = 2**31 - 2**27  # above this the written file keeps its weights in <file>.data


class QuantizeError(ValueError):
    """The graph cannot be quantized as asked (block size, bits); the message names the layer."""


@dataclass
class QuantSpec:
    """How to quantize: bits 4 or 8, block size along K, MatMulNBits accuracy level (None: leave it out)."""
    bits: int = 4
    block_size: int = 32
    accuracy_level: int | None = 4
    quantize_lm_head: bool = True


@dataclass
class QuantReport:
    """What quantize_file did: layers quantized / kept and the bytes of weights before and after."""
    bits: int
    block_size: int
    accuracy_level: int | None
    quantizer: str
    quantized: list[str] = field(default_factory=list)
    kept: dict[str, str] = field(default_factory=dict)
    weight_bytes_before: int = 0
    weight_bytes_after: int = 0

    def to_dict(self) -> dict:
        """JSON-ready dict."""
        return asdict(self)


def _layer(node: onnx.NodeProto, weight: str) -> str:
    """A readable layer name: the lean graph names nodes after their module path; else the weight's name."""
    return node.name if node.name and not node.name.startswith(("node_", "/")) else weight


def quantizable_matmuls(model: onnx.ModelProto) -> list[tuple[onnx.NodeProto, str, int, int]]:
    """[(MatMul node, layer name, K, N)] for every MatMul whose B input is a 2-D float initializer (K, N)."""
    inits = {t.name: t for t in model.graph.initializer}
    out = []
    for n in model.graph.node:
        if n.op_type != "MatMul" or len(n.input) < 2 or n.input[1] not in inits:
            continue
        t = inits[n.input[1]]
        if len(t.dims) == 2 and t.data_type in (onnx.TensorProto.FLOAT, onnx.TensorProto.FLOAT16):
            out.append((n, _layer(n, n.input[1]), int(t.dims[0]), int(t.dims[1])))
    return out


def check_block_size(model: onnx.ModelProto, block_size: int) -> None:
    """One-line QuantizeError unless `block_size` is a MatMulNBits size that divides every quantized K."""
    if block_size not in BLOCK_SIZES:
        raise QuantizeError(f"block size {block_size} is not one MatMulNBits supports; pick one of {list(BLOCK_SIZES)}")
    for _, layer, k, _ in quantizable_matmuls(model):
        if k % block_size:
            fits = [b for b in BLOCK_SIZES if k % b == 0]
            raise QuantizeError(f"{layer}: block size {block_size} does not divide its input width K={k}; pick "
                                f"--block-size from {fits or 'none: this layer cannot be block-quantized'}")


def _weight_bytes(model: onnx.ModelProto) -> int:
    """Bytes of every initializer (external ones counted from their dims and type)."""
    total = 0
    for t in model.graph.initializer:
        itemsize = np.dtype(onnx.helper.tensor_dtype_to_np_dtype(t.data_type)).itemsize
        total += int(np.prod(t.dims, dtype=np.int64)) * itemsize
    return total


def quantize_model(model: onnx.ModelProto, spec: QuantSpec) -> tuple[onnx.ModelProto, QuantReport]:
    """The weight-only MatMulNBits version of `model` (fp32 weights in, checked block size); returns a new model."""
    from onnxruntime.quantization.matmul_nbits_quantizer import MatMulNBitsQuantizer
    from onnxruntime.quantization.quant_utils import QuantFormat

    if spec.bits not in (4, 8):
        raise QuantizeError(f"bits {spec.bits}: weight-only quantization here is int4 or int8")
    check_block_size(model, spec.block_size)
    rows = quantizable_matmuls(model)
    exclude = [n.name for n, layer, _, _ in rows if layer == "lm_head" and not spec.quantize_lm_head]
    report = QuantReport(bits=spec.bits, block_size=spec.block_size, accuracy_level=spec.accuracy_level,
                         quantizer="onnxruntime.quantization.matmul_nbits_quantizer.MatMulNBitsQuantizer "
                                   "(DEFAULT / RTN, symmetric, QOperator)",
                         weight_bytes_before=_weight_bytes(model))
    for n, layer, _, _ in rows:
        if n.name in exclude:
            report.kept[layer] = "quantize_lm_head=False"
        else:
            report.quantized.append(layer)
    unnamed = [n for n, *_ in rows if not n.name]
    for i, n in enumerate(unnamed):  # nodes_to_exclude and the report match by name
        n.name = f"matmul_{i}"
    logging.getLogger("onnxruntime.quantization").setLevel(logging.WARNING)
    q = MatMulNBitsQuantizer(model, bits=spec.bits, block_size=spec.block_size, is_symmetric=True,
                             accuracy_level=spec.accuracy_level, nodes_to_exclude=exclude,
                             quant_format=QuantFormat.QOperator, op_types_to_quantize=("MatMul",))
    q.process()
    out = q.model.model
    out.ir_version = min(out.ir_version, max_ir_version())
    report.weight_bytes_after = _weight_bytes(out)
    return out, report


def quantize_file(src: str | Path, dst: str | Path, spec: QuantSpec, metadata: dict | None = None) -> QuantReport:
    """Quantize the ONNX file `src` into `dst` (may be the same path; written atomically, external data kept)."""
    src, dst = Path(src), Path(dst)
    model = load_onnx(src)
    external = (src.parent / (src.name + ".data")).is_file()
    out, report = quantize_model(model, spec)
    for k, v in {"tapernorm.precision": f"int{spec.bits}", **(metadata or {})}.items():
        out.metadata_props.add(key=k, value=str(v))
    keep_external = external and report.weight_bytes_after > INLINE_BYTES
    if external and not keep_external:
        for t in out.graph.initializer:  # everything is in memory now: write the small file inline
            if t.data_location == onnx.TensorProto.EXTERNAL:
                t.data_location = onnx.TensorProto.DEFAULT
                del t.external_data[:]
    save_onnx(out, dst, external_data=keep_external)
    stale = dst.parent / (dst.name + ".data")
    if not keep_external and stale.is_file():
        stale.unlink()
    return report


def cast_fp16_file(src: str | Path, dst: str | Path) -> dict:
    """Cast a float32 ONNX graph to float16 with onnxruntime's maintained converter (inputs/outputs too)."""
    from onnxruntime.transformers.float16 import convert_float_to_float16

    model = load_onnx(src)
    out = convert_float_to_float16(model, keep_io_types=False, disable_shape_infer=True)
    out.ir_version = min(out.ir_version, max_ir_version())
    save_onnx(out, dst, external_data=_weight_bytes(out) > INLINE_BYTES)
    return {"converter": "onnxruntime.transformers.float16.convert_float_to_float16", "keep_io_types": False}


def dequantize_nbits(model: onnx.ModelProto, node: onnx.NodeProto) -> np.ndarray:
    """The float weight (K, N) a MatMulNBits node computes with: (q - zero point) * scale per block along K.

    Layout (onnxruntime's contrib op spec): B uint8 (N, K / block, block * bits / 8), low nibble first at 4 bits;
    scales (N, K / block); no zero_points input means the symmetric midpoint (8 at 4 bits, 128 at 8 bits).
    """
    attrs = {a.name: onnx.helper.get_attribute_value(a) for a in node.attribute}
    k, n, bits, block = attrs["K"], attrs["N"], attrs["bits"], attrs["block_size"]
    inits = {t.name: t for t in model.graph.initializer}
    packed = numpy_helper.to_array(inits[node.input[1]]).reshape(n, -1)  # (N, blocks * bytes per block)
    scales = numpy_helper.to_array(inits[node.input[2]]).astype(np.float32).reshape(n, -1)  # (N, blocks)
    if len(node.input) > 3 and node.input[3]:
        raise QuantizeError(f"{node.name}: asymmetric (zero-point) blocks are not read here")
    if bits == 4:
        q = np.stack([packed & 0x0F, packed >> 4], axis=-1).reshape(n, -1)  # (N, K_padded)
        zp = 8
    else:
        q, zp = packed, 128
    q = q[:, : scales.shape[1] * block].astype(np.float32) - zp
    w = (q.reshape(n, -1, block) * scales[:, :, None]).reshape(n, -1)[:, :k]  # (N, K)
    return w.T  # (K, N)
