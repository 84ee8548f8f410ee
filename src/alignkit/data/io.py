"""Read raw rows from wherever the user's data lives: JSONL (optionally gzipped), JSON, Parquet, CSV,
a directory written by ``datasets.save_to_disk``, or a Hugging Face hub id. Every row comes back with
its source and 0-based row number, so any later complaint about it can say exactly where it is.
"""

from __future__ import annotations

import csv
import gzip
import json
import zlib
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from alignkit.errors import AlignkitError

# File suffixes we read ourselves; anything else that is not a directory is treated as a hub id.
FILE_SUFFIXES = (".jsonl.gz", ".jsonl", ".json", ".parquet", ".csv")

# ---------------------------------------------------------------------------------------------
# Row identity and row-level errors (re-exported by schemas.py, which is where users meet them)
# ---------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class RowRef:
    """Where an example came from: the source as the user gave it and the 0-based row number."""

    source: str
    row: int


def _format_row_problem(source: str, row: int, field: str | None, problem: str) -> str:
    where = f"{source}: row {row}"
    if field is not None:
        where += f": field '{field}'"
    return f"{where}: {problem}"


@dataclass(frozen=True)
class BadRow:
    """A row that could not be used, kept so that skipped rows are always reported, never dropped silently."""

    source: str
    row: int
    field: str | None
    problem: str

    def __str__(self) -> str:
        return _format_row_problem(self.source, self.row, self.field, self.problem)


class BadRowError(AlignkitError, ValueError):
    """An invalid row; the message reads ``"<source>: row <row>: field '<field>': <problem>"``."""

    def __init__(self, source: str, row: int, field: str | None = None, problem: str = "invalid row"):
        super().__init__(_format_row_problem(source, row, field, problem))
        self.source = source
        self.row = row
        self.field = field
        self.problem = problem

    @property
    def bad_row(self) -> BadRow:
        return BadRow(self.source, self.row, self.field, self.problem)


class DataSourceError(AlignkitError, ValueError):
    """The source as a whole cannot be read (unsupported format, broken file, unknown split, no usable
    rows, ...)."""


@dataclass(frozen=True)
class Record:
    """One raw row: ``data`` is the row's columns as plain Python values (str, int, list, dict, ...)."""

    source: str
    row: int
    data: dict[str, Any]


# ---------------------------------------------------------------------------------------------
# Public entry points
# ---------------------------------------------------------------------------------------------


def read_records(source: str, split: str | None = None) -> Iterator[Record]:
    """Yield every row of ``source`` in file order; the first broken row raises ``BadRowError``.

    Row numbers are 0-based. For JSONL they are the index of the physical line, so row ``r`` is what
    ``sed -n '<r+1>p'`` prints; empty lines are skipped but still take their number. For JSON they are the
    index in the list, for CSV the index of the data row (the header is not a row), for Parquet and
    datasets the row index.
    """
    for item in read_rows(source, split):
        if isinstance(item, BadRow):
            raise BadRowError(item.source, item.row, item.field, item.problem)
        yield item


def read_rows(source: str, split: str | None = None) -> Iterator[Record | BadRow]:
    """Like ``read_records``, but a row that cannot even be parsed (broken JSON, bytes that are not UTF-8,
    a JSON value that is not an object) comes back as a ``BadRow`` so the caller may skip it and read on.

    ``split`` selects a split of a saved ``DatasetDict`` or of a hub dataset (default "train" there); it is
    an error for a single file, which has no splits.
    """
    path = Path(source).expanduser()
    if path.is_dir():
        yield from _read_saved_dataset(source, path, split)
        return
    if path.is_file():
        if split is not None:
            raise DataSourceError(f"{source}: split={split!r} was given, but a single file has no splits")
        yield from _read_file(source, path)
        return
    if _looks_like_path(source):
        raise FileNotFoundError(f"data file not found: {source} (resolved to {path.resolve()})")
    yield from _read_hub_dataset(source, split)


# ---------------------------------------------------------------------------------------------
# Files
# ---------------------------------------------------------------------------------------------


def _looks_like_path(source: str) -> bool:
    """A missing path should say "file not found", not "could not reach the hub"."""
    return source.endswith(FILE_SUFFIXES) or source.startswith(("/", ".", "~")) or "\\" in source


def _read_file(source: str, path: Path) -> Iterator[Record | BadRow]:
    name = path.name.lower()
    if name.endswith(".jsonl.gz"):
        yield from _read_jsonl_gz(source, path)
    elif name.endswith(".jsonl"):
        with open(path, "rb") as f:
            yield from _read_jsonl_lines(source, f)
    elif name.endswith(".json"):
        yield from _read_json(source, path)
    elif name.endswith(".parquet"):
        yield from _read_parquet(source, path)
    elif name.endswith(".csv"):
        yield from _read_csv(source, path)
    else:
        raise DataSourceError(
            f"{source}: unsupported file type; expected one of {', '.join(FILE_SUFFIXES)}, "
            "a directory written by datasets.save_to_disk, or a Hugging Face hub id"
        )


def _read_jsonl_gz(source: str, path: Path) -> Iterator[Record | BadRow]:
    # gzip reports a damaged archive only while reading; say which file it was.
    try:
        with gzip.open(path, "rb") as f:
            yield from _read_jsonl_lines(source, f)
    except (gzip.BadGzipFile, EOFError, zlib.error) as err:
        raise DataSourceError(f"{source}: not a readable gzip file ({err})") from err


def _read_jsonl_lines(source: str, lines) -> Iterator[Record | BadRow]:
    """One JSON object per line. We decode line by line, so one bad line is one bad row, not a dead file."""
    for row, raw in enumerate(lines):
        line_no = row + 1  # what an editor shows
        try:
            # utf-8-sig on the first line drops a byte-order mark some editors write.
            text = raw.decode("utf-8-sig" if row == 0 else "utf-8")
        except UnicodeDecodeError as err:
            yield BadRow(
                source, row, None, f"line {line_no} is not valid UTF-8 ({err.reason} at byte {err.start})"
            )
            continue
        if not text.strip():
            continue
        try:
            value = json.loads(text)
        except json.JSONDecodeError as err:
            yield BadRow(
                source, row, None, f"line {line_no} is not valid JSON ({err.msg} at column {err.colno})"
            )
            continue
        except (ValueError, RecursionError) as err:
            yield BadRow(source, row, None, f"line {line_no} cannot be read as JSON ({_json_limit(err)})")
            continue
        if not isinstance(value, dict):
            kind = type(value).__name__
            yield BadRow(source, row, None, f"line {line_no} is not a JSON object (got {kind})")
            continue
        yield Record(source, row, value)


def _read_json(source: str, path: Path) -> Iterator[Record | BadRow]:
    """A list of objects, or a dict holding exactly one list of objects (e.g. ``{"data": [...]}``).

    Many datasets name JSON Lines files ``.json``; a file that holds several top-level objects is read as
    JSON Lines for that reason.
    """
    raw = path.read_bytes()
    try:
        text = raw.decode("utf-8-sig")
    except UnicodeDecodeError as err:
        line_no = raw[: err.start].count(b"\n") + 1
        raise DataSourceError(
            f"{source}: not valid UTF-8 ({err.reason} at byte {err.start}, line {line_no})"
        ) from err
    try:
        value = json.loads(text)
    except json.JSONDecodeError as err:
        if err.msg == "Extra data" and text.lstrip().startswith("{"):
            yield from _read_jsonl_lines(source, raw.splitlines())
            return
        raise DataSourceError(
            f"{source}: not valid JSON ({err.msg} at line {err.lineno}, column {err.colno})"
        ) from err
    except (ValueError, RecursionError) as err:
        raise DataSourceError(f"{source}: cannot be read as JSON ({_json_limit(err)})") from err

    if isinstance(value, dict):
        lists = [key for key, item in value.items() if isinstance(item, list)]
        if len(lists) != 1:
            raise DataSourceError(
                f"{source}: a JSON object must hold exactly one list of rows; found {len(lists)} lists "
                f"(keys: {sorted(value)})"
            )
        value = value[lists[0]]
    if not isinstance(value, list):
        raise DataSourceError(f"{source}: expected a JSON list of objects, got {type(value).__name__}")
    for row, item in enumerate(value):
        if isinstance(item, dict):
            yield Record(source, row, item)
        else:
            yield BadRow(
                source, row, None, f"item {row} of the JSON list is not an object (got {type(item).__name__})"
            )


def _json_limit(err: ValueError | RecursionError) -> str:
    """What a parse that is not a syntax error ran into: nesting too deep, or Python's limit on the digits of
    an integer (a file can hit both without being malformed JSON)."""
    return "nested too deeply" if isinstance(err, RecursionError) else str(err)


def _read_parquet(source: str, path: Path) -> Iterator[Record | BadRow]:
    import pyarrow
    import pyarrow.parquet as pq

    row = 0
    try:
        # Batches keep memory flat on large files.
        for batch in pq.ParquetFile(path).iter_batches(batch_size=1024):
            for item in batch.to_pylist():
                yield Record(source, row, item)
                row += 1
    # A file that is not Parquet, or a damaged one, fails in the reader with Arrow's own errors (or OSError;
    # UnicodeDecodeError from a damaged string column or metadata), at the start or in the middle; either way
    # the file as a whole is unreadable.
    except (pyarrow.ArrowException, OSError, UnicodeDecodeError) as err:
        where = f" after row {row - 1}" if row else ""
        raise DataSourceError(f"{source}: not a readable Parquet file{where} ({err})") from err


# The csv module refuses fields over 128 KiB by default; a long completion is a legitimate field.
_CSV_FIELD_LIMIT = 2**30


def _read_csv(source: str, path: Path) -> Iterator[Record | BadRow]:
    """A header row, then one row per record, every cell as the string in the file.

    "007" stays "007", an empty cell is "" (and fails validation as empty), and a label "1"/"true" is parsed
    by the schema. A row with more or fewer fields than the header, a quoting error, or bytes that are not
    UTF-8 is a bad row (never a silent shift of columns); blank lines are skipped and take no row number.
    """
    csv.field_size_limit(max(csv.field_size_limit(), _CSV_FIELD_LIMIT))
    # surrogateescape keeps invalid bytes as lone surrogates, so one bad row is reported and the rest read.
    with open(path, encoding="utf-8-sig", errors="surrogateescape", newline="") as f:
        reader = csv.reader(f, strict=True)  # strict: an unclosed quote is an error, not the rest of the file
        header = None
        row = 0
        while True:
            line = reader.line_num + 1  # where the record starts (a quoted field may span lines)
            try:
                fields = next(reader)
            except StopIteration:
                return
            except csv.Error as err:
                if header is None:
                    raise DataSourceError(
                        f"{source}: line {line}: unreadable CSV header ({err})"
                    ) from err
                yield BadRow(source, row, None, f"line {line}: not valid CSV ({err})")
                row += 1
                continue
            if not fields:
                continue
            if header is None:
                header = _csv_header(source, fields)
                continue
            problem = _csv_row_problem(fields, len(header))
            if problem is not None:
                yield BadRow(source, row, None, f"line {line}: {problem}")
            else:
                yield Record(source, row, dict(zip(header, fields)))
            row += 1


def _csv_header(source: str, fields: list[str]) -> list[str]:
    if _has_invalid_utf8(fields):
        raise DataSourceError(f"{source}: line 1: the CSV header is not valid UTF-8")
    repeated = sorted({name for name in fields if fields.count(name) > 1})
    if repeated:
        raise DataSourceError(f"{source}: the CSV header repeats the column(s) {repeated}")
    return fields


def _csv_row_problem(fields: list[str], n_columns: int) -> str | None:
    if len(fields) != n_columns:
        return f"has {len(fields)} fields, the header has {n_columns}"
    if _has_invalid_utf8(fields):
        return "not valid UTF-8"
    return None


def _has_invalid_utf8(fields: list[str]) -> bool:
    # Decoding with surrogateescape turns each invalid byte into a lone surrogate, which valid UTF-8 can never
    # produce and which cannot be encoded back.
    try:
        "".join(fields).encode("utf-8")
    except UnicodeEncodeError:
        return True
    return False


# ---------------------------------------------------------------------------------------------
# Datasets (saved to disk, or from the hub)
# ---------------------------------------------------------------------------------------------


def _read_saved_dataset(source: str, path: Path, split: str | None) -> Iterator[Record | BadRow]:
    import datasets

    if not ((path / "dataset_dict.json").exists() or (path / "dataset_info.json").exists()):
        raise DataSourceError(
            f"{source}: is a directory but not one written by datasets.save_to_disk "
            "(no dataset_dict.json or dataset_info.json in it)"
        )
    try:
        loaded = datasets.load_from_disk(str(path))
    except Exception as err:  # a damaged folder fails in datasets or Arrow with a dozen types; all mean this
        raise DataSourceError(
            f"{source}: not a readable saved dataset ({type(err).__name__}: {err})"
        ) from err
    if isinstance(loaded, datasets.DatasetDict):
        loaded = _pick_split(source, loaded, split)
    elif split is not None:
        raise DataSourceError(f"{source}: split={split!r} was given, but this saved Dataset has no splits")
    yield from _dataset_rows(source, loaded)


def _pick_split(source: str, splits, split: str | None):
    names = list(splits)
    if split is None:
        if len(names) == 1:
            return splits[names[0]]
        raise DataSourceError(f"{source}: holds several splits {names}; choose one with split=...")
    if split not in splits:
        raise DataSourceError(f"{source}: no split {split!r}; available splits: {names}")
    return splits[split]


def _read_hub_dataset(source: str, split: str | None) -> Iterator[Record | BadRow]:
    import datasets

    split = split or "train"
    try:
        dataset = datasets.load_dataset(source, split=split)
    except (
        Exception
    ) as err:  # the hub raises many types (network, auth, missing split); all mean "cannot load"
        raise DataSourceError(
            f"could not load {source!r}: it is neither an existing file nor a directory, and loading it as a "
            f"Hugging Face hub dataset (split={split!r}) failed: {type(err).__name__}: {err}"
        ) from err
    yield from _dataset_rows(source, dataset)


def _dataset_rows(source: str, dataset) -> Iterator[Record | BadRow]:
    row = 0
    try:
        for item in dataset:
            yield Record(source, row, dict(item))
            row += 1
    except Exception as err:  # Arrow data damaged past its header surfaces only while rows are read
        raise DataSourceError(f"{source}: row {row} cannot be read ({type(err).__name__}: {err})") from err
