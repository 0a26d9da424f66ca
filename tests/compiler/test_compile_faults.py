"""Compile output that survives kills, concurrent compiles and user files (issue 11).

A recompile replaces only the files compile writes (the user's notes stay), a compile SIGKILLed at the
exchange of its output directory leaves the previous (or the new) output loadable by the runtime, and a
second compile into a locked output directory fails at once with one line naming the holder's PID.
"""
import json
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from tiny_models import make_tiny
from tapernorm import fileio
from tapernorm.checkpoint import save_checkpoint
from tapernorm.compiler import cli
from tapernorm.compiler.pipeline import OWNED_FILES
from tapernorm.runtime import DecoderSession, OrtDecoder, generate_ids

INJECT = Path(__file__).resolve().parents[1] / "fault_inject.py"
HOLD = ("import sys, time\nfrom tapernorm.fileio import dir_lock\n"
        "with dir_lock(sys.argv[1], 'tapernorm compile (test holder)'):\n    print('locked', flush=True)\n"
        "    time.sleep(60)\n")


@pytest.fixture(scope="module")
def compiled(tmp_path_factory):
    """(checkpoint dir, a first compile's output) of a tiny gate-0 model."""
    root = tmp_path_factory.mktemp("cf")
    model = make_tiny("tiny", "internal")
    with torch.no_grad():
        model.embed_tokens.weight.mul_(20)
    save_checkpoint(model, root / "ckpt")
    assert cli.main(["compile", str(root / "ckpt"), "--out", str(root / "out"), "--parity-tokens", "2"]) == 0
    return root / "ckpt", root / "out"


def _copy_out(src: Path, dst: Path) -> Path:
    import shutil
    shutil.copytree(src, dst)
    return dst


def _decodes(out: Path) -> list[int]:
    sess = DecoderSession(out, provider="cpu", intra_op_threads=1)
    return generate_ids(OrtDecoder(sess), [[1, 5, 6]], max_new_tokens=3).tokens[0]


def _report_time(out: Path) -> float:
    return (out / "compile_report.json").stat().st_mtime_ns


def test_recompile_keeps_the_users_files(compiled, tmp_path, capsys):
    ckpt, first = compiled
    out = _copy_out(first, tmp_path / "out")
    (out / "notes.txt").write_text("mine")
    (out / "bench").mkdir()
    (out / "bench" / "result.json").write_text("{}")
    before = _report_time(out)
    assert cli.main(["compile", str(ckpt), "--out", str(out), "--parity-tokens", "2"]) == 0
    assert "kept 2 file(s) of yours" in capsys.readouterr().err
    assert (out / "notes.txt").read_text() == "mine" and (out / "bench" / "result.json").read_text() == "{}"
    assert _report_time(out) != before  # the compile's own files were replaced
    assert set(os.listdir(out)) - {"notes.txt", "bench"} <= set(OWNED_FILES)
    assert sorted(os.listdir(tmp_path)) == ["out"]


@pytest.mark.skipif(fileio._EXCHANGE is None, reason="no exchange rename on this OS")
@pytest.mark.parametrize("when", ["before", "after"])
def test_compile_killed_at_the_output_swap_leaves_a_loadable_output(compiled, tmp_path, when):
    ckpt, first = compiled
    out = _copy_out(first, tmp_path / "out")
    (out / "notes.txt").write_text("mine")
    want = _decodes(out)
    spec = "exchange:out:1" + (":after" if when == "after" else "")
    r = subprocess.run([sys.executable, str(INJECT), spec, "--", "tapernorm", "compile", str(ckpt), "--out", str(out),
                        "--parity-tokens", "2"], capture_output=True, text=True, timeout=600)
    assert r.returncode == -9, r.stderr[-2000:]
    assert _decodes(out) == want and (out / "notes.txt").read_text() == "mine"  # old or new, complete
    stale = [p for p in os.listdir(tmp_path) if p.startswith(".out.") and p != ".out.lock"]  # the lock file of
    # a killed holder stays (unlocked: the kernel dropped the flock) until the next holder releases it
    assert len(stale) == 1  # the build dir (before) or the swapped-out old contents (after)
    assert cli.main(["compile", str(ckpt), "--out", str(out), "--parity-tokens", "2"]) == 0  # cleans up
    assert sorted(os.listdir(tmp_path)) == ["out"] and _decodes(out) == want


def test_second_compile_into_a_locked_output_is_refused(compiled, tmp_path, capsys):
    ckpt, first = compiled
    out = _copy_out(first, tmp_path / "out")
    before = {p: p.read_bytes() for p in out.iterdir()}
    holder = subprocess.Popen([sys.executable, "-c", HOLD, str(out)], stdout=subprocess.PIPE, text=True)
    try:
        assert holder.stdout.readline().strip() == "locked"
        assert cli.main(["compile", str(ckpt), "--out", str(out), "--parity-tokens", "2"]) == 2
        err = capsys.readouterr().err.strip().splitlines()
        assert len(err) == 1 and f"PID {holder.pid}" in err[0] and "in use by another tapernorm process" in err[0]
    finally:
        holder.kill()
        holder.wait()
    assert {p: p.read_bytes() for p in out.iterdir()} == before


def test_runtime_json_written_before_parity_has_the_context(compiled):
    _, out = compiled
    assert json.loads((out / "runtime.json").read_text())["max_seq_len"] == 64


# -- issue 20: weaponised locks, aliases, a kill in the fallback swap, misleading runtime lines -----------------
def test_a_symlinked_lock_file_is_refused_and_its_target_untouched(compiled, tmp_path, capsys):
    ckpt, _ = compiled
    victim = tmp_path / "victim.txt"
    victim.write_text("precious")
    os.symlink("victim.txt", tmp_path / ".blk.lock")
    assert cli.main(["compile", str(ckpt), "--out", str(tmp_path / "blk"), "--parity-tokens", "2"]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "is a symbolic link" in err[0] and "refuses to follow it" in err[0]
    assert victim.read_text() == "precious" and sorted(os.listdir(tmp_path)) == [".blk.lock", "victim.txt"]


def test_an_aliased_out_is_one_directory_with_one_lock(compiled, tmp_path, capsys):
    """--out ALIAS (a symlink to DIR) and --out DIR take one lock, and a compile through the alias replaces DIR
    itself (the alias stays the user's link)."""
    ckpt, first = compiled
    real = _copy_out(first, tmp_path / "real")
    os.symlink("real", tmp_path / "alias")
    holder = subprocess.Popen([sys.executable, "-c", HOLD, str(real)], stdout=subprocess.PIPE, text=True)
    try:
        assert holder.stdout.readline().strip() == "locked"
        assert cli.main(["compile", str(ckpt), "--out", str(tmp_path / "alias"), "--parity-tokens", "2"]) == 2
        assert f"PID {holder.pid}" in capsys.readouterr().err
    finally:
        holder.kill()
        holder.wait()
    before = _report_time(real)
    assert cli.main(["compile", str(ckpt), "--out", str(tmp_path / "alias"), "--parity-tokens", "2"]) == 0
    assert os.readlink(tmp_path / "alias") == "real" and _report_time(real) != before
    assert sorted(os.listdir(tmp_path)) == ["alias", "real"]


def test_kill_between_the_fallback_renames_the_runtime_still_reads_the_output(compiled, tmp_path):
    """No exchange rename: the old output is moved aside, then the link renamed into place. Killed in between,
    --out is absent; `generate` said 'does not exist'. Now it reads the complete new output (with a warning that
    a recompile puts it back), and the next compile does."""
    ckpt, first = compiled
    out = _copy_out(first, tmp_path / "out")
    want = _decodes(out)
    r = subprocess.run([sys.executable, str(INJECT), "rename:.out.old-:1:after", "--", "tapernorm", "compile", str(ckpt),
                        "--out", str(out), "--parity-tokens", "2"], capture_output=True, text=True, timeout=600,
                       env={**os.environ, "TAPERNORM_NO_EXCHANGE": "1"})
    assert r.returncode == -9, r.stderr[-2000:]
    assert not os.path.lexists(out)
    with pytest.warns(RuntimeWarning, match=r"out is missing: a compile into it was killed.*puts it back in place"):
        assert _decodes(out) == want
    assert cli.main(["compile", str(ckpt), "--out", str(out), "--parity-tokens", "2"]) == 0  # restores, then swaps
    assert _decodes(out) == want


def test_runtime_json_swapped_mid_read_is_retried_once(compiled, tmp_path, monkeypatch):
    """A recompile swapping the directory between the session's graph read and its runtime.json read is retried
    (it said 'mixes files from different compiles'); a directory that really mixes them is still refused."""
    import onnxruntime as ort
    from tapernorm.runtime.session import ModelDirError
    _, first = compiled
    out = _copy_out(first, tmp_path / "out")
    good = (out / "runtime.json").read_text()
    mixed = json.loads(good)
    mixed["n_layers"] += 1
    (out / "runtime.json").write_text(json.dumps(mixed))
    real, calls = ort.InferenceSession, []

    def session_then_swap(*a, **k):  # the first read mixes two compiles; by the retry the swap is complete
        s = real(*a, **k)
        calls.append(1)
        if len(calls) == 2:
            (out / "runtime.json").write_text(good)
        return s
    monkeypatch.setattr(ort, "InferenceSession", session_then_swap)
    assert DecoderSession(out, provider="cpu", intra_op_threads=1).config.n_layers == mixed["n_layers"] - 1
    assert len(calls) == 2
    (out / "runtime.json").write_text(json.dumps(mixed))
    with pytest.raises(ModelDirError, match="mixes files from different compiles"):
        DecoderSession(out, provider="cpu", intra_op_threads=1)


def test_max_seq_len_beyond_the_rotary_cache_is_one_line(compiled, tmp_path):
    """runtime.json max_seq_len 1e6 decoded until onnxruntime's RotaryEmbedding failed (in ANSI colour)."""
    from tapernorm.runtime.session import ModelDirError
    _, first = compiled
    out = _copy_out(first, tmp_path / "out")
    rt = json.loads((out / "runtime.json").read_text())
    rt["max_seq_len"] = 1_000_000
    (out / "runtime.json").write_text(json.dumps(rt))
    with pytest.raises(ModelDirError, match=r"max_seq_len 1000000 exceeds the model's context \(the rotary cache of "
                                            r"model.onnx has 64 positions\).*at most 64") as e:
        DecoderSession(out, provider="cpu", intra_op_threads=1)
    assert "\x1b[" not in str(e.value) and "\n" not in str(e.value)
    rt["max_seq_len"] = 32  # a shorter limit than the graph's is fine
    (out / "runtime.json").write_text(json.dumps(rt))
    assert DecoderSession(out, provider="cpu", intra_op_threads=1).config.max_seq_len == 32


def test_compile_onto_a_full_disk_is_one_line_and_leaves_nothing(compiled, tmp_path, capsys):
    from small_disk import small_disk
    ckpt, _ = compiled
    with small_disk(tmp_path / "disk", "64k") as disk:
        capsys.readouterr()
        assert cli.main(["compile", str(ckpt), "--out", str(disk / "out"), "--parity-tokens", "2"]) == 2
        err = [ln for ln in capsys.readouterr().err.strip().splitlines() if not ln.startswith("[compile]")]
        assert len(err) == 1 and re.search(rf"no space left on device writing {disk}/out/\S+ \(it needs [\d.]+ KB, "
                                           r"[\d.]+ KB free on that filesystem; free at least", err[0]), err
        assert os.listdir(disk) == []
