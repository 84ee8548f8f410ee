"""The held-out gold evaluation of ppo and online-dpo (``gold_reward=``, ``training.gold``) on a tiny model: the
rows it is due at, its numbers against the samples it writes, a training run it leaves unchanged, the monitors
it feeds, and its config errors. (The gold-divergence stop driven by it: tests/test_remedies.py.)"""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from _signal_monitor import SignalAt

from alignkit import cli
from alignkit.config import ConfigError, load_config
from alignkit.errors import TrainingInterrupted
from alignkit.evaluation.monitors import MonitorSet
from alignkit.stages import online_dpo, ppo
from alignkit.training.gold import GOLD_KEYS

ROOT = Path(__file__).resolve().parents[1]
PROMPTS = ["what is the capital of france?", "please write a short poem", "the quick brown fox", "i need help"]
HELD_OUT = ["tell me a story", "hello there", "what is two plus two?", "name a colour"]
# Not the training run's: how long a step took, and what the gold evaluation adds.
NOT_TRAINING = {"rollout_s", "update_s", "elapsed_s", "gold_s", *GOLD_KEYS}


def _prompts(path: Path, prompts: list[str]) -> Path:
    path.write_text("".join(json.dumps({"prompt": p}) + "\n" for p in prompts))
    return path


def _lines(path: Path) -> list[dict]:
    return [json.loads(line) for line in path.read_text().splitlines()]


def _gold_args(tmp_path) -> list[str]:
    """Proxy: characters / 10 (_ppo_rewards:length); gold: minus the characters (_ppo_rewards:shortness)."""
    held_out = _prompts(tmp_path / "held_out.jsonl", HELD_OUT)
    return ["gold_reward=_ppo_rewards:shortness", f"gold_prompts={held_out}"]


def _ppo(model_dir, tmp_path, name: str, *extra: str, monitors: MonitorSet | None = None) -> dict:
    args = [
        f"model={model_dir}", f"train_data={_prompts(tmp_path / 'prompts.jsonl', PROMPTS)}",
        "reward=_ppo_rewards:length", f"output_dir={tmp_path / name}", "prompts_per_iteration=4",
        "minibatch_size=2", "micro_batch_size=1", "max_new_tokens=6", "learning_rate=1e-2", "progress=false",
        "tensorboard=false", *extra,
    ]  # fmt: skip
    return ppo.run(load_config(ppo.PPOConfig, None, args), monitors=monitors)


def test_ppo_gold_rows_their_samples_and_an_unchanged_training_run(tiny_model_dir, tmp_path):
    """4 iterations, gold_every=3: the gold keys are in the starting policy's row (step 0), the first logged row
    (1), every third (3) and the last (4), not in 2. Each row's numbers are those of its samples in
    gold_samples.jsonl: gold = -characters and proxy = characters / 10 of the same 4 responses, so gold_proxy =
    -gold / 10. Every response is 6 tokens (the tiny model never says EOS), so the KL per response is 6 x the KL
    per token; at step 0 the policy is the reference and both are exactly 0. The same run without a gold scorer
    logs the same training rows: the evaluation samples on forked RNG and changes nothing it trains on."""
    summary = _ppo(tiny_model_dir, tmp_path, "gold", "iterations=4", "gold_every=3", *_gold_args(tmp_path))
    rows = _lines(tmp_path / "gold" / "metrics.jsonl")
    gold_rows = [r for r in rows if "gold_reward/mean" in r]
    assert [r["step"] for r in rows] == [0, 1, 2, 3, 4] and [r["step"] for r in gold_rows] == [0, 1, 3, 4]
    assert set(rows[0]) == {"step", *GOLD_KEYS} and rows[0]["gold_kl"] == rows[0]["gold_kl/per_response"] == 0

    samples = _lines(tmp_path / "gold" / "gold_samples.jsonl")
    assert [s["step"] for s in samples] == [0] * 4 + [1] * 4 + [3] * 4 + [4] * 4
    assert {s["prompt"] for s in samples} == set(HELD_OUT) and not any(s["finished"] for s in samples)
    for row in gold_rows:
        mine = [s for s in samples if s["step"] == row["step"]]
        assert [s["gold"] for s in mine] == [-len(s["response"]) for s in mine]
        assert [s["proxy"] for s in mine] == pytest.approx([len(s["response"]) / 10 for s in mine], abs=1e-12)
        assert row["gold_reward/mean"] == pytest.approx(sum(s["gold"] for s in mine) / 4, abs=1e-9)
        assert row["gold_proxy/mean"] == pytest.approx(-row["gold_reward/mean"] / 10, abs=1e-9)
        assert row["gold_kl/per_response"] == pytest.approx(6 * row["gold_kl"], rel=1e-5, abs=1e-7)
    # Four updates at lr 1e-2 moved the policy off the reference (k1 on 24 tokens may come out of either sign).
    assert abs(rows[4]["gold_kl"]) > 1e-4
    assert summary["gold_reward"] == "_ppo_rewards:shortness"
    assert summary["gold_by_iteration"] == [[r["step"], r["gold_reward/mean"]] for r in gold_rows]
    assert summary["score_by_iteration"] == [r["score/mean"] for r in rows[1:]]  # step 0 is no training row
    # the summary's gold_change: each evaluation's golds minus step 0's, prompt by prompt, and its win rate
    start = [s["gold"] for s in samples if s["step"] == 0]
    changes = summary["gold_change"]["evaluations"]
    assert [c["step"] for c in changes] == [1, 3, 4] and summary["gold_change"]["last"] == changes[-1]
    for change in changes:
        mine = [s["gold"] for s in samples if s["step"] == change["step"]]
        assert change["change"] == pytest.approx(sum(m - s0 for m, s0 in zip(mine, start)) / 4, abs=1e-9)
        outcomes = [1.0 if m > s0 else 0.5 if m == s0 else 0.0 for m, s0 in zip(mine, start)]
        assert change["win_rate"] == pytest.approx(sum(outcomes) / 4)

    plain_summary = _ppo(tiny_model_dir, tmp_path, "plain", "iterations=4")
    assert plain_summary["gold_change"] is None
    plain = _lines(tmp_path / "plain" / "metrics.jsonl")
    training = [{k: v for k, v in r.items() if k not in NOT_TRAINING} for r in rows[1:]]
    assert [{k: v for k, v in r.items() if k not in NOT_TRAINING} for r in plain] == training
    assert not (tmp_path / "plain" / "gold_samples.jsonl").exists()


def test_a_resumed_run_evaluates_gold_at_its_first_row_and_keeps_one_start_row(tiny_model_dir, tmp_path):
    """SIGINT at iteration 1 of 3 (gold_every=5), then resume: the step-0 and step-1 rows are kept once, and the
    resumed process evaluates gold at its first logged row (2: the monitors check their keys there) and the last
    (3). gold_samples.jsonl holds each evaluation's 4 samples once."""
    gold = ("iterations=3", "gold_every=5", *_gold_args(tmp_path))
    with pytest.raises(TrainingInterrupted) as info:
        _ppo(tiny_model_dir, tmp_path, "run", *gold, monitors=MonitorSet([SignalAt(1)]))
    _ppo(tiny_model_dir, tmp_path, "run", *gold, f"resume_from={info.value.checkpoint}")
    rows = _lines(tmp_path / "run" / "metrics.jsonl")
    assert [(r["step"], "gold_reward/mean" in r) for r in rows] == [(0, True), (1, True), (2, True), (3, True)]
    steps = [s["step"] for s in _lines(tmp_path / "run" / "gold_samples.jsonl")]
    assert steps == [0] * 4 + [1] * 4 + [2] * 4 + [3] * 4


def test_online_dpo_logs_gold_at_its_first_and_last_round(tiny_model_dir, tmp_path):
    """rounds=2 with gold_every=5: the start (0), the first logged round (1, where the monitors check their
    keys) and the last (2)."""
    out = tmp_path / "run"
    args = [
        f"model={tiny_model_dir}", f"train_data={_prompts(tmp_path / 'prompts.jsonl', PROMPTS)}",
        "reward=_ppo_rewards:length", f"output_dir={out}", "rounds=2", "prompts_per_round=2",
        "samples_per_prompt=2", "minibatch_size=2", "micro_batch_size=2", "max_new_tokens=6",
        "learning_rate=1e-2", "progress=false", "tensorboard=false", "gold_every=5", *_gold_args(tmp_path),
    ]  # fmt: skip
    summary = online_dpo.run(load_config(online_dpo.OnlineDPOConfig, None, args))
    rows = [r for r in _lines(out / "metrics.jsonl") if "event" not in r]
    assert [r["step"] for r in rows if "gold_reward/mean" in r] == [0, 1, 2]
    for row in rows:
        assert row["gold_proxy/mean"] == pytest.approx(-row["gold_reward/mean"] / 10, abs=1e-9)
    assert [step for step, _ in summary["gold_by_round"]] == [0, 1, 2]


def test_gold_config_errors(tiny_model_dir, tmp_path, capsys):
    base = ["reward=_ppo_rewards:length"]
    with pytest.raises(ConfigError, match="config key 'gold_prompts' is required with gold_reward"):
        load_config(ppo.PPOConfig, None, [*base, "gold_reward=_ppo_rewards:shortness"])
    with pytest.raises(ConfigError, match=r"'gold_every' must be a multiple of log_every \(2\).*got 3"):
        load_config(ppo.PPOConfig, None, [*base, *_gold_args(tmp_path), "log_every=2", "gold_every=3"])
    with pytest.raises(ConfigError, match=r"'gold_rows' must be \[start, stop\] with start < stop"):
        load_config(ppo.PPOConfig, None, [*base, *_gold_args(tmp_path), "gold_rows=[5,5]"])
    # A gold scorer that cannot load is refused before the run folder or any model: one line, exit 2.
    out = tmp_path / "run"
    prompts = _prompts(tmp_path / "prompts.jsonl", PROMPTS)
    args = ["ppo", f"model={tiny_model_dir}", f"train_data={prompts}", *base, f"output_dir={out}"]
    assert cli.main([*args, "gold_reward=no_such_module:f", f"gold_prompts={prompts}"]) == 2
    assert "error: gold_reward: no module named 'no_such_module'" in capsys.readouterr().err
    assert not out.exists()


def test_the_hh_gold_config_keeps_the_held_out_split_out_of_training():
    """configs/ppo_hh_gold.yaml: the policy's prompts are the fixed split's train rows, the gold judge's its
    held-out rows, both of the shared HH-RLHF file."""
    cfg = load_config(ppo.PPOConfig, str(ROOT / "configs" / "ppo_hh_gold.yaml"))
    assert cfg.train_data == cfg.gold_prompts == "../shared/data/hh-rlhf/harmless-base-test.jsonl.gz"
    assert tuple(cfg.train_rows) == (0, 1800) and tuple(cfg.gold_rows) == (1800, 2312)
    assert cfg.reward != cfg.gold_reward and cfg.lora


def test_a_reward_model_directory_as_gold_judge(tiny_model_dir, tiny_tokenizer, tmp_path):
    """gold_reward=<dir of `alignkit rm`>, loaded as `reward=` is: each gold score written is that reward
    model's score of the held-out sample."""
    from alignkit.models.reward import build_reward_model, load_reward_model, save_reward_model

    rm = build_reward_model(str(tiny_model_dir), tiny_tokenizer.pad_token_id, "float32", device="cpu")
    rm_dir = save_reward_model(rm, tiny_tokenizer, tmp_path / "rm", max_length=256, max_prompt_length=None)
    gold = [*_gold_args(tmp_path)[1:], f"gold_reward={rm_dir}", "dtype=float32"]
    _ppo(tiny_model_dir, tmp_path, "run", "iterations=1", *gold)
    samples = _lines(tmp_path / "run" / "gold_samples.jsonl")
    expected = load_reward_model(rm_dir, "float32", device="cpu").score(
        [s["prompt"] for s in samples], [s["response"] for s in samples]
    )
    assert [s["gold"] for s in samples] == pytest.approx(expected, abs=1e-5) and len(set(expected)) > 1
