"""Gate and LR schedules: hold at 1, cosine, exactly 0.0 at and after the taper end."""
import math

import pytest

from tapernorm.train.schedule import gate_at, lr_at, resolve_schedule, warmup_steps


def test_gate_hold_cosine_exact_zero():
    t0, t1 = 5, 25
    gates = [gate_at(t, t0, t1) for t in range(40)]
    assert gates[:t0 + 1] == [1.0] * (t0 + 1)  # held through warmup, cosine starts at exactly 1
    for t in range(t0, t1):
        assert gates[t] == pytest.approx(0.5 * (1 + math.cos(math.pi * (t - t0) / (t1 - t0))), abs=1e-15)
    assert all(a > b for a, b in zip(gates[t0:t1], gates[t0 + 1:t1]))  # strictly decreasing on the taper
    assert gates[t0 + (t1 - t0) // 2] == pytest.approx(0.5)
    assert all(g == 0.0 and type(g) is float for g in gates[t1:])  # exactly zero, not 1e-17
    assert 0.0 < gates[t1 - 1] < 1e-2


def test_default_schedule_ends_at_zero_on_last_step():
    s = resolve_schedule(200)
    assert (s.warmup, s.taper_start, s.taper_end) == (10, 10, 199)
    assert s.gate(198) > 0.0 and s.gate(199) == 0.0 and s.final_gate() == 0.0
    ft = resolve_schedule(300, warmup=25, taper_start=25, taper_end=100)  # the paper's GPT-2 S fine-tune
    assert ft.gate(24) == 1.0 and ft.gate(100) == 0.0 and ft.gate(299) == 0.0 and 0 < ft.gate(60) < 1


def test_lr_warmup_then_cosine_to_zero():
    T, W, lr = 100, 5, 1e-3
    lrs = [lr_at(t, lr, W, T) for t in range(T + 1)]
    assert lrs[:W] == pytest.approx([lr * (t + 1) / W for t in range(W)])
    assert lrs[W] == pytest.approx(lr)
    assert all(a >= b for a, b in zip(lrs[W:], lrs[W + 1:]))
    assert lrs[T] == pytest.approx(0.0, abs=1e-20) and lrs[T - 1] > 0


@pytest.mark.parametrize("kw, msg", [
    (dict(total_steps=10, taper_start=0), "taper start 0 must be >= 1"),
    (dict(total_steps=10, taper_start=6, taper_end=4), "taper start 6 <= taper end 4"),
    (dict(total_steps=10, taper_end=11), "<= total steps 10"),
    (dict(total_steps=10, warmup=10), "warmup steps 10"),
])
def test_bad_schedules_are_refused(kw, msg):
    with pytest.raises(ValueError, match=msg):
        resolve_schedule(**kw)


def test_warmup_fraction():
    assert warmup_steps(1000) == 50 and warmup_steps(10) == 1
    with pytest.raises(ValueError):
        warmup_steps(100, 1.5)
