"""DAPO (Yu et al. 2025, "DAPO: An Open-Source LLM Reinforcement Learning System at Scale"): GRPO's
group-normalised advantages with

- clip-higher (eq. 10): the token ratio is clipped to [1 - ppo.clip_range, 1 + critic_free.clip_range_high],
  a wider upper bound (0.28 against 0.2) that leaves unlikely tokens room to grow, against entropy collapse;
- dynamic sampling (eq. 11): groups whose completions all scored alike (all right, all wrong) carry no
  gradient signal and are dropped from the update (``train/kept`` logs the share kept). The paper then samples
  more prompts until the batch is full again; here the batch is trained as it is, smaller;
- the token-level loss (the minibatch's token mean, llmrl's default for every estimator) and no KL term.
"""
from __future__ import annotations

from llmrl import rl
from llmrl.algorithms.base import GroupEstimator, register


@register
class DAPOEstimator(GroupEstimator):
    name, kl_in_reward = "dapo", False

    def __init__(self, cfg, all_reduce_sum=lambda x: x):
        super().__init__(cfg, all_reduce_sum)
        self.clip_high = cfg.critic_free.clip_range_high

    @classmethod
    def config_checks(cls, cfg):
        high = cfg.critic_free.clip_range_high
        return [*super().config_checks(cfg),
                (high >= cfg.ppo.clip_range, "critic_free.clip_range_high",
                 f"is {high}: DAPO's upper clip must be >= ppo.clip_range = {cfg.ppo.clip_range} (0.28 in the paper)")]

    def settings(self) -> dict:  # the token ratio clipped to [1 - ppo.clip_range, 1 + clip_range_high]
        return {**super().settings(), "critic_free.clip_range_high": self.clip_high}

    def keep(self, scores, valid):
        return rl.informative_groups(scores, self.group_size, valid)

    def sequence_advantages(self, scores, valid):
        return rl.grpo_advantages(scores, self.group_size, "group", valid=valid)

    def policy_loss(self, logprobs, old_logprobs, advantages, mask, num_tokens, num_sequences):
        return rl.policy_loss(logprobs, old_logprobs, advantages, mask, self.ppo.clip_range, num_tokens,
                              clip_range_high=self.clip_high, **self.divisors(num_sequences))
