"""Training rows (demonstrations, preference pairs, unpaired KTO examples) validated, tokenized and kept as
memory-mapped Arrow files (Hugging Face ``datasets``) in a cache folder, keyed by a fingerprint of the data, the
tokenizer and every setting that changes the tokens. The next run with the same inputs opens the files without
reading the source; training reads the rows lazily (``EncodedRows``), so a million pairs never sit in memory as
Python lists.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import os
import shutil
import sys
import time
from collections.abc import Iterable, Iterator, Sequence
from dataclasses import asdict, dataclass
from itertools import islice
from pathlib import Path
from typing import Literal

import numpy as np

from alignkit.data import io, schemas, tokenize
from alignkit.data.io import BadRow
from alignkit.data.schemas import (
    Loaded,
    OnBadRow,
    feedback_format,
    iter_examples,
    no_usable_rows,
    pairs_to_unpaired,
)
from alignkit.data.tokenize import (
    Encoded,
    EncodedPair,
    EncodedUnpaired,
    encode_batch,
    encode_pairs,
    encode_unpaired_batch,
)

# Rows per Arrow record batch while validating, and per tokenizer call while tokenizing.
_BATCH_ROWS = 1000
# Below this many rows one process tokenizes faster than a pool that must start and pickle the tokenizer.
_PARALLEL_FROM = 10_000

# What the rows are: "sft" (prompt/completion demonstrations), "pairs" (prompt/chosen/rejected), "unpaired"
# (prompt/completion/label rows),
# "pairs_as_unpaired" (pairs, each split into its desirable chosen and undesirable rejected half, in that
# order), "auto_unpaired" (one of the last two, by the first readable row's columns: schemas.feedback_format).
RowKind = Literal["sft", "pairs", "unpaired", "pairs_as_unpaired", "auto_unpaired"]
# The record each row is read back as, by the kind it was built as.
_RECORDS = {
    "sft": Encoded,
    "pairs": EncodedPair,
    "unpaired": EncodedUnpaired,
    "pairs_as_unpaired": EncodedUnpaired,
}


@dataclass(frozen=True)
class RowSettings:
    """Everything besides the data and the tokenizer that decides which rows are kept and their token ids."""

    max_length: int
    max_prompt_length: int | None = None
    on_bad_row: OnBadRow = "error"
    split: str | None = None
    rows: tuple[int, int] | None = None
    limit: int | None = None
    columns: dict[str, str] | None = None
    kind: RowKind = "pairs"
    margin_column: str | None = None  # pairs only: each row's margin, kept as the column "margin"


class EncodedRows(Sequence):
    """The tokenized rows of one prepared source (``Encoded``, ``EncodedPair`` or ``EncodedUnpaired``, as
    ``kind`` says),
    read from the memory-mapped Arrow files row by row; ``select`` gives a view of some of them, nothing
    copied. ``fingerprint`` names exactly these rows' ids (the cache key, and the selection's indices)."""

    def __init__(self, table, kind: RowKind, fingerprint: str, indices: np.ndarray | None = None) -> None:
        self.table = table  # a datasets.Dataset with the columns of _features(kind)
        self.kind = kind  # as built: never "auto_unpaired"
        self.fingerprint = fingerprint
        self.indices = indices  # (n,) the table's rows this view holds; None: all of them
        self.record = _RECORDS[kind]
        self.names = [f.name for f in dataclasses.fields(self.record)]

    def __len__(self) -> int:
        return self.table.num_rows if self.indices is None else len(self.indices)

    def __getitem__(self, i: int):  # type: ignore[override]
        row = self.table[int(i if self.indices is None else self.indices[i])]
        return self.record(*(row[name] for name in self.names))

    def __iter__(self) -> Iterator:
        for start in range(0, len(self), _BATCH_ROWS):  # a record batch at a time
            stop = min(start + _BATCH_ROWS, len(self))
            batch = (
                self.table[start:stop]
                if self.indices is None
                else self.table[self.indices[start:stop].tolist()]
            )
            yield from (self.record(*row) for row in zip(*(batch[name] for name in self.names)))

    def column(self, name: str) -> np.ndarray:
        """A scalar column ("length", "truncated", "label", "margin") of this view, read without the ids."""
        values = self.table.data.column(name).to_numpy()
        return values if self.indices is None else values[self.indices]

    def lengths(self) -> list[int]:
        """Each row's padded width (pairs: ``collate.pair_length``; unpaired: prompt + completion)."""
        return self.column("length").tolist()

    def n_truncated(self) -> int:
        return int(self.column("truncated").sum())

    def select(self, indices: Iterable[int]) -> EncodedRows:
        """The view of this view's rows at ``indices``, in that order."""
        picked = np.fromiter(indices, dtype=np.int64)
        rows = picked if self.indices is None else self.indices[picked]
        key = hashlib.sha256(self.fingerprint.encode() + rows.tobytes()).hexdigest()[:32]
        return EncodedRows(self.table, self.kind, key, rows)


def prepare_rows(
    source: str,
    tokenizer,
    settings: RowSettings,
    cache_root: Path,
    num_proc: int = 0,
    what: str = "train",
) -> Loaded:
    """``load_sft``, ``load_preferences`` or ``load_unpaired`` of ``source`` (as ``settings.kind`` says) with
    its rows tokenized (``tokenize.encode_batch`` / ``encode_pairs`` / ``encode_unpaired_batch``): a
    ``Loaded`` whose ``examples`` are ``EncodedRows``, from ``cache_root/<fingerprint>`` when an earlier run
    prepared the same inputs, else validated, tokenized with ``num_proc`` processes (0: ``default_num_proc``)
    and cached there. Row errors are the loader's (``on_bad_row``); nothing is cached when one stops the run."""
    folder = cache_root / fingerprint(source, tokenizer, settings)
    if (folder / "meta.json").is_file():
        loaded = _open(folder, source)
        print(f"{what} data: tokens from the cache {folder} (the source was not read)", file=sys.stderr)
        return loaded
    started = time.perf_counter()
    procs = _build(source, tokenizer, settings, folder, num_proc, what)
    loaded = _open(folder, source)
    print(
        f"{what} data: tokenized {len(loaded.examples)} rows ({loaded.examples.kind.replace('_', ' ')}) with "
        f"{procs} process(es) in {time.perf_counter() - started:.1f}s, cached in {folder}",
        file=sys.stderr,
    )
    return loaded


def default_num_proc(n_rows: int) -> int:
    """1 for small data; else half the CPUs this process may use (the rest run the tokenizer's own threads
    and the machine), at most 8."""
    if n_rows < _PARALLEL_FROM:
        return 1
    cpus = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count() or 1
    return max(1, min(8, cpus // 2))


# ---------------------------------------------------------------------------------------------
# The fingerprint
# ---------------------------------------------------------------------------------------------


def fingerprint(source: str, tokenizer, settings: RowSettings) -> str:
    """The cache key: the source's files (path, size, mtime), the tokenizer's contents, the settings, and the
    code that turns rows into ids (so a new alignkit never reads tokens an older one wrote differently)."""
    h = hashlib.sha256()
    for part in (
        source_fingerprint(source),
        tokenizer_fingerprint(tokenizer),
        json.dumps(asdict(settings), sort_keys=True),
        *(Path(module.__file__).read_bytes() for module in (io, schemas, tokenize, sys.modules[__name__])),
    ):
        h.update(part if isinstance(part, bytes) else part.encode())
        h.update(b"\0")
    return h.hexdigest()[:32]


def source_fingerprint(source: str) -> str:
    """A file's or a saved dataset folder's resolved path, sizes and modification times (cheap at any size: no
    byte is read); a hub id by its name alone (``datasets`` keeps the download; clear the cache to re-read)."""
    path = Path(source).expanduser()
    if path.is_file():
        files = [path]
    elif path.is_dir():
        files = sorted(f for f in path.rglob("*") if f.is_file())
    else:
        return f"hub:{source}"
    stats = [(str(f.resolve()), f.stat().st_size, f.stat().st_mtime_ns) for f in files]
    return json.dumps(stats)


def tokenizer_fingerprint(tokenizer) -> str:
    """What decides the ids: the fast tokenizer's whole serialized state (vocabulary, merges, normalizer,
    special tokens) or a slow one's vocabulary, plus the chat template and the special tokens a plain call adds.
    """
    # A plain call first: it clears the padding/truncation state an earlier call may have left in the backend
    # (which the serialized state holds), so the same tokenizer always serializes the same.
    extra = [
        type(tokenizer).__name__,
        len(tokenizer),
        getattr(tokenizer, "chat_template", None),
        tokenizer.bos_token_id,
        tokenizer.eos_token_id,
        tokenizer("a")["input_ids"],
    ]
    backend = getattr(tokenizer, "backend_tokenizer", None)
    # Hashed as serialized (about 0.15 s for a 49k vocabulary; parsing it would take a second).
    state = backend.to_str() if backend is not None else json.dumps(sorted(tokenizer.get_vocab().items()))
    return hashlib.sha256(state.encode()).hexdigest() + json.dumps(extra, default=str)


# ---------------------------------------------------------------------------------------------
# Building and opening a cache folder
# ---------------------------------------------------------------------------------------------


def _build(source: str, tokenizer, settings: RowSettings, folder: Path, num_proc: int, what: str) -> int:
    """Write ``folder``: validate the rows streaming into an Arrow file of texts, tokenize it with datasets'
    ``map`` into the final Arrow files, then meta.json (the mark of a complete folder). Built beside it and
    renamed into place, so a crash or a bad row never leaves a half-built folder. Returns the process count."""
    import datasets

    work = folder.with_name(f"{folder.name}.tmp-{os.getpid()}")
    shutil.rmtree(work, ignore_errors=True)
    work.mkdir(parents=True)
    try:
        kind = settings.kind
        if kind == "auto_unpaired":
            unpaired = feedback_format(source, settings.split, settings.columns) == "unpaired"
            kind = "unpaired" if unpaired else "pairs_as_unpaired"
        loaded = Loaded(examples=[], source=source)
        examples = iter_examples(
            loaded, "pairs" if kind == "pairs_as_unpaired" else kind, settings.on_bad_row, settings.split,
            settings.limit, settings.rows, settings.columns, settings.margin_column,
        )  # fmt: skip
        n_rows = _write_texts(examples, kind, settings.margin_column is not None, work / "texts.arrow")
        if n_rows == 0:
            raise no_usable_rows(f"{what}_data", source, loaded.n_rows, loaded.skipped)
        procs = min(num_proc or default_num_proc(n_rows), max(n_rows, 1))
        texts = datasets.Dataset.from_file(str(work / "texts.arrow"))
        tokens = texts.map(
            _tokenize_batch,
            batched=True,
            batch_size=_BATCH_ROWS,
            remove_columns=[name for name in texts.column_names if name != "margin"],
            fn_kwargs={"tokenizer": tokenizer, "settings": settings},
            features=_features(kind, settings.margin_column is not None),
            num_proc=procs if procs > 1 else None,
            cache_file_name=str(work / "rows.arrow"),
            load_from_cache_file=False,
            new_fingerprint=folder.name,
            desc=f"tokenizing {kind.replace('_', ' ')}",
        )
        meta = {
            "source": source,
            "kind": kind,
            "n_rows": loaded.n_rows,
            "skipped": [asdict(bad) for bad in loaded.skipped],
            "files": [Path(f["filename"]).name for f in tokens.cache_files],
        }
        del texts, tokens
        (work / "texts.arrow").unlink()
        (work / "meta.json").write_text(json.dumps(meta), encoding="utf-8")
        try:
            os.replace(work, folder)
        except OSError:  # another process (a rank of the same run) finished first: keep its folder
            if not (folder / "meta.json").is_file():
                raise
        return procs
    finally:
        shutil.rmtree(work, ignore_errors=True)


def _write_texts(examples: Iterable, kind: RowKind, margins: bool, path: Path) -> int:
    """The validated examples as an Arrow stream file (the layout ``datasets`` memory-maps), a record batch at
    a time; a prompt is stored as JSON, since it is text or a list of messages. Pairs (with ``margins``, as
    (pair, margin)) become prompt/chosen/rejected[/margin] rows; demonstrations prompt/completion rows;
    unpaired examples, and pairs split in two, prompt/completion/label rows. Returns the row count."""
    import pyarrow as pa

    texts = [("prompt", pa.string())]
    if kind == "pairs":
        texts += [("chosen", pa.string()), ("rejected", pa.string())]
        texts += [("margin", pa.float64())] if margins else []
    elif kind == "sft":
        texts += [("completion", pa.string())]
    else:
        texts += [("completion", pa.string()), ("label", pa.bool_())]
    schema = pa.schema(texts)
    n = 0
    with pa.OSFile(str(path), "wb") as sink, pa.ipc.new_stream(sink, schema) as writer:
        examples = iter(examples)
        while batch := list(islice(examples, _BATCH_ROWS)):
            if kind == "pairs":
                rows = [pair for pair, _ in batch] if margins else batch
                columns = [[p.chosen for p in rows], [p.rejected for p in rows]]
                columns += [[margin for _, margin in batch]] if margins else []
            elif kind == "sft":
                rows = batch
                columns = [[e.completion for e in rows]]
            else:
                rows = pairs_to_unpaired(batch) if kind == "pairs_as_unpaired" else batch
                columns = [[u.completion for u in rows], [u.label for u in rows]]
            prompts = [json.dumps(row.prompt) for row in rows]
            writer.write_batch(pa.record_batch([prompts, *columns], schema=schema))
            n += len(rows)
    return n


def _features(kind: RowKind, margins: bool):
    import datasets

    ids = datasets.List(datasets.Value("int32"))
    if kind == "pairs":
        columns = {"prompt_ids": ids, "chosen_ids": ids, "rejected_ids": ids}
        columns.update({"margin": datasets.Value("float64")} if margins else {})
    elif kind == "sft":
        columns = {"prompt_ids": ids, "completion_ids": ids}
    else:
        columns = {"prompt_ids": ids, "completion_ids": ids, "label": datasets.Value("bool")}
    return datasets.Features(
        {**columns, "truncated": datasets.Value("bool"), "length": datasets.Value("int32")}
    )


def _tokenize_batch(batch: dict, tokenizer, settings: RowSettings) -> dict:
    """One ``map`` batch of texts -> the columns of ``_features``: the encoded records' fields, and "length"
    (runs in the worker processes)."""
    prompts = [json.loads(p) for p in batch["prompt"]]
    args = (settings.max_length, settings.max_prompt_length)
    if "chosen" in batch:
        encoded = encode_pairs(tokenizer, prompts, batch["chosen"], batch["rejected"], *args)
    elif "label" in batch:
        encoded = encode_unpaired_batch(tokenizer, prompts, batch["completion"], batch["label"], *args)
    else:
        encoded = encode_batch(tokenizer, prompts, batch["completion"], *args)
    names = [f.name for f in dataclasses.fields(encoded[0])]
    columns = {name: [getattr(e, name) for e in encoded] for name in names}
    # The padded width a row asks of a batch (prompt + its longest completion: collate.pair_length for pairs),
    # kept so length-sorted batching never decodes the ids.
    completions = [name for name in names if name.endswith("_ids") and name != "prompt_ids"]
    columns["length"] = [
        len(e.prompt_ids) + max(len(getattr(e, name)) for name in completions) for e in encoded
    ]
    return columns


def _open(folder: Path, source: str) -> Loaded:
    """A complete cache folder as the ``Loaded`` its build produced, its rows memory-mapped."""
    import datasets

    meta = json.loads((folder / "meta.json").read_text(encoding="utf-8"))
    parts = [datasets.Dataset.from_file(str(folder / name)) for name in meta["files"]]
    table = parts[0] if len(parts) == 1 else datasets.concatenate_datasets(parts)
    skipped = [BadRow(**bad) for bad in meta["skipped"]]
    rows = EncodedRows(table, meta["kind"], folder.name)
    return Loaded(examples=rows, skipped=skipped, n_rows=meta["n_rows"], source=source)
