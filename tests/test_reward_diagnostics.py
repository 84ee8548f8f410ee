"""Reward-model diagnostics (evaluation.reward_diagnostics) on pairs small enough to work out by hand."""

from __future__ import annotations

import math

import numpy as np
import pytest

from alignkit.evaluation.reward_diagnostics import (
    agreement,
    average_ranks,
    calibration,
    diagnose,
    format_markdown,
    format_text,
    length_matched,
    pair_outcomes,
    spearman,
)


def test_outcomes_count_ties_half_and_the_length_bucket_rule():
    assert pair_outcomes([2.0, 1.0, 3.0], [1.0, 1.0, 4.0]).tolist() == [1.0, 0.5, 0.0]
    # |c - r| <= 0.2 * max(c, r): 80 vs 100 is matched (20 <= 20), 79 vs 100 is not, 5 vs 5 is.
    assert length_matched([80, 79, 5], [100, 100, 5]).tolist() == [True, False, True]
    # Model prefers chosen in pairs 0, 1; the shorter reply is chosen in 0, rejected in 1; 2 ties in length;
    # 3 ties in reward.
    agree = agreement([2, 2, 2, 1], [1, 1, 1, 1], [5, 9, 7, 3], [9, 5, 7, 9], "shorter")
    assert agree.tolist() == [1.0, 0.0, 0.5, 0.5]
    assert agreement([2], [1], [9], [5], "longer").tolist() == [1.0]


def test_ranks_and_spearman_with_ties():
    assert average_ranks([10, 20, 20, 5]).tolist() == [2.0, 3.5, 3.5, 1.0]
    # Monotone but not linear: Spearman 1, Pearson below 1.
    assert spearman([1, 2, 3, 4], [1, 4, 9, 100]) == pytest.approx(1.0)
    assert spearman([1, 2, 3, 4], [4, 3, 2, 1]) == pytest.approx(-1.0)


def test_calibration_bins_and_ece_by_hand():
    """gaps 0 (p = .5, conf .5, counts half), ln 3 (p = .75, right), -ln 3 (p = .25: conf .75, wrong),
    ln 9 (p = .9, right). 5 bins of width 0.1 on [0.5, 1]: .5 -> bin 0 (conf .5, acc .5);
    .75, .75 -> bin 2 (conf .75, acc .5); .9 -> bin 4 (conf .9, acc 1).
    ECE = 1/4 * |.5 - .5| + 2/4 * |.5 - .75| + 1/4 * |1 - .9| = 0 + .125 + .025 = 0.15."""
    bins, ece = calibration([0.0, math.log(3), 0.0, math.log(9)], [0.0, 0.0, math.log(3), 0.0])
    assert [b.n for b in bins] == [1, 0, 2, 0, 1]
    assert bins[2].confidence == pytest.approx(0.75) and bins[2].accuracy == pytest.approx(0.5)
    assert bins[4].confidence == pytest.approx(0.9) and bins[4].accuracy == 1.0
    assert bins[1].confidence is None and bins[1].accuracy is None  # empty: null in summary.json, not NaN
    assert ece == pytest.approx(0.15)


def test_diagnose_a_length_model_warns_and_a_preference_model_does_not():
    """40 pairs; the chosen reply is the shorter in 30 of them (prefer-shorter 0.75, prefer-longer 0.25).
    A model whose reward is minus the length scores exactly like prefer-shorter, agrees with it on every
    pair and correlates -1 with length: both warnings. A model that is right on every pair does not warn."""
    rng = np.random.default_rng(0)
    chosen_len = rng.integers(10, 100, 40)
    rejected_len = np.where(np.arange(40) < 30, chosen_len + 50, np.maximum(chosen_len - 5, 1))
    length_model = diagnose(-chosen_len, -rejected_len, chosen_len, rejected_len)
    assert length_model.baselines["prefer_shorter"]["value"] == pytest.approx(0.75)
    assert length_model.baselines["prefer_longer"]["value"] == pytest.approx(0.25)
    assert length_model.length_rule == "shorter"
    assert length_model.accuracy["value"] == pytest.approx(0.75)
    assert length_model.agreement_with_length_rule["value"] == 1.0
    assert length_model.length_correlation["pearson"]["value"] == pytest.approx(-1.0)
    assert length_model.length_correlation["spearman"]["value"] == pytest.approx(-1.0)
    assert len(length_model.warnings) == 2 and "barely beats" in length_model.warnings[0]
    # Pairs 30-39 differ by 5 tokens: matched where 5 <= 0.2 * chosen_len, i.e. chosen_len >= 25.
    expected_matched = int(((np.arange(40) >= 30) & (chosen_len >= 25)).sum())
    assert length_model.buckets["length_matched"]["n"] == expected_matched
    # In that bucket the shorter reply is always the rejected one: the length model is always wrong there.
    assert length_model.buckets["length_matched"]["accuracy"]["value"] == 0.0

    good = diagnose(np.ones(40), np.zeros(40), chosen_len, rejected_len, [-1.0] * 40, [-2.0] * 40)
    assert good.accuracy["value"] == 1.0 and good.accuracy["ci95"] == [1.0, 1.0]
    assert good.baselines["base_logprob"]["value"] == 1.0
    assert good.agreement_with_length_rule["value"] == pytest.approx(0.75)
    assert good.warnings == []
    assert good.ece == pytest.approx(1.0 - 1.0 / (1.0 + math.exp(-1.0)))  # one bin: conf 0.731, acc 1
    text = format_text(length_model.to_dict(), "held out")
    assert "prefer shorter" in text and "WARNING" in text
    md = format_markdown(good.to_dict(), "file.jsonl")
    assert md.startswith("### file.jsonl") and "| accuracy | 1.000 [1.000, 1.000] |" in md
    with pytest.raises(ValueError, match="N >= 1 pairs"):
        diagnose([], [], [], [])
