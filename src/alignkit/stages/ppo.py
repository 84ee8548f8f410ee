"""`alignkit ppo`: RLHF with PPO (Ziegler et al. 2019; Stiennon et al. 2020; Ouyang et al. 2022).

Four roles: the policy being trained, a frozen reference it pays a KL penalty to, a reward (a function or a
reward model from `alignkit rm`) and a value model. The loop is the online engine's (``training.online_engine``:
sample -> score -> make_batch -> update -> log, checkpoint); this file holds PPO's part of an iteration:
3. KL-penalised per-token rewards -> 4. values and GAE (``make_batch``) -> 5. PPO epochs -> 6. KL-coefficient
update (``update``).

Launched in several processes (torchrun, accelerate launch) it runs data parallel (DDP) with the numbers of one
process: each rank runs the rollout's forward passes for its share of the iteration's samples, the shares are
gathered (so whitening, GAE and every logged statistic see the whole batch), and each rank trains on its share
of every minibatch, its loss normalised by the whole minibatch's tokens. Under FSDP (full fine-tuning) the
three networks are sharded as well, and the rollout passes run on the shards, every rank running as many.
"""

from __future__ import annotations

import dataclasses
import functools
from dataclasses import dataclass
from typing import Literal

import torch

from alignkit.config import ConfigError, OnlineTrainConfig, doc_field, retired_online_fields
from alignkit.evaluation.monitors import default_monitors
from alignkit.losses import ppo as losses
from alignkit.models.precision import in_training_precision
from alignkit.stages import Stage
from alignkit.training import online_engine as engine
from alignkit.training.remedies import AdjustableCoef, monitor_actions, raise_kl_coef
from alignkit.training.rollout import (
    Rollout,
    critic_for,
    policy_outputs,
    response_values,
    rollout_inputs,
    rollout_step,
)


@dataclass
class PPOConfig(OnlineTrainConfig):
    """RLHF with PPO. Data: prompts (a `prompt` column, or `messages` ending with a user turn)."""

    # Keys an older alignkit's ppo config.yaml holds (TrainConfig's, unused here): read for one release.
    ALIASES = retired_online_fields(
        "ppo",
        batch_size="prompts_per_iteration (rollout batch) and minibatch_size (optimizer batch)",
        epochs="iterations and ppo_epochs",
        max_steps="iterations",
    )

    # --- rollouts ---
    iterations: int = doc_field(20, "PPO iterations; each samples, scores and updates once.", ge=1)
    prompts_per_iteration: int = doc_field(
        16, "Prompts sampled per iteration (the rollout batch), one response each.", ge=1
    )
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
    ent_adjust_step: float = doc_field(
        0.01,
        "mode_collapse_action=raise_entropy adds this to ent_coef each time the mode-collapse monitor fires "
        "(added, not multiplied: ent_coef starts at 0).",
        gt=0,
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

    def check(self) -> None:
        """The rules across fields (each field's own range is declared on it and checked before this)."""
        super().check()
        if self.kl_target is not None and self.init_kl_coef == 0:
            raise ConfigError(
                "config key 'init_kl_coef' must be > 0 when kl_target is set (adaptive control scales beta and "
                "cannot move it from 0), got 0.0; or set kl_target=null for no KL penalty",
                ("init_kl_coef", "kl_target"),
            )


# ---------------------------------------------------------------------------------------------------------
# Steps 3-4 of an iteration: the rollout


@torch.no_grad()
def make_rollout(cfg: PPOConfig, batch: dict, passes: dict, scores, finished, beta: float):
    """Steps 3-4 of an iteration, from ``rollout_passes`` over the whole ``batch``: KL-penalised per-token
    rewards, GAE, and whitening over the batch's tokens. Returns (Rollout, stats)."""
    logps, ref_logps, entropy, values = (passes[k] for k in ("logps", "ref_logps", "entropy", "values"))
    mask = batch["mask"]
    # 3. r_t = -beta KL_t, plus the score (minus any missing-EOS penalty) on the last token.
    shaped = losses.per_token_rewards(
        scores, logps, ref_logps, mask, beta, cfg.kl_estimator, finished, cfg.missing_eos_penalty
    )
    rewards = losses.whiten(shaped.rewards, mask, shift_mean=False) if cfg.whiten_rewards else shaped.rewards
    # 4. GAE on the rollout's values; advantages whitened over the batch's tokens (lm-human-preferences).
    adv = losses.gae(rewards, values, mask, cfg.gamma, cfg.lam)
    sequences = (batch["input_ids"], batch["attention_mask"], batch["loss_mask"])
    rollout = Rollout(*sequences, mask, logps, values, losses.whiten(adv.advantages, mask), adv.returns)
    def mean(x: torch.Tensor) -> float:  # over the batch's response tokens
        return losses.masked_mean(x, mask).item()

    # kl: nats per response, the quantity the KL controller steers
    stats = {"kl": shaped.kl.sum(1).mean().item(), "kl/per_token": mean(shaped.kl), "entropy": mean(entropy)}
    stats |= {"rlhf_reward/mean": shaped.rewards.sum(1).mean().item(), "value/mean": mean(values)}
    stats |= {"returns/mean": mean(adv.returns)}
    stats["explained_variance"] = losses.explained_variance(values, adv.returns, mask).item()
    return rollout, stats


# ---------------------------------------------------------------------------------------------------------
# The PPO update


@in_training_precision
def ppo_loss(cfg: PPOConfig, policy, value_model, mb: Rollout) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """Clipped surrogate + vf_coef * clipped value loss - ent_coef * entropy, each a token mean over ``mb``: the
    forward of the module DDP wraps, its steps ``rollout_step``s weighted by tokens."""
    batch = mb.model_inputs()
    logps, entropy = policy_outputs(policy, batch, cfg.logprob_chunk_size, cfg.temperature, cfg.ent_coef > 0)
    values = response_values(value_model, batch)
    pg = losses.policy_loss(logps, mb.logps, mb.advantages, mb.mask, cfg.clip_eps)
    vf = losses.value_loss(values, mb.values, mb.returns, mb.mask, cfg.value_clip_eps)
    loss = pg.loss + cfg.vf_coef * vf.loss
    stats = {"policy_loss": pg.loss.detach(), "value_loss": vf.loss.detach(), "clip_frac": pg.clip_frac}
    stats |= {"approx_kl": pg.approx_kl, "value_clip_frac": vf.clip_frac}
    if entropy is not None:
        mean_entropy = losses.masked_mean(entropy, mb.mask)
        loss = loss - cfg.ent_coef * mean_entropy
        stats["update_entropy"] = mean_entropy.detach()
    stats["loss"] = loss.detach()
    return loss, stats


# ---------------------------------------------------------------------------------------------------------
# The stage


def ppo_method(cfg: PPOConfig, setup: engine.OnlineSetup) -> engine.OnlineMethod:
    """PPO on the engine's policy and reference, with a value model (``rollout.critic_for``)."""
    rank, world = setup.rank, setup.world
    critic = critic_for(setup.policy, cfg.lora, setup.load)
    kl_controller = losses.kl_controller(cfg.init_kl_coef, cfg.kl_target, cfg.kl_horizon)
    # The loss reads its ent_coef from `objective`, a copy of cfg whose ent_coef mode collapse's raise_entropy
    # action raises.
    objective = dataclasses.replace(cfg)
    ent_coef = AdjustableCoef(objective, "ent_coef")

    def make_batch(samples: engine.Samples) -> engine.Batch:
        # 3.-4. The forward passes (policy, reference and value model; each process its share of the samples,
        #    gathered), then per-token rewards (score - beta KL), GAE advantages and returns, and whitening,
        #    over the whole batch in every process.
        batch, passes, scores = rollout_inputs(cfg, setup, samples, critic.model)
        finished = torch.tensor([g.finished for g in samples.generations]).to(setup.device)
        beta = kl_controller.beta
        rollout, stats = make_rollout(cfg, batch, passes, scores, finished, beta)
        return engine.Batch(rollout, {**stats, "beta": beta, "ent_coef": objective.ent_coef})

    def update(batch: engine.Batch, opt: engine.Optimization) -> dict:
        # 5. ppo_epochs passes of minibatch updates over the samples; each process trains on its share of every
        #    minibatch.
        rollout, n = batch.data, len(batch.data.mask)

        def step(rows: list[int], j: int) -> dict:
            return rollout_step(cfg, opt.stepper, rollout.rows(rows), opt.parts, rank, world, token_weighted=True)

        step_stats = opt.steps(n, step)
        # 6. Adapt beta toward the KL target from this batch's KL (Ziegler et al. 2019), or keep it.
        kl_controller.update(batch.stats["kl"], n_steps=n)
        return engine.step_means(step_stats)

    def load_state_dict(state: dict) -> None:
        kl_controller.load_state_dict(state["kl_controller"])
        ent_coef.load_state_dict(state)

    return engine.OnlineMethod(
        units=cfg.iterations,
        prompts_per_unit=cfg.prompts_per_iteration,
        trained=critic.trained,
        epochs=cfg.ppo_epochs,
        minibatch_size=cfg.minibatch_size,
        make_batch=make_batch,
        loss=lambda trained, mb: ppo_loss(objective, trained["policy"], trained["value"], mb),
        update=update,
        monitors=default_monitors(
            "ppo", kl_target=cfg.kl_target, gold=cfg.gold_reward is not None, actions=monitor_actions(cfg),
            kl_limit=cfg.kl_limit,
        ),
        recompute_context=critic.recompute_context,
        final_policy=critic.final_policy,
        state_dict=lambda: {"kl_controller": kl_controller.state_dict(), **ent_coef.state_dict()},
        load_state_dict=load_state_dict,
        # The remedies; the state_dict keeps what they changed.
        adjust_kl=functools.partial(raise_kl_coef, kl_controller),
        adjust_entropy=lambda: ent_coef.set(objective.ent_coef + cfg.ent_adjust_step),
        describe=critic.describe,
    )


ONLINE = engine.OnlineStage("ppo", ppo_method, one_sample_each="prompts_per_iteration")
check_config = engine.check_config  # before anything loads: ranges, cross-field rules, reward, backend
check_launch, run = ONLINE.check_launch, ONLINE.run
STAGE = Stage("ppo", PPOConfig, run)
