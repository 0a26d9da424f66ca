"""`tapernorm generate` end to end in a subprocess, on a compiled tiny model."""
import os
import subprocess
import sys


ENV = {**os.environ, "OMP_NUM_THREADS": "1"}


def _run(*args):
    return subprocess.run([sys.executable, "-m", "tapernorm.compiler.cli", *args], capture_output=True, text=True,
                          env=ENV, timeout=120)


def test_generate_cli_end_to_end(compiled_dir):
    p = _run("generate", str(compiled_dir), "--prompt", "once upon a time", "--max-new-tokens", "12",
             "--provider", "cpu", "--threads", "1")
    assert p.returncode == 0, p.stderr
    assert p.stdout.startswith("once upon a time") and len(p.stdout.strip()) > len("once upon a time")
    assert "providers ['CPUExecutionProvider']" in p.stderr and "tok/s" in p.stderr
    again = _run("generate", str(compiled_dir), "--prompt", "once upon a time", "--max-new-tokens", "12",
                 "--provider", "cpu", "--threads", "1", "--unfused", "--temperature", "0.8", "--top-k", "20",
                 "--top-p", "0.9", "--seed", "3", "--quiet-prompt")
    assert again.returncode == 0, again.stderr
    assert not again.stdout.startswith("once upon a time")


def test_generate_cli_cuda_request_without_gpu_reports_cpu(compiled_dir):
    p = _run("generate", str(compiled_dir), "--prompt", "hello", "--max-new-tokens", "3", "--provider", "cuda",
             "--threads", "1")
    assert p.returncode == 0, p.stderr
    assert "providers [" in p.stderr  # whatever was actually used is printed
    if "providers ['CPUExecutionProvider']" in p.stderr:  # CUDA did not load: said in one warning line
        assert "tapernorm generate: warning: provider 'cuda' was requested" in p.stderr
        assert "RuntimeWarning" not in p.stderr


def test_generate_cli_bad_inputs_one_line(compiled_dir, tmp_path):
    p = _run("generate", str(tmp_path), "--prompt", "hi")
    assert p.returncode == 2
    err = p.stderr.strip()
    assert len(err.splitlines()) == 1 and "not a compiled tapernorm model" in err
    p = _run("generate", str(compiled_dir), "--prompt", "once upon a time " * 40, "--provider", "cpu")
    assert p.returncode == 2
    err = p.stderr.strip().splitlines()
    assert len(err) == 1 and "context is 64" in err[0] and p.stdout == ""
