"""`alignkit kto` end to end on a tiny model: the first step's hand value, the reference paths agreeing, pairs
split into unpaired examples, the class-weight warning, learning, and the mismatched KL sequences' wiring."""

from __future__ import annotations

import json
import math

import pytest
import torch

from alignkit.config import ConfigError, load_config
from alignkit.data.tokenize import EncodedUnpaired
from alignkit.losses.kto import kto_loss, kto_reference_point
from alignkit.models.forward import sequence_logprobs
from alignkit.stages.kto import KTOConfig, KTOExamples, collate, kl_partners, kto_outputs, run
from alignkit.training.reference import Reference

from conftest import build_tiny_model

PAIRS = [
    {"prompt": "what is the capital of france?", "chosen": "paris.", "rejected": "i cannot help."},
    {"prompt": "please write a short poem", "chosen": "the sea and the sky.", "rejected": "no."},
    {"prompt": "the quick brown fox", "chosen": "jumps over the lazy dog.", "rejected": "0 1 2 3"},
    {
        "chosen": "\n\nHuman: i need help\n\nAssistant: here is a helpful answer.",
        "rejected": "\n\nHuman: i need help\n\nAssistant: i am sorry.",
    },
] * 4

# 6 desirable, 2 undesirable: with lambda_D = 1, lambda_U = 1.5 the ratio is 1*6 / (1.5*2) = 2 > 4/3.
UNPAIRED = [
    {"prompt": "what is the capital of france?", "completion": "paris.", "label": True},
    {"prompt": "please write a short poem", "completion": "the sea and the sky.", "label": True},
    {"prompt": "the quick brown fox", "completion": "jumps over the lazy dog.", "label": True},
    {"prompt": "i need help", "completion": "here is a helpful answer.", "label": "desirable"},
    {"prompt": "what is the capital of france?", "completion": "the capital of france is paris.", "label": 1},
    {"prompt": "please write a short poem", "completion": "the sky and the sea.", "label": True},
    {"prompt": "i need help", "completion": "i cannot help.", "label": False},
    {"prompt": "the quick brown fox", "completion": "0 1 2 3", "label": "undesirable"},
]


def _write(tmp_path, name: str, rows: list[dict]):
    path = tmp_path / name
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path


def _run(tmp_path, name: str, model, data, *extra: str) -> tuple[dict, list[dict]]:
    out = tmp_path / name
    cfg = load_config(
        KTOConfig,
        None,
        [
            f"model={model}",
            f"train_data={data}",
            f"output_dir={out}",
            "batch_size=4",
            "micro_batch_size=2",
            "max_steps=4",
            "learning_rate=5e-3",
            "lr_scheduler=constant",
            "progress=false",
            "tensorboard=false",
            *extra,
        ],
    )
    summary = run(cfg)
    assert json.loads((out / "summary.json").read_text())["steps"] == summary["steps"]
    rows = [json.loads(x) for x in (out / "metrics.jsonl").read_text().splitlines()]
    return summary, [r for r in rows if "loss" in r]


def test_first_step_is_half_the_weights_and_weight_warning(tiny_model_dir, tmp_path, capsys):
    """At the start the policy is the reference: r = 0 and z0 = max(0, mean(0)) = 0, so each example's loss
    is lambda * (1 - sigmoid(0)) = lambda / 2. One step over all 8 examples (6 desirable with lambda_D = 1,
    2 undesirable with lambda_U = 1.5): (6 * 0.5 + 2 * 0.75) / 8 = 4.5 / 8 = 0.5625."""
    data = _write(tmp_path, "unpaired.jsonl", UNPAIRED)
    summary, rows = _run(
        tmp_path, "w", tiny_model_dir, data, "batch_size=8", "max_steps=1", "undesirable_weight=1.5"
    )
    first = rows[0]
    assert first["loss"] == pytest.approx(0.5625, abs=1e-6)
    assert first["kl"] == pytest.approx(0.0, abs=1e-6)
    assert first["count/desirable"] == pytest.approx(0.75) and first["count/undesirable"] == pytest.approx(
        0.25
    )
    assert first["rewards/desirable_sum"] == pytest.approx(0.0, abs=1e-6)
    assert summary["data_format"] == "unpaired"
    assert (summary["train_examples"], summary["train_desirable"], summary["train_undesirable"]) == (8, 6, 2)
    # lambda_D * n_D / (lambda_U * n_U) = 2; keeping lambda_U = 1.5 the advice is lambda_D in [0.5, 0.667]
    assert "= 2.000, outside the recommended [1, 4/3]" in summary["weight_warning"]
    assert "desirable_weight in [0.5, 0.667]" in summary["weight_warning"]
    assert "warning: KTO class weights are unbalanced" in capsys.readouterr().err


def test_pairs_reference_paths_agree_and_training_learns(tiny_model_dir, tmp_path):
    """Pairs become 2N unpaired examples, half of each class (lambda ratio 1: no warning). A precomputed
    reference and a frozen copy are the same maths: identical per-step losses, with z0 moving off 0.
    Training lowers the loss and makes the chosen half of held-out pairs out-score the rejected half."""
    data = _write(tmp_path, "pairs.jsonl", PAIRS)
    common = (f"eval_data={data}", "eval_rows=[0,8]", "max_steps=8")
    pre, pre_rows = _run(tmp_path, "pre", tiny_model_dir, data, "reference=precomputed", *common)
    cpy, cpy_rows = _run(tmp_path, "copy", tiny_model_dir, data, "reference=copy", *common)

    assert pre["data_format"] == "pairs" and pre["eval_format"] == "pairs"
    assert (pre["train_examples"], pre["train_desirable"], pre["train_undesirable"]) == (32, 16, 16)
    assert pre["weight_warning"] is None
    assert (pre["eval_examples"], pre["eval_pairs"]) == (16, 8)

    assert pre_rows[0]["loss"] == pytest.approx(0.5, abs=1e-6)  # lambda = 1 for both classes: 1/2
    assert [r["loss"] for r in pre_rows] == pytest.approx([r["loss"] for r in cpy_rows], abs=1e-5)
    assert [r["kl"] for r in pre_rows] == pytest.approx([r["kl"] for r in cpy_rows], abs=1e-5)
    assert max(r["kl"] for r in pre_rows) > 1e-3  # the KL path is exercised, not only z0 = 0

    # Before training policy == reference: every reward is 0, so the held-out loss is 0.5 (lambda = 1),
    # the reward gap 0 and every pair a tie (accuracy 0); the stage skips that pass as known.
    assert pre["eval_before"] == {}
    after = pre["eval_after"]
    assert pre_rows[-1]["loss"] < pre_rows[0]["loss"]
    assert after["loss"] < 0.5 - 0.05  # 0.5 -> ~0.40 on the held-out pairs
    assert pre["eval_accuracy"] == after["accuracy"] >= 0.75
    assert after["rewards/gap"] > 0.05
    low, high = pre["eval_accuracy_ci95"]
    assert low <= pre["eval_accuracy"] <= high
    assert pre["reference"] == "precomputed" and cpy["reference"] == "copy"


def test_lora_adapter_reference_matches_precomputed(tiny_model_dir, tmp_path):
    """With LoRA (B initialised to 0) the adapter-disabled base is exactly the initial model, so the
    adapter reference and a precomputed reference give the same losses and z0."""
    data = _write(tmp_path, "pairs.jsonl", PAIRS)
    common = ("lora=true", "lora_r=4", "learning_rate=5e-2")
    _, ada = _run(tmp_path, "ada", tiny_model_dir, data, "reference=adapter", *common)
    _, pre = _run(tmp_path, "pre", tiny_model_dir, data, "reference=precomputed", *common)
    assert ada[0]["loss"] == pytest.approx(0.5, abs=1e-6)
    assert [r["loss"] for r in ada] == pytest.approx([r["loss"] for r in pre], abs=1e-5)
    assert [r["kl"] for r in ada] == pytest.approx([r["kl"] for r in pre], abs=1e-5)


def test_unpaired_eval_reports_reward_gap_not_accuracy(tiny_model_dir, tmp_path):
    data = _write(tmp_path, "unpaired.jsonl", UNPAIRED)
    summary, _ = _run(tmp_path, "u", tiny_model_dir, data, f"eval_data={data}", "max_steps=2")
    after = summary["eval_after"]
    assert "eval_accuracy" not in summary and "accuracy" not in after
    assert summary["eval_reward_gap"] == after["rewards/gap"]
    assert after["rewards/gap"] == pytest.approx(after["rewards/desirable"] - after["rewards/undesirable"])


@pytest.mark.parametrize("field", ["micro_batch_size", "batch_size"])
def test_batches_of_one_are_refused_naming_the_field(tmp_path, field):
    """z0 from one example is a single clamped sample: refused when the config loads, and by the stage before
    it writes anything when the config was built in code."""
    message = f"config key '{field}' must be >= 2, got 1"
    with pytest.raises(ConfigError, match=f"^{message} \\(from the command line\\)$"):
        load_config(
            KTOConfig, None, ["train_data=unused.jsonl", f"output_dir={tmp_path / 'x'}", f"{field}=1"]
        )
    built = KTOConfig(train_data="unused.jsonl", output_dir=str(tmp_path / "x"), **{field: 1})
    with pytest.raises(ConfigError, match=f"^{message}$"):
        run(built)
    assert not (tmp_path / "x").exists()


def test_kl_partners_are_a_fixed_derangement():
    for n in (2, 3, 10):
        partner = kl_partners(n, seed=3)
        assert sorted(partner) == list(range(n))  # every completion used exactly once
        assert all(partner[i] != i for i in range(n))  # never an example's own completion
        assert kl_partners(n, seed=3) == partner  # fixed: a resumed run rebuilds the same pairs
    assert kl_partners(10, seed=3) != kl_partners(10, seed=4)
    with pytest.raises(ValueError, match="at least 2"):
        KTOExamples([EncodedUnpaired([1], [2], True, False)], paired=False, max_length=8, seed=0)


def test_single_example_data_is_a_config_error(tiny_model_dir, tmp_path):
    data = _write(tmp_path, "one.jsonl", UNPAIRED[:1])
    with pytest.raises(ConfigError, match="train_data: KTO needs at least 2 examples"):
        _run(tmp_path, "one", tiny_model_dir, data)


def test_kl_sequence_is_truncated_like_encode():
    """Prompt i keeps its ids; the partner's completion keeps its start, cut to max_length - len(prompt)."""
    encoded = [
        EncodedUnpaired([1, 1, 1], [5, 6], True, False),
        EncodedUnpaired([2], [7, 8, 9, 10], False, False),
    ]
    examples = KTOExamples(encoded, paired=False, max_length=5, seed=0)
    assert examples[0].kl.prompt_ids == [1, 1, 1] and examples[0].kl.completion_ids == [7, 8]
    assert examples[0].kl.truncated
    assert examples[1].kl.prompt_ids == [2] and examples[1].kl.completion_ids == [5, 6]
    assert not examples[1].kl.truncated


def test_step_uses_mismatched_sequences_and_reference(tiny_tokenizer):
    """kto_outputs against kto_loss fed by hand-built sequences, with a reference that differs from the
    policy (so r != 0 and z0 != 0): prompt i followed by its partner's completion, scored by both models."""
    policy = build_tiny_model(len(tiny_tokenizer), seed=1).eval()
    reference = build_tiny_model(len(tiny_tokenizer), seed=0).eval()
    tok = tiny_tokenizer
    texts = [("the quick", "brown fox", True), ("what is", "paris.", False), ("please write", "a poem", True)]
    encoded = [
        EncodedUnpaired(tok(p)["input_ids"], [*tok(" " + c)["input_ids"], tok.eos_token_id], y, False)
        for p, c, y in texts
    ]
    examples = KTOExamples(encoded, paired=False, max_length=64, seed=0)
    cfg = load_config(KTOConfig, None, ["train_data=x", "beta=0.5", "undesirable_weight=1.3"])
    with torch.no_grad():
        out = kto_outputs(cfg, policy, Reference("copy", reference), collate(examples, tok.pad_token_id))

    def score(model, prompt_ids, completion_ids):
        ids = torch.tensor([prompt_ids + completion_ids])
        mask = torch.zeros_like(ids, dtype=torch.bool)
        mask[0, len(prompt_ids) :] = True
        return sequence_logprobs(model, ids, torch.ones_like(ids), mask).sum[0]

    partner = kl_partners(3, seed=0)
    own = [(e.prompt_ids, e.completion_ids) for e in encoded]
    kl = [(encoded[i].prompt_ids, encoded[partner[i]].completion_ids) for i in range(3)]
    with torch.no_grad():
        expected = kto_loss(
            torch.stack([score(policy, *s) for s in own]),
            torch.stack([score(reference, *s) for s in own]),
            torch.tensor([y for _, _, y in texts]),
            kto_reference_point(
                (
                    torch.stack([score(policy, *s) for s in kl])
                    - torch.stack([score(reference, *s) for s in kl])
                ).sum(),
                len(kl),
            ),
            beta=0.5,
            undesirable_weight=1.3,
        )
    # A case where the wiring matters: z0 above its clamp (0.367 for these two seeds), rewards away from 0.
    assert expected.kl.item() > 0.1 and (expected.rewards.abs() > 0.01).all()
    torch.testing.assert_close(out.losses, expected.losses, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(out.rewards, expected.rewards, atol=1e-5, rtol=1e-5)
    assert out.kl == pytest.approx(expected.kl.item(), abs=1e-5)
    assert out.metrics["count/desirable"] == 2 and out.metrics["count/undesirable"] == 1
    assert not math.isnan(out.metrics["rewards/undesirable_sum"])
