"""Corpora, tokenizer, windows and split; HF-layout checkpoints and their bad-input errors."""
import json
import os

import pytest
import torch

from _train_helpers import VOCAB, make_tokenizer, small_docs
from tapernorm import build_model, calibrate, get_gate, set_gate
from tapernorm.checkpoint import CheckpointError, load_checkpoint, save_checkpoint
from tapernorm.data import Tokenizer, batch_at, load_corpus, tokenize_corpus, val_batches


@pytest.fixture(scope="module")
def tok(tmp_path_factory):
    return make_tokenizer(tmp_path_factory.mktemp("tok") / "tokenizer.model")


def test_tokenizer_roundtrip_and_ids(tok):
    assert tok.vocab_size == VOCAB and (tok.bos_id, tok.eos_id) == (1, 2)
    text = "The for statement is used to iterate over the elements of a sequence."
    ids = tok.encode(text)
    assert all(0 <= i < VOCAB for i in ids) and tok.decode(ids) == text
    again = Tokenizer.load(tok.path)
    assert again.encode(text) == ids


def test_builtin_corpus_needs_no_download():
    docs = load_corpus("builtin")
    assert len(docs) > 50 and sum(map(len, docs)) > 100_000


def test_windows_are_deterministic_and_split_across_ranks(tok):
    data = tokenize_corpus(small_docs(), tok, seq_len=16, val_frac=0.1)
    assert len(data.val) > 0 and len(data.train) > 9 * len(data.val) - 20
    x1, y1 = batch_at(data.train, 7, 8, 16, seed=3)
    x2, _ = batch_at(data.train, 7, 8, 16, seed=3)
    x3, _ = batch_at(data.train, 8, 8, 16, seed=3)
    assert torch.equal(x1, x2) and not torch.equal(x1, x3)
    assert x1.shape == (8, 16) and torch.equal(x1[:, 1:], y1[:, :-1])  # targets are inputs shifted by one
    halves = [batch_at(data.train, 7, 8, 16, seed=3, rank=r, world_size=2)[0] for r in range(2)]
    assert torch.equal(torch.cat(halves), x1)  # DDP ranks see exactly the global batch
    vb = val_batches(data.val, 4, 16, max_batches=2)
    assert len(vb) == 2 and vb[0][0].shape == (4, 16)


def test_missing_corpus_file_and_missing_datasets_package(tmp_path):
    with pytest.raises(FileNotFoundError, match="corpus file .*nope.txt does not exist"):
        load_corpus(str(tmp_path / "nope.txt"))
    (tmp_path / "a.txt").write_text("one paragraph.\n\nanother paragraph.\n")
    assert load_corpus(str(tmp_path / "a.txt")) == ["one paragraph.", "another paragraph."]
    try:
        import datasets  # noqa: F401
    except ImportError:
        with pytest.raises(RuntimeError, match="needs the Hugging Face `datasets` package"):
            load_corpus("hf:roneneldan/TinyStories")


def _trained_model(mode="internal"):
    torch.manual_seed(0)
    m = build_model("tiny", taper_mode=mode)
    if mode != "baseline":
        calibrate(m, [torch.randint(0, 256, (2, 8))])
        set_gate(m, 0.25)
    return m.eval()


def test_checkpoint_roundtrip_hf_layout(tmp_path, tok):
    m = _trained_model()
    out = save_checkpoint(m, tmp_path / "ck", tokenizer_path=tok.path, extra={"note": "x"})
    # tokenizer.json: transformers' SentencePiece converter, so onnxruntime-genai's og.Tokenizer reads run dirs
    assert sorted(os.listdir(out)) == ["config.json", "model.safetensors", "tokenizer.json", "tokenizer.model",
                                       "tokenizer_config.json"]
    assert [p.name for p in tmp_path.iterdir()] == ["ck"]  # no temp dirs left behind
    cfg = json.loads((out / "config.json").read_text())
    assert cfg["taper"] == {"mode": "internal", "gate": 0.25} and cfg["note"] == "x"
    assert cfg["tapernorm"]["dim"] == 32 and cfg["model_type"] == "tapernorm_llama"
    from safetensors import safe_open
    with safe_open(str(out / "model.safetensors"), "pt") as f:
        assert "embed_tokens.weight" in f.keys() and "lm_head.weight" not in f.keys()  # tied: stored once
    m2, info = load_checkpoint(out)
    assert not m2.training and get_gate(m2) == 0.25 and info["tokenizer_path"].endswith("tokenizer.model")
    assert m2.lm_head.weight is m2.embed_tokens.weight
    x = torch.randint(0, 256, (2, 9))
    with torch.no_grad():
        assert torch.equal(m(x), m2(x))


def _saved(tmp_path, mode="internal"):
    return save_checkpoint(_trained_model(mode), tmp_path / "ck")


def test_corrupt_and_truncated_safetensors(tmp_path):
    d = _saved(tmp_path)
    w = d / "model.safetensors"
    data = w.read_bytes()
    w.write_bytes(data[: len(data) // 2])
    with pytest.raises(CheckpointError, match="model.safetensors: corrupt or truncated"):
        load_checkpoint(d)
    w.write_bytes(b"\x00garbage" * 10)
    with pytest.raises(CheckpointError, match="model.safetensors: corrupt or truncated"):
        load_checkpoint(d)
    (d / "config.json").write_text("{not json")
    with pytest.raises(CheckpointError, match="config.json: not valid JSON"):
        load_checkpoint(d)
    with pytest.raises(CheckpointError, match="does not exist"):
        load_checkpoint(tmp_path / "missing")
    # a wrong checkpoint: a Hugging Face config.json without our model section
    (d / "config.json").write_text(json.dumps({"model_type": "llama", "hidden_size": 32}))
    with pytest.raises(CheckpointError, match=r"config.json: no 'tapernorm' model-config section; .*tapernorm train"):
        load_checkpoint(d)


@pytest.mark.parametrize("edit, msg", [
    (lambda c: c["tapernorm"].update(dim=64, n_heads=4), r"key 'embed_tokens.weight' has shape \(256, 32\) but"),
    (lambda c: c["tapernorm"].update(taper_mode="baseline"), r"unexpected keys \['layers.0.input_layernorm."),
    (lambda c: c["tapernorm"].update(n_layers=3), r"missing keys \['layers.2."),
    (lambda c: c["tapernorm"].update(bogus=1), r"unknown model config keys \['bogus'\]"),
])
def test_config_not_matching_weights(tmp_path, edit, msg):
    d = _saved(tmp_path)
    cfg = json.loads((d / "config.json").read_text())
    edit(cfg)
    if cfg["tapernorm"].get("taper_mode") == "baseline":
        cfg["taper"]["mode"] = "baseline"
    (d / "config.json").write_text(json.dumps(cfg))
    with pytest.raises(CheckpointError, match=msg):
        load_checkpoint(d)


def test_wrong_dtype_and_bad_gate_in_weights(tmp_path):
    from safetensors.torch import load_file, save_file
    d = _saved(tmp_path)
    w = d / "model.safetensors"
    good = load_file(str(w))
    bad = dict(good, **{"norm.weight": good["norm.weight"].double()})
    save_file(bad, str(w))
    with pytest.raises(CheckpointError, match=r"key 'norm.weight' has dtype torch.float64 but the model expects torch.float32"):
        load_checkpoint(d)
    bad = dict(good, **{"layers.0.input_layernorm.gate_value": torch.tensor(1.5, dtype=good["layers.0.input_layernorm.gate_value"].dtype)})
    save_file(bad, str(w))
    with pytest.raises(CheckpointError, match=r"gate_value' holds gate 1.5, outside \[0, 1\]"):
        load_checkpoint(d)


def test_failed_save_leaves_previous_checkpoint_and_no_partial_files(tmp_path, monkeypatch):
    d = _saved(tmp_path)
    before = (d / "model.safetensors").read_bytes()
    import safetensors.torch

    def boom(*a, **k):
        raise OSError("disk full")
    monkeypatch.setattr(safetensors.torch, "save_file", boom)
    with pytest.raises(OSError, match="disk full"):
        save_checkpoint(_trained_model(), d)
    assert (d / "model.safetensors").read_bytes() == before
    assert [p.name for p in tmp_path.iterdir()] == ["ck"]
    with pytest.raises(FileNotFoundError, match="tokenizer file"):
        save_checkpoint(_trained_model(), tmp_path / "new", tokenizer_path=tmp_path / "none.model")
    assert not (tmp_path / "new").exists()
