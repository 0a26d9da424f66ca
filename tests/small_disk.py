"""A real, nearly full filesystem for disk-full tests: a tmpfs of a chosen size (Linux, root or CAP_SYS_ADMIN).

    with small_disk(tmp_path / "disk", "256k") as d: ...     pytest.skip() where mounting is not permitted

The tests that use it fill it the way a real disk fills: the kernel returns ENOSPC mid-write.
"""
from __future__ import annotations

import contextlib
import shutil
import subprocess
import sys
from pathlib import Path

import pytest


def can_mount() -> bool:
    """True where `mount -t tmpfs` works (checked once by mounting a 4 KB tmpfs)."""
    if not sys.platform.startswith("linux") or shutil.which("mount") is None:
        return False
    import tempfile
    d = tempfile.mkdtemp(prefix="tapernorm-mnt-")
    try:
        ok = subprocess.run(["mount", "-t", "tmpfs", "-o", "size=4k", "tmpfs", d], capture_output=True).returncode == 0
        if ok:
            subprocess.run(["umount", d], capture_output=True)
        return ok
    finally:
        shutil.rmtree(d, ignore_errors=True)


@contextlib.contextmanager
def small_disk(path: Path, size: str):
    """Mount a tmpfs of `size` (mount's syntax: 64k, 1m) at `path` for the block; skip the test if not permitted."""
    path.mkdir(parents=True, exist_ok=True)
    r = subprocess.run(["mount", "-t", "tmpfs", "-o", f"size={size}", "tmpfs", str(path)], capture_output=True,
                       text=True)
    if r.returncode != 0:
        pytest.skip(f"cannot mount a tmpfs here ({r.stderr.strip()[:100]})")
    try:
        yield path
    finally:
        subprocess.run(["umount", "-l", str(path)], capture_output=True)
