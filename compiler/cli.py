"""The `tapernorm` command: train, eval, plot, compile, demo, generate.

Each subcommand's flags are declared next to the code it drives (`tapernorm.train.cli`,
`tapernorm.runtime.generate`, and compile/demo below). Building the parser imports no torch, and each
handler loads its implementation when it runs, so `tapernorm generate` starts in onnxruntime's time,
not torch's.
"""
from __future__ import annotations

import argparse
import sys
import time
import warnings
from pathlib import Path

from tapernorm import __version__
from tapernorm.runtime import generate_cli as runtime_generate
from tapernorm.train import cli as train_cli
from tapernorm.train import finetune_cli

from . import bench_cli
from .defaults import DEFAULT_PROMPT, DTYPE_NAMES, PARITY_TOKENS

__all__ = ["main", "build_parser", "CliError"]

DESCRIPTION = ("Train language models with TaperNorm, fold the gate-0 norms into the following linear layers "
               "with torch.fx, export ONNX with a KV cache, and decode with ONNX Runtime.")
EPILOG = """pipeline:
  tapernorm train --out runs/tiny                      train through the taper to gate 0
  tapernorm compile runs/tiny/model --out out/tiny     fold, export ONNX, check parity
  tapernorm generate out/tiny --prompt "Hello"         decode with onnxruntime
  tapernorm demo                                       all three on a tiny model (~1 min)

`tapernorm COMMAND --help` lists every flag of a command with its default."""


class CliError(Exception):
    """An error to print as one line and exit 2."""


def _cmd_compile(args) -> int:
    from .pipeline import compile_checkpoint, summary_text  # loaded on use: keeps the parser torch-free

    warnings.filterwarnings("ignore", category=FutureWarning)  # torch pytree deprecation noise during capture
    rep = compile_checkpoint(args.checkpoint, args.out, dtype=args.dtype, allow_unfolded=args.allow_unfolded,
                             parity_tokens=args.parity_tokens, prompt=args.prompt, provider=args.provider,
                             graph=args.graph, fallback_generic=args.fallback_generic,
                             precision=args.precision, block_size=args.block_size, accuracy_level=args.accuracy_level,
                             unfused=args.unfused, log=lambda m: print(f"[compile] {m}", file=sys.stderr))
    print(summary_text(rep))
    return 0


def _cmd_demo(args) -> int:
    from tapernorm.train import TrainConfig, train  # loaded on use: keeps the parser torch-free

    from .pipeline import compile_checkpoint, summary_text  # loaded on use: keeps the parser torch-free

    warnings.filterwarnings("ignore", category=FutureWarning)
    out = Path(args.out)
    t0 = time.perf_counter()
    print(f"[demo] training preset {args.preset} ({args.mode}-taper, {args.steps} steps, gate -> 0) in {out / 'run'}",
          file=sys.stderr)
    res = train(TrainConfig(out_dir=str(out / "run"), preset=args.preset, mode=args.mode, steps=args.steps,
                            overwrite=True, progress=not args.quiet, seed=args.seed))
    print(f"[demo] trained: val loss {res.val_loss:.3f}, final gate {res.final_gate}, {res.seconds:.0f} s",
          file=sys.stderr)
    rep = compile_checkpoint(res.model_dir, out / "compiled", parity_tokens=args.parity_tokens,
                             log=lambda m: print(f"[demo] {m}", file=sys.stderr))
    print(summary_text(rep))
    from tapernorm.runtime.generate import Generator

    gen = Generator(out / "compiled", provider="cpu", threads=1)
    text = gen.generate(args.prompt, max_new_tokens=args.max_new_tokens)
    print(f"[demo] ORT ({gen.session.providers[0]}) greedy: {args.prompt!r} -> {text!r}")
    print(f"[demo] done in {time.perf_counter() - t0:.0f} s; try: tapernorm generate {out / 'compiled'} "
          f"--prompt {args.prompt!r}")
    return 0


def add_compile_cli(subparsers) -> None:
    """Register `tapernorm compile` and `tapernorm demo`."""
    fmt = argparse.ArgumentDefaultsHelpFormatter
    p = subparsers.add_parser(
        "compile", formatter_class=fmt,
        help="fold a gate-0 checkpoint and export ONNX with parity",
        description="Capture a checkpoint with torch.export, fold every gate-0 TaperNorm into the linears after "
                    "it, export model.onnx (folded; with --unfused also model_unfused.onnx, explicit x*s maps) with a KV "
                    "cache, and check it against PyTorch (prompt logits, greedy tokens). Nothing is written unless "
                    "parity holds. Each stage prints one line with its time and peak memory; a model that would not "
                    "fit in memory is refused before loading.")
    p.add_argument("checkpoint", metavar="CHECKPOINT", help="checkpoint directory (config.json + model.safetensors)")
    p.add_argument("--out", required=True, metavar="DIR",
                   help="output directory (new, empty, or a previous compile output: the files compile owns are "
                        "replaced, any others you put there are kept)")
    p.add_argument("--dtype", choices=DTYPE_NAMES, default="float32",
                   help="compute dtype of the output graph, whatever the checkpoint's own dtype (a bf16 checkpoint "
                        "compiles to float32 by default; the report records both; bfloat16 does not run on ORT CPU, "
                        "needs --provider cuda)")
    p.add_argument("--unfused", action="store_true",
                   help="also write model_unfused.onnx (the explicit gate-0 maps, for benchmarks and debugging; "
                        "parity-checked like model.onnx)")
    p.add_argument("--allow-unfolded", action="store_true",
                   help="compile even if some gates are not 0 (those norms stay, computed per token)")
    p.add_argument("--parity-tokens", type=int, default=PARITY_TOKENS, metavar="N",
                   help="greedy tokens that must match PyTorch")
    p.add_argument("--prompt", default=DEFAULT_PROMPT, help="parity prompt text")
    p.add_argument("--provider", choices=("cpu", "cuda"), default="cpu", help="onnxruntime provider for parity")
    p.add_argument("--graph", choices=("lean", "generic"), default="lean",
                   help="lean: GroupQueryAttention, shared KV buffer, fused Skip norms, last-position logits (also "
                        "runs under onnxruntime-genai); generic: the torch.onnx dynamo export")
    p.add_argument("--fallback-generic", action="store_true",
                   help="with --graph lean: use the generic export when the lean builder cannot express the model "
                        "(otherwise that is an error naming the layer)")
    p.add_argument("--precision", choices=("fp32", "fp16", "bf16", "int8", "int4"), default="fp32",
                   help="fold in fp32, then cast the graph (fp16/bf16: whole graph incl. GroupQueryAttention; bf16 "
                        "needs --provider cuda) or quantize weights only (int8/int4: MatMulNBits, fp32 activations); "
                        "parity against the fp32 model with a tolerance per precision")
    p.add_argument("--block-size", type=int, default=32, metavar="N",
                   help="int8/int4: weights per quantization block along K (16/32/64/128/256; must divide every "
                        "layer's K)")
    p.add_argument("--accuracy-level", type=int, choices=(0, 1, 2, 3, 4), default=None, metavar="L",
                   help="int8/int4: MatMulNBits accuracy level (4: int8 activations, 1: fp32; 0: unset); default 4 "
                        "on cpu, 0 on cuda (onnxruntime-genai's defaults)")
    p.add_argument("--debug", action="store_true", help="show tracebacks instead of one-line errors")
    p.set_defaults(func=_cmd_compile)

    d = subparsers.add_parser(
        "demo", formatter_class=fmt, help="train a tiny model to gate 0, compile it, generate with onnxruntime",
        description="The whole pipeline on a tiny model: train through the taper to gate 0 on the builtin corpus, "
                    "compile with parity, and generate greedily with onnxruntime.")
    d.add_argument("--out", default="runs/demo", metavar="DIR", help="working directory (run/ and compiled/)")
    d.add_argument("--preset", default="tiny", choices=("tiny", "tiny-gpt2"), help="model preset")
    d.add_argument("--mode", choices=("internal", "all"), default="internal", help="taper mode")
    d.add_argument("--steps", type=int, default=600, help="training steps")
    d.add_argument("--seed", type=int, default=0, help="training seed")
    d.add_argument("--parity-tokens", type=int, default=PARITY_TOKENS, metavar="N",
                   help="greedy tokens that must match PyTorch")
    d.add_argument("--prompt", default="The for statement is used",
                   help="generation prompt (the builtin corpus is Python's docs)")
    d.add_argument("--max-new-tokens", type=int, default=24, metavar="N", help="tokens to generate")
    d.add_argument("--quiet", action="store_true", help="no training progress bar")
    d.add_argument("--debug", action="store_true", help="show tracebacks instead of one-line errors")
    d.set_defaults(func=_cmd_demo)


def build_parser() -> argparse.ArgumentParser:
    """The argument parser with every subcommand (imports no torch)."""
    parser = argparse.ArgumentParser(prog="tapernorm", description=DESCRIPTION, epilog=EPILOG,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--version", action="version", version=f"tapernorm {__version__}")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")
    train_cli.add_cli(sub)
    finetune_cli.add_cli(sub)
    add_compile_cli(sub)
    bench_cli.add_cli(sub)
    runtime_generate.add_cli(sub)
    return parser


def main(argv: list[str] | None = None) -> int:
    """Entry point: parse, dispatch, turn expected errors into one clear line."""
    parser = build_parser()
    args = parser.parse_args(argv)
    if not getattr(args, "func", None):
        parser.print_help()
        return 2
    try:
        return int(args.func(args) or 0)
    except KeyboardInterrupt:
        print("tapernorm: interrupted", file=sys.stderr)
        return 130
    except (ValueError, FileNotFoundError, RuntimeError, CliError, OSError) as e:
        if getattr(args, "debug", False):
            raise
        print(f"tapernorm {args.command}: error: {e}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
