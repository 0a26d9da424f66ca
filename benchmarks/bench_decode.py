"""KV-cached decode speed: folded ONNX vs unfused ONNX vs RMSNorm-baseline ONNX vs eager PyTorch.

Random-weight models (depth 8, 16 heads, vocab 4096 by default) at each width. The Internal-Taper
model (calibrated, gate 0) goes through the real compile pipeline (fold + materialize + export +
parity); the baseline (plain RMSNorm, same weight shapes) through the same exporter, twice: as
exported (`x * rsqrt(mean(x^2) + eps)`, which ORT does not fuse) and in the `x / sqrt(...)` form that
ORT fuses into SimplifiedLayerNormalization (the fair baseline).

Timing: every variant decodes the same random prompt; variants advance one decode step at a time in
lockstep, the order reshuffled at every step; each round is one prompt + N new tokens; speedups are
medians over rounds of paired ratios (baseline time / variant time in the same round) with their
spread. ORT and torch thread counts are set explicitly. The norms' share of a decode step comes
from ORT's profiler (separate profiled sessions, so profiling never slows the timed runs).

    .venv/bin/python benchmarks/bench_decode.py                      # w128/w256, batch 1/4, a few minutes
    .venv/bin/python benchmarks/bench_decode.py --widths 128 --batches 1 --rounds 3   # quick look
"""
from __future__ import annotations

import argparse
import json
import os
import re
import shutil
import statistics
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import onnx
import torch
import torch.nn as nn

from bench_common import add_output_args, library_versions, loadavg, machine_info, output_dir, spread, write_results
from tapernorm import build_model, calibrate, set_gate
from tapernorm.checkpoint import save_checkpoint
from tapernorm.compiler.export_onnx import KVCacheLM, export_onnx, write_runtime_json
from tapernorm.compiler.pipeline import compile_checkpoint
from tapernorm.runtime import DecoderSession, OrtDecoder
from tapernorm.runtime.torch_ref import TorchRefDecoder

ROOT = Path(__file__).resolve().parent
NORM_OPS = {"SimplifiedLayerNormalization", "SkipSimplifiedLayerNormalization", "LayerNormalization",
            "SkipLayerNormalization", "RMSNormalization"}
NORM_SCOPE = re.compile(r"\.(TaperNorm|TaperLayerNorm|RMSNorm|LayerNorm|DivRMSNorm)/")


class DivRMSNorm(nn.Module):
    """RMSNorm written as Pow -> ReduceMean -> Add -> Sqrt -> Div -> Mul, the pattern ORT fuses."""

    def __init__(self, src: nn.RMSNorm):
        super().__init__()
        self.weight, self.eps = src.weight, src.eps

    def forward(self, x):
        return x / torch.sqrt(x.pow(2).mean(-1, keepdim=True) + self.eps) * self.weight


def make_models(width: int, depth: int, heads: int, vocab: int, max_seq: int, seed: int):
    """(baseline DecoderLM, Internal-Taper DecoderLM at gate 0): same shapes, random weights."""
    models = {}
    for mode in ("baseline", "internal"):
        torch.manual_seed(seed)
        m = build_model("w128", dim=width, n_layers=depth, n_heads=heads, vocab_size=vocab, max_seq_len=max_seq,
                        taper_mode=mode)
        with torch.no_grad():
            for n, p in m.named_parameters():
                if n.endswith("norm.weight") or n.endswith("layernorm.weight"):
                    p.uniform_(0.5, 1.5)
        if mode != "baseline":
            g = torch.Generator().manual_seed(seed)
            calibrate(m, [torch.randint(0, vocab, (2, 64), generator=g) for _ in range(3)])
            set_gate(m, 0.0)
        models[mode] = m.eval()
    return models["baseline"], models["internal"]


def build_variants(width: int, args, cache: Path) -> dict:
    """Compile/export the ONNX files for one width (cached by settings); returns {variant: onnx path}."""
    key = f"w{width}-d{args.depth}-h{args.heads}-v{args.vocab}-s{args.seed}"
    d = cache / key
    paths = {"onnx_rmsnorm_fused": d / "baseline_div" / "model.onnx",
             "onnx_rmsnorm": d / "baseline" / "model.onnx",
             "onnx_unfused": d / "taper" / "model_unfused.onnx",
             "onnx_folded": d / "taper" / "model.onnx"}
    base, taper = make_models(width, args.depth, args.heads, args.vocab, args.max_seq, args.seed)
    if not all(p.is_file() for p in paths.values()):
        shutil.rmtree(d, ignore_errors=True)
        t0 = time.perf_counter()
        save_checkpoint(taper, d / "taper_ckpt")
        compile_checkpoint(d / "taper_ckpt", d / "taper", parity_tokens=4, graph="generic",  # lean: bench_peers.py
                           unfused=True)
        export_onnx(KVCacheLM(base).eval(), base.config, paths["onnx_rmsnorm"])
        div = build_model(base.config)
        div.load_state_dict(base.state_dict())
        for name, mod in list(div.named_modules()):
            for cn, child in list(mod.named_children()):
                if isinstance(child, nn.RMSNorm):
                    setattr(mod, cn, DivRMSNorm(child))
        export_onnx(KVCacheLM(div.eval()).eval(), base.config, paths["onnx_rmsnorm_fused"])
        for key in ("onnx_rmsnorm", "onnx_rmsnorm_fused"):  # the runtime reads the context limit from it
            write_runtime_json(paths[key].parent, base.config)
        print(f"[bench] built w{width} ONNX variants in {time.perf_counter() - t0:.0f} s -> {d}", file=sys.stderr)
    return paths, base, taper


def session(path: Path, threads: int, **kw) -> DecoderSession:
    return DecoderSession(path, provider="cpu", intra_op_threads=threads, inter_op_threads=1, spinning=False, **kw)


def optimized_ops(path: Path, threads: int, tmp: Path) -> dict:
    """Op-type counts of the graph after ORT's optimizations (what actually runs)."""
    out = tmp / (path.parent.name + "-" + path.stem + ".opt.onnx")
    session(path, threads, optimized_model_path=str(out))
    m = onnx.load(str(out), load_external_data=False)
    counts: dict = {}
    for n in m.graph.node:
        counts[n.op_type] = counts.get(n.op_type, 0) + 1
    return {"nodes": len(m.graph.node), "norm_fused_ops": sum(counts.get(o, 0) for o in NORM_OPS),
            "op_counts": dict(sorted(counts.items()))}


def norm_node_names(path: Path) -> set[str]:
    """Names of the exported nodes that come from a norm module (by the exporter's namespace metadata)."""
    m = onnx.load(str(path), load_external_data=False)
    return {n.name for n in m.graph.node
            if any(p.key == "namespace" and NORM_SCOPE.search(p.value) for p in n.metadata_props)}


def norm_share(path: Path, threads: int, batch: int, prompt_len: int, steps: int, tmp: Path) -> dict:
    """Share of decode-step kernel time spent in normalization ops (ORT profiler, separate session)."""
    s = session(path, threads, profile=True, profile_prefix=str(tmp / f"prof-{path.parent.name}-{path.stem}"))
    dec = OrtDecoder(s)
    rng = np.random.default_rng(0)
    logits = dec.start(rng.integers(0, s.config.vocab_size, (batch, prompt_len)))
    for _ in range(steps):
        logits = dec.step(logits.argmax(-1))
    trace = json.loads(Path(s.end_profiling()).read_text())
    names = norm_node_names(path)
    runs = sorted((e["ts"], e["ts"] + e["dur"]) for e in trace if e.get("name") == "model_run")
    after_prefill = runs[0][1] if runs else 0
    total = norm = 0.0
    for e in trace:
        if e.get("cat") != "Node" or not e.get("name", "").endswith("_kernel_time") or e["ts"] < after_prefill:
            continue
        total += e["dur"]
        if e.get("args", {}).get("op_name") in NORM_OPS or e["name"][:-len("_kernel_time")] in names:
            norm += e["dur"]
    run_us = sum(b - a for a, b in runs[1:])
    return {"norm_share_of_kernels": norm / total if total else float("nan"),
            "norm_us_per_step": norm / max(1, len(runs) - 1), "kernel_us_per_step": total / max(1, len(runs) - 1),
            "run_us_per_step": run_us / max(1, len(runs) - 1)}


def weight_bytes_onnx(path: Path) -> int:
    m = onnx.load(str(path), load_external_data=False)
    return sum(int(np.prod(t.dims)) * 4 for t in m.graph.initializer)


def weight_bytes_torch(model: nn.Module) -> int:
    seen, total = set(), 0
    for p in model.parameters():
        if p.data_ptr() not in seen:
            seen.add(p.data_ptr())
            total += p.numel() * p.element_size()
    return total


def lockstep(decoders: dict, batch: int, prompt_len: int, new_tokens: int, rounds: int, warmup: int,
             vocab: int, seed: int) -> dict:
    """Per-round decode seconds {variant: [s, ...]} and greedy-token agreement with the first variant."""
    rng = np.random.default_rng(seed)
    names = list(decoders)
    times = {n: [] for n in names}
    agree = {n: [] for n in names}
    for r in range(warmup + rounds):
        prompt = rng.integers(0, vocab, (batch, prompt_len))
        tok, dt, seqs = {}, {n: 0.0 for n in names}, {n: [] for n in names}
        for n in rng.permutation(names):
            tok[n] = decoders[n].start(prompt).argmax(-1)
            seqs[n].append(tok[n])
        for _ in range(new_tokens - 1):
            for n in rng.permutation(names):
                t0 = time.perf_counter()
                logits = decoders[n].step(tok[n])
                dt[n] += time.perf_counter() - t0
                tok[n] = logits.argmax(-1)
                seqs[n].append(tok[n])
        if r >= warmup:
            ref = np.stack(seqs[names[0]])
            for n in names:
                times[n].append(dt[n])
                agree[n].append(float((np.stack(seqs[n]) == ref).mean()))
    return {"times": times, "agree": agree}


def ratio_stats(num: list[float], den: list[float]) -> dict:
    """Median and spread of paired ratios num[i] / den[i] (speedup of den's variant over num's)."""
    return spread([a / b for a, b in zip(num, den)])


def run(args) -> dict:
    torch.set_num_threads(args.threads)
    cache = Path(args.cache)
    cache.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix="bench-decode-"))
    results = {"machine": machine_info(), "versions": library_versions(), "settings": vars(args).copy(), "configs": []}
    ctx = args.prompt_len + args.new_tokens
    try:
        for width in args.widths:
            paths, base, taper = build_variants(width, args, cache)
            graphs = {v: optimized_ops(p, args.threads, tmp) for v, p in paths.items()}
            wbytes = {v: weight_bytes_onnx(p) for v, p in paths.items()}
            wbytes.update(torch_rmsnorm=weight_bytes_torch(base), torch_unfused=weight_bytes_torch(taper))
            for batch in args.batches:
                sessions = {v: session(p, args.threads) for v, p in paths.items()}
                decs = {v: OrtDecoder(s, max_len=ctx) for v, s in sessions.items()}
                if not args.no_torch:
                    decs["torch_rmsnorm"] = TorchRefDecoder(base, batch=batch, max_len=ctx)
                    decs["torch_unfused"] = TorchRefDecoder(taper, batch=batch, max_len=ctx)
                # A/A null pair: a second session on the folded graph measures the noise floor of a ratio
                decs["onnx_folded_aa"] = OrtDecoder(session(paths["onnx_folded"], args.threads), max_len=ctx)
                wbytes["onnx_folded_aa"] = wbytes["onnx_folded"]
                # first variant is the agreement reference: folded vs everything tapered
                decs = {"onnx_folded": decs.pop("onnx_folded"), **decs}
                t0 = time.perf_counter()
                lk = lockstep(decs, batch, args.prompt_len, args.new_tokens, args.rounds, args.warmup, args.vocab,
                              args.seed + batch)
                wall = time.perf_counter() - t0
                steps = args.new_tokens - 1
                cfg = base.config
                kv_bytes = 2 * cfg.n_layers * batch * cfg.n_heads * cfg.head_dim * 4 * (args.prompt_len + steps / 2)
                var = {}
                for v, ts in lk["times"].items():
                    med = statistics.median(ts)
                    var[v] = {"tok_s": batch * steps / med, "tok_s_all": [batch * steps / t for t in ts],
                              "ms_per_step": med / steps * 1e3,
                              "gb_s": (wbytes[v] + kv_bytes) / (med / steps) / 1e9,
                              "weight_mb": wbytes[v] / 1e6, "greedy_agreement_with_folded": min(lk["agree"][v])}
                T = lk["times"]
                ratios = {
                    "folded_vs_rmsnorm_fused": ratio_stats(T["onnx_rmsnorm_fused"], T["onnx_folded"]),
                    "unfused_vs_rmsnorm_fused": ratio_stats(T["onnx_rmsnorm_fused"], T["onnx_unfused"]),
                    "folded_vs_rmsnorm": ratio_stats(T["onnx_rmsnorm"], T["onnx_folded"]),
                    "unfused_vs_rmsnorm": ratio_stats(T["onnx_rmsnorm"], T["onnx_unfused"]),
                    "folded_vs_unfused": ratio_stats(T["onnx_unfused"], T["onnx_folded"]),
                    "null_aa_folded_vs_folded": ratio_stats(T["onnx_folded_aa"], T["onnx_folded"]),
                }
                if not args.no_torch:
                    ratios["torch_unfused_vs_torch_rmsnorm"] = ratio_stats(T["torch_rmsnorm"], T["torch_unfused"])
                    ratios["onnx_folded_vs_torch_rmsnorm"] = ratio_stats(T["torch_rmsnorm"], T["onnx_folded"])
                shares = {v: norm_share(p, args.threads, batch, args.prompt_len, args.profile_steps, tmp)
                          for v, p in paths.items()}
                results["configs"].append({"width": width, "batch": batch, "variants": var, "ratios": ratios,
                                           "norm_profile": shares, "graphs": graphs, "wall_s": wall,
                                           "kv_bytes_per_step": kv_bytes})
                print(f"[bench] w{width} B{batch}: " + ", ".join(f"{v} {d['tok_s']:.0f} tok/s" for v, d in var.items())
                      + f" | folded/rmsnorm_fused x{ratios['folded_vs_rmsnorm_fused']['median']:.3f}"
                      f" | norm share (rmsnorm_fused) {shares['onnx_rmsnorm_fused']['norm_share_of_kernels']:.1%}",
                      file=sys.stderr)
                del sessions, decs
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    results["machine"]["loadavg_end"] = loadavg()
    return results


def markdown(res: dict) -> str:
    s, m, v = res["settings"], res["machine"], res["versions"]
    out = ["# Decode benchmark (KV cache, greedy)", "",
           f"Machine: {m['cpu']}, {m['cores']} cores, {m['platform']}; load avg at start {m['loadavg_start']}, "
           f"end {m['loadavg_end']}.  ",
           f"Versions: torch {v['torch']}, onnxruntime {v['onnxruntime']}, onnx {v['onnx']}, numpy {v['numpy']}.  ",
           f"Settings: depth {s['depth']}, {s['heads']} heads, vocab {s['vocab']}, prompt {s['prompt_len']}, "
           f"{s['new_tokens']} new tokens ({s['new_tokens'] - 1} timed decode steps), {s['rounds']} rounds "
           f"(+{s['warmup']} warm-up), ORT intra-op threads {s['threads']} (inter-op 1, no spinning), torch threads "
           f"{s['threads']}, CPUExecutionProvider, fp32, random weights.", "",
           "Variants advance one decode step at a time in lockstep, order reshuffled every step. Speedup = median "
           "over rounds of (baseline decode time / variant decode time) in the same round, [p25, p75]. "
           "`rmsnorm_fused`: baseline whose RMSNorm ORT fuses into SimplifiedLayerNormalization (fair baseline); "
           "`rmsnorm`: baseline as exported (rsqrt form, not fused). GB/s = (weights + KV cache at mean context) "
           "per step / step time. Norm share: normalization kernels / all kernels in a decode step (ORT profiler). "
           "`null_aa`: two sessions on the same folded graph - its spread is the noise floor of every ratio. "
           "Greedy agreement is with the folded graph (same weights for the tapered variants; random-weight logits "
           "have near-ties, so float-rounding differences can flip a token and the sequences then diverge).",
           "", "| width | B | variant | tok/s | ms/step | GB/s | norm share | nodes (opt) | greedy agree |",
           "|---|---|---|---|---|---|---|---|---|"]
    for c in res["configs"]:
        for name, d in c["variants"].items():
            prof = c["norm_profile"].get(name)
            share = "" if prof is None else f"{prof['norm_share_of_kernels']:.1%}"
            g = c["graphs"].get(name)
            nodes = "" if g is None else str(g["nodes"])
            agree = f"{d['greedy_agreement_with_folded']:.2f}" if "rmsnorm" not in name else "n/a (other model)"
            out.append(f"| {c['width']} | {c['batch']} | {name} | {d['tok_s']:.0f} | {d['ms_per_step']:.2f} | "
                       f"{d['gb_s']:.2f} | {share} | {nodes} | {agree} |")
    out += ["", "| width | B | comparison | speedup (median) | [p25, p75] | [min, max] | norm share of baseline step |",
            "|---|---|---|---|---|---|---|"]
    for c in res["configs"]:
        for name, r in c["ratios"].items():
            base = "onnx_rmsnorm_fused" if "rmsnorm_fused" in name else "onnx_rmsnorm" if "vs_rmsnorm" in name else (
                "onnx_unfused" if name == "folded_vs_unfused" else None)
            sh = c["norm_profile"].get(base, {}).get("norm_share_of_kernels") if base else None
            share = "" if sh is None else f"{sh:.1%}"
            out.append(f"| {c['width']} | {c['batch']} | {name} | x{r['median']:.3f} | [{r['p25']:.3f}, {r['p75']:.3f}] "
                       f"| [{r['min']:.3f}, {r['max']:.3f}] | {share} |")
    return "\n".join(out) + "\n"


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--widths", type=int, nargs="+", default=[128, 256])
    p.add_argument("--batches", type=int, nargs="+", default=[1, 4])
    p.add_argument("--depth", type=int, default=8)
    p.add_argument("--heads", type=int, default=16)
    p.add_argument("--vocab", type=int, default=4096)
    p.add_argument("--max-seq", type=int, default=512)
    p.add_argument("--prompt-len", type=int, default=128)
    p.add_argument("--new-tokens", type=int, default=64)
    p.add_argument("--rounds", type=int, default=7)
    p.add_argument("--warmup", type=int, default=1)
    p.add_argument("--threads", type=int, default=1, help="ORT intra-op threads and torch threads")
    p.add_argument("--profile-steps", type=int, default=32)
    p.add_argument("--no-torch", action="store_true", help="skip the eager PyTorch variants")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--cache", default=os.path.join(tempfile.gettempdir(), "tapernorm-bench-decode-cache"),
                   help="where compiled ONNX variants are kept between runs")
    add_output_args(p)  # decode.{json,md}: scratch directory by default, benchmarks/results/ with --save
    args = p.parse_args(argv)
    out = output_dir(args)
    res = run(args)
    stamp = time.strftime("%Y%m%d-%H%M%S")
    write_results(out / "decode", res, markdown(res))
    print(markdown(res))
    print(f"[bench] wrote {out / 'decode.json'} and {out / 'decode.md'} ({stamp})", file=sys.stderr)
    return 0


if __name__ == "__main__":
    sys.exit(main())
