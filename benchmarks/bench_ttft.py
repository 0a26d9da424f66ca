"""Time to first token, text in: tapernorm's decode loop (--engine ort) against onnxruntime-genai's (--engine genai)
on the same compiled directory, through the same text path (tokenizer, chat template, stop tokens).

Each engine runs in a warm worker process (genai in its own venv: it clashes with onnxruntime-gpu), loaded once;
a request is the chat prompt rendered and encoded, prefilled, and decoded until the first non-empty text piece
(TTFT), then on to --new-tokens (the reply's total time). Lockstep: every round sends the same request to every
worker in an order reshuffled each round; a second ort worker gives the A/A pair (the noise floor). Reported:
medians with spread of the per-round paired ratios genai / ort and ort-b / ort. ORT threads are explicit
(--threads for both engines, inter-op 1). The genai venv has its own onnxruntime build (plain onnxruntime, another
version than this venv's onnxruntime-gpu), so our loop also runs there ("ort@genai-venv"): loop against loop on
one onnxruntime.

    .venv/bin/python benchmarks/bench_ttft.py --model-dir OUT [--rounds 20] [--threads 2] [--save]
    (OUT: a lean `tapernorm compile` output with a chat template; default: SmolLM2-135M-Instruct compiled into
    runs/bench/smollm2-lean if it is not there yet)
"""
from __future__ import annotations

import argparse
import json
import os
import random
import subprocess
import sys
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
ROOT = HERE.parent


def worker(engine: str, model_dir: str, threads: int) -> int:
    """Serve requests on stdin (one JSON a line) with one engine; answer one JSON a line."""
    t0 = time.perf_counter()
    if engine == "genai":
        from tapernorm.runtime.genai_engine import GenaiText
        gen = GenaiText(model_dir, threads=threads)
    else:
        from tapernorm.runtime.generate import Generator
        gen = Generator(model_dir, provider="cpu", threads=threads)
    from importlib.metadata import PackageNotFoundError, version
    vers = {}
    for pkg in ("onnxruntime", "onnxruntime-gpu", "onnxruntime-genai", "tokenizers"):
        try:
            vers[pkg] = version(pkg)
        except PackageNotFoundError:
            pass
    print(json.dumps({"ready": True, "load_s": time.perf_counter() - t0, "label": gen.label(), "versions": vers}),
          flush=True)
    for line in sys.stdin:
        req = json.loads(line)
        h: dict = {}
        t0 = time.perf_counter()
        ids = gen.chat_ids([{"role": "user", "content": req["prompt"]}]) if req["chat"] else gen.prompt_ids(req["prompt"])
        first, pieces = None, []
        for piece in gen.stream_ids(ids, max_new_tokens=req["new_tokens"], result=h):
            if first is None:
                first = time.perf_counter() - t0
            pieces.append(piece)
        total = time.perf_counter() - t0
        r = h["result"]
        print(json.dumps({"ttft_s": first if first is not None else total, "total_s": total, "text": "".join(pieces),
                          "prompt_tokens": len(ids), "new_tokens": len(r.tokens[0]), "stop": r.stop_reasons[0]}),
              flush=True)
    return 0


class Worker:
    """A worker process and its request / answer pipe."""

    def __init__(self, python: str, engine: str, model_dir: Path, threads: int):
        env = {**os.environ, "OMP_NUM_THREADS": str(threads)}
        self.p = subprocess.Popen([python, str(Path(__file__).resolve()), "--worker", engine, "--model-dir",
                                   str(model_dir), "--threads", str(threads)], stdin=subprocess.PIPE,
                                  stdout=subprocess.PIPE, text=True, env=env, cwd=str(ROOT))
        self.ready = self._read()

    def _read(self) -> dict:
        line = self.p.stdout.readline()
        if not line:
            raise RuntimeError(f"worker {self.p.args[3]} died (exit {self.p.wait()}); run it alone to see why")
        return json.loads(line)

    def ask(self, req: dict) -> dict:
        self.p.stdin.write(json.dumps(req) + "\n")
        self.p.stdin.flush()
        return self._read()

    def close(self) -> None:
        self.p.stdin.close()
        self.p.wait(timeout=60)


def _default_model_dir() -> Path:
    """SmolLM2-135M-Instruct compiled (lean) into runs/bench/smollm2-lean, once."""
    sys.path.insert(0, str(HERE))
    from real_checkpoint import smollm2_dir
    out = ROOT / "runs" / "bench" / "smollm2-lean"
    if not (out / "genai_config.json").is_file():
        subprocess.run([sys.executable, "-m", "tapernorm.compiler.cli", "compile", str(smollm2_dir()), "--out",
                        str(out)], check=True)
    return out


def main(argv=None) -> int:
    """Run the lockstep rounds; write ttft.{json,md} (scratch directory, benchmarks/results/ with --save)."""
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    ap.add_argument("--model-dir", type=Path, default=None, help="lean compile output (default: SmolLM2, compiled)")
    ap.add_argument("--prompt", default="What is the capital of France?", help="user message")
    ap.add_argument("--no-chat", action="store_true", help="send the prompt as plain text, without the chat template")
    ap.add_argument("--new-tokens", type=int, default=16, help="tokens per request (TTFT is the first)")
    ap.add_argument("--rounds", type=int, default=20, help="lockstep rounds")
    ap.add_argument("--warmup", type=int, default=2, help="untimed rounds first")
    ap.add_argument("--threads", type=int, default=1, help="ORT intra-op threads of both engines")
    ap.add_argument("--genai-python", default=str(ROOT / ".venv-genai" / "bin" / "python"),
                    help="python of the onnxruntime-genai venv")
    ap.add_argument("--label", default="", help="what the model directory is (stored with the results)")
    ap.add_argument("--worker", choices=("ort", "genai"), help=argparse.SUPPRESS)
    sys.path.insert(0, str(HERE))
    from bench_common import add_output_args, library_versions, loadavg, machine_info, output_dir, spread, write_results
    add_output_args(ap)
    a = ap.parse_args(argv)
    if a.worker:
        return worker(a.worker, str(a.model_dir), a.threads)
    model_dir = (a.model_dir or _default_model_dir()).resolve()
    machine = machine_info()  # load average at the start
    workers = {"ort": Worker(sys.executable, "ort", model_dir, a.threads),
               "genai": Worker(a.genai_python, "genai", model_dir, a.threads),
               "ort-b": Worker(sys.executable, "ort", model_dir, a.threads),
               # our loop on the genai venv's plain onnxruntime: the same ORT build as genai, loop against loop
               "ort@genai-venv": Worker(a.genai_python, "ort", model_dir, a.threads)}
    req = {"prompt": a.prompt, "chat": not a.no_chat, "new_tokens": a.new_tokens}
    rng = random.Random(0)
    rows: dict[str, list[dict]] = {k: [] for k in workers}
    for r in range(a.warmup + a.rounds):
        order = list(workers)
        rng.shuffle(order)
        for name in order:
            ans = workers[name].ask(req)
            if r >= a.warmup:
                rows[name].append(ans)
    for w in workers.values():
        w.close()
    ttft = {k: [x["ttft_s"] for x in v] for k, v in rows.items()}
    ratios = {"genai_over_ort": spread([g / o for g, o in zip(ttft["genai"], ttft["ort"])]),
              "ort_b_over_ort (A/A)": spread([b / o for b, o in zip(ttft["ort-b"], ttft["ort"])]),
              "genai_over_ort@genai-venv (same onnxruntime)": spread([g / o for g, o in zip(ttft["genai"],
                                                                                          ttft["ort@genai-venv"])]),
              "genai_total_over_ort_total": spread([g["total_s"] / o["total_s"]
                                                    for g, o in zip(rows["genai"], rows["ort"])])}
    res = {"machine": machine, "loadavg_end": loadavg(), "label": a.label, "versions": library_versions(),
           "settings": {**{k: str(v) for k, v in vars(a).items() if k != "worker"}, "model_dir": str(model_dir)},
           "load_s": {k: w.ready["load_s"] for k, w in workers.items()},
           "labels": {k: w.ready["label"] for k, w in workers.items()},
           "worker_versions": {k: w.ready["versions"] for k, w in workers.items()},
           "ttft_s": {k: spread(v) for k, v in ttft.items()}, "ratios": ratios,
           "replies": {k: v[0]["text"] for k, v in rows.items()}, "rows": rows}
    md = markdown(res, a)
    js, mdp = write_results(output_dir(a) / "ttft", res, md)
    print(md)
    print(f"wrote {js} and {mdp}", file=sys.stderr)
    return 0


def markdown(res: dict, a) -> str:
    """The results table."""
    m = res["machine"]
    lines = [f"# Time to first token: `--engine ort` vs `--engine genai` (same directory, same text path)", "",
             f"Model `{res['settings']['model_dir']}`{' (' + res['label'] + ')' if res['label'] else ''}; prompt {a.prompt!r} ({'chat template' if not a.no_chat else 'plain'}),"
             f" {a.new_tokens} new tokens; {a.threads} ORT intra-op thread(s); {a.rounds} lockstep rounds "
             f"(+{a.warmup} warm-up), order reshuffled each round; machine {m['cpu']} ({m['cores']} cores, load "
             f"{m['loadavg_start']} -> {res['loadavg_end']}); versions: ort worker {res['worker_versions']['ort']}, genai worker "
             f"{res['worker_versions']['genai']}.", "",
             "| engine | TTFT median ms | p25-p75 ms | load s | reply |", "|---|---|---|---|---|"]
    for k, s in res["ttft_s"].items():
        lines.append(f"| {k} | {s['median'] * 1e3:.1f} | {s['p25'] * 1e3:.1f}-{s['p75'] * 1e3:.1f} | "
                     f"{res['load_s'][k]:.2f} | {res['replies'][k]!r} |")
    lines += ["", "| paired ratio (per round) | median | p25 | p75 | n |", "|---|---|---|---|---|"]
    for k, s in res["ratios"].items():
        lines.append(f"| {k} | {s['median']:.3f} | {s['p25']:.3f} | {s['p75']:.3f} | {s['n']} |")
    g = res["ratios"]["genai_over_ort"]["median"]
    lines += ["", f"genai / ort TTFT: x{g:.3f} (> 1: ours is faster; the A/A pair shows the noise)."]
    return "\n".join(lines) + "\n"


if __name__ == "__main__":
    sys.exit(main())
