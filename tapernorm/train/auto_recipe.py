"""`--recipe auto`: pick the fine-tuning recipe from the checkpoint itself (the default), and the advice a run
with a recipe gets (a short run, an overflow at the end of the taper).

A checkpoint with attention sinks (tapernorm.sinks: some token's norm input far above the median) overflows at
gate 0 under the paper's method (docs/real_checkpoints.md, sections 1 and 8), so it gets `sink-attn`; one without
gets the paper's method. A parallel-block family (one norm feeds attention and the MLP) has no attention-only
taper, so with sinks it gets `sink`.
"""
from __future__ import annotations

import dataclasses
import sys

import torch
import torch.distributed as dist
import torch.nn as nn

from ..layers import TaperError
from ..replace_norms import mlp_norm_pattern
from ..sinks import SinkReport, find_sinks
from .finetune_cli import AUTO, AUTO_CHOICES, FinetuneConfig

__all__ = ["AutoChoice", "choose_recipe", "settle_choice", "short_run_note", "SHORT_RUN_STEPS", "LATE_TAPER_HINT", "late_taper_hint"]

SHORT_RUN_STEPS = 1000  # below this many steps from the taper start, a sink recipe is far from its measured result


@dataclasses.dataclass(frozen=True)
class AutoChoice:
    """What `--recipe auto` chose, and the measurement it chose from."""
    recipe: str
    reason: str
    sinks: SinkReport

    def to_dict(self) -> dict:
        """JSON-ready dict (summary.json's recipe_auto)."""
        return {"recipe": self.recipe, "reason": self.reason, "sinks": self.sinks.to_dict()}


def pick(report: SinkReport, model: nn.Module) -> AutoChoice:
    """The recipe for a model with this sink report (pure: no forward pass)."""
    if not report.found:
        return AutoChoice("paper", f"no attention sinks ({report.line()}): the paper's method", report)
    try:
        mlp_norm_pattern(model)
    except TaperError:
        return AutoChoice("sink", f"attention sinks ({report.line()}) in a parallel-block model, which has no "
                          "attention-only taper: the sink recipe (it did not reach gate 0 on SmolLM2; watch the log)",
                          report)
    return AutoChoice("sink-attn", f"attention sinks ({report.line()}): the sink-attn recipe, which keeps the norms "
                      "in front of the MLPs and tapers the rest", report)


def choose_recipe(cfg: FinetuneConfig, model: nn.Module, train_ids: torch.Tensor,
                  verbose: bool = True) -> tuple[FinetuneConfig, AutoChoice | None]:
    """cfg with `auto` replaced by the recipe `pick` chooses after two batches of the training stream (1-D ids)
    through `model` (untapered) at gate 1, filled and checked; cfg itself (filled) when its recipe is not auto."""
    if cfg.recipe != AUTO:
        return cfg.with_recipe().check(), None
    bs, L = min(cfg.batch_size, 4), cfg.seq_len
    n = min(2 * bs, len(train_ids) // L)
    ids = train_ids[:n * L].reshape(n, L)                         # (n, L)
    was_training = model.training
    model.eval()
    try:
        report = find_sinks(model, list(ids.split(bs)))
    finally:
        model.train(was_training)
    choice = _same_on_every_rank(pick(report, model))
    cfg = dataclasses.replace(cfg, recipe=choice.recipe).with_recipe().check()
    if verbose:
        print(f"[finetune] --recipe auto: {choice.reason}; --recipe NAME overrides (docs/real_checkpoints.md)",
              file=sys.stderr, flush=True)
        note = short_run_note(cfg)
        if note:
            print(f"[finetune] note: {note}", file=sys.stderr, flush=True)
    return cfg, choice


def settle_choice(mine: AutoChoice, rank0_recipe: str) -> AutoChoice:
    """The choice a rank trains with: rank 0's recipe (one model, one recipe), with this rank's own measurement."""
    if mine.recipe == rank0_recipe:
        return mine
    return AutoChoice(rank0_recipe, f"rank 0's choice, {rank0_recipe} (this rank measured {mine.recipe}: "
                      f"{mine.reason})", mine.sinks)


def _same_on_every_rank(mine: AutoChoice) -> AutoChoice:
    """Under torchrun every rank measures the same batches, but one model needs one recipe whatever rounding each
    device does: rank 0's choice is broadcast (an index into AUTO_CHOICES, no pickling)."""
    if not (dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1):
        return mine
    dev = torch.device("cuda", torch.cuda.current_device()) if dist.get_backend() == "nccl" else torch.device("cpu")
    idx = torch.tensor([AUTO_CHOICES.index(mine.recipe)], dtype=torch.int64, device=dev)
    dist.broadcast(idx, src=0)
    return settle_choice(mine, AUTO_CHOICES[int(idx.item())])


def short_run_note(cfg: FinetuneConfig) -> str | None:
    """A line for a sink recipe given few steps after the taper start, with what such runs measured; else None."""
    T, _, t0, _ = cfg.resolved_steps()
    if cfg.recipe not in ("sink", "sink-attn") or cfg.mode == "baseline" or T - t0 >= SHORT_RUN_STEPS:
        return None
    return (f"{T - t0} steps from the taper start to the end is short for a checkpoint with sinks: on SmolLM2-135M, "
            "150 steps (taper 20..120) ended finite but +31% held-out CE above the untapered twin and lost its chat "
            "answers, 2400 steps (taper 20..1600) +0.7%; give it thousands of steps (docs/real_checkpoints.md, section 9)")


LATE_TAPER_HINT = ("a pretrained checkpoint's outlier tokens (attention sinks) overflow without their norms; try "
                   "--recipe sink-attn (the sink remedies, MLP norms kept: it reaches gate 0 on SmolLM2), or "
                   "--calib-pos0, --rms-loss with --rms-hinge, --taper-cap, --keep-norms and a longer taper "
                   "(docs/real_checkpoints.md)")


def late_taper_hint(recipe: str) -> str:
    """What to try after a late-taper overflow, given the recipe that ran."""
    if recipe == "sink-attn":
        return ("this run already had --recipe sink-attn (MLP norms kept); give the taper more steps (thousands "
                "on SmolLM2-135M) or keep more norms with --keep-norms (docs/real_checkpoints.md)")
    return LATE_TAPER_HINT
