"""Kahneman-Tversky optimisation: learn from unpaired thumbs up and down (Ethayarajh et al. 2024). Imports only torch.

Notation (all (B,), one entry per logged answer of this rank's batch):

- ``logps``        log pi(y_i | x_i), the policy's summed log-probability of row i's completion.
- ``ref_logps``    log pi_ref(y_i | x_i) under the reference (the adapter disabled).
- ``labels``       True for a desirable answer (thumbs up), False for an undesirable one.
- ``kl_logps``, ``ref_kl_logps``: the same for the mismatched pairs (x_i, y_j), each prompt with another row's
  completion (TRL's KL_logps, ref_KL_logps), from which the reference point z0 is estimated.
"""
from __future__ import annotations

from typing import Callable

import torch


def kto_loss(logps: torch.Tensor, ref_logps: torch.Tensor, labels: torch.Tensor, kl_logps: torch.Tensor,
             ref_kl_logps: torch.Tensor, beta: float, desirable_weight: float = 1.0, undesirable_weight: float = 1.0,
             all_reduce_sum: Callable[[torch.Tensor], torch.Tensor] = lambda x: x):
    """(loss, stats) of KTO, as TRL's KTOTrainer with loss_type="kto" computes them.

    r_i = log pi(y_i|x_i) - log pi_ref(y_i|x_i)                        (the implied reward, over beta)
    z0  = max(0, mean_j [log pi(y'_j|x_j) - log pi_ref(y'_j|x_j)])     (the reference point: a KL estimate from
          mismatched pairs; detached, so no gradient flows through it; averaged over every rank's rows)
    desirable:   w_D * (1 - sigmoid(beta * (r_i - z0)))                (Ethayarajh et al. 2024, eq. 7)
    undesirable: w_U * (1 - sigmoid(beta * (z0 - r_i)))
    loss = the mean of those over this rank's rows (TRL's losses.nanmean(); equal shares per rank make the mean
    of the ranks' losses the mean over the global batch).

    ``all_reduce_sum`` sums a tensor over the data-parallel ranks (the strategy's; the identity in one process):
    z0 and the logged statistics are those of the whole batch. The stats use TRL's names: ``kl`` (z0),
    ``rewards/chosen`` and ``rewards/rejected`` (beta * r_i averaged over desirable / undesirable rows, 0 when a
    batch holds none), ``rewards/margins`` and ``logps/chosen``, ``logps/rejected``.
    """
    labels = labels.bool()
    logratios = logps - ref_logps
    with torch.no_grad():
        desirable = labels.to(logps.dtype)
        undesirable = 1.0 - desirable
        rewards = beta * logratios
        totals = all_reduce_sum(torch.stack([
            (kl_logps - ref_kl_logps).sum(), torch.tensor(float(len(kl_logps)), dtype=logps.dtype,
                                                           device=logps.device),
            (rewards * desirable).sum(), desirable.sum(), (rewards * undesirable).sum(), undesirable.sum(),
            (logps * desirable).sum(), (logps * undesirable).sum(),
        ])).to(logps.dtype)
        kl_sum, rows, chosen_sum, n_chosen, rejected_sum, n_rejected, logp_chosen, logp_rejected = totals
        z0 = (kl_sum / rows).clamp(min=0)
    losses = torch.where(labels, desirable_weight * (1 - torch.sigmoid(beta * (logratios - z0))),
                         undesirable_weight * (1 - torch.sigmoid(beta * (z0 - logratios))))
    chosen = chosen_sum / n_chosen.clamp(min=1)
    rejected = rejected_sum / n_rejected.clamp(min=1)
    stats = {"kl": z0, "rewards/chosen": chosen, "rewards/rejected": rejected, "rewards/margins": chosen - rejected,
             "logps/chosen": logp_chosen / n_chosen.clamp(min=1),
             "logps/rejected": logp_rejected / n_rejected.clamp(min=1)}
    return losses.mean(), stats
