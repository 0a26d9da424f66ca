"""`tapernorm finetune` on HF's Trainer: the paper's schedules, gate exactly 0, loss falls, exact reload, DDP."""
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

pytest.importorskip("transformers")
pytest.importorskip("accelerate")
from hf_models import FT_ARGS, finetuned_dir, hf_dir  # noqa: E402

import tapernorm  # noqa: E402
from tapernorm.train.finetune_cli import SCHEDULES, FinetuneConfig  # noqa: E402
from tapernorm.train.schedule import resolve_schedule  # noqa: E402

ROOT = Path(__file__).resolve().parents[2]


@pytest.mark.parametrize("name,row", sorted(SCHEDULES.items()))
def test_schedule_presets_give_the_papers_boundaries(name, row):
    T, W, t0, t1 = FinetuneConfig(model="m", schedule=name).check().resolved_steps()
    assert (T, W, t0, t1) == row == {"gpt2-s": (300, 25, 25, 100), "gpt2-m": (500, 10, 20, 200),
                                     "gpt2-l": (600, 30, 30, 500), "gpt2-xl": (800, 20, 50, 700)}[name]
    s = resolve_schedule(T, warmup=W, taper_start=t0, taper_end=t1)
    assert [s.gate(t) for t in (0, t0 - 1, t0)] == [1.0, 1.0, 1.0] and 0 < s.gate(t0 + 1) < 1
    assert s.gate(t1 - 1) > 0 and s.gate(t1) == 0.0 and s.gate(T - 1) == 0.0 and s.final_gate() == 0.0


def test_explicit_step_flags_override_a_preset():
    cfg = FinetuneConfig(model="m", schedule="gpt2-m", steps=40, taper_start=5, taper_end=30).check()
    assert cfg.resolved_steps() == (40, 10, 5, 30)
    with pytest.raises(ValueError, match="taper"):
        FinetuneConfig(model="m", steps=10, taper_start=20).check()
    with pytest.raises(ValueError, match="--steps"):
        FinetuneConfig(model="m").check()


@pytest.mark.parametrize("kind,mode", [("llama", "internal"), ("gpt2", "all")])
def test_finetune_cli_tapers_to_zero_and_reloads_exactly(kind, mode):
    out = finetuned_dir(kind, mode)
    s = json.loads((out / "summary.json").read_text())
    assert s["final_gate"] == 0.0 and s["steps"] == 12
    assert s["config"]["recipe"] == "paper" and s["recipe_auto"]["sinks"]["norms_over"] == 0  # auto: no sinks here
    assert s["schedule"] == {"name": None, "total": 12, "warmup": 2, "taper_start": 3, "taper_end": 9}
    assert len(s["calibration"]) == len(s["tapered_layers"]) == (4 if mode == "internal" else 5)
    assert all(torch.isfinite(torch.tensor([s["val_loss_before"], s["val_loss_after"]])))
    assert s["val_loss_after"] < s["val_loss_before"]
    model = tapernorm.from_pretrained(out / "model")
    assert tapernorm.get_gate(model) == 0.0  # exactly
    assert all(m.calibrated for _, m in tapernorm.taper_layers(model))
    # the reloaded model reproduces the run's own held-out loss bit for bit
    from tapernorm.data import load_corpus, tokenize_corpus
    from tapernorm.train.finetune import evaluate_chunks, load_text_tokenizer
    data = tokenize_corpus(load_corpus("builtin", 40), load_text_tokenizer(out / "model"), 32, 0.1)
    assert evaluate_chunks(model, data.val, 32, 4, 2) == s["val_loss_after"]
    hist = json.loads((out / "log_history.json").read_text())
    assert hist and hist[-1]["step"] == 12


def test_refuses_bad_inputs_in_one_line(tmp_path):
    from tapernorm.compiler.cli import main
    src = hf_dir("llama", tmp_path)
    (tmp_path / "busy").mkdir()
    (tmp_path / "busy" / "x").write_text("mine")
    assert main(["finetune", str(src), "--out", str(tmp_path / "busy"), *FT_ARGS]) == 2
    assert (tmp_path / "busy" / "x").read_text() == "mine"
    tapered = finetuned_dir("llama", "internal") / "model"
    with pytest.raises(ValueError, match="already tapered"):
        from tapernorm.train.finetune import finetune
        finetune(FinetuneConfig(model=str(tapered), out_dir=str(tmp_path / "o"), steps=4))


@pytest.mark.slow
@pytest.mark.parametrize("extra", [[], ["--recipe", "sink", "--taper-bound-rms", "4", "--taper-bound-scope", "all"]],
                         ids=["default", "bound-per-feature"])
def test_two_process_torchrun_matches_one_process(tmp_path, extra):
    """Two torchrun ranks give the one-process result: c, the per-feature bounds (averaged over ranks at
    calibration) and the weights."""
    src = hf_dir("llama", tmp_path / "src")
    args = ["finetune", str(src), "--mode", "internal", "--steps", "6", "--taper-start", "2", "--taper-end", "4",
            "--seq-len", "16", "--batch-size", "4", "--lr", "3e-3", "--max-docs", "20", "--eval-batches", "2", *extra]
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    py = [sys.executable, "-m"]
    one = subprocess.run([*py, "tapernorm.compiler.cli", *args, "--out", str(tmp_path / "one")], env=env,
                         capture_output=True, text=True, timeout=300, cwd=ROOT)
    assert one.returncode == 0, one.stderr[-2000:]
    two = subprocess.run([*py, "torch.distributed.run", "--standalone", "--nproc_per_node", "2",
                          "-m", "tapernorm.compiler.cli", *args, "--out", str(tmp_path / "two")], env=env,
                         capture_output=True, text=True, timeout=300, cwd=ROOT)
    assert two.returncode == 0, two.stderr[-2000:]
    s1, s2 = (json.loads((tmp_path / r / "summary.json").read_text()) for r in ("one", "two"))
    assert s2["world_size"] == 2 and s1["world_size"] == 1
    assert s1["val_loss_after"] == pytest.approx(s2["val_loss_after"], rel=1e-5)
    assert s1["calibration"] == pytest.approx(s2["calibration"], rel=1e-6)  # c averaged over ranks
    m1, m2 = (tapernorm.from_pretrained(tmp_path / r / "model") for r in ("one", "two"))
    for (n, a), (_, b) in zip(m1.state_dict().items(), m2.state_dict().items()):
        if a.is_floating_point():
            torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-5, msg=n)


def test_baseline_mode_is_the_same_run_without_tapering(tmp_path):
    """The comparison run (FakeLN's / the paper's baseline): no TaperNorm, saved as a plain HF model."""
    import transformers
    from tapernorm.compiler.cli import main
    src = hf_dir("llama", tmp_path)
    out = tmp_path / "base"
    assert main(["finetune", str(src), "--out", str(out), "--mode", "baseline", *FT_ARGS]) == 0
    s = json.loads((out / "summary.json").read_text())
    assert s["final_gate"] is None and s["tapered_layers"] == [] and s["val_loss_after"] < s["val_loss_before"]
    plain = transformers.AutoModelForCausalLM.from_pretrained(out / "model").eval()
    assert not tapernorm.taper_layers(plain)
    from tapernorm.data import load_corpus, tokenize_corpus
    from tapernorm.train.finetune import evaluate_chunks, load_text_tokenizer
    data = tokenize_corpus(load_corpus("builtin", 40), load_text_tokenizer(out / "model"), 32, 0.1)
    assert evaluate_chunks(plain, data.val, 32, 4, 2) == pytest.approx(s["val_loss_after"], rel=1e-6)
