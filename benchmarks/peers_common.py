"""Helpers of bench_peers.py: the genai worker process, the bandwidth probe, the profiler's norm share,
node counts, and the per-config summary (tok/s, GB/s, paired ratios, greedy agreement)."""
from __future__ import annotations

import json
import os
import statistics
import subprocess
import tempfile
import time
from pathlib import Path

import numpy as np
import onnx

from bench_common import spread

NORM_OPS = {"SimplifiedLayerNormalization", "SkipSimplifiedLayerNormalization", "LayerNormalization",
            "SkipLayerNormalization", "RMSNormalization"}
SAME_WEIGHTS = ("lean_folded", "lean_unfused", "generic_folded", "lean_folded_aa", "lean_folded_genai",
                "lean_folded_ourloop_genai_ort",
                "genai_builder", "eager", "torch_compile")  # lean_baseline is another model (RMSNorm gains)
COMPARISONS = [  # (name, numerator variant, denominator variant): x = tok/s of numerator / tok/s of denominator
    ("lean_folded / generic_folded", "lean_folded", "generic_folded"),
    ("lean_folded / torch_compile", "lean_folded", "torch_compile"),
    ("lean_folded / eager", "lean_folded", "eager"),
    ("lean_folded (our loop) / genai_builder (genai loop)", "lean_folded", "genai_builder"),
    ("lean_folded_aa (our loop, 2nd session) / genai_builder (genai loop)", "lean_folded_aa", "genai_builder"),
    ("lean_folded_genai (genai loop) / genai_builder (genai loop)", "lean_folded_genai", "genai_builder"),
    ("lean_folded, our loop on genai's onnxruntime / genai_builder (genai loop)", "lean_folded_ourloop_genai_ort",
     "genai_builder"),
    ("lean_folded, our loop on genai's onnxruntime / our loop on ours", "lean_folded_ourloop_genai_ort",
     "lean_folded"),
    ("lean_folded / lean_baseline (fold gain)", "lean_folded", "lean_baseline"),
    ("lean_unfused / lean_baseline", "lean_unfused", "lean_baseline"),
    ("lean_folded / lean_unfused", "lean_folded", "lean_unfused"),
    ("A/A: lean_folded_aa / lean_folded", "lean_folded_aa", "lean_folded"),
]


def find_genai_python(arg: str | None) -> str | None:
    """The genai venv's python: --genai-python, $TAPERNORM_GENAI_PYTHON, or .venv-genai beside the repo."""
    root = Path(__file__).resolve().parents[1]
    for cand in (arg, os.environ.get("TAPERNORM_GENAI_PYTHON"), str(root / ".venv-genai" / "bin" / "python")):
        if cand and Path(cand).is_file():
            return cand
    return None


class GenaiWorker:
    """benchmarks/genai_worker.py running under the genai venv's python; JSON lines over pipes."""

    def __init__(self, python: str, script: Path):
        self.proc = subprocess.Popen([python, str(script)], stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True)
        probe = subprocess.run([python, "-c", "import onnxruntime_genai as og, os; print(og.__version__); "
                                "print(os.path.dirname(og.__file__))"], capture_output=True, text=True, check=True)
        self.version, pkg = probe.stdout.split()[:2]
        self.builder_py = Path(pkg) / "models" / "builder.py"

    def call(self, msg: dict) -> dict:
        self.proc.stdin.write(json.dumps(msg) + "\n")
        self.proc.stdin.flush()
        out = json.loads(self.proc.stdout.readline())
        if "error" in out:
            raise RuntimeError(f"genai worker: {out['error']}")
        return out

    def close(self) -> None:
        try:
            self.proc.stdin.write(json.dumps({"cmd": "quit"}) + "\n")
            self.proc.stdin.flush()
            self.proc.wait(timeout=30)
        except (OSError, subprocess.TimeoutExpired):
            self.proc.kill()


def bandwidth_probe(mb: int = 256, reps: int = 5) -> dict:
    """Single-thread DRAM bandwidth: best of `reps` (copy: read + write bytes; read: a float32 sum)."""
    n = mb * 2**20 // 4
    src = np.ones(n, dtype=np.float32)
    dst = np.empty_like(src)
    copy, read = [], []
    for _ in range(reps):
        t0 = time.perf_counter()
        np.copyto(dst, src)
        copy.append(2 * n * 4 / (time.perf_counter() - t0) / 1e9)
        t0 = time.perf_counter()
        src.sum(dtype=np.float32)
        read.append(n * 4 / (time.perf_counter() - t0) / 1e9)
    return {"copy_gb_s": max(copy), "read_gb_s": max(read), "copy_all": copy, "read_all": read, "mb": mb}


def norm_share(sess, batch: int, args, decoder_cls) -> dict:
    """Share of decode-step kernel time in normalization ops (ORT profiler, a separate profiled session)."""
    dec = decoder_cls(sess, max_len=args.prompt_len + args.profile_steps + 1)
    rng = np.random.default_rng(0)
    logits = dec.start(rng.integers(0, sess.config.vocab_size, (batch, args.prompt_len)))
    for _ in range(args.profile_steps):
        logits = dec.step(logits.argmax(-1))
    trace = json.loads(Path(sess.end_profiling()).read_text())
    runs = sorted((e["ts"], e["ts"] + e["dur"]) for e in trace if e.get("name") == "model_run")
    after_prefill = runs[0][1] if runs else 0
    total = norm = 0.0
    for e in trace:
        if e.get("cat") == "Node" and e.get("name", "").endswith("_kernel_time") and e["ts"] >= after_prefill:
            total += e["dur"]
            norm += e["dur"] if e.get("args", {}).get("op_name") in NORM_OPS else 0.0
    steps = max(1, len(runs) - 1)
    return {"norm_share_of_kernels": norm / total if total else float("nan"), "norm_us_per_step": norm / steps,
            "kernel_us_per_step": total / steps, "run_us_per_step": sum(b - a for a, b in runs[1:]) / steps}


def ort_nodes(paths: dict) -> dict:
    """{variant: node count after ORT's full optimization (1 thread, CPU)}."""
    import onnxruntime as ort
    out = {}
    with tempfile.TemporaryDirectory() as td:
        for v, p in paths.items():
            so = ort.SessionOptions()
            so.intra_op_num_threads, so.log_severity_level = 1, 3
            so.optimized_model_filepath = str(Path(td) / f"{v}.onnx")
            ort.InferenceSession(str(p), so, providers=["CPUExecutionProvider"])
            m = onnx.load(so.optimized_model_filepath, load_external_data=False)
            ops: dict = {}
            for n in m.graph.node:
                ops[n.op_type] = ops.get(n.op_type, 0) + 1
            out[v] = {"nodes": len(m.graph.node), "norm_ops": sum(ops.get(o, 0) for o in NORM_OPS), "ops": ops}
    return out


def summarize_config(cfg: dict, args) -> None:
    """Add variants (tok/s, GB/s, agreement), ratios, overhead and estimates to one config's dict, in place."""
    steps, B = args.new_tokens - 1, cfg["batch"]
    names = list(cfg["rounds"][0])
    times = {n: [r[n]["decode_s"] for r in cfg["rounds"]] for n in names}
    kv = 2 * args.depth * B * cfg["width"] * 4 * (args.prompt_len + steps / 2)  # k and v, H * D = width, fp32
    per_step = cfg["weight_bytes_per_step"] + kv
    ref = cfg["rounds"]
    var = {}
    for n in names:
        med = statistics.median(times[n])
        agree = None
        if n in SAME_WEIGHTS:
            agree = min(float(np.mean(np.asarray(r[n]["tokens"]) == np.asarray(r["lean_folded"]["tokens"])))
                        for r in ref)
        var[n] = {"tok_s": B * steps / med, "ms_per_step": med / steps * 1e3, "gb_s": per_step / (med / steps) / 1e9,
                  "greedy_agreement_with_lean_folded": agree}
    cfg["variants"] = var
    cfg["ratios"] = {name: spread([d / n for n, d in zip(times[a], times[b])])
                     for name, a, b in COMPARISONS if a in times and b in times}
    for r in cfg["rounds"]:
        for n in r:
            r[n].pop("tokens", None)
    oh = [(s - run) * 1e6 for s, run in cfg["overhead"]]
    cfg["our_loop_overhead_us"] = {"median": statistics.median(oh), "min": min(oh), "max": max(oh),
                                   "step_us_median": statistics.median(s for s, _ in cfg["overhead"]) * 1e6,
                                   "run_us_median": statistics.median(r for _, r in cfg["overhead"]) * 1e6}
    cfg["kv_bytes_per_step"], cfg["bytes_per_step"] = kv, per_step
    nb, nf = cfg["ort_nodes"]["lean_baseline"]["nodes"], cfg["ort_nodes"]["lean_folded"]["nodes"]
    cfg["cuda_launch_estimate"] = {"baseline_kernels": nb, "folded_kernels": nf, "fold_gain_if_launch_bound": nb / nf,
                                   "note": "estimate from node counts after ORT optimization, not measured"}


def recompute_ratios(cfg: dict) -> None:
    """(Re)compute a config's paired ratios from its stored per-round decode seconds (after new COMPARISONS)."""
    times = {n: [r[n]["decode_s"] for r in cfg["rounds"]] for n in cfg["rounds"][0]}
    cfg["ratios"] = {name: spread([d / n for n, d in zip(times[a], times[b])])
                     for name, a, b in COMPARISONS if a in times and b in times}
