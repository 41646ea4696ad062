"""Loss tests: the numbers in each docstring are derived by hand from the formulas, then asserted.

s(x) = 1 / (1 + e^-x). Values used below: -log s(0) = ln 2 = 0.693147, -log s(1) = 0.313262,
-log s(-1) = 1.313262, -log s(2) = 0.126928, -log s(0.5) = 0.474077, -log s(1.5) = 0.201413,
-log s(-0.5) = 0.974077, s(1) = 0.731059, s(2) = 0.880797.
"""

import math

import pytest
import torch

from hf_dpo.logps import SequenceLogps
from hf_dpo.losses import (
    LOSS_TYPES,
    LOSSES,
    LossSpec,
    accepts_ranked,
    aot_loss,
    aot_unpaired_loss,
    apo_down_loss,
    apo_zero_loss,
    bco_pair_loss,
    discopop_loss,
    exo_pair_loss,
    f_divergence_scores,
    hinge_loss,
    ipo_loss,
    nca_pair_loss,
    needs_reference,
    plackett_luce_loss,
    preference_loss,
    robust_loss,
    sft_loss,
    sigmoid_loss,
    sigmoid_norm_loss,
    simpo_loss,
    sppo_hard_loss,
    validate_loss_options,
    wpo_weights,
)

LN2 = math.log(2.0)


def t(*values):
    return torch.tensor(values, dtype=torch.float64)


def close(actual, expected, atol=1e-6):
    torch.testing.assert_close(actual, torch.as_tensor(expected, dtype=actual.dtype), atol=atol, rtol=0)


def rows(logps, counts=None, token_logp_sums=None, log_sum_sq=None):
    """A by-row SequenceLogps from (B, K) values (token counts 1 unless given)."""
    logps = torch.as_tensor(logps, dtype=torch.float64)
    counts = torch.ones_like(logps) if counts is None else torch.as_tensor(counts, dtype=torch.float64)
    return SequenceLogps(
        logps=logps,
        token_counts=counts,
        logit_sums=torch.zeros_like(logps),
        token_logp_sums=logps
        if token_logp_sums is None
        else torch.as_tensor(token_logp_sums, dtype=torch.float64),
        log_sum_sq_prob_sums=None if log_sum_sq is None else torch.as_tensor(log_sum_sq, dtype=torch.float64),
    )


# ---------------------------------------------------------------------------------------------- hand values


def test_sigmoid_hand_values():
    """beta 0.1: h = [0, 10, 20, -10] -> -log s([0, 1, 2, -1]) = [0.693147, 0.313262, 0.126928, 1.313262]."""
    close(sigmoid_loss(t(0, 10, 20, -10), t(0, 0, 0, 0), beta=0.1), [0.693147, 0.313262, 0.126928, 1.313262])
    # only the difference matters
    close(sigmoid_loss(t(7.0), t(-3.0), beta=0.1), [0.313262])


def test_sigmoid_label_smoothing():
    """cDPO eps 0.1, beta 0.1, h 10: 0.9 * 0.313262 + 0.1 * 1.313262 = 0.413262."""
    close(sigmoid_loss(t(10.0), t(0.0), beta=0.1, label_smoothing=0.1), [0.413262])


def test_sigmoid_norm_hand_values_and_equal_lengths():
    """beta 1: chosen score -6 over 3 tokens (-2), rejected -12 over 4 tokens (-3): normalised h = 1 ->
    0.313262, where the unnormalised h = 6 would give -log s(6) = 0.002476. Equal lengths n: sigmoid at h/n."""
    close(sigmoid_norm_loss(t(-6.0), t(-12.0), t(3.0), t(4.0), beta=1.0), [0.313262])
    close(sigmoid_loss(t(-6.0), t(-12.0), beta=1.0), [0.002476])
    h, n = t(4.0, -2.0, 9.0), t(4.0, 2.0, 3.0)
    close(
        sigmoid_norm_loss(h, t(0, 0, 0), n, n, beta=0.5),
        sigmoid_loss(h / n, t(0, 0, 0), beta=0.5),
        atol=1e-12,
    )


def test_ipo_hand_values():
    """IPO beta 0.5 -> target 1/(2*0.5) = 1: h = [0, 1, 3] -> (h - 1)^2 = [1, 0, 4]; beta 0.1, h 0 -> 25."""
    close(ipo_loss(t(0, 1, 3), t(0, 0, 0), beta=0.5), [1.0, 0.0, 4.0])
    close(ipo_loss(t(0.0), t(0.0), beta=0.1), [25.0])


def test_hinge_hand_values():
    """SLiC beta 0.1: h = [0, 5, 10, 20, -10] -> relu(1 - 0.1 h) = [1, 0.5, 0, 0, 2]."""
    close(hinge_loss(t(0, 5, 10, 20, -10), t(0, 0, 0, 0, 0), beta=0.1), [1.0, 0.5, 0.0, 0.0, 2.0])


def test_robust_hand_values_and_eps_zero_is_sigmoid():
    """eps 0.1, beta 0.1, h 10: (0.9 * 0.313262 - 0.1 * 1.313262) / 0.8 = 0.150610 / 0.8 = 0.188262."""
    close(robust_loss(t(10.0), t(0.0), beta=0.1, label_smoothing=0.1), [0.188262])
    h = t(10.0, -3.0, 0.4)
    close(robust_loss(h, 0 * h, beta=0.1), sigmoid_loss(h, 0 * h, beta=0.1), atol=1e-12)
    with pytest.raises(ValueError, match="0.5"):
        robust_loss(h, h, label_smoothing=0.5)


def test_robust_is_unbiased_under_label_noise():
    """E over flips with rate eps of the robust loss equals the clean DPO loss (Chowdhury et al., Lemma 3.1)."""
    h, eps = t(-4.0, 0.5, 7.0), 0.2
    clean = sigmoid_loss(h, 0 * h, beta=0.3)
    kept = robust_loss(h, 0 * h, beta=0.3, label_smoothing=eps)
    flipped = robust_loss(-h, 0 * h, beta=0.3, label_smoothing=eps)
    close((1 - eps) * kept + eps * flipped, clean, atol=1e-12)


def test_exo_pair_hand_values():
    """eps 0.1, h 0: KL((1/2, 1/2) || (0.9, 0.1)) = 0.5 ln(0.5/0.9) + 0.5 ln(0.5/0.1) = -0.293893 + 0.804719
    = 0.510826. At beta h = ln 9 = 2.197225, s(beta h) = 0.9 = 1 - eps: the KL is 0."""
    close(exo_pair_loss(t(0.0), t(0.0), beta=0.1, label_smoothing=0.1), [0.510826])
    close(exo_pair_loss(t(math.log(9)), t(0.0), beta=1.0, label_smoothing=0.1), [0.0], atol=1e-12)
    with pytest.raises(ValueError, match="label_smoothing"):
        exo_pair_loss(t(0.0), t(0.0), label_smoothing=0.0)


def test_discopop_hand_values():
    """rho = beta h. rho 0: mix s(0) = 1/2 -> (ln 2 + e^0) / 2 = 0.846574. tau 0.05: rho 1 -> mix s(20) ~ 1,
    loss ~ e^-1 = 0.367879; rho -1 -> mix s(-20) ~ 0, loss ~ -log s(-1) = 1.313262 (both to 1e-6)."""
    close(
        discopop_loss(t(0.0, 10.0, -10.0), t(0.0, 0.0, 0.0), beta=0.1, tau=0.05),
        [0.846574, 0.367879, 1.313262],
    )


def test_discopop_is_not_monotone_near_zero():
    """d loss / d rho at rho = 0: -s'(0)/tau ln 2 - (1 - s(0))/2 + s'(0)/tau - 1/2 = (1 - ln 2) / (4 tau) - 3/4;
    tau 0.05: 0.306853 * 5 - 0.75 = 0.784264 > 0. The log-ratio modulated loss is non-convex (as its paper
    notes): at policy == reference it first lowers the margin, towards a local minimum at rho < 0."""
    chosen = torch.zeros(1, dtype=torch.float64, requires_grad=True)
    discopop_loss(chosen, t(0.0), beta=1.0, tau=0.05).sum().backward()
    assert chosen.grad.item() == pytest.approx(0.784264, abs=1e-6)


def test_nca_pair_hand_values():
    """r = 0: -log s(0) - 0.5 log s(0) - 0.5 log s(0) = 2 ln 2 = 1.386294. beta 0.1, log-ratios 10 / -10
    (r_w = 1, r_l = -1): 0.313262 + 0.5 * 1.313262 + 0.5 * 0.313262 = 1.126524."""
    close(nca_pair_loss(t(0.0, 10.0), t(0.0, -10.0), beta=0.1), [1.386294, 1.126524])


def test_bco_pair_hand_values():
    """r = 0: 2 ln 2 = 1.386294. r_w = 1, r_l = -1: -log s(1) - log s(1) = 0.626523."""
    close(bco_pair_loss(t(0.0, 10.0), t(0.0, -10.0), beta=0.1), [1.386294, 0.626523])


def test_sppo_hard_hand_values():
    """beta 0.5 -> targets +-1/(2*0.5) = +-1: u = (0, 0) -> 1 + 1 = 2; (1, -1) -> 0; (3, 1) -> 4 + 4 = 8."""
    close(sppo_hard_loss(t(0, 1, 3), t(0, -1, 1), beta=0.5), [2.0, 0.0, 8.0])


def test_aot_sorts_margins_over_the_batch():
    """Policy margins [3, -1, 0] sort to [-1, 0, 3], reference margins [0, 2, -2] to [-2, 0, 2]: quantile
    differences [1, 0, 1], beta 1 -> [0.313262, 0.693147, 0.313262]. Paired DPO would see h = [3, -3, 2]."""
    close(aot_loss(t(3, -1, 0), t(0, 2, -2), beta=1.0), [0.313262, 0.693147, 0.313262])


def test_aot_with_one_pair_is_sigmoid():
    """B = 1: sorting changes nothing, so aot is the sigmoid loss on h = policy margin - reference margin."""
    close(aot_loss(t(2.5), t(-1.5), beta=0.25), sigmoid_loss(t(2.5), t(-1.5), beta=0.25), atol=1e-12)


def test_aot_unpaired_hand_values():
    """Chosen log-ratios [2, -1] sort to [-1, 2], rejected [-3, 1] to [-3, 1]: differences [2, 1]; beta 0.5 ->
    [-log s(1), -log s(0.5)] = [0.313262, 0.474077]."""
    close(aot_unpaired_loss(t(2, -1), t(-3, 1), beta=0.5), [0.313262, 0.474077])


def test_apo_hand_values():
    """u = 0: apo_zero (1 - 1/2) + 1/2 = 1; apo_down 1/2 + (1 - 1/2) = 1. beta 0.1, u_w 10, u_l -10:
    apo_zero (1 - s(1)) + s(-1) = 0.268941 * 2 = 0.537883; apo_down s(1) + 1 - s(2) = 0.731059 + 0.119203 =
    0.850261."""
    close(apo_zero_loss(t(0.0, 10.0), t(0.0, -10.0), beta=0.1), [1.0, 0.537883])
    close(apo_down_loss(t(0.0, 10.0), t(0.0, -10.0), beta=0.1), [1.0, 0.850261])


def test_simpo_hand_values():
    """beta 2, gamma 0.5. Equal mean log-probs: -log s(-0.5) = 0.974077. Chosen -6 over 3 tokens (-2),
    rejected -12 over 4 (-3): 2 * 1 - 0.5 = 1.5 -> 0.201413. gamma 0 and one token each: the reference-free
    sigmoid loss."""
    close(
        simpo_loss(t(-4.0, -6.0), t(-8.0, -12.0), t(2.0, 3.0), t(4.0, 4.0), beta=2.0, gamma=0.5),
        [0.974077, 0.201413],
    )
    one = t(1.0, 1.0)
    close(
        simpo_loss(t(-1.0, 3.0), t(-2.0, 0.0), one, one, beta=0.7, gamma=0.0),
        sigmoid_loss(t(-1.0, 3.0), t(-2.0, 0.0), beta=0.7),
        atol=1e-12,
    )


def test_sft_is_a_per_token_mean_over_the_batch():
    """Chosen log-prob sums [-3, -5] over [1, 3] tokens: (3 + 5) / 4 = 2 for every row (not (3 + 5/3) / 2)."""
    close(sft_loss(t(-3.0, -5.0), t(1.0, 3.0)), [2.0, 2.0])


def test_plackett_luce_hand_value_three_responses():
    """beta 1, u = [2, 1, 0]: -[(2 - log(e^2+e^1+e^0)) + (1 - log(e^1+e^0)) + 0] = 0.407606 + 0.313262 = 0.720868."""
    close(plackett_luce_loss(t(2.0, 1.0, 0.0)[None], beta=1.0), [0.720868])


def test_plackett_luce_with_two_responses_is_sigmoid():
    torch.manual_seed(0)
    u = torch.randn(6, 2, dtype=torch.float64) * 5
    close(plackett_luce_loss(u, beta=0.2), sigmoid_loss(u[:, 0], u[:, 1], beta=0.2), atol=1e-12)


def test_plackett_luce_matches_loop_and_is_stable():
    torch.manual_seed(1)
    u = torch.randn(4, 5, dtype=torch.float64) * 300  # large scores: a naive exp would overflow
    s = 0.5 * u
    expected = torch.stack([-sum(s[b, k] - torch.logsumexp(s[b, k:], 0) for k in range(5)) for b in range(4)])
    close(plackett_luce_loss(u, beta=0.5), expected, atol=1e-9)


def test_plackett_luce_mask_drops_padding_responses():
    """A row with 2 real responses and one padding response gives the K=2 loss."""
    u = t(1.0, -2.0, 55.0)[None]
    mask = torch.tensor([[True, True, False]])
    close(
        plackett_luce_loss(u, beta=0.1, response_mask=mask),
        plackett_luce_loss(u[:, :2], beta=0.1),
        atol=1e-12,
    )


def test_f_divergence_scores_hand_values():
    """u = pi/pi_ref. forward_kl 1 - 1/u: u = 2 -> 0.5, u = 1/2 -> -1. js log(2u/(1+u)): u = 1 -> 0, u = 3 ->
    log 1.5 = 0.405465. alpha 0.5, (1 - u^-0.5)/0.5: u = 4 -> 1, u = 1/4 -> -2. reverse_kl: log u."""
    log_u = t(math.log(2), -math.log(2))
    close(f_divergence_scores(log_u, "forward_kl"), [0.5, -1.0], atol=1e-12)
    close(f_divergence_scores(t(0.0, math.log(3)), "js_divergence"), [0.0, 0.405465])
    close(f_divergence_scores(t(math.log(4), -math.log(4)), "alpha_divergence", 0.5), [1.0, -2.0], atol=1e-12)
    close(f_divergence_scores(log_u, "reverse_kl"), log_u, atol=0)
    # alpha -> 0 is reverse KL, alpha -> 1 forward KL
    close(f_divergence_scores(log_u, "alpha_divergence", 1e-7), log_u, atol=1e-6)
    close(f_divergence_scores(log_u, "alpha_divergence", 1 - 1e-7), [0.5, -1.0], atol=1e-6)


def test_sigmoid_with_forward_kl_through_preference_loss():
    """forward_kl, log-ratios ln 2 (chosen) and -ln 2 (rejected): scores 0.5 and -1, h = 1.5, beta 1 ->
    -log s(1.5) = 0.201413. Rewards stay beta * log-ratio: [ln 2, -ln 2]."""
    spec = LossSpec(loss_types=("sigmoid",), beta=1.0, f_divergence_type="forward_kl")
    losses, rewards, _ = preference_loss(
        spec, rows([[math.log(2) - 1, -math.log(2) - 1]]), t(-1.0, -1.0)[None]
    )
    close(losses, [0.201413])
    close(rewards, [[LN2, -LN2]], atol=1e-12)


def test_wpo_weights_hand_value():
    """Token log-probs summing to -2 over 2 tokens, log sum p^2 summing to -4: exp((-2 + 4) / 2) = e.
    A uniform next-token distribution over V: log p = log sum p^2 = -ln V per token -> weight 1."""
    close(wpo_weights(t(-2.0), t(-4.0), t(2.0)), [math.e], atol=1e-12)
    v = 50
    close(wpo_weights(t(-3 * math.log(v)), t(-3 * math.log(v)), t(3.0)), [1.0], atol=1e-12)


def test_wpo_weights_multiply_the_pair_loss():
    """Policy == reference (h = 0), chosen weight e (as above), rejected weight exp((-3 + 3) / 3) = 1:
    loss = ln 2 * e * 1 = 1.884169."""
    spec = LossSpec(loss_types=("sigmoid",), use_weighting=True)
    policy = rows([[-2.0, -3.0]], counts=[[2.0, 3.0]], log_sum_sq=[[-4.0, -3.0]])
    losses, _, metrics = preference_loss(spec, policy, t(-2.0, -3.0)[None])
    close(losses, [1.884169])
    close(metrics["wpo/weight"], [math.e], atol=1e-12)


# ---------------------------------------------------------------------------------------------- combination


def test_combination_is_the_weighted_sum():
    """sigmoid + 0.2 sft, beta 0.1. Row 0: log-ratios (-1 + 3, -5 + 5) = (2, 0), h = 2 -> -log s(0.2) =
    0.598139; row 1: h = 0 -> ln 2. sft: chosen sums [-1, -3] over [1, 3] tokens -> 4 / 4 = 1.
    Totals: [0.598139 + 0.2, 0.693147 + 0.2]; rewards 0.1 * log-ratios."""
    spec = LossSpec(loss_types=("sigmoid", "sft"), loss_weights=(1.0, 0.2))
    policy = rows([[-1.0, -5.0], [-3.0, -4.0]], counts=[[1.0, 2.0], [3.0, 2.0]])
    reference = t(-3.0, -5.0, -3.0, -4.0).view(2, 2)
    losses, rewards, metrics = preference_loss(spec, policy, reference)
    close(losses, [0.598139 + 0.2, LN2 + 0.2])
    close(metrics["loss/sigmoid"], [0.598139, LN2])
    close(metrics["loss/sft"], [1.0, 1.0], atol=1e-12)
    close(rewards, [[0.2, 0.0], [0.0, 0.0]], atol=1e-12)


def test_sft_alone_needs_no_reference_and_reads_plain_sums():
    """sft reads token_logp_sums (plain sums), not logps (which may be means or LD-weighted)."""
    spec = LossSpec(loss_types=("sft",))
    policy = rows([[-0.5, -9.0]], counts=[[4.0, 2.0]], token_logp_sums=[[-2.0, -18.0]])
    losses, rewards, metrics = preference_loss(spec, policy, None)
    close(losses, [0.5], atol=1e-12)
    close(rewards, [[-0.05, -0.9]], atol=1e-12)  # beta * policy log-probs: no reference
    assert metrics == {}


def test_simpo_alone_needs_no_reference():
    spec = LossSpec(loss_types=("simpo",), beta=2.0)
    losses, _, _ = preference_loss(spec, rows([[-4.0, -8.0]], counts=[[2.0, 4.0]]), None)
    close(losses, [0.974077])


def test_missing_reference_is_an_error():
    with pytest.raises(ValueError, match="needs reference log-probs"):
        preference_loss(LossSpec(), rows([[0.0, 0.0]]), None)


def test_ranked_rows_only_for_ranked_losses():
    spec = LossSpec(loss_types=("plackett_luce", "sft"))
    losses, rewards, _ = preference_loss(
        spec, rows([[2.0, 1.0, 0.0]]), torch.zeros(1, 3, dtype=torch.float64)
    )
    # PL at beta 0.1 on u = [2, 1, 0], plus sft: chosen sum +2 over 1 token -> NLL -2
    pl = plackett_luce_loss(t(2.0, 1.0, 0.0)[None], beta=0.1)
    close(losses, pl - 2.0, atol=1e-12)
    assert rewards.shape == (1, 3)
    with pytest.raises(ValueError, match="'sigmoid' needs pairs"):
        preference_loss(LossSpec(), rows([[0.0, 0.0, 0.0]]), torch.zeros(1, 3, dtype=torch.float64))


def test_needs_reference_and_accepts_ranked():
    assert needs_reference(["sigmoid"]) and needs_reference("sigmoid")
    assert not needs_reference(["sigmoid"], reference_free=True)
    assert (
        not needs_reference(["simpo"])
        and not needs_reference(["sft"])
        and not needs_reference(["simpo", "sft"])
    )
    assert needs_reference(["simpo", "sigmoid"]) and needs_reference(["sft", "aot"])
    assert (
        accepts_ranked("plackett_luce")
        and accepts_ranked(["plackett_luce", "sft"])
        and accepts_ranked(["sft"])
    )
    assert not accepts_ranked(["plackett_luce", "sigmoid"]) and not accepts_ranked("nope")


def test_spec_from_config_takes_a_plain_string():
    from types import SimpleNamespace

    args = SimpleNamespace(
        loss_type="ipo",
        loss_weights=None,
        beta=0.3,
        label_smoothing=0.0,
        reference_free=False,
        f_divergence_type="reverse_kl",
        f_alpha_divergence_coef=0.5,
        use_weighting=False,
        discopop_tau=0.05,
        simpo_gamma=0.5,
    )
    spec = LossSpec.from_config(args)
    assert spec.loss_types == ("ipo",) and spec.weights == (1.0,) and spec.needs_reference


# ---------------------------------------------------------------------------------------------- gradients


def _spec_for(name: str, **extra) -> LossSpec:
    options = {"beta": 0.7}
    if name in ("sigmoid", "sigmoid_norm", "robust", "aot", "aot_unpaired", "simpo"):
        options["label_smoothing"] = 0.1
    if name == "exo_pair":
        options["label_smoothing"] = 1e-3
    options.update(extra)
    return LossSpec(loss_types=(name,), **options)


@pytest.mark.parametrize("name", [n for n in LOSS_TYPES])
def test_gradcheck_float64(name):
    """Analytic gradients of every loss agree with finite differences (float64), through preference_loss."""
    torch.manual_seed(3)
    k = 3 if name == "plackett_luce" else 2
    start = torch.randn(5, k, dtype=torch.float64)
    reference = torch.randn(5, k, dtype=torch.float64)
    counts = torch.randint(1, 6, (5, k)).double()
    spec = _spec_for(name)

    def fn(policy):
        seq = SequenceLogps(policy, counts, torch.zeros_like(policy), token_logp_sums=policy)
        return preference_loss(spec, seq, reference if spec.needs_reference else None)[0]

    assert torch.autograd.gradcheck(fn, (start.requires_grad_(True),), eps=1e-6, atol=1e-6)


@pytest.mark.parametrize("divergence", ["forward_kl", "js_divergence", "alpha_divergence"])
@pytest.mark.parametrize("name", [n for n, info in LOSSES.items() if info.f_divergence])
def test_gradcheck_with_f_divergences(name, divergence):
    torch.manual_seed(4)
    k = 3 if name == "plackett_luce" else 2
    start = torch.randn(4, k, dtype=torch.float64) * 0.5
    reference = torch.randn(4, k, dtype=torch.float64) * 0.5
    counts = torch.randint(1, 6, (4, k)).double()
    spec = _spec_for(
        name,
        f_divergence_type=divergence,
        f_alpha_divergence_coef=0.3 if divergence == "alpha_divergence" else 0.5,
    )

    def fn(policy):
        return preference_loss(spec, SequenceLogps(policy, counts, torch.zeros_like(policy)), reference)[0]

    assert torch.autograd.gradcheck(fn, (start.requires_grad_(True),), eps=1e-6, atol=1e-6)


@pytest.mark.parametrize(
    "name",
    [
        "sigmoid",
        "sigmoid_norm",
        "ipo",
        "hinge",
        "robust",
        "exo_pair",
        "bco_pair",
        "nca_pair",
        "sppo_hard",
        "apo_zero",
        "simpo",
        "plackett_luce",
    ],
)
def test_gradient_raises_chosen_and_lowers_rejected(name):
    """At policy == reference the gradient of the mean loss pushes the chosen log-prob up, the rejected one
    down. (apo_down lowers both by design; aot compares quantiles; sft ignores the rejected; discopop, see
    its own test.)"""
    policy = torch.tensor([[-3.0, -3.0], [-7.0, -7.0]], dtype=torch.float64, requires_grad=True)
    spec = _spec_for(name)
    counts = torch.full((2, 2), 2.0, dtype=torch.float64)
    losses, _, _ = preference_loss(spec, SequenceLogps(policy, counts, 0 * counts), policy.detach().clone())
    losses.mean().backward()
    assert (policy.grad[:, 0] < 0).all() and (policy.grad[:, 1] > 0).all()


def test_sigmoid_gradient_matches_paper_eq8():
    """Eq. 8: d loss / d log pi(y_w) = -beta s(-beta h); beta 0.5, h = (-3 + 4) - (-5 + 4) = 2 -> -0.5 s(-1) =
    -0.134471."""
    policy = torch.tensor([[-3.0, -5.0]], dtype=torch.float64, requires_grad=True)
    losses, _, _ = preference_loss(
        LossSpec(beta=0.5), SequenceLogps(policy, torch.ones(1, 2), torch.zeros(1, 2)), t(-4.0, -4.0)[None]
    )
    losses.sum().backward()
    assert policy.grad[0, 0].item() == pytest.approx(-0.134471, abs=1e-6)


# ---------------------------------------------------------------------------------------------- refusals


REFUSALS = [
    (dict(loss_type=["hinge"], label_smoothing=0.1), ["label_smoothing", "hinge"]),
    (dict(loss_type=["ipo"], label_smoothing=0.1), ["label_smoothing", "ipo"]),
    (dict(loss_type=["plackett_luce"], label_smoothing=0.1), ["label_smoothing", "plackett_luce"]),
    (dict(loss_type=["discopop"], label_smoothing=0.1), ["label_smoothing", "discopop"]),
    (dict(loss_type=["nca_pair"], f_divergence_type="js_divergence"), ["f_divergence_type", "nca_pair"]),
    (dict(loss_type=["sigmoid", "aot"], f_divergence_type="forward_kl"), ["f_divergence_type", "aot"]),
    (dict(loss_type=["simpo"], f_divergence_type="forward_kl"), ["f_divergence_type", "simpo"]),
    (dict(loss_type=["sft"], f_divergence_type="forward_kl"), ["f_divergence_type", "sft"]),
    (
        dict(loss_type=["sigmoid"], f_divergence_type="forward_kl", reference_free=True),
        ["f_divergence_type", "reference_free"],
    ),
    (dict(loss_type=["sigmoid"], f_divergence_type="chi2"), ["f_divergence_type", "chi2"]),
    (dict(loss_type=["sigmoid"], f_alpha_divergence_coef=0.3), ["f_alpha_divergence_coef", "reverse_kl"]),
    (
        dict(loss_type=["sigmoid"], f_divergence_type="alpha_divergence", f_alpha_divergence_coef=1.0),
        ["f_alpha_divergence_coef", "(0, 1)"],
    ),
    (dict(loss_type=["sigmoid"], simpo_gamma=1.0), ["simpo_gamma", "sigmoid", "simpo"]),
    (dict(loss_type=["sigmoid", "sft"], discopop_tau=0.1), ["discopop_tau", "sigmoid", "discopop"]),
    (dict(loss_type=["discopop"], discopop_tau=0.0), ["discopop_tau", "> 0"]),
    (dict(loss_type=["sigmoid", "sft"], loss_weights=[1.0]), ["loss_weights", "1 entries", "2 losses"]),
    (dict(loss_type=["sigmoid", "sft"], loss_weights=[1.0, -0.2]), ["loss_weights", ">= 0"]),
    (dict(loss_type=["exo_pair"]), ["exo_pair", "label_smoothing > 0"]),
    (dict(loss_type=["sigmoid_norm"], logp_reduction="mean"), ["sigmoid_norm", "logp_reduction='mean'"]),
    (dict(loss_type=["simpo", "sft"], logp_reduction="mean"), ["simpo", "logp_reduction='mean'"]),
    (dict(loss_type=["sigmoid"], ld_alpha=0.5, logp_reduction="mean"), ["ld_alpha", "logp_reduction='mean'"]),
    (dict(loss_type=["sft"], ld_alpha=0.5), ["ld_alpha", "sft"]),
    (dict(loss_type=["sigmoid"], ld_alpha=1.5), ["ld_alpha", "[0, 1]"]),
    (dict(loss_type=["aot_unpaired"], use_weighting=True), ["use_weighting", "aot_unpaired"]),
    (dict(loss_type=["simpo"], reference_free=True), ["reference_free", "simpo"]),
    (dict(loss_type=["simpo"], precompute_ref_log_probs=True), ["precompute_ref_log_probs", "simpo"]),
    (
        dict(loss_type=["sigmoid"], reference_free=True, precompute_ref_log_probs=True),
        ["precompute_ref_log_probs", "reference_free"],
    ),
    (dict(loss_type=["sigmoid", "sigmoid"]), ["sigmoid", "twice"]),
    (dict(loss_type=["dpo"]), ["unknown loss_type", "dpo"]),
    (dict(loss_type=[]), ["loss_type", "empty"]),
    (dict(loss_type=["sigmoid"], label_smoothing=0.5), ["label_smoothing", "[0, 0.5)"]),
]


@pytest.mark.parametrize(("options", "fragments"), REFUSALS, ids=[str(i) for i in range(len(REFUSALS))])
def test_ignored_or_invalid_options_are_refused_in_one_line(options, fragments):
    options = dict(options)
    with pytest.raises(ValueError) as caught:
        validate_loss_options(options.pop("loss_type"), options.pop("loss_weights", None), **options)
    message = str(caught.value)
    assert "\n" not in message
    for fragment in fragments:
        assert fragment in message, (fragment, message)


ACCEPTED = [
    dict(loss_type=["sigmoid"], label_smoothing=0.1),  # cDPO
    dict(loss_type=["ipo", "robust"], label_smoothing=0.1),  # robust reads it
    dict(loss_type=["sigmoid", "sft"], loss_weights=[1.0, 0.2], f_divergence_type="js_divergence"),
    dict(loss_type=["plackett_luce"], f_divergence_type="alpha_divergence", f_alpha_divergence_coef=0.3),
    dict(loss_type=["simpo"], simpo_gamma=1.0, label_smoothing=0.1),
    dict(loss_type=["discopop"], discopop_tau=0.1),
    dict(loss_type=["exo_pair"], label_smoothing=1e-3),
    dict(loss_type=["sigmoid_norm"], ld_alpha=0.5),
    dict(loss_type=["ipo"], logp_reduction="mean"),
    dict(loss_type=["sft", "sigmoid"], use_weighting=True, ld_alpha=0.0),
    dict(loss_type=["aot"], reference_free=True),
    dict(loss_type="sigmoid"),
]


@pytest.mark.parametrize("options", ACCEPTED, ids=[str(i) for i in range(len(ACCEPTED))])
def test_options_a_chosen_loss_reads_are_accepted(options):
    options = dict(options)
    names = validate_loss_options(options.pop("loss_type"), options.pop("loss_weights", None), **options)
    assert isinstance(names, list) and all(name in LOSSES for name in names)


def test_dpo_config_refuses_and_normalises(tmp_path):
    from hf_dpo.config import DPOConfig

    common = dict(output_dir=str(tmp_path), report_to=[], use_cpu=True)
    assert DPOConfig(loss_type="ipo", **common).loss_type == ["ipo"]
    with pytest.raises(ValueError, match=r"label_smoothing=0.1 is ignored by loss_type \['hinge'\]"):
        DPOConfig(loss_type="hinge", label_smoothing=0.1, **common)
    with pytest.raises(ValueError, match="loss_weights has 3 entries for 2 losses"):
        DPOConfig(loss_type=["sigmoid", "sft"], loss_weights=[1.0, 0.2, 3.0], **common)


def test_flags_and_yaml_lists_parse(tmp_path):
    """`--loss_type sigmoid sft --loss_weights 1.0 0.2` through HfArgumentParser; one value stays a list."""
    from transformers import HfArgumentParser

    from hf_dpo.config import DPOConfig

    parser = HfArgumentParser(DPOConfig)
    base = ["--output_dir", str(tmp_path), "--report_to", "none", "--use_cpu", "true"]
    (args,) = parser.parse_args_into_dataclasses(
        [*base, "--loss_type", "sigmoid", "sft", "--loss_weights", "1.0", "0.2"]
    )
    assert args.loss_type == ["sigmoid", "sft"] and args.loss_weights == [1.0, 0.2]
    (args,) = parser.parse_args_into_dataclasses([*base, "--loss_type", "simpo", "--simpo_gamma", "0.8"])
    assert args.loss_type == ["simpo"] and args.simpo_gamma == 0.8
    (args,) = parser.parse_dict({"output_dir": str(tmp_path), "report_to": [], "loss_type": "apo_zero"})
    assert args.loss_type == ["apo_zero"]


# ---------------------------------------------------------------------------------------------- bandits


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
        losses = sigmoid_loss(log_pi[a] - log_ref[a], log_pi[b] - log_ref[b], beta=beta)
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
        return plackett_luce_loss(log_pi[rankings] - log_ref[rankings], beta=beta).mean()

    log_pi = torch.log_softmax(_optimise(loss, theta), 0)
    implicit = beta * (log_pi - log_ref)
    corr = torch.corrcoef(torch.stack([implicit, reward]))[0, 1].item()
    assert corr > 0.99


# ---------------------------------------------------------------------------------------------- end to end
# Every loss through DPOTrainer on the tiny 4-bit model with a fresh LoRA (policy == reference at step 0).

E2E_OPTIONS = {
    "exo_pair": {"label_smoothing": 1e-3},
    "simpo": {"beta": 2.0},
}
# Closed forms at h = 0 (beta 0.1): the first logged loss is the loss before the first update.
STEP0 = {
    "sigmoid": LN2,
    "sigmoid_norm": LN2,
    "ipo": 25.0,  # (0 - 1/(2 * 0.1))^2
    "hinge": 1.0,
    "robust": LN2,
    "exo_pair": 2.761231,  # 0.5 ln(0.5 / 0.999) + 0.5 ln(0.5 / 0.001) = -0.346074 + 3.107304
    "discopop": 0.846574,
    "nca_pair": 2 * LN2,
    "bco_pair": 2 * LN2,
    "sppo_hard": 50.0,  # 2 * (1/(2 * 0.1))^2
    "aot": LN2,
    "aot_unpaired": LN2,
    "apo_zero": 1.0,
    "apo_down": 1.0,
    "plackett_luce": LN2,
}


@pytest.fixture(scope="module")
def tiny_loaded(tiny_model_path):
    """The tiny 4-bit model with a fresh LoRA, loaded once for this module, and its initial LoRA weights."""
    from trainer_helpers import load, lora_state

    loaded = load(tiny_model_path)
    return loaded, lora_state(loaded.model)


def _e2e_trainer(tiny_loaded, tmp_path, n_rows=4, **config):
    """A DPOTrainer on 4 pairs (one full batch), the LoRA reset to its initial weights (B = 0)."""
    from trainer_helpers import dpo_config, tokenised_rows

    from hf_dpo.trainer import DPOTrainer

    loaded, initial = tiny_loaded
    with torch.no_grad():
        for name, param in loaded.model.named_parameters():
            if name in initial:
                param.copy_(initial[name])
    rows = tokenised_rows(loaded.tokenizer, n=n_rows)
    args = dpo_config(
        tmp_path, per_device_train_batch_size=n_rows, per_device_eval_batch_size=n_rows, **config
    )
    return DPOTrainer(
        model=loaded.model,
        args=args,
        train_dataset=rows,
        eval_dataset=rows,
        processing_class=loaded.tokenizer,
    )


def _one_batch(trainer):
    from hf_dpo.collator import PreferenceCollator

    collator = PreferenceCollator(pad_token_id=trainer.processing_class.pad_token_id)
    dataset = trainer.train_dataset
    return trainer._prepare_inputs(collator([dataset[i] for i in range(len(dataset))]))


@pytest.mark.parametrize("name", LOSS_TYPES)
def test_each_loss_trains_end_to_end(tiny_loaded, tmp_path, name):
    """4 steps on one full batch of 4 pairs: finite, the closed-form value at step 0, lower at the end."""
    trainer = _e2e_trainer(tiny_loaded, tmp_path, loss_type=name, max_steps=4, **E2E_OPTIONS.get(name, {}))
    trainer.train()
    logs = [h for h in trainer.state.log_history if "loss" in h]
    losses = [h["loss"] for h in logs]
    assert len(losses) == 4 and all(math.isfinite(x) for x in losses), losses
    if name in STEP0:
        assert losses[0] == pytest.approx(STEP0[name], abs=1e-4)
    assert losses[-1] < losses[0], losses
    assert 0 < logs[-1]["entropy"] < math.log(trainer.model.config.vocab_size)
    assert 0 <= logs[-1]["mean_token_accuracy"] <= 1


@pytest.mark.parametrize("loss_type", [["simpo"], ["sft"], ["simpo", "sft"]])
def test_reference_free_losses_run_no_reference_forward(tiny_loaded, tmp_path, loss_type):
    trainer = _e2e_trainer(tiny_loaded, tmp_path, loss_type=loss_type)
    calls = []
    handle = trainer.model.get_base_model().register_forward_hook(
        lambda *_: calls.append(torch.is_grad_enabled())
    )
    trainer.model.train()
    trainer.compute_loss(trainer.model, _one_batch(trainer))
    handle.remove()
    assert calls == [True]  # the policy forward only
    assert trainer.reference_logps(trainer.model, _one_batch(trainer)) is None


def test_sft_alone_equals_the_plain_causal_lm_loss(tiny_loaded, tmp_path):
    """After two sft steps (so that LoRA is not zero), compute_loss equals transformers' own causal-LM loss
    on the chosen rows with every non-completion label set to -100, to 1e-6."""
    trainer = _e2e_trainer(tiny_loaded, tmp_path, loss_type="sft", max_steps=2)
    trainer.train()
    batch = _one_batch(trainer)
    trainer.model.train()
    chosen = slice(0, batch["response_mask"].shape[0])  # completion-major: the first B rows are the chosen
    labels = batch["input_ids"][chosen].masked_fill(batch["completion_mask"][chosen] == 0, -100)
    with torch.no_grad():
        ours = trainer.compute_loss(trainer.model, batch)
        plain = trainer.model(
            input_ids=batch["input_ids"][chosen],
            attention_mask=batch["attention_mask"][chosen],
            labels=labels,
        ).loss
    assert abs(ours.item() - plain.item()) < 1e-6, (ours.item(), plain.item())


def test_sigmoid_plus_sft_is_the_weighted_sum_end_to_end(tiny_loaded, tmp_path):
    """loss_type [sigmoid, sft] with weights [1, 0.2] at step 0: ln 2 + 0.2 * (the sft loss alone)."""
    combined = _e2e_trainer(
        tiny_loaded, tmp_path / "a", loss_type=["sigmoid", "sft"], loss_weights=[1.0, 0.2]
    )
    alone = _e2e_trainer(tiny_loaded, tmp_path / "b", loss_type=["sft"])
    for trainer in (combined, alone):
        trainer.model.train()
    with torch.no_grad():
        total = combined.compute_loss(combined.model, _one_batch(combined)).item()
        sft = alone.compute_loss(alone.model, _one_batch(alone)).item()
    assert total == pytest.approx(LN2 + 0.2 * sft, abs=1e-6)
    logs = combined.evaluate()
    assert logs["eval_loss/sigmoid"] == pytest.approx(LN2, abs=1e-6)
    assert logs["eval_loss/sft"] == pytest.approx(sft, abs=1e-5)


def _full_logits_stats(trainer, batch):
    """Per-token statistics from the full [rows, tokens, vocab] logits of a plain forward (the definition)."""
    with torch.no_grad():
        logits = trainer.model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits
    logp = torch.log_softmax(logits[:, :-1].double(), -1)
    mask = batch["completion_mask"][:, 1:].bool()
    targets = batch["input_ids"][:, 1:]
    token = logp.gather(-1, targets[..., None]).squeeze(-1)
    entropy = -(logp.exp() * logp).sum(-1)
    top1 = (logits[:, :-1].argmax(-1) == targets).double()
    log_sum_sq = torch.logsumexp(2 * logp, -1)
    return mask, token, entropy, top1, log_sum_sq


def test_entropy_and_token_accuracy_match_full_logits(tiny_loaded, tmp_path):
    """After 8 steps of sigmoid + sft (the chosen completions get likely), the eval metrics equal the
    per-token means from the full logits: entropy over chosen and rejected tokens, top-1 on chosen ones."""
    trainer = _e2e_trainer(
        tiny_loaded, tmp_path, loss_type=["sigmoid", "sft"], max_steps=8, learning_rate=1e-2
    )
    trainer.train()
    metrics = trainer.evaluate()
    trainer.model.eval()
    batch = _one_batch(trainer)
    mask, _, entropy, top1, _ = _full_logits_stats(trainer, batch)
    rows = batch["response_mask"].shape[0]
    chosen_mask = mask[:rows]
    expected_entropy = (entropy * mask).sum() / mask.sum()
    expected_accuracy = (top1[:rows] * chosen_mask).sum() / chosen_mask.sum()
    assert expected_accuracy > 0  # the check below is not 0 == 0
    assert metrics["eval_entropy"] == pytest.approx(expected_entropy.item(), abs=1e-5)
    assert metrics["eval_mean_token_accuracy"] == pytest.approx(expected_accuracy.item(), abs=1e-6)


def test_wpo_weights_from_the_fused_head_match_full_logits(tiny_loaded, tmp_path):
    """use_weighting at step 0 (h = 0): loss = ln 2 * mean over pairs of w(y_w) w(y_l), with
    w = exp(mean_t [log p(y_t) - log sum_v p_v^2]) computed here from the full logits."""
    trainer = _e2e_trainer(tiny_loaded, tmp_path, use_weighting=True, max_steps=2)
    trainer.model.train()
    batch = _one_batch(trainer)
    with torch.no_grad():
        loss = trainer.compute_loss(trainer.model, batch).item()
    mask, token, _, _, log_sum_sq = _full_logits_stats(trainer, batch)
    weights = torch.exp(((token - log_sum_sq) * mask).sum(-1) / mask.sum(-1))
    rows = batch["response_mask"].shape[0]
    expected = (LN2 * weights[:rows] * weights[rows:]).mean().item()
    assert abs(expected - LN2) > 1e-2  # the weights are not all 1, so the check below sees them
    assert loss == pytest.approx(expected, rel=1e-5)
    trainer.train()
    assert all(math.isfinite(h["loss"]) for h in trainer.state.log_history if "loss" in h)


def test_ld_alpha_weights_policy_and_reference_alike(tiny_loaded, tmp_path, monkeypatch):
    """ld_alpha 0.3: the reference log-probs equal sum_t w_t log p(y_t) from the full logits, w_t = 1 up to
    the shorter completion of the pair and 0.3 after; so do the policy's (policy == reference at step 0).
    The precomputed-reference cache key changes with ld_alpha."""
    from hf_dpo.reference_cache import reference_cache_key

    trainer = _e2e_trainer(tiny_loaded, tmp_path, ld_alpha=0.3, max_steps=2)
    trainer.model.train()
    batch = _one_batch(trainer)
    mask, token, _, _, _ = _full_logits_stats(trainer, batch)
    rows = batch["response_mask"].shape[0]
    lengths = mask.sum(-1)
    shared = torch.minimum(lengths[:rows], lengths[rows:]).repeat(2)
    position = mask.cumsum(-1)  # 1-based position within the completion
    weights = torch.where(position <= shared[:, None], 1.0, 0.3)
    expected = ((token * mask * weights).sum(-1)).view(2, rows).t()
    reference = trainer.reference_logps(trainer.model, batch)
    torch.testing.assert_close(reference.double(), expected, atol=1e-4, rtol=0)
    with torch.no_grad():
        policy = trainer.sequence_logps(trainer.model, batch).by_row(rows).logps
    torch.testing.assert_close(policy.double(), expected, atol=1e-4, rtol=0)
    assert (lengths[:rows] != lengths[rows:]).any()  # some pair has a tail to weigh
    trainer.train()
    assert all(math.isfinite(h["loss"]) for h in trainer.state.log_history if "loss" in h)

    key = reference_cache_key(trainer, trainer.train_dataset)
    monkeypatch.setattr(trainer.args, "ld_alpha", None)
    assert reference_cache_key(trainer, trainer.train_dataset) != key


def test_gradcheck_with_wpo_weights_and_a_combination():
    """WPO weights are detached: with the statistics they come from held fixed, the gradient of a weighted
    three-loss mix matches finite differences."""
    torch.manual_seed(5)
    start = torch.randn(4, 2, dtype=torch.float64)
    reference = torch.randn(4, 2, dtype=torch.float64)
    counts = torch.randint(1, 6, (4, 2)).double()
    token_sums = -torch.rand(4, 2, dtype=torch.float64) * counts
    log_sum_sq = -torch.rand(4, 2, dtype=torch.float64) * counts
    spec = LossSpec(
        loss_types=("sigmoid", "bco_pair", "nca_pair"), loss_weights=(1.0, 0.5, 0.2), use_weighting=True
    )

    def fn(policy):
        seq = SequenceLogps(
            policy, counts, 0 * counts, token_logp_sums=token_sums, log_sum_sq_prob_sums=log_sum_sq
        )
        return preference_loss(spec, seq, reference)[0]

    assert torch.autograd.gradcheck(fn, (start.requires_grad_(True),), eps=1e-6, atol=1e-6)
