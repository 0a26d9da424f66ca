"""`tapernorm compile` on Hugging Face directories: fine-tuned Llama / GPT-2 (CLI end to end, then
`tapernorm generate`), the other families' tapered dirs, and FakeLN eps-hack GPT-2 imports."""
import json

import pytest
import torch

transformers = pytest.importorskip("transformers")
from hf_models import finetuned_dir, hf_dir, hf_model, logits, tapered, tok_dir, token_batches  # noqa: E402

import tapernorm  # noqa: E402
from tapernorm.compiler.cli import main  # noqa: E402
from tapernorm.compiler.pipeline import compile_checkpoint  # noqa: E402
from tapernorm.hf_convert import find_eps_hack, hf_to_decoder, import_eps_hack  # noqa: E402


def _check_report(rep: dict, n_folded: int, graph: str = "generic") -> None:
    assert rep["graph"] == graph and rep["parity"]["ok"] and rep["statistics_check"]["ok"]
    assert len(rep["folded_layers"]) == n_folded
    for g in rep["parity"]["graphs"].values():
        assert g["tokens_identical"] and g["prompt_logits_max_abs_diff"] < 1e-4


@pytest.mark.parametrize("kind,mode", [("llama", "internal"), ("gpt2", "all")])
def test_finetuned_dir_compiles_and_generates(tmp_path, capsys, kind, mode):
    ft = finetuned_dir(kind, mode)
    out = tmp_path / "compiled"
    assert main(["compile", str(ft / "model"), "--out", str(out), "--parity-tokens", "4"]) == 0
    rep = json.loads((out / "compile_report.json").read_text())
    # both go to the lean graph by their family spec (the tiny Llama has grouped-query attention)
    _check_report(rep, 4 if mode == "internal" else 5, "lean")
    assert rep["hf"]["kind"] == "tapered" and rep["taper_mode"] == mode and "lean" not in rep["hf"]
    rt = json.loads((out / "runtime.json").read_text())
    assert (rt["bos_id"], rt["eos_id"]) == (1, 2) and (out / "tokenizer.model").is_file()
    capsys.readouterr()
    assert main(["generate", str(out), "--prompt", "The for statement", "--max-new-tokens", "6",
                 "--threads", "1", "--quiet-prompt"]) == 0
    got = capsys.readouterr()
    assert "6 tokens" in got.err or "stop: stop" in got.err


@pytest.mark.parametrize("kind,mode", [("llama_mha", "internal"), ("llama_mha", "all"), ("gpt2", "internal"),
                                       ("gpt2", "all")])
def test_hf_llama_and_gpt2_hand_over_as_the_reference_model(kind, mode):
    """hf_convert.hf_to_decoder: our DecoderLM with the same weights and taper state (compile no longer needs it)."""
    model = tapered(kind, mode)
    ref, why = hf_to_decoder(model)
    assert why is None and ref.config.taper_mode == mode and tapernorm.get_gate(ref) == 0.0
    ids = token_batches(1, 2, 10, seed=2)[0]
    with torch.no_grad():
        torch.testing.assert_close(ref(ids), logits(model, ids), rtol=0, atol=2e-6)
    assert hf_to_decoder(tapered("llama"))[1] == "grouped-query attention"
    assert "Qwen2ForCausalLM" in hf_to_decoder(tapered("qwen2"))[1]


@pytest.mark.slow
@pytest.mark.parametrize("kind", ["qwen2", "phi3", "gpt_neox", "opt"])
def test_other_families_compile_with_parity(tmp_path, kind):
    """Qwen2 (qkv biases), Phi3 (fused qkv_proj / gate_up_proj), GPT-NeoX (lean by their specs) and OPT (no spec:
    one line naming the nearest family, then the generic export)."""
    d = tapernorm.save_pretrained(tapered(kind, "internal"), tmp_path / kind, tokenizer_from=tok_dir())
    rep = compile_checkpoint(d, tmp_path / "c", parity_tokens=4)
    _check_report(rep, 4, "generic" if kind == "opt" else "lean")
    if kind == "opt":
        assert rep["hf"]["lean"] == "model_type 'opt': no lean spec (nearest family: gpt2); using --graph generic"
    assert rep["hf"]["model_type"] == kind


def _fakeln(model, eps: float = 1e12):
    """Baroni et al.'s eps hack on a GPT-2: freeze each LN's sigma (its mean over probe batches) into the weight."""
    sig, hooks = {}, []
    lns = {n: m for n, m in model.named_modules() if isinstance(m, torch.nn.LayerNorm)}
    for n, m in lns.items():
        hooks.append(m.register_forward_pre_hook(
            lambda mod, inp, n=n: sig.setdefault(n, []).append(float(inp[0].float().var(-1, unbiased=False)
                                                                     .add(mod.eps).sqrt().mean()))))
    with torch.no_grad():
        for b in token_batches():
            model(input_ids=b, use_cache=False)
    for h in hooks:
        h.remove()
    with torch.no_grad():
        for n, m in lns.items():
            m.weight.mul_(eps ** 0.5 / (sum(sig[n]) / len(sig[n])))
            m.eps = eps
    model.config.layer_norm_epsilon = eps  # what the LN-free exports' config.json says
    return model


def test_eps_hack_import_is_the_exact_map():
    model = _fakeln(hf_model("gpt2"))
    ids = token_batches(1, 2, 16, seed=4)[0]
    before = logits(model, ids)
    assert len(find_eps_hack(model)) == 5
    rep = import_eps_hack(model)
    assert rep["converted"] == 5 and tapernorm.get_gate(model) == 0.0
    diff = float((logits(model, ids) - before).abs().max())
    assert diff < 1e-5 * max(1.0, float(before.abs().max())), diff
    with pytest.raises(ValueError, match="not a FakeLN"):
        import_eps_hack(hf_model("gpt2"))


def test_fakeln_hf_dir_compiles_with_parity(tmp_path):
    d = tmp_path / "fakeln"
    _fakeln(hf_model("gpt2")).save_pretrained(d)  # stock GPT2LMHeadModel files
    for f in ("tokenizer.model", "tokenizer_config.json"):
        (d / f).write_bytes((tok_dir() / f).read_bytes())
    rep = compile_checkpoint(d, tmp_path / "c", parity_tokens=4)
    _check_report(rep, 5, "lean")  # ln_1, ln_2 of both blocks and ln_f: no norm left
    fk = rep["hf"]["fakeln"]
    assert fk["converted"] == 5 and fk["max_abs_diff"] < 1e-4, fk
    assert rep["statistics_check"]["total"] == 0


def test_run_dir_in_hf_layout_compiles(tmp_path):
    """A `tapernorm train` model, re-saved as a tapered HF directory, compiles (lean: the Llama spec)."""
    from tiny_models import make_tiny
    run = tapernorm.save_checkpoint(make_tiny("tiny", "internal"), tmp_path / "run",
                                    tokenizer_path=tok_dir() / "tokenizer.model")
    hf = tapernorm.save_pretrained(tapernorm.from_pretrained(run), tmp_path / "hf", tokenizer_from=run)
    rep = compile_checkpoint(hf, tmp_path / "c", parity_tokens=4)
    _check_report(rep, 4, "lean")
    assert rep["hf"]["class"] == "LlamaForCausalLM"
