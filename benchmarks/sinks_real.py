"""Why tapering breaks on SmolLM2-135M-Instruct (docs/real_checkpoints.md, section 1): per-position norm input RMS,
c as calibrated with and without the sink tokens, and held-out CE / max |residual| over a gate sweep without
fine-tuning, for four calibrations. No training; ~5 min on 2 idle cores.

    nice -n 10 .venv/bin/python benchmarks/sinks_real.py --save
"""
from __future__ import annotations

import argparse
import copy
import sys
from pathlib import Path

import torch
import torch.nn.functional as F

sys.path.insert(0, str(Path(__file__).resolve().parent))
from bench_common import add_output_args, library_versions, machine_info, output_dir, write_results  # noqa: E402
from real_checkpoint import smollm2_dir  # noqa: E402

from tapernorm.data import load_corpus  # noqa: E402
from tapernorm.layers import set_gate, taper_layers, taperize  # noqa: E402

KINDS = ("ls", "ls_skip0", "inv_rms_skip0", "per_feature")
GATES = (1.0, 0.8, 0.5, 0.2, 0.0)


def _stats(model, batches) -> dict:
    """Per tapered norm: sums for each calibration and the per-position RMS, over `batches` at gate 1."""
    stats, hooks = {}, []
    for n, m in taper_layers(model):
        def hook(mod, inp, n=n):
            x = inp[0].detach().double()  # (B, T, d)
            r = x.pow(2).mean(-1).add(mod.eps).sqrt()  # (B, T)
            hg2 = (x * mod.weight.double()).pow(2).sum(-1)
            st = stats.setdefault(n, {"num": 0, "den": 0, "num1": 0, "den1": 0, "numf": 0, "denf": 0, "inv1": 0,
                                      "cnt1": 0, "r": []})
            st["num"] += (hg2 / r).sum(); st["den"] += hg2.sum()
            st["num1"] += (hg2 / r)[:, 1:].sum(); st["den1"] += hg2[:, 1:].sum()
            st["numf"] += (x.pow(2) / r[..., None]).sum((0, 1)); st["denf"] += x.pow(2).sum((0, 1))
            st["inv1"] += (1 / r[:, 1:]).sum(); st["cnt1"] += r[:, 1:].numel()
            st["r"].append(r)
        hooks.append(m.register_forward_pre_hook(hook))
    with torch.no_grad():
        for b in batches:
            model(b)
    for h in hooks:
        h.remove()
    return stats


def _calibrated(base, stats: dict, kind: str):
    """A copy of `base` (taperized) with c / gamma_t set from `stats` by calibration `kind`."""
    model = copy.deepcopy(base)
    for n, m in taper_layers(model):
        st = stats[n]
        with torch.no_grad():
            m.weight_t.copy_(m.weight)
            if kind == "ls":
                c = st["num"] / st["den"]
            elif kind == "ls_skip0":
                c = st["num1"] / st["den1"]
            elif kind == "inv_rms_skip0":
                c = st["inv1"] / st["cnt1"]
            else:
                cf = st["numf"] / st["denf"]
                c = cf.median()
                m.weight_t.copy_((m.weight.double() * cf / c).float())
            m.c.fill_(float(c))
        m.calibrated = True
        m.calibrated_flag.fill_(True)
    return model


@torch.no_grad()
def _sweep(model, batches, gate: float) -> dict:
    set_gate(model, gate)
    mx, tot, n = [], 0.0, 0
    hooks = [blk.register_forward_hook(lambda mod, i, o: mx.append(float((o[0] if isinstance(o, tuple) else o)
                                                                          .abs().max()))) for blk in model.model.layers]
    for b in batches:
        lg = model(b).logits
        tot += float(F.cross_entropy(lg[:, :-1].flatten(0, 1), b[:, 1:].flatten(), reduction="sum"))
        n += b[:, 1:].numel()
    for h in hooks:
        h.remove()
    mx = torch.tensor(mx).view(-1, len(model.model.layers)).max(0).values
    return {"ce": tot / n, "resid_max": [float(v) for v in mx]}


def main() -> int:
    """Per-position RMS table, c table, gate sweep; JSON + markdown."""
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--seq-len", type=int, default=64)
    add_output_args(ap)
    args = ap.parse_args()
    from transformers import AutoModelForCausalLM, AutoTokenizer
    d = smollm2_dir()
    tok = AutoTokenizer.from_pretrained(d)
    base = AutoModelForCausalLM.from_pretrained(d, dtype=torch.float32).eval()
    ids = tok(load_corpus("builtin")[:300], add_special_tokens=False)["input_ids"]
    stream = torch.tensor([t for x in ids for t in x + [tok.eos_token_id]])
    B, T = 4, args.seq_len
    cal = [stream[i * B * T:(i + 1) * B * T].view(B, T) for i in range(4)]
    ev = [stream[(10 + i) * B * T:(11 + i) * B * T].view(B, T) for i in range(3)]
    taperize(base, "internal")
    stats = _stats(base, cal)
    rows = {}
    for n, st in stats.items():
        r = torch.cat(st["r"])  # (N, T)
        rows[n] = {"pos0": float(r[:, 0].mean()), "pos1": float(r[:, 1].mean()), "median_rest": float(r[:, 1:].median()),
                   "max_rest": float(r[:, 1:].max()), "c_ls": float(st["num"] / st["den"]),
                   "c_ls_skip0": float(st["num1"] / st["den1"]), "c_inv_rms_skip0": float(st["inv1"] / st["cnt1"])}
    sweep = {k: {str(g): _sweep(_calibrated(base, stats, k), ev, g) for g in GATES} for k in KINDS}
    result = {"rms": rows, "sweep": sweep, "seq_len": T, "machine": machine_info(),
              "versions": library_versions(("torch", "transformers"))}
    md = ["# Attention sinks in SmolLM2-135M-Instruct: norm input RMS, c, gate sweep", "",
          "| norm | pos 0 | pos 1 | median pos>=1 | max pos>=1 | c ls | c ls skip0 | c inv_rms skip0 |", "|---|" * 1 + "---|" * 7]
    md += [f"| {n} | " + " | ".join(f"{v:.4g}" for v in row.values()) + " |" for n, row in rows.items()]
    md += ["", "| calibration | " + " | ".join(f"gate {g}" for g in GATES) + " |", "|---|" + "---|" * len(GATES)]
    for k, by_g in sweep.items():
        md.append(f"| {k} | " + " | ".join(f"CE {v['ce']:.3f}, max L12 {v['resid_max'][12]:.3g}" for v in by_g.values()) + " |")
    write_results(output_dir(args) / "sinks_real", result, "\n".join(md) + "\n")
    print("\n".join(md))
    return 0


if __name__ == "__main__":
    sys.exit(main())
