"""Running the quality benchmark's training runs: one TrainConfig per (arm, width, seed), cached by the
hash of its settings under WORK/<hash>/, a process pool (one torch thread each), and the compact record
(final full-split validation loss, end-of-training scale statistics, binned curves) kept per run."""
from __future__ import annotations

import hashlib
import json
import math
import multiprocessing as mp
import time
from dataclasses import dataclass
from pathlib import Path

from tapernorm.fileio import atomic_write_text

__all__ = ["Arm", "run_key", "run_all", "extract_record", "CURVE_KEYS"]

CURVE_KEYS = ("ce", "logit_norm", "prelogit_rms", "gate", "grad_norm")  # plus every grad_norm_<group>
_RECORD_VERSION = 2  # bump when extract_record changes: cached runs are re-extracted, not retrained


@dataclass(frozen=True)
class Arm:
    """One training variant: taper mode, scale loss on/off, its lambda and form."""
    name: str
    mode: str                 # baseline | internal | all
    aux: bool
    lam: float | None = None  # None: the TrainConfig default
    form: str | None = None   # None: the TrainConfig default

    def overrides(self) -> dict:
        """TrainConfig fields this arm sets."""
        o = {"mode": self.mode, "scale_loss": self.aux}
        if self.lam is not None:
            o["scale_lambda"] = self.lam
        if self.form is not None:
            o["scale_form"] = self.form
        return o


def run_key(cfg: dict) -> str:
    """Short hash of the trajectory-relevant settings (out_dir and logging knobs excluded)."""
    skip = {"out_dir", "overwrite", "progress", "resume", "ckpt_every", "stop_after", "device"}
    blob = json.dumps({k: v for k, v in sorted(cfg.items()) if k not in skip}, sort_keys=True, default=str)
    return hashlib.sha1(blob.encode()).hexdigest()[:12]


def _bins(xs: list[float], n_bins: int) -> list[float]:
    """Mean of xs over n_bins consecutive equal chunks (fewer if xs is short)."""
    n = len(xs)
    k = max(1, math.ceil(n / n_bins))
    return [sum(xs[i:i + k]) / len(xs[i:i + k]) for i in range(0, n, k)]


def extract_record(run_dir: Path, n_bins: int = 100, tail_frac: float = 0.02) -> dict:
    """Compact record of a finished run: full-split val loss, end statistics, binned curves, periodic evals.

    End statistics average the last `tail_frac` of the training steps (at least 5): logit norm, pre-logit
    RMS s and s / s_tgt (s_tgt is frozen at the taper start in every arm, the baseline included)."""
    from tapernorm.train.state import read_log
    summary = json.loads((run_dir / "summary.json").read_text())
    recs = read_log(run_dir / "log.jsonl")
    tr = [r for r in recs if r.get("kind", "train") == "train"]
    ev = [r for r in recs if r.get("kind") == "eval"]
    tail = tr[-max(5, int(len(tr) * tail_frac)):]
    s_tgt = next((r["s_tgt"] for r in reversed(tr) if r.get("s_tgt") is not None), None)
    end_rms = sum(r["prelogit_rms"] for r in tail) / len(tail)
    keys = list(CURVE_KEYS) + sorted(k for k in tr[0] if k.startswith("grad_norm_"))
    curves = {k: _bins([float(r[k]) if r.get(k) is not None else 1.0 for r in tr], n_bins) for k in keys}
    curves["step"] = _bins([float(r["step"]) for r in tr], n_bins)
    return {
        "record_version": _RECORD_VERSION,
        "val_loss": summary["val_loss"], "val_tokens": summary.get("val_tokens"), "seconds": summary["seconds"],
        "final_gate": summary.get("final_gate"), "s_tgt": s_tgt, "end_rms": end_rms,
        "end_rms_ratio": end_rms / s_tgt if s_tgt else None,
        "end_logit_norm": sum(r["logit_norm"] for r in tail) / len(tail),
        "max_logit_norm": max(r["logit_norm"] for r in tr),
        "end_train_ce": sum(r["ce"] for r in tail) / len(tail),
        "evals": [{"step": r["step"], "val_loss": r["val_loss"], "full_split": r.get("full_split", False)}
                  for r in ev],
        "curves": curves,
    }


def _worker_init(threads: int) -> None:
    import torch
    torch.set_num_threads(threads)


def _run_one(job: dict) -> dict:
    """Train one config (unless WORK/<key>/record.json already has it) and return its record."""
    from tapernorm.train.config import TrainConfig
    from tapernorm.train.trainer import train
    run = Path(job["cfg"]["out_dir"])
    rec_path = run / "record.json"
    if rec_path.is_file():
        rec = json.loads(rec_path.read_text())
        if rec.get("record_version") == _RECORD_VERSION and rec.get("key") == job["key"]:
            return {**rec, "cached": True}
    if not (run / "summary.json").is_file() or json.loads((run / "bench.json").read_text() if
                                                          (run / "bench.json").is_file() else "{}") != job["cfg"]:
        t = time.time()
        train(TrainConfig(**{**job["cfg"], "betas": tuple(job["cfg"]["betas"])}))
        atomic_write_text(run / "bench.json", json.dumps(job["cfg"], sort_keys=True))
        print(f"  trained {job['label']} in {time.time() - t:.0f}s", flush=True)
    rec = {**extract_record(run), "key": job["key"], "label": job["label"], **job["meta"]}
    atomic_write_text(rec_path, json.dumps(rec))
    return {**rec, "cached": False}


def run_all(jobs: list[dict], workers: int = 2, threads: int = 1) -> list[dict]:
    """Run every job (dicts with cfg, key, label, meta) on `workers` processes, started in the given order
    (each finished run is cached, so an interrupted benchmark keeps them); records in job order."""
    if workers <= 1:
        _worker_init(threads)
        return [_run_one(j) for j in jobs]
    with mp.get_context("spawn").Pool(workers, initializer=_worker_init, initargs=(threads,)) as pool:
        return pool.map(_run_one, jobs, chunksize=1)
