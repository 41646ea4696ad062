"""Preference losses on per-sequence log-probs: pure functions, no trainer state.

Every pairwise loss takes four tensors of shape (B,) (policy/reference x chosen/rejected sequence
log-probs) and returns ``(losses, chosen_rewards, rejected_rewards)``, each of shape (B,). The implicit
rewards are ``beta * (policy_logps - reference_logps)`` (paper, Sec. 5), detached. With
``reference_free=True`` the reference log-probs are taken as 0, in the log-ratio and in the rewards.

Equation numbers refer to Rafailov et al. 2023, "Direct Preference Optimization: Your Language Model is
Secretly a Reward Model" (arXiv:2305.18290v3).
"""

from __future__ import annotations

from collections.abc import Callable

import torch
import torch.nn.functional as F

LossOutput = tuple[torch.Tensor, torch.Tensor, torch.Tensor]

PAIRWISE_LOSS_TYPES = ("sigmoid", "ipo", "hinge", "robust")
LOSS_TYPES = (*PAIRWISE_LOSS_TYPES, "plackett_luce")


def _log_ratio_difference(
    policy_chosen_logps: torch.Tensor,
    policy_rejected_logps: torch.Tensor,
    reference_chosen_logps: torch.Tensor | None,
    reference_rejected_logps: torch.Tensor | None,
    reference_free: bool,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """h = (log pi(y_w) - log pi_ref(y_w)) - (log pi(y_l) - log pi_ref(y_l)), shape (B,).

    Returns (h, chosen_log_ratio, rejected_log_ratio).
    """
    if reference_free or reference_chosen_logps is None or reference_rejected_logps is None:
        if not reference_free:
            raise ValueError("reference log-probs are required unless reference_free=True")
        chosen_log_ratio = policy_chosen_logps
        rejected_log_ratio = policy_rejected_logps
    else:
        chosen_log_ratio = policy_chosen_logps - reference_chosen_logps
        rejected_log_ratio = policy_rejected_logps - reference_rejected_logps
    return chosen_log_ratio - rejected_log_ratio, chosen_log_ratio, rejected_log_ratio


def _rewards(beta: float, chosen_log_ratio: torch.Tensor, rejected_log_ratio: torch.Tensor):
    # Implicit reward r(x, y) = beta * log(pi(y|x) / pi_ref(y|x)) (Eq. 5, without the beta log Z(x) term,
    # which cancels between chosen and rejected).
    return (beta * chosen_log_ratio).detach(), (beta * rejected_log_ratio).detach()


def sigmoid_loss(
    policy_chosen_logps: torch.Tensor,
    policy_rejected_logps: torch.Tensor,
    reference_chosen_logps: torch.Tensor | None,
    reference_rejected_logps: torch.Tensor | None,
    beta: float = 0.1,
    label_smoothing: float = 0.0,
    reference_free: bool = False,
) -> LossOutput:
    """The DPO loss (Eq. 7) with conservative-DPO label smoothing eps.

    loss = -(1 - eps) log s(beta h) - eps log s(-beta h), h the log-ratio difference; eps = 0 is DPO.

    Shapes: four (B,) inputs -> (losses, chosen_rewards, rejected_rewards), each (B,).
    Worked values (beta = 0.1): h = 0 -> ln 2 = 0.693147; h = 10 -> 0.313262; h = -10 -> 1.313262.
    """
    h, chosen_log_ratio, rejected_log_ratio = _log_ratio_difference(
        policy_chosen_logps,
        policy_rejected_logps,
        reference_chosen_logps,
        reference_rejected_logps,
        reference_free,
    )
    # Eq. 7: L_DPO = -E[log s(beta * h)]; cDPO mixes in the flipped label with weight eps.
    losses = -F.logsigmoid(beta * h) * (1 - label_smoothing) - F.logsigmoid(-beta * h) * label_smoothing
    return (losses, *_rewards(beta, chosen_log_ratio, rejected_log_ratio))


def ipo_loss(
    policy_chosen_logps: torch.Tensor,
    policy_rejected_logps: torch.Tensor,
    reference_chosen_logps: torch.Tensor | None,
    reference_rejected_logps: torch.Tensor | None,
    beta: float = 0.1,
    label_smoothing: float = 0.0,
    reference_free: bool = False,
) -> LossOutput:
    """IPO (Azar et al. 2023, Eq. 17): (h - 1/(2 beta))^2; beta plays the role of the regulariser tau.

    Shapes: four (B,) inputs -> three (B,) outputs. Worked value: beta = 0.5, h = 0 -> (0 - 1)^2 = 1.
    """
    h, chosen_log_ratio, rejected_log_ratio = _log_ratio_difference(
        policy_chosen_logps,
        policy_rejected_logps,
        reference_chosen_logps,
        reference_rejected_logps,
        reference_free,
    )
    losses = (h - 1 / (2 * beta)) ** 2
    return (losses, *_rewards(beta, chosen_log_ratio, rejected_log_ratio))


def hinge_loss(
    policy_chosen_logps: torch.Tensor,
    policy_rejected_logps: torch.Tensor,
    reference_chosen_logps: torch.Tensor | None,
    reference_rejected_logps: torch.Tensor | None,
    beta: float = 0.1,
    label_smoothing: float = 0.0,
    reference_free: bool = False,
) -> LossOutput:
    """SLiC hinge loss (Zhao et al. 2023): relu(1 - beta h).

    Shapes: four (B,) inputs -> three (B,) outputs. Worked values (beta = 0.1): h = 0 -> 1; h = 5 -> 0.5;
    h = 20 -> 0.
    """
    h, chosen_log_ratio, rejected_log_ratio = _log_ratio_difference(
        policy_chosen_logps,
        policy_rejected_logps,
        reference_chosen_logps,
        reference_rejected_logps,
        reference_free,
    )
    losses = torch.relu(1 - beta * h)
    return (losses, *_rewards(beta, chosen_log_ratio, rejected_log_ratio))


def robust_loss(
    policy_chosen_logps: torch.Tensor,
    policy_rejected_logps: torch.Tensor,
    reference_chosen_logps: torch.Tensor | None,
    reference_rejected_logps: torch.Tensor | None,
    beta: float = 0.1,
    label_smoothing: float = 0.0,
    reference_free: bool = False,
) -> LossOutput:
    """Robust DPO (Chowdhury et al. 2024, Eq. 9): an unbiased loss when labels flip with rate eps < 1/2.

    loss = ((1 - eps)(-log s(beta h)) - eps(-log s(-beta h))) / (1 - 2 eps); eps = label_smoothing.
    Shapes: four (B,) inputs -> three (B,) outputs. With eps = 0 it equals the sigmoid loss.
    """
    if not 0 <= label_smoothing < 0.5:
        raise ValueError(f"robust loss needs 0 <= label_smoothing < 0.5, got {label_smoothing}")
    h, chosen_log_ratio, rejected_log_ratio = _log_ratio_difference(
        policy_chosen_logps,
        policy_rejected_logps,
        reference_chosen_logps,
        reference_rejected_logps,
        reference_free,
    )
    eps = label_smoothing
    losses = ((1 - eps) * -F.logsigmoid(beta * h) - eps * -F.logsigmoid(-beta * h)) / (1 - 2 * eps)
    return (losses, *_rewards(beta, chosen_log_ratio, rejected_log_ratio))


def plackett_luce_loss(
    policy_logps: torch.Tensor,
    reference_logps: torch.Tensor | None,
    beta: float = 0.1,
    reference_free: bool = False,
    response_mask: torch.Tensor | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Plackett-Luce loss over K ranked responses (paper, Appendix A.3, Eq. 18), best first.

    loss = -sum_k log( exp(beta u_k) / sum_{j>=k} exp(beta u_j) ), u = policy - reference log-prob.
    With K = 2 it is exactly the sigmoid (DPO) loss. Computed with a reversed logcumsumexp, no loop over K.

    Args:
        policy_logps: (B, K) sequence log-probs, column 0 the best response.
        reference_logps: (B, K), or None with reference_free=True.
        response_mask: optional (B, K) bool; False marks padding responses (which must come last in a row).
    Returns:
        losses (B,), rewards (B, K) = beta * u, detached (0 where masked).
    """
    if reference_free or reference_logps is None:
        if not reference_free:
            raise ValueError("reference log-probs are required unless reference_free=True")
        u = policy_logps
    else:
        u = policy_logps - reference_logps
    scores = beta * u
    if response_mask is not None:
        scores = scores.masked_fill(~response_mask, float("-inf"))
    # log sum_{j>=k} exp(beta u_j) for every k: logcumsumexp over the reversed ranking (Eq. 18 denominator).
    tail_logsumexp = torch.logcumsumexp(scores.flip(-1), dim=-1).flip(-1)
    log_probs = scores - tail_logsumexp
    if response_mask is not None:
        log_probs = torch.where(response_mask, log_probs, torch.zeros_like(log_probs))
    losses = -log_probs.sum(-1)
    rewards = (beta * u).detach()
    if response_mask is not None:
        rewards = rewards.masked_fill(~response_mask, 0.0)
    return losses, rewards


def accepts_ranked(loss_type: str | list[str] | tuple[str, ...]) -> bool:
    """True if every named loss can train on rows with K > 2 ranked responses (the others need pairs)."""
    names = [loss_type] if isinstance(loss_type, str) else list(loss_type)
    return all(name == "plackett_luce" for name in names)


PAIRWISE_LOSSES: dict[str, Callable[..., LossOutput]] = {
    "sigmoid": sigmoid_loss,
    "ipo": ipo_loss,
    "hinge": hinge_loss,
    "robust": robust_loss,
}


def preference_loss(
    loss_type: str,
    policy_logps: torch.Tensor,
    reference_logps: torch.Tensor | None,
    beta: float = 0.1,
    label_smoothing: float = 0.0,
    reference_free: bool = False,
    response_mask: torch.Tensor | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """The loss chosen by name, on (B, K) log-probs (K = 2 for pairs: column 0 chosen, column 1 rejected).

    Returns (losses (B,), rewards (B, K)). The trainer calls only this; it does not know which loss runs.
    """
    if loss_type == "plackett_luce":
        return plackett_luce_loss(policy_logps, reference_logps, beta, reference_free, response_mask)
    if loss_type not in PAIRWISE_LOSSES:
        raise ValueError(f"unknown loss_type {loss_type!r}; choose one of {', '.join(LOSS_TYPES)}")
    if policy_logps.shape[-1] != 2:
        raise ValueError(
            f"loss_type={loss_type!r} needs pairs (K=2 responses per row), got K={policy_logps.shape[-1]}; "
            "use loss_type='plackett_luce' or expand ranked rows into pairs"
        )
    ref_chosen = ref_rejected = None
    if reference_logps is not None and not reference_free:
        ref_chosen, ref_rejected = reference_logps[:, 0], reference_logps[:, 1]
    losses, chosen_rewards, rejected_rewards = PAIRWISE_LOSSES[loss_type](
        policy_logps[:, 0],
        policy_logps[:, 1],
        ref_chosen,
        ref_rejected,
        beta=beta,
        label_smoothing=label_smoothing,
        reference_free=reference_free,
    )
    return losses, torch.stack([chosen_rewards, rejected_rewards], dim=-1)
