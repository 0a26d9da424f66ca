"""Atomic file and directory writes, recovery from a kill at any instruction, and exclusive locks.

A reader sees the old file or directory or the new one, never half of one; whatever a SIGKILL leaves,
`recover_dir` (run holding the directory's lock) turns back into one complete directory.

Directory swap, `replace_dir(tmp, out)`:
  * Linux renameat2(RENAME_EXCHANGE) / macOS renamex_np(RENAME_SWAP): `tmp` and `out` trade places in one
    system call, then the old contents (now at `tmp`) are removed. Killed before the exchange, `out` is the
    old directory; after it, `out` is the new one and `tmp` a stale leftover.
  * where there is no exchange (other systems, a filesystem that refuses it, or TAPERNORM_NO_EXCHANGE=1):
    a versioned directory behind a symlink. The new contents become `.NAME.v-XXXX`, a link `.NAME.lnk-XXXX`
    to it is made, and one rename puts the link over `out`. The first swap of a plain directory moves it
    aside (`.NAME.old-XXXX`) before that rename; killed in between, the complete link is what recovery
    renames into place.
Leftovers recovery knows: `.NAME.tmp-*` / `.NAME.build-*` (staging), `.NAME.old-*`, `.NAME.lnk-*`, and
`.NAME.v-*` versions that `out` no longer points at.

Locks, `dir_lock(path)`: fcntl.flock on the sibling file `.NAME.lock`, holding the owner's PID and command;
the kernel drops it when the process dies, so a killed run never leaves a stale lock. The file is removed
on release (a waiter that opened the removed file notices the inode changed and retries). The lock file is
opened with O_NOFOLLOW and must be a plain file with one link: a symlink or hard link planted there is
refused (`LockFileError`), never truncated. The path is `canonical_out(path)`'s, so two spellings of one
directory (a symlinked parent, or `out` itself a symlink to a directory) take one lock.

Disk full: an ENOSPC (or EDQUOT) in `atomic_write_bytes`, `save_safetensors` or inside `staged_dir` becomes
`DiskFullError` (tapernorm/diskspace.py), one line naming the file being written and the free space it needs;
nothing half-written stays.
"""
from __future__ import annotations

import contextlib
import ctypes
import errno
import os
import re
import secrets
import shutil
import stat
import sys
import tempfile
import time
from pathlib import Path

from .diskspace import DiskFullError, disk_full_error, ensure_space, is_disk_full, tensor_bytes, tree_size

__all__ = ["atomic_write_bytes", "atomic_write_text", "replace_dir", "staged_dir", "umask_mode", "recover_dir",
           "remove_dir", "exchange", "dir_lock", "LockedError", "LockFileError", "STAGING_TAGS", "recovery_candidate",
           "canonical_out", "is_swap_pointer", "DiskFullError", "is_disk_full", "save_safetensors", "ensure_space",
           "tensor_bytes"]

STAGING_TAGS = ("tmp", "build", "old", "lnk", "v")  # .NAME.<tag>-XXXX siblings this module creates


def umask_mode(path: str | os.PathLike, is_dir: bool = False) -> None:
    """mkstemp/mkdtemp create 0600/0700 entries; give `path` the usual 0666/0777 & ~umask."""
    mask = os.umask(0)
    os.umask(mask)
    os.chmod(path, (0o777 if is_dir else 0o666) & ~mask)


def atomic_write_bytes(path: str | os.PathLike, data: bytes) -> Path:
    """Write `data` to a temp file beside `path`, then rename it over `path` (DiskFullError if the disk fills)."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        with os.fdopen(fd, "wb") as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())  # ENOSPC of a delayed-allocation filesystem shows here, not at close
        umask_mode(tmp)
        os.replace(tmp, path)
    except BaseException as e:
        if os.path.exists(tmp):
            os.unlink(tmp)
        if isinstance(e, OSError) and is_disk_full(e):
            kept = f"the previous {path.name} is kept" if path.exists() else "nothing was written"
            raise disk_full_error(path, len(data), kept) from None
        raise
    return path


def atomic_write_text(path: str | os.PathLike, text: str) -> Path:
    """atomic_write_bytes for UTF-8 text."""
    return atomic_write_bytes(path, text.encode("utf-8"))


def save_safetensors(tensors: dict, path: str | os.PathLike, metadata: dict | None = None) -> Path:
    """safetensors.torch.save_file, with a disk-full error as DiskFullError (the partial file removed)."""
    from safetensors.torch import save_file
    path = Path(path)
    try:
        save_file(tensors, str(path), metadata=metadata)
    except Exception as e:
        if not is_disk_full(e):
            raise
        with contextlib.suppress(OSError):
            path.unlink()
        need = sum(t.numel() * t.element_size() for t in tensors.values()) + 8 + 100 * len(tensors)
        raise disk_full_error(path, need, "nothing half-written was kept") from None
    return path


# -- exchange rename ------------------------------------------------------------------------------------
_AT_FDCWD, _RENAME_EXCHANGE, _RENAME_SWAP = -100, 2, 2
_UNSUPPORTED = {errno.EINVAL, errno.ENOSYS, errno.EOPNOTSUPP, errno.ENOTSUP, errno.EXDEV, errno.EPERM}


def _libc_exchange():
    """The platform's exchange-rename as f(a: bytes, b: bytes) -> (rc, errno), or None."""
    try:
        libc = ctypes.CDLL(None, use_errno=True)
    except OSError:
        return None
    if sys.platform.startswith("linux") and hasattr(libc, "renameat2"):
        fn = libc.renameat2
        fn.argtypes = [ctypes.c_int, ctypes.c_char_p, ctypes.c_int, ctypes.c_char_p, ctypes.c_uint]
        return lambda a, b: (fn(_AT_FDCWD, a, _AT_FDCWD, b, _RENAME_EXCHANGE), ctypes.get_errno())
    if sys.platform == "darwin" and hasattr(libc, "renamex_np"):
        fn = libc.renamex_np
        fn.argtypes = [ctypes.c_char_p, ctypes.c_char_p, ctypes.c_uint]
        return lambda a, b: (fn(a, b, _RENAME_SWAP), ctypes.get_errno())
    return None


_EXCHANGE = _libc_exchange()


def exchange(a: str | os.PathLike, b: str | os.PathLike) -> bool:
    """Atomically swap the entries `a` and `b` (both must exist); False where the OS or filesystem cannot."""
    if _EXCHANGE is None or os.environ.get("TAPERNORM_NO_EXCHANGE") == "1":
        return False
    rc, err = _EXCHANGE(os.fsencode(a), os.fsencode(b))
    if rc == 0:
        return True
    if err in _UNSUPPORTED:
        return False
    raise OSError(err, f"cannot swap {b} for {a}: {os.strerror(err)}")


# -- directory swap ------------------------------------------------------------------------------------
def _sibling(out: Path, tag: str) -> Path:
    return out.with_name(f".{out.name}.{tag}-{secrets.token_hex(4)}")


def _remove(p: Path) -> None:
    """Remove a file, a symlink (not its target) or a directory tree; missing is fine."""
    if p.is_symlink() or p.is_file():
        p.unlink(missing_ok=True)
    elif p.is_dir():
        shutil.rmtree(p, ignore_errors=True)


def remove_dir(out: str | os.PathLike) -> None:
    """Remove `out`: a directory, or a pointer symlink together with the version directory it names."""
    out = Path(out)
    if out.is_symlink():
        target = Path(os.path.realpath(out))
        out.unlink()
        if target.parent == out.parent.resolve() and target.name.startswith(f".{out.name}.v-"):
            _remove(target)
    else:
        _remove(out)


def _swap_pointer(tmp: Path, out: Path) -> None:
    """The no-exchange swap: `out` becomes (or stays) a symlink to a versioned sibling, replaced by one rename."""
    version = _sibling(out, "v")
    os.rename(tmp, version)
    link = _sibling(out, "lnk")
    os.symlink(version.name, link)
    if out.is_symlink():
        old = Path(os.path.realpath(out))
        own = old.parent == out.parent.resolve() and old.name.startswith(f".{out.name}.v-")
    else:  # a plain directory: move it aside first; a kill now leaves the complete link for recover_dir
        old, own = _sibling(out, "old"), True
        os.rename(out, old)
    os.replace(link, out)
    if own:
        _remove(old)


def replace_dir(tmp: str | os.PathLike, out: str | os.PathLike) -> None:
    """Put the finished directory `tmp` at `out` atomically (see the module docstring); the old `out` is removed."""
    tmp, out = Path(tmp), Path(out)
    if not os.path.lexists(out):
        os.rename(tmp, out)
    elif not out.is_symlink() and exchange(tmp, out):
        _remove(tmp)  # the old contents
    else:
        _swap_pointer(tmp, out)


@contextlib.contextmanager
def staged_dir(out: str | os.PathLike, tag: str = "tmp"):
    """Yield a fresh temp dir beside `out` to build into; on success it replaces `out` atomically,
    on any error it is removed and `out` is left as it was."""
    out = Path(out)
    out.parent.mkdir(parents=True, exist_ok=True)
    try:
        tmp = Path(tempfile.mkdtemp(prefix=f".{out.name}.{tag}-", dir=out.parent))
    except OSError as e:
        if is_disk_full(e):
            raise disk_full_error(out, None, f"{out} was left as it was") from None
        raise
    try:
        yield tmp
        umask_mode(tmp, is_dir=True)
        replace_dir(tmp, out)
    except BaseException as e:
        full = _staged_disk_full(e, tmp, out) if isinstance(e, Exception) and is_disk_full(e) else None
        shutil.rmtree(tmp, ignore_errors=True)
        if full is not None:
            where, need, exact = full
            raise disk_full_error(where, need, f"nothing half-written was kept, {out} was left as it was",
                                  lower_bound=not exact) from None
        raise


def _staged_disk_full(e: BaseException, tmp: Path, out: Path) -> tuple[Path, int | None, bool]:
    """(the file being written, bytes needed, whether that need is exact) for a disk that filled while `tmp` was
    built for `out`: the exception's file, else the newest in tmp; the need: what was staged plus what a nested
    DiskFullError said its file takes (exact), else the previous `out`'s size (an estimate) or, failing that, what
    was staged before the disk filled (a lower bound)."""
    nested = e if isinstance(e, DiskFullError) else None
    name = str(nested.path) if nested is not None and nested.path else getattr(e, "filename", None)
    if not name:
        files = [p for p in tmp.rglob("*") if p.is_file()]
        name = max(files, key=lambda p: p.stat().st_mtime_ns).name if files else None
    where = out / Path(name).relative_to(tmp) if name and str(name).startswith(str(tmp)) else (
        out / Path(name).name if name else out)
    staged, nested_need = tree_size(tmp), (nested.need or 0) if nested else 0
    if nested_need:  # the writer knew its size: the rest of the directory comes on top
        return where, staged + nested_need, True
    previous = tree_size(out) if out.exists() else 0  # the same directory last time: a fair estimate
    return where, max(previous, staged) or None, previous > staged


def _leftovers(out: Path) -> dict[str, list[Path]]:
    pat = re.compile(rf"^\.{re.escape(out.name)}\.({'|'.join(STAGING_TAGS)})-[^/]+$")
    found: dict[str, list[Path]] = {t: [] for t in STAGING_TAGS}
    try:
        names = os.listdir(out.parent)
    except FileNotFoundError:
        return found
    for name in names:
        m = pat.match(name)
        if m:
            found[m.group(1)].append(out.parent / name)
    return found


def _newest(paths: list[Path]) -> list[Path]:
    return sorted(paths, key=lambda p: p.lstat().st_mtime_ns, reverse=True)


def recovery_candidate(out: str | os.PathLike) -> Path | None:
    """The complete directory `recover_dir` would put at a missing `out` (read-only; None if `out` exists or
    nothing is recoverable): the newest committed link, else the previous directory moved aside."""
    out = Path(os.path.abspath(out))
    if out.exists():
        return None
    left = _leftovers(out)
    links = [p for p in _newest(left["lnk"]) if p.is_dir()]  # committed swaps (target complete)
    return links[0] if links else next(iter(_newest([p for p in left["old"] if p.is_dir()])), None)


def recover_dir(out: str | os.PathLike) -> list[str]:
    """Repair what a killed swap of `out` left: put a complete directory back at `out` if there is none
    (the new one when its swap was committed, else the previous one), then remove stale staging entries.
    Call it holding the directory's lock. Returns what was done, one phrase per action."""
    out = Path(os.path.abspath(out))  # abspath, not resolve: `out` may be a pointer symlink
    left = _leftovers(out)
    done = []
    if out.is_symlink() and not out.exists():  # dangling pointer: treat as missing
        out.unlink()
    if not os.path.lexists(out):
        pick = recovery_candidate(out)
        if pick is not None:
            os.replace(pick, out)
            done.append(f"restored {out} from {pick.name}")
    keep = {Path(os.path.realpath(out))} if out.is_symlink() else set()
    for tag in STAGING_TAGS:
        for p in left[tag]:
            if p.is_symlink() or (os.path.lexists(p) and p.resolve() not in keep):
                _remove(p)  # a link goes, never its target here
                done.append(f"removed {p.name}")
    return done


# -- locks ---------------------------------------------------------------------------------------------
class LockedError(RuntimeError):
    """Another process holds the lock."""


class LockFileError(RuntimeError):
    """The lock file is not a plain file of ours (a symlink or hard link planted there): refused, never written."""


def is_swap_pointer(out: Path) -> bool:
    """True when `out` is the no-exchange swap's pointer symlink (to its own `.NAME.v-*` sibling)."""
    if not out.is_symlink():
        return False
    target = os.readlink(out)
    return os.sep not in target and target.startswith(f".{out.name}.v-")


def canonical_out(path: str | os.PathLike) -> Path:
    """The one absolute spelling of an output directory: symlinks in its parents are resolved, and `path` itself
    when it is a symlink to a directory (not the swap's own pointer link), so aliases share one lock and one swap."""
    p = Path(os.path.abspath(path))
    if p.name in ("", ".", ".."):
        p = Path(os.path.realpath(p))
    p = Path(os.path.realpath(p.parent)) / p.name
    for _ in range(40):  # a chain of user links, never the swap pointer
        if not p.is_symlink() or is_swap_pointer(p):
            break
        p = Path(os.path.realpath(p.parent / os.readlink(p)))
        if not p.is_symlink():
            break
    return p


def _lock_path(target: Path) -> Path:
    return target.with_name(f".{target.name}.lock")


def _open_lock(path: Path) -> int:
    """Open (create) the lock file without following a symlink; refuse anything but a plain, singly linked file."""
    flags = os.O_RDWR | os.O_CREAT | getattr(os, "O_NOFOLLOW", 0) | getattr(os, "O_CLOEXEC", 0) | os.O_NONBLOCK
    fix = f"it is not tapernorm's; remove it (rm {path}) and retry"
    try:
        fd = os.open(path, flags, 0o644)
    except OSError as e:
        if e.errno == errno.ELOOP or path.is_symlink():
            raise LockFileError(f"lock file {path} is a symbolic link (to {os.readlink(path)}); tapernorm refuses to "
                                f"follow it, since writing it would overwrite the file it points to: {fix}") from None
        raise
    st = os.fstat(fd)
    if not stat.S_ISREG(st.st_mode) or st.st_nlink != 1:
        os.close(fd)
        what = "not a regular file" if not stat.S_ISREG(st.st_mode) else f"a hard link ({st.st_nlink} names)"
        raise LockFileError(f"lock file {path} is {what}; tapernorm refuses to write it: {fix}")
    return fd


def _holder(fd: int) -> str:
    """The 'PID command' line the holder wrote (waits briefly: the holder writes it right after locking)."""
    for _ in range(20):
        txt = os.pread(fd, 256, 0).decode("utf-8", "replace").strip()
        if txt:
            return txt
        time.sleep(0.01)
    return ""


@contextlib.contextmanager
def dir_lock(target: str | os.PathLike, what: str = "tapernorm"):
    """Hold an exclusive lock on directory `target` (file `.NAME.lock` beside it) for the block.

    A second process gets LockedError naming the holder's PID; the lock dies with its process."""
    try:
        import fcntl
    except ImportError:  # no flock (Windows): no locking
        yield None
        return
    target = Path(target)
    made = [p for p in (Path(os.path.abspath(target)).parent, *Path(os.path.abspath(target)).parents)
            if not p.exists()]  # removed again if left empty
    Path(os.path.abspath(target)).parent.mkdir(parents=True, exist_ok=True)
    path = _lock_path(canonical_out(target))  # one lock for every spelling of the directory
    while True:
        fd = _open_lock(path)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            holder = _holder(fd)
            os.close(fd)
            pid, _, cmd = holder.partition(" ")
            who = f"PID {pid}" + (f", `{cmd}`" if cmd else "") if pid else "PID unknown"
            raise LockedError(f"{target} is in use by another tapernorm process ({who}); wait for it to finish "
                              f"or stop it (kill {pid or 'PID'}), then retry") from None
        try:
            same = os.lstat(path).st_ino == os.fstat(fd).st_ino
        except FileNotFoundError:
            same = False
        if same:
            break
        os.close(fd)  # the previous holder removed the file as we opened it: lock the new one
    try:
        os.ftruncate(fd, 0)
        os.pwrite(fd, f"{os.getpid()} {what}\n".encode(), 0)
        yield path
    finally:
        with contextlib.suppress(OSError):
            os.unlink(path)
        os.close(fd)
        for p in made:  # innermost first; a directory the holder filled stays
            with contextlib.suppress(OSError):
                p.rmdir()
