"""GRPO's pure pieces (``alignkit.losses.grpo``) against values worked out by hand (working in each docstring),
and against TRL 1.16 on identical tensors: ``GRPOTrainer._compute_loss`` itself, called on a stand-in trainer
whose forward returns our log-probs, and its (and RLOOTrainer's) advantage code, reproduced line for line."""

from __future__ import annotations

import math
import types
from collections import defaultdict

import pytest
import torch

from alignkit.losses.grpo import (
    aggregate,
    dr_grpo_advantages,
    grpo_advantages,
    k3_kl,
    policy_loss,
    reinforce_pp_advantages,
    rloo_advantages,
    sampler_mismatch,
    token_mean,
    zero_spread_groups,
)

TOL = {"atol": 1e-6, "rtol": 0.0}


def _t(rows) -> torch.Tensor:
    return torch.tensor(rows, dtype=torch.float64)


# --- advantages --------------------------------------------------------------------------------------------

SCORES = _t([0, 1, 2, 3, 3, 3])  # two groups of k = 3: [0, 1, 2] and [3, 3, 3] (no spread)


def test_group_advantages_hand_values():
    """Group [0, 1, 2]: mean 1, Bessel std sqrt((1 + 0 + 1) / 2) = 1.
    grpo: [-1, 0, 1] / (1 + 1e-4) = [-0.99990001, 0, 0.99990001]; dr_grpo: [-1, 0, 1];
    rloo: r_i - mean of the other two: 0 - 1.5, 1 - 1, 2 - 0.5 = [-1.5, 0, 1.5] (= 3/2 x dr_grpo).
    Group [3, 3, 3]: every advantage 0 (grpo: 0 / (0 + 1e-4))."""
    g = 1 / (1 + 1e-4)
    torch.testing.assert_close(grpo_advantages(SCORES, 3), _t([-g, 0, g, 0, 0, 0]), **TOL)
    torch.testing.assert_close(dr_grpo_advantages(SCORES, 3), _t([-1, 0, 1, 0, 0, 0]), **TOL)
    torch.testing.assert_close(rloo_advantages(SCORES, 3), _t([-1.5, 0, 1.5, 0, 0, 0]), **TOL)
    assert zero_spread_groups(SCORES, 3).tolist() == [False, True]
    with pytest.raises(ValueError, match="k >= 2"):
        rloo_advantages(SCORES, 1)
    with pytest.raises(ValueError, match="n_groups"):
        grpo_advantages(SCORES, 4)


def test_reinforce_pp_normalises_over_the_batch():
    """[0, 1, 2, 3, 3, 3]: mean 12 / 6 = 2, deviations [-2, -1, 0, 1, 1, 1], squares sum 8, Bessel var 8 / 5 =
    1.6, std 1.26491106: A = deviations / 1.26501106 (no group baseline: the [3, 3, 3] group gets 1/std each)."""
    d = 1.26491106 + 1e-4
    torch.testing.assert_close(reinforce_pp_advantages(SCORES, 3), _t([-2, -1, 0, 1, 1, 1]) / d, **TOL)


# --- the policy loss ---------------------------------------------------------------------------------------

MASK = torch.tensor([[1, 1], [1, 0]])
OLD = _t([[-1.0, -2.0], [-0.5, -3.0]])
LOG_RATIO = _t([[math.log(1.5), math.log(0.5)], [0.0, 7.0]])  # 7.0 sits under the mask: must not count
ADV = _t([1.0, -1.0])


def _loss(**kw):
    logps = (OLD + LOG_RATIO).requires_grad_(True)
    kw = {"epsilon_low": 0.2, "epsilon_high": 0.28, **kw}
    return logps, policy_loss(logps, OLD, ADV, MASK, **kw)


def test_token_level_loss_and_its_aggregations():
    """Token ratios: row 0 [1.5, 0.5] with A = 1, row 1 [1] with A = -1; clip to [0.8, 1.28].
    l = -min(r A, clip(r) A): 1.5 -> -min(1.5, 1.28) = -1.28 (clipped high); 0.5 -> -min(0.5, 0.8) = -0.5 (no
    clip: a low clip counts only for A < 0); row 1 -> -min(-1, -1) = 1. Sum -0.78 over 3 tokens.
    token: -0.78 / 3 = -0.26; sequence: mean(-1.78 / 2, 1 / 1) = mean(-0.89, 1) = 0.055;
    fixed_length (L = 4): -0.78 / (2 x 4) = -0.0975. clip_frac/high 1/3, low 0.
    Gradient of the token loss in logps: clipped token 0; row 0 token 1: -A r / 3 = -0.5 / 3; row 1: +1 / 3."""
    logps, out = _loss(aggregation="token")
    assert out.loss.item() == pytest.approx(-0.26, abs=1e-9)
    out.loss.backward()
    torch.testing.assert_close(logps.grad, _t([[0.0, -0.5 / 3], [1 / 3, 0.0]]), **TOL)
    assert token_mean(out.clip_high, MASK).item() == pytest.approx(1 / 3)
    assert token_mean(out.clip_low, MASK).item() == 0.0
    assert _loss(aggregation="sequence")[1].loss.item() == pytest.approx(0.055, abs=1e-9)
    fixed = _loss(aggregation="fixed_length", max_completion_length=4)[1]
    assert fixed.loss.item() == pytest.approx(-0.0975, abs=1e-9)


def test_sequence_level_ratio_is_gspo():
    """GSPO: one ratio per response, s = exp(mean token log-ratio). Row 0: exp((ln 1.5 + ln 0.5) / 2) =
    sqrt(0.75) = 0.8660254 inside [0.8, 1.28]: l = -0.8660254 on both tokens; row 1: s = 1, l = 1.
    token: (-1.7320508 + 1) / 3 = -0.2440169; sequence: (-0.8660254 + 1) / 2 = 0.0669873.
    With A = -1 on row 0 instead, s = 0.866 > 0.8: no clip; with eps_low = 0.15 (floor 0.85) still none, with
    eps_low = 0.1 (floor 0.9): -min(-0.866, -0.9) = 0.9 per token and row 0 clipped low."""
    _, out = _loss(importance_sampling="sequence", aggregation="token")
    assert out.ratio.shape == (2, 1)
    assert out.loss.item() == pytest.approx((-2 * math.sqrt(0.75) + 1) / 3, abs=1e-9)
    seq = _loss(importance_sampling="sequence", aggregation="sequence")[1]
    assert seq.loss.item() == pytest.approx((-math.sqrt(0.75) + 1) / 2, abs=1e-9)
    logps = (OLD + LOG_RATIO).requires_grad_(True)
    low = policy_loss(logps, OLD, _t([-1.0, -1.0]), MASK, 0.1, 0.28, "sequence", "sequence")
    assert low.clip_low[:, 0].tolist() == [True, False]
    assert low.loss.item() == pytest.approx((0.9 + 1) / 2, abs=1e-9)


def test_k3_kl_added_per_token():
    """k3 with log pi = ln 0.5, log ref = ln 0.25: d = ln 0.5 = -0.693147, e^d - d - 1 = 0.5 + 0.693147 - 1 =
    0.193147; ref = pi gives 0. Loss with beta = 0.1 and ratio 1, A = 0, all tokens: 0.1 x mean k3."""
    assert k3_kl(_t([math.log(0.5)]), _t([math.log(0.25)])).item() == pytest.approx(0.1931472, abs=1e-7)
    logps = _t([[math.log(0.5), -1.0]])
    ref = _t([[math.log(0.25), -1.0]])
    out = policy_loss(logps, logps, _t([0.0]), torch.ones(1, 2), ref_logps=ref, beta=0.1)
    assert out.loss.item() == pytest.approx(0.1 * 0.1931472 / 2, abs=1e-8)
    with pytest.raises(ValueError, match="ref_logps"):
        policy_loss(logps, logps, _t([0.0]), torch.ones(1, 2), beta=0.1)


@pytest.mark.parametrize("aggregation", ["token", "sequence", "fixed_length"])
def test_micro_batches_with_the_minibatch_totals_add_up_to_one_pass(aggregation):
    """Rows split in two micro-batches, each normalised by the whole minibatch's sequences and tokens: the two
    losses add up to the loss of one pass over all rows."""
    gen = torch.Generator().manual_seed(0)
    logps, old = torch.randn(5, 4, generator=gen), torch.randn(5, 4, generator=gen)
    adv = torch.randn(5, generator=gen)
    mask = torch.tensor([[1, 1, 1, 1], [1, 1, 0, 0], [1, 0, 0, 0], [1, 1, 1, 0], [1, 1, 1, 0]])
    kw = {"aggregation": aggregation, "max_completion_length": 4, "n_sequences": 5, "n_tokens": float(mask.sum())}
    whole = policy_loss(logps, old, adv, mask, **kw).loss
    parts = [policy_loss(logps[s], old[s], adv[s], mask[s], **kw).loss for s in (slice(0, 2), slice(2, 5))]
    assert (parts[0] + parts[1]).item() == pytest.approx(whole.item(), abs=1e-6)
    with pytest.raises(ValueError, match="max_completion_length"):
        aggregate(torch.zeros(1, 1), torch.ones(1, 1), "fixed_length")


# --- parity with TRL 1.16 ----------------------------------------------------------------------------------


def _trl_trainer(loss_type: str, level: str, beta: float, max_len: int):
    """A stand-in GRPOTrainer with what ``_compute_loss`` reads: one process, no accumulation, no vLLM, no
    entropy bonus or masks; its forward (``_get_per_token_logps_and_entropies``) returns the given log-probs."""
    accelerator = types.SimpleNamespace(
        num_processes=1, reduce=lambda x, reduction="sum": x, gather=lambda x: x, gather_for_metrics=lambda x: x
    )
    args = types.SimpleNamespace(use_bias_correction_kl=False, delta=None, steps_per_generation=1)
    return types.SimpleNamespace(
        top_entropy_quantile=1.0, off_policy_mask_threshold=None, importance_sampling_level=level, beta=beta,
        args=args, loss_type=loss_type, epsilon_low=0.2, epsilon_high=0.28, use_vllm=False,
        vllm_importance_sampling_correction=False, model=types.SimpleNamespace(training=True),
        current_gradient_accumulation_steps=1, accelerator=accelerator, _entropy_bonus_enabled=False,
        aux_loss_enabled=False, _metrics=defaultdict(lambda: defaultdict(list)), max_completion_length=max_len,
    )  # fmt: skip


# our aggregation -> TRL's loss_type (bnpo: token aggregation over the micro-batch, here the whole batch)
# Per-row log-ratio shifts with the signs of the advantages below: sequence ratios clipped low and high too.
SHIFT = torch.tensor([0.0, 0.5, -0.5, 0.4, -0.4, 0.0])
TRL_LOSS_TYPES = [("token", "dapo"), ("token", "bnpo"), ("sequence", "grpo"), ("fixed_length", "dr_grpo")]


@pytest.mark.parametrize("level", ["token", "sequence"])
@pytest.mark.parametrize("beta", [0.0, 0.04])
@pytest.mark.parametrize(("aggregation", "loss_type"), TRL_LOSS_TYPES)
def test_loss_and_gradient_equal_trl_grpo_trainer(aggregation, loss_type, level, beta):
    """TRL's own ``GRPOTrainer._compute_loss`` on identical tensors (log-probs, old and reference log-probs,
    advantages, a ragged mask): the same loss, the same gradient, and the same clip fractions and KL."""
    grpo_trainer = pytest.importorskip("trl.trainer.grpo_trainer")
    gen = torch.Generator().manual_seed(1)
    B, R = 6, 5
    old = torch.randn(B, R, generator=gen) - 2
    logps = old + 0.3 * torch.randn(B, R, generator=gen) + SHIFT[:, None]
    ref = old + 0.2 * torch.randn(B, R, generator=gen)
    mask = (torch.arange(R)[None] < torch.tensor([5, 3, 1, 4, 5, 2])[:, None]).long()
    adv = grpo_advantages(torch.randn(B, generator=gen), 3)
    ours_logps = logps.clone().requires_grad_(True)
    ours = policy_loss(
        ours_logps, old, adv, mask, 0.2, 0.28, level, aggregation, ref, beta, max_completion_length=R
    )
    ours.loss.backward()

    trl_logps = logps.clone().requires_grad_(True)
    trainer = _trl_trainer(loss_type, level, beta, R)
    trainer._get_per_token_logps_and_entropies = lambda *a, **k: (trl_logps, torch.zeros(B, R), None)
    inputs = {
        "prompt_ids": torch.zeros(B, 2, dtype=torch.long), "prompt_mask": torch.ones(B, 2, dtype=torch.long),
        "completion_ids": torch.zeros(B, R, dtype=torch.long), "completion_mask": mask, "advantages": adv,
        "old_per_token_logps": old, "ref_per_token_logps": ref, "num_items_in_batch": mask.sum(),
    }  # fmt: skip
    trl_loss = grpo_trainer.GRPOTrainer._compute_loss(trainer, None, inputs)
    trl_loss.backward()
    assert ours.loss.item() == pytest.approx(trl_loss.item(), abs=1e-6)
    torch.testing.assert_close(ours_logps.grad, trl_logps.grad, atol=1e-6, rtol=0)
    metrics = trainer._metrics["train"]
    assert token_mean(ours.clip_low, mask).item() == pytest.approx(metrics["clip_ratio/low_mean"][0], abs=1e-6)
    assert token_mean(ours.clip_high, mask).item() == pytest.approx(metrics["clip_ratio/high_mean"][0], abs=1e-6)
    assert metrics["clip_ratio/high_mean"][0] + metrics["clip_ratio/low_mean"][0] > 0  # the clip is exercised
    if beta:
        assert token_mean(ours.kl, mask).item() == pytest.approx(metrics["kl"][0], abs=1e-6)


def _trl_grpo_advantages(rewards: torch.Tensor, k: int, scale_rewards: str) -> torch.Tensor:
    """TRL 1.16 GRPOTrainer._generate_and_score_completions, "sum_then_normalize" with one reward function,
    line for line (trl/trainer/grpo_trainer.py, after ``rewards_per_func``)."""
    from trl.trainer.utils import nanstd

    mean_grouped_rewards = torch.nanmean(rewards.view(-1, k), dim=1).repeat_interleave(k, dim=0)
    std_rewards = nanstd(rewards.view(-1, k), dim=1).repeat_interleave(k, dim=0)
    advantages = rewards - mean_grouped_rewards
    if scale_rewards != "none":
        advantages = advantages / (std_rewards + 1e-4)
    return torch.nan_to_num(advantages, nan=0.0)


def _trl_rloo_advantages(rewards: torch.Tensor, k: int) -> torch.Tensor:
    """TRL 1.16 RLOOTrainer._generate_and_score_completions (beta = 0, normalize_advantages=False), line for
    line (trl/trainer/rloo_trainer.py, "RLOO advantages computation")."""
    grouped_rewards = rewards.view(-1, k)
    scorable_counts = (~torch.isnan(grouped_rewards)).sum(dim=1, keepdim=True)
    grouped_sum = torch.nansum(grouped_rewards, dim=1, keepdim=True)
    baselines = ((grouped_sum - grouped_rewards) / (scorable_counts - 1)).view(-1)
    return torch.nan_to_num(rewards - baselines, nan=0.0)


def test_advantages_equal_trl():
    """grpo = TRL GRPO scale_rewards="group", dr_grpo = scale_rewards="none", rloo = RLOOTrainer's, on random
    rewards with a zero-spread group among them."""
    pytest.importorskip("trl")
    rewards = torch.cat([torch.randn(8, generator=torch.Generator().manual_seed(2)), torch.full((4,), 0.5)])
    torch.testing.assert_close(grpo_advantages(rewards, 4), _trl_grpo_advantages(rewards, 4, "group"))
    torch.testing.assert_close(dr_grpo_advantages(rewards, 4), _trl_grpo_advantages(rewards, 4, "none"))
    torch.testing.assert_close(rloo_advantages(rewards, 4), _trl_rloo_advantages(rewards, 4))


# --- the sampler-trainer mismatch (vLLM) -------------------------------------------------------------------


def test_sampler_mismatch_hand_values():
    """Response tokens (mask 1): row 0 trainer [-1.0, -2.0] vs sampler [-1.1, -1.8]; row 1 trainer [-0.5] vs
    sampler [-0.5]; row 1's second token has no sampler value (NaN) and is left out, as are padded positions.
    trainer - sampler = [0.1, -0.2, 0.0]: |.| mean 0.3 / 3 = 0.1, max 0.2; ratio exp(.) = [1.1051709, 0.8187308,
    1.0]: min 0.8187308, mean 2.9239017 / 3 = 0.9746339, max 1.1051709."""
    trainer = _t([[-1.0, -2.0, -7.0], [-0.5, -3.0, 0.0]])
    sampler = _t([[-1.1, -1.8, 0.0], [-0.5, float("nan"), 0.0]])
    mask = torch.tensor([[1, 1, 0], [1, 1, 0]])
    got = sampler_mismatch(trainer, sampler, mask)
    expected = {
        "sampling/sampling_logp_difference/mean": 0.1,
        "sampling/sampling_logp_difference/max": 0.2,
        "sampling/importance_sampling_ratio/min": 0.8187308,
        "sampling/importance_sampling_ratio/mean": 0.9746339,
        "sampling/importance_sampling_ratio/max": 1.1051709,
    }
    assert got.keys() == expected.keys()
    for key, value in expected.items():
        assert got[key] == pytest.approx(value, abs=1e-6), key
    assert sampler_mismatch(trainer, torch.full_like(sampler, float("nan")), mask) == {}
