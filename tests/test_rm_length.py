"""Training options of `alignkit rm` against the length shortcut (issue 18): the length-debiasing loss by
hand, the length-balanced subset, early stopping that keeps the best weights, each end to end on the tiny
model."""

from __future__ import annotations

import json
import math

import pytest
import torch

from alignkit import cli
from alignkit.data.length_balance import length_balanced_indices
from alignkit.data.tokenize import encode_pair
from alignkit.losses.reward import length_correlation_penalty


def test_length_correlation_penalty_hand_values_and_gradient():
    """rewards (1, 2, 4), lengths (10, 20, 30): centred r = (-4/3, -1/3, 5/3), centred n = (-10, 0, 10).
    sum(r n) = 40/3 + 50/3 = 30; sum(r^2) = (16 + 1 + 25)/9 = 14/3; sum(n^2) = 200.
    rho = 30 / sqrt(14/3 * 200) = 30 / sqrt(933.33) = 0.98198; rho^2 = 900 / 933.33 = 0.96429."""
    r = torch.tensor([1.0, 2.0, 4.0], requires_grad=True)
    penalty = length_correlation_penalty(r, torch.tensor([10, 20, 30]), eps=0.0)
    assert penalty.item() == pytest.approx(900 / (14 / 3 * 200), abs=1e-6)
    penalty.backward()
    # d rho / d r_i = n_i / (|r| |n|) - rho r_i / |r|^2 on the centred values, and d rho^2 = 2 rho d rho:
    # for i = 1 (n = 0, r = -1/3): 2 * 0.98198 * (0 + 0.98198 * (1/3) / (14/3)) = 0.13776; the gradients sum
    # to 0, since shifting every reward by the same amount leaves the correlation unchanged.
    rho = 30 / math.sqrt(14 / 3 * 200)
    rc, nc, norm_r, norm_n = [-4 / 3, -1 / 3, 5 / 3], [-10, 0, 10], math.sqrt(14 / 3), math.sqrt(200)
    expected = [2 * rho * (n / (norm_r * norm_n) - rho * x / norm_r**2) for x, n in zip(rc, nc)]
    assert r.grad.tolist() == pytest.approx(expected, abs=1e-5)
    assert expected[1] == pytest.approx(0.13776, abs=1e-4) and sum(expected) == pytest.approx(0.0, abs=1e-9)
    # Rewards perfectly anti-correlated with length: rho = -1, penalty 1 (the sign does not matter).
    anti = length_correlation_penalty(torch.tensor([3.0, 2.0, 1.0]), torch.tensor([1, 2, 3]), eps=0.0)
    assert anti.item() == pytest.approx(1.0, abs=1e-6)
    # Uncorrelated: r = (1, -1, 1, -1) vs lengths (1, 1, 2, 2): sum(r n) = 0 -> 0.
    none = length_correlation_penalty(torch.tensor([1.0, -1.0, 1.0, -1.0]), torch.tensor([1, 1, 2, 2]))
    assert none.item() == pytest.approx(0.0, abs=1e-9)
    # All lengths equal: no evidence, 0 with a (zero) gradient rather than NaN.
    flat = torch.tensor([1.0, 5.0], requires_grad=True)
    out = length_correlation_penalty(flat, torch.tensor([7, 7]))
    out.backward()
    assert out.item() == 0.0 and flat.grad.tolist() == [0.0, 0.0]


def test_length_balanced_indices_keep_equal_groups_and_every_tie():
    # chosen longer in pairs 0, 1; shorter in 2, 3, 4, 5; equal in 6.
    chosen = [10, 9, 1, 2, 3, 4, 5]
    rejected = [1, 2, 10, 9, 8, 7, 5]
    kept = length_balanced_indices(chosen, rejected, seed=0)
    longer = [i for i in kept if chosen[i] > rejected[i]]
    shorter = [i for i in kept if chosen[i] < rejected[i]]
    assert longer == [0, 1] and len(shorter) == 2 and set(shorter) <= {2, 3, 4, 5} and 6 in kept
    assert kept == sorted(kept) and len(kept) == 5
    assert kept == length_balanced_indices(chosen, rejected, seed=0)  # seeded
    with pytest.raises(ValueError, match="3 chosen lengths but 2"):
        length_balanced_indices([1, 2, 3], [1, 2], seed=0)


# --- end to end on the tiny model -------------------------------------------------------------------------

GOOD = [
    "the capital of france is paris.",
    "here is a helpful answer.",
    "the sea is blue.",
    "a poem about the sea.",
]
BAD = ["i cannot help you with that at all, sorry.", "0 1", "no.", "? ! ; : , . ? ! ; : , ."]
PROMPTS = ["what is the capital of france?", "please write a short poem", "the quick brown fox", "help me"]


def _pairs(parity: int) -> list[dict]:
    """Good-vs-bad pairs whose chosen reply is sometimes the longer, sometimes the shorter one."""
    return [
        {"prompt": PROMPTS[(i + j) % 4], "chosen": GOOD[i], "rejected": BAD[j]}
        for i in range(4)
        for j in range(4)
        if (i + j) % 2 == parity
    ]


def _write(path, rows):
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path


def run_rm(tmp_path, model_dir, *extra, train_rows: list[dict] | None = None) -> dict:
    train = _write(tmp_path / "train.jsonl", train_rows or _pairs(0) * 2)
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
        "max_steps=8",
        "learning_rate=3e-3",
        "lr_scheduler=constant",
        "dtype=float32",
        "progress=false",
        "tensorboard=false",
        "train_eval_pairs=0",
        *extra,
    ]
    assert cli.main(args) == 0
    return json.loads((out / "summary.json").read_text())


def test_rm_length_balance_and_debias_options_train(tiny_model_dir, tiny_tokenizer, tmp_path, capsys):
    # Chosen is the shorter reply in the 4 extra pairs, so the 12 pairs are not balanced by length.
    rows = _pairs(0) + [{"prompt": "help me", "chosen": "the sea is blue.", "rejected": BAD[0]}] * 4
    options = ("length_balance=true", "length_debias_coef=1.0")
    summary = run_rm(tmp_path, tiny_model_dir, *options, train_rows=rows)
    # The balanced subset: 2 x min(#chosen longer, #chosen shorter) + #equal, counted from the tokens.
    train = [encode_pair(tiny_tokenizer, p["prompt"], p["chosen"], p["rejected"], 512) for p in rows]
    diffs = [len(e.chosen_ids) - len(e.rejected_ids) for e in train]
    longer, shorter = sum(d > 0 for d in diffs), sum(d < 0 for d in diffs)
    kept = 2 * min(longer, shorter) + sum(d == 0 for d in diffs)
    assert 0 < kept < 12 and summary["train_pairs"] == kept
    assert f"length_balance: training on {kept} of 12 pairs" in capsys.readouterr().err
    logs = [json.loads(x) for x in (tmp_path / "rm" / "metrics.jsonl").read_text().splitlines()]
    logged = [r["rewards/length_corr_sq"] for r in logs if "rewards/length_corr_sq" in r]
    assert len(logged) == 8 and all(0.0 <= v <= 1.0 for v in logged)


def test_rm_summary_holds_the_diagnostics_and_the_log_prob_baseline(tiny_model_dir, tiny_tokenizer, tmp_path):
    summary = run_rm(tmp_path, tiny_model_dir)
    d = summary["diagnostics"]
    held_out = _pairs(1)
    assert d["n_pairs"] == 8 and d["accuracy"]["value"] == pytest.approx(summary["eval_accuracy"])
    assert set(d["baselines"]) == {"prefer_shorter", "prefer_longer", "base_logprob"}
    # The length rules do not need the model: count them from the replies' tokens.
    encoded = [encode_pair(tiny_tokenizer, p["prompt"], p["chosen"], p["rejected"], 512) for p in held_out]
    diffs = [len(e.chosen_ids) - len(e.rejected_ids) for e in encoded]
    shorter = sum(1.0 if d < 0 else 0.5 if d == 0 else 0.0 for d in diffs) / 8
    assert d["baselines"]["prefer_shorter"]["value"] == pytest.approx(shorter)
    assert d["baselines"]["prefer_longer"]["value"] == pytest.approx(1 - shorter)
    assert d["buckets"]["length_matched"]["n"] + d["buckets"]["length_differs"]["n"] == 8
    assert summary["warnings"] == d["warnings"]
    # The report shows the same table, not the raw JSON.
    from alignkit.reporting.html import render_report

    page, _ = render_report(tmp_path / "rm")
    assert "<h2>Reward model diagnostics</h2>" in page and "baseline: prefer shorter" in page
    assert f"{d['accuracy']['value']:.3f} [{d['accuracy']['ci95'][0]:.3f}" in page


def test_rm_early_stopping_stops_and_keeps_the_best_weights(tiny_model_dir, tmp_path, capsys):
    """A learning rate of ~0 never improves the validation accuracy: the first measurement (step 2) stays
    the best, patience 1 runs out at the second (step 4), the loop sees it at the next log (step 5) and
    measures once more on the way out. final/ scores the validation pairs as the best measurement did."""
    summary = run_rm(
        tmp_path,
        tiny_model_dir,
        "learning_rate=1e-12",
        "eval_every=2",
        "early_stopping_pairs=4",
        "early_stopping_patience=1",
        "logprob_baseline=false",
    )
    es = summary["early_stopping"]
    assert es["validation_steps"] == [2, 4, 5] and summary["steps"] == 5
    assert es["best_step"] == 2 and es["stopped_early"] is True and es["validation_pairs"] == 4
    assert "final/ holds the weights of step 2" in capsys.readouterr().err
    assert summary["train_pairs"] == 12 and "base_logprob" not in summary["diagnostics"]["baselines"]

    from alignkit.models.reward import load_reward_model

    validation = (_pairs(0) * 2)[-4:]
    rm = load_reward_model(summary["final_model"], dtype="float32")
    c, r = rm.score_pairs([p["prompt"] for p in validation], [p["chosen"] for p in validation],
                          [p["rejected"] for p in validation])
    assert sum(x > y for x, y in zip(c, r)) / 4 == pytest.approx(es["best_validation_accuracy"])


def test_rm_early_stopping_needs_eval_every(tiny_model_dir, tmp_path, capsys):
    with pytest.raises(AssertionError):
        run_rm(tmp_path, tiny_model_dir, "early_stopping_pairs=4")
    assert "early_stopping_pairs needs eval_every" in capsys.readouterr().err
