"""Kahneman-Tversky Optimization (Ethayarajh et al. 2024): a loss over unpaired examples, each labelled
desirable or undesirable, with its reference point z0 estimated from mismatched prompt/completion pairs.
Also the helpers a trainer needs around it: the mismatched pairing and the class-weight check.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch


@dataclass
class KtoLoss:
    """Per-example (unreduced) KTO loss with its implicit rewards and reference point."""

    losses: torch.Tensor  # (B,) carries the gradient
    rewards: torch.Tensor  # (B,) beta * (policy - reference) log-prob, detached (same convention as DPO)
    kl: torch.Tensor  # () z0 = max(0, KL estimate), detached


def kto_reference_point(kl_logratio_sum: torch.Tensor, kl_count: torch.Tensor | float) -> torch.Tensor:
    """KTO's reference point z0 from the sum and count of log-ratios log pi(y'|x) - log pi_ref(y'|x) over
    MISMATCHED pairs (each prompt x with another example's completion y', see ``mismatched_indices``).

    Given as a sum and a count, not the samples, so a data-parallel trainer can sum both over its ranks first
    and get the mean over the whole batch's pairs (a mean of per-rank means would weight ranks, not pairs).
    Returns a detached () tensor.
    """
    # z0 (Ethayarajh et al. 2024, eq. 8 and the text after it): a biased but low-variance estimate of
    # KL(policy || reference) from mismatched pairs, clamped at 0 (a KL cannot be negative), and not
    # back-propagated through: the paper treats it as a fixed reference point, for stable training.
    return (kl_logratio_sum / kl_count).clamp(min=0).detach()


def kto_loss(
    policy_logps: torch.Tensor,
    reference_logps: torch.Tensor,
    labels: torch.Tensor,
    z0: torch.Tensor,
    beta: float = 0.1,
    desirable_weight: float = 1.0,
    undesirable_weight: float = 1.0,
) -> KtoLoss:
    """KTO loss, per example, in batch order.

    policy_logps, reference_logps: (B,) summed log-probs of each example's own completion.
    labels: (B,) bool (or 0/1), True where the completion is desirable.
    z0: () the reference point, from ``kto_reference_point``.

    Returns ``KtoLoss(losses (B,), rewards (B,), kl ())``.
    """
    logratios = policy_logps - reference_logps  # (B,) r_theta(x, y)
    desirable = labels.bool()  # (B,)
    # Ethayarajh et al. 2024, eq. 8: L = lambda_y - v(x, y), with
    #   v = lambda_D * sigmoid(beta * (r - z0)) for desirable y,  lambda_U * sigmoid(beta * (z0 - r)) otherwise.
    desirable_losses = desirable_weight * (1 - torch.sigmoid(beta * (logratios - z0)))  # (B,)
    undesirable_losses = undesirable_weight * (1 - torch.sigmoid(beta * (z0 - logratios)))  # (B,)
    losses = torch.where(desirable, desirable_losses, undesirable_losses)  # (B,)
    return KtoLoss(losses, beta * logratios.detach(), z0.detach())


def mismatched_indices(batch_size: int) -> torch.Tensor:
    """Which completion to pair with each prompt for the KL estimate: a derangement of range(batch_size).

    Shift by one: prompt i gets the completion of example i - 1 (prompt 0 gets the last one), so no example
    is paired with its own completion and every completion is used exactly once, as the paper asks (the
    mismatched completions are the batch's own completions, with different prompts). It is the rotation TRL's
    KTOTrainer uses. Deterministic, so a resumed run rebuilds the same pairs.

    A batch of one has no mismatched pair (its "KL" would be its own reward), so batch_size < 2 is an error:
    build the pairs over the whole optimiser batch before splitting it into micro-batches.

    Returns a LongTensor (batch_size,): ``completions[mismatched_indices(B)]`` are the KL completions.
    """
    if batch_size < 2:
        raise ValueError(
            f"KTO's KL estimate needs at least 2 examples to mismatch prompts and completions, got {batch_size}"
        )
    return torch.roll(torch.arange(batch_size), shifts=1)  # (B,) [B-1, 0, 1, ..., B-2]


def kto_weight_warning(
    desirable_weight: float, undesirable_weight: float, n_desirable: int, n_undesirable: int
) -> str | None:
    """A warning when the class weights are outside the KTO paper's recommendation, else None.

    Ethayarajh et al. 2024 recommend lambda_D * n_D / (lambda_U * n_U) in [1, 4/3]. The message
    gives the desirable_weight range that satisfies it for these counts (keeping undesirable_weight), or the
    undesirable_weight range (keeping desirable_weight); change one, not both.
    """
    if n_desirable == 0 or n_undesirable == 0:
        return (
            f"KTO data has {n_desirable} desirable and {n_undesirable} undesirable examples; with only one kind "
            "the class weights cannot be balanced and the loss has nothing to contrast."
        )
    ratio = (desirable_weight * n_desirable) / (undesirable_weight * n_undesirable)
    if 1.0 - 1e-9 <= ratio <= 4 / 3 + 1e-9:  # tolerance: a weight set to the exact bound may round past it
        return None
    d_low = undesirable_weight * n_undesirable / n_desirable
    u_high = desirable_weight * n_desirable / n_undesirable
    return (
        f"KTO class weights are unbalanced for this data: desirable_weight * n_desirable / "
        f"(undesirable_weight * n_undesirable) = {desirable_weight:g} * {n_desirable} / "
        f"({undesirable_weight:g} * {n_undesirable}) = {ratio:.3f}, outside the recommended [1, 4/3] "
        f"(Ethayarajh et al. 2024). Set EITHER desirable_weight in [{d_low:.3g}, {d_low * 4 / 3:.3g}] OR "
        f"undesirable_weight in [{u_high * 3 / 4:.3g}, {u_high:.3g}]."
    )
