"""`tapernorm bench`: the decode benchmark against the onnxruntime peers (benchmarks/bench_peers.py).

The parser only forwards the arguments (`tapernorm bench --help` shows the benchmark's own flags, from
benchmarks/bench_peers_args.py, which imports nothing heavy, so the help is instant); the benchmark lives in
the repository's benchmarks/ directory, beside this package in a source checkout.

The unfused graph it times is its own: `tapernorm compile` writes model_unfused.onnx only with --unfused, so the
benchmark compiles its random taper model itself with `compile_checkpoint(..., unfused=True)`
(benchmarks/peers_models.py); it never needs a user's compile output to carry one.
"""
from __future__ import annotations

import argparse
import sys
from pathlib import Path

__all__ = ["add_cli"]

BENCH_DIR = Path(__file__).resolve().parents[1] / "benchmarks"


def _cmd_bench(args) -> int:
    script = BENCH_DIR / "bench_peers.py"
    if not script.is_file():
        raise FileNotFoundError(f"{script} is missing; `tapernorm bench` runs from a source checkout of tapernorm "
                                "(the benchmarks/ directory is not installed with the package)")
    sys.path.insert(0, str(BENCH_DIR))
    if any(a in ("-h", "--help") for a in args.bench_args):
        import bench_peers_args  # the flags only: no torch

        bench_peers_args.build_parser().parse_args(args.bench_args)  # prints the help and exits
        return 0
    import bench_peers  # loaded on use: torch, onnx, the compiler

    return int(bench_peers.main(args.bench_args) or 0)


def add_cli(subparsers) -> None:
    """Register `tapernorm bench [BENCH FLAGS...]`."""
    p = subparsers.add_parser(
        "bench", add_help=False, prefix_chars="+", help="decode speed of the lean graph against its onnxruntime peers",
        description="Runs benchmarks/bench_peers.py: lean folded / unfused / baseline, generic, onnxruntime-genai "
                    "(builder graph and ours), eager and torch.compile on the same weights (it compiles its own random "
                    "models, the unfused graph included); writes "
                    "peers.{json,md,png} into a scratch directory (benchmarks/results/ with --save). "
                    "`tapernorm bench --help` lists its flags with their defaults.")
    p.add_argument("bench_args", nargs=argparse.REMAINDER, help="flags passed to bench_peers.py")
    p.set_defaults(func=_cmd_bench)
