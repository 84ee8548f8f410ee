"""Pairing rules: one prompt's responses and their scores in, (chosen, rejected) index pairs and what was left
out (empty, repeated, unscored responses; ties) out. Pure, so build-prefs (offline) and online-dpo (each round,
on the policy's own samples) pair by the same rule.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Literal

import numpy as np

PairingRule = Literal["best_vs_worst", "best_vs_random", "all_pairs"]


def is_scored(value: float | None) -> bool:
    """A usable score: not None (left out of a human ranking) and not NaN (a ranker's "no opinion")."""
    return value is not None and not math.isnan(value)


@dataclass
class Pairing:
    pairs: list[tuple[int, int]]  # (chosen index, rejected index) into the prompt's responses
    n_empty: int = 0  # responses left out: empty or whitespace only
    n_duplicate: int = 0  # responses left out: the same text as an earlier response
    n_unscored: int = 0  # responses left out: the ranker gave no score (NaN, or not in a human ranking)
    n_ties: int = 0  # candidate pairs left out because both responses scored the same


def usable_responses(responses: Sequence[str]) -> tuple[list[int], int, int]:
    """Indices of the responses worth ranking, and how many were empty and how many repeated an earlier one.

    A pair with an empty side or two identical sides teaches nothing (and the pair loaders refuse them).
    """
    kept, seen, n_empty, n_duplicate = [], set(), 0, 0
    for i, text in enumerate(responses):
        if not text.strip():
            n_empty += 1
        elif text in seen:
            n_duplicate += 1
        else:
            seen.add(text)
            kept.append(i)
    return kept, n_empty, n_duplicate


def make_pairs(
    responses: Sequence[str],
    scores: Sequence[float | None],
    pairing: PairingRule,
    rng: np.random.Generator | None = None,
) -> Pairing:
    """Pairs of one prompt's responses by ``pairing``; the chosen side always scored strictly higher.

    Empty and repeated responses, and unscored ones (None/NaN), are left out first. Among equal best (or
    worst) scores the earliest response is taken. A candidate pair whose scores are equal is a tie: it is
    counted and left out. best_vs_random draws the rejected response uniformly from the other usable ones
    with ``rng``.
    """
    kept, n_empty, n_duplicate = usable_responses(responses)
    scored = [i for i in kept if is_scored(scores[i])]
    out = Pairing([], n_empty, n_duplicate, len(kept) - len(scored))
    if len(scored) < 2:
        return out
    if pairing == "all_pairs":
        for a, i in enumerate(scored):
            for j in scored[a + 1 :]:
                if scores[i] == scores[j]:
                    out.n_ties += 1
                else:
                    out.pairs.append((i, j) if scores[i] > scores[j] else (j, i))
        return out
    best = max(scored, key=lambda i: scores[i])  # the first of equal maxima
    if pairing == "best_vs_worst":
        other = min(scored, key=lambda i: scores[i])
    elif pairing == "best_vs_random":
        if rng is None:
            raise ValueError("best_vs_random needs an rng")
        rest = [i for i in scored if i != best]
        other = rest[int(rng.integers(len(rest)))]
    else:
        raise ValueError(f"unknown pairing {pairing!r}")
    if scores[best] == scores[other]:
        out.n_ties += 1
    else:
        out.pairs.append((best, other))
    return out
