"""The run folder every training stage writes: config.yaml, metrics.jsonl, summary.json, checkpoints/,
final/ and tensorboard/. ``RunDir`` creates it (or finds it again on resume) and appends the metrics.

In a run launched in several processes, the main process picks the folder and is the only one that writes
these files; on the others the writing methods do nothing.
"""

from __future__ import annotations

import json
import math
import os
import resource
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from alignkit.config import ConfigError, save_config
from alignkit.training import distributed
from alignkit.training.checkpoint import latest_checkpoint


@dataclass
class RunDir:
    path: Path
    tensorboard: bool = True
    writes: bool = True  # False on every process but the main one of a launched run
    _writer: Any = field(default=None, init=False, repr=False)
    # TensorBoard events at or after this step are dropped when the writer opens (set on resume).
    _purge_step: int | None = field(default=None, init=False, repr=False)

    @classmethod
    def create(
        cls, output_dir_template: str, stage: str, resume_from: str | None, tensorboard: bool = True
    ) -> RunDir:
        """Fill ``{stage}`` and ``{time}`` in the template and make the folder.

        Resuming from ``<run>/checkpoints/step-N`` reuses ``<run>``. ``resume_from="latest"`` with a
        ``{time}`` template reuses the newest existing run folder matching it (or starts a new one when
        there is none). A fresh run refuses a folder that already holds metrics or checkpoints, so two
        runs never interleave their logs. In several processes the main process decides, for all of them.
        """
        found, error = None, None
        if distributed.is_main_process():
            try:
                found = str(cls._find_or_make(output_dir_template, stage, resume_from))
            except ConfigError as e:
                error = str(e)
        found, error = distributed.broadcast_from_main((found, error))
        if error is not None:
            raise ConfigError(error)
        return cls(Path(found), tensorboard, writes=distributed.is_main_process())

    @staticmethod
    def _find_or_make(output_dir_template: str, stage: str, resume_from: str | None) -> Path:
        if resume_from and resume_from != "latest":
            checkpoint = Path(resume_from)
            if checkpoint.parent.name == "checkpoints":
                return checkpoint.parent.parent
        template = output_dir_template.replace("{stage}", stage)
        if resume_from == "latest" and "{time}" in template:
            pattern = Path(template.replace("{time}", "*"))
            candidates = sorted(pattern.parent.glob(pattern.name)) if pattern.parent.is_dir() else []
            candidates = [c for c in candidates if latest_checkpoint(c / "checkpoints") is not None]
            if candidates:
                return candidates[-1]
        path = Path(template.replace("{time}", time.strftime("%Y%m%d-%H%M%S")))
        if not resume_from and ((path / "metrics.jsonl").exists() or latest_checkpoint(path / "checkpoints")):
            raise ConfigError(
                f"output_dir: {path} already holds a run; pass resume_from=latest to continue it "
                "or choose another output_dir"
            )
        path.mkdir(parents=True, exist_ok=True)
        return path

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
        """Append one JSON object to metrics.jsonl (flushed at once) and its numbers to TensorBoard."""
        if not self.writes:
            return
        row = {k: _json_safe(v) for k, v in row.items()}
        with open(self.metrics_path, "a", encoding="utf-8") as f:
            f.write(json.dumps(row) + "\n")
            f.flush()
        if self.tensorboard and "step" in row and "event" not in row:
            writer = self._tensorboard_writer()
            for key, value in row.items():
                if key != "step" and isinstance(value, (int, float)) and not isinstance(value, bool):
                    writer.add_scalar(key, value, row["step"])
            writer.flush()

    def write_summary(self, summary: dict) -> None:
        """Write summary.json atomically: a reader sees the old file or the new one, never half of one."""
        if not self.writes:
            return
        tmp = self.summary_path.with_name(f"{self.summary_path.name}.tmp-{os.getpid()}")
        tmp.write_text(json.dumps({k: _json_safe(v) for k, v in summary.items()}, indent=2) + "\n")
        os.replace(tmp, self.summary_path)

    def truncate_metrics_after(self, step: int) -> None:
        """Drop metrics rows logged after ``step`` (on resume, so each step appears exactly once)."""
        self._purge_step = step + 1
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

    def latest_checkpoint(self) -> Path | None:
        """The newest complete checkpoint in checkpoints/, or None."""
        return latest_checkpoint(self.checkpoints_dir)

    def close(self) -> None:
        if self._writer is not None:
            self._writer.close()
            self._writer = None

    def _tensorboard_writer(self):
        if self._writer is None:
            from torch.utils.tensorboard import SummaryWriter

            self._writer = SummaryWriter(str(self.tensorboard_dir), purge_step=self._purge_step)
        return self._writer


def peak_rss_mb() -> float:
    """Peak resident memory of this process in MiB (ru_maxrss is KiB on Linux, bytes on macOS)."""
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return peak / 2**20 if sys.platform == "darwin" else peak / 2**10


def _json_safe(value: Any) -> Any:
    # Strict JSON has no NaN/Infinity; write them as strings so jq and friends can still read the file.
    if isinstance(value, float) and not math.isfinite(value):
        return str(value)
    return value
