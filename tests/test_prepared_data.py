"""data/prepared.py: preference pairs validated and tokenized once into memory-mapped Arrow files, then reused.

The invariant: the cached path gives exactly the ids of the in-memory path (``load_preferences`` +
``encode_pair``), the same skipped rows and the same errors; a change to the data, the tokenizer or a setting
makes a new cache, and a hit never reads the source."""

from __future__ import annotations

import copy
import json
import os

import pytest

from alignkit.data import schemas
from alignkit.data.prepared import RowSettings, fingerprint, prepare_rows
from alignkit.data.schemas import BadRowError, DataSourceError, load_preferences
from alignkit.data.tokenize import encode_pair

from conftest import HH_RLHF

ROWS = [
    {"prompt": "what is the capital of france?", "chosen": "the capital of france is paris.", "rejected": "no."},
    {"prompt": [{"role": "user", "content": "write a poem"}], "chosen": "the sea and the sky", "rejected": "no"},
    {"prompt": "the quick brown fox", "chosen": "jumps over the lazy dog", "rejected": "sleeps"},
]


def _write(path, rows) -> str:
    path.write_text("".join(json.dumps(r) + "\n" for r in rows), encoding="utf-8")
    return str(path)


def _in_memory(source: str, tokenizer, settings: RowSettings):
    """The path the dpo stage took before the cache: the loader, then encode_pair one pair at a time."""
    loaded = load_preferences(
        source, settings.on_bad_row, split=settings.split, rows=settings.rows, limit=settings.limit
    )
    pairs = [
        encode_pair(tokenizer, p.prompt, p.chosen, p.rejected, settings.max_length, settings.max_prompt_length)
        for p in loaded.examples
    ]
    return loaded, pairs


def test_the_cache_is_written_once_then_read_without_the_source(tmp_path, tiny_tokenizer, monkeypatch, capsys):
    source = _write(tmp_path / "pairs.jsonl", ROWS)
    settings = RowSettings(max_length=64)
    first = prepare_rows(source, tiny_tokenizer, settings, tmp_path / "cache")
    assert "tokenized 3 rows (pairs)" in capsys.readouterr().err
    [folder] = (tmp_path / "cache").iterdir()  # one complete folder, no leftover temporary one
    assert (folder / "meta.json").is_file()
    expected = _in_memory(source, tiny_tokenizer, settings)[1]

    def no_reading(*args, **kwargs):
        raise AssertionError("the source was read on a cache hit")

    monkeypatch.setattr(schemas, "read_rows", no_reading)
    second = prepare_rows(source, tiny_tokenizer, settings, tmp_path / "cache")
    assert "tokens from the cache" in capsys.readouterr().err
    assert list(second.examples) == list(first.examples) == expected
    assert (second.n_rows, second.summary()) == (3, "3 rows, 3 used, 0 skipped")


def test_a_changed_file_tokenizer_or_setting_makes_a_new_cache(tmp_path, tiny_tokenizer):
    source = _write(tmp_path / "pairs.jsonl", ROWS)
    settings = RowSettings(max_length=64)
    key = fingerprint(source, tiny_tokenizer, settings)
    # The same inputs give the same key, also after the tokenizer was called with padding and truncation.
    tiny_tokenizer(["a", "a b"], padding=True, truncation=True, max_length=4)
    assert fingerprint(source, copy.deepcopy(tiny_tokenizer), settings) == key

    no_template = copy.deepcopy(tiny_tokenizer)
    no_template.chat_template = None
    more_tokens = copy.deepcopy(tiny_tokenizer)
    more_tokens.add_tokens(["paris"])
    changed = {
        "chat template": fingerprint(source, no_template, settings),
        "vocabulary": fingerprint(source, more_tokens, settings),
        "max_length": fingerprint(source, tiny_tokenizer, RowSettings(max_length=32)),
        "max_prompt_length": fingerprint(source, tiny_tokenizer, RowSettings(64, max_prompt_length=8)),
        "columns": fingerprint(source, tiny_tokenizer, RowSettings(64, columns={"prompt": "question"})),
        "rows": fingerprint(source, tiny_tokenizer, RowSettings(64, rows=(0, 2))),
    }
    assert len(set(changed.values()) | {key}) == len(changed) + 1, changed

    before = prepare_rows(source, tiny_tokenizer, settings, tmp_path / "cache")
    _write(tmp_path / "pairs.jsonl", ROWS[:2])  # the file changes (size, mtime): its tokens are rebuilt
    os.utime(source, ns=(1, 1))
    assert fingerprint(source, tiny_tokenizer, settings) != key
    after = prepare_rows(source, tiny_tokenizer, settings, tmp_path / "cache")
    assert (len(before.examples), len(after.examples)) == (3, 2)
    assert len(list((tmp_path / "cache").iterdir())) == 2


@pytest.mark.parametrize("chat_template", [True, False])
def test_tokens_equal_the_in_memory_path_on_real_rows(tmp_path, tiny_tokenizer, chat_template):
    """HH-RLHF rows 80-120 (row 86 has an empty chosen reply: skipped), limits that cut some prompts and
    replies are cut; with the chat template and without (the BOS rule of tokenize._prompt_ids_batch)."""
    tokenizer = copy.deepcopy(tiny_tokenizer)
    if not chat_template:
        tokenizer.chat_template = None
    settings = RowSettings(max_length=384, max_prompt_length=256, on_bad_row="skip", rows=(80, 120))
    prepared = prepare_rows(str(HH_RLHF), tokenizer, settings, tmp_path / "cache")
    loaded, pairs = _in_memory(str(HH_RLHF), tokenizer, settings)
    assert len(pairs) == 39 and 0 < sum(p.truncated for p in pairs) < 39  # some cut, some not
    assert list(prepared.examples) == pairs
    assert [prepared.examples[i] for i in (0, 17, 38)] == [pairs[i] for i in (0, 17, 38)]
    assert prepared.examples.n_truncated() == sum(p.truncated for p in pairs)
    assert prepared.examples.lengths() == [
        len(p.prompt_ids) + max(len(p.chosen_ids), len(p.rejected_ids)) for p in pairs
    ]
    assert prepared.summary() == loaded.summary()
    assert [bad.row for bad in prepared.skipped] == [86]


def test_two_processes_give_the_tokens_of_one(tmp_path, tiny_tokenizer):
    settings = RowSettings(max_length=96, on_bad_row="skip", rows=(0, 200))
    one = prepare_rows(str(HH_RLHF), tiny_tokenizer, settings, tmp_path / "one", num_proc=1)
    two = prepare_rows(str(HH_RLHF), tiny_tokenizer, settings, tmp_path / "two", num_proc=2)
    assert len(two.examples.table.cache_files) == 2  # really two workers' shards
    assert list(two.examples) == list(one.examples)
    assert len(one.examples) == 200 - 1  # row 86


def test_bad_rows_give_the_loaders_errors_and_cache_nothing(tmp_path, tiny_tokenizer):
    rows = [ROWS[0], {"prompt": "hi", "chosen": "  ", "rejected": "no"}, ROWS[2]]
    source = _write(tmp_path / "bad.jsonl", rows)
    with pytest.raises(BadRowError) as expected:
        load_preferences(source)
    with pytest.raises(BadRowError) as got:
        prepare_rows(source, tiny_tokenizer, RowSettings(max_length=64), tmp_path / "cache")
    assert str(got.value) == str(expected.value)
    assert str(got.value) == f"{source}: row 1: field 'chosen': empty completion (blank or whitespace only)"
    assert not (tmp_path / "cache").exists() or list((tmp_path / "cache").iterdir()) == []

    skip = RowSettings(max_length=64, on_bad_row="skip")
    for _ in range(2):  # built, then from the cache: the skipped row is still reported
        prepared = prepare_rows(source, tiny_tokenizer, skip, tmp_path / "cache")
        assert prepared.summary() == load_preferences(source, "skip").summary()
        assert prepared.summary().startswith("3 rows, 2 used, 1 skipped (row 1: field 'chosen'")

    empty = _write(tmp_path / "empty.jsonl", rows[1:2])
    with pytest.raises(DataSourceError, match=r"train_data .*empty.jsonl: no usable rows \(1 read, 1 skipped"):
        prepare_rows(empty, tiny_tokenizer, skip, tmp_path / "cache")
