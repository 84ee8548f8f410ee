"""The quality gates of cai-revise (alignkit.cai.gates), each on hand-worked text, and a tiny-model
cai-revise run whose summary counts them."""

from __future__ import annotations

import json

import pytest

from alignkit import cli
from alignkit.cai import gates as g

REQUEST = "Rewrite the reply to respect the user's privacy, consent, and vision."


def test_echo_overlap_counts_the_revisions_3grams_found_in_the_request():
    """"rewrite the reply to respect the user's privacy" has 8 words -> 6 trigrams, all in REQUEST: 1.0.
    "sure rewrite the reply now": trigrams (sure rewrite the) (rewrite the reply) (the reply now): 1 of 3."""
    assert g.echo_overlap("Rewrite the reply to respect the user's privacy", [REQUEST]) == 1.0
    assert g.echo_overlap("Sure: rewrite the reply now", [REQUEST]) == pytest.approx(1 / 3)
    assert g.echo_overlap("Paris is the capital of France.", [REQUEST]) == 0.0
    # shorter than 3 words: compared word by word ("the reply" -> the 2-gram (the, reply) is in REQUEST)
    assert g.echo_overlap("the reply", [REQUEST]) == 1.0
    # the echoed request also shares no content word with the question or answer: off the topic too
    assert g.gate_revision("q", "Paris.", REQUEST, True, [REQUEST]) == ["echo", "off_topic"]
    assert g.gate_revision("respect the user's privacy", "Paris.", REQUEST, True, [REQUEST]) == ["echo"]


def test_unchanged_ignores_case_spacing_and_punctuation_only():
    assert g.is_unchanged("Paris is the capital.", "paris  is the capital")
    assert not g.is_unchanged("Paris is the capital.", "Paris is the capital of France.")
    answer = "Paris is the capital of France."
    assert g.gate_revision("what is the capital of france?", answer, answer, True, [REQUEST]) == ["unchanged"]


def test_empty_revision_fails_only_the_empty_gate():
    assert g.gate_revision("q", "an answer.", "  \n", False, [REQUEST]) == ["empty"]


def test_truncated_needs_the_token_cap_and_no_sentence_end():
    assert g.is_truncated("Paris is the capital of", finished=False)
    assert not g.is_truncated("Paris is the capital of", finished=True)  # the model chose to stop there
    assert not g.is_truncated("Paris is the capital.", finished=False)
    assert not g.is_truncated('He said "stop!"  ', finished=False)


def test_loops_finds_a_block_repeated_back_to_back():
    """"i am sorry" x3 = a 3-word block repeated 3 times, 9 words: a loop. "no no no" repeats a 1-word block
    3 times but covers 3 < 6 words: emphasis, not a loop."""
    assert g.longest_repeat("a b a b a b c".split()) == (3, 2)
    assert g.longest_repeat("a b c d".split()) == (1, 0)
    assert g.loops("I am sorry. I am sorry. I am sorry.")
    assert not g.loops("No no no, that is not safe.")
    assert not g.loops("I am sorry, but I am not able to help with that.")


def test_off_topic_is_the_share_of_content_words_seen_in_prompt_or_answer():
    """Revision content words (stopwords out): bananas, yellow, fruit, grow, tropical -> none in the prompt
    or answer about France: 0/5 < 0.15, gated. "capital france paris city" -> 3 of 4 seen (capital, france,
    paris): 0.75, kept."""
    prompt, answer = "what is the capital of france?", "It is Paris."
    off = "Bananas are yellow fruit that grow in tropical places."
    assert g.topic_overlap("Bananas yellow fruit grow tropical", [prompt, answer]) == 0.0
    assert g.gate_revision(prompt, answer, off, True, [REQUEST]) == ["off_topic"]
    assert g.topic_overlap("The capital of France is Paris, a city.", [prompt, answer]) == pytest.approx(0.75)
    # fewer than 5 content words: too short to judge
    assert g.gate_revision(prompt, answer, "Bananas are yellow.", True, [REQUEST]) == []


def test_gate_settings_select_gates_and_a_clean_revision_passes():
    prompt, answer = "what is the capital of france?", "Paris"
    good = "The capital of France is Paris."
    assert g.gate_revision(prompt, answer, good, True, [REQUEST]) == []
    only_loops = g.GateSettings(enabled=("loops",))
    assert g.gate_revision(prompt, answer, REQUEST, True, [REQUEST], only_loops) == []
    assert g.gate_answer("", True) == ["empty"] and g.gate_answer("Paris is", False) == ["truncated"]


# ---------------------------------------------------------------------------------------------
# cai-revise on the tiny model: the gates in the summary
# ---------------------------------------------------------------------------------------------

PROMPTS = ["what is the capital of france?", "please write a short poem about the sea", "hi there"]


@pytest.fixture
def stages(monkeypatch):
    monkeypatch.setitem(cli.STAGES, "cai-revise", ("alignkit.stages.cai_revise", "critique -> revision"))


def _run(tiny_model_dir, tmp_path, *extra):
    prompts = tmp_path / "prompts.jsonl"
    prompts.write_text("".join(json.dumps({"prompt": p}) + "\n" for p in PROMPTS))
    out = tmp_path / "revised.jsonl"
    args = [
        "cai-revise",
        f"prompts={prompts}",
        f"output={out}",
        f"model={tiny_model_dir}",
        "max_new_tokens=6",
        "temperature=1.0",
        "progress=false",
        "overwrite=true",
        *extra,
    ]
    assert cli.main(args) == 0
    lines = [json.loads(x) for x in out.read_text().splitlines()] if out.exists() else []
    return lines, json.loads(out.with_suffix(".summary.json").read_text())


def test_cai_revise_counts_gates_and_never_writes_a_gated_revision(stages, tiny_model_dir, tmp_path):
    """The tiny random model stops at the 6-token cap mid-sentence: every revision is gated 'truncated',
    counted in the summary with examples; no gated revision becomes a target."""
    lines, summary = _run(tiny_model_dir, tmp_path)
    assert summary["gates"]["truncated"]["count"] >= 1
    assert summary["revisions_gated"] == sum(len([h for h in r["revisions"] if h["gates"]]) for r in lines) + (
        summary["targets"]["none"]  # dropped prompts' gated revisions are in the ledger, not the output
    )
    for name, one in summary["gates"].items():
        assert 1 <= len(one["examples"]) <= min(3, one["count"]), name
    assert sum(summary["targets"].values()) == 3 == summary["prompts_done"]
    for r in lines:
        (rev,) = r["revisions"]
        if rev["gates"]:
            assert r["target"] == "initial" and r["completion"] == r["initial_response"]
        else:
            assert r["target"] == "revision" and r["completion"] == rev["revision"]
    assert summary["examples_written"] == len(lines) == 3 - summary["targets"]["none"]

    # on_gated=drop: only prompts whose revision passed are written
    lines, summary = _run(tiny_model_dir, tmp_path, "on_gated=drop")
    assert all(r["target"] == "revision" for r in lines)
    assert summary["targets"]["initial"] == 0
    assert len(lines) == summary["targets"]["revision"]

    # gates=[]: no gate but 'empty' (always refused) fires, every non-empty revision is the target
    lines, summary = _run(tiny_model_dir, tmp_path, "gates=[]")
    assert set(summary["gates"]) <= {"empty"}
    assert all(r["completion"] == r["revisions"][0]["revision"] for r in lines if r["revisions"][0]["revision"])


def keep_none(prompt: str, response: str) -> float:
    """A scorer that rates every response equally: no revision is better than its initial answer."""
    return 0.0


def test_keep_if_better_gates_a_revision_the_scorer_does_not_prefer(stages, tiny_model_dir, tmp_path):
    lines, summary = _run(tiny_model_dir, tmp_path, "gates=[]", f"keep_if_better={__name__}:keep_none")
    n_passed = 3 - summary["gates"].get("empty", {"count": 0})["count"]
    assert summary["gates"]["not_better"]["count"] == n_passed >= 1
    assert summary["targets"]["revision"] == 0
    assert all(r["target"] == "initial" for r in lines)


def test_unknown_gate_is_a_config_error(stages, tiny_model_dir, tmp_path, capsys):
    prompts = tmp_path / "p.jsonl"
    prompts.write_text('{"prompt": "hi"}\n')
    code = cli.main(
        ["cai-revise", f"prompts={prompts}", f"output={tmp_path / 'o.jsonl'}", "gates=[echo,nope]"]
    )
    assert code == 2 and "['nope'] are not gates" in capsys.readouterr().err


def test_cai_revise_with_a_separate_local_critic(stages, tiny_model_dir, tmp_path, capsys):
    """critic_model= a local directory: the critic is loaded apart from the policy and named on each line."""
    lines, summary = _run(tiny_model_dir, tmp_path, f"critic_model={tiny_model_dir}", "gates=[]")
    assert lines and all(r["critic_model"] == str(tiny_model_dir) for r in lines)
    assert summary["prompts_done"] == 3
    code = cli.main(
        ["cai-revise", f"prompts={tmp_path / 'prompts.jsonl'}", f"output={tmp_path / 'o.jsonl'}",
         "critic_base_url=http://127.0.0.1:9/v1"]
    )
    assert code == 2 and "critic_base_url needs critic_model" in capsys.readouterr().err
