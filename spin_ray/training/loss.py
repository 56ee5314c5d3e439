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
              ref_generated_logps: torch.Tensor, beta: float, loss_type: str = "sigmoid", *, sft_weight: float = 0.0,
              real_tokens: torch.Tensor | None = None) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """SPIN loss of a batch of pairs, and its metrics.

        margin = (log πθ(y|x) − log π_t(y|x)) − (log πθ(y'|x) − log π_t(y'|x))
        sigmoid: −log σ(β·margin)        hinge: relu(1 − β·margin)

    y is the human answer, y' the opponent θ_t's, π_t the reference (= θ_t, frozen for the iteration); every term is
    a log-prob summed over response tokens. Inputs have shape (B,); the loss is the batch mean. At πθ = π_t the
    margin is 0, so the sigmoid loss is ln 2.

    `sft_weight` > 0 adds that weight times the human answer's NLL per token, −log πθ(y|x) / |y| (`real_tokens`:
    |y| per pair), averaged over pairs like the SPIN term: DPO-style losses also lower the likelihood of y, and this
    term holds it up (OpenRLHF's nll_loss_coef, TRL's "sft" loss). 0, the default, is the paper's loss.

    Metrics: rewards/real = β(log πθ(y) − log π_t(y)), rewards/generated likewise for y', rewards/margins their
    difference, rewards/accuracies the share of pairs with rewards/real > rewards/generated, logps/* the policy's,
    and nll/real_per_token where `real_tokens` is given: 0-d tensors on the inputs' device, never read here, so the
    trainer reads a whole step's metrics with one host sync.
    """
    if loss_type not in LOSSES:
        raise ValueError(f"loss_type {loss_type!r}: must be one of {sorted(LOSSES)}")
    if sft_weight and real_tokens is None:
        raise ValueError("sft_weight needs real_tokens (the human answer's token count per pair)")
    real_rewards = beta * (policy_real_logps - ref_real_logps)
    generated_rewards = beta * (policy_generated_logps - ref_generated_logps)
    loss = LOSSES[loss_type](real_rewards - generated_rewards).mean()
    nll = None if real_tokens is None else (-policy_real_logps / real_tokens).mean()
    if sft_weight:
        loss = loss + sft_weight * nll
    with torch.no_grad():
        metrics = {
            "rewards/real": real_rewards.mean(),
            "rewards/generated": generated_rewards.mean(),
            "rewards/margins": (real_rewards - generated_rewards).mean(),
            "rewards/accuracies": (real_rewards > generated_rewards).float().mean(),
            "logps/real": policy_real_logps.mean(),
            "logps/generated": policy_generated_logps.mean(),
        }
        if nll is not None:
            metrics["nll/real_per_token"] = nll.detach()
    return loss, metrics
