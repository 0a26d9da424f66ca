"""Compile time and peak memory at scale: `tapernorm compile` next to onnxruntime-genai's model builder (issue 17).

Random-init Hugging Face Llamas built from configs and saved as bf16 safetensors, three sizes:
    135m   SmolLM2-135M's shape (30 layers, width 576, 9 / 3 heads, MLP 1536, vocab 49152, tied)
    0.5b   24 layers, width 1024, 16 / 4 heads, MLP 5632, vocab 32000, tied (~0.52B parameters)
    1.1b   TinyLlama's shape (22 layers, width 2048, 32 / 4 heads, MLP 5632, vocab 32000, untied)
each saved twice: `plain` (the HF directory as built) and `taper` (tapernorm.taperize, Internal-Taper,
calibrated on random tokens, gate 0, each map's c rescaled to unit output RMS on a batch of random tokens; the attention / MLP output projections
are scaled by 0.1 in both, and by 0.1 again in the tapered one, so the norm-free random stack stays finite on any
tokens (checked on a probe batch); written with tapernorm.save_pretrained).

Every compile runs as a child process; its wall time and peak RSS come from os.wait4 (the child's own rusage,
its waited-for children included). genai's builder (`builder.py -i DIR -o OUT -p fp32 -e cpu`, run with the main
venv's Python because it imports torch) reads only plain HF directories, so both rows of a size are set against
the builder on that size's plain directory (same weights and shapes; the tapered one adds only norm vectors).
One run per cell (the ratios are the point; the machine is shared). Memory goal: peak RSS <= 2.5x the fp32 weight
bytes; time goal: <= 2x the builder.

    nice -n 10 .venv/bin/python benchmarks/compile_scale.py --sizes 135m 0.5b 1.1b --save
"""
from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from bench_common import add_output_args, library_versions, machine_info, output_dir, write_results  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]
PY = sys.executable
BUILDER = ROOT / ".venv-genai/lib/python3.11/site-packages/onnxruntime_genai/models/builder.py"
BRANCH_SCALE = 0.1
SIZES = {  # name: (layers, width, heads, kv heads, mlp, vocab, tied)
    "135m": (30, 576, 9, 3, 1536, 49152, True),
    "0.5b": (24, 1024, 16, 4, 5632, 32000, True),
    "1.1b": (22, 2048, 32, 4, 5632, 32000, False),
}


def make_dirs(size: str, cache: Path) -> dict[str, Path]:
    """Build (cached) the plain and tapered bf16 directories of `size` in a child process; returns their paths."""
    d = cache / size
    paths = {"plain": d / "plain", "taper": d / "taper"}
    if not all((p / "config.json").is_file() for p in paths.values()):
        subprocess.run([PY, __file__, "--make", size, "--cache", str(cache)], check=True)
    return paths


def _make(size: str, cache: Path) -> None:
    """The child's work: random Llama in bf16 -> plain dir; taperize + calibrate + gate 0 -> tapered dir."""
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM

    import tapernorm

    layers, width, heads, kv, mlp, vocab, tied = SIZES[size]
    cfg = LlamaConfig(vocab_size=vocab, hidden_size=width, intermediate_size=mlp, num_hidden_layers=layers,
                      num_attention_heads=heads, num_key_value_heads=kv, max_position_embeddings=2048,
                      tie_word_embeddings=tied, bos_token_id=1, eos_token_id=2, pad_token_id=2)
    torch.manual_seed(0)
    torch.set_default_dtype(torch.bfloat16)  # never holds an fp32 copy of the 1.1B model
    model = LlamaForCausalLM(cfg).eval()
    torch.set_default_dtype(torch.float32)
    with torch.no_grad():
        for n, p in model.named_parameters():
            if n.endswith("norm.weight"):
                p.uniform_(0.5, 1.5)
            elif n.endswith(("o_proj.weight", "down_proj.weight")):
                p.mul_(BRANCH_SCALE)  # small residual branches: the norm-free tapered stack stays finite
    plain, taper = cache / size / "plain", cache / size / "taper"
    if not (plain / "tokenizer.json").is_file():
        model.save_pretrained(plain)
        _tokenizer(vocab, plain)
    g = torch.Generator().manual_seed(0)
    with torch.no_grad():  # without norms the MLP's product grows the stream quadratically: smaller branches again
        for n, p in model.named_parameters():
            if n.endswith(("o_proj.weight", "down_proj.weight")):
                p.mul_(BRANCH_SCALE)
    tapernorm.taperize(model, "internal")
    tapernorm.calibrate(model, [torch.randint(0, vocab, (1, 32), generator=g) for _ in range(2)],
                        forward=lambda m, b: m(input_ids=b, use_cache=False))
    tapernorm.set_gate(model, 0.0)
    _unit_rms_maps(model, torch.randint(0, vocab, (4, 32), generator=g))
    with torch.no_grad():
        probe = model(input_ids=torch.randint(0, vocab, (4, 16), generator=g), use_cache=False).logits
    if not torch.isfinite(probe).all():
        raise RuntimeError(f"{size}: the tapered random model's logits are not finite on a probe batch")
    tapernorm.save_pretrained(model, taper, tokenizer_from=plain)


def _unit_rms_maps(model, ids) -> None:
    """One forward pass: each gate-0 map, in forward order, divides its c by its output RMS on `ids` and its output
    likewise (a forward hook), so every map has unit output RMS and the layers after it see the rescaled stream."""
    import torch
    from tapernorm.layers import taper_layers

    def rescale(layer, inputs, out):
        rms = out.float().pow(2).mean().sqrt().clamp_min(1e-6)
        layer.c.div_(rms.to(layer.c.dtype))
        return out / rms.to(out.dtype)

    hooks = [layer.register_forward_hook(rescale) for _, layer in taper_layers(model)]
    with torch.no_grad():
        model(input_ids=ids, use_cache=False)
    for h in hooks:
        h.remove()


def _tokenizer(vocab: int, out: Path) -> None:
    """A word-level tokenizer (t0..t{V-1}) so genai's builder, which copies a tokenizer, accepts the directory."""
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    tk = Tokenizer(models.WordLevel({f"t{i}": i for i in range(vocab)}, unk_token="t0"))
    tk.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    PreTrainedTokenizerFast(tokenizer_object=tk, bos_token="t1", eos_token="t2", unk_token="t0",
                            pad_token="t2").save_pretrained(out)


def timed_child(cmd: list[str], log: Path, cwd: Path | None = None) -> dict:
    """Run `cmd` (niced) as a child; {seconds (wall), cpu_seconds (user + sys), peak_rss_bytes, rc} from os.wait4;
    stdout+stderr go to `log`."""
    t0 = time.perf_counter()
    with open(log, "w") as fh:
        proc = subprocess.Popen(["nice", "-n", "10", *cmd], stdout=fh, stderr=subprocess.STDOUT, cwd=cwd)
        _, status, ru = os.wait4(proc.pid, 0)
    proc.returncode = os.waitstatus_to_exitcode(status)
    return {"seconds": round(time.perf_counter() - t0, 2), "cpu_seconds": round(ru.ru_utime + ru.ru_stime, 2),
            "peak_rss_bytes": ru.ru_maxrss * 1024, "rc": proc.returncode, "log": str(log)}


def fp32_weight_bytes(d: Path) -> int:
    """fp32 bytes of every tensor in the directory's safetensors files (headers only)."""
    from tapernorm.compiler.load import checkpoint_tensors
    return sum(t.numel for t in checkpoint_tensors(d)) * 4


def run_size(size: str, cache: Path, work: Path, skip_genai: bool) -> list[dict]:
    """Ours on plain and taper, genai on plain; one row per (size, variant)."""
    paths = make_dirs(size, cache)
    wbytes = fp32_weight_bytes(paths["plain"])
    genai = None
    if not skip_genai:
        out = work / f"{size}-genai"
        shutil.rmtree(out, ignore_errors=True)
        genai = timed_child([PY, str(BUILDER), "-i", str(paths["plain"]), "-o", str(out), "-p", "fp32", "-e", "cpu"],
                            work / f"{size}-genai.log", cwd=BUILDER.parent)
        print(f"[scale] {size} genai builder: {genai['seconds']} s, {genai['peak_rss_bytes'] / 2**30:.2f} GiB",
              flush=True)
        shutil.rmtree(out, ignore_errors=True)
    rows = []
    for variant, d in paths.items():
        out = work / f"{size}-{variant}"
        shutil.rmtree(out, ignore_errors=True)
        ours = timed_child([PY, "-m", "tapernorm.compiler.cli", "compile", str(d), "--out", str(out),
                            "--parity-tokens", "4"], work / f"{size}-{variant}.log")
        rep = json.loads((out / "compile_report.json").read_text()) if ours["rc"] == 0 else {}
        row = {"size": size, "variant": variant, "fp32_weight_bytes": wbytes, "ours": ours,
               "graph": rep.get("graph"), "stages": rep.get("stages"), "dtype": rep.get("dtype"), "genai": genai,
               "rss_over_fp32_weights": round(ours["peak_rss_bytes"] / wbytes, 2)}
        if genai and ours["rc"] == 0:
            row["time_ratio_vs_genai"] = round(ours["seconds"] / genai["seconds"], 2)
            row["cpu_ratio_vs_genai"] = round(ours["cpu_seconds"] / genai["cpu_seconds"], 2)
            row["rss_ratio_vs_genai"] = round(ours["peak_rss_bytes"] / genai["peak_rss_bytes"], 2)
        print(f"[scale] {size} {variant}: rc {ours['rc']}, {ours['seconds']} s, "
              f"{ours['peak_rss_bytes'] / 2**30:.2f} GiB ({row['rss_over_fp32_weights']}x fp32 weights)", flush=True)
        rows.append(row)
        shutil.rmtree(out, ignore_errors=True)
    return rows


def _gib(b) -> str:
    return f"{b / 2**30:.2f}" if b else "-"


def markdown(res: dict) -> str:
    """The results table and each compile's stages."""
    lines = ["# Compile time and peak RSS at scale (issue 17)", "",
             f"Machine: {res['machine']['cpu']}, {res['machine']['cores']} cores, load average at start "
             f"{res['machine']['loadavg_start']}; {res['note']}.", "",
             "| size | variant | graph | ours wall s (CPU s) | ours peak GiB | peak / fp32 weights | genai wall s (CPU s) "
             "| genai peak GiB | wall / genai | CPU / genai | RSS / genai |", "|---|---|---|---|---|---|---|---|---|---|---|"]
    for r in res["rows"]:
        g, o = r["genai"] or {}, r["ours"]
        graph = r["graph"] if o["rc"] == 0 else f"failed (rc {o['rc']})"
        lines.append(f"| {r['size']} | {r['variant']} | {graph} | {o['seconds']} ({o['cpu_seconds']}) | "
                     f"{_gib(o['peak_rss_bytes'])} | {r['rss_over_fp32_weights']} | {g.get('seconds', '-')} "
                     f"({g.get('cpu_seconds', '-')}) | {_gib(g.get('peak_rss_bytes'))} | "
                     f"{r.get('time_ratio_vs_genai', '-')} | {r.get('cpu_ratio_vs_genai', '-')} | "
                     f"{r.get('rss_ratio_vs_genai', '-')} |")
    lines += ["", "fp32 weight bytes: " + ", ".join(sorted({f"{r['size']} {_gib(r['fp32_weight_bytes'])} GiB"
                                                           for r in res["rows"]})), "",
              "Stages of ours (seconds, peak RSS GiB at the stage's end; compile_report.json):", ""]
    for r in res["rows"]:
        if r["stages"]:
            lines.append(f"- {r['size']} {r['variant']}: " + ", ".join(
                f"{s['name']} {s['seconds']} s / {_gib(s['peak_rss_bytes'])}" for s in r["stages"]))
    return "\n".join(lines) + "\n"


def main(argv=None) -> int:
    """Parse, build the directories, time every compile, write results."""
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--sizes", nargs="+", default=["135m", "0.5b"], choices=list(SIZES))
    ap.add_argument("--cache", type=Path, default=ROOT / "runs" / "compile_scale")
    ap.add_argument("--skip-genai", action="store_true", help="time only ours")
    ap.add_argument("--merge", action="store_true",
                    help="keep the rows of other sizes already in the output directory's compile_scale.json")
    ap.add_argument("--make", choices=list(SIZES), help=argparse.SUPPRESS)
    add_output_args(ap)
    args = ap.parse_args(argv)
    args.cache = args.cache.resolve()  # genai's builder runs in its own cwd: a relative -i would read as a hub id
    if args.make:
        _make(args.make, args.cache)
        return 0
    work = args.cache / "work"
    work.mkdir(parents=True, exist_ok=True)
    res = {"machine": machine_info(), "versions": library_versions(("torch", "onnxruntime", "onnx", "transformers")),
           "settings": {"sizes": args.sizes, "parity_tokens": 4, "checkpoint_dtype": "bfloat16", "output": "float32",
                        "command": "tapernorm compile DIR --out OUT --parity-tokens 4 (child process, nice 10)"},
           "note": "one run per cell on a shared 2-core machine (other jobs running); genai's builder runs on each "
                   "size's plain directory", "rows": []}
    old = output_dir(args) / "compile_scale.json"
    if args.merge and old.is_file():
        res["rows"] = [r for r in json.loads(old.read_text())["rows"] if r["size"] not in args.sizes]
    for size in args.sizes:  # results written after each size: a long run keeps what it measured
        res["rows"] += run_size(size, args.cache, work, args.skip_genai)
        res["rows"].sort(key=lambda r: (list(SIZES).index(r["size"]), r["variant"]))
        write_results(output_dir(args) / "compile_scale", res, markdown(res))
    return 0


if __name__ == "__main__":
    sys.exit(main())
