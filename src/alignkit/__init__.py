"""alignkit: align language models with human and AI preferences.

From Python, each stage runs with its config object or keyword settings, validated as on the command line::

    from alignkit import dpo                  # a Stage (alignkit.stages), imported on first use
    summary = dpo.run(dpo.config(model="...", train_data="pairs.jsonl", output_dir="runs/dpo"))
    summary = alignkit.run("dpo", model="...", train_data="pairs.jsonl", output_dir="runs/dpo")

Stage names with '-' are attributes with '_' (``alignkit.online_dpo``). Nothing heavy is imported until a stage
is used.
"""

from __future__ import annotations

from typing import Any

__version__ = "0.1.0"


def run(stage: str, cfg: Any = None, /, **settings: Any) -> dict | None:
    """Run the stage named ``stage`` (as after ``alignkit`` on the command line) on ``cfg`` (its config object)
    and/or keyword ``settings``, checked as ``load_config`` checks the command line; returns its summary."""
    from alignkit.stages import load_stage

    return load_stage(stage).run(cfg, **settings)


def __getattr__(name: str) -> Any:
    # `from alignkit import dpo` / `alignkit.online_dpo`: the Stage of that name, its module imported now.
    from alignkit.stages import STAGES, load_stage

    if name.replace("_", "-") in STAGES:
        return load_stage(name.replace("_", "-"))
    raise AttributeError(f"module 'alignkit' has no attribute {name!r}")


def __dir__() -> list[str]:
    from alignkit.stages import STAGES

    return sorted([*globals(), *(name.replace("-", "_") for name in STAGES)])
