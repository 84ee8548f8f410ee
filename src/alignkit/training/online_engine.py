"""The online-RL engine: the one loop of the stages that train on their own samples (ppo, online-dpo, grpo), so
that a method's file holds only its algorithm and its config. A unit of the loop (PPO's and GRPO's iteration,
online DPO's round) is, numbered in ``OnlineRun.train``: sample a batch of prompts -> generate -> score -> the
method's ``make_batch`` (PPO and GRPO: advantages; online DPO: pairs) -> the method's ``update`` -> log, monitor,
checkpoint.

Its bookkeeping is the offline loop's (``training.loop``): one resume (verified, a corrupt latest falling back),
one checkpoint writer, one non-finite policy (``loop.NonFiniteSteps``), one monitor feed, one run folder.
Launched in several processes each rank samples and scores its share of the generation batches and the shares
are gathered, so every rank holds the whole unit from ``make_batch`` on and takes the same decisions; the method
spreads its own forward passes and updates over the ranks. See docs/architecture.md, "Scaling out".
"""

from __future__ import annotations

import functools
import json
import math
import signal
import sys
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
from tqdm.auto import tqdm

from alignkit.config import ConfigError, validate_config
from alignkit.data.tokenize import encode_prompt
from alignkit.errors import TrainingInterrupted
from alignkit.evaluation.gold_change import gold_summary
from alignkit.evaluation.metrics import distinct_n, length_stats, mean_difference, pearson
from alignkit.evaluation.monitors import Event, ModeCollapseMonitor, MonitorSet, is_gold_divergence
from alignkit.models.generation import Generation, SamplingConfig, check_generation_backend, vllm_sampler
from alignkit.models.loading import (
    apply_lora,
    count_parameters,
    enable_gradient_checkpointing,
    load_model,
    load_tokenizer,
    pick_device,
    save_final,
)
from alignkit.models.precision import weights_dtype
from alignkit.scoring import PartScores, Scorer, check_columns, check_scorer, reward_scorer, score_parts
from alignkit.training import distributed, snapshots
from alignkit.training.checkpoint import (
    NonFiniteState,
    checkpoint_dir,
    load_checkpoint,
    resume_checkpoint,
    skipped_checkpoint,
    write_checkpoint,
)
from alignkit.training.gold import GoldEval
from alignkit.training.loop import NonFiniteSteps, seed_and_threads
from alignkit.training.online import (
    derived_seed,
    iteration_prompts,
    note_idle_processes,
    sample_share,
    training_prompts,
    truncate_jsonl,
)
from alignkit.training.reference import Reference, load_reference
from alignkit.training.remedies import BestGold, length_penalised
from alignkit.training.run import RunDir, model_state_bytes, peak_rss_mb
from alignkit.training.schedule import build_optimizer, build_scheduler
from alignkit.training.signals import StopSignals, stopped_at_once

# ---------------------------------------------------------------------------------------------------------
# What the engine and a method hand each other


@dataclass
class OnlineSetup:
    """What every online method starts from (``prepare``): the prompts, the reward, the policy and its frozen
    reference, loaded (and under FSDP sharded) in this process."""

    cfg: Any  # the stage's config (a GenerationBackendConfig and TrainConfig)
    run_dir: RunDir
    device: torch.device
    tokenizer: Any
    prompts: list  # the training prompts: text, or chat messages ending with a user turn
    prompt_ids: list[list[int]]  # each prompt tokenized with the chat template
    n_skipped: int  # rows of train_data left out as bad
    scorer: Scorer  # the reward
    policy: torch.nn.Module  # what samples and trains (LoRA: the adapter "default" on the frozen base)
    reference: Reference  # a frozen copy, or (LoRA) the policy's base with the adapters off
    load: Callable[[], torch.nn.Module]  # another copy of cfg.model, as the policy was loaded
    rank: int
    world: int
    prompt_columns: list[dict] = field(default_factory=list)  # each prompt's other columns, for the reward


@dataclass
class Samples:
    """One unit's scored samples; every process holds all of them."""

    prompts: list  # the prompt of each sample; a prompt's samples_per_prompt samples are consecutive
    generations: list[Generation]
    scores: list[float]  # the reward's score of each sample, less any length penalty: what the method trains on
    raw_scores: list[float] | None = None  # the reward's own scores, when a length penalty changed them
    # reward=[a, b, ...]: each reward's own (unweighted) scores by name (scoring.part_names); None: one reward.
    reward_parts: dict[str, list[float]] | None = None

    @property
    def texts(self) -> list[str]:
        return [g.text for g in self.generations]

    @property
    def lengths(self) -> list[int]:
        return [len(g.response_ids) for g in self.generations]

    def select(self, indices: list[int]) -> Samples:
        """The samples at ``indices``, in that order (a method keeping some of a unit's groups)."""
        raw = [self.raw_scores[i] for i in indices] if self.raw_scores else None
        prompts, generations = [self.prompts[i] for i in indices], [self.generations[i] for i in indices]
        parts = self.reward_parts and {name: [part[i] for i in indices] for name, part in self.reward_parts.items()}
        return Samples(prompts, generations, [self.scores[i] for i in indices], raw, parts)

    def __add__(self, other: Samples) -> Samples:
        raw = (self.raw_scores or []) + (other.raw_scores or []) if self.raw_scores or other.raw_scores else None
        # Both come from the same reward, so both or neither have parts, under the same names.
        parts = (
            {name: part + other.reward_parts[name] for name, part in self.reward_parts.items()}
            if self.reward_parts and other.reward_parts
            else None
        )
        return Samples(
            self.prompts + other.prompts, self.generations + other.generations, self.scores + other.scores, raw,
            parts,
        )


@dataclass
class Batch:
    """What a method's ``make_batch`` makes of the samples: what its ``update`` trains on, and what to log."""

    data: Any  # PPO: a Rollout; online DPO: the pairs as DPO examples
    stats: dict[str, float]  # logged in the unit's row
    sample_fields: list[dict] | None = None  # per sample, added to its line of samples.jsonl


@dataclass
class Optimization:
    """What a method's ``update`` steps with: the method's loss as the module DDP syncs, the optimizer over
    the trained parameters and its schedule, the unit's minibatches, and ``stepped``, through which the engine
    sees every optimizer step."""

    stepper: torch.nn.Module  # OnlineMethod.loss on the trained modules (several processes: wrapped in DDP)
    optimizer: torch.optim.Optimizer
    scheduler: Any
    params: list[torch.nn.Parameter]
    epochs: int
    minibatch_size: int
    seed: int  # of this unit's minibatch order
    after_step: Callable[[dict], None]  # the engine's non-finite policy
    n_steps: int = 0

    @property
    def parts(self) -> tuple:
        """(optimizer, scheduler, params), as a method's step function takes them."""
        return self.optimizer, self.scheduler, self.params

    def minibatches(self, n_rows: int) -> Iterator[list[int]]:
        """``epochs`` passes over ``n_rows`` rows in minibatches, each pass in an order drawn from the unit's
        seed (the same in every process, and in a resumed run)."""
        generator = torch.Generator().manual_seed(self.seed)
        for _ in range(self.epochs):
            order = torch.randperm(n_rows, generator=generator).tolist()
            for s in range(0, n_rows, self.minibatch_size):
                yield order[s : s + self.minibatch_size]

    def steps(self, n_rows: int, step: Callable[[list[int], int], dict]) -> list[dict]:
        """``step(rows, j) -> stats`` (one optimizer step) on the j-th of the unit's ``minibatches`` of
        ``n_rows`` rows, each reported (``stepped``). Returns each step's stats."""
        return [self.stepped(step(rows, j)) for j, rows in enumerate(self.minibatches(n_rows))]

    def stepped(self, stats: dict) -> dict:
        """Report one optimizer step (``online.optimizer_step``'s stats, with the minibatch's "loss"): a streak
        of non-finite ones ends the run here. Returns ``stats``."""
        self.n_steps += 1
        self.after_step(stats)
        return stats


@dataclass
class OnlineMethod:
    """An online method as the engine runs it: its unit, its models and its steps 3-5 of a unit."""

    units: int  # how many the run makes
    prompts_per_unit: int
    trained: torch.nn.Module  # what the optimizer trains and a checkpoint holds
    epochs: int  # passes of the update over a unit's batch
    minibatch_size: int  # rows of the batch (PPO: samples; online DPO: pairs) per optimizer step
    make_batch: Callable[[Samples], Batch]  # steps 3-4: the samples -> what the update trains on
    # The forward of the update's steps, loss(trained, micro-batch) -> (loss, metrics): Optimization.stepper.
    loss: Callable[[torch.nn.Module, Any], tuple]
    update: Callable[[Batch, Optimization], dict]  # step 5: the optimizer steps; returns the metrics to log
    monitors: MonitorSet  # the stage's default failure monitors
    unit: str = "iteration"  # what one pass of the loop is called: "iteration", "round" (messages, checkpoint)
    samples_per_prompt: int = 1
    top_p: float = 1.0
    # Rows of a unit's batch the minibatches cut (the schedule's steps per unit); None: prompts_per_unit (GRPO:
    # prompts x samples_per_prompt, its minibatches being of responses).
    rows_per_unit: int | None = None
    # Between steps 2 and 3: refill(samples, draw) -> the samples make_batch gets, where draw(attempt) samples
    # and scores prompts_per_unit further prompts (seeded by (seed, unit, attempt), attempt >= 1). GRPO's dynamic
    # sampling; None: the unit's samples as drawn.
    refill: Callable[[Samples, Callable[[int], Samples]], Samples] | None = None
    recompute_context: Callable | None = None  # gradient_checkpointing's context_fn (PPO's LoRA adapters)
    final_policy: Callable[[], torch.nn.Module] | None = None  # what final/ holds; None: the policy
    state_dict: Callable[[], dict] = dict  # the method's own state in a checkpoint (PPO: its KL controller)
    # Restores it; a ValueError (a state the run's settings cannot take) is reported as a resume_from error.
    load_state_dict: Callable[[dict], None] = lambda state: None
    # The monitors' "adjust" remedy: multiply the method's KL coefficient by a factor; returns the old and new
    # values (the event's). None: the method has none, and an "adjust" action is refused.
    adjust_kl: Callable[[float], dict[str, float]] | None = None
    # Mode collapse's "raise_entropy" remedy: raise the method's entropy bonus; returns the old and new values.
    # None: the method has none (check_config refuses the action for a config without ent_coef).
    adjust_entropy: Callable[[], dict[str, float]] | None = None
    describe: dict = field(default_factory=dict)  # fixed lines of the summary
    # More lines of the summary from (units made, logged rows, samples.jsonl; None outside the main process);
    # by default whether the score rose over the run (``score_change``).
    summarize: Callable[[int, list[dict], Path | None], dict] = lambda units, rows, samples: {
        "score_change": score_change(samples, units)
    }


@dataclass(frozen=True)
class OnlineStage:
    """An online stage as its file declares it to the engine: its name, the method it builds on the engine's
    setup, and what its launch needs. Its ``run`` and ``check_launch`` are the stage module's."""

    name: str  # as typed after `alignkit`
    method: Callable[[Any, OnlineSetup], OnlineMethod]  # method(cfg, setup): the method's steps 3-5
    one_sample_each: str | None = None  # the config field counting a unit's samples: >= 1 per process
    # Whether the policy's frozen reference is loaded (``prepare``); GRPO at beta = 0 trains without one.
    needs_reference: Callable[[Any], bool] = lambda cfg: True

    def check_launch(self, cfg) -> None:
        """Refuse what the stage cannot do in the processes it was launched in (``check_launch``)."""
        check_launch(cfg, self.name, self.one_sample_each)

    def run(self, cfg, monitors: MonitorSet | None = None) -> dict:
        """Train the policy with the stage's method (``run_online``); ``monitors`` replaces the method's
        default failure monitors (for tests). Returns the summary."""
        reference = self.needs_reference(cfg)
        return run_online(cfg, self.name, self.method, monitors, self.one_sample_each, reference)


# ---------------------------------------------------------------------------------------------------------
# Launch and setup


def check_config(cfg) -> None:
    """An online stage's config before anything loads: the declared ranges and the config's ``check`` (for a
    config built in code too), the reward and any gold reward (``module:function`` signature or a directory)
    and the backend."""
    validate_config(cfg)
    check_scorer(cfg.reward, "reward")
    if cfg.gold_reward is not None:
        check_scorer(cfg.gold_reward, "gold_reward")
    if cfg.mode_collapse_action == "raise_entropy" and not hasattr(cfg, "ent_coef"):
        raise ConfigError(
            "config key 'mode_collapse_action': raise_entropy raises an entropy bonus (ent_coef), which only ppo "
            "has; use warn, stop or adjust (raise the KL coefficient)",
            ("mode_collapse_action",),
        )
    check_generation_backend(cfg.generation_backend)


def check_launch(cfg, stage: str, one_sample_each: str | None = None) -> None:
    """Refuse what an online stage cannot do in the processes it was launched in (starts the process group).
    ``one_sample_each``: the field counting a unit's samples, which must leave each process at least one
    (PPO's rollout passes)."""
    if distributed.engine() == "deepspeed":
        raise ConfigError(
            f"{stage} runs data parallel (DDP) or sharded under FSDP, not under DeepSpeed: launch it with "
            "configs/accelerate/multi_gpu.yaml, plain torchrun, or configs/accelerate/fsdp.yaml (full fine-tuning)"
        )
    world = distributed.world_size()
    if world > 1 and cfg.generation_backend == "vllm":
        raise ConfigError(
            f"generation_backend=vllm in {world} processes is not supported by {stage} (one vLLM engine per "
            "process is not implemented); use generation_backend=hf, or run in one process"
        )
    if one_sample_each and getattr(cfg, one_sample_each) < world:
        raise ConfigError(
            f"{one_sample_each}={getattr(cfg, one_sample_each)} is fewer than the {world} processes; each "
            "process needs at least one sample"
        )


def make_scorer(cfg, device: torch.device) -> Scorer:
    """The reward of ``cfg.reward``: a function 'module:function' or a reward model directory."""
    return reward_scorer(cfg, device, cfg.reward_batch_size)


def prepare(cfg, run_dir: RunDir, needs_reference: bool = True) -> OnlineSetup:
    """Seeds, the prompts tokenized with the chat template, the reward, and the policy with its reference. LoRA:
    the reference is the policy's base with the adapters off (as DPO's reference=adapter); full fine-tuning: a
    frozen copy; ``needs_reference=False`` (GRPO with beta = 0): none, no second model loaded. Under FSDP (full fine-tuning) each model is sharded as it is loaded (``distributed.shard``; the
    main process alone reads the weights); the reward is whole in every process."""
    print(f"run folder: {run_dir.path}", file=sys.stderr)
    seed_and_threads(cfg)
    device = pick_device()
    tokenizer = load_tokenizer(cfg.model, cfg.trust_remote_code)
    examples, n_skipped = training_prompts(cfg)
    check_columns(cfg.reward, examples, "reward", "train_data")  # before any model loads
    prompts = [ex.prompt for ex in examples]
    prompt_ids = [encode_prompt(tokenizer, p, cfg.max_prompt_length) for p in prompts]
    scorer = make_scorer(cfg, device)
    load = functools.partial(
        load_model, cfg.model, weights_dtype(cfg), cfg.trust_remote_code, device, distributed.load_on()
    )
    policy = load()
    distributed.shard(policy, cfg.lora)
    if cfg.lora:
        policy = apply_lora(policy, cfg)
    reference = load_reference(("adapter" if cfg.lora else "copy") if needs_reference else "none", load)
    rank, world = distributed.accelerator().process_index, distributed.world_size()
    return OnlineSetup(
        cfg,
        run_dir,
        device,
        tokenizer,
        prompts,
        prompt_ids,
        n_skipped,
        scorer,
        policy,
        reference,
        load,
        rank,
        world,
        [ex.columns for ex in examples],
    )


def run_online(
    cfg,
    stage: str,
    make_method: Callable[[Any, OnlineSetup], OnlineMethod],
    monitors: MonitorSet | None = None,
    one_sample_each: str | None = None,
    needs_reference: bool = True,
) -> dict:
    """Run an online stage: its config checked (``check_config``) and its launch (``check_launch``, with
    ``one_sample_each``), then, in its run folder (checked, locked for this run and released however it ends:
    ``RunDir.create``), the method ``make_method(cfg, setup)`` builds on ``prepare``'s setup; ``monitors``
    replaces its default failure monitors (for tests); ``needs_reference=False`` loads no reference (``prepare``).
    Returns the summary."""
    check_config(cfg)
    check_launch(cfg, stage, one_sample_each)  # starts the process group
    started = time.time()
    with RunDir.create(cfg.output_dir, stage, cfg.resume_from, cfg=cfg) as run_dir:
        setup = prepare(cfg, run_dir, needs_reference)
        method = make_method(cfg, setup)
        k, unit = method.samples_per_prompt, method.unit
        doc = f"prompts_per_{unit}" + (" * samples_per_prompt" if k > 1 else "")
        note_idle_processes(cfg, method.prompts_per_unit * k, unit, doc)
        run = OnlineRun(stage, setup, method, monitors if monitors is not None else method.monitors)
        return run.train(started)


# ---------------------------------------------------------------------------------------------------------
# The loop


class OnlineRun:
    """One run of the engine: the optimizer, and where the run is between units (unit, last checkpoint, the
    non-finite count, why it stops)."""

    def __init__(self, stage: str, setup: OnlineSetup, method: OnlineMethod, monitors: MonitorSet) -> None:
        self.stage, self.setup, self.method, self.monitors = stage, setup, method, monitors
        self.cfg, self.run_dir = setup.cfg, setup.run_dir
        self.main = self.run_dir.writes
        if self.cfg.gradient_checkpointing:  # the update's passes recompute each layer in the backward
            enable_gradient_checkpointing(method.trained, context_fn=method.recompute_context)
        # The update's forward pass: the trained modules and the method's loss as one module, for DDP to sync
        # (one process: the module itself). Wrapping broadcasts rank 0's weights, which every rank holds.
        self.stepper = distributed.data_parallel(distributed.StepModule(method.trained, method.loss))
        # A vLLM engine on cfg.model, taking the policy's weights (LoRA merged in) every unit; None:
        # transformers' generate on the policy itself.
        use_vllm = self.cfg.generation_backend == "vllm"
        self.sampler = vllm_sampler(self.cfg, setup.tokenizer, setup.device) if use_vllm else None
        self.snapshot = snapshots.writer(self.cfg, setup.policy, setup.tokenizer, self.run_dir.path)
        self.samples_path = self.run_dir.path / "samples.jsonl"
        # The held-out gold evaluation (gold_reward=...; None without), its samples in gold_samples.jsonl.
        self.gold_samples_path = self.run_dir.path / "gold_samples.jsonl"
        self.gold = GoldEval.of(self.cfg, setup, self.gold_samples_path if self.main else None)
        self.rank_share = distributed.largest_rank_share(method.trained)
        self.trainable, self.total = count_parameters(method.trained)
        self.params = [p for p in method.trained.parameters() if p.requires_grad]
        self.optimizer = build_optimizer(self.params, self.cfg)
        # A unit counts epochs x ceil(prompts / minibatch) steps whatever its batch holds (online DPO's pairs may
        # be fewer), so the schedule is fixed in advance.
        rows_per_unit = method.rows_per_unit or method.prompts_per_unit
        self.steps_per_unit = method.epochs * math.ceil(rows_per_unit / method.minibatch_size)
        total_steps = method.units * self.steps_per_unit
        self.scheduler = build_scheduler(
            self.optimizer, self.cfg.lr_scheduler, self.cfg.warmup_steps, total_steps
        )
        self.nonfinite = NonFiniteSteps()
        self.unit, self.start, self.saved, self.elapsed_before = 0, 0, -1, 0.0
        self.resumed = self.last_checkpoint = ""  # the checkpoint resumed from; the last one written
        self.last_row: dict = {}
        self.stopped_by: str | None = None
        self.loop_started = time.monotonic()
        self.wire_remedies()

    def wire_remedies(self) -> None:
        """The monitors' actions beyond warn/stop: "adjust" raises the method's KL coefficient by
        kl_adjust_factor, mode collapse's "raise_entropy" its entropy bonus; a gold-divergence "stop" puts back
        the best-gold weights (``finish``)."""
        cfg, method, monitors = self.cfg, self.method, self.monitors
        raise_entropy = cfg.mode_collapse_action == "raise_entropy"

        def remedy(event: Event) -> dict[str, float]:
            if raise_entropy and event.monitor == ModeCollapseMonitor.name:
                return method.adjust_entropy()
            return method.adjust_kl(cfg.kl_adjust_factor)

        if method.adjust_kl is not None or raise_entropy:
            monitors.adjuster = remedy
        # The monitors whose "adjust" is the KL coefficient's: all but mode collapse under raise_entropy.
        entropy_remedied = {ModeCollapseMonitor.name} if raise_entropy else set()
        on_kl = [name for name in monitors.needs_adjuster() if name not in entropy_remedied]
        if method.adjust_kl is None and on_kl:
            raise ConfigError(
                f"{self.stage} has no KL coefficient to adjust; monitor(s) {on_kl} have "
                "action 'adjust': use warn or stop"
            )
        self.best_gold = BestGold() if cfg.gold_divergence_action == "stop" else None
        self.stopped_for_gold = False

    def elapsed(self) -> float:
        return self.elapsed_before + time.monotonic() - self.loop_started

    def train(self, started: float) -> dict:
        """The loop, unit by unit; returns the summary."""
        cfg, method, setup = self.cfg, self.method, self.setup
        self.resume()
        if self.gold is not None and self.unit == 0:
            self.log_gold_start()
        self.loop_started = time.monotonic()
        show = cfg.progress and self.main
        self.bar = tqdm(
            total=method.units, initial=self.start, disable=not show, desc=self.stage, unit=method.unit
        )
        signals = StopSignals()
        try:
            with signals:
                while self.unit < method.units:
                    t0 = time.monotonic()
                    # 1. Sample samples_per_prompt responses to each of the unit's prompts from the current
                    #    policy, with seeds that depend only on (seed, unit), each process its share of the
                    #    generation batches. A vLLM engine first takes the policy's weights (LoRA: merged in)
                    #    unless it holds them already: a fresh run's first unit (a new LoRA adapter has B = 0).
                    idx = iteration_prompts(len(setup.prompts), method.prompts_per_unit, self.unit, cfg.seed)
                    method.trained.eval()
                    mine = self.generate(idx)
                    # 2. Score each response with the reward (each process its own samples), then gather every
                    #    process's samples and scores: every process holds the whole unit from here on.
                    samples = self.score(idx, mine)
                    if method.refill is not None:  # GRPO's dynamic sampling: groups dropped, more prompts drawn
                        samples = method.refill(samples, self.draw)
                    # 3.-4. The method's batch from the samples (PPO: rollout passes, KL-penalised rewards, GAE
                    #    advantages; online DPO: best-vs-worst pairs and their reference log-probs).
                    batch = method.make_batch(samples)
                    t1 = time.monotonic()
                    # 5. The method's update: its optimizer steps over the batch, in minibatches drawn in a
                    #    seeded order; the schedule then advances to steps_per_unit whatever was stepped.
                    method.trained.train()
                    opt = Optimization(
                        self.stepper,
                        self.optimizer,
                        self.scheduler,
                        self.params,
                        method.epochs,
                        method.minibatch_size,
                        derived_seed(cfg.seed, self.unit, 1),
                        self.after_step,
                    )
                    update_stats = method.update(batch, opt)
                    for _ in range(self.steps_per_unit - opt.n_steps):
                        self.scheduler.step()
                    self.unit += 1
                    self.bar.update(1)
                    t2 = time.monotonic()
                    # 6. Log the unit's health (where due, with the gold evaluation of the updated policy on
                    #    held-out prompts), and let the failure monitors see it.
                    gold = self.gold_stats()
                    row = {"step": self.unit, **sample_stats(samples), **batch.stats, **update_stats, **gold}
                    row |= {"nonfinite_skipped": self.nonfinite.total, "rollout_s": t1 - t0, "update_s": t2 - t1}
                    row |= {"gold_s": time.monotonic() - t2} if gold else {}
                    self.log(row | {"elapsed_s": self.elapsed()}, samples, batch)
                    # 7. Checkpoint every save_every units (not inside a non-finite streak), and on SIGINT/SIGTERM
                    #    before raising. The processes agree first: a signal or a stop seen by any stops them all.
                    #    A loadable snapshot of the policy where due (snapshot_every; training.snapshots).
                    stop = self.checkpoint_or_stop(signals.received)
                    if self.snapshot is not None:
                        self.snapshot(self.unit)
                    if stop:
                        break
                if self.saved != self.unit:
                    self.save()
        except KeyboardInterrupt:  # a second signal: stopped at once, maybe inside a checkpoint write
            raise stopped_at_once(
                signals, self.run_dir.checkpoints_dir, self.last_checkpoint or None
            ) from None
        finally:
            self.bar.close()  # the trackers end with the run folder (RunDir.release): the summary comes after
        return self.finish(started)

    def resume(self) -> None:
        """The trained weights, optimizer, schedule, RNG, the method's state and the unit, from the checkpoint
        ``resume_from`` names (verified; a corrupt latest falls back to an intact one). Nothing in a checkpoint
        depends on the number of processes: the main process picks it, every process reads it."""
        cfg, method, run_dir = self.cfg, self.method, self.run_dir
        resume = resume_checkpoint(cfg.resume_from, run_dir.checkpoints_dir) or ""
        if resume:
            state = load_checkpoint(resume, method.trained, self.optimizer, self.scheduler)
            per_unit = state[f"prompts_per_{method.unit}"]
            if (state["n_prompts"], per_unit) != (len(self.setup.prompts), method.prompts_per_unit):
                raise ConfigError(
                    f"resume_from: {resume} was written for {state['n_prompts']} prompts, {per_unit} per "
                    f"{method.unit}; an exact resume needs the same"
                )
            try:
                method.load_state_dict(state)
            except ValueError as e:  # e.g. PPO's adaptive KL controller resumed with kl_target=None
                raise ConfigError(
                    f"resume_from: {resume}: {e} (the settings of the method's own state must not change between "
                    "runs)"
                ) from None
            self.unit, self.elapsed_before = state[method.unit], state["elapsed_s"]
            self.nonfinite.total = state["n_nonfinite_skipped"]
            self.start, self.saved, self.resumed, self.last_checkpoint = self.unit, self.unit, resume, resume
        # A run starting over at unit 0 (no checkpoint to resume) keeps nothing an earlier attempt logged, not
        # even its step-0 gold row.
        keep_to = self.unit if self.unit else -1
        run_dir.truncate_metrics_after(keep_to)
        if resume:
            self.monitors.replay(run_dir.logged_rows())  # their windows as the uninterrupted run had them
        if self.main:
            truncate_jsonl(self.samples_path, keep_to)
            truncate_jsonl(self.gold_samples_path, keep_to)

    def generate(self, idx: list[int], attempt: int = 0) -> dict[int, Generation]:
        """Step 1: this process's samples of the prompts ``idx``, keyed by position among the unit's samples;
        ``attempt`` > 0: a method's further draw (``draw``), with seeds of its own."""
        cfg, method, setup = self.cfg, self.method, self.setup
        k = method.samples_per_prompt
        ids = [setup.prompt_ids[i] for i in idx for _ in range(k)]  # prompt j's samples are j*k .. j*k+k-1
        seed = derived_seed(cfg.seed, self.unit, 0) if not attempt else derived_seed(cfg.seed, self.unit, 3, attempt)
        sampling = SamplingConfig(cfg.max_new_tokens, cfg.temperature, method.top_p, seed)
        # A vLLM engine takes the weights once per unit, before its first draw.
        push = (self.unit > self.start or bool(self.resumed)) and attempt == 0
        return sample_share(
            cfg, setup.policy, setup.tokenizer, ids, sampling, setup.rank, setup.world, self.sampler, push
        )

    def draw(self, attempt: int) -> Samples:
        """Steps 1-2 again for a method's ``refill``: prompts_per_unit further prompts, drawn as a unit's are but
        from a stream of their own seeded by (seed, unit, attempt), sampled and scored (every process)."""
        cfg, n = self.cfg, len(self.setup.prompts)
        seed = derived_seed(cfg.seed, self.unit, 4, attempt)
        idx = iteration_prompts(n, self.method.prompts_per_unit, self.unit, seed)
        return self.score(idx, self.generate(idx, attempt))

    def score(self, idx: list[int], mine: dict[int, Generation]) -> Samples:
        """Step 2: score this process's samples, and gather every process's samples and scores."""
        k, setup = self.method.samples_per_prompt, self.setup
        prompts = [setup.prompts[i] for i in idx for _ in range(k)]
        columns = [setup.prompt_columns[i] for i in idx for _ in range(k)]  # what reward functions may take
        mine = dict(sorted(mine.items()))  # by position among the unit's samples
        my_texts = [g.text for g in mine.values()]  # none where a process got no generation batch
        my = (
            score_parts(setup.scorer, [prompts[i] for i in mine], my_texts, [columns[i] for i in mine])
            if mine
            else PartScores([], {})
        )
        my_parts = [{name: part[j] for name, part in my.parts.items()} for j in range(len(my.total))]
        gathered = distributed.gather_dicts(dict(zip(mine, zip(mine.values(), my.total, my_parts))))
        generations = [g for g, _, _ in gathered.values()]
        scores = [score for _, score, _ in gathered.values()]
        names = list(next(iter(gathered.values()))[2]) if gathered else []  # every sample's parts have them all
        parts = {name: [p[name] for _, _, p in gathered.values()] for name in names} or None
        if not self.cfg.length_penalty:
            return Samples(prompts, generations, scores, reward_parts=parts)
        # The reward trained on: score - length_penalty x response tokens (remedies.length_penalised).
        lengths = [len(g.response_ids) for g in generations]
        penalised = length_penalised(scores, lengths, self.cfg.length_penalty)
        return Samples(prompts, generations, penalised, scores, parts)

    def logs_row(self) -> bool:
        """Whether this unit's row is logged (and seen by the monitors): every log_every units, and the last."""
        return self.unit % self.cfg.log_every == 0 or self.unit == self.method.units

    def gold_stats(self) -> dict[str, float]:
        """The gold evaluation of the policy (``training.gold``) where this unit's row is due one: the first row
        this process logs (the monitors check their keys there), every gold_every units and the last."""
        gold = self.gold
        if gold is None or not self.logs_row() or not gold.due(self.unit, self.method.units, not self.last_row):
            return {}
        return gold(self.setup.policy, self.unit)

    def log_gold_start(self) -> None:
        """A fresh run's step-0 row: the gold evaluation of the starting policy (the reference's gold score, and
        the over-optimisation plot's KL = 0 point). It is the first best gold: a run whose updates only lower
        the gold score keeps the starting weights when the proxy-vs-gold check stops it."""
        row = {"step": 0, **self.gold(self.setup.policy, 0)}
        self.run_dir.log_metrics(row)
        if self.best_gold is not None:
            self.best_gold.observe(0, row, self.params)

    def after_step(self, stats: dict) -> None:
        """The non-finite policy of the offline loop, on each optimizer step of a method's update: a skipped
        step is logged, and a streak ends the run naming the last checkpoint."""
        finite = not stats["nonfinite"]
        self.nonfinite.record(
            finite, self.unit + 1, stats["loss"], stats["grad_norm"], self.run_dir.log_metrics
        )
        self.nonfinite.stop_if_diverged(self.last_checkpoint)

    def log(self, row: dict, samples: Samples, batch: Batch) -> None:
        """Step 6: the samples file, and every log_every units the row (metrics.jsonl) and the monitors."""
        if self.main:
            with open(self.samples_path, "a", encoding="utf-8") as f:
                for i, (prompt, g, score) in enumerate(
                    zip(samples.prompts, samples.generations, samples.scores)
                ):
                    sample = {"step": self.unit, "prompt": prompt, "response": g.text, "score": score}
                    sample |= {"raw_score": samples.raw_scores[i]} if samples.raw_scores else {}
                    if samples.reward_parts:
                        sample["rewards"] = {name: part[i] for name, part in samples.reward_parts.items()}
                    sample |= {
                        "finished": g.finished,
                        **(batch.sample_fields[i] if batch.sample_fields else {}),
                    }
                    f.write(json.dumps(sample) + "\n")
        if self.logs_row():
            self.last_row = row
            self.run_dir.log_metrics(row)
            kl = {"kl": f"{row['kl']:.2f}"} if "kl" in row else {}  # GRPO at beta = 0 has no reference
            self.bar.set_postfix(score=f"{row['score/mean']:.3f}", **kl)
            if self.monitors.on_log(self.unit, row) == "stop":
                self.stopped_by = ", ".join(
                    e.monitor for e in self.monitors.last_events if e.action == "stop"
                )
            for event in self.monitors.last_events:
                self.run_dir.log_metrics(event.to_row())
            self.stopped_for_gold |= any(
                is_gold_divergence(e) and e.action == "stop" for e in self.monitors.last_events
            )
            if self.best_gold is not None and not self.stopped_for_gold:
                self.best_gold.observe(self.unit, row, self.params)

    def checkpoint_or_stop(self, received: int | None) -> bool:
        """Step 7: whether the loop stops here (a monitor in any process); raises after a signal's checkpoint."""
        stop_flag, received = distributed.agree_to_stop(bool(self.stopped_by), received)
        self.stopped_by = self.stopped_by or ("a monitor in another process" if stop_flag else None)
        save_every = self.cfg.save_every
        if (save_every and self.unit % save_every == 0 and not self.nonfinite.consecutive) or received:
            self.save()
        if received:
            name = signal.Signals(received).name
            raise TrainingInterrupted(checkpoint=self.last_checkpoint, reason=f"interrupted by {name}")
        return bool(self.stopped_by)

    def save(self) -> None:
        """Write this unit's checkpoint; where the state is not finite, write none and keep the last good one."""
        method = self.method
        for p in self.params:  # checkpoints hold what requires grad; PEFT's adapter switches toggle the flag
            p.requires_grad_(True)
        state = {method.unit: self.unit, **method.state_dict(), "n_prompts": len(self.setup.prompts)}
        state |= {
            f"prompts_per_{method.unit}": method.prompts_per_unit,
            "n_nonfinite_skipped": self.nonfinite.total,
        }
        state["elapsed_s"] = self.elapsed()
        path = checkpoint_dir(self.run_dir.checkpoints_dir, self.unit)
        try:
            self.last_checkpoint = write_checkpoint(
                path, method.trained, self.optimizer, self.scheduler, state, self.cfg.keep_checkpoints
            )
        except NonFiniteState as e:
            log = self.run_dir.log_metrics
            self.last_checkpoint = skipped_checkpoint(method.unit, self.unit, e, self.last_checkpoint, log)
        self.saved = self.unit

    def finish(self, started: float) -> dict:
        """The final policy (written by the main process) and the summary."""
        cfg, setup, method, run_dir = self.cfg, self.setup, self.method, self.run_dir
        final_from = f"the last {method.unit}"
        if self.stopped_for_gold and self.best_gold is not None and self.best_gold.restore(self.params):
            best = self.best_gold
            start = " (the starting policy)" if best.unit == 0 else ""
            final_from = (
                f"{method.unit} {best.unit}{start}, the best gold_reward/mean ({best.gold:.4g}): the proxy-vs-gold "
                f"monitor stopped the run at {method.unit} {self.unit}"
            )
        policy = method.final_policy() if method.final_policy else setup.policy
        distributed.save_from_main(
            policy,
            lambda state_dict: save_final(
                policy, setup.tokenizer, run_dir.final_dir, merge_lora=cfg.merge_lora, state_dict=state_dict
            ),
        )
        rows = (
            [json.loads(line) for line in run_dir.metrics_path.read_text().splitlines()] if self.main else []
        )
        metric_rows = [r for r in rows if "event" not in r and "lr" in r]  # training rows, not step 0's gold
        summary = {
            "stage": self.stage,
            "model": cfg.model,
            "reward": cfg.reward,
            **method.describe,
            "run_dir": str(run_dir.path),
            "final_model": str(run_dir.final_dir),
            "final_model_from": final_from,
            f"{method.unit}s": self.unit,
            "stopped_by": self.stopped_by,
            "prompts": len(setup.prompts),
            "skipped_rows": setup.n_skipped,
            "reference": reference_doc(setup.reference),
            "trainable_parameters": self.trainable,
            "total_parameters": self.total,
            "params_rank_share": self.rank_share,
            f"score_by_{method.unit}": [r["score/mean"] for r in metric_rows],
            f"kl_by_{method.unit}": [r.get("kl") for r in metric_rows],
            "gold_reward": cfg.gold_reward,
            f"gold_by_{method.unit}": [[r["step"], r["gold_reward/mean"]] for r in rows if "gold_reward/mean" in r],
            # each gold evaluation against step 0's, paired per held-out prompt, with 95% intervals
            "gold_change": gold_summary(self.gold_samples_path if self.main and self.gold else None),
            **method.summarize(self.unit, metric_rows, self.samples_path if self.main else None),
            "events": [r for r in rows if "event" in r],
            "final_metrics": self.last_row,
            "last_checkpoint": self.last_checkpoint,
            "train_seconds": self.elapsed(),
            "wall_seconds": time.time() - started,
            "peak_rss_mb": peak_rss_mb(),
            "model_state_bytes": model_state_bytes(
                [method.trained, *([setup.reference.copy] if setup.reference.copy is not None else [])], self.optimizer
            ),
        }
        run_dir.write_summary(summary)
        return summary


def reference_doc(reference: Reference) -> str:
    """The summary's line on the reference."""
    docs = {"adapter": "policy base with adapters disabled", "copy": "frozen copy", "none": "none (not loaded)"}
    return docs[reference.mode]


def sample_stats(samples: Samples) -> dict[str, float]:
    """The health of a unit's samples, whatever the method: scores, lengths, EOS, diversity."""
    scores, lengths = samples.scores, samples.lengths
    length = length_stats(lengths)
    # With a length penalty the score keys are of the penalised reward (what is trained on and what the
    # reward-hacking monitor should see pay for length); "score/unpenalised" is the reward's own.
    raw = {"score/unpenalised": float(np.mean(samples.raw_scores))} if samples.raw_scores else {}
    # reward=[a, b, ...]: each reward's own mean, reward/<name> (unweighted).
    raw |= {f"reward/{name}": float(np.mean(part)) for name, part in (samples.reward_parts or {}).items()}
    return raw | {
        "score/mean": float(np.mean(scores)),
        "score/std": float(np.std(scores, ddof=1)) if len(scores) > 1 else 0.0,
        "reward/mean": float(np.mean(scores)),  # the key RewardHackingMonitor reads
        "reward_length_corr": pearson(scores, lengths),
        "len/mean": length.mean,
        "len/std": length.std,
        "eos_frac": float(np.mean([g.finished for g in samples.generations])),
        "distinct_2": distinct_n(samples.texts, 2),
    }


def step_means(step_stats: list[dict], leave_out: tuple[str, ...] = ("nonfinite",)) -> dict[str, float]:
    """The mean of each of an update's per-step metrics over its steps (none: no keys)."""
    keys = [key for key in (step_stats[0] if step_stats else {}) if key not in leave_out]
    return {key: float(np.mean([s[key] for s in step_stats])) for key in keys}


def score_change(samples_path: Path | None, iterations: int) -> dict | None:
    """The mean score of the run's last quarter of iterations minus its first quarter's (at least one
    iteration each), with a bootstrap interval over their samples (``samples_path``): did the run raise its
    score by more than the noise of one batch of samples? None before two iterations, or without the file."""
    if iterations < 2 or samples_path is None:
        return None
    k = max(1, iterations // 4)
    scores: dict[int, list[float]] = {}
    for line in samples_path.read_text(encoding="utf-8").splitlines():
        row = json.loads(line)
        scores.setdefault(row["step"], []).append(row["score"])
    first = [x for step in range(1, k + 1) for x in scores.get(step, [])]
    last = [x for step in range(iterations - k + 1, iterations + 1) for x in scores.get(step, [])]
    change = mean_difference(first, last)
    return {
        "iterations_per_group": k,
        "first_mean": float(np.mean(first)),
        "last_mean": float(np.mean(last)),
        "change": change.value,
        "change_ci95": [change.low, change.high],
    }
