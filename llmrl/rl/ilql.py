"""Implicit Language Q-Learning (ILQL; Snell et al. 2022, "Offline RL for Natural Language Generation with Implicit
Language Q-Learning"): per-token losses on logged answers with a reward. Imports only torch.

Each token of a logged answer is an action a_k taken in state s_k (everything before it); the environment's tokens
of a multi-turn answer (the user's turns between the assistant's) are no actions: the state after an assistant turn's
last token is the state of the next assistant token, which has read them. The reward comes once, at the last action.

Notation (trlX's names in brackets, ``trlx/models/modeling_ilql.py``, ``ILQLConfig.loss``):

- B: sequences, N: actions per sequence (left-aligned, padded to the longest), V: vocabulary size.
- ``logits``   (B, N, V) the LM's logits in each action's state [logits at actions_ixs].
- ``qs``       list of (B, N, V): each Q head's values in that state [qs].
- ``target_q`` (B, N, V): the minimum of the Polyak-averaged target Q heads, no gradient [target_qs, min].
- ``values``   (B, N) V(s_k) [vs[:, :-1]].
- ``actions``  (B, N) the logged token a_k.
- ``mask``     (B, N) 1 on real actions, 0 on padding [terminal_mask = dones[:, :-1]].
- ``rewards``  (B, N) r_k: the sequence's reward at its last action, else 0 [rewards].
- ``dones``    (B, N) 1 where the episode ends after a_k: V of the next state is then 0 [1 - dones[:, 1:]; trlX's
  ``dones`` holds 1 for states that are *not* terminal].

Every term is a mean over the batch's actions (trlX's sum / n_nonterminal):

- Q loss (eq. 1 of the paper, the Bellman target with V in place of max Q):
  sum over Q heads of (Q_i(s_k, a_k) - (r_k + gamma * V(s_{k+1}) * (1 - done_k)))^2, V(s_{k+1}) detached.
- V loss (eq. 2, expectile regression): |tau - 1(Qt(s_k, a_k) < V(s_k))| * (Qt(s_k, a_k) - V(s_k))^2, where Qt is
  the targets' minimum: tau weighs the Q values above V, 1 - tau those below, so tau > 0.5 pulls V towards the best
  logged actions.
- CQL term (eq. 3): each Q head's values over the vocabulary read as logits, the cross-entropy of the logged token:
  logsumexp_a Q_i(s_k, a) - Q_i(s_k, a_k); it pushes Q down on tokens the log never took.
- AWAC term, as trlX (with its default awac beta 0): the LM's negative log-likelihood of the logged tokens.
- total = q + v + cql_scale * cql + awac_scale * awac.

The learned policy samples from logits + beta * (Qt - V) (``llmrl.models.ilql_heads.shifted_logits``).
"""
from __future__ import annotations

import torch
import torch.nn.functional as F


def action_states(action_mask: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(B, L) 1 where token j of a sequence is an action -> (positions (B, N) of the states that choose them: j - 1,
    left-aligned in sequence order and padded with 0; mask (B, N) of the real ones). Token 0 cannot be an action
    (nothing precedes it)."""
    action_mask = action_mask.bool()
    if action_mask[:, 0].any():
        raise ValueError("token 0 of a sequence cannot be an action: no state precedes it")
    counts = action_mask.sum(1)
    N = max(int(counts.max()), 1) if counts.numel() else 1
    # stable sort puts the action positions first, in order
    order = torch.sort((~action_mask).to(torch.int8), dim=1, stable=True).indices[:, :N]
    mask = torch.arange(N, device=action_mask.device)[None, :] < counts[:, None]
    return torch.where(mask, order - 1, torch.zeros_like(order)), mask


def gather_states(x: torch.Tensor, positions: torch.Tensor) -> torch.Tensor:
    """(B, L, ...) per-position tensor -> (B, N, ...) at ``positions`` (B, N)."""
    index = positions.reshape(*positions.shape, *([1] * (x.dim() - 2))).expand(*positions.shape, *x.shape[2:])
    return x.gather(1, index)


def terminal_rewards(mask: torch.Tensor, reward: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(B, N) action mask and (B,) rewards -> (rewards (B, N): each sequence's reward at its last action, dones (B, N):
    1 there)."""
    last = (mask.long().sum(1) - 1).clamp(min=0)
    dones = torch.zeros(mask.shape, dtype=torch.float32, device=mask.device)
    dones.scatter_(1, last[:, None], 1.0)
    dones = dones * mask
    return dones * reward.float()[:, None], dones


def expectile_loss(diff: torch.Tensor, tau: float) -> torch.Tensor:
    """|tau - 1(diff < 0)| * diff^2, elementwise (diff = Q - V)."""
    weight = torch.where(diff >= 0, torch.full_like(diff, tau), torch.full_like(diff, 1.0 - tau))
    return weight * diff.pow(2)


def _masked_mean(x: torch.Tensor, mask: torch.Tensor, n: torch.Tensor) -> torch.Tensor:
    return torch.where(mask, x, torch.zeros_like(x)).sum() / n


def ilql_loss(logits: torch.Tensor, qs: list[torch.Tensor], target_q: torch.Tensor, values: torch.Tensor,
              actions: torch.Tensor, mask: torch.Tensor, rewards: torch.Tensor, dones: torch.Tensor, *,
              gamma: float, tau: float, cql_scale: float, awac_scale: float,
              num_actions: torch.Tensor | float | None = None) -> tuple[torch.Tensor, dict]:
    """(loss, stats) of ILQL on a batch of actions (shapes in the module docstring); stats are detached tensors
    under ``loss/*`` and ``ilql/*``.

    ``num_actions``: what the sums are divided by; None: this batch's actions. Over R data-parallel ranks, the
    actions of all ranks / R, so that the ranks' average (what their gradients are) is the whole batch's mean."""
    mask = mask.bool()
    n = mask.sum().clamp(min=1).float() if num_actions is None else torch.as_tensor(num_actions).float()
    index = actions.long().unsqueeze(-1)
    q_taken = [q.float().gather(-1, index).squeeze(-1) for q in qs]
    target_taken = target_q.float().gather(-1, index).squeeze(-1).detach()
    values = values.float()
    next_values = torch.cat([values[:, 1:], torch.zeros_like(values[:, :1])], 1).detach()
    next_values = torch.where(dones.bool() | ~mask, torch.zeros_like(next_values), next_values)
    q_target = rewards.float() + gamma * next_values  # r_k + gamma * V(s_{k+1}) * (1 - done_k)

    loss_q = sum(_masked_mean((q - q_target).pow(2), mask, n) for q in q_taken)
    advantage = target_taken - values
    loss_v = _masked_mean(expectile_loss(advantage, tau), mask, n)

    def cross_entropy(scores: torch.Tensor) -> torch.Tensor:  # (B, N, V) -> (B, N): -log softmax at a_k
        return F.cross_entropy(scores.float().flatten(0, 1), actions.long().flatten(), reduction="none"
                               ).view(actions.shape)

    loss_cql = sum(_masked_mean(cross_entropy(q), mask, n) for q in qs)
    loss_awac = _masked_mean(cross_entropy(logits), mask, n)
    loss = loss_q + loss_v + cql_scale * loss_cql + awac_scale * loss_awac

    with torch.no_grad():
        all_q = torch.stack(q_taken)
        q_mask = mask.expand_as(all_q)

        def spread(x: torch.Tensor, m: torch.Tensor) -> tuple[torch.Tensor, ...]:
            big = torch.finfo(x.dtype).max
            return (torch.where(m, x, torch.zeros_like(x)).sum() / m.sum().clamp(min=1),
                    torch.where(m, x, torch.full_like(x, big)).min(), torch.where(m, x, torch.full_like(x, -big)).max())

        stats = {"loss/ilql": loss.detach(), "loss/q": loss_q.detach(), "loss/v": loss_v.detach(),
                 "loss/cql": loss_cql.detach(), "loss/awac": loss_awac.detach()}
        for name, x, m in (("q", all_q, q_mask), ("target_q", target_taken, mask), ("v", values, mask),
                           ("advantage", advantage, mask)):
            stats[f"ilql/{name}_mean"], stats[f"ilql/{name}_min"], stats[f"ilql/{name}_max"] = spread(x, m)
        stats["ilql/actions"] = mask.sum().float()
    return loss, stats
