"""The RL maths of llmrl: pure tensor functions that import only torch.

Notation used throughout (Schulman et al. 2016, "High-Dimensional Continuous Control Using GAE";
Ouyang et al. 2022; Huang et al. 2024, "The N Implementation Details of RLHF with PPO"):

- B: number of sequences, T: number of response tokens (padded to the longest response).
- ``mask``        (B, T) 1.0 on real response tokens (up to and including the stop token), else 0.0.
- ``logprobs``    (B, T) log pi_old(a_t | s_t) of the sampled tokens under the rollout policy.
- ``ref_logprobs`` (B, T) log pi_ref(a_t | s_t) under the reference policy (adapter disabled).
- ``values``      (B, T) V(s_t) from the critic at rollout time.
- ``scores``      (B,)   scalar reward of each whole completion.
- ``rewards``     (B, T) per-token reward: -beta * KL_t, plus the score at the last response token.
"""
from llmrl.rl.ops import (
    RunningMeanStd,
    entropy_from_logits,
    kl_penalty,
    logprobs_from_logits,
    masked_mean,
    masked_moments,
    masked_sum,
    masked_var,
    masked_whiten,
    moments_stats,
    whiten_with_moments,
)
from llmrl.rl.aggregate import AGGREGATIONS, aggregate
from llmrl.rl.critic_free import RunningBaseline, grpo_advantages, rloo_advantages
from llmrl.rl.gated import cispo_loss, sapo_loss
from llmrl.rl.dpo import dpo_loss
from llmrl.rl.kto import kto_loss
from llmrl.rl.ilql import action_states, gather_states, ilql_loss, terminal_rewards
from llmrl.rl.kl_control import AdaptiveKLController, FixedKLController, make_kl_controller
from llmrl.rl.sequence import informative_groups, sequence_policy_loss
from llmrl.rl.ppo import (
    compute_gae,
    compute_token_rewards,
    last_token_index,
    policy_loss,
    value_loss,
)

__all__ = [
    "AGGREGATIONS",
    "aggregate",
    "cispo_loss",
    "sapo_loss",
    "RunningBaseline",
    "dpo_loss",
    "kto_loss",
    "action_states",
    "gather_states",
    "ilql_loss",
    "terminal_rewards",
    "grpo_advantages",
    "informative_groups",
    "sequence_policy_loss",
    "rloo_advantages",
    "RunningMeanStd",
    "AdaptiveKLController",
    "FixedKLController",
    "compute_gae",
    "compute_token_rewards",
    "entropy_from_logits",
    "kl_penalty",
    "last_token_index",
    "logprobs_from_logits",
    "make_kl_controller",
    "masked_mean",
    "masked_moments",
    "masked_sum",
    "masked_var",
    "masked_whiten",
    "policy_loss",
    "value_loss",
    "moments_stats",
    "whiten_with_moments",
]
