"""Runtime fixtures: a tiny compiled model directory and its source model, built once per process."""
from pathlib import Path

import pytest

from rt_util import compiled_tiny_dir, tiny_model_cached, tiny_tokenizer_path


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
