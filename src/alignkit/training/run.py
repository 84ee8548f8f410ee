"""The run folder every training stage writes: config.yaml, metrics.jsonl, summary.json, checkpoints/,
final/ and tensorboard/. ``RunDir`` creates it (or finds it again on resume), appends the metrics and hands them
to the run's trackers (``report_to``: alignkit.reporting.trackers).

What a run folder promises (see ``RunDir.create``):
- it is alignkit's: ``.alignkit-run.json`` names the stage that made it, and a stage writes only into an empty
  or new folder or a run folder of its own stage, so no file of the user's is overwritten;
- one run at a time: the run holds an exclusive lock on ``.alignkit-lock`` (``RunFolderLock``) while it lives;
- a resume keeps the run what it was: settings that change what the run computes are refused before
  anything is written; the ones that only extend or report it are honoured and recorded in resumes.jsonl,
  while config.yaml keeps the original.

In a run launched in several processes, the main process picks the folder, holds the lock and is the only
one that writes these files; on the others the writing methods do nothing.
"""

from __future__ import annotations

import fcntl
import json
import math
import os
import re
import resource
import shlex
import socket
import sys
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import yaml

from alignkit import __version__
from alignkit.config import ConfigError, config_to_dict, save_config, with_current_names
from alignkit.reporting import cards, trackers
from alignkit.training import distributed
from alignkit.training.checkpoint import COMPLETE_MARKER, latest_checkpoint

MARKER_NAME = ".alignkit-run.json"  # {"stage", "config_class", "created", "alignkit_version"}
LOCK_NAME = ".alignkit-lock"  # the holder's {"pid", "host", "since", "command"}; empty when released
RESUMES_NAME = "resumes.jsonl"  # a row per resume that changed settings: {"step", "changed": {f: [old, new]}}

# The settings a resume may change (resume_from and output_dir aside). They decide how long the run goes on
# (max_steps, epochs, ppo's iterations, online-dpo's rounds), how it reports and saves, not what its steps so
# far computed; a resume that changes one is honoured and recorded in resumes.jsonl. A resume that changes
# any other field (model, data, learning rate, batch sizes, seed, loss settings, LoRA, ...) is refused: the
# checkpoint holds state made under the old value (the scheduler even restores the old learning rate), so the
# result would be neither the old run nor a new one. One set for every config class: a name a class lacks
# never differs.
RESUME_MAY_CHANGE = frozenset(
    {
        "max_steps", "epochs", "iterations", "rounds",
        "save_every", "keep_checkpoints", "log_every", "eval_every", "snapshot_every",
        "progress", "report_to", "tracker_project", "num_threads", "merge_lora", "allow_zero_learning_rate",
        # the same numbers computed another way (tested equal): recomputed activations, sampling on the shards
        "gradient_checkpointing", "fsdp_generation",
    }
)  # fmt: skip
# Where the run is, not what it does: a resume differs here by nature; neither compared nor recorded.
_WHERE = frozenset({"resume_from", "output_dir"})

_HEADER = re.compile(r"^# (\w+) \([\w.]+\), written by alignkit\.")  # save_config's first line
_STEP_DIR = re.compile(r"^step-(\d+)$")


@dataclass
class RunDir:
    path: Path
    writes: bool = True  # False on every process but the main one of a launched run
    # The trackers of the config's report_to (started by create() on the main process; none without a config).
    trackers: list[trackers.Tracker] = field(default_factory=list, repr=False)
    _lock: RunFolderLock | None = field(default=None, init=False, repr=False)
    _cfg: Any = field(default=None, init=False, repr=False)  # the run's config, given to create()

    @classmethod
    def create(
        cls,
        output_dir_template: str,
        stage: str,
        resume_from: str | None,
        cfg: Any = None,
    ) -> RunDir:
        """Fill ``{stage}`` and ``{time}`` in the template, make the folder and lock it for this run.

        Resuming from ``<run>/checkpoints/step-N`` reuses ``<run>``. ``resume_from="latest"`` with a
        ``{time}`` template reuses the newest existing run folder matching it (or starts a new one when
        there is none). Refused, each before anything is written: a ``resume_from`` that is not a complete
        checkpoint; an ``output_dir`` that is a file, cannot be made or written, or is a non-empty folder that
        is not a run folder of ``stage``; a folder another live run holds; a fresh run on a folder that
        already holds metrics or checkpoints; and, given ``cfg``, a resume that changes a setting outside
        ``RESUME_MAY_CHANGE``, or a ``report_to`` tracker whose client is not installed. Given ``cfg``, config.yaml
        is written for a fresh run and kept on a resume, and the trackers of its ``report_to`` are started (a
        resume continues their runs).

        A folder without the marker, from alignkit before it wrote one, counts as a run folder of ``stage``
        when its config.yaml says in its first line that alignkit wrote it for ``cfg``'s config class.

        The lock is held until ``release()`` (or the end of a ``with`` block on the RunDir, or the process).
        In several processes the main process decides and holds the lock, for all of them.
        """
        found, error, lock = None, None, None
        if distributed.is_main_process():
            try:
                trackers.check_clients(getattr(cfg, "report_to", ()))
                path, lock = _open_run_folder(output_dir_template, stage, resume_from, cfg)
                found = str(path)
            except ConfigError as e:
                error = str(e)
        found, error = distributed.broadcast_from_main((found, error))
        if error is not None:
            raise ConfigError(error)
        run = cls(Path(found), writes=distributed.is_main_process())
        run._lock = lock
        run._cfg = cfg
        if run.writes and cfg is not None:
            try:  # before any training: an offline or unauthorised hub or tracker fails the run now, not after it
                if getattr(cfg, "push_to_hub", False):
                    cards.check_hub(cfg.hub_model_id, cfg.hub_private)
                if hasattr(cfg, "report_to"):
                    run.trackers = trackers.open_trackers(
                        cfg.report_to, run.path, cfg.tracker_project, config_to_dict(cfg), bool(resume_from)
                    )
            except (cards.HubError, trackers.TrackerError):
                run.release()
                raise
        return run

    def __enter__(self) -> RunDir:
        return self

    def __exit__(self, exc_type, *exc_info) -> None:
        self.release(failed=exc_type is not None)

    def release(self, failed: bool = False) -> None:
        """Close the trackers (their runs marked failed where ``failed``) and give the folder's lock back (what
        a finished run does)."""
        opened, self.trackers = self.trackers, []  # ended once
        try:
            trackers.close_all(opened, failed)
        finally:
            if self._lock is not None:
                self._lock.release()
                self._lock = None

    @property
    def config_path(self) -> Path:
        return self.path / "config.yaml"

    @property
    def metrics_path(self) -> Path:
        return self.path / "metrics.jsonl"

    @property
    def summary_path(self) -> Path:
        return self.path / "summary.json"

    @property
    def checkpoints_dir(self) -> Path:
        return self.path / "checkpoints"

    @property
    def final_dir(self) -> Path:
        return self.path / "final"

    @property
    def tensorboard_dir(self) -> Path:
        return self.path / "tensorboard"

    def write_config(self, cfg: Any) -> None:
        """config.yaml: the run's full configuration (``alignkit.config.save_config``)."""
        if self.writes:
            save_config(cfg, self.config_path)

    def log_metrics(self, row: dict) -> None:
        """Append one JSON object to metrics.jsonl (flushed at once) and give it to the trackers: a monitor
        event (a row with "event") as an event, a step's row as its numbers."""
        if not self.writes:
            return
        numbers = {
            k: v for k, v in row.items() if k != "step" and isinstance(v, (int, float)) and not isinstance(v, bool)
        }  # before json_safe: a tracker takes nan and inf as numbers
        row = json_safe(row)
        with open(self.metrics_path, "a", encoding="utf-8") as f:
            f.write(json.dumps(row) + "\n")
            f.flush()
        for tracker in self.trackers:
            if "event" in row:
                tracker.log_event(row)
            elif "step" in row:
                tracker.log_metrics(numbers, row["step"])

    def write_summary(self, summary: dict) -> None:
        """Write summary.json atomically: a reader sees the old file or the new one, never half of one.
        The settings resumes changed (resumes.jsonl) go in as "resumes". With push_to_hub, final/ is uploaded
        after its card is written, and where it went is added as "pushed_to", to summary.json and to
        ``summary`` itself (the dict the stage returns and the CLI prints)."""
        if not self.writes:
            return
        resumes = self.resumes()  # resumes.jsonl, read once
        self._replace_summary(summary, resumes)
        heldout = cards.heldout_figures(summary)
        if heldout:  # the held-out evaluation at the end, as a table in each tracker
            rows = [[name, value] for name, value in heldout.items()]
            for tracker in self.trackers:
                tracker.log_table("held_out", ["metric", "value"], rows, summary.get("steps"))
        # final/ is written before the summary in every stage: its model card says what the summary says.
        if cards.write_model_card(self.path) and getattr(self._cfg, "push_to_hub", False):
            pushed = cards.push_final(self.final_dir, self._cfg.hub_model_id, self._cfg.hub_private)
            summary["pushed_to"] = asdict(pushed)
            self._replace_summary(summary, resumes)
            print(f"pushed final/ to {pushed.commit_url}", file=sys.stderr)

    def _replace_summary(self, summary: dict, resumes: list[dict]) -> None:
        summary = {**summary, "resumes": resumes} if resumes else summary
        tmp = self.summary_path.with_name(f"{self.summary_path.name}.tmp-{os.getpid()}")
        tmp.write_text(json.dumps(json_safe(summary), indent=2) + "\n")
        os.replace(tmp, self.summary_path)

    def truncate_metrics_after(self, step: int) -> None:
        """Drop metrics rows logged after ``step`` (on resume, so each step appears exactly once)."""
        for tracker in self.trackers:  # TensorBoard drops its events after ``step`` when its writer opens
            if isinstance(tracker, trackers.TensorBoardTracker):
                tracker.purge_step = step + 1
        if not self.writes or not self.metrics_path.exists():
            return
        lines = self.metrics_path.read_text(encoding="utf-8").splitlines(keepends=True)
        # A run killed mid-write can leave a last line without its newline; it is dropped with the rest.
        kept = [line for line in lines if line.endswith("\n") and json.loads(line).get("step", 0) <= step]
        tmp = self.metrics_path.with_name(f"{self.metrics_path.name}.tmp-{os.getpid()}")
        tmp.write_text("".join(kept), encoding="utf-8")
        os.replace(tmp, self.metrics_path)

    def logged_rows(self) -> list[dict]:
        """Every row of metrics.jsonl, on every rank (read by the main process): what a resumed run logged."""
        rows = None
        if self.writes:
            text = self.metrics_path.read_text(encoding="utf-8") if self.metrics_path.exists() else ""
            rows = [json.loads(line) for line in text.splitlines()]
        return distributed.broadcast_from_main(rows)

    def resumes(self) -> list[dict]:
        """The rows of resumes.jsonl: each resume that changed settings, at which step, old and new values."""
        return read_resumes(self.path)

    def latest_checkpoint(self) -> Path | None:
        """The newest complete checkpoint in checkpoints/, or None."""
        return latest_checkpoint(self.checkpoints_dir)



class RunFolderLock:
    """An exclusive ``flock`` on ``<folder>/.alignkit-lock``, a file naming its holder (pid, host, since,
    command).

    The kernel drops a flock when its process ends, however it ends (SIGKILL included), so a dead holder never
    blocks a new run; the file it leaves still names it, and the next holder says it takes that stale lock
    over. A clean release empties the file. The file itself stays (removing it would let two processes lock
    two different files of the same name). flock needs a local file system (or NFS with lock support).
    """

    def __init__(self, fd: int, folder: Path) -> None:
        self._fd: int | None = fd
        self.folder = folder

    @classmethod
    def acquire(cls, folder: Path) -> RunFolderLock:
        """Lock ``folder`` (which must exist) or raise ConfigError naming the live holder."""
        path = folder / LOCK_NAME
        try:
            fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o644)
        except OSError as e:
            raise ConfigError(f"output_dir: cannot write in {folder}: {e.strerror or e}") from None
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            holder = _read_holder(fd)
            os.close(fd)
            raise ConfigError(
                f"output_dir: {folder} is in use by another run ({_describe_holder(holder)}); wait for it to "
                "end, or choose another output_dir"
            ) from None
        previous = _read_holder(fd)
        if previous:  # a holder that never released: it died (the kernel dropped its flock)
            # A live pid here is a new process that reuses the number; the holder itself is gone.
            state = "pid" if _alive_here(previous) else "dead pid"
            print(
                f"stale lock from {state} {previous.get('pid')} ({previous.get('command')}, since "
                f"{previous.get('since')}) on {folder}, taking it over",
                file=sys.stderr,
            )
        holder = {
            "pid": os.getpid(),
            "host": socket.gethostname(),
            "since": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
            "command": shlex.join(sys.argv),
        }
        os.ftruncate(fd, 0)
        os.pwrite(fd, (json.dumps(holder) + "\n").encode(), 0)
        return cls(fd, folder)

    def release(self) -> None:
        if self._fd is None:
            return
        try:
            os.ftruncate(self._fd, 0)  # empty: released cleanly, not a stale lock
            fcntl.flock(self._fd, fcntl.LOCK_UN)
        finally:
            os.close(self._fd)
            self._fd = None


def read_marker(folder: Path) -> dict | None:
    """The run folder's ``.alignkit-run.json``, or None when it has none (or a file that is no marker)."""
    try:
        marker = json.loads((Path(folder) / MARKER_NAME).read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return None
    return marker if isinstance(marker, dict) and isinstance(marker.get("stage"), str) else None


def mark_folder(folder: Path, stage: str, config_class: str | None) -> None:
    """Mark ``folder`` as a run folder alignkit made for ``stage`` (written whole, then renamed in place), unless
    it holds a marker already: the first run's, with its creation time, is kept."""
    if read_marker(folder) is not None:
        return
    marker = {
        "stage": stage,
        "config_class": config_class,
        "created": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
        "alignkit_version": __version__,
    }
    tmp = Path(folder) / f"{MARKER_NAME}.tmp-{os.getpid()}"
    tmp.write_text(json.dumps(marker, indent=2) + "\n", encoding="utf-8")
    os.replace(tmp, Path(folder) / MARKER_NAME)


def folder_entries(folder: Path) -> list[str]:
    """What ``folder`` holds, by name (sorted), leaving out the lock file alone (a lock is no content)."""
    return sorted(p.name + ("/" if p.is_dir() else "") for p in Path(folder).iterdir() if p.name != LOCK_NAME)


def show_entries(entries: list[str], most: int = 5) -> str:
    """``a, b/, c and 4 more``: a few of a folder's entries, for a message."""
    shown = ", ".join(entries[:most])
    return shown + (f" and {len(entries) - most} more" if len(entries) > most else "")


def folder_problem(path: Path, stage: str, config_class: str | None) -> str | None:
    """Why ``path`` cannot be the run folder of ``stage``, or None when it can: it does not exist, is empty,
    is marked for ``stage``, or (made before markers) its config.yaml says alignkit wrote it for
    ``config_class``."""
    if not path.exists():
        return None
    if not path.is_dir():
        return f"output_dir: {path} is a file, not a folder"
    try:
        entries = folder_entries(path)
    except OSError as e:
        return f"output_dir: cannot read {path}: {e.strerror or e}"
    if not entries:
        return None
    marker = read_marker(path)
    if marker is not None:
        if marker["stage"] == stage:
            return None
        return (
            f"output_dir: {path} is the run folder of an alignkit {marker['stage']} run, not of {stage}; "
            "choose another output_dir"
        )
    if config_class is not None and _config_header_class(path / "config.yaml") == config_class:
        return None
    return (
        f"output_dir: {path} is not empty and is not an alignkit {stage} run folder (no {MARKER_NAME}); it "
        f"holds {show_entries(entries)}. Nothing was written; choose a new or empty output_dir"
    )


def read_resumes(folder: Path) -> list[dict]:
    path = Path(folder) / RESUMES_NAME
    if not path.is_file():
        return []
    return [json.loads(line) for line in path.read_text(encoding="utf-8").splitlines() if line.strip()]


def resume_changes(saved: dict, current: dict) -> tuple[dict, dict]:
    """The fields whose value differs between a run's ``saved`` settings and the ``current`` ones, as
    ``{name: [old, new]}``, split into (honoured: in RESUME_MAY_CHANGE, refused: the rest). Not compared:
    resume_from, output_dir, and a field only one side knows (added or removed in another alignkit
    version)."""
    compared = [k for k in current if k in saved and k not in _WHERE]
    changed = {k: [saved[k], current[k]] for k in compared if saved[k] != current[k]}
    honoured = {k: v for k, v in changed.items() if k in RESUME_MAY_CHANGE}
    refused = {k: v for k, v in changed.items() if k not in RESUME_MAY_CHANGE}
    return honoured, refused


def claim_folder(path: Path, stage: str, config_class: str | None) -> RunFolderLock:
    """Check that ``path`` may be ``stage``'s folder (``folder_problem``: new, empty, or one alignkit made for
    ``stage``), make it and lock it; returns the lock, held for the run. A folder alignkit did not make is
    refused with a ConfigError that names what it holds, and nothing is written in it."""
    problem = folder_problem(path, stage, config_class)
    if problem:
        raise ConfigError(problem)
    try:
        path.mkdir(parents=True, exist_ok=True)
    except OSError as e:
        raise ConfigError(f"output_dir: cannot make the folder {path}: {e.strerror or e}") from None
    return RunFolderLock.acquire(path)


def _open_run_folder(
    template: str, stage: str, resume_from: str | None, cfg: Any
) -> tuple[Path, RunFolderLock]:
    """The main process's part of ``RunDir.create``: check everything, then make, lock and write."""
    config_class = type(cfg).__name__ if cfg is not None else None
    named = _named_checkpoint(resume_from)
    path = _run_path(template, stage, resume_from, named)
    lock = claim_folder(path, stage, config_class)
    try:
        # Under the lock: what another run may have written up to the moment it ended.
        checkpoint = named if resume_from != "latest" else latest_checkpoint(path / "checkpoints")
        if not resume_from and ((path / "metrics.jsonl").exists() or latest_checkpoint(path / "checkpoints")):
            raise ConfigError(
                f"output_dir: {path} already holds a run; pass resume_from=latest to continue it "
                "or choose another output_dir"
            )
        honoured = _check_resume(path, cfg, checkpoint) if checkpoint is not None and cfg is not None else {}
        # Everything checked; now write.
        mark_folder(path, stage, config_class)
        if cfg is not None and (checkpoint is None or not (path / "config.yaml").exists()):
            save_config(cfg, path / "config.yaml")
        if honoured:
            row = {"step": _checkpoint_step(checkpoint), "checkpoint": str(checkpoint), "changed": honoured}
            with open(path / RESUMES_NAME, "a", encoding="utf-8") as f:
                f.write(json.dumps(row) + "\n")
            changes = ", ".join(f"{k} {old!r} -> {new!r}" for k, (old, new) in honoured.items())
            print(f"resuming with {changes} (recorded in {RESUMES_NAME})", file=sys.stderr)
    except OSError as e:
        lock.release()
        raise ConfigError(f"output_dir: cannot write in {path}: {e.strerror or e}") from None
    except BaseException:
        lock.release()
        raise
    return path, lock


def _named_checkpoint(resume_from: str | None) -> Path | None:
    """The checkpoint ``resume_from`` names (None for none or "latest"); refused unless it is complete."""
    if not resume_from or resume_from == "latest":
        return None
    checkpoint = Path(resume_from)
    if not checkpoint.is_dir():
        raise ConfigError(f"resume_from: {checkpoint} does not exist (or is not a checkpoint folder)")
    if not (checkpoint / COMPLETE_MARKER).is_file():
        raise ConfigError(
            f"resume_from: {checkpoint} is not a complete checkpoint (no {COMPLETE_MARKER} marker: its run "
            "stopped while writing it); resume_from=latest picks the newest complete one"
        )
    return checkpoint


def _run_path(template: str, stage: str, resume_from: str | None, named: Path | None) -> Path:
    if named is not None and named.parent.name == "checkpoints":
        return named.parent.parent
    template = template.replace("{stage}", stage)
    if resume_from == "latest" and "{time}" in template:
        pattern = Path(template.replace("{time}", "*"))
        candidates = sorted(pattern.parent.glob(pattern.name)) if pattern.parent.is_dir() else []
        candidates = [c for c in candidates if latest_checkpoint(c / "checkpoints") is not None]
        if candidates:
            return candidates[-1]
    return Path(template.replace("{time}", time.strftime("%Y%m%d-%H%M%S")))


def _check_resume(path: Path, cfg: Any, checkpoint: Path) -> dict:
    """Compare ``cfg`` with the run's settings (config.yaml as changed by earlier resumes); refuse a change
    outside RESUME_MAY_CHANGE, naming each field with its old and new value; return the honoured changes."""
    config_path = path / "config.yaml"
    if not config_path.is_file():
        return {}  # nothing recorded to compare with (a checkpoint from outside a run folder)
    try:
        saved = yaml.safe_load(config_path.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, yaml.YAMLError) as e:
        raise ConfigError(f"resume_from: cannot read the run's settings in {config_path}: {e}") from None
    if not isinstance(saved, dict):
        raise ConfigError(f"resume_from: {config_path} does not hold a run's settings")
    for row in read_resumes(path):  # the run's settings as its earlier resumes left them
        saved.update({k: new for k, (_, new) in row.get("changed", {}).items()})
    # A field renamed since the run was written compares under its new name (max_train_rows: train_max_rows).
    honoured, refused = resume_changes(with_current_names(type(cfg), saved), config_to_dict(cfg))
    if refused:
        changes = "; ".join(f"{k}: {old!r} -> {new!r}" for k, (old, new) in refused.items())
        raise ConfigError(
            f"resume_from: {checkpoint} belongs to a run with other settings ({changes}). These change "
            f"what the run computes, so a resume keeps them as {config_path} has them; to train with the new "
            "ones, "
            "start a new run in another output_dir. A resume may change only: "
            + ", ".join(sorted(RESUME_MAY_CHANGE))
        )
    return honoured


def _checkpoint_step(checkpoint: Path) -> int | None:
    match = _STEP_DIR.match(checkpoint.name)
    return int(match.group(1)) if match else None


def _config_header_class(config_path: Path) -> str | None:
    """The config class named in the first line save_config writes, or None."""
    try:
        with open(config_path, encoding="utf-8") as f:
            match = _HEADER.match(f.readline())
    except (OSError, UnicodeDecodeError):
        return None
    return match.group(1) if match else None


def _read_holder(fd: int) -> dict:
    try:
        holder = json.loads(os.pread(fd, 4096, 0).decode() or "{}")
    except (OSError, ValueError):
        return {}
    return holder if isinstance(holder, dict) else {}


def _describe_holder(holder: dict) -> str:
    if not holder:
        return "holder not recorded yet"
    host = f" on {holder.get('host')}" if holder.get("host") != socket.gethostname() else ""
    if not host and holder.get("pid") == os.getpid():
        return f"this process, since {holder.get('since')}: a RunDir not yet released"
    return f"pid {holder.get('pid')}{host}, since {holder.get('since')}: {holder.get('command')}"


def _alive_here(holder: dict) -> bool:
    """Whether the holder's pid runs on this host (a pid on another host cannot be checked: not alive)."""
    if holder.get("host") != socket.gethostname() or not isinstance(holder.get("pid"), int):
        return False
    try:
        os.kill(holder["pid"], 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def peak_rss_mb() -> float:
    """Peak resident memory of this process in MiB (ru_maxrss is KiB on Linux, bytes on macOS)."""
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return peak / 2**20 if sys.platform == "darwin" else peak / 2**10


def model_state_bytes(modules: list, optimizer) -> int:
    """The model state a run holds, measured on the live objects at the end of training: the weights of
    ``modules`` (each storage once, so a LoRA base that is also the reference counts once), one gradient per
    parameter the optimizer trains, and the optimizer's state tensors. Activations are not in it, so it is
    what `alignkit recommend`'s memory estimate (a floor without activations) predicts. Gradients are counted
    by size: backward materialises them every step and ``zero_grad(set_to_none=True)`` frees them after.
    Under FSDP the parameters and their state are DTensors: each process counts its own shard (``to_local``),
    so the figure is this process's share."""

    def local(t):  # a DTensor's own shard (its storage, its size); a plain tensor as it is
        return t.to_local() if hasattr(t, "to_local") else t

    storages = {}
    for module in modules:
        for p in module.parameters():
            storage = local(p).untyped_storage()
            storages[storage.data_ptr()] = storage.nbytes()
    trained = {id(p): local(p) for group in optimizer.param_groups for p in group["params"]}
    grads = sum(p.numel() * p.element_size() for p in trained.values())
    moments = sum(
        local(v).numel() * local(v).element_size()
        for state in optimizer.state.values()
        for v in state.values()
        if hasattr(v, "numel")
    )
    return sum(storages.values()) + grads + moments


def json_safe(value: Any) -> Any:
    # Strict JSON has no NaN/Infinity; write them as strings so jq and friends can still read the file, at any
    # depth (a summary's diagnostics nest them).
    if isinstance(value, float) and not math.isfinite(value):
        return str(value)
    if isinstance(value, dict):
        return {k: json_safe(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [json_safe(v) for v in value]
    return value
