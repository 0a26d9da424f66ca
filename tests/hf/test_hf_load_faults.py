"""Loading a plain Hugging Face directory checks its config against its checkpoint before building (issue 20).

Each case is a tiny HF Llama directory broken in one way. `tapernorm compile` and `tapernorm finetune` (which load
through the same `tapernorm.from_pretrained`) must each print one line naming the file / field / key and exit 2:
no traceback, no randomly initialised weight accepted, no 40 GB allocation, no pickle loaded.
"""
import json
import os
import shutil
import time

import pytest
import torch

pytest.importorskip("transformers")
from hf_models import hf_dir, tapered  # noqa: E402

from tapernorm.checkpoint import CheckpointError  # noqa: E402
from tapernorm.compiler.cli import main  # noqa: E402
from tapernorm.hf import from_pretrained, save_pretrained  # noqa: E402

FT = ["--steps", "4", "--seq-len", "16", "--batch-size", "2", "--max-docs", "20", "--eval-batches", "1"]


def _edit_config(d, fn):
    cfg = json.loads((d / "config.json").read_text())
    fn(cfg)
    (d / "config.json").write_text(json.dumps(cfg))


def _edit_weights(d, fn):
    from safetensors.torch import load_file, save_file
    t = load_file(d / "model.safetensors")
    fn(t)
    save_file(t, d / "model.safetensors", metadata={"format": "pt"})


def _truncate(d):
    w = d / "model.safetensors"
    w.write_bytes(w.read_bytes()[:-1000])


def _pickle_only(d):
    from safetensors.torch import load_file
    torch.save(load_file(d / "model.safetensors"), d / "pytorch_model.bin")
    (d / "model.safetensors").unlink()


def _config_not_json(d):
    (d / "config.json").unlink()
    (d / "junk.bin").write_bytes(bytes(range(256)))
    os.symlink("junk.bin", d / "config.json")


# (case, how the directory is broken, what the one line must say)
CASES = [
    ("no-layers-field", lambda d: _edit_config(d, lambda c: c.pop("num_hidden_layers")),
     r"config.json: no 'num_hidden_layers' \(the weights have 2 layers\); transformers would use its default 32"),
    ("wide-config", lambda d: _edit_config(d, lambda c: c.update(hidden_size=100000, intermediate_size=100000)),
     r"'model.embed_tokens.weight' has shape \(256, 32\) in the checkpoint but the config describes \(256, 100000\)"),
    ("more-layers", lambda d: _edit_config(d, lambda c: c.update(num_hidden_layers=4)),
     r"no tensor 'model.layers.2.\S+' \(and \d+ more\) that the model its config describes needs"),
    ("missing-key", lambda d: _edit_weights(d, lambda t: t.pop("model.layers.1.mlp.up_proj.weight")),
     r"no tensor 'model.layers.1.mlp.up_proj.weight'.*randomly initialised"),
    ("unexpected-key", lambda d: _edit_weights(d, lambda t: t.update({"model.layers.1.mlp.extra.weight": torch.zeros(3)})),
     r"tensor 'model.layers.1.mlp.extra.weight' has no place in the model"),
    ("truncated", _truncate, r"model.safetensors: corrupt or truncated safetensors file \(the file has \d+ bytes, "
                             r"its header describes \d+\)"),
    ("pickle-only", _pickle_only, r"has only a pickle checkpoint \(pytorch_model.bin\); tapernorm does not unpickle "
                                  r"checkpoints.*convert it to safetensors first"),
    ("config-not-json", _config_not_json, r"config.json: not valid JSON"),
]


@pytest.fixture
def never_unpickle(monkeypatch):
    """torch.load must never be reached, whatever torch's weights_only default is."""
    def refuse(*a, **k):
        raise AssertionError("torch.load was called")
    monkeypatch.setattr(torch, "load", refuse)


def _one_line(capsys) -> str:
    err = capsys.readouterr().err.strip().splitlines()
    err = [line for line in err if line.strip() and not line.startswith("[compile]")  # compile's progress lines
           and "it/s]" not in line]  # transformers' progress bars
    assert len(err) == 1, err
    assert "Traceback" not in err[0]
    return err[0]


@pytest.mark.parametrize("case,breaks,msg", CASES, ids=[c[0] for c in CASES])
def test_compile_refuses_a_broken_hf_dir_in_one_line(tmp_path, capsys, never_unpickle, case, breaks, msg):
    import re
    src = hf_dir("llama", tmp_path)
    breaks(src)
    capsys.readouterr()
    t0 = time.time()
    assert main(["compile", str(src), "--out", str(tmp_path / "out")]) == 2
    line = _one_line(capsys)
    assert re.search(msg, line), line
    assert "config.json" not in msg or "config" in line
    assert not (tmp_path / "out").exists() and sorted(os.listdir(tmp_path)) == ["llama"]  # nothing written
    assert time.time() - t0 < 60  # refused before any large allocation


@pytest.mark.parametrize("case,breaks,msg", [c for c in CASES if c[0] in ("no-layers-field", "truncated", "pickle-only",
                                                                          "config-not-json", "wide-config")],
                         ids=["no-layers-field", "wide-config", "truncated", "pickle-only", "config-not-json"])
def test_finetune_refuses_a_broken_hf_dir_in_one_line(tmp_path, capsys, never_unpickle, case, breaks, msg):
    import re
    src = hf_dir("llama", tmp_path)
    breaks(src)
    capsys.readouterr()
    assert main(["finetune", str(src), "--out", str(tmp_path / "ft"), *FT]) == 2
    line = _one_line(capsys)
    assert re.search(msg, line) and "tokenizer" not in line, line  # the config is blamed, not the tokenizer
    assert sorted(os.listdir(tmp_path)) == ["llama"]


def test_finetune_of_a_missing_directory_says_so(tmp_path, capsys, monkeypatch):
    monkeypatch.chdir(tmp_path)
    assert main(["finetune", "./missing-dir", "--out", "ft", *FT]) == 2
    line = _one_line(capsys)
    assert "no such directory: ./missing-dir" in line and "repo" not in line.lower()
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")  # a bare name may be a hub model: one line either way
    assert main(["finetune", "missing-dir", "--out", "ft", *FT]) == 2
    assert "missing-dir: no such local directory, and transformers could not load it" in _one_line(capsys)
    assert os.listdir(tmp_path) == []


def test_the_good_directory_still_loads_and_every_family_passes_the_checks(tmp_path):
    """No false refusals: the test families (tied, untied, renamed keys) load exactly as transformers loads them."""
    import transformers
    for kind in ("llama", "gpt2", "gpt_neox", "opt", "phi3"):
        d = hf_dir(kind, tmp_path)
        ours = from_pretrained(d)
        ref = transformers.AutoModelForCausalLM.from_pretrained(d).eval()
        ids = torch.tensor([[1, 5, 9, 3]])
        with torch.no_grad():
            assert torch.equal(ours(input_ids=ids).logits, ref(input_ids=ids).logits), kind


def test_tapered_dir_config_checked_before_allocating(tmp_path):
    out = save_pretrained(tapered("llama"), tmp_path / "tap")
    _edit_config(out, lambda c: c.update(hidden_size=100000, intermediate_size=100000))
    t0 = time.time()
    with pytest.raises(CheckpointError, match=r"has shape \(256, 32\) in the checkpoint but the config describes "
                                              r"\(256, 100000\).*nothing was allocated"):
        from_pretrained(out)
    assert time.time() - t0 < 30


def test_run_dir_config_checked_before_allocating(tmp_path):
    from tiny_models import make_tiny
    from tapernorm.checkpoint import load_checkpoint, save_checkpoint
    d = save_checkpoint(make_tiny("tiny", "internal"), tmp_path / "ck")
    raw = json.loads((d / "config.json").read_text())
    raw["tapernorm"].update(dim=100000, hidden_dim=100000)
    (d / "config.json").write_text(json.dumps(raw))
    t0 = time.time()
    with pytest.raises(CheckpointError, match=r"embed_tokens.weight' has shape \(\d+, 32\) but .*implies "
                                              r"\(\d+, 100000\).*nothing was allocated"):
        load_checkpoint(d)
    assert time.time() - t0 < 10
    shutil.rmtree(d)
