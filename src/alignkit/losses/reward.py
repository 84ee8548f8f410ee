"""The reward-model loss: Bradley-Terry on scalar rewards of chosen and rejected responses, with the
optional per-pair margin of Llama 2 and the reward-centering term of Eisenstein et al. 2023. A pure
function over (B,) tensors; the rm stage computes the rewards and the shared loop reduces the losses.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F


@dataclass
class RewardLoss:
    """Per-pair (unreduced) loss; only ``losses`` carries the gradient, the rest is for logging."""

    losses: torch.Tensor  # (B,)
    accuracy: torch.Tensor  # (B,) 1.0 where r_chosen > r_rejected strictly (a tie counts as wrong), else 0.0
    margin: torch.Tensor  # (B,) r_chosen - r_rejected, detached


def bradley_terry_loss(
    chosen_rewards: torch.Tensor,
    rejected_rewards: torch.Tensor,
    margin: torch.Tensor | None = None,
    center_coef: float = 0.0,
) -> RewardLoss:
    """Bradley-Terry pairwise loss for a scalar reward model, per pair.

    chosen_rewards, rejected_rewards: (B,) rewards r(x, y_chosen), r(x, y_rejected).
    margin: optional (B,) required gap m between them (Llama 2's preference-strength margin); None = 0.
    center_coef: weight eta of the centering term eta * (r_c + r_r)^2; 0 disables it.

    Returns ``RewardLoss(losses (B,), accuracy (B,), margin (B,))``; the returned margin is the reward gap
    r_c - r_r (not the input m).
    """
    chosen_rewards, rejected_rewards = chosen_rewards.float(), rejected_rewards.float()
    gap = chosen_rewards - rejected_rewards  # (B,)
    if margin is not None:
        # Touvron et al. 2023 (Llama 2), eq. 2: -log sigmoid(r_c - r_r - m(r)), a larger m for pairs the
        # annotators rated as clearly better.
        gap_for_loss = gap - margin.to(gap)  # (B,)
    else:
        gap_for_loss = gap
    # Bradley & Terry 1952: P(y_c > y_r | x) = sigmoid(r_c - r_r); Ouyang et al. 2022 (InstructGPT), eq. 1:
    # loss = -log sigmoid(r_c - r_r). F.logsigmoid, not torch.log(torch.sigmoid(.)): sigmoid(-120) underflows
    # to 0 in float32, and log(0) = -inf would give an infinite loss and a NaN gradient.
    losses = -F.logsigmoid(gap_for_loss)  # (B,)
    if center_coef:
        # Eisenstein et al. 2023 ("Helping or Herding? Reward Model Ensembles Mitigate but do not Eliminate
        # Reward Hacking"), sec. 3: + eta * (r_c + r_r)^2 pins the rewards' mean near zero, since the
        # Bradley-Terry loss sees only differences and leaves the offset free to drift. TRL's
        # center_rewards_coefficient adds the same term (as a batch mean; here per pair, the loop averages).
        losses = losses + center_coef * (chosen_rewards + rejected_rewards) ** 2  # (B,)
    accuracy = (gap > 0).float().detach()  # (B,)
    return RewardLoss(losses, accuracy, gap.detach())


def length_correlation_penalty(rewards: torch.Tensor, lengths: torch.Tensor, eps: float = 1e-6) -> torch.Tensor:
    """Squared Pearson correlation of the rewards with the reply lengths over a batch, () with gradient.

    rewards: (N,) rewards of N replies (chosen and rejected rows together); lengths: (N,) their lengths in
    tokens. Chen et al. 2024 (ODIN, "Disentangled Reward Mitigates Hacking in RLHF"), sec. 4: the quality
    head is trained to be uncorrelated with length by adding its batch Pearson correlation with length to the
    loss. We keep one head and penalise rho^2 rather than ODIN's |rho|: the same minimum, a gradient that
    goes to zero there instead of flipping sign, so the term does not jitter around 0. Lengths all equal
    (no evidence) give 0; ``eps`` keeps constant rewards finite.
    """
    r = rewards.float() - rewards.float().mean()  # (N,)
    n = lengths.to(r).float()
    n = n - n.mean()  # (N,)
    if r.numel() < 2 or not bool((n != 0).any()):
        return r.sum() * 0.0  # keeps the graph (and the device) of the rewards
    rho = (r * n).sum() / torch.sqrt((r * r).sum() * (n * n).sum() + eps)  # ()
    return rho**2
