"""The RL phase of Constitutional AI as a user chains it on a tiny model: `alignkit cai-label` writes AI-labelled
pairs, `alignkit rm` trains a reward model on that file as written, and `alignkit ppo` runs against the reward
model's final/ directory. Each handoff is checked on its values: the pair count carried from one stage to the
next, the reward model's accuracy reported, and PPO's logged scores recomputed with the reward model."""

from __future__ import annotations

import json

import pytest

from alignkit import cli
from alignkit.models.reward import load_reward_model

PAIRS = [
    {"prompt": "what is the capital of france?", "response_a": "paris.", "response_b": "i cannot help."},
    {"prompt": "please write a short poem", "response_a": "no.", "response_b": "the sea and the sky."},
    {"prompt": "the quick brown fox", "response_a": "jumps over the lazy dog.", "response_b": "0 1 2 3"},
    {"prompt": "i need help", "response_a": "here is a helpful answer.", "response_b": "i am sorry."},
]


def _lines(path) -> list[dict]:
    return [json.loads(line) for line in path.read_text().splitlines()]


def test_cai_label_then_rm_then_ppo(tiny_model_dir, tmp_path):
    data = tmp_path / "pairs.jsonl"
    data.write_text("".join(json.dumps(r) + "\n" for r in PAIRS))

    # 1. AI labels (the tiny model judges)
    labelled = tmp_path / "labelled.jsonl"
    argv = ["cai-label", f"input={data}", f"output={labelled}", f"judge_model={tiny_model_dir}", "progress=false"]
    assert cli.main(argv) == 0
    label_summary = json.loads(labelled.with_suffix(".summary.json").read_text())
    pairs = _lines(labelled)
    assert len(pairs) == label_summary["pairs_written"] >= 3  # ties are not written

    # 2. A reward model on the labels as written, evaluated on them too (a handoff check, not a generalisation one)
    rm_dir = tmp_path / "rm"
    argv = [
        "rm", f"model={tiny_model_dir}", f"train_data={labelled}", f"eval_data={labelled}", f"output_dir={rm_dir}",
        "batch_size=2", "micro_batch_size=2", "max_steps=2", "learning_rate=1e-3", "dtype=float32",
        "progress=false", "tensorboard=false",
    ]  # fmt: skip
    assert cli.main(argv) == 0
    rm_summary = json.loads((rm_dir / "summary.json").read_text())
    assert rm_summary["train_pairs"] == rm_summary["eval_pairs"] == len(pairs)
    assert 0.0 <= rm_summary["eval_accuracy"] <= 1.0
    low, high = rm_summary["eval_accuracy_ci95"]
    assert low <= rm_summary["eval_accuracy"] <= high
    final = rm_dir / "final"
    assert (final / "ALIGNKIT_REWARD.json").is_file()

    # 3. PPO on the labelled file's prompts against the reward model's final/ directory
    ppo_dir = tmp_path / "ppo"
    argv = [
        "ppo", f"model={tiny_model_dir}", f"train_data={labelled}", f"reward={final}", f"output_dir={ppo_dir}",
        "iterations=1", "prompts_per_iteration=2", "minibatch_size=2", "micro_batch_size=1", "max_new_tokens=4",
        "dtype=float32", "progress=false", "tensorboard=false",
    ]  # fmt: skip
    assert cli.main(argv) == 0
    samples = _lines(ppo_dir / "samples.jsonl")
    assert len(samples) == 2 and {s["prompt"] for s in samples} <= {p["prompt"] for p in pairs}
    # The logged score is the reward model's: scoring the same (prompt, response) again gives it back.
    rm = load_reward_model(final, "float32", device="cpu")
    expected = rm.score([s["prompt"] for s in samples], [s["response"] for s in samples])
    assert [s["score"] for s in samples] == pytest.approx(expected, abs=1e-5)
    assert len(set(expected)) > 1  # different samples, different scores: not a constant reward
