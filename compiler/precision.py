"""`tapernorm compile --precision fp32|fp16|bf16|int8|int4`: the plan, the post-build step and its parity.

The fold always runs in fp32 (the checkpoint is captured and folded in float32); then
- fp16 / bf16: the lean builder writes the graph in that dtype from the fp32-folded weights (GroupQueryAttention,
  KV cache, logits included); the generic graph is cast after export with onnxruntime's float16 converter
  (fp16 only: there is no maintained bf16 converter, so generic bf16 is refused);
- int8 / int4: model.onnx and model_unfused.onnx are written in fp32 and then quantized weight-only by
  compiler.quantize (onnxruntime's MatMulNBitsQuantizer); activations, KV cache and logits stay fp32.
Parity is against the fp32 PyTorch model: the prompt's logits within a per-precision tolerance (relative to
the logit scale) and the greedy-agreement rate along PyTorch's own greedy continuation of a fixed prompt set
(teacher-forced: each step feeds PyTorch's token, so one early flip does not count twice), with a floor per
precision. Exact greedy identity is required only at fp32 (parity.check_parity).
"""
from __future__ import annotations

import math
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np
import torch

from tapernorm.runtime.tokenizer import find_tokenizer, load_tokenizer

from .quantize import QuantizeError, QuantSpec, cast_fp16_file, quantize_file

__all__ = ["PRECISIONS", "PrecisionPlan", "PrecisionError", "plan_precision", "apply_precision",
           "precision_parity", "PRECISION_TOL", "AGREEMENT_FLOOR", "PARITY_PROMPTS"]

PRECISIONS = ("fp32", "fp16", "bf16", "int8", "int4")
GRAPH_DTYPE = {"fp32": "float32", "fp16": "float16", "bf16": "bfloat16", "int8": "float32", "int4": "float32"}
# max |logit diff| / max(1, max |logit|) against the fp32 PyTorch model, and the least greedy agreement
PRECISION_TOL = {"fp32": 1e-3, "fp16": 2e-2, "bf16": 8e-2, "int8": 0.15, "int4": 0.75}
AGREEMENT_FLOOR = {"fp32": 1.0, "fp16": 0.9, "bf16": 0.75, "int8": 0.75, "int4": 0.5}
PARITY_PROMPTS = ("Once upon a time", "The capital of France is", "def fibonacci(n):",
                  "Water boils at a temperature of")
CPU_NO_KERNELS = {"bf16": "onnxruntime's CPUExecutionProvider has no bfloat16 kernels for MatMul / "
                          "GroupQueryAttention"}


class PrecisionError(ValueError):
    """The precision cannot be built or run as asked (one line: what, where, what to pick instead)."""


@dataclass
class PrecisionPlan:
    """What compile does for a precision: graph dtype, quantization spec (int8/int4), provider."""
    precision: str
    graph_dtype: str
    quant: QuantSpec | None
    provider: str

    def to_dict(self) -> dict:
        """JSON-ready dict."""
        return asdict(self)


def plan_precision(precision: str, dtype: str = "float32", provider: str = "cpu", block_size: int = 32,
                   accuracy_level: int | None = None) -> PrecisionPlan:
    """Check the request and decide the graph dtype and quantization; one-line PrecisionError otherwise."""
    if precision not in PRECISIONS:
        raise PrecisionError(f"precision {precision!r} is not one of {list(PRECISIONS)}")
    if precision != "fp32" and dtype != "float32":
        raise PrecisionError(f"--precision {precision} folds in float32 and then casts or quantizes; leave --dtype "
                             f"at float32 (--dtype {dtype} alone folds in {dtype})")
    if provider == "cpu" and precision in CPU_NO_KERNELS:
        raise PrecisionError(f"--precision {precision} cannot run on provider cpu: {CPU_NO_KERNELS[precision]}; "
                             "pick --precision fp16 (or fp32 / int8 / int4) on CPU, or --provider cuda for bf16")
    if accuracy_level is not None and accuracy_level not in (0, 1, 2, 3, 4):
        raise PrecisionError(f"--accuracy-level {accuracy_level} is not one of 0 (unset), 1 fp32, 2 fp16, "
                             "3 bf16, 4 int8")
    quant = None
    if precision in ("int8", "int4"):
        level = accuracy_level if accuracy_level is not None else (4 if provider == "cpu" else 0)
        quant = QuantSpec(bits=int(precision[3:]), block_size=block_size, accuracy_level=level or None)
    return PrecisionPlan(precision, GRAPH_DTYPE[precision] if precision != "fp32" else dtype, quant, provider)


def apply_precision(out: Path, plan: PrecisionPlan, graph: str, files=("model.onnx", "model_unfused.onnx"),
                    log=None) -> dict:
    """Rewrite the fp32 files compile wrote in `out` to the plan's precision (in place); returns the report part."""
    log = log or (lambda m: None)
    rep: dict = {"name": plan.precision, "graph_dtype": plan.graph_dtype, "fold_dtype": "float32", "files": {}}
    if plan.quant is not None:
        for f in files:
            log(f"quantize {f}: int{plan.quant.bits} weight-only MatMulNBits, block {plan.quant.block_size}, "
                f"accuracy level {plan.quant.accuracy_level or 0}")
            try:
                rep["files"][f] = quantize_file(out / f, out / f, plan.quant).to_dict()
            except QuantizeError as e:
                raise PrecisionError(f"{f}: {e}") from None
    elif plan.precision in ("fp16", "bf16") and graph == "generic":
        if plan.precision == "bf16":
            raise PrecisionError("--precision bf16 needs the lean graph (there is no maintained bf16 converter for "
                                 "the generic export); compile with --graph lean, or pick --precision fp16")
        for f in files:
            log(f"cast {f} to float16 (onnxruntime's float16 converter)")
            rep["files"][f] = cast_fp16_file(out / f, out / f)
    elif plan.precision in ("fp16", "bf16"):
        rep["files"] = {f: {"cast": "lean builder writes the fp32-folded weights in " + plan.graph_dtype}
                        for f in files}
    return rep


def _prompts(info: dict, cfg, prompt_ids_fn) -> list[list[int]]:
    """The fixed prompt set as token ids (tokenizer prompts, else deterministic id prompts)."""
    if info.get("tokenizer_path"):
        return [prompt_ids_fn(info, cfg, p) for p in PARITY_PROMPTS]
    tok_file = find_tokenizer(info["dir"]) if info.get("dir") else None  # an HF dir's tokenizer.json
    if tok_file is not None:
        tok = load_tokenizer(tok_file)
        return [[i for i in tok.encode(p) if 0 <= i < cfg.vocab_size] for p in PARITY_PROMPTS]
    return [[(k * i + 3) % cfg.vocab_size for i in range(8)] for k in (7, 11, 13, 17)]


def _teacher_forced(sess, prompt: list[int], ref_tokens: list[int]) -> tuple[int, np.ndarray]:
    """Argmax agreements of the ORT graph along PyTorch's greedy tokens, and its first-step logits (V,)."""
    from tapernorm.runtime.generate import OrtDecoder

    dec = OrtDecoder(sess)
    last = dec.start(np.asarray([prompt], dtype=np.int64))[0].astype(np.float32)  # (V,)
    first, agree = last, 0
    for i, tok in enumerate(ref_tokens):
        agree += int(int(last.argmax()) == tok)
        if i < len(ref_tokens) - 1:
            last = dec.step(np.asarray([tok], dtype=np.int64))[0].astype(np.float32)
    return agree, first


def precision_parity(model, cfg, sessions: dict, info: dict, prompt_ids_fn, torch_greedy, n_new: int,
                     plan: PrecisionPlan) -> dict:
    """Parity of each session against the fp32 PyTorch model over the prompt set; raises PrecisionParityError."""
    prompts = [p[: cfg.max_seq_len - n_new] for p in _prompts(info, cfg, prompt_ids_fn)]
    tol_rel, floor = PRECISION_TOL[plan.precision], AGREEMENT_FLOOR[plan.precision]
    refs = []
    for p in prompts:
        toks, logits = torch_greedy(model, p, n_new)
        refs.append((toks, logits[0]))
    scale = max(1.0, max(float(np.abs(first).max()) for _, first in refs))
    out = {"precision": plan.precision, "prompts": len(prompts), "new_tokens": n_new, "logit_scale": scale,
           "tolerance_rel": tol_rel, "tolerance": tol_rel * scale, "agreement_floor": floor,
           "torch_tokens": [t for t, _ in refs], "graphs": {}}
    failures = []
    for name, sess in sessions.items():
        agree, worst = 0, 0.0
        for p, (toks, first) in zip(prompts, refs):
            a, got = _teacher_forced(sess, p, toks)
            agree += a
            worst = max(worst, float(np.abs(got - first).max()))
        rate = agree / (len(prompts) * n_new)
        out["graphs"][name] = {"prompt_logits_max_abs_diff": worst, "greedy_agreement": rate,
                               "providers": sess.providers}
        if not math.isfinite(worst):
            failures.append(f"{name}: logits are not finite in {plan.graph_dtype} (overflow); pick --precision "
                            f"{'bf16 (fp32 range) or fp32' if plan.precision == 'fp16' else 'fp32'}")
        elif worst > out["tolerance"]:
            failures.append(f"{name}: max |logit diff| {worst:.3g} > tol {out['tolerance']:.3g} "
                            f"({tol_rel:g} x logit scale {scale:.3g}) at {plan.precision} (greedy agreement {rate:.0%})")
        if rate < floor:
            failures.append(f"{name}: greedy agreement {rate:.0%} < {floor:.0%} at {plan.precision}")
    out["ok"] = not failures
    if failures:
        raise PrecisionParityError("parity failed (nothing written): " + "; ".join(failures))
    return out


class PrecisionParityError(RuntimeError):
    """The cast / quantized graph is further from the fp32 PyTorch model than its precision allows."""


def half_dtype(plan: PrecisionPlan) -> torch.dtype | None:
    """The torch dtype the lean builder writes for fp16 / bf16 plans (None otherwise)."""
    return {"float16": torch.float16, "bfloat16": torch.bfloat16}.get(plan.graph_dtype)
