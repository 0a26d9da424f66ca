"""What position 0's own scale c0 costs in the compiled graph (issue 19): SmolLM2-135M tapered (Internal-Taper) to
gate 0, calibrated once with c0 (tapernorm.calibrate(..., pos0=True) on the builtin corpus); the variant without c0
is the same model with c0 set to 0, so both graphs have the same folded weights and differ only in the factor
(one Mul by where(position == 0, c0 / c, 1) per norm, one Equal per graph). The c0 graph in both forms the lean
builder has (compiler/lean/graph.py POS0_FORM: "where", one Where per norm; "split", one Where over a table of all
ratios + one Split). All compiled lean fp32; timed with
our runtime loop in lockstep: B1 prefill of a 64-token prompt, then 32 decode steps; variants interleaved in a
reshuffled order every round; per-round paired ratios c0 / plain (median, quartiles) and the A/A pair (a second
session of the plain graph). Nothing here needs the logits to be good, only finite (checked).

    nice -n 10 .venv/bin/python benchmarks/pos0_cost.py --threads 1 [--rounds 12] [--save]
"""
from __future__ import annotations

import argparse
import json
import random
import shutil
import sys
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent))
from bench_common import add_output_args, library_versions, machine_info, output_dir, spread, write_results  # noqa: E402
from real_checkpoint import smollm2_dir  # noqa: E402


SMALL = 0.01  # the random-weight fallback's scale of the block output projections (0.05: finite with c0 only)


def calibration_batches(hf: Path, n: int, seq: int):
    """`n` (1, seq) token batches of the builtin corpus (tapernorm.data), tokenized with the checkpoint's tokenizer."""
    import torch
    from tokenizers import Tokenizer

    from tapernorm.data import builtin_corpus
    ids = Tokenizer.from_file(str(hf / "tokenizer.json")).encode("\n\n".join(builtin_corpus()[:40])).ids
    return [torch.tensor([ids[i * seq:(i + 1) * seq]]) for i in range(n)]


def _taper(model, hf: Path, args):
    """Taperize, calibrate with c0, gate 0; returns the tapered norm names."""
    from tapernorm import calibrate, set_gate, taperize
    names = taperize(model, mode=args.mode)
    calibrate(model, calibration_batches(hf, args.calib_batches, 128), forward=lambda m, b: m(b), pos0=True)
    set_gate(model, 0.0)
    return names


def _finite(model, probe) -> bool:
    import torch
    with torch.no_grad():
        return bool(torch.isfinite(model(probe).logits).all())


def tapered_pair(hf: Path, work: Path, args, log) -> dict:
    """Save the c0 model and its c0 = 0 twin as tapered HF dirs under work/; returns facts (cached by tapered.json).
    The real weights when both give finite gate-0 logits, else the same config with random (init-scale) weights."""
    import torch

    import tapernorm
    from tapernorm import taper_layers
    note = work / "tapered.json"
    if note.is_file():
        return json.loads(note.read_text())
    probe = calibration_batches(hf, args.calib_batches + 1, 128)[-1]
    model = tapernorm.from_pretrained(hf, dtype=torch.float32).eval()
    names = _taper(model, hf, args)
    weights = "SmolLM2-135M-Instruct (real)"
    real = {"c0": _finite(model, probe)}
    saved = {l: (float(l.c0), l.has_pos0) for _, l in taper_layers(model)}
    for l in saved:
        l.c0.zero_()
        l.has_pos0 = False
    real["plain"] = _finite(model, probe)
    for l, (c0, has) in saved.items():
        l.c0.fill_(c0)
        l.has_pos0 = has
    if not all(real.values()):
        from transformers import AutoConfig, AutoModelForCausalLM
        log(f"[pos0] gate-0 logits of the real checkpoint finite: {real}; timing its config with random weights")
        torch.manual_seed(0)
        model = AutoModelForCausalLM.from_config(AutoConfig.from_pretrained(hf)).eval()
        with torch.no_grad():  # small block outputs: at gate 0 the random blocks' (quadratic) MLPs stay bounded
            for n, p in model.named_parameters():
                if n.endswith(("o_proj.weight", "down_proj.weight")):
                    p.mul_(SMALL)
        names = _taper(model, hf, args)
        weights = (f"random init of the SmolLM2-135M config (the real shapes; o_proj / down_proj x {SMALL}): "
                   f"gate-0 logits on the real weights finite with c0 {real['c0']}, without {real['plain']}")
    facts = {"mode": args.mode, "tapered_norms": len(names), "calib_batches": args.calib_batches, "weights": weights,
             "real_weights_gate0_finite": real,
             "c0_over_c": {n: float(l.c0 / l.c) for n, l in taper_layers(model)}}
    for tag in ("c0", "plain"):
        if tag == "plain":
            for _, l in taper_layers(model):
                l.c0.zero_()
                l.has_pos0 = False
        facts[f"{tag}_logits_finite"] = _finite(model, probe)
        tapernorm.save_pretrained(model, work / tag, tokenizer_from=hf)
    log(f"[pos0] tapered {len(names)} norms ({weights}); logits finite: c0 {facts['c0_logits_finite']}, "
        f"plain {facts['plain_logits_finite']}")
    note.write_text(json.dumps(facts))
    return facts


def compiled(src: Path, out: Path, log, form: str = "where") -> dict:
    """Lean fp32 `tapernorm compile` of src into out (cached) with the factors in `form` (compiler.lean.graph
    POS0_FORMS); the report's parity, position-0 counts and nodes."""
    from tapernorm.compiler.lean import graph as lean_graph
    from tapernorm.compiler.lean.builder import ort_optimized_nodes
    from tapernorm.compiler.pipeline import compile_checkpoint
    if not (out / "compile_report.json").is_file():
        log(f"[pos0] compile {src.name} ({form})")
        lean_graph.POS0_FORM, before = form, lean_graph.POS0_FORM
        try:
            compile_checkpoint(src, out, parity_tokens=4, log=lambda m: log(f"[compile] {m}"))
        finally:
            lean_graph.POS0_FORM = before
    rep = json.loads((out / "compile_report.json").read_text())
    g = rep["parity"]["graphs"]["model.onnx"]
    exp = rep["export"]["model.onnx"]
    return {"graph": rep["graph"], "pos0": rep["pos0"], "nodes": exp["nodes"], "ops": exp["ops"],
            "ort_optimized": ort_optimized_nodes(out / "model.onnx"),
            "parity": {k: g[k] for k in ("prompt_logits_max_abs_diff", "decode_logits_max_abs_diff", "tokens_identical")}}


def run_once(dec, prompt: np.ndarray, steps: int) -> tuple[float, float]:
    """(prefill seconds, seconds per decode step) of one greedy block."""
    t0 = time.perf_counter()
    tok = dec.start(prompt).argmax(-1)
    t1 = time.perf_counter()
    for _ in range(steps):
        tok = dec.step(tok).argmax(-1)
    return t1 - t0, (time.perf_counter() - t1) / steps


def lockstep(dirs: dict, args, log) -> dict:
    """Interleaved, reshuffled rounds over the variants; per-variant medians and paired ratios vs `plain`."""
    from tapernorm.runtime import DecoderSession, OrtDecoder
    decs = {}
    for name, d in dirs.items():
        sess = DecoderSession(d, provider="cpu", intra_op_threads=args.threads, inter_op_threads=1)
        decs[name] = OrtDecoder(sess, max_len=args.prompt_len + args.steps + 2)
    prompt = np.random.default_rng(0).integers(100, 40000, (1, args.prompt_len)).astype(np.int64)
    for dec in decs.values():  # warm-up
        run_once(dec, prompt, 4)
    pre, step = {n: [] for n in decs}, {n: [] for n in decs}
    for r in range(args.rounds):
        order = list(decs)
        random.Random(r).shuffle(order)
        for n in order:
            p, s = run_once(decs[n], prompt, args.steps)
            pre[n].append(p)
            step[n].append(s)
        log(f"[pos0] round {r + 1}/{args.rounds}: " + ", ".join(f"{n} {1 / step[n][-1]:.1f} tok/s" for n in decs))
    rows = {n: {"decode_tok_s": 1 / float(np.median(step[n])), "step_ms": 1e3 * float(np.median(step[n])),
                "prefill_ms": 1e3 * float(np.median(pre[n]))} for n in decs}

    def ratio(xs, a, b):  # time a / time b per round: > 1 means a is slower
        return spread([x / y for x, y in zip(xs[a], xs[b])])
    pairs = [("c0_where", "plain"), ("c0_split", "plain"), ("c0_split", "c0_where"), ("plain_aa", "plain")]
    ratios = {}
    for what, xs in (("decode step", step), ("prefill", pre)):
        for a, b in pairs:
            ratios[f"{'A/A ' if a == 'plain_aa' else ''}{what} {a} / {b}"] = ratio(xs, a, b)
    return {"variants": rows, "ratios": ratios}


def markdown(res: dict) -> str:
    """The results as a short markdown report."""
    s, c = res["settings"], res["compiled"]
    lines = ["# Cost of position 0's own scale c0 (issue 19)", "",
             f"Weights: {res['tapered']['weights']}. "
             f"SmolLM2-135M-Instruct, {res['tapered']['mode']}-Taper at gate 0 ({res['tapered']['tapered_norms']} norms), "
             f"calibrated with c0 on {s['calib_batches']} x 128 builtin-corpus tokens; `plain` is the same model with "
             "c0 = 0. Lean fp32 graphs, our runtime loop, CPU, "
             f"{s['threads']} intra-op thread(s), B1, prompt {s['prompt_len']}, {s['steps']} decode steps, "
             f"{s['rounds']} lockstep rounds (reshuffled order).", "",
             "| graph | nodes | ORT-optimized nodes | position-0 Mul / Where / Equal | prefill ms | decode tok/s |",
             "|---|---|---|---|---|---|"]
    for n, v in res["speed"]["variants"].items():
        cc = c["plain" if n == "plain_aa" else n]
        p = cc["pos0"]["model.onnx"]
        lines.append(f"| {n} | {cc['nodes']} | {cc['ort_optimized']['nodes']} | {p['muls']} / {p['wheres']} / "
                     f"{p['equal']} | {v['prefill_ms']:.1f} | {v['decode_tok_s']:.1f} |")
    lines += ["", "| paired ratio (time) | median | p25 | p75 | min | max |", "|---|---|---|---|---|---|"]
    for k, r in res["speed"]["ratios"].items():
        lines.append(f"| {k} | {r['median']:.3f} | {r['p25']:.3f} | {r['p75']:.3f} | {r['min']:.3f} | {r['max']:.3f} |")
    lines += ["", f"Parity (compile): " + "; ".join(
        f"{n}: prompt {v['parity']['prompt_logits_max_abs_diff']:.2e}, decode "
        f"{v['parity']['decode_logits_max_abs_diff']:.2e}, tokens identical {v['parity']['tokens_identical']}"
        for n, v in c.items()), "", f"Machine: {res['machine']['cpu']} ({res['machine']['cores']} cores), load "
        f"{res['machine']['loadavg_start']}; versions {res['versions']}.", ""]
    return "\n".join(lines)


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--work", type=Path, default=Path("runs/pos0_cost"), help="tapered / compiled dirs (cached)")
    ap.add_argument("--mode", default="internal")
    ap.add_argument("--calib-batches", type=int, default=4)
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--prompt-len", type=int, default=64)
    ap.add_argument("--steps", type=int, default=32)
    ap.add_argument("--rounds", type=int, default=12)
    ap.add_argument("--fresh", action="store_true", help="rebuild the tapered and compiled dirs")
    add_output_args(ap)
    args = ap.parse_args(argv)

    def log(m):
        print(m, file=sys.stderr, flush=True)
    if args.fresh:
        shutil.rmtree(args.work, ignore_errors=True)
    args.work.mkdir(parents=True, exist_ok=True)
    machine = machine_info()
    hf = smollm2_dir()
    tap = tapered_pair(hf, args.work, args, log)
    if not (tap["c0_logits_finite"] and tap["plain_logits_finite"]):
        raise SystemExit(f"gate-0 logits are not finite ({tap['weights']}); nothing to time")
    comp = {"c0_where": compiled(args.work / "c0", args.work / "c0_lean", log, "where"),
            "c0_split": compiled(args.work / "c0", args.work / "c0_split_lean", log, "split"),
            "plain": compiled(args.work / "plain", args.work / "plain_lean", log)}
    dirs = {"c0_where": args.work / "c0_lean", "c0_split": args.work / "c0_split_lean",
            "plain": args.work / "plain_lean", "plain_aa": args.work / "plain_lean"}
    speed = lockstep(dirs, args, log)
    res = {"benchmark": "pos0_cost", "machine": machine, "versions": library_versions(),
           "settings": {k: (str(v) if isinstance(v, Path) else v) for k, v in vars(args).items()},
           "checkpoint": str(hf), "tapered": {k: v for k, v in tap.items() if k != "c0_over_c"},
           "c0_over_c_range": [min(tap["c0_over_c"].values()), max(tap["c0_over_c"].values())],
           "compiled": comp, "speed": speed}
    js, md = write_results(output_dir(args) / "pos0_cost", res, markdown(res))
    log(f"[pos0] wrote {js} and {md}")
    print(markdown(res))
    return 0


if __name__ == "__main__":
    sys.exit(main())
