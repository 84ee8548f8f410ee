"""Reading rows from every supported source, and validating them into typed examples (alignkit.data.io,
alignkit.data.schemas). Small files are written to tmp_path; HH-RLHF is read from the shared data dir."""

from __future__ import annotations

import gzip
import json
import re

import pytest

from alignkit.data.io import DataSourceError, Record, read_records, read_rows
from alignkit.data.schemas import (
    BadRow,
    BadRowError,
    PreferencePair,
    RowRef,
    SFTExample,
    UnpairedExample,
    load_preferences,
    load_prompts,
    load_sft,
    load_unpaired,
    pairs_to_unpaired,
)

from conftest import HH_RLHF

ROWS = [{"prompt": "a", "completion": "b"}, {"prompt": "c", "completion": "d"}]


def write_jsonl(path, rows) -> str:
    path.write_text("".join(json.dumps(row) + "\n" for row in rows), encoding="utf-8")
    return str(path)


def write_lines(path, lines: list[bytes]) -> str:
    path.write_bytes(b"\n".join(lines) + b"\n")
    return str(path)


# ---------------------------------------------------------------------------------------------
# io: formats
# ---------------------------------------------------------------------------------------------


def test_jsonl_rows_are_physical_line_indexes(tmp_path):
    """Line 2 (row 1) is empty: it is skipped, and the next object keeps its own line's number, row 2."""
    src = write_lines(tmp_path / "d.jsonl", [b'{"x": 1}', b"   ", b'{"x": 2}'])
    assert list(read_records(src)) == [Record(src, 0, {"x": 1}), Record(src, 2, {"x": 2})]


def test_jsonl_gz_reads_like_jsonl(tmp_path):
    src = str(tmp_path / "d.jsonl.gz")
    with gzip.open(src, "wt", encoding="utf-8") as f:
        f.write('{"x": 1}\n{"x": "é"}\n')
    assert [(r.row, r.data) for r in read_records(src)] == [(0, {"x": 1}), (1, {"x": "é"})]


def test_broken_lines_name_file_row_and_line(tmp_path):
    """Rows 1, 2, 3 are: bytes that are not UTF-8, a JSON syntax error, and a JSON list (not an object)."""
    src = write_lines(
        tmp_path / "d.jsonl", [b'{"x": 1}', b'{"x": "\xff"}', b'{"x": 1,}', b"[1, 2]", b'{"x": 5}']
    )
    with pytest.raises(BadRowError) as err:
        list(read_records(src))
    assert (err.value.source, err.value.row, err.value.field) == (src, 1, None)
    assert str(err.value).startswith(f"{src}: row 1: line 2 is not valid UTF-8")

    items = list(read_rows(src))
    assert [type(item) for item in items] == [Record, BadRow, BadRow, BadRow, Record]
    assert items[2].problem.startswith("line 3 is not valid JSON")
    assert items[3].problem == "line 4 is not a JSON object (got list)"
    assert items[4].row == 4


def test_json_list_dict_and_json_lines(tmp_path):
    as_list = tmp_path / "list.json"
    as_list.write_text(json.dumps(ROWS + [[1]]))
    items = list(read_rows(str(as_list)))
    assert [item.data for item in items[:2]] == ROWS
    assert items[2] == BadRow(str(as_list), 2, None, "item 2 of the JSON list is not an object (got list)")

    wrapped = tmp_path / "wrapped.json"
    wrapped.write_text(json.dumps({"version": 1, "data": ROWS}))
    assert [r.data for r in read_records(str(wrapped))] == ROWS

    two_lists = tmp_path / "two.json"
    two_lists.write_text(json.dumps({"train": ROWS, "test": ROWS}))
    with pytest.raises(
        DataSourceError, match=r"exactly one list of rows; found 2 lists \(keys: \['test', 'train'\]\)"
    ):
        list(read_records(str(two_lists)))

    # JSON Lines saved as .json (common on the hub) is read as JSON Lines.
    lines = write_jsonl(tmp_path / "lines.json", ROWS)
    assert [r.data for r in read_records(lines)] == ROWS


def test_parquet_and_csv(tmp_path):
    import pandas as pd
    import pyarrow as pa
    import pyarrow.parquet as pq

    rows = [{"prompt": [{"role": "user", "content": "hi"}], "n": 7}, {"prompt": [], "n": 8}]
    pq.write_table(pa.Table.from_pylist(rows), tmp_path / "d.parquet")
    assert [(r.row, r.data) for r in read_records(str(tmp_path / "d.parquet"))] == list(enumerate(rows))

    # CSV cells stay the strings in the file: "007" is not turned into 7, an empty cell is "" (not NaN).
    pd.DataFrame({"prompt": ["007", ""], "label": ["1", "false"]}).to_csv(tmp_path / "d.csv", index=False)
    assert [r.data for r in read_records(str(tmp_path / "d.csv"))] == [
        {"prompt": "007", "label": "1"},
        {"prompt": "", "label": "false"},
    ]


def test_saved_datasets_and_splits(tmp_path):
    import datasets

    datasets.Dataset.from_list(ROWS).save_to_disk(str(tmp_path / "ds"))
    assert [r.data for r in read_records(str(tmp_path / "ds"))] == ROWS
    with pytest.raises(DataSourceError, match="has no splits"):
        list(read_records(str(tmp_path / "ds"), split="train"))

    both = datasets.DatasetDict(
        {"train": datasets.Dataset.from_list(ROWS), "test": datasets.Dataset.from_list(ROWS[:1])}
    )
    both.save_to_disk(str(tmp_path / "dd"))
    assert [r.data for r in read_records(str(tmp_path / "dd"), split="test")] == ROWS[:1]
    with pytest.raises(DataSourceError, match=r"holds several splits \['train', 'test'\]; choose one"):
        list(read_records(str(tmp_path / "dd")))
    with pytest.raises(DataSourceError, match=r"no split 'dev'; available splits: \['train', 'test'\]"):
        list(read_records(str(tmp_path / "dd"), split="dev"))

    datasets.DatasetDict({"train": datasets.Dataset.from_list(ROWS)}).save_to_disk(str(tmp_path / "one"))
    assert len(list(read_records(str(tmp_path / "one")))) == 2  # a single split needs no name

    (tmp_path / "plain").mkdir()
    with pytest.raises(DataSourceError, match="not one written by datasets.save_to_disk"):
        list(read_records(str(tmp_path / "plain")))


def test_missing_file_and_unreachable_hub_id(tmp_path, monkeypatch):
    missing = str(tmp_path / "nope.jsonl")
    with pytest.raises(FileNotFoundError, match=f"data file not found: {missing}"):
        list(read_records(missing))

    # A hub id goes to datasets.load_dataset for real; offline it must fail fast and say what was tried.
    import datasets
    import huggingface_hub.constants

    monkeypatch.setattr(datasets.config, "HF_HUB_OFFLINE", True)
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_OFFLINE", True)
    with pytest.raises(DataSourceError) as err:
        list(read_records("no-such-org/no-such-dataset"))
    message = str(err.value)
    assert message.startswith(
        "could not load 'no-such-org/no-such-dataset': it is neither an existing file nor"
    )
    assert "hub dataset (split='train') failed" in message


# ---------------------------------------------------------------------------------------------
# schemas: SFT
# ---------------------------------------------------------------------------------------------

HI = [{"role": "user", "content": "hi"}]


def test_sft_accepted_forms(tmp_path):
    src = write_jsonl(
        tmp_path / "sft.jsonl",
        [
            {"prompt": "hi", "completion": "yo"},
            {"messages": [*HI, {"role": "assistant", "content": "yo"}]},
            {"prompt": HI, "completion": "yo"},
            {"prompt": HI, "completion": [{"role": "assistant", "content": "yo"}]},
            {"prompt": "hi", "completion": "yo", "system": "be brief"},
        ],
    )
    loaded = load_sft(src)
    assert loaded.examples == [
        SFTExample("hi", "yo", RowRef(src, 0)),
        SFTExample(HI, "yo", RowRef(src, 1)),
        SFTExample(HI, "yo", RowRef(src, 2)),
        SFTExample(HI, "yo", RowRef(src, 3)),
        SFTExample([{"role": "system", "content": "be brief"}, *HI], "yo", RowRef(src, 4)),
    ]
    assert loaded.summary() == "5 rows, 5 used, 0 skipped"


def test_sft_bad_rows_name_the_field(tmp_path):
    rows = [
        {"prompt": "hi"},  # 0
        {"prompt": "hi", "completion": 3},  # 1
        {"prompt": "hi", "completion": "  \n"},  # 2
        {"messages": [*HI, {"role": "user", "content": "again"}]},  # 3
        {"messages": [{"role": "assistant", "content": "x"}, {"role": "assistant", "content": "y"}]},  # 4
        {"messages": [{"role": "robot", "content": "x"}]},  # 5
        {"question": "hi"},  # 6 (a "text" row is TRL's language-modeling format, read)
        {"prompt": "ok", "completion": "fine"},  # 7
    ]
    src = write_jsonl(tmp_path / "sft.jsonl", rows)
    loaded = load_sft(src, on_bad_row="skip")
    assert [(b.row, b.field, b.problem) for b in loaded.skipped] == [
        (0, "completion", "missing (the row has ['prompt'])"),
        (1, "completion", "expected a string or a list of chat messages, got int"),
        (2, "completion", "empty completion (blank or whitespace only)"),
        (3, "messages", "the last message must be the assistant's reply (the completion)"),
        (4, "messages", "the prompt must end with a user turn, but ends with 'assistant'"),
        (5, "messages", "message 0 has role 'robot'; expected one of ('system', 'user', 'assistant')"),
        (
            6,
            "prompt",
            "missing: expected 'prompt' + 'completion', 'messages' or 'text'; the row has ['question']",
        ),
    ]
    assert loaded.examples == [SFTExample("ok", "fine", RowRef(src, 7))]

    with pytest.raises(BadRowError) as err:
        load_sft(src)
    assert str(err.value) == f"{src}: row 0: field 'completion': missing (the row has ['prompt'])"


def test_skip_lists_unparseable_lines_and_reads_on(tmp_path):
    """Row 1 is broken JSON; with "skip" it is reported and rows 2.. still load."""
    src = write_lines(
        tmp_path / "d.jsonl",
        [b'{"prompt": "a", "completion": "b"}', b"{oops", b'{"prompt": "c", "completion": "d"}'],
    )
    loaded = load_sft(src, on_bad_row="skip")
    assert [e.ref.row for e in loaded.examples] == [0, 2]
    assert loaded.summary() == (
        "3 rows, 2 used, 1 skipped (row 1: line 2 is not valid JSON "
        "(Expecting property name enclosed in double quotes at column 2))"
    )
    with pytest.raises(ValueError, match="on_bad_row must be 'error' or 'skip'"):
        load_sft(src, on_bad_row="ignore")


def test_rows_and_limit_select_file_rows(tmp_path):
    src = write_jsonl(tmp_path / "d.jsonl", [{"prompt": f"p{i}", "completion": "c"} for i in range(10)])
    assert [e.prompt for e in load_sft(src, limit=3).examples] == ["p0", "p1", "p2"]
    assert [e.prompt for e in load_sft(src, rows=(7, 10)).examples] == ["p7", "p8", "p9"]
    # limit applies within the range: the first 2 rows of [4, 9)
    loaded = load_sft(src, rows=(4, 9), limit=2)
    assert [e.prompt for e in loaded.examples] == ["p4", "p5"]
    assert loaded.n_rows == 2


# ---------------------------------------------------------------------------------------------
# schemas: preferences
# ---------------------------------------------------------------------------------------------


HH_CONVERSATION = "\n\nHuman: hi\n\nAssistant: hello\n\nHuman: how are you?"


def test_preference_forms(tmp_path):
    yo, no = [{"role": "assistant", "content": "yo"}], [{"role": "assistant", "content": "no"}]
    src = write_jsonl(
        tmp_path / "p.jsonl",
        [
            {"prompt": "hi", "chosen": "yo", "rejected": "no"},
            {"prompt": HI, "chosen": yo, "rejected": no},  # TRL conversational, explicit prompt
            {"chosen": HI + yo, "rejected": HI + no},  # TRL conversational, implicit prompt
            {"prompt": "hi", "chosen": HI + yo, "rejected": no},  # text prompt agrees with the conversation
            # HH-RLHF transcripts: cut at the last shared "\n\nAssistant:"
            {
                "chosen": HH_CONVERSATION + "\n\nAssistant:  fine, thanks ",
                "rejected": HH_CONVERSATION + "\n\nAssistant: go away",
            },
        ],
    )
    hh_prompt = [*HI, {"role": "assistant", "content": "hello"}, {"role": "user", "content": "how are you?"}]
    assert load_preferences(src).examples == [
        PreferencePair("hi", "yo", "no", RowRef(src, 0)),
        PreferencePair(HI, "yo", "no", RowRef(src, 1)),
        PreferencePair(HI, "yo", "no", RowRef(src, 2)),
        PreferencePair("hi", "yo", "no", RowRef(src, 3)),
        PreferencePair(hh_prompt, "fine, thanks", "go away", RowRef(src, 4)),
    ]


def test_preference_bad_rows(tmp_path):
    other = [{"role": "user", "content": "hey"}, {"role": "assistant", "content": "no"}]
    rows = [
        {"prompt": "hi", "chosen": "same", "rejected": "same"},  # 0
        {"chosen": HI + [{"role": "assistant", "content": "yo"}], "rejected": other},  # 1
        {"chosen": "\n\nHuman: a\n\nAssistant: b", "rejected": "\n\nHuman: c\n\nAssistant: d"},  # 2
        {"chosen": "yes, it is.", "rejected": "no, it is not."},  # 3: no shared beginning
        {"prompt": "hi", "rejected": "no"},  # 4
        {"chosen": [{"role": "assistant", "content": "yo"}], "rejected": "no"},  # 5
    ]
    src = write_jsonl(tmp_path / "p.jsonl", rows)
    skipped = load_preferences(src, on_bad_row="skip").skipped
    assert [(b.row, b.field) for b in skipped] == [
        (0, "rejected"),
        (1, "rejected"),
        (2, "chosen"),
        (3, "chosen"),
        (4, "chosen"),
        (5, "prompt"),
    ]
    assert skipped[0].problem == "identical to 'chosen' (a pair needs two different responses)"
    assert skipped[1].problem == "the conversation before its final assistant turn differs from 'chosen'"
    assert skipped[2].problem.startswith("no shared prompt prefix: without a 'prompt' column")
    assert skipped[3].problem.startswith("no shared prompt prefix: without a 'prompt' column, 'chosen' and")
    assert skipped[5].problem == "missing: no 'prompt' column, and 'chosen' holds only the assistant's reply"


@pytest.mark.skipif(not HH_RLHF.exists(), reason="HH-RLHF data (../shared/data) not present")
def test_hh_rlhf_harmless_test_file():
    """2,312 rows; 9 are unusable, each checked by hand (zcat | sed -n '87p' etc.):
    - rows 86, 516, 925, 1103: the chosen transcript ends with "\\n\\nAssistant: " and nothing after it
      (an empty chosen response);
    - rows 1254, 1688, 1950, 1952, 2036: the two transcripts differ before their last "\\n\\nAssistant:",
      so no prompt is shared up to the final turn and a "reply" would span several turns.
    Every other row splits into a shared prompt and two non-empty, different replies.
    Row 0's final human turn and chosen reply are copied from the file."""
    source = str(HH_RLHF)
    raw = {r.row: r.data for r in read_records(source) if r.row in (86, 516, 925, 1103, 1254)}
    assert all(raw[row]["chosen"].endswith("\n\nAssistant: ") for row in (86, 516, 925, 1103))
    c, r = raw[1254]["chosen"], raw[1254]["rejected"]
    assert c[: c.rfind("\n\nAssistant:")] != r[: r.rfind("\n\nAssistant:")]

    loaded = load_preferences(source, on_bad_row="skip")
    assert loaded.n_rows == 2312
    assert len(loaded.examples) == 2303
    assert [(b.row, b.field) for b in loaded.skipped] == [
        (86, "chosen"),
        (516, "chosen"),
        (925, "chosen"),
        (1103, "chosen"),
        (1254, "chosen"),
        (1688, "chosen"),
        (1950, "chosen"),
        (1952, "chosen"),
        (2036, "chosen"),
    ]
    assert all(b.problem.startswith("no shared prompt prefix") for b in loaded.skipped[4:])
    first = loaded.examples[0]
    assert first.prompt[-1] == {
        "role": "user",
        "content": "okay some of these do not have anything to do with pens",
    }
    assert [m["role"] for m in first.prompt] == ["user", "assistant", "user", "assistant", "user"]
    assert first.chosen.startswith("No, sorry!  All of these involve a pen")

    with pytest.raises(BadRowError) as err:
        load_preferences(source)
    assert str(err.value) == f"{source}: row 86: field 'chosen': empty completion (blank or whitespace only)"

    # The fixed split of the shared data README: rows 0-1799 train, 1800-2311 test.
    train = load_preferences(source, on_bad_row="skip", rows=(0, 1800))
    test = load_preferences(source, on_bad_row="skip", rows=(1800, 2312))
    assert (train.n_rows, len(train.examples), test.n_rows, len(test.examples)) == (1800, 1794, 512, 509)

    # As prompts (PPO's, and the held-out ones of a gold evaluation): the same rows' prompts, the same rows out.
    prompts = load_prompts(source, on_bad_row="skip", rows=(1800, 2312))
    assert [ex.prompt for ex in prompts.examples] == [pair.prompt for pair in test.examples]
    assert [b.row for b in prompts.skipped] == [b.row for b in test.skipped] == [1950, 1952, 2036]


# ---------------------------------------------------------------------------------------------
# schemas: unpaired and prompts
# ---------------------------------------------------------------------------------------------


def test_unpaired_labels(tmp_path):
    labels = [True, 0, 1, "true", "False", "desirable", " undesirable ", "0", 2, "maybe"]
    src = write_jsonl(tmp_path / "u.jsonl", [{"prompt": "p", "completion": "c", "label": v} for v in labels])
    loaded = load_unpaired(src, on_bad_row="skip")
    assert [e.label for e in loaded.examples] == [True, False, True, True, False, True, False, False]
    assert [(b.row, b.field) for b in loaded.skipped] == [(8, "label"), (9, "label")]
    assert (
        loaded.skipped[1].problem
        == "unknown label 'maybe'; expected true/false, 1/0 or 'desirable'/'undesirable'"
    )


def test_pairs_to_unpaired():
    ref = RowRef("f", 3)
    pair = PreferencePair("p", "good", "bad", ref)
    assert pairs_to_unpaired([pair]) == [
        UnpairedExample("p", "good", True, ref),
        UnpairedExample("p", "bad", False, ref),
    ]


def test_prompts(tmp_path):
    src = write_jsonl(
        tmp_path / "q.jsonl",
        [
            {"prompt": "hi"},
            {"messages": HI},
            {"messages": [*HI, {"role": "assistant", "content": "yo"}]},
            {"prompt": 5},
        ],
    )
    loaded = load_prompts(src, on_bad_row="skip")
    assert [e.prompt for e in loaded.examples] == ["hi", HI]
    assert [(b.row, b.field, b.problem) for b in loaded.skipped] == [
        (2, "messages", "the prompt must end with a user turn, but ends with 'assistant'"),
        (3, "prompt", "expected a string or a list of chat messages, got int"),
    ]


# ---------------------------------------------------------------------------------------------
# io: files that are broken or not what their suffix says (issue 15: messages, not tracebacks)
# ---------------------------------------------------------------------------------------------


def test_csv_row_with_another_field_count_is_a_bad_row_not_a_shift(tmp_path):
    """pandas used to make the first columns of a longer row an index and fill a shorter one with NaN,
    shifting every column silently; each such row is now a bad row naming its line and both counts."""
    src = tmp_path / "d.csv"
    src.write_text("prompt,completion\nhi,there\na,b,c\nalone\n" + '"x, y",z\n', encoding="utf-8")
    rows = list(read_rows(str(src)))
    assert rows == [
        Record(str(src), 0, {"prompt": "hi", "completion": "there"}),
        BadRow(str(src), 1, None, "line 3: has 3 fields, the header has 2"),
        BadRow(str(src), 2, None, "line 4: has 1 fields, the header has 2"),
        Record(str(src), 3, {"prompt": "x, y", "completion": "z"}),
    ]
    with pytest.raises(BadRowError) as err:
        load_sft(str(src))
    assert str(err.value) == f"{src}: row 1: line 3: has 3 fields, the header has 2"
    loaded = load_sft(str(src), on_bad_row="skip")
    assert [ex.completion for ex in loaded.examples] == ["there", "z"]
    assert (loaded.n_rows, [bad.row for bad in loaded.skipped]) == (4, [1, 2])


def test_csv_quoting_and_encoding_errors_are_bad_rows_and_reading_goes_on(tmp_path):
    """Row 0 holds a byte that is not UTF-8, row 1 a stray quote; row 2 reads; row 3 opens a quote that the
    file never closes (without strict parsing it would swallow the rest of the file as one field)."""
    src = tmp_path / "d.csv"
    src.write_bytes(b'prompt,completion\nbad\xff,x\n"a"b,c\nfine,"multi\nline"\nlast,"open\n')
    rows = list(read_rows(str(src)))
    assert rows[0] == BadRow(str(src), 0, None, "line 2: not valid UTF-8")
    assert rows[1] == BadRow(str(src), 1, None, "line 3: not valid CSV (',' expected after '\"')")
    assert rows[2] == Record(str(src), 2, {"prompt": "fine", "completion": "multi\nline"})
    assert rows[3] == BadRow(str(src), 3, None, "line 6: not valid CSV (unexpected end of data)")
    assert len(rows) == 4


def test_csv_header_problems_and_long_fields(tmp_path):
    dup = tmp_path / "dup.csv"
    dup.write_text("prompt,prompt\na,b\n", encoding="utf-8")
    repeated = r"dup.csv: the CSV header repeats the column\(s\) \['prompt'\]"
    with pytest.raises(DataSourceError, match=repeated):
        list(read_rows(str(dup)))
    empty = tmp_path / "empty.csv"
    empty.write_bytes(b"")
    assert list(read_rows(str(empty))) == []
    # Fields over the csv module's default 128 KiB limit are legitimate (a long completion); a BOM is dropped.
    long = tmp_path / "long.csv"
    long.write_text("\ufeffprompt,completion\nq," + "w" * 200_000 + "\n", encoding="utf-8")
    (record,) = read_records(str(long))
    assert record.data["prompt"] == "q" and len(record.data["completion"]) == 200_000


@pytest.mark.parametrize(
    "name, content, expected",
    [
        ("d.parquet", b"prompt,completion\na,b\n", r"d.parquet: not a readable Parquet file \("),
        ("d.parquet", b"PAR1" + b"\x00" * 40 + b"PAR1", r"d.parquet: not a readable Parquet file \("),
        ("d.jsonl.gz", b'{"prompt": "a"}\n', r"d.jsonl.gz: not a readable gzip file \("),
        # A gzip header followed by a damaged deflate stream (zlib.error, not BadGzipFile).
        ("d.jsonl.gz", gzip.compress(b'{"a": 1}\n' * 50)[:12] + b"\xff" * 30, r"d.jsonl.gz: not a readable"),
        ("d.json", b"[" * 100_000, r"d.json: cannot be read as JSON \(nested too deeply\)"),
        ("d.json", b"\xff\xfe[]", r"d.json: not valid UTF-8"),
    ],
)
def test_a_file_that_is_not_what_its_suffix_says_is_a_data_source_error(tmp_path, name, content, expected):
    path = tmp_path / name
    path.write_bytes(content)
    with pytest.raises(DataSourceError, match=expected):
        load_sft(str(path), on_bad_row="skip")


def test_a_parquet_string_that_is_not_utf8_is_a_data_source_error(tmp_path):
    """Parquet stores strings as bytes that pyarrow decodes only when a row is read: a damaged cell raises
    UnicodeDecodeError there, which is the file's fault, not a bug."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    path = tmp_path / "d.parquet"
    table = pa.table({"prompt": ["hello world AAAA"], "completion": ["goodbye"]})
    pq.write_table(table, path, compression="NONE", use_dictionary=False, write_statistics=False)
    data = path.read_bytes().replace(b"AAAA", b"\xff\xfeAA", 1)  # the cell (later copies: metadata)
    path.write_bytes(data)
    with pytest.raises(DataSourceError, match=r"d.parquet: not a readable Parquet file \(.*utf-8"):
        load_sft(str(path), on_bad_row="skip")


def test_deeply_nested_or_huge_json_line_is_a_bad_row(tmp_path):
    src = write_lines(tmp_path / "d.jsonl", [b"[" * 100_000, b'{"n": ' + b"9" * 5000 + b"}"])
    first, second = read_rows(src)
    assert first == BadRow(src, 0, None, "line 1 cannot be read as JSON (nested too deeply)")
    assert second.row == 1 and "line 2 cannot be read as JSON (Exceeds the limit" in second.problem


def test_no_usable_rows_names_the_setting_counts_and_first_reasons(tmp_path):
    src = write_jsonl(tmp_path / "d.jsonl", [{"prompt": "a"}, {"prompt": "", "completion": "b"}])
    loaded = load_sft(src, on_bad_row="skip")
    with pytest.raises(DataSourceError) as err:
        loaded.require_rows("train_data")
    assert str(err.value) == (
        f"train_data {src}: no usable rows (2 read, 2 skipped: first reasons "
        "row 0: field 'completion': missing (the row has ['prompt']); "
        "row 1: field 'prompt': empty prompt (blank or whitespace only))"
    )
    empty = write_lines(tmp_path / "empty.jsonl", [b""])
    expected = f"eval_data {empty}: no usable rows (0 read, 0 skipped)"
    with pytest.raises(DataSourceError, match=f"^{re.escape(expected)}$"):
        load_sft(empty).require_rows("eval_data")
    assert load_sft(write_jsonl(tmp_path / "ok.jsonl", ROWS)).require_rows("train_data").n_rows == 2
