"""A pairwise preference objective on a model: the log-probs of chosen and rejected in one forward pass, the
reference's, the configured loss (each a pure function in ``alignkit.losses.preference``) and its metrics.
Shared by the offline stages (dpo, ipo, orpo) and online-dpo, which trains on pairs of its own samples.

``cfg`` is a stage config with the objective's fields: ``loss`` ("dpo", "ipo" or "orpo"), ``beta``,
``label_smoothing``, ``ipo_average_logps``, ``orpo_lambda`` (ORPO only), ``logprob_chunk_size`` and
``share_prompt``.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from alignkit.data.collate import collate_pairs
from alignkit.data.tokenize import EncodedPair
from alignkit.losses.preference import dpo_loss, ipo_loss, orpo_loss
from alignkit.models.forward import sequence_logprobs
from alignkit.models.packed import shared_prompt_logprobs


@dataclass
class PairExample:
    """A tokenized pair with its reference log-probs (summed and token-averaged), when precomputed."""

    encoded: EncodedPair
    ref: torch.Tensor | None = None  # (4,) chosen sum, rejected sum, chosen mean, rejected mean


def collate_pair_examples(examples: list[PairExample], pad_id: int) -> dict:
    """``collate_pairs`` of the examples, with their reference log-probs as "ref" (B, 4) when they carry them."""
    batch = collate_pairs([ex.encoded for ex in examples], pad_id)  # chosen rows, then rejected rows
    if examples[0].ref is not None:
        batch["ref"] = torch.stack([ex.ref for ex in examples])  # (B, 4)
    return batch


def pair_logprobs(model, batch: dict, chunk_size: int, share_prompt: bool = False):
    """(chosen, rejected) SequenceLogprobs halves of one forward pass over 2B rows; with share_prompt, each
    pair's prompt runs once (alignkit.models.packed): the same numbers, fewer tokens."""
    if share_prompt:
        lp = shared_prompt_logprobs(model, batch, chunk_size)
    else:
        lp = sequence_logprobs(
            model, batch["input_ids"], batch["attention_mask"], batch["loss_mask"], chunk_size
        )
    B = batch["input_ids"].shape[0] // 2
    return lp.sum[:B], lp.sum[B:], lp.mean[:B], lp.mean[B:], lp.n_tokens[:B]


def reference_logprobs(cfg, model, reference, batch: dict) -> torch.Tensor:
    """(B, 4) reference chosen/rejected summed and mean log-probs, however the reference is held."""
    if "ref" in batch:
        return batch["ref"]
    with torch.no_grad():
        if reference is not None:
            out = pair_logprobs(reference, batch, cfg.logprob_chunk_size, cfg.share_prompt)
        else:  # LoRA: the same base with adapters disabled is the reference
            with model.disable_adapter():
                out = pair_logprobs(model, batch, cfg.logprob_chunk_size, cfg.share_prompt)
    return torch.stack(out[:4], dim=1)


def preference_losses(cfg, policy, ref: torch.Tensor | None):
    """Per-pair losses and implicit rewards for the configured objective. policy: pair_logprobs output."""
    c_sum, r_sum, c_mean, r_mean, _ = policy
    if cfg.loss == "orpo":
        out = orpo_loss(c_mean, r_mean, chosen_nll=-c_mean, lam=cfg.orpo_lambda)
        # ORPO has no reference; report beta-free log-odds as its "rewards".
        return out.losses, c_mean.detach(), r_mean.detach()
    if cfg.loss == "ipo" and cfg.ipo_average_logps:
        out = ipo_loss(c_mean, r_mean, ref[:, 2], ref[:, 3], beta=cfg.beta)
    elif cfg.loss == "ipo":
        out = ipo_loss(c_sum, r_sum, ref[:, 0], ref[:, 1], beta=cfg.beta)
    else:
        out = dpo_loss(c_sum, r_sum, ref[:, 0], ref[:, 1], beta=cfg.beta, label_smoothing=cfg.label_smoothing)
    return out.losses, out.chosen_rewards, out.rejected_rewards


@dataclass
class PairOutputs:
    losses: torch.Tensor  # (B,) per-pair loss
    chosen_rewards: torch.Tensor  # (B,) implicit rewards (ORPO: mean log-probs), detached
    rejected_rewards: torch.Tensor  # (B,)
    metrics: dict[str, float]  # sums over the pairs


def pair_outputs(cfg, model, reference, batch: dict) -> PairOutputs:
    policy = pair_logprobs(model, batch, cfg.logprob_chunk_size, cfg.share_prompt)
    ref = None if cfg.loss == "orpo" else reference_logprobs(cfg, model, reference, batch)
    losses, chosen_r, rejected_r = preference_losses(cfg, policy, ref)
    metrics = {
        "rewards/accuracy": (chosen_r > rejected_r).float().sum().item(),
        "rewards/margin": (chosen_r - rejected_r).sum().item(),
        "rewards/chosen": chosen_r.sum().item(),
        "rewards/rejected": rejected_r.sum().item(),
        "logps/chosen": policy[0].detach().sum().item(),
        "logps/rejected": policy[1].detach().sum().item(),
    }
    if ref is not None:
        # Mean per-token log-ratio log pi/pi_ref on the pairs: a cheap, off-policy proxy for the KL to
        # the reference (the on-policy estimate comes from `alignkit eval` on the policy's own samples).
        logratio = (policy[2] - ref[:, 2]) + (policy[3] - ref[:, 3])
        metrics["logratio/per_token"] = logratio.detach().sum().item() / 2
    return PairOutputs(losses, chosen_r, rejected_r, metrics)
