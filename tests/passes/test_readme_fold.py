"""The README's "Fold your own model" code blocks run as written."""
import re
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
HEADING = "## Fold your own model"


def _section() -> str:
    """The "Fold your own model" section of README.md, up to the next heading."""
    text = (ROOT / "README.md").read_text()
    if HEADING not in text:
        pytest.fail(f"no '{HEADING}' section in README.md")
    body = text.split(HEADING, 1)[1]
    nxt = re.search(r"^## ", body, flags=re.M)
    return body[: nxt.start()] if nxt else body


BLOCKS = re.findall(r"```python\n(.*?)```", _section(), flags=re.S)


def test_section_has_user_and_hf_examples():
    assert len(BLOCKS) >= 2
    assert any("transformers" in b for b in BLOCKS)


@pytest.mark.parametrize("i", range(len(BLOCKS)))
def test_readme_block_runs(i):
    if "transformers" in BLOCKS[i]:
        pytest.importorskip("transformers")
    exec(compile(BLOCKS[i], f"README:{HEADING}:block{i}", "exec"), {"__name__": f"readme_block_{i}"})
