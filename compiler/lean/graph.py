"""LeanGraph: the shared plumbing of the lean decode graph, built with onnx-ir (no raw protobuf).

Interface (HF / onnxruntime-genai names; the KV cache is one buffer per layer shared by past and present):

    inputs   input_ids int64 (batch, seq), attention_mask int64 (batch, total_sequence_length),
             past_key_values.{i}.key|value (batch, kv_heads, past_sequence_length, head_dim)
    outputs  logits (batch, 1, vocab): the LAST input position only (per row, right padding),
             present.{i}.key|value (batch, kv_heads, total_sequence_length, head_dim)

Bound through IOBinding with present == past (one max-length buffer), GroupQueryAttention writes the new
keys/values in place (`past_present_share_buffer`); fed plain numpy with a zero-length past it returns a
fresh present of length seq (parity checks). Rows are right-padded: attention_mask row b is 1 for its
first L_b positions; GroupQueryAttention takes seqlens_k = L_b - 1 and the rotary position from it.
"""
from __future__ import annotations

import dataclasses

import numpy as np
import onnx_ir as ir
import torch

from ..onnx_io import lazy_initializer
from .weights import LeanError, NormSpec

__all__ = ["LeanGraph", "ONNX_DTYPES", "OPSET", "POS0_FORMS"]

OPSET = 21
POS0_FORMS = ("where", "split")  # how the factors of norms with c0 are built (pos0_factor / pos0_table)
POS0_FORM = "split"  # benchmarks/pos0_cost.py times both: decode step vs no c0 x1.05 (split) / x1.13 (where), B1
ONNX_DTYPES = {torch.float32: ir.DataType.FLOAT, torch.float16: ir.DataType.FLOAT16,
               torch.bfloat16: ir.DataType.BFLOAT16}
MS = "com.microsoft"


class LeanGraph:
    """Builds one lean decoder graph: inputs, the mask subgraph, norms with residual fusion, the head."""

    def __init__(self, n_layers: int, n_heads: int, kv_heads: int, head_dim: int, vocab: int,
                 dtype: torch.dtype):
        self.dtype, self.elem = dtype, ONNX_DTYPES[dtype]
        self.tape = ir.tape.Tape()
        self.n_layers, self.n_heads, self.kv_heads, self.head_dim, self.vocab = (
            n_layers, n_heads, kv_heads, head_dim, vocab)
        self._consts: dict = {}
        self.input_ids = ir.val("input_ids", ir.DataType.INT64, ir.Shape(["batch_size", "sequence_length"]))
        self.attention_mask = ir.val("attention_mask", ir.DataType.INT64,
                                     ir.Shape(["batch_size", "total_sequence_length"]))
        self.past = [ir.val(f"past_key_values.{i}.{kv}", self.elem,
                            ir.Shape(["batch_size", kv_heads, "past_sequence_length", head_dim]))
                     for i in range(n_layers) for kv in ("key", "value")]
        self.presents: list[ir.Value] = []
        self._mask_subgraph()

    # -- small helpers ------------------------------------------------------------------------------
    def op(self, op_type: str, inputs, attrs=None, domain: str = "", n_out: int = 1, name: str | None = None):
        """One node; returns its output value (or a list of `n_out` values)."""
        if n_out == 1:
            return self.tape.op(op_type, inputs, attrs, domain=domain, name=name)
        return self.tape.op_multi_out(op_type, inputs, attrs, domain=domain, num_outputs=n_out, name=name)

    def weight(self, name: str, t: torch.Tensor) -> ir.Value:
        """An initializer in the graph dtype from a torch tensor (any float dtype; bf16 included), converted
        when it is written (onnx_io.lazy_initializer: no converted copy of the whole model is held)."""
        return self.tape.initializer(lazy_initializer(t, self.dtype, name), name=name)

    def matmul_weight(self, name: str, w: torch.Tensor) -> ir.Value:
        """W (out, in) stored transposed (in, out), as MatMul(x, W^T) wants it (transposed when written); `w` may be
        a list of row blocks (a fused weight), stacked when written."""
        return self.tape.initializer(lazy_initializer(w, self.dtype, name, transpose=True), name=name)

    def const_i64(self, values, name: str) -> ir.Value:
        """An int64 initializer (cached by name)."""
        if name not in self._consts:
            self._consts[name] = self.tape.initializer(ir.tensor(np.asarray(values, dtype=np.int64), name=name),
                                                       name=name)
        return self._consts[name]

    def const_f(self, value: float, name: str) -> ir.Value:
        """A scalar float initializer in the graph dtype."""
        if name not in self._consts:
            self._consts[name] = self.weight(name, torch.tensor(value, dtype=torch.float64))
        return self._consts[name]

    # -- mask: seqlens_k, total_sequence_length, last-position index ---------------------------------------
    def _mask_subgraph(self) -> None:
        one = self.const_i64([1], "const_i64_1")
        lens = self.op("ReduceSum", [self.attention_mask, one], {"keepdims": 0})  # (B,) = L_b
        self.seqlens64 = self.op("Sub", [lens, one])  # (B,) L_b - 1
        self.seqlens_k = self.op("Cast", [self.seqlens64], {"to": ir.DataType.INT32})
        width = self.op("Gather", [self.op("Shape", [self.attention_mask]), self.const_i64(1, "const_i64_s1")],
                        {"axis": 0})  # () W = total_sequence_length
        self.width = width
        self.total_len = self.op("Cast", [width], {"to": ir.DataType.INT32})
        self.seq_len = self.op("Shape", [self.input_ids], {"start": 1, "end": 2})  # (1,) T

    def positions(self) -> ir.Value:
        """position_ids (B, T) from the mask: cumsum - 1 over the last T columns (right padding), built once."""
        if getattr(self, "_positions", None) is None:
            pos = self.op("Sub", [self.op("CumSum", [self.attention_mask, self.const_i64(1, "const_i64_s1")]),
                                  self.const_i64([1], "const_i64_1")])  # (B, W)
            self._positions = self.op("Slice", [pos, self.op("Neg", [self.seq_len]),
                                                self.const_i64([2**62], "const_i64_big"),
                                                self.const_i64([1], "const_i64_1")])  # (B, T)
        return self._positions

    def _pos0_mask(self) -> ir.Value:
        """(B, T, 1) bool: position == 0 (a right-padded row's first column), built once per graph."""
        if getattr(self, "_is0", None) is None:
            self._p0: dict[float, ir.Value] = {}
            is0 = self.op("Equal", [self.positions(), self.const_i64(0, "const_i64_s0")], name="pos0/Equal")  # (B, T)
            self._is0 = self.op("Unsqueeze", [is0, self.const_i64([2], "const_i64_2")], name="pos0/Unsqueeze")
        return self._is0

    def pos0_table(self, ratios: list[float]) -> None:
        """The "split" form (POS0_FORM): every norm's factor at once, P = Where(mask, [r_1 .. r_n], 1) (B, T, n)
        split into n (B, T, 1) outputs: 2 nodes for all norms instead of one Where each. Call before the norms."""
        ratios = list(dict.fromkeys(ratios))
        mask = self._pos0_mask()
        table = self.weight("pos0_ratio_table", torch.tensor(ratios, dtype=torch.float64))  # (n,)
        ones = self.weight("pos0_ones", torch.ones(len(ratios), dtype=torch.float64))
        full = self.op("Where", [mask, table, ones], name="pos0/Where_table")  # (B, T, n)
        parts = [full] if len(ratios) == 1 else self.op(
            "Split", [full], {"axis": -1, "num_outputs": len(ratios)}, n_out=len(ratios), name="pos0/Split")
        self._p0.update(zip(ratios, parts))

    def pos0_factor(self, ratio: float) -> ir.Value:
        """p (B, T, 1) = where(position == 0, ratio, 1) in the graph dtype (tapernorm/pos0.py's factor of a norm with
        position 0's own scale c0, ratio = c0 / c): the Equal once per graph, one Where per distinct ratio (or a
        slice of pos0_table's split). Decode steps have every position > 0, so p is 1 there."""
        mask = self._pos0_mask()
        if ratio not in self._p0:
            k = len(self._p0)
            self._p0[ratio] = self.op("Where", [mask, self.const_f(ratio, f"pos0_ratio_{k}"),
                                                self.const_f(1.0, "const_f_1")], name=f"pos0/Where_{k}")  # (B, T, 1)
        return self._p0[ratio]

    def _with_pos0(self, spec: NormSpec, y: ir.Value) -> ir.Value:
        """y * p for a norm with position 0's own scale (named `<norm>/pos0`: compile counts these), else y."""
        if spec.pos0 is None:
            return y
        return self.op("Mul", [y, self.pos0_factor(spec.pos0)], name=f"{spec.name}/pos0")

    def last_position(self, h: ir.Value) -> ir.Value:
        """h (B, T, d) -> (B, 1, d) at each row's last real position: max(L_b - 1 - (W - T), 0)."""
        offset = self.op("Sub", [self.width, self.seq_len])  # (1,) W - T (= past length when not ragged)
        idx = self.op("Max", [self.op("Sub", [self.seqlens64, offset]), self.const_i64(0, "const_i64_s0")])
        idx = self.op("Unsqueeze", [idx, self.const_i64([1, 2], "const_i64_12")])  # (B, 1, 1)
        return self.op("GatherND", [h, idx], {"batch_dims": 1})  # (B, 1, d)

    # -- attention -----------------------------------------------------------------------------------------
    def attention(self, layer: int, qkv, cos: ir.Value | None, sin: ir.Value | None, scale: float | None = None,
                  softcap: float | None = None, window: int | None = None) -> ir.Value:
        """GroupQueryAttention on packed qkv (B, T, (H + 2 Hkv) D) or [q, k, v]; records the presents;
        returns (B, T, H D). `scale`: the softmax scale (None: 1/sqrt(D)); `softcap`: tanh capping of the
        scores; `window`: sliding window in tokens as Hugging Face counts it (the query itself and window - 1 before it).

        Rotary (cos/sin given, (S, R/2) with R <= D rotated dims) runs inside GroupQueryAttention (`do_rotary`),
        whose CPU kernel needs head_dim % 16 == 0 and R/2 a multiple of 8; other shapes (test-size models) get a
        separate RotaryEmbedding on q and k.
        """
        attrs = {"num_heads": self.n_heads, "kv_num_heads": self.kv_heads,
                 "local_window_size": int(window) if window else -1}
        if scale is not None:
            attrs["scale"] = float(scale)
        if softcap:
            attrs["softcap"] = float(softcap)
        qkv_in = list(qkv) if isinstance(qkv, (list, tuple)) else [qkv, None, None]
        if cos is not None and self.head_dim % 16 == 0 and int(cos.shape[1]) % 8 == 0:
            attrs.update(do_rotary=1, rotary_interleaved=0)
        elif cos is not None:
            if qkv_in[1] is None:
                qkv_in = self.op("Split", [qkv, self.const_i64([self.n_heads * self.head_dim] + [self.kv_heads *
                                 self.head_dim] * 2, "const_i64_qkv_split")], {"axis": -1}, n_out=3)
            q, k, v = qkv_in
            rot_dim = {"rotary_embedding_dim": int(cos.shape[1]) * 2} if int(cos.shape[1]) * 2 < self.head_dim else {}
            rot = [self.op("RotaryEmbedding", [t, self.positions(), cos, sin],
                           {"num_heads": n, "interleaved": 0, **rot_dim}, domain=MS)
                   for t, n in ((q, self.n_heads), (k, self.kv_heads))]
            qkv_in, cos, sin = [rot[0], rot[1], v], None, None
        pk, pv = self.past[2 * layer], self.past[2 * layer + 1]
        out, k, v = self.op("GroupQueryAttention",
                            [*qkv_in, pk, pv, self.seqlens_k, self.total_len, cos, sin],
                            attrs, domain=MS, n_out=3, name=f"layers.{layer}.attn")
        for val, kv in ((k, "key"), (v, "value")):
            val.name = f"present.{layer}.{kv}"
            val.dtype = self.elem
            val.shape = ir.Shape(["batch_size", self.kv_heads, "total_sequence_length", self.head_dim])
            self.presents.append(val)
        return out

    # -- norms with the residual add fused in ----------------------------------------------------------
    def norm(self, spec: NormSpec, residual: ir.Value, delta: ir.Value | None, delta_bias: torch.Tensor | None
             ) -> tuple[ir.Value, ir.Value]:
        """Apply `spec` to the stream residual + delta (+ delta_bias); returns (normed, new residual)."""
        n = spec.name
        if spec.kind in ("rms", "ln") and delta is not None:
            ins = [delta, residual, self.weight(f"{n}.weight", spec.weight)]
            if spec.kind == "ln":
                ins.append(self.weight(f"{n}.bias", spec.bias))
                op = "SkipLayerNormalization"
            else:
                op = "SkipSimplifiedLayerNormalization"
            if delta_bias is not None:  # Skip*Norm's bias input: SkipSimplified index 3, SkipLayer index 4
                ins.append(self.weight(f"{n}.residual_bias", delta_bias))
            outs = self.op(op, ins, {"epsilon": spec.eps}, domain=MS, n_out=4, name=n)
            for unused in outs[1:3]:
                unused.name = ""
            return outs[0], outs[3]
        x = residual
        if delta is not None:
            if delta_bias is not None:
                delta = self.op("Add", [delta, self.weight(f"{n}.residual_bias", delta_bias)])
            x = self.op("Add", [residual, delta])
        if spec.prescale is not None:  # bounded map: tanh(x * c / B [* p]), then B gamma_t folded or explicit
            return self._bounded(spec, x), x
        if spec.kind == "none":  # folded; a c0 norm keeps its per-token factor on the normed branch only
            return self._with_pos0(spec, x), x
        if spec.kind == "map_rms":
            return self._with_pos0(spec, self.op("Mul", [x, self.weight(f"{n}.taper_scale", spec.weight)], name=n)), x
        if spec.kind == "map_ln":
            mean = self.op("ReduceMean", [x, self.const_i64([-1], "const_i64_m1")], {"keepdims": 1},
                           name=f"{n}/ReduceMean")  # the map's mean-centering (linear, not a statistic)
            scaled = self.op("Mul", [self.op("Sub", [x, mean]), self.weight(f"{n}.taper_scale", spec.weight)])
            scaled = self._with_pos0(spec, scaled)  # before the shift: (x - mean) * s * p + beta_t
            return self.op("Add", [scaled, self.weight(f"{n}.taper_bias", spec.bias)], name=n), x
        if spec.kind == "rms":  # no residual yet (first norm): the form ORT fuses to SimplifiedLayerNormalization
            two = self.const_f(2.0, "const_f_2")
            ms = self.op("ReduceMean", [self.op("Pow", [x, two], name=f"{n}/Pow"), self.const_i64([-1], "const_i64_m1")],
                         {"keepdims": 1}, name=f"{n}/ReduceMean")
            denom = self.op("Sqrt", [self.op("Add", [ms, self.const_f(spec.eps, f"{n}.eps")])], name=f"{n}/Sqrt")
            return self.op("Mul", [self.op("Div", [x, denom]), self.weight(f"{n}.weight", spec.weight)], name=n), x
        if spec.kind == "ln":
            return self.op("LayerNormalization", [x, self.weight(f"{n}.weight", spec.weight),
                                                  self.weight(f"{n}.bias", spec.bias)],
                           {"axis": -1, "epsilon": spec.eps}, name=n), x
        raise ValueError(f"{n}: unknown norm kind {spec.kind!r}")

    def _bounded(self, spec: NormSpec, x: ir.Value) -> ir.Value:
        """tapernorm/bound.py's gate-0 map: Tanh(x * c / B [* p]), times B gamma_t unless the fold took it."""
        n = spec.name
        a = self.weight(f"{n}.bound_prescale", spec.prescale.double())  # () or (d,) in the graph dtype
        u = self._with_pos0(spec, self.op("Mul", [x, a], name=f"{n}/bound_prescale"))
        t = self.op("Tanh", [u], name=f"{n}/bound")
        if spec.kind == "none":
            return t
        if spec.kind == "map_rms":
            return self.op("Mul", [t, self.weight(f"{n}.taper_scale", spec.weight)], name=n)
        raise LeanError(f"{n}: a bounded {spec.kind} map has no lean form (bounded maps are RMS only)")

    def head_norm(self, spec: NormSpec, x: ir.Value, heads: int | None) -> ir.Value:
        """A norm (or map) on q / k (B, T, H D): over each head's D features when `heads`, else over all H D."""
        if spec.is_noop:
            return x
        if heads is None:
            return self.norm(spec, x, None, None)[0]
        if spec.pos0 is not None:  # c0: p (B, T, 1) is one scalar per token, so it scales the (B, T, H D) input,
            # whatever layout the PyTorch model calls the norm on (Qwen3 (B, T, H, D), Gemma 3 (B, H, T, D): token_dim)
            x = self._with_pos0(spec, x)  # exact for every gate-0 form: RMS x*s*p, LN (xp - mean xp)*s + beta_t
            spec = dataclasses.replace(spec, pos0=None)
            if spec.kind == "none":
                return x
        split = self.op("Reshape", [x, self.const_i64([0, 0, heads, -1], f"const_i64_heads_{heads}")])  # (B, T, H, D)
        y = self.norm(spec, split, None, None)[0]
        return self.op("Reshape", [y, self.const_i64([0, 0, -1], "const_i64_merge_heads")])  # (B, T, H D)

    def linear(self, name: str, x: ir.Value, w: torch.Tensor, b: torch.Tensor | None = None) -> ir.Value:
        """MatMul(x, W^T) (+ b)."""
        y = self.op("MatMul", [x, self.matmul_weight(f"{name}.weight", w)], name=name)
        return self.op("Add", [y, self.weight(f"{name}.bias", b)]) if b is not None else y

    # -- finish ------------------------------------------------------------------------------------------
    def model(self, logits: ir.Value, metadata: dict[str, str], ir_version: int) -> ir.Model:
        """The ir.Model with the fixed interface and string metadata."""
        logits.name, logits.dtype = "logits", self.elem
        logits.shape = ir.Shape(["batch_size", 1, self.vocab])
        graph = ir.Graph(inputs=[self.input_ids, self.attention_mask, *self.past],
                         outputs=[logits, *self.presents], nodes=self.tape.nodes,
                         initializers=self.tape.initializers, opset_imports={"": OPSET, MS: 1},
                         name="tapernorm_lean")
        model = ir.Model(graph, ir_version=ir_version, producer_name="tapernorm.compiler.lean")
        model.metadata_props.update(metadata)
        return model
