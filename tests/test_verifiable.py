"""Rewards as code: the verifiable reward functions on hand-worked replies, reward functions that take
prompt-file columns (and the error when a column is missing), rewards summed with weights, the seeded
arithmetic task (its answers recomputed from its numbers) and `alignkit make-task`, and the columns reaching
the reward in `alignkit score`, `alignkit eval` and an online-dpo run on the tiny model."""

from __future__ import annotations

import json
import re

import pytest

from alignkit import cli
from alignkit.config import ConfigError, load_config
from alignkit.data.io import RowRef
from alignkit.data.schemas import PromptExample, load_prompts
from alignkit.scoring import (
    FunctionScorer,
    RewardFunctionError,
    WeightedScorer,
    check_columns,
    check_scorer,
    load_scorer,
    score_parts,
)
from alignkit.scoring.scorers import part_names
from alignkit.scoring.verifiable import exact_answer, extract_answer, format_adherence, length, parse_number
from alignkit.stages import load_stage
from alignkit.tasks import arithmetic

V = "alignkit.scoring.verifiable"

# ---------------------------------------------------------------------------------------------------------
# The reward functions, by hand


@pytest.mark.parametrize(
    "reply, expected",
    [
        ("So she has 1,234 apples.", 1234.0),  # thousands separator
        ("It costs $12,000.50 in all", 12000.5),  # separator and decimals
        ("The temperature is -5 degrees", -5.0),  # a sign
        ("pages 3-4, so 7", 7.0),  # a hyphen between numbers is no sign: 3, 4, 7
        ("half is 2.5.", 2.5),  # a full stop after the number is not a decimal point
        ("each gets 3/4.", 0.75),  # a fraction, then a full stop
        ("I do not know", None),  # no number at all
        ("Answer: 12\nCheck: 3 + 4 = 7", 12.0),  # the Answer: line wins over a later number
        ("first \\boxed{2}, no wait, \\boxed{5}. Then 9", 5.0),  # the last box wins over everything
        ("\\boxed{\\frac{3}{4}}", 0.75),  # a LaTeX fraction in a box
        ("\\boxed{x = 14 apples}", 14.0),  # a box holding more than a number: its last number
        ("\\boxed{n} and 3", None),  # a box without a number: no answer (not the 3 outside it)
        ("1,2345", 2345.0),  # not a thousands group: 1 and 2345
    ],
)
def test_extract_answer(reply, expected):
    assert extract_answer(reply) == expected


def test_parse_number_reads_one_number_or_none():
    assert parse_number("1,234") == 1234.0 and parse_number("-3/4") == -0.75 and parse_number("$7") == 7.0
    assert parse_number("\\dfrac{-1}{2}") == -0.5 and parse_number("3/0") is None
    assert parse_number("3 apples") is None and parse_number("") is None


@pytest.mark.parametrize(
    "reply, answer, score",
    [
        ("She keeps 1,234 stickers.", 1234, 1.0),
        ("She keeps 1,234 stickers.", "1,234", 1.0),  # the answer column as text with a separator
        ("It is -3.", -3, 1.0),
        ("It is 3.", -3, 0.0),  # the sign counts
        ("each gets 0.75", "3/4", 1.0),  # a fraction answer against a decimal reply
        ("each gets 3/4", 0.75, 1.0),
        ("total 2.50 dollars", 2.5, 1.0),
        ("0.1 + 0.2 gives 0.30000000000000004", 0.3, 1.0),  # within the relative tolerance 1e-6
        ("1000.01", 1000, 0.0),  # outside it: 0.01 > 1e-6 * 1000
        ("no idea", 5, 0.0),  # no number: wrong, not an error
        ("\\boxed{4} or maybe \\boxed{5}", 5, 1.0),  # several boxes: the last
        ("\\boxed{4} or maybe \\boxed{5}", 4, 0.0),
    ],
)
def test_exact_answer(reply, answer, score):
    assert exact_answer("q", reply, answer) == score


def test_exact_answer_tolerance_and_a_bad_answer():
    assert exact_answer("q", "1000.01", 1000, tolerance=1e-4) == 1.0  # |0.01| <= 1e-4 * 1000 = 0.1
    with pytest.raises(RewardFunctionError, match="answer 'seven' is not a number"):
        exact_answer("q", "7", "seven")


@pytest.mark.parametrize(
    "prompt, reply, score",
    [
        ("q", "3 + 4 = 7\nAnswer: 7", 1.0),
        ("q", "**Answer:** 7.", 1.0),
        ("q", "answer: -1,200", 1.0),
        ("q", "Answer: $12", 1.0),
        ("q", "The answer is 7", 0.0),  # no "Answer:" line
        ("q", "Answer: about 7", 0.0),  # not a number alone
        ("q", "So, Answer: 7", 0.0),  # not on a line of its own
        ("Put it in \\boxed{}", "so \\boxed{7}", 1.0),  # the prompt asks for a box
        ("Put it in \\boxed{}", "Answer: 7", 0.0),  # ... and gets a line instead
        ("Put it in \\boxed{}", "\\boxed{seven}", 0.0),
    ],
)
def test_format_adherence(prompt, reply, score):
    assert format_adherence(prompt, reply) == score


def test_length_shaping_by_hand():
    """T = 10 words: 0 up to 10 words, (10 - n) / 10 between 10 and 20, -1 beyond."""
    words = lambda n: " ".join(["w"] * n)  # noqa: E731
    assert [length("q", words(n), target_words=10) for n in (0, 10, 11, 15, 20, 21, 40)] == pytest.approx(
        [0.0, 0.0, -0.1, -0.5, -1.0, -1.0, -1.0]
    )
    assert length("q", words(150)) == pytest.approx(-0.5)  # the default target, 100 words
    with pytest.raises(RewardFunctionError, match="target_words"):
        length("q", "w", target_words=0)


# ---------------------------------------------------------------------------------------------------------
# Reward functions that take prompt-file columns


def _examples(rows: list[dict], source: str = "tasks.jsonl") -> list[PromptExample]:
    return [
        PromptExample(row["prompt"], RowRef(source, i), {k: v for k, v in row.items() if k != "prompt"})
        for i, row in enumerate(rows)
    ]


def test_a_function_receives_its_prompts_columns_by_name():
    scorer = FunctionScorer(f"{V}:exact_answer", "reward")
    assert scorer.required_columns == ["answer"]
    columns = [{"answer": 7, "level": 1}, {"answer": "1,000"}, {"answer": 3, "tolerance": 0.5}]
    replies = ["Answer: 7", "it is 1000", "Answer: 3.4"]  # the third is right only with its row's tolerance
    assert scorer.score(["a", "b", "c"], replies, columns) == [1.0, 1.0, 1.0]
    assert scorer.score(["c"], ["Answer: 3.4"], [{"answer": 3}]) == [0.0]  # the default tolerance


def test_plain_two_argument_functions_work_unchanged_with_or_without_columns():
    scorer = FunctionScorer("_ppo_rewards:length", "reward")
    assert scorer.required_columns == []
    assert scorer.score(["p"], ["0123456789"]) == [1.0]
    assert scorer.score(["p"], ["0123456789"], [{"answer": 3, "response": "x"}]) == [1.0]


def test_kwargs_receive_every_column_but_the_prompt_and_response():
    seen = []

    def spy(prompt, response, **columns):
        seen.append(columns)
        return 0.0

    import types

    module = types.ModuleType("_spy_reward")
    module.spy = spy
    import sys

    sys.modules["_spy_reward"] = module
    try:
        FunctionScorer("_spy_reward:spy", "reward").score(["p"], ["r"], [{"answer": 1, "response": "x", "k": 2}])
    finally:
        del sys.modules["_spy_reward"]
    assert seen == [{"answer": 1, "k": 2}]


def test_a_missing_column_is_an_error_naming_function_column_row_and_file():
    rows = [{"prompt": "a", "answer": 1}, {"prompt": "b", "level": 2}]
    with pytest.raises(ConfigError) as err:
        check_columns(f"{V}:exact_answer", _examples(rows), "reward", "train_data")
    message = str(err.value)
    assert "exact_answer()" in message and "'answer'" in message
    assert "row 1 of train_data tasks.jsonl" in message and "other columns: level" in message
    # A list reward checks each function; a plain one needs no column.
    with pytest.raises(ConfigError, match="exact_answer"):
        check_columns(["_ppo_rewards:length", f"{V}:exact_answer"], _examples(rows), "reward", "prompts")
    check_columns("_ppo_rewards:length", _examples(rows), "reward", "prompts")
    # Called without the columns, the scorer says which one it lacks.
    with pytest.raises(RewardFunctionError, match="takes column 'answer'.*no prompt columns were given"):
        FunctionScorer(f"{V}:exact_answer", "reward").score(["p"], ["1"])


def test_load_prompts_keeps_the_other_columns(tmp_path):
    path = tmp_path / "p.jsonl"
    path.write_text(json.dumps({"prompt": "2+2?", "answer": 4, "level": 1}) + "\n")
    (example,) = load_prompts(str(path)).examples
    assert example.prompt == "2+2?" and example.columns == {"answer": 4, "level": 1}


def test_signatures_that_cannot_take_columns_are_refused():
    with pytest.raises(ConfigError, match="must accept \\(prompt: str, response: str\\)"):
        check_scorer("_ppo_rewards:wrong_signature", "reward")


# ---------------------------------------------------------------------------------------------------------
# Several rewards summed with weights


def test_weighted_sum_by_hand():
    """exact_answer (1 or 0) x 1.0 + format_adherence (1 or 0) x 0.5:
    'Answer: 7' for 7 -> 1 + 0.5 = 1.5; 'it is 7' for 7 -> 1 + 0 = 1.0; 'Answer: 8' for 7 -> 0 + 0.5 = 0.5."""
    scorer = load_scorer([f"{V}:exact_answer", f"{V}:format_adherence"], "reward", [1.0, 0.5])
    assert isinstance(scorer, WeightedScorer)
    replies, columns = ["Answer: 7", "it is 7", "Answer: 8"], [{"answer": 7}] * 3
    scored = score_parts(scorer, ["q"] * 3, replies, columns)
    assert scored.total == [1.5, 1.0, 0.5]
    assert scored.parts == {"exact_answer": [1.0, 1.0, 0.0], "format_adherence": [1.0, 0.0, 1.0]}
    assert scorer.score(["q"] * 3, replies, columns) == [1.5, 1.0, 0.5]
    # No weights: all 1. A single reward has no parts.
    assert load_scorer([f"{V}:exact_answer", f"{V}:format_adherence"], "reward").score(["q"], ["Answer: 7"], [{"answer": 7}]) == [2.0]  # noqa: E501
    assert score_parts(load_scorer("_ppo_rewards:length", "reward"), ["q"], ["abc"]).parts == {}


def test_part_names_are_short_unless_they_clash():
    assert part_names([f"{V}:exact_answer", f"{V}:length"]) == ["exact_answer", "length"]
    clash = [f"{V}:length", "alignkit.scoring.rewards:length", "m:mean"]
    assert part_names(clash) == clash  # two 'length's, and 'mean' is the summed reward's reward/mean


def test_reward_list_and_weights_from_the_command_line():
    stage = load_stage("score")
    overrides = [f"reward=[{V}:exact_answer,{V}:format_adherence]", "reward_weights=[1,0.5]", "input=i", "output=o"]
    cfg = load_config(stage.config, None, overrides)
    assert cfg.reward == [f"{V}:exact_answer", f"{V}:format_adherence"] and cfg.reward_weights == [1.0, 0.5]
    assert stage.validated(reward=f"{V}:exact_answer", input="i", output="o.jsonl").reward == f"{V}:exact_answer"
    with pytest.raises(ConfigError, match="reward_weights' has 1 weight\\(s\\) for 2 reward"):
        stage.validated(reward=[f"{V}:exact_answer", f"{V}:length"], reward_weights=[1.0], input="i", output="o")
    with pytest.raises(ConfigError, match="empty list"):
        stage.validated(reward=[], input="i", output="o")


# ---------------------------------------------------------------------------------------------------------
# The arithmetic task


def _recompute(problem: arithmetic.Problem) -> int:
    """The answer from the problem's numbers, by Python's own arithmetic left to right."""
    value = problem.numbers[0]
    for op, x in zip(problem.operations, problem.numbers[1:]):
        value = {"+": value + x, "-": value - x, "*": value * x, "/": value / x}[op]
    assert float(value).is_integer()
    return int(value)


@pytest.mark.parametrize("level", sorted(arithmetic.LEVELS))
def test_generated_answers_are_right_and_seeded(level):
    problems = arithmetic.generate(300, seed=1, level=level)
    assert len({p.prompt for p in problems}) == 300  # distinct
    spec = arithmetic.LEVELS[level]
    for p in problems:
        assert p.answer == _recompute(p) and p.answer >= 1
        assert p.operations in spec.operations and len(p.numbers) == len(p.operations) + 1
        # The numbers are in the question in order, and it asks for the final form exact_answer reads.
        question = p.prompt.removesuffix(arithmetic.INSTRUCTION)
        assert [int(x) for x in re.findall(r"\d+", question)] == list(p.numbers)
        assert p.prompt.endswith(arithmetic.INSTRUCTION)
        assert exact_answer(p.prompt, f"Answer: {p.answer}", p.row()["answer"]) == 1.0
    assert arithmetic.generate(300, seed=1, level=level) == problems
    assert arithmetic.generate(300, seed=2, level=level) != problems


def test_level_one_has_one_addition_or_subtraction_up_to_30():
    problems = arithmetic.generate(500, seed=0, level=1)
    assert {p.operations for p in problems} == {("+",), ("-",)}
    assert max(max(p.numbers) for p in problems) <= 30


def test_split_holds_out_distinct_problems():
    problems = arithmetic.generate(50, seed=0)
    train, held_out = arithmetic.split(problems, 10)
    assert len(train) == 40 and len(held_out) == 10
    assert not {p.prompt for p in train} & {p.prompt for p in held_out}


def test_make_task_writes_the_same_files_for_the_same_seed(tmp_path):
    out = tmp_path / "tasks.jsonl"
    args = ["make-task", "arithmetic", "n=30", "held_out=10", "seed=3", f"output={out}"]
    assert cli.main(args) == 0
    train = [json.loads(line) for line in out.read_text().splitlines()]
    held = [json.loads(line) for line in (tmp_path / "tasks.heldout.jsonl").read_text().splitlines()]
    assert len(train) == 30 and len(held) == 10
    assert not {r["prompt"] for r in train} & {r["prompt"] for r in held}
    for row in train + held:
        op = row["operations"][0]
        a, b = row["numbers"]
        assert row["answer"] == (a + b if op == "+" else a - b)
    first = out.read_bytes()
    assert cli.main(args) == 2  # the files exist: refused
    assert cli.main([*args, "overwrite=true"]) == 0 and out.read_bytes() == first
    # The rows load as prompts with their answer column.
    assert load_prompts(str(out)).examples[0].columns["answer"] == train[0]["answer"]


# ---------------------------------------------------------------------------------------------------------
# The columns reach the reward in the stages


def test_score_stage_passes_columns_and_names_a_missing_one(tmp_path, capsys):
    rows = [
        {"prompt": "2+2?", "response": "Answer: 4", "answer": 4},
        {"prompt": "3+3?", "response": "it is 5", "answer": 6},
    ]
    path = tmp_path / "rows.jsonl"
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    out = tmp_path / "scored.jsonl"
    reward = f"reward=[{V}:exact_answer,{V}:format_adherence]"
    args = ["score", reward, "reward_weights=[1,0.5]", f"input={path}", f"output={out}", "progress=false"]
    assert cli.main(args) == 0
    assert [json.loads(line)["reward"] for line in out.read_text().splitlines()] == [1.5, 0.0]

    path.write_text(json.dumps({"prompt": "2+2?", "response": "4"}) + "\n")
    assert cli.main(["score", f"reward={V}:exact_answer", f"input={path}", f"output={tmp_path / 'x.jsonl'}"]) == 2
    err = capsys.readouterr().err
    assert "exact_answer() takes column 'answer'" in err and f"row 0 of input {path}" in err


def test_eval_scores_with_the_prompts_answers(tiny_model_dir, tmp_path):
    prompts = tmp_path / "tasks.jsonl"
    prompts.write_text("".join(json.dumps({"prompt": f"{i}+1?", "answer": i + 1}) + "\n" for i in range(3)))
    out = tmp_path / "eval.json"
    args = [
        "eval", str(tiny_model_dir), f"prompts={prompts}", f"reward={V}:exact_answer", "reference=none",
        "max_new_tokens=4", "temperature=0", "progress=false", f"output={out}",
    ]  # fmt: skip
    assert cli.main(args) == 0
    samples = json.loads(out.read_text())["samples"]
    assert [s["policy_score"] for s in samples] == [
        exact_answer(s["prompt"], s["policy"], i + 1) for i, s in enumerate(samples)
    ]


def test_online_dpo_trains_on_a_reward_that_reads_the_answer_column(tiny_model_dir, tmp_path):
    """One online-dpo round whose reward is answer_distance (-|len(response) - answer|, the answer from each
    prompt's row) + 0.5 x length (len / 10): each sample's score in samples.jsonl is recomputed from its own
    prompt's answer, and the row logs each reward's mean as reward/<name>."""
    answers = {"hello": 3, "tell me a story": 10, "why?": 1, "count": 6}
    prompts = tmp_path / "tasks.jsonl"
    prompts.write_text("".join(json.dumps({"prompt": p, "answer": a}) + "\n" for p, a in answers.items()))
    out = tmp_path / "run"
    args = [
        "online-dpo", f"model={tiny_model_dir}", f"train_data={prompts}", f"output_dir={out}",
        "reward=[_ppo_rewards:answer_distance,_ppo_rewards:length]", "reward_weights=[1.0,0.5]", "rounds=1",
        "prompts_per_round=4", "samples_per_prompt=2", "minibatch_size=4", "micro_batch_size=2",
        "max_new_tokens=6", "progress=false", "tensorboard=false",
    ]  # fmt: skip
    assert cli.main(args) == 0
    samples = [json.loads(line) for line in (out / "samples.jsonl").read_text().splitlines()]
    assert len(samples) == 8 and {s["prompt"] for s in samples} == set(answers)
    for s in samples:
        distance = -abs(len(s["response"]) - answers[s["prompt"]])
        assert s["rewards"] == pytest.approx({"answer_distance": distance, "length": len(s["response"]) / 10})
        assert s["score"] == pytest.approx(distance + 0.5 * len(s["response"]) / 10)
    (row,) = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines() if "event" not in line]
    assert row["reward/answer_distance"] == pytest.approx(sum(s["rewards"]["answer_distance"] for s in samples) / 8)
    assert row["reward/length"] == pytest.approx(sum(s["rewards"]["length"] for s in samples) / 8)
    assert row["score/mean"] == pytest.approx(sum(s["score"] for s in samples) / 8)


def test_an_online_run_without_the_column_stops_before_loading_a_model(tiny_model_dir, tmp_path, capsys):
    prompts = tmp_path / "plain.jsonl"
    prompts.write_text(json.dumps({"prompt": "hello"}) + "\n")
    args = [
        "ppo", f"model={tiny_model_dir}", f"train_data={prompts}", f"output_dir={tmp_path / 'run'}",
        "reward=_ppo_rewards:answer_distance", "progress=false", "tensorboard=false",
    ]  # fmt: skip
    assert cli.main(args) == 2
    err = capsys.readouterr().err
    assert "answer_distance() takes column 'answer'" in err and f"row 0 of train_data {prompts}" in err


def test_samples_keep_their_reward_parts_when_selected_and_joined():
    """GRPO's dynamic sampling keeps some groups (select) and adds refills (+): each reward's own scores follow."""
    from alignkit.models.generation import Generation
    from alignkit.training.online_engine import Samples

    gens = [Generation([1], [2], t, True) for t in "abc"]
    samples = Samples(["p", "q", "r"], gens, [1.5, 1.0, 0.5], None, {"f": [1.0, 1.0, 0.0], "g": [1.0, 0.0, 1.0]})
    kept = samples.select([2, 0])
    assert kept.scores == [0.5, 1.5] and kept.reward_parts == {"f": [0.0, 1.0], "g": [1.0, 1.0]}
    joined = kept + samples.select([1])
    assert joined.reward_parts == {"f": [0.0, 1.0, 1.0], "g": [1.0, 1.0, 0.0]}
    assert Samples(["p"], gens[:1], [1.0]).select([0]).reward_parts is None
