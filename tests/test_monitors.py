"""Each failure monitor is provoked on purpose with a synthetic metric stream and must fire at the step
worked out by hand, with its action; a healthy synthetic run must leave every monitor quiet."""

from __future__ import annotations

import math

import numpy as np
import pytest

from alignkit.evaluation.monitors import (
    BlindMonitorError,
    Event,
    KLExplosionMonitor,
    KTOLikelihoodDisplacementMonitor,
    LikelihoodDisplacementMonitor,
    ModeCollapseMonitor,
    MonitorSet,
    NonFiniteMonitor,
    RewardHackingMonitor,
    SampleDriftMonitor,
    default_monitors,
)


def _feed(monitor, rows: list[dict]) -> list[Event]:
    """Every event the monitor returns when row i is logged at step i (no cooldown)."""
    return [e for step, row in enumerate(rows) if (e := monitor.update(step, row)) is not None]


def _healthy_run(n: int = 200) -> list[dict]:
    """Reward rising at constant length (noise 2 tokens), KL rising 0.03/step to 5.97 < 10, distinct-2 and
    entropy stable, chosen log-probs flat while the margin grows, gold reward rising, one NaN step."""
    rng = np.random.default_rng(0)
    rows = []
    for s in range(n):
        row = {
            "loss": 1.0 / (1 + s),
            "reward/mean": 0.01 * s + rng.normal(0, 0.05),
            "len/mean": 100 + rng.normal(0, 2),
            "kl": 0.03 * s,
            "distinct_2": 0.8 + rng.normal(0, 0.01),
            "entropy": 2.0 + rng.normal(0, 0.05),
            "logps/chosen": -120 + rng.normal(0, 0.5),
            "rewards/margin": 0.02 * s + rng.normal(0, 0.05),
            "sample_drift": 1.0 + rng.normal(0, 0.1),
            "nonfinite_skipped": 0 if s < 50 else 1,
        }
        if s % 10 == 0:
            row["gold_reward/mean"] = 0.5 + 0.005 * s + rng.normal(0, 0.01)
        rows.append(row)
    return rows


def _all_monitors() -> list:
    return [
        RewardHackingMonitor(),
        ModeCollapseMonitor(),
        KLExplosionMonitor(),
        LikelihoodDisplacementMonitor(),
        SampleDriftMonitor(),
        NonFiniteMonitor(),
    ]


def test_healthy_run_is_quiet():
    monitors = MonitorSet(_all_monitors())
    actions = [monitors.on_log(step, row) for step, row in enumerate(_healthy_run())]
    assert monitors.events == []
    assert set(actions) == {None}


def test_reward_paying_for_length_fires_when_the_window_fills():
    """reward = 0.1 * length + noise(0.2) while length grows 2 tokens/step: over 20 rows length spans 38
    tokens, reward 3.8, so the correlation is ~0.99 > 0.8 and the slope ~0.2 > 0. The first full window
    is at step 19 (window=20); the action is a warning."""
    rng = np.random.default_rng(0)
    rows = []
    for s in range(60):
        length = 50 + 2 * s
        rows.append({"reward/mean": 0.1 * length + rng.normal(0, 0.2), "len/mean": length})
    events = _feed(RewardHackingMonitor(), rows)
    assert events[0].step == 19
    assert events[0].action == "warn" and events[0].monitor == "reward_hacking"
    assert events[0].values["reward_length_corr"] > 0.95
    assert events[0].values["reward_slope"] == pytest.approx(0.2, abs=0.03)


def test_reward_hacking_begins_mid_run():
    """Steps 0-29: length fixed at 100, reward 1 + 0.01 s -> length constant, correlation 0, quiet.
    From step 30 length grows 5/step and reward 0.5/step with it. At step 30 the window (steps 11-30) has
    19 rows of length 100 and one of 105, so Pearson is the point-biserial correlation
    r = (y1 - y0) sqrt(p (1 - p)) / std(y) with p = 1/20, y0 = mean reward of steps 11-29 = 1.2, y1 = 1.79,
    var(y) = p (1 - p) 0.59^2 + (1 - p) 0.003 (the 19 rewards 1.11..1.29 have variance 30e-4)
    -> r = 0.59 * 0.21794 / 0.13923 = 0.92357 > 0.8: it fires on the first row of the ramp."""
    rows = [{"reward/mean": 1 + 0.01 * s, "len/mean": 100} for s in range(30)]
    rows += [{"reward/mean": 1.29 + 0.5 * k, "len/mean": 100 + 5 * k} for k in range(1, 31)]
    events = _feed(RewardHackingMonitor(), rows)
    assert events[0].step == 30
    assert events[0].values["reward_length_corr"] == pytest.approx(0.92357, abs=1e-5)


def test_reward_hacking_from_per_step_correlation():
    """Rows give reward +0.1/step and a within-batch reward_length_corr: 0.9 fires at the full window
    (step 19); 0.5 stays quiet."""
    high = [{"reward/mean": 0.1 * s, "reward_length_corr": 0.9} for s in range(30)]
    low = [{"reward/mean": 0.1 * s, "reward_length_corr": 0.5} for s in range(30)]
    assert _feed(RewardHackingMonitor(), high)[0].step == 19
    assert _feed(RewardHackingMonitor(), low) == []


def test_proxy_up_gold_down_fires():
    """Proxy reward +0.01/step every step; gold logged every 5 steps: 1 + 0.02 s up to s = 50 (2.0), then
    2.0 - 0.02 (s - 50). Gold window of 5 points:
      step 60: gold at 40..60 = 1.8 1.9 2.0 1.9 1.8, symmetric -> slope 0, quiet;
      step 65: gold at 45..65 = 1.9 2.0 1.9 1.8 1.7; with x = -2..2, sum x*y = -3.8 - 2.0 + 1.8 + 3.4 = -0.6,
      sum x^2 = 10 -> -0.06 per point = -0.012 per step; fitted drop over 20 steps 0.24 > 0.1 -> fires."""
    rows = []
    for s in range(100):
        row = {"reward/mean": 0.01 * s}
        if s % 5 == 0:
            row["gold_reward/mean"] = 1 + 0.02 * s if s <= 50 else 2.0 - 0.02 * (s - 50)
        rows.append(row)
    events = _feed(RewardHackingMonitor(), rows)
    assert events[0].step == 65
    assert events[0].values["gold_drop"] == pytest.approx(0.24, abs=1e-9)


def test_distinct_2_collapse_fires():
    """Baseline 0.8 (first row); the limit is 0.5 * 0.8 = 0.4. distinct_2 0.8 0.8 0.7 0.6 0.5 0.45 0.39 0.3:
    the first value under 0.4 is 0.39 at step 6. Rows without the key are ignored."""
    values = [0.8, 0.8, 0.7, 0.6, 0.5, 0.45, 0.39, 0.3]
    events = _feed(ModeCollapseMonitor(), [{"loss": 1.0}] + [{"distinct_2": v} for v in values])
    assert events[0].step == 7  # row 0 had no distinct_2; 0.39 is row 7
    assert events[0].values == {"value": 0.39, "baseline": 0.8}
    assert events[0].action == "warn"


def test_entropy_collapse_with_baseline_of_first_k():
    """baseline_rows=3: entropy 2.2 2.0 1.8 -> baseline 2.0, limit 1.0; then 1.6 1.2 1.01 0.99: fires at
    0.99, step 6. A monitor watching only distinct_2 ignores the same stream."""
    rows = [{"entropy": v} for v in [2.2, 2.0, 1.8, 1.6, 1.2, 1.01, 0.99]]
    events = _feed(ModeCollapseMonitor(baseline_rows=3), rows)
    assert [e.step for e in events] == [6]
    assert events[0].values["baseline"] == pytest.approx(2.0)
    assert _feed(ModeCollapseMonitor(keys=("distinct_2",)), rows) == []


def test_kl_growth_fires():
    """KL 0.5 for steps 0-4, then +3/step (3.5, 6.5, ...). Window 5, x = -2..2:
    step 5: y = .5 .5 .5 .5 3.5 -> sum x*y = -1 - .5 + .5 + 7 = 6, slope 0.6 <= 1;
    step 6: y = .5 .5 .5 3.5 6.5 -> -1 - .5 + 3.5 + 13 = 15, slope 1.5 > 1 -> fires (KL 6.5 < 10)."""
    rows = [{"kl": 0.5}] * 5 + [{"kl": 0.5 + 3 * k} for k in range(1, 6)]
    events = _feed(KLExplosionMonitor(), rows)
    assert events[0].step == 6 and events[0].action == "stop"
    assert events[0].values["growth_per_step"] == pytest.approx(1.5)


def test_kl_growth_up_to_the_ppo_target_is_allowed():
    """PPO's kl_target is a KL the run is meant to reach. The rows of test_kl_growth_fires (0.5 x 5, then
    +3/step) with kl_target 12: at step 6 (KL 6.5) and 7 (9.5) the growth is 1.5 and 2.4/step but the KL is
    below the target, so quiet; at step 8 (12.5 > 12, slope 3.0) it fires. The limit becomes 2 x 12 = 24."""
    rows = [{"kl": 0.5}] * 5 + [{"kl": 0.5 + 3 * k} for k in range(1, 6)]
    monitors = default_monitors("ppo", kl_target=12.0)
    kl_monitor = next(m for m in monitors.monitors if isinstance(m, KLExplosionMonitor))
    assert kl_monitor.max_kl == 24.0 and kl_monitor.allowed_kl == 12.0
    events = _feed(kl_monitor, rows)
    assert events[0].step == 8 and events[0].values["growth_per_step"] == pytest.approx(3.0)
    default = next(m for m in default_monitors("ppo").monitors if isinstance(m, KLExplosionMonitor))
    assert (default.max_kl, default.allowed_kl) == (10.0, 0.0)  # fixed beta: the plain limits


def test_replay_puts_a_resumed_run_where_the_uninterrupted_one_was():
    """Reward rising with length (window 3, cooldown 100). Uninterrupted: one event, at step 3. A run resumed
    after step 5 that replays its metrics.jsonl (training rows, an evaluation row without "lr" that must not
    enter a window, the event row) logs the same: nothing more. Without the replay its monitors would start
    empty and fire again at step 8, once 3 new rows had filled the window."""
    rows = [{"step": s, "lr": 1e-3, "reward/mean": 0.1 * s, "len/mean": 50.0 + 5 * s} for s in range(1, 11)]

    def run(set_, rows):
        logged = []
        for row in rows:
            logged.append(row)
            set_.on_log(row["step"], row)
            logged.extend(event.to_row() for event in set_.last_events)
        return logged

    def monitors():
        return MonitorSet([RewardHackingMonitor(window=3)], cooldown=100)

    uninterrupted = monitors()
    run(uninterrupted, rows)
    assert [e.step for e in uninterrupted.events] == [3]
    first_part = run(monitors(), rows[:5])
    first_part.insert(3, {"step": 3, "eval/loss": 9.0, "reward/mean": -100.0, "len/mean": 0.0})
    resumed = monitors()
    resumed.replay(first_part)
    run(resumed, rows[5:])
    assert resumed.events == []
    fresh = monitors()
    run(fresh, rows[5:])
    assert [e.step for e in fresh.events] == [8]


def test_kl_limit_and_nan_fire():
    """9.5, 9.8, 10.1: the limit 10 is crossed at step 2 (growth 0.3/step is within its limit). NaN fires."""
    events = _feed(KLExplosionMonitor(), [{"kl": 9.5}, {"kl": 9.8}, {"kl": 10.1}])
    assert [e.step for e in events] == [2]
    assert "limit" in events[0].message
    assert _feed(KLExplosionMonitor(), [{"kl": 1.0}, {"kl": math.nan}])[0].step == 1


def test_likelihood_displacement_fires():
    """Chosen log-prob -100 - 0.5 s while the margin grows 0.1/step: at step 19 the 20-row window's fitted
    drop is 0.5 * 19 = 9.5 nats > 5 -> fires. A slower fall of 0.2/step drops only 3.8 per window: quiet.
    Chosen falling while the margin also falls is not this failure: quiet."""
    falling = [{"logps/chosen": -100 - 0.5 * s, "rewards/margin": 0.1 * s} for s in range(40)]
    events = _feed(LikelihoodDisplacementMonitor(), falling)
    assert events[0].step == 19 and events[0].action == "warn"
    assert events[0].values["chosen_drop"] == pytest.approx(9.5)
    slow = [{"logps/chosen": -100 - 0.2 * s, "rewards/margin": 0.1 * s} for s in range(100)]
    assert _feed(LikelihoodDisplacementMonitor(), slow) == []
    both_fall = [{"logps/chosen": -100 - 0.5 * s, "rewards/margin": -0.1 * s} for s in range(40)]
    assert _feed(LikelihoodDisplacementMonitor(), both_fall) == []


def test_sample_drift_fires_above_limit():
    events = _feed(
        SampleDriftMonitor(), [{"sample_drift": 1.0}, {"sample_drift": 5.0}, {"sample_drift": 6.0}]
    )
    assert [e.step for e in events] == [2]  # 5.0 is at the limit, not above it


def test_nonfinite_total_and_streak():
    """Total: counts 0 0 1 1 2 2 3 reach 3 at step 6 -> stop.
    Streak (max_nonfinite=100): counts 0 1 1 2 3 4: streak 1, 0, 1, 2, 3 -> fires at step 5.
    Scattered (one every other row, up to 10) never makes a streak of 3: quiet."""
    events = _feed(NonFiniteMonitor(), [{"nonfinite_skipped": c} for c in [0, 0, 1, 1, 2, 2, 3]])
    assert events[0].step == 6 and events[0].action == "stop"
    streak = _feed(
        NonFiniteMonitor(max_nonfinite=100), [{"nonfinite_skipped": c} for c in [0, 1, 1, 2, 3, 4]]
    )
    assert streak[0].step == 5 and streak[0].values["streak"] == 3
    scattered = [{"nonfinite_skipped": s // 2} for s in range(21)]
    assert _feed(NonFiniteMonitor(max_nonfinite=100), scattered) == []


def test_monitor_set_stops_only_for_stop_actions_and_respects_cooldown():
    """distinct_2 below half its baseline on every row from step 1: a warn monitor with cooldown 10 keeps
    events at steps 1, 11, 21 of 0..24 and never asks to stop. The same stream with action "stop" stops
    at step 1."""
    rows = [{"distinct_2": 0.8}] + [{"distinct_2": 0.2}] * 24
    warn_set = MonitorSet([ModeCollapseMonitor()], cooldown=10)
    actions = [warn_set.on_log(step, row) for step, row in enumerate(rows)]
    assert set(actions) == {None}
    assert [e.step for e in warn_set.events] == [1, 11, 21]
    assert warn_set.events[0].to_row() == {
        "event": "mode_collapse",
        "step": 1,
        "action": "warn",
        "message": warn_set.events[0].message,
        "values": {"value": 0.2, "baseline": 0.8},
    }
    stop_set = MonitorSet([ModeCollapseMonitor(action="stop")])
    assert [stop_set.on_log(step, row) for step, row in enumerate(rows[:3])] == [None, "stop", None]
    assert [e.step for e in stop_set.last_events] == []  # step 2 fell in the cooldown


def test_default_monitors_per_stage():
    """Mode collapse (distinct-2) and sample drift are registered in the offline stages only when they sample
    (sample_every), which is what logs their keys; the gold half of reward hacking only with a gold scorer."""
    names = {
        stage: [m.name for m in default_monitors(stage).monitors] for stage in ("sft", "rm", "dpo", "kto", "ppo")
    }
    assert names == {
        "sft": ["nonfinite"],
        "rm": ["nonfinite"],
        "dpo": ["nonfinite", "likelihood_displacement"],
        "kto": ["nonfinite", "likelihood_displacement"],
        "ppo": ["nonfinite", "kl_explosion", "reward_hacking", "mode_collapse"],
    }
    sampled = {stage: [m.name for m in default_monitors(stage, samples=True).monitors] for stage in ("sft", "dpo")}
    assert sampled == {
        "sft": ["nonfinite", "mode_collapse"],
        "dpo": ["nonfinite", "likelihood_displacement", "sample_drift", "mode_collapse"],
    }
    keys = {m.name: m.keys for m in default_monitors("ppo").monitors}
    assert keys["reward_hacking"] == ("reward/mean", "len/mean")
    gold = {m.name: m.keys for m in default_monitors("ppo", gold=True).monitors}
    assert gold["reward_hacking"] == ("reward/mean", "len/mean", "gold_reward/mean")
    # SFT's token entropy falls by design as the loss falls: not a collapse there.
    sft = default_monitors("sft")
    assert [sft.on_log(s, {"entropy": 2.0 - 0.3 * s}) for s in range(6)] == [None] * 6 and sft.events == []
    with pytest.raises(ValueError, match="known"):
        default_monitors("no-such-stage")


def test_a_training_row_without_a_monitors_keys_fails_at_the_first_row():
    """The first training row (it carries "lr") lacks distinct_2: BlindMonitorError there, naming the stage,
    the monitor and the key. Evaluation rows (no "lr") before it are not checked; a complete first row passes
    and later rows are not checked again (sampled keys come every sample_every steps)."""
    monitors = default_monitors("dpo", samples=True)
    assert monitors.on_log(1, {"step": 1, "eval/loss": 0.7}) is None  # an evaluation row: not checked
    row = {"step": 2, "lr": 1e-6, "nonfinite_skipped": 0, "logps/chosen": -50.0, "rewards/margin": 0.1}
    with pytest.raises(BlindMonitorError) as raised:
        monitors.on_log(2, {**row, "sample_drift": 0.1})
    assert str(raised.value).startswith(
        "dpo: the first logged training row (step 2) lacks keys its monitors read, so they could never fire: "
        "mode_collapse reads distinct_2. The row has: "
    )
    complete = default_monitors("dpo", samples=True)
    assert complete.on_log(2, {**row, "sample_drift": 0.1, "distinct_2": 0.9}) is None
    assert complete.on_log(3, {**row, "step": 3}) is None  # no samples on this row: checked only once


def test_kto_displacement_reads_class_means():
    """KTO logs class sums over all examples and class shares: with half the examples desirable, logps/
    desirable_sum = 0.5 * mean, so -50 - 0.25 s is a desirable mean of -100 - 0.5 s; the margin (0.05 s - 0)
    / 0.5 = 0.1 s grows. As the DPO case: the 20-row window's drop is 9.5 nats at step 19. A window with no
    undesirable example has no margin: those rows are skipped."""
    rows = [
        {
            "logps/desirable_sum": -50 - 0.25 * s,
            "rewards/desirable_sum": 0.05 * s,
            "rewards/undesirable_sum": 0.0,
            "count/desirable": 0.5,
            "count/undesirable": 0.5,
        }
        for s in range(40)
    ]
    events = _feed(KTOLikelihoodDisplacementMonitor(), rows)
    assert events[0].step == 19 and events[0].values["chosen_drop"] == pytest.approx(9.5)
    one_class = [{**row, "count/desirable": 1.0, "count/undesirable": 0.0} for row in rows]
    assert _feed(KTOLikelihoodDisplacementMonitor(), one_class) == []


@pytest.mark.parametrize("stage", ["grpo", "ppo", "online-dpo"])
def test_kl_limit_and_action_come_from_the_online_config(stage):
    """kl_limit and kl_explosion_action (config.OnlineRemedyFields) set the KL monitor of every online stage:
    by default a per-response KL of 14 nats stops the run (limit 10); with kl_limit=20 and
    kl_explosion_action=warn it passes, and 25 only warns."""
    from alignkit.config import load_config
    from alignkit.stages import load_stage
    from alignkit.training.remedies import monitor_actions

    config = load_stage(stage).config

    def monitor_set(*settings):
        cfg = load_config(config, None, ["reward=m:f", *settings])
        return default_monitors(stage, actions=monitor_actions(cfg), kl_limit=cfg.kl_limit)

    def row(monitors, kl):  # every key the stage's monitors read (a steady value), and the KL
        return {"lr": 1e-4, **{k: 0.5 for m in monitors.monitors for k in m.keys}, "kl": kl}

    default = monitor_set()
    assert default.on_log(1, row(default, 14.0)) == "stop"
    assert [e.monitor for e in default.last_events] == ["kl_explosion"]
    relaxed = monitor_set("kl_limit=20", "kl_explosion_action=warn")
    assert relaxed.on_log(1, row(relaxed, 14.0)) is None and relaxed.last_events == []
    assert relaxed.on_log(2, row(relaxed, 25.0)) is None
    assert [(e.monitor, e.action) for e in relaxed.last_events] == [("kl_explosion", "warn")]
