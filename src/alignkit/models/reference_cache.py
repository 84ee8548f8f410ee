"""On-disk cache of per-example reference log-probs, keyed by the model's weights and the exact token ids.

A frozen reference gives the same log-probs for the same tokens every time, so DPO and IPO runs (and a
resumed run) on the same data share one precomputation. The key covers everything the numbers depend
on: the weight files (name, size, mtime), the dtype and how the head is applied (``how``), and the rows'
token ids (named by the prepared data's fingerprint, or hashed one by one); rows not computed yet are NaN.
Stored as safetensors, one named (N,) tensor per field of the log-probs' record
(``training.preference.PairLogprobs``).
"""

from __future__ import annotations

import dataclasses
import hashlib
import os
from collections.abc import Iterable
from pathlib import Path
from typing import TypeVar

import torch
from safetensors.torch import load_file, save_file

from alignkit.models.embedded import cache_dir

T = TypeVar("T")  # a dataclass whose every field is a tensor


def model_fingerprint(model_path: str) -> str:
    """Weight files' names, sizes and mtimes for a local directory; the id itself for a hub model."""
    path = Path(model_path)
    if not path.is_dir():
        return f"hub:{model_path}"
    parts = [str(path.resolve())]
    for f in sorted(path.iterdir()):
        if f.suffix in (".safetensors", ".json") and f.is_file():
            st = f.stat()
            parts.append(f"{f.name}:{st.st_size}:{st.st_mtime_ns}")
    return "|".join(parts)


def cache_key(model_path: str, how: str, data: str) -> str:
    """The entry of ``model_path``'s log-probs computed as ``how`` says on the rows that ``data`` names: a
    prepared cache folder's fingerprint (``data.prepared.EncodedRows.fingerprint``: it decides every id), or
    ``tokens_fingerprint`` of rows from anywhere else."""
    h = hashlib.sha256()
    for part in (model_fingerprint(model_path), how, data):
        h.update(part.encode())
        h.update(b"\0")
    return h.hexdigest()[:32]


def tokens_fingerprint(sequences: Iterable[tuple[list[int], ...]]) -> str:
    """A hash of every row's token ids (one pass over them all)."""
    h = hashlib.sha256()
    for seq in sequences:
        for ids in seq:
            h.update(len(ids).to_bytes(4, "little"))
            h.update(torch.tensor(ids, dtype=torch.int64).numpy().tobytes())
    return "tokens:" + h.hexdigest()


def _path(key: str) -> Path:
    return cache_dir() / "reference-logps" / f"{key}.safetensors"


def load(key: str, record: type[T], n_rows: int) -> T:
    """A ``record`` (a dataclass of tensors, e.g. ``PairLogprobs``) of (n_rows,) float32 tensors, one per field,
    NaN where nothing is cached. A file without exactly those names and shapes (another layout, such as the
    unnamed (N, 4) "values" of alignkit <= 0.1) counts as nothing cached: it is recomputed, never misread."""
    names = [f.name for f in dataclasses.fields(record)]
    path = _path(key)
    if path.is_file():
        stored = load_file(str(path))  # safetensors: named tensors only, no pickle
        if sorted(stored) == sorted(names) and all(stored[n].shape == (n_rows,) for n in names):
            return record(**{n: stored[n] for n in names})
    return empty(record, n_rows)


def empty(record: type[T], n_rows: int) -> T:
    """A ``record`` of (n_rows,) float32 NaN tensors: nothing computed yet."""
    return record(**{f.name: torch.full((n_rows,), float("nan")) for f in dataclasses.fields(record)})


def save(key: str, values) -> None:
    """Write ``values`` (a dataclass of tensors) as one named tensor per field, atomically (temp file + rename),
    so a crash never leaves a half-written cache entry."""
    path = _path(key)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(f".tmp-{os.getpid()}")
    save_file({f.name: getattr(values, f.name).contiguous() for f in dataclasses.fields(values)}, str(tmp))
    os.replace(tmp, path)
