"""One optimisation step of the trainer and the run state it works on (trainer.py drives the loop).

    RunState        the model, optimizer, scale target, data, log and process layout shared by the stages
    apply_schedule  per-step schedule: calibration end at the taper start, the gate, the DDP wrapper, the lr
    train_step      forward, CE + scale loss, backward, clip, divergence check, AdamW step -> StepResult
"""
from __future__ import annotations

import gc
import inspect
import math
import time
from dataclasses import dataclass
from pathlib import Path
from typing import NamedTuple

import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch import nn

from ..data import TokenData
from ..layers import finish_calibration, set_gate, taper_layers
from ..model import DecoderLM
from .config import TrainConfig
from .rundir import TrainingDiverged, divergence_message
from .scale_loss import ScaleTarget, scale_loss, scale_stat
from .schedule import TaperSchedule
from .state import JsonlLog, grad_norms


class _WithHidden(nn.Module):
    """forward(ids) -> (logits, pre-logit h), so DDP wraps one call that yields both."""

    def __init__(self, model: DecoderLM):
        super().__init__()
        self.model = model

    def forward(self, input_ids):
        h, _ = self.model.hidden(input_ids)  # (B, T, d)
        return self.model.head(h), h


@dataclass
class RunState:
    """What the stages of one run share: settings, process layout, data, model, optimizer and bookkeeping."""
    cfg: TrainConfig
    run: Path
    sched: TaperSchedule
    rank: int
    world: int
    device: torch.device
    tok_path: Path
    data: TokenData
    model: DecoderLM
    opt: torch.optim.Optimizer
    target: ScaleTarget
    tapering: bool
    groups: dict[str, list[nn.Parameter]]  # gradient-norm groups (grad_groups)
    centered: bool  # the scale statistic subtracts the mean (gpt2's LayerNorm)
    log: JsonlLog | None  # rank 0 only
    extra: dict  # the "training" record saved into each checkpoint's config.json
    unwrapped: _WithHidden
    wrapped: nn.Module  # `unwrapped`, or DDP around it
    find_unused: bool  # the DDP wrapper's find_unused_parameters
    t_start: float
    start: int = 0  # first step of this process (the checkpoint's step on resume)
    prior_s: float = 0.0  # training time before a resume
    initial_val: float | None = None

    def seconds(self) -> float:
        """Training time so far, across resumes."""
        return self.prior_s + time.time() - self.t_start


class StepResult(NamedTuple):
    """One step's statistics: losses and norms are means over ranks, gradient norms are before clipping."""
    ce: float
    scale_loss: float
    logit_norm: float  # mean over tokens of |logits|
    prelogit_rms: float  # mean over tokens of the scale statistic s
    grad_norm: float  # total, as clip_grad_norm_ returns it
    grad_norms: dict[str, float]  # per grad_groups group


def _unused_params(tapering: bool, gate: float) -> bool:
    """Whether a forward at `gate` leaves parameters unused: gamma_t at gate 1, gamma at gate 0."""
    return tapering and not 0.0 < gate < 1.0


def _ddp(module: nn.Module, device: torch.device, find_unused: bool) -> nn.Module:
    """DistributedDataParallel around `module`; calibration EMAs are rank-local until _finish_calibration averages
    them, so buffers are never synced in forward."""
    DDP = nn.parallel.DistributedDataParallel
    nosync = ({"forward_sync_buffers": False} if "forward_sync_buffers" in inspect.signature(DDP).parameters
              else {"broadcast_buffers": False})
    return DDP(module, device_ids=[device.index] if device.type == "cuda" else None,
               find_unused_parameters=find_unused, **nosync)


def _allreduce_mean(t: torch.Tensor, world: int) -> torch.Tensor:
    """Mean of `t` over ranks, in place (a no-op in one process)."""
    if world > 1:
        dist.all_reduce(t, op=dist.ReduceOp.SUM)
        t /= world
    return t


def _gate(model: nn.Module) -> float | None:
    """The first taper layer's gate, or None for a model without taper layers."""
    layers = taper_layers(model)
    return layers[0][1].gate if layers else None


def _finish_calibration(model: DecoderLM, world: int) -> dict:
    """Average the calibration EMAs over ranks (the EMA is linear, so this is the EMA of the means), then freeze c."""
    if world > 1:
        for _, m in taper_layers(model):
            for buf in m.calib_tensors():
                _allreduce_mean(buf, world)
    return finish_calibration(model)


def apply_schedule(rs: RunState, step: int) -> float:
    """Set up `step`: end calibration and freeze the scale target at the taper start, set the gate (rebuilding the
    DDP wrapper when the gate changes which parameters are used), set the lr; returns the lr."""
    if rs.tapering and step == rs.sched.taper_start:
        _finish_calibration(rs.model, rs.world)
    if step == rs.sched.taper_start and rs.target.frozen is None:
        rs.target.freeze()
    if rs.tapering:
        set_gate(rs.model, rs.sched.gate(step))
        if rs.world > 1 and rs.find_unused != _unused_params(rs.tapering, rs.sched.gate(step)):
            rs.wrapped = rs.unwrapped  # drop the old DDP wrapper ...
            gc.collect()  # ... and the old reducer's autograd hooks with it
            rs.find_unused = not rs.find_unused
            rs.wrapped = _ddp(rs.unwrapped, rs.device, rs.find_unused)
    lr = rs.sched.lr(step, rs.cfg.lr)
    for g in rs.opt.param_groups:
        g["lr"] = lr
    return lr


def train_step(rs: RunState, x: torch.Tensor, y: torch.Tensor, step: int, lr: float) -> StepResult:
    """One optimisation step on this rank's batch: inputs x and targets y, both (B/world, T) int64 on rs.device.

    Raises TrainingDiverged before the optimizer step when the loss or the gradient is not finite; while the scale
    target is not frozen, feeds it the step's mean scale statistic."""
    cfg = rs.cfg
    with torch.autocast(rs.device.type, dtype=torch.bfloat16, enabled=cfg.bf16):
        logits, h = rs.wrapped(x)  # (B, T, V), (B, T, d)
    ce = F.cross_entropy(logits.float().flatten(0, 1), y.flatten())  # ()
    s = scale_stat(h, rs.centered)  # (B, T)
    aux = torch.zeros((), device=rs.device)
    if cfg.scale_loss and rs.target.frozen is not None:
        aux = scale_loss(h, rs.target.frozen, cfg.scale_lambda, rs.centered, form=cfg.scale_form)
    loss = ce + aux
    rs.opt.zero_grad(set_to_none=True)
    loss.backward()
    gnorms = grad_norms(rs.groups)
    total = float(torch.nn.utils.clip_grad_norm_(rs.model.parameters(), cfg.grad_clip))
    _stop_if_diverged(step, loss, total, lr, rs.model, rs.sched if rs.tapering else None, cfg, rs.run, rs.world,
                      rs.device)
    rs.opt.step()
    stats = torch.stack([ce.detach(), aux.detach(), logits.detach().float().norm(dim=-1).mean(),
                         s.detach().mean()]).double()  # (4,)
    ce_v, aux_v, logit_norm, prelogit_rms = _allreduce_mean(stats, rs.world).tolist()
    if rs.target.frozen is None:
        rs.target.update(prelogit_rms)
    return StepResult(ce_v, aux_v, logit_norm, prelogit_rms, total, gnorms)


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
