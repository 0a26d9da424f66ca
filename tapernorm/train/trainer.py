"""The trainer: tapering schedule, calibration at the taper start, fixed-target scale loss, AdamW,
JSONL logs, atomic checkpoints with exact resume, torchrun + DDP. CLI: `tapernorm train|eval|plot`.

Run layout (RUN = --out):
    RUN/tokenizer.model     SentencePiece model trained on the corpus (or copied from --tokenizer)
    RUN/log.jsonl           one record per step (kind "train") and per evaluation (kind "eval")
    RUN/checkpoint/         latest checkpoint + trainer state, written every --ckpt-every steps (resume)
    RUN/model/              the final model (HF layout: config.json, model.safetensors, tokenizer.model)
    RUN/summary.json        final validation loss, steps, time
"""
from __future__ import annotations

import json
import math
import os
import sys
import gc
import time
from dataclasses import dataclass, field
from pathlib import Path

import torch
import torch.distributed as dist
import torch.nn as nn
import torch.nn.functional as F

from ..checkpoint import CheckpointError, load_checkpoint, load_resume, save_checkpoint
from ..data import Tokenizer, batch_at, load_corpus, tokenize_corpus, train_tokenizer, val_batches
from ..layers import begin_calibration, finish_calibration, set_gate, taper_layers
from ..fileio import atomic_write_text, dir_lock
from ..model import DecoderLM, preset
from .progress import Progress
from .config import RESUME_FREE, TrainConfig
from .rundir import TrainingDiverged, clear_run_dir, divergence_message, prepare_run_dir, recover_run
from .scale_loss import ScaleTarget, scale_loss, scale_stat
from .schedule import resolve_schedule
from .state import (JsonlLog, grad_groups, grad_norms, pack_optimizer, pack_rng, unpack_optimizer,
                         unpack_rng)

__all__ = ["TrainConfig", "TrainResult", "TrainingDiverged", "train", "evaluate", "evaluate_checkpoint"]

@dataclass
class TrainResult:
    """What a run produced; unpacks as (model_dir, val_loss)."""
    run_dir: str
    model_dir: str
    val_loss: float
    initial_val_loss: float | None
    steps: int
    final_gate: float | None
    seconds: float
    log_path: str = field(default="")

    def __iter__(self):
        return iter((self.model_dir, self.val_loss))


class _WithHidden(nn.Module):
    """forward(ids) -> (logits, pre-logit h), so DDP wraps one call that yields both."""

    def __init__(self, model: DecoderLM):
        super().__init__()
        self.model = model

    def forward(self, input_ids):
        h, _ = self.model.hidden(input_ids)  # (B, T, d)
        return self.model.head(h), h


def _unused_params(tapering: bool, gate: float) -> bool:
    """Whether a forward at `gate` leaves parameters unused: gamma_t at gate 1, gamma at gate 0."""
    return tapering and not 0.0 < gate < 1.0


def _ddp(module: nn.Module, device: torch.device, find_unused: bool) -> nn.Module:
    """DistributedDataParallel around `module`; calibration EMAs are rank-local until _finish_calibration averages
    them, so buffers are never synced in forward."""
    import inspect
    DDP = nn.parallel.DistributedDataParallel
    nosync = ({"forward_sync_buffers": False} if "forward_sync_buffers" in inspect.signature(DDP).parameters
              else {"broadcast_buffers": False})
    return DDP(module, device_ids=[device.index] if device.type == "cuda" else None,
               find_unused_parameters=find_unused, **nosync)


def _dist_env() -> tuple[int, int, int]:
    """(rank, world_size, local_rank) from the torchrun environment."""
    return int(os.environ.get("RANK", 0)), int(os.environ.get("WORLD_SIZE", 1)), int(os.environ.get("LOCAL_RANK", 0))


def _device(cfg: TrainConfig, local_rank: int) -> torch.device:
    if cfg.device == "auto":
        return torch.device(f"cuda:{local_rank}") if torch.cuda.is_available() else torch.device("cpu")
    if cfg.device.startswith("cuda") and not torch.cuda.is_available():
        raise RuntimeError("--device cuda was asked for but torch sees no GPU; use --device cpu")
    return torch.device(cfg.device if cfg.device != "cuda" else f"cuda:{local_rank}")


def _allreduce_mean(t: torch.Tensor, world: int) -> torch.Tensor:
    if world > 1:
        dist.all_reduce(t, op=dist.ReduceOp.SUM)
        t /= world
    return t


@torch.no_grad()
def evaluate(model: DecoderLM, stream: torch.Tensor, batch_size: int, seq_len: int, max_batches: int | None = 8,
             bf16: bool = False) -> float:
    """Token-weighted mean cross-entropy over fixed validation windows, with the model's current gate."""
    was = model.training
    model.eval()
    dev = next(model.parameters()).device
    tot, n = 0.0, 0
    for x, y in val_batches(stream, batch_size, seq_len, max_batches):
        with torch.autocast(dev.type, dtype=torch.bfloat16, enabled=bf16):
            logits = model(x.to(dev))
        tot += float(F.cross_entropy(logits.float().flatten(0, 1), y.to(dev).flatten(), reduction="sum"))
        n += y.numel()
    model.train(was)
    return tot / max(n, 1)


def _check_resume(cfg: TrainConfig, saved: dict) -> None:
    now, before = cfg.to_dict(), {"scale_form": "paper", **saved}  # runs saved before scale_form used the paper's
    diff = [k for k in now if k not in RESUME_FREE and k in before and now[k] != before[k]]
    if diff:
        raise ValueError(f"--resume with settings that change the run: {', '.join(f'{k}={now[k]!r} (was {before[k]!r})' for k in diff)}; "
                         "use the original settings or start a new --out")


def train(cfg: TrainConfig) -> TrainResult:
    """Train one run (single process, or one rank under torchrun); returns paths and the final val loss.

    Rank 0 holds an exclusive lock on the run directory for the whole run (a second process fails at once,
    naming the holder's PID), and first repairs whatever a killed run left there."""
    cfg = cfg.normalized()
    if _dist_env()[0] != 0:
        return _train(cfg)
    run = Path(cfg.out_dir)
    with dir_lock(run, f"tapernorm train --out {run}"):
        recover_run(run)
        return _train(cfg)


def _train(cfg: TrainConfig) -> TrainResult:
    t_start = time.time()
    rank, world, local_rank = _dist_env()
    if cfg.batch_size % world:
        raise ValueError(f"batch_size {cfg.batch_size} does not split over {world} processes; use a multiple of {world}")
    run = Path(cfg.out_dir)
    sched = resolve_schedule(cfg.steps, cfg.warmup_frac, cfg.warmup_steps, cfg.taper_start, cfg.taper_end)
    if sched.taper_start >= cfg.steps and cfg.mode != "baseline":
        raise ValueError(f"taper start {sched.taper_start} must be before the last step {cfg.steps - 1}")
    # Every bad-input check happens before anything is written.
    docs = load_corpus(cfg.corpus, cfg.max_docs, cfg.max_chars)
    tok_src = Tokenizer.load(cfg.tokenizer) if cfg.tokenizer else None
    prepare_run_dir(run, cfg.resume, cfg.overwrite, cfg.ckpt_every)
    # weights and trainer state from one save (load_resume checks their shared checkpoint_id)
    resumed = load_resume(run / "checkpoint") if cfg.resume else None
    state = resumed[2] if resumed else None
    if state is not None:
        _check_resume(cfg, state["json"]["train_config"])
        if int(state["json"]["step"]) >= cfg.steps and (run / "summary.json").is_file() \
                and (run / "model" / "config.json").is_file():
            return _already_complete(run, cfg, rank)

    # The tokenizer and token streams are built before the run directory is created, so a corpus that
    # cannot be tokenized leaves no files behind. Under DDP rank 0 trains the tokenizer, the others load it.
    tok_path = run / "tokenizer.model"
    tok = data = None
    if cfg.resume:
        tok = Tokenizer.load(tok_path)
    elif rank == 0:
        tok = tok_src or train_tokenizer(docs, cfg.vocab_size)
    if tok is not None:
        data = tokenize_corpus(docs, tok, cfg.seq_len, cfg.val_frac)
    device = _device(cfg, local_rank)
    if world > 1 and not dist.is_initialized():
        dist.init_process_group("nccl" if device.type == "cuda" else "gloo")
    if device.type == "cuda":
        torch.cuda.set_device(device)
    if rank == 0 and not cfg.resume:
        clear_run_dir(run, cfg.overwrite)
        tok.save(tok_path)
    if world > 1:
        dist.barrier()
    if tok is None:
        tok = Tokenizer.load(tok_path)
        data = tokenize_corpus(docs, tok, cfg.seq_len, cfg.val_frac)

    if state is not None:
        model = resumed[0]
        model.train()
    else:
        over = {k: getattr(cfg, k) for k in ("dim", "n_layers", "n_heads") if getattr(cfg, k) is not None}
        mcfg = preset(cfg.preset, vocab_size=tok.vocab_size, taper_mode=cfg.mode, **over)
        mcfg.max_seq_len = max(mcfg.max_seq_len, cfg.seq_len)
        torch.manual_seed(cfg.seed)
        model = DecoderLM(mcfg)
    model.to(device).train()
    tapering = bool(taper_layers(model))
    for _, m in taper_layers(model):
        m.beta_ema = cfg.beta_ema
    decay = [p for p in model.parameters() if p.dim() >= 2]
    no_decay = [p for p in model.parameters() if p.dim() < 2]
    opt = torch.optim.AdamW([{"params": decay, "weight_decay": cfg.weight_decay},
                             {"params": no_decay, "weight_decay": 0.0}], lr=cfg.lr, betas=cfg.betas, foreach=False)
    target = ScaleTarget(cfg.beta_ema)
    start, prior_s = 0, 0.0
    if state is not None:
        js = state["json"]
        prior_s = float(js.get("seconds", 0.0))  # training time before the resume
        unpack_optimizer(opt, js["optimizer"], state["tensors"])
        unpack_rng(state["tensors"])
        target.load_state_dict(js["scale_target"])
        start = int(js["step"])
    wrapped = unwrapped = _WithHidden(model)
    # DDP must look for unused parameters at gate 1 (gamma_t unused) and gate 0 (gamma unused), but while the gate
    # tapers every parameter is used and find_unused_parameters=True makes torch print a warning on every rank:
    # the wrapper is rebuilt when that changes (twice per run)
    find_unused = _unused_params(tapering, sched.gate(start))
    if world > 1:
        wrapped = _ddp(unwrapped, device, find_unused)
    if tapering and start <= sched.taper_start:
        begin_calibration(model)
    groups = grad_groups(model)
    centered = model.config.arch == "gpt2"
    log = JsonlLog(run / "log.jsonl", truncate_after_step=start) if rank == 0 else None
    extra = {"training": {k: getattr(cfg, k) for k in ("corpus", "max_docs", "max_chars", "val_frac", "seq_len",
                                                       "steps", "mode", "scale_loss", "scale_lambda", "scale_form", "seed")}}

    def save(step_done: int, out: Path, with_state: bool) -> None:
        if rank != 0:
            return
        ts = None
        if with_state:
            ojs, otens = pack_optimizer(opt)
            ts = {"json": {"step": step_done, "train_config": cfg.to_dict(), "optimizer": ojs,
                           "scale_target": target.state_dict(), "world_size": world,
                           "initial_val_loss": initial_val, "seconds": prior_s + time.time() - t_start},
                  "tensors": {**otens, **pack_rng()}}
        save_checkpoint(model, out, tokenizer_path=tok_path, extra=extra, trainer_state=ts)

    def run_eval(step_done: int, full: bool = False) -> float:
        # periodic evals are cheap (eval_batches); the first and the final cover the whole validation split
        v = evaluate(model, data.val, cfg.batch_size, cfg.seq_len, None if full else cfg.eval_batches, cfg.bf16)
        if log:
            log.write({"kind": "eval", "step": step_done, "val_loss": v, "gate": _gate(model), "full_split": full})
        return v

    initial_val = run_eval(0, full=True) if (rank == 0 and start == 0 and cfg.eval_every > 0) else None
    if state is not None:
        initial_val = state["json"].get("initial_val_loss")  # measured before the run was interrupted
    end = cfg.stop_after or cfg.steps
    # a bar on a terminal; periodic flushed lines when stderr is a log file or a pipe (no carriage-return spam)
    bar = Progress(cfg.steps, start, cfg.progress and rank == 0)
    for step in range(start, end):
        if tapering and step == sched.taper_start:
            _finish_calibration(model, world)
        if step == sched.taper_start and target.frozen is None:
            target.freeze()
        if tapering:
            set_gate(model, sched.gate(step))
            if world > 1 and find_unused != _unused_params(tapering, sched.gate(step)):
                del wrapped
                gc.collect()  # the old reducer's autograd hooks go with it
                find_unused = not find_unused
                wrapped = _ddp(unwrapped, device, find_unused)
        lr = sched.lr(step, cfg.lr)
        for g in opt.param_groups:
            g["lr"] = lr
        x, y = batch_at(data.train, step, cfg.batch_size, cfg.seq_len, cfg.seed, rank, world)
        x, y = x.to(device), y.to(device)
        with torch.autocast(device.type, dtype=torch.bfloat16, enabled=cfg.bf16):
            logits, h = wrapped(x)  # (B, T, V), (B, T, d)
        ce = F.cross_entropy(logits.float().flatten(0, 1), y.flatten())
        s = scale_stat(h, centered)  # (B, T)
        aux = torch.zeros((), device=device)
        if cfg.scale_loss and target.frozen is not None:
            aux = scale_loss(h, target.frozen, cfg.scale_lambda, centered, form=cfg.scale_form)
        loss = ce + aux
        opt.zero_grad(set_to_none=True)
        loss.backward()
        gnorms = grad_norms(groups)
        total = float(torch.nn.utils.clip_grad_norm_(model.parameters(), cfg.grad_clip))
        _stop_if_diverged(step, loss, total, lr, model, sched if tapering else None, cfg, run, world, device)
        opt.step()
        stats = torch.stack([ce.detach(), aux.detach(), logits.detach().float().norm(dim=-1).mean(),
                             s.detach().mean()]).double()
        stats = _allreduce_mean(stats, world).tolist()
        if target.frozen is None:
            target.update(stats[3])
        if log:
            log.write({"kind": "train", "step": step, "ce": stats[0], "scale_loss": stats[1], "loss": stats[0] + stats[1],
                       "gate": _gate(model), "lr": lr, "logit_norm": stats[2], "prelogit_rms": stats[3],
                       "s_tgt": target.frozen, "grad_norm": total, **{f"grad_norm_{k}": v for k, v in gnorms.items()}})
        done = step + 1
        bar.update(done, ce=stats[0], gate=float(_gate(model) or 0.0), lr=lr)
        if cfg.eval_every > 0 and done % cfg.eval_every == 0 and done < cfg.steps and rank == 0:
            run_eval(done)
        if (cfg.ckpt_every > 0 and done % cfg.ckpt_every == 0) or done == end:
            save(done, run / "checkpoint", True)
        if world > 1:
            dist.barrier()
    bar.close()
    if end < cfg.steps:  # stopped early on purpose; resume later
        if log:
            log.close()
        return TrainResult(str(run), str(run / "checkpoint"), float("nan"), initial_val, end, _gate(model),
                           prior_s + time.time() - t_start, str(run / "log.jsonl"))
    if tapering:
        if not all(m.calibrated for _, m in taper_layers(model)):
            _finish_calibration(model, world)
        set_gate(model, sched.final_gate())
    val = run_eval(cfg.steps, full=True) if rank == 0 else float("nan")
    save(cfg.steps, run / "model", False)
    if rank == 0:
        summary = {"val_loss": val, "initial_val_loss": initial_val, "steps": cfg.steps, "final_gate": _gate(model),
                   "mode": cfg.mode, "scale_loss": cfg.scale_loss, "val_tokens": _val_tokens(data.val, cfg.seq_len),
                   "seconds": prior_s + time.time() - t_start, "world_size": world}
        atomic_write_text(run / "summary.json", json.dumps(summary, indent=2) + "\n")
        log.close()
    if world > 1:
        dist.barrier()
    return TrainResult(str(run), str(run / "model"), val, initial_val, cfg.steps, _gate(model),
                       prior_s + time.time() - t_start, str(run / "log.jsonl"))


def _already_complete(run: Path, cfg: TrainConfig, rank: int) -> TrainResult:
    """--resume of a run that finished: say so (rank 0) and return its summary; nothing is re-evaluated."""
    try:
        s = json.loads((run / "summary.json").read_text())
    except (json.JSONDecodeError, UnicodeDecodeError):
        s = {}
    val = s.get("val_loss")
    if rank == 0:
        print(f"[train] {run} is already complete ({cfg.steps}/{cfg.steps} steps, val_loss "
              f"{val if val is None else f'{val:.4f}'} in summary.json); nothing to resume - pass --overwrite to "
              "train it again, or a new --out", file=sys.stderr, flush=True)
    return TrainResult(str(run), str(run / "model"), float("nan") if val is None else float(val),
                       s.get("initial_val_loss"), cfg.steps, s.get("final_gate"), float(s.get("seconds", 0.0)),
                       str(run / "log.jsonl"))


def _val_tokens(stream: torch.Tensor, seq_len: int) -> int:
    """Tokens scored by a full-split evaluation (every whole validation window)."""
    return (len(stream) - 1) // seq_len * seq_len


def _stop_if_diverged(step: int, loss: torch.Tensor, grad_norm: float, lr: float, model: DecoderLM, sched,
                      cfg: TrainConfig, run: Path, world: int, device: torch.device) -> None:
    """Raise TrainingDiverged (before the optimizer step) when the loss or the gradient is not finite;
    under DDP every rank takes the same decision."""
    loss_v = float(loss.detach())
    bad = not (math.isfinite(loss_v) and math.isfinite(grad_norm))
    if world > 1:
        flag = torch.tensor([float(bad)], device=device)
        dist.all_reduce(flag, op=dist.ReduceOp.MAX)
        bad = bool(flag.item())
    if bad:
        taper = (sched.taper_start, sched.taper_end) if sched is not None else None
        raise TrainingDiverged(divergence_message(step, loss_v, grad_norm, lr, _gate(model), taper, cfg.bf16,
                                                  run / "checkpoint"))


def _gate(model: nn.Module) -> float | None:
    layers = taper_layers(model)
    return layers[0][1].gate if layers else None


def _finish_calibration(model: DecoderLM, world: int) -> dict:
    """Average the calibration EMAs over ranks (the EMA is linear, so this is the EMA of the means), then freeze c."""
    if world > 1:
        for _, m in taper_layers(model):
            for buf in m.calib_tensors():
                _allreduce_mean(buf, world)
    return finish_calibration(model)


def evaluate_checkpoint(ckpt_dir: str, corpus: str | None = None, batches: int | None = None,
                        batch_size: int = 16) -> dict:
    """Validation loss of a saved model (gate as trained) on the held-out split of its training corpus: the whole
    split by default (what train's summary.json reports), or its first `batches` batches."""
    d = Path(ckpt_dir)
    if (d / "model" / "config.json").is_file():
        d = d / "model"
    model, info = load_checkpoint(d)
    if info["tokenizer_path"] is None:
        raise CheckpointError(f"{d}: no tokenizer.model; evaluation needs the run's tokenizer")
    tr = info["config_json"].get("training", {})
    docs = load_corpus(corpus or tr.get("corpus", "builtin"), tr.get("max_docs"), tr.get("max_chars"))
    seq_len = int(tr.get("seq_len", min(64, info["config"].max_seq_len)))
    data = tokenize_corpus(docs, Tokenizer.load(info["tokenizer_path"]), seq_len, tr.get("val_frac", 0.1))
    val = evaluate(model, data.val, batch_size, seq_len, batches)
    full = batches is None or batches * batch_size * seq_len >= _val_tokens(data.val, seq_len)
    return {"dir": str(d), "val_loss": val, "gate": info["gate"], "mode": info["config"].taper_mode,
            "tokens": _val_tokens(data.val, seq_len) if full else batches * batch_size * seq_len,
            "full_split": full, "batches": batches}


