"""Finding attention sinks: tokens whose residual is far larger than the rest ("massive activations").

A pretrained LLM often writes one token (position 0, a BOS, a delimiter) hundreds of times larger than any other
into its residual stream. A norm hides that; a fixed per-feature map at gate 0 cannot (docs/real_checkpoints.md,
section 1). `find_sinks` measures, for every norm, each token's input RMS on a few batches and reports how far the
largest sits above the median: SmolLM2-135M's layer-12 norm sees ~170x, a model without sinks a few x.
"""
from __future__ import annotations

from dataclasses import asdict, dataclass
from typing import Iterable

import torch
import torch.nn as nn

from . import layers  # noqa: F401  (first: replace_norms and layers import each other)
from .replace_norms import find_norms

__all__ = ["SINK_RATIO", "SinkReport", "find_sinks"]

SINK_RATIO = 20.0  # a norm whose largest token input RMS exceeds this x its median sees a sink


@dataclass(frozen=True)
class SinkReport:
    """The spread of per-token norm-input RMS over a few batches: where it is largest, and how many norms see a sink."""
    norm: str            # the norm with the largest max / median ratio
    ratio: float         # that ratio: the largest token's input RMS over the median token's
    position: int        # the largest token's position in its sequence
    norms_over: int      # norms whose ratio exceeds threshold
    norms: int           # norms measured
    threshold: float

    @property
    def found(self) -> bool:
        """True when any norm sees a token more than threshold x its median input RMS."""
        return self.norms_over > 0

    def line(self) -> str:
        """One line for a log: the worst norm, its ratio and position, and the count over the threshold."""
        return (f"{self.norm} sees a token at position {self.position} with {self.ratio:.0f}x the median input RMS; "
                f"{self.norms_over} of {self.norms} norms over {self.threshold:g}x")

    def to_dict(self) -> dict:
        """JSON-ready dict."""
        return asdict(self)


@torch.no_grad()
def find_sinks(model: nn.Module, batches: Iterable[torch.Tensor], threshold: float = SINK_RATIO) -> SinkReport:
    """Run `batches` of input ids (B, T) through `model` (left in its mode) and measure each norm's per-token input
    RMS. Raises ValueError when the model has no norms or no batch is given."""
    norms = find_norms(model)
    if not norms:
        raise ValueError(f"{type(model).__name__} has no RMSNorm / LayerNorm to measure")
    rms: dict[str, list[torch.Tensor]] = {name: [] for name, _ in norms}

    def hook_for(name):
        def hook(_m, args):
            x = args[0].detach().float()                          # (B, T, D), or per head (B, T, H, d)
            r = x.pow(2).mean(-1).sqrt()                          # (B, T[, H])
            rms[name].append(r.reshape(r.shape[0], r.shape[1], -1).amax(-1).cpu())  # (B, T)
        return hook

    handles = [m.register_forward_pre_hook(hook_for(name)) for name, m in norms]
    try:
        n = 0
        for ids in batches:
            model(input_ids=ids.to(next(model.parameters()).device))
            n += 1
    finally:
        for h in handles:
            h.remove()
    if n == 0:
        raise ValueError("find_sinks needs at least one batch of input ids")
    return _report(rms, threshold)


def _report(rms: dict[str, list[torch.Tensor]], threshold: float) -> SinkReport:
    """The SinkReport of per-norm lists of (B, T) RMS tensors (T may differ between batches)."""
    worst, over = ("", 0.0, 0), 0
    for name, parts in rms.items():
        if not parts:  # a norm the forward never called
            continue
        med = torch.cat([p.reshape(-1) for p in parts]).median().item()
        top = max(parts, key=lambda p: p.max().item())            # (B, T): the batch holding the largest token
        ratio = top.max().item() / med if med > 0 else float("inf")
        over += ratio > threshold
        if ratio > worst[1]:
            worst = (name, ratio, int(top.max(0).values.argmax().item()))
    return SinkReport(worst[0], worst[1], worst[2], over, len(rms), threshold)
