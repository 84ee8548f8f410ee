"""Every failure monitor a stage registers is fed: each stage runs a few steps on the tiny model, and every key
each registered monitor declares is in the rows that stage logged (its metrics.jsonl); a monitor whose keys
are missing fails the run at the first row, with a message naming the stage, the monitor and the keys."""

from __future__ import annotations

import json

import pytest

from alignkit import cli
from alignkit.config import ConfigError, load_config
from alignkit.evaluation import monitors as monitors_module
from alignkit.stages import dpo, grpo, kto, online_dpo, ppo, rm, sft

SFT_ROWS = [
    {"prompt": "what is the capital of france?", "completion": "the capital of france is paris."},
    {"prompt": "please write a short poem about the sea", "completion": "the sea and the sky are blue."},
    {"prompt": "the quick brown fox", "completion": "jumps."},
    {"prompt": "i need help", "completion": "here is a helpful and harmless answer."},
] * 2
PAIRS = [
    {"prompt": "what is the capital of france?", "chosen": "paris.", "rejected": "i cannot help."},
    {"prompt": "please write a short poem", "chosen": "the sea and the sky.", "rejected": "no."},
    {"prompt": "the quick brown fox", "chosen": "jumps over the lazy dog.", "rejected": "0 1 2 3"},
    {"prompt": "i need help", "chosen": "here is a helpful answer.", "rejected": "i am sorry."},
] * 2
PROMPTS = [{"prompt": p} for p in ("what is the capital of france?", "please write a short poem", "i need help")]
COMMON = ["progress=false", "tensorboard=false"]
OFFLINE = ["batch_size=2", "micro_batch_size=2", "max_steps=4", "learning_rate=1e-2", "lr_scheduler=constant"]
# Samples at the first logged row, then every 2 steps: rows 1, 2 and 4 of 4.
SAMPLING = ["sample_every=2", "sample_prompts=3", "sample_max_new_tokens=6"]
SAMPLED_STEPS = [1, 2, 4]
ONLINE = [
    "reward=_ppo_rewards:length",
    "max_new_tokens=6",
    "learning_rate=1e-2",
    "micro_batch_size=1",
    "minibatch_size=2",
]
SAMPLE_KEYS = {"distinct_2", "sample_drift"}

# stage -> (module, data rows, overrides). Offline stages that generate sample; rm has nothing to sample.
STAGES = {
    "sft": (sft, SFT_ROWS, [*OFFLINE, *SAMPLING]),
    "rm": (rm, PAIRS, OFFLINE),
    "dpo": (dpo, PAIRS, [*OFFLINE, *SAMPLING]),
    "ipo": (dpo, PAIRS, [*OFFLINE, *SAMPLING, "loss=ipo"]),
    "orpo": (dpo, PAIRS, [*OFFLINE, *SAMPLING, "loss=orpo"]),
    "kto": (kto, PAIRS, [*OFFLINE, *SAMPLING]),
    "ppo": (ppo, PROMPTS, [*ONLINE, "iterations=2", "prompts_per_iteration=2"]),
    "online-dpo": (online_dpo, PROMPTS, [*ONLINE, "rounds=2", "prompts_per_round=2", "samples_per_prompt=2"]),
    "grpo": (grpo, PROMPTS, [*ONLINE, "iterations=2", "prompts_per_iteration=2", "num_generations=2"]),
}
# What each stage must register with the overrides above: sampling on, no gold scorer.
REGISTERED = {
    "sft": ["nonfinite", "mode_collapse"],
    "rm": ["nonfinite"],
    **{
        stage: ["nonfinite", "likelihood_displacement", "sample_drift", "mode_collapse"]
        for stage in ("dpo", "ipo", "orpo", "kto")
    },
    "ppo": ["nonfinite", "kl_explosion", "reward_hacking", "mode_collapse"],
    "online-dpo": ["nonfinite", "kl_explosion", "reward_hacking", "likelihood_displacement", "mode_collapse"],
    "grpo": ["nonfinite", "reward_hacking", "mode_collapse"],  # beta 0: no reference, so no KL to watch
}


def _write(path, rows):
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path


def _config(stage: str, tiny_model_dir, tmp_path, *extra: str):
    module, rows, overrides = STAGES[stage]
    tmp_path.mkdir(parents=True, exist_ok=True)
    data = _write(tmp_path / "data.jsonl", rows)
    args = [f"model={tiny_model_dir}", f"train_data={data}", f"output_dir={tmp_path / 'run'}", *overrides]
    return module, load_config(module.STAGE.config, None, [*args, *COMMON, *extra])


def _spy_monitors(monkeypatch, module) -> list:
    """The MonitorSets the stage registers (its own ``default_monitors`` call), as it builds them."""
    built = []

    def spy(*args, **kwargs):
        built.append(monitors_module.default_monitors(*args, **kwargs))
        return built[-1]

    monkeypatch.setattr(module, "default_monitors", spy)
    return built


def _training_rows(run_dir) -> list[dict]:
    rows = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    return [r for r in rows if "lr" in r and "event" not in r]


@pytest.mark.parametrize("stage", list(STAGES))
def test_every_registered_monitor_is_fed(stage, tiny_model_dir, tmp_path, monkeypatch):
    """Each key a registered monitor declares is in the stage's first logged training row, with a number in
    some row. The keys of the samples (offline stages) come at the first row and every sample_every steps."""
    module, cfg = _config(stage, tiny_model_dir, tmp_path)
    built = _spy_monitors(monkeypatch, module)
    module.run(cfg)
    (registered,) = built
    assert [m.name for m in registered.monitors] == REGISTERED[stage]
    rows = _training_rows(tmp_path / "run")
    for monitor in registered.monitors:
        assert monitor.keys, monitor.name
        for key in monitor.keys:
            assert key in rows[0], (monitor.name, key)
            assert any(isinstance(row.get(key), float | int) for row in rows), (monitor.name, key)
    if stage in ("sft", "dpo", "ipo", "orpo", "kto"):
        for key in SAMPLE_KEYS | {"len/mean", "eos_frac"}:
            assert [r["step"] for r in rows if key in r] == SAMPLED_STEPS, key


@pytest.mark.parametrize("stage", ["ppo", "online-dpo", "grpo"])
def test_a_gold_scorer_is_watched_and_fed(stage, tiny_model_dir, tmp_path, monkeypatch):
    """With gold_reward the reward-hacking monitor also reads gold_reward/mean (its proxy-vs-gold check), and the
    run logs it in its first training row and its last (gold_every=5 over 2 units); without one it reads only
    what the rows always carry (test above). GRPO at beta 0 loads a reference for the gold KL, so its KL monitor
    is registered too, and fed."""
    held_out = _write(tmp_path / "held_out.jsonl", [{"prompt": "tell me a story"}, {"prompt": "hello there"}])
    gold = ("gold_reward=_ppo_rewards:length", f"gold_prompts={held_out}", "gold_every=5")
    module, cfg = _config(stage, tiny_model_dir, tmp_path, *gold)
    built = _spy_monitors(monkeypatch, module)
    module.run(cfg)
    (registered,) = built
    (hacking,) = [m for m in registered.monitors if m.name == "reward_hacking"]
    assert hacking.keys == ("reward/mean", "len/mean", "gold_reward/mean")
    assert "kl_explosion" in [m.name for m in registered.monitors]
    assert [r["step"] for r in _training_rows(tmp_path / "run") if "gold_reward/mean" in r] == [1, 2]


def test_a_monitor_whose_keys_are_missing_fails_the_run_at_the_first_row(
    tiny_model_dir, tmp_path, monkeypatch, capsys
):
    """SFT registering mode collapse without sampling (nothing logs distinct_2): the run stops at its first
    row with a one-line error naming the stage, the monitor and the key; exit code 2, no traceback."""
    _, rows, overrides = STAGES["sft"]
    data = _write(tmp_path / "data.jsonl", rows)
    blind = lambda stage, samples: monitors_module.default_monitors(stage, samples=True)  # noqa: E731
    monkeypatch.setattr(sft, "default_monitors", blind)
    out = tmp_path / "run"
    args = [f"model={tiny_model_dir}", f"train_data={data}", f"output_dir={out}", *OFFLINE, *COMMON]
    assert cli.main(["sft", *args]) == 2
    err = capsys.readouterr().err
    assert (
        "error: sft: the first logged training row (step 1) lacks keys its monitors read, so they could never "
        "fire: mode_collapse reads distinct_2. The row has: "
    ) in err
    assert "Traceback" not in err
    assert [r["step"] for r in _training_rows(out)] == [1]  # it stopped at the first row


def test_samples_leave_the_training_run_unchanged_and_drift_is_zero_without_updates(
    tiny_model_dir, tmp_path
):
    """Sampling runs on forked RNG: DPO's losses are the same with and without it. With learning_rate=0 the
    policy stays the starting model, so its samples are the starting model's (same seed): sample_drift is 0
    (log p_start - log p_policy of the same responses) and distinct-2 the same at every sampled row; with
    learning_rate=1e-2 the policy has moved and the drift is not 0."""
    losses = {}
    for name, extra in (("plain", []), ("sampled", SAMPLING)):
        module, cfg = _config("dpo", tiny_model_dir, tmp_path / name, *extra)
        module.run(cfg)
        losses[name] = [r["loss"] for r in _training_rows(tmp_path / name / "run")]
    assert losses["sampled"] == losses["plain"]

    frozen = ("learning_rate=0", "allow_zero_learning_rate=true")
    module, cfg = _config("dpo", tiny_model_dir, tmp_path / "frozen", *SAMPLING, *frozen)
    module.run(cfg)
    sampled = [r for r in _training_rows(tmp_path / "frozen" / "run") if "sample_drift" in r]
    assert [r["sample_drift"] for r in sampled] == pytest.approx([0.0] * 3, abs=1e-5)
    assert len({r["distinct_2"] for r in sampled}) == 1
    moved = [r["sample_drift"] for r in _training_rows(tmp_path / "sampled" / "run") if "sample_drift" in r]
    assert abs(moved[-1]) > 1e-3


def test_online_dpo_rounds_without_pairs_log_the_monitors_keys_as_null(tiny_model_dir, tmp_path):
    """A reward that ties every sample makes no pair: the rounds log logps/chosen and rewards/margin as null
    (no value), so the displacement monitor's keys are there and the run is not failed as blind."""
    module, cfg = _config("online-dpo", tiny_model_dir, tmp_path, "reward=_ppo_rewards:length_of_hello")
    module.run(cfg)
    rows = _training_rows(tmp_path / "run")
    assert [r["pairs"] for r in rows] == [0, 0]
    assert all(r["logps/chosen"] is None and r["rewards/margin"] is None for r in rows)


def test_sample_every_must_be_a_multiple_of_log_every():
    with pytest.raises(ConfigError, match="'sample_every' must be a multiple of log_every \\(2\\)"):
        load_config(sft.SFTConfig, model="m", train_data="d", sample_every=3, log_every=2)


def test_a_resumed_run_samples_at_its_first_row(tiny_model_dir, tmp_path):
    """Resumed from step 2 of 4, the process's first row (step 3) carries the samples too, so the key check
    and the monitors' windows hold after a resume; the drift is still measured from the starting model (the
    watch samples it before the checkpoint is loaded): step 4's drift equals the uninterrupted run's."""
    module, cfg = _config("sft", tiny_model_dir, tmp_path, *SAMPLING, "save_every=2", "keep_checkpoints=3")
    module.run(cfg)
    uninterrupted = _training_rows(tmp_path / "run")
    resume = f"resume_from={tmp_path / 'run' / 'checkpoints' / 'step-000002'}"
    module, cfg = _config("sft", tiny_model_dir, tmp_path, *SAMPLING, "save_every=2", "keep_checkpoints=3", resume)
    module.run(cfg)
    rows = _training_rows(tmp_path / "run")
    assert [r["step"] for r in rows if "sample_drift" in r] == [1, 2, 3, 4]
    assert rows[-1]["sample_drift"] == pytest.approx(uninterrupted[-1]["sample_drift"], abs=1e-4)
    assert rows[-1]["distinct_2"] == uninterrupted[-1]["distinct_2"]
