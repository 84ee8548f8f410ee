"""Atomic training checkpoints: trainable weights (safetensors), optimizer and scheduler state, RNG states and
the data position, so a resumed run continues exactly where the interrupted one stopped.

Layout of ``checkpoints/step-000123/``: ``weights.safetensors``, ``optimizer.pt``, ``scheduler.pt``,
``rng.pt``, ``state.json`` and ``COMPLETE`` (written last; a directory without it is never used). It holds
nothing per process, so a run checkpointed by N data-parallel processes resumes in any number. Under DeepSpeed,
whose ranks each hold a slice of the optimizer state, the engine writes its own files instead
(``save_engine_checkpoint``).
"""

from __future__ import annotations

import json
import os
import random
import re
import shutil
from pathlib import Path

import numpy as np
import torch
from safetensors.torch import load_file, save_file

from alignkit.errors import AlignkitError

COMPLETE_MARKER = "COMPLETE"
_STEP_DIR = re.compile(r"^step-(\d+)$")


class CheckpointError(AlignkitError):
    """A checkpoint that is missing, incomplete, or does not fit the model being trained."""


def checkpoint_dir(checkpoints_dir: Path, step: int) -> Path:
    return Path(checkpoints_dir) / f"step-{step:06d}"


def save_checkpoint(path: Path, model, optimizer, scheduler, state: dict) -> Path:
    """Write a checkpoint to ``path`` atomically and return ``path``.

    Everything goes into ``<path>.tmp-<pid>/`` first, is fsynced, gets its COMPLETE marker and is then
    renamed into place, so a kill at any moment leaves either the whole checkpoint or an ignored tmp dir.
    ``state`` (step, epoch, data position, counters) must be JSON; the RNG states are added here.
    """
    path = Path(path)
    tmp = path.with_name(f"{path.name}.tmp-{os.getpid()}")
    if tmp.exists():
        shutil.rmtree(tmp)
    tmp.mkdir(parents=True)

    # 1. Trainable weights only: the adapter of a LoRA model, every weight of a full fine-tune.
    weights = {name: p.detach().to("cpu").contiguous() for name, p in _trainable_parameters(model).items()}
    save_file(weights, str(tmp / "weights.safetensors"))
    # 2. Optimizer and scheduler: plain tensors and numbers, so they load with weights_only=True.
    torch.save(optimizer.state_dict(), tmp / "optimizer.pt")
    torch.save(scheduler.state_dict(), tmp / "scheduler.pt")
    # 3. RNG: torch's as tensors, python's and numpy's as JSON next to the data position.
    torch_rng = {"cpu": torch.get_rng_state()}
    if torch.cuda.is_available():
        torch_rng["cuda"] = torch.cuda.get_rng_state_all()
    torch.save(torch_rng, tmp / "rng.pt")
    py_version, py_state, py_gauss = random.getstate()
    np_kind, np_keys, np_pos, np_has_gauss, np_gauss = np.random.get_state()
    state = dict(state)
    state["rng"] = {
        "python": [py_version, list(py_state), py_gauss],
        "numpy": [np_kind, np_keys.tolist(), int(np_pos), int(np_has_gauss), float(np_gauss)],
    }
    (tmp / "state.json").write_text(json.dumps(state))
    # 4. Durable, then marked complete, then visible under its real name.
    _publish(tmp, path)
    return path


def _publish(tmp: Path, path: Path) -> None:
    """Make the finished checkpoint ``tmp`` durable, mark it complete and rename it to ``path``."""
    for file in tmp.iterdir():
        _fsync(file)
    (tmp / COMPLETE_MARKER).write_text("")
    _fsync(tmp / COMPLETE_MARKER)
    _fsync(tmp)
    if path.exists():
        # Re-saving a step (a resumed run passing an old checkpoint): os.replace cannot replace a
        # non-empty directory, so move the old one aside first; the newer ones stay valid meanwhile.
        old = path.with_name(f"{path.name}.old-{os.getpid()}")
        os.replace(path, old)
        os.replace(tmp, path)
        shutil.rmtree(old)
    else:
        os.replace(tmp, path)
    _fsync(path.parent)


def save_engine_checkpoint(path: Path, accelerator, scheduler, state: dict) -> Path:
    """A DeepSpeed checkpoint at ``path``: every rank writes its slices of the weights and optimizer state and
    its RNG (Accelerate's ``save_state``); the main process adds the scheduler and state.json, then publishes
    it as ``save_checkpoint`` does. Every rank must call. It resumes in the same number of processes
    (DeepSpeed's universal checkpoint converts it for another)."""
    path = Path(path)
    tmp = path.with_name(f"{path.name}.tmp-engine")  # one name for all ranks
    if accelerator.is_main_process and tmp.exists():
        shutil.rmtree(tmp)
    accelerator.wait_for_everyone()
    accelerator.save_state(str(tmp))
    accelerator.wait_for_everyone()
    if accelerator.is_main_process:
        torch.save(scheduler.state_dict(), tmp / "scheduler.pt")
        state = {**state, "engine": "deepspeed", "world_size": accelerator.num_processes}
        (tmp / "state.json").write_text(json.dumps(state))
        _publish(tmp, path)
    accelerator.wait_for_everyone()
    return path


def load_engine_checkpoint(path: Path, accelerator, scheduler) -> dict:
    """Restore a ``save_engine_checkpoint`` into the prepared engine (each rank its slices and RNG) and the
    scheduler; returns its state.json. Every rank must call."""
    path = Path(path)
    if not (path / COMPLETE_MARKER).is_file():
        raise CheckpointError(f"{path} is not a complete checkpoint (no {COMPLETE_MARKER} marker)")
    state = json.loads((path / "state.json").read_text())
    if state["world_size"] != accelerator.num_processes:
        raise CheckpointError(
            f"{path} was written by DeepSpeed in {state['world_size']} processes; resume it in as many (or "
            "convert it with DeepSpeed's universal checkpoint)"
        )
    accelerator.load_state(str(path))
    scheduler.load_state_dict(torch.load(path / "scheduler.pt", weights_only=True, map_location="cpu"))
    return state


def checkpoint_engine(path: Path) -> str:
    """Who wrote the checkpoint at ``path``: "deepspeed" (``save_engine_checkpoint``) or "torch"."""
    path = Path(path)
    if not (path / COMPLETE_MARKER).is_file():
        raise CheckpointError(f"{path} is not a complete checkpoint (no {COMPLETE_MARKER} marker)")
    return json.loads((path / "state.json").read_text()).get("engine", "torch")


def load_checkpoint(path: Path, model, optimizer, scheduler) -> dict:
    """Restore weights (in place, so tied weights stay tied), optimizer, scheduler and RNG from ``path``.

    Returns the ``state`` dict given to ``save_checkpoint`` (without the RNG states).
    """
    path = Path(path)
    if not (path / COMPLETE_MARKER).is_file():
        raise CheckpointError(f"{path} is not a complete checkpoint (no {COMPLETE_MARKER} marker)")
    params = _trainable_parameters(model)
    weights = load_file(str(path / "weights.safetensors"))
    missing, unexpected = sorted(set(params) - set(weights)), sorted(set(weights) - set(params))
    if missing or unexpected:
        raise CheckpointError(
            f"{path} does not match the trainable parameters of this model "
            f"(missing {missing[:3]}..., unexpected {unexpected[:3]}...); was it trained with other "
            "LoRA settings or another model?"
        )
    with torch.no_grad():
        for name, p in params.items():
            p.copy_(weights[name])
    optimizer.load_state_dict(torch.load(path / "optimizer.pt", weights_only=True, map_location="cpu"))
    scheduler.load_state_dict(torch.load(path / "scheduler.pt", weights_only=True, map_location="cpu"))

    state = json.loads((path / "state.json").read_text())
    rng = state.pop("rng")
    py_version, py_state, py_gauss = rng["python"]
    random.setstate((py_version, tuple(py_state), py_gauss))
    np_kind, np_keys, np_pos, np_has_gauss, np_gauss = rng["numpy"]
    np.random.set_state((np_kind, np.array(np_keys, dtype=np.uint32), np_pos, np_has_gauss, np_gauss))
    torch_rng = torch.load(path / "rng.pt", weights_only=True)
    torch.set_rng_state(torch_rng["cpu"])
    if "cuda" in torch_rng and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(torch_rng["cuda"])
    return state


def latest_checkpoint(checkpoints_dir: Path) -> Path | None:
    """The complete ``step-N`` checkpoint with the largest N; tmp dirs and unmarked dirs are ignored."""
    complete = _complete_checkpoints(Path(checkpoints_dir))
    return complete[-1][1] if complete else None


def prune_checkpoints(checkpoints_dir: Path, keep: int) -> None:
    """Delete all but the newest ``keep`` complete checkpoints, and tmp dirs left by dead processes."""
    checkpoints_dir = Path(checkpoints_dir)
    for _, path in _complete_checkpoints(checkpoints_dir)[: -max(keep, 1)]:
        shutil.rmtree(path)
    for path in checkpoints_dir.glob("step-*.*-*"):
        pid = path.name.rsplit("-", 1)[-1]
        if pid.isdigit() and not _process_alive(int(pid)):
            shutil.rmtree(path, ignore_errors=True)


def _complete_checkpoints(checkpoints_dir: Path) -> list[tuple[int, Path]]:
    if not checkpoints_dir.is_dir():
        return []
    found = []
    for path in checkpoints_dir.iterdir():
        match = _STEP_DIR.match(path.name)
        if match and (path / COMPLETE_MARKER).is_file():
            found.append((int(match.group(1)), path))
    return sorted(found)


def _trainable_parameters(model) -> dict[str, torch.nn.Parameter]:
    """Trainable parameters by name, each storage once.

    ``named_parameters`` already lists a tied parameter (lm_head = embed_tokens) once; distinct
    Parameter objects viewing the same memory are skipped too, since safetensors refuses shared memory.
    Loading copies in place into the kept one, which restores every alias with it.
    """
    params, seen = {}, set()
    for name, p in model.named_parameters():
        key = (p.data_ptr(), tuple(p.shape), tuple(p.stride()))
        if p.requires_grad and key not in seen:
            seen.add(key)
            params[name] = p
    return params


def _fsync(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def _process_alive(pid: int) -> bool:
    if pid == os.getpid():
        return True
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True
