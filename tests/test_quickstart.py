"""The main job end to end on the tiny model: every step runs, the summary and report exist, and rerunning
the same command resumes (finished steps are skipped, nothing is redone)."""

from __future__ import annotations

import json

from alignkit.cli import main


def test_quickstart_tiny_end_to_end_and_resume(tiny_model_dir, tmp_path, capsys):
    out = tmp_path / "qs"
    args = [
        "quickstart",
        f"model={tiny_model_dir}",
        f"output_dir={out}",
        "n_samples=3",
        "max_new_tokens=8",
        "dpo_epochs=1",
        "eval_samples=2",
        "progress=false",
    ]
    assert main(args) == 0
    printed = capsys.readouterr()
    assert "win rate vs reference" in printed.out and "measured by" in printed.out
    assert "check: warmth" in printed.out and "label words removed" in printed.out
    summary = json.loads((out / "summary.json").read_text())
    assert summary["pairs"] == json.loads((out / "pairs.summary.json").read_text())["pairs"]
    assert (out / "dpo" / "report.html").is_file() and (out / "dpo" / "eval.json").is_file()
    n_eval = len(json.loads((out / "dpo" / "eval.json").read_text())["samples"])
    assert n_eval == 32 * 2  # every fourth of the 128 built-in prompts is held out, 2 samples each
    assert set(summary["timings_s"]) == {"sample + label", "dpo", "eval"}
    pairs = (out / "pairs.jsonl").read_text()

    # Rerun: the sampled pairs are kept as they are, DPO and eval are not run again.
    assert main(args) == 0
    again = json.loads((out / "summary.json").read_text())
    assert set(again["timings_s"]) == {"sample + label"}  # build-prefs resumes: every prompt already done
    assert (out / "pairs.jsonl").read_text() == pairs
    assert again["independent_scores"] == summary["independent_scores"]


def test_sentiment_without_label_words_scores_only_uncounted_words():
    """'glad' and 'wonderful' are counted by the warmth/politeness checks and removed before VADER scores the
    text; 'superb' is on no check's list (VADER scores it positive), so it still counts."""
    from alignkit.pipelines.quickstart import sentiment_without_label_words
    from alignkit.scoring.classifiers import sentiment

    counted = "I am glad, this is wonderful."
    assert sentiment("", counted) > 0.5
    assert sentiment_without_label_words("", counted) == 0.0
    assert sentiment_without_label_words("", "I am glad, this is superb.") == sentiment("", "I am , this is superb.")
    assert sentiment_without_label_words("", "This is superb.") > 0.5
