"""Runtime test helpers: one tiny compiled model directory per process (real export, real ORT).

Not a conftest.py (that name would shadow tests/conftest.py); test modules import the fixtures from here.
The builders are memoized so several test modules share one export.
"""
from __future__ import annotations

import atexit
import functools
import json
import shutil
import tempfile
from pathlib import Path

import pytest
import torch

from conftest import make_tiny

def train_tiny_tokenizer(out_dir: Path, vocab_size: int = 256) -> Path:
    """A real SentencePiece model (tapernorm.compiler.data) matching the tiny presets' 256-token vocab."""
    from tapernorm.compiler.data import builtin_corpus, train_tokenizer
    path = out_dir / "tokenizer.model"
    train_tokenizer(builtin_corpus(), vocab_size, path)
    return path


def _names(n_layers: int):
    past = [f"past_key_values.{i}.{kv}" for i in range(n_layers) for kv in ("key", "value")]
    pres = [f"present.{i}.{kv}" for i in range(n_layers) for kv in ("key", "value")]
    return ["input_ids", "attention_mask", "position_ids"] + past, ["logits"] + pres


class _Flat(torch.nn.Module):
    """DecoderLM with flat (k, v) cache arguments, for the fallback exporter."""

    def __init__(self, m):
        super().__init__()
        self.m = m

    def forward(self, input_ids, attention_mask, position_ids, *past):
        L = len(past) // 2
        logits, pres = self.m(input_ids, attention_mask, position_ids,
                              [(past[2 * i], past[2 * i + 1]) for i in range(L)], use_cache=True)
        return (logits, *[t for kv in pres for t in kv])


def fallback_export(model, path: Path, ir_version: int = 10) -> Path:
    """Export a DecoderLM with the decoder interface via torch.onnx.export(dynamo=True)."""
    import onnx
    cfg = model.config
    L, H, D = cfg.n_layers, cfg.n_heads, cfg.head_dim
    B, T, P = 2, 3, 4
    ids = torch.randint(0, cfg.vocab_size, (B, T))
    mask = torch.ones(B, P + T, dtype=torch.long)
    pos = torch.arange(P, P + T).expand(B, T)
    past = [torch.randn(B, H, P, D) for _ in range(2 * L)]
    b, s, p, t = (torch.export.Dim(n) for n in ("batch", "seq", "past", "total"))
    ds = {"input_ids": {0: b, 1: s}, "attention_mask": {0: b, 1: t}, "position_ids": {0: b, 1: s},
          "past": tuple({0: b, 2: p} for _ in range(2 * L))}
    ins, outs = _names(L)
    prog = torch.onnx.export(_Flat(model).eval(), (ids, mask, pos, *past), input_names=ins, output_names=outs,
                             dynamic_shapes=ds, dynamo=True, external_data=False, verbose=False)
    mp = prog.model_proto
    mp.ir_version = ir_version
    onnx.save(mp, str(path))
    return path


def compile_tiny(model, out_dir: Path, tokenizer: Path) -> Path:
    """A compiled dir for `model`: the real pipeline if it exists, else the fallback exporter."""
    out_dir.mkdir(parents=True, exist_ok=True)
    fallback_export(model, out_dir / "model_unfused.onnx")
    shutil.copy(out_dir / "model_unfused.onnx", out_dir / "model.onnx")
    shutil.copy(tokenizer, out_dir / "tokenizer.model")
    cfg = model.config
    (out_dir / "config.json").write_text(json.dumps({"tapernorm": cfg.to_dict()}))
    (out_dir / "runtime.json").write_text(json.dumps(dict(
        n_layers=cfg.n_layers, n_heads=cfg.n_heads, head_dim=cfg.head_dim, vocab_size=cfg.vocab_size,
        max_seq_len=cfg.max_seq_len, dtype="float32", eos_id=2, bos_id=1)))
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
def compiled_tiny_dir(arch: str = "tiny", mode: str = "internal") -> Path:
    """A compiled dir for tiny_model_cached(arch, mode) (built once per process)."""
    return compile_tiny(tiny_model_cached(arch, mode), _TMP / f"compiled-{arch}-{mode}", tiny_tokenizer_path())


@pytest.fixture
def tiny_tokenizer() -> Path:
    """Path to a tiny trained SentencePiece model."""
    return tiny_tokenizer_path()


@pytest.fixture
def tiny_model():
    """The tiny Llama-style Internal-Taper model at gate 0 that `compiled_dir` was built from."""
    return tiny_model_cached()


@pytest.fixture
def compiled_dir() -> Path:
    """A compiled tiny model directory (model.onnx, model_unfused.onnx, tokenizer, runtime.json)."""
    return compiled_tiny_dir()
