"""The PPO building blocks against values worked out by hand (working in each docstring)."""

from __future__ import annotations

import json
import math

import pytest
import torch

from alignkit.losses.ppo import (
    AdaptiveKLController,
    FixedKLController,
    entropy_from_logits,
    explained_variance,
    gae,
    kl_estimate,
    last_response_index,
    masked_mean,
    masked_var,
    per_token_rewards,
    policy_loss,
    value_loss,
    whiten,
)

TOL = {"atol": 1e-6, "rtol": 0.0}


def _t(rows) -> torch.Tensor:
    return torch.tensor(rows, dtype=torch.float64)


# --- masked statistics -----------------------------------------------------------------------------------


def test_masked_mean_and_var():
    """x = [[1, 2, (100)], [3, 4, 5]] with (100) masked out.
    Per row (dim=1): [1.5, 4.0]. Overall: 15 / 5 = 3.0.
    Deviations from 3: [-2, -1, 0, 1, 2], squares sum to 10: biased var 10 / 5 = 2.0, unbiased 10 / 4 = 2.5."""
    x = _t([[1, 2, 100], [3, 4, 5]])
    mask = torch.tensor([[1, 1, 0], [1, 1, 1]])
    torch.testing.assert_close(masked_mean(x, mask, dim=1), _t([1.5, 4.0]), **TOL)
    assert masked_mean(x, mask).item() == pytest.approx(3.0, abs=1e-12)
    assert masked_var(x, mask, unbiased=False).item() == pytest.approx(2.0, abs=1e-12)
    assert masked_var(x, mask).item() == pytest.approx(2.5, abs=1e-12)
    with pytest.raises(ValueError, match="at least 2"):
        masked_var(x, torch.tensor([[1, 0, 0], [0, 0, 0]]))


def test_whiten_hand_values():
    """x = [1, 2, 3, 4]: mean 2.5, sum of squared deviations 5.
    unbiased var 5/3 -> std 1.290994: whitened = [-1.5, -0.5, 0.5, 1.5] / 1.290994 = [-1.161895, -0.387298, ...];
    biased var 5/4 -> std 1.118034: [-1.341641, -0.447214, 0.447214, 1.341641];
    shift_mean=False adds the mean 2.5 back: [1.338105, 2.112702, 2.887298, 3.661895]."""
    x = _t([[1, 2, 3, 4]])
    mask = torch.ones(1, 4)
    torch.testing.assert_close(whiten(x, mask), _t([[-1.161895, -0.387298, 0.387298, 1.161895]]), **TOL)
    torch.testing.assert_close(
        whiten(x, mask, unbiased=False), _t([[-1.341641, -0.447214, 0.447214, 1.341641]]), **TOL
    )
    torch.testing.assert_close(
        whiten(x, mask, shift_mean=False), _t([[1.338105, 2.112702, 2.887298, 3.661895]]), **TOL
    )


def test_whiten_ignores_masked_entries():
    """The same four values [1, 2, 3, 4] spread over two padded rows give the same whitened values as test
    above, whatever (even NaN / inf) lies under the mask; padded outputs are 0."""
    mask = torch.tensor([[1, 1, 0, 0], [1, 1, 0, 0]])
    a = _t([[1, 2, 0, 0], [3, 4, 0, 0]])
    b = _t([[1, 2, 1e6, float("nan")], [3, 4, float("inf"), -7]])
    expected = _t([[-1.161895, -0.387298, 0, 0], [0.387298, 1.161895, 0, 0]])
    torch.testing.assert_close(whiten(a, mask), expected, **TOL)
    torch.testing.assert_close(whiten(b, mask), expected, **TOL)


def test_explained_variance():
    """returns [1, 2, 3, 4], values [1, 2, 3, 3]: residual [0, 0, 0, 1], mean 0.25,
    Var = (3 * 0.0625 + 0.5625) / 4 = 0.1875; Var[returns] = 1.25; EV = 1 - 0.1875 / 1.25 = 0.85.
    Padding (99 vs -99) is ignored. Constant returns -> NaN (undefined)."""
    mask = torch.tensor([[1, 1, 1, 1, 0]])
    returns, values = _t([[1, 2, 3, 4, 99]]), _t([[1, 2, 3, 3, -99]])
    assert explained_variance(values, returns, mask).item() == pytest.approx(0.85, abs=1e-12)
    assert math.isnan(explained_variance(values, _t([[2, 2, 2, 2, 0]]), mask).item())


# --- KL estimators ---------------------------------------------------------------------------------------


def test_kl_estimators_match_definitions():
    """logp = [-1, -2], ref = [-1.5, -1]; log r = ref - logp = [-0.5, 1].
    k1 = -log r = [0.5, -1]; k2 = (log r)^2 / 2 = [0.125, 0.5];
    k3 = (r - 1) - log r = [e^-0.5 - 1 + 0.5, e - 1 - 1] = [0.106531, 0.718282]."""
    logp, ref = _t([[-1.0, -2.0]]), _t([[-1.5, -1.0]])
    torch.testing.assert_close(kl_estimate(logp, ref, "k1"), _t([[0.5, -1.0]]), **TOL)
    torch.testing.assert_close(kl_estimate(logp, ref, "k2"), _t([[0.125, 0.5]]), **TOL)
    torch.testing.assert_close(kl_estimate(logp, ref, "k3"), _t([[0.106531, 0.718282]]), **TOL)
    with pytest.raises(ValueError, match="unknown KL estimator"):
        kl_estimate(logp, ref, "k4")


def test_k1_and_k3_are_unbiased_for_categorical_kl():
    """policy p = [0.4, 0.3, 0.2, 0.1], reference q uniform (0.25 each). Exact
    KL(p||q) = 0.4 ln 1.6 + 0.3 ln 1.2 + 0.2 ln 0.8 + 0.1 ln 0.4 = 0.188001 + 0.054697 - 0.044629 - 0.091629
    = 0.106440. Per-sample std of k1 is about 0.425, so with N = 200000 seeded samples from p the standard error
    is about 0.001 (k3's is smaller); tolerance 0.005 (> 5 standard errors). k2's mean is biased; not checked."""
    p, q = _t([0.4, 0.3, 0.2, 0.1]), _t([0.25] * 4)
    exact = (p * (p / q).log()).sum().item()
    assert exact == pytest.approx(0.106440, abs=1e-6)
    samples = torch.multinomial(p, 200_000, replacement=True, generator=torch.Generator().manual_seed(0))
    logp, ref = p.log()[samples][None], q.log()[samples][None]  # (1, N)
    assert kl_estimate(logp, ref, "k1").mean().item() == pytest.approx(exact, abs=5e-3)
    assert kl_estimate(logp, ref, "k3").mean().item() == pytest.approx(exact, abs=5e-3)


def test_k3_is_non_negative():
    """k3 = e^x - 1 - x >= 0 for every x (equality only at x = 0), including large |log r|; k1 is not."""
    g = torch.Generator().manual_seed(1)
    logp, ref = torch.randn(8, 50, generator=g) * 5, torch.randn(8, 50, generator=g) * 5
    assert (kl_estimate(logp, ref, "k3") >= 0).all()
    assert (kl_estimate(logp, ref, "k1") < 0).any()
    assert kl_estimate(logp, logp, "k3").abs().max().item() == 0.0


# --- per-token rewards -----------------------------------------------------------------------------------


def _reward_batch():
    # logps = 0, so k1 = logp - ref = d; 9.0 marks padding that must be ignored.
    d = _t([[0.2, -0.1, 0.3, 9.0], [0.1, 0.1, 0.1, 0.1], [0.5, 9.0, 9.0, 9.0]])
    mask = torch.tensor([[1, 1, 1, 0], [1, 1, 1, 1], [1, 0, 0, 0]])
    return torch.zeros_like(d), -d, mask, _t([1.0, 2.0, -1.0])


def test_per_token_rewards_places_score_on_last_token_and_penalises_unfinished():
    """beta = 0.1, k1 = d where mask is 1.
    non_score = -0.1 d: row0 [-0.02, 0.01, -0.03, 0], row1 [-0.01] * 4, row2 [-0.05, 0, 0, 0].
    finished = [T, F, T], missing_eos_penalty = 0.5: score [1, 2, -1] -> [1, 1.5, -1] (only row 1 penalised).
    Last response tokens at [2, 3, 0]: rewards row0 [-0.02, 0.01, 0.97, 0], row1 [-0.01, -0.01, -0.01, 1.49],
    row2 [-1.05, 0, 0, 0]."""
    logps, ref, mask, score = _reward_batch()
    out = per_token_rewards(
        score, logps, ref, mask, beta=0.1, finished=torch.tensor([True, False, True]), missing_eos_penalty=0.5
    )
    torch.testing.assert_close(out.score, _t([1.0, 1.5, -1.0]), **TOL)
    torch.testing.assert_close(out.kl, _t([[0.2, -0.1, 0.3, 0], [0.1] * 4, [0.5, 0, 0, 0]]), **TOL)
    torch.testing.assert_close(
        out.non_score, _t([[-0.02, 0.01, -0.03, 0], [-0.01] * 4, [-0.05, 0, 0, 0]]), **TOL
    )
    torch.testing.assert_close(
        out.rewards,
        _t([[-0.02, 0.01, 0.97, 0], [-0.01, -0.01, -0.01, 1.49], [-1.05, 0, 0, 0]]),
        **TOL,
    )
    assert last_response_index(mask).tolist() == [2, 3, 0]


def test_per_token_rewards_without_penalty_and_bad_inputs():
    """No missing_eos_penalty: the score [1, 2, -1] is added unchanged, even though row 1 is unfinished:
    last-token rewards 0.97, 1.99, -1.05. A penalty without `finished`, or an empty response row, is an error."""
    logps, ref, mask, score = _reward_batch()
    out = per_token_rewards(score, logps, ref, mask, beta=0.1, finished=torch.tensor([True, False, True]))
    torch.testing.assert_close(out.rewards[[0, 1, 2], [2, 3, 0]], _t([0.97, 1.99, -1.05]), **TOL)
    with pytest.raises(ValueError, match="finished"):
        per_token_rewards(score, logps, ref, mask, beta=0.1, missing_eos_penalty=1.0)
    empty = mask.clone()
    empty[2] = 0
    with pytest.raises(ValueError, match="at least one response token"):
        per_token_rewards(score, logps, ref, empty, beta=0.1)


# --- GAE ---------------------------------------------------------------------------------------------------


def test_gae_by_hand():
    """gamma = 0.9, lam = 0.5 (gamma lam = 0.45).
    Row 0, r = [0, 0, 1], V = [0.5, 0.4, 0.2], no padding:
      delta2 = 1 - 0.2 = 0.8;  delta1 = 0.9 * 0.2 - 0.4 = -0.22;  delta0 = 0.9 * 0.4 - 0.5 = -0.14
      A2 = 0.8;  A1 = -0.22 + 0.45 * 0.8 = 0.14;  A0 = -0.14 + 0.45 * 0.14 = -0.077
      returns = A + V = [0.423, 0.54, 1.0]
    Row 1, r = [0, 2, (99)], V = [1, 0.5, (77)], last token padding (V, A there are 0):
      delta1 = 2 - 0.5 = 1.5 = A1;  delta0 = 0.9 * 0.5 - 1 = -0.55;  A0 = -0.55 + 0.45 * 1.5 = 0.125
      returns = [1.125, 2.0, 0]"""
    rewards = _t([[0, 0, 1], [0, 2, 99]])
    values = _t([[0.5, 0.4, 0.2], [1, 0.5, 77]])
    mask = torch.tensor([[1, 1, 1], [1, 1, 0]])
    out = gae(rewards, values, mask, gamma=0.9, lam=0.5)
    torch.testing.assert_close(out.advantages, _t([[-0.077, 0.14, 0.8], [0.125, 1.5, 0]]), **TOL)
    torch.testing.assert_close(out.returns, _t([[0.423, 0.54, 1.0], [1.125, 2.0, 0]]), **TOL)


def test_gae_matches_double_loop():
    """The recursion equals the defining sum (Schulman et al. 2016, eq. 16) computed by a plain double loop:
    A_t = sum_{l=0}^{L-1-t} (gamma lam)^l delta_{t+l}, delta_k = r_k + gamma V_{k+1} - V_k with V_L = 0, on
    rows of lengths [7, 5, 1, 3] whose padding holds large garbage; gamma = 0.99, lam = 0.9."""
    g = torch.Generator().manual_seed(0)
    B, T, gamma, lam = 4, 7, 0.99, 0.9
    lengths = [7, 5, 1, 3]
    mask = torch.tensor([[1] * n + [0] * (T - n) for n in lengths])
    rewards = torch.randn(B, T, generator=g, dtype=torch.float64)
    values = torch.randn(B, T, generator=g, dtype=torch.float64)
    rewards[mask == 0], values[mask == 0] = 1e3, -1e3

    expected = torch.zeros(B, T, dtype=torch.float64)
    for b, n in enumerate(lengths):
        r, v = rewards[b].tolist(), values[b].tolist()[:n] + [0.0]
        deltas = [r[k] + gamma * v[k + 1] - v[k] for k in range(n)]
        for t in range(n):
            expected[b, t] = sum((gamma * lam) ** (k - t) * deltas[k] for k in range(t, n))
    out = gae(rewards, values, mask, gamma=gamma, lam=lam)
    torch.testing.assert_close(out.advantages, expected, atol=1e-10, rtol=0)
    torch.testing.assert_close(out.returns, (expected + values) * mask, atol=1e-10, rtol=0)


# --- policy loss -------------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("ratio", "advantage", "loss", "clipped"),
    [
        (1.5, 2.0, -2.4, True),  # r A = 3 but clip(1.5) = 1.2: min(3, 2.4) = 2.4, loss -2.4
        (1.1, 2.0, -2.2, False),  # inside [0.8, 1.2]: loss -r A = -2.2
        (0.5, -1.0, 0.8, True),  # r A = -0.5, clip(0.5) A = -0.8: min -> -0.8, loss 0.8
        (1.5, -1.0, 1.5, False),  # r A = -1.5, clip(1.5) A = -1.2: min -> -1.5 (unclipped), loss 1.5
    ],
)
def test_policy_loss_single_token(ratio, advantage, loss, clipped):
    """One token, eps = 0.2; loss = max(-A r, -A clip(r, 0.8, 1.2)); clip_frac 1 when the clipped term is used."""
    logps = _t([[math.log(ratio)]])
    out = policy_loss(logps, torch.zeros(1, 1, dtype=torch.float64), _t([[advantage]]), torch.ones(1, 1))
    assert out.loss.item() == pytest.approx(loss, abs=1e-9)
    assert out.clip_frac.item() == (1.0 if clipped else 0.0)


def test_policy_loss_batch_metrics_and_gradient():
    """The four cases above as one row plus a padding token with a garbage log-ratio (50) and advantage:
    loss = (-2.4 - 2.2 + 0.8 + 1.5) / 4 = -0.575; clip_frac = 2 / 4 = 0.5; ratio_mean = (1.5+1.1+0.5+1.5)/4 = 1.15;
    approx_kl = mean 0.5 (log r)^2 = 0.5 (0.164402 + 0.009084 + 0.480453 + 0.164402) / 4 = 0.102293.
    d loss / d logp_t = -A r / 4 where unclipped, 0 where clipped: [0, -0.55, 0, 0.375, 0 (padding)]."""
    logps = _t([[math.log(1.5), math.log(1.1), math.log(0.5), math.log(1.5), 50.0]]).requires_grad_()
    old = torch.zeros(1, 5, dtype=torch.float64)
    advantages = _t([[2.0, 2.0, -1.0, -1.0, 123.0]])
    mask = torch.tensor([[1, 1, 1, 1, 0]])
    out = policy_loss(logps, old, advantages, mask, clip_eps=0.2)
    assert out.loss.item() == pytest.approx(-0.575, abs=1e-9)
    assert out.clip_frac.item() == pytest.approx(0.5, abs=1e-12)
    assert out.ratio_mean.item() == pytest.approx(1.15, abs=1e-9)
    assert out.approx_kl.item() == pytest.approx(0.102293, abs=1e-6)
    out.loss.backward()
    torch.testing.assert_close(logps.grad, _t([[0.0, -0.55, 0.0, 0.375, 0.0]]), atol=1e-9, rtol=0)


# --- value loss --------------------------------------------------------------------------------------------


def test_value_loss_uses_the_clipped_error_when_larger():
    """eps = 0.2, old values 0 everywhere; v_clipped = clamp(v, -0.2, 0.2).
    t0: v = 1, return 1: unclipped (1 - 1)^2 = 0, clipped (0.2 - 1)^2 = 0.64 -> 0.64 (clipped chosen);
    t1: v = 1, return 0.5: unclipped 0.25, clipped (0.2 - 0.5)^2 = 0.09 -> 0.25 (unclipped chosen);
    t2: v = 0.1, return 1: clip inactive, both 0.81 -> 0.81.
    loss = 0.5 * (0.64 + 0.25 + 0.81) / 3 = 0.283333 (no clip would give 0.5 * 1.06 / 3 = 0.176667; clipped
    only, 0.5 * 1.54 / 3 = 0.256667); clip_frac = 1/3.
    d loss / d v: t0 0 (clamp saturated), t1 0.5 * 2 * 0.5 / 3 = 0.166667, t2 0.5 * 2 * (0.1 - 1) / 3 = -0.3.
    A padding token (v = 9, return -9) changes nothing."""
    values = _t([[1.0, 1.0, 0.1, 9.0]]).requires_grad_()
    old = torch.zeros(1, 4, dtype=torch.float64)
    returns = _t([[1.0, 0.5, 1.0, -9.0]])
    mask = torch.tensor([[1, 1, 1, 0]])
    out = value_loss(values, old, returns, mask, clip_eps=0.2)
    assert out.loss.item() == pytest.approx(0.283333, abs=1e-6)
    assert out.clip_frac.item() == pytest.approx(1 / 3, abs=1e-12)
    out.loss.backward()
    torch.testing.assert_close(values.grad, _t([[0.0, 0.166667, -0.3, 0.0]]), atol=1e-6, rtol=0)


def test_value_loss_without_clipping_is_half_mse_and_reports_explained_variance():
    """Values within eps of the old ones: the clip is inactive and the loss is 0.5 * MSE.
    values [1, 2, 3, 3] = old values, returns [1, 2, 3, 4]: errors [0, 0, 0, 1], loss 0.5 * 1/4 = 0.125,
    clip_frac 0, explained variance 0.85 (worked out in test_explained_variance)."""
    values = _t([[1.0, 2.0, 3.0, 3.0]])
    out = value_loss(values, values.clone(), _t([[1.0, 2.0, 3.0, 4.0]]), torch.ones(1, 4))
    assert out.loss.item() == pytest.approx(0.125, abs=1e-12)
    assert out.clip_frac.item() == 0.0
    assert out.explained_variance.item() == pytest.approx(0.85, abs=1e-12)


# --- entropy -----------------------------------------------------------------------------------------------


def test_entropy_from_logits():
    """Uniform over 4: ln 4 = 1.386294. Logits [0, ln 3] -> p = [0.25, 0.75]:
    H = 0.25 ln 4 + 0.75 ln(4/3) = 0.346574 + 0.215762 = 0.562335. The same shifted by +1e4 (stability), and with
    a third logit at -inf (a filtered token, p = 0): still 0.562335, with finite gradients."""
    logits = torch.tensor(
        [
            [
                [0.0, 0.0, 0.0, 0.0],
                [0.0, math.log(3), -math.inf, -math.inf],
                [1e4, 1e4 + math.log(3), -math.inf, -math.inf],
            ]
        ],
        requires_grad=True,
    )
    h = entropy_from_logits(logits)
    torch.testing.assert_close(h, torch.tensor([[1.386294, 0.562335, 0.562335]]), atol=1e-5, rtol=0)
    h.sum().backward()
    assert torch.isfinite(logits.grad).all()
    g = torch.Generator().manual_seed(0)
    z = torch.randn(2, 3, 11, generator=g)
    p = torch.softmax(z, -1)
    torch.testing.assert_close(entropy_from_logits(z), -(p * p.log()).sum(-1), atol=1e-5, rtol=0)


# --- KL controllers ----------------------------------------------------------------------------------------


def test_adaptive_kl_controller_moves_beta_towards_target():
    """init 0.1, target 6, horizon 10000, n_steps 256 (K = 0.0256).
    KL 9:   e = clip(9/6 - 1 = 0.5) = 0.2  -> beta = 0.1 * (1 + 0.2 * 0.0256) = 0.100512      (up)
    KL 5.4: e = 0.9 - 1 = -0.1 (unclipped) -> beta = 0.100512 * (1 - 0.00256) = 0.100254689  (down)
    KL 0:   e = clip(-1) = -0.2            -> beta = 0.100254689 * (1 - 0.00512) = 0.099741385"""
    ctl = AdaptiveKLController(init_beta=0.1, target=6.0, horizon=10_000)
    assert ctl.update(9.0, 256) == pytest.approx(0.100512, abs=1e-12)
    assert ctl.update(torch.tensor(5.4), 256) == pytest.approx(0.100254689, abs=1e-9)
    assert ctl.update(0.0, 256) == pytest.approx(0.100254689 * (1 - 0.00512), abs=1e-9)
    assert ctl.beta == pytest.approx(0.099741385, abs=1e-9)


def test_kl_controllers_state_round_trip():
    """A controller restored from a (JSON-serialised) state continues exactly as the original: same beta after
    further updates, compared with ==. The fixed controller never moves; a state of the other kind is refused."""
    a = AdaptiveKLController(0.05, target=6.0, horizon=10_000)
    for kl in (3.0, 7.5, 12.0):
        a.update(kl, 64)
    b = AdaptiveKLController(1.0, target=1.0, horizon=1)
    b.load_state_dict(json.loads(json.dumps(a.state_dict())))
    for kl in (2.0, 6.6, 0.1):
        assert a.update(kl, 64) == b.update(kl, 64)

    f = FixedKLController(0.05)
    assert f.update(100.0, 512) == 0.05
    g = FixedKLController(0.3)
    g.load_state_dict(json.loads(json.dumps(f.state_dict())))
    assert g.beta == 0.05
    with pytest.raises(ValueError, match="adaptive"):
        b.load_state_dict(f.state_dict())
    with pytest.raises(ValueError, match="fixed"):
        g.load_state_dict(a.state_dict())
