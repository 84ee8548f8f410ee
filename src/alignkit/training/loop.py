"""The one training loop every stage calls: AdamW with warmup and a schedule, gradient accumulation that equals
one big batch, clipping, non-finite step skipping, metrics.jsonl + TensorBoard, periodic evaluation, atomic
checkpoints, exact resume, and SIGINT/SIGTERM -> checkpoint -> ``TrainingInterrupted``.

Launched in several processes (``torchrun``, ``accelerate launch``), the same loop runs data parallel (DDP),
under DeepSpeed ZeRO or sharded by FSDP2, with the single-process semantics: see docs/architecture.md, "Scaling
out".
"""

from __future__ import annotations

import contextlib
import math
import random
import signal
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field

import numpy as np
import torch
from tqdm import tqdm

from alignkit.config import ConfigError, TrainConfig
from alignkit.errors import TrainingInterrupted
from alignkit.models import precision
from alignkit.models.loading import enable_gradient_checkpointing
from alignkit.training import distributed
from alignkit.training.checkpoint import (
    NonFiniteState,
    checkpoint_dir,
    checkpoint_engine,
    load_checkpoint,
    load_engine_checkpoint,
    prune_checkpoints,
    resume_checkpoint,
    save_engine_checkpoint,
    skipped_checkpoint,
    write_checkpoint,
)
from alignkit.training.run import RunDir, peak_rss_mb
from alignkit.training.schedule import build_optimizer, build_scheduler
from alignkit.training.signals import StopSignals, stopped_at_once

# More consecutive non-finite steps than this end the run: a few are a bad batch, a streak is divergence.
MAX_CONSECUTIVE_NONFINITE = 5


@dataclass
class NonFiniteSteps:
    """The non-finite policy of every training loop (``train`` and the online engine's): a step whose loss or
    gradient norm is not finite is skipped by the caller, logged here as a "nonfinite" event and counted, and
    more than ``MAX_CONSECUTIVE_NONFINITE`` in a row end the run."""

    total: int = 0  # steps skipped over the whole run (a resumed run carries the count on)
    consecutive: int = 0  # the streak now: periodic checkpoints wait for it to end

    def record(
        self, finite: bool, step: int, loss: float, grad_norm: float, log: Callable[[dict], None]
    ) -> None:
        """Count one optimizer step, ``log`` (``RunDir.log_metrics``) an event row for a skipped one."""
        if finite:
            self.consecutive = 0
            return
        self.total += 1
        self.consecutive += 1
        event = {"event": "nonfinite", "step": step, "loss": loss, "grad_norm": grad_norm}
        log({**event, "consecutive": self.consecutive})

    def stop_if_diverged(self, last_checkpoint: str | None) -> None:
        """End the run after a streak, naming ``last_checkpoint`` (written after a good step: a periodic
        checkpoint is not written inside a streak) to resume from."""
        if self.consecutive > MAX_CONSECUTIVE_NONFINITE:
            raise TrainingInterrupted(
                checkpoint=last_checkpoint or "",
                reason=f"stopped after {self.consecutive} consecutive non-finite losses or gradients"
                + ("" if last_checkpoint else " (no checkpoint had been written)"),
            )


@dataclass
class StepOutput:
    loss_sum: torch.Tensor  # () loss summed over the micro-batch's items; requires grad
    metrics: dict[str, float] = field(default_factory=dict)  # sums over the micro-batch's items


@dataclass
class TrainResult:
    steps: int
    metrics: dict  # the last logged training row and the last evaluation
    elapsed_s: float
    peak_rss_mb: float
    n_nonfinite_skipped: int
    last_checkpoint: str | None


LogCallback = Callable[[int, dict], "str | None"]


def seed_and_threads(cfg) -> None:
    """Seed python, numpy and torch from ``cfg.seed`` (LoRA's A matrices are drawn from torch's) and set the
    CPU threads to ``cfg.num_threads`` if given."""
    random.seed(cfg.seed)
    np.random.seed(cfg.seed)
    torch.manual_seed(cfg.seed)
    if cfg.num_threads:
        torch.set_num_threads(cfg.num_threads)


def epoch_permutation(seed: int, epoch: int, n_examples: int) -> list[int]:
    """The order in which epoch `epoch` visits the examples (seeded, so a resumed run sees the same)."""
    return torch.randperm(n_examples, generator=torch.Generator().manual_seed(seed + epoch)).tolist()


def visited_indices(cfg: TrainConfig, n_examples: int) -> list[int]:
    """Sorted indices of the examples a run with `cfg` trains on: all of them, unless max_steps ends the
    run inside the first epoch. Lets a stage precompute per-example work (reference log-probs) only once
    and only where it is needed."""
    steps_per_epoch = math.ceil(n_examples / cfg.batch_size)
    total_steps = cfg.max_steps or cfg.epochs * steps_per_epoch
    if total_steps >= steps_per_epoch:
        return list(range(n_examples))
    return sorted(epoch_permutation(cfg.seed, 0, n_examples)[: total_steps * cfg.batch_size])


def train(
    cfg: TrainConfig,
    model: torch.nn.Module,
    examples: Sequence,
    collate_fn: Callable[[list], dict],
    step_fn: Callable[[torch.nn.Module, dict], StepOutput],
    run: RunDir,
    eval_fn: Callable[[torch.nn.Module], dict] | None = None,
    on_log: LogCallback | Sequence[LogCallback] | None = None,
    monitors=None,
    sample_fn: Callable[[torch.nn.Module, int], dict] | None = None,
) -> TrainResult:
    """Train ``model`` (already on its device) on ``examples``; see docs/architecture.md for the contract.

    ``collate_fn(examples) -> dict`` must hold ``n_items``, the loss normaliser of that micro-batch (and may
    hold ``n_tokens`` for a tokens/s rate). ``step_fn(model, microbatch) -> StepOutput`` returns the loss
    *summed* over the micro-batch's items, and the same metric keys for every micro-batch. ``on_log(step, row)``
    callbacks may return "stop" to end training early (with the final evaluation and checkpoint). ``monitors``
    (an ``alignkit.evaluation.monitors.MonitorSet``) sees every logged row; its events are written to
    metrics.jsonl and a "stop" action ends the run. ``sample_fn(model, step)`` (``training.sample_watch``) adds
    the metrics of the policy's samples to a logged row when they are due.

    In several processes each rank trains on its share of every global batch (``rank_microbatches``). A rank
    whose share of a micro-step is empty runs a stand-in instead: the batch's first example with ``n_items``
    0, whose loss is multiplied by 0 and whose metrics are dropped; it keeps the ranks' collectives in step and
    adds nothing (a ``step_fn`` that sums across ranks itself, like KTO's z0, must count nothing from it).
    """
    callbacks = [on_log] if callable(on_log) else list(on_log or [])
    if not examples:
        raise ValueError("no training examples")
    accelerator = distributed.accelerator()
    engine = distributed.engine()  # "none" (one process), "ddp", "deepspeed" or "fsdp"
    rank, world = accelerator.process_index, accelerator.num_processes
    main = accelerator.is_main_process
    if engine != "none":
        accelerator.free_memory()  # what an earlier train() in this process handed to the engine
    if engine == "deepspeed":
        distributed.configure_deepspeed(cfg.micro_batch_size, cfg.max_grad_norm, cfg.lora)

    # 1. Seeding (python, numpy, torch) and CPU threads.
    seed_and_threads(cfg)
    run.tensorboard = cfg.tensorboard
    device = next(model.parameters()).device
    # Mixed precision (the default in bf16): fp32 weights and AdamW state, every forward under autocast.
    prec = precision.of_config(cfg, device)
    check_weights_dtype(model, prec)
    model.train()
    # Under FSDP, shard (unless the stage did) before the optimizer takes the parameters.
    distributed.shard(model, cfg.lora)
    if cfg.gradient_checkpointing:
        enable_gradient_checkpointing(model)
    rank_share = distributed.largest_rank_share(model)  # logged under FSDP

    # 2. AdamW over the trainable parameters; warmup then the configured decay over the remaining steps.
    params = [p for p in model.parameters() if p.requires_grad]
    optimizer = build_optimizer(params, cfg)
    n_examples = len(examples)
    steps_per_epoch = math.ceil(n_examples / cfg.batch_size)
    total_steps = cfg.max_steps or cfg.epochs * steps_per_epoch
    scheduler = build_scheduler(optimizer, cfg.lr_scheduler, cfg.warmup_steps, total_steps)

    # The engine: DDP and DeepSpeed wrap a module and act in its forward (DDP arms its gradient sync there),
    # while a step may call into the model below its forward (the chunked LM head, KTO's second pass); so
    # the model and the stage's step go in as one module, and the engine wraps the whole step. (FSDP has
    # sharded the model itself above, and reduce-scatters its gradients in every backward.)
    stepper = distributed.StepModule(model, step_fn)
    if engine in ("ddp", "deepspeed"):
        stepper, optimizer = accelerator.prepare(stepper, optimizer)

    # Resume: weights, optimizer, scheduler, RNG and counters; the data position follows from the step.
    step, n_items_seen, nonfinite, elapsed_before = 0, 0.0, NonFiniteSteps(), 0.0
    # Checked against its manifest (a corrupt latest falls back to an intact one); one decision for all ranks.
    last_checkpoint = resume_checkpoint(cfg.resume_from, run.checkpoints_dir)
    if last_checkpoint is not None:
        written_by = checkpoint_engine(last_checkpoint)
        if (written_by == "deepspeed") != (engine == "deepspeed"):
            how = "under" if written_by == "deepspeed" else "without"
            raise ConfigError(
                f"resume_from: {last_checkpoint} was written {how} DeepSpeed; resume it the same way"
            )
        if engine == "deepspeed":  # each rank restores its slices
            state = load_engine_checkpoint(last_checkpoint, accelerator, scheduler)
        else:  # one file set, whatever the number of processes that wrote it
            state = load_checkpoint(last_checkpoint, model, optimizer, scheduler)
        if (state["n_examples"], state["batch_size"]) != (n_examples, cfg.batch_size):
            raise ConfigError(
                f"resume_from: {last_checkpoint} was written for {state['n_examples']} examples in batches of "
                f"{state['batch_size']}, not {n_examples} in batches of {cfg.batch_size}; an exact resume "
                "needs the same data and batch_size"
            )
        step, n_items_seen = state["step"], state["n_items_seen"]
        nonfinite.total, elapsed_before = state["n_nonfinite_skipped"], state["elapsed_s"]
    run.truncate_metrics_after(step)
    if monitors is not None and last_checkpoint is not None:
        monitors.replay(run.logged_rows())  # their windows as the uninterrupted run had them

    started = time.monotonic()
    window = _Window(started)
    last_row: dict = {}
    last_eval: dict = {}
    saved_step = step if last_checkpoint is not None else -1
    stop_requested = False
    epoch_order: tuple[int, list[int]] = (-1, [])

    def elapsed() -> float:
        return elapsed_before + time.monotonic() - started

    def save() -> str | None:
        """Write this step's checkpoint and return it; where the state is not finite, write nothing and
        return the last good one."""
        state = {
            "step": step,
            "epoch": step // steps_per_epoch,
            "position_in_epoch": step % steps_per_epoch,
            "n_items_seen": n_items_seen,
            "n_examples": n_examples,
            "batch_size": cfg.batch_size,
            "n_nonfinite_skipped": nonfinite.total,
            "elapsed_s": elapsed(),
        }
        path = checkpoint_dir(run.checkpoints_dir, step)
        if engine != "deepspeed":  # the main process writes one process's layout (FSDP: gathered first)
            try:
                return write_checkpoint(path, model, optimizer, scheduler, state, cfg.keep_checkpoints)
            except NonFiniteState as e:
                return skipped_checkpoint("step", step, e, last_checkpoint, run.log_metrics)
        save_engine_checkpoint(path, accelerator, scheduler, state)  # every rank writes its slices
        if main:
            prune_checkpoints(run.checkpoints_dir, cfg.keep_checkpoints, written=path)
        accelerator.wait_for_everyone()
        return str(path)

    bar = tqdm(
        total=total_steps, initial=step, disable=not cfg.progress or not main, desc="train", unit="step"
    )
    signals = StopSignals()
    try:
        with signals:
            while step < total_steps:
                # 3. Data: this step's slice of the epoch's seeded permutation (the global batch, the same for
                #    any number of processes), and this rank's micro-batches of it; stand-ins where it has none.
                epoch, position = divmod(step, steps_per_epoch)
                if epoch_order[0] != epoch:
                    epoch_order = (epoch, epoch_permutation(cfg.seed, epoch, n_examples))
                indices = epoch_order[1][position * cfg.batch_size : (position + 1) * cfg.batch_size]
                microbatches = [
                    collate_fn([examples[i] for i in share])
                    if share
                    else {**collate_fn([examples[indices[0]]]), "n_items": 0}
                    for share in distributed.rank_microbatches(indices, cfg.micro_batch_size, rank, world)
                ]
                # The normaliser is the whole global batch's n_items, summed over the ranks.
                n_items, n_tokens = distributed.all_reduce(
                    [
                        sum(float(mb["n_items"]) for mb in microbatches),
                        sum(float(mb.get("n_tokens", 0)) for mb in microbatches if mb["n_items"]),
                    ]
                )

                # 4. Forward/backward: every micro-batch's summed loss is divided by the n_items of the
                #    whole batch, so accumulation equals one big batch (a mean of micro-batch means would not),
                #    and so do several ranks (a mean of per-rank means would not). Gradients are synced once,
                #    in the last micro-step.
                loss_sum = torch.zeros((), device=device)  # stays on the device: one sync per step
                metric_sums: dict[str, float] = {}
                for j, mb in enumerate(microbatches):
                    stand_in = not mb["n_items"]
                    with _sync_gradients(accelerator, stepper, last=j == len(microbatches) - 1):
                        with prec.autocast():  # the forward and the loss; the backward outside, as torch advises
                            out = stepper(_to_device(mb, device))
                        scaled = out.loss_sum / n_items
                        if world > 1:  # the engine averages gradients over the ranks: undo it
                            scaled = scaled * world
                        accelerator.backward(scaled * 0.0 if stand_in else scaled)
                    if not stand_in:
                        loss_sum += out.loss_sum.detach().float()
                    for key, value in out.metrics.items():
                        metric_sums[key] = metric_sums.get(key, 0.0) + (0.0 if stand_in else float(value))
                loss_total, *metric_totals = distributed.all_reduce([loss_sum.item(), *metric_sums.values()])
                metric_sums = dict(zip(metric_sums, metric_totals))
                loss = loss_total / n_items if n_items else math.nan

                # 5./6. Gradient norm before clipping (clipped in the same call); a non-finite loss or
                #       gradient skips the update, and a streak of them ends the run. (Under DeepSpeed the
                #       engine has already clipped and stepped at the end of step 4.)
                max_norm = cfg.max_grad_norm if cfg.max_grad_norm is not None else math.inf
                grad_norm = distributed.as_float(accelerator.clip_grad_norm_(params, max_norm))
                lr = optimizer.param_groups[0]["lr"]
                finite = math.isfinite(loss) and math.isfinite(grad_norm)
                if finite:
                    optimizer.step()
                    window.add(loss_total, n_items, n_tokens, metric_sums, grad_norm)
                nonfinite.record(finite, step + 1, loss, grad_norm, run.log_metrics)
                # The schedule advances on skipped steps too: it is a function of the step (data) position.
                scheduler.step()
                optimizer.zero_grad(set_to_none=True)
                step += 1
                n_items_seen += n_items
                bar.update(1)
                nonfinite.stop_if_diverged(last_checkpoint)  # no new checkpoint: the last is a good one (9.)

                # 7. Log every log_every steps; callbacks may ask to stop.
                if (step % cfg.log_every == 0 or step == total_steps) and window.n_steps:
                    last_row = window.row(step, step / steps_per_epoch, lr, elapsed())
                    last_row["nonfinite_skipped"] = nonfinite.total
                    if engine == "fsdp":
                        last_row["params/rank_share"] = rank_share
                    if sample_fn is not None:  # before the next window starts: its rate leaves sampling out
                        last_row |= sample_fn(model, step)
                    window = _Window(time.monotonic())
                    run.log_metrics(last_row)
                    bar.set_postfix(loss=f"{last_row['loss']:.4f}")
                    for callback in callbacks:
                        stop_requested |= callback(step, last_row) == "stop"
                    if monitors is not None:  # failure monitors: their events go into metrics.jsonl too
                        stop_requested |= monitors.on_log(step, last_row) == "stop"
                        for event in monitors.last_events:
                            run.log_metrics(event.to_row())

                # 8. Evaluate every eval_every steps (the final evaluation follows the loop).
                if eval_fn and cfg.eval_every and step % cfg.eval_every == 0 and step < total_steps:
                    last_eval = _evaluate(model, eval_fn, device, prec)
                    run.log_metrics({"step": step, **last_eval})

                # 9. Checkpoint every save_every steps, but not inside a non-finite streak (the last good
                #    checkpoint is the one to return to); and on SIGINT/SIGTERM before raising. The ranks
                #    agree first: a signal or a stop request seen by any rank stops them all.
                stop_flag, received = distributed.all_reduce(
                    [float(stop_requested), float(signals.received or 0)], op="max"
                )
                stop_requested, received = bool(stop_flag), int(received)
                periodic = cfg.save_every and step % cfg.save_every == 0 and not nonfinite.consecutive
                if periodic or received:
                    last_checkpoint, saved_step = save(), step
                if received:
                    name = signal.Signals(received).name
                    raise TrainingInterrupted(checkpoint=last_checkpoint or "", reason=f"interrupted by {name}")
                if stop_requested:
                    break

            # 8./9. At the end: evaluate and checkpoint.
            if eval_fn:
                last_eval = _evaluate(model, eval_fn, device, prec)
                run.log_metrics({"step": step, **last_eval})
            if saved_step != step:
                last_checkpoint, saved_step = save(), step
    except KeyboardInterrupt:  # a second signal: stopped at once, maybe inside a checkpoint write
        raise stopped_at_once(signals, run.checkpoints_dir, last_checkpoint) from None
    finally:
        bar.close()
        run.close()

    return TrainResult(
        steps=step,
        metrics={**last_row, **last_eval},
        elapsed_s=elapsed(),
        peak_rss_mb=peak_rss_mb(),
        n_nonfinite_skipped=nonfinite.total,
        last_checkpoint=last_checkpoint,
    )


def check_weights_dtype(model: torch.nn.Module, prec: precision.TrainPrecision) -> None:
    """Refuse trainable weights in another dtype than the run's precision holds them in: a stage that loaded
    its model in bf16 under precision=mixed would train without master weights, silently. (fp32 is always
    allowed: LoRA adapters and PPO's value head stay fp32 on a pure bf16 base.)"""
    found = {p.dtype for p in model.parameters() if p.requires_grad}
    if found - {prec.weights, torch.float32}:
        names = ", ".join(sorted(str(d).removeprefix("torch.") for d in found))
        raise ConfigError(
            f"the trainable weights are {names}, but dtype={str(prec.compute).removeprefix('torch.')} in "
            f"precision {prec.name} holds them in {str(prec.weights).removeprefix('torch.')}; load the model "
            "in alignkit.models.precision.weights_dtype(cfg)"
        )


def _sync_gradients(accelerator, stepper: torch.nn.Module, last: bool):
    """The context of one micro-step: gradients are reduced across ranks only in the last one of a step.
    DDP skips its all-reduce inside ``no_sync``; DeepSpeed reads ``sync_gradients`` as the end of a step.
    One process: nothing."""
    accelerator.sync_gradients = last
    return contextlib.nullcontext() if last else accelerator.no_sync(stepper)


class _Window:
    """Sums over the steps since the last log row; the row reports sum / n_items, like the loss."""

    def __init__(self, started: float) -> None:
        self.started = started
        self.n_steps, self.loss_sum, self.n_items, self.n_tokens, self.grad_norm_sum = 0, 0.0, 0.0, 0.0, 0.0
        self.metric_sums: dict[str, float] = {}

    def add(self, loss_sum: float, n_items: float, n_tokens: float, metrics: dict, grad_norm: float) -> None:
        self.n_steps += 1
        self.loss_sum += loss_sum
        self.n_items += n_items
        self.n_tokens += n_tokens
        self.grad_norm_sum += grad_norm
        for key, value in metrics.items():
            self.metric_sums[key] = self.metric_sums.get(key, 0.0) + value

    def row(self, step: int, epoch: float, lr: float, elapsed_s: float) -> dict:
        seconds = max(time.monotonic() - self.started, 1e-9)
        row = {"step": step, "epoch": round(epoch, 4), "lr": lr, "loss": self.loss_sum / self.n_items}
        row.update({key: value / self.n_items for key, value in self.metric_sums.items()})
        row["grad_norm"] = self.grad_norm_sum / self.n_steps  # before clipping, mean over the window
        row["items_per_s"] = self.n_items / seconds
        if self.n_tokens:
            row["tokens_per_s"] = self.n_tokens / seconds
        row["elapsed_s"] = elapsed_s
        return row


def _evaluate(
    model: torch.nn.Module, eval_fn: Callable, device: torch.device, prec: precision.TrainPrecision
) -> dict:
    """``eval_fn`` in eval mode without gradients, on forked RNG streams: evaluating (even sampling) must not
    change the training run, or a run evaluated at other steps (or resumed) would not be the same run."""
    py_state, np_state = random.getstate(), np.random.get_state()
    devices = [device] if device.type == "cuda" else []
    try:
        with torch.random.fork_rng(devices=devices), torch.no_grad(), prec.autocast():
            model.eval()
            metrics = eval_fn(model)
    finally:
        model.train()
        random.setstate(py_state)
        np.random.set_state(np_state)
    return {f"eval/{key}": float(value) for key, value in metrics.items()}


def _to_device(microbatch: dict, device: torch.device) -> dict:
    return {k: v.to(device) if isinstance(v, torch.Tensor) else v for k, v in microbatch.items()}
