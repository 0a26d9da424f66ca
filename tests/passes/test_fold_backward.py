"""Backward folds (a gate-0 map on a linear's output folds into that linear's rows), `x @ W.T` linears, and the
reasons given when a site must stay an explicit map."""
import json

import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F

from passes_models import seeded_gains
from tapernorm import TaperLayerNorm, TaperNorm, calibrate, set_gate
from tapernorm.passes import fold
from tapernorm.passes.fold_math import fold_linear_rows

D, H, HD = 16, 4, 4


class QKNorm(nn.Module):
    """q = norm(q_proj(x).view(B, T, H, hd)) per head (Qwen3), or over all heads (OLMo2); RoPE-like reader after."""

    def __init__(self, per_head=True, ln=False, bias=True, leak=None):
        super().__init__()
        self.per_head, self.leak = per_head, leak
        self.q_proj = nn.Linear(D, D, bias=bias)
        self.q_norm = (TaperLayerNorm if ln else TaperNorm)(HD if per_head else D)

    def forward(self, x):  # x: (B, T, D)
        q = self.q_proj(x)
        h = self.q_norm(q.view(*x.shape[:2], H, HD)) if self.per_head else self.q_norm(q).view(*x.shape[:2], H, HD)
        h = h.transpose(1, 2)  # (B, H, T, hd): no linear reads it
        out = torch.cat([-h[..., HD // 2:], h[..., :HD // 2]], -1) * 0.5 + h  # a rotate-half reader
        if self.leak == "raw":  # the un-normed projection is read too
            out = out + q.view(*x.shape[:2], H, HD).transpose(1, 2)
        return out


class FalconStyle(nn.Module):
    """A norm feeding attention and MLP (parallel block) whose linears are written x @ W.T (+ b)."""

    def __init__(self, bias=True):
        super().__init__()
        self.ln = TaperLayerNorm(D)
        self.w_qkv = nn.Parameter(torch.randn(3 * D, D) / D ** 0.5)
        self.w_fc = nn.Parameter(torch.randn(2 * D, D) / D ** 0.5)
        self.b_qkv = nn.Parameter(torch.randn(3 * D)) if bias else None

    def forward(self, x):
        h = self.ln(x)
        qkv = h @ self.w_qkv.T
        if self.b_qkv is not None:
            qkv = qkv + self.b_qkv
        return qkv[..., :D] + torch.matmul(h, self.w_fc.T)[..., :D]


def _ready(m, d_in=D):
    seeded_gains(m)
    g = torch.Generator().manual_seed(0)
    calibrate(m, [torch.randn(2, 5, d_in, generator=g) * 2 + 0.3 for _ in range(3)])
    set_gate(m, 0.0)
    return m.eval()


X = torch.randn(2, 5, D, generator=torch.Generator().manual_seed(7))


def _close(gm, m, x=X):
    with torch.no_grad():
        torch.testing.assert_close(gm(x), m(x), rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("per_head", [True, False])
@pytest.mark.parametrize("ln,bias", [(False, True), (False, False), (True, True), (True, False)])
def test_qk_norm_folds_into_q_proj_rows(per_head, ln, bias):
    torch.manual_seed(0)
    m = _ready(QKNorm(per_head, ln, bias))
    gm, report = fold(m, (X,))
    row = report["layers"]["q_norm"]
    assert row["status"] == "folded" and row["direction"] == "backward" and row["producer"] == "q_proj", row
    assert report["graph"]["stat_ops_after"] == 0 and report["graph"]["taper_nodes_after"] == 0
    if not ln and per_head:  # RMS per head: row f of q_proj scaled by s[f % hd], nothing else changed
        s = (m.q_norm.c.double() * m.q_norm.weight_t.double()).repeat(H)
        torch.testing.assert_close(gm.get_parameter("q_proj.weight").double(),
                                   m.q_proj.weight.double() * s[:, None], rtol=1e-6, atol=1e-7)
    _close(gm, m)
    json.dumps(report)


def test_backward_refused_when_the_raw_projection_is_read_too():
    torch.manual_seed(0)
    m = _ready(QKNorm(leak="raw"))
    gm, report = fold(m, (X,))
    row = report["layers"]["q_norm"]
    assert row["status"] == "materialized" and report["folded"] == 0
    assert row["reason"].startswith("q_norm: consumer ") and "keeping the explicit map" in row["reason"]
    assert "backward fold: view_1 (aten.view.default) also reads features of q_proj that the norm scales" in row["reason"]
    _close(gm, m)


def test_backward_refused_when_input_is_not_a_linear():
    class ActThenNorm(nn.Module):
        def __init__(self):
            super().__init__()
            self.up = nn.Linear(D, D)
            self.norm = TaperNorm(D)

        def forward(self, x):
            return x + self.norm(F.gelu(self.up(x)))  # residual reader, gelu producer

    torch.manual_seed(0)
    m = _ready(ActThenNorm())
    gm, report = fold(m, (X,))
    reason = report["layers"]["norm"]["reason"]
    assert "is not a linear" in reason and "backward fold: its input comes from gelu" in reason, reason
    _close(gm, m)


@pytest.mark.parametrize("bias", [True, False])
def test_matmul_linears_fold_into_both_branches(bias):
    torch.manual_seed(0)
    m = _ready(FalconStyle(bias))
    gm, report = fold(m, (X,))
    row = report["layers"]["ln"]
    assert row["status"] == "folded" and row["direction"] == "forward" and len(row["consumers"]) == 2, row
    assert report["graph"]["stat_ops_after"] == 0  # the LN centering folded into both weights too
    _close(gm, m)


def test_fold_linear_rows_matches_map_after_linear():
    g = torch.Generator().manual_seed(3)
    w, b = torch.randn(12, 5, generator=g, dtype=torch.float64), torch.randn(12, generator=g, dtype=torch.float64)
    s, beta = torch.rand(4, generator=g, dtype=torch.float64) + 0.5, torch.randn(4, generator=g, dtype=torch.float64)
    x = torch.randn(7, 5, generator=g, dtype=torch.float64)
    f = torch.arange(12)
    pos, group = torch.where(f < 8, f % 4, -1), torch.where(f < 8, f // 4, -1)  # features 8.. not normed
    y = F.linear(x, w, b)
    heads = y[:, :8].view(7, 2, 4)
    want = torch.cat([((heads - heads.mean(-1, keepdim=True)) * s + beta).view(7, 8), y[:, 8:]], -1)
    w2, b2 = fold_linear_rows(w, b, s, beta, pos, group)
    torch.testing.assert_close(F.linear(x, w2, b2), want, rtol=1e-10, atol=1e-10)
    w3, b3 = fold_linear_rows(w.t().contiguous(), None, s, None, pos, layout="in_out")  # RMS, Conv1D layout
    torch.testing.assert_close(x @ w3, torch.cat([(x @ w.t())[:, :8] * s.repeat(2), (x @ w.t())[:, 8:]], -1))
