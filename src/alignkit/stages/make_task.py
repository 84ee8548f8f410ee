"""`alignkit make-task arithmetic n=500 seed=0 output=tasks.jsonl`: write a generated task (``alignkit.tasks``)
as prompt files with an ``answer`` column, a training file and a held-out file with no prompt in common, for
``train_data=`` / ``gold_prompts=`` / ``alignkit eval prompts=`` with ``reward=alignkit.scoring.verifiable:
exact_answer``.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Literal

from alignkit.config import SEED_MAX, ConfigError, doc_field, required
from alignkit.data.appendlog import write_jsonl
from alignkit.stages import Stage
from alignkit.tasks import arithmetic


@dataclass
class MakeTaskConfig:
    """Generate a task's problems with their answers and write them as prompt files."""

    task: Literal["arithmetic"] = doc_field("arithmetic", "Which task: arithmetic word problems.")
    output: str = required("Training problems, .jsonl (prompt, answer and how each was made).")
    n: int = doc_field(500, "Training problems to write.", ge=1)
    held_out: int = doc_field(100, "Held-out problems, none of them in the training file; 0: none.", ge=0)
    held_out_output: str | None = doc_field(
        None, "File of the held-out problems; None: <output without .jsonl>.heldout.jsonl."
    )
    level: int = doc_field(1, "Difficulty: 1 one + or -, 2 one of + - x /, 3 two operations.", ge=1, le=3)
    seed: int = doc_field(0, "Seed of the problems and of the split: the same seed writes the same files.", ge=0,
                          le=SEED_MAX)  # fmt: skip
    overwrite: bool = doc_field(False, "Replace existing output files instead of refusing them.")


def held_out_path(cfg: MakeTaskConfig) -> Path:
    if cfg.held_out_output:
        return Path(cfg.held_out_output).expanduser()
    output = Path(cfg.output).expanduser()
    return output.with_name(output.name.removesuffix(".jsonl") + ".heldout.jsonl")


def run(cfg: MakeTaskConfig) -> dict:
    output, held = Path(cfg.output).expanduser(), held_out_path(cfg)
    paths = [output] + ([held] if cfg.held_out else [])
    if output == held and cfg.held_out:
        raise ConfigError("held_out_output must differ from output", ("held_out_output", "output"))
    existing = [str(p) for p in paths if p.exists()]
    if existing and not cfg.overwrite:
        raise ConfigError(f"output: {', '.join(existing)} already exists; pass overwrite=true to replace it")
    try:
        problems = arithmetic.generate(cfg.n + cfg.held_out, cfg.seed, cfg.level)
    except ValueError as err:  # more distinct problems asked for than the level holds
        raise ConfigError(f"n + held_out: {err}", ("n", "held_out")) from None
    train, held_out = arithmetic.split(problems, cfg.held_out)
    write_jsonl(output, [p.row() for p in train])
    if cfg.held_out:
        write_jsonl(held, [p.row() for p in held_out])
    return {
        "stage": "make-task",
        "task": cfg.task,
        "level": cfg.level,
        "seed": cfg.seed,
        "train": str(output),
        "n_train": len(train),
        "held_out": str(held) if cfg.held_out else None,
        "n_held_out": len(held_out),
        "reward": "alignkit.scoring.verifiable:exact_answer",
    }


STAGE = Stage("make-task", MakeTaskConfig, run, positional="task")  # `alignkit make-task arithmetic`
