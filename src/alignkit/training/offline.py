"""What the offline training stages (sft, rm, dpo/ipo/orpo, kto) do around ``training.loop.train``, written
once: the run folder a stage runs in, its train/eval data selection, the policy loaded and made trainable, the
evaluation whose last outcomes the summary reads, the summary's common fields, and final/. Each stage's own
steps stay in its file.
"""

from __future__ import annotations

import sys
import time
from collections.abc import Callable, Sequence
from typing import Any, TypeVar

import torch

from alignkit.data.prepared import RowKind, RowSettings, prepare_rows
from alignkit.data.schemas import Loaded
from alignkit.evaluation.metrics import mean_ci
from alignkit.models.embedded import cache_dir
from alignkit.models.loading import apply_lora, count_parameters, load_model, pick_device, save_final
from alignkit.models.precision import weights_dtype
from alignkit.training import distributed
from alignkit.training.loop import TrainResult
from alignkit.training.run import RunDir

T = TypeVar("T")  # what a stage's data loader returns


def run_in_folder(cfg: Any, stage: str, body: Callable[[Any, RunDir, float], dict]) -> dict:
    """``body(cfg, run_dir, started)`` in the run folder of ``stage``: checked, locked for this run and
    released however it ends (``RunDir.create``). ``started`` is the wall-clock time the stage began."""
    started = time.time()
    with RunDir.create(cfg.output_dir, stage, cfg.resume_from, cfg=cfg) as run_dir:
        print(f"run folder: {run_dir.path}", file=sys.stderr)
        return body(cfg, run_dir, started)


def load_data(cfg: Any, load: Callable[[str, str | None, Any, int | None, str], T]) -> tuple[T, T | None]:
    """(the training data, the held-out data or None where ``cfg.eval_data`` is unset), each as
    ``load(source, split, rows, max_rows, "train" or "eval")`` returns it from the config's ``train_*`` or
    ``eval_*`` fields."""
    train = load(cfg.train_data, cfg.train_split, cfg.train_rows, cfg.train_max_rows, "train")
    if not cfg.eval_data:
        return train, None
    return train, load(cfg.eval_data, cfg.eval_split, cfg.eval_rows, cfg.eval_max_rows, "eval")


def prepare_data(
    cfg: Any,
    tokenizer,
    kind: RowKind,
    source: str,
    split,
    rows,
    limit,
    what: str,
    margin_column: str | None = None,
) -> Loaded:
    """``data.prepared.prepare_rows`` of one source with the config's settings, cached under
    ``$ALIGNKIT_CACHE/prepared``: a ``Loaded`` whose examples are lazily read ``EncodedRows``."""
    settings = RowSettings(
        cfg.max_length,
        cfg.max_prompt_length,
        cfg.on_bad_row,
        split,
        rows,
        limit,
        cfg.columns,
        kind,
        margin_column,
    )
    return prepare_rows(source, tokenizer, settings, cache_dir() / "prepared", cfg.dataset_num_proc, what)


def load_policy(cfg: Any) -> torch.nn.Module:
    """``cfg.model`` in the run's weights dtype on this process's device (under FSDP only the main process
    reads the weights): the policy, or a frozen copy of it as the reference."""
    return load_model(
        cfg.model, weights_dtype(cfg), cfg.trust_remote_code, pick_device(), distributed.load_on()
    )


def make_trainable(
    model: torch.nn.Module, cfg: Any, add_adapters: Callable = apply_lora
) -> tuple[torch.nn.Module, dict]:
    """``model`` with LoRA adapters where ``cfg.lora`` (``add_adapters(model, cfg)``), in train mode, and its
    parameter counts as the summary names them."""
    if cfg.lora:
        model = add_adapters(model, cfg)
    trainable, total = count_parameters(model)
    model.train()
    return model, {"trainable_parameters": trainable, "total_parameters": total}


class LastEvaluation:
    """The loop's ``eval_fn`` over ``evaluate(model) -> (metrics, *per-example outcomes)``: the loop logs the
    metrics, and the whole outcome of the last call (the final evaluation) stays in ``outcome`` for the
    summary."""

    def __init__(self, evaluate: Callable[[torch.nn.Module], tuple]) -> None:
        self.evaluate = evaluate
        self.outcome: tuple = ()

    def __call__(self, model: torch.nn.Module) -> dict:
        self.outcome = self.evaluate(model)
        return self.outcome[0]


def summary_head(stage: str, cfg: Any, run_dir: RunDir, result: TrainResult, **setup: Any) -> dict:
    """The first fields of a stage's summary.json: what ran, from which model, where, where final/ is, the
    stage's own ``setup`` fields (its reference, its data format), and how many steps the loop took."""
    return {
        "stage": stage,
        "model": cfg.model,
        "run_dir": str(run_dir.path),
        "final_model": str(run_dir.final_dir),
        **setup,
        "steps": result.steps,
    }


def loop_summary(result: TrainResult, monitors) -> dict:
    """The loop's part of the summary: its last logged metrics, time and memory, the monitors' events."""
    return {
        "final_metrics": result.metrics,
        "train_seconds": result.elapsed_s,
        "peak_rss_mb": result.peak_rss_mb,
        "model_state_bytes": result.model_state_bytes,
        "monitor_events": [e.to_row() for e in monitors.events],
    }


def accuracy_summary(correct: Sequence[float], seed: int = 0) -> dict:
    """Held-out pair accuracy with its 95% bootstrap interval (``seed`` seeds the bootstrap)."""
    acc = mean_ci(correct, seed=seed)
    return {"eval_accuracy": acc.value, "eval_accuracy_ci95": [acc.low, acc.high]}


def save_policy(model: torch.nn.Module, tokenizer, run_dir: RunDir, cfg: Any) -> None:
    """final/: the trained model, its adapters merged or not as ``cfg.merge_lora`` says (written by the main
    process, gathered first under FSDP)."""
    distributed.save_from_main(
        model,
        lambda state_dict: save_final(
            model, tokenizer, run_dir.final_dir, merge_lora=cfg.merge_lora, state_dict=state_dict
        ),
    )


def write_summary(run_dir: RunDir, summary: dict, started: float) -> dict:
    """summary.json, with the stage's wall-clock seconds since ``started``; returns the summary."""
    summary["wall_seconds"] = time.time() - started
    run_dir.write_summary(summary)
    return summary
