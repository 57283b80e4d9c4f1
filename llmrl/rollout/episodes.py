"""Multi-turn episodes: the model acts, the environment answers, the model acts again, until the episode ends.

Token ids are carried across turns, never re-tokenised from text: an episode is its first observation's tokens
(the prompt) followed by the model's sampled tokens and the environment's tokens, in the order they came. What
was sampled is exactly what is trained on. ``action`` marks the model's tokens (1) against the environment's
(0): only the model's are trained, carry KL to the reference and take part in GAE (``llmrl.rl.compute_gae``
skips the others). Each step's reward sits on the last token of the model turn that earned it.

An episode ends when the environment says terminated or truncated, after ``env.max_turns`` model turns, or when
its tokens would pass ``env.max_episode_tokens`` (both logged as truncations, with the reason).
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Callable

import torch

from llmrl.config import EnvConfig
from llmrl.envs.base import checked_reset, checked_step, where
from llmrl.errors import ConfigError, EnvError
from llmrl.rollout.experience import Experience, left_padded, right_padded

END_REASONS = ("terminated", "env_truncated", "max_turns", "token_budget", "env_error")
# An observation is tokenised whole before the token budget can cut it, and tokenising megabytes takes minutes:
# one longer than this many characters per token it could use (no tokenizer averages more) is refused first.
# The floor keeps room for a first observation (the prompt) longer than the budget after it.
OBSERVATION_CHARS_PER_TOKEN = 16
OBSERVATION_MIN_TOKENS = 4096
PROBE = "\u2063probe\u2063"  # an assistant message no chat template writes by itself


@dataclass
class Episode:
    seed: int | None
    options: dict | None
    prompt_ids: list[int] = field(default_factory=list)
    ids: list[int] = field(default_factory=list)  # everything after the prompt
    action: list[int] = field(default_factory=list)  # 1: the model sampled it; 0: the environment's
    rewards: list[tuple[int, float]] = field(default_factory=list)  # (index in ids of the turn's last token, reward)
    transcript: list[tuple[str, str]] = field(default_factory=list)  # (role, text): "env" or "model"
    turns: int = 0
    done: bool = False
    terminated: bool = False
    truncated: bool = False
    reason: str = ""  # why it ended: one of END_REASONS
    env_reason: str = ""  # the environment's info["reason"] at the end (a tool error, an invalid move), if any
    success: bool = False
    error: str | None = None  # the environment failed (reward.on_error: skip); the episode is not trained on

    @property
    def total_reward(self) -> float:
        return sum(r for _, r in self.rewards)

    def transcript_text(self) -> str:
        """The episode after its first observation, one line per turn: ``> model`` and ``< environment``."""
        lines = [("> " if role == "model" else "< ") + text for role, text in self.transcript[1:]]
        why = ": ".join(part for part in (self.reason, self.env_reason, self.error) if part)
        return "\n".join(lines + [f"[{self.turns} turns, reward {self.total_reward:g}, ended: {why}]"])

    def end(self, reason: str, terminated: bool = False, truncated: bool = False) -> None:
        assert reason in END_REASONS, reason
        self.done, self.terminated, self.truncated, self.reason = True, terminated, truncated, reason


class TurnRenderer:
    """Token ids of what the environment says: the first observation (the prompt) and each reply after a model
    turn, through the chat template (observations are user turns) or, for a model without one,
    ``env.observation_format``."""

    def __init__(self, tokenizer, cfg: EnvConfig):
        self.tokenizer = tokenizer
        has_template = bool(getattr(tokenizer, "chat_template", None))
        if cfg.chat == "on" and not has_template:
            raise ConfigError("env.chat is on, but the policy's tokenizer has no chat template: use env.chat: off "
                              "(observations written with env.observation_format) or a model that has one")
        self.chat = cfg.chat == "on" or (cfg.chat == "auto" and has_template)
        self.format = cfg.observation_format
        self.eos_text = tokenizer.eos_token or ""
        if self.chat:
            self._template_tail()

    def encode(self, text: str) -> list[int]:
        return self.tokenizer(text, add_special_tokens=False)["input_ids"]

    def _render(self, messages: list[dict], generation_prompt: bool) -> str:
        return self.tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=generation_prompt)

    def _template_tail(self) -> None:
        """What the template writes after an assistant message's text, found once with a probe message."""
        probe = [{"role": "user", "content": "u"}, {"role": "assistant", "content": PROBE}]
        closed = self._render(probe, False)
        if PROBE not in closed:
            raise ConfigError("the chat template does not write assistant messages as given: use env.chat: off")
        self.after_assistant = closed[closed.rindex(PROBE) + len(PROBE):]  # e.g. "<|im_end|>\n"
        self.closed_probe, self.closed_text = probe, closed

    def first_text(self, observation: str) -> str:
        """The prompt of an episode as text: the first observation, as a user turn when there is a template."""
        return self._render([{"role": "user", "content": observation}], True) if self.chat else observation

    def first(self, observation: str) -> list[int]:
        return self.encode(self.first_text(observation))

    def reply(self, observation: str, model_ended: bool) -> list[int]:
        """The environment's tokens after a model turn; ``model_ended``: the turn ended with the stop token."""
        if not self.chat:
            return self.encode(self.format.format(observation=observation))
        closed = self.closed_text
        opened = self._render(self.closed_probe + [{"role": "user", "content": observation}], True)
        if not opened.startswith(closed):
            raise ConfigError("the chat template rewrites earlier turns when a user turn is added, so turns cannot "
                              "be appended as tokens: use env.chat: off")
        tail = self.after_assistant
        if model_ended and self.eos_text and tail.startswith(self.eos_text):
            tail = tail[len(self.eos_text):]  # the model's own stop token closed its turn already
        return self.encode(tail + opened[len(closed):])


def observation_char_limit(cfg: EnvConfig) -> int:
    return OBSERVATION_CHARS_PER_TOKEN * max(cfg.max_episode_tokens, OBSERVATION_MIN_TOKENS)


def check_observation_size(obs: str, cfg: EnvConfig, name: str, seed, turn: int | None) -> str:
    """``obs``, or an EnvError naming the environment, the episode and the turn when it is too long to tokenise."""
    limit = observation_char_limit(cfg)
    if len(obs) > limit:
        call = "reset" if turn is None else "step"
        raise EnvError(f"{where(name, seed, turn)}: {call} returned an observation of {len(obs):,} characters, more "
                       f"than {limit:,} ({OBSERVATION_CHARS_PER_TOKEN} per token of env.max_episode_tokens = "
                       f"{cfg.max_episode_tokens}, or of {OBSERVATION_MIN_TOKENS}): no episode can use it; make the "
                       f"environment return shorter text. Starts: {obs[:60]!r}")
    return obs


# sample(contexts, max_new_tokens) -> the sampled ids of each context, cut after the stop token
Sampler = Callable[[list[list[int]], int], list[list[int]]]


def play_episodes(envs: list, starts: list[tuple[int | None, dict | None]], sample: Sampler, tokenizer,
                  renderer: TurnRenderer, cfg: EnvConfig, max_new_tokens: int, name: str,
                  skip_errors: bool = False, any_active: Callable[[int], bool] | None = None) -> list[Episode]:
    """Play one episode per environment, all turns batched: ``starts[i]`` is episode i's (seed, options).

    An environment that fails (raises, a non-text observation, a non-finite reward) raises an EnvError naming
    it, the episode and the turn; with ``skip_errors`` the episode is ended with ``error`` set instead.
    ``any_active(n)``: whether any rank still has an episode running, given this rank's count ``n``; when set,
    every rank samples once per turn until all are done (a rank with none left samples a throwaway token).
    """
    eos = tokenizer.eos_token_id
    episodes = [Episode(seed, options) for seed, options in starts]
    for env, ep in zip(envs, episodes):
        try:
            obs, _ = checked_reset(env, name, ep.seed, ep.options)
            check_observation_size(obs, cfg, name, ep.seed, None)
        except EnvError as e:
            if not skip_errors:
                raise
            ep.error, ep.prompt_ids = str(e), [eos]
            ep.end("env_error")
            continue
        ep.prompt_ids = renderer.first(obs)
        ep.transcript.append(("env", obs))
        if not ep.prompt_ids:
            raise EnvError(f"env {name!r}, episode seed {ep.seed}: reset's observation {obs!r} has no tokens: the "
                           f"policy needs at least one token to continue from")
    for turn in range(1, cfg.max_turns + 1):
        active = [i for i, ep in enumerate(episodes) if not ep.done]
        if any_active is not None:  # ranks in step: the same turns, each decoding the same number of tokens
            if not any_active(len(active)):
                break
            if not active:
                sample([[eos]], max_new_tokens)  # a throwaway row, so that this rank runs the same forwards
                continue
        if not active:
            break
        budget = {i: cfg.max_episode_tokens - len(episodes[i].ids) for i in active}
        longest = max_new_tokens if any_active is not None else min(max_new_tokens, max(budget.values()))
        sampled = sample([episodes[i].prompt_ids + episodes[i].ids for i in active], longest)
        for i, tokens in zip(active, sampled):
            ep, env = episodes[i], envs[i]
            cut = len(tokens) > budget[i]
            tokens = tokens[:budget[i]]
            ep.ids += tokens
            ep.action += [1] * len(tokens)
            ep.turns = turn
            text = tokenizer.decode(tokens, skip_special_tokens=True)
            ep.transcript.append(("model", text))
            if cut:  # its action was cut short: the environment is not shown half a reply
                ep.end("token_budget", truncated=True)
                continue
            try:
                obs, reward, terminated, truncated, info = checked_step(env, name, ep.seed, turn, text)
                check_observation_size(obs, cfg, name, ep.seed, turn)
            except EnvError as e:
                if not skip_errors:
                    raise
                ep.error = str(e)
                ep.end("env_error")
                continue
            ep.rewards.append((len(ep.ids) - 1, reward))
            ep.transcript.append(("env", obs))
            ep.success = bool(info.get("success", ep.total_reward > 0))
            if terminated or truncated:
                ep.env_reason = str(info.get("reason") or "")[:200]
                ep.end("terminated" if terminated else "env_truncated", terminated, truncated)
                continue
            if turn == cfg.max_turns:
                ep.end("max_turns", truncated=True)
                continue
            reply = renderer.reply(obs, bool(tokens) and tokens[-1] == eos)
            if len(ep.ids) + len(reply) >= cfg.max_episode_tokens:  # no room left for another model turn
                ep.end("token_budget", truncated=True)
                continue
            ep.ids += reply
            ep.action += [0] * len(reply)
    return episodes


def episodes_to_experience(episodes: list[Episode], pad_token_id: int, device) -> Experience:
    """The batch the trainer trains on: prompts left-padded, everything after them right-padded, with
    ``action_mask`` (the model's tokens) and ``step_rewards`` (each step's reward on its turn's last token)."""
    query, query_mask = left_padded([ep.prompt_ids for ep in episodes], pad_token_id)
    response, response_mask = right_padded([ep.ids for ep in episodes], pad_token_id)
    action = torch.zeros_like(response_mask)
    step_rewards = torch.zeros_like(response_mask)
    for row, ep in enumerate(episodes):
        action[row, :len(ep.action)] = torch.tensor(ep.action, dtype=action.dtype)
        for index, reward in ep.rewards:
            step_rewards[row, index] += reward
    ended = torch.tensor([ep.terminated for ep in episodes])
    return Experience(query=query.to(device), query_mask=query_mask.to(device), response=response.to(device),
                      response_mask=response_mask.to(device), action_mask=action.to(device),
                      step_rewards=step_rewards.to(device), ended=ended.to(device))


def episode_stats(episodes: list[Episode], prefix: str = "env") -> dict:
    """Turns per episode, success rate, truncations and why episodes ended."""
    n = max(len(episodes), 1)
    stats = {f"{prefix}/turns": sum(ep.turns for ep in episodes) / n,
             f"{prefix}/success": sum(ep.success for ep in episodes) / n,
             f"{prefix}/truncated": sum(ep.truncated for ep in episodes) / n,
             f"{prefix}/skipped": float(sum(ep.error is not None for ep in episodes)),
             f"{prefix}/tokens": sum(len(ep.ids) for ep in episodes) / n}
    for reason in END_REASONS:  # a fixed set of keys: every rank reports the same ones
        stats[f"{prefix}/end/{reason}"] = sum(ep.reason == reason for ep in episodes) / n
    stats[f"{prefix}/end/env_reason"] = sum(bool(ep.env_reason) for ep in episodes) / n
    return stats
