"""`alignkit ppo`: RLHF with PPO (Ziegler et al. 2019; Stiennon et al. 2020; Ouyang et al. 2022).

Four roles: the policy being trained, a frozen reference it pays a KL penalty to, a reward (a function or a
reward model from `alignkit rm`) and a value model. One iteration is one loop body in `run`, numbered:
sample -> score -> KL-penalised per-token rewards -> values and GAE -> PPO epochs -> KL-coefficient update.

Launched in several processes (torchrun, accelerate launch) it runs data parallel (DDP) with the numbers of one
process: each rank samples, scores and runs the rollout's forward passes for its share of the iteration's
prompts, the shares are gathered (so whitening, GAE and every logged statistic see the whole batch), and each
rank trains on its share of every minibatch, its loss normalised by the whole minibatch's tokens. Under FSDP
(full fine-tuning) the three networks are sharded as well: generation runs on the policy's weights gathered
whole (``distributed.whole_weights``), and the rollout passes on the shards, every rank running as many.
"""

from __future__ import annotations

import functools
import json
import math
import signal
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Literal

import numpy as np
import torch
from tqdm.auto import tqdm

from alignkit.config import (
    ConfigError,
    GenerationBackendConfig,
    TrainConfig,
    check_at_most,
    check_row_range,
    doc_field,
    not_used_doc,
    refuse_unused,
    required,
    validate_config,
)
from alignkit.data.tokenize import encode_prompt
from alignkit.errors import TrainingInterrupted
from alignkit.evaluation.metrics import distinct_n, length_stats, mean_difference, pearson
from alignkit.evaluation.monitors import MonitorSet, default_monitors
from alignkit.losses.ppo import (
    AdaptiveKLController,
    FixedKLController,
    explained_variance,
    gae,
    masked_mean,
    per_token_rewards,
    policy_loss,
    value_loss,
    whiten,
)
from alignkit.models.generation import (
    SamplingConfig,
    check_generation_backend,
    vllm_sampler,
)
from alignkit.models.loading import (
    apply_lora,
    count_parameters,
    enable_gradient_checkpointing,
    load_model,
    load_tokenizer,
    pick_device,
    save_final,
)
from alignkit.models.precision import in_training_precision, weights_dtype
from alignkit.models.value import (
    ValueModel,
    add_value_adapter,
    recompute_with_active_adapter,
    remove_value_adapter,
)
from alignkit.scoring import Scorer, check_scorer, load_scorer
from alignkit.training import distributed
from alignkit.training.checkpoint import (
    NonFiniteState,
    checkpoint_dir,
    load_checkpoint,
    resume_checkpoint,
    skipped_checkpoint,
    write_checkpoint,
)
from alignkit.training.loop import seed_and_threads
from alignkit.training.online import (
    derived_seed,
    iteration_prompts,
    note_idle_processes,
    optimizer_step,
    sample_share,
    training_prompts,
    truncate_jsonl,
)
from alignkit.training.rollout import (
    Rollout,
    collate_samples,
    policy_outputs,
    response_values,
    shared_rollout_passes,
)
from alignkit.training.run import RunDir, peak_rss_mb
from alignkit.training.schedule import build_optimizer, build_scheduler
from alignkit.training.signals import StopSignals, stopped_at_once

# TrainConfig fields that mean nothing in PPO's loop, and what to set instead. check_config refuses a changed
# value rather than silently ignoring it. (Without eval_data, the other eval_* fields are inert.)
NOT_USED = {
    "batch_size": "prompts_per_iteration (rollout batch) and minibatch_size (optimizer batch)",
    "epochs": "iterations and ppo_epochs",
    "max_steps": "iterations",
    "max_length": "max_prompt_length and max_new_tokens",
    "eval_data": "`alignkit eval` on the final model",
    "eval_every": "`alignkit eval` on the final model",
}


def _not_used(name: str) -> str:
    return not_used_doc("ppo", NOT_USED[name])


@dataclass
class PPOConfig(GenerationBackendConfig, TrainConfig):
    """RLHF with PPO. Data: prompts (a `prompt` column, or `messages` ending with a user turn)."""

    train_data: str | None = doc_field(
        None,
        "Prompts to sample from; None uses the 128 prompts shipped with alignkit (assets/prompts.jsonl).",
    )
    reward: str = required(
        "'module:function' with function(prompt: str, response: str) -> float (e.g. alignkit.rewards:politeness), "
        "or a reward model directory written by `alignkit rm`."
    )
    reward_batch_size: int = doc_field(8, "Responses per forward pass of a reward model.", ge=1)
    # --- rollouts ---
    iterations: int = doc_field(20, "PPO iterations; each samples, scores and updates once.", ge=1)
    prompts_per_iteration: int = doc_field(
        16, "Prompts sampled per iteration (the rollout batch), one response each.", ge=1
    )
    max_new_tokens: int = doc_field(
        48, "Longest response in tokens; a response cut here counts as unfinished.", ge=1
    )
    # PPO's ratio and KL need the policy's own samples; greedy decoding (0) is not a sample of it.
    temperature: float = doc_field(
        1.0,
        "Sampling temperature (> 0); log-probs of policy and reference are taken at the same temperature.",
        gt=0,
    )
    generation_batch_size: int = doc_field(
        16,
        "Prompts per batched generate() call (generation_backend=hf; vLLM batches by itself). In N processes "
        "each samples every N-th batch: at most prompts_per_iteration / N keeps them all sampling.",
        ge=1,
    )
    max_prompt_length: int | None = doc_field(256, "Longest prompt in tokens (its end is kept).")
    # --- reward shaping ---
    init_kl_coef: float = doc_field(
        0.05,
        "beta at the start: weight of the per-token KL penalty to the reference (0: none; then kl_target must "
        "be None, as adaptive control scales beta and cannot move it from 0).",
        ge=0,
    )
    kl_target: float | None = doc_field(
        6.0,
        "Adaptive KL control (Ziegler et al. 2019): steer beta so the mean per-response KL (nats) tracks this; "
        "None keeps beta fixed at init_kl_coef.",
        gt=0,
    )
    kl_horizon: int = doc_field(
        10000,
        "Adaptive KL horizon in responses: beta moves by at most 20% x responses / horizon per iteration.",
        ge=1,
    )
    kl_estimator: Literal["k1", "k3"] = doc_field(
        "k1",
        "Per-token KL in the penalty: k1 = log p - log q (InstructGPT), k3 = (r - 1) - log r (never < 0).",
    )
    missing_eos_penalty: float | None = doc_field(
        None,
        "Subtract this from the score of a response that hit max_new_tokens without EOS; None: no penalty.",
        ge=0,
    )
    whiten_rewards: bool = doc_field(
        False, "Scale the per-token rewards to unit variance (mean kept) before GAE (Huang et al. 2024)."
    )
    # --- PPO update ---
    ppo_epochs: int = doc_field(2, "Passes of minibatch updates over each iteration's samples.", ge=1)
    minibatch_size: int = doc_field(8, "Responses per optimizer step.", ge=1)
    micro_batch_size: int = doc_field(
        8,
        "Responses per forward/backward pass (at most minibatch_size); a minibatch is accumulated from these "
        "exactly.",
        ge=1,
    )
    # eps >= 1 would let the lower clip 1 - eps reach 0: no clip on a shrinking ratio.
    clip_eps: float = doc_field(
        0.2, "PPO ratio clip: pi/pi_old is held within [1 - eps, 1 + eps].", gt=0, lt=1
    )
    value_clip_eps: float = doc_field(
        0.2, "Value clip: a new value moves at most this far from the rollout's.", gt=0
    )
    # 0 would leave the value model untrained, and GAE's advantages built on its first guesses.
    vf_coef: float = doc_field(0.1, "Weight of the value loss next to the policy loss.", gt=0)
    ent_coef: float = doc_field(
        0.0, "Weight of an entropy bonus; > 0 holds (N, vocab) logits for the backward pass.", ge=0
    )
    gamma: float = doc_field(1.0, "Discount over response tokens.", ge=0, le=1)
    lam: float = doc_field(
        0.95,
        "GAE lambda (Schulman et al. 2016): 1 = Monte-Carlo returns, 0 = one-step TD. Below 1, a value model "
        "that has not learned yet gives a response's last tokens most of the credit for its score, and so "
        "rewards ending early whatever the score; 1 avoids that (configs/ppo_sentiment.yaml).",
        ge=0,
        le=1,
    )
    learning_rate: float = doc_field(1e-5, "Peak AdamW learning rate (LoRA usually wants ~1e-4).")
    adam_eps: float = doc_field(1e-5, "AdamW epsilon; 1e-5 as in lm-human-preferences (Huang et al. 2024).")
    lr_scheduler: Literal["constant", "linear", "cosine"] = doc_field(
        "linear", "Learning-rate schedule over all optimizer steps (annealed to 0, as lm-human-preferences)."
    )
    log_every: int = doc_field(1, "Write metrics every N iterations.")
    save_every: int | None = doc_field(None, "Write a checkpoint every N iterations (and at the end).")
    # --- TrainConfig fields PPO does not use (same defaults) ---
    batch_size: int = doc_field(8, _not_used("batch_size"))
    epochs: int = doc_field(1, _not_used("epochs"))
    max_steps: int | None = doc_field(None, _not_used("max_steps"))
    max_length: int = doc_field(1024, _not_used("max_length"))
    eval_data: str | None = doc_field(None, _not_used("eval_data"))
    eval_every: int | None = doc_field(None, _not_used("eval_every"))

    def check(self) -> None:
        """The rules across fields (each field's own range is declared on it and checked before this)."""
        refuse_unused(self, NOT_USED, "ppo")
        check_at_most(self, "micro_batch_size", "minibatch_size")
        check_row_range(self, "train_rows")
        if self.kl_target is not None and self.init_kl_coef == 0:
            raise ConfigError(
                "config key 'init_kl_coef' must be > 0 when kl_target is set (adaptive control scales beta and "
                "cannot move it from 0), got 0.0; or set kl_target=null for no KL penalty",
                ("init_kl_coef", "kl_target"),
            )


CONFIG = PPOConfig


# ---------------------------------------------------------------------------------------------------------
# The reward: a function 'module:function' or a reward model directory (alignkit.scoring)


def make_scorer(cfg: PPOConfig, device: torch.device) -> Scorer:
    return load_scorer(
        cfg.reward,
        "reward",
        dtype=cfg.dtype,
        device=device,
        trust_remote_code=cfg.trust_remote_code,
        batch_size=cfg.reward_batch_size,
    )


@torch.no_grad()
def make_rollout(cfg: PPOConfig, batch: dict, passes: dict, scores, finished, beta: float):
    """Steps 3-4 of an iteration, from ``rollout_passes`` over the whole ``batch``: KL-penalised per-token
    rewards, GAE, and whitening over the batch's tokens. Returns (Rollout, stats)."""
    logps, ref_logps, entropy, values = (passes[k] for k in ("logps", "ref_logps", "entropy", "values"))
    mask = batch["mask"]
    # 3. r_t = -beta KL_t, plus the score (minus any missing-EOS penalty) on the last token.
    shaped = per_token_rewards(
        scores, logps, ref_logps, mask, beta, cfg.kl_estimator, finished, cfg.missing_eos_penalty
    )
    rewards = whiten(shaped.rewards, mask, shift_mean=False) if cfg.whiten_rewards else shaped.rewards
    # 4. GAE on the rollout's values; advantages whitened over the batch's tokens (lm-human-preferences).
    adv = gae(rewards, values, mask, cfg.gamma, cfg.lam)
    sequences = (batch["input_ids"], batch["attention_mask"], batch["loss_mask"])
    rollout = Rollout(*sequences, mask, logps, values, whiten(adv.advantages, mask), adv.returns)
    per_response_kl = shaped.kl.sum(1)  # (B,) nats, the quantity the KL controller steers
    stats = {
        "kl": per_response_kl.mean().item(),
        "kl/per_token": masked_mean(shaped.kl, mask).item(),
        "rlhf_reward/mean": shaped.rewards.sum(1).mean().item(),
        "entropy": masked_mean(entropy, mask).item(),
        "explained_variance": explained_variance(values, adv.returns, mask).item(),
        "value/mean": masked_mean(values, mask).item(),
        "returns/mean": masked_mean(adv.returns, mask).item(),
    }
    return rollout, stats


# ---------------------------------------------------------------------------------------------------------
# The PPO update


def ppo_loss(
    cfg: PPOConfig, policy, value_model, mb: Rollout
) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """Clipped surrogate + vf_coef * clipped value loss - ent_coef * entropy, each a token mean over ``mb``."""
    batch = {k: getattr(mb, k) for k in ("input_ids", "attention_mask", "loss_mask", "mask")}
    logps, entropy = policy_outputs(
        policy, batch, cfg.logprob_chunk_size, cfg.temperature, with_entropy=cfg.ent_coef > 0
    )
    values = response_values(value_model, batch)
    pg = policy_loss(logps, mb.logps, mb.advantages, mb.mask, cfg.clip_eps)
    vf = value_loss(values, mb.values, mb.returns, mb.mask, cfg.value_clip_eps)
    loss = pg.loss + cfg.vf_coef * vf.loss
    stats = {
        "policy_loss": pg.loss.detach(),
        "value_loss": vf.loss.detach(),
        "clip_frac": pg.clip_frac,
        "approx_kl": pg.approx_kl,
        "value_clip_frac": vf.clip_frac,
    }
    if entropy is not None:
        mean_entropy = masked_mean(entropy, mb.mask)
        loss = loss - cfg.ent_coef * mean_entropy
        stats["update_entropy"] = mean_entropy.detach()
    stats["loss"] = loss.detach()
    return loss, stats


@in_training_precision
def _ppo_loss_of(cfg: PPOConfig, trained: torch.nn.ModuleDict, mb: Rollout):
    """``ppo_loss`` on the {"policy", "value"} modules ``trained`` (the forward of the module DDP wraps)."""
    return ppo_loss(cfg, trained["policy"], trained["value"], mb)


def ppo_step(
    cfg: PPOConfig, loss_fn, minibatch: Rollout, optimizer, scheduler, params, rank: int = 0, world: int = 1
) -> dict:
    """One optimizer step on a minibatch, accumulated over micro-batches. ``loss_fn(micro) -> (loss, stats)``
    is ``ppo_loss`` on the policy and value model (in several processes, wrapped in DDP).

    Each loss is a token mean; weighting a micro-batch's by its share of the minibatch's response tokens makes
    the accumulated gradient that of one pass over the whole minibatch. In several processes each rank runs
    its share of the minibatch's rows (``rank_microbatches``) with the same weights (every rank holds the whole
    rollout, so it counts the whole minibatch's tokens itself), and the gradients summed over the ranks are
    those of one process: a mean over the minibatch's tokens, not a mean of per-rank means. A non-finite loss
    or gradient norm skips the update (the schedule still advances, as in the shared loop).
    """
    n_tokens = minibatch.mask.sum()
    # Rows of similar length share a micro-batch, so each is cut to little padding (Rollout.rows).
    lengths = minibatch.attention_mask.sum(1).tolist()
    rows = sorted(range(len(lengths)), key=lambda i: lengths[i])
    shares = distributed.rank_microbatches(rows, cfg.micro_batch_size, rank, world)
    sums: dict[str, float] = {}
    for j, share in enumerate(shares):
        # An empty share (fewer rows left in the minibatch than ranks) runs a stand-in that counts for nothing:
        # DDP needs every rank's backward to sync the gradients.
        micro = minibatch.rows(share or [0])
        weight = micro.mask.sum() / n_tokens if share else 0.0
        with distributed.gradient_sync(loss_fn, last=j == len(shares) - 1):
            loss, stats = loss_fn(micro)
            scaled = loss * weight
            if world > 1:  # DDP averages the gradients over the ranks: undo it
                scaled = scaled * world
            scaled.backward()
        for key, value in stats.items():
            sums[key] = sums.get(key, 0.0) + (float(value * weight) if share else 0.0)
    sums = dict(zip(sums, distributed.all_reduce(list(sums.values()))))  # each rank holds its rows' part
    return {**sums, **optimizer_step(optimizer, scheduler, params, cfg.max_grad_norm, sums["loss"])}


# ---------------------------------------------------------------------------------------------------------
# Launch and configuration checks


def score_change(samples_path: Path, iterations: int) -> dict | None:
    """The mean score of the run's last quarter of iterations minus its first quarter's (at least one
    iteration each), with a bootstrap interval over their samples: did the run raise its score by more than the
    noise of one batch of samples? None before two iterations."""
    if iterations < 2:
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


def check_launch(cfg: PPOConfig) -> None:
    """Refuse what PPO cannot do in the processes it was launched in (after the process group is up)."""
    world = distributed.world_size()
    if distributed.engine() == "deepspeed":
        raise ConfigError(
            "ppo runs data parallel (DDP) or sharded under FSDP, not under DeepSpeed: launch it with "
            "configs/accelerate/multi_gpu.yaml, plain torchrun, or configs/accelerate/fsdp.yaml (full fine-tuning)"
        )
    if world > 1 and cfg.generation_backend == "vllm":
        raise ConfigError(
            f"generation_backend=vllm in {world} processes is not supported by ppo (one vLLM engine per "
            "process is not implemented); use generation_backend=hf, or run in one process"
        )
    if cfg.prompts_per_iteration < world:
        raise ConfigError(
            f"prompts_per_iteration={cfg.prompts_per_iteration} is fewer than the {world} processes; each "
            "process needs at least one sample"
        )


def check_config(cfg: PPOConfig) -> None:
    """The declared ranges and ``PPOConfig.check`` (for a config built in code too), and the backend."""
    validate_config(cfg)
    check_scorer(cfg.reward, "reward")
    check_generation_backend(cfg.generation_backend)


# ---------------------------------------------------------------------------------------------------------
# The stage


def run(cfg: PPOConfig, monitors: MonitorSet | None = None) -> dict:
    """Train the policy with PPO; ``monitors`` replaces the default failure monitors (for tests)."""
    started = time.time()
    check_config(cfg)
    check_launch(cfg)  # starts the process group
    # The folder is checked, locked for this run and released however it ends (RunDir.create).
    with RunDir.create(cfg.output_dir, "ppo", cfg.resume_from, cfg.tensorboard, cfg=cfg) as run_dir:
        return _run(cfg, run_dir, started, monitors)


def _run(cfg: PPOConfig, run_dir: RunDir, started: float, monitors: MonitorSet | None) -> dict:
    rank, world, main = distributed.accelerator().process_index, distributed.world_size(), run_dir.writes
    print(f"run folder: {run_dir.path}", file=sys.stderr)
    seed_and_threads(cfg)
    device = pick_device()

    # Prompts, tokenized with the chat template.
    tokenizer = load_tokenizer(cfg.model, cfg.trust_remote_code)
    prompts, n_skipped = training_prompts(cfg)
    prompt_ids = [encode_prompt(tokenizer, p, cfg.max_prompt_length) for p in prompts]
    note_idle_processes(cfg, cfg.prompts_per_iteration, "iteration", "prompts_per_iteration")

    # The four roles. LoRA: one frozen base serves all three networks (policy = adapter "default",
    # reference = every adapter off, value = adapter "value" + head). Full fine-tuning: the reference is a
    # frozen copy and the value model its own trained copy (separate policy and value networks, as Stiennon et
    # al. 2020 and Huang et al. 2024, so value gradients never move the policy's features).
    # Under FSDP (full fine-tuning) each of the three networks is sharded as it is loaded (``distributed.shard``;
    # the main process alone reads the weights), and the reward is whole in every process.
    scorer = make_scorer(cfg, device)
    load = functools.partial(
        load_model, cfg.model, weights_dtype(cfg), cfg.trust_remote_code, device, distributed.load_on()
    )
    policy = load()
    distributed.shard(policy, cfg.lora)
    if cfg.lora:
        policy = apply_lora(policy, cfg)
        reference = None
        value_model = add_value_adapter(policy)
    else:
        reference = load().eval()
        reference.requires_grad_(False)
        distributed.shard(reference)
        value_model = ValueModel(load())
        distributed.shard(value_model)
    trained = torch.nn.ModuleDict({"policy": policy, "value": value_model})  # what checkpoints hold
    if cfg.gradient_checkpointing:  # the update's passes recompute each layer in the backward
        # LoRA: the value model's layers are recomputed with its adapter, as they ran (not the policy's).
        adapter = functools.partial(recompute_with_active_adapter, policy) if cfg.lora else None
        enable_gradient_checkpointing(trained, context_fn=adapter)
    rank_share = distributed.largest_rank_share(trained)
    trainable, total = count_parameters(trained)
    params = [p for p in trained.parameters() if p.requires_grad]
    optimizer = build_optimizer(params, cfg)
    steps_per_iteration = cfg.ppo_epochs * math.ceil(cfg.prompts_per_iteration / cfg.minibatch_size)
    scheduler = build_scheduler(
        optimizer, cfg.lr_scheduler, cfg.warmup_steps, cfg.iterations * steps_per_iteration
    )
    if cfg.kl_target is None:
        kl_controller = FixedKLController(cfg.init_kl_coef)
    else:
        kl_controller = AdaptiveKLController(cfg.init_kl_coef, cfg.kl_target, cfg.kl_horizon)
    monitors = monitors if monitors is not None else default_monitors("ppo", kl_target=cfg.kl_target)
    # A vLLM engine on the starting weights, updated every iteration; None: transformers' generate.
    sampler = vllm_sampler(cfg, tokenizer, device) if cfg.generation_backend == "vllm" else None

    # Resume: weights of policy and value, optimizer, schedule, RNG, KL controller, iteration. Nothing in a
    # checkpoint depends on the number of processes; the main process picks it, every process reads it.
    start, n_nonfinite, elapsed_before = 0, 0, 0.0
    resume = resume_checkpoint(cfg.resume_from, run_dir.checkpoints_dir) or ""  # verified; corrupt: fall back
    if resume:
        state = load_checkpoint(resume, trained, optimizer, scheduler)
        if (state["n_prompts"], state["prompts_per_iteration"]) != (len(prompts), cfg.prompts_per_iteration):
            raise ConfigError(
                f"resume_from: {resume} was written for {state['n_prompts']} prompts, "
                f"{state['prompts_per_iteration']} per iteration; an exact resume needs the same"
            )
        try:
            kl_controller.load_state_dict(state["kl_controller"])
        except ValueError as e:
            raise ConfigError(f"resume_from: {e} (kl_target must not change between runs)") from None
        start, n_nonfinite, elapsed_before = (
            state["iteration"],
            state["n_nonfinite_skipped"],
            state["elapsed_s"],
        )
    run_dir.truncate_metrics_after(start)
    if resume:
        monitors.replay(run_dir.logged_rows())  # their windows as the uninterrupted run had them
    samples_path = run_dir.path / "samples.jsonl"
    if main:
        truncate_jsonl(samples_path, start)
    # The update's forward pass: policy and value model as one module, for DDP to sync both (one process:
    # the module itself). Wrapping broadcasts rank 0's weights, which every rank already holds.
    stepper = distributed.data_parallel(distributed.StepModule(trained, functools.partial(_ppo_loss_of, cfg)))
    loop_started = time.monotonic()
    iteration, saved, last_checkpoint, last_row, stopped_by = start, start if resume else -1, resume, {}, None

    def save() -> str | None:  # the checkpoint written, or the last good one where the state is not finite
        # Checkpoints hold what requires grad; PEFT adapter switches toggle that flag, so set it once more.
        for p in params:
            p.requires_grad_(True)
        state = {
            "iteration": iteration,
            "kl_controller": kl_controller.state_dict(),
            "n_prompts": len(prompts),
            "prompts_per_iteration": cfg.prompts_per_iteration,
            "n_nonfinite_skipped": n_nonfinite,
            "elapsed_s": elapsed_before + time.monotonic() - loop_started,
        }
        path = checkpoint_dir(run_dir.checkpoints_dir, iteration)
        try:
            return write_checkpoint(path, trained, optimizer, scheduler, state, cfg.keep_checkpoints)
        except NonFiniteState as e:
            return skipped_checkpoint("iteration", iteration, e, last_checkpoint, run_dir.log_metrics)

    bar = tqdm(
        total=cfg.iterations, initial=start, disable=not cfg.progress or not main, desc="ppo", unit="iter"
    )
    signals = StopSignals()
    try:
        with signals:
            while iteration < cfg.iterations:
                t0 = time.monotonic()
                # 1. Sample one response per prompt from the current policy (batched, KV cache), with a seed
                #    that depends only on (seed, iteration). Each process samples its share of the generation
                #    batches, each batch from its own seed, so the samples do not depend on the number of
                #    processes. A vLLM engine (one process) first takes the policy's weights (LoRA: the policy's
                #    adapter merged in) unless it already holds them: a fresh run's first iteration, whose policy
                #    is the model the engine was built on (a new LoRA adapter has B = 0).
                idx = iteration_prompts(len(prompts), cfg.prompts_per_iteration, iteration, cfg.seed)
                sampling = SamplingConfig(
                    cfg.max_new_tokens, cfg.temperature, 1.0, derived_seed(cfg.seed, iteration, 0)
                )
                trained.eval()
                ids = [prompt_ids[i] for i in idx]
                push = iteration > start or bool(resume)
                mine = sample_share(cfg, policy, tokenizer, ids, sampling, rank, world, sampler, push)
                # 2. Score each response with the reward (each process its own samples), then gather every
                #    process's samples and scores: every process holds the whole batch from here on.
                mine = dict(sorted(mine.items()))  # by position in the iteration's prompts
                my_texts = [g.text for g in mine.values()]  # none where a process got no generation batch
                my_scores = scorer.score([prompts[idx[k]] for k in mine], my_texts) if mine else []
                gathered = distributed.gather_dicts(dict(zip(mine, zip(mine.values(), my_scores))))
                generations, texts = [g for g, _ in gathered.values()], [g.text for g, _ in gathered.values()]
                scores = torch.tensor([score for _, score in gathered.values()], dtype=torch.float32)
                finished = torch.tensor([g.finished for g in generations])
                # 3.-4. The forward passes (policy, reference and value model; each process its share of the
                #    samples, gathered), then per-token rewards (score - beta KL), GAE advantages and returns,
                #    and whitening, over the whole batch in every process.
                batch = collate_samples(generations, tokenizer.pad_token_id, device)
                passes = shared_rollout_passes(cfg, policy, reference, value_model, batch, rank, world)
                beta = kl_controller.beta
                rollout, rollout_stats = make_rollout(
                    cfg, batch, passes, scores.to(device), finished.to(device), beta
                )
                t1 = time.monotonic()
                # 5. ppo_epochs passes of minibatch updates over the samples, in a seeded order (the same in
                #    every process); each process trains on its share of every minibatch.
                trained.train()
                generator = torch.Generator().manual_seed(derived_seed(cfg.seed, iteration, 1))
                step_stats = []
                for _ in range(cfg.ppo_epochs):
                    order = torch.randperm(len(generations), generator=generator).to(device)
                    for s in range(0, len(generations), cfg.minibatch_size):
                        minibatch = rollout.rows(order[s : s + cfg.minibatch_size])
                        step_stats.append(
                            ppo_step(cfg, stepper, minibatch, optimizer, scheduler, params, rank, world)
                        )
                n_nonfinite += int(sum(s["nonfinite"] for s in step_stats))
                # 6. Adapt beta toward the KL target from this batch's KL (Ziegler et al. 2019), or keep it.
                kl_controller.update(rollout_stats["kl"], n_steps=len(generations))
                iteration += 1
                bar.update(1)

                # 7. Log the health of the run, and let the failure monitors see it.
                lengths = [len(g.response_ids) for g in generations]
                length = length_stats(lengths)
                row = {
                    "step": iteration,
                    "score/mean": scores.mean().item(),
                    "score/std": scores.std().item() if len(scores) > 1 else 0.0,
                    "reward/mean": scores.mean().item(),  # the key RewardHackingMonitor reads
                    **rollout_stats,
                    "beta": beta,
                    **{
                        k: float(np.mean([s[k] for s in step_stats]))
                        for k in step_stats[0]
                        if k != "nonfinite"
                    },
                    "len/mean": length.mean,
                    "len/std": length.std,
                    "eos_frac": finished.float().mean().item(),
                    "distinct_2": distinct_n(texts, 2),
                    "reward_length_corr": pearson(scores.tolist(), lengths),
                    "nonfinite_skipped": n_nonfinite,
                    "rollout_s": t1 - t0,
                    "update_s": time.monotonic() - t1,
                    "elapsed_s": elapsed_before + time.monotonic() - loop_started,
                }
                if main:
                    with open(samples_path, "a", encoding="utf-8") as f:
                        for i, g, score in zip(idx, generations, scores.tolist()):
                            sample = {
                                "step": iteration,
                                "prompt": prompts[i],
                                "response": g.text,
                                "score": score,
                            }
                            f.write(json.dumps({**sample, "finished": g.finished}) + "\n")
                if iteration % cfg.log_every == 0 or iteration == cfg.iterations:
                    last_row = row
                    run_dir.log_metrics(row)
                    bar.set_postfix(score=f"{row['score/mean']:.3f}", kl=f"{row['kl']:.2f}")
                    if monitors.on_log(iteration, row) == "stop":
                        stopped_by = ", ".join(e.monitor for e in monitors.last_events if e.action == "stop")
                    for event in monitors.last_events:
                        run_dir.log_metrics(event.to_row())

                # 8. Checkpoint every save_every iterations, and on SIGINT/SIGTERM before raising. The processes
                #    agree first: a signal or a stop seen by any of them stops them all.
                stop_flag, received = distributed.agree_to_stop(bool(stopped_by), signals.received)
                stopped_by = stopped_by or ("a monitor in another process" if stop_flag else None)
                if (cfg.save_every and iteration % cfg.save_every == 0) or received:
                    last_checkpoint, saved = save(), iteration
                if received:
                    name = signal.Signals(int(received)).name
                    raise TrainingInterrupted(checkpoint=last_checkpoint, reason=f"interrupted by {name}")
                if stopped_by:
                    break
            if saved != iteration:
                last_checkpoint, saved = save(), iteration
    except KeyboardInterrupt:  # a second signal: stopped at once, maybe inside a checkpoint write
        raise stopped_at_once(signals, run_dir.checkpoints_dir, last_checkpoint or None) from None
    finally:
        bar.close()
        run_dir.close()

    # The final policy alone (the value adapter is not part of it), written by the main process.
    if cfg.lora:
        remove_value_adapter(policy)
    distributed.save_from_main(
        policy,
        lambda state_dict: save_final(
            policy, tokenizer, run_dir.final_dir, merge_lora=cfg.merge_lora, state_dict=state_dict
        ),
    )
    rows = [json.loads(line) for line in run_dir.metrics_path.read_text().splitlines()] if main else []
    summary = {
        "stage": "ppo",
        "model": cfg.model,
        "reward": cfg.reward,
        "run_dir": str(run_dir.path),
        "final_model": str(run_dir.final_dir),
        "iterations": iteration,
        "stopped_by": stopped_by,
        "prompts": len(prompts),
        "skipped_rows": n_skipped,
        "reference": "policy base with adapters disabled" if cfg.lora else "frozen copy",
        "value_model": "second LoRA adapter on the policy's base + head"
        if cfg.lora
        else "separate copy + head",
        "trainable_parameters": trainable,
        "total_parameters": total,
        "params_rank_share": rank_share,
        "score_by_iteration": [r["score/mean"] for r in rows if "event" not in r and "score/mean" in r],
        "score_change": score_change(samples_path, iteration) if main else None,
        "kl_by_iteration": [r["kl"] for r in rows if "event" not in r and "kl" in r],
        "events": [r for r in rows if "event" in r],
        "final_metrics": last_row,
        "last_checkpoint": last_checkpoint,
        "train_seconds": elapsed_before + time.monotonic() - loop_started,
        "wall_seconds": time.time() - started,
        "peak_rss_mb": peak_rss_mb(),
    }
    run_dir.write_summary(summary)
    return summary
