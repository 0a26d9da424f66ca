"""The package layering: imports form a DAG that reads like the pipeline.

For each package, a fresh interpreter imports it and we look at what else landed in sys.modules.
"""
from __future__ import annotations

import ast
import json
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
PKGS = ("tapernorm.train", "tapernorm.passes", "tapernorm.compiler", "tapernorm.runtime")


def _loaded(stmt: str) -> set[str]:
    code = (f"import sys\n{stmt}\nimport json\n"
            "print(json.dumps(sorted(m for m in sys.modules if m == 'torch' or m.startswith('tapernorm'))))")
    r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120, cwd=ROOT)
    assert r.returncode == 0, r.stderr
    return set(json.loads(r.stdout.strip().splitlines()[-1]))


def _others(mods: set[str], own: str) -> set[str]:
    return {p for p in PKGS if p != own and any(m == p or m.startswith(p + ".") for m in mods)}


def test_runtime_imports_no_torch_and_nothing_of_ours():
    mods = _loaded("import tapernorm.runtime, tapernorm.runtime.generate, tapernorm.runtime.session")
    assert "torch" not in mods
    assert _others(mods, "tapernorm.runtime") == set()
    core = {m for m in mods if m.startswith("tapernorm.") and not m.startswith("tapernorm.runtime")}
    assert core <= {"tapernorm.lazy"}, core


def test_cli_parser_and_generate_path_import_no_torch():
    mods = _loaded("from tapernorm.compiler import cli; cli.build_parser()")
    assert "torch" not in mods
    assert not any(m.startswith("tapernorm.passes") for m in mods)


def test_passes_import_only_the_core():
    mods = _loaded("import tapernorm.passes")
    assert _others(mods, "tapernorm.passes") == set()


def test_core_and_trainer_import_no_later_stage():
    assert _others(_loaded("import tapernorm; tapernorm.taperize; tapernorm.build_model"), "") == set()
    assert _others(_loaded("import tapernorm.train.trainer, tapernorm.train.plot"), "tapernorm.train") == set()


def test_compiler_may_import_everything():
    mods = _loaded("import tapernorm.compiler.pipeline")
    assert {"tapernorm.passes", "tapernorm.runtime"} <= _others(mods, "tapernorm.compiler")


def _imports(path: Path) -> list[str]:
    """Absolute module names imported anywhere in a file (relative imports resolved)."""
    rel = path.relative_to(ROOT).with_suffix("")
    parts = list(rel.parts)
    top = {"passes": "tapernorm.passes", "compiler": "tapernorm.compiler", "runtime": "tapernorm.runtime"}
    pkg = [*top.get(parts[0], parts[0]).split("."), *parts[1:-1]]
    out = []
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            out += [a.name for a in node.names]
        elif isinstance(node, ast.ImportFrom):
            base = pkg[: len(pkg) - node.level + 1] if node.level else []
            out.append(".".join([*base, *(node.module or "").split(".")]).strip("."))
    return out


@pytest.mark.parametrize("folder,forbidden", [
    ("tapernorm", ("tapernorm.passes", "tapernorm.compiler", "tapernorm.runtime")),
    ("passes", ("tapernorm.compiler", "tapernorm.runtime", "tapernorm.train")),
    ("runtime", ("tapernorm.passes", "tapernorm.compiler", "tapernorm.train")),
])
def test_no_source_file_imports_a_later_stage(folder, forbidden):
    """Function-level imports included: no lazy import dodges the layering."""
    bad = [(str(p.relative_to(ROOT)), m) for p in (ROOT / folder).rglob("*.py") for m in _imports(p)
           if m.startswith(forbidden)]
    assert not bad


def test_runtime_reaches_the_core_only_through_torch_ref():
    users = {str(p.relative_to(ROOT)) for p in (ROOT / "runtime").rglob("*.py")
             if any(m.startswith("tapernorm.") and not m.startswith("tapernorm.runtime") for m in _imports(p))}
    assert users <= {"runtime/torch_ref.py"}


def test_torch_free_copies_match_their_sources():
    from tapernorm.compiler.defaults import DTYPE_NAMES
    from tapernorm.compiler.export_onnx import DTYPES
    assert sorted(DTYPE_NAMES) == sorted(DTYPES)
