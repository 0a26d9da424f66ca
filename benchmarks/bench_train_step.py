"""Training-step time of TaperNorm vs RMSNorm: during the taper (0 < g < 1) and at gate 0.

One full step = zero_grad + forward + cross-entropy + backward + AdamW step, on a fixed batch. The variants
(RMSNorm baseline, TaperNorm at --gate-mid, TaperNorm at gate 0) each own a model and optimizer built from
the same seed; every round times each variant once (--inner steps) in a freshly shuffled order, and the
figure reported is the median over rounds of the paired ratio t_variant / t_rmsnorm, with its spread.

    .venv/bin/python benchmarks/bench_train_step.py --rounds 20
Writes train_step_<device>.json and .md into a scratch directory (benchmarks/results/ with --save).
"""
from __future__ import annotations

import argparse
import random
import sys
import time
from datetime import datetime, timezone

import torch
import torch.nn.functional as F

from bench_common import add_output_args, loadavg, machine_info, output_dir, spread, write_results
from tapernorm import build_model, calibrate, set_gate


def _machine(device: torch.device) -> dict:
    out = {**machine_info(), "torch": torch.__version__, "device": str(device), "torch_threads": torch.get_num_threads()}
    if device.type == "cuda":
        out["gpu"] = torch.cuda.get_device_name(device)
    return out


def _variant(name: str, args, device) -> dict:
    mode = "baseline" if name == "rmsnorm" else args.mode
    torch.manual_seed(0)
    model = build_model("tiny", arch=args.arch, vocab_size=args.vocab, dim=args.dim, n_layers=args.layers,
                        n_heads=args.heads, max_seq_len=args.seq, taper_mode=mode).to(device)
    if mode != "baseline":
        g = torch.Generator().manual_seed(1)
        calibrate(model, [torch.randint(0, args.vocab, (2, 16), generator=g).to(device)])
        set_gate(model, {"taper": args.gate_mid, "gate0": 0.0}[name.split("_")[1]])
    model.train()
    opt = torch.optim.AdamW(model.parameters(), lr=1e-5, weight_decay=0.0)
    return {"model": model, "opt": opt}


def _step(v, x, y, bf16: bool) -> None:
    v["opt"].zero_grad(set_to_none=True)
    with torch.autocast(x.device.type, dtype=torch.bfloat16, enabled=bf16):
        logits = v["model"](x)
    F.cross_entropy(logits.float().flatten(0, 1), y.flatten()).backward()
    v["opt"].step()


def _time(v, x, y, args, device) -> float:
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    t = time.perf_counter()
    for _ in range(args.inner):
        _step(v, x, y, args.bf16)
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    return (time.perf_counter() - t) / args.inner


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--arch", default="llama", choices=["llama", "gpt2"])
    p.add_argument("--mode", default="internal", choices=["internal", "all"])
    p.add_argument("--dim", type=int, default=128)
    p.add_argument("--layers", type=int, default=8)
    p.add_argument("--heads", type=int, default=16)
    p.add_argument("--vocab", type=int, default=4096)
    p.add_argument("--batch", type=int, default=8)
    p.add_argument("--seq", type=int, default=128)
    p.add_argument("--gate-mid", type=float, default=0.5, help="gate of the 'during the taper' variant")
    p.add_argument("--rounds", type=int, default=20)
    p.add_argument("--inner", type=int, default=3, help="steps per timing")
    p.add_argument("--warmup", type=int, default=3, help="untimed steps per variant")
    p.add_argument("--threads", type=int, default=2, help="torch intra-op threads (set explicitly)")
    p.add_argument("--device", default="auto")
    p.add_argument("--bf16", action="store_true")
    p.add_argument("--seed", type=int, default=0)
    add_output_args(p)  # writes train_step_<device>.{json,md} there
    args = p.parse_args(argv)

    torch.set_num_threads(args.threads)
    device = torch.device("cuda" if args.device == "auto" and torch.cuda.is_available() else
                          ("cpu" if args.device == "auto" else args.device))
    names = ["rmsnorm", "taper_taper", "taper_gate0"]
    labels = {"rmsnorm": "RMSNorm", "taper_taper": f"TaperNorm g={args.gate_mid}", "taper_gate0": "TaperNorm g=0"}
    variants = {n: _variant(n, args, device) for n in names}
    g = torch.Generator().manual_seed(args.seed)
    x = torch.randint(0, args.vocab, (args.batch, args.seq + 1), generator=g).to(device)
    x, y = x[:, :-1], x[:, 1:]
    for v in variants.values():
        for _ in range(args.warmup):
            _step(v, x, y, args.bf16)
    rng = random.Random(args.seed)
    times = {n: [] for n in names}
    for _ in range(args.rounds):
        order = names[:]
        rng.shuffle(order)
        for n in order:
            times[n].append(_time(variants[n], x, y, args, device))
    ratios = {n: [a / b for a, b in zip(times[n], times["rmsnorm"])] for n in names if n != "rmsnorm"}
    result = {
        "benchmark": "train_step", "date": datetime.now(timezone.utc).isoformat(timespec="seconds"),
        "machine": _machine(device), "settings": vars(args),
        "step_seconds": {labels[n]: spread(times[n]) for n in names},
        "ratio_vs_rmsnorm": {labels[n]: spread(r) for n, r in ratios.items()},
        "goals": {"taper_overhead_max": 1.05, "gate0_faster": True},
    }
    r_mid = result["ratio_vs_rmsnorm"][labels["taper_taper"]]["median"]
    r_0 = result["ratio_vs_rmsnorm"][labels["taper_gate0"]]["median"]
    result["verdict"] = {"taper_overhead_ok": r_mid <= 1.05, "gate0_faster": r_0 < 1.0}
    result["machine"]["loadavg_end"] = loadavg()
    stem = output_dir(args) / f"train_step_{device.type}"
    md = [f"# Training step: TaperNorm vs RMSNorm ({device.type})", "",
          f"{result['date']}; {result['machine']['cpu']} ({result['machine']['cores']} cores)"
          f"{'; ' + result['machine']['gpu'] if 'gpu' in result['machine'] else ''}; torch {torch.__version__}; "
          f"{args.threads} threads; load avg at start {result['machine'].get('loadavg_start')}", "",
          f"Model: {args.arch}, dim {args.dim}, {args.layers} layers, {args.heads} heads, vocab {args.vocab}, "
          f"mode {args.mode}; batch {args.batch} x {args.seq}; AdamW; {'bf16 autocast' if args.bf16 else 'fp32'}; "
          f"{args.rounds} rounds x {args.inner} steps, order shuffled each round.", "",
          "| variant | median step (ms) | ratio vs RMSNorm (median) | ratio p25-p75 | ratio min-max |",
          "| --- | --- | --- | --- | --- |"]
    for n in names:
        st = result["step_seconds"][labels[n]]
        if n == "rmsnorm":
            md.append(f"| {labels[n]} | {st['median'] * 1e3:.2f} | 1 | | |")
        else:
            r = result["ratio_vs_rmsnorm"][labels[n]]
            md.append(f"| {labels[n]} | {st['median'] * 1e3:.2f} | {r['median']:.3f} | {r['p25']:.3f}-{r['p75']:.3f} "
                      f"| {r['min']:.3f}-{r['max']:.3f} |")
    md += ["", f"Goals: <= 1.05 while tapering -> {'met' if r_mid <= 1.05 else 'NOT met'} ({r_mid:.3f}); "
               f"faster at gate 0 -> {'met' if r_0 < 1 else 'NOT met'} ({r_0:.3f}).", ""]
    write_results(stem, result, "\n".join(md))
    print("\n".join(md))
    print(f"wrote {stem.with_suffix('.json')} and {stem.with_suffix('.md')}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
