"""`tapernorm generate` and `tapernorm chat`: the flags, and the handlers over either engine (ort or genai).

Importing this module loads nothing heavy (no numpy, onnxruntime or torch): `tapernorm --help` stays instant; the
handlers import the engines when they run.
"""
from __future__ import annotations

import argparse
import sys
import warnings


__all__ = ["add_cli", "open_text_model", "cmd_chat", "DefaultsFormatter"]


# -- CLI -------------------------------------------------------------------------------------------------

class DefaultsFormatter(argparse.HelpFormatter):
    """Appends "(default: X)" to a flag's help unless it already says its default or has none worth saying."""

    def _get_help_string(self, action):
        h = action.help or ""
        d = action.default
        if ("default" in h or not action.option_strings or d is None or d is False or d is argparse.SUPPRESS
                or (isinstance(d, list) and not d)):
            return h
        return (h + " " if h else "") + "(default: %(default)s)"


def _check_cli_values(args) -> None:
    """Refuse bad `generate` flag values with one line before any model is loaded."""
    try:
        args.prompt.encode("utf-8")
    except UnicodeEncodeError:  # argv bytes that are not UTF-8 arrive as lone surrogates
        raw = args.prompt.encode("utf-8", "surrogateescape")
        try:
            raw.decode("utf-8")
            where = ""
        except UnicodeDecodeError as e:
            where = f" (byte 0x{raw[e.start]:02x} at offset {e.start})"
        raise ValueError(f"--prompt is not valid UTF-8 text{where}; pass UTF-8 (check the terminal's locale "
                         "or the file the prompt came from)") from None
    if args.threads is not None and args.threads < 1:
        raise ValueError(f"--threads {args.threads} must be >= 1 (leave it out to use every core)")
    if args.max_new_tokens < 0:
        raise ValueError(f"--max-new-tokens {args.max_new_tokens} must be >= 0")


def _check_stop_tokens(stop_tokens, vocab_size: int) -> None:
    bad = [t for t in stop_tokens if not 0 <= t < vocab_size]
    if bad:
        raise ValueError(f"--stop-token {bad[0]} is not a token id of this model (its vocabulary is 0..{vocab_size - 1})")


def open_text_model(args):
    """The engine `args.engine` names over args.model_dir: a runtime.generate.TextModel (ort: Generator, genai:
    GenaiText); a provider fallback is one warning line."""
    from .generate import Generator
    if getattr(args, "engine", "ort") == "genai":  # onnxruntime-genai's C++ loop on the same directory
        from .genai_engine import open_genai_text
        return open_genai_text(args)
    with warnings.catch_warnings(record=True) as caught:  # provider fallback: one line, not a source echo
        warnings.simplefilter("always", RuntimeWarning)
        gen = Generator(args.model_dir, variant="model_unfused.onnx" if args.unfused else "model.onnx",
                        provider=args.provider, threads=args.threads)
    for w in caught:
        print(f"tapernorm {args.command}: warning: {w.message}", file=sys.stderr)
    return gen


def _sampling(args):
    from .sampling import SamplingParams
    return SamplingParams(temperature=args.temperature, top_k=args.top_k, top_p=args.top_p, seed=args.seed)


def _cmd_generate(args) -> int:
    _check_cli_values(args)
    gen = open_text_model(args)
    _check_stop_tokens(args.stop_token, gen.vocab_size)
    if args.chat:
        msgs = ([{"role": "system", "content": args.system}] if args.system else []) + \
            [{"role": "user", "content": args.prompt}]
        ids = gen.chat_ids(msgs)
    else:
        ids = gen.prompt_ids(args.prompt)
    holder: dict = {}
    pieces = gen.stream_ids(ids, max_new_tokens=args.max_new_tokens, sampling=_sampling(args),
                            stop_ids=gen.stop_ids(args.stop_token), stop_strings=args.stop, result=holder)
    if not (args.quiet_prompt or args.chat):
        sys.stdout.write(args.prompt)
    for piece in pieces:
        sys.stdout.write(piece)
        sys.stdout.flush()
    sys.stdout.write("\n")
    r = holder["result"]
    print(f"[{len(r.tokens[0])} tokens | prompt {r.prompt_tokens} | prefill {r.prefill_s * 1e3:.1f} ms | "
          f"decode {r.decode_tok_s:.1f} tok/s | stop: {r.stop_reasons[0]} | {gen.label()}]", file=sys.stderr)
    return 0


def cmd_chat(args) -> int:
    """`tapernorm chat DIR`: user turns from stdin, replies streamed, the history kept."""
    from .chat import run_chat, stdin_lines
    if args.max_new_tokens < 1:
        raise ValueError(f"--max-new-tokens {args.max_new_tokens} must be >= 1")
    gen = open_text_model(args)

    def write(s: str) -> None:
        sys.stdout.write(s)
        sys.stdout.flush()
    turns = run_chat(gen, lines=stdin_lines(), write=write, max_new_tokens=args.max_new_tokens, system=args.system,
                     stop=tuple(args.stop), sampling=_sampling(args), interactive=sys.stdin.isatty())
    print(f"[{turns} turn(s) | {gen.label()}]", file=sys.stderr)
    return 0


def add_sampling_args(p: argparse.ArgumentParser) -> None:
    """The sampling, thread and stop-string flags `generate` and `chat` share."""
    p.add_argument("--temperature", type=float, default=0.0, help="0 = greedy")
    p.add_argument("--top-k", type=int, default=0, help="keep the k most likely tokens (0 = off)")
    p.add_argument("--top-p", type=float, default=1.0, help="nucleus sampling mass (1 = off)")
    p.add_argument("--seed", type=int, default=0, help="sampling seed")
    p.add_argument("--threads", type=int, default=None, help="onnxruntime intra-op threads (default: all cores)")
    p.add_argument("--stop", action="append", default=[], metavar="TEXT",
                   help="stop when this text appears; it is not printed (repeatable)")


def add_cli(subparsers) -> None:
    """Register `tapernorm generate DIR --prompt ...` and `tapernorm chat DIR`."""
    p = subparsers.add_parser("generate", formatter_class=DefaultsFormatter,
                              help="generate text from a compiled model with onnxruntime",
                              description="Decode from a directory written by `tapernorm compile`: a plain prompt "
                                          "(BOS by the tokenizer's rule), or with --chat the checkpoint's chat "
                                          "template around it. Stops at every end token the checkpoint names, "
                                          "--stop strings, --max-new-tokens or the context.")
    p.add_argument("model_dir", metavar="DIR", help="directory written by `tapernorm compile`")
    p.add_argument("--prompt", required=True, help="prompt text (with --chat: the user message)")
    p.add_argument("--chat", action="store_true", help="apply the checkpoint's chat template to the prompt")
    p.add_argument("--system", default=None, help="with --chat: a system message (default: the template's own)")
    p.add_argument("--max-new-tokens", type=int, default=64, help="tokens to generate at most")
    p.add_argument("--provider", choices=("auto", "cpu", "cuda"), default="auto",
                   help="execution provider; cuda falls back to cpu with a warning when it cannot load")
    add_sampling_args(p)
    p.add_argument("--stop-token", type=int, action="append", default=[], help="extra stop token id (repeatable)")
    p.add_argument("--unfused", action="store_true", help="run model_unfused.onnx instead of the folded model.onnx")
    p.add_argument("--engine", choices=("ort", "genai"), default="ort",
                   help="ort: tapernorm's decode loop; genai: onnxruntime-genai's C++ loop (lean compile, own venv)")
    p.add_argument("--quiet-prompt", action="store_true", help="print only the generated text")
    p.add_argument("--debug", action="store_true", help="show tracebacks instead of one-line errors")
    p.set_defaults(func=_cmd_generate)
    from .chat import add_chat_cli
    add_chat_cli(subparsers, cmd_chat, DefaultsFormatter, add_sampling_args)
