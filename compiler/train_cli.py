"""`tapernorm train`, `tapernorm eval`, `tapernorm plot`: argparse front-ends of compiler.train / compiler.plot.

Every TrainConfig field is a flag (`--scale-lambda 0.1`, `--no-scale-loss`, ...); unset flags keep the
TrainConfig defaults, so `tapernorm train` alone runs the short tiny-preset default on the builtin corpus.
"""
from __future__ import annotations

import argparse
import dataclasses
import json
import typing

__all__ = ["add_cli", "config_from_args"]

_HELP = {
    "out_dir": "run directory (log.jsonl, checkpoint/, model/)",
    "preset": "model preset: tiny, tiny-gpt2, w64, w128, w256, w512",
    "mode": "baseline | internal (Internal-Taper) | all (All-Taper)",
    "scale_loss": "fixed-target scale loss on the pre-logit residual (default: on when tapering)",
    "scale_lambda": "weight lambda of the scale loss",
    "corpus": "builtin | a.txt,b.txt | hf:NAME[:SPLIT] (e.g. hf:roneneldan/TinyStories)",
    "tokenizer": "reuse this SentencePiece tokenizer.model instead of training one",
    "batch_size": "global batch size (split over torchrun processes)",
    "taper_start": "first step of the cosine taper (default: end of LR warmup)",
    "taper_end": "step from which the gate is exactly 0 (default: the last step)",
    "stop_after": "stop with a checkpoint after this many steps (continue with --resume)",
    "resume": "continue RUN/checkpoint exactly (same next loss as an uninterrupted run)",
    "overwrite": "replace an existing run directory",
    "bf16": "bf16 autocast",
}
_SHORT = {"out_dir": "--out"}


def _flag(name: str) -> str:
    return _SHORT.get(name, "--" + name.replace("_", "-"))


def _add_train_flags(p: argparse.ArgumentParser) -> None:
    from .train import TrainConfig
    hints = typing.get_type_hints(TrainConfig)
    for f in dataclasses.fields(TrainConfig):
        t, h = hints[f.name], _HELP.get(f.name)
        default_txt = f" (default {f.default})" if h and f.default is not None else ""
        kw = dict(dest=f.name, default=None, help=(h + default_txt) if h else f"default {f.default}")
        args = typing.get_args(t)
        if t is bool or (bool in args and f.name in ("scale_loss",)):
            p.add_argument(_flag(f.name), action=argparse.BooleanOptionalAction, **kw)
        elif f.name == "betas":
            p.add_argument(_flag(f.name), type=float, nargs=2, metavar=("B1", "B2"), **kw)
        else:
            base = next((a for a in (args or (t,)) if a is not type(None)), str)
            p.add_argument(_flag(f.name), type=base, metavar=f.name.upper(), **kw)


def config_from_args(args: argparse.Namespace):
    """TrainConfig from parsed flags; unset flags keep the defaults, or with --resume the resumed run's settings."""
    from pathlib import Path

    from .train import TrainConfig
    names = {f.name for f in dataclasses.fields(TrainConfig)}
    given = {k: getattr(args, k) for k in names if getattr(args, k, None) is not None}
    base = {}
    if given.get("resume"):
        saved = Path(given.get("out_dir", TrainConfig.out_dir)) / "checkpoint" / "trainer_state.json"
        if saved.is_file():  # a missing file is reported by train() itself
            try:
                base = {k: v for k, v in json.loads(saved.read_text())["train_config"].items()
                        if k in names and k not in ("stop_after", "overwrite", "progress")}
            except (json.JSONDecodeError, KeyError, TypeError) as e:
                raise ValueError(f"{saved}: unreadable trainer state ({e}); the run cannot be "
                                 "resumed: start over with --overwrite or use a new --out") from None
    return TrainConfig(**{**base, **given})


def _cmd_train(args) -> int:
    from .train import train
    import os
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
    from .train import evaluate_checkpoint
    r = evaluate_checkpoint(args.dir, corpus=args.corpus, batches=args.batches, batch_size=args.batch_size)
    print(json.dumps(r) if args.json else f"val_loss {r['val_loss']:.4f} (gate {r['gate']}, mode {r['mode']}, "
                                          f"{r['tokens']} tokens) {r['dir']}")
    return 0


def _cmd_plot(args) -> int:
    from .plot import plot_run
    print(plot_run(args.run_dir, args.out))
    return 0


def add_cli(subparsers) -> None:
    """Register train, eval and plot."""
    p = subparsers.add_parser("train", help="train a model with tapered normalization",
                              description="Train with TaperNorm (single process, or under torchrun for DDP).")
    _add_train_flags(p)
    p.add_argument("--debug", action="store_true", help="show tracebacks")
    p.set_defaults(func=_cmd_train)

    e = subparsers.add_parser("eval", help="validation loss of a trained model (gate as trained)")
    e.add_argument("dir", help="a run directory or a model/checkpoint directory")
    e.add_argument("--corpus", default=None, help="override the training corpus spec")
    e.add_argument("--batches", type=int, default=8, help="validation batches (default 8)")
    e.add_argument("--batch-size", type=int, default=16)
    e.add_argument("--json", action="store_true", help="print one JSON object")
    e.add_argument("--debug", action="store_true")
    e.set_defaults(func=_cmd_eval)

    q = subparsers.add_parser("plot", help="plot loss, gate and logit-norm curves of a run to PNG")
    q.add_argument("run_dir")
    q.add_argument("--out", default=None, help="PNG path (default RUN/curves.png)")
    q.add_argument("--debug", action="store_true")
    q.set_defaults(func=_cmd_plot)
