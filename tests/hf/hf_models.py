"""Tiny Hugging Face causal LMs built from configs, saved with a SentencePiece tokenizer (no hub access).

`tok_dir()` trains one 256-piece SentencePiece model per process (tokenizer.model + tokenizer_config.json);
`hf_dir(kind, root)` saves a tiny HF model of that family with those tokenizer files.
"""
from __future__ import annotations

import atexit
import functools
import json
import shutil
import tempfile
from pathlib import Path

import torch

VOCAB = 256
KINDS = ("llama", "llama_mha", "gpt2", "mistral", "qwen2", "phi3", "gpt_neox", "opt")


def _tmpdir(prefix: str) -> Path:
    """A temporary directory removed when the test process exits (the builders below cache per process)."""
    d = Path(tempfile.mkdtemp(prefix=prefix))
    atexit.register(shutil.rmtree, d, True)
    return d


@functools.lru_cache(maxsize=None)
def tok_dir() -> Path:
    """A directory with tokenizer.model (SentencePiece, 256 pieces, bos 1 / eos 2) and tokenizer_config.json."""
    from tapernorm.data import builtin_corpus, train_tokenizer
    from tapernorm.hf_config import sp_tokenizer_info
    d = _tmpdir("tapernorm-hf-tok-")
    train_tokenizer(builtin_corpus()[:60], VOCAB, d / "tokenizer.model")
    _, cfg = sp_tokenizer_info(d / "tokenizer.model", 128)
    (d / "tokenizer_config.json").write_text(json.dumps(cfg))
    return d


def hf_config(kind: str):
    """A tiny config of the family `kind` (2 layers, width 32, vocab 256, 128 positions)."""
    import transformers as tf
    common = dict(vocab_size=VOCAB, bos_token_id=1, eos_token_id=2)
    llama_like = dict(hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
                      num_key_value_heads=2, max_position_embeddings=128, **common)
    if kind == "llama":
        return tf.LlamaConfig(**llama_like, tie_word_embeddings=True)
    if kind == "llama_mha":  # what our reference DecoderLM computes exactly (lean graph)
        return tf.LlamaConfig(**{**llama_like, "num_key_value_heads": 4}, tie_word_embeddings=True)
    if kind == "mistral":
        return tf.MistralConfig(**llama_like, sliding_window=None)
    if kind == "qwen2":
        return tf.Qwen2Config(**llama_like, tie_word_embeddings=True)
    if kind == "phi3":
        return tf.Phi3Config(**llama_like, pad_token_id=0)
    if kind == "gpt2":
        return tf.GPT2Config(n_embd=32, n_layer=2, n_head=4, n_positions=128, **common)
    if kind == "gpt_neox":
        return tf.GPTNeoXConfig(hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
                                max_position_embeddings=128, rotary_pct=0.5, **common)
    if kind == "opt":
        return tf.OPTConfig(hidden_size=32, ffn_dim=64, num_hidden_layers=2, num_attention_heads=4,
                            max_position_embeddings=128, word_embed_proj_dim=32, pad_token_id=0, **common)
    raise ValueError(kind)


def hf_model(kind: str, seed: int = 0):
    """A fresh tiny HF causal LM of `kind` with non-trivial norm gains, eval mode."""
    import transformers as tf
    tf.logging.set_verbosity_error()
    torch.manual_seed(seed)
    model = tf.AutoModelForCausalLM.from_config(hf_config(kind))
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, m in model.named_modules():
            w = getattr(m, "weight", None)
            if "norm" in type(m).__name__.lower() and isinstance(w, torch.Tensor) and w.dim() == 1:
                w.copy_(torch.rand(w.shape, generator=g) + 0.5)
                if getattr(m, "bias", None) is not None:
                    m.bias.copy_(torch.rand(w.shape, generator=g) * 0.4 - 0.2)
    return model.eval()


def hf_dir(kind: str, root: Path, seed: int = 0) -> Path:
    """Save a tiny HF model of `kind` with the SentencePiece tokenizer files into root/kind; returns the path."""
    d = Path(root) / kind
    hf_model(kind, seed).save_pretrained(d)
    for f in ("tokenizer.model", "tokenizer_config.json"):
        (d / f).write_bytes((tok_dir() / f).read_bytes())
    return d


def token_batches(n: int = 3, batch: int = 2, seq: int = 12, seed: int = 0) -> list[torch.Tensor]:
    """Deterministic random token batches (B, T)."""
    g = torch.Generator().manual_seed(seed)
    return [torch.randint(3, VOCAB, (batch, seq), generator=g) for _ in range(n)]


def tapered(kind: str, mode: str = "internal", gate: float = 0.0, seed: int = 0):
    """A tiny HF model of `kind`, taperized in `mode`, calibrated on random tokens, at `gate`, eval."""
    from tapernorm import calibrate, set_gate, taperize
    model = hf_model(kind, seed)
    taperize(model, mode)
    calibrate(model, token_batches(), forward=lambda m, b: m(input_ids=b, use_cache=False))
    set_gate(model, gate)
    return model.eval()


def logits(model, ids: torch.Tensor) -> torch.Tensor:
    """Full-sequence logits (B, T, V) without a cache."""
    with torch.no_grad():
        return model(input_ids=ids, use_cache=False).logits


FT_ARGS = ["--steps", "12", "--taper-start", "3", "--taper-end", "9", "--warmup-steps", "2", "--seq-len", "32",
           "--batch-size", "4", "--lr", "3e-3", "--max-docs", "40", "--eval-batches", "2"]


@functools.lru_cache(maxsize=None)
def finetuned_dir(kind: str, mode: str) -> Path:
    """`tapernorm finetune` (through the CLI, in process) of a tiny HF model of `kind` in `mode`; the run dir."""
    from tapernorm.compiler.cli import main
    root = _tmpdir(f"tapernorm-ft-{kind}-{mode}-")
    src = hf_dir(kind, root / "src")
    out = root / "ft"
    assert main(["finetune", str(src), "--out", str(out), "--mode", mode, *FT_ARGS]) == 0
    return out
