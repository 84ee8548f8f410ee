"""`alignkit grpo`: critic-free online RL: GRPO (Shao et al. 2024) and its relatives: Dr. GRPO, RLOO, REINFORCE++
advantages; DAPO's clip-higher, token-level loss and dynamic sampling; GSPO's sequence-level ratio.

No value model: a prompt's num_generations samples are scored and each sample's advantage is its score against
the group's (or the batch's) others (``losses.grpo``). The loop is the online engine's (``training.online_engine``:
sample -> score -> make_batch -> update -> log, checkpoint); this file holds GRPO's part of an iteration:
2b. dynamic sampling (``refill``) -> 3. advantages -> 4. old (and reference) log-probs (``make_batch``) ->
5. num_iterations passes of clipped updates (``update``). beta = 0 loads no reference model at all.

In several processes it runs as PPO does: each rank runs the no-grad passes for its share of the samples, the
shares are gathered, and each rank trains on its share of every minibatch, normalised by the whole minibatch.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from typing import Literal

import numpy as np
import torch

from alignkit.config import OnlineTrainConfig, doc_field
from alignkit.evaluation.monitors import default_monitors
from alignkit.losses import grpo as losses
from alignkit.losses.ppo import masked_mean
from alignkit.models.precision import in_training_precision
from alignkit.stages import Stage
from alignkit.training import online_engine as engine
from alignkit.training.remedies import AdjustableCoef, monitor_actions
from alignkit.training.rollout import (
    GroupRollout,
    policy_outputs,
    rollout_inputs,
    rollout_step,
    sampler_mismatch,
)


@dataclass
class GRPOConfig(OnlineTrainConfig):
    """Critic-free online RL: each iteration samples num_generations responses to each of prompts_per_iteration
    prompts, scores them with `reward`, and trains on each response's advantage within its group. Data:
    prompts (a `prompt` column, or `messages` ending with a user turn)."""

    # --- iterations ---
    iterations: int = doc_field(20, "Iterations; each samples, scores and updates once.", ge=1)
    prompts_per_iteration: int = doc_field(8, "Prompts (groups) sampled per iteration.", ge=1)
    num_generations: int = doc_field(4, "Responses sampled per prompt: the group size.", ge=2)
    top_p: float = doc_field(1.0, "Nucleus sampling: the smallest token set with this mass.", gt=0, le=1)
    dynamic_sampling: bool = doc_field(
        False,
        "DAPO's dynamic sampling: drop groups whose rewards are all equal (no signal) and draw further prompts "
        "until prompts_per_iteration groups remain or max_refills draws were made.",
    )
    max_refills: int = doc_field(
        3,
        "Dynamic sampling: further draws of prompts_per_iteration prompts per iteration at most; if every group "
        "of every draw is equal, the iteration trains on its first draw.",
        ge=1,
    )
    # --- objective ---
    advantage: Literal["grpo", "dr_grpo", "rloo", "reinforce_pp"] = doc_field(
        "grpo",
        "grpo: (r - group mean) / group std; dr_grpo: r - group mean; rloo: r - mean of the group's others; "
        "reinforce_pp: (r - batch mean) / batch std (REINFORCE++).",
    )
    loss_aggregation: Literal["token", "sequence", "fixed_length"] = doc_field(
        "token",
        "token: sum over tokens / tokens (DAPO); sequence: mean per response, then over responses (GRPO); "
        "fixed_length: sum / (responses x max_new_tokens) (Dr. GRPO).",
    )
    importance_sampling: Literal["token", "sequence"] = doc_field(
        "token", "token: a ratio per token; sequence: exp(mean token log-ratio) per response (GSPO)."
    )
    epsilon_low: float = doc_field(0.2, "Ratio clip below: 1 - epsilon_low.", gt=0, lt=1)
    epsilon_high: float = doc_field(0.2, "Ratio clip above: 1 + epsilon_high (DAPO's clip-higher: 0.28).", gt=0)
    beta: float = doc_field(
        0.0, "Weight of the k3 KL to the reference, per token in the loss; 0: no reference loaded.", ge=0
    )
    # --- update ---
    num_iterations: int = doc_field(
        1, "Passes of minibatch updates over each batch, against the log-probs of the policy that sampled.", ge=1
    )
    learning_rate: float = doc_field(1e-6, "Peak AdamW learning rate (LoRA usually wants ~1e-5).")
    lr_scheduler: Literal["constant", "linear", "cosine"] = doc_field(
        "constant", "Learning-rate schedule over all optimizer steps."
    )


# ---------------------------------------------------------------------------------------------------------
# Steps 2b-4 of an iteration


def zero_std_frac(scores: list[float], k: int) -> float:
    return float(losses.zero_spread_groups(torch.tensor(scores, dtype=torch.float64), k).float().mean())


def dynamic_sampling(samples: engine.Samples, draw, k: int, n_groups: int, max_refills: int):
    """DAPO (Yu et al. 2025, sec. 3.2): keep the groups with a reward spread, drawing further prompts until
    ``n_groups`` are kept or ``max_refills`` draws were made; none kept at all: the first draw as it was.
    Returns (samples, stats)."""
    def spread(s: engine.Samples) -> engine.Samples:
        equal = losses.zero_spread_groups(torch.tensor(s.scores, dtype=torch.float64), k).tolist()
        return s.select([i for i in range(len(s.scores)) if not equal[i // k]])

    kept, attempt = spread(samples), 0
    while len(kept.scores) < n_groups * k and attempt < max_refills:
        attempt += 1
        kept = kept + spread(draw(attempt))
    kept = kept.select(list(range(min(len(kept.scores), n_groups * k)))) if kept.scores else samples
    stats = {"dynamic_sampling/draws": attempt + 1, "dynamic_sampling/groups": len(kept.scores) // k}
    return kept, stats | {"zero_std_frac": zero_std_frac(samples.scores, k)}


def trains_on_policy_only(cfg: GRPOConfig, n_rows: int) -> bool:
    """Whether the iteration's update is one on-policy step (num_iterations = 1, one minibatch of every
    response) whose ratio is exactly 1, so the old log-probs are never read: the no-grad policy pass is then
    skipped, its signals (entropy, KL) taken from the update's pass, as TRL does on policy. Not with vLLM: the
    sampler-trainer mismatch needs the trainer's log-probs of the samples."""
    return cfg.num_iterations == 1 and cfg.minibatch_size >= n_rows and cfg.generation_backend == "hf"


@torch.no_grad()
def make_rollout(cfg: GRPOConfig, batch: dict, passes: dict, scores: torch.Tensor):
    """3. advantages from the scores; 4. the no-grad passes' log-probs kept as the old (and reference) ones
    (without a policy pass: no old log-probs, the update logs entropy and KL). Returns (GroupRollout, stats)."""
    mask = batch["mask"]
    adv = losses.ADVANTAGES[cfg.advantage](scores, cfg.num_generations)  # (B,)
    logps = passes.get("logps", torch.zeros(mask.shape, device=mask.device))
    ref = passes.get("ref_logps", torch.zeros_like(logps))
    sequences = (batch["input_ids"], batch["attention_mask"], batch["loss_mask"])
    rollout = GroupRollout(*sequences, mask, logps, ref, adv[:, None], signals_from_update="logps" not in passes)
    stats = {"advantage/abs_mean": adv.abs().mean().item()}
    if "logps" in passes:
        stats["entropy"] = masked_mean(passes["entropy"], mask).item()
        if "ref_logps" in passes:
            signals = losses.kl_signals(logps, ref, mask)
            stats |= {k: (v.mean() if v.shape[1] == 1 else masked_mean(v, mask)).item() for k, v in signals.items()}
    return rollout, stats


# ---------------------------------------------------------------------------------------------------------
# Step 5: the update


@in_training_precision
def grpo_loss(cfg: GRPOConfig, policy, mb: GroupRollout, beta: float) -> tuple[torch.Tensor, dict]:
    """The clipped policy loss of ``mb``, normalised by its minibatch's totals, and its metrics as shares of
    the minibatch (so micro-batches' add up): the forward of the module DDP wraps."""
    signals = mb.signals_from_update and mb.on_policy
    logps, entropy = policy_outputs(
        policy, mb.model_inputs(), cfg.logprob_chunk_size, cfg.temperature, with_entropy=signals
    )
    old = logps.detach() if mb.on_policy else mb.old_logps  # on policy: ratio exactly 1
    out = losses.policy_loss(
        logps, old, mb.advantages[:, 0], mb.mask, cfg.epsilon_low, cfg.epsilon_high, cfg.importance_sampling,
        cfg.loss_aggregation, mb.ref_logps, beta, cfg.max_new_tokens, mb.n_sequences, mb.n_tokens,
    )  # fmt: skip
    m = mb.mask.bool()

    def share(x: torch.Tensor) -> float:  # a per-token (or per-response) quantity's part of the minibatch mean
        if x.shape[1] == 1:
            return float(x.float().sum()) / mb.n_sequences
        return float(torch.where(m, x.float(), torch.zeros_like(logps)).sum()) / mb.n_tokens

    stats = {"loss": out.loss.item(), "clip_frac/low": share(out.clip_low), "clip_frac/high": share(out.clip_high)}
    stats["ratio/mean"] = share(out.ratio.detach())
    if signals:  # no no-grad policy pass was made: this on-policy pass's log-probs are the sampler's
        stats["entropy"] = share(entropy)
        if needs_reference(cfg):  # a reference was loaded and its pass made
            stats |= {k: share(v) for k, v in losses.kl_signals(logps.detach(), mb.ref_logps, mb.mask).items()}
    return out.loss, stats | ({"kl/update": share(out.kl.detach())} if out.kl is not None else {})


# ---------------------------------------------------------------------------------------------------------
# The stage


def needs_reference(cfg: GRPOConfig) -> bool:
    """beta > 0 (the loss's KL), or a gold evaluation (its KL to the reference)."""
    return cfg.beta > 0 or cfg.gold_reward is not None


def grpo_method(cfg: GRPOConfig, setup: engine.OnlineSetup) -> engine.OnlineMethod:
    """GRPO on the engine's policy (and, with beta > 0, its reference)."""
    policy, rank, world, k = setup.policy, setup.rank, setup.world, cfg.num_generations
    # The loss reads its beta from `objective`, a copy of cfg whose beta the monitors' adjust action raises.
    objective = dataclasses.replace(cfg)
    beta = AdjustableCoef(objective)
    drawn: dict = {}  # the dynamic sampling's stats of this iteration

    def refill(samples: engine.Samples, draw) -> engine.Samples:
        # 2b. Dynamic sampling: groups without a reward spread dropped, further prompts drawn.
        kept, stats = dynamic_sampling(samples, draw, k, cfg.prompts_per_iteration, cfg.max_refills)
        drawn.update(stats)
        return kept

    def make_batch(samples: engine.Samples) -> engine.Batch:
        # 3.-4. The no-grad passes (policy: old log-probs and entropy; reference when loaded), each process its
        #    share of the samples, gathered; then advantages over the whole batch in every process.
        on_policy_only = trains_on_policy_only(cfg, len(samples.scores))
        batch, passes, scores = rollout_inputs(cfg, setup, samples, policy_pass=not on_policy_only)
        rollout, stats = make_rollout(cfg, batch, passes, scores)
        finished = [g.finished for g in samples.generations]
        stats |= {"zero_std_frac": zero_std_frac(samples.scores, k), **drawn, "beta": objective.beta}
        stats |= {"reward/std": float(np.std(samples.scores)), "truncated_frac": 1 - float(np.mean(finished))}
        stats |= sampler_mismatch(samples.generations, passes["logps"], batch["mask"]) if not on_policy_only else {}
        fields = [{"advantage": a} for a in rollout.advantages[:, 0].tolist()]
        return engine.Batch(rollout, stats, fields)

    def update(batch: engine.Batch, opt: engine.Optimization) -> dict:
        # 5. num_iterations passes of minibatch updates against the kept old log-probs; the first step is on
        #    policy (its own pass's log-probs, detached). Each process trains on its share of every minibatch.
        rollout = batch.data

        def step(rows: list[int], j: int) -> dict:
            return rollout_step(cfg, opt.stepper, rollout.minibatch(rows, on_policy=j == 0), opt.parts, rank, world)

        return engine.step_means(opt.steps(len(rollout.mask), step))

    return engine.OnlineMethod(
        units=cfg.iterations,
        prompts_per_unit=cfg.prompts_per_iteration,
        trained=policy,
        epochs=cfg.num_iterations,
        minibatch_size=cfg.minibatch_size,
        make_batch=make_batch,
        loss=lambda trained, mb: grpo_loss(cfg, trained, mb, objective.beta),
        update=update,
        monitors=default_monitors(
            "grpo", gold=cfg.gold_reward is not None, kl=needs_reference(cfg), actions=monitor_actions(cfg),
            kl_limit=cfg.kl_limit,
        ),
        samples_per_prompt=k,
        top_p=cfg.top_p,
        rows_per_unit=cfg.prompts_per_iteration * k,
        refill=refill if cfg.dynamic_sampling else None,
        state_dict=beta.state_dict,
        load_state_dict=beta.load_state_dict,
        adjust_kl=beta.adjust if cfg.beta > 0 else None,
        describe={"advantage": cfg.advantage, "loss_aggregation": cfg.loss_aggregation},
    )


ONLINE = engine.OnlineStage("grpo", grpo_method, "prompts_per_iteration", needs_reference)
check_config = engine.check_config  # before anything loads: ranges, cross-field rules, reward, backend
check_launch, run = ONLINE.check_launch, ONLINE.run
STAGE = Stage("grpo", GRPOConfig, run)
