"""The gold evaluations of a run against its starting policy (``evaluation.gold_change``), by hand."""

from __future__ import annotations

import json
import math

import pytest

from alignkit.evaluation.gold_change import (
    change_between,
    gold_changes,
    gold_summary,
    read_gold_samples,
    sqrt_kl_fit,
)


def _rows(step: int, golds: list[float], proxies: list[float], prompts=("a", "b", "c", "d")) -> list[dict]:
    return [{"step": step, "prompt": p, "response": "r", "gold": g, "proxy": x} for p, g, x in zip(prompts, golds, proxies)]


def test_gold_changes_by_hand():
    """Step 0 golds (1, 2, 3, 4); step 5 (2, 2, 5, 3): differences +1, 0, +2, -1, mean +0.5; outcomes win, tie,
    win, loss: win rate (1 + 0.5 + 1 + 0) / 4 = 0.625. Both intervals resample the 4 prompts, so they lie within
    the smallest and largest per-prompt value. Step 9 is the best mean gold (3.5); the last is step 9 too."""
    by_step = {
        0: _rows(0, [1, 2, 3, 4], [0, 0, 0, 0]),
        5: _rows(5, [2, 2, 5, 3], [1, 1, 1, 1]),
        9: _rows(9, [3, 3, 4, 4], [2, 2, 2, 4]),
    }
    first, second = gold_changes(by_step)
    assert first["step"] == 5 and first["gold"] == pytest.approx(3.0) and first["proxy"] == pytest.approx(1.0)
    assert first["change"] == pytest.approx(0.5) and first["win_rate"] == pytest.approx(0.625)
    assert -1 <= first["change_ci95"][0] <= 0.5 <= first["change_ci95"][1] <= 2
    assert 0 <= first["win_rate_ci95"][0] <= 0.625 <= first["win_rate_ci95"][1] <= 1
    assert second["change"] == pytest.approx(1.0) and second["win_rate"] == pytest.approx((1 + 1 + 1 + 0.5) / 4)
    assert second["proxy"] == pytest.approx(2.5) and first["prompts"] == 4
    # The proxy on the same samples, paired: step 5 is +1 on every prompt (an interval of one point), step 9 +2.5.
    assert first["proxy_change"] == pytest.approx(1.0) and first["proxy_change_ci95"] == pytest.approx([1.0, 1.0])
    assert second["proxy_change"] == pytest.approx(2.5)


def test_over_optimisation_since_the_best_gold_evaluation(tmp_path):
    """Step 4 is the best mean gold (3.5); step 8, the last, falls back on every prompt while the proxy rises:
    gold differences (-1, -2, -1, -2), mean -1.5, every bootstrap mean in [-2, -1]; proxy (+2, +2, +2, +2)."""
    by_step = {
        0: _rows(0, [1, 2, 3, 4], [0, 0, 0, 0]),
        4: _rows(4, [3, 4, 3, 4], [1, 1, 1, 1]),
        8: _rows(8, [2, 2, 2, 2], [3, 3, 3, 3]),
    }
    since = change_between(by_step, 4, 8)
    assert since["gold_change"] == pytest.approx(-1.5) and -2 <= since["gold_change_ci95"][0] <= since["gold_change_ci95"][1] <= -1
    assert since["proxy_change"] == pytest.approx(2.0) and since["proxy_change_ci95"] == pytest.approx([2.0, 2.0])
    assert since["length_change"] == 0.0 and (since["from_step"], since["to_step"]) == (4, 8)
    path = tmp_path / "gold_samples.jsonl"
    path.write_text("".join(json.dumps(r) + "\n" for step in sorted(by_step) for r in by_step[step]))
    summary = gold_summary(path)
    assert summary["best"]["step"] == 4 and summary["since_best"] == since
    del by_step[8]
    path.write_text("".join(json.dumps(r) + "\n" for step in sorted(by_step) for r in by_step[step]))
    assert gold_summary(path)["since_best"] is None  # the last evaluation is the best: nothing since


def test_a_gain_that_length_explains_is_taken_out():
    """Step 0: replies of 1..4 characters scoring 1..4 (slope 1 gold per character). Step 5: every reply 2
    characters longer and 2 points better, so the change is +2, all of it length's: adjusted 0. Step 6: as long as
    step 0's and 1 point better: +1 either way."""
    def rows(step, texts, golds):
        return [{"step": step, "prompt": p, "response": t, "gold": g, "proxy": 0.0} for p, t, g in zip("abcd", texts, golds)]

    start = ["x", "xx", "xxx", "xxxx"]
    by_step = {
        0: rows(0, start, [1, 2, 3, 4]),
        5: rows(5, [t + "yy" for t in start], [3, 4, 5, 6]),
        6: rows(6, start, [2, 3, 4, 5]),
    }
    longer, better = gold_changes(by_step)
    assert longer["change"] == pytest.approx(2.0) and longer["length_change"] == pytest.approx(2.0)
    assert longer["length_adjusted_change"] == pytest.approx(0.0, abs=1e-9)
    assert longer["length_adjusted_change_ci95"] == pytest.approx([0.0, 0.0], abs=1e-9)
    assert better["length_adjusted_change"] == pytest.approx(1.0) == better["change"]


def test_every_prompt_better_gives_an_interval_above_zero():
    """A policy that beats the start on all 20 prompts by 1..20 has a change interval above 0 and win rate 1."""
    golds = [float(i) for i in range(20)]
    prompts = [f"p{i}" for i in range(20)]
    by_step = {0: _rows(0, golds, golds, prompts), 3: _rows(3, [g + i + 1 for i, g in enumerate(golds)], golds, prompts)}
    (change,) = gold_changes(by_step)
    assert change["change"] == pytest.approx(10.5) and change["change_ci95"][0] > 0
    assert change["win_rate"] == 1.0 and change["win_rate_ci95"] == [1.0, 1.0]


def test_no_step_zero_other_prompts_and_the_file(tmp_path):
    """Without a step-0 evaluation there is nothing to compare; an evaluation of other prompts is refused; the
    summary reads the file, names the last and best evaluation, and is None without it."""
    assert gold_changes({5: _rows(5, [1, 2, 3, 4], [0] * 4)}) == []
    with pytest.raises(ValueError, match="step 5 answer other prompts"):
        gold_changes({0: _rows(0, [1] * 4, [0] * 4), 5: _rows(5, [1] * 4, [0] * 4, prompts="abce")})
    path = tmp_path / "gold_samples.jsonl"
    rows = _rows(0, [1, 2, 3, 4], [0] * 4) + _rows(5, [5, 5, 5, 5], [1] * 4) + _rows(10, [2, 3, 4, 5], [2] * 4)
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    summary = gold_summary(path)
    assert summary["reference_gold"] == pytest.approx(2.5) and summary["length_slope"] == 0  # every reply "r"
    assert [c["step"] for c in summary["evaluations"]] == [5, 10]
    assert summary["best"]["step"] == 5 and summary["last"]["step"] == 10
    assert summary["last"]["change"] == pytest.approx(1.0)
    assert gold_summary(tmp_path / "missing.jsonl") is None and gold_summary(None) is None
    path.write_text(json.dumps(rows[0]) + "\nnot json\n")
    with pytest.raises(ValueError, match="line 2 is not a gold sample row"):
        read_gold_samples(path)
    path.write_text(json.dumps(rows[0]) + "\n" + '{"step": 0, "prompt": "a"}\n')
    with pytest.raises(ValueError, match="line 2 is not a gold sample row .*response, gold, proxy"):
        read_gold_samples(path)


def test_sqrt_kl_fit_by_hand():
    """Gold changes 2d - 0.5d^2 at d = 1, 2, 3 (KL 1, 4, 9) for every prompt: a = 2, b = -0.5 exactly, the peak at
    d = -a / 2b = 2, KL 4; every prompt alike, so every bootstrap resample fits the same b. The proxy rises as d^2
    (a = 0, b = 1: no peak, inf). Pooling a second run with the same changes fits the same curve; a run on other prompts
    is refused; step 7, without a KL, is left out."""
    golds = {1: 1.5, 2: 2.0, 3: 1.5}
    by_step = {0: _rows(0, [0, 0, 0, 0], [0, 0, 0, 0])}
    by_step |= {d: _rows(d, [g] * 4, [float(d * d)] * 4) for d, g in golds.items()}
    by_step[7] = _rows(7, [9, 9, 9, 9], [9, 9, 9, 9])
    kl = {1: 1.0, 2: 4.0, 3: 9.0}
    fit = sqrt_kl_fit([(by_step, kl)], boots=50)
    assert fit["a"] == pytest.approx(2.0) and fit["b"] == pytest.approx(-0.5) and fit["peak_kl"] == pytest.approx(4.0)
    assert fit["b_ci95"] == pytest.approx([-0.5, -0.5]) and fit["evaluations"] == 3
    proxy = sqrt_kl_fit([(by_step, kl)], key="proxy", boots=50)
    assert proxy["a"] == pytest.approx(0.0, abs=1e-9) and proxy["b"] == pytest.approx(1.0)
    assert proxy["peak_kl"] == float("inf")
    pooled = sqrt_kl_fit([(by_step, kl), (by_step, kl)], boots=50)
    assert pooled["b"] == pytest.approx(-0.5) and pooled["evaluations"] == 6
    # Gao et al.'s RL form: changes d (1 - 0.5 log d) give alpha 1, beta 0.5 exactly.
    gao = {0: by_step[0]} | {d: _rows(d, [d * (1 - 0.5 * math.log(d))] * 4, [0.0] * 4) for d in (1, 2, 3)}
    fit = sqrt_kl_fit([(gao, kl)], boots=50)
    assert fit["gao_beta"] == pytest.approx(0.5) and fit["gao_beta_ci95"] == pytest.approx([0.5, 0.5])
    other = {s: _rows(s, [0] * 4, [0] * 4, prompts=("w", "x", "y", "z")) for s in (0, 1, 2)}
    with pytest.raises(ValueError, match="other prompts"):
        sqrt_kl_fit([(by_step, kl), (other, {1: 1.0, 2: 4.0})])
