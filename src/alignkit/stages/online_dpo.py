"""`alignkit online-dpo`: online (iterative) DPO, pairs sampled from the policy being trained, every round.

Offline DPO learns from pairs another policy wrote, and says less about the policy's own responses the further
it moves from that one (distribution shift). Online DPO samples fresh pairs from the current policy each round
and ranks them with a reward (Xu et al. 2023, "Some things are more CRINGE than others", pairwise iterative
training; Guo et al. 2024, "Direct Language Model Alignment from Online AI Feedback"; Xiong et al. 2024,
"Iterative Preference Learning from Human Feedback"). The loop is the online engine's
(``training.online_engine``: sample -> score -> make_batch -> update -> log, checkpoint); this file holds online
DPO's part of a round: 3. pair best vs worst -> 4. reference log-probs (``make_batch``) -> 5. DPO epochs
(``update``). It reuses build-prefs' pairing rule (``data.pairing``) and DPO's pair log-probs and loss
(``training.preference``, ``losses.preference``).

Launched in several processes (torchrun, accelerate launch) it runs data parallel (DDP) with the numbers of one
process, as PPO does: each rank takes the log-probs of its share of the samples, the shares are gathered (so
every rank pairs the whole round alike), and each rank trains on its share of every minibatch's pairs, its loss
divided by the whole minibatch's pairs. Under FSDP (full fine-tuning) policy and reference are sharded as well,
and the log-prob passes run on the shards, every rank running as many.
"""

from __future__ import annotations

import dataclasses
import functools
from dataclasses import dataclass
from typing import Literal

import numpy as np
import torch

from alignkit.config import OnlineTrainConfig, PairLossFields, doc_field, retired_online_fields
from alignkit.data.pairing import make_pairs
from alignkit.data.tokenize import EncodedPair
from alignkit.evaluation.metrics import kl_per_token
from alignkit.evaluation.monitors import default_monitors
from alignkit.models.generation import Generation
from alignkit.models.precision import in_training_precision
from alignkit.stages import Stage
from alignkit.training import online_engine as engine
from alignkit.training.online import accumulated_step
from alignkit.training.preference import PairExample, PairLogprobs, collate_pair_examples, pair_outputs
from alignkit.training.reference import PRECOMPUTED, apply
from alignkit.training.remedies import AdjustableCoef, monitor_actions
from alignkit.training.rollout import sample_logprobs


@dataclass
class OnlineDPOConfig(PairLossFields, OnlineTrainConfig):
    """A round: samples_per_prompt responses to each of prompts_per_round prompts from the current policy,
    scored by `reward`, each prompt's best against its worst, dpo_epochs of DPO steps on those pairs against
    the starting model. Data: prompts (a `prompt` column, or `messages` ending with a user turn)."""

    # Keys an older alignkit's online-dpo config.yaml holds (TrainConfig's, unused here): read for one release.
    ALIASES = retired_online_fields(
        "online-dpo",
        batch_size="prompts_per_round (samples) and minibatch_size (pairs per optimizer step)",
        epochs="rounds and dpo_epochs",
        max_steps="rounds",
    )

    # --- rounds ---
    rounds: int = doc_field(10, "Rounds; each samples, scores, pairs and updates once.", ge=1)
    prompts_per_round: int = doc_field(8, "Prompts per round; each makes at most one pair.", ge=1)
    samples_per_prompt: int = doc_field(
        4,
        "Responses sampled per prompt (at least 2); the best and the worst by the reward make its pair.",
        ge=2,
    )
    top_p: float = doc_field(
        1.0, "Nucleus sampling: sample from the smallest token set with this mass.", gt=0, le=1
    )
    forward_batch_size: int = doc_field(
        16,
        "Samples per no-grad forward pass (the reference's and the policy's log-probs of the samples).",
        ge=1,
    )
    # --- objective ---
    loss: Literal["dpo", "ipo"] = doc_field("dpo", "Which objective on the pairs: DPO or IPO.")
    # --- update ---
    dpo_epochs: int = doc_field(1, "Passes of minibatch DPO updates over each round's pairs.", ge=1)
    micro_batch_size: int = doc_field(
        2,
        "Pairs per forward/backward pass (at most minibatch_size); a minibatch is accumulated from these "
        "exactly.",
    )
    learning_rate: float = doc_field(1e-6, "Peak AdamW learning rate (LoRA usually wants ~1e-4).")
    lr_scheduler: Literal["constant", "linear", "cosine"] = doc_field(
        "constant",
        "Learning-rate schedule over all rounds; each round counts as dpo_epochs * ceil(prompts_per_round / "
        "minibatch_size) steps, whatever number of pairs it made, so the schedule is fixed in advance.",
    )


# ---------------------------------------------------------------------------------------------------------
# Steps 3-5 of a round


@dataclass
class RoundPairs:
    pairs: list[tuple[int, int]]  # (chosen, rejected) indices into the round's samples
    n_ties: int  # prompts whose best and worst usable responses scored the same: no pair
    n_left_out: int  # responses left out before pairing: empty or repeating another of the same prompt


def pair_samples(texts: list[str], scores: list[float], samples_per_prompt: int) -> RoundPairs:
    """Best vs worst of each prompt's ``samples_per_prompt`` consecutive samples, by build-prefs' rule
    (``data.pairing.make_pairs``: empty and repeated responses left out, a tie makes no pair)."""
    k = samples_per_prompt
    pairs, n_ties, n_left_out = [], 0, 0
    for first in range(0, len(texts), k):
        pairing = make_pairs(texts[first : first + k], scores[first : first + k], "best_vs_worst")
        pairs += [(first + c, first + r) for c, r in pairing.pairs]
        n_ties += pairing.n_ties
        n_left_out += pairing.n_empty + pairing.n_duplicate
    return RoundPairs(pairs, n_ties, n_left_out)


def pair_examples(
    generations: list[Generation], ref_logps: list[torch.Tensor], pairs: list[tuple[int, int]]
) -> list[PairExample]:
    """The round's pairs as DPO examples, each with its reference log-probs (sum and mean of the response
    tokens, taken from the per-sample ones): chosen and rejected are sampled token ids, never re-tokenized."""
    examples = []
    for c, r in pairs:
        encoded = EncodedPair(
            generations[c].prompt_ids, generations[c].response_ids, generations[r].response_ids, False
        )
        chosen, rejected = ref_logps[c], ref_logps[r]  # (T_c,), (T_r,)
        ref = PairLogprobs(chosen.sum(), rejected.sum(), chosen.mean(), rejected.mean())  # 0-dim each
        examples.append(PairExample(encoded, apply(ref, torch.Tensor.float)))
    return examples


@in_training_precision
def pair_losses(cfg: OnlineDPOConfig, policy, batch: dict) -> tuple[torch.Tensor, dict[str, float]]:
    """Per-pair losses (B,) and summed pair metrics of ``training.preference.pair_outputs`` on ``policy`` (the
    reference's log-probs ride in batch["ref"]): the forward of the module DDP wraps."""
    out = pair_outputs(cfg, policy, PRECOMPUTED, batch)
    return out.losses, out.metrics


def dpo_update(
    cfg: OnlineDPOConfig,
    loss_fn,
    minibatch: list[PairExample],
    optimizer,
    scheduler,
    params,
    pad_id: int,
    rank: int = 0,
    world: int = 1,
) -> dict:
    """One optimizer step on a minibatch of pairs (``online.accumulated_step``). ``loss_fn(batch) -> (losses,
    metrics)`` is ``pair_losses`` on the policy as a ``distributed.StepModule`` (in several processes wrapped in
    DDP). Each micro-batch's summed loss is divided by the whole minibatch's pairs (every rank holds the whole
    round): the gradient is that of the mean loss over the minibatch. Returns the minibatch's mean loss and pair
    metrics, and the step's grad_norm, lr and nonfinite flag (a non-finite step is skipped)."""
    device = next(loss_fn.parameters()).device
    n_pairs = len(minibatch)

    def micro_loss(share: list[int]) -> tuple[torch.Tensor, dict[str, float]]:
        batch = collate_pair_examples([minibatch[i] for i in share], pad_id)
        losses, metrics = loss_fn({k: v.to(device) if torch.is_tensor(v) else v for k, v in batch.items()})
        part = {"loss": losses.sum().item(), **metrics}
        return losses.sum() / n_pairs, {key: value / n_pairs for key, value in part.items()}

    rows = list(range(n_pairs))
    return accumulated_step(cfg, loss_fn, rows, micro_loss, optimizer, scheduler, params, rank, world)


# ---------------------------------------------------------------------------------------------------------
# The stage


def online_dpo_method(cfg: OnlineDPOConfig, setup: engine.OnlineSetup) -> engine.OnlineMethod:
    """Online DPO on the engine's policy and its frozen reference (LoRA: the base with the adapters off, as
    DPO's reference=adapter; full fine-tuning: a frozen copy)."""
    policy, reference, rank, world = setup.policy, setup.reference, setup.rank, setup.world
    k = cfg.samples_per_prompt
    # The loss reads its beta from `objective`, a copy of cfg whose beta the monitors' adjust action raises.
    objective = dataclasses.replace(cfg)
    beta = AdjustableCoef(objective)

    def make_batch(samples: engine.Samples) -> engine.Batch:
        # 3. Pair each prompt's best response against its worst; a tie makes no pair. The same pairs in every
        #    process: each pairs the whole round.
        paired = pair_samples(samples.texts, samples.scores, k)
        # 4. Log-probs of every sample under the frozen reference and the current policy (each process its
        #    share of the samples, gathered): the reference's anchor the pairs' DPO loss, and both give the KL
        #    to the reference on the policy's own samples (k1 = log p - log q per token; Schulman 2020).
        ref_logps, policy_logps = sample_logprobs(cfg, policy, reference, samples.generations, rank, world)
        kl = kl_per_token(policy_logps, ref_logps)
        margins = [samples.scores[c] - samples.scores[r] for c, r in paired.pairs]
        stats = {"pairs": len(paired.pairs), "ties": paired.n_ties, "left_out": paired.n_left_out}
        stats |= {"pairs/score_margin": float(np.mean(margins))} if margins else {}
        # kl: nats per response, as PPO's
        stats |= {"kl": float(kl.per_sequence.mean()), "kl/per_token": kl.k1, "beta": objective.beta}
        roles = {c: "chosen" for c, _ in paired.pairs} | {r: "rejected" for _, r in paired.pairs}
        fields = [{"pair": roles.get(i)} for i in range(len(samples.generations))]
        return engine.Batch(pair_examples(samples.generations, ref_logps, paired.pairs), stats, fields)

    def update(batch: engine.Batch, opt: engine.Optimization) -> dict:
        # 5. dpo_epochs passes of minibatch DPO updates over the pairs; each process trains on its share of every
        #    minibatch. A round without pairs steps nowhere (the engine still advances the schedule).
        examples, lr, pad_id = batch.data, opt.optimizer.param_groups[0]["lr"], setup.tokenizer.pad_token_id
        def step(rows: list[int], j: int) -> dict:
            return dpo_update(cfg, opt.stepper, [examples[i] for i in rows], *opt.parts, pad_id, rank, world)

        step_stats = opt.steps(len(examples), step)
        # loss, rewards/*, logps/*, grad_norm: means over the round's steps; lr: the round's first step's. A round
        # without pairs logs the displacement monitor's keys as null: no value this round, not a key never logged.
        no_pairs = {} if step_stats else {"logps/chosen": None, "rewards/margin": None}
        return {**no_pairs, **engine.step_means(step_stats, leave_out=("nonfinite", "lr")), "lr": lr}

    return engine.OnlineMethod(
        unit="round",
        units=cfg.rounds,
        prompts_per_unit=cfg.prompts_per_round,
        trained=policy,
        epochs=cfg.dpo_epochs,
        minibatch_size=cfg.minibatch_size,
        make_batch=make_batch,
        loss=functools.partial(pair_losses, objective),
        update=update,
        monitors=default_monitors(
            "online-dpo", gold=cfg.gold_reward is not None, actions=monitor_actions(cfg), kl_limit=cfg.kl_limit
        ),
        samples_per_prompt=k,
        top_p=cfg.top_p,
        state_dict=beta.state_dict,
        load_state_dict=beta.load_state_dict,
        adjust_kl=beta.adjust,
        describe={"loss": cfg.loss},
        summarize=lambda units, rows, samples: {"pairs_by_round": [r["pairs"] for r in rows]},
    )


ONLINE = engine.OnlineStage("online-dpo", online_dpo_method)
check_config = engine.check_config  # before anything loads: ranges, cross-field rules, reward, backend
check_launch, run = ONLINE.check_launch, ONLINE.run
STAGE = Stage("online-dpo", OnlineDPOConfig, run)
