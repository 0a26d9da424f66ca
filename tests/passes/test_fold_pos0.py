"""Fold of gate-0 norms with position 0's own scale c0 (passes/pos0.py): s folds into the linears exactly as
without c0 and one Mul by p = where(position == 0, c0 / c, 1) (B, T, 1) stays per norm; RMS, LN (GPT-2 biases),
an HF Llama, backward folds (OLMo2 post-norms); typed site results say so; a model without c0 gets no factor."""
import pytest
import torch

from tapernorm import calibrate, set_gate, taper_layers
from tapernorm.compiler.export_onnx import KVCacheLM, dynamic_shapes, example_inputs
from tapernorm.passes import fold, materialize
from tapernorm.passes.capture import capture
from tapernorm.passes.pipeline import site_results
from tiny_models import make_pos0, sharpen_pos0

aten = torch.ops.aten
VOCAB = 256


def _ids(B=2, T=12, seed=0, vocab=VOCAB):
    return torch.randint(3, vocab, (B, T), generator=torch.Generator().manual_seed(seed))


def _decoder(arch="tiny", mode="internal", pos0=True):
    return make_pos0(arch, mode, pos0, batches=[_ids(seed=s) for s in range(3)])


def _factors(gm) -> int:
    """Where(rows, c0 / c, 1) nodes: one per norm with c0."""
    return sum(1 for n in gm.graph.nodes if n.target == aten.where.ScalarOther)


def _prefill(m):
    """(args from position 0 with an empty cache) for a KVCacheLM around m: where the factor is not 1."""
    c = m.config
    ids = _ids(2, 7, seed=9)
    past = tuple(torch.zeros(2, c.n_heads, 0, c.head_dim) for _ in range(2 * c.n_layers))
    return ids, torch.ones(2, 7, dtype=torch.long), torch.arange(7)[None].expand(2, 7).contiguous(), past


@pytest.mark.parametrize("arch,mode,n", [("tiny", "internal", 4), ("tiny", "all", 5), ("tiny-gpt2", "all", 5)])
def test_decoder_folds_with_one_factor_per_norm(arch, mode, n):
    m = _decoder(arch, mode)
    w = KVCacheLM(m)
    args, ds = example_inputs(m.config), dynamic_shapes(m.config.n_layers)
    gm = capture(w, args, dynamic_shapes=ds)
    pre = _prefill(m)
    with torch.no_grad():
        ref = w(*pre)[0]
    for fn, status in ((fold, "folded"), (materialize, "materialized")):
        g2, rep = fn(gm, args, dynamic_shapes=ds, original=w)
        assert rep[status] == n and rep["skipped"] == 0 and rep["pos0_factors"] == n, rep["layers"]
        assert rep["verify"]["ok"] and _factors(g2) == n
        sites = site_results(g2)
        assert all(s.status == status and s.pos0 is not None for s in sites.values())
        lay = dict(taper_layers(m))
        for name, s in sites.items():
            layer = lay[name.removeprefix("model.")]
            assert s.pos0 == float((layer.c0 / layer.c).float())
        if status == "folded":
            assert rep["graph"]["taper_nodes_after"] == 0  # the factor lives in the scope above the norm
            if mode == "all" and arch == "tiny":
                assert rep["graph"]["stat_ops_after"] == 0
        with torch.no_grad():  # from position 0 the factor is c0 / c: the folded graph still matches
            got = g2(*pre)[0]
        assert torch.allclose(got, ref, atol=1e-4 * max(1.0, float(ref.abs().max()))), float((got - ref).abs().max())


def test_factor_matters_and_old_models_get_none():
    """Dropping c0 changes position 0's logits (the factor is live); a model calibrated without c0 folds with no
    factor node at all."""
    m = _decoder()
    w = KVCacheLM(m)
    pre = _prefill(m)
    with torch.no_grad():
        a = w(*pre)[0]
        for _, l in taper_layers(m):
            l.has_pos0 = False
        b = w(*pre)[0]
    assert (a[:, 0] - b[:, 0]).abs().max() > 1e-3 and torch.allclose(a[:, 1:], a[:, 1:])
    old = _decoder(pos0=False)
    w = KVCacheLM(old)
    args = example_inputs(old.config)
    g2, rep = fold(capture(w, args), args, original=w)
    assert rep["folded"] == 4 and rep["pos0_factors"] == 0 and _factors(g2) == 0
    assert all(s.pos0 is None for s in site_results(g2).values())


def test_full_sequence_call_without_position_ids_folds():
    """A call with no position ids and no cache traces the factor on arange(T) == 0 inside the norm; the pass
    rebuilds it outside and folds."""
    m = _decoder()
    ids = _ids(2, 9, seed=4)
    g2, rep = fold(m, (ids,))
    assert rep["folded"] == 4 and rep["pos0_factors"] == 4 and rep["verify"]["ok"] and _factors(g2) == 4
    with torch.no_grad():
        assert torch.allclose(g2(ids), m(ids), atol=1e-4)


def _hf(model_type, **extra):
    transformers = pytest.importorskip("transformers")
    from tapernorm import taperize
    transformers.logging.set_verbosity_error()
    cfg = transformers.AutoConfig.for_model(model_type, vocab_size=128, hidden_size=32, intermediate_size=64,
                                            num_hidden_layers=1, num_attention_heads=4, num_key_value_heads=2,
                                            max_position_embeddings=64, bos_token_id=1, eos_token_id=2, **extra)
    torch.manual_seed(0)
    m = transformers.AutoModelForCausalLM.from_config(cfg).eval()
    taperize(m, "all")
    calibrate(m, [_ids(seed=s, vocab=128) for s in range(2)], forward=lambda mod, b: mod(input_ids=b, use_cache=False),
              pos0=True)
    set_gate(sharpen_pos0(m), 0.0)
    return m


@pytest.mark.parametrize("family,n,backward", [("llama", 3, 0), ("olmo2", 5, 4)])
def test_hf_fold_with_factor(family, n, backward):
    """HF Llama (GQA) folds forward; OLMo2's RMS post-norms fold backward into o_proj / down_proj rows with the
    factor left after them (exact: (x W'^T) * p); its QK-norms over all heads keep the factor too."""
    from tapernorm.compiler.hf_compile import HFDecoder
    hf = _hf(family)
    dec = HFDecoder(hf, "all").eval()
    w = KVCacheLM(dec)
    args = example_inputs(dec.config)
    gm = capture(w, args)
    g2, rep = fold(gm, args, original=w)
    sites = site_results(g2)
    folded = [s for s in sites.values() if s.status == "folded"]
    assert len(folded) == n and all(s.pos0 is not None for s in folded), {k: s.reason for k, s in sites.items()}
    assert sum(s.direction == "backward" for s in folded) == backward
    assert rep["verify"]["ok"] and _factors(g2) == rep["pos0_factors"] == sum(s.pos0 is not None and s.status !=
                                                                               "skipped" for s in sites.values())
    c = dec.config
    pre = (_ids(2, 7, seed=9, vocab=128), torch.ones(2, 7, dtype=torch.long), torch.arange(7)[None].expand(2, 7),
           tuple(torch.zeros(2, c.num_kv_heads, 0, c.head_dim) for _ in range(2 * c.n_layers)))
    with torch.no_grad():  # static capture at past 4: compare the prefill through a fresh capture at these sizes
        g3, rep3 = fold(capture(w, pre), pre, original=w)
        ref, got = w(*pre)[0], g3(*pre)[0]
    assert rep3["verify"]["ok"] and torch.allclose(got, ref, atol=1e-4 * max(1.0, float(ref.abs().max())))


def test_ln_backward_fold_is_refused_with_reason():
    """An LN map with c0 cannot fold into the rows before it: p would scale beta_t too (passes/backward.py)."""
    from tapernorm.passes.backward import plan_backward
    from tapernorm.passes.match import find_sites

    m = _decoder("tiny-gpt2", "all")
    w = KVCacheLM(m)
    args = example_inputs(m.config)
    gm = capture(w, args)
    site = find_sites(gm, w)[0][0]
    plan, why = plan_backward(gm, site)
    assert plan is None and "would scale beta_t too" in why
