"""Preference pairs validated, tokenized and kept as memory-mapped Arrow files (Hugging Face ``datasets``) in a
cache folder, keyed by a fingerprint of the data, the tokenizer and every setting that changes the tokens. The
next run with the same inputs opens the files without reading the source; training reads the rows lazily
(``EncodedPairs``), so a million pairs never sit in memory as Python lists.
"""

from __future__ import annotations

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

from alignkit.data import io, schemas, tokenize
from alignkit.data.io import BadRow
from alignkit.data.schemas import Loaded, OnBadRow, iter_preferences, no_usable_rows
from alignkit.data.tokenize import EncodedPair, encode_pairs

# Rows per Arrow record batch while validating, and per tokenizer call while tokenizing.
_BATCH_ROWS = 1000
# Below this many pairs one process tokenizes faster than a pool that must start and pickle the tokenizer.
_PARALLEL_FROM = 10_000


@dataclass(frozen=True)
class PairSettings:
    """Everything besides the data and the tokenizer that decides which pairs are kept and their token ids."""

    max_length: int
    max_prompt_length: int | None = None
    on_bad_row: OnBadRow = "error"
    split: str | None = None
    rows: tuple[int, int] | None = None
    limit: int | None = None
    columns: dict[str, str] | None = None


class EncodedPairs(Sequence[EncodedPair]):
    """The tokenized pairs of one prepared source, read from the memory-mapped Arrow files row by row."""

    def __init__(self, table) -> None:
        self.table = table  # a datasets.Dataset: prompt_ids, chosen_ids, rejected_ids, truncated, length

    def __len__(self) -> int:
        return self.table.num_rows

    def __getitem__(self, i: int) -> EncodedPair:  # type: ignore[override]
        row = self.table[int(i)]
        return EncodedPair(row["prompt_ids"], row["chosen_ids"], row["rejected_ids"], row["truncated"])

    def __iter__(self) -> Iterator[EncodedPair]:
        for batch in self.table.iter(batch_size=_BATCH_ROWS):
            columns = (batch["prompt_ids"], batch["chosen_ids"], batch["rejected_ids"], batch["truncated"])
            yield from (EncodedPair(*row) for row in zip(*columns))

    def lengths(self) -> list[int]:
        """Each pair's padded width (``collate.pair_length``), read from its column without decoding the ids."""
        return self.table.data.column("length").to_pylist()

    def n_truncated(self) -> int:
        return sum(self.table.data.column("truncated").to_pylist())


def prepare_pairs(
    source: str,
    tokenizer,
    settings: PairSettings,
    cache_root: Path,
    num_proc: int = 0,
    what: str = "train",
) -> Loaded:
    """``load_preferences`` of ``source`` with its pairs tokenized (``tokenize.encode_pairs``): a ``Loaded``
    whose ``examples`` are ``EncodedPairs``, from ``cache_root/<fingerprint>`` when an earlier run prepared
    the same inputs, else validated, tokenized with ``num_proc`` processes (0: ``default_num_proc``) and cached
    there. Row errors are the loader's (``on_bad_row``); nothing is cached when one stops the run."""
    folder = cache_root / fingerprint(source, tokenizer, settings)
    if (folder / "meta.json").is_file():
        loaded = _open(folder, source)
        print(f"{what} data: tokens from the cache {folder} (the source was not read)", file=sys.stderr)
        return loaded
    started = time.perf_counter()
    procs = _build(source, tokenizer, settings, folder, num_proc, what)
    loaded = _open(folder, source)
    print(
        f"{what} data: tokenized {len(loaded.examples)} pairs with {procs} process(es) in "
        f"{time.perf_counter() - started:.1f}s, cached in {folder}",
        file=sys.stderr,
    )
    return loaded


def default_num_proc(n_pairs: int) -> int:
    """1 for small data; else half the CPUs this process may use (the rest run the tokenizer's own threads
    and the machine), at most 8."""
    if n_pairs < _PARALLEL_FROM:
        return 1
    cpus = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count() or 1
    return max(1, min(8, cpus // 2))


# ---------------------------------------------------------------------------------------------
# The fingerprint
# ---------------------------------------------------------------------------------------------


def fingerprint(source: str, tokenizer, settings: PairSettings) -> str:
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


def _build(source: str, tokenizer, settings: PairSettings, folder: Path, num_proc: int, what: str) -> int:
    """Write ``folder``: validate the rows streaming into an Arrow file of texts, tokenize it with datasets'
    ``map`` into the final Arrow files, then meta.json (the mark of a complete folder). Built beside it and
    renamed into place, so a crash or a bad row never leaves a half-built folder. Returns the process count."""
    import datasets

    work = folder.with_name(f"{folder.name}.tmp-{os.getpid()}")
    shutil.rmtree(work, ignore_errors=True)
    work.mkdir(parents=True)
    try:
        loaded = Loaded(examples=[], source=source)
        pairs = iter_preferences(
            loaded, settings.on_bad_row, settings.split, settings.limit, settings.rows, settings.columns
        )
        n_pairs = _write_texts(pairs, work / "texts.arrow")
        if n_pairs == 0:
            raise no_usable_rows(f"{what}_data", source, loaded.n_rows, loaded.skipped)
        procs = min(num_proc or default_num_proc(n_pairs), max(n_pairs, 1))
        texts = datasets.Dataset.from_file(str(work / "texts.arrow"))
        tokens = texts.map(
            _tokenize_batch,
            batched=True,
            batch_size=_BATCH_ROWS,
            remove_columns=texts.column_names,
            fn_kwargs={"tokenizer": tokenizer, "settings": settings},
            features=_features(),
            num_proc=procs if procs > 1 else None,
            cache_file_name=str(work / "pairs.arrow"),
            load_from_cache_file=False,
            new_fingerprint=folder.name,
            desc="tokenizing pairs",
        )
        meta = {
            "source": source,
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


def _write_texts(pairs: Iterable[schemas.PreferencePair], path: Path) -> int:
    """The validated pairs as an Arrow stream file (the layout ``datasets`` memory-maps), a record batch at a
    time; a prompt is stored as JSON, since it is text or a list of messages. Returns the pair count."""
    import pyarrow as pa

    schema = pa.schema([("prompt", pa.string()), ("chosen", pa.string()), ("rejected", pa.string())])
    n = 0
    with pa.OSFile(str(path), "wb") as sink, pa.ipc.new_stream(sink, schema) as writer:
        pairs = iter(pairs)
        while batch := list(islice(pairs, _BATCH_ROWS)):
            prompts = [json.dumps(p.prompt) for p in batch]
            columns = [prompts, [p.chosen for p in batch], [p.rejected for p in batch]]
            writer.write_batch(pa.record_batch(columns, schema=schema))
            n += len(batch)
    return n


def _features():
    import datasets

    ids = datasets.List(datasets.Value("int32"))
    return datasets.Features(
        {
            "prompt_ids": ids,
            "chosen_ids": ids,
            "rejected_ids": ids,
            "truncated": datasets.Value("bool"),
            "length": datasets.Value("int32"),
        }
    )


def _tokenize_batch(batch: dict, tokenizer, settings: PairSettings) -> dict:
    """One ``map`` batch of texts -> the columns of ``_FEATURES`` (runs in the worker processes)."""
    prompts = [json.loads(p) for p in batch["prompt"]]
    encoded = encode_pairs(
        tokenizer, prompts, batch["chosen"], batch["rejected"], settings.max_length, settings.max_prompt_length
    )
    return {
        "prompt_ids": [e.prompt_ids for e in encoded],
        "chosen_ids": [e.chosen_ids for e in encoded],
        "rejected_ids": [e.rejected_ids for e in encoded],
        "truncated": [e.truncated for e in encoded],
        # collate.pair_length, kept so length-sorted batching never decodes the ids
        "length": [len(e.prompt_ids) + max(len(e.chosen_ids), len(e.rejected_ids)) for e in encoded],
    }


def _open(folder: Path, source: str) -> Loaded:
    """A complete cache folder as the ``Loaded`` its build produced, its pairs memory-mapped."""
    import datasets

    meta = json.loads((folder / "meta.json").read_text(encoding="utf-8"))
    parts = [datasets.Dataset.from_file(str(folder / name)) for name in meta["files"]]
    table = parts[0] if len(parts) == 1 else datasets.concatenate_datasets(parts)
    skipped = [BadRow(**bad) for bad in meta["skipped"]]
    return Loaded(examples=EncodedPairs(table), skipped=skipped, n_rows=meta["n_rows"], source=source)
