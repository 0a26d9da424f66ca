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
import os
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import NamedTuple

import torch
import torch.distributed as dist
import torch.nn.functional as F

from ..checkpoint import CheckpointError, load_checkpoint, load_resume, save_checkpoint
from ..data import TokenData, Tokenizer, batch_at, load_corpus, tokenize_corpus, train_tokenizer, val_batches
from ..fileio import atomic_write_text, dir_lock
from ..layers import begin_calibration, set_gate, taper_layers
from ..model import DecoderLM, preset
from .config import RESUME_FREE, TrainConfig
from .progress import Progress
from .rundir import TrainingDiverged, clear_run_dir, prepare_run_dir, recover_run
from .scale_loss import ScaleTarget
from .schedule import TaperSchedule, resolve_schedule
from .state import JsonlLog, grad_groups, pack_optimizer, pack_rng, unpack_optimizer, unpack_rng
from .step import (RunState, _ddp, _finish_calibration, _gate, _unused_params, _WithHidden, apply_schedule,
                   train_step)

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


def _dist_env() -> tuple[int, int, int]:
    """(rank, world_size, local_rank) from the torchrun environment."""
    return int(os.environ.get("RANK", 0)), int(os.environ.get("WORLD_SIZE", 1)), int(os.environ.get("LOCAL_RANK", 0))


def _device(cfg: TrainConfig, local_rank: int) -> torch.device:
    """This rank's device for --device (auto: cuda:LOCAL_RANK when torch sees a GPU, else cpu)."""
    if cfg.device == "auto":
        return torch.device(f"cuda:{local_rank}") if torch.cuda.is_available() else torch.device("cpu")
    if cfg.device.startswith("cuda") and not torch.cuda.is_available():
        raise RuntimeError("--device cuda was asked for but torch sees no GPU; use --device cpu")
    return torch.device(cfg.device if cfg.device != "cuda" else f"cuda:{local_rank}")


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
    """Refuse --resume with settings (outside RESUME_FREE) that differ from the saved run's."""
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
    """The run in stages: check inputs, tokenize and start the processes, build (or resume), loop, finish."""
    t_start = time.time()
    inp = _check_inputs(cfg)
    if inp.complete:
        return _already_complete(inp.run, cfg, inp.rank)
    rs = _build(cfg, inp, _prepare(cfg, inp), t_start)
    rs.initial_val = _run_eval(rs, 0, full=True) if (rs.rank == 0 and rs.start == 0 and cfg.eval_every > 0) else None
    if inp.state is not None:
        rs.initial_val = inp.state["json"].get("initial_val_loss")  # measured before the run was interrupted
    end = cfg.stop_after or cfg.steps
    _loop(rs, end)
    if end < cfg.steps:  # stopped early on purpose; resume later
        if rs.log:
            rs.log.close()
        return _result(rs, rs.run / "checkpoint", float("nan"), end)
    return _finish(rs)


@dataclass
class _Inputs:
    """The checked inputs of a run: nothing has been written yet."""
    run: Path
    sched: TaperSchedule
    rank: int
    world: int
    local_rank: int
    docs: list[str]
    tok_src: Tokenizer | None  # --tokenizer, if given
    resumed: tuple | None  # (model, info, trainer state) of the checkpoint, on --resume
    complete: bool  # --resume of a run that already finished

    @property
    def state(self) -> dict | None:
        """The resumed trainer state ({"json": ..., "tensors": ...}), or None."""
        return self.resumed[2] if self.resumed else None


class _Prepared(NamedTuple):
    """The run's tokenizer and token streams, and this process's device."""
    device: torch.device
    tok_path: Path
    tok: Tokenizer
    data: TokenData


def _check_inputs(cfg: TrainConfig) -> _Inputs:
    """Every bad-input check, before anything is written: batch split, schedule, corpus, tokenizer, run directory,
    and on --resume the checkpoint and its settings."""
    rank, world, local_rank = _dist_env()
    if cfg.batch_size % world:
        raise ValueError(f"batch_size {cfg.batch_size} does not split over {world} processes; use a multiple of {world}")
    run = Path(cfg.out_dir)
    sched = resolve_schedule(cfg.steps, cfg.warmup_frac, cfg.warmup_steps, cfg.taper_start, cfg.taper_end)
    if sched.taper_start >= cfg.steps and cfg.mode != "baseline":
        raise ValueError(f"taper start {sched.taper_start} must be before the last step {cfg.steps - 1}")
    docs = load_corpus(cfg.corpus, cfg.max_docs, cfg.max_chars)
    tok_src = Tokenizer.load(cfg.tokenizer) if cfg.tokenizer else None
    prepare_run_dir(run, cfg.resume, cfg.overwrite, cfg.ckpt_every)
    # weights and trainer state from one save (load_resume checks their shared checkpoint_id)
    resumed = load_resume(run / "checkpoint") if cfg.resume else None
    inp = _Inputs(run, sched, rank, world, local_rank, docs, tok_src, resumed, complete=False)
    if inp.state is not None:
        _check_resume(cfg, inp.state["json"]["train_config"])
        inp.complete = int(inp.state["json"]["step"]) >= cfg.steps and (run / "summary.json").is_file() \
            and (run / "model" / "config.json").is_file()
    return inp


def _prepare(cfg: TrainConfig, inp: _Inputs) -> _Prepared:
    """Tokenizer and token streams, device and process group, then (rank 0, new run) a fresh run directory."""
    # The tokenizer and token streams are built before the run directory is created, so a corpus that
    # cannot be tokenized leaves no files behind. Under DDP rank 0 trains the tokenizer, the others load it.
    tok_path = inp.run / "tokenizer.model"
    tok = data = None
    if cfg.resume:
        tok = Tokenizer.load(tok_path)
    elif inp.rank == 0:
        tok = inp.tok_src or train_tokenizer(inp.docs, cfg.vocab_size)
    if tok is not None:
        data = tokenize_corpus(inp.docs, tok, cfg.seq_len, cfg.val_frac)
    device = _device(cfg, inp.local_rank)
    if inp.world > 1 and not dist.is_initialized():
        dist.init_process_group("nccl" if device.type == "cuda" else "gloo")
    if device.type == "cuda":
        torch.cuda.set_device(device)
    if inp.rank == 0 and not cfg.resume:
        clear_run_dir(inp.run, cfg.overwrite)
        tok.save(tok_path)
    if inp.world > 1:
        dist.barrier()
    if tok is None:
        tok = Tokenizer.load(tok_path)
        data = tokenize_corpus(inp.docs, tok, cfg.seq_len, cfg.val_frac)
    return _Prepared(device, tok_path, tok, data)


def _new_model(cfg: TrainConfig, vocab_size: int) -> DecoderLM:
    """A fresh model from the preset (with any size overrides), initialised from cfg.seed."""
    over = {k: getattr(cfg, k) for k in ("dim", "n_layers", "n_heads") if getattr(cfg, k) is not None}
    mcfg = preset(cfg.preset, vocab_size=vocab_size, taper_mode=cfg.mode, **over)
    mcfg.max_seq_len = max(mcfg.max_seq_len, cfg.seq_len)
    torch.manual_seed(cfg.seed)
    return DecoderLM(mcfg)


def _adamw(model: DecoderLM, cfg: TrainConfig) -> torch.optim.AdamW:
    """AdamW with weight decay on matrices (dim >= 2) only."""
    decay = [p for p in model.parameters() if p.dim() >= 2]
    no_decay = [p for p in model.parameters() if p.dim() < 2]
    return torch.optim.AdamW([{"params": decay, "weight_decay": cfg.weight_decay},
                              {"params": no_decay, "weight_decay": 0.0}], lr=cfg.lr, betas=cfg.betas, foreach=False)


def _build(cfg: TrainConfig, inp: _Inputs, prep: _Prepared, t_start: float) -> RunState:
    """Model, AdamW and scale target (fresh, or restored from the checkpoint with the RNG), the DDP wrapper,
    calibration begun if the taper start is ahead, the log opened (rank 0)."""
    state = inp.state
    if state is not None:
        model = inp.resumed[0]
        model.train()
    else:
        model = _new_model(cfg, prep.tok.vocab_size)
    model.to(prep.device).train()
    tapering = bool(taper_layers(model))
    for _, m in taper_layers(model):
        m.beta_ema = cfg.beta_ema
    opt, target = _adamw(model, cfg), ScaleTarget(cfg.beta_ema)
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
    # the wrapper is rebuilt when that changes (twice per run, in apply_schedule)
    find_unused = _unused_params(tapering, inp.sched.gate(start))
    if inp.world > 1:
        wrapped = _ddp(unwrapped, prep.device, find_unused)
    if tapering and start <= inp.sched.taper_start:
        begin_calibration(model)
    groups = grad_groups(model)
    log = JsonlLog(inp.run / "log.jsonl", truncate_after_step=start) if inp.rank == 0 else None
    extra = {"training": {k: getattr(cfg, k) for k in ("corpus", "max_docs", "max_chars", "val_frac", "seq_len",
                                                       "steps", "mode", "scale_loss", "scale_lambda", "scale_form", "seed")}}
    return RunState(cfg, inp.run, inp.sched, inp.rank, inp.world, prep.device, prep.tok_path, prep.data, model, opt,
                    target, tapering, groups, model.config.arch == "gpt2", log, extra, unwrapped, wrapped,
                    find_unused, t_start, start, prior_s)


def _save(rs: RunState, step_done: int, out: Path, with_state: bool) -> None:
    """Rank 0: the model to `out`, with the trainer state (optimizer, RNG, scale target) when `with_state`."""
    if rs.rank != 0:
        return
    ts = None
    if with_state:
        ojs, otens = pack_optimizer(rs.opt)
        ts = {"json": {"step": step_done, "train_config": rs.cfg.to_dict(), "optimizer": ojs,
                       "scale_target": rs.target.state_dict(), "world_size": rs.world,
                       "initial_val_loss": rs.initial_val, "seconds": rs.seconds()},
              "tensors": {**otens, **pack_rng()}}
    save_checkpoint(rs.model, out, tokenizer_path=rs.tok_path, extra=rs.extra, trainer_state=ts)


def _run_eval(rs: RunState, step_done: int, full: bool = False) -> float:
    """Validation loss at the current gate, logged (rank 0) as an "eval" record."""
    # periodic evals are cheap (eval_batches); the first and the final cover the whole validation split
    cfg = rs.cfg
    v = evaluate(rs.model, rs.data.val, cfg.batch_size, cfg.seq_len, None if full else cfg.eval_batches, cfg.bf16)
    if rs.log:
        rs.log.write({"kind": "eval", "step": step_done, "val_loss": v, "gate": _gate(rs.model), "full_split": full})
    return v


def _loop(rs: RunState, end: int) -> None:
    """Steps rs.start .. end-1: schedule, one optimisation step, log record, periodic eval and checkpoint (and one
    at `end`); a barrier after every step under DDP."""
    cfg = rs.cfg
    # a bar on a terminal; periodic flushed lines when stderr is a log file or a pipe (no carriage-return spam)
    bar = Progress(cfg.steps, rs.start, cfg.progress and rs.rank == 0)
    for step in range(rs.start, end):
        lr = apply_schedule(rs, step)
        x, y = batch_at(rs.data.train, step, cfg.batch_size, cfg.seq_len, cfg.seed, rs.rank, rs.world)  # (B/world, T)
        r = train_step(rs, x.to(rs.device), y.to(rs.device), step, lr)
        if rs.log:
            rs.log.write({"kind": "train", "step": step, "ce": r.ce, "scale_loss": r.scale_loss,
                          "loss": r.ce + r.scale_loss, "gate": _gate(rs.model), "lr": lr, "logit_norm": r.logit_norm,
                          "prelogit_rms": r.prelogit_rms, "s_tgt": rs.target.frozen, "grad_norm": r.grad_norm,
                          **{f"grad_norm_{k}": v for k, v in r.grad_norms.items()}})
        done = step + 1
        bar.update(done, ce=r.ce, gate=float(_gate(rs.model) or 0.0), lr=lr)
        if cfg.eval_every > 0 and done % cfg.eval_every == 0 and done < cfg.steps and rs.rank == 0:
            _run_eval(rs, done)
        if (cfg.ckpt_every > 0 and done % cfg.ckpt_every == 0) or done == end:
            _save(rs, done, rs.run / "checkpoint", True)
        if rs.world > 1:
            dist.barrier()
    bar.close()


def _finish(rs: RunState) -> TrainResult:
    """After the last step: calibration (if still open) and the final gate, the full-split evaluation, the model
    saved to RUN/model, summary.json (rank 0); a closing barrier under DDP."""
    cfg = rs.cfg
    if rs.tapering:
        if not all(m.calibrated for _, m in taper_layers(rs.model)):
            _finish_calibration(rs.model, rs.world)
        set_gate(rs.model, rs.sched.final_gate())
    val = _run_eval(rs, cfg.steps, full=True) if rs.rank == 0 else float("nan")
    _save(rs, cfg.steps, rs.run / "model", False)
    if rs.rank == 0:
        summary = {"val_loss": val, "initial_val_loss": rs.initial_val, "steps": cfg.steps,
                   "final_gate": _gate(rs.model), "mode": cfg.mode, "scale_loss": cfg.scale_loss,
                   "val_tokens": _val_tokens(rs.data.val, cfg.seq_len), "seconds": rs.seconds(),
                   "world_size": rs.world}
        atomic_write_text(rs.run / "summary.json", json.dumps(summary, indent=2) + "\n")
        rs.log.close()
    if rs.world > 1:
        dist.barrier()
    return _result(rs, rs.run / "model", val, cfg.steps)


def _result(rs: RunState, model_dir: Path, val: float, steps: int) -> TrainResult:
    """The TrainResult of this run, with the gate and the training time as they are now."""
    return TrainResult(str(rs.run), str(model_dir), val, rs.initial_val, steps, _gate(rs.model), rs.seconds(),
                       str(rs.run / "log.jsonl"))


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


