"""Hand-worked values for the preference losses (DPO, IPO, ORPO, KTO) and their numerical edge cases.

Every expected number is derived in the test's docstring; float32 inputs, so tolerances are ~1e-6 relative.
"""

from __future__ import annotations

import math

import pytest
import torch

from alignkit.losses.kto import kto_loss, kto_reference_point, kto_weight_warning, mismatched_indices
from alignkit.losses.preference import dpo_loss, ipo_loss, log1mexp, orpo_loss, rpo_loss


def t(*values: float) -> torch.Tensor:
    return torch.tensor(values, dtype=torch.float32)


def close(actual: torch.Tensor, expected, tol: float = 1e-6) -> None:
    torch.testing.assert_close(actual, torch.as_tensor(expected, dtype=actual.dtype), rtol=tol, atol=tol)


# --- DPO -------------------------------------------------------------------------------------------------


def test_dpo_hand_value_and_rewards():
    """policy chosen -10, rejected -12; reference -11, -11; beta 0.1.

    chosen log-ratio = -10 - (-11) = 1, rejected log-ratio = -12 - (-11) = -1, h = 1 - (-1) = 2, beta h = 0.2.
    loss = -log sigmoid(0.2) = log(1 + e^-0.2) = log(1.8187307531) = 0.5981388694.
    rewards = beta * log-ratio = 0.1 and -0.1, without gradient.
    """
    policy_chosen = t(-10.0).requires_grad_()
    out = dpo_loss(policy_chosen, t(-12.0), t(-11.0), t(-11.0), beta=0.1)
    close(out.losses, [0.5981388694])
    close(out.chosen_rewards, [0.1])
    close(out.rejected_rewards, [-0.1])
    assert not out.chosen_rewards.requires_grad and not out.rejected_rewards.requires_grad


def test_dpo_gradient():
    """d loss / d policy_chosen = -beta * sigmoid(-beta h) = -0.1 * sigmoid(-0.2) = -0.1 * 0.4501660027
    = -0.0450166003; d loss / d policy_rejected is the opposite, +0.0450166003."""
    chosen, rejected = t(-10.0).requires_grad_(), t(-12.0).requires_grad_()
    dpo_loss(chosen, rejected, t(-11.0), t(-11.0), beta=0.1).losses.sum().backward()
    close(chosen.grad, [-0.0450166003])
    close(rejected.grad, [0.0450166003])


def test_dpo_label_smoothing():
    """Conservative DPO, eps = 0.1, same inputs (beta h = 0.2):
    loss = -(0.9) log sigmoid(0.2) - 0.1 log sigmoid(-0.2)
         = 0.9 * 0.5981388694 + 0.1 * log(1 + e^0.2)   and log(1 + e^0.2) = 0.2 + log(1 + e^-0.2) = 0.7981388694
         = 0.5383249825 + 0.0798138869 = 0.6181388694   (= plain loss + eps * beta h).
    Gradient wrt policy_chosen: -0.9 * 0.1 * sigmoid(-0.2) + 0.1 * 0.1 * sigmoid(0.2)
         = -0.0405149402 + 0.0054983400 = -0.0350166003.
    """
    chosen = t(-10.0).requires_grad_()
    out = dpo_loss(chosen, t(-12.0), t(-11.0), t(-11.0), beta=0.1, label_smoothing=0.1)
    close(out.losses, [0.6181388694])
    out.losses.sum().backward()
    close(chosen.grad, [-0.0350166003])
    with pytest.raises(ValueError, match="label_smoothing"):
        dpo_loss(t(-1.0), t(-1.0), t(-1.0), t(-1.0), label_smoothing=0.5)


def test_dpo_large_margin_is_finite_and_exact():
    """policy chosen -2000, rejected 0; reference -1000, -1000: h = -1000 - 1000 = -2000, beta h = -200.

    sigmoid(-200) = e^-200 ~ 1.4e-87 underflows to 0 in float32, so log(sigmoid(.)) is -inf (infinite loss).
    logsigmoid gives -log sigmoid(-200) = 200 + log(1 + e^-200) = 200 exactly in float32, and the gradient
    wrt policy_chosen is -beta * sigmoid(200) = -0.1.
    """
    margin = torch.tensor(-200.0)
    assert torch.log(torch.sigmoid(margin)).item() == -math.inf  # the naive form really breaks here
    chosen = t(-2000.0).requires_grad_()
    out = dpo_loss(chosen, t(0.0), t(-1000.0), t(-1000.0), beta=0.1)
    close(out.losses, [200.0])
    out.losses.sum().backward()
    close(chosen.grad, [-0.1])


def test_dpo_is_per_example():
    """Two examples are two independent losses (no reduction): the second, with h = 0, is log 2 = 0.6931471806."""
    out = dpo_loss(t(-10.0, -5.0), t(-12.0, -5.0), t(-11.0, -5.0), t(-11.0, -5.0), beta=0.1)
    close(out.losses, [0.5981388694, 0.6931471806])


# --- IPO -------------------------------------------------------------------------------------------------


def test_ipo_hand_value_and_target():
    """Same inputs, h = 2. beta 0.1: target 1 / (2 * 0.1) = 5, loss = (2 - 5)^2 = 9.
    beta 0.25: target 1 / 0.5 = 2 = h, loss = 0 (the margin sits on the target).
    Rewards as DPO: 0.1 * 1 and 0.1 * (-1)."""
    out = ipo_loss(t(-10.0), t(-12.0), t(-11.0), t(-11.0), beta=0.1)
    close(out.losses, [9.0])
    close(out.chosen_rewards, [0.1])
    close(out.rejected_rewards, [-0.1])
    close(ipo_loss(t(-10.0), t(-12.0), t(-11.0), t(-11.0), beta=0.25).losses, [0.0])


def test_ipo_gradient_pulls_margin_to_target():
    """d/dh (h - 5)^2 = 2 (h - 5) = -6 at h = 2: the loss pushes the chosen log-prob up (grad -6) until h = 5."""
    chosen = t(-10.0).requires_grad_()
    ipo_loss(chosen, t(-12.0), t(-11.0), t(-11.0), beta=0.1).losses.sum().backward()
    close(chosen.grad, [-6.0])


def test_ipo_token_averaged_inputs_are_length_invariant_and_sums_are_not():
    """Per token: policy chosen -1.0 vs reference -1.1 (+0.1), policy rejected -1.2 vs reference -1.1 (-0.1).

    Token-averaged inputs: h = 0.1 - (-0.1) = 0.2 whatever the length, loss = (0.2 - 5)^2 = 23.04.
    Summed over 10 tokens: h = 2, loss = (2 - 5)^2 = 9; over 50 tokens: h = 10, loss = (10 - 5)^2 = 25.
    Same per-token behaviour, different losses: with sums the 1/(2 beta) target depends on length.
    """
    averaged = ipo_loss(t(-1.0), t(-1.2), t(-1.1), t(-1.1), beta=0.1).losses
    close(averaged, [23.04], tol=1e-5)
    for n_tokens, expected in [(10, 9.0), (50, 25.0)]:
        n = float(n_tokens)
        summed = ipo_loss(t(-1.0 * n), t(-1.2 * n), t(-1.1 * n), t(-1.1 * n), beta=0.1).losses
        close(summed, [expected], tol=1e-4)


# --- ORPO ------------------------------------------------------------------------------------------------


def test_orpo_hand_value():
    """chosen mean log-prob -ln 2 -> p = 1/2, odds 1, log odds 0; rejected -ln 4 -> p = 1/4, odds 1/3,
    log odds -ln 3. log odds ratio = ln 3 = 1.0986122887.
    L_OR = -log sigmoid(ln 3) = log(1 + 1/3) = log(4/3) = 0.2876820725.
    chosen NLL 2.0, lam 0.1: loss = 2.0 + 0.1 * 0.2876820725 = 2.0287682072.
    """
    out = orpo_loss(t(-math.log(2)), t(-math.log(4)), t(2.0), lam=0.1)
    close(out.log_odds_ratio, [1.0986122887])
    close(out.or_loss, [0.2876820725])
    close(out.nll, [2.0])
    close(out.losses, [2.0287682072])


def test_orpo_gradient():
    """d loss / d chosen_nll = 1. d loss / d chosen_mean_logp = lam * -sigmoid(-LOR) * d(log odds)/dx with
    d/dx [x - log(1 - e^x)] = 1 + e^x / (1 - e^x) = 1 / (1 - p) = 2 at p = 1/2, and sigmoid(-ln 3) = 1/4:
    0.1 * -(1/4) * 2 = -0.05. For the rejected side, p = 1/4: 1 / (1 - 1/4) = 4/3, grad = 0.1 * (1/4) * 4/3
    = 0.0333333333."""
    chosen, rejected, nll = t(-math.log(2)).requires_grad_(), t(-math.log(4)).requires_grad_(), t(2.0)
    nll.requires_grad_()
    orpo_loss(chosen, rejected, nll, lam=0.1).losses.sum().backward()
    close(nll.grad, [1.0])
    close(chosen.grad, [-0.05])
    close(rejected.grad, [0.0333333333])


def test_orpo_mean_logprob_near_zero_is_stable():
    """chosen mean log-prob x = -1e-8 (p = 1 - 1e-8). exp(-1e-8) rounds to 1 in float32, so the naive
    log(1 - exp(x)) is log(0) = -inf. Exactly: 1 - e^x = 1e-8 - 5e-17, log = -18.4206807440 - 5e-9, so
    log odds = x - log(1 - e^x) = -1e-8 + 18.4206807440 + 5e-9 = 18.4206807390. Rejected -ln 2: log odds 0.
    L_OR = log(1 + e^-18.42068) = 1.0e-8. Gradients stay finite (the branch log1mexp does not take would give
    0 * inf = NaN if it saw x).
    """
    x = t(-1e-8)
    assert torch.log(1 - torch.exp(x)).item() == -math.inf
    chosen = x.clone().requires_grad_()
    out = orpo_loss(chosen, t(-math.log(2)), t(1e-8), lam=0.1)
    close(out.log_odds_ratio, [18.420680739], tol=1e-5)
    close(out.or_loss, [1.0e-8], tol=1e-12)
    out.losses.sum().backward()
    assert torch.isfinite(chosen.grad).all()


def test_log1mexp_branches_and_exact_zero():
    """log(1 - e^x): x = -ln 2 -> log(1/2) = -0.6931471806 (the branch point); x = -5 -> log(1 - 0.0067379470)
    = -0.0067607307; x = -1e-8 -> log(1e-8) = -18.4206807440. x = 0 (p = 1, a saturated float32 softmax)
    is moved to the largest negative normal float -1.1754944e-38, giving log(1.1754944e-38) = -87.3365447506
    (finite) with a zero, not NaN, gradient."""
    x = t(-math.log(2), -5.0, -1e-8, 0.0).requires_grad_()
    y = log1mexp(x)
    close(y, [-0.6931471806, -0.0067607307, -18.4206807440, -87.3365447506], tol=1e-5)
    y.sum().backward()
    # d/dx log(1 - e^x) = -e^x / (1 - e^x): -1 at -ln 2, -0.0067836549 at -5, -1e8 at -1e-8; 0 where clamped.
    close(x.grad, [-1.0, -0.0067836549, -1e8, 0.0], tol=1e-5)


def test_orpo_averaged_and_summed_inputs_differ():
    """Chosen: 10 tokens of log-prob -0.1; rejected: 10 tokens of -0.3. log odds(x) = x - log(1 - e^x).

    Averaged (x = -0.1, -0.3): 2.2521684610 - 1.0502256128 = 1.2019428482, the same for 20 tokens.
    Summed over 10 (x = -1, -3): -0.5413248546 - (-2.9489308191) = 2.4076059644.
    Summed over 20 (x = -2, -6): -1.8545865421 - (-5.9975181706) = 4.1429316285.
    Averaged is the paper's P(y|x) and is length-invariant; sums make the odds ratio a length-dependent
    likelihood ratio (log(1 - p) -> 0 as the sum grows).
    """
    averaged = orpo_loss(t(-0.1), t(-0.3), t(0.1)).log_odds_ratio
    close(averaged, [1.2019428482], tol=1e-5)
    close(orpo_loss(t(-1.0), t(-3.0), t(0.1)).log_odds_ratio, [2.4076059644], tol=1e-5)
    close(orpo_loss(t(-2.0), t(-6.0), t(0.1)).log_odds_ratio, [4.1429316285], tol=1e-5)


# --- KTO -------------------------------------------------------------------------------------------------

# Shared inputs: two examples, the first desirable. policy -10, -12; reference -11, -11; r = 1, -1; beta 0.1.
POLICY, REFERENCE, LABELS = (-10.0, -12.0), (-11.0, -11.0), (True, False)


def z0(kl_policy: torch.Tensor, kl_reference: torch.Tensor) -> torch.Tensor:
    """z0 of one batch of mismatched pairs."""
    return kto_reference_point((kl_policy - kl_reference).sum(), len(kl_policy))


def test_kto_z0_clamped_at_zero_with_weights():
    """KL pairs: policy -5, -6; reference -4, -5; mean(policy - reference) = mean(-1, -1) = -1 -> z0 = 0.

    desirable (r = 1):    1 - sigmoid(0.1 * (1 - 0))    = 1 - sigmoid(0.1) = 1 - 0.5249791875 = 0.4750208125
    undesirable (r = -1): 1 - sigmoid(0.1 * (0 - (-1))) = 1 - sigmoid(0.1) = 0.4750208125
    Weights lambda_D 2, lambda_U 0.5: 0.9500416250 and 0.2375104063. Rewards beta r = 0.1, -0.1.
    """
    out = kto_loss(
        t(*POLICY), t(*REFERENCE), torch.tensor(LABELS), z0(t(-5.0, -6.0), t(-4.0, -5.0)), beta=0.1
    )
    close(out.kl, 0.0)
    close(out.losses, [0.4750208125, 0.4750208125])
    close(out.rewards, [0.1, -0.1])
    weighted = kto_loss(
        t(*POLICY),
        t(*REFERENCE),
        torch.tensor(LABELS),
        z0(t(-5.0, -6.0), t(-4.0, -5.0)),
        beta=0.1,
        desirable_weight=2.0,
        undesirable_weight=0.5,
    )
    close(weighted.losses, [0.9500416250, 0.2375104063])


def test_kto_positive_z0_and_gradients():
    """KL pairs: policy -3, -4; reference -5, -4; mean(2, 0) = 1 -> z0 = 1.

    desirable (r = 1):    1 - sigmoid(0.1 * (1 - 1))    = 1 - 0.5 = 0.5
    undesirable (r = -1): 1 - sigmoid(0.1 * (1 - (-1))) = 1 - sigmoid(0.2) = 1 - 0.5498339973 = 0.4501660027
    Gradients wrt policy (lambda_D = lambda_U = 1):
      desirable:   -beta * s(1 - s) at s = sigmoid(0)   = -0.1 * 0.25 = -0.025
      undesirable: +beta * s(1 - s) at s = sigmoid(0.2) = 0.1 * 0.5498339973 * 0.4501660027 = 0.0247516573
    z0 is detached: the KL policy log-probs get no gradient at all (grad stays None).
    """
    policy = t(*POLICY).requires_grad_()
    kl_policy = t(-3.0, -4.0).requires_grad_()
    out = kto_loss(policy, t(*REFERENCE), torch.tensor(LABELS), z0(kl_policy, t(-5.0, -4.0)), beta=0.1)
    close(out.kl, 1.0)
    close(out.losses, [0.5, 0.4501660027])
    assert not out.kl.requires_grad and not out.rewards.requires_grad
    out.losses.sum().backward()
    close(policy.grad, [-0.025, 0.0247516573])
    assert kl_policy.grad is None


def test_kto_labels_accept_integers_and_keep_batch_order():
    """Labels 0/1 work like bools, and losses stay in batch order. Swapping the labels of the z0 = 1 case:
    first, undesirable with r = 1:  1 - sigmoid(0.1 * (1 - 1))  = 1 - 0.5 = 0.5;
    second, desirable with r = -1:  1 - sigmoid(0.1 * (-1 - 1)) = 1 - sigmoid(-0.2) = 0.5498339973."""
    out = kto_loss(
        t(*POLICY), t(*REFERENCE), torch.tensor([0, 1]), z0(t(-3.0, -4.0), t(-5.0, -4.0)), beta=0.1
    )
    close(out.losses, [0.5, 0.5498339973])


def test_kto_reference_point_is_the_mean_over_all_pairs_not_of_per_rank_means():
    """Two ranks' mismatched pairs: rank A's log-ratios sum to 3 over 3 pairs (mean 1), rank B's to -2 over 1
    pair (mean -2). Over all 4 pairs z0 = (3 - 2) / 4 = 0.25; a mean of the ranks' means, (1 - 2) / 2 = -0.5,
    would clamp to 0. A negative mean clamps: -2 / 1 -> 0. z0 carries no gradient."""
    rank_a, rank_b = torch.tensor(3.0, requires_grad=True), torch.tensor(-2.0)  # () each
    close(kto_reference_point(rank_a + rank_b, 3 + 1), 0.25)
    close(kto_reference_point(rank_b, 1), 0.0)
    assert not kto_reference_point(rank_a, 3).requires_grad


def test_mismatched_indices_is_a_derangement():
    """Shift by one: prompt i gets completion i - 1, prompt 0 the last: [3, 0, 1, 2] for 4, [1, 0] for 2."""
    assert mismatched_indices(4).tolist() == [3, 0, 1, 2]
    assert mismatched_indices(2).tolist() == [1, 0]
    assert mismatched_indices(4).dtype == torch.long
    for size in range(2, 9):
        indices = mismatched_indices(size)
        assert sorted(indices.tolist()) == list(range(size))  # every completion used once
        assert (indices != torch.arange(size)).all()  # nobody keeps their own
    for size in (0, 1):
        with pytest.raises(ValueError, match="at least 2"):
            mismatched_indices(size)


def test_kto_weight_warning_ranges():
    """Recommended: lambda_D n_D / (lambda_U n_U) in [1, 4/3].

    n_D = 100, n_U = 300, weights 1, 1: ratio 1/3, outside. desirable_weight must be in
    [1 * 300 / 100, 4/3 * 3] = [3, 4]; or undesirable_weight in [(100 / 300) * 3/4, 100 / 300] = [0.25, 0.333].
    Boundaries are inside: lambda_D = 3 (ratio 1) and lambda_D = 4 (ratio 4/3); 2.9 (0.967) and 4.1 (1.367)
    are outside. Balanced data with equal weights (ratio 1) is inside.
    """
    message = kto_weight_warning(1.0, 1.0, 100, 300)
    assert message is not None
    assert "0.333" in message and "desirable_weight in [3, 4]" in message
    assert "undesirable_weight in [0.25, 0.333]" in message
    assert kto_weight_warning(3.0, 1.0, 100, 300) is None
    assert kto_weight_warning(4.0, 1.0, 100, 300) is None
    assert kto_weight_warning(2.9, 1.0, 100, 300) is not None
    assert kto_weight_warning(4.1, 1.0, 100, 300) is not None
    assert kto_weight_warning(1.0, 1.0, 50, 50) is None
    assert "only one kind" in kto_weight_warning(1.0, 1.0, 10, 0)


def test_rpo_adds_the_chosen_length_normalised_nll_by_hand():
    """RPO = DPO + alpha * NLL(chosen) / |chosen|, per pair; beta = 0.5, alpha = 0.5.

    Pair 1: h = (-4 + 5) - (-6 + 5) = 2, beta h = 1, DPO = log(1 + e^-1) = 0.3132617; the chosen reply has 4
    tokens summing to -4, mean -1, NLL 1: RPO = 0.3132617 + 0.5 = 0.8132617.
    Pair 2: h = 0, DPO = ln 2 = 0.6931472; chosen mean -0.25, NLL 0.25: RPO = 0.6931472 + 0.125 = 0.8181472.
    d RPO / d chosen_mean = -alpha = -0.5 for each pair; alpha = 0 leaves the DPO loss as it was.
    """
    dpo = dpo_loss(torch.tensor([-4.0, -2.0]), torch.tensor([-6.0, -3.0]), torch.tensor([-5.0, -2.0]),
                   torch.tensor([-5.0, -3.0]), beta=0.5)  # fmt: skip
    chosen_mean = torch.tensor([-1.0, -0.25], requires_grad=True)
    out = rpo_loss(dpo.losses, chosen_mean, alpha=0.5)
    torch.testing.assert_close(out.losses, torch.tensor([0.8132617, 0.8181472]), atol=1e-6, rtol=0)
    torch.testing.assert_close(out.nll, torch.tensor([1.0, 0.25]), atol=0, rtol=0)
    out.losses.sum().backward()
    torch.testing.assert_close(chosen_mean.grad, torch.tensor([-0.5, -0.5]), atol=0, rtol=0)
    torch.testing.assert_close(rpo_loss(dpo.losses, chosen_mean, 0.0).losses, dpo.losses, atol=0, rtol=0)
    with pytest.raises(ValueError, match=">= 0"):
        rpo_loss(dpo.losses, chosen_mean, -0.1)
