"""fold on Hugging Face LlamaForCausalLM (tied) and GPT2LMHeadModel (Conv1D) built from tiny configs."""
import json

import pytest
import torch

pytest.importorskip("transformers")
from passes_models import make_hf  # noqa: E402
from tapernorm.passes import fold, materialize  # noqa: E402

aten = torch.ops.aten
IDS = torch.randint(0, 256, (2, 6), generator=torch.Generator().manual_seed(3))
KW = {"input_ids": IDS, "use_cache": False}


def _logits(m, ids=IDS):
    with torch.no_grad():
        return m(input_ids=ids, use_cache=False).logits


@pytest.mark.parametrize("kind,mode", [("llama", "all"), ("gpt2", "all"), ("gpt2", "internal")])
def test_hf_fold(kind, mode):
    model = make_hf(kind, mode)
    emb_before = model.get_input_embeddings().weight.detach().clone()
    gm, report = fold(model, (), KW)
    want = 2 * 2 + (1 if mode == "all" else 0)
    assert report["folded"] == want and report["skipped"] == 0 and report["materialized"] == 0, report["layers"]
    assert report["graph"]["taper_nodes_after"] == 0
    other = torch.randint(0, 256, (2, 6), generator=torch.Generator().manual_seed(9))
    torch.testing.assert_close(_logits(gm, other), _logits(model, other), rtol=1e-5, atol=1e-5)
    assert report["verify"]["argmax_agree"] == 1.0
    if kind == "llama":
        assert report["layers"]["model.layers.0.input_layernorm"]["consumers"] == [
            f"model.layers.0.self_attn.{p}_proj" for p in "qkv"]
        assert report["layers"]["model.layers.0.post_attention_layernorm"]["consumers"] == [
            "model.layers.0.mlp.gate_proj", "model.layers.0.mlp.up_proj"]
    else:  # Conv1D: view + addmm with W stored (in, out)
        assert report["layers"]["transformer.h.0.ln_1"]["consumers"] == ["transformer.h.0.attn.c_attn"]
        assert report["layers"]["transformer.h.0.ln_2"]["consumers"] == ["transformer.h.0.mlp.c_fc"]
        c_attn = next(n for n in gm.graph.nodes if n.target == aten.addmm.default)
        assert gm.get_parameter(c_attn.args[2].target).shape == (32, 96)  # still (in, out)
        assert c_attn.args[1].args[0].target == aten.dropout.default  # reads the embeddings, not a map
        assert not any(n.target == aten.mean.dim for n in gm.graph.nodes)  # every LN centering folded
    if mode == "all":
        row = report["layers"]["model.norm" if kind == "llama" else "transformer.ln_f"]
        assert row["consumers"] == ["lm_head"] and row["untied"]
        emb = next(n for n in gm.graph.nodes if n.target == aten.embedding.default)
        assert torch.equal(gm.get_parameter(emb.args[0].target), emb_before)  # bit-identical
        assert torch.equal(model.get_input_embeddings().weight, emb_before)
    json.dumps(report)


def test_hf_gate_quarter_reason_names_the_layer():
    model = make_hf("llama", "internal", gate=0.25)
    gm, report = fold(model, (), KW)
    assert report["folded"] == 0
    assert report["layers"]["model.layers.1.post_attention_layernorm"]["reason"] == \
        "model.layers.1.post_attention_layernorm: gate 0.25, fold needs gate 0"
    torch.testing.assert_close(_logits(gm), _logits(model), rtol=1e-5, atol=1e-5)


def test_hf_materialize():
    model = make_hf("gpt2", "all")
    gm, report = materialize(model, (), KW)
    assert report["materialized"] == 5
    torch.testing.assert_close(_logits(gm), _logits(model), rtol=1e-5, atol=1e-5)
