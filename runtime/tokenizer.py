"""Tokenizers for generation: Hugging Face `tokenizer.json` (the `tokenizers` library) and SentencePiece
`tokenizer.model`, plus the prompt rules a compiled directory's runtime.json records (stop ids, BOS).

Both tokenizers share one small interface:

    encode(text, special=True) -> ids   (no BOS/EOS added: `PromptRules.prompt_ids` adds BOS by the rule)
    decode(ids) -> text                 (special tokens skipped)
    token_id(piece) -> id | None, eos_id, bos_id, vocab_size

`special=True` lets a tokenizer.json match its added special tokens in the text (`<|im_start|>` in a rendered chat
template becomes one id, as transformers' apply_chat_template does). Torch-free: numpy, tokenizers, sentencepiece.
"""
from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Sequence

__all__ = ["SPTokenizer", "HFTokenizer", "load_tokenizer", "find_tokenizer", "PromptRules", "StopStrings",
           "TextStreamer", "TOKENIZER_FILES"]

TOKENIZER_FILES = ("tokenizer.json", "tokenizer.model")  # what the runtime can read, in preference order


class SPTokenizer:
    """A SentencePiece tokenizer.model (the runtime reads it directly, no torch)."""

    kind = "sentencepiece"

    def __init__(self, path: str | Path):
        import sentencepiece as spm
        self.path = Path(path)
        self.sp = spm.SentencePieceProcessor(model_file=str(path))
        self.vocab_size = self.sp.get_piece_size()
        self.eos_id = self.sp.eos_id() if self.sp.eos_id() >= 0 else None
        self.bos_id = self.sp.bos_id() if self.sp.bos_id() >= 0 else None

    def encode(self, text: str, special: bool = True) -> list[int]:
        """Token ids of `text` (no BOS; PromptRules adds it)."""
        return list(self.sp.encode(text))

    def decode(self, ids: Sequence[int]) -> str:
        """Text of `ids`."""
        return self.sp.decode([int(i) for i in ids])

    def token_id(self, piece: str) -> int | None:
        """Id of a piece, None if the model has no such piece."""
        i = self.sp.piece_to_id(piece)
        return i if i != self.sp.unk_id() or piece == self.sp.id_to_piece(i) else None


class HFTokenizer:
    """A Hugging Face tokenizer.json through the torch-free `tokenizers` library."""

    kind = "tokenizers"

    def __init__(self, path: str | Path):
        import tokenizers
        self.path = Path(path)
        self.tk = tokenizers.Tokenizer.from_file(str(path))
        self.vocab_size = self.tk.get_vocab_size(with_added_tokens=True)
        self.eos_id = self.bos_id = None  # a tokenizer.json does not say; PromptRules reads runtime.json

    def encode(self, text: str, special: bool = True) -> list[int]:
        """Token ids of `text` without the post-processor's BOS/EOS (PromptRules adds BOS)."""
        return list(self.tk.encode(text, add_special_tokens=False).ids)

    def decode(self, ids: Sequence[int]) -> str:
        """Text of `ids`, special tokens skipped."""
        return self.tk.decode([int(i) for i in ids], skip_special_tokens=True)

    def token_id(self, piece: str) -> int | None:
        """Id of a token (added tokens included), None if unknown."""
        return self.tk.token_to_id(piece)


def find_tokenizer(model_dir: str | Path, prefer: str | None = None) -> Path | None:
    """The tokenizer file to use in `model_dir`: `prefer` (runtime.json's "tokenizer") if present, else
    tokenizer.json, else tokenizer.model; None when there is none."""
    d = Path(model_dir)
    for name in ((prefer,) if prefer else ()) + TOKENIZER_FILES:
        if (d / name).is_file():
            return d / name
    return None


def load_tokenizer(path: str | Path, prefer: str | None = None) -> SPTokenizer | HFTokenizer:
    """A tokenizer from a file (tokenizer.json / tokenizer.model) or a compiled directory, with one-line errors."""
    path = Path(path)
    if path.is_dir():
        found = find_tokenizer(path, prefer)
        if found is None:
            raise FileNotFoundError(f"{path} has no tokenizer.json or tokenizer.model; compile from a checkpoint that "
                                    "has one (`tapernorm compile` copies them), or decode token ids with "
                                    "runtime.generate_ids")
        path = found
    if not path.is_file():
        raise FileNotFoundError(f"tokenizer {path} is missing; compile from a checkpoint that has a tokenizer "
                                "(`tapernorm compile` copies it), or decode token ids with runtime.generate_ids")
    try:
        return HFTokenizer(path) if path.suffix == ".json" else SPTokenizer(path)
    except Exception as e:  # noqa: BLE001 - tokenizers raises its own Exception type, sentencepiece RuntimeError/OSError
        what = "a tokenizers JSON file" if path.suffix == ".json" else "a SentencePiece model"
        raise ValueError(f"{path} is not {what} ({' '.join(str(e).split())[:200]}); re-run `tapernorm compile`") \
            from None


@dataclass
class PromptRules:
    """How prompts are framed and when decoding stops, from runtime.json (old files: eos_id / bos_id only)."""
    eos_ids: list[int] = field(default_factory=list)
    bos_id: int | None = None
    add_bos: bool = False
    bos_token: str | None = None
    eos_token: str | None = None

    @classmethod
    def from_runtime(cls, rt: dict, tok) -> "PromptRules":
        """Rules from a runtime.json dict, falling back to the tokenizer's own ids (SentencePiece)."""
        eos = rt.get("eos_ids")
        if eos is None:
            one = rt.get("eos_id") if rt.get("eos_id") is not None else tok.eos_id
            eos = [one] if one is not None and one >= 0 else []
        bos = rt.get("bos_id") if rt.get("bos_id") is not None else tok.bos_id
        bos = bos if bos is not None and bos >= 0 else None
        add = rt.get("add_bos")
        add = (bos is not None) if add is None else bool(add) and bos is not None  # old files: BOS when known
        piece = getattr(tok, "sp", None)
        name = (lambda i: piece.id_to_piece(i)) if piece is not None else (lambda i: tok.tk.id_to_token(i))
        return cls([int(e) for e in eos], bos, add, rt.get("bos_token") or (name(bos) if bos is not None else None),
                   rt.get("eos_token") or (name(eos[0]) if eos else None))

    def prompt_ids(self, tok, text: str) -> list[int]:
        """Plain-text prompt ids: BOS (when the rule says so) + the encoded text."""
        ids = tok.encode(text)
        return ([self.bos_id] if self.add_bos and (not ids or ids[0] != self.bos_id) else []) + ids


class StopStrings:
    """Cut streamed text at the first stop string; text that could start a stop string is held back."""

    def __init__(self, stops: Sequence[str] = ()):
        self.stops = [s for s in stops if s]
        self.held = ""
        self.hit = False

    def push(self, piece: str) -> str:
        """Feed new text; returns what can be shown now (sets `hit` when a stop string appeared)."""
        if not self.stops:
            return piece
        text = self.held + piece
        cut = min((i for i in (text.find(s) for s in self.stops) if i >= 0), default=-1)
        if cut >= 0:
            self.hit, self.held = True, ""
            return text[:cut]
        keep = max((k for s in self.stops for k in range(1, len(s)) if text.endswith(s[:k])), default=0)
        self.held = text[len(text) - keep:] if keep else ""
        return text[:len(text) - keep]

    def flush(self) -> str:
        """The held-back text, at the end of generation without a stop."""
        out, self.held = self.held, ""
        return out


class TextStreamer:
    """Incremental detokenization: feed generated ids, get the new text (holds back partial characters).

    Only the last few prompt ids are decoded as context (so a leading space survives), not the whole prompt."""

    CONTEXT = 8

    def __init__(self, tokenizer, prompt_ids: Sequence[int]):
        self.tok, self.ids = tokenizer, list(prompt_ids)[-self.CONTEXT:]
        self.base = tokenizer.decode(self.ids)
        self.emitted = 0

    def push(self, token: int) -> str:
        """Append one token; return the text it completes (may be '')."""
        self.ids.append(int(token))
        text = self.tok.decode(self.ids)
        if not text.startswith(self.base) or text.endswith("\ufffd"):
            return ""
        new = text[len(self.base) + self.emitted:]
        self.emitted += len(new)
        return new


def read_runtime_json(model_dir: str | Path) -> dict:
    """runtime.json of a compiled directory as a dict ({} when absent)."""
    return read_json_or_empty(Path(model_dir) / "runtime.json")


def read_json_or_empty(p: Path) -> dict:
    """A JSON object file as a dict ({} when absent); invalid JSON is a one-line ValueError."""
    if not p.is_file():
        return {}
    try:
        data = json.loads(p.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise ValueError(f"{p} is not valid JSON ({e}); re-run `tapernorm compile`") from None
    return data if isinstance(data, dict) else {}
