"""`tapernorm finetune` held to train's guarantees (issue 20): divergence stops in every mode and writes nothing,
summary.json is always strict JSON, a lock on --out, recovery after a kill, --overwrite never removes what
finetune did not write, a full disk is one line.

Kill tests run the real CLI in a subprocess (tests/fault_inject.py) and SIGKILL it at one chosen rename.
"""
import json
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest

pytest.importorskip("transformers")
pytest.importorskip("accelerate")
from hf_models import FT_ARGS, finetuned_dir, hf_dir  # noqa: E402

from tapernorm.compiler.cli import main  # noqa: E402
from tapernorm.train.finetune_out import json_text as _json_text  # noqa: E402

INJECT = Path(__file__).resolve().parents[1] / "fault_inject.py"
SHORT = ["--steps", "6", "--taper-start", "2", "--taper-end", "4", "--warmup-steps", "1", "--seq-len", "32",
         "--batch-size", "4", "--lr", "3e-3", "--max-docs", "40", "--eval-batches", "2"]
HOLD = ("import sys, time\nfrom tapernorm.fileio import dir_lock\n"
        "with dir_lock(sys.argv[1], 'tapernorm finetune (test holder)'):\n    print('locked', flush=True)\n"
        "    time.sleep(60)\n")


def _one_line(capsys) -> str:
    err = [ln for ln in capsys.readouterr().err.strip().splitlines()
           if ln.strip() and "it/s]" not in ln and not ln.startswith("[finetune]")]
    assert len(err) == 1, err
    assert "Traceback" not in err[0]
    return err[0]


def _previous_run(tmp_path) -> Path:
    """A copy of a finished fine-tuning's output (OUT/model, summary.json, log_history.json)."""
    import shutil
    out = tmp_path / "ft"
    shutil.copytree(finetuned_dir("llama", "internal"), out, symlinks=True)
    return out


def _snapshot(out: Path) -> dict:
    return {str(p.relative_to(out)): p.read_bytes() for p in sorted(out.rglob("*")) if p.is_file()}


@pytest.mark.parametrize("mode", ["baseline", "internal"])
def test_divergence_stops_in_every_mode_and_writes_nothing(tmp_path, capsys, mode):
    """The issue's case: `--mode baseline --lr 1e4 --overwrite` saved all-NaN weights and a bare NaN in
    summary.json with exit 0. Now: exit 2, one line naming the step (and the gate when tapering), OUT unchanged."""
    out = _previous_run(tmp_path)
    src = hf_dir("llama", tmp_path / "src")
    before = _snapshot(out)
    capsys.readouterr()
    rc = main(["finetune", str(src), "--out", str(out), "--mode", mode, "--overwrite", *FT_ARGS, "--lr", "1e4"])
    assert rc == 2
    line = _one_line(capsys)
    m = re.search(r"training diverged at step (\d+): (loss|gradient norm) (nan|inf)( at gate [\d.]+)?", line)
    assert m, line
    assert (m.group(4) is not None) == (mode != "baseline")
    assert "lower --lr" in line and f"{out / 'model'} is unchanged" in line
    assert _snapshot(out) == before  # the good model and its summary are kept, bit for bit
    json.loads((out / "summary.json").read_text())


def test_summary_json_is_strict_with_reasons_for_missing_values():
    text = _json_text({"val_loss_before": float("inf"), "val_loss_after": 2.5, "calibration": {"a": float("nan")},
                       "hist": [1.0, float("-inf")]})
    obj = json.loads(text, parse_constant=lambda c: pytest.fail(f"bare {c} in JSON"))
    assert obj["val_loss_before"] is None and obj["calibration"]["a"] is None and obj["hist"] == [1.0, None]
    assert obj["val_loss_after"] == 2.5
    assert set(obj["null_reasons"]) == {"val_loss_before", "calibration.a", "hist[1]"}
    assert "inf" in obj["null_reasons"]["val_loss_before"]


def test_second_finetune_on_a_locked_out_is_refused(tmp_path, capsys):
    out = _previous_run(tmp_path)
    before = _snapshot(out)
    holder = subprocess.Popen([sys.executable, "-c", HOLD, str(out)], stdout=subprocess.PIPE, text=True)
    try:
        assert holder.stdout.readline().strip() == "locked"
        assert main(["finetune", str(tmp_path / "nowhere"), "--out", str(out), "--overwrite", *SHORT]) == 2
        line = _one_line(capsys)
        assert f"PID {holder.pid}" in line and "in use by another tapernorm process" in line
    finally:
        holder.kill()
        holder.wait()
    assert _snapshot(out) == before


def test_a_symlinked_lock_file_is_refused_and_its_target_kept(tmp_path, capsys):
    victim = tmp_path / "victim.txt"
    victim.write_text("precious")
    os.symlink(victim, tmp_path / ".ft.lock")
    assert main(["finetune", str(tmp_path / "src"), "--out", str(tmp_path / "ft"), *SHORT]) == 2
    line = _one_line(capsys)
    assert "is a symbolic link" in line and "refuses to follow it" in line
    assert victim.read_text() == "precious"


def test_overwrite_keeps_files_finetune_did_not_write(tmp_path, capsys):
    """--overwrite replaces a previous fine-tuning's model/, summary.json, log_history.json and nothing else
    (the issue: it deleted a user's OUT/trainer/); a model/ that is not a fine-tuning's is refused."""
    src = hf_dir("llama", tmp_path / "src")
    user = tmp_path / "user"
    (user / "model").mkdir(parents=True)
    (user / "model" / "weights.bin").write_text("mine")
    capsys.readouterr()
    assert main(["finetune", str(src), "--out", str(user), "--overwrite", *SHORT]) == 2
    line = _one_line(capsys)
    assert "was not written by `tapernorm finetune`" in line and "new --out" in line
    assert (user / "model" / "weights.bin").read_text() == "mine"
    out = _previous_run(tmp_path)
    (out / "trainer").mkdir()
    (out / "trainer" / "notes.txt").write_text("mine")
    (out / "notes.txt").write_text("mine too")
    assert main(["finetune", str(src), "--out", str(out), "--overwrite", *SHORT]) == 0
    assert (out / "trainer" / "notes.txt").read_text() == "mine" and (out / "notes.txt").read_text() == "mine too"
    assert json.loads((out / "summary.json").read_text())["steps"] == 6
    assert sorted(os.listdir(out)) == ["log_history.json", "model", "notes.txt", "summary.json", "trainer"]


def _killed(spec: str, args: list[str]) -> None:
    r = subprocess.run([sys.executable, str(INJECT), spec, "--", "tapernorm", *args], capture_output=True, text=True,
                       timeout=300, env={**os.environ, "OMP_NUM_THREADS": "1"})
    assert r.returncode == -9, (r.returncode, r.stderr[-2000:])


@pytest.mark.slow
def test_kill_at_the_summary_write_and_before_the_model_swap_then_recover(tmp_path):
    """A kill while summary.json is written leaves the previous (complete) file, never 0 bytes; a kill just before
    the model swap leaves the staging copy, which the next run removes."""
    out = _previous_run(tmp_path)
    src = hf_dir("llama", tmp_path / "src")
    old_summary = (out / "summary.json").read_bytes()
    _killed("replace:summary.json:1", ["finetune", str(src), "--out", str(out), "--overwrite", *SHORT])
    assert (out / "summary.json").read_bytes() == old_summary  # the new model is in, the summary is the old one
    assert json.loads(old_summary)
    _killed("exchange:model:1", ["finetune", str(src), "--out", str(out), "--overwrite", *SHORT])
    stale = [p for p in os.listdir(out) if p.startswith(".")]
    assert any(p.startswith(".model.tmp-") for p in stale), stale  # the full staged copy a kill leaves
    assert main(["finetune", str(src), "--out", str(out), "--overwrite", *SHORT]) == 0
    assert [p for p in os.listdir(out) if p.startswith(".")] == []  # recovered: no leftovers
    assert json.loads((out / "summary.json").read_text())["steps"] == 6


@pytest.mark.parametrize("mode", ["internal", "baseline"])
def test_finetune_on_a_full_disk_is_one_line_and_leaves_nothing(tmp_path, capsys, mode):
    """The issue's case: finetune with ~100 KB free gave a safetensors traceback (or a bare '[Errno 28]')."""
    from small_disk import small_disk
    src = hf_dir("llama", tmp_path / "src")
    with small_disk(tmp_path / "disk", "100k") as disk:
        capsys.readouterr()
        assert main(["finetune", str(src), "--out", str(disk / "ft"), "--mode", mode, *SHORT]) == 2
        line = _one_line(capsys)
        name = "tapernorm.safetensors" if mode == "internal" else "model.safetensors"
        assert re.search(rf"no space left on device writing {disk}/ft/model(/{name})? \(it needs [\d.]+ KB, [\d.]+ KB "
                         r"free on that filesystem; free at least [\d.]+ KB and retry\)", line), line
        assert os.listdir(disk) == []  # no half-written model, no empty OUT
