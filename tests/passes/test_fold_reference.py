"""fold / materialize on the reference decoders: structure, counts, numerics, tied head, dtypes, re-export."""
import json

import pytest
import torch
from torch.export import Dim

from tiny_models import make_tiny
from tapernorm import TAPER_TYPES
from tapernorm.passes import fold, materialize

aten = torch.ops.aten
N_LAYERS = 2  # tiny presets


def _ids(b=2, t=5, seed=1):
    return torch.randint(0, 256, (b, t), generator=torch.Generator().manual_seed(seed))


def _taper_scoped(gm, name=None):
    """Nodes whose nn_module_stack holds a TaperNorm (optionally: that module path)."""
    names = {f"{t.__module__}.{t.__qualname__}" for t in TAPER_TYPES}
    out = []
    for n in gm.graph.nodes:
        for path, typ in (n.meta.get("nn_module_stack") or {}).values():
            typ = typ if isinstance(typ, str) else f"{typ.__module__}.{typ.__qualname__}"
            if typ in names and (name is None or path == name):
                out.append(n)
                break
    return out


@pytest.mark.parametrize("arch", ["tiny", "tiny-gpt2"])
@pytest.mark.parametrize("mode", ["internal", "all"])
def test_fold_counts_structure_numerics(arch, mode):
    model = make_tiny(arch, mode)
    gm, report = fold(model, (_ids(),))
    want = 2 * N_LAYERS + (1 if mode == "all" else 0)
    assert report["folded"] == want and report["materialized"] == 0 and report["skipped"] == 0
    assert all(r["status"] == "folded" and r["reason"] is None for r in report["layers"].values())
    assert _taper_scoped(gm) == []  # no TaperNorm node left anywhere
    assert report["graph"]["taper_nodes_after"] == 0 and report["graph"]["taper_nodes_before"] > 0
    consumers = report["layers"]["layers.0.input_layernorm"]["consumers"]
    assert consumers == [f"layers.0.self_attn.{p}_proj" for p in "qkv"]
    mlp = ["layers.0.mlp.gate_proj", "layers.0.mlp.up_proj"] if arch == "tiny" else ["layers.0.mlp.fc_in"]
    assert report["layers"]["layers.0.post_attention_layernorm"]["consumers"] == mlp
    # the folded q_proj reads the residual stream directly (no map in between)
    q = next(n for n in gm.graph.nodes if n.target == aten.linear.default and
             n.args[1].target == "layers.0.self_attn.q_proj.weight")
    assert q.args[0].target == aten.embedding.default or q.args[0].target == aten.add.Tensor
    # numerics on inputs other than the example
    for ids in (_ids(seed=3), _ids(seed=4)):  # static capture: same shape, new tokens
        with torch.no_grad():
            torch.testing.assert_close(gm(ids), model(ids), rtol=1e-5, atol=1e-5)
    json.dumps(report)
    assert report["verify"]["ok"] and report["verify"]["max_abs_diff"] < 1e-5


def test_rms_fold_weights_are_scaled_columns():
    model = make_tiny("tiny", "internal")
    gm, _ = fold(model, (_ids(),))
    layer = model.layers[0]
    s = (layer.input_layernorm.c.double() * layer.input_layernorm.weight_t.double())
    expect = (layer.self_attn.q_proj.weight.double() * s[None, :]).float()
    torch.testing.assert_close(gm.get_parameter("layers.0.self_attn.q_proj.weight"), expect, rtol=0, atol=0)
    # the source model is untouched
    assert not torch.equal(model.layers[0].self_attn.q_proj.weight, expect)


def test_ln_fold_creates_bias_and_centers_rows():
    model = make_tiny("tiny-gpt2", "all")
    gm, report = fold(model, (_ids(),))
    head = next(n for n in gm.graph.nodes if n.target == aten.linear.default and "lm_head" in n.args[1].target)
    w = gm.get_parameter(head.args[1].target)
    b = gm.get_parameter(head.args[2].target)  # created: lm_head had no bias
    assert b.shape == (256,)
    torch.testing.assert_close(w.double().mean(1), torch.zeros(256, dtype=torch.float64), rtol=0, atol=1e-7)


@pytest.mark.parametrize("arch", ["tiny", "tiny-gpt2"])
def test_tied_embedding_bit_identical_after_all_taper_fold(arch):
    model = make_tiny(arch, "all")
    before = model.embed_tokens.weight.detach().clone()
    gm, report = fold(model, (_ids(),))
    assert report["layers"]["norm"]["untied"], report["layers"]["norm"]
    emb = next(n for n in gm.graph.nodes if n.target == aten.embedding.default)
    table = gm.get_parameter(emb.args[0].target)
    assert torch.equal(table, before)  # bit-identical
    assert torch.equal(model.embed_tokens.weight, before)
    assert model.lm_head.weight is model.embed_tokens.weight  # the source model stays tied
    head = next(n for n in gm.graph.nodes if n.target == aten.linear.default and "lm_head" in n.args[1].target)
    assert head.args[1] is not emb.args[0]
    assert gm.get_parameter(head.args[1].target).untyped_storage().data_ptr() != table.untyped_storage().data_ptr()


@pytest.mark.parametrize("arch", ["tiny", "tiny-gpt2"])
def test_materialize_has_explicit_map_and_no_statistic(arch):
    model = make_tiny(arch, "all")
    gm, report = materialize(model, (_ids(),))
    assert report["materialized"] == 2 * N_LAYERS + 1 and report["folded"] == 0
    for name in report["layers"]:
        targets = [n.target for n in _taper_scoped(gm, name)]
        if arch == "tiny":
            assert targets == [aten.mul.Tensor]  # x * s, nothing else
        else:  # (x - mean(x)) * s + beta_t: the centering mean is linear, no variance
            assert targets == [aten.mean.dim, aten.sub.Tensor, aten.mul.Tensor, aten.add.Tensor]
    with torch.no_grad():
        torch.testing.assert_close(gm(_ids(seed=5)), model(_ids(seed=5)), rtol=1e-6, atol=1e-6)


@pytest.mark.parametrize("arch", ["tiny", "tiny-gpt2"])
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_half_dtypes(dtype, arch):
    model = make_tiny(arch, "all").to(dtype)
    gm, report = fold(model, (_ids(),))
    assert report["folded"] == 5 and report["verify"]["ok"]
    assert gm.get_parameter("layers.0.self_attn.q_proj.weight").dtype == dtype
    if arch == "tiny-gpt2":  # LN fold in half precision: the created lm_head bias and fc_in keep the dtype
        head = next(n for n in gm.graph.nodes if n.target == aten.linear.default and "lm_head" in n.args[1].target)
        assert gm.get_parameter(head.args[2].target).dtype == dtype
        assert gm.get_parameter("layers.0.mlp.fc_in.weight").dtype == dtype
        assert not any(n.target == aten.mean.dim for n in gm.graph.nodes)  # every centering folded
    assert report["verify"]["outputs"][0]["dtype"] == str(dtype).replace("torch.", "")


def test_graphmodule_input_needs_original():
    from tapernorm.passes.capture import capture
    model = make_tiny("tiny", "internal")
    captured = capture(model, (_ids(),))
    with pytest.raises(ValueError, match="original="):
        fold(captured, (_ids(),))
    gm, report = fold(captured, (_ids(),), original=model)
    assert report["folded"] == 4
    assert captured.get_parameter("layers.0.self_attn.q_proj.weight") is model.layers[0].self_attn.q_proj.weight


class KVWrap(torch.nn.Module):
    """(input_ids, attention_mask, position_ids, *past) -> (logits, *presents): the ONNX interface."""

    def __init__(self, model):
        super().__init__()
        self.model = model

    def forward(self, input_ids, attention_mask, position_ids, *past):
        pkv = [(past[2 * i], past[2 * i + 1]) for i in range(len(past) // 2)]
        logits, presents = self.model(input_ids, attention_mask, position_ids, pkv)
        return (logits, *[t for kv in presents for t in kv])


def _kv_inputs(b, t, p, seed=0):
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(0, 256, (b, t), generator=g)
    mask = torch.ones(b, p + t, dtype=torch.long)
    pos = torch.arange(p, p + t).expand(b, t)
    return (ids, mask, pos, *[torch.randn(b, 4, p, 8, generator=g) for _ in range(2 * N_LAYERS)])


@pytest.mark.parametrize("arch", ["tiny", "tiny-gpt2"])
def test_folded_module_reexports_with_same_dynamic_shapes(arch):
    wrap = KVWrap(make_tiny(arch, "all")).eval()
    batch, seq, past = Dim("batch", min=1, max=16), Dim("seq", min=1, max=32), Dim("past", min=0, max=32)
    ds = ({0: batch, 1: seq}, {0: batch, 1: Dim.AUTO}, {0: batch, 1: seq},
          tuple({0: batch, 2: past} for _ in range(2 * N_LAYERS)))
    args = _kv_inputs(2, 3, 4)
    gm, report = fold(wrap, args, dynamic_shapes=ds)
    assert report["folded"] == 2 * N_LAYERS + 1
    other = _kv_inputs(3, 1, 6, seed=1)  # decode step at another batch / past length
    with torch.no_grad():
        for a, b in zip(gm(*other), wrap(*other)):
            torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-5)
    ep = torch.export.export(gm, args, dynamic_shapes=ds, strict=False)
    ids_node = next(n for n in ep.graph.nodes if n.op == "placeholder" and n.name == "input_ids")
    assert all(not isinstance(s, int) for s in ids_node.meta["val"].shape)  # symbolic batch, seq
    with torch.no_grad():
        torch.testing.assert_close(ep.module()(*other)[0], wrap(*other)[0], rtol=1e-5, atol=1e-5)
