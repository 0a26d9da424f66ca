"""Fold of gate-0 norms with position 0's own scale c0 (passes/pos0.py): s folds into the linears exactly as
without c0 and one Mul by p = where(position == 0, c0 / c, 1) (B, T, 1) stays per norm; RMS, LN (GPT-2 biases),
an HF Llama, backward folds (OLMo2 post-norms, Qwen3's per-head QK-norms with a (B, T, 1, 1) factor, Gemma 3's on
(B, H, T, d) with a (B, 1, T, 1) factor); typed site results say so; a model without c0 gets no factor; per-head
layouts without one are refused naming the layer."""
import pytest
import torch

from tapernorm import calibrate, set_gate, taper_layers
from tapernorm.compiler.export_onnx import KVCacheLM, example_inputs
from tapernorm.passes import fold, materialize
from tapernorm.passes.capture import capture
from tapernorm.passes.pipeline import site_results
from tiny_models import kv_capture, make_pos0, prefill_args, sharpen_pos0

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
    return prefill_args(m)


@pytest.mark.parametrize("arch,mode,n", [("tiny", "internal", 4), ("tiny", "all", 5), ("tiny-gpt2", "all", 5)])
def test_decoder_folds_with_one_factor_per_norm(arch, mode, n):
    m = _decoder(arch, mode)
    w, args, ds, gm, pre, ref = kv_capture(m)
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


def _qwen3():
    from tiny_models import make_hf_pos0
    return make_hf_pos0("qwen3", hidden=32, layers=1)  # 4 q heads / 2 kv heads of 8: q_norm / k_norm per head


def _per_head_factor_shapes(gm) -> list:
    """Shapes of the factors multiplied into 4-D (B, T, H, d) values: (B, T, 1, 1) for per-head sites."""
    out = []
    for n in gm.graph.nodes:
        if n.target == aten.mul.Tensor and len(n.args) == 2 and isinstance(n.args[1], torch.fx.Node):
            xv, pv = (a.meta.get("val") for a in n.args)
            if getattr(xv, "dim", lambda: 0)() == 4 and getattr(pv, "shape", (0,))[-1] == 1:
                out.append(tuple(pv.shape))
    return out


def _fold_qk_pos0(hf, n: int, factor_shape: tuple) -> None:
    """Capture `hf` (2 QK-norms with c0) as one dynamic-shape KV-cache graph; fold and materialize it: both QK-norms
    handled with a factor (folded: backward, no taper node left), `n` factors in all, the QK-norms' of
    `factor_shape`; exact on a prefill of 6 from position 0 and on the cached decode step at position 6."""
    from tapernorm.compiler.export_onnx import dynamic_shapes as dyn
    from tapernorm.compiler.hf_compile import HFDecoder
    dec = HFDecoder(hf, "all").eval()
    w = KVCacheLM(dec)
    c = dec.config
    args, ds = example_inputs(c), dyn(c.n_layers)
    gm = capture(w, args, dynamic_shapes=ds)
    pre = (_ids(2, 6, seed=9, vocab=128), torch.ones(2, 6, dtype=torch.long),
           torch.arange(6)[None].expand(2, 6).contiguous(),
           tuple(torch.zeros(2, c.num_kv_heads, 0, c.head_dim) for _ in range(2 * c.n_layers)))
    for fn, status in ((fold, "folded"), (materialize, "materialized")):
        g2, rep = fn(gm, args, dynamic_shapes=ds, original=w)
        sites = site_results(g2)
        qk = {k: s for k, s in sites.items() if k.endswith(("q_norm", "k_norm"))}
        assert len(qk) == 2 and all(s.status == status and s.pos0 is not None for s in qk.values()), \
            {k: s.reason for k, s in sites.items()}
        if status == "folded":
            assert all(s.direction == "backward" for s in qk.values())
            assert rep["graph"]["taper_nodes_after"] == 0
        assert rep[status] == rep["pos0_factors"] == _factors(g2) == n and rep["verify"]["ok"]
        assert sorted(_per_head_factor_shapes(g2)) == [factor_shape] * 2
        with torch.no_grad():
            (ref, *ref_past), (got, *got_past) = w(*pre), g2(*pre)  # logits, flat presents (B, Hkv, 6, d)
            assert torch.allclose(got, ref, atol=1e-5 * max(1.0, float(ref.abs().max())))
            step = (_ids(2, 1, seed=3, vocab=128), torch.ones(2, 7, dtype=torch.long), torch.full((2, 1), 6))
            ref2, got2 = w(*step, tuple(ref_past))[0], g2(*step, tuple(got_past))[0]  # decode at position 6
        assert torch.allclose(got2, ref2, atol=1e-5 * max(1.0, float(ref2.abs().max())))


def test_qwen3_per_head_qk_norms_fold_backward_with_factor():
    """Qwen3's q_norm / k_norm read q_proj / k_proj(x).view(B, T, H, d): with c0 they fold backward into the
    projections' rows (as without c0) and keep one Mul by p (B, T, 1, 1) each, before RoPE; exact on a prefill from
    position 0 and on the cached decode step after it (one dynamic-shape graph); the materialized graph as well."""
    _fold_qk_pos0(_qwen3(), 5, (2, 3, 1, 1))  # the example's (B, T): one (B, T, 1, 1) per QK-norm


def test_qwen3_k_norm_factor_is_live():
    """Position 0's k scaled by c0 / c changes what later queries attend to: dropping the QK-norms' c0 changes the
    logits after position 0 (so the parity above checks the per-head factor, not a no-op)."""
    m = _qwen3()
    ids = _ids(2, 6, seed=9, vocab=128)
    with torch.no_grad():
        a = m(input_ids=ids, use_cache=False).logits
        for name, layer in taper_layers(m):
            if name.endswith(("q_norm", "k_norm")):
                layer.has_pos0 = False
        b = m(input_ids=ids, use_cache=False).logits
    assert (a[:, 1:] - b[:, 1:]).abs().max() > 1e-3


def test_qwen3_full_sequence_call_folds():
    """Called on input_ids alone (no position ids, no cache) the factor is traced on arange(T) == 0 over dim 1 of
    the (B, T, H, d) input; the pass rebuilds it as (T, 1, 1) outside the norm and folds."""
    m = _qwen3()
    ids = _ids(2, 7, seed=4, vocab=128)
    fwd = lambda mod: mod(input_ids=ids, use_cache=False).logits  # noqa: E731
    g2, rep = fold(m, (), {"input_ids": ids, "use_cache": False})
    assert rep["folded"] == rep["pos0_factors"] == _factors(g2) == 5 and rep["verify"]["ok"], rep["layers"]
    assert _per_head_factor_shapes(g2) == [(7, 1, 1)] * 2
    with torch.no_grad():
        out = g2(input_ids=ids, use_cache=False)
        got = out.logits if hasattr(out, "logits") else out[0]
        assert torch.allclose(got, fwd(m), atol=1e-5 * max(1.0, float(fwd(m).abs().max())))


class _FiveD(torch.nn.Module):
    """A TaperNorm over (B, T, 2, 2, 4): a per-head layout the passes cannot give a position-0 factor."""

    def __init__(self):
        super().__init__()
        from tapernorm.layers import TaperNorm
        self.proj, self.norm, self.out = torch.nn.Linear(8, 16), TaperNorm(4), torch.nn.Linear(16, 8)

    def forward(self, x):  # (B, T, 8)
        y = self.proj(x).view(*x.shape[:2], 2, 2, 4)
        return self.out(self.norm(y).flatten(2))


def test_unsupported_per_head_shape_is_refused_naming_the_layer():
    torch.manual_seed(0)
    m = _FiveD()
    xs = [torch.randn(2, 5, 8) for _ in range(2)]
    calibrate(m, xs, pos0=True)
    set_gate(sharpen_pos0(m), 0.0)
    m.eval()
    g2, rep = fold(m, (xs[0],))
    row = rep["layers"]["norm"]
    assert row["status"] == "skipped" and rep["folded"] == 0 and rep["verify"]["ok"]
    assert row["reason"].startswith("norm: input of shape (2, 5, 2, 2, 4)") and "\n" not in row["reason"]


def test_per_head_input_without_tokens_on_dim_1_is_refused():
    """A 4-D input whose dim 1 is not the position mask's token axis ((B, H, T, d), as Gemma 3 calls its QK-norms)
    has no (B, T, 1, 1) factor: pos0_problem says so (the check on the traced shapes, with symbolic T)."""
    from types import SimpleNamespace as NS

    from torch.fx.experimental.symbolic_shapes import ShapeEnv
    from torch._subclasses.fake_tensor import FakeTensorMode

    from tapernorm.passes.pos0 import pos0_problem
    mode = FakeTensorMode(shape_env=ShapeEnv())
    T = mode.shape_env.create_unbacked_symint()
    with mode:
        x, rows = torch.empty(2, 4, T, 8), torch.empty(2, T, dtype=torch.bool)
    where = NS(target=aten.where.ScalarOther)
    site = NS(nodes=[where], input=NS(meta={"val": x}), rows=NS(meta={"val": rows}),
              module=NS(c0=torch.tensor(0.5), c=torch.tensor(1.0)))
    why = pos0_problem(site)
    assert why is not None and why.startswith("per-head input of shape (2, 4, ") and "(B, T, H, d)" in why
    assert "token_dim 1" in why and "\n" not in why
    site.module.token_dim = 2  # Gemma 3's QK-norms (taperize sets it from the family): tokens on dim 2
    assert pos0_problem(site) is None
    with mode:
        site.input.meta["val"] = torch.empty(2, T, 4, 8)
    assert "on its token_dim 2" in pos0_problem(site)  # (B, T, H, d) with token_dim 2: refused as well
    site.module.token_dim = 1
    assert pos0_problem(site) is None


def _gemma3():
    from tiny_models import make_hf_pos0
    return make_hf_pos0("gemma3_text", hidden=32, layers=1, sliding_window=4)  # QK-norms on (B, H, T, d)


def test_gemma3_heads_first_qk_norms_fold_backward_with_factor():
    """Gemma 3 calls q_norm / k_norm on q_proj(x).view(B, T, H, d).transpose(1, 2) = (B, H, T, d) (token_dim 2):
    with c0 they fold backward into q_proj / k_proj rows through the view and transpose, and keep one Mul by p
    (B, 1, T, 1) each; exact on a prefill from position 0 and on the cached decode step after it (one dynamic-shape
    graph), for the fold and the materialized graph; 7 norms (sandwich norms, QK-norms, final), 7 factors."""
    _fold_qk_pos0(_gemma3(), 7, (2, 1, 3, 1))  # the example's (B, T): (B, 1, T, 1)


def test_gemma3_full_sequence_call_folds_and_factor_is_live():
    """Called on input_ids alone the factor is traced on arange(T) == 0 over dim 2 of the (B, H, T, d) input; the
    pass rebuilds it as (T, 1) outside the norm and folds; dropping the QK-norms' c0 changes the logits."""
    m = _gemma3()
    ids = _ids(2, 7, seed=4, vocab=128)
    with torch.no_grad():
        ref = m(input_ids=ids, use_cache=False).logits
    g2, rep = fold(m, (), {"input_ids": ids, "use_cache": False})
    assert rep["folded"] == rep["pos0_factors"] == _factors(g2) == 7 and rep["verify"]["ok"], rep["layers"]
    assert sum(r["direction"] == "backward" for r in rep["layers"].values()) == 4  # QK-norms and post-norms
    assert _per_head_factor_shapes(g2) == [(7, 1)] * 2  # (T, 1) against (B, H, T, d)
    with torch.no_grad():
        out = g2(input_ids=ids, use_cache=False)
        got = out.logits if hasattr(out, "logits") else out[0]
        assert torch.allclose(got, ref, atol=1e-5 * max(1.0, float(ref.abs().max())))
        for name, layer in taper_layers(m):
            if name.endswith(("q_norm", "k_norm")):
                layer.has_pos0 = False
        assert (m(input_ids=ids, use_cache=False).logits - ref)[:, 1:].abs().max() > 1e-4
