"""How much labelers agree: pure functions over rankings (best-first groups of tied response numbers).

Two measures, both over the items at least two labelers ranked:

- **Pairwise agreement.** A ranking implies, for every two responses a < b of an item, a > b, b > a or a tie.
  Two labelers agree on (a, b) when they imply the same one of the three. The pairwise agreement of a set of
  labelers is (agreeing comparisons) / (comparisons) over every item, every two labelers who ranked it and
  every two responses of it; a labeler's agreement with the rest counts only the comparisons they take part in.
- **Krippendorff's alpha, interval metric on ranks.** Each (item, response) is a unit; a labeler's value for it
  is the response's fractional rank in their ranking (1 = best, tied responses share the mean of the places
  they occupy: ``[[2], [1, 3]]`` gives 2 -> 1, 1 and 3 -> 2.5). With m_u values in unit u, n = sum of m_u over
  the units with m_u >= 2 (the pairable values), and delta(c, k) = (c - k)^2::

      D_o = 1/n * sum_u 1/(m_u - 1) * sum_{i != j in u} (v_ui - v_uj)^2
      D_e = 1/(n (n - 1)) * sum_{i != j over all pairable values} (v_i - v_j)^2
      alpha = 1 - D_o / D_e

  (Krippendorff, "Computing Krippendorff's Alpha-Reliability", 2011, the interval case). 1 is perfect
  agreement, 0 agreement no better than chance; None where it is undefined (fewer than two pairable values,
  or no spread: D_e = 0). The interval metric treats rank places as equally spaced, which is how the app's
  best / middle / worst groups are meant; the ordinal metric would weigh a step by how many values lie in it.
"""

from __future__ import annotations

import itertools
from collections.abc import Mapping, Sequence

Ranking = list[list[int]]  # best-first groups of response numbers 1..n, ties within a group


def fractional_ranks(groups: Ranking) -> dict[int, float]:
    """Response number -> its place, 1 = best; tied responses share the mean of the places they fill."""
    out: dict[int, float] = {}
    place = 1
    for group in groups:
        mean = place + (len(group) - 1) / 2
        out.update((number, mean) for number in group)
        place += len(group)
    return out


def preference(ranks: Mapping[int, float], a: int, b: int) -> int:
    """1 if a is ranked above b, -1 if below, 0 for a tie."""
    return (ranks[a] < ranks[b]) - (ranks[a] > ranks[b])


def krippendorff_alpha_interval(units: Sequence[Sequence[float]]) -> float | None:
    """Krippendorff's alpha with the interval metric (formula in the module docstring); each unit is the
    values its coders gave it (any number; units with fewer than two are not pairable and left out)."""
    pairable = [list(u) for u in units if len(u) >= 2]
    values = [v for u in pairable for v in u]
    n = len(values)
    if n < 2:
        return None
    d_o = sum(
        sum((x - y) ** 2 for x, y in itertools.permutations(u, 2)) / (len(u) - 1) for u in pairable
    ) / n
    # sum over ordered pairs i != j of (v_i - v_j)^2 = 2 (n sum v^2 - (sum v)^2), without the n^2 loop
    total, squares = sum(values), sum(v * v for v in values)
    d_e = 2 * (n * squares - total * total) / (n * (n - 1))
    if d_e <= 1e-12:
        return None
    return 1 - d_o / d_e


def agreement_stats(
    items: Mapping[object, Mapping[str, Ranking]],
    n_responses: Mapping[object, int],
    threshold: float = 0.5,
    min_comparisons: int = 5,
) -> dict:
    """Agreement over ``items`` (item -> labeler -> ranking; items with one ranking count for nothing):

    ``items_multi`` (items with several rankings), ``pairwise_agreement`` and ``alpha`` (None when nothing
    to compare), ``items`` (item -> {"rankings", "pairwise_agreement", "alpha"} of each item with several
    rankings, the same measures over that item alone), ``labelers`` (name -> {"agreement", "comparisons"}
    with the rest), and ``low_agreement``: the labelers with at least ``min_comparisons`` comparisons whose
    agreement is below ``threshold``."""
    agree: dict[str, int] = {}
    compared: dict[str, int] = {}
    units: list[list[float]] = []
    per_item: dict[object, dict] = {}
    for item, by_labeler in items.items():
        if len(by_labeler) < 2:
            continue
        n = n_responses[item]
        ranks = {name: fractional_ranks(groups) for name, groups in by_labeler.items()}
        item_units = [[r[k] for r in ranks.values()] for k in range(1, n + 1)]
        units.extend(item_units)
        item_same = item_pairs = 0
        for x, y in itertools.combinations(sorted(ranks), 2):
            same = sum(
                preference(ranks[x], a, b) == preference(ranks[y], a, b)
                for a, b in itertools.combinations(range(1, n + 1), 2)
            )
            pairs = n * (n - 1) // 2
            item_same, item_pairs = item_same + same, item_pairs + pairs
            for name in (x, y):
                agree[name] = agree.get(name, 0) + same
                compared[name] = compared.get(name, 0) + pairs
        per_item[item] = {"rankings": len(ranks), "pairwise_agreement": item_same / item_pairs,
                          "alpha": krippendorff_alpha_interval(item_units)}  # fmt: skip
    # Each comparison is counted once for each of its two labelers: halve both sums for the overall figure.
    total = sum(compared.values())
    labelers = {
        name: {"agreement": agree[name] / compared[name], "comparisons": compared[name]} for name in sorted(agree)
    }
    low = [
        name for name, s in labelers.items() if s["comparisons"] >= min_comparisons and s["agreement"] < threshold
    ]
    return {
        "items_multi": len(per_item),
        "items": per_item,
        "pairwise_agreement": sum(agree.values()) / total if total else None,
        "alpha": krippendorff_alpha_interval(units),
        "labelers": labelers,
        "low_agreement": low,
        "low_agreement_threshold": threshold,
    }
