"""Every ```python block in README.md runs as written (the fold section has its own test in tests/passes).

Blocks that read `runs/demo/...` get a real tiny checkpoint and compiled directory built there first
(save_checkpoint -> compile_checkpoint), in a temporary working directory.
"""
import re
from pathlib import Path

import pytest

from tiny_models import make_tiny

ROOT = Path(__file__).resolve().parents[1]
SKIP_SECTIONS = ("## Fold your own model",)  # run by tests/passes/test_readme_fold.py


def _blocks():
    text = (ROOT / "README.md").read_text()
    out = []
    for section in re.split(r"(?m)^(?=## )", text):
        if section.startswith(SKIP_SECTIONS):
            continue
        title = section.splitlines()[0] if section else ""
        out += [(title, b) for b in re.findall(r"```python\n(.*?)```", section, flags=re.S)]
    return out


BLOCKS = _blocks()


@pytest.fixture(scope="module")
def demo_dir(tmp_path_factory):
    """runs/demo/run/model (gate-0 checkpoint with a real tokenizer) and runs/demo/compiled."""
    from tapernorm.checkpoint import save_checkpoint
    from tapernorm.data import builtin_corpus, train_tokenizer
    from tapernorm.compiler.pipeline import compile_checkpoint
    root = tmp_path_factory.mktemp("readme")
    demo = root / "runs" / "demo"
    demo.mkdir(parents=True)
    tok = demo / "tokenizer.model"
    train_tokenizer(builtin_corpus(), 256, tok)
    save_checkpoint(make_tiny("tiny", "internal"), demo / "run" / "model", tokenizer_path=tok)
    compile_checkpoint(demo / "run" / "model", demo / "compiled", parity_tokens=4, unfused=True)
    return root


def test_readme_has_python_examples():
    assert len(BLOCKS) >= 5


@pytest.mark.parametrize("i", range(len(BLOCKS)), ids=[f"{t.strip('# ')[:30]}-{i}" for i, (t, _) in enumerate(BLOCKS)])
def test_readme_block_runs(i, request, monkeypatch, tmp_path):
    title, code = BLOCKS[i]
    cwd = request.getfixturevalue("demo_dir") if "runs/demo" in code else tmp_path
    monkeypatch.chdir(cwd)
    exec(compile(code, f"README:{title}:block{i}", "exec"), {"__name__": f"readme_block_{i}"})
