"""Constitutional AI end to end on a tiny model: the constitution file, cai-revise (critique -> revision) feeding
`alignkit sft`, its resume after a crash, and cai-label (RLAIF) feeding `alignkit dpo`, with conflicts and the
agreement with human labels counted by a judge whose answers we control."""

from __future__ import annotations

import json
import re

import numpy as np
import pytest
import torch
from huggingface_hub import DatasetCard

from alignkit import cli
from alignkit.cai import judge as judge_mod
from alignkit.cai.constitution import load_constitution
from alignkit.config import ConfigError, load_config
from alignkit.stages import cai_revise

PROMPTS = ["what is the capital of france?", "please write a short poem about the sea"]


@pytest.fixture
def stages(monkeypatch):
    """Register the two CAI stages for these tests (the CLI registry is the lead's file)."""
    monkeypatch.setitem(cli.STAGES, "cai-revise", ("alignkit.stages.cai_revise", "critique -> revision"))
    monkeypatch.setitem(cli.STAGES, "cai-label", ("alignkit.stages.cai_label", "RLAIF labels"))


def _lines(path) -> list[dict]:
    return [json.loads(line) for line in path.read_text().splitlines()]


# ---------------------------------------------------------------------------------------------
# The constitution
# ---------------------------------------------------------------------------------------------


def test_default_constitution_loads_with_priorities():
    c = load_constitution()
    assert len(c.principles) == 11 and c.name == "alignkit-default"
    by_id = {p.id: p for p in c.principles}
    assert by_id["avoid_harm"].priority == 10 and by_id["helpfulness"].priority == 5
    assert by_id["concision"].checkable.startswith("length")
    assert all(p.comparison.endswith("?") for p in c.principles)
    assert c.select(["helpfulness", "avoid_harm"]).ids() == ["avoid_harm", "helpfulness"]


def test_constitution_sampling_is_seeded_and_distinct():
    c = load_constitution()
    a = [p.id for p in c.sample(3, np.random.default_rng([0, 7]))]
    b = [p.id for p in c.sample(3, np.random.default_rng([0, 7]))]
    assert a == b and len(set(a)) == 3
    assert len(c.sample(50, np.random.default_rng(0))) == 11


def test_constitution_errors_name_the_principle_and_field(tmp_path):
    bad = tmp_path / "c.yaml"
    bad.write_text("principles:\n  - {id: x, priority: 1, critique_request: a, revision_request: b}\n")
    with pytest.raises(ConfigError, match=r"principle 1 \('x'\): field 'comparison'"):
        load_constitution(bad)
    bad.write_text(
        "principles:\n"
        + "  - {id: x, priority: 1, critique_request: a, revision_request: b, comparison: c}\n" * 2
    )
    with pytest.raises(ConfigError, match="id 'x' appears twice"):
        load_constitution(bad)
    with pytest.raises(ConfigError, match=r"\['nope'\] not in the constitution"):
        load_constitution().select(["nope"])


# ---------------------------------------------------------------------------------------------
# cai-revise
# ---------------------------------------------------------------------------------------------


def _revise_args(tiny_model_dir, prompts, out, *extra):
    return [
        "cai-revise",
        f"prompts={prompts}",
        f"output={out}",
        f"model={tiny_model_dir}",
        "max_new_tokens=8",
        "temperature=1.0",
        "prompts_per_batch=1",
        "progress=false",
        # The tiny random model's 8-token replies are all cut mid-sentence: these tests are about the
        # mechanics, so only the always-on 'empty' gate runs (test_cai_gates.py tests the gates).
        "gates=[]",
        *extra,
    ]


@pytest.fixture
def prompt_file(tmp_path):
    path = tmp_path / "prompts.jsonl"
    path.write_text("".join(json.dumps({"prompt": p}) + "\n" for p in PROMPTS))
    return path


def test_cai_revise_writes_sft_data_with_critiques_and_sft_trains_on_it(
    stages, tiny_model_dir, prompt_file, tmp_path
):
    out = tmp_path / "revised.jsonl"
    assert cli.main(_revise_args(tiny_model_dir, prompt_file, out)) == 0
    rows = _lines(out)
    summary = json.loads(out.with_suffix(".summary.json").read_text())
    assert "cai-revise" in DatasetCard.load(out.with_suffix(".card.md")).data.tags  # the dataset card beside it
    assert [r["prompt"] for r in rows] == PROMPTS and [r["prompt_row"] for r in rows] == [0, 1]
    ids = load_constitution().ids()
    for r in rows:
        (rev,) = r["revisions"]  # one round
        assert rev["round"] == 1 and rev["principle"] in ids
        assert (
            rev["critique_request"]
            == {p.id: p for p in load_constitution().principles}[rev["principle"]].critique_request
        )
        assert isinstance(rev["critique"], str) and isinstance(r["initial_response"], str)
        # the target is the revision, or the initial answer when the revision came out empty
        assert r["completion"] == (rev["revision"] if rev["revision"].strip() else r["initial_response"])
        assert r["completion"].strip()
    assert summary["examples_written"] == 2 and summary["prompts_done"] == 2
    assert sum(summary["principle_uses"].values()) == 2

    run_dir = tmp_path / "sft"
    args = [
        "sft",
        f"model={tiny_model_dir}",
        f"train_data={out}",
        f"output_dir={run_dir}",
        "batch_size=2",
        "micro_batch_size=2",
        "max_steps=1",
        "progress=false",
        "tensorboard=false",
    ]
    assert cli.main(args) == 0
    sft_summary = json.loads((run_dir / "summary.json").read_text())
    assert sft_summary["steps"] == 1 and sft_summary["train_examples"] == 2


def test_cai_revise_resumes_after_a_crash_without_losing_or_repeating(
    stages, tiny_model_dir, prompt_file, tmp_path, monkeypatch
):
    """One batch per prompt, three generations per prompt (answer, critique, revision). The crash comes at the
    4th generation (the second prompt's answer): the first prompt is kept, and the restart generates only
    the second prompt (3 calls). The result equals an uninterrupted run line for line."""
    whole = tmp_path / "whole.jsonl"
    assert cli.main(_revise_args(tiny_model_dir, prompt_file, whole)) == 0

    real_load_sampler = cai_revise.load_sampler
    calls = []

    def crashing_sampler(*args, **kwargs):
        sample = real_load_sampler(*args, **kwargs)

        def crashing(prompt_ids, sampling):
            calls.append(1)
            if len(calls) == 4:
                raise RuntimeError("simulated crash")
            return sample(prompt_ids, sampling)

        return crashing

    out = tmp_path / "resumed.jsonl"
    monkeypatch.setattr(cai_revise, "load_sampler", crashing_sampler)
    with pytest.raises(RuntimeError, match="simulated crash"):
        cli.main(_revise_args(tiny_model_dir, prompt_file, out))
    assert [r["prompt_row"] for r in _lines(out)] == [0]

    calls.clear()
    assert cli.main(_revise_args(tiny_model_dir, prompt_file, out)) == 0
    assert len(calls) == 3  # only the second prompt was generated again
    assert out.read_text() == whole.read_text()
    summary = json.loads(out.with_suffix(".summary.json").read_text())
    assert summary["prompts_done"] == 2 and summary["prompts_this_run"] == 1

    # different settings on the same output are refused rather than mixed
    with pytest.raises(ConfigError, match="other settings"):
        cai_revise.run(
            load_config(
                cai_revise.CAIReviseConfig,
                None,
                _revise_args(tiny_model_dir, prompt_file, out, "n_rounds=2")[1:],
            )
        )


# ---------------------------------------------------------------------------------------------
# cai-label
# ---------------------------------------------------------------------------------------------

PAIRS = [
    {"prompt": "what is the capital of france?", "response_a": "paris.", "response_b": "i cannot help."},
    {"prompt": "please write a short poem", "response_a": "no.", "response_b": "the sea and the sky."},
    {"prompt": "the quick brown fox", "response_a": "jumps over the lazy dog.", "response_b": "0 1 2 3"},
    {"prompt": "i need help", "response_a": "here is a helpful answer.", "response_b": "i am sorry."},
]


def _label_args(tiny_model_dir, data, out, *extra):
    return [
        "cai-label",
        f"input={data}",
        f"output={out}",
        f"judge_model={tiny_model_dir}",
        "progress=false",
        *extra,
    ]


def test_cai_label_writes_pairs_that_dpo_trains_on(stages, tiny_model_dir, tmp_path):
    data = tmp_path / "pairs.jsonl"
    data.write_text("".join(json.dumps(r) + "\n" for r in PAIRS))
    out = tmp_path / "labelled.jsonl"
    assert cli.main(_label_args(tiny_model_dir, data, out, "batch_size=3", "pairs_per_chunk=3")) == 0
    rows = _lines(out)
    summary = json.loads(out.with_suffix(".summary.json").read_text())
    assert summary["pairs_judged"] == 4 and summary["pairs_written"] + summary["ties"] == 4
    assert len(rows) == summary["pairs_written"] >= 3
    for r in rows:
        source = PAIRS[r["prompt_row"]]
        assert {r["chosen"], r["rejected"]} == {source["response_a"], source["response_b"]}
        assert r["chosen"] == source[r["chosen_input_column"]]
        assert 0.5 < r["p_chosen"] <= 1.0
        assert len(r["principles"]) == 2  # principles_per_comparison=2, each with its own probability
        for pr in r["principles"]:
            assert pr["p"] == pytest.approx((pr["p_order1"] + pr["p_order2"]) / 2)
        if not r["conflict"]:
            assert r["p_chosen"] == pytest.approx(np.mean([pr["p"] for pr in r["principles"]]))
    assert summary["conflicts"] == sum(
        json.loads(x)["conflict"] for x in out.with_suffix(".progress.jsonl").read_text().splitlines()[1:]
    )
    assert 0 < summary["mean_option_mass"] < 1

    # a second run of the same settings finds everything done
    assert cli.main(_label_args(tiny_model_dir, data, out, "batch_size=3", "pairs_per_chunk=3")) == 0
    again = json.loads(out.with_suffix(".summary.json").read_text())
    assert again["pairs_this_run"] == 0 and _lines(out) == rows

    run_dir = tmp_path / "dpo"
    args = [
        "dpo",
        f"model={tiny_model_dir}",
        f"train_data={out}",
        f"output_dir={run_dir}",
        "batch_size=2",
        "micro_batch_size=2",
        "max_steps=1",
        "progress=false",
        "tensorboard=false",
    ]
    assert cli.main(args) == 0
    assert json.loads((run_dir / "summary.json").read_text())["steps"] == 1


CONSTITUTION = """\
name: two-principles
conflict_rule: the higher priority decides
principles:
  - id: harmless
    priority: 10
    critique_request: Is it harmful?
    revision_request: Make it harmless.
    comparison: Which response is safer?
  - id: helpful
    priority: 1
    critique_request: Is it helpful?
    revision_request: Make it helpful.
    comparison: Which response is more useful?
"""

_REPLIES = re.compile(r"Reply \(A\):\n(.*?)\n\nReply \(B\):\n(.*?)\n\n", re.S)


def test_cai_label_conflicts_and_human_agreement(
    stages, tiny_model_dir, tmp_path, monkeypatch, tiny_tokenizer
):
    """A controlled judge: asked "safer?" it puts 0.9 on the reply saying "sorry" (0.05 on the other); asked
    "useful?" it does so for the reply saying "paris". Rows 0-1 (human chose "paris.", rejected "i am sorry.")
    set the principles against each other: 2 conflicts, the priority-10 "harmless" decides, the judge picks
    "i am sorry." with p = 0.9 / 0.95 = 18/19, and disagrees with the human label. Rows 2-3 (chosen says
    both words) agree under both principles: p = 18/19, human label kept. Agreement (0 + 0 + 1 + 1) / 4."""

    def scorer(model, ids_batch, option_ids):
        out = []
        for ids in ids_batch:
            text = tiny_tokenizer.decode(ids)
            a, b = _REPLIES.search(text).groups()
            word = "sorry" if "safer" in text else "paris"
            out.append(
                [0.9, 0.05]
                if word in a and word not in b
                else [0.05, 0.9]
                if word in b and word not in a
                else [0.45, 0.45]
            )
        return torch.log(torch.tensor(out))

    monkeypatch.setattr(judge_mod, "option_logprobs", scorer)
    constitution = tmp_path / "c.yaml"
    constitution.write_text(CONSTITUTION)
    data = tmp_path / "human.jsonl"
    rows = [{"prompt": "what is the capital of france?", "chosen": "paris.", "rejected": "i am sorry."}] * 2
    rows += [{"prompt": "what is the capital?", "chosen": "i am sorry, it is paris.", "rejected": "no."}] * 2
    data.write_text("".join(json.dumps(r) + "\n" for r in rows))
    out = tmp_path / "labelled.jsonl"
    args = _label_args(tiny_model_dir, data, out, f"constitution={constitution}", "human_agreement=true")
    assert cli.main(args) == 0
    summary = json.loads(out.with_suffix(".summary.json").read_text())
    lines = _lines(out)
    assert summary["conflicts"] == 2 and summary["conflict_rate"] == pytest.approx(0.5)
    assert [r["conflict"] for r in lines] == [True, True, False, False]
    assert [r["chosen"] for r in lines] == [
        "i am sorry.",
        "i am sorry.",
        rows[2]["chosen"],
        rows[3]["chosen"],
    ]
    assert [r["decided_by"] for r in lines[:2]] == [["harmless"], ["harmless"]]
    assert all(r["p_chosen"] == pytest.approx(18 / 19) for r in lines)
    assert {pr["id"]: pr["p"] for pr in lines[0]["principles"]} == pytest.approx(
        {"harmless": 18 / 19, "helpful": 1 / 19}
    )
    assert [r["human_agrees"] for r in lines] == [False, False, True, True]
    assert summary["human_agreement"] == pytest.approx(0.5) and summary["human_agreement_n"] == 4
    low, high = summary["human_agreement_ci95"]
    assert 0.0 <= low < 0.5 < high <= 1.0
    # the controlled judge has no position bias, and both orders always agree
    assert summary["mean_p_first_option"] == pytest.approx(0.5) and summary["orders_agree_rate"] == 1.0


def test_cai_label_refuses_human_agreement_without_human_labels(stages, tiny_model_dir, tmp_path):
    data = tmp_path / "pairs.jsonl"
    data.write_text("".join(json.dumps(r) + "\n" for r in PAIRS))
    args = _label_args(tiny_model_dir, data, tmp_path / "o.jsonl", "human_agreement=true")
    assert cli.main(args) == cli.EXIT_USAGE
