"""Experiment trackers a run reports to (``report_to=``): TensorBoard, Weights & Biases, MLflow and Trackio, each
through its own client. One small interface, written once: ``RunDir`` opens the run's trackers and hands them the
config, every metrics row, every monitor event and the held-out table, so no stage has tracker code of its own.

The W&B, MLflow and Trackio clients are optional extras (``pip install 'alignkit[wandb]'``); a missing one is a
``ConfigError`` before the run folder is written. Where each tracker stores its runs is its own setting
(``WANDB_MODE``/``WANDB_DIR``, ``MLFLOW_TRACKING_URI``, ``TRACKIO_DIR``), as its users know it.
"""

from __future__ import annotations

import contextlib
import importlib.util
import json
import re
import sys
import time
from pathlib import Path
from typing import Any, Protocol

import yaml

from alignkit.config import ConfigError
from alignkit.errors import AlignkitError
from alignkit.reporting.cards import EVAL_COLUMNS, eval_table_rows, markdown_table, read_yaml

# report_to name -> (the module its client imports as, the project's name in messages)
CLIENTS = {
    "wandb": ("wandb", "Weights & Biases"),
    "mlflow": ("mlflow", "MLflow"),
    "trackio": ("trackio", "Trackio"),
}
IDS_NAME = "trackers.json"  # <run>/trackers.json: each tracker's run id, so a resume logs to the same run


class TrackerError(AlignkitError):
    """A tracker's client refused to start a run (not logged in, a tracking server out of reach, ...)."""


class Tracker(Protocol):
    """What a run logs to a tracker. ``id`` is what a resume needs to log to the same tracker run."""

    id: str | None

    def log_metrics(self, metrics: dict[str, float], step: int) -> None: ...

    def log_event(self, event: dict) -> None: ...

    def log_table(self, name: str, columns: list[str], rows: list[list], step: int | None) -> None: ...

    def close(self, failed: bool = False) -> None: ...


def selected(report_to: list[str] | tuple[str, ...]) -> list[str]:
    """The trackers ``report_to`` names, in order, without 'none' (which names no tracker)."""
    return [name for name in dict.fromkeys(report_to) if name != "none"]


def check_clients(report_to: list[str] | tuple[str, ...]) -> None:
    """Raise ConfigError, naming the pip extra, for the first tracker whose client is not installed."""
    for name in selected(report_to):
        if name in CLIENTS and importlib.util.find_spec(CLIENTS[name][0]) is None:
            module, title = CLIENTS[name]
            raise ConfigError(
                f"report_to={name} needs the {title} client ({module}), which is not installed: "
                f"pip install 'alignkit[{name}]'",
                ("report_to",),
            )


def open_trackers(
    report_to: list[str] | tuple[str, ...], run_path: Path, project: str, config: dict, resuming: bool
) -> list[Tracker]:
    """Start (or, ``resuming``, continue) the run of each tracker ``report_to`` names for the run folder
    ``run_path``, named as the folder, ``config`` logged; each tracker's run id goes to <run>/trackers.json.
    A client that refuses to start closes the ones already started and raises TrackerError."""
    check_clients(report_to)
    ids = read_ids(run_path) if resuming else {}
    opened: list[Tracker] = []
    for name in selected(report_to):
        try:
            opened.append(_OPENERS[name](run_path, project, config, ids.get(name)))
        except (
            Exception
        ) as e:  # the client's own error, whatever its class: said in one line, nothing left open
            close_all(opened, failed=True)
            raise TrackerError(f"report_to={name}: could not start a {CLIENTS[name][1]} run: {e}") from e
    write_ids(run_path, {**ids, **{n: t.id for n, t in zip(selected(report_to), opened) if t.id}})
    return opened


def log_eval_table(run_path: Path, eval_result: dict) -> None:
    """``alignkit eval`` of a run's final/: its policy-vs-reference table to the trackers the run reported to
    (their runs continued), at the run's last step."""
    config = read_yaml(Path(run_path) / "config.yaml")
    step = read_yaml(Path(run_path) / "summary.json").get("steps")  # JSON is YAML
    opened = open_trackers(
        config.get("report_to") or [], run_path, config.get("tracker_project"), config, True
    )
    try:
        for tracker in opened:
            tracker.log_table("eval", EVAL_COLUMNS, eval_table_rows(eval_result), step)
    finally:
        close_all(opened)


def close_all(trackers: list[Tracker], failed: bool = False) -> None:
    for tracker in trackers:
        tracker.close(failed)


def read_ids(run_path: Path) -> dict:
    path = Path(run_path) / IDS_NAME
    return json.loads(path.read_text(encoding="utf-8")) if path.is_file() else {}


def write_ids(run_path: Path, ids: dict) -> None:
    if ids:
        (Path(run_path) / IDS_NAME).write_text(json.dumps(ids, indent=2) + "\n", encoding="utf-8")


def event_text(event: dict) -> str:
    """A monitor event row as one line: its step and message, or its other fields where it has no message."""
    rest = {k: v for k, v in event.items() if k not in ("event", "step", "message")}
    return (
        f"step {event.get('step')}: {event.get('message') or json.dumps(rest, sort_keys=True, default=str)}"
    )


def _level(event: dict) -> str:
    """ "error" for an event that stops the run, else "warn" (W&B's and Trackio's alert levels)."""
    return "error" if event.get("action") == "stop" else "warn"


class TensorBoardTracker:
    """<run>/tensorboard: scalars per step, events and tables as text. The writer opens at the first write, so
    a resume's ``purge_step`` (the steps after its checkpoint) is known by then."""

    id = None

    def __init__(self, run_path: Path, project: str, config: dict, run_id: str | None) -> None:
        self.folder = Path(run_path) / "tensorboard"
        self.purge_step: int | None = None
        self._fresh = not self.folder.exists()
        self._config_text = "```yaml\n" + yaml.safe_dump(config, sort_keys=False) + "```"
        self._writer: Any = None

    def _write(self):
        if self._writer is None:
            from torch.utils.tensorboard import SummaryWriter

            self._writer = SummaryWriter(str(self.folder), purge_step=self.purge_step)
            if self._fresh:  # a resumed or evaluated run's config is already there
                self._writer.add_text("config", self._config_text, 0)
        return self._writer

    def log_metrics(self, metrics: dict[str, float], step: int) -> None:
        writer = self._write()
        for key, value in metrics.items():
            writer.add_scalar(key, value, step)
        writer.flush()

    def log_event(self, event: dict) -> None:
        self._write().add_text(f"events/{event['event']}", event_text(event), event.get("step", 0))
        self._writer.flush()

    def log_table(self, name: str, columns: list[str], rows: list[list], step: int | None) -> None:
        self._write().add_text(name, markdown_table(columns, rows), step or 0)
        self._writer.flush()

    def close(self, failed: bool = False) -> None:
        if self._writer is not None:
            self._writer.close()
            self._writer = None


class WandbTracker:
    """A W&B run (``wandb.init``), offline too (``WANDB_MODE=offline``); monitor events are W&B alerts."""

    def __init__(self, run_path: Path, project: str, config: dict, run_id: str | None) -> None:
        import wandb

        self._wandb = wandb
        self.run = wandb.init(
            project=project,
            name=Path(run_path).name,
            config=config,
            id=run_id,
            resume="allow" if run_id else None,
        )
        self.id = self.run.id

    def log_metrics(self, metrics: dict[str, float], step: int) -> None:
        self.run.log(metrics, step=step)

    def log_event(self, event: dict) -> None:
        level = self._wandb.AlertLevel.ERROR if _level(event) == "error" else self._wandb.AlertLevel.WARN
        self.run.alert(title=f"alignkit: {event['event']}", text=event_text(event), level=level)

    def log_table(self, name: str, columns: list[str], rows: list[list], step: int | None) -> None:
        # mixed types: a held-out figure may be a number or an interval, a reference cell None
        self.run.log({name: self._wandb.Table(columns=columns, data=rows, allow_mixed_types=True)}, step=step)

    def close(self, failed: bool = False) -> None:
        self.run.finish(exit_code=1 if failed else 0)


# MLflow takes metric keys of letters, digits and _ - . / and space only, and param values of 6000 characters.
_MLFLOW_KEY = re.compile(r"[^\w\-./ ]")
_MLFLOW_PARAM_CHARS = 6000


class MlflowTracker:
    """An MLflow run in the experiment ``project`` of the tracking URI MLflow is given (``MLFLOW_TRACKING_URI``),
    through ``MlflowClient`` (no process-global active run): the config as params and config.yaml, monitor
    events as tags ``alignkit.event.<step>.<monitor>``, tables as table artifacts."""

    def __init__(self, run_path: Path, project: str, config: dict, run_id: str | None) -> None:
        from mlflow.entities import Param
        from mlflow.tracking import MlflowClient

        self.client = MlflowClient()
        if run_id is None:
            experiment = self.client.get_experiment_by_name(project)
            experiment_id = experiment.experiment_id if experiment else self.client.create_experiment(project)
            run_id = self.client.create_run(experiment_id, run_name=Path(run_path).name).info.run_id
            params = [Param(k, str(v)[:_MLFLOW_PARAM_CHARS]) for k, v in config.items()]
            for start in range(0, len(params), 100):  # log_batch takes at most 100 params
                self.client.log_batch(run_id, params=params[start : start + 100])
            self.client.log_dict(run_id, config, "config.yaml")
        self.id = run_id

    def log_metrics(self, metrics: dict[str, float], step: int) -> None:
        from mlflow.entities import Metric

        now = int(time.time() * 1000)
        batch = [Metric(_MLFLOW_KEY.sub("_", k), float(v), now, step) for k, v in metrics.items()]
        self.client.log_batch(self.id, metrics=batch)

    def log_event(self, event: dict) -> None:
        self.client.set_tag(
            self.id, f"alignkit.event.{event.get('step')}.{event['event']}", event_text(event)
        )

    def log_table(self, name: str, columns: list[str], rows: list[list], step: int | None) -> None:
        data = {column: [row[i] for row in rows] for i, column in enumerate(columns)}
        self.client.log_table(self.id, data=data, artifact_file=f"{name}.json")

    def close(self, failed: bool = False) -> None:
        self.client.set_terminated(self.id, "FAILED" if failed else "FINISHED")


class TrackioTracker:
    """A Trackio run in its local store (``TRACKIO_DIR``, or a Space where Trackio is set up for one);
    monitor events are Trackio alerts. Trackio's notices go to stderr: stdout carries the run's summary."""

    def __init__(self, run_path: Path, project: str, config: dict, run_id: str | None) -> None:
        import trackio

        self._trackio = trackio
        with contextlib.redirect_stdout(sys.stderr):
            self.run = trackio.init(
                project=project,
                name=run_id or Path(run_path).name,
                config=config,
                resume="must" if run_id else "never",
            )
        self.id = self.run.name

    def log_metrics(self, metrics: dict[str, float], step: int) -> None:
        self.run.log(metrics, step=step)

    def log_event(self, event: dict) -> None:
        level = self._trackio.AlertLevel.ERROR if _level(event) == "error" else self._trackio.AlertLevel.WARN
        with contextlib.redirect_stdout(sys.stderr):
            self.run.alert(title=f"alignkit: {event['event']}", text=event_text(event), level=level)

    def log_table(self, name: str, columns: list[str], rows: list[list], step: int | None) -> None:
        self.run.log({name: self._trackio.Table(columns=columns, data=rows)}, step=step)

    def close(self, failed: bool = False) -> None:
        with contextlib.redirect_stdout(sys.stderr):
            self.run.finish()


_OPENERS = {
    "tensorboard": TensorBoardTracker,
    "wandb": WandbTracker,
    "mlflow": MlflowTracker,
    "trackio": TrackioTracker,
}
