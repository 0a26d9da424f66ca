"""The trainer end to end on tiny runs: loss falls in every mode, exact resume, 2-process DDP with real
torchrun, eval / plot commands, and bad input that fails cleanly without leaving files."""
import json
import os
import re
import socket
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from _train_helpers import fast_cfg, make_tokenizer
from tapernorm.checkpoint import CheckpointError, load_checkpoint
from tapernorm.compiler.cli import main
from tapernorm.train.state import read_log
from tapernorm.train.trainer import TrainConfig, evaluate_checkpoint, train

REPO = Path(__file__).resolve().parents[2]


@pytest.fixture(scope="session")
def tokenizer(tmp_path_factory):
    """One tiny-vocabulary SentencePiece model shared by every training test."""
    return make_tokenizer(tmp_path_factory.mktemp("spm") / "tokenizer.model").path


def _train_log(run):
    return [r for r in read_log(Path(run) / "log.jsonl") if r["kind"] == "train"]


@pytest.mark.parametrize("mode, preset, aux", [
    ("baseline", "tiny", False), ("internal", "tiny", True), ("all", "tiny", True), ("internal", "tiny-gpt2", True),
])
def test_val_loss_falls_in_each_mode(tmp_path, tokenizer, mode, preset, aux):
    res = train(fast_cfg(tmp_path / "run", tokenizer, mode=mode, preset=preset, scale_loss=aux, eval_every=100))
    assert res.val_loss < res.initial_val_loss - 0.3, (res.initial_val_loss, res.val_loss)
    log = _train_log(res.run_dir)
    assert [r["step"] for r in log] == list(range(24))
    keys = {"ce", "scale_loss", "gate", "lr", "logit_norm", "prelogit_rms", "grad_norm_norm", "grad_norm_attn",
            "grad_norm_mlp", "grad_norm_embed"}
    assert keys <= set(log[0])
    model, info = load_checkpoint(res.model_dir)
    if mode == "baseline":
        assert info["gate"] is None and all(r["gate"] is None for r in log)
        return
    gates = [r["gate"] for r in log]
    assert gates[:2] == [1.0, 1.0] and gates[-1] == 0.0 and info["gate"] == 0.0 and res.final_gate == 0.0
    assert all(a >= b for a, b in zip(gates, gates[1:]))
    cs = [float(m.c) for n, m in model.named_modules() if hasattr(m, "calibrated_flag")]
    assert cs and all(c > 0 and c != 1.0 for c in cs)  # calibrated at the warmup boundary
    if aux:
        assert log[0]["scale_loss"] == 0.0 and log[-1]["s_tgt"] > 0 and log[-1]["scale_loss"] > 0
    # `tapernorm eval` sees the gate as trained and reproduces the trainer's final (full-split) validation loss
    ev = evaluate_checkpoint(res.run_dir, batches=None, batch_size=8)
    assert ev["gate"] == 0.0 and ev["val_loss"] == pytest.approx(res.val_loss, rel=1e-6)


def test_bf16_autocast_run(tmp_path, tokenizer):
    from tapernorm.data import Tokenizer, load_corpus, tokenize_corpus
    from tapernorm.train.trainer import evaluate
    res = train(fast_cfg(tmp_path / "bf16", tokenizer, mode="all", bf16=True, steps=16, eval_every=100))
    assert res.val_loss < res.initial_val_loss - 0.1 and res.final_gate == 0.0  # both on the full split
    assert all(r["ce"] == r["ce"] and r["gate"] is not None for r in _train_log(res.run_dir))  # no NaN
    model, info = load_checkpoint(res.model_dir)
    assert info["gate"] == 0.0 and {p.dtype for p in model.parameters()} == {torch.float32}  # fp32 master weights
    data = tokenize_corpus(load_corpus("builtin", max_chars=60_000), Tokenizer.load(tokenizer), 32, 0.1)
    fp32, bf16 = (evaluate(model, data.val, 8, 32, None, bf16=b) for b in (False, True))
    assert bf16 == pytest.approx(res.val_loss, rel=1e-6) and bf16 != fp32  # autocast really ran


def test_resume_continues_exactly(tmp_path, tokenizer, monkeypatch):
    # periodic checkpoints every 4 steps; c is still being collected until the taper starts at step 7
    kw = dict(steps=16, warmup_steps=2, taper_start=7, ckpt_every=4)
    full = train(fast_cfg(tmp_path / "full", tokenizer, **kw))
    part = train(fast_cfg(tmp_path / "part", tokenizer, stop_after=5, **kw))
    assert part.steps == 5 and (tmp_path / "part" / "checkpoint" / "trainer_state.safetensors").is_file()
    with pytest.raises(ValueError, match=r"lr=0.1 \(was 0.003\)"):
        train(fast_cfg(tmp_path / "part", tokenizer, lr=0.1, resume=True, **kw))
    resumed = train(fast_cfg(tmp_path / "part", tokenizer, resume=True, **kw))  # resumes mid-calibration
    a, b = _train_log(full.run_dir), _train_log(resumed.run_dir)
    assert [r["step"] for r in b] == list(range(16))
    assert b[5]["ce"] == a[5]["ce"]  # the next loss after resuming is bit-identical
    assert [r["ce"] for r in b] == [r["ce"] for r in a]
    assert resumed.val_loss == full.val_loss

    # a crash at step 10 (last checkpoint: step 8, mid-taper): the log's steps 8-9 are dropped and redone
    import tapernorm.train.trainer as train_mod
    real = train_mod.batch_at

    def crash_at_10(stream, step, *args, **kwargs):
        if step == 10:
            raise KeyboardInterrupt("simulated crash")
        return real(stream, step, *args, **kwargs)
    monkeypatch.setattr(train_mod, "batch_at", crash_at_10)
    with pytest.raises(KeyboardInterrupt):
        train(fast_cfg(tmp_path / "crash", tokenizer, **kw))
    assert [r["step"] for r in _train_log(tmp_path / "crash")] == list(range(10))
    monkeypatch.setattr(train_mod, "batch_at", real)
    again = train(fast_cfg(tmp_path / "crash", tokenizer, resume=True, **kw))
    c = _train_log(again.run_dir)
    assert [r["step"] for r in c] == list(range(16)) and [r["ce"] for r in c] == [r["ce"] for r in a]
    assert [r["gate"] for r in c] == [r["gate"] for r in a] and again.val_loss == full.val_loss


def test_two_process_ddp_matches_single_process(tmp_path, tokenizer):
    single = train(fast_cfg(tmp_path / "one", tokenizer, steps=12))
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    torchrun = Path(sys.executable).with_name("torchrun")
    cmd = [str(torchrun), "--nproc_per_node", "2", "--master_addr", "127.0.0.1", "--master_port", str(port),
           "-m", "tapernorm.compiler.cli", "train", "--out", str(tmp_path / "two"), "--tokenizer", tokenizer,
           "--max-chars", "60000", "--steps", "12", "--batch-size", "8", "--seq-len", "32", "--eval-every", "0",
           "--ckpt-every", "0", "--eval-batches", "4", "--no-progress"]
    env = dict(os.environ, OMP_NUM_THREADS="1")
    p = subprocess.run(cmd, capture_output=True, text=True, timeout=240, env=env, cwd=tmp_path)
    assert p.returncode == 0, p.stderr[-2000:]
    assert "find_unused_parameters" not in p.stderr  # DDP is rebuilt where the taper changes which params are used
    summary = json.loads((tmp_path / "two" / "summary.json").read_text())
    assert summary["world_size"] == 2
    one, two = _train_log(single.run_dir), _train_log(tmp_path / "two")
    assert len(two) == 12 and max(abs(x["ce"] - y["ce"]) for x, y in zip(one, two)) < 1e-4
    assert summary["val_loss"] == pytest.approx(single.val_loss, abs=1e-4)
    m1, _ = load_checkpoint(single.model_dir)
    m2, _ = load_checkpoint(tmp_path / "two" / "model")
    assert float(m1.layers[0].input_layernorm.c) == pytest.approx(float(m2.layers[0].input_layernorm.c), rel=1e-5)


def test_missing_corpus_gives_one_clear_error_and_no_files(tmp_path, capsys):
    out = tmp_path / "run"
    with pytest.raises(FileNotFoundError, match="corpus file .*missing.txt does not exist"):
        train(TrainConfig(out_dir=str(out), corpus=str(tmp_path / "missing.txt"), progress=False))
    rc = main(["train", "--out", str(out), "--corpus", str(tmp_path / "missing.txt"), "--no-progress"])
    err = capsys.readouterr().err.strip().splitlines()
    assert rc == 2 and len(err) == 1 and "missing.txt does not exist" in err[0]
    assert list(tmp_path.iterdir()) == []  # nothing written
    # other bad data inputs: an empty file, a vocabulary the corpus cannot fill, a tokenizer that is not one
    inputs = tmp_path / "in"
    inputs.mkdir()
    (inputs / "empty.txt").write_text("\n")
    (inputs / "a.txt").write_text("hello world.\n\nsmall text.\n")
    (inputs / "junk.model").write_bytes(b"not a sentencepiece model")
    for flags, msg in [(["--corpus", str(inputs / "empty.txt")], "empty.txt contain no text"),
                       (["--corpus", f"{inputs / 'a.txt'},{inputs / 'a.txt'}", "--vocab-size", "5000"],
                        "could not train a 5000-piece vocabulary .*change --vocab-size"),
                       (["--tokenizer", str(inputs / "junk.model"), "--max-chars", "2000"], "junk.model: not a SentencePiece model")]:
        assert main(["train", "--out", str(out), *flags, "--no-progress"]) == 2
        err = capsys.readouterr().err.strip().splitlines()
        assert len(err) == 1 and re.search(msg, err[0]), err
        assert sorted(p.name for p in tmp_path.iterdir()) == ["in"]  # still nothing written


def test_bad_settings_and_existing_run(tmp_path, tokenizer):
    with pytest.raises(ValueError, match="mode 'sideways'"):
        train(fast_cfg(tmp_path / "r", tokenizer, mode="sideways"))
    with pytest.raises(ValueError, match="taper start 20 <= taper end 10"):
        train(fast_cfg(tmp_path / "r", tokenizer, taper_start=20, taper_end=10))
    with pytest.raises(FileNotFoundError, match="does not exist; start the run without --resume"):
        train(fast_cfg(tmp_path / "r", tokenizer, resume=True))
    assert not (tmp_path / "r").exists()
    train(fast_cfg(tmp_path / "r", tokenizer, steps=4))
    with pytest.raises(FileExistsError, match="--resume to continue it, --overwrite"):
        train(fast_cfg(tmp_path / "r", tokenizer, steps=4))
    # a corrupt trainer state: one clear error naming the file, and the run directory is left as it was
    (tmp_path / "r" / "checkpoint" / "trainer_state.json").write_text("{truncated")
    before = {p: p.read_bytes() for p in (tmp_path / "r").rglob("*") if p.is_file()}
    with pytest.raises(CheckpointError, match=r"trainer_state.json: not valid JSON .*--overwrite"):
        train(fast_cfg(tmp_path / "r", tokenizer, steps=4, resume=True))
    assert main(["train", "--out", str(tmp_path / "r"), "--resume", "--no-progress"]) == 2
    assert {p: p.read_bytes() for p in (tmp_path / "r").rglob("*") if p.is_file()} == before


def test_cli_train_eval_plot(tmp_path, tokenizer, capsys):
    run = tmp_path / "cli"
    rc = main(["train", "--out", str(run), "--tokenizer", tokenizer, "--max-chars", "60000", "--steps", "8",
               "--batch-size", "4", "--seq-len", "16", "--mode", "all-taper", "--eval-every", "4", "--no-progress"])
    assert rc == 0 and "val_loss" in capsys.readouterr().out
    assert main(["eval", str(run), "--json", "--batches", "2"]) == 0
    r = json.loads(capsys.readouterr().out)
    assert r["gate"] == 0.0 and r["mode"] == "all" and r["val_loss"] > 0
    assert main(["plot", str(run)]) == 0
    png = run / "curves.png"
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert main(["eval", str(tmp_path / "nothing")]) == 2


def test_cli_resume_reuses_the_saved_settings(tmp_path, tokenizer, capsys):
    run = tmp_path / "r"
    flags = ["--tokenizer", tokenizer, "--max-chars", "60000", "--steps", "6", "--batch-size", "4", "--seq-len", "16",
             "--eval-every", "0", "--no-progress"]
    assert main(["train", "--out", str(run), *flags, "--stop-after", "3"]) == 0
    assert "stopped after 3 steps" in capsys.readouterr().out
    assert main(["train", "--out", str(run), "--resume", "--no-progress"]) == 0  # no other flags needed
    assert json.loads((run / "summary.json").read_text())["steps"] == 6
    assert [r["step"] for r in _train_log(run)] == list(range(6))
