"""Decode peers side by side on the same weights: lean folded / unfused / baseline, generic folded, our lean
graph under onnxruntime-genai's loop, genai's own builder graph under its loop, eager and torch.compile.

One run, lockstep by rounds: every round draws one random prompt (B, P) and every variant decodes it as one
uninterrupted block (prefill + N - 1 timed steps), in an order reshuffled each round; the genai variants run
in a worker process in the genai venv (same prompt, same block shape). Blocks, not step-interleaving, so no
variant pays for another's cache traffic between its steps (genai's loop cannot be interleaved from here). Speedups are medians over rounds of paired ratios
(same round), with spread; an A/A pair (two sessions on the lean folded graph) is the noise floor. ORT threads
are explicit (intra-op --threads, inter-op 1, no spinning), torch threads too. Beside the timings: a
memory-bandwidth probe and the GB/s each variant reaches, our loop's per-step Python overhead (step time minus
run_with_iobinding time), the baseline's norm share from ORT's profiler next to the measured fold gain, node
counts after ORT optimization and a launch-count estimate of the fold gain on CUDA. Writes
peers.{json,md,png} into a scratch directory (benchmarks/results/ with --save).

    .venv/bin/python benchmarks/bench_peers.py --genai-python /work/genai-venv/bin/python
    .venv/bin/python benchmarks/bench_peers.py --widths 128 --batches 1 --rounds 3 --no-compile   # quick look
"""
from __future__ import annotations

import json
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from bench_common import library_versions, loadavg, machine_info, output_dir, write_results  # noqa: E402
from bench_peers_args import build_parser  # noqa: E402
from peers_common import (GenaiWorker, bandwidth_probe, find_genai_python, norm_share, ort_nodes,  # noqa: E402
                          summarize_config)
from peers_models import compile_all, genai_builder_graph, hf_llama, weight_bytes_per_step  # noqa: E402
from peers_report import chart, markdown  # noqa: E402
from tapernorm.runtime import DecoderSession, OrtDecoder, greedy_block  # noqa: E402
from tapernorm.runtime.torch_ref import TorchRefDecoder  # noqa: E402


def session(path: Path, threads: int, **kw) -> DecoderSession:
    return DecoderSession(path, provider="cpu", intra_op_threads=threads, inter_op_threads=1, spinning=False, **kw)


def run_block(dec, prompt: np.ndarray, new: int) -> dict:
    """One whole greedy generation (prefill + new - 1 timed decode steps), uninterrupted, like genai's block.

    For our lean loop it also reports the seconds spent inside run_with_iobinding (SharedKVDecoder.time_runs)."""
    if hasattr(dec, "time_runs"):
        dec.time_runs, dec.run_s = True, 0.0
    tokens, decode_s = greedy_block(dec, prompt, new)
    out = {"decode_s": decode_s, "tokens": tokens.tolist()}
    if hasattr(dec, "time_runs"):
        out["run_s"] = dec.run_s
    return out


def torch_compiled(model, batch: int, max_len: int) -> TorchRefDecoder:
    """A TorchRefDecoder whose static-cache forward is torch.compile'd (inductor, CPU)."""
    dec = TorchRefDecoder(model, batch=batch, max_len=max_len)
    fwd = torch.compile(dec.dec.forward, dynamic=False)
    # fresh slot / position tensors: a view of the cache's column index has a new storage offset every step,
    # which dynamo guards on (it recompiled each step until its limit of 8, then ran eager)
    dec.dec.forward = lambda ids, slots, pos: fwd(ids, slots.clone(), pos.clone())
    return dec


def bench_config(width: int, batch: int, paths: dict, taper, genai: GenaiWorker | None, args, tmp: Path) -> dict:
    """All rounds of one (width, batch); returns the config's result dict."""
    ctx = args.prompt_len + args.new_tokens
    order = np.random.default_rng(args.seed + width + batch).permutation(list(paths) + ["lean_folded_aa"])
    decs = {}  # sessions created in a shuffled order: creation order must not favour a variant's memory layout
    for v in order:
        decs[str(v)] = OrtDecoder(session(paths["lean_folded" if v == "lean_folded_aa" else v], args.threads),
                                  max_len=ctx)
    if not args.no_torch:
        decs["eager"] = TorchRefDecoder(taper, batch=batch, max_len=ctx)
    t_compile = None
    if not args.no_compile:
        t0 = time.perf_counter()
        decs["torch_compile"] = torch_compiled(taper, batch, ctx)
        warm = np.zeros((batch, args.prompt_len), dtype=np.int64)
        decs["torch_compile"].start(warm)
        decs["torch_compile"].step(np.zeros(batch, dtype=np.int64))
        t_compile = time.perf_counter() - t0
    blocks = list(decs) + ([f"genai:{n}" for n in ("genai_builder", "lean_folded_genai",
                                                   "lean_folded_ourloop_genai_ort")] if genai else [])
    rng = np.random.default_rng(args.seed + 1000 * width + batch)
    rounds, overhead = [], []  # overhead: (our lean folded step s, bare run_with_iobinding s) per round
    for r in range(args.warmup + args.rounds):
        prompt = rng.integers(0, args.vocab, (batch, args.prompt_len))
        res = {}
        for blk in rng.permutation(blocks):
            if not blk.startswith("genai:"):
                res[blk] = run_block(decs[blk], prompt, args.new_tokens)
            else:
                name = blk.split(":")[1]
                out = genai.call({"cmd": "run", "name": name, "prompt": prompt.tolist(), "new": args.new_tokens})
                res[name] = {"decode_s": out["decode_s"], "tokens": np.asarray(out["tokens"]).T.tolist()}
        if r >= args.warmup:
            rounds.append(res)
            lf = res["lean_folded"]
            overhead.append((lf["decode_s"] / (args.new_tokens - 1), lf["run_s"] / (args.new_tokens - 1)))
    prof = norm_share(session(paths["lean_baseline"], args.threads, profile=True,
                              profile_prefix=str(tmp / f"prof-w{width}-b{batch}")), batch, args, OrtDecoder)
    return {"width": width, "batch": batch, "rounds": rounds, "torch_compile_s": t_compile,
            "overhead": overhead, "norm_profile": prof}


def run(args) -> dict:
    torch.set_num_threads(args.threads)
    cache = Path(args.cache)
    cache.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix="bench-peers-"))
    genai_py = None if args.no_genai else find_genai_python(args.genai_python)
    res = {"machine": machine_info(), "versions": library_versions(), "settings": vars(args).copy(),
           "genai_python": genai_py, "bandwidth": bandwidth_probe(), "configs": []}
    genai = GenaiWorker(genai_py, Path(__file__).with_name("genai_worker.py")) if genai_py else None
    if genai:
        res["versions"]["onnxruntime_genai"] = genai.version
    res["errors"] = []
    try:
        for width in args.widths:
            try:
                run_width(width, res, genai, args, cache, tmp)
            except Exception as e:  # noqa: BLE001 - one width failing must not lose the others' results
                res["errors"].append({"width": width, "error": f"{type(e).__name__}: {' '.join(str(e).split())[:400]}"})
                print(f"[bench] w{width} failed: {res['errors'][-1]['error']}", file=sys.stderr)
    finally:
        if genai:
            genai.close()
    res["machine"]["loadavg_end"] = loadavg()
    res["bandwidth_end"] = bandwidth_probe()
    return res


def run_width(width: int, res: dict, genai, args, cache: Path, tmp: Path) -> None:
    """Compile (cached) and benchmark every batch of one width; appends configs and writes partial results."""
    paths, base, taper = compile_all(width, args, cache, log=lambda m: print(m, file=sys.stderr))
    facts = {"weight_bytes_per_step": weight_bytes_per_step(taper), "twin_max_abs_logit_diff": None,
             "ort_nodes": ort_nodes(paths)}
    if genai:
        d = paths["lean_folded"].parent.parent
        if not (d / "hf" / "tapernorm_twin.json").is_file():
            hf_llama(taper, d / "hf")
        facts["twin_max_abs_logit_diff"] = json.loads((d / "hf" / "tapernorm_twin.json").read_text())[
            "max_abs_logit_diff_vs_tapernorm"]
        g_dir = genai_builder_graph(d / "hf", d / "genai", genai.builder_py,
                                    log=lambda m: print(m, file=sys.stderr))
        facts["ort_nodes"]["genai_builder"] = ort_nodes({"g": g_dir / "model.onnx"})["g"]
        for name, path in (("genai_builder", g_dir), ("lean_folded_genai", paths["lean_folded"].parent)):
            genai.call({"cmd": "load", "name": name, "dir": str(path), "threads": args.threads})
        genai.call({"cmd": "load_ours", "name": "lean_folded_ourloop_genai_ort",
                    "dir": str(paths["lean_folded"].parent), "threads": args.threads,
                    "max_len": args.prompt_len + args.new_tokens})
    for batch in args.batches:
        cfg = bench_config(width, batch, paths, taper, genai, args, tmp)
        cfg.update(facts)
        summarize_config(cfg, args)
        res["configs"].append(cfg)
        print(f"[bench] w{width} B{batch}: " + ", ".join(f"{v} {d['tok_s']:.0f}" for v, d in
                                                         cfg["variants"].items()) + " tok/s", file=sys.stderr)
        out = output_dir(args)  # partial results after every config: a later failure loses nothing
        write_results(out / "peers", {**res, "partial": True}, markdown({**res, "bandwidth_end": res["bandwidth"],
                                                                         "partial": True}))


def main(argv=None) -> int:
    p = build_parser()  # bench_peers_args.py: the flags, importable without torch (fast `tapernorm bench --help`)
    args = p.parse_args(argv)
    res = run(args)
    out = output_dir(args)
    md = markdown(res)
    write_results(out / "peers", res, md)
    chart(res, out / "peers.png")
    print(md)
    print(f"[bench] wrote {out / 'peers.json'}, peers.md, peers.png", file=sys.stderr)
    return 0


if __name__ == "__main__":
    sys.exit(main())
