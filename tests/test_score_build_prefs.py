"""`alignkit score` and `alignkit build-prefs` on a tiny model: pairing rules on hand-made scores, resuming
after a crash without repeating or losing a row, the people export/import round trip, and build-prefs
output training the DPO stage as it is.
"""

from __future__ import annotations

import json

import numpy as np
import pytest

from alignkit import cli
from alignkit.config import ConfigError, load_config
from alignkit.data import appendlog
from alignkit.scoring.rankers import read_ranked_row, scores_from_ranking
from alignkit.stages import build_prefs, score
from alignkit.stages.build_prefs import BuildPrefsConfig, make_pairs, usable_responses
from alignkit.stages.score import ScoreConfig

# --- pairing rules on hand-made scores ---------------------------------------------------------------------

# index:     0      1    2       3       4      5      6
RESPONSES = ["a", "b", "", "a", "  ", "c", "d"]
SCORES = [2.0, 5.0, 9.0, 7.0, 9.0, 1.0, 5.0]
# 2 and 4 are empty/blank, 3 repeats 0: left out whatever they score. Usable: 0 (2), 1 (5), 5 (1), 6 (5).


def test_usable_responses_counts_empty_and_duplicates():
    assert usable_responses(RESPONSES) == ([0, 1, 5, 6], 2, 1)


def test_best_vs_worst_takes_first_best_and_skips_degenerate():
    """Best is 1 (5; 6 ties with it and comes later), worst 5 (1); the empty 2/4 (score 9) and the
    duplicate 3 (score 7) would have been best, but are not used."""
    out = make_pairs(RESPONSES, SCORES, "best_vs_worst")
    assert out.pairs == [(1, 5)]
    assert (out.n_empty, out.n_duplicate, out.n_unscored, out.n_ties) == (2, 1, 0, 0)


def test_best_vs_worst_all_equal_is_one_tie():
    out = make_pairs(["x", "y", "z"], [3.0, 3.0, 3.0], "best_vs_worst")
    assert out.pairs == [] and out.n_ties == 1


def test_all_pairs_counts_ties():
    """Usable 0 (2), 1 (5), 5 (1), 6 (5): pairs (0,1) (0,5) (0,6) (1,5) (1,6) (5,6); (1,6) tie at 5.
    Chosen is the higher score: (1,0) (0,5) (6,0) (1,5) (6,5)."""
    out = make_pairs(RESPONSES, SCORES, "all_pairs")
    assert out.pairs == [(1, 0), (0, 5), (6, 0), (1, 5), (6, 5)]
    assert out.n_ties == 1 and (out.n_empty, out.n_duplicate) == (2, 1)


def test_best_vs_random_is_seeded_and_counts_a_tie():
    """Best is 1; the rejected is drawn from [0, 5, 6] by the rng: the same seed draws the same one, and
    drawing 6 (also 5) is a tie, counted and left out."""
    draws = {}
    for seed in range(40):
        out = make_pairs(RESPONSES, SCORES, "best_vs_random", np.random.default_rng([7, seed]))
        again = make_pairs(RESPONSES, SCORES, "best_vs_random", np.random.default_rng([7, seed]))
        assert (out.pairs, out.n_ties) == (again.pairs, again.n_ties)
        pick = np.random.default_rng([7, seed]).integers(3)
        expected = [(1, 0), (1, 5), None][pick]
        assert out.pairs == ([expected] if expected else []) and out.n_ties == (expected is None)
        draws[pick] = draws.get(pick, 0) + 1
    assert set(draws) == {0, 1, 2}  # every rejected candidate is drawn for some seed


def test_unscored_responses_are_left_out():
    """NaN (a ranker's "no opinion") and None (left out of a human ranking) never enter a pair."""
    out = make_pairs(["p", "q", "r", "s"], [1.0, float("nan"), None, 0.0], "all_pairs")
    assert out.pairs == [(0, 3)] and out.n_unscored == 2


def test_scores_from_ranking():
    """Best first; [2, [1, 4], 3] has 3 groups scoring 3, 2, 2, 1; response 5 is left out."""
    assert scores_from_ranking([2, [1, 4], 3], 5) == [2.0, 3.0, 1.0, 2.0, None]
    assert scores_from_ranking([], 2) == [None, None]
    for bad, message in [([1, 1], "twice"), ([0], "not a response number"), ([[]], "empty"), ("1", "list")]:
        with pytest.raises(ValueError, match=message):
            scores_from_ranking(bad, 3)


def test_read_ranked_row_names_the_bad_field():
    from alignkit.data.io import BadRowError, Record

    data = {"prompt_row": 3, "prompt": "hi", "responses": [{"number": 1, "text": "a"}], "ranking": [2]}
    with pytest.raises(
        BadRowError, match=r"ranked.jsonl: row 5: field 'ranking': 2 is not a response number"
    ):
        read_ranked_row(Record("ranked.jsonl", 5, data))


# --- fixtures: a tiny reward model and data ----------------------------------------------------------------


@pytest.fixture(scope="module")
def tiny_rm_dir(tiny_model_dir, tmp_path_factory, tiny_tokenizer):
    """An untrained reward model on the tiny model (a random head gives distinct, stable scores)."""
    from alignkit.models.reward import build_reward_model, save_reward_model

    model = build_reward_model(str(tiny_model_dir), tiny_tokenizer.pad_token_id, "float32", device="cpu")
    return save_reward_model(model, tiny_tokenizer, tmp_path_factory.mktemp("rm") / "final", 128, None)


def _write(path, rows):
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path


def _lines(path) -> list[dict]:
    return [json.loads(x) for x in path.read_text().splitlines()]


WORDS = ["the sea", "paris.", "i cannot help.", "0 1 2", "a short poem", "the quick fox", "no.", "sky"]


class Crash(Exception):
    pass


# --- score ---------------------------------------------------------------------------------------------------


def test_score_resumes_after_a_crash_without_repeating_or_losing_rows(tiny_rm_dir, tmp_path, monkeypatch):
    from alignkit.models.reward import RewardModel

    rows = [{"prompt": f"question {i}?", "response": WORDS[i % 8] * (1 + i % 3), "id": i} for i in range(10)]
    data = _write(tmp_path / "rows.jsonl", rows)
    common = [
        f"reward={tiny_rm_dir}",
        f"input={data}",
        "batch_size=3",
        "dtype=float32",
        "progress=false",
    ]

    whole = score.run(load_config(ScoreConfig, None, [*common, f"output={tmp_path / 'whole.jsonl'}"]))
    assert whole["rows_scored"] == 10
    expected = {r["input_row"]: r["reward"] for r in _lines(tmp_path / "whole.jsonl")}

    # Crash on the third batch (two batches = 6 rows written), then a torn half line as a kill mid-write
    # would leave; the rerun drops the torn line and scores the 4 rows left, once each.
    original, calls = RewardModel.score, []

    def crashing(self, *args, **kwargs):
        calls.append(1)
        if len(calls) == 3:
            raise Crash
        return original(self, *args, **kwargs)

    out = tmp_path / "resumed.jsonl"
    monkeypatch.setattr(RewardModel, "score", crashing)
    with pytest.raises(Crash):
        score.run(load_config(ScoreConfig, None, [*common, f"output={out}"]))
    monkeypatch.setattr(RewardModel, "score", original)
    assert [r["input_row"] for r in _lines(out)] == [0, 1, 2, 3, 4, 5]
    with open(out, "a") as f:
        f.write('{"prompt": "question 6?", "resp')

    resumed = score.run(load_config(ScoreConfig, None, [*common, f"output={out}"]))
    assert (resumed["already_scored"], resumed["scored_this_run"], resumed["rows_scored"]) == (6, 4, 10)
    scored = _lines(out)
    assert [r["input_row"] for r in scored] == list(range(10))
    assert [r["id"] for r in scored] == list(range(10))  # the input columns travel with the score
    assert [r["reward"] for r in scored] == pytest.approx([expected[i] for i in range(10)], abs=1e-5)
    assert len(set(expected.values())) == 10  # distinct scores, so a mix-up could not pass unnoticed

    # An output written from other input is refused, not mixed.
    other = _write(tmp_path / "other.jsonl", [{**rows[0], "response": "changed"}])
    with pytest.raises(ConfigError, match="another input"):
        score.run(load_config(ScoreConfig, None, [*common[:1], f"input={other}", f"output={out}"]))


def test_score_pairs_writes_both_rewards(tiny_rm_dir, tmp_path):
    from alignkit.models.reward import load_reward_model

    pairs = [{"prompt": f"q{i}", "chosen": WORDS[i], "rejected": WORDS[i + 1]} for i in range(5)]
    data = _write(tmp_path / "pairs.jsonl", pairs)
    out = tmp_path / "scored.jsonl"
    cfg = [f"reward={tiny_rm_dir}", f"input={data}", f"output={out}", "batch_size=2", "dtype=float32"]
    cfg.append("progress=false")
    summary = score.run(load_config(ScoreConfig, None, cfg))
    rm = load_reward_model(tiny_rm_dir, dtype="float32")
    scored = _lines(out)
    assert [r["chosen_reward"] for r in scored] == pytest.approx(
        rm.score([p["prompt"] for p in pairs], WORDS[:5]), abs=1e-5
    )
    assert [r["rejected_reward"] for r in scored] == pytest.approx(
        rm.score([p["prompt"] for p in pairs], WORDS[1:6]), abs=1e-5
    )
    wins = np.mean([r["chosen_reward"] > r["rejected_reward"] for r in scored])
    assert summary["kind"] == "pairs" and summary["accuracy"] == pytest.approx(wins)


# --- build-prefs -------------------------------------------------------------------------------------------


@pytest.fixture
def prompts_file(tmp_path):
    return _write(tmp_path / "prompts.jsonl", [{"prompt": f"please write about {w}"} for w in WORDS[:5]])


def _bp_args(model_dir, prompts, output, *extra):
    return [
        f"model={model_dir}",
        f"prompts={prompts}",
        f"output={output}",
        "n_samples=3",
        "max_new_tokens=6",
        "prompts_per_batch=2",
        "seed=3",
        "progress=false",
        "dtype=float32",
        *extra,
    ]


def test_build_prefs_resumes_and_its_output_trains_dpo(
    tiny_model_dir, tiny_rm_dir, prompts_file, tmp_path, monkeypatch
):
    common = ("ranker=reward", f"reward={tiny_rm_dir}")
    whole_out = tmp_path / "whole.jsonl"
    whole = build_prefs.run(
        load_config(BuildPrefsConfig, None, _bp_args(tiny_model_dir, prompts_file, whole_out, *common))
    )
    whole_pairs = _lines(whole_out)
    assert whole["prompts_done"] == 5 and whole["pairs"] == len(whole_pairs) >= 4
    # Every response is accounted for: paired, or counted as skipped.
    assert whole["responses"] == 15
    assert whole["pairs"] + whole["prompts_without_pairs"] == 5
    pair = whole_pairs[0]
    assert pair["chosen_score"] > pair["rejected_score"] and pair["chosen"] != pair["rejected"]
    assert pair["ranker"] == f"reward_model:{tiny_rm_dir}" and pair["pairing"] == "best_vs_worst"
    assert pair["sampling"] == {
        "model": str(tiny_model_dir),
        "n_samples": 3,
        "temperature": 1.0,
        "top_p": 1.0,
        "max_new_tokens": 6,
        "max_prompt_length": 512,
        "seed": 3,
        "prompts_per_batch": 2,
    }

    # Crash while writing prompt 3 (the second of batch 1): its pairs reach the output but its progress
    # entry does not. The rerun removes them, redoes only batch 1's prompt 3 and batch 2, and ends with
    # exactly the uninterrupted run's pairs.
    original, calls = appendlog.Writer.add_prompt, []

    def crashing(self, prompt_row, lines, counts):
        calls.append(prompt_row)
        if len(calls) == 4:
            self._append(self.output, lines)
            raise Crash
        return original(self, prompt_row, lines, counts)

    out = tmp_path / "resumed.jsonl"
    args = _bp_args(tiny_model_dir, prompts_file, out, *common)
    monkeypatch.setattr(appendlog.Writer, "add_prompt", crashing)
    with pytest.raises(Crash):
        build_prefs.run(load_config(BuildPrefsConfig, None, args))
    monkeypatch.setattr(appendlog.Writer, "add_prompt", original)
    assert calls == [0, 1, 2, 3]

    resumed = build_prefs.run(load_config(BuildPrefsConfig, None, args))
    assert (resumed["prompts_done"], resumed["prompts_this_run"]) == (5, 2)
    pairs = _lines(out)
    strip = lambda rows: [{k: v for k, v in r.items() if not k.endswith("_score")} for r in rows]  # noqa: E731
    assert strip(pairs) == strip(whole_pairs)
    assert [p["chosen_score"] for p in pairs] == pytest.approx(
        [p["chosen_score"] for p in whole_pairs], abs=1e-5
    )
    assert {k: resumed[k] for k in ("pairs", "skipped_tied_pairs", "skipped_empty_responses")} == {
        k: whole[k] for k in ("pairs", "skipped_tied_pairs", "skipped_empty_responses")
    }

    # Other settings on the same output are refused.
    with pytest.raises(ConfigError, match="other settings.*n_samples"):
        build_prefs.run(load_config(BuildPrefsConfig, None, [*args, "n_samples=4"]))

    # The pairs train with the DPO stage as they are.
    dpo_out = tmp_path / "dpo"
    dpo = [
        "dpo",
        f"model={tiny_model_dir}",
        f"train_data={out}",
        f"output_dir={dpo_out}",
        "batch_size=2",
        "micro_batch_size=2",
        "max_steps=2",
        "progress=false",
        "tensorboard=false",
    ]
    assert cli.main(dpo) == 0
    summary = json.loads((dpo_out / "summary.json").read_text())
    assert summary["steps"] == 2 and summary["train_pairs"] == len(pairs) and summary["skipped_rows"] == 0


def test_human_export_and_import_round_trip(tiny_model_dir, prompts_file, tmp_path):
    export = tmp_path / "to_rank.jsonl"
    args = _bp_args(tiny_model_dir, prompts_file, export, "ranker=export", "prompts_max_rows=3", "n_samples=4")
    summary = build_prefs.run(load_config(BuildPrefsConfig, None, args))
    lines = _lines(export)
    assert summary["prompts_done"] == 3 and summary["pairs"] == 0
    assert [x["prompt_row"] for x in lines] == [0, 1, 2]
    assert all(x["ranking"] == [] and [r["number"] for r in x["responses"]] == [1, 2, 3, 4] for x in lines)
    assert lines[0]["prompt"] == "please write about the sea"

    # People rank: prompt 0 best-first [3, 1, 2, 4]; prompt 1 with a tie [[2, 4], 1] (3 left out);
    # prompt 2 left unranked.
    for line, ranking in zip(lines, [[3, 1, 2, 4], [[2, 4], 1], []]):
        line["ranking"] = ranking
    ranked = _write(tmp_path / "ranked.jsonl", lines)
    texts = [[r["text"] for r in x["responses"]] for x in lines]
    assert all(usable_responses(t)[0] == [0, 1, 2, 3] for t in texts[:2])  # the random samples are usable

    out = tmp_path / "human_pairs.jsonl"
    imported = build_prefs.run(
        load_config(
            BuildPrefsConfig,
            None,
            [
                f"output={out}",
                "ranker=human",
                f"human_rankings={ranked}",
                "pairing=all_pairs",
                "progress=false",
            ],
        )
    )
    pairs = _lines(out)
    got = [(p["prompt_row"], p["chosen_index"], p["rejected_index"]) for p in pairs]
    # 0-based indices from here. Prompt 0 scores [3, 2, 4, 1] (4 groups; response number 3 is best): all 6
    # pairs in (i, j) order, higher first: (0,1) (2,0) (0,3) (2,1) (1,3) (2,3).
    # Prompt 1 scores [1, 2, None, 2] (2 groups; number 3 left out): (1,0) (3,0), and (1,3) a tie.
    assert got == [(0, 0, 1), (0, 2, 0), (0, 0, 3), (0, 2, 1), (0, 1, 3), (0, 2, 3), (1, 1, 0), (1, 3, 0)]
    assert pairs[0]["chosen"] == texts[0][0] and pairs[0]["rejected"] == texts[0][1]
    assert pairs[0]["ranker"] == "human" and pairs[0]["sampling"]["n_samples"] == 4
    assert (imported["pairs"], imported["skipped_tied_pairs"], imported["skipped_unscored_responses"]) == (
        8,
        1,
        5,
    )
    assert imported["prompts_without_pairs"] == 1


def test_build_prefs_saves_a_dataset(tiny_model_dir, tiny_rm_dir, prompts_file, tmp_path):
    from datasets import load_from_disk

    out, ds_dir = tmp_path / "p.jsonl", tmp_path / "ds"
    args = _bp_args(
        tiny_model_dir,
        prompts_file,
        out,
        f"reward={tiny_rm_dir}",
        "pairing=all_pairs",
        f"save_dataset={ds_dir}",
    )
    summary = build_prefs.run(load_config(BuildPrefsConfig, None, args))
    dataset = load_from_disk(str(ds_dir))
    assert len(dataset) == summary["pairs"] == len(_lines(out))
    assert dataset[0]["chosen"] == _lines(out)[0]["chosen"]


def test_an_output_started_before_the_renames_resumes_under_the_new_names(tmp_path):
    """A build-prefs ledger written with max_prompts resumes when the same value now reads prompts_max_rows,
    and a changed value is still refused."""
    import json

    from alignkit.config import renamed_keys
    from alignkit.data.appendlog import progress_path, resume
    from alignkit.stages.build_prefs import BuildPrefsConfig

    output = tmp_path / "prefs.jsonl"
    output.write_text(json.dumps({"prompt_row": 0}) + "\n")
    ledger = [{"settings": {"model": "m", "max_prompts": 3}}, {"prompt_row": 0, "n_lines": 1}]
    progress_path(output).write_text("".join(json.dumps(e) + "\n" for e in ledger))
    settings = {"model": "m", "prompts_max_rows": 3}
    assert list(resume(output, settings, renamed_keys(BuildPrefsConfig))) == [0]
    with pytest.raises(ConfigError, match="prompts_max_rows"):
        resume(output, {"model": "m", "prompts_max_rows": 4}, renamed_keys(BuildPrefsConfig))


def test_an_output_started_with_the_old_reward_names_resumes_beside_a_renamed_key(tmp_path):
    """A ledger from before both renames (max_prompts, and ranker=reward_model with reward_model=<dir>): the
    reward spelling is compared as recorded (as_recorded), the renamed data key under its new name."""
    import json

    from alignkit.config import renamed_keys
    from alignkit.data.appendlog import progress_path, resume
    from alignkit.stages.build_prefs import BuildPrefsConfig, as_recorded

    assert renamed_keys(BuildPrefsConfig)["reward_model"] == "reward"  # the same table renames both
    output = tmp_path / "prefs.jsonl"
    output.write_text(json.dumps({"prompt_row": 0}) + "\n")
    old = {"model": "m", "ranker": "reward_model", "reward_model": "rm/final", "max_prompts": 3}
    ledger = [{"settings": old}, {"prompt_row": 0, "n_lines": 1}]
    progress_path(output).write_text("".join(json.dumps(e) + "\n" for e in ledger))
    settings = as_recorded(output, {"model": "m", "ranker": "reward", "reward": "rm/final", "prompts_max_rows": 3})
    assert list(resume(output, settings, renamed_keys(BuildPrefsConfig))) == [0]


def test_build_prefs_passes_prompt_columns_to_a_reward_function(tiny_model_dir, tmp_path):
    """reward=_grpo_rewards:near_target takes the prompt row's 'target' column, as grpo's reward functions
    do: each pair's scores are -|len(response) - that row's target| (rows with targets 0 and 40 score the same
    responses differently). A row without the column is refused before any model loads, naming it."""
    rows = [{"prompt": f"please write about {w}", "target": t} for w, t in zip(WORDS[:4], [0, 40, 3, 40])]
    prompts = _write(tmp_path / "prompts.jsonl", rows)
    out = tmp_path / "pairs.jsonl"
    reward = ("ranker=reward", "reward=_grpo_rewards:near_target")
    summary = build_prefs.run(load_config(BuildPrefsConfig, None, _bp_args(tiny_model_dir, prompts, out, *reward)))
    pairs = _lines(out)
    assert summary["pairs"] == len(pairs) >= 2
    target = {r["prompt"]: r["target"] for r in rows}
    for pair in pairs:
        for side in ("chosen", "rejected"):
            assert pair[f"{side}_score"] == -abs(len(pair[side]) - target[pair["prompt"]])

    rows[2] = {"prompt": "no target here"}
    missing = _write(tmp_path / "missing.jsonl", rows)
    args = _bp_args(tmp_path / "no-model-loaded", missing, tmp_path / "other.jsonl", *reward)
    with pytest.raises(ConfigError, match="takes column 'target'.*row 2 of prompts"):
        build_prefs.run(load_config(BuildPrefsConfig, None, args))
