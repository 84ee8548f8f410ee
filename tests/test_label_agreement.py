"""Agreement between labelers (alignkit.labeling.agreement): checked against values worked by hand."""

from __future__ import annotations

import pytest

from alignkit.labeling.agreement import agreement_stats, fractional_ranks, krippendorff_alpha_interval


def test_fractional_ranks_share_the_mean_place_of_a_tie():
    assert fractional_ranks([[2], [1, 3]]) == {2: 1.0, 1: 2.5, 3: 2.5}
    assert fractional_ranks([[2, 1], [3]]) == {2: 1.5, 1: 1.5, 3: 3.0}


def test_alpha_two_coders_two_units_by_hand():
    """Units (1, 1) and (2, 3); n = 4 pairable values.
    D_o = 1/4 * [ (0 + 0)/1 + (1 + 1)/1 ] = 1/2.
    D_e = 1/(4*3) * sum over ordered pairs of 1, 1, 2, 3: unordered squares 0+1+4+1+4+1 = 11, ordered 22,
    so D_e = 22/12 = 11/6; alpha = 1 - (1/2) / (11/6) = 1 - 3/11 = 8/11."""
    assert krippendorff_alpha_interval([[1, 1], [2, 3]]) == pytest.approx(8 / 11)


def test_alpha_matches_krippendorffs_published_example():
    """Krippendorff (2011), "Computing Krippendorff's Alpha-Reliability", the 4 coders x 12 units example with
    missing values: interval alpha = 0.849 (unit 12 has one value and is not pairable)."""
    a = [1, 2, 3, 3, 2, 1, 4, 1, 2, None, None, None]
    b = [1, 2, 3, 3, 2, 2, 4, 1, 2, 5, None, 3]
    c = [None, 3, 3, 3, 2, 3, 4, 2, 2, 5, 1, None]
    d = [1, 2, 3, 3, 2, 4, 4, 1, 2, 5, 1, None]
    units = [[v for v in col if v is not None] for col in zip(a, b, c, d)]
    assert krippendorff_alpha_interval(units) == pytest.approx(0.849, abs=5e-4)


def test_alpha_undefined_without_pairable_values_or_spread():
    assert krippendorff_alpha_interval([[1], [2]]) is None
    assert krippendorff_alpha_interval([[2, 2], [2, 2]]) is None


def test_agreement_stats_by_hand_and_the_low_labeler_listed():
    """One item of 3 responses: ana and ben rank 1 > 2 > 3, cid the reverse; item 9 has one ranking only.
    Pairwise: ana-ben agree on 3 of 3 pairs, ana-cid and ben-cid on 0 of 3: overall 3/9; ana 3/6, ben 3/6,
    cid 0/6. Alpha: units (1, 1, 3), (2, 2, 2), (3, 3, 1); n = 9; D_o = (16/2 + 0 + 16/2) / 9 = 16/9;
    values three 1s, 2s and 3s: ordered squares 2 (9*42 - 18^2) = 108, D_e = 108/72 = 3/2;
    alpha = 1 - (16/9)/(3/2) = -5/27."""
    items = {0: {"ana": [[1], [2], [3]], "ben": [[1], [2], [3]], "cid": [[3], [2], [1]]}, 9: {"ana": [[1], [2]]}}
    stats = agreement_stats(items, {0: 3, 9: 2}, threshold=0.4, min_comparisons=1)
    assert stats["items_multi"] == 1
    assert stats["pairwise_agreement"] == pytest.approx(1 / 3)
    assert stats["alpha"] == pytest.approx(-5 / 27)
    assert stats["labelers"] == {
        "ana": {"agreement": 0.5, "comparisons": 6},
        "ben": {"agreement": 0.5, "comparisons": 6},
        "cid": {"agreement": 0.0, "comparisons": 6},
    }
    assert stats["low_agreement"] == ["cid"]
    # Per item (the admin page's list): item 0 alone holds every comparison, so its figures are the overall
    # ones; item 9, with one ranking, is not listed.
    assert stats["items"] == {0: {"rankings": 3, "pairwise_agreement": pytest.approx(1 / 3),
                                  "alpha": pytest.approx(-5 / 27)}}  # fmt: skip
    # Too few comparisons to judge anyone: nobody is listed.
    assert agreement_stats(items, {0: 3, 9: 2}, threshold=0.4, min_comparisons=7)["low_agreement"] == []


def test_agreement_stats_with_nothing_to_compare():
    stats = agreement_stats({0: {"ana": [[1], [2]]}}, {0: 2})
    assert (stats["items_multi"], stats["pairwise_agreement"], stats["alpha"], stats["low_agreement"]) == (
        0, None, None, [])
    assert stats["items"] == {}
