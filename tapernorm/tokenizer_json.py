"""tokenizer.json for a SentencePiece tokenizer.model, converted with transformers' maintained converter.

onnxruntime-genai's og.Tokenizer (and any `tokenizers`-only reader) needs an HF tokenizer.json; our runs train a
SentencePiece model. `AutoTokenizer.from_pretrained(DIR)` on a directory with tokenizer.model and our
tokenizer_config.json (TokenizersBackend, legacy) builds the fast tokenizer through transformers' own
SentencePiece converter; its backend tokenizer is what we save. transformers is imported lazily and is optional:
without it the directory just has no tokenizer.json. Conversions are cached by content, so periodic checkpoint
saves of one run convert once.
"""
from __future__ import annotations

import hashlib
import json
import tempfile
from pathlib import Path

from .fileio import atomic_write_text

__all__ = ["write_tokenizer_json", "TOKENIZER_JSON"]

TOKENIZER_JSON = "tokenizer.json"
_CACHE: dict[str, str] = {}


def _convert(sp_path: Path, tok_cfg: dict) -> str:
    """The tokenizer.json text for a tokenizer.model and its tokenizer_config dict."""
    import shutil

    from transformers import AutoTokenizer
    with tempfile.TemporaryDirectory(prefix="tapernorm-tok-") as tmp:
        shutil.copyfile(sp_path, Path(tmp) / "tokenizer.model")
        (Path(tmp) / "tokenizer_config.json").write_text(json.dumps(tok_cfg))
        tok = AutoTokenizer.from_pretrained(tmp)
        backend = getattr(tok, "backend_tokenizer", None)
        if backend is None:
            raise ValueError(f"transformers built a {type(tok).__name__}, not a fast tokenizer")
        return backend.to_str()


def write_tokenizer_json(model_dir: str | Path, tok_cfg: dict | None = None) -> str | None:
    """Write model_dir/tokenizer.json converted from model_dir/tokenizer.model; None on success, else the reason
    it was not written (transformers not installed, or the conversion failed) as one phrase."""
    d = Path(model_dir)
    sp_path = d / "tokenizer.model"
    if tok_cfg is None:
        cfg_path = d / "tokenizer_config.json"
        if cfg_path.is_file():
            tok_cfg = json.loads(cfg_path.read_text())
        else:
            from .hf_config import sp_tokenizer_info
            tok_cfg = sp_tokenizer_info(sp_path)[1]
    key = hashlib.sha256(sp_path.read_bytes() + json.dumps(tok_cfg, sort_keys=True).encode()).hexdigest()
    if key not in _CACHE:
        try:
            _CACHE[key] = _convert(sp_path, tok_cfg)
        except ImportError:
            return "transformers is not installed; pip install transformers to convert tokenizer.model"
        except Exception as e:  # noqa: BLE001 - transformers / protobuf raise many types; the save must go on
            return f"transformers could not convert {sp_path.name}: {' '.join(str(e).split())[:200]}"
    atomic_write_text(d / TOKENIZER_JSON, _CACHE[key])
    return None
