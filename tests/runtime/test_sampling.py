"""Sampling on hand-made logits: greedy, top-k, top-p, temperature, seeded determinism."""
import numpy as np
import pytest

from tapernorm.runtime.sampling import Sampler, SamplingParams, filter_logits, sample_logits

LOGITS = np.log(np.array([[0.05, 0.4, 0.1, 0.3, 0.15]]))  # order by prob: 1, 3, 4, 2, 0


def test_greedy():
    assert sample_logits(LOGITS, SamplingParams(), None).tolist() == [1]
    assert sample_logits(LOGITS, SamplingParams(temperature=5.0, top_k=1), None).tolist() == [1]


def test_top_k_support_and_renormalisation():
    p = filter_logits(LOGITS, top_k=2)
    assert np.flatnonzero(p[0]).tolist() == [1, 3]
    np.testing.assert_allclose(p[0, [1, 3]], [0.4 / 0.7, 0.3 / 0.7])
    s = Sampler(SamplingParams(temperature=1.0, top_k=2, seed=0))
    draws = {int(s(LOGITS)[0]) for _ in range(200)}
    assert draws == {1, 3}


@pytest.mark.parametrize("top_p,support", [(0.35, [1]), (0.5, [1, 3]), (0.72, [1, 3, 4]), (0.9, [1, 2, 3, 4]),
                                           (1.0, [0, 1, 2, 3, 4])])
def test_top_p_smallest_prefix_reaching_mass(top_p, support):
    p = filter_logits(LOGITS, top_p=top_p)
    assert np.flatnonzero(p[0]).tolist() == support
    np.testing.assert_allclose(p.sum(), 1.0)


def test_top_k_and_top_p_compose():
    p = filter_logits(LOGITS, top_k=3, top_p=0.6)  # top-3 = {1, 3, 4} renormalised: 0.47, 0.35, 0.18
    assert np.flatnonzero(p[0]).tolist() == [1, 3]


def test_temperature_sharpens_and_flattens():
    cold, hot = filter_logits(LOGITS, temperature=0.25), filter_logits(LOGITS, temperature=4.0)
    assert cold[0, 1] > 0.4 > hot[0, 1]
    assert hot.std() < filter_logits(LOGITS).std() < cold.std()


def test_sampling_frequencies_follow_probabilities():
    s = Sampler(SamplingParams(temperature=1.0, seed=123))
    logits = np.repeat(LOGITS, 4000, axis=0)
    freq = np.bincount(s(logits), minlength=5) / 4000
    np.testing.assert_allclose(freq, [0.05, 0.4, 0.1, 0.3, 0.15], atol=0.03)


def test_seeded_determinism_and_seed_sensitivity():
    rng = np.random.default_rng(0)
    logits = rng.normal(size=(3, 50))
    params = SamplingParams(temperature=0.9, top_k=20, top_p=0.9, seed=7)
    a = [Sampler(params)(logits).tolist() for _ in range(2)]
    s1, s2 = Sampler(params), Sampler(params)
    seq1 = [s1(logits).tolist() for _ in range(20)]
    seq2 = [s2(logits).tolist() for _ in range(20)]
    other = Sampler(SamplingParams(temperature=0.9, top_k=20, top_p=0.9, seed=8))
    seq3 = [other(logits).tolist() for _ in range(20)]
    assert a[0] == a[1] and seq1 == seq2 and seq1 != seq3


@pytest.mark.parametrize("kw", [dict(temperature=-1), dict(top_k=-2), dict(top_p=0.0), dict(top_p=1.5),
                                dict(temperature=float("nan"))])
def test_bad_params(kw):
    with pytest.raises(ValueError) as e:
        SamplingParams(**kw)
    assert "\n" not in str(e.value)
