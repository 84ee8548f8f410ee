"""What a stage is, and the table of stages.

A stage is a name in ``STAGES`` (with the one-line doc ``alignkit --help`` shows) and, in the module the table
names, one ``STAGE = Stage(...)``: its config dataclass, the function that runs it, and how the command line
treats it. The CLI (``alignkit <stage> ...``) and the Python API (``alignkit.run("dpo", ...)``, ``from alignkit
import dpo``) both go through ``load_stage``. This module imports nothing heavy: the table is read without
importing any stage, so ``alignkit --help`` and ``import alignkit`` do not pay for torch.
"""

from __future__ import annotations

import dataclasses
import difflib
import importlib
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

# stage name -> ("module" or "module:ATTR", one-line description for `alignkit --help`). The module's `STAGE`
# (or its `ATTR`, for stages that share a module: ipo and orpo next to dpo) is the Stage of that name. Modules
# are imported only when their stage runs. Adding a stage is one line here and one `STAGE = Stage(...)`.
STAGES: dict[str, tuple[str, str]] = {
    "quickstart": (
        "alignkit.pipelines.quickstart",
        "The main job: a short alignment run on the embedded default model",
    ),
    "compare": (
        "alignkit.pipelines.compare",
        "Train methods x seeds on one model, data and budget; table and reward-vs-KL frontier vs the base",
    ),
    "recommend": (
        "alignkit.pipelines.recommend",
        "Which method to use: ranked by your data, model size, memory and tuning budget, with reasons",
    ),
    "prepare-model": ("alignkit.stages.prepare_model", "Prepare the embedded default model in the cache"),
    "sft": ("alignkit.stages.sft", "Supervised fine-tuning on demonstrations"),
    "dpo": ("alignkit.stages.dpo", "Direct Preference Optimization on chosen/rejected pairs"),
    "ipo": ("alignkit.stages.dpo:IPO", "Identity Preference Optimization (squared loss) on pairs"),
    "orpo": (
        "alignkit.stages.dpo:ORPO",
        "Odds-Ratio Preference Optimization: SFT + preference, no reference",
    ),
    "kto": ("alignkit.stages.kto", "Kahneman-Tversky Optimization on unpaired good/bad feedback (or pairs)"),
    "ppo": ("alignkit.stages.ppo", "RLHF with PPO: policy, reference, reward and value models"),
    "online-dpo": (
        "alignkit.stages.online_dpo",
        "Online DPO: each round samples the policy, scores with a reward, trains on best-vs-worst pairs",
    ),
    "grpo": (
        "alignkit.stages.grpo",
        "Critic-free online RL: GRPO, Dr. GRPO, RLOO, REINFORCE++ advantages over groups of samples",
    ),
    "rm": ("alignkit.stages.rm", "Train a reward model (Bradley-Terry) on chosen/rejected pairs"),
    "rm-eval": (
        "alignkit.stages.rm_eval",
        "Diagnose a reward model on preference files: accuracy vs length rules, length buckets, calibration",
    ),
    "score": (
        "alignkit.stages.score",
        "Score (prompt, response) rows or pairs with a reward model, resumably",
    ),
    "build-prefs": ("alignkit.stages.build_prefs", "Sample responses, rank them, and write preference pairs"),
    "cai-revise": (
        "alignkit.stages.cai_revise",
        "Constitutional AI: answer, critique and revise under principles; writes SFT data",
    ),
    "cai-label": (
        "alignkit.stages.cai_label",
        "RLAIF: an AI judge labels response pairs under a constitution; writes preference pairs",
    ),
    "make-task": (
        "alignkit.stages.make_task",
        "Write a generated task with answers (arithmetic word problems) as training and held-out prompt files",
    ),
    "label": (
        "alignkit.stages.label",
        "People rank responses in a web app (label serve), get tokens (label tokens), export pairs (label export)",
    ),
    "eval": (
        "alignkit.stages.eval",
        "Sample a model and a reference on prompts; scores, win rate, KL, lengths",
    ),
    "report": (
        "alignkit.stages.report",
        "One self-contained HTML page of a run: curves, events, summary, eval",
    ),
}


@dataclass(frozen=True)
class Stage:
    """One runnable stage: ``alignkit <name> [CONFIG.yaml] key=value ...``, or ``stage.run(cfg)`` in Python."""

    name: str  # as typed after `alignkit`; its key in STAGES, which also holds its one-line doc
    config: type  # its config dataclass: every setting, with its default, range and one-line doc
    main: Callable[..., dict | None]  # main(cfg) -> the summary (JSON-able); cfg already validated
    positional: str | None = None  # `alignkit <name> VALUE`: the config field a bare first argument sets
    prints_results: bool = False  # the stage prints its own results, so the CLI does not print the summary

    @property
    def doc(self) -> str:
        """The one-line description ``alignkit --help`` shows."""
        return STAGES[self.name][1]

    def validated(self, cfg: Any = None, /, **settings: Any) -> Any:
        """``cfg`` (default: the stage's config with its defaults) with ``settings`` applied, built and checked
        as ``alignkit.config.load_config`` builds a config from the command line: unknown keys, types,
        required fields, ranges and the class's cross-field ``check()``. Raises ``ConfigError``."""
        from alignkit.config import config_fields, load_config

        if cfg is not None and not isinstance(cfg, self.config):
            raise TypeError(f"stage '{self.name}' takes a {self.config.__name__}, got {type(cfg).__name__}")
        cls = type(cfg) if cfg is not None else self.config
        # Only what differs from the defaults counts as given, so an unset required field reads "missing".
        given = {} if cfg is None else {
            f.name: getattr(cfg, f.name) for f in config_fields(cls) if getattr(cfg, f.name) != _default(f)
        }  # fmt: skip
        return load_config(cls, **given, **settings)

    def run(self, cfg: Any = None, /, **settings: Any) -> dict | None:
        """Run the stage on ``cfg`` and/or keyword ``settings``, validated first (``validated``); returns its
        summary. ``alignkit.run("dpo", model=..., train_data=...)`` is ``load_stage("dpo").run(...)``."""
        return self.main(self.validated(cfg, **settings))


def load_stage(name: str) -> Stage:
    """The Stage registered as ``name`` in STAGES, importing its module. An unknown name is a ConfigError that
    suggests the nearest one."""
    if name not in STAGES:
        from alignkit.config import ConfigError

        raise ConfigError(unknown_stage_message(name))
    module_name, _, attr = STAGES[name][0].partition(":")
    attr = attr or "STAGE"
    stage = getattr(importlib.import_module(module_name), attr, None)
    if not isinstance(stage, Stage) or stage.name != name:
        raise TypeError(f"stage '{name}': {module_name}.{attr} must be Stage('{name}', ...), got {stage!r}")
    return stage


def unknown_stage_message(name: str) -> str:
    close = difflib.get_close_matches(name, list(STAGES), n=1)
    hint = f"; did you mean '{close[0]}'?" if close else ""
    return f"unknown stage '{name}'{hint}\nstages: {', '.join(STAGES)} (`alignkit --help` describes each)"


def _default(f: dataclasses.Field) -> Any:
    if f.default_factory is not dataclasses.MISSING:
        return f.default_factory()
    return f.default
