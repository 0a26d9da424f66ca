"""--engine genai: onnxruntime-genai's loop on a lean compiled directory gives our runtime's greedy tokens.

onnxruntime-genai needs the plain onnxruntime package, which clashes with onnxruntime-gpu, so it lives in its
own venv with tapernorm installed --no-deps (README): these tests run it through that venv's python ($TAPERNORM_GENAI_PYTHON or .venv-genai/ beside
the repo) and skip, saying why, where there is none. Without genai here, --engine genai is one line."""
import json
import os
import subprocess
from pathlib import Path

import pytest

from rt_util import compiled_tiny_dir
from tapernorm.compiler import cli
from tapernorm.runtime import DecoderSession, OrtDecoder, generate_ids
from tapernorm.runtime.genai_engine import genai_available

ROOT = Path(__file__).resolve().parents[2]
GENAI_PY = next((p for p in (os.environ.get("TAPERNORM_GENAI_PYTHON"), str(ROOT / ".venv-genai" / "bin" / "python"))
                 if p and Path(p).is_file()), None)
SCRIPT = """
import json, sys
from tapernorm.runtime.genai_engine import GenaiEngine
r = GenaiEngine(sys.argv[1], threads=1).generate_ids(json.loads(sys.argv[2]), max_new_tokens=10)
print(json.dumps(r.tokens))
"""


@pytest.mark.skipif(GENAI_PY is None, reason="no onnxruntime-genai venv (set TAPERNORM_GENAI_PYTHON or create "
                                             ".venv-genai, see README: onnxruntime-genai engine)")
def test_genai_loop_matches_our_runtime():
    d = compiled_tiny_dir()
    prompts = [[1, 5, 6, 7, 8, 9], [1, 40, 41, 42, 43, 44]]
    ours = generate_ids(OrtDecoder(DecoderSession(d, provider="cpu", intra_op_threads=1)), prompts,
                        max_new_tokens=10).tokens
    proc = subprocess.run([GENAI_PY, "-c", SCRIPT, str(d), json.dumps(prompts)], capture_output=True,
                          text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert json.loads(proc.stdout.strip().splitlines()[-1]) == ours


@pytest.mark.skipif(genai_available(), reason="onnxruntime-genai is importable here")
def test_engine_genai_without_genai_is_one_line(capsys):
    rc = cli.main(["generate", str(compiled_tiny_dir()), "--prompt", "hi", "--engine", "genai"])
    err = capsys.readouterr().err.strip()
    assert rc == 2 and len(err.splitlines()) == 1 and "onnxruntime-genai is not installed" in err and "venv" in err


@pytest.mark.skipif(GENAI_PY is None, reason="no onnxruntime-genai venv (set TAPERNORM_GENAI_PYTHON or create "
                                             ".venv-genai, see README: onnxruntime-genai engine)")
def test_genai_schema_mismatch_names_the_key(tmp_path):
    import shutil
    d = tmp_path / "m"
    shutil.copytree(compiled_tiny_dir(), d)
    conf = json.loads((d / "genai_config.json").read_text())
    conf["model"]["decoder"]["bogus_key"] = 1  # what a genai with another schema would refuse
    (d / "genai_config.json").write_text(json.dumps(conf))
    proc = subprocess.run([GENAI_PY, "-m", "tapernorm.compiler.cli", "generate", str(d), "--prompt", "hi",
                           "--engine", "genai"], capture_output=True, text=True, timeout=300)
    assert proc.returncode == 2 and len(proc.stderr.strip().splitlines()) == 1
    assert "bogus_key" in proc.stderr and "onnxruntime-genai 0.18" in proc.stderr
