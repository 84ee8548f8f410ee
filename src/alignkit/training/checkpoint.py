"""Atomic training checkpoints: trainable weights (safetensors), optimizer and scheduler state, RNG states and
the data position, so a resumed run continues exactly where the interrupted one stopped.

Layout of ``checkpoints/step-000123/``: ``weights.safetensors``, ``optimizer.pt``, ``scheduler.pt``,
``rng.pt``, ``state.json``, ``manifest.json`` (each file's size and sha256, checked on resume) and
``COMPLETE`` (written last; a directory without it is never used). A checkpoint whose weights or optimizer
state hold a non-finite value is never written (``NonFiniteState``): the last good one stays the one to
return to. It holds nothing per process, so a run checkpointed by N data-parallel processes resumes in any
number. Under FSDP, whose ranks each hold a shard of every weight and of the AdamW state, the full tensors are
gathered first (``gather_full_state``) and written in the same layout, so an FSDP checkpoint resumes in any
number of processes, under FSDP or not. Under DeepSpeed the engine writes its own files instead
(``save_engine_checkpoint``).
"""

from __future__ import annotations

import hashlib
import json
import os
import random
import re
import shutil
import sys
from collections.abc import Callable
from pathlib import Path

import numpy as np
import torch
from safetensors.torch import load_file, save_file

from alignkit.errors import AlignkitError
from alignkit.training.distributed import (
    barrier,
    broadcast_from_main,
    full_state_options,
    is_main_process,
    is_sharded,
    reshard,
)

COMPLETE_MARKER = "COMPLETE"
MANIFEST = "manifest.json"
_STEP_DIR = re.compile(r"^step-(\d+)$")


class CheckpointError(AlignkitError):
    """A checkpoint that is missing, incomplete, corrupt, or does not fit the model being trained."""


class NonFiniteState(CheckpointError):
    """The weights or optimizer state to be saved hold a NaN or an infinity; nothing was written."""


def checkpoint_dir(checkpoints_dir: Path, step: int) -> Path:
    return Path(checkpoints_dir) / f"step-{step:06d}"


def save_checkpoint(path: Path, model, optimizer, scheduler, state: dict, full_state=None) -> Path:
    """Write a checkpoint to ``path`` atomically and return ``path``.

    Everything goes into ``<path>.tmp-<pid>/`` first, is fsynced, gets its COMPLETE marker and is then
    renamed into place, so a kill at any moment leaves either the whole checkpoint or an ignored tmp dir.
    ``state`` (step, epoch, data position, counters) must be JSON; the RNG states are added here. A sharded
    (FSDP) model's weights and optimizer state come gathered in ``full_state`` (``gather_full_state``).
    """
    path = Path(path)
    # 1. Trainable weights only: the adapter of a LoRA model, every weight of a full fine-tune. Checked before
    #    anything is written: a checkpoint holding a NaN would be "the last good one" only in name.
    if full_state is None:
        weights = {name: p.detach() for name, p in _trainable_parameters(model).items()}
        full_state = (weights, optimizer.state_dict())
    weights, optimizer_state = full_state
    bad = first_nonfinite(weights) or first_nonfinite(_optimizer_tensors(optimizer_state), "optimizer state ")
    if bad:
        raise NonFiniteState(f"{bad} holds a non-finite value (NaN or inf)")
    tmp = path.with_name(f"{path.name}.tmp-{os.getpid()}")
    if tmp.exists():
        shutil.rmtree(tmp)
    tmp.mkdir(parents=True)
    save_file(
        {name: w.to("cpu").contiguous() for name, w in weights.items()}, str(tmp / "weights.safetensors")
    )
    _test_hook_during_save(tmp)
    # 2. Optimizer and scheduler: plain tensors and numbers, so they load with weights_only=True.
    torch.save(optimizer_state, tmp / "optimizer.pt")
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
    # 4. Checksums, durable, then marked complete, then visible under its real name.
    write_manifest(tmp)
    _publish(tmp, path)
    return path


def write_checkpoint(path: Path, model, optimizer, scheduler, state: dict, keep: int) -> str:
    """``save_checkpoint`` as every process of a run calls it: a sharded (FSDP) model's weights and optimizer
    state are gathered whole onto the main process first (every rank takes part), and it is that gathered
    state which is checked; unsharded, every rank holds the same state. The main process writes the checkpoint
    and keeps the newest ``keep``; the others wait. A non-finite state raises ``NonFiniteState`` on every
    rank."""
    full_state = gather_full_state(model, optimizer) if is_sharded(model) else None
    refused = None
    if is_main_process():
        try:
            save_checkpoint(path, model, optimizer, scheduler, state, full_state)
            prune_checkpoints(Path(path).parent, keep, written=Path(path))
        except NonFiniteState as e:
            refused = str(e)
    refused = broadcast_from_main(refused)  # every rank carries on (or not) with the same last checkpoint
    if refused:
        raise NonFiniteState(refused)
    barrier()
    return str(path)


def skipped_checkpoint(
    step_name: str, step: int, error: NonFiniteState, last_good: str | None, log: Callable[[dict], None]
) -> str | None:
    """Report a checkpoint not written because of ``error``: a warning naming the step and the last good
    checkpoint, and a ``checkpoint_skipped`` event through ``log`` (``RunDir.log_metrics``). Returns
    ``last_good`` (None or "": there is none yet), which stays the run's checkpoint to resume from."""
    where = f"the last good checkpoint is {last_good}" if last_good else "no good checkpoint exists yet"
    if is_main_process():
        print(f"warning: no checkpoint written at {step_name} {step}: {error}; {where}", file=sys.stderr)
    log({"event": "checkpoint_skipped", "step": step, "reason": str(error), "last_checkpoint": last_good})
    return last_good


def first_nonfinite(tensors: dict[str, torch.Tensor], prefix: str = "") -> str | None:
    """The name of the first floating-point tensor holding a NaN or an infinity, or None. One reduction per
    tensor and one host sync per device: the slow search for the name runs only when something is wrong."""
    flags: dict[torch.device, list[torch.Tensor]] = {}
    for tensor in tensors.values():
        if tensor.is_floating_point() or tensor.is_complex():
            flags.setdefault(tensor.device, []).append(torch.isfinite(tensor).all())
    if all(bool(torch.stack(device_flags).all()) for device_flags in flags.values()):
        return None
    for name, tensor in tensors.items():
        if (tensor.is_floating_point() or tensor.is_complex()) and not bool(torch.isfinite(tensor).all()):
            return f"{prefix}{name}"
    return None


def _optimizer_tensors(optimizer_state: dict) -> dict[str, torch.Tensor]:
    """The tensors of an ``optimizer.state_dict()`` by a readable name (``3.exp_avg``: parameter 3's)."""
    return {
        f"{index}.{key}": value
        for index, per_param in optimizer_state.get("state", {}).items()
        for key, value in per_param.items()
        if isinstance(value, torch.Tensor)
    }


# --- checksums ----------------------------------------------------------------------------------------------


def write_manifest(directory: Path) -> None:
    """``manifest.json`` in ``directory``: every file below it (relative path) with its size and sha256, so a
    resume can tell a truncated or altered checkpoint from an intact one without trusting any parser. It reads
    every file once more, just written (from the page cache): about a second per GB, small next to the write."""
    directory = Path(directory)
    files = {
        file.relative_to(directory).as_posix(): {"size": file.stat().st_size, "sha256": _sha256(file)}
        for file in sorted(directory.rglob("*"))
        if file.is_file() and file.name not in (MANIFEST, COMPLETE_MARKER)
    }
    (directory / MANIFEST).write_text(json.dumps({"format": 1, "files": files}, indent=1))


def checkpoint_problem(path: Path) -> str | None:
    """What is wrong with the complete checkpoint at ``path`` against its manifest (the first file missing,
    of another size or with another sha256), or None when it is intact. Sizes are compared before anything
    is hashed, so a truncated file costs nothing to find. A checkpoint without a manifest (written before
    alignkit kept checksums) counts as intact; ``resume_checkpoint`` says so."""
    path = Path(path)
    manifest = path / MANIFEST
    if not manifest.is_file():
        return None
    try:
        files = json.loads(manifest.read_text())["files"]
    except (ValueError, KeyError, TypeError):
        return f"{manifest} is not a readable manifest"
    for name, expected in files.items():
        file = path / name
        if not file.is_file():
            return f"{file} is missing"
        size = file.stat().st_size
        if size != expected["size"]:
            return f"{file} has {size} bytes, the manifest says {expected['size']} (truncated or altered)"
    for name, expected in files.items():
        if _sha256(path / name) != expected["sha256"]:
            return f"{path / name} does not match its sha256 in the manifest (altered)"
    return None


def _sha256(file: Path) -> str:
    digest = hashlib.sha256()
    with open(file, "rb") as f:  # in 8 MiB blocks: a checkpoint file can be larger than memory allows twice
        for block in iter(lambda: f.read(8 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def resume_checkpoint(resume_from: str | None, checkpoints_dir: Path) -> str | None:
    """The checkpoint a run resumes from, verified against its manifest, decided by the main process for all.

    ``resume_from`` is a checkpoint directory (it must be complete and intact, or this is a
    ``CheckpointError`` naming the bad file), or "latest": the newest complete checkpoint in
    ``checkpoints_dir`` that is intact, with a warning naming each corrupt one passed over (an error naming
    the newest one's bad file when none is intact), or None when there is none yet (so a restart script can
    always pass it). None/"" starts afresh. Only the checkpoint chosen and those passed over are hashed."""
    chosen, error = None, None
    if is_main_process():
        try:
            chosen = _pick_resume(resume_from, Path(checkpoints_dir))
        except CheckpointError as e:
            error = str(e)
    chosen, error = broadcast_from_main((chosen, error))
    if error is not None:
        raise CheckpointError(error)
    return chosen


def _pick_resume(resume_from: str | None, checkpoints_dir: Path) -> str | None:
    if not resume_from:
        return None
    if resume_from != "latest":
        path = Path(resume_from)
        if not (path / COMPLETE_MARKER).is_file():
            raise CheckpointError(
                f"resume_from: {path} is not a complete checkpoint (no {COMPLETE_MARKER} marker)"
            )
        problem = checkpoint_problem(path)
        if problem:
            raise CheckpointError(f"resume_from: checkpoint {path} is corrupt: {problem}")
        _note_unverified(path)
        return str(path)
    corrupt: list[tuple[Path, str]] = []
    for _, path in reversed(_complete_checkpoints(checkpoints_dir)):
        problem = checkpoint_problem(path)
        if problem is None:
            for bad, why in corrupt:
                print(
                    f"warning: checkpoint {bad} is corrupt ({why}); resuming from {path} instead",
                    file=sys.stderr,
                )
            _note_unverified(path)
            return str(path)
        corrupt.append((path, problem))
    if corrupt:
        newest, why = corrupt[0]
        raise CheckpointError(
            f"resume_from=latest: no intact checkpoint in {checkpoints_dir}; the newest, {newest}, is "
            f"corrupt: {why}" + (f" (and {len(corrupt) - 1} older ones too)" if len(corrupt) > 1 else "")
        )
    return None


def _note_unverified(path: Path) -> None:
    if not (path / MANIFEST).is_file():
        print(
            f"note: {path} was written before checkpoints carried checksums (no {MANIFEST}); resuming "
            "from it unverified",
            file=sys.stderr,
        )


def newest_intact_checkpoint(checkpoints_dir: Path, trusted: str | None = None) -> str | None:
    """The newest complete checkpoint in ``checkpoints_dir`` that matches its manifest, or None. ``trusted``
    (one this process wrote or verified) is taken without hashing it again."""
    for _, path in reversed(_complete_checkpoints(Path(checkpoints_dir))):
        if (trusted is not None and str(path) == str(trusted)) or checkpoint_problem(path) is None:
            return str(path)
    return None


def _test_hook_during_save(tmp: Path) -> None:
    """For the chaos test (tests/test_chaos.py): with ALIGNKIT_TEST_SAVE_HOOK set to "kill", "term" or
    "sleep:SECONDS", a save stops or waits here, its weights written, the rest not, nothing marked complete.
    It acts on the checkpoints of step ALIGNKIT_TEST_SAVE_HOOK_FROM and later (unset: on every one)."""
    action = os.environ.get("ALIGNKIT_TEST_SAVE_HOOK")
    first = int(os.environ.get("ALIGNKIT_TEST_SAVE_HOOK_FROM", "0"))
    step = _STEP_DIR.match(tmp.name.split(".", 1)[0])
    if not action or (step is not None and int(step.group(1)) < first):
        return
    import signal
    import time

    if action == "kill":
        os.kill(os.getpid(), signal.SIGKILL)
    elif action == "term":
        os.kill(os.getpid(), signal.SIGTERM)  # the handler raises at once if this is the second signal
        time.sleep(0.2)  # let the handler run inside the write
    elif action.startswith("sleep:"):
        time.sleep(float(action.split(":", 1)[1]))


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
    it as ``save_checkpoint`` does, manifest included. Every rank must call. It resumes in the same number of
    processes (DeepSpeed's universal checkpoint converts it for another). Its weights are not checked for
    non-finite values (each rank holds only its ZeRO partition): the loop's non-finite step skipping is the
    guard there."""
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
        write_manifest(tmp)  # every rank's files, on the shared filesystem the main process publishes from
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


def gather_full_state(model, optimizer) -> tuple[dict, dict]:
    """A sharded (FSDP) model's trainable weights by name and its optimizer's state, gathered whole onto the main
    process in one process's layout: the weights as ``_trainable_parameters`` names them, the optimizer state as
    ``optimizer.state_dict()`` writes it (parameters numbered in the order of its param groups). Every rank must
    call; the others get empty dicts."""
    from torch.distributed.checkpoint.state_dict import get_model_state_dict, get_optimizer_state_dict

    reshard(model)  # the shards, not the gathered weights an evaluation pass may have left in place
    names = [name for name, p in model.named_parameters() if p.requires_grad]
    weights = get_model_state_dict(model, options=full_state_options())
    by_name = get_optimizer_state_dict(model, optimizer, options=full_state_options())
    if not weights:  # not the main process
        return {}, {}
    # torch.distributed.checkpoint keys the optimizer state by parameter name; torch.optim by position.
    order = [name for group in by_name["param_groups"] for name in group["params"]]
    position = {name: i for i, name in enumerate(order)}
    optimizer_state = {
        "state": {position[name]: value for name, value in by_name["state"].items()},
        "param_groups": [
            {**group, "params": [position[name] for name in group["params"]]}
            for group in by_name["param_groups"]
        ],
    }
    return {name: weights[name] for name in names}, optimizer_state


def _load_sharded(model, optimizer, weights: dict, optimizer_state: dict) -> None:
    """Load full (one-process layout) weights and optimizer state into a sharded (FSDP) model: each rank keeps
    its shard of every tensor. Every rank must call; the main process holds the full tensors and sends each
    rank its shards (the others pass empty dicts), so one process reads the checkpoint."""
    from torch.distributed.checkpoint.state_dict import (
        StateDictOptions,
        set_model_state_dict,
        set_optimizer_state_dict,
    )

    # strict=False: trainable weights only
    options = StateDictOptions(full_state_dict=True, strict=False, broadcast_from_rank0=True)
    set_model_state_dict(model, weights, options=options)
    by_name = {}
    if optimizer_state:
        name_of = {p: name for name, p in model.named_parameters()}
        order = [name_of[p] for group in optimizer.param_groups for p in group["params"]]
        by_name = {
            "state": {order[i]: value for i, value in optimizer_state["state"].items()},
            "param_groups": [
                {**group, "params": [order[i] for i in group["params"]]}
                for group in optimizer_state["param_groups"]
            ],
        }
    set_optimizer_state_dict(model, optimizer, by_name, options=options)


def load_checkpoint(path: Path, model, optimizer, scheduler) -> dict:
    """Restore weights (in place, so tied weights stay tied), optimizer, scheduler and RNG from ``path``.
    A sharded model's weights and optimizer state are read by the main process alone (``_load_sharded``).

    Returns the ``state`` dict given to ``save_checkpoint`` (without the RNG states).
    """
    path = Path(path)
    if not (path / COMPLETE_MARKER).is_file():
        raise CheckpointError(f"{path} is not a complete checkpoint (no {COMPLETE_MARKER} marker)")
    sharded = is_sharded(model)
    params = (
        {name: p for name, p in model.named_parameters() if p.requires_grad}
        if sharded
        else _trainable_parameters(model)
    )
    reads = not sharded or is_main_process()
    weights = load_file(str(path / "weights.safetensors")) if reads else {}
    missing, unexpected = sorted(set(params) - set(weights)), sorted(set(weights) - set(params))
    mismatch = None
    if reads and (missing or unexpected):
        mismatch = (
            f"{path} does not match the trainable parameters of this model "
            f"(missing {missing[:3]}..., unexpected {unexpected[:3]}...); was it trained with other "
            "LoRA settings or another model?"
        )
    if sharded:
        mismatch = broadcast_from_main(mismatch)  # every rank stops, not the main process alone
    if mismatch:
        raise CheckpointError(mismatch)
    optimizer_state = (
        torch.load(path / "optimizer.pt", weights_only=True, map_location="cpu") if reads else {}
    )
    if sharded:
        _load_sharded(model, optimizer, weights, optimizer_state)
    else:
        with torch.no_grad():
            for name, p in params.items():
                p.copy_(weights[name])
        optimizer.load_state_dict(optimizer_state)
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


def prune_checkpoints(checkpoints_dir: Path, keep: int, written: Path | None = None) -> None:
    """Delete all but the newest ``keep`` complete checkpoints, and tmp dirs left by dead processes. Given the
    checkpoint just ``written``, only older ones count and go: newer ones (left by an earlier life of a run
    that resumed from an older or fallen-back-to checkpoint, possibly corrupt) must not push the one just
    written out. Nothing is hashed here."""
    checkpoints_dir = Path(checkpoints_dir)
    complete = _complete_checkpoints(checkpoints_dir)
    if written is not None:
        match = _STEP_DIR.match(Path(written).name)
        if match:
            complete = [(step, path) for step, path in complete if step <= int(match.group(1))]
    for _, path in complete[: -max(keep, 1)]:
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
