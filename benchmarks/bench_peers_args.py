"""The flags of benchmarks/bench_peers.py (`tapernorm bench`), in a module that imports nothing heavy, so
`tapernorm bench --help` answers at once (bench_peers itself loads torch, onnx and the compiler)."""
from __future__ import annotations

import argparse
import os
import tempfile

from bench_common import add_output_args

DESCRIPTION = ("Decode peers side by side on the same weights: lean folded / unfused / baseline, generic folded, "
               "our lean graph under onnxruntime-genai's loop, genai's own builder graph under its loop, eager and "
               "torch.compile. Lockstep rounds (order reshuffled each round), medians of paired ratios with spread "
               "and an A/A pair; explicit ORT / torch threads. Writes peers.{json,md,png} into a scratch directory "
               "(benchmarks/results/ with --save).")


def build_parser() -> argparse.ArgumentParser:
    """bench_peers' argument parser (every flag with its default in --help)."""
    p = argparse.ArgumentParser(prog="tapernorm bench", description=DESCRIPTION,
                                formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    p.add_argument("--widths", type=int, nargs="+", default=[128, 256, 512], help="model widths")
    p.add_argument("--batches", type=int, nargs="+", default=[1, 4], help="batch sizes")
    p.add_argument("--depth", type=int, default=8, help="layers")
    p.add_argument("--head-dim", type=int, default=32, help="heads = width / head-dim (GroupQueryAttention's "
                   "rotary needs head_dim %% 16 == 0)")
    p.add_argument("--vocab", type=int, default=4096, help="vocabulary size")
    p.add_argument("--max-seq", type=int, default=512, help="context length")
    p.add_argument("--prompt-len", type=int, default=128, help="prompt tokens")
    p.add_argument("--new-tokens", type=int, default=64, help="generated tokens per block")
    p.add_argument("--rounds", type=int, default=15, help="lockstep rounds")
    p.add_argument("--warmup", type=int, default=1, help="untimed rounds first")
    p.add_argument("--threads", type=int, default=1, help="ORT intra-op threads (genai too) and torch threads")
    p.add_argument("--profile-steps", type=int, default=32, help="decode steps under ORT's profiler")
    p.add_argument("--no-torch", action="store_true", help="skip eager PyTorch")
    p.add_argument("--no-compile", action="store_true", help="skip torch.compile (10-50 s per config)")
    p.add_argument("--no-genai", action="store_true", help="skip the onnxruntime-genai variants")
    p.add_argument("--genai-python", default=None, help="python of a venv with onnxruntime-genai (else "
                   "$TAPERNORM_GENAI_PYTHON, else .venv-genai/bin/python beside the repo)")
    p.add_argument("--seed", type=int, default=0, help="prompt and weight seed")
    p.add_argument("--label", default="", help="free text stored with the results (e.g. 'reduced setting')")
    p.add_argument("--cache", default=os.path.join(tempfile.gettempdir(), "tapernorm-bench-peers-cache"),
                   help="where compiled variants are kept between runs")
    add_output_args(p)
    return p
