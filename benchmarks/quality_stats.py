"""Statistics for the quality benchmark, dependency-free: mean +- sd, and the paired t-test across seeds
(Student's t CDF through the regularized incomplete beta function, Numerical Recipes' continued fraction),
so the benchmark needs no scipy."""
from __future__ import annotations

import math
import statistics

__all__ = ["mean_sd", "t_sf_two_sided", "paired_test"]


def mean_sd(xs: list[float]) -> dict:
    """{"mean", "sd", "n"}: the sample standard deviation (n - 1), 0 for a single value."""
    xs = [float(x) for x in xs]
    return {"mean": statistics.fmean(xs), "sd": statistics.stdev(xs) if len(xs) > 1 else 0.0, "n": len(xs)}


def _betacf(a: float, b: float, x: float) -> float:
    """Continued fraction of the incomplete beta function (modified Lentz)."""
    tiny, qab, qap, qam = 1e-300, a + b, a + 1.0, a - 1.0
    c, d = 1.0, 1.0 - qab * x / qap
    d = 1.0 / (d if abs(d) > tiny else tiny)
    h = d
    for m in range(1, 300):
        m2 = 2 * m
        aa = m * (b - m) * x / ((qam + m2) * (a + m2))
        d = 1.0 + aa * d
        d = 1.0 / (d if abs(d) > tiny else tiny)
        c = 1.0 + aa / c if abs(1.0 + aa / c) > tiny else tiny
        h *= d * c
        aa = -(a + m) * (qab + m) * x / ((a + m2) * (qap + m2))
        d = 1.0 + aa * d
        d = 1.0 / (d if abs(d) > tiny else tiny)
        c = 1.0 + aa / c if abs(1.0 + aa / c) > tiny else tiny
        de = d * c
        h *= de
        if abs(de - 1.0) < 1e-14:
            break
    return h


def _betai(a: float, b: float, x: float) -> float:
    """Regularized incomplete beta I_x(a, b) for 0 <= x <= 1."""
    if x <= 0.0:
        return 0.0
    if x >= 1.0:
        return 1.0
    lbt = math.lgamma(a + b) - math.lgamma(a) - math.lgamma(b) + a * math.log(x) + b * math.log(1.0 - x)
    if x < (a + 1.0) / (a + b + 2.0):
        return math.exp(lbt) * _betacf(a, b, x) / a
    return 1.0 - math.exp(lbt) * _betacf(b, a, 1.0 - x) / b


def t_sf_two_sided(t: float, df: int) -> float:
    """P(|T| >= |t|) for Student's t with df degrees of freedom = I_{df/(df+t^2)}(df/2, 1/2)."""
    if math.isinf(t):
        return 0.0
    return _betai(df / 2.0, 0.5, df / (df + t * t))


def paired_test(xs: list[float], ys: list[float]) -> dict:
    """Paired t-test of xs against ys (same seeds, same order) on the relative gap x / y - 1.

    Returns the per-pair gaps, their mean +- sd (as fractions), t, df and the two-sided p-value
    (None with fewer than two pairs; p = 0 when every pair has the same nonzero gap)."""
    if len(xs) != len(ys) or not xs:
        raise ValueError(f"paired test needs equally many values on both sides, got {len(xs)} and {len(ys)}")
    gaps = [x / y - 1.0 for x, y in zip(xs, ys)]
    ms = mean_sd(gaps)
    out = {"gaps": gaps, "gap_mean": ms["mean"], "gap_sd": ms["sd"], "n": ms["n"], "t": None, "df": None, "p": None}
    if ms["n"] < 2:
        return out
    df = ms["n"] - 1
    if ms["sd"] == 0.0:
        t = 0.0 if ms["mean"] == 0.0 else math.copysign(math.inf, ms["mean"])
    else:
        t = ms["mean"] / (ms["sd"] / math.sqrt(ms["n"]))
    out.update(t=t, df=df, p=1.0 if t == 0.0 else t_sf_two_sided(t, df))
    return out
