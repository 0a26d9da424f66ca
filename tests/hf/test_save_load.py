"""The save/load contract (docs/CONTRACTS.md): tapered HF dirs and run dirs reload exactly with
tapernorm.from_pretrained; plain transformers refuses them loudly; AutoTokenizer matches our runtime."""
import json
import re

import pytest
import torch

transformers = pytest.importorskip("transformers")
from hf_models import logits, tapered, tok_dir, token_batches  # noqa: E402
from tiny_models import make_tiny  # noqa: E402

import tapernorm  # noqa: E402
from tapernorm import CheckpointError, save_checkpoint  # noqa: E402
from tapernorm.hf import dir_kind  # noqa: E402
from tapernorm.hf_config import GUARD  # noqa: E402

IDS = token_batches(1, 2, 10, seed=5)[0]


@pytest.mark.parametrize("kind,mode,gate", [("llama", "internal", 0.0), ("gpt2", "all", 0.0), ("llama", "all", 0.4)])
def test_tapered_round_trip_exact(tmp_path, kind, mode, gate):
    model = tapered(kind, mode, gate)
    out = tapernorm.save_pretrained(model, tmp_path / "m", tokenizer_from=tok_dir())
    assert dir_kind(out) == "tapered"
    assert (out / "tokenizer.model").is_file() and (out / "tokenizer_config.json").is_file()
    back = tapernorm.from_pretrained(out)
    assert type(back) is type(model) and not back.training
    assert torch.equal(logits(back, IDS), logits(model, IDS))  # bit-identical
    assert [n for n, _ in tapernorm.taper_layers(back)] == [n for n, _ in tapernorm.taper_layers(model)]
    assert tapernorm.get_gate(back) == gate


def test_an_instruct_models_chat_template_file_travels_with_the_save(tmp_path):
    """transformers 5 keeps the chat template in chat_template.jinja: a tapered save (and so finetune's output and
    its compile) must carry it, or the fine-tuned instruct model cannot chat."""
    import shutil
    src = tmp_path / "src"
    shutil.copytree(tok_dir(), src)
    (src / "chat_template.jinja").write_text("{% for m in messages %}{{ m['content'] }}{% endfor %}")
    out = tapernorm.save_pretrained(tapered("llama"), tmp_path / "m", tokenizer_from=src)
    assert (out / "chat_template.jinja").read_text() == (src / "chat_template.jinja").read_text()


def test_plain_transformers_refuses_a_tapered_dir(tmp_path):
    out = tapernorm.save_pretrained(tapered("llama"), tmp_path / "m", tokenizer_from=tok_dir())
    for load in (transformers.AutoModelForCausalLM.from_pretrained, transformers.LlamaForCausalLM.from_pretrained):
        with pytest.raises(OSError, match="model.safetensors"):  # no weights it knows: never loaded wrong
            load(out)
    cfg = json.loads((out / "config.json").read_text())
    assert cfg["model_type"] == "llama" and cfg["tapernorm_hf"]["mode"] == "internal"
    assert transformers.AutoConfig.from_pretrained(out).hidden_size == 32  # config and tokenizer still load
    assert transformers.AutoTokenizer.from_pretrained(out)("Hello")["input_ids"][0] == 1


def test_corrupt_tapered_dirs_fail_in_one_line(tmp_path):
    out = tapernorm.save_pretrained(tapered("llama"), tmp_path / "m")
    (out / "tapernorm.safetensors").write_bytes(b"garbage")
    with pytest.raises(CheckpointError, match="tapernorm.safetensors: corrupt"):
        tapernorm.from_pretrained(out)
    out = tapernorm.save_pretrained(tapered("llama"), tmp_path / "n")
    cfg = json.loads((out / "config.json").read_text())
    cfg["tapernorm_hf"]["layers"]["model.layers.9.input_layernorm"] = {"kind": "rms", "eps": 1e-6, "dim": 32}
    (out / "config.json").write_text(json.dumps(cfg))
    with pytest.raises(CheckpointError, match="model.layers.9.input_layernorm"):
        tapernorm.from_pretrained(out)


@pytest.mark.parametrize("arch,mode", [("tiny", "internal"), ("tiny", "baseline"), ("tiny-gpt2", "all")])
def test_run_dir_loads_as_hf_model(tmp_path, arch, mode):
    model = make_tiny(arch, mode)
    d = save_checkpoint(model, tmp_path / "run", tokenizer_path=tok_dir() / "tokenizer.model")
    assert dir_kind(d) == "run"
    hf = tapernorm.from_pretrained(d)
    assert type(hf).__name__ == ("LlamaForCausalLM" if arch == "tiny" else "GPT2LMHeadModel")
    with torch.no_grad():
        ref = model(IDS)
    torch.testing.assert_close(logits(hf, IDS), ref, rtol=0, atol=2e-6)
    plain = mode == "baseline" and arch == "tiny"
    if plain:  # plain transformers loads a baseline Llama-style run dir exactly
        got = transformers.LlamaForCausalLM.from_pretrained(d).eval()
        torch.testing.assert_close(logits(got, IDS), ref, rtol=0, atol=2e-6)
    else:  # building the model hits the guard; the config itself still reads
        cls = transformers.LlamaForCausalLM if arch == "tiny" else transformers.GPT2LMHeadModel
        with pytest.raises(KeyError, match=re.escape(GUARD)):
            cls.from_pretrained(d)
    # the HF model saves as a tapered HF dir (when it tapers) and comes back exactly
    if mode != "baseline":
        back = tapernorm.from_pretrained(tapernorm.save_pretrained(hf, tmp_path / "hf", tokenizer_from=d))
        assert torch.equal(logits(back, IDS), logits(hf, IDS))


def test_run_dir_tokenizer_config_matches_the_runtime(tmp_path):
    from tapernorm.data import Tokenizer
    d = save_checkpoint(make_tiny("tiny", "internal"), tmp_path / "run", tokenizer_path=tok_dir() / "tokenizer.model")
    cfg = json.loads((d / "config.json").read_text())
    assert (cfg["bos_token_id"], cfg["eos_token_id"]) == (1, 2)
    hf_tok = transformers.AutoTokenizer.from_pretrained(d)
    sp = Tokenizer.load(d / "tokenizer.model")
    for text in ("Hello world", "The for statement is used", "x = [1, 2]  # two  spaces\nnext line"):
        assert hf_tok(text)["input_ids"] == [sp.bos_id] + sp.encode(text)  # BOS, as the runtime adds it


@pytest.mark.parametrize("kind,mode", [("llama", "internal"), ("gpt_neox", "all")])
def test_a_dir_saved_by_transformers_own_save_pretrained_reloads_exactly(tmp_path, kind, mode):
    """model.save_pretrained (transformers') on a tapered model: tapernorm.from_pretrained still restores it."""
    model = tapered(kind, mode, 0.0)
    model.save_pretrained(tmp_path / "m")
    assert dir_kind(tmp_path / "m") == "hf-tapered"
    # taperize guarded the live config: plain transformers refuses the directory instead of loading it wrong
    with pytest.raises(KeyError, match=re.escape(GUARD)):
        transformers.AutoModelForCausalLM.from_pretrained(tmp_path / "m")
    assert transformers.AutoConfig.from_pretrained(tmp_path / "m").model_type == kind  # the config still reads
    back = tapernorm.from_pretrained(tmp_path / "m")
    assert torch.equal(logits(back, IDS), logits(model, IDS))
    assert tapernorm.get_gate(back) == 0.0
    back.save_pretrained(tmp_path / "again")  # the reloaded model is guarded too
    with pytest.raises(KeyError, match=re.escape(GUARD)):
        transformers.AutoModelForCausalLM.from_pretrained(tmp_path / "again")
