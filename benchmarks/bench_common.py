"""What every benchmark records and how it writes: machine, library versions, paired-ratio statistics,
and results/<name>.json + .md written atomically."""
from __future__ import annotations

import importlib
import json
import os
import platform
import statistics
import sys
from pathlib import Path

from tapernorm.fileio import atomic_write_text

RESULTS = Path(__file__).resolve().parent / "results"
SCRATCH = Path(os.environ.get("TAPERNORM_BENCH_OUT", Path.cwd() / "runs" / "bench"))


def add_output_args(parser) -> None:
    """--out DIR (default: a scratch directory, runs/bench or $TAPERNORM_BENCH_OUT) and --save (write the
    committed benchmarks/results/ instead). A benchmark never overwrites committed results unless asked."""
    parser.add_argument("--out", type=Path, default=None,
                        help=f"directory for the JSON/markdown results (default: {SCRATCH}; see --save)")
    parser.add_argument("--save", action="store_true",
                        help=f"write into the committed results directory {RESULTS} (overrides --out)")


def output_dir(args) -> Path:
    """The directory add_output_args chose: RESULTS with --save, else --out, else the scratch directory."""
    d = RESULTS if getattr(args, "save", False) else Path(args.out) if getattr(args, "out", None) else SCRATCH
    d.mkdir(parents=True, exist_ok=True)
    return d


def machine_info() -> dict:
    """CPU model, core count, platform, Python, and the load average at the time of the call."""
    cpu = ""
    try:
        cpu = next(ln.split(":", 1)[1].strip() for ln in open("/proc/cpuinfo") if ln.startswith("model name"))
    except (OSError, StopIteration):
        pass
    return {"platform": platform.platform(), "cpu": cpu or platform.processor(), "cores": os.cpu_count(),
            "python": sys.version.split()[0], "loadavg_start": loadavg()}


def loadavg():
    """os.getloadavg() where the platform has it, else None."""
    try:
        return os.getloadavg()
    except (OSError, AttributeError):
        return None


def library_versions(names=("torch", "onnxruntime", "onnx", "numpy")) -> dict:
    """{package: __version__} for the libraries a result depends on (those installed)."""
    out = {}
    for n in names:
        try:
            out[n] = importlib.import_module(n).__version__
        except ImportError:
            pass
    return out


def spread(xs: list[float]) -> dict:
    """Median, quartiles, min, max and count of `xs` (e.g. the paired ratios of one comparison)."""
    xs = sorted(xs)
    q = statistics.quantiles(xs, n=4, method="inclusive") if len(xs) >= 2 else [xs[0]] * 3
    return {"median": statistics.median(xs), "p25": q[0], "p75": q[2], "min": xs[0], "max": xs[-1], "n": len(xs)}


def write_results(stem: Path, result: dict, markdown: str) -> tuple[Path, Path]:
    """Write stem.json and stem.md atomically; returns both paths."""
    js, md = stem.with_suffix(".json"), stem.with_suffix(".md")
    atomic_write_text(js, json.dumps(result, indent=2, default=str) + "\n")
    atomic_write_text(md, markdown)
    return js, md
