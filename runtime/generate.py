"""Prefill + decode over the KV cache with onnxruntime, sampling, stop tokens, streaming, and the
`tapernorm generate` command.

The per-step Python is kept small: the token / position / mask inputs are preallocated host buffers
updated in place, the presents are fed back as the next past without copies, and only the logits
of the last position are used by sampling. On CUDA the cache stays on the GPU through IOBinding; on
CPU a reused `session.run` feed dict is faster than IOBinding (measured, see OrtDecoder).

Decoders share one shape: `start(input_ids (B, T), attention_mask) -> logits (B, V)` and
`step(tokens (B,)) -> logits (B, V)`; `iter_tokens` / `generate_ids` drive any of them
(`OrtDecoder` here, `TorchRefDecoder` in torch_ref) so both sample and stop identically.
"""
from __future__ import annotations

import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Iterator, Sequence

import numpy as np

from .sampling import Sampler, SamplingParams
from .session import DecoderSession
from .tokenizer import PromptRules, StopStrings, TextStreamer, load_tokenizer, read_json_or_empty, read_runtime_json

__all__ = ["OrtDecoder", "GenerationResult", "pad_prompts", "iter_tokens", "stream_ids", "generate_ids", "TextStreamer",
           "load_tokenizer", "TextModel", "Generator", "text_pieces", "add_cli"]


def pad_prompts(prompts: Sequence[Sequence[int]], pad_id: int = 0) -> tuple[np.ndarray, np.ndarray]:
    """Left-pad token lists into (input_ids (B, T), attention_mask (B, T)) int64."""
    if not prompts or any(len(p) == 0 for p in prompts):
        raise ValueError("every prompt needs at least one token; pass a non-empty prompt")
    T = max(len(p) for p in prompts)
    ids = np.full((len(prompts), T), pad_id, dtype=np.int64)
    mask = np.zeros((len(prompts), T), dtype=np.int64)
    for b, p in enumerate(prompts):
        ids[b, T - len(p):] = p
        mask[b, T - len(p):] = 1
    return ids, mask


class OrtDecoder:
    """Stateful KV-cached decoder over a DecoderSession.

    Two feeding paths, picked by device (override with `io_binding=`):
    - CUDA: IOBinding. Presents stay on the GPU as OrtValues and are bound back as the next past; only
      the (B, 1, V) logits are copied to a preallocated host buffer.
    - CPU: plain `session.run` with one reused feed dict. On CPU the numpy inputs/outputs are zero-copy
      and this path measured ~15% faster per step than IOBinding at w128 (the binding calls cost
      ~100-200 us per step).
    """

    def __new__(cls, session: DecoderSession, *args, **kwargs):
        """A lean graph (shared KV buffer) gets its own loop, runtime.shared_kv.SharedKVDecoder."""
        if cls is OrtDecoder and getattr(session, "kv_shared", False):
            from .shared_kv import SharedKVDecoder
            return SharedKVDecoder(session, *args, **kwargs)
        return super().__new__(cls)

    def __init__(self, session: DecoderSession, max_len: int | None = None, io_binding: bool | None = None):
        self.session = session
        self.max_len = max_len or session.config.max_seq_len  # None: no context limit known
        self.io_binding = (session.device == "cuda") if io_binding is None else bool(io_binding)
        self._past_names = session.past_names
        self._n_past = len(self._past_names)
        self._out_names = ["logits"] + session.present_names
        self._run_fn = session.session.run
        self.length = 0

    def start(self, input_ids: np.ndarray, attention_mask: np.ndarray | None = None) -> np.ndarray:
        """Prefill a (left-padded) prompt (B, T); returns last-position logits (B, V)."""
        ids = np.ascontiguousarray(input_ids, dtype=np.int64)
        B, T = ids.shape
        if self.max_len is not None and T >= self.max_len:
            raise ValueError(f"prompt of {T} tokens does not fit the model's {self.max_len}-token context; "
                             f"shorten the prompt to at most {self.max_len - 1} tokens")
        mask = np.ones_like(ids) if attention_mask is None else np.ascontiguousarray(attention_mask, dtype=np.int64)
        cap = self.max_len if self.max_len is not None else T + 256
        self._mask = np.ones((B, cap), dtype=np.int64)  # column j = position j; grows one column per step
        self._mask[:, :T] = mask
        pos = np.maximum(np.cumsum(mask, axis=-1) - 1, 0).astype(np.int64)  # (B, T)
        self._tok = np.zeros((B, 1), dtype=np.int64)
        self._pos = np.ascontiguousarray(pos[:, -1:] + 1)  # (B, 1)
        self._mask_view = (lambda L: self._mask[:, :L]) if B == 1 else (lambda L: np.ascontiguousarray(self._mask[:, :L]))
        self.length = T
        if self.io_binding:
            self._io = io = self.session.io_binding()
            self.session.bind_outputs(io)  # prefill logits (B, T, V): allocated by ORT
            io.bind_cpu_input("input_ids", ids)
            io.bind_cpu_input("attention_mask", mask)
            io.bind_cpu_input("position_ids", pos)
            self._bind_past(self.session.empty_past(B))
            self._logits = None  # (B, 1, V) host buffer the decode steps write into
            return self._run_bound()
        self._feeds = {"input_ids": ids, "attention_mask": mask, "position_ids": pos,
                       **self.session.empty_past_arrays(B)}
        return self._run_plain()

    # -- CPU: plain run, one feed dict reused ------------------------------------------------------------
    def _run_plain(self) -> np.ndarray:
        outs = self._run_fn(self._out_names, self._feeds)
        self._feeds.update(zip(self._past_names, outs[1:]))  # presents -> next past (no copy)
        return outs[0][:, -1]  # (B, V)

    # -- CUDA: IOBinding, presents stay on the device ----------------------------------------------------
    def _bind_past(self, values) -> None:
        io = self._io
        for name, ov in zip(self._past_names, values):
            io.bind_ortvalue_input(name, ov)
        self._past = values  # keep the OrtValues alive while they are bound

    def _run_bound(self) -> np.ndarray:
        self.session.session.run_with_iobinding(self._io)
        outs = self._io.get_outputs()  # bound order: presents..., logits
        self._bind_past(outs[:self._n_past])
        if self._logits is None:  # prefill: copy the last position out, then bind the decode buffer
            last = outs[self._n_past].numpy()[:, -1]  # (B, V)
            self._logits = np.empty((last.shape[0], 1, last.shape[1]), dtype=last.dtype)
        else:
            last = self._logits[:, 0].copy()  # (B, V); the buffer is overwritten by the next step
        self.session.bind_outputs(self._io, self._logits)  # presents must be re-bound: their shape grows
        return last

    def step(self, tokens: np.ndarray) -> np.ndarray:
        """Feed one token per row (B,); returns logits (B, V)."""
        if self.max_len is not None and self.length >= self.max_len:
            raise ValueError(f"the {self.max_len}-token context is full; stop generating")
        if self.length >= self._mask.shape[1]:
            self._mask = np.concatenate([self._mask, np.ones_like(self._mask)], axis=1)
        self._tok[:, 0] = tokens
        self.length += 1
        if self.io_binding:
            io = self._io
            io.bind_cpu_input("input_ids", self._tok)
            io.bind_cpu_input("position_ids", self._pos)
            io.bind_cpu_input("attention_mask", self._mask_view(self.length))
            logits = self._run_bound()
        else:
            f = self._feeds
            f["input_ids"], f["position_ids"], f["attention_mask"] = self._tok, self._pos, self._mask_view(self.length)
            logits = self._run_plain()
        self._pos += 1
        return logits


@dataclass
class GenerationResult:
    """Generated tokens per row (stop tokens excluded), why each row stopped, and timings."""
    tokens: list[list[int]]
    stop_reasons: list[str]
    prompt_tokens: int
    prefill_s: float = 0.0
    decode_s: float = 0.0
    decode_steps: int = 0
    providers: list[str] = field(default_factory=list)

    @property
    def decode_tok_s(self) -> float:
        """Generated tokens per second over the decode steps (all rows)."""
        return self.decode_steps * len(self.tokens) / self.decode_s if self.decode_s > 0 else float("nan")


def iter_tokens(decoder, input_ids: np.ndarray, attention_mask: np.ndarray | None = None, *,
                max_new_tokens: int = 64, sampler: Callable | None = None, stop_ids: Sequence[int] = (),
                stats: dict | None = None) -> Iterator[tuple[np.ndarray, np.ndarray]]:
    """Yield (tokens (B,), live (B,) bool) per generated position until every row stops or the limit."""
    if max_new_tokens < 0:
        raise ValueError(f"max_new_tokens {max_new_tokens} must be >= 0")
    sampler = sampler or Sampler()
    stats = stats if stats is not None else {}
    stop = np.asarray(sorted(set(int(s) for s in stop_ids)), dtype=np.int64)
    t0 = time.perf_counter()
    logits = decoder.start(input_ids, attention_mask)
    t1 = time.perf_counter()
    stats.update(prefill_s=t1 - t0, decode_s=0.0, decode_steps=0, reason="length")
    live = np.ones(logits.shape[0], dtype=bool)
    max_len = getattr(decoder, "max_len", None)
    for i in range(max_new_tokens):
        tok = sampler(logits)
        if stop.size:
            live &= ~np.isin(tok, stop)
        if not live.any():
            stats["reason"] = "stop"
            return
        yield tok, live.copy()
        if i == max_new_tokens - 1:
            break
        if max_len is not None and decoder.length + 1 >= max_len:  # prompt + generated fill the context (the
            stats["reason"] = "context"  # sequence never outgrows it: onnxruntime-genai's max_length, same count)
            return
        ts = time.perf_counter()
        logits = decoder.step(tok)
        stats["decode_s"] += time.perf_counter() - ts
        stats["decode_steps"] += 1


def stream_ids(decoder, prompts: Sequence[Sequence[int]], *, max_new_tokens: int = 64,
               sampling: SamplingParams | None = None, stop_ids: Sequence[int] = (), pad_id: int = 0,
               result: dict | None = None) -> Iterator[tuple[np.ndarray, np.ndarray]]:
    """Like iter_tokens for token-id prompts; at the end `result["result"]` holds the GenerationResult."""
    ids, mask = pad_prompts(prompts, pad_id)
    stats: dict = {}
    out: list[list[int]] = [[] for _ in prompts]
    stopped = np.zeros(len(prompts), dtype=bool)
    final = "stop"  # the caller closed the stream early (a stop string)
    try:
        for tok, live in iter_tokens(decoder, ids, mask, max_new_tokens=max_new_tokens, sampler=Sampler(sampling),
                                     stop_ids=stop_ids, stats=stats):
            stopped |= ~live
            for b in np.flatnonzero(live):
                out[b].append(int(tok[b]))
            yield tok, live
        final = stats.get("reason", "length")
    finally:
        if result is not None:
            reasons = ["stop" if (s or final == "stop") else final for s in stopped]
            sess = getattr(decoder, "session", None)
            result["result"] = GenerationResult(out, reasons, ids.shape[1], stats.get("prefill_s", 0.0),
                                                stats.get("decode_s", 0.0), stats.get("decode_steps", 0),
                                                list(getattr(sess, "providers", []) or []))


def generate_ids(decoder, prompts: Sequence[Sequence[int]], *, max_new_tokens: int = 64,
                 sampling: SamplingParams | None = None, stop_ids: Sequence[int] = (), pad_id: int = 0,
                 on_tokens: Callable[[np.ndarray, np.ndarray], None] | None = None) -> GenerationResult:
    """Generate for a batch of token-id prompts; `on_tokens(tokens (B,), live (B,))` is called per step."""
    holder: dict = {}
    for tok, live in stream_ids(decoder, prompts, max_new_tokens=max_new_tokens, sampling=sampling,
                                stop_ids=stop_ids, pad_id=pad_id, result=holder):
        if on_tokens is not None:
            on_tokens(tok, live)
    return holder["result"]


def greedy_block(decoder, prompt: np.ndarray, n_new: int) -> tuple[np.ndarray, float]:
    """The benchmarks' timed greedy block: prefill `prompt` (B, T), then n_new - 1 uninterrupted argmax steps, no
    stop tokens. Returns (tokens (B, n_new), seconds of the decode steps alone)."""
    tok = decoder.start(np.asarray(prompt, dtype=np.int64)).argmax(-1)  # (B,)
    seq, t0 = [tok], time.perf_counter()
    for _ in range(n_new - 1):
        tok = decoder.step(tok).argmax(-1)
        seq.append(tok)
    return np.stack(seq, 1), time.perf_counter() - t0


# -- text ----------------------------------------------------------------------------------------------

def text_pieces(tokens: Iterator[tuple[np.ndarray, np.ndarray]], tokenizer, prompt_ids: Sequence[int],
                stop_strings: Sequence[str] = ()) -> Iterator[str]:
    """Text of row 0 of a (tokens (B,), live (B,)) stream, cut at the first stop string (which ends decoding)."""
    streamer, stops = TextStreamer(tokenizer, prompt_ids), StopStrings(stop_strings)
    try:
        for tok, live in tokens:
            if not live[0]:
                break
            piece = stops.push(streamer.push(int(tok[0])))
            if piece:
                yield piece
            if stops.hit:
                return
        tail = stops.flush()
        if tail:
            yield tail
    finally:
        getattr(tokens, "close", lambda: None)()  # ends decoding; the GenerationResult is written then


class TextModel:
    """What `generate` / `chat` need from an engine over a compiled directory: its tokenizer, the prompt rules of
    runtime.json (stop ids, BOS), the chat template and the context limit. Subclasses implement `_token_stream`."""

    model_dir: Path
    max_len: int | None
    vocab_size: int

    def _init_text(self, model_dir: Path) -> None:
        rt = read_runtime_json(model_dir)
        if rt.get("eos_ids") is None and rt.get("eos_id") is None:  # e.g. onnxruntime-genai's own builder output
            g = (read_json_or_empty(model_dir / "genai_config.json").get("model") or {})
            eos = g.get("eos_token_id")
            rt = {**rt, "eos_ids": [e for e in (eos if isinstance(eos, list) else [eos]) if isinstance(e, int)]}
        self.tokenizer = load_tokenizer(model_dir, prefer=rt.get("tokenizer"))
        self.rules = PromptRules.from_runtime(rt, self.tokenizer)
        tv, mv = int(self.tokenizer.vocab_size), int(self.vocab_size)
        if tv > mv or (self.tokenizer.kind == "sentencepiece" and tv != mv):
            raise ValueError(f"{self.tokenizer.path} has {tv} tokens but the model's vocab is {mv}; the directory "
                             "mixes files from different compiles, re-run `tapernorm compile`")

    def _fit(self, ids: list[int]) -> list[int]:
        ml = self.max_len
        if ml is not None and len(ids) >= ml:
            raise ValueError(f"prompt is {len(ids)} tokens but the model's context is {ml}; "
                             f"shorten it to at most {ml - 1} tokens")
        return ids

    def prompt_ids(self, prompt: str) -> list[int]:
        """Ids of a plain-text prompt (BOS by runtime.json's rule); refuses one that fills the context."""
        return self._fit(self.rules.prompt_ids(self.tokenizer, prompt))

    _prompt_ids = prompt_ids

    def chat_ids(self, messages: list[dict]) -> list[int]:
        """Ids of `messages` rendered with the directory's chat template and the generation prompt."""
        if getattr(self, "_chat", None) is None:  # parsed once per engine
            from .chat import require_chat_template
            self._chat = require_chat_template(self.model_dir)
        text = self._chat.render(messages, add_generation_prompt=True)
        return self._fit(self.tokenizer.encode(text))

    def stop_ids(self, extra: Sequence[int] = ()) -> list[int]:
        """Every end token runtime.json names (else the tokenizer's eos) plus `extra`."""
        return list(dict.fromkeys([*self.rules.eos_ids, *(int(x) for x in extra)]))

    def stream_ids(self, ids: Sequence[int], *, max_new_tokens: int = 64, sampling: SamplingParams | None = None,
                   stop_ids: Sequence[int] | None = None, stop_strings: Sequence[str] = (),
                   result: dict | None = None) -> Iterator[str]:
        """Yield the text generated after prompt `ids` as it is decoded; `result["result"]` gets the
        GenerationResult. Stops at a stop id, a stop string, `max_new_tokens` or the context."""
        if max_new_tokens < 0:
            raise ValueError(f"max_new_tokens {max_new_tokens} must be >= 0")
        ids = self._fit(list(ids))
        stops = self.stop_ids() if stop_ids is None else list(stop_ids)
        return text_pieces(self._token_stream(ids, max_new_tokens, sampling, stops, result), self.tokenizer, ids,
                           stop_strings)

    def stream(self, prompt: str, **kw) -> Iterator[str]:
        """stream_ids on a plain-text prompt; it is checked here (eagerly), so a too-long prompt fails first."""
        return self.stream_ids(self.prompt_ids(prompt), **kw)

    def generate(self, prompt: str, on_text: Callable[[str], None] | None = None, **kw) -> str:
        """Generated text (without the prompt); `on_text(piece)` streams it."""
        out = []
        for piece in self.stream(prompt, **kw):
            out.append(piece)
            if on_text:
                on_text(piece)
        return "".join(out)

    def _token_stream(self, ids, max_new_tokens, sampling, stops, result):
        raise NotImplementedError


class Generator(TextModel):
    """Text in, text out over a compiled model directory (onnxruntime, tapernorm's decode loop)."""

    engine = "ort"

    def __init__(self, model_dir: str | Path, *, variant: str = "model.onnx", provider: str = "auto",
                 threads: int | None = None, **session_kw):
        self.session = DecoderSession(model_dir, variant=variant, provider=provider, intra_op_threads=threads,
                                      **session_kw)
        self.model_dir = self.session.model_dir
        self.decoder = OrtDecoder(self.session)
        self.max_len, self.vocab_size = self.decoder.max_len, int(self.session.config.vocab_size)
        self._init_text(self.model_dir)

    def label(self) -> str:
        """Providers and threads, for the stats line."""
        return f"providers {self.session.providers} | threads {self.session.intra_op_threads}"

    def _token_stream(self, ids, max_new_tokens, sampling, stops, result):
        if self.session.kv_shared:  # size the one KV buffer to this request, as onnxruntime-genai's max_length does
            need = len(ids) + max(max_new_tokens, 1)  # (allocating and touching the whole context costs prefill time)
            need = min(need, self.max_len) if self.max_len else need
            if self.decoder.max_len != need:
                self.decoder = OrtDecoder(self.session, max_len=need)
        return stream_ids(self.decoder, [ids], max_new_tokens=max_new_tokens, sampling=sampling, stop_ids=stops,
                          result=result)


# -- CLI (runtime/generate_cli.py) ----------------------------------------------------------------------

def add_cli(subparsers) -> None:
    """Register `tapernorm generate DIR --prompt ...` and `tapernorm chat DIR` (runtime/generate_cli.py)."""
    from .generate_cli import add_cli as add
    add(subparsers)
