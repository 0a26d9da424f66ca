"""`tapernorm train`, `tapernorm eval`, `tapernorm plot`: argparse front-ends of the trainer and the plot.

Every TrainConfig field is a flag (`--scale-lambda 0.1`, `--no-scale-loss`, ...); unset flags keep the
TrainConfig defaults, so `tapernorm train` alone runs the short tiny-preset default on the builtin corpus.
"""
from __future__ import annotations

import argparse
import dataclasses
import json
import os
import typing
from pathlib import Path

from tapernorm.model_config import PRESETS

from .config import MODES, SCALE_FORMS, TrainConfig

__all__ = ["add_cli", "config_from_args", "DefaultsFormatter"]


class DefaultsFormatter(argparse.HelpFormatter):
    """Appends "(default: X)" to a flag's help once: not when the help already says its default, nor for
    defaults not worth saying (None, off switches, empty lists). argparse's ArgumentDefaultsHelpFormatter
    printed "(default: the schedule's) (default: None)"."""

    def _get_help_string(self, action):
        h = action.help or ""
        d = action.default
        if ("default" in h or not action.option_strings or d is None or d is False or d is argparse.SUPPRESS
                or (isinstance(d, list) and not d)):
            return h
        return (h + " " if h else "") + "(default: %(default)s)"

# one line per TrainConfig field; a test checks that every field has one
_HELP = {
    "out_dir": "run directory (log.jsonl, checkpoint/, model/, summary.json)",
    "preset": "model size preset",
    "mode": "which norms taper: baseline (none), internal (every norm inside the blocks; the final norm stays), "
            "all (the final norm too: a fully norm-free model); internal-taper / all-taper are aliases",
    "scale_loss": "fixed-target scale loss on the pre-logit residual (default: on when tapering, off for baseline)",
    "scale_lambda": "weight lambda of the scale loss",
    "scale_form": "scale-loss form: paper = lambda (s - s_tgt)^2 (Eq. 5), relative = lambda (s / s_tgt - 1)^2 (unit-free)",
    "dim": "model width (overrides the preset)",
    "n_layers": "number of blocks (overrides the preset)",
    "n_heads": "attention heads; must divide --dim (overrides the preset)",
    "corpus": "builtin (Python's pydoc topics) | a.txt,b.txt | hf:NAME[:SPLIT] (e.g. hf:roneneldan/TinyStories)",
    "max_docs": "use at most this many documents of the corpus (default: all)",
    "max_chars": "truncate each document to this many characters (default: no limit)",
    "vocab_size": "SentencePiece vocabulary size (also the model's)",
    "tokenizer": "reuse this SentencePiece tokenizer.model instead of training one (default: train one)",
    "val_frac": "fraction of the token stream held out for validation",
    "seq_len": "training sequence length in tokens",
    "batch_size": "global batch size in sequences (split over torchrun processes)",
    "steps": "optimizer steps",
    "lr": "peak learning rate (AdamW; linear warmup, then cosine to zero)",
    "warmup_frac": "fraction of the steps spent in LR warmup (also the calibration window)",
    "warmup_steps": "LR warmup steps (overrides --warmup-frac)",
    "taper_start": "first step of the cosine taper, where c is calibrated (default: end of LR warmup)",
    "taper_end": "step from which the gate is exactly 0 (default: the last step)",
    "beta_ema": "new-sample weight of the calibration and scale-target EMAs",
    "weight_decay": "AdamW weight decay",
    "betas": "AdamW betas",
    "grad_clip": "gradient-norm clipping threshold",
    "bf16": "bf16 autocast",
    "seed": "seed of initialization and data order",
    "device": "where to train",
    "eval_every": "validate every N steps (0 = only at the start and the end)",
    "eval_batches": "batches per periodic validation",
    "ckpt_every": "write RUN/checkpoint every N steps (0 = only at the end)",
    "stop_after": "stop with a checkpoint after this many steps; continue with --resume (default: run all steps)",
    "resume": "continue RUN/checkpoint exactly (same next loss as an uninterrupted run)",
    "overwrite": "replace an existing run directory",
    "progress": "progress: a bar when stderr is a terminal, else a flushed line every 5%% of the steps",
}
_SHORT = {"out_dir": "--out"}


def _flag(name: str) -> str:
    return _SHORT.get(name, "--" + name.replace("_", "-"))


def _choices(name: str):
    """The values a flag accepts, where the set is closed."""
    return {"mode": sorted(MODES), "preset": list(PRESETS), "device": ["auto", "cpu", "cuda"],
            "scale_form": list(SCALE_FORMS)}.get(name)


def _add_train_flags(p: argparse.ArgumentParser) -> None:
    hints = typing.get_type_hints(TrainConfig)
    for f in dataclasses.fields(TrainConfig):
        t, h = hints[f.name], _HELP[f.name]
        shown = " ".join(map(str, f.default)) if isinstance(f.default, tuple) else f.default
        default_txt = f" (default: {shown})" if f.default is not None and "(default" not in h else ""
        kw = dict(dest=f.name, default=None, help=h + default_txt)
        args = typing.get_args(t)
        if t is bool or (bool in args and f.name in ("scale_loss",)):
            p.add_argument(_flag(f.name), action=argparse.BooleanOptionalAction, **kw)
        elif f.name == "betas":
            p.add_argument(_flag(f.name), type=float, nargs=2, metavar=("B1", "B2"), **kw)
        elif _choices(f.name):
            p.add_argument(_flag(f.name), choices=_choices(f.name), **kw)
        else:
            base = next((a for a in (args or (t,)) if a is not type(None)), str)
            p.add_argument(_flag(f.name), type=base, metavar=f.name.upper(), **kw)


def config_from_args(args: argparse.Namespace):
    """TrainConfig from parsed flags; unset flags keep the defaults, or with --resume the resumed run's settings."""
    names = {f.name for f in dataclasses.fields(TrainConfig)}
    given = {k: getattr(args, k) for k in names if getattr(args, k, None) is not None}
    base = {}
    if given.get("resume"):
        from tapernorm.fileio import recovery_candidate  # torch-free
        ckpt = Path(given.get("out_dir", TrainConfig.out_dir)) / "checkpoint"
        saved = (recovery_candidate(ckpt) or ckpt) / "trainer_state.json"  # a killed swap is repaired by train()
        if saved.is_file():  # a missing file is reported by train() itself
            try:
                base = {k: v for k, v in {"scale_form": "paper", **json.loads(saved.read_text())["train_config"]}.items()
                        if k in names and k not in ("stop_after", "overwrite", "progress")}  # pre-scale_form runs: paper
            except (json.JSONDecodeError, KeyError, TypeError) as e:
                raise ValueError(f"{saved}: unreadable trainer state ({e}); the run cannot be "
                                 "resumed: start over with --overwrite or use a new --out") from None
    return TrainConfig(**{**base, **given})


def _cmd_train(args) -> int:
    from .trainer import train  # loaded on use: building the parser imports no torch
    res = train(config_from_args(args))
    if int(os.environ.get("RANK", 0)) != 0:
        return 0
    if res.steps and res.val_loss == res.val_loss:  # not stopped early
        init = f" (from {res.initial_val_loss:.4f})" if res.initial_val_loss is not None else ""
        print(f"val_loss {res.val_loss:.4f}{init} gate {res.final_gate} steps {res.steps} "
              f"in {res.seconds:.1f}s -> {res.model_dir}")
    else:
        print(f"stopped after {res.steps} steps; checkpoint {res.model_dir} (continue with --resume)")
    return 0


def _cmd_eval(args) -> int:
    for flag, v in (("--batches", args.batches), ("--batch-size", args.batch_size)):
        if v is not None and v < 1:
            raise ValueError(f"{flag} {v} must be >= 1")
    from .trainer import evaluate_checkpoint  # loaded on use
    r = evaluate_checkpoint(args.dir, corpus=args.corpus, batches=args.batches, batch_size=args.batch_size)
    where = ("the full held-out split, as train's summary.json" if r["full_split"] else
             f"the first {args.batches} validation batches; train's summary.json uses the full split (drop --batches)")
    print(json.dumps(r) if args.json else f"val_loss {r['val_loss']:.4f} on {r['tokens']} tokens, {where} "
                                          f"(gate {r['gate']}, mode {r['mode']}) {r['dir']}")
    return 0


def _cmd_plot(args) -> int:
    from .plot import plot_run  # loaded on use
    print(plot_run(args.run_dir, args.out))
    return 0


def add_cli(subparsers) -> None:
    """Register train, eval and plot."""
    p = subparsers.add_parser(
        "train", help="train a model with tapered normalization",
        description="Train a decoder with TaperNorm: the gate is held at 1 through LR warmup, c is calibrated at "
                    "the taper start, then the gate decays by cosine to exactly 0. Runs in one process, or under "
                    "torchrun for DDP. `tapernorm train` alone runs a ~1-minute tiny model on the builtin corpus.")
    _add_train_flags(p)
    p.add_argument("--debug", action="store_true", help="show tracebacks instead of one-line errors")
    p.set_defaults(func=_cmd_train)

    e = subparsers.add_parser("eval", help="validation loss of a trained model (gate as trained)",
                              formatter_class=DefaultsFormatter,
                              description="Mean validation cross-entropy of a trained model on its run's held-out "
                                          "split (the gate stays as trained).")
    e.add_argument("dir", help="a run directory or a model/checkpoint directory")
    e.add_argument("--corpus", default=None, help="corpus spec instead of the one the run trained on")
    e.add_argument("--batches", type=int, default=None,
                   help="evaluate only this many validation batches (default: the whole held-out split, like "
                        "train's summary.json)")
    e.add_argument("--batch-size", type=int, default=16, help="sequences per validation batch")
    e.add_argument("--json", action="store_true", help="print one JSON object")
    e.add_argument("--debug", action="store_true", help="show tracebacks instead of one-line errors")
    e.set_defaults(func=_cmd_eval)

    q = subparsers.add_parser("plot", help="plot loss, gate/LR and logit-norm curves of a run to PNG",
                              formatter_class=DefaultsFormatter,
                              description="Plot a run's log.jsonl: losses, the gate and LR schedule, and the logit "
                                          "norm with the pre-logit RMS, each on its own axis (needs matplotlib).")
    q.add_argument("run_dir", metavar="RUN", help="the --out directory of a `tapernorm train` run")
    q.add_argument("--out", default=None, help="PNG path (default: RUN/curves.png)")
    q.add_argument("--debug", action="store_true", help="show tracebacks instead of one-line errors")
    q.set_defaults(func=_cmd_plot)
