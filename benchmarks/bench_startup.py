"""Start-up of `tapernorm generate`: process wall time, and where the time before the first token goes.

Part 1 (lockstep, whole processes): `python -m tapernorm.compiler.cli generate DIR --prompt P
--max-new-tokens N --threads 1` for this tree, and optionally for a baseline tree (`--baseline-pkg`,
a folder holding an older `tapernorm` package), interleaved in a reshuffled order every round. The
start-up of a run is its wall time minus the prefill and decode time that the command itself prints.

Part 2 (in one process, this tree): the pieces of that start-up, each timed in a fresh interpreter:
importing the runtime, importing torch (what the old runtime paid), creating the ORT session with
full graph optimization, and creating it from a graph optimized and saved beforehand
(`SessionOptions.optimized_model_filepath`) with optimization disabled.

    python benchmarks/bench_startup.py --model-dir runs/demo/compiled [--baseline-pkg /tmp/oldpkg]
"""
from __future__ import annotations

import argparse
import os
import random
import re
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from bench_common import add_output_args, library_versions, loadavg, machine_info, output_dir, spread, write_results

STAT = re.compile(r"prefill ([\d.]+) ms \| decode ([\d.]+) tok/s")


def run_generate(model_dir: Path, prompt: str, new_tokens: int, pythonpath: str | None) -> dict:
    """One `tapernorm generate` process: wall seconds, and start-up = wall - prefill - decode."""
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    if pythonpath:
        env["PYTHONPATH"] = pythonpath
    cmd = [sys.executable, "-m", "tapernorm.compiler.cli", "generate", str(model_dir), "--prompt", prompt,
           "--max-new-tokens", str(new_tokens), "--threads", "1", "--quiet-prompt"]
    t0 = time.perf_counter()
    proc = subprocess.run(cmd, capture_output=True, text=True, env=env, cwd=tempfile.gettempdir())
    wall = time.perf_counter() - t0
    if proc.returncode != 0:
        raise RuntimeError(f"generate failed ({pythonpath or 'this tree'}): {proc.stderr.strip()[-400:]}")
    m = STAT.search(proc.stderr)
    if not m:
        raise RuntimeError(f"no timing line in generate's output: {proc.stderr.strip()[-400:]}")
    prefill, tok_s = float(m.group(1)) / 1e3, float(m.group(2))
    decode = (new_tokens - 1) / tok_s if tok_s > 0 else 0.0
    return {"wall_s": wall, "prefill_s": prefill, "decode_s": decode, "startup_s": wall - prefill - decode}


PIECES = {
    "python_bare": "pass",
    "import_runtime": "import tapernorm.runtime.generate",
    "import_torch": "import torch",
    "session_optimize_all": (
        "import onnxruntime as ort; so = ort.SessionOptions(); so.intra_op_num_threads = 1\n"
        "so.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL\n"
        "ort.InferenceSession({model!r}, so, providers=['CPUExecutionProvider'])"),
    "session_preoptimized": (
        "import onnxruntime as ort; so = ort.SessionOptions(); so.intra_op_num_threads = 1\n"
        "so.graph_optimization_level = ort.GraphOptimizationLevel.ORT_DISABLE_ALL\n"
        "ort.InferenceSession({opt!r}, so, providers=['CPUExecutionProvider'])"),
    "session_import_only": "import onnxruntime",
}


def time_piece(code: str) -> float:
    """Seconds a fresh interpreter spends on `code` (measured inside it, interpreter start excluded)."""
    prog = f"import time\nt0 = time.perf_counter()\n{code}\nprint(time.perf_counter() - t0)"
    proc = subprocess.run([sys.executable, "-c", prog], capture_output=True, text=True, cwd=tempfile.gettempdir(),
                          env={**os.environ, "OMP_NUM_THREADS": "1"})
    if proc.returncode != 0:
        raise RuntimeError(proc.stderr.strip()[-400:])
    return float(proc.stdout.strip().splitlines()[-1])


def save_optimized(model: Path, dst: Path) -> None:
    """Write the ORT_ENABLE_ALL-optimized graph of `model` to `dst` (what a compile could ship)."""
    import onnxruntime as ort
    so = ort.SessionOptions()
    so.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
    so.optimized_model_filepath = str(dst)
    ort.InferenceSession(str(model), so, providers=["CPUExecutionProvider"])


def main(argv=None) -> int:
    """Run both parts and write startup.json + .md (scratch dir by default, benchmarks/results with --save)."""
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0],
                                 formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    ap.add_argument("--model-dir", required=True, type=Path, help="a `tapernorm compile` output directory")
    ap.add_argument("--baseline-pkg", default=None, help="PYTHONPATH holding an older tapernorm package")
    ap.add_argument("--prompt", default="The for statement is used")
    ap.add_argument("--new-tokens", type=int, default=16)
    ap.add_argument("--rounds", type=int, default=8)
    ap.add_argument("--no-pieces", action="store_true", help="skip part 2 (the start-up pieces)")
    add_output_args(ap)
    args = ap.parse_args(argv)
    # the generate children run in the temp dir (no stray files in the caller's tree): paths must be absolute
    args.model_dir = args.model_dir.resolve()
    if not (args.model_dir / "model.onnx").is_file():
        ap.error(f"--model-dir {args.model_dir} has no model.onnx; pass a `tapernorm compile` output directory")
    if args.baseline_pkg:
        args.baseline_pkg = str(Path(args.baseline_pkg).resolve())
    variants = {"this tree": None, **({"baseline": args.baseline_pkg} if args.baseline_pkg else {})}
    runs: dict[str, list[dict]] = {k: [] for k in variants}
    rng = random.Random(0)
    run_generate(args.model_dir, args.prompt, args.new_tokens, None)  # warm the page cache
    for _ in range(args.rounds):
        order = list(variants)
        rng.shuffle(order)
        for name in order:
            runs[name].append(run_generate(args.model_dir, args.prompt, args.new_tokens, variants[name]))
    with tempfile.TemporaryDirectory() as td:
        opt = Path(td) / "model.opt.onnx"
        save_optimized(args.model_dir / "model.onnx", opt)
        pieces: dict[str, list[float]] = {k: [] for k in PIECES}
        for _ in range(0 if args.no_pieces else args.rounds):
            order = list(PIECES)
            rng.shuffle(order)
            for name in order:
                pieces[name].append(time_piece(PIECES[name].format(model=str(args.model_dir / "model.onnx"),
                                                                   opt=str(opt))))
    summary = {k: {f: statistics.median(r[f] for r in v) for f in ("wall_s", "startup_s", "prefill_s", "decode_s")}
               for k, v in runs.items()}
    ratio = None
    if "baseline" in runs:
        ratio = spread([b["startup_s"] / a["startup_s"] for a, b in zip(runs["this tree"], runs["baseline"])])
    piece_med = {k: statistics.median(v) for k, v in pieces.items() if v}
    session_gain = spread([a / b for a, b in zip(pieces["session_optimize_all"], pieces["session_preoptimized"])]
                          or [float("nan")])
    result = {"machine": machine_info(), "loadavg_end": loadavg(), "versions": library_versions(),
              "settings": {**{k: str(v) for k, v in vars(args).items()}, "threads": 1}, "runs": runs,
              "median": summary, "baseline_over_this_startup": ratio, "pieces_median_s": piece_med,
              "pieces": pieces, "session_optimize_all_over_preoptimized": session_gain}
    rows = "\n".join(f"| {k} | {v['wall_s']:.3f} | {v['startup_s']:.3f} | {v['prefill_s'] * 1e3:.1f} | "
                     f"{v['decode_s'] * 1e3:.1f} |" for k, v in summary.items())
    prow = "\n".join(f"| {k} | {v * 1e3:.1f} |" for k, v in piece_med.items())
    md = (f"# `tapernorm generate` start-up\n\n{args.new_tokens} new tokens, 1 ORT thread, {args.rounds} lockstep "
          f"rounds, model `{args.model_dir}`; machine {result['machine']['cpu']} ({result['machine']['cores']} "
          f"cores, load {result['machine']['loadavg_start']}).\n\n"
          "| tree | wall s (median) | start-up s | prefill ms | decode ms |\n|---|---|---|---|---|\n" + rows +
          ("\n\nbaseline / this tree start-up, paired: median "
           f"x{ratio['median']:.2f} (p25 {ratio['p25']:.2f}, p75 {ratio['p75']:.2f}, n {ratio['n']})" if ratio else "") +
          "\n\n## Pieces (fresh interpreter each, median ms)\n\n| piece | ms |\n|---|---|\n" + prow +
          f"\n\nsession with full optimization / from a saved optimized graph: median x{session_gain['median']:.2f} "
          f"(p25 {session_gain['p25']:.2f}, p75 {session_gain['p75']:.2f})\n")
    js, mdp = write_results(output_dir(args) / "startup", result, md)
    print(md)
    print(f"wrote {js} and {mdp}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
