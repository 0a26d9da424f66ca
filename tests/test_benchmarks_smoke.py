"""The benchmark scripts still run end to end on tiny settings and write JSON + markdown.
No timing is asserted here: speed goals live in the benchmarks' own results."""
import json
import subprocess
import sys
from pathlib import Path

BENCH = Path(__file__).resolve().parents[1] / "benchmarks"


def _run(*args):
    proc = subprocess.run([sys.executable, *map(str, args)], capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-2000:]


def test_bench_train_step_writes_results(tmp_path):
    _run(BENCH / "bench_train_step.py", "--rounds", 2, "--inner", 1, "--warmup", 1, "--batch", 2, "--seq", 16,
         "--dim", 32, "--layers", 2, "--heads", 4, "--vocab", 256, "--out", tmp_path)
    res = json.loads((tmp_path / "train_step_cpu.json").read_text())
    assert {"machine", "ratio_vs_rmsnorm", "verdict"} <= set(res) and res["machine"]["cores"]
    assert "| RMSNorm |" in (tmp_path / "train_step_cpu.md").read_text()


def test_bench_decode_writes_results(tmp_path):
    _run(BENCH / "bench_decode.py", "--widths", 64, "--batches", 1, "--rounds", 1, "--new-tokens", 3,
         "--prompt-len", 8, "--depth", 2, "--vocab", 256, "--max-seq", 64, "--profile-steps", 2,
         "--cache", tmp_path / "cache", "--out", tmp_path)
    res = json.loads((tmp_path / "decode.json").read_text())
    assert res["versions"]["onnxruntime"] and res["configs"][0]["ratios"]["folded_vs_unfused"]["n"] == 1
    assert "folded_vs_unfused" in (tmp_path / "decode.md").read_text()


def test_bench_ttft_writes_results(tmp_path):
    """Both engines on one compiled tiny directory, lockstep (skipped without the onnxruntime-genai venv)."""
    import pytest
    genai_py = BENCH.parent / ".venv-genai" / "bin" / "python"
    if not genai_py.is_file():
        pytest.skip("no onnxruntime-genai venv (.venv-genai, README)")
    sys.path.insert(0, str(BENCH.parent / "tests" / "runtime"))
    from rt_util import compiled_tiny_dir
    _run(BENCH / "bench_ttft.py", "--model-dir", compiled_tiny_dir(), "--no-chat", "--prompt", "once upon a time",
         "--rounds", 2, "--warmup", 0, "--new-tokens", 3, "--out", tmp_path)
    res = json.loads((tmp_path / "ttft.json").read_text())
    assert res["ratios"]["genai_over_ort"]["n"] == 2 and res["replies"]["ort"] == res["replies"]["genai"]
    assert "genai / ort TTFT" in (tmp_path / "ttft.md").read_text()
