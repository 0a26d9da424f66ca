"""Next-token sampling on host logits: greedy, temperature, top-k, top-p, with a seeded generator.

Pure numpy, shared by the onnxruntime and the PyTorch decoders so both sample identically.
"""
from __future__ import annotations

from dataclasses import dataclass

import numpy as np

__all__ = ["SamplingParams", "Sampler", "filter_logits", "sample_logits"]


@dataclass
class SamplingParams:
    """temperature <= 0 means greedy; top_k <= 0 and top_p >= 1 disable those filters."""
    temperature: float = 0.0
    top_k: int = 0
    top_p: float = 1.0
    seed: int | None = 0

    def __post_init__(self):
        if not np.isfinite(self.temperature) or self.temperature < 0:
            raise ValueError(f"temperature {self.temperature!r} must be >= 0 (0 = greedy)")
        if int(self.top_k) < 0:
            raise ValueError(f"top_k {self.top_k!r} must be >= 0 (0 = off)")
        if not (0.0 < float(self.top_p) <= 1.0):
            raise ValueError(f"top_p {self.top_p!r} must be in (0, 1] (1 = off)")

    @property
    def greedy(self) -> bool:
        """True when sampling reduces to argmax."""
        return self.temperature <= 0 or self.top_k == 1


def filter_logits(logits: np.ndarray, temperature: float = 1.0, top_k: int = 0, top_p: float = 1.0) -> np.ndarray:
    """Probabilities (B, V) after temperature, top-k (ties at the k-th value kept) and top-p (nucleus)."""
    x = np.asarray(logits, dtype=np.float64) / max(float(temperature), 1e-8)  # (B, V)
    V = x.shape[-1]
    if 0 < top_k < V:
        kth = np.partition(x, V - top_k, axis=-1)[:, V - top_k:V - top_k + 1]  # (B, 1) k-th largest
        x = np.where(x < kth, -np.inf, x)
    x = x - x.max(axis=-1, keepdims=True)
    p = np.exp(x)
    p /= p.sum(axis=-1, keepdims=True)
    if top_p < 1.0:
        order = np.argsort(-p, axis=-1, kind="stable")  # (B, V) descending
        ps = np.take_along_axis(p, order, axis=-1)
        before = np.cumsum(ps, axis=-1) - ps  # mass strictly ahead of each token
        keep_sorted = before < top_p  # the smallest prefix reaching top_p (the first token always kept)
        keep = np.zeros_like(keep_sorted)
        np.put_along_axis(keep, order, keep_sorted, axis=-1)
        p = np.where(keep, p, 0.0)
        p /= p.sum(axis=-1, keepdims=True)
    return p


def sample_logits(logits: np.ndarray, params: SamplingParams, rng: np.random.Generator | None) -> np.ndarray:
    """Next tokens (B,) int64 from logits (B, V)."""
    if params.greedy:
        return logits.argmax(axis=-1).astype(np.int64)
    p = filter_logits(logits, params.temperature, params.top_k, params.top_p)
    cdf = np.cumsum(p, axis=-1)  # (B, V)
    u = rng.random((p.shape[0], 1)) * cdf[:, -1:]
    idx = (cdf <= u).sum(axis=-1)  # first index with cdf > u
    idx = np.minimum(idx, p.shape[-1] - 1)
    # never land on a zero-probability token through float rounding
    bad = p[np.arange(p.shape[0]), idx] == 0
    if bad.any():
        idx[bad] = p[bad].argmax(axis=-1)
    return idx.astype(np.int64)


class Sampler:
    """A stateful sampler: `sampler(logits (B, V)) -> tokens (B,)`, reproducible from `params.seed`."""

    def __init__(self, params: SamplingParams | None = None):
        self.params = params or SamplingParams()
        self.rng = np.random.default_rng(self.params.seed)

    def __call__(self, logits: np.ndarray) -> np.ndarray:
        return sample_logits(logits, self.params, self.rng)
