"""PPO's estimator: GAE over per-token rewards, a trained critic (Schulman et al. 2017; Ouyang et al. 2022)."""
from __future__ import annotations

from llmrl import rl
from llmrl.algorithms.base import Estimator, register


@register
class PPOEstimator(Estimator):
    """GAE over per-token rewards (score at the last token, -beta * KL on every token), critic trained."""

    name, uses_critic = "ppo", True

    def settings(self) -> dict:
        p = self.ppo
        return {"ppo.clip_range": p.clip_range, "ppo.clip_range_value": p.clip_range_value, "ppo.vf_coef": p.vf_coef,
                "ppo.gamma": p.gamma, "ppo.lam": p.lam, "ppo.critic": p.critic, "ppo.whiten_rewards": p.whiten_rewards}

    def advantages(self, scores, logprobs, ref_logprobs, values, mask, kl_coef, valid, step_rewards=None):
        # A skipped sample (``valid`` False) has an all-zero ``mask``: no reward, no advantage, no return. In a
        # multi-turn episode each turn's reward stays on its turn (``step_rewards``) and GAE skips the environment.
        rewards, _ = rl.compute_token_rewards(scores, logprobs, ref_logprobs, mask, kl_coef, self.ppo.kl_estimator,
                                              step_rewards)
        if self.ppo.whiten_rewards:  # over every rank's tokens, as the advantages are: the same for any split
            moments = self.all_reduce_sum(rl.masked_moments(rewards, mask))
            if moments[2] >= 2:
                rewards = rl.whiten_with_moments(rewards, mask, moments, shift_mean=False).to(rewards.dtype)
        return rl.compute_gae(rewards, values, mask, self.ppo.gamma, self.ppo.lam)
