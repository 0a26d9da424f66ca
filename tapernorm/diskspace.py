"""Disk full, said in one line: `DiskFullError` names the file being written and the space it needs.

    is_disk_full(e)          ENOSPC / EDQUOT, raised as OSError or wrapped by a library (safetensors: 'os error 28')
    disk_full_error(...)     the one-line error (call it after removing the partial output: the free space is real)
    ensure_space(out, need)  refuse before writing when the filesystem has less than `need` free
    tensor_bytes(tensors)    what a safetensors file of them takes

Used by tapernorm.fileio's writers (atomic writes, save_safetensors, staged_dir) and the train step log.
"""
from __future__ import annotations

import contextlib
import errno
import os
import shutil
from pathlib import Path

__all__ = ["DiskFullError", "is_disk_full", "disk_full_error", "ensure_space", "tensor_bytes", "tree_size"]


class DiskFullError(OSError):
    """No space left (ENOSPC / EDQUOT) while writing a file; the message names the file and the space needed."""

    def __init__(self, msg: str, path: Path | None = None, need: int | None = None):
        super().__init__(msg)
        self.errno, self.path, self.need = errno.ENOSPC, path, need


def is_disk_full(e: BaseException) -> bool:
    """True for ENOSPC / EDQUOT, raised as OSError or wrapped by a library (safetensors: 'os error 28')."""
    if isinstance(e, DiskFullError):
        return True
    if isinstance(e, OSError) and e.errno in (errno.ENOSPC, errno.EDQUOT):
        return True
    msg = str(e)
    return f"os error {errno.ENOSPC}" in msg or "No space left on device" in msg or "Disk quota exceeded" in msg


def _human(n: int | float) -> str:
    for unit in ("B", "KB", "MB", "GB"):
        if abs(n) < 1024 or unit == "GB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.1f} {unit}"
        n /= 1024
    return f"{n:.1f} GB"


def _free(where: Path) -> int:
    for p in (where, *where.parents):
        with contextlib.suppress(OSError):
            return shutil.disk_usage(p).free
    return 0


def tree_size(p: Path) -> int:
    if p.is_file():
        return p.stat().st_size
    total = 0
    for root, _, files in os.walk(p):
        for f in files:
            with contextlib.suppress(OSError):
                total += os.lstat(os.path.join(root, f)).st_size
    return total


def disk_full_error(path: Path, need: int | None, kept: str, lower_bound: bool = False) -> DiskFullError:
    """The one-line DiskFullError for `path` (`need`: bytes the write takes, if known, or with `lower_bound` the
    bytes written before the disk filled; `kept`: what was left as it was). Call it after removing the partial
    output, so the free space it reports is real."""
    free = _free(path.parent)
    if need and lower_bound:
        room = (f"it needs more than the {_human(need)} written before the disk filled, {_human(free)} free on that "
                f"filesystem; free at least {_human(max(need - free, 0) + need)} and retry")
    elif need:
        short = max(need - free, 0)
        room = (f"it needs {_human(need)}, {_human(free)} free on that filesystem; free at least "
                f"{_human(short or need)} and retry")
    else:
        room = f"{_human(free)} free on that filesystem; free some space and retry"
    return DiskFullError(f"no space left on device writing {path} ({room}); {kept}", path, need)


def tensor_bytes(tensors) -> int:
    """Bytes a safetensors file of `tensors` (a dict or an iterable of tensors) takes, tied storage counted once."""
    vals = tensors.values() if isinstance(tensors, dict) else tensors
    seen = {(t.data_ptr(), tuple(t.shape), t.dtype): t for t in vals}
    return sum(t.numel() * t.element_size() for t in seen.values()) + 100 * len(seen) + 8


def ensure_space(out: str | os.PathLike, need: int, kept: str = "nothing was written") -> None:
    """Refuse before writing when the filesystem that will hold `out` has less than `need` bytes (+1%, 64 KB)
    free: the same one-line DiskFullError a write that runs out would give, with the exact need."""
    out = Path(out)
    free = _free(out.parent)
    if free and free < need * 1.01 + (64 << 10):
        raise disk_full_error(out, int(need * 1.01 + (64 << 10)), kept)
