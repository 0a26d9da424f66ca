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


def sharpen_pos0(model):
    """Random ids have no attention sink (c0 ~ c): make position 0's scale clearly its own (c0 halved)."""
    from tapernorm import taper_layers
    for _, layer in taper_layers(model):
        layer.c0.mul_(0.5)
    return model


def make_pos0(arch: str = "tiny", mode: str = "internal", pos0: bool = True, batches=None, embed_scale: float = 1.0):
    """A tiny reference model (2 heads) calibrated with (or without) position 0's own scale, at gate 0, eval.
    embed_scale multiplies the token embeddings (logits of a useful size, so greedy tokens vary)."""
    torch.manual_seed(0)
    model = build_model(arch, taper_mode=mode, n_heads=2)
    if embed_scale != 1.0:
        with torch.no_grad():
            model.embed_tokens.weight.mul_(embed_scale)
    calibrate(model, batches if batches is not None else random_batches(), pos0=pos0)
    set_gate(sharpen_pos0(model) if pos0 else model, 0.0)
    return model.eval()
