"""Evaluation metrics against values worked out by hand (the working is in each docstring)."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch

from alignkit.evaluation.metrics import (
    bootstrap_ci,
    distinct_n,
    distinct_n_ids,
    entropy_from_logits,
    kl_per_token,
    length_stats,
    mean_ci,
    mean_entropy,
    pearson,
    win_rate,
    win_rate_from_outcomes,
)


def test_distinct_n_by_hand():
    """ "The cat sat" / "the cat ran" lower-cased: words the cat sat the cat ran.
    n=1: {the, cat, sat, ran} 4 unique of 6 -> 2/3. n=2: (the cat) (cat sat) (the cat) (cat ran): 3 of 4.
    n=3: 2 trigrams, both unique -> 1. n=4: no 4-grams -> 0.0."""
    texts = ["The cat sat", "the cat ran"]
    assert distinct_n(texts, 1) == pytest.approx(2 / 3)
    assert distinct_n(texts, 2) == pytest.approx(0.75)
    assert distinct_n(texts, 3) == 1.0
    assert distinct_n(texts, 4) == 0.0
    assert distinct_n([], 2) == 0.0


def test_distinct_n_does_not_cross_responses_and_lowercases():
    """["a b", "a b"]: bigrams (a b) (a b) -> 1/2. Crossing the boundary would add (b a) -> 2/3.
    ["A", "a"] at n=1: one unique word of two -> 1/2."""
    assert distinct_n(["a b", "a b"], 2) == 0.5
    assert distinct_n(["A", "a"], 1) == 0.5
    with pytest.raises(ValueError):
        distinct_n(["a"], 0)


def test_distinct_n_ids_by_hand():
    """[[1, 2, 1, 2], [3]]: bigrams (1 2) (2 1) (1 2) -> 2/3; unigrams 1 2 1 2 3 -> 3/5."""
    seqs = [[1, 2, 1, 2], [3]]
    assert distinct_n_ids(seqs, 2) == pytest.approx(2 / 3)
    assert distinct_n_ids(seqs, 1) == pytest.approx(3 / 5)


def test_length_stats_sample_std():
    """[1, 2, 3, 4]: mean 2.5; squared deviations 2.25 + 0.25 + 0.25 + 2.25 = 5; ddof=1 -> var 5/3,
    std 1.290994. One value has std 0; an empty list gives NaNs with n=0."""
    s = length_stats([1, 2, 3, 4])
    assert (s.mean, s.min, s.max, s.n) == (2.5, 1.0, 4.0, 4)
    assert s.std == pytest.approx(1.290994, abs=1e-6)
    assert length_stats([7]).std == 0.0
    empty = length_stats([])
    assert empty.n == 0 and math.isnan(empty.mean)


def test_bootstrap_ci_matches_normal_interval():
    """1000 values, half 1 and half 0: mean 0.5, standard error sqrt(0.25 / 1000) = 0.015811, so the 95%
    interval is about 0.5 -+ 1.96 * 0.015811 = (0.469, 0.531). Tolerance 0.004: the 2.5% quantile of 2000
    resamples has Monte-Carlo error ~0.001 and the means move in steps of 0.001."""
    values = [1.0] * 500 + [0.0] * 500
    low, high = bootstrap_ci(values)
    assert low == pytest.approx(0.469, abs=0.004)
    assert high == pytest.approx(0.531, abs=0.004)
    assert bootstrap_ci(values, seed=0) == (low, high)  # seeded: reproducible
    narrow = bootstrap_ci(values, alpha=0.5)  # 50% interval: 0.5 -+ 0.674 * 0.0158 = (0.489, 0.511)
    assert narrow[0] == pytest.approx(0.489, abs=0.004) and narrow[1] == pytest.approx(0.511, abs=0.004)
    assert bootstrap_ci([2.0, 2.0, 2.0], stat=np.median) == (2.0, 2.0)
    with pytest.raises(ValueError):
        bootstrap_ci([])


def test_mean_ci():
    """mean of [1, 2, 3, 6] = 3; the interval lies inside [min, max] = [1, 6] and contains 3."""
    est = mean_ci([1, 2, 3, 6])
    assert est.value == 3.0 and est.n == 4
    assert 1.0 <= est.low < 3.0 < est.high <= 6.0


def test_win_rate_ties_count_half():
    """policy [3, 1, 2, 5.5] vs reference [1, 1, 3, 4]: diffs [2, 0, -1, 1.5].
    tie_eps 0: win tie loss win -> (1 + 0.5 + 0 + 1) / 4 = 0.625.
    tie_eps 1: |-1| <= 1 is now a tie -> (1 + 0.5 + 0.5 + 1) / 4 = 0.75."""
    policy, reference = [3, 1, 2, 5.5], [1, 1, 3, 4]
    est = win_rate(policy, reference)
    assert est.value == 0.625 and est.n == 4
    assert 0.0 <= est.low <= 0.625 <= est.high <= 1.0
    assert win_rate(policy, reference, tie_eps=1.0).value == 0.75
    all_wins = win_rate([2, 2], [1, 1])
    assert (all_wins.value, all_wins.low, all_wins.high) == (1.0, 1.0, 1.0)
    with pytest.raises(ValueError):
        win_rate([1, 2], [1])


def test_win_rate_from_outcomes():
    """[1, 0.5, 0, 0, 1] -> 2.5 / 5 = 0.5; an outcome other than 1/0.5/0 is an error."""
    assert win_rate_from_outcomes([1, 0.5, 0, 0, 1]).value == 0.5
    with pytest.raises(ValueError):
        win_rate_from_outcomes([1, 0.3])


def test_kl_estimators_by_hand():
    """log p = [-1, -2], log q = [-1.5, -1]: log p - log q = [0.5, -1] -> k1 = -0.25, sequence sum -0.5.
    log r = [-0.5, 1]: (e^-0.5 - 1) + 0.5 = 0.1065307, (e - 1) - 1 = 0.7182818 -> k3 = 0.4124062.
    A second sequence [-0.5] vs [-0.7] adds 0.2: per-sequence [-0.5, 0.2], k1 = (0.5 - 1 + 0.2) / 3 = -0.1."""
    est = kl_per_token(torch.tensor([-1.0, -2.0]), torch.tensor([-1.5, -1.0]))
    assert est.k1 == pytest.approx(-0.25, abs=1e-7)
    assert est.k3 == pytest.approx(0.4124062, abs=1e-6)
    assert est.per_sequence.tolist() == pytest.approx([-0.5])
    two = kl_per_token(
        [torch.tensor([-1.0, -2.0]), torch.tensor([-0.5])], [torch.tensor([-1.5, -1.0]), torch.tensor([-0.7])]
    )
    assert two.per_sequence.tolist() == pytest.approx([-0.5, 0.2], abs=1e-6)
    assert two.k1 == pytest.approx(-0.1, abs=1e-6) and two.n_tokens == 3
    with pytest.raises(ValueError):
        kl_per_token(torch.tensor([-1.0, -2.0]), torch.tensor([-1.0]))


def test_kl_estimators_match_exact_categorical_kl():
    """p = [0.5, 0.3, 0.2], q = [0.2, 0.3, 0.5]: KL(p||q) = 0.5 ln 2.5 + 0.3 ln 1 + 0.2 ln 0.4
    = 0.3 ln 2.5 = 0.274887. 200,000 tokens drawn from p (seed 0): k1 has per-token std 0.72, so its
    standard error is 0.0016; tolerance 0.01. Sequences of 100 tokens have KL 27.49 each on average
    (standard error of the mean over 2000 sequences 0.16; tolerance 1.0). k3 is never negative per token."""
    p, q = torch.tensor([0.5, 0.3, 0.2]), torch.tensor([0.2, 0.3, 0.5])
    exact = float((p * (p / q).log()).sum())
    assert exact == pytest.approx(0.274887, abs=1e-6)
    tokens = torch.multinomial(p, 200_000, replacement=True, generator=torch.Generator().manual_seed(0))
    policy, reference = p.log()[tokens], q.log()[tokens]  # (N,)
    est = kl_per_token(list(policy.split(100)), list(reference.split(100)))
    assert est.k1 == pytest.approx(exact, abs=0.01)
    assert est.k3 == pytest.approx(exact, abs=0.01)
    assert est.per_sequence.shape == (2000,)
    assert est.per_sequence.mean().item() == pytest.approx(100 * exact, abs=1.0)
    few = kl_per_token(torch.randn(5), torch.randn(5))  # any log-probs: each k3 term (r-1) - log r >= 0
    assert few.k3 >= 0.0


def test_entropy_from_logits_by_hand():
    """Uniform over 4: ln 4 = 1.386294. Logits [ln 3, 0]: p = [3/4, 1/4], H = -(0.75 ln 0.75 + 0.25 ln 0.25)
    = 0.562335. [1000, 1000] is ln 2 without overflow; [0, -inf, -inf] is one certain token: H = 0, not NaN."""
    assert entropy_from_logits(torch.zeros(4)).item() == pytest.approx(1.386294, abs=1e-6)
    assert entropy_from_logits(torch.tensor([math.log(3.0), 0.0])).item() == pytest.approx(0.562335, abs=1e-6)
    assert entropy_from_logits(torch.tensor([1000.0, 1000.0])).item() == pytest.approx(math.log(2), abs=1e-6)
    assert entropy_from_logits(torch.tensor([0.0, -math.inf, -math.inf])).item() == 0.0
    batch = torch.zeros(2, 3, 5, dtype=torch.bfloat16)  # (B, T, V)
    out = entropy_from_logits(batch)
    assert out.shape == (2, 3) and out.dtype == torch.float32
    torch.testing.assert_close(out, torch.full((2, 3), math.log(5)))


def test_mean_entropy_pools_tokens():
    """[1, 2, 3] -> 2. Sequences [1] and [2, 3, 6] pool to 4 tokens: (1 + 2 + 3 + 6) / 4 = 3. Empty -> NaN."""
    assert mean_entropy(torch.tensor([1.0, 2.0, 3.0])) == 2.0
    assert mean_entropy([torch.tensor([1.0]), torch.tensor([2.0, 3.0, 6.0])]) == 3.0
    assert mean_entropy([0.5, 1.5]) == 1.0
    assert math.isnan(mean_entropy([]))


def test_pearson_by_hand():
    """x [1, 2, 3], y [2, 4, 7]: dx [-1, 0, 1], dy [-7/3, -1/3, 8/3]; sum dx dy = 5, sum dx^2 = 2,
    sum dy^2 = 114/9 -> r = 5 / sqrt(2 * 114 / 9) = 0.993399. A constant series gives 0."""
    assert pearson([1, 2, 3], [2, 4, 7]) == pytest.approx(0.993399, abs=1e-6)
    assert pearson([1, 2, 3], [3, 2, 1]) == pytest.approx(-1.0)
    assert pearson([1, 2, 3], [0.1, 0.1, 0.1]) == 0.0
    assert pearson([1], [2]) == 0.0
    with pytest.raises(ValueError):
        pearson([1, 2], [1])
