"""Evaluation metrics as pure functions over plain lists, numpy arrays and torch tensors.

Diversity (distinct-n), summary statistics with bootstrap intervals, win rates, KL estimators on the
policy's own samples, entropy and correlation. No model or tokenizer objects: callers pass ids or text.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass

import numpy as np
import torch


@dataclass
class Stats:
    """Summary of a list of numbers; ``std`` is the sample std (ddof=1), 0.0 for one value."""

    mean: float
    std: float
    min: float
    max: float
    n: int


@dataclass
class Estimate:
    """A point estimate with its (1 - alpha) percentile-bootstrap interval over ``n`` items."""

    value: float
    low: float
    high: float
    n: int


@dataclass
class KLEstimates:
    """Monte-Carlo estimates of KL(policy || reference) from tokens sampled from the policy."""

    k1: float  # per token: mean(log p - log q); unbiased, can be negative on few samples
    k3: float  # per token: mean((r - 1) - log r), r = q / p; unbiased and never negative
    per_sequence: torch.Tensor  # (B,) sum over each sequence's tokens of (log p - log q)
    n_tokens: int


# --- diversity -----------------------------------------------------------------------------------------


def _distinct(token_seqs: Sequence[Sequence], n: int) -> float:
    if n < 1:
        raise ValueError(f"n must be >= 1, got {n}")
    ngrams = [tuple(seq[i : i + n]) for seq in token_seqs for i in range(len(seq) - n + 1)]
    return len(set(ngrams)) / len(ngrams) if ngrams else 0.0


def distinct_n(texts: list[str], n: int) -> float:
    """distinct-n of Li et al. 2016 ("A Diversity-Promoting Objective Function for Neural Conversation
    Models"): unique n-grams / total n-grams, pooled over all responses.

    Tokens are the lower-cased whitespace-separated words of each response; n-grams never cross from one
    response into the next. 0.0 when no response has n tokens.
    """
    return _distinct([text.lower().split() for text in texts], n)


def distinct_n_ids(seqs: list[list[int]], n: int) -> float:
    """distinct-n (Li et al. 2016) over token-id sequences: unique id n-grams / total id n-grams."""
    return _distinct(seqs, n)


# --- summaries and intervals ---------------------------------------------------------------------------


def length_stats(values: Sequence[float]) -> Stats:
    """Mean, sample std (ddof=1, as an estimate of the population's spread; 0.0 for one value), min, max.

    An empty list gives NaN statistics with n=0 rather than an error, so an empty bucket can be reported.
    """
    arr = np.asarray(values, dtype=np.float64)
    if arr.size == 0:
        return Stats(math.nan, math.nan, math.nan, math.nan, 0)
    std = float(arr.std(ddof=1)) if arr.size > 1 else 0.0
    return Stats(float(arr.mean()), std, float(arr.min()), float(arr.max()), int(arr.size))


def bootstrap_ci(
    values: Sequence[float],
    stat: Callable[[np.ndarray], float] = np.mean,
    n_boot: int = 2000,
    alpha: float = 0.05,
    seed: int = 0,
) -> tuple[float, float]:
    """Percentile bootstrap (Efron & Tibshirani 1993, ch. 13): resample the values with replacement
    ``n_boot`` times, apply ``stat``, and return the alpha/2 and 1 - alpha/2 quantiles."""
    arr = np.asarray(values, dtype=np.float64)
    if arr.size == 0:
        raise ValueError("bootstrap_ci needs at least one value")
    rng = np.random.default_rng(seed)
    resamples = rng.integers(0, arr.size, size=(n_boot, arr.size))  # (n_boot, n) indices
    stats = np.array([stat(arr[idx]) for idx in resamples])  # (n_boot,)
    low, high = np.quantile(stats, [alpha / 2, 1 - alpha / 2])
    return float(low), float(high)


def mean_ci(values: Sequence[float], n_boot: int = 2000, alpha: float = 0.05, seed: int = 0) -> Estimate:
    """The mean with its percentile-bootstrap interval."""
    low, high = bootstrap_ci(values, np.mean, n_boot=n_boot, alpha=alpha, seed=seed)
    return Estimate(float(np.mean(values)), low, high, len(values))


def mean_difference(
    before: Sequence[float], after: Sequence[float], n_boot: int = 2000, alpha: float = 0.05, seed: int = 0
) -> Estimate:
    """mean(after) - mean(before) of two independent samples, with a percentile-bootstrap interval that
    resamples each group on its own (e.g. the rewards of a run's first iterations against its last)."""
    a, b = np.asarray(before, dtype=np.float64), np.asarray(after, dtype=np.float64)
    if a.size == 0 or b.size == 0:
        raise ValueError("mean_difference needs at least one value in each group")
    rng = np.random.default_rng(seed)
    boot_b = b[rng.integers(0, b.size, (n_boot, b.size))].mean(1)  # (n_boot,); drawn first, as always
    boot_a = a[rng.integers(0, a.size, (n_boot, a.size))].mean(1)
    diffs = boot_b - boot_a
    low, high = np.quantile(diffs, [alpha / 2, 1 - alpha / 2])
    return Estimate(float(b.mean() - a.mean()), float(low), float(high), int(a.size + b.size))


def win_rate_from_outcomes(
    outcomes: Sequence[float], n_boot: int = 2000, alpha: float = 0.05, seed: int = 0
) -> Estimate:
    """Win rate from per-prompt outcomes (1 win, 0.5 tie, 0 loss), bootstrapped over prompts."""
    bad = [o for o in outcomes if o not in (0.0, 0.5, 1.0)]
    if bad:
        raise ValueError(f"outcomes must be 1, 0.5 or 0; got {bad[:3]}")
    return mean_ci(outcomes, n_boot=n_boot, alpha=alpha, seed=seed)


def win_rate(
    policy_scores: Sequence[float],
    reference_scores: Sequence[float],
    tie_eps: float = 0.0,
    n_boot: int = 2000,
    alpha: float = 0.05,
    seed: int = 0,
) -> Estimate:
    """Fraction of prompts where the policy's response scores higher than the reference's.

    A tie (|policy - reference| <= tie_eps) counts half, as in AlpacaEval's win rate. The interval
    resamples prompts, since the prompt is the unit the policy and reference were compared on.
    """
    if len(policy_scores) != len(reference_scores):
        raise ValueError(f"{len(policy_scores)} policy scores but {len(reference_scores)} reference scores")
    diffs = np.asarray(policy_scores, dtype=np.float64) - np.asarray(reference_scores, dtype=np.float64)
    outcomes = np.where(np.abs(diffs) <= tie_eps, 0.5, (diffs > 0).astype(np.float64))
    return win_rate_from_outcomes(outcomes.tolist(), n_boot=n_boot, alpha=alpha, seed=seed)


# --- KL and entropy ------------------------------------------------------------------------------------


def _as_sequences(logps: torch.Tensor | Sequence[torch.Tensor]) -> list[torch.Tensor]:
    seqs = [logps] if isinstance(logps, torch.Tensor) else list(logps)
    return [s.detach().double().reshape(-1) for s in seqs]


def kl_per_token(
    policy_logps: torch.Tensor | Sequence[torch.Tensor],
    reference_logps: torch.Tensor | Sequence[torch.Tensor],
) -> KLEstimates:
    """KL(p || q) estimates from tokens the POLICY p sampled, given their log-probs under p and under q.

    A 1-D tensor is one sequence; a list holds one 1-D tensor per sequence (lengths may differ).
    Schulman 2020, "Approximating KL Divergence": with x ~ p and r = q(x) / p(x),
      k1 = log p - log q          (unbiased, high variance, negative on some samples)
      k3 = (r - 1) - log r        (unbiased since E_p[r] = 1; never negative since log r <= r - 1)
    Per-sequence KL is the sum of k1 over the sequence's tokens (the penalty RLHF puts on a response).
    """
    policy, reference = _as_sequences(policy_logps), _as_sequences(reference_logps)
    if len(policy) != len(reference) or any(p.shape != q.shape for p, q in zip(policy, reference)):
        raise ValueError("policy_logps and reference_logps must hold the same sequences with equal lengths")
    log_ratio = [p - q for p, q in zip(policy, reference)]  # log p - log q, one (T_i,) per sequence
    flat = torch.cat(log_ratio) if log_ratio else torch.zeros(0, dtype=torch.float64)  # (N,)
    if flat.numel() == 0:
        raise ValueError("kl_per_token needs at least one token")
    log_r = -flat  # log r = log q - log p
    k3 = torch.expm1(log_r) - log_r  # (N,) expm1 keeps (r - 1) exact for r near 1
    per_sequence = torch.stack([lr.sum() for lr in log_ratio]).float()  # (B,)
    return KLEstimates(float(flat.mean()), float(k3.mean()), per_sequence, int(flat.numel()))


def entropy_from_logits(logits: torch.Tensor) -> torch.Tensor:
    """Entropy H = -sum_v p_v log p_v of the softmax over the last dim, per position: (..., V) -> (...).

    log p comes from log_softmax (logsumexp inside), so large logits do not overflow; masked logits
    of -inf contribute 0 (the limit of p log p as p -> 0) rather than NaN. Computed in float32.
    """
    logp = torch.log_softmax(logits.float(), dim=-1)  # (..., V)
    p = logp.exp()
    return -(p * logp.masked_fill(p == 0, 0.0)).sum(dim=-1)  # (...)


def mean_entropy(token_entropies: torch.Tensor | Sequence[float] | Sequence[torch.Tensor]) -> float:
    """Mean per-token entropy over all tokens (pooled, so long responses weigh more); NaN when empty."""
    if isinstance(token_entropies, torch.Tensor):
        flat = token_entropies.detach().double().reshape(-1)
    elif len(token_entropies) and isinstance(token_entropies[0], torch.Tensor):
        flat = torch.cat([t.detach().double().reshape(-1) for t in token_entropies])
    else:
        flat = torch.tensor(list(token_entropies), dtype=torch.float64)
    return float(flat.mean()) if flat.numel() else math.nan


def pearson(x: Sequence[float], y: Sequence[float]) -> float:
    """Pearson correlation cov(x, y) / (std x * std y); 0.0 when either is constant or n < 2, because a
    constant (e.g. response length) carries no evidence of a linear relation."""
    if len(x) != len(y):
        raise ValueError(f"x has {len(x)} values but y has {len(y)}")
    xa, ya = np.asarray(x, dtype=np.float64), np.asarray(y, dtype=np.float64)
    # Tested on the range, not the computed variance, which float rounding can leave slightly above 0.
    if xa.size < 2 or np.ptp(xa) == 0 or np.ptp(ya) == 0:
        return 0.0
    dx, dy = xa - xa.mean(), ya - ya.mean()
    r = (dx * dy).sum() / math.sqrt(float((dx * dx).sum() * (dy * dy).sum()))
    return float(np.clip(r, -1.0, 1.0))
