"""Parity: the same greedy decode through PyTorch and through the runtime's ORT sessions, compared.

compile_checkpoint (pipeline.py) runs check_parity on every graph it built before anything is swapped into place:
the prompt's logits and each greedy step's logits must agree within PARITY_TOL (relative to the largest logit),
and, at fp32, the greedy tokens must be identical. Lower precisions compare against fp32 in precision.py.
"""
from __future__ import annotations

import math
from pathlib import Path

import numpy as np
import torch

from tapernorm.data import Tokenizer
from tapernorm.runtime.generate import OrtDecoder
from tapernorm.runtime.session import DecoderSession

__all__ = ["PARITY_TOL", "ParityError", "ort_greedy", "torch_greedy", "torch_reference", "check_parity",
           "open_session", "prompt_ids"]

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
            first_logits["logits"] = logits[0].float().numpy()
        last = logits[0, -1].float().numpy()
        logits_seen.append(last)
        pos += T
        tokens.append(int(last.argmax()))
        ids = torch.tensor([[tokens[-1]]])
    return tokens, logits_seen


def torch_reference(model, prompt: list[int], n_new: int) -> tuple[list[int], list[np.ndarray], np.ndarray]:
    """PyTorch's side of parity: (greedy tokens, their float32 logits, full-prompt logits (T, V)); small enough
    to keep while the model itself is freed before onnxruntime loads the graphs."""
    first = {}
    ref_tokens, ref_logits = torch_greedy(model, prompt, n_new, first_logits=first)
    return ref_tokens, ref_logits, first["logits"]  # (T, V): every prompt position, from the first (empty-past) call


def check_parity(model, cfg, sessions: dict, prompt: list[int], n_new: int, dtype: str) -> dict:
    """Prompt logits max |diff| vs PyTorch and greedy tokens for every session; raises ParityError.
    `model` is the PyTorch model or its torch_reference(...) triple."""
    ref_tokens, ref_logits, ref_full = model if isinstance(model, tuple) else torch_reference(model, prompt, n_new)
    scale = max(1.0, float(np.abs(ref_full).max()))
    out = {"prompt_tokens": len(prompt), "new_tokens": n_new, "torch_tokens": ref_tokens, "logit_scale": scale,
           "tolerance": PARITY_TOL[dtype] * scale, "graphs": {}}
    failures = []
    for name, sess in sessions.items():
        feeds = {"input_ids": np.asarray([prompt], np.int64), "attention_mask": np.ones((1, len(prompt)), np.int64),
                 "position_ids": np.arange(len(prompt), dtype=np.int64)[None],
                 **sess.empty_past_arrays(1)}  # empty past (1, H_kv, 0, D)
        feeds = {k: v for k, v in feeds.items() if k in sess.input_names}  # lean graphs take no position_ids
        full = sess.session.run(["logits"], feeds)[0][0].astype(np.float32)  # (T, V); lean: (1, V), the last one
        prompt_diff = float(np.abs(full - ref_full[-full.shape[0]:]).max())
        tokens, logits = ort_greedy(sess, prompt, n_new)
        agree = next((i for i, (a, b) in enumerate(zip(tokens, ref_tokens)) if a != b), None)
        steps = min(len(logits), agree if agree is not None else len(logits))
        step_diff = max((float(np.abs(a - b).max()) for a, b in zip(logits[:steps], ref_logits[:steps])), default=0.0)
        row = {"prompt_logits_max_abs_diff": prompt_diff, "decode_logits_max_abs_diff": step_diff,
               "tokens": tokens, "tokens_identical": agree is None, "first_mismatch": agree,
               "providers": sess.providers}
        out["graphs"][name] = row
        if not math.isfinite(prompt_diff) or prompt_diff > out["tolerance"] or step_diff > out["tolerance"]:
            failures.append(f"{name}: max |logit diff| prompt {prompt_diff:.3g}, decode {step_diff:.3g} "
                            f"> tol {out['tolerance']:.3g}")
        if agree is not None:
            failures.append(f"{name}: greedy token {agree} is {tokens[agree]} vs PyTorch {ref_tokens[agree]}")
    out["ok"] = not failures
    if failures:
        raise ParityError("parity failed (nothing written): " + "; ".join(failures))
    return out


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
