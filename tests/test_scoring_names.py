"""One name for a reward: the `reward=` field of eval, score and build-prefs, and the alignkit.scoring package.

The old spellings (eval's reward_fn= and reward_model=, score's reward_model=, build-prefs' reward_model= and
ranker=reward_model/judge/checks) and the old import paths (alignkit.rewards, alignkit.rankers,
alignkit.evaluation.classifiers) keep working for one release, each with a warning naming the new spelling;
an old and a new spelling of one setting given together is an error.
"""

from __future__ import annotations

import importlib
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from alignkit.config import ConfigError, load_config
from alignkit.errors import AlignkitDeprecationWarning
from alignkit.scoring import FunctionScorer, load_scorer
from alignkit.scoring import rewards as shipped_rewards
from alignkit.stages import score
from alignkit.stages.build_prefs import BuildPrefsConfig, as_recorded, make_ranker
from alignkit.stages.eval import EvalConfig
from alignkit.stages.score import ScoreConfig

TESTS_DIR = Path(__file__).parent
OLD = "the old spelling works until the next release"


@pytest.fixture
def fresh_warnings(monkeypatch):
    """A config key's deprecation message is printed once per process: start each test with none printed."""
    from alignkit import config

    monkeypatch.setattr(config, "_WARNED_RENAMES", set())


def warning_lines(capsys) -> list[str]:
    """The ``warning: ...`` lines printed on stderr since the last call."""
    return [line for line in capsys.readouterr().err.splitlines() if line.startswith("warning: ")]


@pytest.mark.parametrize(
    "old, new",
    [
        ("alignkit.rewards", "alignkit.scoring.rewards"),
        ("alignkit.rankers", "alignkit.scoring.rankers"),
        ("alignkit.evaluation.classifiers", "alignkit.scoring.classifiers"),
    ],
)
def test_old_import_paths_re_export_the_new_modules_with_a_warning(old, new, monkeypatch):
    monkeypatch.delitem(sys.modules, old, raising=False)  # imported afresh, so its warning is raised here
    with pytest.warns(AlignkitDeprecationWarning, match=f"{old} is deprecated; use {new}"):
        module = importlib.import_module(old)
    moved = importlib.import_module(new)
    assert moved.__all__ and all(getattr(module, name) is getattr(moved, name) for name in moved.__all__)


def test_old_reward_specs_score_as_the_new_ones(monkeypatch):
    monkeypatch.delitem(sys.modules, "alignkit.rewards", raising=False)
    with pytest.warns(AlignkitDeprecationWarning, match="alignkit.rewards is deprecated"):
        old = FunctionScorer("alignkit.rewards:length", "reward")
    new = load_scorer("alignkit.scoring.rewards:length", "reward")
    responses = ["one two three", "x " * 100]
    assert old.score(["p", "p"], responses) == new.score(["p", "p"], responses) == [3 / 50, 100 / 50]
    assert shipped_rewards.length("p", responses[0]) == 3 / 50
    sentiment = load_scorer("alignkit.evaluation.classifiers:sentiment", "reward")
    assert sentiment.score(["p"], ["I love this, it is wonderful!"])[0] > 0.5


@pytest.mark.parametrize(
    "cls, args, expected",
    [
        (EvalConfig, ["model=m", "reward_fn=_scorers:length_score"], {"reward": "_scorers:length_score"}),
        (EvalConfig, ["model=m", "reward_model=runs/rm/final"], {"reward": "runs/rm/final"}),
        (ScoreConfig, ["reward_model=d", "input=i", "output=o.jsonl"], {"reward": "d"}),
        (BuildPrefsConfig, ["output=o.jsonl", "reward_model=d"], {"ranker": "reward", "reward": "d"}),
        (
            BuildPrefsConfig,
            ["output=o.jsonl", "ranker=reward_model", "reward_model=d"],
            {"ranker": "reward", "reward": "d"},
        ),
        (BuildPrefsConfig, ["output=o.jsonl", "ranker=judge"], {"ranker": "reward", "reward": "judge"}),
        (BuildPrefsConfig, ["output=o.jsonl", "ranker=checks"], {"ranker": "reward", "reward": "checks"}),
    ],
)
def test_old_field_names_load_as_reward_with_a_warning(cls, args, expected, capsys, fresh_warnings):
    cfg = load_config(cls, None, args)
    assert {name: getattr(cfg, name) for name in expected} == expected
    messages = warning_lines(capsys)
    assert messages  # at least one
    assert all("(from the command line) is deprecated; write '" in m and OLD in m for m in messages)
    assert any("write 'reward" in m or "write 'ranker=reward'" in m for m in messages)


def test_an_old_key_in_a_yaml_file_names_the_file(tmp_path, capsys, fresh_warnings):
    path = tmp_path / "eval.yaml"
    path.write_text("model: m\nreward_fn: _scorers:length_score\n")
    assert load_config(EvalConfig, path).reward == "_scorers:length_score"
    assert f"'reward_fn' (from {path}) is deprecated" in capsys.readouterr().err


def test_people_rankers_keep_their_names_without_a_warning(capsys, fresh_warnings):
    cfg = load_config(BuildPrefsConfig, None, ["output=o.jsonl", "ranker=export"])
    assert (cfg.ranker, cfg.reward) == ("export", None)
    assert not warning_lines(capsys)


@pytest.mark.parametrize(
    "cls, args, message",
    [
        (
            EvalConfig,
            ["model=m", "reward_fn=a:b", "reward=c:d"],
            "config key 'reward_fn' (from the command line) is the old spelling of 'reward', and 'reward' is "
            "also given; keep only 'reward'",
        ),
        (
            EvalConfig,
            ["model=m", "reward_model=d", "reward_fn=a:b"],
            "config key 'reward_fn' (from the command line) is the old spelling of 'reward', and "
            "'reward_model' is also given; keep only 'reward'",
        ),
        (
            BuildPrefsConfig,
            ["output=o.jsonl", "ranker=judge", "reward=d"],
            "config value 'ranker=judge' (from the command line) is the old spelling of 'reward=judge', and "
            "'reward' is also given; keep only 'reward'",
        ),
    ],
)
def test_old_and_new_spelling_together_is_an_error(cls, args, message):
    with pytest.raises(ConfigError) as err:
        load_config(cls, None, args)
    assert str(err.value) == message


def test_a_build_prefs_output_begun_with_the_old_names_resumes_under_them(tmp_path):
    """A progress file that recorded ranker=reward_model, reward_model=<dir> is compared in that spelling; one
    recorded with reward= (or none yet) keeps the new one."""
    output = tmp_path / "pairs.jsonl"
    new = {"model": "m", "ranker": "reward", "reward": "rm/final", "pairing": "best_vs_worst"}
    assert as_recorded(output, new) == new  # no progress file yet
    old = {"model": "m", "ranker": "reward_model", "reward_model": "rm/final", "pairing": "best_vs_worst"}
    output.with_name("pairs.progress.jsonl").write_text(json.dumps({"settings": old}) + "\n")
    assert as_recorded(output, new) == old
    judge = {**new, "reward": "judge"}
    assert as_recorded(output, judge) == {**old, "ranker": "judge", "reward_model": None}
    export = {**new, "ranker": "export", "reward": None}
    assert as_recorded(output, export) == {**old, "ranker": "export", "reward_model": None}


def test_score_takes_a_reward_function(tmp_path):
    """reward=module:function scores rows and both sides of pairs with the function; lengths, which only a
    reward model reads, are refused with it."""
    rows = tmp_path / "rows.jsonl"
    rows.write_text("".join(json.dumps({"prompt": "q", "response": "a" * n}) + "\n" for n in (3, 1, 4)))
    pairs = tmp_path / "pairs.jsonl"
    pairs.write_text(json.dumps({"prompt": "q", "chosen": "abcd", "rejected": "ab"}) + "\n")
    common = ["reward=_scorers:length_score", "progress=false"]
    score.run(load_config(ScoreConfig, None, [*common, f"input={rows}", f"output={tmp_path / 'r.jsonl'}"]))
    scored = [json.loads(line) for line in (tmp_path / "r.jsonl").read_text().splitlines()]
    assert [r["reward"] for r in scored] == [3.0, 1.0, 4.0]
    score.run(load_config(ScoreConfig, None, [*common, f"input={pairs}", f"output={tmp_path / 'p.jsonl'}"]))
    (pair,) = [json.loads(line) for line in (tmp_path / "p.jsonl").read_text().splitlines()]
    assert (pair["chosen_reward"], pair["rejected_reward"]) == (4.0, 2.0)
    with pytest.raises(ConfigError, match="'max_length' applies to a reward model; reward=_scorers:length"):
        load_config(ScoreConfig, None, [*common, "input=i", "output=o.jsonl", "max_length=64"])


def test_the_cli_shows_the_deprecation_and_runs(tmp_path):
    rows = tmp_path / "rows.jsonl"
    rows.write_text(json.dumps({"prompt": "q", "response": "abc"}) + "\n")
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(TESTS_DIR), os.environ.get("PYTHONPATH", "")])}
    args = ["reward_model=_scorers:length_score", f"input={rows}", f"output={tmp_path / 'o.jsonl'}"]
    done = subprocess.run(
        [sys.executable, "-m", "alignkit", "score", *args, "progress=false"],
        capture_output=True,
        text=True,
        env=env,
        timeout=120,
    )
    assert done.returncode == 0, done.stderr
    assert "config key 'reward_model' (from the command line) is deprecated; write 'reward'" in done.stderr
    assert json.loads((tmp_path / "o.jsonl").read_text())["reward"] == 3.0


def test_build_prefs_ranks_with_a_reward_function_and_needs_a_reward():
    """reward=module:function ranks each prompt's responses by the function (pairs name it); ranker=reward with
    no reward is refused with what to set."""
    cfg = load_config(BuildPrefsConfig, None, ["output=o.jsonl", "reward=_scorers:length_score"])
    ranker = make_ranker(cfg, "cpu")
    assert ranker.name == "function:_scorers:length_score"
    assert ranker.score("q", ["ab", "abcd", ""]) == [2.0, 4.0, 0.0]
    with pytest.raises(ConfigError, match="ranker=reward needs reward=<a reward model dir, module:function"):
        make_ranker(load_config(BuildPrefsConfig, None, ["output=o.jsonl"]), "cpu")
    with pytest.raises(ConfigError, match="neither 'module:function'"):
        make_ranker(load_config(BuildPrefsConfig, None, ["output=o.jsonl", "reward=/no/such/rm"]), "cpu")
