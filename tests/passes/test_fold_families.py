"""The fold on one tiny HF model per norm variant, All-Taper, called as fold(model, (ids,)) (no use_cache):
taperize is exact at gate 1, every norm folds at gate 0 (forward into the next linears or backward into
the previous linear's rows), the folded graph matches on new inputs, and no norm statistic is left."""
import json

import pytest
import torch

pytest.importorskip("transformers")
from hf_families import FAMILIES, build, token_batches  # noqa: E402
from tapernorm import calibrate, set_gate, taperize  # noqa: E402
from tapernorm.passes import fold  # noqa: E402
from tapernorm.passes.capture import capture  # noqa: E402
from tapernorm.passes.match import stat_ops  # noqa: E402

# family -> (norms tapered, of them folded backwards, statistic ops left after the fold)
# (gpt2 / phi keep one aten.pow: gelu_new's x^3; qwen3_moe / phimoe / flex_olmo one sum: their MoE's own arithmetic;
# qwen3_next's gated delta rule keeps its own q / k L2 normalizations and sums, which are no norm layers)
EXPECT = {
    "llama": (3, 0, 0), "mistral": (3, 0, 0), "qwen2": (3, 0, 0), "phi3": (3, 0, 0), "gemma": (3, 0, 0),
    "gemma2": (5, 2, 0), "gemma3": (7, 4, 0), "qwen3": (5, 2, 0), "olmo2": (5, 4, 0), "qwen3_moe": (5, 2, 1),
    "deepseek_v3": (5, 0, 0), "qwen3_next": (8, 2, 71), "phimoe": (3, 0, 1), "flex_olmo": (5, 4, 1), "olmo": (3, 0, 0),
    "cohere": (2, 0, 0), "falcon": (2, 0, 0), "falcon_new": (3, 0, 0), "gpt_neox": (3, 0, 0),
    "stablelm": (3, 0, 0), "phi": (2, 0, 1), "opt": (3, 0, 0), "gpt2": (3, 0, 1),
}


def _logits(m, ids):
    with torch.no_grad():
        return m(ids).logits


@pytest.mark.parametrize("family", sorted(FAMILIES))
def test_family_all_taper_folds_every_norm(family):
    model = build(family)
    ids, other = token_batches(2)
    ref = _logits(model, ids)
    stats_original = stat_ops(capture(model, (ids,)))
    names = taperize(model, "all")
    n_norms, n_backward, stats_left = EXPECT[family]
    assert len(names) == n_norms
    torch.testing.assert_close(_logits(model, ids), ref, rtol=0, atol=1e-5)  # gate 1 == the original
    calibrate(model, token_batches(3, seed=1), forward=lambda m, b: m(b))
    set_gate(model, 0.0)
    gm, report = fold(model.eval(), (ids,))  # no use_cache=False: capture sets it
    kept = {k: r["reason"] for k, r in report["layers"].items() if r["status"] != "folded"}
    assert report["folded"] == n_norms and not kept, kept
    assert report["capture"]["use_cache"] is False
    backward = {k: r["producer"] for k, r in report["layers"].items() if r["direction"] == "backward"}
    assert len(backward) == n_backward, backward
    for name, producer in backward.items():  # post-norms into o_proj / down_proj, QK-norms into q / k_proj
        want = {"q_norm": ("q_proj",), "k_norm": ("k_proj",), "post_attention_layernorm": ("o_proj",),
                "post_feedforward_layernorm": ("down_proj", "mlp.experts")}[name.rsplit(".", 1)[1]]
        assert producer.endswith(want), (name, producer)  # MoE: the stacked experts (their down weights)
    assert report["graph"]["taper_nodes_after"] == 0
    assert report["graph"]["stat_ops_after"] == stats_left < stats_original
    torch.testing.assert_close(_logits(gm, other), _logits(model, other), rtol=1e-5, atol=1e-5)
    assert report["verify"]["ok"] and report["verify"]["argmax_agree"] == 1.0
    json.dumps(report)


def test_kept_site_says_exactly_why():
    """BLOOM's embedding LayerNorm feeds the residual stream and reads the embedding: no linear on either side."""
    import transformers
    cfg = transformers.BloomConfig(vocab_size=128, hidden_size=32, n_layer=1, n_head=4)
    torch.manual_seed(0)
    model = transformers.BloomForCausalLM(cfg).eval()
    ids = token_batches(1)[0]
    assert len(taperize(model, "all")) == 4
    calibrate(model, token_batches(2, seed=1), forward=lambda m, b: m(b))
    set_gate(model, 0.0)
    gm, report = fold(model.eval(), (ids,))
    kept = {k: r for k, r in report["layers"].items() if r["status"] != "folded"}
    assert list(kept) == ["transformer.word_embeddings_layernorm"] and report["folded"] == 3
    reason = kept["transformer.word_embeddings_layernorm"]["reason"]
    assert reason.startswith("transformer.word_embeddings_layernorm: consumer add") and "is not a linear" in reason
    assert "backward fold: its input comes from embedding (aten.embedding.default), not from a linear" in reason
    assert report["graph"]["stat_ops_after"] == 1  # that LayerNorm's centering mean: the explicit map
    torch.testing.assert_close(_logits(gm, ids), _logits(model, ids), rtol=1e-5, atol=1e-5)


def test_per_head_gain_matrix_is_refused_by_taperize():
    """Cohere's QK-norm holds a (heads, head_dim) gain: one line, and the model is left as it was."""
    import transformers
    from tapernorm import TaperError
    cfg = transformers.CohereConfig(vocab_size=128, hidden_size=32, intermediate_size=64, num_hidden_layers=1,
                                    num_attention_heads=4, num_key_value_heads=2, use_qk_norm=True)
    model = transformers.CohereForCausalLM(cfg).eval()
    with pytest.raises(TaperError, match=r"^model\.layers\.0\.self_attn\.q_norm: CohereLayerNorm has a gain of shape "
                                         r"\(4, 8\), not a 1-D per-feature vector"):
        taperize(model, "all")
    assert type(model.model.norm).__name__ == "CohereLayerNorm"


def test_backward_folds_with_dynamic_shapes():
    """Gemma 3's QK- and post-norms fold backwards in a dynamic-shape capture; the result runs at other shapes."""
    from torch.export import Dim
    model = build("gemma3")
    taperize(model, "all")
    calibrate(model, token_batches(3, seed=1), forward=lambda m, b: m(b))
    set_gate(model, 0.0)
    ids = token_batches(1)[0]
    dims = {"input_ids": {0: Dim("batch", min=1, max=8), 1: Dim("seq", min=2, max=32)}}
    gm, report = fold(model.eval(), (), {"input_ids": ids}, dynamic_shapes=dims)
    assert report["folded"] == 7 and sum(r["direction"] == "backward" for r in report["layers"].values()) == 4
    other = torch.randint(3, 128, (3, 11), generator=torch.Generator().manual_seed(2))
    with torch.no_grad():
        torch.testing.assert_close(gm(input_ids=other).logits, model(other).logits, rtol=1e-5, atol=1e-5)


def test_explicit_use_cache_true_is_one_clear_error():
    from tapernorm.passes.capture import CaptureError
    model = build("llama")
    ids = token_batches(1)[0]
    with pytest.raises(CaptureError, match=r"^torch.export could not capture LlamaForCausalLM: .*DynamicCache.* "
                                           r"\(leave use_cache out or pass use_cache=False"):
        capture(model, (), {"input_ids": ids, "use_cache": True})
    assert model.config.use_cache is True  # the default is restored after every capture
    capture(model, (ids,))
    assert model.config.use_cache is True
