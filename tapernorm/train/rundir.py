"""The run directory's safety: one process at a time, recovery after a kill, checks whose advice works,
and the one-line report of a diverged step.

    lock        `.RUN.lock` beside RUN (tapernorm.fileio.dir_lock), held by `train` for the whole run;
                a second `tapernorm train` on RUN fails at once with the holder's PID
    recovery    a kill during a checkpoint swap leaves RUN/checkpoint (or RUN/model) complete plus stale
                staging dirs; `recover_run` (under the lock) removes those, and restores the directory
                where a kill in the middle of the no-exchange fallback swap left it missing
"""
from __future__ import annotations

import os
import re
import sys
from pathlib import Path

from ..fileio import recover_dir, remove_dir

__all__ = ["prepare_run_dir", "clear_run_dir", "recover_run", "divergence_message", "LATE_TAPER_GATE",
           "foreign_entries", "RUN_FILES", "RUN_DIRS", "TrainingDiverged"]

RUN_FILES = ("log.jsonl", "summary.json", "curves.png", "tokenizer.model")
RUN_DIRS = ("checkpoint", "model")
# temp files of atomic_write_bytes (.NAME.XXXX.tmp), the log rewrite (.log.jsonl.tmp-PID), the plot
_STALE_FILE = re.compile(r"^\.(log\.jsonl|summary\.json|tokenizer\.model|curves)\.[^/]*tmp[^/]*$")


class TrainingDiverged(RuntimeError):
    """A step produced a non-finite loss or gradient; nothing of that step was applied or written."""


def recover_outputs(out: Path, dirs: tuple[str, ...], stale: re.Pattern, who: str) -> list[str]:
    """Undo what a killed `who` (train, finetune) left in OUT (call it holding OUT's lock): swaps of `dirs` cut
    short (fileio.recover_dir; one line when a directory had to be restored) and temp files matching `stale`.
    Returns the actions taken."""
    if not out.is_dir():
        return []
    done = []
    for name in dirs:
        acts = recover_dir(out / name)
        done += acts
        for a in acts:
            if a.startswith("restored"):
                print(f"tapernorm {who}: {a} (a previous process was killed while saving it)", file=sys.stderr)
    for name in os.listdir(out):
        if stale.match(name):
            (out / name).unlink(missing_ok=True)
            done.append(f"removed {name}")
    return done


def recover_run(run: Path) -> list[str]:
    """Undo what a killed run left in RUN (call it holding the run lock). Returns the actions taken."""
    return recover_outputs(run, RUN_DIRS, _STALE_FILE, "train")


def _resumable(run: Path) -> bool:
    return (run / "checkpoint" / "trainer_state.json").is_file()


def _our_model_dir(d: Path) -> bool:
    """A checkpoint/ or model/ that `tapernorm train` wrote (its config.json has the "tapernorm" section)."""
    import json
    try:
        return isinstance(json.loads((d / "config.json").read_text()).get("tapernorm"), dict)
    except (OSError, ValueError, AttributeError):
        return False


def _our_log(path: Path) -> bool:
    import json
    try:
        with open(path) as f:
            first = f.readline()
        return not first.strip() or isinstance(json.loads(first).get("kind"), str)
    except (OSError, ValueError, AttributeError):
        return False


def foreign_entries(run: Path) -> list[str]:
    """The entries --overwrite would delete that `tapernorm train` did not write: every RUN_FILES / RUN_DIRS name
    in a directory that is not a run (no log.jsonl of ours, no checkpoint/ or model/ of ours), and in a run any
    checkpoint/ or model/ whose config.json is not ours."""
    present = [n for n in (*RUN_FILES, *RUN_DIRS) if os.path.lexists(run / n)]
    is_run = (run / "log.jsonl").is_file() and _our_log(run / "log.jsonl") or any(
        _our_model_dir(run / d) for d in RUN_DIRS)
    if not is_run:
        return present
    return [d for d in RUN_DIRS if os.path.lexists(run / d) and not _our_model_dir(run / d)]


def prepare_run_dir(run: Path, resume: bool, overwrite: bool, ckpt_every: int) -> None:
    """Refuse a run directory that does not fit the flags, with advice that works when followed."""
    if run.exists() and not run.is_dir():
        raise NotADirectoryError(f"--out {run} is a file, not a run directory; pass a directory path")
    if resume:
        if not run.is_dir():
            raise FileNotFoundError(f"--resume: run directory {run} does not exist; start the run without --resume")
        if not _resumable(run):
            every = (f"it writes its first checkpoint after --ckpt-every {ckpt_every} steps"
                     if ckpt_every > 0 else "with --ckpt-every 0 it writes one only at the end")
            raise FileNotFoundError(f"--resume: {run} has no checkpoint to resume (the run stopped before its first "
                                    f"one; {every}); start it over with --overwrite instead of --resume")
    elif run.is_dir() and any(run.iterdir()):
        foreign = foreign_entries(run)
        if foreign:  # --overwrite only ever removes what tapernorm wrote
            raise FileExistsError(f"{run} is not a tapernorm run directory ({run / foreign[0]} was not written by "
                                  f"`tapernorm train`), so {'--overwrite would delete it' if overwrite else 'it is refused'}"
                                  "; pass a new --out, or move those files away")
        if overwrite:
            return
        if _resumable(run):
            raise FileExistsError(f"run directory {run} already exists; pass --resume to continue it, --overwrite to "
                                  "start over, or a new --out")
        raise FileExistsError(f"run directory {run} already exists (with no checkpoint to resume); pass --overwrite "
                              "to start over, or a new --out")


def clear_run_dir(run: Path, overwrite: bool) -> None:
    """Create RUN; with overwrite, remove the files a previous run left there (only ours)."""
    run.mkdir(parents=True, exist_ok=True)
    if overwrite:
        for name in RUN_FILES:
            (run / name).unlink(missing_ok=True)
        for name in RUN_DIRS:
            remove_dir(run / name)


LATE_TAPER_GATE = 0.5  # below it a divergence is the taper's doing rather than the learning rate's


def divergence_message(step: int, loss: float, grad_norm: float, lr: float, gate: float | None,
                       taper: tuple[int, int] | None, bf16: bool, ckpt: Path, kept: str | None = None,
                       late_taper_hint: str | None = None) -> str:
    """One line: the step, what went non-finite (at which gate), the likely cause and fix, and what was kept
    (`kept` replaces the checkpoint phrase, for commands without one). `late_taper_hint`: the command's own advice
    for a divergence late in a long taper (gate below 0.5), where the model, not the learning rate, is the cause."""
    what = f"loss {loss}" if loss != loss or abs(loss) == float("inf") else f"gradient norm {grad_norm}"
    what += f" at gate {gate:g}" if gate is not None else ""
    if lr >= 1.0:  # no schedule makes a step this large stable
        cause = f"the learning rate {lr:g} is far too high: lower --lr"
    elif bf16:
        cause = "bf16 overflow is likely: train without --bf16, or lower --lr"
    elif taper is not None and gate is not None and gate < 1.0 and taper[1] - taper[0] < 20:
        cause = (f"the gate fell from 1 to {gate:g} over a {taper[1] - taper[0]}-step taper (steps {taper[0]}-"
                 f"{taper[1]}), too abrupt for this model: use more --steps, a later --taper-end, or a lower --lr")
    elif late_taper_hint and gate is not None and gate < LATE_TAPER_GATE:
        cause = f"the model is not stable this far into the taper: {late_taper_hint}"
    else:
        cause = f"the learning rate {lr:g} is likely too high for this model: lower --lr or raise --warmup-steps"
    kept = kept or (f"{ckpt} (the state after {_ckpt_step(ckpt)} steps) is kept"
                    if (ckpt / "trainer_state.json").is_file() else "no checkpoint had been written yet")
    return (f"training diverged at step {step}: {what} ({cause}); nothing non-finite was written, {kept}; "
            "start over with that change and --overwrite")


def _ckpt_step(ckpt: Path) -> str:
    import json
    try:
        return str(json.loads((ckpt / "trainer_state.json").read_text())["step"])
    except (OSError, ValueError, KeyError, TypeError):
        return "?"
