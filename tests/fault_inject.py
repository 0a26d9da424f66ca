"""Run a tapernorm command (or a fileio swap) and SIGKILL it at one chosen filesystem call.

    python tests/fault_inject.py SPEC -- tapernorm ARGS...     the real CLI, killed at SPEC
    python tests/fault_inject.py SPEC -- swap OUT CONTENT      staged_dir(OUT) writing CONTENT into a.txt, b.txt

SPEC = none (no hook; e.g. under `strace -e inject=SYSCALL:signal=KILL:when=N`), or
FN:SUBSTR:N[:after]: kill right before (or with `after`, right after) the Nth call of FN whose
path arguments contain SUBSTR. FN is one of rename, replace, symlink, exchange (tapernorm.fileio's
atomic swap), rmtree. The fault-injection tests use it to stop a process in each window of a
directory swap, the way `kill -9` or a power cut would, and then check what a later process finds.
"""
from __future__ import annotations

import os
import shutil
import signal
import sys


def _install(spec: str) -> None:
    if spec == "none":  # the kill comes from outside (strace -e inject=...:signal=KILL)
        return
    fn, substr, n, *when = spec.split(":")
    after, count = bool(when and when[0] == "after"), [0]
    from tapernorm import fileio

    def wrap(real):
        def hooked(*args, **kw):
            hit = any(substr in os.fspath(a) for a in args if isinstance(a, (str, bytes, os.PathLike)))
            if hit:
                count[0] += 1
            if hit and count[0] == int(n) and not after:
                os.kill(os.getpid(), signal.SIGKILL)
            out = real(*args, **kw)
            if hit and count[0] == int(n) and after:
                os.kill(os.getpid(), signal.SIGKILL)
            return out
        return hooked

    if fn in ("rename", "replace", "symlink"):
        setattr(os, fn, wrap(getattr(os, fn)))
    elif fn == "rmtree":
        shutil.rmtree = wrap(shutil.rmtree)
    elif fn == "exchange":
        fileio.exchange = wrap(fileio.exchange)
    else:
        raise SystemExit(f"unknown FN {fn!r}")


def main(argv: list[str]) -> int:
    spec, sep, *rest = argv
    assert sep == "--", "usage: fault_inject.py SPEC -- tapernorm ARGS | swap OUT CONTENT"
    _install(spec)
    if rest[0] == "swap":
        from pathlib import Path

        from tapernorm.fileio import staged_dir
        with staged_dir(rest[1]) as tmp:
            for name in ("a.txt", "b.txt"):
                (Path(tmp) / name).write_text(rest[2])
        return 0
    from tapernorm.compiler.cli import main as cli_main
    return cli_main(rest[1:])


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
