"""Pairwise preference losses over per-sequence log-probabilities: DPO (with conservative label smoothing),
IPO and ORPO, and RPO's NLL term on the chosen reply that can be added to DPO or IPO. Pure functions over tensors; the stage computes the log-probs, and the shared loop reduces the
per-example losses these return (sum, then divide by the global number of items).
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
import torch.nn.functional as F


@dataclass
class PreferenceLoss:
    """Per-example (unreduced) loss of a reference-anchored pairwise method, with its implicit rewards."""

    losses: torch.Tensor  # (B,) carries the gradient
    chosen_rewards: (
        torch.Tensor
    )  # (B,) beta * (policy - reference) log-prob of the chosen completion, detached
    rejected_rewards: torch.Tensor  # (B,) the same for the rejected completion, detached


@dataclass
class OrpoLoss:
    """Per-example ORPO loss and its parts; only ``losses`` carries the gradient, the parts are for logging."""

    losses: torch.Tensor  # (B,) nll + lam * or_loss
    nll: torch.Tensor  # (B,) the chosen completion's length-averaged NLL, as passed in
    log_odds_ratio: torch.Tensor  # (B,) log odds(chosen) - log odds(rejected)
    or_loss: torch.Tensor  # (B,) -log sigmoid(log_odds_ratio), before the lam weight


def _implicit_rewards(
    policy_chosen_logps: torch.Tensor,
    policy_rejected_logps: torch.Tensor,
    reference_chosen_logps: torch.Tensor,
    reference_rejected_logps: torch.Tensor,
    beta: float,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """The log-ratio margin h (B,) and the detached rewards beta * logratio for chosen and rejected (B,)."""
    chosen_logratios = policy_chosen_logps - reference_chosen_logps  # (B,)
    rejected_logratios = policy_rejected_logps - reference_rejected_logps  # (B,)
    margin = chosen_logratios - rejected_logratios  # (B,) h in the DPO and IPO papers
    return margin, beta * chosen_logratios.detach(), beta * rejected_logratios.detach()


def dpo_loss(
    policy_chosen_logps: torch.Tensor,
    policy_rejected_logps: torch.Tensor,
    reference_chosen_logps: torch.Tensor,
    reference_rejected_logps: torch.Tensor,
    beta: float = 0.1,
    label_smoothing: float = 0.0,
) -> PreferenceLoss:
    """Direct Preference Optimization, per example.

    All inputs are (B,) log-probabilities of the whole completion (summed over its tokens), as in the paper.
    ``label_smoothing`` eps is the probability that a preference label is flipped (conservative DPO,
    Mitchell 2023, "A note on DPO with noisy preferences"); eps = 0 is plain DPO. Must lie in [0, 0.5): at 0.5
    the two labels are equally likely and the loss only pulls the margin to zero.

    Returns ``PreferenceLoss(losses (B,), chosen_rewards (B,), rejected_rewards (B,))``.
    """
    if not 0.0 <= label_smoothing < 0.5:
        raise ValueError(f"label_smoothing must lie in [0, 0.5), got {label_smoothing}")
    margin, chosen_rewards, rejected_rewards = _implicit_rewards(
        policy_chosen_logps, policy_rejected_logps, reference_chosen_logps, reference_rejected_logps, beta
    )
    # Rafailov et al. 2023, eq. 7: -log sigmoid(beta * h). logsigmoid, not log(sigmoid(.)): sigmoid underflows to
    # 0 for beta * h below about -100 in float32 and the log would give an infinite loss with a NaN gradient.
    # With eps: the expected loss under a flip probability eps (conservative DPO, Mitchell 2023).
    as_labelled = -F.logsigmoid(beta * margin)  # (B,)
    flipped = -F.logsigmoid(-beta * margin)  # (B,)
    losses = (1 - label_smoothing) * as_labelled + label_smoothing * flipped  # (B,)
    return PreferenceLoss(losses, chosen_rewards, rejected_rewards)


def ipo_loss(
    policy_chosen_logps: torch.Tensor,
    policy_rejected_logps: torch.Tensor,
    reference_chosen_logps: torch.Tensor,
    reference_rejected_logps: torch.Tensor,
    beta: float = 0.1,
) -> PreferenceLoss:
    """Identity Preference Optimisation (Azar et al. 2024, "A General Theoretical Paradigm to Understand
    Learning from Human Preferences"), per example. ``beta`` is the paper's regulariser tau.

    Summed or token-averaged log-probs? The paper writes the loss over sequence log-probabilities (sums). TRL's
    DPOTrainer divides each log-ratio by its completion length first (confirmed with the IPO authors, whose
    reported results use that form); TRL's online trainer uses sums. This function takes whatever it is given
    (all four inputs (B,) the same kind); alignkit's trainer passes token-averaged log-probs by default, because
    with sums h grows with the completion length while the target 1/(2 beta) does not, so the same beta means
    a much weaker pull toward the reference on long completions than on short ones, and beta would have to be
    retuned for every dataset's lengths.

    Returns ``PreferenceLoss(losses (B,), chosen_rewards (B,), rejected_rewards (B,))``; the rewards are
    beta * (policy - reference) of the inputs as given (per token when averaged inputs are passed).
    """
    if beta <= 0:
        raise ValueError(f"IPO needs beta > 0 (its target margin is 1 / (2 beta)), got {beta}")
    margin, chosen_rewards, rejected_rewards = _implicit_rewards(
        policy_chosen_logps, policy_rejected_logps, reference_chosen_logps, reference_rejected_logps, beta
    )
    # Azar et al. 2024, eq. 17: regress the log-ratio margin h onto 1 / (2 tau).
    losses = (margin - 1 / (2 * beta)) ** 2  # (B,)
    return PreferenceLoss(losses, chosen_rewards, rejected_rewards)


@dataclass
class RpoLoss:
    """A preference loss with RPO's NLL term on the chosen reply added; ``nll`` is for logging."""

    losses: torch.Tensor  # (B,) preference loss + alpha * nll
    nll: torch.Tensor  # (B,) the chosen completion's length-normalised NLL, detached


def rpo_loss(preference_losses: torch.Tensor, chosen_mean_logps: torch.Tensor, alpha: float) -> RpoLoss:
    """Add an SFT (NLL) term on the chosen replies to a per-example preference loss (RPO: Pang et al. 2024,
    "Iterative Reasoning Preference Optimization", eq. 1; Liu et al. 2024, "Provably Mitigating Overoptimization
    in RLHF"). Against likelihood displacement: DPO can widen its margin by lowering the chosen reply's
    likelihood too (Razin et al. 2024); the NLL term pays for keeping it up.

    preference_losses: (B,) e.g. ``dpo_loss(...).losses``; chosen_mean_logps: (B,) the chosen completion's
    log-prob averaged over its tokens (completion tokens only: the prompt is masked), so the NLL is
    length-normalised as in Pang et al. (-log M(y_w|x) / |y_w|). TRL's ``rpo_alpha`` averages the NLL over every
    chosen token of the batch instead, which weighs long replies more; per-example means keep one weight per
    pair, like the preference term. alpha = 0 is the preference loss alone.
    """
    if alpha < 0:
        raise ValueError(f"rpo alpha must be >= 0 (a negative weight would push the chosen replies down), got {alpha}")
    nll = -chosen_mean_logps  # (B,)
    # L_RPO = L_pref + alpha * NLL(y_w | x) / |y_w|, per example (the loop does the expectation).
    return RpoLoss(preference_losses + alpha * nll, nll.detach())


_LOG_HALF = -math.log(2.0)


def log1mexp(x: torch.Tensor) -> torch.Tensor:
    """log(1 - exp(x)) for x <= 0, accurately (Maechler 2012, "Accurately computing log(1 - exp(-|a|))").

    log1p(-exp(x)) loses everything when exp(x) rounds to 1 (x near 0), log(-expm1(x)) when expm1(x) rounds
    to -1 (x very negative); each is used on its own side of -ln 2. Each branch is fed only arguments from its
    own side (a harmless -1 elsewhere): ``torch.where`` back-propagates a zero through the branch it did not
    take, and 0 * inf would turn the gradient into NaN. x = 0 (probability 1, reached in float32 by a
    confident model) is moved to the largest negative normal float, so the result stays finite.
    """
    x = x.clamp(max=-torch.finfo(x.dtype).tiny)
    far = x < _LOG_HALF
    return torch.where(
        far,
        torch.log1p(-torch.exp(torch.where(far, x, -1.0))),
        torch.log(-torch.expm1(torch.where(far, -1.0, x))),
    )


def orpo_loss(
    chosen_mean_logps: torch.Tensor,
    rejected_mean_logps: torch.Tensor,
    chosen_nll: torch.Tensor,
    lam: float = 0.1,
) -> OrpoLoss:
    """Odds Ratio Preference Optimization (Hong et al. 2024), per example; no reference model.

    Inputs (B,): the mean per-token log-probability of the chosen and of the rejected completion, and the
    chosen completion's length-averaged NLL (completion tokens only, so = -chosen_mean_logps when both come
    from the same forward pass). Means, not sums: the paper defines P(y|x) through the length-normalised
    log-likelihood, i.e. as the geometric mean of the token probabilities. With sums, P(y|x) = exp(sum) is
    close to 0 for any real completion, so log(1 - P) vanishes, the odds ratio degenerates into a plain
    likelihood ratio that grows with length, and ``lam`` means different things on different datasets.

    Returns ``OrpoLoss(losses, nll, log_odds_ratio, or_loss)``, all (B,).
    """
    # log odds(y|x) = log p - log(1 - p), p = exp(mean token log-prob), with log(1 - p) computed stably.
    chosen_log_odds = chosen_mean_logps - log1mexp(chosen_mean_logps)  # (B,)
    rejected_log_odds = rejected_mean_logps - log1mexp(rejected_mean_logps)  # (B,)
    log_odds_ratio = chosen_log_odds - rejected_log_odds  # (B,)
    # Hong et al. 2024, eq. 7: L_OR = -log sigmoid(log(odds(y_w|x) / odds(y_l|x))).
    or_loss = -F.logsigmoid(log_odds_ratio)  # (B,)
    # Hong et al. 2024, eq. 6: L_ORPO = L_SFT + lambda * L_OR, per example (the loop does the expectation).
    losses = chosen_nll + lam * or_loss  # (B,)
    return OrpoLoss(losses, chosen_nll.detach(), log_odds_ratio.detach(), or_loss.detach())
