"""Decode speed on a real pretrained checkpoint (SmolLM2-135M-Instruct, fp32): our compiled directories against
onnxruntime-genai's model builder graph + genai's loop, on the same Hugging Face directory.

Variants, all in ONE process (the genai venv's worker: onnxruntime-genai 0.18 and its onnxruntime), so every
variant runs on the same onnxruntime build:
    ours_lean        `tapernorm compile` of the plain checkpoint (lean graph), our runtime's loop (SharedKVDecoder)
    ours_lean_aa     the same directory in a second session: the A/A noise floor
    genai_lean       the same directory under genai's loop (`tapernorm generate --engine genai`)
    ours_generic     the same checkpoint compiled with --graph generic, our loop
    ours_tapered     the checkpoint taperized (all), calibrated, gate 0, compiled lean (every norm folded)
    ours_finetuned   with --finetuned DIR: a compiled directory of a tapered fine-tune of the same checkpoint (for
                     example the attention-side taper, whose MLP norms stay), our loop
    genai_tapered    that directory under genai's loop
    genai_builder    `python -m onnxruntime_genai.models.builder -i HF_DIR -o OUT -p fp32 -e cpu`, genai's loop
Lockstep: each round draws one random prompt (B, P); every variant decodes it as one block (prefill + N - 1
timed steps) in an order reshuffled each round. tok/s = B (N - 1) / decode seconds; ratios are medians over
rounds of same-round pairs, with min-max spread. ORT: intra-op --threads, inter-op 1; our sessions do not spin unless --spinning default (genai keeps ORT's default).
The GGUF -> HF conversion is benchmarks/real_checkpoint.py's (the package never does it).

    nice -n 10 .venv/bin/python benchmarks/peers_real.py [--batches 1,4 --rounds 7 --save]
"""
from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent))
from bench_common import add_output_args, library_versions, loadavg, machine_info, output_dir, spread, write_results  # noqa: E402
from peers_common import GenaiWorker, find_genai_python  # noqa: E402
from peers_models import genai_builder_graph  # noqa: E402
from real_checkpoint import smollm2_dir  # noqa: E402

PAIRS = [("ours_lean / genai_builder", "ours_lean", "genai_builder"),
         ("genai_lean / genai_builder", "genai_lean", "genai_builder"),
         ("ours_tapered / genai_builder", "ours_tapered", "genai_builder"),
         ("genai_tapered / genai_builder", "genai_tapered", "genai_builder"),
         ("ours_lean / ours_generic", "ours_lean", "ours_generic"),
         ("ours_tapered / ours_lean", "ours_tapered", "ours_lean"),
         ("ours_finetuned / ours_lean", "ours_finetuned", "ours_lean"),
         ("ours_finetuned / ours_tapered", "ours_finetuned", "ours_tapered"),
         ("A/A: ours_lean_aa / ours_lean", "ours_lean_aa", "ours_lean")]


def tapered_dir(hf_dir: Path, out: Path, mode: str, log=print) -> Path:
    """The checkpoint taperized (`mode`), calibrated on a few chat-text batches, gate 0, saved (cached)."""
    if (out / "config.json").is_file():
        return out
    import torch
    from transformers import AutoTokenizer

    import tapernorm
    from tapernorm.layers import calibrate, set_gate, taperize
    model = tapernorm.from_pretrained(hf_dir).eval()
    tok = AutoTokenizer.from_pretrained(hf_dir)
    text = ("The quick brown fox jumps over the lazy dog. Paris is the capital of France. "
            "Water boils at one hundred degrees Celsius at sea level. ") * 16
    ids = torch.tensor(tok(text)["input_ids"][:256]).reshape(4, 64)  # (4, 64) calibration tokens
    taperize(model, mode=mode)
    calibrate(model, [ids[:2], ids[2:]])
    set_gate(model, 0.0)
    with torch.no_grad():
        finite = bool(torch.isfinite(model(input_ids=ids).logits).all())
    if not finite:
        return speed_only_lean(model, hf_dir, out, mode, log)
    tapernorm.save_pretrained(model, out, tokenizer_from=hf_dir)
    log(f"[bench] tapered ({mode}) checkpoint -> {out}")
    return out


def speed_only_lean(model, hf_dir: Path, out: Path, mode: str, log=print) -> Path:
    """The folded lean graph of a tapered model whose logits overflow at gate 0 (issue 19: a real checkpoint
    tapered without fine-tuning), built with the compile's own passes and builder but without compile's
    finiteness and parity checks: its shape and weights' sizes are a fine-tuned one's, so its decode speed is;
    its tokens mean nothing. compile_report.json says so."""
    import shutil

    import torch

    from tapernorm.compiler.export_onnx import KVCacheLM, dynamic_shapes, example_inputs, write_runtime_json
    from tapernorm.compiler.hf_compile import HFDecoder
    from tapernorm.compiler.lean import build_lean, ort_optimized_nodes, write_genai_config
    from tapernorm.fileio import atomic_write_text
    from tapernorm.passes import fold
    from tapernorm.passes.capture import capture
    dec = HFDecoder(model, mode).eval()
    wrapper = KVCacheLM(dec)
    args, ds = example_inputs(dec.config), dynamic_shapes(dec.config.n_layers)
    gm, rep = fold(capture(wrapper, args, dynamic_shapes=ds), args, dynamic_shapes=ds, original=wrapper, verify=False)
    out.mkdir(parents=True, exist_ok=True)
    facts = build_lean(dec, gm, None, out / "model.onnx", torch.float32)
    write_runtime_json(out, dec.config, "float32", eos_id=2, bos_id=1)
    write_genai_config(out, dec.config, eos_id=2, bos_id=1)
    for f in ("config.json", "tokenizer.json", "tokenizer_config.json"):
        shutil.copyfile(hf_dir / f, out / f)
    note = (f"speed only: taperize {mode} + calibrate + gate 0 overflows without fine-tuning (issue 19); built "
            "without compile's finiteness / parity checks")
    atomic_write_text(out / "compile_report.json", json.dumps({
        "graph": "lean", "note": note, "folded_layers": sorted(n for n, r in rep["layers"].items()
                                                                if r["status"] == "folded"),
        "norms": facts["norms"], "ort_optimized": {"model.onnx": ort_optimized_nodes(out / "model.onnx")}}))
    log(f"[bench] {note} -> {out}")
    return out


def compiled(src: Path, out: Path, graph: str, log=print) -> Path:
    """`tapernorm compile` of `src` into `out` (cached by its compile_report.json)."""
    if not (out / "compile_report.json").is_file():
        from tapernorm.compiler.pipeline import compile_checkpoint
        t0 = time.perf_counter()
        compile_checkpoint(src, out, graph=graph, log=lambda m: None)
        log(f"[bench] compiled {src.name} ({graph}) in {time.perf_counter() - t0:.0f} s -> {out}")
    rep = json.loads((out / "compile_report.json").read_text())
    if rep["graph"] != graph:
        raise RuntimeError(f"{out}: compiled as {rep['graph']}, not {graph}")
    return out


def ort_nodes(d: Path) -> int:
    """Node count of d/model.onnx after onnxruntime's optimization (from the compile report when it has it)."""
    rep = json.loads((d / "compile_report.json").read_text()) if (d / "compile_report.json").is_file() else {}
    n = (rep.get("ort_optimized") or {}).get("model.onnx", {}).get("nodes")
    if n is None:
        from tapernorm.compiler.lean import ort_optimized_nodes
        n = ort_optimized_nodes(d / "model.onnx")["nodes"]
    return n


def run_batch(worker: GenaiWorker, names: list[str], batch: int, args, vocab: int) -> dict:
    """All rounds at one batch size; {variant: [tok/s per round]} and the token agreement."""
    rng = np.random.default_rng(args.seed + batch)
    toks: dict[str, list[float]] = {n: [] for n in names}
    plain = [n for n in names if "tapered" not in n and n != "ours_finetuned"]  # the plain checkpoint's graphs
    agree = {n: True for n in plain}  # a speed-only tapered graph's tokens mean nothing; a fine-tune's differ
    for r in range(args.rounds + 1):  # round 0 warms up every variant and is not recorded
        prompt = rng.integers(3, vocab, (batch, args.prompt_len)).tolist()
        seqs = {}
        for n in rng.permutation(names):
            out = worker.call({"cmd": "run", "name": str(n), "prompt": prompt, "new": args.new_tokens})
            seqs[str(n)] = np.asarray(out["tokens"])  # (N, B)
            if r > 0:
                toks[str(n)].append(batch * (args.new_tokens - 1) / out["decode_s"])
        for n in plain:  # greedy tokens against the builder graph's, first 8 steps
            agree[n] &= bool(np.array_equal(seqs[n][:8], seqs["genai_builder"][:8]))
    return {"tok_s": toks, "tokens_match_builder_first8": agree}


def ratios(tok_s: dict) -> dict:
    out = {}
    for label, a, b in PAIRS:
        if a in tok_s and b in tok_s:
            rs = [x / y for x, y in zip(tok_s[a], tok_s[b])]
            out[label] = {"median": statistics.median(rs), **spread(rs)}
    return out


def markdown(res: dict) -> str:
    lines = [f"# Real checkpoint decode: {res['checkpoint']}", "",
             f"fp32, prompt {res['settings']['prompt_len']}, {res['settings']['new_tokens'] - 1} timed steps, "
             f"{res['settings']['rounds']} rounds, {res['settings']['threads']} threads (our sessions' spinning: "
             f"{res['settings']['spinning']}; genai's: onnxruntime's default), one process "
             f"(onnxruntime-genai {res['genai_version']}). Compiled node counts after ORT optimization: "
             + ", ".join(f"{k} {v}" for k, v in res["ort_nodes"].items())
             + f". Tapered variant: taperize {res['taper_mode_used']}, calibrate, gate 0, no fine-tuning. "
             + " ".join(res["notes"]), ""]
    for b, r in res["batches"].items():
        lines += [f"## batch {b}", "", "| variant | median tok/s |", "|---|---|"]
        lines += [f"| {n} | {statistics.median(v):.1f} |" for n, v in r["tok_s"].items()]
        lines += ["", "| ratio | median | min | max |", "|---|---|---|---|"]
        lines += [f"| {k} | {v['median']:.3f} | {v['min']:.3f} | {v['max']:.3f} |" for k, v in r["ratios"].items()]
        lines += ["", f"greedy tokens equal to the builder graph's (first 8 steps): {r['tokens_match_builder_first8']}", ""]
    return "\n".join(lines)


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--batches", default="1,4")
    ap.add_argument("--rounds", type=int, default=7)
    ap.add_argument("--prompt-len", type=int, default=128)
    ap.add_argument("--new-tokens", type=int, default=32)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--taper-mode", default="all", choices=["all", "internal"])
    ap.add_argument("--work", default=str(Path.home() / ".cache" / "tapernorm" / "peers_real"))
    ap.add_argument("--no-generic", action="store_true", help="skip the generic export (slow to compile)")
    ap.add_argument("--genai-python", default=None)
    ap.add_argument("--finetuned", default="", help="a `tapernorm compile` directory of a tapered fine-tune of the "
                    "checkpoint, timed as ours_finetuned")
    ap.add_argument("--spinning", default="off", choices=["off", "default"],
                    help="our sessions' intra-op spinning: off, or onnxruntime's default (genai's sessions keep theirs)")
    add_output_args(ap)
    args = ap.parse_args()
    gpy = find_genai_python(args.genai_python)
    if gpy is None:
        raise SystemExit("no onnxruntime-genai venv: pass --genai-python (see README, `make genai-venv`)")
    work, hf = Path(args.work), smollm2_dir()
    worker = GenaiWorker(gpy, Path(__file__).resolve().parent / "genai_worker.py")
    mode = args.taper_mode
    tap = tapered_dir(hf, work / f"hf_tapered_{mode}", mode)
    notes = [json.loads((tap / "compile_report.json").read_text())["note"]] if (tap / "model.onnx").is_file() else []
    dirs = {"lean": compiled(hf, work / "lean", "lean"),
            "tapered": tap if notes else compiled(tap, work / f"lean_tapered_{mode}", "lean"),
            "builder": genai_builder_graph(hf, work / "genai_builder", worker.builder_py)}
    if not args.no_generic:
        dirs["generic"] = compiled(hf, work / "generic", "generic")
    if args.finetuned:
        dirs["finetuned"] = Path(args.finetuned)
        rep = json.loads((dirs["finetuned"] / "compile_report.json").read_text())
        notes.append(f"ours_finetuned: {args.finetuned} ({rep['graph']} graph, {len(rep['folded_layers'])} norms "
                     "folded).")
    ctx = args.prompt_len + args.new_tokens
    loads = {"ours_lean": ("load_ours", "lean"), "ours_lean_aa": ("load_ours", "lean"),
             "genai_lean": ("load", "lean"), "ours_tapered": ("load_ours", "tapered"),
             "genai_tapered": ("load", "tapered"), "genai_builder": ("load", "builder"),
             **({"ours_generic": ("load_ours", "generic")} if "generic" in dirs else {}),
             **({"ours_finetuned": ("load_ours", "finetuned")} if "finetuned" in dirs else {})}
    for name, (cmd, d) in loads.items():
        worker.call({"cmd": cmd, "name": name, "dir": str(dirs[d]), "threads": args.threads, "max_len": ctx,
                     "spinning": None if args.spinning == "default" else False})
    vocab = json.loads((hf / "config.json").read_text())["vocab_size"]
    res = {"checkpoint": str(hf), "machine": machine_info(), "versions": library_versions(),
           "genai_version": worker.version, "loadavg_before": loadavg(), "settings": vars(args),
           "taper_mode_used": mode, "notes": notes,
           "ort_nodes": {k: ort_nodes(v) for k, v in dirs.items()},
           "batches": {}}
    for b in (int(x) for x in args.batches.split(",")):
        r = run_batch(worker, list(loads), b, args, vocab)
        r["ratios"] = ratios(r["tok_s"])
        res["batches"][str(b)] = r
        print(f"[bench] batch {b}: " + ", ".join(f"{k} x{v['median']:.3f}" for k, v in r["ratios"].items()), flush=True)
    worker.close()
    res["loadavg_after"] = loadavg()
    stem = "peers_real" + ("" if args.spinning == "off" else "_spin-default") + ("_finetuned" if args.finetuned else "")
    paths = write_results(output_dir(args) / stem, res, markdown(res))
    print(f"[bench] wrote {paths[0]} and {paths[1]}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
