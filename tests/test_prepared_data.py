"""data/prepared.py: preference pairs (dpo, rm with its margins) and unpaired KTO rows validated and tokenized
once into memory-mapped Arrow files, then reused.

The invariant: the cached path gives exactly the ids of the in-memory path (``load_preferences`` +
``encode_pair``; ``load_unpaired`` or split pairs + ``encode_unpaired``), the same skipped rows and the same
errors; a change to the data, the tokenizer or a setting makes a new cache, and a hit never reads the source."""

from __future__ import annotations

import copy
import dataclasses
import json
import os

import pytest

from alignkit.data import schemas
from alignkit.data.collate import pair_length
from alignkit.data.length_balance import length_balanced_indices
from alignkit.data.prepared import RowSettings, fingerprint, prepare_rows
from alignkit.data.schemas import (
    BadRowError,
    DataSourceError,
    load_preferences,
    load_sft,
    load_unpaired,
    pairs_to_unpaired,
)
from alignkit.data.tokenize import encode, encode_pair, encode_unpaired
from alignkit.stages.kto import KTOExamples
from alignkit.stages.rm import RMConfig, RMExamples, balance_lengths, split_validation

from conftest import HH_RLHF

ROWS = [
    {"prompt": "what is the capital of france?", "chosen": "the capital of france is paris.", "rejected": "no."},
    {"prompt": [{"role": "user", "content": "write a poem"}], "chosen": "the sea and the sky", "rejected": "no"},
    {"prompt": "the quick brown fox", "chosen": "jumps over the lazy dog", "rejected": "sleeps"},
]

needs_hh = pytest.mark.skipif(not HH_RLHF.is_file(), reason="HH-RLHF data (../shared/data) not present")


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


@needs_hh
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


@needs_hh
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


# ---------------------------------------------------------------------------------------------
# KTO's unpaired rows (and pairs split in two) and rm's pairs with margins, through the same cache
# ---------------------------------------------------------------------------------------------


def _no_reading(*args, **kwargs):
    raise AssertionError("the source was read on a cache hit")


def _unpaired_in_memory(source: str, tokenizer, settings: RowSettings, pairs: bool):
    """The path the kto stage took before the cache: the loader (pairs split in two), then encode_unpaired."""
    load = load_preferences if pairs else load_unpaired
    loaded = load(source, settings.on_bad_row, rows=settings.rows)
    examples = pairs_to_unpaired(loaded.examples) if pairs else loaded.examples
    args = (settings.max_length, settings.max_prompt_length)
    return loaded, [encode_unpaired(tokenizer, u.prompt, u.completion, u.label, *args) for u in examples]


@needs_hh
@pytest.mark.parametrize("kind", ["pairs_as_unpaired", "unpaired"])
def test_kto_rows_equal_the_in_memory_path_on_real_rows_and_are_reused(
    tmp_path, tiny_tokenizer, monkeypatch, kind
):
    """HH-RLHF rows 80-120 as KTO reads them: pairs split into a desirable and an undesirable row, or written
    out as prompt/completion/label rows; "auto_unpaired" tells the two apart and, on a hit, reads nothing."""
    source = str(HH_RLHF)
    settings = RowSettings(
        max_length=384, max_prompt_length=256, on_bad_row="skip", rows=(80, 120), kind=kind
    )
    if kind == "unpaired":
        halves = pairs_to_unpaired(load_preferences(source, "skip", rows=(80, 120)).examples)
        source = _write(
            tmp_path / "unpaired.jsonl", [{k: v for k, v in vars(u).items() if k != "ref"} for u in halves]
        )
        settings = RowSettings(max_length=384, max_prompt_length=256, kind=kind)
    loaded, expected = _unpaired_in_memory(source, tiny_tokenizer, settings, kind == "pairs_as_unpaired")
    assert len(expected) == {"pairs_as_unpaired": 78, "unpaired": 78}[kind]
    assert 0 < sum(e.truncated for e in expected) < len(expected)
    prepared = prepare_rows(source, tiny_tokenizer, settings, tmp_path / "cache")
    assert prepared.examples.kind == kind
    assert list(prepared.examples) == expected
    assert prepared.examples[5] == expected[5] and prepared.examples[6].label is True
    assert prepared.summary() == loaded.summary()  # rows used, not examples: "40 rows, 39 used, 1 skipped"
    assert prepared.examples.lengths() == [len(e.prompt_ids) + len(e.completion_ids) for e in expected]

    auto = dataclasses.replace(settings, kind="auto_unpaired")
    assert prepare_rows(source, tiny_tokenizer, auto, tmp_path / "cache").examples.kind == kind
    monkeypatch.setattr(schemas, "read_rows", _no_reading)  # the detection too reads nothing on a hit
    again = prepare_rows(source, tiny_tokenizer, auto, tmp_path / "cache")
    assert again.examples.kind == kind and list(again.examples) == expected


@needs_hh
def test_kto_examples_read_lazily_equal_those_of_a_list(tmp_path, tiny_tokenizer):
    """The KL sequences, pair numbers and batch widths of KTOExamples over the cache equal those over the
    in-memory list (whose KL sequences tests/test_stage_kto.py checks by hand)."""
    settings = RowSettings(max_length=96, on_bad_row="skip", rows=(80, 100), kind="pairs_as_unpaired")
    rows = prepare_rows(str(HH_RLHF), tiny_tokenizer, settings, tmp_path / "cache").examples
    _, expected = _unpaired_in_memory(str(HH_RLHF), tiny_tokenizer, settings, pairs=True)
    lazy, listed = KTOExamples(rows, True, 96, seed=3), KTOExamples(expected, True, 96, seed=3)
    assert list(lazy) == list(listed) and lazy[7] == listed[7]
    assert [ex.pair for ex in lazy][:4] == [0, 0, 1, 1]
    widths = [
        max(
            len(e.encoded.prompt_ids) + len(e.encoded.completion_ids),
            len(e.kl.prompt_ids) + len(e.kl.completion_ids),
        )
        for e in listed
    ]
    assert lazy.lengths() == widths and max(widths) == 96  # some rows fill max_length


def test_kto_bad_rows_give_the_loaders_errors(tmp_path, tiny_tokenizer):
    rows = [
        {"prompt": "hi", "completion": "hello", "label": True},
        {"prompt": "hi", "completion": "bye", "label": "maybe"},
        {"prompt": "yo", "completion": "hey", "label": 0},
    ]
    source = _write(tmp_path / "bad.jsonl", rows)
    with pytest.raises(BadRowError) as expected:
        load_unpaired(source)
    with pytest.raises(BadRowError) as got:
        prepare_rows(source, tiny_tokenizer, RowSettings(max_length=64, kind="unpaired"), tmp_path / "cache")
    assert str(got.value) == str(expected.value) and "row 1: field 'label'" in str(got.value)
    skip = RowSettings(max_length=64, on_bad_row="skip", kind="auto_unpaired")
    prepared = prepare_rows(source, tiny_tokenizer, skip, tmp_path / "cache")
    assert prepared.summary() == load_unpaired(source, "skip").summary()
    assert [e.label for e in prepared.examples] == [True, False]

    neither = _write(tmp_path / "neither.jsonl", [{"text": "hi"}])
    with pytest.raises(
        DataSourceError, match=r"data_format=auto: .*neither.jsonl row 0 has neither a 'label'"
    ):
        prepare_rows(neither, tiny_tokenizer, skip, tmp_path / "cache")


def test_rm_margins_are_cached_with_the_pairs_and_bad_margins_are_bad_rows(
    tmp_path, tiny_tokenizer, monkeypatch
):
    rows = [{**r, "strength": m} for r, m in zip(ROWS, [0.5, 2, 0])]
    source = _write(tmp_path / "margins.jsonl", rows)
    settings = RowSettings(max_length=64, margin_column="strength")
    prepared = prepare_rows(source, tiny_tokenizer, settings, tmp_path / "cache")
    monkeypatch.setattr(schemas, "read_rows", _no_reading)
    again = RMExamples(prepare_rows(source, tiny_tokenizer, settings, tmp_path / "cache").examples)
    monkeypatch.undo()
    assert [ex.margin for ex in again] == [0.5, 2.0, 0.0] and again[1].margin == 2.0
    assert (
        [ex.encoded for ex in again]
        == list(prepared.examples)
        == _in_memory(source, tiny_tokenizer, settings)[1]
    )
    plain = prepare_rows(source, tiny_tokenizer, RowSettings(64), tmp_path / "cache")  # no margin_column: 0
    assert [ex.margin for ex in RMExamples(plain.examples)] == [0.0] * 3

    bad = _write(tmp_path / "bad.jsonl", [rows[0], {**rows[1], "strength": -1}, {**rows[2], "strength": "x"}])
    message = "bad.jsonl: row 1: field 'strength': margin must be a finite number >= 0, got -1"
    with pytest.raises(BadRowError, match=f"^.*{message}$"):
        prepare_rows(bad, tiny_tokenizer, settings, tmp_path / "cache")
    skipped = prepare_rows(
        bad, tiny_tokenizer, dataclasses.replace(settings, on_bad_row="skip"), tmp_path / "cache"
    )
    # The rows without a usable margin are not counted as used (the in-memory path said "3 rows, 3 used").
    assert skipped.summary().startswith("3 rows, 1 used, 2 skipped (row 1: field 'strength': margin must be")
    assert [ex.margin for ex in RMExamples(skipped.examples)] == [0.5]


@needs_hh
def test_rm_validation_and_length_balance_select_the_pairs_of_the_in_memory_lists(tmp_path, tiny_tokenizer):
    """split_validation and balance_lengths as views of the cache give the pairs that slicing and indexing the
    in-memory list gave (HH-RLHF rows 0-200)."""
    settings = RowSettings(max_length=128, on_bad_row="skip", rows=(0, 200))
    examples = RMExamples(prepare_rows(str(HH_RLHF), tiny_tokenizer, settings, tmp_path / "cache").examples)
    listed = _in_memory(str(HH_RLHF), tiny_tokenizer, settings)[1]
    cfg = RMConfig(train_data="x", early_stopping_pairs=30, eval_every=5, length_balance=True, seed=2)
    train, validation = split_validation(cfg, examples)
    assert [ex.encoded for ex in validation] == listed[-30:] and len(train) == len(listed) - 30
    kept = length_balanced_indices(
        [len(p.chosen_ids) for p in listed[:-30]], [len(p.rejected_ids) for p in listed[:-30]], seed=2
    )
    balanced = balance_lengths(cfg, train)
    assert 0 < len(kept) < len(train)
    assert [ex.encoded for ex in balanced] == [listed[i] for i in kept] and balanced[3].encoded == listed[
        kept[3]
    ]
    assert balanced.encoded.n_truncated() == sum(listed[i].truncated for i in kept)
    assert balanced.encoded.lengths() == [pair_length(listed[i]) for i in kept]
    assert len({examples.encoded.fingerprint, train.encoded.fingerprint, balanced.encoded.fingerprint}) == 3


@needs_hh
def test_sft_rows_equal_the_in_memory_path_are_reused_and_bad_rows_are_the_loaders(
    tmp_path, tiny_tokenizer, monkeypatch
):
    """Demonstrations from HH-RLHF rows 80-120 (the conversation before the chosen reply, then that reply), and
    a language-modeling row ({"text": ...}: no prompt, BOS then the text), as the sft stage read them before
    the cache: load_sft, then encode one row at a time."""
    pairs = load_preferences(str(HH_RLHF), "skip", rows=(80, 120)).examples
    rows = [{"prompt": p.prompt, "completion": p.chosen} for p in pairs] + [{"text": "the quick brown fox"}]
    source = _write(tmp_path / "sft.jsonl", rows)
    settings = RowSettings(max_length=200, max_prompt_length=128, kind="sft")
    expected = [
        encode(tiny_tokenizer, ex.prompt, ex.completion, 200, 128) for ex in load_sft(source).examples
    ]
    assert len(expected) == 40 and 0 < sum(e.truncated for e in expected) < 40
    prepared = prepare_rows(source, tiny_tokenizer, settings, tmp_path / "cache")
    assert list(prepared.examples) == expected and prepared.examples[39] == expected[39]
    assert prepared.examples.n_truncated() == sum(e.truncated for e in expected)
    monkeypatch.setattr(schemas, "read_rows", _no_reading)
    again = prepare_rows(source, tiny_tokenizer, settings, tmp_path / "cache")
    assert list(again.examples) == expected and again.summary() == "40 rows, 40 used, 0 skipped"
    monkeypatch.undo()

    bad = _write(tmp_path / "bad.jsonl", [rows[0], {"prompt": "hi"}])
    with pytest.raises(BadRowError) as want:
        load_sft(bad)
    with pytest.raises(BadRowError) as got:
        prepare_rows(bad, tiny_tokenizer, settings, tmp_path / "cache")
    assert str(got.value) == str(want.value) and "row 1" in str(got.value)
