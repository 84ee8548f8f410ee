"""Every dataset format TRL documents, read as written, with a row in each shape; and ``columns`` mapping
other column names onto alignkit's, from the config to the loaders to a stage."""

from __future__ import annotations

import json

import pytest

from alignkit.cli import main
from alignkit.config import ConfigError, load_config
from alignkit.data.io import BadRowError
from alignkit.data.schemas import NO_PROMPT, load_preferences, load_prompts, load_sft, load_unpaired
from alignkit.data.tokenize import encode

USER = [{"role": "user", "content": "What color is the sky?"}]
BLUE = [{"role": "assistant", "content": "It is blue."}]
GREEN = [{"role": "assistant", "content": "It is green."}]


def _write(tmp_path, rows, name="d.jsonl"):
    path = tmp_path / name
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return str(path)


def test_trl_language_modeling_and_prompt_completion_rows_for_sft(tmp_path):
    """Standard LM ({"text"}), conversational LM ({"messages"}), prompt-completion in both styles."""
    rows = [
        {"text": "The sky is blue."},
        {"messages": USER + BLUE},
        {"prompt": "The sky is", "completion": " blue."},
        {"prompt": USER, "completion": BLUE},
    ]
    got = [(e.prompt, e.completion) for e in load_sft(_write(tmp_path, rows)).examples]
    assert got == [
        (NO_PROMPT, "The sky is blue."),
        (USER, "It is blue."),
        ("The sky is", " blue."),
        (USER, "It is blue."),
    ]


def test_a_text_row_trains_on_all_its_tokens(tiny_tokenizer):
    """A language-modeling row has no prompt: its ids are BOS (where the tokenizer has one), then the text and
    EOS, all of them completion (trained on)."""
    enc = encode(tiny_tokenizer, NO_PROMPT, "the sky is blue.", max_length=64)
    bos = tiny_tokenizer.bos_token_id
    assert enc.prompt_ids == ([bos] if bos is not None else [])
    text_ids = tiny_tokenizer("the sky is blue.", add_special_tokens=False)["input_ids"]
    assert enc.completion_ids == [*text_ids, tiny_tokenizer.eos_token_id]


def test_trl_preference_rows_explicit_and_implicit_prompt(tmp_path):
    """Standard and conversational, with the prompt given or implicit. The standard implicit row is split as
    TRL's extract_prompt splits it: at the first differing character, the space before it going with the
    replies."""
    rows = [
        {"prompt": "The sky is", "chosen": " blue.", "rejected": " green."},
        {"chosen": "The sky is blue.", "rejected": "The sky is green."},
        {"prompt": USER, "chosen": BLUE, "rejected": GREEN},
        {"chosen": USER + BLUE, "rejected": USER + GREEN},
    ]
    got = [(p.prompt, p.chosen, p.rejected) for p in load_preferences(_write(tmp_path, rows)).examples]
    assert got == [
        ("The sky is", " blue.", " green."),
        ("The sky is", " blue.", " green."),
        (USER, "It is blue.", "It is green."),
        (USER, "It is blue.", "It is green."),
    ]


def test_trl_unpaired_preference_and_prompt_only_rows(tmp_path):
    unpaired = [
        {"prompt": "The sky is", "completion": " blue.", "label": True},
        {"prompt": USER, "completion": GREEN, "label": False},
    ]
    got = [(e.prompt, e.completion, e.label) for e in load_unpaired(_write(tmp_path, unpaired)).examples]
    assert got == [("The sky is", " blue.", True), (USER, "It is green.", False)]
    prompts = [{"prompt": "The sky is"}, {"prompt": USER}]
    assert [e.prompt for e in load_prompts(_write(tmp_path, prompts, "p.jsonl")).examples] == [
        "The sky is",
        USER,
    ]


def test_columns_map_other_names_and_a_missing_one_names_the_mapping(tmp_path):
    rows = [{"question": "q?", "good": "yes.", "bad": "no.", "prompt": "ignored"}]
    columns = {"prompt": "question", "chosen": "good", "rejected": "bad"}
    (pair,) = load_preferences(_write(tmp_path, rows), columns=columns).examples
    assert (pair.prompt, pair.chosen, pair.rejected) == ("q?", "yes.", "no.")
    with pytest.raises(BadRowError) as err:
        load_preferences(_write(tmp_path, [{"question": "q?", "good": "a", "worse": "b"}]), columns=columns)
    assert str(err.value).endswith(
        "row 0: field 'bad': missing: columns.rejected=bad reads 'rejected' from it, but the row has "
        "['good', 'question', 'worse']"
    )


def test_columns_from_yaml_and_command_line_merge(tmp_path):
    """``columns`` in YAML, ``columns.rejected=...`` on the command line: one mapping with both; an unknown
    alignkit column is a config error with the near match."""
    from alignkit.stages.dpo import DPOConfig

    path = tmp_path / "c.yaml"
    path.write_text("train_data: d.jsonl\ncolumns: {prompt: question, chosen: good}\n")
    cfg = load_config(DPOConfig, path, ["columns.rejected=bad", "columns.chosen=best"])
    assert cfg.columns == {"prompt": "question", "chosen": "best", "rejected": "bad"}
    with pytest.raises(ConfigError, match="columns.promt: alignkit reads no column 'promt'; did you mean"):
        load_config(DPOConfig, None, ["train_data=d.jsonl", "columns.promt=question"])


def test_dpo_runs_on_mapped_columns_and_says_which_is_missing(tiny_model_dir, tmp_path, capsys):
    rows = [
        {"question": "what is 2+2?", "good": "4.", "bad": "5."},
        {"question": "hi", "good": "hello.", "bad": "no"},
    ]
    data = _write(tmp_path, rows * 2)
    args = [
        "dpo",
        f"model={tiny_model_dir}",
        f"train_data={data}",
        "batch_size=2",
        "max_steps=1",
        "progress=false",
        "tensorboard=false",
        "columns.prompt=question",
        "columns.chosen=good",
    ]
    assert main([*args, f"output_dir={tmp_path / 'a'}", "columns.rejected=bad"]) == 0
    assert json.loads((tmp_path / "a" / "summary.json").read_text())["steps"] == 1
    assert main([*args, f"output_dir={tmp_path / 'b'}", "columns.rejected=worse"]) == 2
    err = capsys.readouterr().err
    assert "field 'worse': missing: columns.rejected=worse reads 'rejected' from it" in err


def test_sft_trains_on_text_rows(tiny_model_dir, tmp_path):
    """TRL's LM rows end to end (which tokens train: test_a_text_row_trains_on_all_its_tokens)."""
    data = _write(tmp_path, [{"text": "the sky is blue."}, {"text": "grass is green."}] * 2)
    out = tmp_path / "run"
    args = ["sft", f"model={tiny_model_dir}", f"train_data={data}", f"output_dir={out}", "batch_size=2"]
    assert main([*args, "max_steps=1", "progress=false", "tensorboard=false"]) == 0
    summary = json.loads((out / "summary.json").read_text())
    assert summary["train_examples"] == 4 and summary["truncated_rows"] == 0
