"""Preference losses on per-sequence log-probs: pure functions, combined by name and weight.

Layout. A batch holds B prompts with K responses each. Per-sequence values are (B, K) tensors whose column
0 is the chosen (best) response and columns 1.. the rejected ones, best first; K = 2 for pairs. The loss
functions below take the (B,) columns they need and return per-prompt losses of shape (B,).

Log-ratios and scores. The log-ratio of a response is log pi(y|x) - log pi_ref(y|x), the reference term
taken as 0 with ``reference_free=True`` or when no chosen loss needs a reference. The losses built on the
chosen-minus-rejected difference take *scores*: the log-ratios themselves (reverse KL, as in DPO) or their
f-divergence transform f'(pi / pi_ref) (Wang et al. 2023, "Beyond Reverse KL", Table 1).

Rewards (a metric, never a loss input) are ``beta * log-ratio``, detached (DPO, Sec. 5).

The trainer calls one function, `preference_loss(spec, policy, reference_logps, response_mask)`, with a
`LossSpec` built from the config; it does not know which loss runs. `validate_loss_options` (called by
`DPOConfig.__post_init__`) refuses options that the chosen losses would ignore, using the `LOSSES` table.

Papers (arXiv ids): DPO 2305.18290 (Rafailov et al. 2023), IPO 2310.12036, SLiC-HF 2305.10425, RSO
2309.06657, Robust DPO 2403.00409, EXO 2402.00856, NCA 2402.05369, BCO 2404.04656, SPPO 2405.00675, AOT
2406.05882, APO 2408.06266, DiscoPOP 2406.08414, SimPO 2405.14734, RPO 2404.19733, Tulu 3 2411.15124,
f-DPO 2309.16240, LD-DPO 2409.06411, WPO 2406.11827.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass, field, fields

import torch
import torch.nn.functional as F

from .logps import SequenceLogps

# ---------------------------------------------------------------------------------------------- the losses


def sigmoid_loss(
    chosen_scores: torch.Tensor,
    rejected_scores: torch.Tensor,
    beta: float = 0.1,
    label_smoothing: float = 0.0,
) -> torch.Tensor:
    """DPO (Rafailov et al. 2023, Eq. 7) with conservative-DPO label smoothing eps (cDPO).

    loss = -(1 - eps) log s(beta h) - eps log s(-beta h), h = chosen_scores - rejected_scores.
    Shapes: (B,), (B,) -> (B,). Worked values (beta 0.1): h = 0 -> ln 2 = 0.693147; h = 10 -> 0.313262.
    """
    logits = beta * (chosen_scores - rejected_scores)
    return -(1 - label_smoothing) * F.logsigmoid(logits) - label_smoothing * F.logsigmoid(-logits)


def sigmoid_norm_loss(
    chosen_scores: torch.Tensor,
    rejected_scores: torch.Tensor,
    chosen_lengths: torch.Tensor,
    rejected_lengths: torch.Tensor,
    beta: float = 0.1,
    label_smoothing: float = 0.0,
) -> torch.Tensor:
    """Length-normalised DPO (the Tulu 3 report, Lambert et al. 2024): DPO on per-token log-ratios.

    loss = sigmoid_loss(chosen_scores / |y_w|, rejected_scores / |y_l|); lengths in completion tokens.
    Shapes: four (B,) -> (B,). With equal lengths n it is the sigmoid loss at h / n.
    """
    return sigmoid_loss(
        chosen_scores / chosen_lengths.clamp(min=1),
        rejected_scores / rejected_lengths.clamp(min=1),
        beta,
        label_smoothing,
    )


def ipo_loss(chosen_scores: torch.Tensor, rejected_scores: torch.Tensor, beta: float = 0.1) -> torch.Tensor:
    """IPO (Azar et al. 2023, Eq. 17): (h - 1/(2 beta))^2, beta in the role of the regulariser tau.

    h is the difference of sequence log-ratios, as in the paper (TRL divides each by its length first; here
    that is ``logp_reduction="mean"``). Shapes: (B,), (B,) -> (B,). Worked value: beta 0.5, h 0 -> 1.
    """
    return (chosen_scores - rejected_scores - 1 / (2 * beta)) ** 2


def hinge_loss(chosen_scores: torch.Tensor, rejected_scores: torch.Tensor, beta: float = 0.1) -> torch.Tensor:
    """Hinge on the normalised likelihood (RSO, Liu et al. 2023), after the SLiC-HF calibration loss (Eq. 1).

    loss = relu(1 - beta h): the SLiC calibration hinge with margin 1/beta, scaled by beta.
    Shapes: (B,), (B,) -> (B,). Worked values (beta 0.1): h = 0 -> 1; h = 5 -> 0.5; h = 20 -> 0.
    """
    return torch.relu(1 - beta * (chosen_scores - rejected_scores))


def robust_loss(
    chosen_scores: torch.Tensor,
    rejected_scores: torch.Tensor,
    beta: float = 0.1,
    label_smoothing: float = 0.0,
) -> torch.Tensor:
    """Robust DPO (Chowdhury et al. 2024, Eq. 9): unbiased under labels flipped with rate eps < 1/2.

    loss = ((1 - eps)(-log s(beta h)) - eps(-log s(-beta h))) / (1 - 2 eps); eps = label_smoothing.
    Shapes: (B,), (B,) -> (B,). With eps = 0 it is the sigmoid loss.
    """
    if not 0 <= label_smoothing < 0.5:
        raise ValueError(f"robust loss needs 0 <= label_smoothing < 0.5, got {label_smoothing}")
    logits = beta * (chosen_scores - rejected_scores)
    eps = label_smoothing
    return ((1 - eps) * -F.logsigmoid(logits) - eps * -F.logsigmoid(-logits)) / (1 - 2 * eps)


def exo_pair_loss(
    chosen_scores: torch.Tensor,
    rejected_scores: torch.Tensor,
    beta: float = 0.1,
    label_smoothing: float = 1e-3,
) -> torch.Tensor:
    """EXO for pairs (Ji et al. 2024, Eq. 16): KL(p_theta || p_label) over the two responses.

    p_theta = (s(beta h), s(-beta h)), the label distribution (1 - eps, eps) with eps = label_smoothing > 0:
    loss = s(beta h)(log s(beta h) - log(1 - eps)) + s(-beta h)(log s(-beta h) - log eps).
    Shapes: (B,), (B,) -> (B,). Minimal (0) where s(beta h) = 1 - eps.
    """
    if not 0 < label_smoothing < 1:
        raise ValueError(f"exo_pair needs 0 < label_smoothing < 1, got {label_smoothing}")
    logits = beta * (chosen_scores - rejected_scores)
    log_q_chosen, log_q_rejected = F.logsigmoid(logits), F.logsigmoid(-logits)
    return log_q_chosen.exp() * (log_q_chosen - math.log1p(-label_smoothing)) + log_q_rejected.exp() * (
        log_q_rejected - math.log(label_smoothing)
    )


def discopop_loss(
    chosen_scores: torch.Tensor,
    rejected_scores: torch.Tensor,
    beta: float = 0.1,
    tau: float = 0.05,
) -> torch.Tensor:
    """DiscoPOP, the log-ratio modulated loss (Lu et al. 2024, Eq. 5).

    rho = beta h; loss = (1 - s(rho / tau)) (-log s(rho)) + s(rho / tau) exp(-rho): logistic for rho << 0,
    exponential for rho >> 0, blended by a sigmoid of temperature tau. Shapes: (B,), (B,) -> (B,).
    Worked value: rho = 0 -> (ln 2 + 1) / 2 = 0.846574.
    """
    rho = beta * (chosen_scores - rejected_scores)
    mix = torch.sigmoid(rho / tau)
    return (1 - mix) * -F.logsigmoid(rho) + mix * torch.exp(-rho)


def nca_pair_loss(
    chosen_log_ratios: torch.Tensor, rejected_log_ratios: torch.Tensor, beta: float = 0.1
) -> torch.Tensor:
    """NCA for pairs (Chen et al. 2024, "Noise Contrastive Alignment"): absolute, not relative, likelihoods.

    With r = beta * log-ratio: loss = -log s(r_w) - 1/2 log s(-r_w) - 1/2 log s(-r_l). Each response is
    classified against noise on its own, so the chosen likelihood is not free to fall.
    Shapes: (B,), (B,) -> (B,). Worked value: r = 0 -> 2 ln 2 = 1.386294.
    """
    chosen, rejected = beta * chosen_log_ratios, beta * rejected_log_ratios
    return -F.logsigmoid(chosen) - 0.5 * F.logsigmoid(-chosen) - 0.5 * F.logsigmoid(-rejected)


def bco_pair_loss(
    chosen_log_ratios: torch.Tensor, rejected_log_ratios: torch.Tensor, beta: float = 0.1
) -> torch.Tensor:
    """BCO for pairs (Jung et al. 2024): a binary classifier whose logit is beta * log-ratio.

    loss = -log s(r_w) - log s(-r_l), r = beta * log-ratio (chosen -> 1, rejected -> 0). As in TRL, without
    the paper's running reward shift delta. Shapes: (B,), (B,) -> (B,). Worked value: r = 0 -> 2 ln 2.
    """
    return -F.logsigmoid(beta * chosen_log_ratios) - F.logsigmoid(-beta * rejected_log_ratios)


def sppo_hard_loss(
    chosen_log_ratios: torch.Tensor, rejected_log_ratios: torch.Tensor, beta: float = 0.1
) -> torch.Tensor:
    """SPPO with hard win probabilities (Wu et al. 2024, Eq. 4.7 with P(y_w > y_l) = 1, P(y_l > y_w) = 0).

    loss = (u_w - 1/(2 beta))^2 + (u_l + 1/(2 beta))^2, u the log-ratios: the chosen log-ratio is pushed to
    +1/(2 beta), the rejected to -1/(2 beta). Shapes: (B,), (B,) -> (B,). Worked value: beta 0.5, u 0 -> 2.
    """
    half_margin = 1 / (2 * beta)
    return (chosen_log_ratios - half_margin) ** 2 + (rejected_log_ratios + half_margin) ** 2


def aot_loss(
    policy_margins: torch.Tensor,
    reference_margins: torch.Tensor,
    beta: float = 0.1,
    label_smoothing: float = 0.0,
) -> torch.Tensor:
    """AOT for paired data (Melnyk et al. 2024, the paired objective with hard sorting and a logistic cost).

    margins = log pi(y_w) - log pi(y_l) per prompt, for the policy and for the reference. Both are sorted
    over the batch and compared quantile by quantile: loss_i = cDPO(beta (sorted_policy_i - sorted_ref_i)),
    which asks the policy's margin distribution to dominate the reference's (first-order stochastic
    dominance). Shapes: (B,), (B,) -> (B,); loss i belongs to quantile i, not to prompt i.

    The sort runs over what this call sees: one micro-batch on one rank. Under gradient accumulation or
    DDP each micro-batch of each rank is sorted on its own (no gather), so the quantiles are those of the
    per-device micro-batch, and a larger per-device batch gives finer quantiles.
    """
    policy_sorted = torch.sort(policy_margins, dim=0).values
    reference_sorted = torch.sort(reference_margins, dim=0).values
    return sigmoid_loss(policy_sorted, reference_sorted, beta, label_smoothing)


def aot_unpaired_loss(
    chosen_log_ratios: torch.Tensor,
    rejected_log_ratios: torch.Tensor,
    beta: float = 0.1,
    label_smoothing: float = 0.0,
) -> torch.Tensor:
    """AOT for unpaired data (Melnyk et al. 2024, the unpaired objective with hard sorting).

    The chosen log-ratios and the rejected log-ratios are sorted separately over the batch and compared
    quantile by quantile: loss_i = cDPO(beta (sorted_chosen_i - sorted_rejected_i)), so the chosen reward
    distribution dominates the rejected one, whichever prompts they came from. Shapes: (B,), (B,) -> (B,).
    Sorted per micro-batch per rank, as `aot_loss` is.
    """
    chosen_sorted = torch.sort(chosen_log_ratios, dim=0).values
    rejected_sorted = torch.sort(rejected_log_ratios, dim=0).values
    return sigmoid_loss(chosen_sorted, rejected_sorted, beta, label_smoothing)


def apo_zero_loss(
    chosen_log_ratios: torch.Tensor, rejected_log_ratios: torch.Tensor, beta: float = 0.1
) -> torch.Tensor:
    """APO-zero (D'Oosterlinck et al. 2024, Eq. 7): raise the chosen likelihood, lower the rejected one.

    loss = (1 - s(beta u_w)) + s(beta u_l). For chosen responses better than the model's own outputs.
    Shapes: (B,), (B,) -> (B,). Worked value: u = 0 -> 1.
    """
    return (1 - torch.sigmoid(beta * chosen_log_ratios)) + torch.sigmoid(beta * rejected_log_ratios)


def apo_down_loss(
    chosen_log_ratios: torch.Tensor, rejected_log_ratios: torch.Tensor, beta: float = 0.1
) -> torch.Tensor:
    """APO-down (D'Oosterlinck et al. 2024, Eq. 8): lower both likelihoods, the rejected one more.

    loss = s(beta u_w) + (1 - s(beta (u_w - u_l))). For chosen responses worse than the model's own outputs.
    Shapes: (B,), (B,) -> (B,). Worked value: u = 0 -> 1.
    """
    return torch.sigmoid(beta * chosen_log_ratios) + (
        1 - torch.sigmoid(beta * (chosen_log_ratios - rejected_log_ratios))
    )


def simpo_loss(
    chosen_logps: torch.Tensor,
    rejected_logps: torch.Tensor,
    chosen_lengths: torch.Tensor,
    rejected_lengths: torch.Tensor,
    beta: float = 2.0,
    gamma: float = 0.5,
    label_smoothing: float = 0.0,
) -> torch.Tensor:
    """SimPO (Meng et al. 2024, Eq. 6): reference-free, length-normalised, with a target margin gamma.

    loss = cDPO(beta (log pi(y_w) / |y_w| - log pi(y_l) / |y_l|) - gamma): the reward is the mean token
    log-prob scaled by beta (Eq. 4), and the chosen must beat the rejected by gamma. No reference model.
    Shapes: four (B,) -> (B,). Worked value: beta 2, gamma 0.5, equal mean log-probs -> -log s(-0.5) =
    0.974077.
    """
    logits = (
        beta * (chosen_logps / chosen_lengths.clamp(min=1) - rejected_logps / rejected_lengths.clamp(min=1))
        - gamma
    )
    return -(1 - label_smoothing) * F.logsigmoid(logits) - label_smoothing * F.logsigmoid(-logits)


def sft_loss(chosen_logp_sums: torch.Tensor, chosen_token_counts: torch.Tensor) -> torch.Tensor:
    """The NLL of the chosen completions, a per-token mean over the batch (RPO's NLL term, Pang et al. 2024).

    loss = -sum_b log pi(y_w,b) / sum_b |y_w,b|: every chosen token of the micro-batch weighs the same, as in
    a plain causal-LM loss on the chosen completions. Returned expanded to (B,) so that it combines with the
    per-prompt losses: its mean over B is the scalar.
    Shapes: (B,) summed token log-probs, (B,) token counts -> (B,).
    """
    nll = -chosen_logp_sums.sum() / chosen_token_counts.sum().clamp(min=1)
    return nll.expand(chosen_logp_sums.shape[0])


def plackett_luce_loss(
    scores: torch.Tensor,
    beta: float = 0.1,
    response_mask: torch.Tensor | None = None,
) -> torch.Tensor:
    """Plackett-Luce loss over K ranked responses (DPO paper, Appendix A.3, Eq. 18), best first.

    loss = -sum_k log( exp(beta u_k) / sum_{j>=k} exp(beta u_j) ), u = scores (log-ratios). With K = 2 it
    is the sigmoid loss. A reversed logcumsumexp gives every denominator at once, no loop over K.

    Args:
        scores: (B, K), column 0 the best response.
        response_mask: optional (B, K) bool; False marks padding responses (which must come last in a row).
    Returns:
        losses (B,).
    """
    logits = beta * scores
    if response_mask is not None:
        logits = logits.masked_fill(~response_mask, float("-inf"))
    # log sum_{j>=k} exp(beta u_j) for every k: logcumsumexp over the reversed ranking (Eq. 18 denominator).
    tail_logsumexp = torch.logcumsumexp(logits.flip(-1), dim=-1).flip(-1)
    log_probs = logits - tail_logsumexp
    if response_mask is not None:
        log_probs = torch.where(response_mask, log_probs, torch.zeros_like(log_probs))
    return -log_probs.sum(-1)


# ---------------------------------------------------------------------------------------------- modifiers

F_DIVERGENCE_TYPES = ("reverse_kl", "forward_kl", "js_divergence", "alpha_divergence")


def f_divergence_scores(log_ratios: torch.Tensor, f_divergence_type: str, alpha: float = 0.5) -> torch.Tensor:
    """f'(u) at u = pi / pi_ref, from log u (f-DPO, Wang et al. 2023, its table of f-divergences). Any shape.

    reverse_kl: log u (DPO). forward_kl: 1 - 1/u. js_divergence: log(2u / (1 + u)) = log 2 + log s(log u).
    alpha_divergence: (1 - u^-alpha) / alpha, 0 < alpha < 1 (-> log u as alpha -> 0; 1 - 1/u at alpha 1).
    No clamping: a ratio that overflows gives a non-finite loss, which the trainer reports.
    """
    if f_divergence_type == "reverse_kl":
        return log_ratios
    if f_divergence_type == "forward_kl":
        return 1 - torch.exp(-log_ratios)
    if f_divergence_type == "js_divergence":
        return math.log(2) + F.logsigmoid(log_ratios)
    if f_divergence_type == "alpha_divergence":
        return (1 - torch.exp(-alpha * log_ratios)) / alpha
    raise ValueError(
        f"f_divergence_type must be one of {', '.join(F_DIVERGENCE_TYPES)}, got {f_divergence_type!r}"
    )


def wpo_weights(
    token_logp_sums: torch.Tensor, log_sum_sq_prob_sums: torch.Tensor, token_counts: torch.Tensor
) -> torch.Tensor:
    """WPO sequence weights (Zhou et al. 2024, Eq. 2, with its "aligned" per-token probabilities).

    w(y) = exp( (1/|y|) sum_t [log p(y_t) - log sum_v p(v)^2] ), from the policy itself, detached. It is
    close to 1 for completions the policy would sample and small for off-policy ones.
    Shapes: three (B, K) -> (B, K) (1 for an empty, i.e. padding, response).
    """
    with torch.no_grad():
        return torch.exp((token_logp_sums - log_sum_sq_prob_sums) / token_counts.clamp(min=1))


# ---------------------------------------------------------------------------------------------- the table


@dataclass(frozen=True)
class LossInfo:
    """What one loss type reads, which settings it accepts, and where it comes from."""

    paper: str
    # The loss options it reads: label_smoothing, discopop_tau, simpo_gamma.
    options: frozenset[str] = frozenset()
    reference: bool = True  # reads the reference log-probs
    ranked: bool = False  # takes K > 2 ranked responses
    f_divergence: bool = False  # built on the chosen-minus-rejected score: f-divergences apply
    length_normalised: bool = False  # divides by the completion length itself
    sorts_batch: bool = False  # mixes prompts (sorting): per-pair weights are meaningless
    reads_sequence_logps: bool = True  # False: reads token log-probs only (no LD-DPO weighting)


_EPS = frozenset({"label_smoothing"})
LOSSES: dict[str, LossInfo] = {
    "sigmoid": LossInfo("DPO, Rafailov et al. 2023, Eq. 7 (cDPO smoothing)", _EPS, f_divergence=True),
    "sigmoid_norm": LossInfo(
        "length-normalised DPO, Tulu 3, Lambert et al. 2024", _EPS, f_divergence=True, length_normalised=True
    ),
    "ipo": LossInfo("IPO, Azar et al. 2023, Eq. 17", f_divergence=True),
    "hinge": LossInfo("RSO / SLiC-HF hinge, Liu et al. 2023; Zhao et al. 2023", f_divergence=True),
    "robust": LossInfo("Robust DPO, Chowdhury et al. 2024, Eq. 9", _EPS, f_divergence=True),
    "exo_pair": LossInfo("EXO, Ji et al. 2024, Eq. 16", _EPS, f_divergence=True),
    "discopop": LossInfo("DiscoPOP, Lu et al. 2024, Eq. 5", frozenset({"discopop_tau"}), f_divergence=True),
    "nca_pair": LossInfo("NCA, Chen et al. 2024"),
    "bco_pair": LossInfo("BCO, Jung et al. 2024"),
    "sppo_hard": LossInfo("SPPO, Wu et al. 2024, Eq. 4.7 (hard labels)"),
    "aot": LossInfo("AOT paired, Melnyk et al. 2024", _EPS, sorts_batch=True),
    "aot_unpaired": LossInfo("AOT unpaired, Melnyk et al. 2024", _EPS, sorts_batch=True),
    "apo_zero": LossInfo("APO-zero, D'Oosterlinck et al. 2024, Eq. 7"),
    "apo_down": LossInfo("APO-down, D'Oosterlinck et al. 2024, Eq. 8"),
    "simpo": LossInfo(
        "SimPO, Meng et al. 2024, Eq. 6",
        frozenset({"label_smoothing", "simpo_gamma"}),
        reference=False,
        length_normalised=True,
    ),
    "sft": LossInfo(
        "NLL of the chosen (RPO), Pang et al. 2024", reference=False, ranked=True, reads_sequence_logps=False
    ),
    "plackett_luce": LossInfo(
        "Plackett-Luce, Rafailov et al. 2023, App. A.3, Eq. 18", ranked=True, f_divergence=True
    ),
}
LOSS_TYPES = tuple(LOSSES)

# Defaults of the options whose mere presence is checked: a value other than these counts as "set".
OPTION_DEFAULTS = {
    "label_smoothing": 0.0,
    "f_divergence_type": "reverse_kl",
    "f_alpha_divergence_coef": 0.5,
    "discopop_tau": 0.05,
    "simpo_gamma": 0.5,
}


def _names(loss_type: str | Sequence[str]) -> list[str]:
    return [loss_type] if isinstance(loss_type, str) else list(loss_type)


def _users(names: list[str], option: str) -> list[str]:
    return [name for name in names if option in LOSSES[name].options]


def _with(option: str) -> str:
    return ", ".join(name for name, info in LOSSES.items() if option in info.options)


def needs_reference(loss_types: str | Sequence[str], reference_free: bool = False) -> bool:
    """True if some chosen loss reads reference log-probs (so a reference forward or cache is needed)."""
    return not reference_free and any(LOSSES[name].reference for name in _names(loss_types))


def accepts_ranked(loss_type: str | Sequence[str]) -> bool:
    """True if every named loss can train on rows with K > 2 ranked responses (the others need pairs).

    plackett_luce ranks all K; sft trains on the best response (column 0) and ignores the others.
    """
    return all(name in LOSSES and LOSSES[name].ranked for name in _names(loss_type))


def validate_loss_options(
    loss_type: str | Sequence[str],
    loss_weights: Sequence[float] | None = None,
    *,
    beta: float = 0.1,
    label_smoothing: float = 0.0,
    reference_free: bool = False,
    f_divergence_type: str = "reverse_kl",
    f_alpha_divergence_coef: float = 0.5,
    ld_alpha: float | None = None,
    use_weighting: bool = False,
    discopop_tau: float = 0.05,
    simpo_gamma: float = 0.5,
    logp_reduction: str = "sum",
    precompute_ref_log_probs: bool = False,
) -> list[str]:
    """Check the loss settings together; return `loss_type` as a list. Raises a one-line ValueError.

    An option is refused when no chosen loss reads it (it would be silently ignored), or when it is
    invalid for a chosen loss. In a combination an option is fine if at least one chosen loss reads it
    (label_smoothing with ["ipo", "robust"] smooths robust only), except where an option would be wrong
    for another member (f-divergences, WPO weights with the sorting losses, double length normalisation).
    """
    names = _names(loss_type)
    if not names:
        raise ValueError("loss_type is empty; give at least one loss, e.g. loss_type=['sigmoid']")
    for name in names:
        if name not in LOSSES:
            raise ValueError(f"unknown loss_type {name!r}; choose from {', '.join(LOSS_TYPES)}")
    repeated = sorted({name for name in names if names.count(name) > 1})
    if repeated:
        raise ValueError(
            f"loss_type lists {repeated[0]!r} twice; give it once with a larger loss_weights entry"
        )
    chosen = f"loss_type {names}"

    if loss_weights is not None:
        weights = list(loss_weights)
        if len(weights) != len(names):
            raise ValueError(
                f"loss_weights has {len(weights)} entries for {len(names)} losses ({chosen}); "
                "give one weight per loss"
            )
        if not all(math.isfinite(w) and w >= 0 for w in weights) or not any(w > 0 for w in weights):
            raise ValueError(f"loss_weights must be finite, >= 0 and not all 0, got {weights} for {chosen}")
    if beta <= 0:
        raise ValueError(f"beta must be > 0, got {beta}")

    # label smoothing: which losses read it, and its range
    if not 0 <= label_smoothing < 0.5:
        raise ValueError(f"label_smoothing must be in [0, 0.5), got {label_smoothing}")
    if label_smoothing > 0 and not _users(names, "label_smoothing"):
        raise ValueError(
            f"label_smoothing={label_smoothing} is ignored by {chosen}; "
            f"only {_with('label_smoothing')} read it"
        )
    if "exo_pair" in names and label_smoothing == 0:
        raise ValueError("exo_pair needs label_smoothing > 0 (the label noise eps; the EXO paper uses 1e-3)")

    # losses with their own option
    for option, value, owner in (
        ("discopop_tau", discopop_tau, "discopop"),
        ("simpo_gamma", simpo_gamma, "simpo"),
    ):
        if value != OPTION_DEFAULTS[option] and owner not in names:
            raise ValueError(f"{option}={value} is ignored by {chosen}; only {owner} reads it")
    if discopop_tau <= 0:
        raise ValueError(f"discopop_tau must be > 0, got {discopop_tau}")
    if not math.isfinite(simpo_gamma):
        raise ValueError(f"simpo_gamma must be finite, got {simpo_gamma}")

    # f-divergence: only where the log Z(x) of the f-DPO reparameterisation cancels
    if f_divergence_type not in F_DIVERGENCE_TYPES:
        raise ValueError(
            f"f_divergence_type must be one of {', '.join(F_DIVERGENCE_TYPES)}, got {f_divergence_type!r}"
        )
    if (
        f_alpha_divergence_coef != OPTION_DEFAULTS["f_alpha_divergence_coef"]
        and f_divergence_type != "alpha_divergence"
    ):
        raise ValueError(
            f"f_alpha_divergence_coef={f_alpha_divergence_coef} is ignored with "
            f"f_divergence_type={f_divergence_type!r}; only f_divergence_type='alpha_divergence' reads it"
        )
    if not 0 < f_alpha_divergence_coef < 1:
        raise ValueError(
            f"f_alpha_divergence_coef must be in (0, 1), got {f_alpha_divergence_coef} "
            "(its ends are reverse_kl and forward_kl)"
        )
    if f_divergence_type != "reverse_kl":
        invalid = [n for n in names if not LOSSES[n].f_divergence and LOSSES[n].reads_sequence_logps]
        if invalid:
            valid = ", ".join(n for n, info in LOSSES.items() if info.f_divergence)
            raise ValueError(
                f"f_divergence_type={f_divergence_type!r} is not valid for {invalid[0]}: "
                f"it applies only to losses on the chosen-minus-rejected score ({valid})"
            )
        if not any(LOSSES[n].f_divergence for n in names):
            raise ValueError(f"f_divergence_type={f_divergence_type!r} is ignored by {chosen}")
        if reference_free:
            raise ValueError(
                f"f_divergence_type={f_divergence_type!r} needs a reference model "
                "(it is a divergence from it); unset reference_free"
            )

    # length: LD-DPO weighting and the length-normalised losses
    if ld_alpha is not None:
        if not 0 <= ld_alpha <= 1:
            raise ValueError(f"ld_alpha must be in [0, 1], got {ld_alpha}")
        if not any(LOSSES[n].reads_sequence_logps for n in names):
            raise ValueError(f"ld_alpha={ld_alpha} is ignored by {chosen}: sft reads token log-probs only")
        if logp_reduction == "mean":
            raise ValueError(
                f"ld_alpha={ld_alpha} with logp_reduction='mean': both correct for length; use one of them"
            )
    if logp_reduction == "mean":
        normalised = [n for n in names if LOSSES[n].length_normalised]
        if normalised:
            raise ValueError(
                f"{normalised[0]} divides by the completion length itself; "
                "with logp_reduction='mean' it would divide twice: use logp_reduction='sum'"
            )

    # WPO weights: per pair, so not with losses that sort the batch
    if use_weighting:
        sorting = [n for n in names if LOSSES[n].sorts_batch]
        if sorting:
            raise ValueError(
                f"use_weighting (WPO) does not apply to {sorting[0]}: "
                "it sorts the batch, so per-pair weights would land on other pairs"
            )

    # reference
    if reference_free and not needs_reference(names):
        raise ValueError(f"reference_free=True is ignored by {chosen}: none of them reads a reference model")
    if precompute_ref_log_probs and not needs_reference(names, reference_free):
        why = "reference_free=True" if reference_free else f"{chosen} reads no reference"
        raise ValueError(f"precompute_ref_log_probs=True has nothing to compute: {why}")
    return names


# ---------------------------------------------------------------------------------------------- combination


@dataclass(frozen=True)
class LossSpec:
    """The loss settings, validated: which losses, their weights, and the options they read.

    Build it with `LossSpec.from_config(args)` from a DPOConfig (or anything with the same fields).
    """

    loss_types: tuple[str, ...] = ("sigmoid",)
    loss_weights: tuple[float, ...] | None = None  # None: 1 each
    beta: float = 0.1
    label_smoothing: float = 0.0
    reference_free: bool = False
    f_divergence_type: str = "reverse_kl"
    f_alpha_divergence_coef: float = 0.5
    use_weighting: bool = False
    discopop_tau: float = 0.05
    simpo_gamma: float = 0.5
    weights: tuple[float, ...] = field(init=False, repr=False)

    def __post_init__(self):
        options = {name: getattr(self, name) for name in _SPEC_OPTIONS}
        names = validate_loss_options(self.loss_types, self.loss_weights, **options)
        object.__setattr__(self, "loss_types", tuple(names))
        weights = (
            (1.0,) * len(names) if self.loss_weights is None else tuple(float(w) for w in self.loss_weights)
        )
        object.__setattr__(self, "weights", weights)

    @classmethod
    def from_config(cls, args) -> LossSpec:
        weights = None if args.loss_weights is None else tuple(args.loss_weights)
        options = {name: getattr(args, name) for name in _SPEC_OPTIONS}
        return cls(loss_types=tuple(_names(args.loss_type)), loss_weights=weights, **options)

    @property
    def needs_reference(self) -> bool:
        return needs_reference(self.loss_types, self.reference_free)

    @property
    def needs_token_stats(self) -> bool:
        """True if the loss reads per-token softmax statistics (WPO's log sum_v p_v^2)."""
        return self.use_weighting


LossOutput = tuple[torch.Tensor, torch.Tensor, dict[str, torch.Tensor]]


# The options a LossSpec carries besides its losses and weights; DPOConfig has fields of the same names.
_SPEC_OPTIONS = [f.name for f in fields(LossSpec) if f.init][2:]


def _single_loss(
    name: str, spec: LossSpec, policy: SequenceLogps, reference, log_ratios, scores, response_mask
):
    """One named loss, (B,), from the (B, K) per-sequence inputs (column 0 chosen, column 1 rejected)."""
    beta, eps = spec.beta, spec.label_smoothing
    if name == "plackett_luce":
        return plackett_luce_loss(scores, beta, response_mask)
    if name == "sft":
        return sft_loss(policy.token_logp_sums[:, 0], policy.token_counts[:, 0])
    chosen, rejected = scores[:, 0], scores[:, 1]
    if name == "sigmoid":
        return sigmoid_loss(chosen, rejected, beta, eps)
    if name == "sigmoid_norm":
        counts = policy.token_counts
        return sigmoid_norm_loss(chosen, rejected, counts[:, 0], counts[:, 1], beta, eps)
    if name == "ipo":
        return ipo_loss(chosen, rejected, beta)
    if name == "hinge":
        return hinge_loss(chosen, rejected, beta)
    if name == "robust":
        return robust_loss(chosen, rejected, beta, eps)
    if name == "exo_pair":
        return exo_pair_loss(chosen, rejected, beta, eps)
    if name == "discopop":
        return discopop_loss(chosen, rejected, beta, spec.discopop_tau)
    if name == "simpo":
        logps, counts = policy.logps, policy.token_counts
        return simpo_loss(logps[:, 0], logps[:, 1], counts[:, 0], counts[:, 1], beta, spec.simpo_gamma, eps)
    chosen_ratios, rejected_ratios = log_ratios[:, 0], log_ratios[:, 1]
    pairwise_on_ratios = {
        "nca_pair": nca_pair_loss,
        "bco_pair": bco_pair_loss,
        "sppo_hard": sppo_hard_loss,
        "apo_zero": apo_zero_loss,
        "apo_down": apo_down_loss,
    }
    if name in pairwise_on_ratios:
        return pairwise_on_ratios[name](chosen_ratios, rejected_ratios, beta)
    if name == "aot":
        return aot_loss(policy.logps[:, 0] - policy.logps[:, 1], reference[:, 0] - reference[:, 1], beta, eps)
    if name == "aot_unpaired":
        return aot_unpaired_loss(chosen_ratios, rejected_ratios, beta, eps)
    raise ValueError(f"unknown loss_type {name!r}")  # unreachable after validation


def preference_loss(
    spec: LossSpec,
    policy: SequenceLogps,
    reference_logps: torch.Tensor | None,
    response_mask: torch.Tensor | None = None,
) -> LossOutput:
    """The configured losses, weighted and summed, on (B, K) per-sequence inputs.

    Args:
        spec: which losses and options (`LossSpec.from_config(args)`).
        policy: `SequenceLogps` by row (see `SequenceLogps.by_row`): (B, K) `logps` (what the losses compare:
            summed or mean, LD-weighted with ld_alpha), `token_counts`, `token_logp_sums` (plain sums, for
            sft) and, with use_weighting, `log_sum_sq_prob_sums`. Column 0 is the chosen (best) response.
        reference_logps: (B, K) reference `logps` (same reduction), or None when `spec.needs_reference` is
            False.
        response_mask: (B, K) bool, False for padding responses of ranked rows; None: all present.
    Returns:
        losses (B,): sum_i weight_i * loss_i (times the WPO weight with use_weighting); the step's loss is
            their mean over B.
        rewards (B, K): beta * (policy - reference) log-probs, detached, 0 for padding responses.
        metrics: per-prompt (B,) detached values to average over prompts: `loss/<name>` for each loss of a
            combination, `wpo/weight` with use_weighting.
    """
    logps = policy.logps
    if logps.dim() != 2:
        raise ValueError(f"policy log-probs must be (B, K) by row, got shape {tuple(logps.shape)}")
    k = logps.shape[1]
    if k > 2 and not accepts_ranked(spec.loss_types):
        pairwise = [n for n in spec.loss_types if not LOSSES[n].ranked]
        raise ValueError(
            f"loss_type {pairwise[0]!r} needs pairs (K=2 responses per row), got K={k}; use "
            "loss_type='plackett_luce' or expand ranked rows into pairs"
        )
    if k < 2:
        raise ValueError(f"a preference loss needs at least 2 responses per row, got K={k}")
    if not spec.needs_reference:
        reference = torch.zeros_like(logps)  # reference-free: log-ratios are the policy log-probs
    elif reference_logps is None:
        raise ValueError(
            f"loss_type {list(spec.loss_types)} needs reference log-probs (or reference_free=True)"
        )
    else:
        reference = reference_logps.to(logps.dtype)
    log_ratios = logps - reference
    scores = f_divergence_scores(log_ratios, spec.f_divergence_type, spec.f_alpha_divergence_coef)

    pair_weights = None
    if spec.use_weighting:
        if policy.log_sum_sq_prob_sums is None:
            raise ValueError(
                "use_weighting needs log_sum_sq_prob_sums: compute the log-probs with with_stats=True"
            )
        weights = wpo_weights(policy.token_logp_sums, policy.log_sum_sq_prob_sums, policy.token_counts)
        if response_mask is not None:
            weights = torch.where(response_mask, weights, torch.ones_like(weights))
        pair_weights = weights.prod(-1)  # Eq. 2: w(x, y_w) w(x, y_l); the product over the row for K > 2

    metrics: dict[str, torch.Tensor] = {}
    total = logps.new_zeros(logps.shape[0])
    for name, weight in zip(spec.loss_types, spec.weights):
        losses = _single_loss(name, spec, policy, reference, log_ratios, scores, response_mask)
        if pair_weights is not None:
            losses = losses * pair_weights
        if len(spec.loss_types) > 1:
            metrics[f"loss/{name}"] = losses.detach()
        total = total + weight * losses
    if pair_weights is not None:
        metrics["wpo/weight"] = pair_weights

    rewards = (spec.beta * log_ratios).detach()
    if response_mask is not None:
        rewards = rewards.masked_fill(~response_mask, 0.0)
    return total, rewards, metrics


# ---------------------------------------------------------------------------------------------- metrics

# TRL's names, so dashboards carry over. entropy: mean per-token entropy of the next-token distribution over
# chosen and rejected completion tokens; mean_token_accuracy: top-1 accuracy on the chosen completion tokens.
METRIC_NAMES = ("rewards/chosen", "rewards/rejected", "rewards/accuracies", "rewards/margins", "logps/chosen")
METRIC_NAMES += ("logps/rejected", "logits/chosen", "logits/rejected", "entropy", "mean_token_accuracy")


@torch.no_grad()
def metric_sums(
    policy: SequenceLogps, rewards: torch.Tensor, response_mask: torch.Tensor, loss_metrics: dict
) -> dict[str, torch.Tensor]:
    """Sums of the logged metrics over a batch, with the pair and token counts (`_pairs`, `_tokens/...`), so
    that sums over micro-batches, logging steps and ranks weigh every pair and token equally (`metric_means`).

    policy: by row, (B, K) tensors; rewards (B, K); response_mask (B, K) bool; loss_metrics: (B,) values from
    `preference_loss`. With K > 2 ranked responses, "rejected" is the mean of all but the best.
    """
    others = response_mask[:, 1:].float()
    rejected_rewards = (rewards[:, 1:] * others).sum(1) / others.sum(1).clamp(min=1)
    margins = rewards[:, 0] - rejected_rewards
    sums = {
        "rewards/chosen": rewards[:, 0].sum(),
        "rewards/rejected": rejected_rewards.sum(),
        "rewards/accuracies": (margins > 0).float().sum(),  # a tie is not a correct ranking
        "rewards/margins": margins.sum(),
        "logps/chosen": policy.logps[:, 0].sum(),
        "logps/rejected": ((policy.logps[:, 1:] * others).sum(1) / others.sum(1).clamp(min=1)).sum(),
        "logits/chosen": policy.logit_sums[:, 0].sum(),
        "logits/rejected": policy.logit_sums[:, 1:].sum(),
        "entropy": policy.entropy_sums.sum(),
        "mean_token_accuracy": policy.top1_hits[:, 0].sum(),
        **{key: value.sum() for key, value in loss_metrics.items()},  # per pair, e.g. loss/sft
        "_pairs": torch.tensor(float(response_mask.shape[0])),
        "_tokens/chosen": policy.token_counts[:, 0].sum(),
        "_tokens/rejected": policy.token_counts[:, 1:].sum(),
    }
    return {key: value.float() for key, value in sums.items()}


def metric_means(total: dict[str, float]) -> dict[str, float]:
    """Means from summed `metric_sums`: per token for logits, entropy and token accuracy, else per pair."""
    total = dict(total)
    pairs = max(total.pop("_pairs"), 1.0)
    chosen, rejected = (max(total.pop(f"_tokens/{side}"), 1.0) for side in ("chosen", "rejected"))
    per_token = {"logits/chosen": chosen, "logits/rejected": rejected, "mean_token_accuracy": chosen}
    per_token["entropy"] = chosen + rejected
    names = [*METRIC_NAMES, *sorted(set(total) - set(METRIC_NAMES))]
    return {key: total[key] / per_token.get(key, pairs) for key in names}
