"""Gated RMSNorms (Qwen3-Next / Kimi-Linear style: RMSNorm(x) * w * act(gate), per head, heads merged before the
output projection): taperize equals them at gate 1, the gate-0 map folds into the output projection's columns
through the head merge (column j scaled by s[j % head_dim]), and a gate-before-norm variant is refused."""
import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F

from tapernorm import TaperError, calibrate, set_gate, taperize
from tapernorm.gated import TaperNormGated
from tapernorm.passes import fold

H, HD, D = 4, 8, 32


class GatedRMSNorm(nn.Module):
    """Norm before gate, as transformers' Qwen3NextRMSNormGated / KimiLinearRMSNormGated compute it."""

    def __init__(self, d, act="silu", gate_first=False):
        super().__init__()
        self.weight = nn.Parameter(torch.rand(d) + 0.5)
        self.variance_epsilon, self.act, self.gate_first = 1e-6, act, gate_first

    def forward(self, hidden_states, gate):
        act = F.silu if self.act == "silu" else torch.sigmoid
        h = hidden_states.float()
        if self.gate_first:  # Mamba2's norm_before_gate=False
            h = h * act(gate.float())
        h = h * torch.rsqrt(h.pow(2).mean(-1, keepdim=True) + self.variance_epsilon)
        h = self.weight * h.to(hidden_states.dtype)
        return (h if self.gate_first else h * act(gate.float())).to(hidden_states.dtype)


class LinearAttnOut(nn.Module):
    """v, z projections; the gated norm per head on (B*T*H, hd); heads merged; out_proj."""

    def __init__(self, act="silu", gate_first=False):
        super().__init__()
        self.v_proj, self.z_proj, self.out_proj = nn.Linear(D, D), nn.Linear(D, D), nn.Linear(D, D)
        self.norm = GatedRMSNorm(HD, act, gate_first)

    def forward(self, x):  # x: (B, T, D)
        b, t, _ = x.shape
        v = self.v_proj(x).reshape(-1, HD)
        z = self.z_proj(x).reshape(-1, HD)
        return x + self.out_proj(self.norm(v, z).reshape(b, t, -1))


def _batches():
    g = torch.Generator().manual_seed(0)
    return [torch.randn(2, 5, D, generator=g) * 2 + 0.3 for _ in range(3)]


@pytest.mark.parametrize("act", ["silu", "sigmoid"])
def test_gated_norm_tapers_and_folds_through_the_head_merge(act):
    torch.manual_seed(0)
    model = LinearAttnOut(act).eval()
    x = _batches()[0]
    with torch.no_grad():
        ref = model(x)
    assert taperize(model, "all") == ["norm"]
    assert isinstance(model.norm, TaperNormGated) and model.norm.gating.act == act
    with torch.no_grad():
        torch.testing.assert_close(model(x), ref, rtol=0, atol=1e-6)  # gate 1 == the gated norm
    calibrate(model, _batches())
    set_gate(model, 0.0)
    gm, report = fold(model.eval(), (x,))
    row = report["layers"]["norm"]
    assert row["status"] == "folded" and row["direction"] == "forward" and row["consumers"] == ["out_proj"], row
    assert report["graph"]["taper_nodes_after"] == 0 and report["graph"]["stat_ops_after"] == 0
    s = (model.norm.c.double() * model.norm.weight_t.double()).repeat(H)  # column j <- s[j % hd]
    torch.testing.assert_close(gm.get_parameter("out_proj.weight").double(),
                               model.out_proj.weight.double() * s[None, :], rtol=1e-6, atol=1e-7)
    with torch.no_grad():
        torch.testing.assert_close(gm(_batches()[1]), model(_batches()[1]), rtol=1e-5, atol=1e-5)


def test_gate_before_norm_is_refused_in_one_line():
    model = LinearAttnOut(gate_first=True)
    with pytest.raises(TaperError, match=r"^norm: GatedRMSNorm is a gated norm but not RMSNorm\(x\) \* w \* act\(gate\)"):
        taperize(model, "all")
    assert isinstance(model.norm, GatedRMSNorm)
