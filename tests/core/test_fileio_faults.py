"""Directory swaps that survive a kill at any point, recovery of what a kill leaves, and the exclusive lock.

Each kill test runs a real process (tests/fault_inject.py) that swaps a directory with
tapernorm.fileio.staged_dir and is SIGKILLed right before or after one chosen rename / exchange / symlink /
rmtree. A later process (recover_dir, as `train` and `compile` run it under their lock) must then find one
complete directory, old or new, never a mix or nothing, and no staging leftovers.
"""
import os
import shutil
import subprocess
import sys
import time
from pathlib import Path

import pytest

from tapernorm import fileio
from tapernorm.fileio import LockedError, dir_lock, recover_dir, remove_dir, replace_dir, staged_dir

INJECT = Path(__file__).resolve().parents[1] / "fault_inject.py"


def _write(d: Path, content: str) -> None:
    d.mkdir(parents=True, exist_ok=True)
    for name in ("a.txt", "b.txt"):
        (d / name).write_text(content)


def _content(d: Path) -> str:
    a, b = (d / "a.txt").read_text(), (d / "b.txt").read_text()
    assert a == b, f"half-swapped directory: {a!r} vs {b!r}"
    return a


def _leftovers(out: Path) -> list[str]:
    return sorted(p for p in os.listdir(out.parent) if p.startswith(f".{out.name}."))


def _killed_swap(out: Path, spec: str, no_exchange: bool) -> int:
    env = {**os.environ, "TAPERNORM_NO_EXCHANGE": "1" if no_exchange else "0"}
    r = subprocess.run([sys.executable, str(INJECT), spec, "--", "swap", str(out), "new"], env=env,
                       capture_output=True, text=True, timeout=120)
    assert r.returncode in (0, -9), r.stderr
    return r.returncode


@pytest.mark.skipif(fileio._EXCHANGE is None, reason="no exchange rename on this OS")
def test_exchange_swap_replaces_in_one_step(tmp_path):
    out = tmp_path / "out"
    _write(out, "old")
    with staged_dir(out) as tmp:
        _write(tmp, "new")
    assert _content(out) == "new" and not out.is_symlink() and _leftovers(out) == []


def test_pointer_fallback_swaps_and_removes(tmp_path, monkeypatch):
    monkeypatch.setenv("TAPERNORM_NO_EXCHANGE", "1")
    out = tmp_path / "out"
    _write(out, "v0")
    for v in ("v1", "v2"):
        with staged_dir(out) as tmp:
            _write(tmp, v)
        assert _content(out) == v and out.is_symlink()
        assert [p for p in _leftovers(out) if ".v-" not in p] == [] and len(_leftovers(out)) == 1
    remove_dir(out)
    assert not os.path.lexists(out) and _leftovers(out) == []


# (spec, exchange available, out before: "dir" | "link", what a later process must find)
WINDOWS = [
    ("exchange:out:1", False, "dir", "old"),
    ("exchange:out:1:after", False, "dir", "new"),
    ("rmtree:.out.tmp-:1", False, "dir", "new"),
    ("rename:.out.tmp-:1", True, "dir", "old"),
    ("rename:.out.tmp-:1:after", True, "dir", "old"),
    ("symlink:.out.v-:1:after", True, "dir", "old"),
    ("rename:.out.old-:1:after", True, "dir", "new"),  # plain dir moved aside, link not yet in place
    ("replace:.out.lnk-:1:after", True, "dir", "new"),
    ("replace:.out.lnk-:1", True, "link", "old"),
    ("replace:.out.lnk-:1:after", True, "link", "new"),
]


@pytest.mark.parametrize("spec,no_exchange,before,expect", WINDOWS, ids=[f"{w[0]}{'-fallback' if w[1] else ''}-{w[2]}"
                                                                          for w in WINDOWS])
def test_kill_in_each_swap_window_leaves_one_complete_dir(tmp_path, monkeypatch, spec, no_exchange, before, expect):
    if not no_exchange and fileio._EXCHANGE is None:
        pytest.skip("no exchange rename on this OS")
    out = tmp_path / "out"
    _write(out, "old")
    if before == "link":  # a previous fallback swap made `out` a pointer
        monkeypatch.setenv("TAPERNORM_NO_EXCHANGE", "1")
        with staged_dir(out) as tmp:
            _write(tmp, "old")
        assert out.is_symlink()
    assert _killed_swap(out, spec, no_exchange) == -9
    recover_dir(out)  # what `train` / `compile` do first, under their lock
    assert _content(out) == expect
    kept = [p for p in _leftovers(out) if not (out.is_symlink() and os.path.realpath(out).endswith(p))]
    assert kept == []
    with staged_dir(out) as tmp:  # and the next save works
        _write(tmp, "next")
    assert _content(out) == "next"


def _strace_works() -> bool:
    if shutil.which("strace") is None:
        return False
    return subprocess.run(["strace", "-qq", "-o", os.devnull, "true"], capture_output=True).returncode == 0


SYSCALLS = ("rename", "renameat", "renameat2", "symlink", "symlinkat", "unlink", "unlinkat", "rmdir")


@pytest.mark.skipif(not _strace_works(), reason="strace missing or ptrace not permitted")
@pytest.mark.parametrize("no_exchange", [False, True], ids=["exchange", "fallback"])
def test_strace_kill_at_every_rename_and_unlink(tmp_path, no_exchange):
    """The issue's method: strace injects SIGKILL at the Nth call of one rename / symlink / unlink system call,
    for every such call of the swap (strace counts each syscall separately); each time a later process
    recovers one complete directory, old or new."""
    env = {**os.environ, "TAPERNORM_NO_EXCHANGE": "1" if no_exchange else "0"}
    seen, kills = set(), 0
    for sc in SYSCALLS:
        for n in range(1, 50):
            out = tmp_path / f"{sc}-{n}" / "out"
            _write(out, "old")
            r = subprocess.run(["strace", "-f", "-qq", "-o", os.devnull, "-e", f"trace={sc}",
                                "-e", f"inject={sc}:signal=KILL:when={n}",
                                sys.executable, str(INJECT), "none", "--", "swap", str(out), "new"],
                               env=env, capture_output=True, text=True, timeout=120)
            recover_dir(out)
            seen.add(_content(out))
            assert [p for p in _leftovers(out) if not (out.is_symlink() and os.path.realpath(out).endswith(p))] == []
            if r.returncode == 0:
                break
            assert r.returncode in (-9, 137), r.stderr
            kills += 1
    assert seen == {"old", "new"} and kills >= 3, (seen, kills)  # kills before and after the commit point


def test_recovers_the_two_rename_leftovers_of_older_versions(tmp_path):
    """The state the issue found: no checkpoint/, only .checkpoint.old-PID and .checkpoint.tmp-XXXX."""
    out = tmp_path / "checkpoint"
    _write(tmp_path / ".checkpoint.old-1234", "old")
    _write(tmp_path / ".checkpoint.tmp-abcd", "new?")
    actions = recover_dir(out)
    assert _content(out) == "old" and _leftovers(out) == []
    assert any(a.startswith("restored") for a in actions)


def test_failed_build_leaves_previous_dir(tmp_path):
    out = tmp_path / "out"
    _write(out, "old")
    with pytest.raises(RuntimeError):
        with staged_dir(out) as tmp:
            _write(tmp, "half")
            raise RuntimeError("build failed")
    assert _content(out) == "old" and _leftovers(out) == []


def test_replace_dir_into_missing_out(tmp_path):
    tmp = tmp_path / "t"
    _write(tmp, "new")
    replace_dir(tmp, tmp_path / "out")
    assert _content(tmp_path / "out") == "new"


HOLD = """
import sys, time
from tapernorm.fileio import dir_lock
with dir_lock(sys.argv[1], "holder for the test"):
    print("locked", flush=True)
    time.sleep(60)
"""


def test_lock_second_process_gets_one_line_with_pid_and_kill_releases(tmp_path):
    target = tmp_path / "run"
    p = subprocess.Popen([sys.executable, "-c", HOLD, str(target)], stdout=subprocess.PIPE, text=True)
    try:
        assert p.stdout.readline().strip() == "locked"
        with pytest.raises(LockedError) as e:
            with dir_lock(target, "second"):
                pass
        msg = str(e.value)
        assert f"PID {p.pid}" in msg and "holder for the test" in msg and "\n" not in msg
    finally:
        p.kill()  # SIGKILL: the kernel drops the flock with the process
        p.wait()
    with dir_lock(target, "after the kill"):
        assert f"{os.getpid()} after the kill" in (tmp_path / ".run.lock").read_text()
    assert not (tmp_path / ".run.lock").exists()  # removed on release


def test_lock_is_reentrant_across_sequential_holders(tmp_path):
    for _ in range(3):
        with dir_lock(tmp_path / "x"):
            pass
    t0 = time.time()
    with dir_lock(tmp_path / "x"):
        assert time.time() - t0 < 5


def test_lock_leaves_no_directories_it_had_to_create(tmp_path):
    with dir_lock(tmp_path / "a" / "b" / "run"):
        assert (tmp_path / "a" / "b" / ".run.lock").is_file()
    assert os.listdir(tmp_path) == []  # a refused command leaves nothing behind
    with dir_lock(tmp_path / "a" / "run"):
        (tmp_path / "a" / "run").mkdir()
    assert os.listdir(tmp_path / "a") == ["run"]


# -- locks that cannot be turned into weapons (issue 20) ----------------------------------------------------
def test_a_symlink_planted_as_the_lock_file_is_refused_and_its_target_untouched(tmp_path):
    """`ln -s victim.txt .blk.lock` made the next lock holder truncate victim.txt and write its PID into it."""
    from tapernorm.fileio import LockFileError
    victim = tmp_path / "victim.txt"
    victim.write_text("precious")
    os.symlink("victim.txt", tmp_path / ".blk.lock")
    with pytest.raises(LockFileError, match=r"\.blk\.lock is a symbolic link \(to victim\.txt\).*refuses to follow it"):
        with dir_lock(tmp_path / "blk"):
            pass
    assert victim.read_text() == "precious" and (tmp_path / ".blk.lock").is_symlink()
    os.symlink(tmp_path / "nowhere", tmp_path / ".dang.lock")  # a dangling link is not created through either
    with pytest.raises(LockFileError):
        with dir_lock(tmp_path / "dang"):
            pass
    assert not (tmp_path / "nowhere").exists()


def test_a_hard_link_planted_as_the_lock_file_is_refused(tmp_path):
    from tapernorm.fileio import LockFileError
    victim = tmp_path / "victim.txt"
    victim.write_text("precious")
    os.link(victim, tmp_path / ".run.lock")
    with pytest.raises(LockFileError, match="is a hard link"):
        with dir_lock(tmp_path / "run"):
            pass
    assert victim.read_text() == "precious"


def test_two_spellings_of_one_directory_take_one_lock(tmp_path):
    """A symlinked --out (and a symlinked parent) resolve once: the second alias sees the holder."""
    real = tmp_path / "real"
    real.mkdir()
    os.symlink("real", tmp_path / "alias")
    os.symlink(tmp_path, tmp_path / "parent-alias")
    p = subprocess.Popen([sys.executable, "-c", HOLD, str(tmp_path / "alias")], stdout=subprocess.PIPE, text=True)
    try:
        assert p.stdout.readline().strip() == "locked"
        for spelling in (real, tmp_path / "parent-alias" / "real", tmp_path / "parent-alias" / "alias"):
            with pytest.raises(LockedError, match=f"PID {p.pid}"):
                with dir_lock(spelling):
                    pass
    finally:
        p.kill()
        p.wait()
    assert fileio.canonical_out(tmp_path / "alias") == fileio.canonical_out(real) == real.resolve()


def test_the_swap_pointer_is_not_resolved(tmp_path, monkeypatch):
    """The no-exchange swap's own pointer link stays the directory's name (its lock must not move per version)."""
    monkeypatch.setenv("TAPERNORM_NO_EXCHANGE", "1")
    out = tmp_path / "out"
    _write(out, "v0")
    with staged_dir(out) as tmp:
        _write(tmp, "v1")
    assert out.is_symlink() and fileio.canonical_out(out) == out.resolve().parent / "out"


# -- disk full (issue 20): one line naming the file and the space, nothing half-written -----------------------
def test_atomic_write_on_a_full_disk_names_the_file_and_keeps_the_old_one(tmp_path, monkeypatch):
    import errno
    target = tmp_path / "summary.json"
    target.write_text("old")

    def full(fd):
        raise OSError(errno.ENOSPC, "No space left on device")
    monkeypatch.setattr(os, "fsync", full)
    with pytest.raises(fileio.DiskFullError) as e:
        fileio.atomic_write_text(target, "x" * 5000)
    msg = str(e.value)
    assert f"no space left on device writing {target}" in msg and "it needs 4.9 KB" in msg and "free" in msg
    assert "the previous summary.json is kept" in msg and "\n" not in msg
    assert target.read_text() == "old" and sorted(os.listdir(tmp_path)) == ["summary.json"]


def test_a_library_disk_full_inside_staged_dir_names_the_file(tmp_path):
    """safetensors reports ENOSPC as SafetensorError('... (os error 28)'); staged_dir turns any such error into one
    line naming the file being written, and removes the half-built directory."""
    from safetensors import SafetensorError
    out = tmp_path / "model"
    _write(out, "old")
    with pytest.raises(fileio.DiskFullError, match=rf"writing {out}/weights.safetensors .*{out} was left as it was"):
        with staged_dir(out) as tmp:
            (tmp / "weights.safetensors").write_bytes(b"partial")
            raise SafetensorError("Error while serializing: I/O error: No space left on device (os error 28)")
    assert _content(out) == "old" and _leftovers(out) == []


def test_real_full_disk_for_every_writer(tmp_path):
    """A 64 KB tmpfs: an atomic write, a safetensors file and a staged directory that do not fit each give one
    DiskFullError line and leave the disk as it was."""
    import torch
    from small_disk import small_disk
    with small_disk(tmp_path / "disk", "64k") as d:
        (d / "keep.txt").write_text("old")
        with pytest.raises(fileio.DiskFullError, match=r"writing .*keep.txt \(it needs 195.3 KB, [\d.]+ KB free"):
            fileio.atomic_write_bytes(d / "keep.txt", b"x" * 200_000)
        with pytest.raises(fileio.DiskFullError, match=r"writing .*w.safetensors \(it needs 390.\d KB"):
            fileio.save_safetensors({"w": torch.zeros(100_000)}, d / "w.safetensors")
        with pytest.raises(fileio.DiskFullError, match=r"writing .*out/big.bin .*out was left as it was"):
            with staged_dir(d / "out") as tmp:
                (tmp / "big.bin").write_bytes(b"x" * 200_000)
        assert sorted(os.listdir(d)) == ["keep.txt"] and (d / "keep.txt").read_text() == "old"
