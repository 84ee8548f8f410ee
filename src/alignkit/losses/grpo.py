"""The pure pieces of critic-free online RL: group advantages (GRPO, Dr. GRPO, RLOO, REINFORCE++), the clipped
policy loss with asymmetric clipping at token or sequence level (PPO / DAPO / GSPO), its aggregation over tokens
(DAPO), sequences (GRPO) or a fixed length (Dr. GRPO), and the k3 KL to the reference.

Torch only. Scores are (B,) with a prompt's ``k`` samples consecutive (B = n_groups x k); per-token tensors are
(B, R) over response tokens, right-padded, ``mask`` 1 on response tokens.

Deliberate differences from TRL 1.16 (``GRPOTrainer._compute_loss`` and its advantage code in
``_generate_and_score_completions``; ``RLOOTrainer``), every other number equal (tests/test_losses_grpo.py):

- Aggregation ``token`` divides by the response tokens of the whole optimizer minibatch, across micro-batches
  and processes (DAPO); TRL's "dapo" divides by ``num_items_in_batch`` rescaled per accumulation window, and its
  "bnpo" by each micro-batch's own tokens. All three agree when one micro-batch is the minibatch.
- ``sequence`` is TRL's "grpo" and ``fixed_length`` TRL's "dr_grpo", each taking the number of sequences of the
  whole minibatch (TRL: of each micro-batch, then dividing by the accumulation steps: equal for equal micro-batches).
- ``reinforce_pp`` is REINFORCE++ (Hu 2025) with the outcome reward only: (r - batch mean) / (batch std + eps)
  over the whole batch, no group baseline; its KL is charged in the loss (k3, as GRPO), not as a per-token reward.
  TRL ships no REINFORCE++ (its GRPO ``scale_rewards="batch"`` subtracts the group mean first:
  REINFORCE++-baseline).
- ``rloo`` is RLOOTrainer's leave-one-out advantage with ``normalize_advantages=False`` (its default); RLOOTrainer
  then charges the KL as a sequence-level k1 reward penalty and clips a sequence-level ratio of summed
  log-probs; here RLOO is an advantage only, trained with whichever loss is configured.
- Not implemented: TRL's ``delta`` (two-sided clip), ``use_bias_correction_kl``, the entropy and off-policy masks,
  vLLM importance-sampling correction (the mismatch is logged: ``sampler_mismatch``), the loss types
  cispo/sapo/vespo/luspo, and unscorable (None) rewards.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

import torch

Advantage = Literal["grpo", "dr_grpo", "rloo", "reinforce_pp"]
Aggregation = Literal["token", "sequence", "fixed_length"]
ImportanceSampling = Literal["token", "sequence"]
STD_EPS = 1e-4  # added to the std, as TRL 1.16 (1e-4); a zero-spread group gets advantages 0, not 0/0


# ---------------------------------------------------------------------------------------------------------
# Advantages: one function each, (B,) scores -> (B,) advantages


def _groups(scores: torch.Tensor, k: int) -> torch.Tensor:
    if scores.dim() != 1 or len(scores) % k:
        raise ValueError(f"scores must be (n_groups * k,) with k={k}, got shape {tuple(scores.shape)}")
    return scores.view(-1, k)  # (G, k)


def grpo_advantages(scores: torch.Tensor, k: int, eps: float = STD_EPS) -> torch.Tensor:
    """GRPO (Shao et al. 2024, eq. 3 outcome supervision): A_i = (r_i - mean_g r) / (std_g r + eps) within each
    group of k; std with Bessel's correction (k - 1), as TRL's ``nanstd``. k = 1 has no spread: A = 0."""
    g = _groups(scores, k)
    std = g.std(dim=1, keepdim=True) if k > 1 else torch.zeros_like(g[:, :1])  # (G, 1)
    return ((g - g.mean(dim=1, keepdim=True)) / (std + eps)).reshape(-1)


def dr_grpo_advantages(scores: torch.Tensor, k: int) -> torch.Tensor:
    """Dr. GRPO (Liu et al. 2025, "Understanding R1-Zero-Like Training"): A_i = r_i - mean_g r, no division by
    the group's std (which weighs easy and hard prompts unequally); TRL's ``scale_rewards="none"``."""
    g = _groups(scores, k)
    return (g - g.mean(dim=1, keepdim=True)).reshape(-1)


def rloo_advantages(scores: torch.Tensor, k: int) -> torch.Tensor:
    """RLOO (Kool et al. 2019; Ahmadian et al. 2024): A_i = r_i - (sum_g r - r_i) / (k - 1), the mean of the
    other k - 1 samples of the group, written as the explicit leave-one-out mean (TRL's RLOOTrainer form; it
    equals k / (k - 1) x (r_i - mean_g r)). Needs k >= 2."""
    if k < 2:
        raise ValueError("rloo needs at least 2 samples per prompt (k >= 2)")
    g = _groups(scores, k)
    return (g - (g.sum(dim=1, keepdim=True) - g) / (k - 1)).reshape(-1)


def reinforce_pp_advantages(scores: torch.Tensor, k: int = 1, eps: float = STD_EPS) -> torch.Tensor:
    """REINFORCE++ (Hu 2025, "REINFORCE++: a simple and efficient approach for aligning LLMs"), outcome reward
    only, gamma = 1: A_i = (r_i - mean_B r) / (std_B r + eps) over the whole batch (global normalisation, no
    group baseline); std with Bessel's correction. ``k`` only checks the layout."""
    _groups(scores, k)
    std = scores.std() if len(scores) > 1 else scores.new_zeros(())
    return (scores - scores.mean()) / (std + eps)


ADVANTAGES = {
    "grpo": grpo_advantages,
    "dr_grpo": dr_grpo_advantages,
    "rloo": rloo_advantages,
    "reinforce_pp": reinforce_pp_advantages,
}


def zero_spread_groups(scores: torch.Tensor, k: int) -> torch.Tensor:
    """(G,) bool: the groups whose k scores are all equal (no learning signal under a group baseline; DAPO's
    dynamic sampling drops them)."""
    g = _groups(scores, k)
    return (g == g[:, :1]).all(dim=1)


# ---------------------------------------------------------------------------------------------------------
# The policy loss


def k3_kl(logps: torch.Tensor, ref_logps: torch.Tensor) -> torch.Tensor:
    """Schulman's k3 estimator of KL(pi || ref) per token: exp(q - p) - (q - p) - 1 >= 0, with p = log pi and
    q = log ref of the sampled token (GRPO, Shao et al. 2024, eq. 4; TRL's per_token_kl)."""
    d = ref_logps - logps
    return torch.exp(d) - d - 1


@dataclass
class GRPOLoss:
    loss: torch.Tensor  # () aggregated: what is backpropagated
    per_token: torch.Tensor  # (B, R) -min(r A, clip(r) A) + beta k3, before aggregation (0 on padding)
    ratio: torch.Tensor  # (B, R) token level, (B, 1) sequence level: the importance ratio pi / pi_old
    clip_low: torch.Tensor  # same shape as ratio, bool: r < 1 - eps_low and A < 0 (clipped from below)
    clip_high: torch.Tensor  # bool: r > 1 + eps_high and A > 0 (clipped from above)
    kl: torch.Tensor | None  # (B, R) k3 per token; None when beta = 0


def kl_signals(logps: torch.Tensor, ref_logps: torch.Tensor, mask: torch.Tensor) -> dict[str, torch.Tensor]:
    """The KL to the reference as logged: kl, nats per response (k1 summed; the KL monitor's), (B, 1);
    kl/per_token, k1 per token, and kl/k3_per_token, the k3 the loss charges, (B, R)."""
    k1 = torch.where(mask.bool(), logps - ref_logps, torch.zeros_like(logps))
    return {"kl": k1.sum(1, keepdim=True), "kl/per_token": k1, "kl/k3_per_token": k3_kl(logps, ref_logps)}


def policy_loss(
    logps: torch.Tensor,
    old_logps: torch.Tensor,
    advantages: torch.Tensor,
    mask: torch.Tensor,
    epsilon_low: float = 0.2,
    epsilon_high: float = 0.2,
    importance_sampling: ImportanceSampling = "token",
    aggregation: Aggregation = "token",
    ref_logps: torch.Tensor | None = None,
    beta: float = 0.0,
    max_completion_length: int | None = None,
    n_sequences: float | None = None,
    n_tokens: float | None = None,
) -> GRPOLoss:
    """The clipped surrogate of GRPO and its variants. logps (B, R) with grad; old_logps (B, R) of the policy
    that sampled; advantages (B,); mask (B, R); ref_logps (B, R) when beta > 0.

    ratio: token level r_t = exp(p_t - p_old_t); sequence level (GSPO, Zheng et al. 2025, eq. 7)
    s = exp(mean_t (p_t - p_old_t)), one ratio per response. Per token (DAPO's clip-higher, Yu et al. 2025, eq. 8):
    l_t = -min(r A, clip(r, 1 - eps_low, 1 + eps_high) A) + beta k3_t. Aggregation of l over the mask:
    "token" (DAPO eq. 8): sum / n_tokens; "sequence" (GRPO eq. 3): sum_i (sum_t l / |o_i|) / n_sequences;
    "fixed_length" (Dr. GRPO): sum / (n_sequences x max_completion_length). ``n_sequences`` and ``n_tokens``
    are the whole optimizer minibatch's (default: this batch's), so micro-batches' losses add up to one pass.
    """
    m = mask.bool()
    zero = torch.zeros_like(logps)
    log_ratio = torch.where(m, logps - old_logps, zero)  # (B, R); padding selected away before exp
    if importance_sampling == "sequence":
        log_ratio = log_ratio.sum(1, keepdim=True) / m.sum(1, keepdim=True).clamp(min=1)  # (B, 1)
    ratio = torch.exp(log_ratio)
    adv = advantages[:, None]  # (B, 1)
    clipped = torch.clamp(ratio, 1 - epsilon_low, 1 + epsilon_high)
    per_token = -torch.min(ratio * adv, clipped * adv).expand_as(logps)  # (B, R)
    kl = None
    if beta != 0.0:
        if ref_logps is None:
            raise ValueError("beta > 0 needs ref_logps")
        kl = k3_kl(logps, ref_logps)
        per_token = per_token + beta * kl
    per_token = torch.where(m, per_token, zero)
    loss = aggregate(per_token, m, aggregation, max_completion_length, n_sequences, n_tokens)
    with torch.no_grad():
        clip_low, clip_high = (ratio < 1 - epsilon_low) & (adv < 0), (ratio > 1 + epsilon_high) & (adv > 0)
    return GRPOLoss(loss, per_token, ratio, clip_low, clip_high, kl)


def aggregate(
    per_token: torch.Tensor,
    mask: torch.Tensor,
    aggregation: Aggregation,
    max_completion_length: int | None = None,
    n_sequences: float | None = None,
    n_tokens: float | None = None,
) -> torch.Tensor:
    """One loss from (B, R) per-token losses (0 on padding), as ``policy_loss`` describes."""
    m = mask.bool()
    n_sequences = len(per_token) if n_sequences is None else n_sequences
    if aggregation == "token":
        return per_token.sum() / (m.sum() if n_tokens is None else n_tokens)
    if aggregation == "sequence":
        return (per_token.sum(1) / m.sum(1).clamp(min=1)).sum() / n_sequences
    if aggregation == "fixed_length":
        if max_completion_length is None:
            raise ValueError("aggregation 'fixed_length' needs max_completion_length")
        return per_token.sum() / (n_sequences * max_completion_length)
    raise ValueError(f"unknown aggregation {aggregation!r}; use token, sequence or fixed_length")


def sampler_mismatch(trainer_logps: torch.Tensor, sampler_logps: torch.Tensor, mask: torch.Tensor) -> dict:
    """How far the sampler's (vLLM's) log-probs of the sampled tokens are from the trainer's, both (B, R), over
    the response tokens of ``mask``: the mean and max of |trainer - sampler|, and the min / mean / max of the
    per-token ratio exp(trainer - sampler), under TRL 1.16's names (its ``vllm_importance_sampling_correction``
    logs them; here they are logged only, no correction is applied). Non-finite sampler values (a token the
    engine could not score) are left out, as TRL does."""
    m = mask.bool() & torch.isfinite(sampler_logps)
    diff = (trainer_logps - sampler_logps)[m].double()  # (N,)
    if diff.numel() == 0:
        return {}
    ratio = torch.exp(diff)
    return {
        "sampling/sampling_logp_difference/mean": diff.abs().mean().item(),
        "sampling/sampling_logp_difference/max": diff.abs().max().item(),
        "sampling/importance_sampling_ratio/min": ratio.min().item(),
        "sampling/importance_sampling_ratio/mean": ratio.mean().item(),
        "sampling/importance_sampling_ratio/max": ratio.max().item(),
    }


def token_mean(x: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """Mean of a (B, R) per-token or (B, 1) per-sequence quantity: over the tokens, or over the sequences."""
    if x.shape[1] == 1:
        return x.float().mean()
    m = mask.bool()
    return torch.where(m, x.float(), torch.zeros_like(x, dtype=torch.float)).sum() / m.sum()
