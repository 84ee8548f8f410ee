"""On-disk cache of per-example reference log-probs, keyed by the model's weights and the exact token ids.

A frozen reference gives the same log-probs for the same tokens every time, so DPO and IPO runs (and a
resumed run) on the same data share one precomputation. The key covers everything the numbers depend
on: the weight files (name, size, mtime), the dtype and how the head is applied (``how``), and every
example's token ids; rows not computed yet are NaN.
"""

from __future__ import annotations

import hashlib
import os
from pathlib import Path

import torch
from safetensors.torch import load_file, save_file

from alignkit.models.embedded import cache_dir


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


def cache_key(model_path: str, how: str, sequences: list[tuple[list[int], ...]]) -> str:
    h = hashlib.sha256()
    h.update(model_fingerprint(model_path).encode())
    h.update(how.encode())
    for seq in sequences:
        for ids in seq:
            h.update(len(ids).to_bytes(4, "little"))
            h.update(torch.tensor(ids, dtype=torch.int64).numpy().tobytes())
    return h.hexdigest()[:32]


def _path(key: str) -> Path:
    return cache_dir() / "reference-logps" / f"{key}.safetensors"


def load(key: str, n_rows: int, n_cols: int) -> torch.Tensor:
    """(n_rows, n_cols) float32; NaN where nothing is cached."""
    path = _path(key)
    if path.is_file():
        values = load_file(str(path))["values"]
        if values.shape == (n_rows, n_cols):
            return values
    return torch.full((n_rows, n_cols), float("nan"))


def save(key: str, values: torch.Tensor) -> None:
    """Atomically (temp file + rename), so a crash never leaves a half-written cache entry."""
    path = _path(key)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(f".tmp-{os.getpid()}")
    save_file({"values": values.contiguous()}, str(tmp))
    os.replace(tmp, path)
