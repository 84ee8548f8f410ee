"""Snapshots: the policy as a loadable model every ``snapshot_every`` steps (online stages: iterations or rounds),
in ``<run>/snapshots/step-NNNNNN/``, so a run can be judged along its way and not only at its end (``alignkit
compare``'s frontier points, or ``alignkit eval model=<run>/snapshots/step-...``).

A checkpoint is for resuming (optimizer, RNG, only the newest kept, weights under training names); a snapshot is
for loading: written as final/ is, with the tokenizer, and every one kept. With LoRA it holds the policy's adapter
alone (whatever ``merge_lora`` says: a few MB, loaded on the base it records), else the whole model.
"""

from __future__ import annotations

import re
from collections.abc import Callable
from pathlib import Path

from alignkit.models.loading import save_final
from alignkit.training import distributed

SNAPSHOTS = "snapshots"
_NAME = re.compile(r"step-(\d+)")


def snapshot_dir(run_path: Path, step: int) -> Path:
    return Path(run_path) / SNAPSHOTS / f"step-{step:06d}"


def writer(cfg, policy, tokenizer, run_path: Path) -> Callable[[int], None] | None:
    """``write(step)`` for the training loop to call after every step (in every process: under FSDP the weights
    are gathered), writing a snapshot when ``step`` is a multiple of ``cfg.snapshot_every``; None when the config
    asks for none."""
    every = getattr(cfg, "snapshot_every", None)
    if not every:
        return None

    def write(step: int) -> None:
        if step % every == 0:
            path = snapshot_dir(run_path, step)
            distributed.save_from_main(
                policy, lambda state_dict: save_final(policy, tokenizer, path, merge_lora=False, state_dict=state_dict)
            )

    return write


def list_snapshots(run_path: Path) -> list[tuple[int, Path]]:
    """(step, folder) of every snapshot of a run, by step (a folder being written, still a temporary name, is
    not one)."""
    root = Path(run_path) / SNAPSHOTS
    found = [(int(m.group(1)), p) for p in root.glob("step-*") if (m := _NAME.fullmatch(p.name)) and p.is_dir()]
    return sorted(found)
