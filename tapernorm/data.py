"""Corpora, the SentencePiece tokenizer, random contiguous training windows and a held-out split.

Corpus sources (`load_corpus(spec)`):
    "builtin"                   English text that ships with Python (the stdlib's pydoc_data topics)
    "path/a.txt,path/b.txt"     user text files (UTF-8); documents are separated by blank lines
    "hf:NAME[:SPLIT]"           a Hugging Face dataset's "text" column, e.g. "hf:roneneldan/TinyStories"

The token stream is every document followed by EOS, documents in a seeded shuffled order; its tail
(`val_frac` of the tokens) is the validation split. Training windows of seq_len + 1 tokens start at
offsets drawn from a generator seeded by (seed, step), so the data order is a pure function of the
step: deterministic, identical across DDP world sizes for the same global batch, and resumable.
"""
from __future__ import annotations

import io
import os
import random
from dataclasses import dataclass
from pathlib import Path

import torch

from .fileio import atomic_write_bytes
__all__ = [
    "Tokenizer", "train_tokenizer", "load_corpus", "builtin_corpus", "TokenData", "tokenize_corpus",
    "batch_at", "val_batches",
]


class Tokenizer:
    """A SentencePiece model: encode / decode, eos_id, bos_id, vocab_size; load(path) / save(path)."""

    def __init__(self, model_proto: bytes, path: str | None = None):
        import sentencepiece as spm
        self.sp = spm.SentencePieceProcessor()
        try:
            self.sp.LoadFromSerializedProto(model_proto)
        except Exception as e:  # sentencepiece raises a bare RuntimeError/OSError on bad protos
            raise ValueError(f"{path or 'tokenizer'}: not a SentencePiece model ({e}); retrain it with "
                             "`tapernorm train` or pass the right tokenizer.model") from None
        self.model_proto = bytes(model_proto)
        self.path = path

    @classmethod
    def load(cls, path: str | os.PathLike) -> "Tokenizer":
        """Load a SentencePiece `tokenizer.model` file."""
        p = Path(path)
        if not p.is_file():
            raise FileNotFoundError(f"tokenizer file {p} does not exist; pass the tokenizer.model of a run")
        return cls(p.read_bytes(), str(p))

    def save(self, path: str | os.PathLike) -> None:
        """Write the model proto atomically."""
        atomic_write_bytes(Path(path), self.model_proto)

    def encode(self, text: str) -> list[int]:
        """Text -> token ids (no BOS/EOS added)."""
        return self.sp.encode(text)

    def encode_batch(self, texts: list[str]) -> list[list[int]]:
        """Many texts -> token id lists."""
        return self.sp.encode(texts)

    def decode(self, ids: list[int]) -> str:
        """Token ids -> text."""
        return self.sp.decode([int(i) for i in ids])

    @property
    def vocab_size(self) -> int:
        return int(self.sp.get_piece_size())

    @property
    def eos_id(self) -> int:
        return int(self.sp.eos_id())

    @property
    def bos_id(self) -> int:
        return int(self.sp.bos_id())

    def __repr__(self) -> str:
        return f"Tokenizer(vocab_size={self.vocab_size}, path={self.path!r})"


def train_tokenizer(docs: list[str], vocab_size: int = 256, out_path: str | os.PathLike | None = None,
                    model_type: str = "bpe", max_sentences: int = 200_000) -> Tokenizer:
    """Train a SentencePiece model (unk=0, bos=1, eos=2, no pad) on the lines of `docs`; write it atomically to out_path."""
    import sentencepiece as spm
    if vocab_size < 8:
        raise ValueError(f"tokenizer vocab size {vocab_size} is too small; use at least 8 (e.g. 256)")
    lines = [ln for d in docs for ln in d.splitlines() if ln.strip()]
    if not lines:
        raise ValueError("the corpus has no text to train a tokenizer on; pass a non-empty corpus")
    if len(lines) > max_sentences:  # deterministic subsample keeps training time bounded
        lines = random.Random(0).sample(lines, max_sentences)
    buf = io.BytesIO()
    try:
        spm.SentencePieceTrainer.train(
            sentence_iterator=iter(lines), model_writer=buf, vocab_size=vocab_size, model_type=model_type,
            character_coverage=0.9995, unk_id=0, bos_id=1, eos_id=2, pad_id=-1, num_threads=1,
            max_sentence_length=1 << 16, minloglevel=2, hard_vocab_limit=True,
        )
    except RuntimeError as e:
        raise ValueError(f"SentencePiece could not train a {vocab_size}-piece vocabulary on this corpus "
                         f"({str(e).strip().splitlines()[-1]}); change --vocab-size") from None
    tok = Tokenizer(buf.getvalue())
    if out_path is not None:
        tok.save(out_path)
        tok.path = str(out_path)
    return tok


# -- corpora -------------------------------------------------------------------------------------

def builtin_corpus() -> list[str]:
    """The embedded default corpus: the stdlib's pydoc_data topics (~465k characters of English), one document each."""
    try:
        from pydoc_data.topics import topics
    except ImportError:  # some distributions strip pydoc_data
        raise RuntimeError("this Python has no pydoc_data module for the builtin corpus; "
                           "pass --corpus PATH.txt with your own text") from None
    return [topics[k] for k in sorted(topics)]


def _read_text_files(spec: str) -> list[str]:
    paths = [Path(p.strip()) for p in spec.split(",") if p.strip()]
    dirs = [str(p) for p in paths if p.is_dir()]
    if dirs:
        raise IsADirectoryError(f"corpus path {dirs[0]} is a directory; pass text file(s) with --corpus "
                                f"(e.g. --corpus {Path(dirs[0]) / 'a.txt'},{Path(dirs[0]) / 'b.txt'}), or --corpus builtin")
    missing = [str(p) for p in paths if not p.is_file()]
    if missing:
        raise FileNotFoundError(f"corpus file {missing[0]} does not exist; pass existing UTF-8 text "
                                "file(s) with --corpus, or --corpus builtin")
    docs = []
    for p in paths:
        try:
            text = p.read_text(encoding="utf-8")
        except UnicodeDecodeError as e:
            raise ValueError(f"corpus file {p} is not UTF-8 text ({e.reason} at byte {e.start}); convert it to UTF-8") from None
        docs += [d.strip() for d in text.split("\n\n") if d.strip()]
    if not docs:
        raise ValueError(f"corpus file(s) {spec} contain no text; pass a non-empty text file")
    return docs


def _load_hf(spec: str, max_docs: int | None) -> list[str]:
    parts = spec[3:].split(":")
    name, split = parts[0], (parts[1] if len(parts) > 1 else "train")
    try:
        import datasets  # optional; imported only when asked for
    except ImportError:
        raise RuntimeError(f"corpus {spec!r} needs the Hugging Face `datasets` package, which is not installed; "
                           "`pip install datasets`, or pass --corpus builtin / a text file") from None
    try:
        ds = datasets.load_dataset(name, split=split if max_docs is None else f"{split}[:{max_docs}]")
    except Exception as e:  # network / hub / name errors all end here
        msg = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        raise RuntimeError(f"could not load Hugging Face dataset {name!r} split {split!r} ({msg}); "
                           "check the name and network, or pass --corpus builtin / a text file") from None
    if "text" not in ds.column_names:
        raise ValueError(f"dataset {name!r} has no 'text' column (columns: {ds.column_names})")
    return [t for t in ds["text"] if t and t.strip()]


def load_corpus(spec: str = "builtin", max_docs: int | None = None, max_chars: int | None = None) -> list[str]:
    """Documents of a corpus spec ("builtin", "a.txt,b.txt", "hf:NAME[:SPLIT]"), optionally capped."""
    if spec == "builtin":
        docs = builtin_corpus()
    elif spec.startswith("hf:"):
        docs = _load_hf(spec, max_docs)
    else:
        docs = _read_text_files(spec)
    if max_docs is not None:
        docs = docs[:max_docs]
    if max_chars is not None:
        out, n = [], 0
        for d in docs:
            if n >= max_chars:
                break
            out.append(d[: max_chars - n])
            n += len(out[-1])
        docs = out
    return docs


# -- token streams, windows, split --------------------------------------------------------------

@dataclass
class TokenData:
    """Train and validation token streams (1-D int64 tensors)."""
    train: torch.Tensor
    val: torch.Tensor


def tokenize_corpus(docs: list[str], tok: Tokenizer, seq_len: int, val_frac: float = 0.1,
                    split_seed: int = 0) -> TokenData:
    """Shuffle documents (seeded), encode each + EOS, and hold out the last val_frac of tokens."""
    if not 0.0 < val_frac < 1.0:
        raise ValueError(f"validation fraction {val_frac} must be in (0, 1)")
    order = list(range(len(docs)))
    random.Random(split_seed).shuffle(order)
    ids: list[int] = []
    for piece in tok.encode_batch([docs[i] for i in order]):
        ids += piece
        ids.append(tok.eos_id)
    stream = torch.tensor(ids, dtype=torch.int64)
    n_val = int(len(stream) * val_frac)
    need = seq_len + 2
    if n_val < need or len(stream) - n_val < need:
        raise ValueError(f"corpus is too small: {len(stream)} tokens give fewer than {need} tokens per split "
                         f"at seq_len {seq_len}; use a larger corpus or a smaller --seq-len")
    return TokenData(train=stream[: len(stream) - n_val], val=stream[len(stream) - n_val:])


def batch_at(stream: torch.Tensor, step: int, batch_size: int, seq_len: int, seed: int,
             rank: int = 0, world_size: int = 1) -> tuple[torch.Tensor, torch.Tensor]:
    """Global batch `step` of random contiguous windows; this rank's rows as (inputs, targets), each (B/world, T)."""
    g = torch.Generator().manual_seed((int(seed) * 1_000_003 + int(step)) % (2 ** 63))
    starts = torch.randint(0, len(stream) - seq_len - 1, (batch_size,), generator=g)  # (B,)
    per = batch_size // world_size
    starts = starts[rank * per:(rank + 1) * per]
    win = torch.stack([stream[s: s + seq_len + 1] for s in starts.tolist()])  # (B/world, T+1)
    return win[:, :-1], win[:, 1:]


def val_batches(stream: torch.Tensor, batch_size: int, seq_len: int, max_batches: int | None = None):
    """Non-overlapping validation windows in order, as a list of (inputs, targets) batches (B, T)."""
    n_win = (len(stream) - 1) // seq_len
    wins = [stream[i * seq_len: i * seq_len + seq_len + 1] for i in range(n_win)]
    batches = [wins[i:i + batch_size] for i in range(0, len(wins), batch_size)]
    if max_batches is not None:
        batches = batches[:max_batches]
    out = []
    for b in batches:
        w = torch.stack(b)  # (B, T+1)
        out.append((w[:, :-1], w[:, 1:]))
    return out
