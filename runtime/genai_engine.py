"""Drive a compiled lean directory with onnxruntime-genai's C++ decode loop (`--engine genai`).

The lean compile writes genai_config.json beside model.onnx, so `og.Model(DIR)` loads the very graph our
own loop runs. onnxruntime-genai (0.18) requires the plain `onnxruntime` package, which installs the same
`onnxruntime` module as onnxruntime-gpu: the two must not share an environment, so genai lives in its own
venv (README "onnxruntime-genai engine"): onnxruntime-genai + sentencepiece + tokenizers + jinja2 + numpy, and
tapernorm installed with --no-deps (the runtime imports no torch). Here it is imported lazily; a missing package
is one line. Text goes through the same tokenizer, prompt rules, chat template and stop handling as the ort
engine (runtime.generate.TextModel), so both engines print the same greedy text.
"""
from __future__ import annotations

import json
import time
from pathlib import Path
from typing import Callable, Iterator, Sequence

import numpy as np

from .generate import GenerationResult, TextModel

__all__ = ["GenaiEngine", "GenaiText", "genai_available", "GenaiUnavailable", "open_genai_text"]

INSTALL_HINT = ("onnxruntime-genai is not installed in this environment; it clashes with onnxruntime-gpu, so "
                "install it in its own venv: python -m venv .venv-genai && .venv-genai/bin/pip install "
                "onnxruntime-genai sentencepiece tokenizers jinja2 numpy && .venv-genai/bin/pip install --no-deps "
                "-e . (README: onnxruntime-genai engine)")


class GenaiUnavailable(RuntimeError):
    """onnxruntime-genai cannot be imported here."""


def _og():
    try:
        import onnxruntime_genai as og
    except ImportError:
        raise GenaiUnavailable(INSTALL_HINT) from None
    return og


def genai_available() -> bool:
    """True when onnxruntime_genai imports in this interpreter."""
    try:
        _og()
        return True
    except GenaiUnavailable:
        return False


class GenaiEngine:
    """og.Model over a compiled directory; `generate_ids` mirrors runtime.generate_ids (greedy only)."""

    def __init__(self, model_dir: str | Path, *, provider: str = "cpu", threads: int | None = None):
        og = _og()
        self.model_dir = Path(model_dir)
        conf_path = self.model_dir / "genai_config.json"
        if not conf_path.is_file():
            raise FileNotFoundError(f"{conf_path} is missing; compile with the lean graph (`tapernorm compile "
                                    "CHECKPOINT --out DIR`, the default) to run under onnxruntime-genai")
        try:
            self.genai_config = json.loads(conf_path.read_text())
        except (json.JSONDecodeError, UnicodeDecodeError) as e:
            raise ValueError(f"{conf_path} is not valid JSON ({e}); re-run `tapernorm compile`") from None
        try:
            config = og.Config(str(self.model_dir))
            if provider == "cpu":
                config.clear_providers()
            if threads:
                config.overlay(json.dumps({"model": {"decoder": {"session_options": {
                    "intra_op_num_threads": int(threads), "inter_op_num_threads": 1}}}}))
            self.model = og.Model(config)
        except Exception as e:  # noqa: BLE001 - genai raises RuntimeError naming the offending key
            raise ValueError(f"onnxruntime-genai cannot load {self.model_dir} ({' '.join(str(e).split())[:300]}); "
                             "genai_config.json follows onnxruntime-genai 0.18's schema - the installed version "
                             "differs at the key named there; re-run `tapernorm compile` or install "
                             "onnxruntime-genai 0.18") from None
        self.og, self.threads, self.provider = og, threads, provider
        self.max_len = int(self.genai_config["search"]["max_length"])
        self.vocab_size = int(self.genai_config["model"]["vocab_size"])

    def generator(self, prompts: np.ndarray, max_new_tokens: int, ignore_eos: bool = False):
        """An og.Generator with the (B, T) equal-length int prompts appended (prefill happens on the first step).

        Like the ort engine, generation stops at the context: max_length is min(T + max_new_tokens, context)."""
        B, T = prompts.shape
        if T >= self.max_len:
            raise ValueError(f"prompt is {T} tokens but the model's context is {self.max_len}; "
                             f"shorten it to at most {self.max_len - 1} tokens")
        total = min(T + max_new_tokens, self.max_len)
        params = self.og.GeneratorParams(self.model)
        opts = {"max_length": total, "do_sample": False, "batch_size": B}
        if ignore_eos:
            opts["min_length"] = total
        params.set_search_options(**opts)
        gen = self.og.Generator(self.model, params)
        gen.append_tokens(np.ascontiguousarray(prompts, dtype=np.int32))
        return gen

    def stream_ids(self, prompts: Sequence[Sequence[int]], *, max_new_tokens: int = 64,
                   stop_ids: Sequence[int] = (), ignore_eos: bool = False,
                   result: dict | None = None) -> Iterator[tuple[np.ndarray, np.ndarray]]:
        """Yield (tokens (B,), live (B,) bool) per generated position, like runtime.stream_ids;
        `result["result"]` gets the GenerationResult when the stream ends (or is closed)."""
        if max_new_tokens < 0:
            raise ValueError(f"max_new_tokens {max_new_tokens} must be >= 0")
        if len({len(p) for p in prompts}) != 1:
            raise ValueError("the genai engine takes equal-length prompts in a batch; pad them yourself or use "
                             "--engine ort")
        ids = np.asarray(prompts, dtype=np.int64)
        B, T = ids.shape
        out: list[list[int]] = [[] for _ in range(B)]
        live = np.ones(B, dtype=bool)
        stop = set(int(s) for s in stop_ids)
        t0 = time.perf_counter()
        t_first, steps, final = None, 0, "stop"  # "stop" if the caller closes the stream (a stop string)
        try:
            if max_new_tokens == 0:
                final = "length"
                return
            gen = self.generator(ids, max_new_tokens, ignore_eos=ignore_eos)
            while not gen.is_done():
                gen.generate_next_token()
                tok = np.asarray(gen.get_next_tokens(), dtype=np.int64)
                if t_first is None:
                    t_first = time.perf_counter()
                else:
                    steps += 1
                for b in np.flatnonzero(live):
                    if int(tok[b]) in stop:
                        live[b] = False
                    else:
                        out[b].append(int(tok[b]))
                if not live.any():
                    break
                yield tok, live.copy()
            final = "length" if T + max_new_tokens <= self.max_len else "context"
        finally:
            t_end = time.perf_counter()
            if result is not None:
                reasons = [final if live[b] else "stop" for b in range(B)]
                result["result"] = GenerationResult(out, reasons, T, (t_first or t_end) - t0,
                                                    t_end - (t_first or t_end), steps,
                                                    [f"onnxruntime-genai ({self.provider})"])

    def generate_ids(self, prompts: Sequence[Sequence[int]], *, max_new_tokens: int = 64,
                     stop_ids: Sequence[int] = (), ignore_eos: bool = False,
                     on_tokens: Callable[[np.ndarray, np.ndarray], None] | None = None) -> GenerationResult:
        """Greedy tokens for equal-length token-id prompts through genai's generate_next_token() loop."""
        holder: dict = {}
        for tok, live in self.stream_ids(prompts, max_new_tokens=max_new_tokens, stop_ids=stop_ids,
                                         ignore_eos=ignore_eos, result=holder):
            if on_tokens is not None:
                on_tokens(tok, live)
        return holder["result"]


class GenaiText(TextModel):
    """Text in, text out through onnxruntime-genai (greedy), with the ort engine's tokenizer and rules."""

    engine = "genai"

    def __init__(self, model_dir: str | Path, *, threads: int | None = None):
        self.model_dir = Path(model_dir)
        self.engine_ = GenaiEngine(model_dir, provider="cpu", threads=threads)
        self.max_len, self.vocab_size, self.threads = self.engine_.max_len, self.engine_.vocab_size, threads
        self._init_text(self.model_dir)

    def label(self) -> str:
        """Engine and threads, for the stats line."""
        return f"engine onnxruntime-genai (cpu) | threads {self.threads or 'genai default'}"

    def _token_stream(self, ids, max_new_tokens, sampling, stops, result):
        return self.engine_.stream_ids([ids], max_new_tokens=max_new_tokens, stop_ids=stops, result=result)


def open_genai_text(args) -> GenaiText:
    """GenaiText for `tapernorm generate/chat --engine genai`, refusing flags it cannot honour (one line)."""
    if args.temperature != 0.0 or args.top_k or args.top_p != 1.0:
        raise ValueError("--engine genai decodes greedily here; drop --temperature/--top-k/--top-p or use --engine ort")
    if getattr(args, "unfused", False):
        raise ValueError("--engine genai runs model.onnx (genai_config.json names it); drop --unfused")
    if getattr(args, "provider", "cpu") == "cuda":
        raise ValueError("--engine genai --provider cuda needs onnxruntime-genai-cuda and a CUDA compile "
                         "(untested here); use --provider cpu")
    return GenaiText(args.model_dir, threads=args.threads)
