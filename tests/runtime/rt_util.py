"""Runtime test helpers: one tiny compiled model directory per process (real export, real ORT).

The builders are memoized so several test modules share one export; the pytest fixtures over them are in
tests/runtime/conftest.py.
"""
from __future__ import annotations

import atexit
import functools
import shutil
import tempfile
from pathlib import Path

import torch

from tiny_models import make_tiny


def train_tiny_tokenizer(out_dir: Path, vocab_size: int = 256) -> Path:
    """A real SentencePiece model (tapernorm.data) matching the tiny presets' 256-token vocab."""
    from tapernorm.data import builtin_corpus, train_tokenizer
    path = out_dir / "tokenizer.model"
    train_tokenizer(builtin_corpus(), vocab_size, path)
    return path


def compile_tiny(model, out_dir: Path, tokenizer: Path, graph: str = "lean") -> Path:
    """A compiled dir for `model` through the real product: save_checkpoint -> compile_checkpoint
    (capture, fold + materialize, ONNX export of both, parity, report)."""
    from tapernorm.checkpoint import save_checkpoint
    from tapernorm.compiler.pipeline import compile_checkpoint
    ckpt = out_dir.parent / (out_dir.name + "-ckpt")
    save_checkpoint(model, ckpt, tokenizer_path=tokenizer)
    compile_checkpoint(ckpt, out_dir, parity_tokens=4, graph=graph, unfused=True)  # the runtime tests read both
    return out_dir


_TMP = Path(tempfile.mkdtemp(prefix="tapernorm-rt-"))
atexit.register(shutil.rmtree, _TMP, ignore_errors=True)


@functools.lru_cache(maxsize=None)
def tiny_tokenizer_path() -> Path:
    """A tiny trained SentencePiece model (built once per process)."""
    d = _TMP / "sp"
    d.mkdir()
    return train_tiny_tokenizer(d)


def diverse_tiny(arch: str = "tiny", mode: str = "internal", scale: float = 8.0, seed: int = 0):
    """make_tiny with projections/embeddings scaled up so greedy decoding is varied (not one repeated token)."""
    m = make_tiny(arch, mode, seed=seed)
    with torch.no_grad():
        for n, p in m.named_parameters():
            if n.endswith(("proj.weight", "embed_tokens.weight", "fc_in.weight", "fc_out.weight")):
                p.mul_(scale)
    return m


@functools.lru_cache(maxsize=None)
def tiny_model_cached(arch: str = "tiny", mode: str = "internal"):
    """A tiny diverse model at gate 0 (built once per process; treat as read-only)."""
    return diverse_tiny(arch, mode)


@functools.lru_cache(maxsize=None)
def compiled_tiny_dir(arch: str = "tiny", mode: str = "internal", graph: str = "lean") -> Path:
    """A compiled dir for tiny_model_cached(arch, mode) (built once per process); graph "lean" or "generic"."""
    suffix = "" if graph == "lean" else f"-{graph}"
    return compile_tiny(tiny_model_cached(arch, mode), _TMP / f"compiled-{arch}-{mode}{suffix}", tiny_tokenizer_path(),
                        graph)
