"""verify_rewrite's float64 second opinion: a rewrite of an ill-conditioned model (real checkpoints' massive
activations) that misses the float32 tolerance passes when it is as close to the float64 answer as the original's own
float32 evaluation; a wrong rewrite still fails, naming both distances; the original module is left as it was."""
import pytest
import torch
import torch.nn as nn

import tapernorm.passes.verify as verify
from tapernorm.passes.verify import VerifyError, run_outputs, verify_rewrite

EPS = 1e-4


class Cancelling(nn.Module):
    """y = A - (1 - EPS) A with A = (1e4 x) W^T: two ~1e5 terms cancel to ~10, so float32 rounding of A shows at
    ~1e-4 relative in y (as in a residual that carries a 1e4 sink entry)."""

    def __init__(self):
        super().__init__()
        self.w = nn.Parameter(torch.randn(8, 64, generator=torch.Generator().manual_seed(0)))

    def forward(self, x):
        a = (x * 1e4) @ self.w.T
        return a - a * (1 - EPS)


def _rewritten(model, x):
    """The same function computed in another order (EPS A), in float32: what a fold does to the rounding."""
    with torch.no_grad():
        return [((x * 1e4) @ model.w.T) * EPS]


X = (torch.randn(4, 64, generator=torch.Generator().manual_seed(1)),)


def test_an_ill_conditioned_rewrite_passes_on_the_float64_answer():
    model = Cancelling().eval()
    ref, new = run_outputs(model, X, None), _rewritten(model, *X)
    assert not verify.compare_outputs(ref, new, strict=False)["ok"]  # float32 alone would refuse it
    ptr = model.w.data_ptr()
    rep = verify_rewrite(ref, new, model, X)
    assert rep["ok"] and rep["float64"]["ok"] and rep["float64"]["slack"] == verify.F64_SLACK
    row = rep["float64"]["outputs"][0]
    assert row["rewrite_err"] < row["float32_original_err"]  # the reordered form is the more exact one here
    assert model.w.data_ptr() == ptr and model.w.dtype == torch.float32  # the very same storage put back


def test_a_wrong_rewrite_fails_with_both_distances():
    model = Cancelling().eval()
    ref = run_outputs(model, X, None)
    with pytest.raises(VerifyError, match=r"max abs diff .* against float64: output 0: the rewrite is .* the original "
                                          r"in float32"):
        verify_rewrite(ref, [ref[0] * 1.01], model, X)


def test_no_float64_copy_when_it_does_not_fit(monkeypatch):
    model = Cancelling().eval()
    ref, new = run_outputs(model, X, None), _rewritten(model, *X)
    monkeypatch.setattr(verify, "_free_bytes", lambda: 1024)
    with pytest.raises(VerifyError, match="a float64 copy needs .* GiB free"):
        verify_rewrite(ref, new, model, X)
