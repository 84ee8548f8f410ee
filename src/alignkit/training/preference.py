"""A pairwise preference objective on a model: the log-probs of chosen and rejected in one forward pass, the
reference's, the configured loss (each a pure function in ``alignkit.losses.preference``) and its metrics.
Shared by the offline stages (dpo, ipo, orpo) and online-dpo, which trains on pairs of its own samples. The
log-probs travel as ``PairLogprobs`` (named (B,) tensors); the reference is a ``training.reference.Reference``.

``cfg`` is a stage config with the objective's fields: ``loss`` ("dpo", "ipo" or "orpo"), ``beta``,
``label_smoothing``, ``ipo_average_logps``, ``orpo_lambda`` (ORPO only), ``rpo_alpha`` (DPO and IPO: RPO's
NLL term on the chosen reply), ``logprob_chunk_size`` and ``share_prompt``.
"""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass

import torch

from alignkit.data.collate import collate_pairs
from alignkit.data.prepared import EncodedRows
from alignkit.data.tokenize import EncodedPair
from alignkit.losses.preference import dpo_loss, ipo_loss, orpo_loss, rpo_loss
from alignkit.models.forward import sequence_logprobs
from alignkit.models.packed import shared_prompt_logprobs
from alignkit.training.reference import Reference, apply, stack


@dataclass
class PairLogprobs:
    """Log-probs of each pair's chosen and rejected completion (completion tokens only) under one model: what
    the objectives read, and what a precomputed reference stores (per example 0-dim, per batch (B,))."""

    chosen_sum: torch.Tensor  # (B,) summed over the chosen completion's tokens
    rejected_sum: torch.Tensor  # (B,) summed over the rejected completion's tokens
    chosen_mean: torch.Tensor  # (B,) token-averaged (IPO on averages, ORPO, the per-token log-ratio)
    rejected_mean: torch.Tensor  # (B,)


@dataclass
class PairExample:
    """A tokenized pair with its reference log-probs, when precomputed."""

    encoded: EncodedPair
    ref: PairLogprobs | None = None  # 0-dim tensors: this pair's row


class PairExamples(torch.utils.data.Dataset):
    """Tokenized pairs read lazily from ``encoded`` (``data.prepared.EncodedRows``, memory-mapped Arrow) as
    ``PairExample``s, with the reference log-probs, once precomputed, held as one PairLogprobs of (N,) tensors
    (NaN on rows the run never visits) rather than on a million objects."""

    def __init__(self, encoded: EncodedRows) -> None:
        self.encoded = encoded
        self.ref: PairLogprobs | None = None  # (N,) per field

    def __len__(self) -> int:
        return len(self.encoded)

    def __getitem__(self, i: int) -> PairExample:
        return PairExample(self.encoded[i], self._ref_row(i))

    def __iter__(self) -> Iterator[PairExample]:
        for i, encoded in enumerate(self.encoded):  # the Arrow rows a batch at a time
            yield PairExample(encoded, self._ref_row(i))

    def _ref_row(self, i: int) -> PairLogprobs | None:
        return None if self.ref is None else apply(self.ref, lambda t: t[i])


def collate_pair_examples(examples: list[PairExample], pad_id: int) -> dict:
    """``collate_pairs`` of the examples, with their reference log-probs as "ref" (a PairLogprobs of (B,)) when
    they carry them."""
    batch = collate_pairs([ex.encoded for ex in examples], pad_id)  # chosen rows, then rejected rows
    if examples[0].ref is not None:
        batch["ref"] = stack([ex.ref for ex in examples])
    return batch


def pair_logprobs(model, batch: dict, chunk_size: int, share_prompt: bool = False) -> PairLogprobs:
    """Chosen and rejected log-probs of one forward pass over 2B rows (chosen rows, then rejected); with
    share_prompt, each pair's prompt runs once (alignkit.models.packed): the same numbers, fewer tokens."""
    if share_prompt:
        lp = shared_prompt_logprobs(model, batch, chunk_size)
    else:
        lp = sequence_logprobs(
            model, batch["input_ids"], batch["attention_mask"], batch["loss_mask"], chunk_size
        )
    B = batch["input_ids"].shape[0] // 2
    return PairLogprobs(lp.sum[:B], lp.sum[B:], lp.mean[:B], lp.mean[B:])


def reference_logprobs(cfg, model, reference: Reference, batch: dict) -> PairLogprobs:
    """The reference's pair log-probs (B,) for the batch, however the reference is held."""
    return reference.logprobs(
        model, batch, lambda m, b: pair_logprobs(m, b, cfg.logprob_chunk_size, cfg.share_prompt)
    )


def preference_losses(cfg, policy: PairLogprobs, ref: PairLogprobs | None):
    """Per-pair losses and implicit rewards (each (B,)) for the configured objective."""
    if cfg.loss == "orpo":
        out = orpo_loss(
            policy.chosen_mean, policy.rejected_mean, chosen_nll=-policy.chosen_mean, lam=cfg.orpo_lambda
        )
        # ORPO has no reference, so no implicit reward: its "rewards" are the mean per-token log-probs of chosen
        # and rejected (TRL logs them times lambda, its `beta`). The log-odds are monotone in them, so the
        # accuracy is that of the log-odds ratio; the margin is a log-likelihood gap, not a log-odds ratio.
        return out.losses, policy.chosen_mean.detach(), policy.rejected_mean.detach()
    if cfg.loss == "ipo" and cfg.ipo_average_logps:
        out = ipo_loss(
            policy.chosen_mean, policy.rejected_mean, ref.chosen_mean, ref.rejected_mean, beta=cfg.beta
        )
    elif cfg.loss == "ipo":
        out = ipo_loss(policy.chosen_sum, policy.rejected_sum, ref.chosen_sum, ref.rejected_sum, beta=cfg.beta)
    else:
        out = dpo_loss(
            policy.chosen_sum, policy.rejected_sum, ref.chosen_sum, ref.rejected_sum,
            beta=cfg.beta, label_smoothing=cfg.label_smoothing,
        )  # fmt: skip
    losses = out.losses
    if cfg.rpo_alpha:  # against likelihood displacement: an NLL term keeps the chosen replies likely
        losses = rpo_loss(losses, policy.chosen_mean, cfg.rpo_alpha).losses
    return losses, out.chosen_rewards, out.rejected_rewards


@dataclass
class PairOutputs:
    losses: torch.Tensor  # (B,) per-pair loss
    chosen_rewards: torch.Tensor  # (B,) implicit rewards (ORPO: mean log-probs), detached
    rejected_rewards: torch.Tensor  # (B,)
    metrics: dict[str, float]  # sums over the pairs


def pair_outputs(cfg, model, reference: Reference, batch: dict) -> PairOutputs:
    policy = pair_logprobs(model, batch, cfg.logprob_chunk_size, cfg.share_prompt)
    ref = None if cfg.loss == "orpo" else reference_logprobs(cfg, model, reference, batch)
    losses, chosen_r, rejected_r = preference_losses(cfg, policy, ref)
    metrics = {
        "rewards/accuracy": (chosen_r > rejected_r).float().sum().item(),
        "rewards/margin": (chosen_r - rejected_r).sum().item(),
        "rewards/chosen": chosen_r.sum().item(),
        "rewards/rejected": rejected_r.sum().item(),
        "logps/chosen": policy.chosen_sum.detach().sum().item(),
        "logps/rejected": policy.rejected_sum.detach().sum().item(),
    }
    if cfg.loss != "orpo" and cfg.rpo_alpha:  # the chosen replies' length-normalised NLL, RPO's added term
        metrics["nll/chosen"] = -policy.chosen_mean.detach().sum().item()
    if ref is not None:
        # Mean per-token log-ratio log pi/pi_ref on the pairs: a cheap, off-policy proxy for the KL to
        # the reference (the on-policy estimate comes from `alignkit eval` on the policy's own samples).
        logratio = (policy.chosen_mean - ref.chosen_mean) + (policy.rejected_mean - ref.rejected_mean)
        metrics["logratio/per_token"] = logratio.detach().sum().item() / 2
    return PairOutputs(losses, chosen_r, rejected_r, metrics)
