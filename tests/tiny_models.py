"""Tiny seeded models for tests, calibrated and (optionally) at gate 0. Import as `from tiny_models import make_tiny`."""
from __future__ import annotations

import torch

from tapernorm import build_model, calibrate, set_gate

VOCAB = 256


def random_batches(n: int = 3, batch: int = 2, seq: int = 12, vocab: int = VOCAB, seed: int = 0):
    """Deterministic random token batches (B, T) for calibration."""
    g = torch.Generator().manual_seed(seed)
    return [torch.randint(0, vocab, (batch, seq), generator=g) for _ in range(n)]


def make_tiny(arch: str = "tiny", mode: str = "internal", gate: float | None = 0.0, seed: int = 0):
    """A tiny reference model in `mode`, calibrated on random tokens, at `gate` (None: leave at 1), eval."""
    torch.manual_seed(seed)
    model = build_model(arch, taper_mode=mode)
    with torch.no_grad():  # non-trivial gains so folds are actually exercised
        for name, p in model.named_parameters():
            if name.endswith(("layernorm.weight", "norm.weight")):
                p.uniform_(0.5, 1.5)
            elif name.endswith(("layernorm.bias", "norm.bias")):
                p.uniform_(-0.2, 0.2)
    if mode != "baseline":
        calibrate(model, random_batches())
        if gate is not None:
            set_gate(model, gate)
    return model.eval()
