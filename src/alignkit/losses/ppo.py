"""The pure building blocks of RLHF with PPO: KL estimators, per-token rewards, whitening, GAE,
the clipped policy and value losses, entropy, and the KL-coefficient controllers.

Torch only, no model inside. Every (B, T) tensor is over response tokens, right-padded, with ``mask`` 1 on
response tokens and 0 on padding; whatever sits under mask 0 never changes a result.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

import torch

KLKind = Literal["k1", "k2", "k3"]


# ---------------------------------------------------------------------------------------------------------
# Masked statistics


def masked_mean(x: torch.Tensor, mask: torch.Tensor, dim: int | None = None) -> torch.Tensor:
    """Mean of ``x`` over the entries where ``mask`` is 1 (over ``dim``, or over everything).

    Masked-out entries are selected away with ``torch.where``, not multiplied by 0, so a NaN or inf under the
    mask (e.g. a padding log-prob) cannot leak into the result. An all-zero mask gives NaN (0 / 0).
    """
    m = mask.bool()
    total = torch.where(m, x, torch.zeros_like(x))
    if dim is None:
        return total.sum() / m.sum()
    return total.sum(dim) / m.sum(dim)


def masked_var(x: torch.Tensor, mask: torch.Tensor, unbiased: bool = True) -> torch.Tensor:
    """Variance of ``x`` over the entries where ``mask`` is 1 (a scalar).

    unbiased=True applies Bessel's correction n / (n - 1), as TRL's ``masked_var`` does; unbiased=False
    divides by n, as ``tf.nn.moments`` in OpenAI's lm-human-preferences does.
    """
    n = int(mask.bool().sum())
    if n == 0 or (unbiased and n == 1):
        raise ValueError(f"masked_var needs at least {2 if unbiased else 1} unmasked entries, got {n}")
    mean = masked_mean(x, mask)
    var = masked_mean((x - mean) ** 2, mask)
    return var * (n / (n - 1)) if unbiased else var


def whiten(
    x: torch.Tensor, mask: torch.Tensor, shift_mean: bool = True, unbiased: bool = True, eps: float = 1e-8
) -> torch.Tensor:
    """(x - mean) / sqrt(var + eps) with mean and var over the masked entries; 0 where mask is 0.

    shift_mean=False adds the mean back (only rescales), as used for whitening rewards (Huang et al. 2024,
    "N+ implementation details", `whiten_rewards`). The variance is unbiased by default, as TRL's
    ``masked_whiten``; OpenAI's lm-human-preferences (``tf.nn.moments``) and Huang et al.'s reproductions use
    the biased one (``unbiased=False``). The two differ by a factor sqrt((n - 1) / n) on n tokens.
    """
    mean = masked_mean(x, mask)
    var = masked_var(x, mask, unbiased=unbiased)
    whitened = (x - mean) * torch.rsqrt(var + eps)
    if not shift_mean:
        whitened = whitened + mean
    return torch.where(mask.bool(), whitened, torch.zeros_like(whitened))


def explained_variance(values: torch.Tensor, returns: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """1 - Var[returns - values] / Var[returns] over the masked entries (a scalar; NaN when Var[returns] = 0).

    1 means the value head predicts the returns perfectly, 0 means no better than their mean, < 0 worse.
    The n / (n - 1) factor cancels in the ratio, so the biased variance is used. (cleanrl's PPO health metric.)
    """
    var_returns = masked_var(returns, mask, unbiased=False)
    var_residual = masked_var(returns - values, mask, unbiased=False)
    ev = 1 - var_residual / var_returns
    return torch.where(var_returns == 0, torch.full_like(ev, float("nan")), ev)


# ---------------------------------------------------------------------------------------------------------
# KL penalty and per-token rewards


def kl_estimate(logps: torch.Tensor, ref_logps: torch.Tensor, kind: KLKind = "k1") -> torch.Tensor:
    """Per-token estimate of KL(policy || reference) from tokens sampled from the policy. (B, T) -> (B, T).

    With log r = ref_logps - logps (Schulman 2020, "Approximating KL divergence"):
      k1 = -log r                unbiased, can be negative per token (what InstructGPT / Ziegler penalise);
      k2 = (log r)^2 / 2         biased, low variance, non-negative;
      k3 = (r - 1) - log r       unbiased and non-negative.
    """
    log_r = ref_logps - logps  # (B, T)
    if kind == "k1":
        return -log_r
    if kind == "k2":
        return 0.5 * log_r**2
    if kind == "k3":
        return torch.expm1(log_r) - log_r  # expm1 keeps precision when r is close to 1
    raise ValueError(f"unknown KL estimator {kind!r}; expected 'k1', 'k2' or 'k3'")


@dataclass
class TokenRewards:
    """The per-token reward that PPO maximises, and its parts."""

    rewards: torch.Tensor  # (B, T) non_score, plus the score on each row's last response token
    kl: torch.Tensor  # (B, T) per-token KL estimate, 0 on padding
    non_score: torch.Tensor  # (B, T) -beta * kl, 0 on padding
    score: torch.Tensor  # (B,) the sequence score actually added (after any missing-EOS penalty)


def last_response_index(mask: torch.Tensor) -> torch.Tensor:
    """Position of the last 1 in each row of ``mask`` (B, T) -> (B,); every row needs at least one 1."""
    positions = torch.arange(mask.shape[1], device=mask.device).expand_as(mask)  # (B, T)
    last = torch.where(mask.bool(), positions, -1).amax(dim=1)  # (B,)
    if bool((last < 0).any()):
        raise ValueError("every row needs at least one response token (a row of mask is all zeros)")
    return last


def per_token_rewards(
    score: torch.Tensor,
    logps: torch.Tensor,
    ref_logps: torch.Tensor,
    mask: torch.Tensor,
    beta: float,
    kl_kind: KLKind = "k1",
    finished: torch.Tensor | None = None,
    missing_eos_penalty: float | None = None,
) -> TokenRewards:
    """Per-token rewards r_t = -beta * KL_t, plus the sequence score on the last response token.

    score: (B,) reward-model score of each response. logps, ref_logps: (B, T) log-probs of the sampled
    response tokens under the policy and the reference (SFT) model. mask: (B, T). finished: (B,) bool, True
    where the response ended with EOS; needed when ``missing_eos_penalty`` is given.
    """
    m = mask.bool()
    # InstructGPT (Ouyang et al. 2022, eq. 2): R(x, y) = r_theta(x, y) - beta log(pi_RL(y|x) / pi_SFT(y|x)),
    # spread over tokens as in Ziegler et al. 2019 §2.2 / lm-human-preferences: -beta * KL_t at every token,
    # the score once at the end.
    kl = torch.where(m, kl_estimate(logps, ref_logps, kl_kind), torch.zeros_like(logps))  # (B, T)
    non_score = -beta * kl  # (B, T)
    if missing_eos_penalty is not None:
        if finished is None:
            raise ValueError("missing_eos_penalty needs `finished` (which responses ended with EOS)")
        # Subtract a fixed penalty from unfinished responses, as TRL's `missing_eos_penalty`; Huang et al. 2024
        # (N+ details) instead *replace* their score by a constant (-1).
        score = score - missing_eos_penalty * (~finished.bool()).to(score.dtype)  # (B,)
    last = last_response_index(m)  # (B,)
    # The score goes on the last response token (the EOS when there is one). lm-human-preferences adds it at
    # index -1 of a fixed-length response; TRL / Huang et al. 2024 add it one token past the EOS (and extend
    # the value mask by one to match). Here it stays inside the response mask.
    rewards = non_score.scatter_add(1, last[:, None], score[:, None].to(non_score.dtype))  # (B, T)
    return TokenRewards(rewards=rewards, kl=kl, non_score=non_score, score=score)


# ---------------------------------------------------------------------------------------------------------
# Advantages


@dataclass
class Advantages:
    advantages: torch.Tensor  # (B, T) GAE advantages, 0 on padding (not whitened)
    returns: torch.Tensor  # (B, T) advantages + values, the value head's regression target; 0 on padding


def gae(
    rewards: torch.Tensor, values: torch.Tensor, mask: torch.Tensor, gamma: float = 1.0, lam: float = 0.95
) -> Advantages:
    """Generalised advantage estimation over response tokens. rewards, values, mask: (B, T).

    Schulman et al. 2016, eq. 16: A_t = sum_l (gamma lam)^l delta_{t+l}, with delta_t = r_t + gamma V_{t+1} - V_t,
    computed backwards as A_t = delta_t + gamma lam A_{t+1}. V and A past the last response token are 0 (the
    episode ends there), so padding contributes nothing. gamma=1, lam=0.95 are lm-human-preferences' defaults.
    A 0 inside a row's mask also acts as an episode end; masks are expected to be contiguous.
    """
    m = mask.to(values.dtype)  # (B, T)
    rewards = torch.where(mask.bool(), rewards, torch.zeros_like(rewards))
    values = torch.where(mask.bool(), values, torch.zeros_like(values))
    next_value = torch.zeros_like(values[:, 0])  # (B,) V_{T} = 0
    next_advantage = torch.zeros_like(values[:, 0])  # (B,) A_{T} = 0
    reversed_advantages = []
    for t in reversed(range(rewards.shape[1])):
        delta = rewards[:, t] + gamma * next_value - values[:, t]  # (B,)
        advantage = (delta + gamma * lam * next_advantage) * m[:, t]  # (B,) 0 on padding
        reversed_advantages.append(advantage)
        next_value, next_advantage = values[:, t], advantage
    advantages = torch.stack(reversed_advantages[::-1], dim=1)  # (B, T)
    return Advantages(advantages=advantages, returns=advantages + values)


# ---------------------------------------------------------------------------------------------------------
# Losses


@dataclass
class PolicyLoss:
    loss: torch.Tensor  # () clipped surrogate, mean over response tokens of the batch
    clip_frac: torch.Tensor  # () fraction of tokens where the clipped term was the one used
    approx_kl: torch.Tensor  # () mean of 0.5 (log pi_new - log pi_old)^2 (k2 of old vs new)
    ratio_mean: torch.Tensor  # () mean of pi_new / pi_old


def policy_loss(
    logps: torch.Tensor,
    old_logps: torch.Tensor,
    advantages: torch.Tensor,
    mask: torch.Tensor,
    clip_eps: float = 0.2,
) -> PolicyLoss:
    """PPO clipped surrogate loss. logps: (B, T) under the current policy (with grad); old_logps,
    advantages: (B, T) from the rollout (no grad); mask: (B, T).

    Token-level mean over the whole batch, as lm-human-preferences and Huang et al. 2024 do (not a mean of
    per-sequence means).
    """
    m = mask.bool()
    # Select padding away *before* exp: a garbage log-ratio there would give inf * 0 = NaN gradients.
    log_ratio = torch.where(m, logps - old_logps, torch.zeros_like(logps))  # (B, T)
    advantages = torch.where(m, advantages, torch.zeros_like(advantages))
    ratio = torch.exp(log_ratio)  # (B, T)
    # Schulman et al. 2017, eq. 7: L^CLIP = E[min(r A, clip(r, 1 - eps, 1 + eps) A)]; as a loss, the max of
    # the negated terms.
    unclipped = -advantages * ratio  # (B, T)
    clipped = -advantages * torch.clamp(ratio, 1.0 - clip_eps, 1.0 + clip_eps)  # (B, T)
    loss = masked_mean(torch.maximum(unclipped, clipped), m)
    with torch.no_grad():
        clip_frac = masked_mean((clipped > unclipped).to(logps.dtype), m)
        # k2 estimator of KL(old || new), as cleanrl / Huang et al. log it ("approxkl").
        approx_kl = masked_mean(0.5 * log_ratio**2, m)
        ratio_mean = masked_mean(ratio, m)
    return PolicyLoss(loss=loss, clip_frac=clip_frac, approx_kl=approx_kl, ratio_mean=ratio_mean)


@dataclass
class ValueLoss:
    loss: torch.Tensor  # () 0.5 * mean of the clipped squared error over response tokens
    clip_frac: torch.Tensor  # () fraction of tokens where the clipped error was the larger one (and used)
    explained_variance: torch.Tensor  # () 1 - Var[returns - values] / Var[returns] of the current values


def value_loss(
    values: torch.Tensor,
    old_values: torch.Tensor,
    returns: torch.Tensor,
    mask: torch.Tensor,
    clip_eps: float = 0.2,
) -> ValueLoss:
    """Clipped value loss. values: (B, T) current value head (with grad); old_values: (B, T) from the rollout;
    returns: (B, T) from ``gae``; mask: (B, T).

    Not in the PPO paper: the value clip of OpenAI baselines' ppo2 and lm-human-preferences (Huang et al.'s
    PPO detail "value function loss clipping"): the new value may move at most eps from the old one, and the
    larger (more pessimistic) of the clipped and unclipped squared errors is minimised.
    """
    m = mask.bool()
    zeros = torch.zeros_like(values)
    values = torch.where(m, values, zeros)
    old_values = torch.where(m, old_values, zeros)
    returns = torch.where(m, returns, zeros)
    values_clipped = old_values + torch.clamp(values - old_values, -clip_eps, clip_eps)  # (B, T)
    unclipped_error = (values - returns) ** 2  # (B, T)
    clipped_error = (values_clipped - returns) ** 2  # (B, T)
    loss = 0.5 * masked_mean(torch.maximum(unclipped_error, clipped_error), m)
    with torch.no_grad():
        clip_frac = masked_mean((clipped_error > unclipped_error).to(values.dtype), m)
        ev = explained_variance(values, returns, m)
    return ValueLoss(loss=loss, clip_frac=clip_frac, explained_variance=ev)


def entropy_from_logits(logits: torch.Tensor) -> torch.Tensor:
    """Entropy of softmax(logits) along the last axis, in nats. (B, T, V) -> (B, T), float32.

    H = logsumexp(z) - sum_v p_v z_v on z = logits - max(logits): no log of a tiny probability is taken, the
    shift keeps both terms small (at |z| ~ 1e4 float32 would otherwise lose whole nats to cancellation), and a
    logit of -inf (a token filtered out, e.g. by top-k) contributes 0 instead of 0 * -inf = NaN.
    """
    z = logits.float()
    z = z - z.amax(dim=-1, keepdim=True).detach()  # entropy is shift-invariant
    lse = torch.logsumexp(z, dim=-1)  # (B, T)
    p = torch.exp(z - lse.unsqueeze(-1))  # (B, T, V)
    z_finite = z.masked_fill(torch.isneginf(z), 0.0)
    return lse - (p * z_finite).sum(-1)


# ---------------------------------------------------------------------------------------------------------
# KL coefficient controllers


class AdaptiveKLController:
    """Adapts beta so that the policy's KL from the reference tracks ``target``.

    Ziegler et al. 2019 §2.2 (log-space proportional controller): e_t = clip(KL_t / target - 1, -0.2, 0.2),
    beta <- beta (1 + K_beta e_t). As in lm-human-preferences, K_beta = n_steps / horizon, where n_steps is the
    number of episodes (responses) since the last update and KL_t is the batch mean of each response's summed
    per-token KL.
    """

    def __init__(self, init_beta: float, target: float, horizon: int):
        if target <= 0 or horizon <= 0:
            raise ValueError(f"target and horizon must be positive, got target={target}, horizon={horizon}")
        self.beta = float(init_beta)
        self.target = float(target)
        self.horizon = int(horizon)

    def update(self, current_kl: float | torch.Tensor, n_steps: int) -> float:
        error = min(max(float(current_kl) / self.target - 1.0, -0.2), 0.2)  # clipped proportional error
        self.beta *= 1.0 + error * n_steps / self.horizon
        return self.beta

    def state_dict(self) -> dict:
        return {"kind": "adaptive", "beta": self.beta, "target": self.target, "horizon": self.horizon}

    def load_state_dict(self, state: dict) -> None:
        if state.get("kind") != "adaptive":
            raise ValueError(f"expected an adaptive KL controller state, got kind={state.get('kind')!r}")
        self.beta, self.target, self.horizon = (
            float(state["beta"]),
            float(state["target"]),
            int(state["horizon"]),
        )


class FixedKLController:
    """A constant beta with the same interface as ``AdaptiveKLController``."""

    def __init__(self, beta: float):
        self.beta = float(beta)

    def update(self, current_kl: float | torch.Tensor, n_steps: int) -> float:
        return self.beta

    def state_dict(self) -> dict:
        return {"kind": "fixed", "beta": self.beta}

    def load_state_dict(self, state: dict) -> None:
        if state.get("kind") != "fixed":
            raise ValueError(f"expected a fixed KL controller state, got kind={state.get('kind')!r}")
        self.beta = float(state["beta"])


def kl_controller(
    init_beta: float, target: float | None, horizon: int
) -> AdaptiveKLController | FixedKLController:
    """PPO's KL coefficient: steered toward ``target`` nats per response (adaptive control, Ziegler et al.
    2019), or fixed at ``init_beta`` when ``target`` is None."""
    if target is None:
        return FixedKLController(init_beta)
    return AdaptiveKLController(init_beta, target, horizon)
