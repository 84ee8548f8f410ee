"""Length-balanced preference data: as many pairs whose chosen reply is the longer one as pairs whose chosen
reply is the shorter one, so that reply length alone predicts nothing about which side was preferred.

Pure functions over reply lengths; the rm stage applies them to its training pairs before the shuffle.
"""

from __future__ import annotations

import numpy as np


def length_balanced_indices(chosen_lengths: list[int], rejected_lengths: list[int], seed: int) -> list[int]:
    """Indices (sorted) of a subset of pairs in which "chosen is longer" and "chosen is shorter" are equally
    many: every pair of the smaller group, an equal-sized seeded random sample of the larger one, and every
    pair whose replies are of equal length (they favour neither side).

    The loop shuffles the kept pairs, so every batch is balanced in expectation (not exactly: the shared
    loop owns the order). Downsampling, not weighting: the Bradley-Terry loss stays an unweighted mean.
    """
    if len(chosen_lengths) != len(rejected_lengths):
        raise ValueError(f"{len(chosen_lengths)} chosen lengths but {len(rejected_lengths)} rejected lengths")
    diff = np.asarray(chosen_lengths, dtype=np.int64) - np.asarray(rejected_lengths, dtype=np.int64)
    longer, shorter, equal = np.flatnonzero(diff > 0), np.flatnonzero(diff < 0), np.flatnonzero(diff == 0)
    small, large = (longer, shorter) if len(longer) <= len(shorter) else (shorter, longer)
    rng = np.random.default_rng(seed)
    kept_large = rng.choice(large, size=len(small), replace=False) if len(small) else large[:0]
    return sorted(int(i) for i in np.concatenate([small, kept_large, equal]))
