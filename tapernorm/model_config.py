"""ModelConfig and the named presets: plain data, torch-free (the CLI lists presets without loading torch)."""
from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass

__all__ = ["ModelConfig", "PRESETS", "preset", "ConfigError"]


class ConfigError(ValueError):
    """A model config is malformed or inconsistent."""


@dataclass
class ModelConfig:
    """Model hyperparameters; `arch` picks the Llama-style ("llama") or GPT-2-style ("gpt2") block."""
    arch: str = "llama"
    vocab_size: int = 4096
    dim: int = 128
    n_layers: int = 8
    n_heads: int = 16
    max_seq_len: int = 512
    hidden_dim: int | None = None
    norm_eps: float | None = None
    rope_theta: float = 10000.0
    taper_mode: str = "baseline"  # baseline | internal | all
    init_std: float = 0.02

    def __post_init__(self):
        if self.arch not in ("llama", "gpt2"):
            raise ConfigError(f"arch {self.arch!r} is not 'llama' or 'gpt2'")
        if self.taper_mode not in ("baseline", "internal", "all"):
            raise ConfigError(f"taper_mode {self.taper_mode!r} is not 'baseline', 'internal' or 'all'")
        for k in ("vocab_size", "dim", "n_layers", "n_heads", "max_seq_len"):
            if int(getattr(self, k)) <= 0:
                raise ConfigError(f"{k} must be a positive integer, got {getattr(self, k)!r}")
        if self.dim % self.n_heads or (self.dim // self.n_heads) % 2:
            raise ConfigError(f"dim {self.dim} must split into {self.n_heads} heads of even size")
        if self.hidden_dim is None:
            self.hidden_dim = 4 * self.dim if self.arch == "gpt2" else 32 * math.ceil(8 * self.dim / 3 / 32)
        if self.norm_eps is None:
            self.norm_eps = 1e-5 if self.arch == "gpt2" else 1e-6

    @property
    def head_dim(self) -> int:
        return self.dim // self.n_heads

    def to_dict(self) -> dict:
        """JSON-ready dict (the `tapernorm` section of config.json)."""
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, d: dict) -> "ModelConfig":
        """Build from a dict, refusing unknown keys with their names."""
        known = {f.name for f in dataclasses.fields(cls)}
        unknown = sorted(set(d) - known)
        if unknown:
            raise ConfigError(f"unknown model config keys {unknown}; known keys: {sorted(known)}")
        return cls(**d)


PRESETS: dict[str, dict] = {
    "tiny": dict(vocab_size=256, dim=32, n_layers=2, n_heads=4, max_seq_len=64),
    "tiny-gpt2": dict(arch="gpt2", vocab_size=256, dim=32, n_layers=2, n_heads=4, max_seq_len=64),
    "w64": dict(dim=64, n_layers=8, n_heads=16),
    "w128": dict(dim=128, n_layers=8, n_heads=16),
    "w256": dict(dim=256, n_layers=8, n_heads=16),
    "w512": dict(dim=512, n_layers=8, n_heads=16),
}


def preset(name: str, **overrides) -> ModelConfig:
    """A named config (tiny, tiny-gpt2, w64, w128, w256, w512) with keyword overrides."""
    if name not in PRESETS:
        raise ConfigError(f"unknown preset {name!r}; choose one of {sorted(PRESETS)}")
    return ModelConfig(**{**PRESETS[name], **overrides})
