"""Fuzzing the data loaders (issue 15): valid files of every supported format, corrupted at random (cut short,
bytes flipped, inserted or deleted, CSV fields dropped or added, values of the wrong type, emptied), then
loaded through every schema loader with on_bad_row=error and skip. Every outcome must be a loaded result or
one of alignkit's own errors, never another exception (which the CLI would show as a traceback).

A fixed, derandomized example budget keeps it in the default test command (a few seconds).
"""

from __future__ import annotations

import csv
import gzip
import io
import json

import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from alignkit.data.schemas import load_preferences, load_prompts, load_sft, load_unpaired
from alignkit.errors import AlignkitError

LOADERS = (load_sft, load_preferences, load_unpaired, load_prompts)
FORMATS = ("jsonl", "jsonl.gz", "json", "csv", "parquet")

HI = [{"role": "user", "content": "hi"}]
VALID_ROWS = [
    {"prompt": "What is 2+2?", "completion": "4", "chosen": "4", "rejected": "5", "label": "true"},
    {"prompt": "Say hi", "completion": "hi", "chosen": "hi", "rejected": "bye", "label": "0"},
    {"prompt": "é ünïcode ✓", "completion": "ok", "chosen": "y", "rejected": "n", "label": "desirable"},
]
# Values of the wrong type (or shape) for any column: JSON formats keep them as they are.
ODD_VALUES = st.one_of(
    st.none(),
    st.booleans(),
    st.integers(),
    st.floats(allow_nan=True),
    st.text(max_size=8),
    st.just(HI),
    st.just([{"role": "bot"}]),
    st.just([{"role": "user", "content": 3}]),
    st.lists(st.integers(), max_size=2),
    st.dictionaries(st.text(max_size=3), st.integers(), max_size=2),
)


def encode(rows: list[dict], fmt: str) -> bytes:
    """The bytes of a valid file of ``rows`` in format ``fmt``."""
    if fmt in ("jsonl", "jsonl.gz"):
        data = "".join(json.dumps(row) + "\n" for row in rows).encode("utf-8")
        return gzip.compress(data, mtime=0) if fmt == "jsonl.gz" else data
    if fmt == "json":
        return json.dumps(rows).encode("utf-8")
    if fmt == "csv":
        text = io.StringIO()
        writer = csv.writer(text)
        writer.writerow(rows[0].keys())
        writer.writerows([str(value) for value in row.values()] for row in rows)
        return text.getvalue().encode("utf-8")
    sink = pa.BufferOutputStream()
    # One type per column, as Parquet needs: every value as its JSON text where the rows mix types.
    columns = {key: [row.get(key) for row in rows] for key in rows[0]}
    for key, values in columns.items():
        if len({type(v) for v in values if v is not None}) > 1:
            columns[key] = [json.dumps(v) for v in values]
    try:
        pq.write_table(pa.table(columns), sink)
    except (pa.ArrowException, TypeError):  # a value Arrow cannot store (e.g. an int beyond 64 bits)
        pq.write_table(pa.table({k: [json.dumps(v) for v in vs] for k, vs in columns.items()}), sink)
    return sink.getvalue().to_pybytes()


@st.composite
def rows_for_file(draw) -> list[dict]:
    """Valid rows, some with a value replaced by one of the wrong type, or a column dropped."""
    rows = [dict(row) for row in draw(st.lists(st.sampled_from(VALID_ROWS), min_size=1, max_size=4))]
    for row in rows:
        if draw(st.booleans()):
            row[draw(st.sampled_from(sorted(row)))] = draw(ODD_VALUES)
    if draw(st.integers(0, 5)) == 0:
        dropped = draw(st.sampled_from(sorted(rows[0])))
        for row in rows:
            row.pop(dropped, None)
        if not rows[0]:
            rows[0]["x"] = 1
    return rows


@st.composite
def corrupted(draw, data: bytes) -> bytes:
    """``data`` after up to three random corruptions."""
    for _ in range(draw(st.integers(0, 3))):
        kind = draw(st.sampled_from(["truncate", "flip", "insert", "delete", "field", "newline", "empty"]))
        at = draw(st.integers(0, max(len(data) - 1, 0)))
        if kind == "truncate":
            data = data[:at]
        elif kind == "flip" and data:
            data = data[:at] + bytes([data[at] ^ draw(st.integers(1, 255))]) + data[at + 1 :]
        elif kind == "insert":
            data = data[:at] + draw(st.binary(min_size=1, max_size=4)) + data[at:]
        elif kind == "delete":
            data = data[:at] + data[at + draw(st.integers(1, 8)) :]
        elif kind == "field":  # a CSV separator or quote added or removed, a field dropped or added
            cut = at + draw(st.integers(0, 1))
            data = data[:at] + draw(st.sampled_from([b",", b'"', b",x", b""])) + data[cut:]
        elif kind == "newline":
            data = data[:at] + draw(st.sampled_from([b"\n", b"\r\n", b"\r", b"\x00"])) + data[at:]
        else:
            data = b""
    return data


@st.composite
def broken_files(draw) -> tuple[str, bytes]:
    fmt = draw(st.sampled_from(FORMATS))
    return fmt, draw(corrupted(encode(draw(rows_for_file()), fmt)))


@settings(
    max_examples=150,
    deadline=None,
    derandomize=True,
    suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow],
)
@given(file=broken_files())
def test_broken_files_load_or_raise_alignkit_errors(tmp_path, file):
    fmt, data = file
    path = tmp_path / f"data.{fmt}"
    path.write_bytes(data)
    for load in LOADERS:
        for on_bad_row in ("error", "skip"):
            try:
                loaded = load(str(path), on_bad_row=on_bad_row)
            except AlignkitError:  # BadRowError, DataSourceError: a message naming the file (and row)
                continue
            assert loaded.n_rows == len(loaded.examples) + len(loaded.skipped)
            if on_bad_row == "error":
                assert not loaded.skipped


@pytest.mark.parametrize("flip_at", [0.1, 0.5, 0.9])
def test_a_damaged_saved_dataset_is_a_data_source_error(tmp_path, flip_at):
    """A directory written by datasets.save_to_disk whose Arrow file has been damaged."""
    import datasets

    datasets.Dataset.from_list(VALID_ROWS).save_to_disk(str(tmp_path / "ds"))
    (arrow,) = (tmp_path / "ds").glob("*.arrow")
    data = bytearray(arrow.read_bytes())
    at = int(len(data) * flip_at)
    data[at : at + 16] = b"\xff" * 16
    arrow.write_bytes(bytes(data))
    for load in LOADERS:
        try:
            load(str(tmp_path / "ds"), on_bad_row="skip")
        except AlignkitError:
            pass
