"""The AI-feedback judge: the conflict rule, order-swap averaging, option-token scoring against a manual
log-softmax, the round-robin ranker, and build-prefs with reward=judge on a tiny model."""

from __future__ import annotations

import json
import re

import pytest
import torch

from alignkit.cai import judge as judge_mod
from alignkit.cai.constitution import load_constitution
from alignkit.cai.judge import (
    JudgeError,
    JudgeRanker,
    PairwiseJudge,
    build_judge_prompt,
    combine_principles,
    judge_pair,
    option_logprobs,
    option_token_ids,
)
from alignkit.config import load_config

from conftest import build_tiny_model

# ---------------------------------------------------------------------------------------------
# The conflict rule
# ---------------------------------------------------------------------------------------------


def test_agreeing_principles_average():
    """Both prefer response 1: no conflict, p = (0.8 + 0.6) / 2 = 0.7, whatever the priorities."""
    c = combine_principles([0.8, 0.6], [5, 10])
    assert c.p == pytest.approx(0.7) and not c.conflict and c.deciding == (0, 1)


def test_conflict_is_resolved_by_the_higher_priority():
    """0.9 (priority 5) prefers response 1, 0.2 (priority 10) response 2: the priority-10 principle
    decides alone, p = 0.2 (not the mean 0.55, which would have flipped the label)."""
    c = combine_principles([0.9, 0.2], [5, 10])
    assert c.p == pytest.approx(0.2) and c.conflict and c.deciding == (1,)


def test_equal_top_priorities_are_averaged():
    """Priorities 10, 10, 5 with p 0.9, 0.3, 0.2: a conflict; the two priority-10 principles average to
    (0.9 + 0.3) / 2 = 0.6, and the priority-5 one is left out."""
    c = combine_principles([0.9, 0.3, 0.2], [10, 10, 5])
    assert c.p == pytest.approx(0.6) and c.conflict and c.deciding == (0, 1)


def test_an_undecided_principle_does_not_conflict():
    """p = 0.5 has no preference, so 0.5 and 0.8 agree: mean 0.65, no conflict."""
    c = combine_principles([0.5, 0.8], [10, 1])
    assert c.p == pytest.approx(0.65) and not c.conflict


def test_conflicts_are_counted():
    """Over four hand-made comparisons exactly the two with opposite sides are conflicts."""
    cases = [([0.7, 0.9], [1, 2]), ([0.7, 0.1], [1, 2]), ([0.3, 0.6], [3, 3]), ([0.2, 0.4], [1, 9])]
    assert sum(combine_principles(p, pr).conflict for p, pr in cases) == 2


# ---------------------------------------------------------------------------------------------
# Order-swap averaging, with a judge whose option log-probs we control
# ---------------------------------------------------------------------------------------------

_REPLIES = re.compile(r"Reply \(A\):\n(.*?)\n\nReply \(B\):\n(.*?)\n\n", re.S)


def _replies(tokenizer, ids) -> tuple[str, str]:
    return _REPLIES.search(tokenizer.decode(ids)).groups()


def fake_always_a(model, ids_batch, option_ids):
    """A judge with pure position bias: p(A) = 0.8, p(B) = 0.1 whatever it is shown."""
    return torch.log(torch.tensor([[0.8, 0.1]] * len(ids_batch)))


def fake_prefers_word(tokenizer, word: str = "paris"):
    """A judge that puts 0.9 on the reply containing ``word`` and 0.05 on the other (0.45 each if neither)."""

    def scorer(model, ids_batch, option_ids):
        rows = []
        for ids in ids_batch:
            a, b = _replies(tokenizer, ids)
            rows.append([0.9, 0.05] if word in a else [0.05, 0.9] if word in b else [0.45, 0.45])
        return torch.log(torch.tensor(rows))

    return scorer


def test_a_judge_that_always_says_a_gives_one_half(monkeypatch, tiny_tokenizer):
    """Order 1: P(A) = 0.8 / 0.9 = 8/9 for response_a; order 2 shows response_a as (B): 1 - 8/9 = 1/9.
    Their mean is exactly 1/2: the position bias cancels. The option mass is 0.8 + 0.1 = 0.9."""
    monkeypatch.setattr(judge_mod, "option_logprobs", fake_always_a)
    r = judge_pair(
        None, tiny_tokenizer, "what is the capital of france?", "paris.", "no.", "Which is better?"
    )
    assert r.p_a_order1 == pytest.approx(8 / 9) and r.p_a_order2 == pytest.approx(1 / 9)
    assert r.p_a == pytest.approx(0.5, abs=1e-12)
    assert r.option_mass == pytest.approx(0.9)


def test_a_judge_that_prefers_a_word_agrees_in_both_orders(monkeypatch, tiny_tokenizer):
    """The reply with "paris" gets 0.9 / (0.9 + 0.05) = 18/19 wherever it is shown."""
    monkeypatch.setattr(judge_mod, "option_logprobs", fake_prefers_word(tiny_tokenizer))
    r = judge_pair(
        None, tiny_tokenizer, "what is the capital of france?", "paris.", "no.", "Which is better?"
    )
    assert r.p_a_order1 == pytest.approx(18 / 19) and r.p_a_order2 == pytest.approx(18 / 19)
    assert r.p_a == pytest.approx(18 / 19)
    swapped = judge_pair(None, tiny_tokenizer, "what is the capital?", "no.", "paris.", "Which is better?")
    assert swapped.p_a == pytest.approx(1 / 19)


def test_judge_ranker_scores_are_mean_pairwise_wins(monkeypatch, tiny_tokenizer):
    """Three responses, one with "paris". It beats each other with 18/19, so it scores 18/19; the two
    others beat "paris" with 1/19 and tie each other at 1/2: (1/19 + 1/2) / 2 each. Scores sum to N/2."""
    monkeypatch.setattr(judge_mod, "option_logprobs", fake_prefers_word(tiny_tokenizer))
    judge = PairwiseJudge(None, tiny_tokenizer, load_constitution(), principles_per_comparison=2)
    ranker = JudgeRanker(judge, seed=0, name="judge:test")
    scores = ranker.score("what is the capital of france?", ["no.", "paris.", "i cannot help."])
    other = (1 / 19 + 0.5) / 2
    assert scores == pytest.approx([other, 18 / 19, other])
    assert sum(scores) == pytest.approx(1.5)


# ---------------------------------------------------------------------------------------------
# The prompt and the option tokens, on the tiny model
# ---------------------------------------------------------------------------------------------


def test_judge_prompt_ends_so_the_next_token_is_the_option(tiny_tokenizer):
    """The question ends with the assistant header and "(", and tokenizing that text followed by "A" gives
    exactly the question's ids + the id of "A": reading the letter's log-prob is exact."""
    ids = build_judge_prompt(tiny_tokenizer, "hi", "paris.", "no.", "Which response is better?")
    text = tiny_tokenizer.decode(ids)
    assert text.endswith("<|im_start|>assistant\n(")
    assert "Reply (A):\nparis.\n\nReply (B):\nno." in text
    (opt_a,), (opt_b,) = option_token_ids(tiny_tokenizer)
    assert tiny_tokenizer(text + "A", add_special_tokens=False)["input_ids"] == ids + [opt_a]
    assert tiny_tokenizer.convert_ids_to_tokens([opt_a, opt_b]) == ["A", "B"]


def test_a_tokenizer_that_merges_the_option_is_refused():
    class Merging:
        chat_template = "x"

        def __call__(self, text, add_special_tokens=False):
            return {"input_ids": {"(": [5], "(A": [6], "(B": [7]}[text]}

    with pytest.raises(JudgeError, match="merges"):
        option_token_ids(Merging())


def test_option_logprobs_equal_a_manual_log_softmax(tiny_tokenizer):
    """Batched, right-padded rows of different lengths give, at each row's last real position, the same
    log-probs as each row run alone through the full model (log_softmax of its last logits); multi-token
    options ("A)" / "B)") equal the manual sum log p(A | x) + log p(")" | x, A)."""
    model = build_tiny_model(len(tiny_tokenizer), seed=3).eval()
    rows = [
        build_judge_prompt(tiny_tokenizer, "hi", "paris.", "no.", "Which is better?"),
        build_judge_prompt(
            tiny_tokenizer, "please write a short poem about the sea", "the sea", "no", "Which?"
        ),
        [1, 5, 9],
    ]
    assert len({len(r) for r in rows}) == 3
    options = option_token_ids(tiny_tokenizer)
    got = option_logprobs(model, rows, options)  # (3, 2)
    close = tiny_tokenizer(")", add_special_tokens=False)["input_ids"]
    got_multi = option_logprobs(model, rows, [[*options[0], *close], [*options[1], *close]])
    with torch.no_grad():
        for i, r in enumerate(rows):
            logp = torch.log_softmax(model(torch.tensor([r])).logits[0, -1].float(), -1)
            assert got[i].tolist() == pytest.approx([logp[o[0]].item() for o in options], abs=1e-5)
            for k, o in enumerate(options):
                after = torch.log_softmax(model(torch.tensor([[*r, *o]])).logits[0, -1].float(), -1)
                manual = logp[o[0]].item() + after[close[0]].item()
                assert got_multi[i, k].item() == pytest.approx(manual, abs=1e-5)


def test_tiny_judge_probabilities_are_consistent(tiny_tokenizer):
    """On a real (tiny) model: p_a is the mean of the two orders, and asking with the responses swapped
    gives exactly 1 - p_a (the same two questions, read from the other side)."""
    model = build_tiny_model(len(tiny_tokenizer), seed=3).eval()
    r = judge_pair(model, tiny_tokenizer, "hi", "paris.", "no.", "Which is better?")
    s = judge_pair(model, tiny_tokenizer, "hi", "no.", "paris.", "Which is better?")
    assert r.p_a == pytest.approx((r.p_a_order1 + r.p_a_order2) / 2)
    assert s.p_a == pytest.approx(1 - r.p_a, abs=1e-6)
    assert 0 < r.option_mass < 1


# ---------------------------------------------------------------------------------------------
# build-prefs with reward=judge
# ---------------------------------------------------------------------------------------------


def test_build_prefs_with_the_judge_ranker(tmp_path, tiny_model_dir):
    """The tiny model samples and judges: every pair names the judge ranker, its chosen side scored higher,
    and each prompt's scores (mean pairwise win probabilities) lie in [0, 1] and sum to N/2."""
    from alignkit.stages import build_prefs

    prompts = tmp_path / "prompts.jsonl"
    prompts.write_text("".join(json.dumps({"prompt": p}) + "\n" for p in ["hi", "the quick brown fox"]))
    out = tmp_path / "pairs.jsonl"
    cfg = load_config(
        build_prefs.BuildPrefsConfig,
        None,
        [
            f"output={out}",
            f"prompts={prompts}",
            f"model={tiny_model_dir}",
            f"judge_model={tiny_model_dir}",
            "judge_principles=[avoid_harm,helpfulness]",
            "reward=judge",
            "n_samples=3",
            "max_new_tokens=6",
            "pairing=all_pairs",
            "progress=false",
        ],
    )
    summary = build_prefs.run(cfg)
    rows = [json.loads(line) for line in out.read_text().splitlines()]
    assert summary["pairs"] == len(rows) >= 1
    for row in rows:
        assert row["ranker"] == f"judge:{tiny_model_dir}:alignkit-default[avoid_harm,helpfulness]:k=2"
        assert row["chosen_score"] > row["rejected_score"]
        assert 0.0 <= row["rejected_score"] < row["chosen_score"] <= 1.0
    # all_pairs of 3 distinct responses with distinct scores: 3 pairs whose scores are the 3 responses'
    for prompt_row in {r["prompt_row"] for r in rows}:
        scores = {}
        for r in (r for r in rows if r["prompt_row"] == prompt_row):
            scores[r["chosen_index"]] = r["chosen_score"]
            scores[r["rejected_index"]] = r["rejected_score"]
        if len(scores) == 3:
            assert sum(scores.values()) == pytest.approx(1.5, abs=1e-9)
    assert summary["responses"] == 6 and summary["prompts_done"] == 2
