"""Training runs that survive kills, concurrent use and bad state (issue 11).

Kill tests run the real CLI in a subprocess (tests/fault_inject.py) and SIGKILL it at the dangerous
point of a checkpoint swap; afterwards the previous (or the new) checkpoint must load and `--resume` must
finish the run. Then: a two-process lock test, divergence, advice that works when followed, and one
test per bad value (one line, nothing written).
"""
import json
import os
import re
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

from _train_helpers import fast_cfg, make_tokenizer
from tapernorm.checkpoint import CheckpointError, load_checkpoint, load_resume, save_checkpoint
from tapernorm.compiler.cli import main
from tapernorm.train.trainer import TrainingDiverged, train

INJECT = Path(__file__).resolve().parents[1] / "fault_inject.py"


@pytest.fixture(scope="module")
def tokenizer(tmp_path_factory):
    path = tmp_path_factory.mktemp("spm") / "tokenizer.model"
    make_tokenizer(path)
    return str(path)


def _flags(run, tokenizer, **kw):
    """CLI flags of a fast tiny run (the _train_helpers.fast_cfg settings)."""
    cfg = {**dict(preset="tiny", tokenizer=tokenizer, max_chars=60000, steps=8, batch_size=8, seq_len=32,
                  eval_every=100, eval_batches=2, ckpt_every=4), **kw}
    return ["train", "--out", str(run), "--no-progress", *[x for k, v in cfg.items()
                                                           for x in (f"--{k.replace('_', '-')}", str(v))]]


def _killed(spec: str, args: list[str], env: dict | None = None) -> subprocess.CompletedProcess:
    r = subprocess.run([sys.executable, str(INJECT), spec, "--", "tapernorm", *args], capture_output=True,
                       text=True, timeout=300, env={**os.environ, **(env or {})})
    assert r.returncode == -9, (r.returncode, r.stderr[-2000:])
    return r


def _stale(run: Path) -> list[str]:
    """Hidden entries of RUN other than the version directories its pointer symlinks name."""
    live = {os.path.basename(os.path.realpath(run / d)) for d in ("checkpoint", "model") if (run / d).is_symlink()}
    return [p for p in os.listdir(run) if p.startswith(".") and p not in live]


def _one_line(capsys) -> str:
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1, err
    return err[0]


# (where the kill lands, exchange available, steps done in the checkpoint a later process finds)
# (every window of the swap itself is covered fast in tests/core/test_fileio_faults.py)
KILLS = [("exchange:checkpoint:1:after", "1", 8),      # exchanged, old contents not yet removed
         ("rename:.checkpoint.old-:1:after", "0", 8)]  # no-exchange fallback: old dir moved aside, link not in


@pytest.mark.parametrize("spec,exchange,found", KILLS, ids=["after-exchange", "fallback-gap"])
def test_kill_during_checkpoint_swap_then_resume(tmp_path, tokenizer, capsys, spec, exchange, found):
    run = tmp_path / "run"
    env = {"TAPERNORM_NO_EXCHANGE": "0" if exchange == "1" else "1"}
    _killed(spec, _flags(run, tokenizer), env)
    if (run / "checkpoint").exists():  # a reader without the lock sees a complete checkpoint
        _, _, state = load_resume(run / "checkpoint")
        assert state["json"]["step"] == found
    assert main(["train", "--out", str(run), "--resume", "--no-progress"]) == 0  # recovers under the lock
    _, _, state = load_resume(run / "checkpoint")
    assert state["json"]["step"] == 8 and (run / "model" / "model.safetensors").is_file()
    assert _stale(run) == [], os.listdir(run)
    summary = json.loads((run / "summary.json").read_text())
    assert summary["initial_val_loss"] is not None and summary["seconds"] > 0
    load_checkpoint(run / "model")


def test_resume_after_the_two_rename_state_of_older_versions(tmp_path, tokenizer):
    """The issue's state: no checkpoint/, only .checkpoint.old-PID (and a half .checkpoint.tmp-*)."""
    run = tmp_path / "run"
    train(fast_cfg(run, tokenizer, steps=8, ckpt_every=4, stop_after=4))
    (run / "checkpoint").rename(run / ".checkpoint.old-4242")
    (run / ".checkpoint.tmp-abcd").mkdir()
    (run / ".checkpoint.tmp-abcd" / "config.json").write_text("{")
    res = train(fast_cfg(run, tokenizer, steps=8, ckpt_every=4, resume=True))
    assert res.steps == 8 and sorted(os.listdir(run)) == ["checkpoint", "log.jsonl", "model", "summary.json",
                                                           "tokenizer.model"]


def test_killed_before_first_checkpoint_the_advice_works(tmp_path, tokenizer, capsys):
    run = tmp_path / "run"
    _killed("rename:.checkpoint.tmp-:1", _flags(run, tokenizer))  # dies as the first checkpoint goes in
    assert not (run / "checkpoint").exists() and (run / "tokenizer.model").is_file()
    assert main(["train", "--out", str(run), "--resume", "--no-progress"]) == 2
    msg = _one_line(capsys)
    assert "no checkpoint to resume" in msg and "--overwrite" in msg
    assert main(_flags(run, tokenizer)) == 2  # without a flag: must not suggest --resume
    msg = _one_line(capsys)
    assert "--overwrite" in msg and "--resume" not in msg
    assert main(_flags(run, tokenizer) + ["--overwrite"]) == 0  # following the advice works
    assert _stale(run) == []


def test_two_resumes_of_one_run_the_second_gets_one_line_naming_the_first(tmp_path, tokenizer, capsys):
    """The issue's case: two `train --resume` on one run directory. The second fails at once naming the
    first's PID; the checkpoint stays consistent, and once the first is gone (kill -9) the run resumes."""
    run = tmp_path / "run"
    assert main(_flags(run, tokenizer, steps=100000, ckpt_every=2, stop_after=2, eval_every=0)) == 0
    capsys.readouterr()
    first = subprocess.Popen([sys.executable, "-m", "tapernorm.compiler.cli", "train", "--out", str(run), "--resume",
                              "--no-progress"], stderr=subprocess.PIPE, text=True)
    lock = tmp_path / ".run.lock"
    try:
        deadline = time.time() + 120
        while not (lock.is_file() and lock.read_text().strip()) and time.time() < deadline:
            assert first.poll() is None, first.stderr.read()
            time.sleep(0.1)
        assert main(["train", "--out", str(run), "--resume", "--no-progress"]) == 2
        msg = _one_line(capsys)
        assert f"PID {first.pid}" in msg and "in use by another tapernorm process" in msg
        assert main(_flags(run, tokenizer) + ["--overwrite"]) == 2  # nor may anyone clear it meanwhile
        assert f"PID {first.pid}" in _one_line(capsys)
    finally:
        first.kill()
        first.wait()
    _, _, state = load_resume(run / "checkpoint")  # weights and trainer state of one save
    done = state["json"]["step"]
    assert main(["train", "--out", str(run), "--resume", "--no-progress", "--stop-after", str(done + 2)]) == 0
    assert load_resume(run / "checkpoint")[2]["json"]["step"] == done + 2


def test_divergence_stops_at_the_first_nonfinite_step_and_keeps_the_last_good_checkpoint(tmp_path, tokenizer, capsys):
    run = tmp_path / "run"
    args = _flags(run, tokenizer, lr=1e4, ckpt_every=1)
    assert main(args) == 2
    msg = _one_line(capsys)
    m = re.search(r"training diverged at step (\d+): (loss|gradient norm) (nan|inf)", msg)
    assert m and "lower --lr" in msg and "nothing non-finite was written" in msg, msg
    step = int(m.group(1))
    records = [json.loads(line) for line in (run / "log.jsonl").read_text().splitlines()]
    assert max(r["step"] for r in records if r["kind"] == "train") == step - 1  # the bad step was not applied
    model, _ = load_checkpoint(run / "checkpoint")  # the last good state, finite
    assert all(torch.isfinite(p).all() for p in model.parameters())
    assert not (run / "model").exists()
    assert "start over with that change and --overwrite" in msg
    assert main(_flags(run, tokenizer, lr=3e-3, ckpt_every=1) + ["--overwrite"]) == 0  # the advice works


def test_nonfinite_weights_are_never_written(tmp_path):
    from tiny_models import make_tiny
    model = make_tiny("tiny", "internal")
    save_checkpoint(model, tmp_path / "ck")
    before = (tmp_path / "ck" / "model.safetensors").read_bytes()
    with torch.no_grad():
        model.embed_tokens.weight[0, 0] = float("nan")
    with pytest.raises(CheckpointError, match="embed_tokens.weight.*NaN or inf.*previous checkpoint there is kept"):
        save_checkpoint(model, tmp_path / "ck")
    assert (tmp_path / "ck" / "model.safetensors").read_bytes() == before


def test_weights_and_trainer_state_from_different_saves_are_refused(tmp_path):
    from tiny_models import make_tiny
    model = make_tiny("tiny", "internal")
    for name in ("a", "b"):
        save_checkpoint(model, tmp_path / name, trainer_state={"json": {"step": 1}, "tensors": {}})
    (tmp_path / "b" / "trainer_state.json").write_bytes((tmp_path / "a" / "trainer_state.json").read_bytes())
    with pytest.raises(CheckpointError, match="come from different saves"):
        load_resume(tmp_path / "b")
    load_resume(tmp_path / "a")


def test_summary_after_resume_keeps_initial_loss_and_total_seconds(tmp_path, tokenizer):
    part = train(fast_cfg(tmp_path / "r", tokenizer, steps=8, ckpt_every=4, stop_after=4, eval_every=100))
    time.sleep(0.2)
    res = train(fast_cfg(tmp_path / "r", tokenizer, steps=8, ckpt_every=4, eval_every=100, resume=True))
    summary = json.loads((tmp_path / "r" / "summary.json").read_text())
    assert summary["initial_val_loss"] == part.initial_val_loss == res.initial_val_loss is not None
    assert summary["seconds"] >= part.seconds * 0.5 and summary["seconds"] == pytest.approx(res.seconds, abs=1.0)


# one test per bad value: one line, exit 2, nothing written
BAD = [
    (["--dim", "30", "--n-heads", "4"], r"dim 30 must split into 4 heads"),
    (["--n-layers", "0"], r"n_layers must be a positive integer"),
    (["--val-frac", "1.5"], r"val_frac 1\.5 must be in \(0, 1\)"),
    (["--beta-ema", "0"], r"beta_ema 0\.0 must be in \(0, 1\]"),
    (["--eval-batches", "0"], r"eval_batches must be >= 1"),
    (["--ckpt-every", "-1"], r"ckpt_every must be >= 0"),
    (["--device", "tpu"], r"invalid choice: 'tpu'"),
    (["--resume", "--overwrite"], r"pass only one of them"),
]


@pytest.mark.parametrize("flags,msg", BAD, ids=[" ".join(f) for f, _ in BAD])
def test_bad_flag_values_one_line_nothing_written(tmp_path, tokenizer, capsys, flags, msg):
    rc = None
    try:
        rc = main(_flags(tmp_path / "run", tokenizer) + flags)
    except SystemExit as e:  # argparse's own refusals (closed choices)
        rc = e.code
    assert rc == 2
    assert re.search(msg, capsys.readouterr().err)
    assert sorted(os.listdir(tmp_path)) == []


def test_bad_api_values_fail_before_any_write(tmp_path, tokenizer):
    with pytest.raises(ValueError, match="unknown preset 'huge'"):
        train(fast_cfg(tmp_path / "r", tokenizer, preset="huge"))
    with pytest.raises(ValueError, match=r"training setting steps is '10' \(a string\) but must be an integer"):
        train(fast_cfg(tmp_path / "r", tokenizer, steps="10"))
    assert os.listdir(tmp_path) == []
    train(fast_cfg(tmp_path / "r", tokenizer, preset="tiny", steps=4))  # the retry is not refused


def test_corpus_directory_and_file_as_out(tmp_path, tokenizer, capsys):
    (tmp_path / "texts").mkdir()
    assert main(_flags(tmp_path / "run", tokenizer) + ["--corpus", str(tmp_path / "texts")]) == 2
    assert "is a directory; pass text file(s)" in _one_line(capsys)
    (tmp_path / "afile").write_text("x")
    assert main(_flags(tmp_path / "afile", tokenizer)) == 2
    assert "is a file, not a run directory" in _one_line(capsys)
    assert sorted(os.listdir(tmp_path)) == ["afile", "texts"]


def test_wrong_type_in_saved_settings_and_checkpoint_config_names_the_field(tmp_path, tokenizer, capsys):
    run = tmp_path / "r"
    train(fast_cfg(run, tokenizer, steps=4, ckpt_every=2, stop_after=2))
    sj = run / "checkpoint" / "trainer_state.json"
    js = json.loads(sj.read_text())
    js["train_config"]["seq_len"] = "32"
    sj.write_text(json.dumps(js))
    assert main(["train", "--out", str(run), "--resume", "--no-progress"]) == 2
    assert "seq_len is '32' (a string) but must be an integer" in _one_line(capsys)
    cj = run / "model_cfg"
    from tiny_models import make_tiny
    save_checkpoint(make_tiny("tiny", "internal"), cj)
    raw = json.loads((cj / "config.json").read_text())
    raw["tapernorm"]["dim"] = "32"
    (cj / "config.json").write_text(json.dumps(raw))
    with pytest.raises(CheckpointError, match=r"tapernorm\.dim is '32' \(a string\) but must be an integer"):
        load_checkpoint(cj)


def test_eval_bad_batches_and_plot_without_matplotlib(tmp_path, capsys):
    assert main(["eval", str(tmp_path), "--batches", "0"]) == 2
    assert "--batches 0 must be >= 1" in _one_line(capsys)
    run = tmp_path / "run"
    run.mkdir()
    (run / "log.jsonl").write_text(json.dumps({"kind": "train", "step": 0, "ce": 5.0, "gate": 1.0, "lr": 1e-3,
                                               "logit_norm": 1.0, "prelogit_rms": 0.1}) + "\n")
    code = ("import sys; sys.modules['matplotlib'] = None\n"
            "from tapernorm.compiler.cli import main; sys.exit(main(['plot', sys.argv[1]]))")
    r = subprocess.run([sys.executable, "-c", code, str(run)], capture_output=True, text=True, timeout=120)
    assert r.returncode == 2 and len(r.stderr.strip().splitlines()) == 1, r.stderr
    assert "pip install" in r.stderr and "Traceback" not in r.stderr


# -- issue 20: --overwrite removes only what train wrote; locks; a full disk ------------------------------------
def test_overwrite_refuses_a_directory_that_is_not_a_run(tmp_path, tokenizer, capsys):
    """`train --out userproj` refused a non-run dir and suggested --overwrite, which then replaced userproj/model/."""
    user = tmp_path / "userproj"
    (user / "model").mkdir(parents=True)
    (user / "model" / "weights.bin").write_text("mine")
    (user / "summary.json").write_text("{\"mine\": 1}")
    assert main(_flags(user, tokenizer)) == 2
    msg = _one_line(capsys)
    assert "is not a tapernorm run directory" in msg and "--overwrite" not in msg.split(";")[-1]
    assert main(_flags(user, tokenizer) + ["--overwrite"]) == 2
    msg = _one_line(capsys)
    assert "--overwrite would delete it" in msg and "new --out" in msg
    assert (user / "model" / "weights.bin").read_text() == "mine" and (user / "summary.json").read_text() == "{\"mine\": 1}"
    notes = tmp_path / "notes"  # a directory with only files train never writes: --overwrite keeps them
    notes.mkdir()
    (notes / "todo.txt").write_text("mine")
    assert main(_flags(notes, tokenizer, steps=2, ckpt_every=0) + ["--overwrite"]) == 0
    assert (notes / "todo.txt").read_text() == "mine" and (notes / "model" / "config.json").is_file()


def test_a_symlinked_run_lock_is_refused(tmp_path, tokenizer, capsys):
    victim = tmp_path / "victim.txt"
    victim.write_text("precious")
    os.symlink("victim.txt", tmp_path / ".run.lock")
    assert main(_flags(tmp_path / "run", tokenizer)) == 2
    assert "is a symbolic link" in _one_line(capsys)
    assert victim.read_text() == "precious" and not (tmp_path / "run").exists()


def test_resume_on_a_full_disk_is_one_line_and_keeps_the_checkpoint(tmp_path, tokenizer, capsys):
    """The issue's case: a disk filling up during the safetensors write of `train --resume`."""
    import shutil
    from small_disk import small_disk
    src = tmp_path / "src"
    train(fast_cfg(src, tokenizer, steps=8, ckpt_every=4, stop_after=4))
    used = sum(p.stat().st_size for p in src.rglob("*") if p.is_file())
    ckpt = sum(p.stat().st_size for p in (src / "checkpoint").iterdir())
    with small_disk(tmp_path / "disk", str((used + ckpt // 2) // 4096 * 4096 + 64 * 1024)) as disk:
        run = disk / "run"
        shutil.copytree(src, run)
        capsys.readouterr()
        assert main(["train", "--out", str(run), "--resume", "--no-progress"]) == 2
        msg = _one_line(capsys)
        assert re.search(rf"no space left on device writing {run}/checkpoint\S* \(it needs [\d.]+ [KM]B, "
                         r"[\d.]+ [KM]?B free", msg), msg
        assert "was left as it was" in msg
        _, _, state = load_resume(run / "checkpoint")  # the previous checkpoint, whole
        assert state["json"]["step"] == 4
        assert [p for p in os.listdir(run) if p.startswith(".")] == []


def test_the_step_log_on_a_full_disk_names_itself(tmp_path):
    """Other fill levels gave a bare '[Errno 28]': the log append is one line naming log.jsonl too."""
    from small_disk import small_disk
    from tapernorm.fileio import DiskFullError
    from tapernorm.train.state import JsonlLog, read_log
    with small_disk(tmp_path / "disk", "64k") as d:
        log = JsonlLog(d / "log.jsonl")
        with open(d / "filler", "wb") as f:
            f.write(b"x" * (64 * 1024 - 8192))
        with pytest.raises(DiskFullError, match=rf"writing {d}/log.jsonl .*records written before are kept"):
            for i in range(10_000):
                log.write({"kind": "train", "step": i, "pad": "y" * 200})
        log.f = open(os.devnull, "w")  # the full buffer would raise again at close
        assert [r["step"] for r in read_log(d / "log.jsonl")] == list(range(len(read_log(d / "log.jsonl"))))


def test_plot_on_a_full_disk_is_one_line(tmp_path, capsys):
    pytest.importorskip("matplotlib")
    from small_disk import small_disk
    run = tmp_path / "run"
    run.mkdir()
    (run / "log.jsonl").write_text("".join(json.dumps({"kind": "train", "step": i, "ce": 5.0 - i / 10, "gate": 1.0,
                                                       "lr": 1e-3, "logit_norm": 1.0, "prelogit_rms": 0.1}) + "\n"
                                           for i in range(5)))
    with small_disk(tmp_path / "disk", "8k") as disk:
        assert main(["plot", str(run), "--out", str(disk / "curves.png")]) == 2
        assert f"no space left on device writing {disk}/curves.png" in _one_line(capsys)
        assert os.listdir(disk) == []
