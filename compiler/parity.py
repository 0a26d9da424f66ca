"""Parity: the same greedy decode through PyTorch and through the runtime's ORT sessions, compared.

compile_checkpoint (pipeline.py) runs check_parity on every graph it built before anything is swapped into place:
the prompt's logits and each greedy step's logits must agree within PARITY_TOL (relative to the largest logit),
and, at fp32, the greedy tokens must be identical. Lower precisions compare against fp32 in precision.py.

When fp32 parity fails and the caller can give a float64 run of the same model (`reference64`), that run decides, as
the fold's check does (passes/verify.py): the graph passes when it picks float64's greedy tokens and its logits are
at most F64_SLACK x as far from float64's as PyTorch's own float32 run (plus the tolerance). A model whose float32
answer rounding decides (ill-conditioned on the prompt: docs/real_checkpoints.md, section 8.6) then compiles; a wrong
graph still fails, naming both distances.
"""
from __future__ import annotations

import math
from pathlib import Path

import numpy as np
import torch

from tapernorm.data import Tokenizer
from tapernorm.passes.verify import F64_SLACK
from tapernorm.runtime.generate import OrtDecoder
from tapernorm.runtime.session import DecoderSession

__all__ = ["PARITY_TOL", "ParityError", "ort_greedy", "torch_greedy", "torch_reference", "check_parity",
           "float64_opinion", "open_session", "prompt_ids"]

PARITY_TOL = {"float32": 1e-3, "float16": 1e-2, "bfloat16": 5e-2}  # max |logit diff| / max(1, max |logit|)


class ParityError(RuntimeError):
    """ONNX and PyTorch disagree; the message carries the figures."""


def ort_greedy(sess, prompt: list[int], n_new: int) -> tuple[list[int], list[np.ndarray]]:
    """Greedy decode through the runtime's KV-cached OrtDecoder (empty past at step 0) on a DecoderSession;
    returns (tokens, float32 logits (V,) of every step)."""
    dec = OrtDecoder(sess)
    last = dec.start(np.asarray([prompt], dtype=np.int64))  # (1, V)
    tokens, logits_seen = [], []
    for i in range(n_new):
        logits_seen.append(last[0].astype(np.float32))
        tokens.append(int(logits_seen[-1].argmax()))
        if i < n_new - 1:
            last = dec.step(np.asarray(tokens[-1:], dtype=np.int64))
    return tokens, logits_seen


def open_session(path: Path, provider: str, out_dir: Path):
    """A 1-thread runtime DecoderSession on a graph still in the build dir; errors name its final path."""
    try:
        return DecoderSession(path, provider=provider, intra_op_threads=1)
    except (ValueError, RuntimeError, OSError) as e:
        raise type(e)(str(e).replace(str(path.parent), str(out_dir))) from None


@torch.no_grad()
def torch_greedy(model, prompt: list[int], n_new: int, first_logits: dict | None = None
                 ) -> tuple[list[int], list[np.ndarray]]:
    """The same greedy loop on the PyTorch model (its own KV cache); `first_logits["logits"]` gets the first
    call's float32 logits of every prompt position (T, V) when a dict is given."""
    ids, past, pos, tokens, logits_seen = torch.tensor([prompt]), None, 0, [], []
    for _ in range(n_new):
        T = ids.shape[1]
        logits, past = model(ids, torch.ones(1, pos + T, dtype=torch.long), torch.arange(pos, pos + T)[None],
                             past, use_cache=True)
        if first_logits is not None and pos == 0:
            first_logits["logits"] = _numpy(logits[0])
        last = _numpy(logits[0, -1])
        logits_seen.append(last)
        pos += T
        tokens.append(int(last.argmax()))
        ids = torch.tensor([[tokens[-1]]])
    return tokens, logits_seen


def _numpy(t: torch.Tensor) -> np.ndarray:
    """float64 logits stay float64 (the second opinion); anything else becomes float32."""
    return t.numpy() if t.dtype == torch.float64 else t.float().numpy()


def torch_reference(model, prompt: list[int], n_new: int) -> tuple[list[int], list[np.ndarray], np.ndarray]:
    """PyTorch's side of parity: (greedy tokens, their float32 logits, full-prompt logits (T, V)); small enough
    to keep while the model itself is freed before onnxruntime loads the graphs."""
    first = {}
    ref_tokens, ref_logits = torch_greedy(model, prompt, n_new, first_logits=first)
    return ref_tokens, ref_logits, first["logits"]  # (T, V): every prompt position, from the first (empty-past) call


def check_parity(model, cfg, sessions: dict, prompt: list[int], n_new: int, dtype: str, reference64=None) -> dict:
    """Prompt logits max |diff| vs PyTorch and greedy tokens for every session; raises ParityError.
    `model` is the PyTorch model or its torch_reference(...) triple. `reference64`: a callable returning
    (float64 torch_reference triple or None, why not), asked only when fp32 parity fails."""
    ref = model if isinstance(model, tuple) else torch_reference(model, prompt, n_new)
    ref_tokens, ref_logits, ref_full = ref
    scale = max(1.0, float(np.abs(ref_full).max()))
    out = {"prompt_tokens": len(prompt), "new_tokens": n_new, "torch_tokens": ref_tokens, "logit_scale": scale,
           "tolerance": PARITY_TOL[dtype] * scale, "graphs": {}}
    failures, seen = [], {}
    for name, sess in sessions.items():
        seen[name] = (_prompt_logits(sess, prompt), *ort_greedy(sess, prompt, n_new))
        out["graphs"][name], why = _compare(name, *seen[name], ref, out["tolerance"])
        out["graphs"][name]["providers"] = sess.providers
        failures += why
    if failures and dtype == "float32" and reference64 is not None:
        ref64, why_not = reference64()
        second = (float64_opinion(ref, ref64, seen, out["tolerance"]) if ref64 is not None
                  else {"ok": False, "why": why_not})
        out["float64"] = second
        failures = [] if second["ok"] else failures + [f"float64 second opinion: {second['why']}"]
    out["ok"] = not failures
    if failures:
        raise ParityError("parity failed (nothing written): " + "; ".join(failures))
    return out


def _prompt_logits(sess, prompt: list[int]) -> np.ndarray:
    """One empty-past call on the whole prompt: float32 logits (T, V); a lean graph gives (1, V), the last row."""
    feeds = {"input_ids": np.asarray([prompt], np.int64), "attention_mask": np.ones((1, len(prompt)), np.int64),
             "position_ids": np.arange(len(prompt), dtype=np.int64)[None],
             **sess.empty_past_arrays(1)}  # empty past (1, H_kv, 0, D)
    feeds = {k: v for k, v in feeds.items() if k in sess.input_names}  # lean graphs take no position_ids
    return sess.session.run(["logits"], feeds)[0][0].astype(np.float32)


def _compare(name: str, full, tokens, logits, ref, tol: float) -> tuple[dict, list[str]]:
    """(report row, failure lines) of one graph's prompt logits, greedy tokens and step logits against `ref`."""
    ref_tokens, ref_logits, ref_full = ref
    prompt_diff = float(np.abs(full - ref_full[-full.shape[0]:]).max())
    agree = _first_mismatch(tokens, ref_tokens)
    steps = min(len(logits), agree if agree is not None else len(logits))
    step_diff = max((float(np.abs(a - b).max()) for a, b in zip(logits[:steps], ref_logits[:steps])), default=0.0)
    row = {"prompt_logits_max_abs_diff": prompt_diff, "decode_logits_max_abs_diff": step_diff,
           "tokens": tokens, "tokens_identical": agree is None, "first_mismatch": agree}
    why = []
    if not math.isfinite(prompt_diff) or prompt_diff > tol or step_diff > tol:
        why.append(f"{name}: max |logit diff| prompt {prompt_diff:.3g}, decode {step_diff:.3g} > tol {tol:.3g}")
    if agree is not None:
        why.append(f"{name}: greedy token {agree} is {tokens[agree]} vs PyTorch {ref_tokens[agree]}")
    return row, why


def _first_mismatch(a: list[int], b: list[int]) -> int | None:
    return next((i for i, (x, y) in enumerate(zip(a, b)) if x != y), None)


def _distance(full, logits, upto: int, ref) -> float:
    """Max |logit diff| of prompt logits and the first `upto` step logits against a reference triple, in float64."""
    _, ref_logits, ref_full = ref
    d = float(np.abs(full.astype(np.float64) - ref_full[-full.shape[0]:]).max())
    return max([d] + [float(np.abs(a.astype(np.float64) - b).max()) for a, b in zip(logits[:upto], ref_logits[:upto])])


def float64_opinion(ref32, ref64, seen: dict, tol: float) -> dict:
    """Judge every graph against PyTorch's float64 run: ok when each graph's greedy tokens are float64's and its
    logits are within F64_SLACK x (float32 PyTorch's own distance to float64) + tol of float64's. `seen`: name ->
    (prompt logits, greedy tokens, step logits) of each graph."""
    t32, t64 = ref32[0], ref64[0]
    agree32 = _first_mismatch(t32, t64)
    own = _distance(ref32[2], ref32[1], len(t32) if agree32 is None else agree32 + 1, ref64)
    bound = F64_SLACK * own + tol
    rows, why = {}, []
    for name, (full, tokens, logits) in seen.items():
        agree = _first_mismatch(tokens, t64)
        err = _distance(full, logits, len(tokens) if agree is None else agree + 1, ref64)
        rows[name] = {"err_vs_float64": err, "tokens_identical": agree is None}
        if agree is not None:
            why.append(f"{name}: greedy token {agree} is {tokens[agree]} vs float64 PyTorch {t64[agree]}")
        if not (math.isfinite(err) and err <= bound):
            why.append(f"{name} is {err:.3g} from PyTorch's float64 logits, PyTorch's float32 {own:.3g} "
                       f"(bound {bound:.3g})")
    return {"ok": not why, "float32_torch_err": own, "float32_torch_tokens_identical": agree32 is None,
            "float64_tokens": list(t64), "bound": bound, "slack": F64_SLACK, "graphs": rows,
            "why": "; ".join(why) or f"every graph within {bound:.3g} of float64 (PyTorch float32: {own:.3g})"}


def prompt_ids(info: dict, cfg, prompt: str, toks=None) -> list[int]:
    """The parity prompt's ids: BOS (when the tokenizer adds one) + `prompt`, cut to half the context. A run dir's
    SentencePiece model, else an HF directory's tokenizer.json (`toks`: compile's TokenizerFiles, for its BOS rule);
    a fixed id pattern when the checkpoint has neither (ids that are no text can be ill-conditioned in a real model)."""
    tok_path = info.get("tokenizer_path")
    hf_json = Path(info.get("dir") or "") / "tokenizer.json"
    if tok_path:
        tok = Tokenizer.load(tok_path)
        ids = ([tok.bos_id] if tok.bos_id is not None and tok.bos_id >= 0 else []) + tok.encode(prompt)
    elif toks is not None and toks.tokenizer == "tokenizer.json" and hf_json.is_file():
        from tokenizers import Tokenizer as HFTokenizer
        bos = [toks.bos_id] if toks.add_bos and toks.bos_id is not None else []
        ids = bos + HFTokenizer.from_file(str(hf_json)).encode(prompt, add_special_tokens=False).ids
    else:  # no tokenizer: a fixed, deterministic prompt of ids
        ids = [(7 * i + 3) % cfg.vocab_size for i in range(8)]
    return [i for i in ids if 0 <= i < cfg.vocab_size][: max(1, cfg.max_seq_len // 2)]
