"""I1 (Poisson sampling), I2 (masked physical batches), I9, I10."""

import numpy as np
import pytest
from scipy import stats

from keras_dpsgd import sampling


def draws(n=500, q=0.05, steps=2000, seed=0):
    s = sampling.PoissonSampler(n, q, sampling.new_seed_words(seed))
    return [s.sample(t) for t in range(steps)]


def binomial_fit_pvalue(sizes, n, q):
    """Chi-square goodness of fit of batch sizes to Binomial(n, q) (bins with expected >= 5)."""
    top = int(n * q + 10 * np.sqrt(n * q) + 10)
    expected = stats.binom.pmf(np.arange(top), n, q) * len(sizes)
    observed = np.bincount(sizes, minlength=top)[:top]
    keep = expected >= 5
    obs = np.append(observed[keep], len(sizes) - observed[keep].sum())
    exp = np.append(expected[keep], len(sizes) - expected[keep].sum())
    return stats.chisquare(obs, exp).pvalue


def test_batch_sizes_follow_binomial_n_q():
    n, q = 500, 0.05
    sizes = np.array([len(b) for b in draws(n, q)])
    # Fixed seed; p > 1e-3 fails with probability 1e-3 for a correct sampler and
    # essentially always for a fixed-size or truncated one.
    assert binomial_fit_pvalue(sizes, n, q) > 1e-3
    assert sizes.std() > 2  # a fixed batch size would have std 0


def test_every_example_is_included_with_probability_q_independently_across_steps():
    n, q, steps = 200, 0.1, 3000
    b = draws(n, q, steps, seed=1)
    inc = np.zeros((steps, n), dtype=bool)
    for t, idx in enumerate(b):
        inc[t, idx] = True
    counts = inc.sum(axis=0)
    # Each example's count is Binomial(steps, q): chi-square over examples.
    z = (counts - steps * q) / np.sqrt(steps * q * (1 - q))
    assert abs(np.mean(z**2) - 1.0) < 0.3  # mean of chi2_1 is 1; sd of mean ~0.1
    # Independence across consecutive steps: P(in t and in t+1) = q^2.
    both = np.mean(inc[:-1] & inc[1:])
    assert both == pytest.approx(q * q, rel=0.1)
    # Unlike epoch shuffling, some examples are drawn twice within 1/q steps
    # and some never.
    epoch = inc[: int(1 / q)].sum(axis=0)
    assert (epoch == 0).any() and (epoch >= 2).any()


def test_sample_of_a_step_is_a_pure_function_of_seed_and_step():
    words = sampling.new_seed_words(7)
    a = sampling.PoissonSampler(1000, 0.02, words)
    b = sampling.PoissonSampler(1000, 0.02, words)
    assert np.array_equal(a.sample(123), b.sample(123))
    assert not np.array_equal(a.sample(1), a.sample(2))


def test_default_seed_comes_from_os_entropy():
    seeds = {tuple(sampling.new_seed_words(None)) for _ in range(5)}
    assert len(seeds) == 5
    assert np.array_equal(sampling.new_seed_words(3), sampling.new_seed_words(3))


def test_physical_batches_have_fixed_shape_mask_and_one_last_flag():
    idx = np.arange(10, 27)
    out = list(sampling.physical_batches(idx, 8))
    assert len(out) == 3
    assert all(b.shape == (8,) and m.shape == (8,) for b, m, _ in out)
    assert [last for _, _, last in out] == [False, False, True]
    real = np.concatenate([b[m] for b, m, _ in out])
    assert np.array_equal(real, idx)
    assert out[-1][1].sum() == 1


def test_empty_logical_batch_is_one_fully_masked_batch():
    out = list(sampling.physical_batches(np.zeros((0,), np.int64), 4))
    assert len(out) == 1 and not out[0][1].any() and out[0][2]


def test_empty_batches_happen_and_are_not_resampled():
    s = sampling.PoissonSampler(20, 0.05, sampling.new_seed_words(0))
    sizes = [len(s.sample(t)) for t in range(200)]
    assert 0 in sizes  # P(empty) = 0.95^20 = 0.36


def test_random_access_data_structures():
    x = {"a": np.arange(10.0)[:, None], "b": np.arange(10)}
    y = np.arange(10) * 2
    d = sampling.RandomAccessData(x, y)
    bx, by, bsw = d.take(np.array([3, 5]))
    assert np.array_equal(bx["b"], [3, 5]) and np.array_equal(by, [6, 10]) and bsw is None


def test_memory_mapped_arrays_are_accepted(tmp_path):
    path = tmp_path / "x.npy"
    np.save(path, np.arange(40, dtype="float32").reshape(20, 2))
    d = sampling.RandomAccessData(np.load(path, mmap_mode="r"), np.arange(20))
    bx, by, _ = d.take(np.array([0, 19]))
    assert bx.tolist() == [[0, 1], [38, 39]]


def test_mismatched_lengths_are_refused():
    with pytest.raises(ValueError, match="same number of examples"):
        sampling.RandomAccessData(np.zeros((10, 2)), np.zeros((9,)))


def test_generators_are_refused_with_the_reason():
    with pytest.raises(ValueError, match="Poisson"):
        sampling.RandomAccessData((x for x in range(3)))


def test_secure_sampler_is_poisson_too():
    n, q = 500, 0.05
    s = sampling.SecurePoissonSampler(n, q)
    draws = [s.sample() for _ in range(2000)]
    sizes = np.array([len(d) for d in draws])
    assert all(np.all(np.diff(d) > 0) and (len(d) == 0 or (d[0] >= 0 and d[-1] < n)) for d in draws)
    assert binomial_fit_pvalue(sizes, n, q) > 1e-4  # not seeded: looser threshold
    counts = np.zeros(n)
    for d in draws:
        counts[d] += 1
    # Every example with probability q: per-example counts ~ Binomial(2000, q).
    z = (counts - 2000 * q) / np.sqrt(2000 * q * (1 - q))
    assert abs(np.mean(z**2) - 1.0) < 0.35 and abs(np.mean(z)) < 0.3
