"""Shared fixtures; the model builders live in tiny_models.py (importable from any test directory)."""
from __future__ import annotations

import pytest

from tiny_models import make_tiny


@pytest.fixture
def tiny_rms():
    """Tiny Llama-style model, Internal-Taper, gate 0."""
    return make_tiny("tiny", "internal")


@pytest.fixture
def tiny_ln():
    """Tiny GPT-2-style model, Internal-Taper, gate 0."""
    return make_tiny("tiny-gpt2", "internal")
