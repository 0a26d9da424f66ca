"""Drive a compiled lean directory with onnxruntime-genai's C++ decode loop (`--engine genai`).

The lean compile writes genai_config.json beside model.onnx, so `og.Model(DIR)` loads the very graph our
own loop runs. onnxruntime-genai (0.18) requires the plain `onnxruntime` package, which installs the same
`onnxruntime` module as onnxruntime-gpu: the two must not share an environment, so genai lives in its own
venv (README "onnxruntime-genai engine"): onnxruntime-genai + sentencepiece + numpy, and tapernorm installed
with --no-deps (the runtime imports no torch). Here it is imported lazily; a missing package is one line.
"""
from __future__ import annotations

import json
import time
from pathlib import Path
from typing import Callable, Sequence

import numpy as np

from .generate import GenerationResult

__all__ = ["GenaiEngine", "genai_available", "GenaiUnavailable"]

INSTALL_HINT = ("onnxruntime-genai is not installed in this environment; it clashes with onnxruntime-gpu, so "
                "install it in its own venv: python -m venv .venv-genai && .venv-genai/bin/pip install "
                "onnxruntime-genai sentencepiece numpy && .venv-genai/bin/pip install --no-deps -e . "
                "(README: onnxruntime-genai engine)")


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
        """An og.Generator with the (B, T) equal-length int prompts appended (prefill happens on the first step)."""
        B, T = prompts.shape
        if T + max_new_tokens > self.max_len:
            raise ValueError(f"prompt {T} + {max_new_tokens} new tokens exceed the model's {self.max_len}-token "
                             "context; shorten the prompt or ask for fewer tokens")
        params = self.og.GeneratorParams(self.model)
        opts = {"max_length": T + max_new_tokens, "do_sample": False, "batch_size": B}
        if ignore_eos:
            opts["min_length"] = T + max_new_tokens
        params.set_search_options(**opts)
        gen = self.og.Generator(self.model, params)
        gen.append_tokens(np.ascontiguousarray(prompts, dtype=np.int32))
        return gen

    def generate_ids(self, prompts: Sequence[Sequence[int]], *, max_new_tokens: int = 64,
                     stop_ids: Sequence[int] = (), ignore_eos: bool = False,
                     on_tokens: Callable[[np.ndarray, np.ndarray], None] | None = None) -> GenerationResult:
        """Greedy tokens for equal-length token-id prompts through genai's generate_next_token() loop."""
        if max_new_tokens < 0:
            raise ValueError(f"max_new_tokens {max_new_tokens} must be >= 0")
        if len({len(p) for p in prompts}) != 1:
            raise ValueError("the genai engine takes equal-length prompts in a batch; pad them yourself or use "
                             "--engine ort")
        ids = np.asarray(prompts, dtype=np.int64)
        B = ids.shape[0]
        out: list[list[int]] = [[] for _ in range(B)]
        live = np.ones(B, dtype=bool)
        stop = set(int(s) for s in stop_ids)
        if max_new_tokens == 0:
            return GenerationResult(out, ["length"] * B, ids.shape[1])
        t0 = time.perf_counter()
        gen = self.generator(ids, max_new_tokens, ignore_eos=ignore_eos)
        t_first, steps = None, 0
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
            if on_tokens is not None:
                on_tokens(tok, live.copy())
            if not live.any():
                break
        t_end = time.perf_counter()
        reasons = ["length" if live[b] else "stop" for b in range(B)]
        return GenerationResult(out, reasons, ids.shape[1], (t_first or t_end) - t0, t_end - (t_first or t_end),
                                steps, [f"onnxruntime-genai ({self.provider})"])


def cmd_generate(args) -> int:
    """`tapernorm generate DIR --engine genai`: greedy text through onnxruntime-genai, our tokenizer and stops."""
    import sys

    from .generate import TextStreamer, load_tokenizer

    if args.temperature != 0.0 or args.top_k or args.top_p != 1.0:
        raise ValueError("--engine genai decodes greedily here; drop --temperature/--top-k/--top-p or use --engine ort")
    if args.unfused:
        raise ValueError("--engine genai runs model.onnx (genai_config.json names it); drop --unfused")
    if args.provider == "cuda":
        raise ValueError("--engine genai --provider cuda needs onnxruntime-genai-cuda and a CUDA compile "
                         "(untested here); use --provider cpu")
    eng = GenaiEngine(args.model_dir, provider="cpu", threads=args.threads)
    tok = load_tokenizer(Path(args.model_dir) / "tokenizer.model")
    rt = json.loads((Path(args.model_dir) / "runtime.json").read_text())
    bos = rt.get("bos_id") if rt.get("bos_id") is not None else tok.bos_id
    ids = ([bos] if bos is not None and bos >= 0 else []) + tok.encode(args.prompt)
    eos = rt.get("eos_id") if rt.get("eos_id") is not None else tok.eos_id
    stops = ([eos] if eos is not None and eos >= 0 else []) + list(args.stop_token)
    streamer = TextStreamer(tok, ids)
    if not args.quiet_prompt:
        sys.stdout.write(args.prompt)

    def show(t, live):
        if live[0]:
            sys.stdout.write(streamer.push(int(t[0])))
            sys.stdout.flush()
    r = eng.generate_ids([ids], max_new_tokens=args.max_new_tokens, stop_ids=stops, on_tokens=show)
    sys.stdout.write("\n")
    print(f"[{len(r.tokens[0])} tokens | prompt {r.prompt_tokens} | prefill {r.prefill_s * 1e3:.1f} ms | "
          f"decode {r.decode_tok_s:.1f} tok/s | stop: {r.stop_reasons[0]} | engine onnxruntime-genai (cpu) | "
          f"threads {args.threads or 'genai default'}]", file=sys.stderr)
    return 0
