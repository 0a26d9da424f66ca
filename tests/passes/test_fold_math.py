"""Property test of the fold algebra: linear(n(x)) == linear'(x) over random shapes, dtypes, bias / no bias."""
import torch
import torch.nn.functional as F
from hypothesis import given, settings
from hypothesis import strategies as st

from tapernorm.passes import apply_taper_map, fold_linear

DTYPES = [torch.float64, torch.float32, torch.float16, torch.bfloat16]
# max |y' - y| / (max |y| + 1) allowed, per stored dtype (the fold itself runs in float64)
REL = {torch.float64: 1e-10, torch.float32: 1e-5, torch.float16: 5e-3, torch.bfloat16: 4e-2}


@settings(max_examples=60, deadline=None)
@given(d=st.integers(1, 24), out=st.integers(1, 24), tokens=st.integers(1, 5), dtype=st.sampled_from(DTYPES),
       bias=st.booleans(), ln=st.booleans(), layout=st.sampled_from(["out_in", "in_out"]),
       seed=st.integers(0, 2**16))
def test_fold_linear_matches_map_then_linear(d, out, tokens, dtype, bias, ln, layout, seed):
    g = torch.Generator().manual_seed(seed)
    w = (torch.randn(out, d, generator=g, dtype=torch.float64) / d ** 0.5).to(dtype)  # stored (out, in)
    b = torch.randn(out, generator=g, dtype=torch.float64).to(dtype) if bias else None
    s = torch.rand(d, generator=g, dtype=torch.float64) * 2 + 0.1
    beta = torch.randn(d, generator=g, dtype=torch.float64) * 0.3 if ln else None
    x = torch.randn(tokens, d, generator=g, dtype=torch.float64) * 3 + 1
    stored = w if layout == "out_in" else w.t().contiguous()
    w2, b2 = fold_linear(stored, b, s, beta, layout=layout)
    assert w2.dtype == dtype and w2.shape == stored.shape
    assert (b2 is None) == (b is None and beta is None)
    if b2 is not None:
        assert b2.dtype == dtype and b2.shape == (out,)
    if layout == "in_out":
        w2 = w2.t()
    ref = F.linear(apply_taper_map(x, s, beta), w.double(), b.double() if b is not None else None)
    got = F.linear(x, w2.double(), b2.double() if b2 is not None else None)
    err = (got - ref).abs().max().item() / (ref.abs().max().item() + 1)
    assert err <= REL[dtype], (err, dtype)


def test_ln_fold_rows_sum_to_zero_and_unchanged_inputs():
    w = torch.randn(5, 7)
    s, beta = torch.rand(7, dtype=torch.float64) + 0.5, torch.randn(7, dtype=torch.float64)
    w_copy = w.clone()
    w2, b2 = fold_linear(w, None, s, beta)
    assert torch.equal(w, w_copy)  # pure: inputs untouched
    torch.testing.assert_close(w2.double().sum(1), torch.zeros(5, dtype=torch.float64), rtol=0, atol=1e-6)
    torch.testing.assert_close(b2.double(), w.double() @ beta, rtol=1e-6, atol=1e-6)


def test_shape_errors_are_clear():
    import pytest
    with pytest.raises(ValueError, match="input dim is 4"):
        fold_linear(torch.randn(3, 4), None, torch.ones(5, dtype=torch.float64))


def test_fold_experts_ln_shift_per_expert():
    """LN map into stacked experts: every expert gets W_e diag(s) C and its own output shift W_e beta."""
    from tapernorm.passes.fold_math import fold_experts
    g = torch.Generator().manual_seed(4)
    w = torch.randn(3, 5, 6, generator=g, dtype=torch.float64)  # (E, out, in)
    s, beta = torch.rand(6, generator=g, dtype=torch.float64) + 0.5, torch.randn(6, generator=g, dtype=torch.float64)
    x = torch.randn(4, 6, generator=g, dtype=torch.float64)
    for layout, stored in (("out_in", w), ("in_out", w.transpose(1, 2).contiguous())):
        w2, shift = fold_experts(stored, s, beta, layout)
        w2 = w2 if layout == "out_in" else w2.transpose(1, 2)
        for e in range(3):
            want = F.linear(apply_taper_map(x, s, beta), w[e])
            torch.testing.assert_close(F.linear(x, w2[e]) + shift[e], want, rtol=1e-10, atol=1e-10)
    w3, none = fold_experts(w, s, None)
    assert none is None and torch.allclose(w3, w * s)
