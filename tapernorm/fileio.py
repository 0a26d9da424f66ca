"""Atomic file and directory writes: a reader sees the old file or the new one, never half of one."""
from __future__ import annotations

import contextlib
import os
import shutil
import tempfile
from pathlib import Path

__all__ = ["atomic_write_bytes", "atomic_write_text", "replace_dir", "staged_dir", "umask_mode"]


def umask_mode(path: str | os.PathLike, is_dir: bool = False) -> None:
    """mkstemp/mkdtemp create 0600/0700 entries; give `path` the usual 0666/0777 & ~umask."""
    mask = os.umask(0)
    os.umask(mask)
    os.chmod(path, (0o777 if is_dir else 0o666) & ~mask)


def atomic_write_bytes(path: str | os.PathLike, data: bytes) -> Path:
    """Write `data` to a temp file beside `path`, then rename it over `path`."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        with os.fdopen(fd, "wb") as f:
            f.write(data)
        umask_mode(tmp)
        os.replace(tmp, path)
    except BaseException:
        if os.path.exists(tmp):
            os.unlink(tmp)
        raise
    return path


def atomic_write_text(path: str | os.PathLike, text: str) -> Path:
    """atomic_write_bytes for UTF-8 text."""
    return atomic_write_bytes(path, text.encode("utf-8"))


def replace_dir(tmp: str | os.PathLike, out: str | os.PathLike) -> None:
    """Swap a finished `tmp` directory into place: out -> backup, tmp -> out, remove the backup."""
    tmp, out = Path(tmp), Path(out)
    backup = None
    if out.exists():
        backup = out.with_name(f".{out.name}.old-{os.getpid()}")
        os.replace(out, backup)
    os.replace(tmp, out)
    if backup is not None:
        shutil.rmtree(backup, ignore_errors=True)


@contextlib.contextmanager
def staged_dir(out: str | os.PathLike, tag: str = "tmp"):
    """Yield a fresh temp dir beside `out` to build into; on success it replaces `out` in one rename,
    on any error it is removed and `out` is left as it was."""
    out = Path(out)
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{out.name}.{tag}-", dir=out.parent))
    try:
        yield tmp
        umask_mode(tmp, is_dir=True)
        replace_dir(tmp, out)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
