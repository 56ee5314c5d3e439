"""The SPIN loss (Chen et al. 2024, Eq. 4.7; uclaml/SPIN `SPINTrainer.spin_loss`)."""

from __future__ import annotations

from typing import Callable

import torch
import torch.nn.functional as F

# ℓ must be convex and decreasing (paper, Assumption 5.1).
LOSSES: dict[str, Callable[[torch.Tensor], torch.Tensor]] = {
    "sigmoid": lambda z: -F.logsigmoid(z),  # the paper's logistic loss log(1 + e^-z)
    "hinge": lambda z: F.relu(1 - z),  # SLiC's hinge
}


def spin_loss(policy_real_logps: torch.Tensor, policy_generated_logps: torch.Tensor, ref_real_logps: torch.Tensor,
              ref_generated_logps: torch.Tensor, beta: float,
              loss_type: str = "sigmoid") -> tuple[torch.Tensor, dict[str, float]]:
    """SPIN loss of a batch of pairs, and its metrics.

        margin = (log πθ(y|x) − log π_t(y|x)) − (log πθ(y'|x) − log π_t(y'|x))
        sigmoid: −log σ(β·margin)        hinge: relu(1 − β·margin)

    y is the human answer, y' the opponent θ_t's, π_t the reference (= θ_t, frozen for the iteration); every term is
    a log-prob summed over response tokens. Inputs have shape (B,); the loss is the batch mean. At πθ = π_t the
    margin is 0, so the sigmoid loss is ln 2.

    Metrics: rewards/real = β(log πθ(y) − log π_t(y)), rewards/generated likewise for y', rewards/margins their
    difference, rewards/accuracies the share of pairs with rewards/real > rewards/generated, logps/* the policy's.
    """
    if loss_type not in LOSSES:
        raise ValueError(f"loss_type {loss_type!r}: must be one of {sorted(LOSSES)}")
    real_rewards = beta * (policy_real_logps - ref_real_logps)
    generated_rewards = beta * (policy_generated_logps - ref_generated_logps)
    loss = LOSSES[loss_type](real_rewards - generated_rewards).mean()
    with torch.no_grad():
        metrics = {
            "rewards/real": real_rewards.mean().item(),
            "rewards/generated": generated_rewards.mean().item(),
            "rewards/margins": (real_rewards - generated_rewards).mean().item(),
            "rewards/accuracies": (real_rewards > generated_rewards).float().mean().item(),
            "logps/real": policy_real_logps.mean().item(),
            "logps/generated": policy_generated_logps.mean().item(),
        }
    return loss, metrics
