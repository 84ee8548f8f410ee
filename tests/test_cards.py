"""Model cards in final/, dataset cards beside generated data, and push_to_hub failing fast offline."""

from __future__ import annotations

import json
import socket

import pytest
from huggingface_hub import DatasetCard, ModelCard

from alignkit.cli import main
from alignkit.reporting import cards

PAIRS = [
    {"prompt": "what is the capital of france?", "chosen": "paris.", "rejected": "i cannot help."},
    {"prompt": "please write a short poem", "chosen": "the sea and the sky.", "rejected": "no."},
] * 2


def _dpo_args(tiny_model_dir, data, out, *extra):
    return [
        "dpo",
        f"model={tiny_model_dir}",
        f"train_data={data}",
        f"eval_data={data}",
        f"output_dir={out}",
        "batch_size=2",
        "max_steps=2",
        "progress=false",
        "tensorboard=false",
        *extra,
    ]


@pytest.fixture
def pair_file(tmp_path):
    path = tmp_path / "pairs.jsonl"
    path.write_text("".join(json.dumps(r) + "\n" for r in PAIRS))
    return path


def test_dpo_final_has_a_model_card_with_summary_figures(tiny_model_dir, pair_file, tmp_path):
    """The card loads with huggingface_hub; its header names the library and the method, its text the base (a
    local dir, which the hub refuses as base_model); that base has no card, so no known license, and the header
    carries the comment asking for it."""
    out = tmp_path / "run"
    assert main(_dpo_args(tiny_model_dir, pair_file, out, "loss=ipo")) == 0
    summary = json.loads((out / "summary.json").read_text())
    text = (out / "final" / "README.md").read_text()
    card = ModelCard.load(out / "final" / "README.md")
    assert card.data.base_model is None  # a local folder: the hub takes only a repo id there
    assert f"(ipo) from `{tiny_model_dir}`" in card.text
    assert card.data.library_name == "alignkit"
    assert set(card.data.tags) == {"alignkit", "ipo"}  # the method, as summary.json names the stage
    assert card.data.license is None and cards.LICENSE_TODO in text.split("---")[1]
    assert f"eval_accuracy: {summary['eval_accuracy']}" in card.text
    assert "## Monitor events" in card.text and "loss: ipo" in card.text  # the config block
    assert "## Evaluation" not in text

    # `alignkit eval` on final/ writes <run>/eval.json and adds its table to the card
    prompts = tmp_path / "prompts.jsonl"
    prompts.write_text('{"prompt": "hello"}\n{"prompt": "what is 2+2?"}\n')
    eval_args = ["eval", f"model={out / 'final'}", "reference=none", f"prompts={prompts}", "max_new_tokens=4"]
    assert main([*eval_args, "progress=false"]) == 0
    policy = json.loads((out / "eval.json").read_text())["policy"]
    text = (out / "final" / "README.md").read_text()
    assert "## Evaluation (`alignkit eval`)\n\n| metric | policy | reference |" in text
    scalar = next(k for k, v in policy.items() if isinstance(v, float))
    assert f"| {scalar} | {policy[scalar]:.4g} | - |" in text


def test_model_card_reads_license_datasets_events_and_eval_table(tmp_path):
    """A base model dir whose card says mit gives license mit; a hub dataset id lands in ``datasets``; a
    monitor event and eval.json's table appear in the body."""
    base = tmp_path / "base"
    base.mkdir()
    (base / "README.md").write_text("---\nlicense: mit\n---\n# base\n")
    config = {"model": str(base), "train_data": "Anthropic/hh-rlhf"}
    summary = {
        "stage": "sft",
        "eval_loss": 1.25,
        "monitor_events": [{"step": 3, "monitor": "kl_spike", "message": "kl 9.1 > 5"}],
    }
    eval_result = {
        "policy": {"reward": {"mean": 0.5, "std": 0.1}, "distinct_2": 0.75},
        "reference_stats": {"reward": {"mean": 0.25, "std": 0.1}, "distinct_2": 0.5},
    }
    text = cards.model_card(config, summary, eval_result)
    card = ModelCard(text)
    assert card.data.license == "mit" and card.data.datasets == ["Anthropic/hh-rlhf"]
    assert cards.LICENSE_TODO not in text
    assert "| reward | 0.5 | 0.25 |" in card.text and "| distinct_2 | 0.75 | 0.5 |" in card.text
    assert '"monitor": "kl_spike"' in card.text and "eval_loss: 1.25" in card.text
    assert cards.base_model_and_license("smollm2-135m-instruct") == (
        "HuggingFaceTB/SmolLM2-135M-Instruct",
        "apache-2.0",
    )


def test_dataset_card_sits_beside_its_output(tmp_path):
    """``a.card.md`` beside ``a.jsonl`` (as ``a.summary.json``): two outputs in one folder keep a card each."""
    for name in ("a.jsonl", "b.jsonl"):
        (tmp_path / name).write_text("{}\n")
        path = cards.write_dataset_card(tmp_path / name, "cai-label", {"prompts": "x.jsonl"}, {"pairs": 3})
        assert path == tmp_path / name.replace(".jsonl", ".card.md")
    card = DatasetCard.load(tmp_path / "a.card.md")
    assert set(card.data.tags) == {"alignkit", "cai-label"}
    assert card.data.configs == [{"config_name": "default", "data_files": "a.jsonl"}]
    assert "pairs: 3" in card.text and "a.jsonl" not in (tmp_path / "b.card.md").read_text()


def _closed_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]  # closed once the with block ends: connections are refused


def test_push_to_hub_fails_fast_when_the_hub_is_unreachable(
    tiny_model_dir, pair_file, tmp_path, monkeypatch, capsys
):
    """HF_ENDPOINT at a closed local port: the run stops before training with one error line, exit 2."""
    monkeypatch.setenv("HF_ENDPOINT", f"http://127.0.0.1:{_closed_port()}")
    monkeypatch.setenv("HF_TOKEN", "hf_fake")
    out = tmp_path / "run"
    code = main(_dpo_args(tiny_model_dir, pair_file, out, "push_to_hub=true", "hub_model_id=me/model"))
    err = capsys.readouterr().err
    assert code == 2
    assert "error: push_to_hub: cannot create or reach 'me/model' at http://127.0.0.1:" in err
    assert not (out / "metrics.jsonl").exists() and not (out / "final").exists()


def test_push_to_hub_needs_a_repo_id(tiny_model_dir, pair_file, tmp_path, capsys):
    assert main(_dpo_args(tiny_model_dir, pair_file, tmp_path / "run", "push_to_hub=true")) == 2
    assert "push_to_hub=true needs hub_model_id" in capsys.readouterr().err
