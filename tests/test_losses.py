"""Loss tests: the numbers in each docstring are derived by hand from the formulas."""

import math

import pytest
import torch
import torch.nn.functional as F

from hf_dpo.losses import (
    LOSS_TYPES,
    hinge_loss,
    ipo_loss,
    plackett_luce_loss,
    preference_loss,
    robust_loss,
    sigmoid_loss,
)

LN2 = math.log(2.0)


def _pairs(h, ref=(0.0, 0.0)):
    """Policy log-probs whose log-ratio difference is h, with the given reference log-probs."""
    h = torch.tensor(h, dtype=torch.float64)
    ref_c = torch.full_like(h, ref[0])
    ref_r = torch.full_like(h, ref[1])
    return ref_c + h - 3.0, ref_r - 3.0, ref_c, ref_r


def test_sigmoid_equal_policy_and_reference_is_ln2_with_zero_rewards():
    """pi = pi_ref -> h = 0 -> loss = -log s(0) = ln 2 = 0.693147; rewards beta*0 = 0."""
    lp = torch.tensor([-5.0, -12.5, -0.3], dtype=torch.float64)
    losses, rc, rr = sigmoid_loss(lp, lp - 1, lp, lp - 1, beta=0.1)
    torch.testing.assert_close(losses, torch.full_like(lp, LN2), atol=1e-7, rtol=0)
    assert torch.all(rc == 0) and torch.all(rr == 0)


def test_sigmoid_hand_values():
    """beta 0.1: h = [0, 10, 20, -10] -> -log s([0, 1, 2, -1]) = [0.693147, 0.313262, 0.126928, 1.313262]."""
    losses, rc, rr = sigmoid_loss(*_pairs([0.0, 10.0, 20.0, -10.0], ref=(-4.0, -6.0)), beta=0.1)
    expected = torch.tensor([0.693147, 0.313262, 0.126928, 1.313262], dtype=torch.float64)
    torch.testing.assert_close(losses, expected, atol=1e-6, rtol=0)
    # chosen reward = 0.1 * (policy - ref) = 0.1 * (h - 3); rejected = 0.1 * (-3) = -0.3
    torch.testing.assert_close(rc, torch.tensor([-0.3, 0.7, 1.7, -1.3], dtype=torch.float64))
    torch.testing.assert_close(rr, torch.full((4,), -0.3, dtype=torch.float64))
    torch.testing.assert_close(rc - rr, 0.1 * torch.tensor([0.0, 10.0, 20.0, -10.0], dtype=torch.float64))


def test_sigmoid_label_smoothing():
    """cDPO eps 0.1, beta 0.1, h 10: 0.9 * -log s(1) + 0.1 * -log s(-1) = 0.9*0.313262 + 0.1*1.313262 = 0.413262."""
    losses, _, _ = sigmoid_loss(*_pairs([10.0]), beta=0.1, label_smoothing=0.1)
    assert losses.item() == pytest.approx(0.413262, abs=1e-6)


def test_reference_free_uses_zero_reference():
    """Reference-free: h = policy chosen - policy rejected = (-1) - (-3) = 2; beta 0.5 -> -log s(1) = 0.313262."""
    pc, pr = torch.tensor([-1.0]), torch.tensor([-3.0])
    ref = torch.tensor([-100.0])  # ignored
    losses, rc, rr = sigmoid_loss(pc, pr, ref, ref, beta=0.5, reference_free=True)
    assert losses.item() == pytest.approx(0.313262, abs=1e-6)
    assert rc.item() == pytest.approx(-0.5) and rr.item() == pytest.approx(-1.5)
    losses2, _, _ = sigmoid_loss(pc, pr, None, None, beta=0.5, reference_free=True)
    torch.testing.assert_close(losses, losses2)
    with pytest.raises(ValueError, match="reference"):
        sigmoid_loss(pc, pr, None, None, beta=0.5)


def test_ipo_hand_values():
    """IPO beta 0.5 -> target 1/(2*0.5) = 1: h = [0, 1, 3] -> (h - 1)^2 = [1, 0, 4]; beta 0.1, h 0 -> 25."""
    losses, _, _ = ipo_loss(*_pairs([0.0, 1.0, 3.0]), beta=0.5)
    torch.testing.assert_close(losses, torch.tensor([1.0, 0.0, 4.0], dtype=torch.float64))
    losses, _, _ = ipo_loss(*_pairs([0.0]), beta=0.1)
    assert losses.item() == pytest.approx(25.0)


def test_hinge_hand_values():
    """SLiC beta 0.1: h = [0, 5, 10, 20, -10] -> relu(1 - 0.1 h) = [1, 0.5, 0, 0, 2]."""
    losses, _, _ = hinge_loss(*_pairs([0.0, 5.0, 10.0, 20.0, -10.0]), beta=0.1)
    torch.testing.assert_close(losses, torch.tensor([1.0, 0.5, 0.0, 0.0, 2.0], dtype=torch.float64))


def test_robust_hand_values():
    """Robust eps 0.1, beta 0.1, h 10: (0.9*0.313262 - 0.1*1.313262) / 0.8 = 0.150610 / 0.8 = 0.188262."""
    losses, _, _ = robust_loss(*_pairs([10.0]), beta=0.1, label_smoothing=0.1)
    assert losses.item() == pytest.approx((0.9 * 0.3132617 - 0.1 * 1.3132617) / 0.8, abs=1e-6)
    assert losses.item() == pytest.approx(0.188262, abs=1e-6)
    # eps = 0 is plain DPO
    l0, _, _ = robust_loss(*_pairs([10.0, -3.0]), beta=0.1)
    s0, _, _ = sigmoid_loss(*_pairs([10.0, -3.0]), beta=0.1)
    torch.testing.assert_close(l0, s0)
    with pytest.raises(ValueError, match="0.5"):
        robust_loss(*_pairs([1.0]), beta=0.1, label_smoothing=0.5)


def test_robust_is_unbiased_under_label_noise():
    """E over flips with rate eps of the robust loss equals the clean DPO loss (Chowdhury et al., Lemma 3.1)."""
    h = torch.tensor([-4.0, 0.5, 7.0], dtype=torch.float64)
    eps = 0.2
    clean, _, _ = sigmoid_loss(*_pairs(h.tolist()), beta=0.3)
    kept, _, _ = robust_loss(*_pairs(h.tolist()), beta=0.3, label_smoothing=eps)
    flipped, _, _ = robust_loss(*_pairs((-h).tolist()), beta=0.3, label_smoothing=eps)
    torch.testing.assert_close((1 - eps) * kept + eps * flipped, clean)


def test_plackett_luce_equals_sigmoid_for_two_responses():
    torch.manual_seed(0)
    pol = torch.randn(6, 2, dtype=torch.float64) * 5
    ref = torch.randn(6, 2, dtype=torch.float64) * 5
    pl, rewards = plackett_luce_loss(pol, ref, beta=0.2)
    sg, rc, rr = sigmoid_loss(pol[:, 0], pol[:, 1], ref[:, 0], ref[:, 1], beta=0.2)
    torch.testing.assert_close(pl, sg, atol=1e-12, rtol=0)
    torch.testing.assert_close(rewards, torch.stack([rc, rr], -1))


def test_plackett_luce_hand_value_three_responses():
    """beta 1, u = [2, 1, 0]: -[(2 - log(e^2+e^1+e^0)) + (1 - log(e^1+e^0)) + 0] = 0.407606 + 0.313262 = 0.720868."""
    pol = torch.tensor([[2.0, 1.0, 0.0]], dtype=torch.float64)
    loss, _ = plackett_luce_loss(pol, torch.zeros_like(pol), beta=1.0)
    expected = -(2 - math.log(math.e**2 + math.e + 1)) - (1 - math.log(math.e + 1))
    assert loss.item() == pytest.approx(expected, abs=1e-12)
    assert loss.item() == pytest.approx(0.720868, abs=1e-6)


def test_plackett_luce_matches_loop_and_is_stable():
    torch.manual_seed(1)
    pol = torch.randn(4, 5, dtype=torch.float64) * 300  # large scores: a naive exp would overflow
    ref = torch.randn(4, 5, dtype=torch.float64)
    loss, _ = plackett_luce_loss(pol, ref, beta=0.5)
    s = 0.5 * (pol - ref)
    expected = torch.stack([-sum(s[b, k] - torch.logsumexp(s[b, k:], 0) for k in range(5)) for b in range(4)])
    torch.testing.assert_close(loss, expected)
    assert torch.isfinite(loss).all()


def test_plackett_luce_mask_drops_padding_responses():
    """A row with 2 real responses and one padding response gives the K=2 loss."""
    pol = torch.tensor([[1.0, -2.0, 55.0]], dtype=torch.float64)
    ref = torch.zeros_like(pol)
    mask = torch.tensor([[True, True, False]])
    loss, rewards = plackett_luce_loss(pol, ref, beta=0.1, response_mask=mask)
    two, _ = plackett_luce_loss(pol[:, :2], ref[:, :2], beta=0.1)
    torch.testing.assert_close(loss, two)
    assert rewards[0, 2] == 0


@pytest.mark.parametrize("loss_type", LOSS_TYPES)
def test_preference_loss_dispatch_and_gradients(loss_type):
    torch.manual_seed(2)
    pol = torch.randn(3, 2, dtype=torch.float64, requires_grad=True)
    ref = torch.randn(3, 2, dtype=torch.float64)
    losses, rewards = preference_loss(loss_type, pol, ref, beta=0.1, label_smoothing=0.0)
    assert losses.shape == (3,) and rewards.shape == (3, 2)
    assert not rewards.requires_grad
    losses.mean().backward()
    # chosen pushed up, rejected pushed down (hinge may be flat at its margin; not with these values)
    assert (pol.grad[:, 0] <= 0).all() and (pol.grad[:, 1] >= 0).all()
    torch.testing.assert_close(pol.grad[:, 0], -pol.grad[:, 1])


def test_sigmoid_gradient_matches_paper_eq8():
    """Eq. 8: grad wrt log pi(y_w) of L = -beta * s(-beta h) (per example, before the batch mean)."""
    pol = torch.tensor([[-3.0, -5.0]], dtype=torch.float64, requires_grad=True)
    ref = torch.tensor([[-4.0, -4.0]], dtype=torch.float64)
    losses, _ = preference_loss("sigmoid", pol, ref, beta=0.5)
    losses.sum().backward()
    h = (-3.0 + 4.0) - (-5.0 + 4.0)
    assert pol.grad[0, 0].item() == pytest.approx(-0.5 * torch.sigmoid(torch.tensor(-0.5 * h)).item())
    assert F.logsigmoid(torch.tensor(0.0)).item() == pytest.approx(-LN2)


def test_preference_loss_rejects_bad_input():
    with pytest.raises(ValueError, match="unknown loss_type"):
        preference_loss("nope", torch.zeros(1, 2), torch.zeros(1, 2))
    with pytest.raises(ValueError, match="plackett_luce"):
        preference_loss("sigmoid", torch.zeros(1, 3), torch.zeros(1, 3))


@pytest.mark.parametrize("loss_type", ["sigmoid", "ipo", "hinge", "robust"])
def test_gradcheck_float64(loss_type):
    """Analytic gradients of every pairwise loss agree with finite differences (float64)."""
    torch.manual_seed(3)
    pol = torch.randn(4, 2, dtype=torch.float64, requires_grad=True) * 1.0
    ref = torch.randn(4, 2, dtype=torch.float64)
    pol = pol.detach().requires_grad_(True)
    smoothing = 0.1 if loss_type in ("sigmoid", "robust") else 0.0

    def fn(p):
        return preference_loss(loss_type, p, ref, beta=0.7, label_smoothing=smoothing)[0]

    assert torch.autograd.gradcheck(fn, (pol,), eps=1e-6, atol=1e-6)


def test_gradcheck_plackett_luce_float64():
    torch.manual_seed(4)
    pol = torch.randn(3, 4, dtype=torch.float64, requires_grad=True)
    ref = torch.randn(3, 4, dtype=torch.float64)
    assert torch.autograd.gradcheck(
        lambda p: plackett_luce_loss(p, ref, beta=0.5)[0], (pol,), eps=1e-6, atol=1e-6
    )


def _optimise(loss_fn, theta, steps=500):
    optimiser = torch.optim.LBFGS(
        [theta],
        lr=1,
        max_iter=steps,
        tolerance_grad=1e-12,
        tolerance_change=1e-14,
        history_size=50,
        line_search_fn="strong_wolfe",
    )

    def closure():
        optimiser.zero_grad()
        loss = loss_fn()
        loss.backward()
        return loss

    optimiser.step(closure)
    return theta.detach()


def test_bandit_converges_to_the_optimal_policy_of_eq4():
    """A tabular policy over 5 actions trained with the pure DPO loss on Bradley-Terry preferences from a
    known reward r reaches pi* = pi_ref exp(r / beta) / Z (paper Eq. 4) to 1e-3.

    The preferences are the BT model's exact pair probabilities p(a > b) = s(r_a - r_b), the infinite-data
    limit of sampled labels: each ordered pair (a, b) enters the loss with weight p(a > b)."""
    torch.manual_seed(0)
    beta = 0.5
    reward = torch.tensor([1.0, 0.2, -0.5, 0.7, -1.3], dtype=torch.float64)
    log_ref = torch.log_softmax(torch.randn(5, dtype=torch.float64), 0)
    a, b = torch.tensor([(i, j) for i in range(5) for j in range(5) if i != j]).t()
    weight = torch.sigmoid(reward[a] - reward[b])  # probability that a is preferred to b
    theta = log_ref.clone().requires_grad_(True)

    def loss():
        log_pi = torch.log_softmax(theta, 0)
        losses, _, _ = sigmoid_loss(log_pi[a], log_pi[b], log_ref[a], log_ref[b], beta=beta)
        return (weight * losses).sum() / weight.sum()

    pi = torch.softmax(_optimise(loss, theta), 0)
    pi_star = torch.softmax(log_ref + reward / beta, 0)
    assert (pi - pi_star).abs().max().item() < 1e-3


def test_bandit_plackett_luce_recovers_the_reward_from_sampled_rankings():
    """Full rankings of 6 actions sampled from a Plackett-Luce model with scores r (Gumbel-max); the
    implicit reward beta * log(pi / pi_ref) learned with the PL loss correlates with r above 0.99."""
    g = torch.Generator().manual_seed(1)
    beta = 0.2
    reward = torch.tensor([1.5, 0.3, -0.4, 0.9, -1.1, 0.0], dtype=torch.float64)
    gumbel = -torch.log(-torch.log(torch.rand(4000, 6, generator=g, dtype=torch.float64)))
    rankings = torch.argsort(reward + gumbel, dim=1, descending=True)  # best first
    log_ref = torch.log_softmax(torch.randn(6, generator=g, dtype=torch.float64), 0)
    theta = log_ref.clone().requires_grad_(True)

    def loss():
        log_pi = torch.log_softmax(theta, 0)
        losses, _ = plackett_luce_loss(log_pi[rankings], log_ref[rankings], beta=beta)
        return losses.mean()

    log_pi = torch.log_softmax(_optimise(loss, theta), 0)
    implicit = beta * (log_pi - log_ref)
    corr = torch.corrcoef(torch.stack([implicit, reward]))[0, 1].item()
    assert corr > 0.99
