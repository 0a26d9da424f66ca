"""A newcomer's rough edges (issue 18), one test each: benchmark paths and scratch output, `compile RUN`, help texts
(defaults once, a fast `bench --help`), resuming a finished run, what `eval` measures, `make bench`, progress lines
without a terminal, and fold's one line for a model whose own outputs are not finite."""
import ast
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

sys.path.insert(0, str(Path(__file__).resolve().parent / "runtime"))
from _train_helpers import fast_cfg, make_tokenizer  # noqa: E402
from tapernorm.compiler.cli import main  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]
BENCH = ROOT / "benchmarks"
ENV = {**os.environ, "OMP_NUM_THREADS": "1"}


@pytest.fixture(scope="module")
def tokenizer(tmp_path_factory):
    return make_tokenizer(tmp_path_factory.mktemp("spm") / "tokenizer.model").path


@pytest.fixture(scope="module")
def run_dir(tmp_path_factory, tokenizer):
    """A finished tiny run (4 steps)."""
    from tapernorm.train.trainer import train
    d = tmp_path_factory.mktemp("run") / "r"
    train(fast_cfg(d, tokenizer, steps=4, warmup_steps=1, ckpt_every=2))
    return d


def test_every_benchmark_writes_to_a_scratch_dir_unless_saved():
    """Every benchmark that writes results takes --out / --save (bench_common) and never names results/ itself."""
    for f in sorted(BENCH.glob("*.py")):
        src = f.read_text()
        if f.name in ("bench_common.py", "peers_report.py") or "write_results(" not in src:
            continue  # peers_report re-renders the file it is given, in place
        assert "output_dir(" in src, f"{f.name} writes results without bench_common.output_dir"
        names = {n.id for n in ast.walk(ast.parse(src)) if isinstance(n, ast.Name)}
        assert "RESULTS" not in names or f.name == "quality.py", f"{f.name} still writes into benchmarks/results"
    sys.path.insert(0, str(BENCH))
    import argparse

    import bench_common
    ap = argparse.ArgumentParser()
    bench_common.add_output_args(ap)
    assert bench_common.output_dir(ap.parse_args([])) == bench_common.SCRATCH
    assert bench_common.output_dir(ap.parse_args(["--save"])) == bench_common.RESULTS


@pytest.fixture(scope="module")
def compiled_run(tmp_path_factory, run_dir):
    """`tapernorm compile RUN` (the run directory itself, not RUN/model) and what it logged."""
    import contextlib
    import io
    out, err = tmp_path_factory.mktemp("compiled") / "c", io.StringIO()
    with contextlib.redirect_stderr(err):
        assert main(["compile", str(run_dir), "--out", str(out), "--parity-tokens", "2"]) == 0
    return out, err.getvalue()


def test_bench_startup_takes_a_relative_model_dir(tmp_path, compiled_run):
    d = compiled_run[0]
    p = subprocess.run([sys.executable, str(BENCH / "bench_startup.py"), "--model-dir", d.name, "--rounds", "1",
                        "--new-tokens", "2", "--no-pieces", "--out", str(tmp_path)], cwd=d.parent,
                       capture_output=True, text=True, env=ENV, timeout=300)
    assert p.returncode == 0, p.stderr[-2000:]
    res = json.loads((tmp_path / "startup.json").read_text())
    assert res["settings"]["model_dir"] == str(d) and res["runs"]["this tree"][0]["wall_s"] > 0


def test_compile_accepts_a_run_directory(run_dir, compiled_run):
    out, err = compiled_run
    assert f"compiling its final model, {run_dir / 'model'}" in err
    rep = json.loads((out / "compile_report.json").read_text())
    assert rep["checkpoint"] == str(run_dir / "model") and rep["eos_ids"] == [2]
    assert {"tokenizer.model", "tokenizer.json", "tokenizer_config.json"} <= set(rep["tokenizer_files"])


def _help(*args) -> str:
    p = subprocess.run([sys.executable, "-m", "tapernorm.compiler.cli", *args, "--help"], capture_output=True,
                       text=True, env={**ENV, "COLUMNS": "200"}, timeout=120)
    assert p.returncode == 0, p.stderr
    return p.stdout


def test_help_shows_each_default_once():
    gen = _help("generate")
    assert "(default: 64)" in gen and "(default: ort)" in gen and "(default: None)" not in gen
    for cmd in ("finetune", "plot", "eval", "generate", "chat"):
        text = _help(cmd)
        assert "(default: None)" not in text, cmd
        for line in text.splitlines():
            assert line.count("(default:") <= 1, (cmd, line)
    bench = _help("bench")
    assert "(default: [128, 256, 512])" in bench and "benchmarks/results/ with --save)." in bench


def test_bench_help_imports_nothing_heavy():
    code = ("import sys\nfrom tapernorm.compiler.cli import main\ntry:\n    main(['bench', '--help'])\n"
            "except SystemExit:\n    pass\nprint(sorted(m for m in ('torch', 'numpy', 'onnxruntime', 'onnx') "
            "if m in sys.modules))")
    p = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=ENV, timeout=120)
    assert p.returncode == 0, p.stderr
    assert p.stdout.strip().splitlines()[-1] == "[]" and "usage: tapernorm bench" in p.stdout


def test_resuming_a_finished_run_says_it_was_complete(run_dir, tokenizer, capsys):
    from tapernorm.train.trainer import train
    summary = (run_dir / "summary.json").read_text()
    log = (run_dir / "log.jsonl").read_text()
    r = train(fast_cfg(run_dir, tokenizer, steps=4, warmup_steps=1, ckpt_every=2, resume=True))
    err = capsys.readouterr().err
    assert "is already complete (4/4 steps" in err and "nothing to resume" in err
    assert (run_dir / "summary.json").read_text() == summary and (run_dir / "log.jsonl").read_text() == log
    assert r.val_loss == json.loads(summary)["val_loss"] and r.steps == 4


def test_eval_says_what_it_measured(run_dir, capsys):
    assert main(["eval", str(run_dir)]) == 0
    out = capsys.readouterr().out
    assert "the full held-out split, as train's summary.json" in out
    full = float(out.split()[1])
    assert full == pytest.approx(json.loads((run_dir / "summary.json").read_text())["val_loss"], rel=1e-6)
    assert main(["eval", str(run_dir), "--batches", "1", "--batch-size", "2"]) == 0
    assert "the first 1 validation batches; train's summary.json uses the full split" in capsys.readouterr().out


def test_make_bench_has_a_recipe():
    p = subprocess.run(["make", "-n", "-C", str(ROOT), "bench", "VENV=/nonexistent-venv", "GENAI_VENV=/nonexistent-g",
                        "BENCH_ARGS=--rounds 1"], capture_output=True, text=True, timeout=60)
    assert p.returncode == 0, p.stderr
    assert "/nonexistent-venv/bin/tapernorm bench --genai-python /nonexistent-g/bin/python --rounds 1" in p.stdout


def test_training_prints_flushed_progress_lines_without_a_terminal(tmp_path, tokenizer, capsys):
    from tapernorm.train.trainer import train
    train(fast_cfg(tmp_path / "p", tokenizer, steps=6, warmup_steps=1, batch_size=4, seq_len=16, progress=True))
    lines = [ln for ln in capsys.readouterr().err.splitlines() if ln.startswith("[train] step")]
    assert len(lines) == 6 and lines[-1].startswith("[train] step 6/6 (100%) ce ")
    assert "gate 0" in lines[-1] and "steps/s" in lines[-1] and "\r" not in "".join(lines)


def test_ddp_finds_unused_parameters_only_where_the_gate_leaves_some():
    """gamma_t is unused at gate 1, gamma at gate 0; while tapering every parameter is used, and DDP with
    find_unused_parameters=True would print torch's warning on every rank (tests/train/test_train.py runs torchrun
    and checks that stderr has no such warning)."""
    from tapernorm.train.trainer import _unused_params
    assert [_unused_params(True, g) for g in (1.0, 0.5, 1e-9, 0.0)] == [True, False, False, True]
    assert not _unused_params(False, 1.0)


def test_fold_says_first_that_the_original_outputs_are_not_finite():
    from tiny_models import make_tiny

    import tapernorm.passes as passes
    from tapernorm.passes.verify import VerifyError
    m = make_tiny("tiny", "internal")  # gate 0
    with torch.no_grad():
        m.layers[0].mlp.down_proj.weight.mul_(1e38)  # overflows to inf, like an un-fine-tuned pretrained model
    ids = torch.randint(0, 256, (1, 8))
    with pytest.raises(VerifyError) as e:
        passes.fold(m, (ids,))
    msg = str(e.value)
    assert msg.startswith("verify: the original model's outputs are not finite") and "\n" not in msg
    assert "fine-tune through the taper schedule first" in msg
