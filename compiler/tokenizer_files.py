"""The tokenizer side of a compile: copy every tokenizer file and the chat template into the output, and
work out the stop tokens and the BOS rule that runtime.json records.

    collect = copy_tokenizer_files(SRC, OUT, vocab_size)   # SRC: an HF directory or a run's model/ directory

Stop tokens are every end token the checkpoint names: config.json `eos_token_id` (an int or a list; a nested
`text_config` too), generation_config.json `eos_token_id` (often a list), and the tokenizer's special tokens
(tokenizer_config.json / special_tokens_map.json `eos_token`, SentencePiece's eos). The BOS rule is
tokenizer_config.json's `add_bos_token` when it says; otherwise a tokenizer.json adds BOS when its
post-processor puts a special token before the text, and a bare SentencePiece model adds its BOS (our runs).
A source with tokenizer.model but no tokenizer.json gets one converted (transformers' converter, when installed)
so onnxruntime-genai's og.Tokenizer reads the output too.
"""
from __future__ import annotations

import json
import shutil
from dataclasses import dataclass, field
from pathlib import Path

from tapernorm.fileio import atomic_write_text

__all__ = ["TokenizerFiles", "copy_tokenizer_files", "read_tokenizer_files", "update_runtime_json", "COPIED_FILES"]

COPIED_FILES = ("tokenizer.json", "tokenizer.model", "tokenizer_config.json", "special_tokens_map.json",
                "chat_template.jinja", "generation_config.json")


@dataclass
class TokenizerFiles:
    """What compile copied and what runtime.json should say about the tokenizer."""
    files: list[str] = field(default_factory=list)  # names copied into the output
    eos_ids: list[int] = field(default_factory=list)  # every end token, in the order found
    bos_id: int | None = None
    add_bos: bool = False
    tokenizer: str | None = None  # the file the runtime reads: tokenizer.json or tokenizer.model
    chat_template: bool = False
    notes: list[str] = field(default_factory=list)

    @property
    def eos_id(self) -> int | None:
        """The first end token (runtime.json's old single `eos_id`, genai_config's eos)."""
        return self.eos_ids[0] if self.eos_ids else None

    def runtime_fields(self) -> dict:
        """The runtime.json keys this adds (eos_id / bos_id stay for older readers)."""
        return {"eos_id": self.eos_id, "bos_id": self.bos_id, "eos_ids": self.eos_ids, "add_bos": self.add_bos,
                "tokenizer": self.tokenizer}


def _json(path: Path) -> dict:
    try:
        data = json.loads(path.read_text()) if path.is_file() else {}
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise ValueError(f"{path}: not valid JSON ({e}); fix or remove the file") from None
    return data if isinstance(data, dict) else {}


def _ids(v) -> list[int]:
    """An `eos_token_id` value (int, list or None) as a list of ints."""
    vals = v if isinstance(v, list) else [v]
    return [int(x) for x in vals if isinstance(x, int) and not isinstance(x, bool)]


def _token_text(v) -> str | None:
    if isinstance(v, dict):
        v = v.get("content")
    return v if isinstance(v, str) and v else None


class _Vocab:
    """Token text -> id through tokenizer.json (vocab + added tokens) or tokenizer.model."""

    def __init__(self, src: Path):
        self.table: dict[str, int] = {}
        self.sp = None
        tj = src / "tokenizer.json"
        if tj.is_file():
            data = _json(tj)
            vocab = (data.get("model") or {}).get("vocab")
            if isinstance(vocab, dict):
                self.table.update({k: v for k, v in vocab.items() if isinstance(v, int)})
            for t in data.get("added_tokens") or []:
                if isinstance(t, dict) and isinstance(t.get("content"), str):
                    self.table[t["content"]] = int(t["id"])
            self.post = data.get("post_processor")
        else:
            self.post = None
        if (src / "tokenizer.model").is_file():
            import sentencepiece as spm
            self.sp = spm.SentencePieceProcessor(model_file=str(src / "tokenizer.model"))

    def id(self, text: str | None) -> int | None:
        if text is None:
            return None
        if text in self.table:
            return self.table[text]
        if self.sp is not None:
            i = self.sp.piece_to_id(text)
            return i if self.sp.id_to_piece(i) == text else None
        return None

    def post_bos(self) -> int | None:
        """The special token a tokenizer.json's post-processor puts before a single text (None if none)."""
        procs = [self.post] if isinstance(self.post, dict) else []
        if procs and procs[0].get("type") == "Sequence":
            procs = procs[0].get("processors") or []
        for p in procs:
            if not isinstance(p, dict):
                continue
            if p.get("type") == "TemplateProcessing":
                single = p.get("single") or []
                first = single[0] if single else {}
                if "SpecialToken" in first:
                    name = first["SpecialToken"].get("id")
                    ids = ((p.get("special_tokens") or {}).get(name) or {}).get("ids") or [self.id(name)]
                    return ids[0] if ids and ids[0] is not None else None
            if p.get("type") in ("BertProcessing", "RobertaProcessing") and isinstance(p.get("cls"), list):
                return int(p["cls"][1])
        return None


def read_tokenizer_files(src: str | Path, vocab_size: int | None = None) -> TokenizerFiles:
    """Stop ids, BOS rule and the tokenizer file of a checkpoint directory (reads only)."""
    src = Path(src)
    config, gen, tcfg = _json(src / "config.json"), _json(src / "generation_config.json"), \
        _json(src / "tokenizer_config.json")
    smap = _json(src / "special_tokens_map.json")
    text_cfg = config.get("text_config") if isinstance(config.get("text_config"), dict) else {}
    vocab = _Vocab(src)
    eos = _ids(config.get("eos_token_id")) + _ids(text_cfg.get("eos_token_id")) + _ids(gen.get("eos_token_id"))
    for cfg in (tcfg, smap):
        eos += [i for i in [vocab.id(_token_text(cfg.get("eos_token")))] if i is not None]
    if vocab.sp is not None and vocab.sp.eos_id() >= 0:
        eos.append(vocab.sp.eos_id())
    ok = (lambda i: 0 <= i < vocab_size) if vocab_size else (lambda i: i >= 0)
    out = TokenizerFiles(eos_ids=[i for i in dict.fromkeys(eos) if ok(i)])
    dropped = [i for i in dict.fromkeys(eos) if not ok(i)]
    if dropped:
        out.notes.append(f"end token id(s) {dropped} are outside the {vocab_size}-token vocabulary; ignored")
    out.tokenizer = next((n for n in ("tokenizer.json", "tokenizer.model") if (src / n).is_file()), None)
    if (src / "tokenizer.model").is_file() and (config.get("model_type") or "").startswith("tapernorm_"):
        # our run dirs: SentencePiece is the source of truth; their tokenizer.json is a converted copy for genai
        out.tokenizer = "tokenizer.model"
    bos_named = vocab.id(_token_text(tcfg.get("bos_token")) or _token_text(smap.get("bos_token")))
    post = vocab.post_bos() if out.tokenizer == "tokenizer.json" else None
    bos = next((i for i in (*_ids(config.get("bos_token_id")), *_ids(gen.get("bos_token_id")), bos_named, post)
                if i is not None and ok(i)), None)
    if bos is None and vocab.sp is not None and vocab.sp.bos_id() >= 0:
        bos = vocab.sp.bos_id()
    if isinstance(tcfg.get("add_bos_token"), bool):
        add = tcfg["add_bos_token"]
    elif out.tokenizer == "tokenizer.json":
        add = post is not None
        bos = post if post is not None else bos
    else:
        add = bos is not None
    out.bos_id, out.add_bos = bos, bool(add and bos is not None)
    out.chat_template = (src / "chat_template.jinja").is_file() or bool(tcfg.get("chat_template"))
    return out


def _convert_sentencepiece(src: Path, dst: Path) -> str | None:
    """tokenizer.json from dst/tokenizer.model (+ tokenizer_config.json) with transformers' converter; None on
    success, else why not (transformers missing or the conversion failed)."""
    try:
        from tapernorm.tokenizer_json import write_tokenizer_json
    except ImportError as e:  # pragma: no cover - the core module ships with the package
        return str(e)
    return write_tokenizer_json(dst)


def copy_tokenizer_files(src: str | Path, dst: str | Path, vocab_size: int | None = None) -> TokenizerFiles:
    """Copy tokenizer.json / .model, tokenizer_config.json, special_tokens_map.json, chat_template.jinja and
    generation_config.json from `src` into `dst`; returns what was copied, the stop ids and the BOS rule."""
    src, dst = Path(src), Path(dst)
    res = read_tokenizer_files(src, vocab_size)
    for name in COPIED_FILES:
        if (src / name).is_file():
            shutil.copyfile(src / name, dst / name)
            res.files.append(name)
    if "tokenizer.model" in res.files and "tokenizer.json" not in res.files:
        why = _convert_sentencepiece(src, dst)
        if why is None:
            res.files.append("tokenizer.json")
        else:
            res.notes.append(f"no tokenizer.json for onnxruntime-genai's og.Tokenizer ({why})")
    if not res.tokenizer:
        res.notes.append(f"{src} has no tokenizer.json or tokenizer.model, so the output gets none; `tapernorm "
                         "generate` needs one (token-id APIs such as runtime.generate_ids work without it)")
    return res


def update_runtime_json(out_dir: str | Path, tf: TokenizerFiles) -> None:
    """Add the tokenizer fields (eos_ids, add_bos, tokenizer, eos_id, bos_id) to out_dir/runtime.json."""
    path = Path(out_dir) / "runtime.json"
    data = _json(path)
    data.update(tf.runtime_fields())
    atomic_write_text(path, json.dumps(data, indent=2))
