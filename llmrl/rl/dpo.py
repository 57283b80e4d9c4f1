"""Direct preference optimisation losses. Imports only torch.

Inputs are summed log-probabilities of whole completions, each (B,): under the policy and under the
reference (the adapter disabled), for the chosen and the rejected completion of each pair; with their token
counts, which IPO divides by.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F


def dpo_loss(policy_chosen: torch.Tensor, policy_rejected: torch.Tensor, ref_chosen: torch.Tensor,
             ref_rejected: torch.Tensor, beta: float, loss_type: str = "sigmoid",
             chosen_tokens: torch.Tensor | None = None, rejected_tokens: torch.Tensor | None = None):
    """(loss, stats) for DPO or IPO.

    h = (log pi(y_w) - log pi_ref(y_w)) - (log pi(y_l) - log pi_ref(y_l))
    sigmoid: -log sigmoid(beta * h)            (Rafailov et al. 2023, eq. 7)
    ipo:     (h - 1 / (2 * beta))^2            (Azar et al. 2023, eq. 17), each log-probability first divided
             by its completion's token count (``chosen_tokens``, ``rejected_tokens``), as TRL's loss_type="ipo"
             does: the target margin 1 / (2 * beta) is then per token, whatever the completions' lengths.
    """
    if loss_type == "ipo":
        if chosen_tokens is None or rejected_tokens is None:
            raise ValueError("IPO averages log-probabilities per token: pass chosen_tokens and rejected_tokens")
        policy_chosen, ref_chosen = policy_chosen / chosen_tokens, ref_chosen / chosen_tokens
        policy_rejected, ref_rejected = policy_rejected / rejected_tokens, ref_rejected / rejected_tokens
    chosen_logratio = policy_chosen - ref_chosen
    rejected_logratio = policy_rejected - ref_rejected
    h = chosen_logratio - rejected_logratio
    if loss_type == "sigmoid":
        losses = -F.logsigmoid(beta * h)
    elif loss_type == "ipo":
        losses = (h - 1.0 / (2.0 * beta)) ** 2
    else:
        raise ValueError(f"unknown DPO loss {loss_type!r}: use sigmoid or ipo")
    with torch.no_grad():
        stats = {
            "rewards/chosen": (beta * chosen_logratio).mean(),
            "rewards/rejected": (beta * rejected_logratio).mean(),
            "rewards/accuracy": (h > 0).float().mean(),
            "rewards/margin": (beta * h).mean(),
        }
    return losses.mean(), stats
