"""SpecLean: the lean graph of any decoder a FamilySpec describes, from the folded weights by module name.

The weights are the pass library's GraphModule tensors keyed by Hugging Face module names (weights.py); the
structure comes from the spec (families.py) and from the model's own modules and config: attention `scaling`,
`sliding_window`, `attn_logit_softcapping`, the rotary module's cos/sin, Granite's multipliers, SmolLM3's
no-rope layers, final logit soft-capping. Per block (pre-norm form; `None` norms are skipped):

    h = pre_attn(residual + delta)          SkipSimplifiedLayerNormalization (kept), nothing (folded), Mul (map)
    q, k, v = qkv(h) [QK-norms]             packed MatMul (+ bias) or three MatMuls when a QK-norm is kept / mapped
    a = o(GQA(q, k, v, cos, sin))           GroupQueryAttention: rotary, window, softcap, scale
    a = post_attn(a)                        sandwich / OLMo2 post-norms (folded backward: nothing left)
    h = pre_mlp(residual + a)               (parallel residual: the same residual, no add)
    delta = post_mlp(down(act(gate) * up))  SiLU (Sigmoid*Mul), GELU-tanh (FastGelu), GELU (Gelu)
"""
from __future__ import annotations

import math

import torch
import torch.nn as nn

from tapernorm.hf_config import GUARDED_KEY

from .families import DecoderDims, FamilySpec
from . import graph as graph_module
from .graph import MS, LeanGraph
from .weights import LeanError, NormSpec

__all__ = ["SpecLean", "ACTIVATIONS", "ROPE_TYPES", "check_config"]

ACTIVATIONS = {"silu": "silu", "swish": "silu", "gelu_pytorch_tanh": "gelu_tanh", "gelu_new": "gelu_tanh",
               "gelu_fast": "gelu_tanh", "gelu_tanh": "gelu_tanh", "gelu": "gelu"}
ROPE_TYPES = ("default", "linear", "llama3", "yarn")  # a fixed cos/sin cache expresses them exactly


def _act_key(cfg, default: str) -> tuple[str, str]:
    guarded = getattr(cfg, GUARDED_KEY, None) or {}  # a tapered model's live config keeps the real value here
    for key in ("hidden_activation", "hidden_act", "activation_function"):
        v = guarded.get(key, getattr(cfg, key, None))
        if v is not None:
            return key, str(v)
    return "spec act", default  # tapernorm's ModelConfig: the arch fixes it


def _rope_types(cfg) -> list[tuple[str, str]]:
    """[(config key, rope_type)] over rope_parameters (one dict, or one per layer type as in Gemma 3)."""
    rp = getattr(cfg, "rope_parameters", None) or getattr(cfg, "rope_scaling", None) or {}
    if isinstance(rp, dict) and rp and all(isinstance(v, dict) for v in rp.values()):
        return [(f"rope_parameters.{k}.rope_type", v.get("rope_type", v.get("type", "default"))) for k, v in rp.items()]
    return [("rope_parameters.rope_type", (rp or {}).get("rope_type", (rp or {}).get("type", "default")))]


def check_config(spec: FamilySpec, cfg) -> str:
    """The lean activation ("silu" | "gelu_tanh" | "gelu") of a config the spec maps; LeanError naming the key of
    a value outside it (an activation without a lean op, a rope scaling a fixed cos/sin cache cannot express)."""
    key, act = _act_key(cfg, spec.act)
    if act not in ACTIVATIONS:
        raise LeanError(f"config {key}={act!r}: no lean op for this activation (have {sorted(ACTIVATIONS)}); "
                        "compile with --graph generic")
    if spec.rope:
        for k, t in _rope_types(cfg):
            if t not in ROPE_TYPES:
                raise LeanError(f"config {k}={t!r}: a fixed cos/sin cache cannot express this rope scaling "
                                f"(have {list(ROPE_TYPES)}); compile with --graph generic")
    return ACTIVATIONS[act]


class SpecLean:
    """Walks the blocks of `root` (an HF causal LM or a DecoderLM) as `spec` says and emits the lean graph."""

    def __init__(self, spec: FamilySpec, root: nn.Module, dims: DecoderDims, cfg, linears: dict,
                 norms: dict[str, NormSpec], dtype: torch.dtype):
        self.spec, self.root, self.dims, self.cfg, self.lin, self.norms = spec, root, dims, cfg, linears, norms
        self.act = check_config(spec, cfg)
        if dims.head_dim % 8:
            raise LeanError(f"{spec.layers}.0.{spec.attn}: head_dim {dims.head_dim} is not a multiple of 8, which "
                            "GroupQueryAttention needs; compile with --graph generic")
        self._check_linears()
        self.g = LeanGraph(dims.num_layers, dims.num_heads, dims.num_kv_heads, dims.head_dim, dims.vocab, dtype)
        self._rope: dict = {}
        self.mult = {k: float(getattr(cfg, k, None) or 1.0)
                     for k in ("embedding_multiplier", "residual_multiplier", "logits_scaling")}

    def linear_paths(self) -> list[str]:
        """Every linear module path the spec reads from the captured graph."""
        s = self.spec
        attn = [s.qkv] if s.qkv else [s.q, s.k, s.v]
        mlp = [s.gate_up] if s.gate_up else list(s.mlp_in)
        per = [f"{s.attn}.{n}" for n in (*attn, s.o)] + [*mlp, s.mlp_out]
        return [self.p(i, n) for i in range(self.dims.num_layers) for n in per] + [s.lm_head]

    def _check_linears(self) -> None:
        want = self.linear_paths()
        extra, missing = [p for p in self.lin if p not in set(want)], [p for p in want if p not in self.lin]
        if extra or missing:
            where = (extra or missing)[0]
            raise LeanError(f"{where}: the captured graph's linears differ from the {self.spec.name} spec "
                            f"({'unexpected' if extra else 'missing'}: {(extra or missing)[:4]}); "
                            "compile with --graph generic")

    # -- names ---------------------------------------------------------------------------------------------
    def p(self, i: int, name: str) -> str:
        return f"{self.spec.layers}.{i}.{name}"

    def w(self, path: str):
        try:
            return self.lin[path]
        except KeyError:
            raise LeanError(f"{path}: no such linear in the captured graph (have e.g. {sorted(self.lin)[:3]}); the "
                            f"{self.spec.name} spec does not match this model - compile with --graph generic") from None

    def norm(self, path: str | None) -> NormSpec | None:
        return None if path is None else self.norms[path]

    # -- rope ------------------------------------------------------------------------------------------------
    def rope(self, i: int):
        """(cos, sin) caches (S, R/2) for layer i, or (None, None) for a layer without rotary."""
        s, cfg = self.spec, self.cfg
        if not s.rope or (getattr(cfg, "no_rope_layers", None) and not cfg.no_rope_layers[i]):
            return None, None
        layer_types = getattr(cfg, "layer_types", None)
        rot = self.root.get_submodule(s.rotary) if s.rotary else None
        key = layer_types[i] if layer_types and rot is not None and hasattr(rot, f"{layer_types[i]}_inv_freq") else None
        if key not in self._rope:
            self._rope[key] = self._rope_cache(rot, key)
        return self._rope[key]

    @torch.no_grad()
    def _rope_cache(self, rot, layer_type):
        S = self.dims.max_seq_len
        pos = torch.arange(S, dtype=torch.int64)[None]  # (1, S)
        if rot is None:  # tapernorm's DecoderLM keeps inv_freq on the model
            freqs = pos[0, :, None].float() * self.root.inv_freq.float()[None, :]  # (S, D/2)
            cos, sin = freqs.cos(), freqs.sin()
        else:
            x = torch.zeros(1, dtype=torch.float32)
            cs = rot(x, pos, layer_type) if layer_type is not None else rot(x, pos)
            cos, sin = (t[0].float() for t in cs)  # (S, R) = cat(freqs, freqs) * attention_scaling
            half = cos.shape[-1] // 2
            if not torch.equal(cos[:, :half], cos[:, half:]):
                raise LeanError(f"{self.spec.layers}: rotary cos/sin are not in the half-split layout "
                                "GroupQueryAttention rotates; compile with --graph generic")
            cos, sin = cos[:, :half], sin[:, :half]
        tag = layer_type or "rope"
        return self.g.weight(f"{tag}.cos_cache", cos), self.g.weight(f"{tag}.sin_cache", sin)

    # -- graph -----------------------------------------------------------------------------------------------
    def build(self) -> LeanGraph:
        """Emit the whole graph; the logits value is `self.logits` (B, 1, V)."""
        g, s = self.g, self.spec
        residual, delta, bias = self.embed()
        ratios = [n.pos0 for n in self.norms.values() if n.pos0 is not None]
        if ratios and graph_module.POS0_FORM == "split":  # every position-0 factor from one Where + Split
            g.pos0_table(ratios)
        for i in range(self.dims.num_layers):
            pre_a, pre_m = (self.norm(self.p(i, n)) if n else None for n in s.pre_norms)
            post_a, post_m = (self.norm(self.p(i, n)) if n else None for n in s.post_norms)
            h, residual = self.pre(pre_a, f"{self.p(i, 'attn_in')}", residual, delta, bias)
            a, a_bias = self.attention(i, h)
            a, a_bias = self.post(post_a, a, a_bias)
            if s.parallel:
                h2, _ = g.norm(pre_m, residual, None, None)
                m, m_bias = self.mlp(i, h2)
                delta = g.op("Add", [a, m])
                bias = None if a_bias is None and m_bias is None else sum(b for b in (a_bias, m_bias) if b is not None)
                continue
            h, residual = self.pre(pre_m, f"{self.p(i, 'mlp_in')}", residual, a, a_bias)
            m, m_bias = self.mlp(i, h)
            delta, bias = self.post(post_m, m, m_bias)
        h, _ = self.pre(self.norm(s.final_norm), "final_in", residual, delta, bias)
        w, b = self.w(s.lm_head)
        scale = 1.0 / self.mult["logits_scaling"]
        logits = g.linear("lm_head", g.last_position(h), w * scale if scale != 1.0 else w,
                          b * scale if b is not None and scale != 1.0 else b)  # (B, 1, V)
        cap = getattr(self.cfg, "final_logit_softcapping", None)
        if cap:
            c = g.const_f(float(cap), "final_logit_softcap")
            logits = g.op("Mul", [g.op("Tanh", [g.op("Div", [logits, c])]), c])
        self.logits = logits
        return g

    def pre(self, spec: NormSpec | None, where: str, residual, delta, bias):
        """(normed input, new residual) of residual + delta (+ bias); a block without this norm adds only."""
        if spec is not None:
            return self.g.norm(spec, residual, delta, bias)
        if delta is None:
            return residual, residual
        if bias is not None:
            delta = self.g.op("Add", [delta, self.g.weight(f"{where}.residual_bias", bias)])
        x = self.g.op("Add", [residual, delta])
        return x, x

    def post(self, spec: NormSpec | None, x, bias):
        """A post-norm on a block output (x + bias); returns (value, bias still to add)."""
        if spec is None or spec.is_noop:
            return x, bias
        if bias is not None:
            x, bias = self.g.op("Add", [x, self.g.weight(f"{spec.name}.input_bias", bias)]), None
        return self.g.norm(spec, x, None, None)[0], None

    def embed(self):
        g, s = self.g, self.spec
        table = self.root.get_submodule(s.embed).weight
        x = g.op("Gather", [g.weight(f"{s.embed}.weight", table), g.input_ids], {"axis": 0})  # (B, T, d)
        scale = self.mult["embedding_multiplier"] * (math.sqrt(self.dims.hidden) if s.embed_scale else 1.0)
        if scale != 1.0:
            x = g.op("Mul", [x, g.const_f(scale, "embed_scale")])
        if s.positions:
            pe = g.op("Gather", [g.weight(f"{s.positions}.weight", self.root.get_submodule(s.positions).weight),
                                 g.positions()], {"axis": 0})  # (B, T, d)
            return pe, x, None  # the first norm's Skip form adds the token embeddings
        return x, None, None

    def qkv_weights(self, i: int):
        """(W: the fused (rows, in) tensor or the [q, k, v] row blocks, stacked when written; b or None;
        part sizes)."""
        s, d = self.spec, self.dims
        sizes = [d.num_heads * d.head_dim, d.num_kv_heads * d.head_dim, d.num_kv_heads * d.head_dim]
        if s.qkv:
            w, b = self.w(self.p(i, f"{s.attn}.{s.qkv}"))
            if s.qkv_layout == "per_head":  # rows (H, 3, D): regroup to q | k | v
                w = w.reshape(d.num_heads, 3, d.head_dim, -1).transpose(0, 1).reshape(w.shape)
                b = b.reshape(d.num_heads, 3, d.head_dim).transpose(0, 1).reshape(-1) if b is not None else None
            return w, b, sizes
        ws = [self.w(self.p(i, f"{s.attn}.{n}")) for n in (s.q, s.k, s.v)]
        b = None if all(b is None for _, b in ws) else torch.cat(
            [b if b is not None else torch.zeros(w.shape[0], dtype=w.dtype) for w, b in ws])
        return [w for w, _ in ws], b, sizes  # stacked q | k | v rows when written (onnx_io.lazy_initializer)

    def attention(self, i: int, h):
        g, s, d = self.g, self.spec, self.dims
        w, b, sizes = self.qkv_weights(i)
        qkv = g.linear(self.p(i, f"{s.attn}.qkv_proj"), h, w, b)  # (B, T, (H + 2 Hkv) D)
        qn = [self.norm(self.p(i, f"{s.attn}.{n}")) for n in s.qk_norms] if s.qk_norms else [None, None]
        if any(n is not None and not n.is_noop for n in qn):
            q, k, v = g.op("Split", [qkv, g.const_i64(sizes, "const_i64_qkv_sizes")], {"axis": -1}, n_out=3)
            q = g.head_norm(qn[0], q, d.num_heads if s.qk_norm_heads else None)
            k = g.head_norm(qn[1], k, d.num_kv_heads if s.qk_norm_heads else None)
            qkv = [q, k, v]
        mod = self.root.get_submodule(self.p(i, s.attn))
        window = getattr(mod, "sliding_window", None) if hasattr(mod, "sliding_window") else \
            getattr(self.cfg, "sliding_window", None)
        scale = getattr(mod, "scaling", None)
        cos, sin = self.rope(i)
        a = g.attention(i, qkv, cos, sin, scale=scale, softcap=getattr(mod, "attn_logit_softcapping", None),
                        window=window)
        wo, bo = self.w(self.p(i, f"{s.attn}.{s.o}"))
        r = self.mult["residual_multiplier"]
        if r != 1.0:  # Granite: residual + r * block(x) -> r rides the block's last linear
            wo, bo = wo * r, (bo * r if bo is not None else None)
        return g.linear(self.p(i, f"{s.attn}.{s.o}"), a, wo), bo

    def mlp(self, i: int, h):
        g, s = self.g, self.spec
        if s.gated:
            if s.gate_up:
                wgu, bgu = self.w(self.p(i, s.gate_up))
            else:
                (wg, bg), (wu, bu) = (self.w(self.p(i, n)) for n in s.mlp_in)
                wgu = [wg, wu]  # stacked gate | up rows when written (onnx_io.lazy_initializer): no copy held
                bgu = None if bg is None and bu is None else torch.cat(
                    [bg if bg is not None else torch.zeros(wg.shape[0]), bu if bu is not None else torch.zeros(wu.shape[0])])
            gu = g.linear(self.p(i, "mlp.gate_up_proj"), h, wgu, bgu)  # (B, T, 2 F)
            gate, up = g.op("Split", [gu], {"axis": -1, "num_outputs": 2}, n_out=2)
            act = g.op("Mul", [self.activate(gate, None), up])
        else:
            wi, bi = self.w(self.p(i, s.mlp_in[0]))
            y = g.op("MatMul", [h, g.matmul_weight(f"{self.p(i, s.mlp_in[0])}.weight", wi)], name=self.p(i, s.mlp_in[0]))
            act = self.activate(y, None if bi is None else g.weight(f"{self.p(i, s.mlp_in[0])}.bias", bi))
        wd, bd = self.w(self.p(i, s.mlp_out))
        r = self.mult["residual_multiplier"]
        if r != 1.0:
            wd, bd = wd * r, (bd * r if bd is not None else None)
        return g.linear(self.p(i, s.mlp_out), act, wd), bd

    def activate(self, x, bias):
        """act(x + bias): SiLU as x * Sigmoid(x), GELU-tanh as FastGelu, GELU as Gelu (bias fused where the op has one)."""
        g = self.g
        if self.act == "silu":
            if bias is not None:
                x = g.op("Add", [x, bias])
            return g.op("Mul", [x, g.op("Sigmoid", [x])])
        ins = [x] if bias is None else [x, bias]
        return g.op("FastGelu" if self.act == "gelu_tanh" else "BiasGelu" if bias is not None else "Gelu", ins,
                    domain=MS)
