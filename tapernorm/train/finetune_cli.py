"""`tapernorm finetune`: flags, the FinetuneConfig they fill, and the paper's GPT-2 schedules (torch-free).

    tapernorm finetune HF_DIR_OR_NAME --out runs/ft --schedule gpt2-s     Table 3's GPT-2 S schedule
    tapernorm finetune HF_DIR --out runs/ft --steps 40 --taper-start 5 --taper-end 30
    torchrun --nproc_per_node 2 -m tapernorm.compiler.cli finetune ...    DDP through HF's Trainer

The implementation (HF Trainer + TaperCallback) is tapernorm/train/finetune.py, imported by the handler.
"""
from __future__ import annotations

import argparse
import dataclasses
import json
import math
import os
import typing
from dataclasses import dataclass

from .cli import DefaultsFormatter
from .config import SCALE_FORMS

__all__ = ["FinetuneConfig", "SCHEDULES", "RECIPES", "MODES", "add_cli", "config_from_args"]

MODES = ("internal", "all", "baseline")
LR_SCHEDULES = {"cosine": "cosine", "constant": "constant_with_warmup"}  # --lr-schedule -> HF lr_scheduler_type

# Table 3 of the paper: total steps, LR-warmup end, taper start, taper end (gate 0 from there)
SCHEDULES: dict[str, tuple[int, int, int, int]] = {
    "gpt2-s": (300, 25, 25, 100),
    "gpt2-m": (500, 10, 20, 200),
    "gpt2-l": (600, 30, 30, 500),
    "gpt2-xl": (800, 20, 50, 700),
}

# --recipe: remedies for real checkpoints (docs/real_checkpoints.md). A recipe fills the fields not given; a flag
# given always wins. "paper": none (the paper's method). "sink": position 0's own c0, a robust per-feature map for
# the rest, the hinged RMS loss, the training-only cap, a constant lr (section 5). "sink-attn": the same with the
# norms in front of the MLPs kept, so only the attention side tapers (section 8), the lr decaying by cosine and the
# taper ending at 2/3 of the run, so the last third trains at gate 0 (section 8.6: AE / AF, +0.7% / -1.4% held-out
# CE against the same fine-tune without taper). "auto" (the default) measures the checkpoint first (tapernorm.sinks):
# sink-attn when it has attention sinks, else paper.
SINK_RECIPE = {"calib_stat": "inv_rms", "calib_skip": 1, "calib_per_feature": True, "calib_pos0": True,
               "rms_loss": 30.0, "rms_hinge": 1.5, "taper_cap": 2.0, "lr_schedule": "constant"}
SINK_ATTN_RECIPE = {**SINK_RECIPE, "keep_mlp_norms": True, "lr_schedule": "cosine", "taper_end_frac": 2 / 3}
RECIPES: dict[str, dict] = {"paper": {}, "sink": SINK_RECIPE, "sink-attn": SINK_ATTN_RECIPE}
AUTO = "auto"
BOUND_SCOPES = ("mlp", "all")  # --taper-bound-scope
AUTO_CHOICES = ("paper", "sink-attn", "sink")  # what auto may pick (sink: a parallel block, with no MLP-only norm)
# the values of the fields a recipe may set when neither the user nor a recipe sets them (the paper's method)
BASE = {"calib_skip": 0, "calib_stat": "ls", "calib_per_feature": False, "calib_pos0": False, "rms_loss": 0.0,
        "rms_hinge": 0.0, "taper_cap": 0.0, "lr_schedule": "cosine", "keep_mlp_norms": False, "taper_end_frac": 1.0,
        "taper_bound": 0.0, "taper_bound_rms": 0.0}


@dataclass
class FinetuneConfig:
    """A fine-tuning run with tapering; steps default to the schedule preset, else to the explicit flags."""
    model: str = ""                   # HF directory or hub name
    out_dir: str = "runs/finetune"
    mode: str = "internal"            # internal | all | baseline (no tapering: the comparison run)
    schedule: str | None = None       # a SCHEDULES name; explicit step flags override its entries
    steps: int | None = None
    warmup_steps: int | None = None
    taper_start: int | None = None    # default: the end of LR warmup
    taper_end: int | None = None      # default: the schedule's, else taper_end_frac of the run
    corpus: str = "builtin"
    max_docs: int | None = None
    max_chars: int | None = None
    val_frac: float = 0.1
    seq_len: int = 128
    batch_size: int = 8               # global batch (split over torchrun processes)
    lr: float = 1e-4
    scale_loss: bool = True
    scale_lambda: float = 1.0
    scale_form: str = "relative"      # "relative": lambda (s/s_tgt - 1)^2 (the trainer default); "paper"
    beta_ema: float = 0.1
    weight_decay: float = 0.0
    grad_clip: float = 1.0
    eval_batches: int = 16            # held-out chunks of seq_len tokens, batch_size per batch, before and after
    seed: int = 0
    bf16: bool = False
    overwrite: bool = False
    # remedies for real checkpoints with attention sinks (docs/real_checkpoints.md)
    # None in a field of BASE: not given, so the recipe (else BASE) decides; a value given explicitly always wins
    calib_skip: int | None = None     # leading positions of each sequence left out of c's statistic
    calib_stat: str | None = None     # ls | inv_rms
    calib_per_feature: bool | None = None
    calib_pos0: bool | None = None    # position 0 gets its own c0 (pos0.py; one (B, T, 1) Mul per norm folded)
    rms_loss: float | None = None     # lambda of the per-token norm-input RMS loss (rms_loss.py); 0 = off
    rms_hinge: float | None = None    # > 1: only tokens above rms_hinge x the calibrated scale pay; 0 = symmetric
    keep_norms: str = ""              # regex of norm names left untapered (a partial taper); "" = none
    keep_mlp_norms: bool | None = None  # also leave the norms in front of the MLPs (replace_norms.MLP_NORMS)
    recipe: str = AUTO                # a RECIPES name filling the remedy fields not given, or auto (chosen by sinks)
    lr_schedule: str | None = None    # cosine | constant (after the warmup); None: the recipe's, else cosine
    cap_anneal: bool = False          # the cap grows as K / gate (fades into gate 0)
    taper_cap: float | None = None    # > 1: training-only cap on a token's fixed branch while 0 < gate < 1 (cap.py)
    taper_order: str = "global"       # global | first | last (staged.py)
    taper_hold: int = 0               # steps at gate 1 after calibration before the taper
    taper_end_frac: float | None = None  # without --taper-end or a schedule: the taper ends at this fraction of the run
    taper_bound: float | None = None  # > 0: norms taper to the bounded map B tanh(u / B) (bound.py); 0: off
    taper_bound_rms: float | None = None  # > 0: a per-feature bound B_i = K * RMS(u_i), measured at calibration
    taper_bound_scope: str = "all"    # which tapered norms are bounded: all | mlp (the MLP-input norms only)

    def with_recipe(self) -> "FinetuneConfig":
        """A copy with every field left None filled: from the recipe, else from BASE. A field given a value keeps
        it, even the value BASE has (`--recipe sink-attn --lr-schedule cosine` trains with cosine). Under auto nothing
        is filled until `choose_recipe` has seen the model; "" (older summaries) is paper."""
        if self.recipe == AUTO:
            return self
        if self.recipe and self.recipe not in RECIPES:
            raise ValueError(f"--recipe {self.recipe!r} is not one of {', '.join((AUTO, *RECIPES))}")
        fill = {**BASE, **RECIPES[self.recipe or "paper"]}
        return dataclasses.replace(self, **{k: v for k, v in fill.items() if getattr(self, k) is None})

    def resolved_steps(self) -> tuple[int, int, int, int]:
        """(total, warmup, taper start, taper end): the preset's, with explicit flags taking precedence."""
        if self.schedule is not None and self.schedule not in SCHEDULES:
            raise ValueError(f"schedule {self.schedule!r} is not one of {sorted(SCHEDULES)}")
        T, W, t0, t1 = SCHEDULES[self.schedule] if self.schedule else (None, None, None, None)
        T = self.steps if self.steps is not None else T
        if T is None:
            raise ValueError("pass --steps N or --schedule NAME (one of " + ", ".join(SCHEDULES) + ")")
        W = self.warmup_steps if self.warmup_steps is not None else (W if W is not None else max(1, round(0.05 * T)))
        t0 = self.taper_start if self.taper_start is not None else (t0 if t0 is not None else W)
        if self.taper_end is not None:
            t1 = self.taper_end
        elif t1 is None:  # neither the flag nor a schedule: the fraction of the run (1: the last step)
            frac = 1.0 if self.taper_end_frac is None else self.taper_end_frac
            t1 = T - 1 if frac >= 1 else max(t0, round(frac * T))
        return int(T), int(W), int(t0), int(t1)

    def check(self) -> "FinetuneConfig":
        """Validate (one line naming the flag); returns self, with the recipe's fields filled (with_recipe). Under
        auto, every recipe auto may choose must validate, and self comes back unfilled."""
        if self.recipe == AUTO:
            for name in AUTO_CHOICES:
                try:
                    dataclasses.replace(self, recipe=name).check()
                except ValueError as e:
                    if name == "paper":
                        raise
                    raise ValueError(f"{e} (under --recipe {name}, which the default --recipe auto picks for a "
                                     "checkpoint with attention sinks; pass --recipe paper or fix the flag)") from None
            return self
        if any(getattr(self, k) is None for k in BASE):
            return self.with_recipe().check()
        if not self.model:
            raise ValueError("pass the model to fine-tune: an HF directory or hub name")
        if self.mode not in MODES:
            raise ValueError(f"--mode {self.mode!r} is not one of {', '.join(MODES)}")
        for k in ("seq_len", "batch_size", "eval_batches"):
            if int(getattr(self, k)) <= 0:
                raise ValueError(f"--{k.replace('_', '-')} must be positive, got {getattr(self, k)}")
        if not (self.lr > 0 and self.grad_clip > 0 and self.scale_lambda >= 0 and 0 < self.beta_ema <= 1):
            raise ValueError("--lr and --grad-clip must be > 0, --scale-lambda >= 0, --beta-ema in (0, 1]")
        if self.lr_schedule not in LR_SCHEDULES:
            raise ValueError(f"--lr-schedule {self.lr_schedule!r} is not one of {', '.join(LR_SCHEDULES)}")
        if self.scale_form not in SCALE_FORMS:
            raise ValueError(f"--scale-form {self.scale_form!r} is not one of {', '.join(SCALE_FORMS)}")
        if self.calib_skip < 0 or self.rms_loss < 0 or self.taper_hold < 0:
            raise ValueError("--calib-skip, --rms-loss and --taper-hold must be >= 0")
        if not (self.taper_cap == 0 or self.taper_cap >= 1):
            raise ValueError(f"--taper-cap {self.taper_cap} must be 0 (off) or >= 1")
        if not 0 < self.taper_end_frac <= 1:
            raise ValueError(f"--taper-end-frac {self.taper_end_frac} must be in (0, 1]")
        if not (self.taper_bound >= 0 and math.isfinite(self.taper_bound)):
            raise ValueError(f"--taper-bound {self.taper_bound} must be a finite number >= 0 (0: off)")
        if not (self.taper_bound_rms >= 0 and math.isfinite(self.taper_bound_rms)):
            raise ValueError(f"--taper-bound-rms {self.taper_bound_rms} must be a finite number >= 0 (0: off)")
        if self.taper_bound and self.taper_bound_rms:
            raise ValueError("--taper-bound (one B for every feature) and --taper-bound-rms (a B per feature) are "
                             "two forms of the same bound; pass one of the two")
        if self.taper_bound_scope not in BOUND_SCOPES:
            raise ValueError(f"--taper-bound-scope {self.taper_bound_scope!r} is not one of {', '.join(BOUND_SCOPES)}")
        if (self.taper_bound or self.taper_bound_rms) and self.keep_mlp_norms and self.taper_bound_scope == "mlp":
            raise ValueError("--taper-bound / --taper-bound-rms bound the MLP-input norms' taper, --keep-mlp-norms keeps them as norms; "
                             "pass one of the two")
        if not (self.rms_hinge == 0 or self.rms_hinge >= 1):
            raise ValueError(f"--rms-hinge {self.rms_hinge} must be 0 (symmetric) or >= 1 (a factor over 1 / c)")
        T, W, t0, t1 = self.resolved_steps()
        if self.taper_hold > t1 - t0:
            raise ValueError(f"--taper-hold {self.taper_hold} is longer than the taper span {t1 - t0}")
        if not (T >= 2 and 0 <= W < T and 1 <= t0 <= t1 <= T and t0 < T):
            raise ValueError(f"schedule total {T}, warmup {W}, taper {t0}..{t1} is not valid: need 0 <= warmup < total, "
                             "1 <= taper start <= taper end <= total and taper start < total")
        return self

    def to_dict(self) -> dict:
        """JSON-ready dict."""
        return dataclasses.asdict(self)


_HELP = {
    "out_dir": "output directory (model/ is the tapered HF model, summary.json the before/after evaluation)",
    "mode": "internal: every norm inside the blocks tapers, the final norm stays; all: the final norm too; "
            "baseline: no tapering (the same fine-tuning without it, for comparison; saved as a plain HF model)",
    "schedule": "the paper's GPT-2 fine-tuning schedule (Table 3): " + "; ".join(
        f"{k}: {v[0]} steps, warmup {v[1]}, taper {v[2]}..{v[3]}" for k, v in SCHEDULES.items()),
    "steps": "optimizer steps (overrides the schedule's)",
    "warmup_steps": "LR warmup steps (default: the schedule's, else 5%% of the steps)",
    "taper_start": "step where c is calibrated and the cosine taper starts (default: end of warmup)",
    "taper_end": "step from which the gate is exactly 0 (default: the schedule's, else --taper-end-frac of the run)",
    "taper_end_frac": "without --taper-end or a schedule, the taper ends at this fraction of the steps (1: the last "
                      "step) and the rest trains at gate 0",
    "corpus": "builtin | a.txt,b.txt | a directory | hf:NAME[:SPLIT]",
    "max_docs": "use at most this many documents",
    "max_chars": "truncate the corpus to this many characters",
    "val_frac": "fraction of the token stream held out for evaluation",
    "seq_len": "tokens per training sequence and per evaluation chunk",
    "batch_size": "global batch in sequences (split over torchrun processes)",
    "lr": "peak learning rate (AdamW; linear warmup, cosine decay)",
    "scale_loss": "fixed-target scale loss on the pre-logit residual",
    "scale_lambda": "weight of the scale loss",
    "scale_form": "scale-loss form: relative, lambda (s/s_tgt - 1)^2 (default, as `tapernorm train`), or the paper's "
                  "lambda (s - s_tgt)^2",
    "beta_ema": "new-sample weight of the calibration and scale-target EMAs",
    "weight_decay": "AdamW weight decay",
    "grad_clip": "gradient-norm clipping threshold",
    "eval_batches": "evaluation batches of held-out chunks, before and after",
    "seed": "seed of data order and initialization",
    "bf16": "bf16 mixed precision",
    "overwrite": "replace a previous fine-tuning's output (its model/, summary.json, log_history.json; other files "
                 "in OUT are kept; a model/ that finetune did not write is refused)",
    "calib_skip": "leave each sequence's first N positions (attention sinks) out of c's calibration",
    "calib_stat": "c's statistic: ls (least squares, the paper's; extreme tokens dominate it) or inv_rms (mean of "
                  "1 / RMS over tokens; robust to sink tokens)",
    "calib_per_feature": "fit a least-squares scale per feature at calibration, folded into gamma_t",
    "calib_pos0": "calibrate a separate scale c0 for position 0 (the attention sink); the folded graph keeps one "
                  "per-token Mul per norm, 1 at every position but 0",
    "rms_loss": "lambda of the loss pulling every tapered norm's input RMS per token toward 1 / c (0: off)",
    "rms_hinge": "make the RMS loss one-sided: only tokens whose input RMS exceeds H times the calibrated scale pay "
                 "(0: symmetric)",
    "taper_bound": "taper the norms of --taper-bound-scope to the bounded map B tanh(x c / B) gamma_t instead of the "
                   "linear x c gamma_t, so their output stays bounded at gate 0 (two elementwise ops per norm in the "
                   "compiled graph; 0: off)",
    "taper_bound_rms": "like --taper-bound, with a bound per feature: K times the feature's RMS of x c over the "
                       "calibration tokens, so ordinary values stay linear and only outliers are squashed (e.g. 4; "
                       "0: off)",
    "taper_bound_scope": "which tapered norms --taper-bound / --taper-bound-rms bounds: all, or mlp (only the norm "
                         "in front of each block's MLP, whose gated output grows with the square of its input; on "
                         "SmolLM2 that left the attention inputs unbounded and spiking at gate 0)",
    "keep_norms": "regular expression of norm module names to leave untapered (they stay norms in the compiled "
                  "graph), e.g. 'layers\\.(9|19|29)\\.post_attention'",
    "keep_mlp_norms": "also leave the norm in front of each block's MLP untapered (a gated MLP's output grows with "
                      "the square of its input at gate 0): only the attention side tapers",
    "recipe": "remedies for real checkpoints, filling the flags not given: auto (measure the checkpoint's attention "
              "sinks first: sink-attn when some token's norm input is over 20x the median, else paper), paper (none), "
              "sink (--calib-pos0, --calib-stat inv_rms, --calib-skip 1, --calib-per-feature, --rms-loss 30, "
              "--rms-hinge 1.5, --taper-cap 2, --lr-schedule constant) or sink-attn (the same with --keep-mlp-norms, "
              "--lr-schedule cosine and --taper-end-frac 0.667); see docs/real_checkpoints.md",
    "lr_schedule": "learning-rate decay after the warmup: cosine (to 0 at the last step) or constant",
    "cap_anneal": "let the taper cap grow as K / gate, so it fades into gate 0 instead of vanishing there",
    "taper_cap": "while 0 < gate < 1, cap each token's fixed-map branch at K times its calibrated size (training "
                 "only: gate 0 has no cap; the log line says how often it acted; 0: off)",
    "taper_order": "global: one gate (the paper); first / last: blocks taper one after another from the first / "
                   "last block (each over 30%% of the taper span)",
    "taper_hold": "steps the gate stays 1 after calibration (the RMS loss already acts) before tapering",
}


def add_cli(subparsers) -> None:
    """Register `tapernorm finetune`."""
    p = subparsers.add_parser(
        "finetune", formatter_class=DefaultsFormatter,
        help="fine-tune a Hugging Face causal LM with tapering (HF Trainer; torchrun for DDP)",
        description="Taperize an HF causal LM, fine-tune it with HF's Trainer: the gate is held at 1 through warmup, "
                    "c is calibrated at the taper start, the gate decays by cosine to exactly 0 and stays there. "
                    "Writes OUT/model (reload with tapernorm.from_pretrained, compile with tapernorm compile) and "
                    "OUT/summary.json (held-out loss before and after). By default (--recipe auto) the checkpoint's "
                    "attention sinks are measured first, and a checkpoint with sinks gets the attention-side taper "
                    "(sink-attn); thousands of steps on a real checkpoint, not hundreds (docs/real_checkpoints.md).")
    p.add_argument("model", metavar="MODEL", help="HF model directory or hub name")
    hints = typing.get_type_hints(FinetuneConfig)
    for f in dataclasses.fields(FinetuneConfig):
        if f.name == "model":
            continue
        flag = "--out" if f.name == "out_dir" else "--" + f.name.replace("_", "-")
        help_ = _HELP[f.name] + (f" (default: {BASE[f.name]}, or the recipe's)" if f.name in BASE else "")
        kw = dict(dest=f.name, help=help_, default=f.default)
        base = next(a for a in (typing.get_args(hints[f.name]) or (hints[f.name],)) if a is not type(None))
        if base is bool:
            p.add_argument(flag, action=argparse.BooleanOptionalAction, **kw)
        elif f.name in ("mode", "schedule", "scale_form", "calib_stat", "taper_order", "lr_schedule", "recipe",
                        "taper_bound_scope"):
            choices = {"mode": MODES, "schedule": sorted(SCHEDULES), "scale_form": SCALE_FORMS, "recipe": (AUTO, *RECIPES),
                       "taper_bound_scope": BOUND_SCOPES,
                       "calib_stat": ("ls", "inv_rms"), "taper_order": ("global", "first", "last"),
                       "lr_schedule": tuple(LR_SCHEDULES)}[f.name]
            p.add_argument(flag, choices=choices, **kw)
        else:
            p.add_argument(flag, type=base, metavar=f.name.upper(), **kw)
    p.add_argument("--debug", action="store_true", help="show tracebacks instead of one-line errors")
    p.set_defaults(func=_cmd_finetune)


def config_from_args(args: argparse.Namespace) -> FinetuneConfig:
    """FinetuneConfig from parsed flags."""
    return FinetuneConfig(**{f.name: getattr(args, f.name) for f in dataclasses.fields(FinetuneConfig)})


def _cmd_finetune(args) -> int:
    from .finetune import finetune  # loaded on use: building the parser imports no torch
    res = finetune(config_from_args(args))
    if int(os.environ.get("RANK", 0)) == 0:
        print(json.dumps({k: res[k] for k in ("val_loss_before", "val_loss_after", "final_gate", "steps",
                                              "model_dir", "seconds")}))
    return 0
