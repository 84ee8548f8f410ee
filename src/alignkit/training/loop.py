"""The one training loop every stage calls: AdamW with warmup and a schedule, gradient accumulation that equals
one big batch, clipping, non-finite step skipping, metrics.jsonl + the trackers, periodic evaluation, atomic
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
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field
from typing import Any

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
from alignkit.training.run import RunDir, model_state_bytes, peak_rss_mb
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
    model_state_bytes: int | None = None  # the policy's weights, gradients and optimizer state at the end


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
    snapshot: Callable[[int], None] | None = None,
) -> TrainResult:
    """Train ``model`` (already on its device) on ``examples``; see docs/architecture.md for the contract.

    ``collate_fn(examples) -> dict`` must hold ``n_items``, the loss normaliser of that micro-batch (and may
    hold ``n_tokens`` for a tokens/s rate). ``step_fn(model, microbatch) -> StepOutput`` returns the loss
    *summed* over the micro-batch's items, and the same metric keys for every micro-batch. ``on_log(step, row)``
    callbacks may return "stop" to end training early (with the final evaluation and checkpoint). ``monitors``
    (an ``alignkit.evaluation.monitors.MonitorSet``) sees every logged row; its events are written to
    metrics.jsonl and a "stop" action ends the run. ``sample_fn(model, step)`` (``training.sample_watch``) adds
    the metrics of the policy's samples to a logged row when they are due. ``snapshot(step)``, called after every
    step in every process, writes a loadable copy of the model when one is due (``training.snapshots``).

    In several processes each rank trains on its share of every global batch (``rank_microbatches``). A rank
    whose share of a micro-step is empty runs a stand-in instead: the batch's first example with ``n_items``
    0, whose loss is multiplied by 0 and whose metrics are dropped; it keeps the ranks' collectives in step and
    adds nothing (a ``step_fn`` that sums across ranks itself, like KTO's z0, must count nothing from it).
    """
    callbacks = [on_log] if callable(on_log) else list(on_log or [])
    if not examples:
        raise ValueError("no training examples")
    # 1. The engine; seeding (python, numpy, torch) and CPU threads; the model in the run's precision.
    engine, device, prec = _start(cfg, model, run)
    rank_share = distributed.largest_rank_share(model)  # every rank must call; logged under FSDP
    fsdp_row = {"params/rank_share": rank_share} if engine.name == "fsdp" else {}

    # 2. AdamW over the trainable parameters; warmup then the configured decay over the remaining steps.
    params = [p for p in model.parameters() if p.requires_grad]
    optimizer = build_optimizer(params, cfg)
    batches = _Batches(cfg, examples, collate_fn, engine)
    total_steps = cfg.max_steps or cfg.epochs * batches.steps_per_epoch
    scheduler = build_scheduler(optimizer, cfg.lr_scheduler, cfg.warmup_steps, total_steps)
    stepper, optimizer = _engine_step(engine, model, step_fn, optimizer)

    # Resume: weights, optimizer, scheduler, RNG and counters; the data position follows from the step.
    progress = _resume(cfg, run, engine, model, optimizer, scheduler, len(examples), monitors)
    nonfinite, window = progress.nonfinite, _Window(progress.started)
    last_row, last_eval, stop_requested = {}, {}, False
    show = cfg.progress and engine.main
    bar = tqdm(total=total_steps, initial=progress.step, disable=not show, desc="train", unit="step")
    with _closed_on_exit(run, bar, progress) as signals:
        while progress.step < total_steps:
            # 3. Data: this step's global batch, and this rank's micro-batches of it (see _Batches).
            microbatches, n_items, n_tokens = batches.at(progress.step)

            # 4. Forward/backward: every micro-batch's summed loss is divided by the n_items of the whole
            #    batch, so accumulation equals one big batch (a mean of micro-batch means would not), and so
            #    do several ranks (a mean of per-rank means would not). Gradients are synced once, in the last
            #    micro-step.
            loss_total, metric_sums = _forward_backward(stepper, microbatches, n_items, engine, device, prec)
            loss = loss_total / n_items if n_items else math.nan

            # 5./6. Gradient norm before clipping, then the update, which a non-finite loss or gradient skips;
            #       a streak of them ends the run.
            grad_norm, lr, finite = _update(engine, params, optimizer, scheduler, cfg.max_grad_norm, loss)
            if finite:
                window.add(loss_total, n_items, n_tokens, metric_sums, grad_norm)
            nonfinite.record(finite, progress.step + 1, loss, grad_norm, run.log_metrics)
            step = progress.advance(n_items)
            bar.update(1)
            nonfinite.stop_if_diverged(progress.last_checkpoint)  # no new checkpoint: the last is good (9.)

            # 7. Log every log_every steps; callbacks and monitors may ask to stop.
            if (step % cfg.log_every == 0 or step == total_steps) and window.n_steps:
                last_row = window.row(step, step / batches.steps_per_epoch, lr, progress.elapsed())
                last_row.update(nonfinite_skipped=nonfinite.total, **fsdp_row)
                if sample_fn is not None:  # before the next window starts: its rate leaves sampling out
                    last_row |= sample_fn(model, step)
                window = _Window(time.monotonic())
                run.log_metrics(last_row)
                bar.set_postfix(loss=f"{last_row['loss']:.4f}")
                stop_requested |= _notify(step, last_row, callbacks, monitors, run)

            # 8. Evaluate every eval_every steps (the final evaluation follows the loop).
            if eval_fn and cfg.eval_every and step % cfg.eval_every == 0 and step < total_steps:
                last_eval = _evaluate(model, eval_fn, device, prec, run, step)

            # 9. Checkpoint every save_every steps, but not inside a non-finite streak (the last good
            #    checkpoint is the one to return to); and on SIGINT/SIGTERM before raising. The ranks agree
            #    first: a signal or a stop request seen by any rank stops them all.
            stop_requested, received = distributed.agree_to_stop(stop_requested, signals.received)
            if (cfg.save_every and step % cfg.save_every == 0 and not nonfinite.consecutive) or received:
                _save(cfg, run, engine, model, optimizer, scheduler, progress, batches)
            if received:
                reason = f"interrupted by {signal.Signals(received).name}"
                raise TrainingInterrupted(checkpoint=progress.last_checkpoint or "", reason=reason)
            # 10. A loadable snapshot of the model where due (snapshot_every; training.snapshots).
            if snapshot is not None:
                snapshot(step)
            if stop_requested:
                break

        # 8./9. At the end: evaluate and checkpoint.
        if eval_fn:
            last_eval = _evaluate(model, eval_fn, device, prec, run, progress.step)
        if progress.saved_step != progress.step:
            _save(cfg, run, engine, model, optimizer, scheduler, progress, batches)
    return progress.result({**last_row, **last_eval}, model_state_bytes([model], optimizer))


@dataclass(frozen=True)
class _Engine:
    """Where this process trains: alone, or as one rank of a run launched in several processes."""

    accelerator: Any  # accelerate's Accelerator
    name: str  # "none" (one process), "ddp", "deepspeed" or "fsdp"
    rank: int
    world: int
    main: bool


def _start(
    cfg: TrainConfig, model: torch.nn.Module, run: RunDir
) -> tuple[_Engine, torch.device, precision.TrainPrecision]:
    """Step 1 of ``train``: the engine, seeding (python, numpy, torch) and CPU threads, and the model ready to
    train (in the run's precision, in train mode, sharded under FSDP, gradient checkpointing if asked)."""
    accelerator = distributed.accelerator()
    engine = _Engine(
        accelerator, distributed.engine(), accelerator.process_index, accelerator.num_processes,
        accelerator.is_main_process,
    )  # fmt: skip
    if engine.name != "none":
        accelerator.free_memory()  # what an earlier train() in this process handed to the engine
    if engine.name == "deepspeed":
        distributed.configure_deepspeed(cfg.micro_batch_size, cfg.max_grad_norm, cfg.lora)
    seed_and_threads(cfg)
    device = next(model.parameters()).device
    # Mixed precision (the default in bf16): fp32 weights and AdamW state, every forward under autocast.
    prec = precision.of_config(cfg, device)
    check_weights_dtype(model, prec)
    model.train()
    # Under FSDP, shard (unless the stage did) before the optimizer takes the parameters.
    distributed.shard(model, cfg.lora)
    if cfg.gradient_checkpointing:
        enable_gradient_checkpointing(model)
    return engine, device, prec


def _engine_step(engine: _Engine, model: torch.nn.Module, step_fn: Callable, optimizer):
    """(the step as one module, the optimizer), as the engine runs them.

    DDP and DeepSpeed wrap a module and act in its forward (DDP arms its gradient sync there), while a step
    may call into the model below its forward (the chunked LM head, KTO's second pass); so the model and the
    stage's step go in as one module, and the engine wraps the whole step. (FSDP has sharded the model
    itself, in ``_start``, and reduce-scatters its gradients in every backward.)"""
    stepper = distributed.StepModule(model, step_fn)
    if engine.name in ("ddp", "deepspeed"):
        stepper, optimizer = engine.accelerator.prepare(stepper, optimizer)
    return stepper, optimizer


class _Batches:
    """Step 3 of ``train``: each step's global batch, its slice of the epoch's seeded permutation (the same
    for any number of processes), and this rank's micro-batches of it, with stand-ins where it has none."""

    def __init__(self, cfg: TrainConfig, examples: Sequence, collate_fn: Callable, engine: _Engine) -> None:
        self.cfg, self.examples, self.collate_fn, self.engine = cfg, examples, collate_fn, engine
        self.steps_per_epoch = math.ceil(len(examples) / cfg.batch_size)
        self._epoch_order: tuple[int, list[int]] = (-1, [])

    def at(self, step: int) -> tuple[list[dict], float, float]:
        """(this rank's micro-batches of step ``step``; n_items and n_tokens of the whole global batch)."""
        cfg, examples, collate_fn, engine = self.cfg, self.examples, self.collate_fn, self.engine
        epoch, position = divmod(step, self.steps_per_epoch)
        if self._epoch_order[0] != epoch:
            self._epoch_order = (epoch, epoch_permutation(cfg.seed, epoch, len(examples)))
        indices = self._epoch_order[1][position * cfg.batch_size : (position + 1) * cfg.batch_size]
        shares = distributed.rank_microbatches(indices, cfg.micro_batch_size, engine.rank, engine.world)
        microbatches = [
            collate_fn([examples[i] for i in share])
            if share
            else {**collate_fn([examples[indices[0]]]), "n_items": 0}
            for share in shares
        ]
        # The normaliser is the whole global batch's n_items, summed over the ranks.
        n_items, n_tokens = distributed.all_reduce(
            [
                sum(float(mb["n_items"]) for mb in microbatches),
                sum(float(mb.get("n_tokens", 0)) for mb in microbatches if mb["n_items"]),
            ]
        )
        return microbatches, n_items, n_tokens


@dataclass
class _Progress:
    """Where the run is: the counters a checkpoint stores beside the weights, optimizer and schedule."""

    step: int = 0
    n_items_seen: float = 0.0
    nonfinite: NonFiniteSteps = field(default_factory=NonFiniteSteps)
    elapsed_before: float = 0.0  # seconds trained before the resume
    started: float = 0.0  # time.monotonic() when this process took the steps up
    last_checkpoint: str | None = None
    saved_step: int = -1  # the step of the last checkpoint written (or resumed from); -1: none

    def elapsed(self) -> float:
        return self.elapsed_before + time.monotonic() - self.started

    def advance(self, n_items: float) -> int:
        """One more step done, over ``n_items`` items; returns the new step."""
        self.step += 1
        self.n_items_seen += n_items
        return self.step

    def result(self, metrics: dict, state_bytes: int | None = None) -> TrainResult:
        return TrainResult(
            steps=self.step,
            metrics=metrics,
            elapsed_s=self.elapsed(),
            peak_rss_mb=peak_rss_mb(),
            n_nonfinite_skipped=self.nonfinite.total,
            last_checkpoint=self.last_checkpoint,
            model_state_bytes=state_bytes,
        )


def _resume(
    cfg: TrainConfig, run: RunDir, engine: _Engine, model, optimizer, scheduler, n_examples: int, monitors
) -> _Progress:
    """Where the run starts: step 0, or the checkpoint ``cfg.resume_from`` names, whose weights, optimizer,
    scheduler, RNG and counters are restored (checked against its manifest, a corrupt latest falling back to
    an intact one; one decision for all ranks). metrics.jsonl keeps the rows up to that step, and the
    monitors see them again; then the clock starts."""
    progress = _Progress(last_checkpoint=resume_checkpoint(cfg.resume_from, run.checkpoints_dir))
    checkpoint = progress.last_checkpoint
    if checkpoint is not None:
        written_by = checkpoint_engine(checkpoint)
        if (written_by == "deepspeed") != (engine.name == "deepspeed"):
            how = "under" if written_by == "deepspeed" else "without"
            raise ConfigError(
                f"resume_from: {checkpoint} was written {how} DeepSpeed; resume it the same way"
            )
        if engine.name == "deepspeed":  # each rank restores its slices
            state = load_engine_checkpoint(checkpoint, engine.accelerator, scheduler)
        else:  # one file set, whatever the number of processes that wrote it
            state = load_checkpoint(checkpoint, model, optimizer, scheduler)
        if (state["n_examples"], state["batch_size"]) != (n_examples, cfg.batch_size):
            raise ConfigError(
                f"resume_from: {checkpoint} was written for {state['n_examples']} examples in batches of "
                f"{state['batch_size']}, not {n_examples} in batches of {cfg.batch_size}; an exact resume "
                "needs the same data and batch_size"
            )
        progress.step, progress.n_items_seen = state["step"], state["n_items_seen"]
        progress.nonfinite.total, progress.elapsed_before = state["n_nonfinite_skipped"], state["elapsed_s"]
        progress.saved_step = progress.step
    run.truncate_metrics_after(progress.step)
    if monitors is not None and checkpoint is not None:
        monitors.replay(run.logged_rows())  # their windows as the uninterrupted run had them
    progress.started = time.monotonic()
    return progress


def _forward_backward(
    stepper, microbatches: list[dict], n_items: float, engine: _Engine, device, prec: precision.TrainPrecision
) -> tuple[float, dict[str, float]]:
    """Step 4 of ``train``: the forward and backward of each micro-batch; returns the loss and metric sums of
    the whole global batch (over the ranks). A stand-in's loss is multiplied by 0 and its metrics dropped."""
    loss_sum = torch.zeros((), device=device)  # stays on the device: one sync per step
    metric_sums: dict[str, float] = {}
    for j, mb in enumerate(microbatches):
        stand_in = not mb["n_items"]
        with _sync_gradients(engine.accelerator, stepper, last=j == len(microbatches) - 1):
            with prec.autocast():  # the forward and the loss; the backward outside, as torch advises
                out = stepper(_to_device(mb, device))
            scaled = out.loss_sum / n_items
            if engine.world > 1:  # the engine averages gradients over the ranks: undo it
                scaled = scaled * engine.world
            engine.accelerator.backward(scaled * 0.0 if stand_in else scaled)
        if not stand_in:
            loss_sum += out.loss_sum.detach().float()
        for key, value in out.metrics.items():
            metric_sums[key] = metric_sums.get(key, 0.0) + (0.0 if stand_in else float(value))
    loss_total, *metric_totals = distributed.all_reduce([loss_sum.item(), *metric_sums.values()])
    return loss_total, dict(zip(metric_sums, metric_totals))


def _update(
    engine: _Engine, params: list, optimizer, scheduler, max_grad_norm: float | None, loss: float
) -> tuple[float, float, bool]:
    """Steps 5 and 6 of ``train``: (the gradient norm before clipping, this step's learning rate, whether the
    update was made). Clipped in the same call; a non-finite loss or gradient norm skips the update. (Under
    DeepSpeed the engine has already clipped and stepped at the end of step 4.)"""
    max_norm = max_grad_norm if max_grad_norm is not None else math.inf
    grad_norm = distributed.as_float(engine.accelerator.clip_grad_norm_(params, max_norm))
    lr = optimizer.param_groups[0]["lr"]
    finite = math.isfinite(loss) and math.isfinite(grad_norm)
    if finite:
        optimizer.step()
    # The schedule advances on skipped steps too: it is a function of the step (data) position.
    scheduler.step()
    optimizer.zero_grad(set_to_none=True)
    return grad_norm, lr, finite


def _notify(step: int, row: dict, callbacks: list[LogCallback], monitors, run: RunDir) -> bool:
    """Hand a logged row to the ``on_log`` callbacks and the failure monitors, whose events go into
    metrics.jsonl too; True when one of them asks to stop."""
    stop = False
    for callback in callbacks:
        stop |= callback(step, row) == "stop"
    if monitors is not None:
        stop |= monitors.on_log(step, row) == "stop"
        for event in monitors.last_events:
            run.log_metrics(event.to_row())
    return stop


def _save(
    cfg: TrainConfig, run: RunDir, engine: _Engine, model, optimizer, scheduler, progress: _Progress,
    batches: _Batches,
) -> None:  # fmt: skip
    """Write this step's checkpoint and record it in ``progress`` as the last one; where the state is not
    finite, write nothing: the last good one stays the last."""
    step, steps_per_epoch = progress.step, batches.steps_per_epoch
    state = {
        "step": step,
        "epoch": step // steps_per_epoch,
        "position_in_epoch": step % steps_per_epoch,
        "n_items_seen": progress.n_items_seen,
        "n_examples": len(batches.examples),
        "batch_size": cfg.batch_size,
        "n_nonfinite_skipped": progress.nonfinite.total,
        "elapsed_s": progress.elapsed(),
    }
    path = checkpoint_dir(run.checkpoints_dir, step)
    if engine.name != "deepspeed":  # the main process writes one process's layout (FSDP: gathered first)
        try:
            written = write_checkpoint(path, model, optimizer, scheduler, state, cfg.keep_checkpoints)
        except NonFiniteState as e:
            written = skipped_checkpoint("step", step, e, progress.last_checkpoint, run.log_metrics)
    else:
        save_engine_checkpoint(path, engine.accelerator, scheduler, state)  # every rank writes its slices
        if engine.main:
            prune_checkpoints(run.checkpoints_dir, cfg.keep_checkpoints, written=path)
        engine.accelerator.wait_for_everyone()
        written = str(path)
    progress.last_checkpoint, progress.saved_step = written, step


@contextlib.contextmanager
def _closed_on_exit(run: RunDir, bar, progress: _Progress) -> Iterator[StopSignals]:
    """The steps run with SIGINT/SIGTERM caught (``StopSignals``: step 9 checkpoints, then raises); a second
    signal stops at once. The progress bar is closed however the run ends (the trackers stay open for the
    summary; they end with the run folder, ``RunDir.release``)."""
    signals = StopSignals()
    try:
        with signals:
            yield signals
    except KeyboardInterrupt:  # a second signal: stopped at once, maybe inside a checkpoint write
        raise stopped_at_once(signals, run.checkpoints_dir, progress.last_checkpoint) from None
    finally:
        bar.close()


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
    model: torch.nn.Module,
    eval_fn: Callable,
    device: torch.device,
    prec: precision.TrainPrecision,
    run: RunDir,
    step: int,
) -> dict:
    """``eval_fn`` in eval mode without gradients, on forked RNG streams: evaluating (even sampling) must not
    change the training run, or a run evaluated at other steps (or resumed) would not be the same run. The
    metrics, as ``eval/<key>``, are logged at ``step`` and returned."""
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
    metrics = {f"eval/{key}": float(value) for key, value in metrics.items()}
    run.log_metrics({"step": step, **metrics})
    return metrics


def _to_device(microbatch: dict, device: torch.device) -> dict:
    return {k: v.to(device) if isinstance(v, torch.Tensor) else v for k, v in microbatch.items()}
