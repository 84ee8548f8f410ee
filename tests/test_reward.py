"""The Bradley-Terry reward loss against hand-worked values, and `alignkit rm` end to end on a tiny model:
it learns held-out pairs, writes accuracy with an interval, and its saved model scores the same in a
fresh process.
"""

from __future__ import annotations

import json
import math
import subprocess
import sys

import pytest
import torch

from alignkit import cli
from alignkit.losses.reward import bradley_terry_loss
from alignkit.models.reward import load_reward_model, sequence_rewards


def t(*values: float) -> torch.Tensor:
    return torch.tensor(values, dtype=torch.float32)


def close(actual: torch.Tensor, expected, tol: float = 1e-6) -> None:
    torch.testing.assert_close(actual, torch.as_tensor(expected, dtype=actual.dtype), rtol=tol, atol=tol)


# --- the loss ----------------------------------------------------------------------------------------------


def test_bradley_terry_hand_values():
    """Three pairs, rewards (chosen, rejected) = (2, 0.5), (0, 1), (0.3, 0.3):

    gap 1.5:  -log sigmoid(1.5) = log(1 + e^-1.5) = log(1.2231301601) = 0.2014132696, right;
    gap -1:   log(1 + e^1) = log(3.7182818285) = 1.3132616875, wrong;
    gap 0:    log 2 = 0.6931471806, a tie counts as wrong.
    """
    out = bradley_terry_loss(t(2.0, 0.0, 0.3), t(0.5, 1.0, 0.3))
    close(out.losses, [0.2014132696, 1.3132616875, 0.6931471806])
    close(out.accuracy, [1.0, 0.0, 0.0])
    close(out.margin, [1.5, -1.0, 0.0])
    assert not out.margin.requires_grad


def test_bradley_terry_margin_and_centering_values_and_gradients():
    """Rewards (2, 0.5), margin m = 1, centering coefficient 0.01.

    Llama 2 margin: -log sigmoid(1.5 - 1) = log(1 + e^-0.5) = log(1.6065306597) = 0.4740769842.
    Centering alone: 0.2014132696 + 0.01 * (2 + 0.5)^2 = 0.2014132696 + 0.0625 = 0.2639132696.
    Gradients of the centred loss: d/dr_c = -sigmoid(-1.5) + 2 * 0.01 * 2.5 = -0.1824255238 + 0.05
    = -0.1324255238, d/dr_r = +0.1824255238 + 0.05 = 0.2324255238.
    The margin changes the loss, not the reported accuracy or reward gap (still 1 and 1.5).
    """
    with_margin = bradley_terry_loss(t(2.0), t(0.5), margin=t(1.0))
    close(with_margin.losses, [0.4740769842])
    close(with_margin.accuracy, [1.0])
    close(with_margin.margin, [1.5])

    chosen, rejected = t(2.0).requires_grad_(), t(0.5).requires_grad_()
    centred = bradley_terry_loss(chosen, rejected, center_coef=0.01)
    close(centred.losses, [0.2639132696])
    centred.losses.sum().backward()
    close(chosen.grad, [-0.1324255238])
    close(rejected.grad, [0.2324255238])


def test_bradley_terry_per_pair_margins():
    """Margins act per pair: rewards (1, 0) twice with m = (0, 2): log(1 + e^-1) = 0.3132616875 and
    -log sigmoid(1 - 2) = log(1 + e^1) = 1.3132616875."""
    out = bradley_terry_loss(t(1.0, 1.0), t(0.0, 0.0), margin=t(0.0, 2.0))
    close(out.losses, [0.3132616875, 1.3132616875])


def test_bradley_terry_large_gap_does_not_underflow():
    """Gap -200: sigmoid(-200) = 1.4e-87 is 0 in float32, so log(sigmoid) would be -inf. logsigmoid gives
    -log sigmoid(-200) = 200 + log(1 + e^-200) = 200 exactly in float32, with gradient -sigmoid(200) = -1 on
    the chosen reward. Gap +200 gives a loss of e^-200 = 0 in float32 and a zero gradient, not NaN."""
    assert torch.isinf(-torch.log(torch.sigmoid(t(-200.0)))).all()  # the naive form really fails here
    chosen = t(-100.0, 100.0).requires_grad_()
    out = bradley_terry_loss(chosen, t(100.0, -100.0))
    close(out.losses, [200.0, 0.0])
    out.losses.sum().backward()
    close(chosen.grad, [-1.0, 0.0])


# --- alignkit rm end to end -------------------------------------------------------------------------------

GOOD = [
    "the capital of france is paris.",
    "here is a helpful and harmless answer.",
    "the sea and the sky are blue.",
    "here is a short poem about the sea.",
]
BAD = ["i cannot help.", "0 1 2 3 4", "no.", "? ! ; : ,"]
PROMPTS = ["what is the capital of france?", "please write a short poem", "the quick brown fox", "help me"]


def _pairs(parity: int) -> list[dict]:
    """Good-vs-bad pairs; train takes (i + j) even, held-out (i + j) odd, so no held-out pair is seen."""
    return [
        {"prompt": PROMPTS[(i + j) % 4], "chosen": GOOD[i], "rejected": BAD[j], "strength": float(i % 2)}
        for i in range(4)
        for j in range(4)
        if (i + j) % 2 == parity
    ]


@pytest.fixture
def rm_stage(monkeypatch):
    monkeypatch.setitem(cli.STAGES, "rm", ("alignkit.stages.rm", "Reward model"))


def _write(path, rows):
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path


def _run_rm(tmp_path, model_dir, *extra) -> dict:
    train = _write(tmp_path / "train.jsonl", _pairs(0) * 2)
    held_out = _write(tmp_path / "eval.jsonl", _pairs(1))
    out = tmp_path / "rm"
    args = [
        "rm",
        f"model={model_dir}",
        f"train_data={train}",
        f"eval_data={held_out}",
        f"output_dir={out}",
        "batch_size=8",
        "micro_batch_size=4",
        "max_steps=12",
        "learning_rate=3e-3",
        "lr_scheduler=constant",
        "dtype=float32",
        "progress=false",
        "tensorboard=false",
        *extra,
    ]
    assert cli.main(args) == 0
    return json.loads((out / "summary.json").read_text())


def test_rm_learns_held_out_pairs_and_reloads_in_a_fresh_process(tiny_model_dir, tmp_path, rm_stage):
    summary = _run_rm(tmp_path, tiny_model_dir, "center_coef=0.01", "margin_column=strength")
    # The untrained head gives rewards near 0, so the held-out loss is the margins' alone: half the pairs
    # have m = 0 (ln 2 = 0.6931) and half m = 1 (-log sigmoid(-1) = 1.3133), mean 1.0032.
    before, after = summary["eval_before"], summary["eval_after"]
    assert before["loss"] == pytest.approx((math.log(2) + math.log(1 + math.e)) / 2, abs=0.02)
    assert abs(before["rewards/margin"]) < 0.1
    # Training raises held-out accuracy and margin, and lowers the loss.
    assert summary["eval_accuracy"] >= 0.875 and summary["eval_accuracy"] > before["rewards/accuracy"]
    assert after["rewards/margin"] > before["rewards/margin"] + 1.0
    assert after["loss"] < before["loss"] - 0.3
    low, high = summary["eval_accuracy_ci95"]
    assert 0.0 <= low <= summary["eval_accuracy"] <= high <= 1.0
    assert summary["train_after"]["rewards/accuracy"] == 1.0 and summary["train_eval_pairs"] == 16
    assert summary["eval_pairs"] == 8

    # A fresh interpreter loads final/ and scores the held-out pairs: same accuracy and mean reward as the
    # trained model measured in the run, and the same numbers as loading it here.
    final = summary["final_model"]
    held_out = _pairs(1)
    code = (
        "import json, sys\n"
        "from alignkit.models.reward import load_reward_model\n"
        "rows = json.loads(sys.argv[2])\n"
        "rm = load_reward_model(sys.argv[1], dtype='float32')\n"
        "c, r = rm.score_pairs([x['prompt'] for x in rows], [x['chosen'] for x in rows], "
        "[x['rejected'] for x in rows])\n"
        "print(json.dumps([c, r]))\n"
    )
    proc = subprocess.run(
        [sys.executable, "-c", code, final, json.dumps(held_out)], capture_output=True, text=True, timeout=120
    )
    assert proc.returncode == 0, proc.stderr[-2000:]
    chosen, rejected = json.loads(proc.stdout.strip().splitlines()[-1])
    accuracy = sum(c > r for c, r in zip(chosen, rejected)) / len(chosen)
    assert accuracy == pytest.approx(summary["eval_accuracy"])
    assert (sum(chosen) + sum(rejected)) / 16 == pytest.approx(summary["eval_reward_mean"], abs=1e-5)

    here = load_reward_model(final, dtype="float32")
    assert here.max_length == 512
    scores = here.score([x["prompt"] for x in held_out], [x["chosen"] for x in held_out])
    assert scores == pytest.approx(chosen, abs=1e-5)
    record = json.loads((tmp_path / "rm" / "final" / "ALIGNKIT_REWARD.json").read_text())
    assert record["eval_reward_mean"] == pytest.approx(summary["eval_reward_mean"])


def test_rm_lora_trains_the_head_and_saves_a_plain_model(tiny_model_dir, tmp_path, rm_stage):
    """With LoRA the random head must train too (PEFT's SEQ_CLS modules_to_save); final/ is merged."""
    summary = _run_rm(tmp_path, tiny_model_dir, "lora=true", "lora_r=4", "learning_rate=2e-2")
    assert summary["trainable_parameters"] < summary["total_parameters"] / 2
    assert summary["eval_accuracy"] >= 0.75
    assert (tmp_path / "rm" / "final" / "model.safetensors").is_file()
    assert not (tmp_path / "rm" / "final" / "adapter_config.json").exists()


def test_pooling_reads_the_last_attended_token_whatever_the_padding(tiny_model_dir, tiny_tokenizer):
    """A row's reward does not depend on how much right padding follows it, or on the pad id equalling
    EOS (as in SmolLM2), where transformers' own pooling would stop one token early."""
    from alignkit.models.reward import build_reward_model

    model = build_reward_model(str(tiny_model_dir), tiny_tokenizer.pad_token_id, "float32", device="cpu")
    eos = tiny_tokenizer.eos_token_id
    ids = torch.tensor([[5, 6, 7, eos]])
    alone = sequence_rewards(model, ids, torch.ones_like(ids))
    padded = torch.tensor([[5, 6, 7, eos, eos, eos], [8, 9, eos, eos, eos, eos]])  # pad == eos
    mask = torch.tensor([[1, 1, 1, 1, 0, 0], [1, 1, 1, 0, 0, 0]])
    both = sequence_rewards(model, padded, mask)
    close(both[:1], alone, tol=1e-5)
    # the head applied by hand to the EOS position's hidden state
    hidden = model.model(input_ids=ids).last_hidden_state[0, -1]
    close(alone, model.score(hidden).float(), tol=1e-5)
