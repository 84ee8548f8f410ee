"""A stand-in stage for the CLI tests (registered by monkeypatching ``alignkit.cli.STAGES``).

Its config is a TrainConfig subclass with a field of its own and an overridden default (``OTHER``: the same run
with another default, as ipo next to dpo); ``run`` records the resolved config and returns it as the summary, or
raises the error its ``mode`` names.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Literal

from alignkit.config import ConfigError, TrainConfig, config_to_dict, doc_field
from alignkit.errors import AlignkitError, TrainingInterrupted
from alignkit.stages import Stage

LAST_CONFIG: list = []  # every config run() received, so in-process tests can inspect the object itself


@dataclass
class FakeConfig(TrainConfig):
    """A stage that only reports its configuration."""

    learning_rate: float = doc_field(5e-6, "Peak AdamW learning rate (the fake stage's own default).")
    # --- fake stage ---
    beta: float = doc_field(0.1, "Strength of a pretend penalty.")
    mode: Literal[
        "echo",
        "interrupt",
        "diverged",
        "alignkit_error",
        "bad_row",
        "data_source_error",
        "file_not_found",
        "config_error",
        "value_error",
    ] = doc_field("echo", "What run() does: echo the config, or raise one kind of error.")


@dataclass
class OtherConfig(FakeConfig):
    """The same stage under another name with another default (like ipo next to dpo)."""

    beta: float = doc_field(0.5, "Strength of a pretend penalty.")


def run(cfg: FakeConfig) -> dict:
    LAST_CONFIG.append(cfg)
    if cfg.mode == "interrupt":
        raise TrainingInterrupted(str(Path(cfg.output_dir) / "checkpoints" / "step-3"))
    if cfg.mode == "diverged":
        raise TrainingInterrupted("", reason="stopped after 3 consecutive non-finite steps")
    if cfg.mode == "alignkit_error":
        raise AlignkitError("checkpoint runs/x/checkpoints/step-3 is incomplete")
    if cfg.mode == "bad_row":
        from alignkit.data.io import BadRowError

        raise BadRowError(cfg.train_data, 7, "chosen", "missing")
    if cfg.mode == "data_source_error":
        from alignkit.data.io import DataSourceError

        raise DataSourceError(f"{cfg.train_data}: unsupported format")
    if cfg.mode == "file_not_found":
        raise FileNotFoundError(f"data file not found: {cfg.train_data}")
    if cfg.mode == "config_error":
        raise ConfigError("micro_batch_size must divide batch_size")
    if cfg.mode == "value_error":
        raise ValueError("a bug, not a user error")
    return {"stage": "fake", "config": config_to_dict(cfg)}


@dataclass
class PipelineConfig:
    """A pipeline's config (as compare's): no resume_from, since rerunning the command resumes it."""

    output_dir: str = doc_field("runs/p", "Folder of the runs.")


def run_pipeline(cfg: PipelineConfig) -> dict:
    raise TrainingInterrupted(str(Path(cfg.output_dir) / "sft-seed0" / "checkpoints" / "step-3"))


STAGE = Stage("fake", FakeConfig, run)
PIPELINE = Stage("fake-pipeline", PipelineConfig, run_pipeline)
OTHER = Stage("fake-other", OtherConfig, run)  # as ipo next to dpo: another config, the same run
