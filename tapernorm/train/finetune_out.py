"""What `tapernorm finetune` writes into OUT, and how it stays safe: the --overwrite policy, the recovery of a killed
run's leftovers, strict summary JSON, and the baseline model's save (tapernorm/train/finetune.py runs the training).

    OUT/model/            tapernorm.save_pretrained (tapered) or transformers' save_pretrained (baseline), swapped in
    OUT/summary.json      strict JSON: a non-finite value is null, its path listed under "null_reasons"
    OUT/log_history.json  the Trainer's logs
--overwrite replaces only these (other files in OUT are kept), and only when OUT/summary.json is a fine-tuning's.
"""
from __future__ import annotations

import json
import math
import os
import re
import shutil
from pathlib import Path

import torch

from ..checkpoint import CheckpointError
from .rundir import recover_outputs

__all__ = ["OUT_FILES", "prepare_out", "recover_out", "json_text", "save_plain"]


OUT_FILES = ("summary.json", "log_history.json")  # with model/: everything finetune writes into OUT
_STALE = re.compile(r"^\.(summary\.json|log_history\.json)\.[^/]*\.tmp$")  # atomic_write_text's temp files


def _our_summary(path: Path) -> bool:
    try:
        js = json.loads(path.read_text())
    except (OSError, ValueError):
        return False
    return isinstance(js, dict) and {"model_dir", "mode", "val_loss_before"} <= set(js)


def prepare_out(out: Path, overwrite: bool) -> None:
    """Refuse an --out that is a file, or not empty without --overwrite; --overwrite replaces only a previous
    fine-tuning's model/, summary.json and log_history.json (other files there are kept), never files that
    finetune did not write."""
    if out.exists() and not out.is_dir():
        raise NotADirectoryError(f"--out {out} is a file; pass a directory")
    if not out.is_dir() or not [n for n in os.listdir(out) if not n.startswith(".")]:
        return
    if not overwrite:
        raise FileExistsError(f"output directory {out} is not empty; pass --overwrite to replace a previous "
                              "fine-tuning there (its model/, summary.json and log_history.json; other files are kept) "
                              "or a new --out")
    ours = [n for n in ("model", *OUT_FILES) if os.path.lexists(out / n)]
    if ours and not _our_summary(out / "summary.json"):
        raise FileExistsError(f"{out / ours[0]} was not written by `tapernorm finetune` (there is no summary.json of "
                              "a fine-tuning beside it), so --overwrite would replace data of yours; move it away or "
                              "pass a new --out")


def recover_out(out: Path) -> list[str]:
    """Undo what a killed fine-tuning left in OUT (call it holding OUT's lock): a model/ swap cut short
    (fileio.recover_dir) and the temp files of summary.json / log_history.json."""
    return recover_outputs(out, ("model",), _STALE, "finetune")


def json_text(obj) -> str:
    """Strict JSON: a non-finite number becomes null, and its path goes under "null_reasons" (top-level dicts)
    with what it was, so the file is valid JSON that still says why a value is missing."""
    reasons: dict[str, str] = {}

    def clean(v, path):
        if isinstance(v, float) and not math.isfinite(v):
            reasons[path] = f"{v} (not a finite number)"
            return None
        if isinstance(v, dict):
            return {k: clean(x, f"{path}.{k}" if path else str(k)) for k, x in v.items()}
        if isinstance(v, (list, tuple)):
            return [clean(x, f"{path}[{i}]") for i, x in enumerate(v)]
        return v
    out = clean(obj, "")
    if reasons and isinstance(out, dict):
        out["null_reasons"] = reasons
    return json.dumps(out, indent=2, allow_nan=False) + "\n"


def save_plain(model, out: Path, tokenizer_from: str | None) -> None:
    """A baseline run's model: transformers' own save_pretrained (+ the source's tokenizer files), atomically;
    refuses non-finite weights."""
    from ..fileio import disk_full_error, ensure_space, is_disk_full, staged_dir, tensor_bytes
    from ..hf import TOKENIZER_FILES
    bad = next((k for k, v in model.state_dict().items() if v.is_floating_point() and not torch.isfinite(v).all()),
               None)
    if bad is not None:
        raise CheckpointError(f"refusing to write {out}: weight {bad!r} contains NaN or inf (training diverged)")
    ensure_space(out, tensor_bytes(model.state_dict()), f"{out} was left as it was")
    with staged_dir(out) as tmp:
        try:
            model.save_pretrained(str(tmp))
        except Exception as e:  # transformers' safetensors write: name the weights file and their size
            if not is_disk_full(e):
                raise
            raise disk_full_error(tmp / "model.safetensors", tensor_bytes(model.state_dict()),
                                  "nothing half-written was kept") from None
        for name in TOKENIZER_FILES if tokenizer_from else ():
            if (Path(tokenizer_from) / name).is_file():
                shutil.copyfile(Path(tokenizer_from) / name, tmp / name)
