"""Online RL: rollout -> score -> advantages -> epochs of clipped updates over shuffled minibatches.

The maths lives in ``llmrl.rl`` (pure torch) and the estimators in ``llmrl.algorithms``; devices and processes go
through ``self.strategy``; the optimizer, evaluation and checkpoints are the base trainer's.
"""
from __future__ import annotations

import math
import time
from collections import defaultdict
from pathlib import Path

import torch

from llmrl import rl
from llmrl.algorithms import make_estimator
from llmrl.config import Config, ConfigError
from llmrl.rewards.base import CombinedReward, RewardError, RewardResult
from llmrl.rollout.episodes import Episode, TurnRenderer, episode_stats, episodes_to_experience, play_episodes
from llmrl.rollout.experience import Experience, generate_ids
from llmrl.trainers.base import Trainer


class OnlineTrainer(Trainer):
    """Online RL: rollout, score, advantages from the configured estimator (PPO's critic and GAE, or a
    critic-free one), epochs of clipped updates over shuffled minibatches."""

    def __init__(self, cfg: Config, policy, tokenizer, reward: CombinedReward | None, train_rows: list[dict],
                 eval_rows: list[dict], strategy, run_dir: Path, eval_reward: CombinedReward | None = None):
        """``reward`` is None when the episodes are played against ``env.name``, whose rewards they are."""
        self.reward = reward
        self.plays_episodes = bool(cfg.env.name)
        self.renderer = TurnRenderer(tokenizer, cfg.env) if self.plays_episodes else None
        self.envs: list = []  # environment instances, reused from one batch of episodes to the next
        self.reward_norm = rl.RunningMeanStd()  # used when reward.normalize is running or reference
        self.train_rows = train_rows
        if len(train_rows) < cfg.train.rollout_batch_size // cfg.group_size:
            raise ConfigError(f"data.source has {len(train_rows)} prompts, fewer than the "
                              f"{cfg.train.rollout_batch_size // cfg.group_size} one rollout needs: add prompts or "
                              f"lower train.rollout_batch_size")
        # reward.eval_function, when set, scores evaluations; else the training reward does
        super().__init__(cfg, policy, tokenizer, eval_rows, strategy, run_dir, eval_reward or reward)
        p = cfg.ppo
        self.kl_ctl = rl.make_kl_controller(p.init_kl_coef, p.adaptive_kl, p.kl_target, p.kl_horizon)
        self.estimator = make_estimator(cfg, strategy.all_reduce_sum)
        self.tis_cap = importance_sampling_cap(cfg)  # truncated importance sampling needs pi_old recomputed
        old = cfg.train.old_logprobs
        self.recompute_old_logprobs = old == "recompute" or self.tis_cap is not None or (
            old == "auto" and not sampler_is_exact(cfg))

    def accumulation(self) -> tuple[int, int]:
        return self.sizes.grad_accum_steps, self.cfg.train.micro_batch_size

    def whiten(self, x: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        """Masked whitening over the global batch (all ranks), not only this rank's share."""
        return rl.whiten_with_moments(x, mask, self.strategy.all_reduce_sum(rl.masked_moments(x, mask))).float()

    # ------------------------------------------------------------------------------------------
    # data

    def rows_for_step(self, step: int) -> list[dict]:
        """This rank's prompts for ``step``: a fresh permutation per data epoch, fixed by the seed.

        Derived from the step number alone, so a resumed run draws exactly the prompts it would have.
        """
        k = self.cfg.group_size  # completions per prompt, consecutive in the batch
        B = self.cfg.train.rollout_batch_size // k
        per_epoch = len(self.train_rows) // B
        epoch, offset = divmod(step, per_epoch)
        g = torch.Generator().manual_seed(self.cfg.run.seed * 100_003 + epoch)
        perm = torch.randperm(len(self.train_rows), generator=g)[offset * B:(offset + 1) * B]
        local = self.sizes.local_rollout_batch_size // k
        mine = perm[self.strategy.rank * local:(self.strategy.rank + 1) * local]
        return [self.train_rows[i] for i in mine.tolist() for _ in range(k)]

    def score(self, rows: list[dict], exp: Experience, reward: CombinedReward | None = None
              ) -> tuple[list[str], RewardResult]:
        """Completion texts and the scores of ``reward`` (default: the training reward)."""
        return super().score(rows, exp, reward or self.reward)

    def rollout(self, rows: list[dict], greedy: bool = False) -> tuple[Experience, RewardResult, list[Episode]]:
        """Sample (or greedily decode) a batch and score it: one completion per row, or one episode per row
        against the environment (then the episodes too; else an empty list)."""
        if not self.plays_episodes:
            exp = self.generate(self.prompt_texts(rows), greedy=greedy)
            return exp, self.score(rows, exp)[1], []
        episodes = self.play(rows, greedy)
        result = RewardResult([ep.total_reward for ep in episodes], [ep.error is None for ep in episodes],
                              episode_stats(episodes))
        return episodes_to_experience(episodes, self.tokenizer.pad_token_id, self.device), result, episodes

    # ------------------------------------------------------------------------------------------
    # episodes against an environment

    def env_pool(self, n: int) -> list:
        from llmrl.envs import make_env

        while len(self.envs) < n:
            self.envs.append(make_env(self.cfg.env.name, self.cfg.env.kwargs))
        return self.envs[:n]

    @torch.no_grad()
    def play(self, rows: list[dict], greedy: bool = False) -> list[Episode]:
        """One episode per row: ``reset(seed=row["seed"], options=the row)`` (a row of seeds only: no options)."""
        from llmrl.models.policy import context_length

        cfg = self.cfg
        starts = [(row.get("seed"), None if set(row) == {"seed"} else row) for row in rows]
        context = context_length(self.policy.model)
        kwargs = self.strategy.generate_kwargs

        def sample(contexts: list[list[int]], max_new_tokens: int) -> list[list[int]]:
            longest = max(len(c) for c in contexts)
            if context is not None and longest + max_new_tokens > context:
                raise ConfigError(f"an episode of env {cfg.env.name!r} reached {longest} tokens, and "
                                  f"{max_new_tokens} more would pass the model's context of {context}: lower "
                                  f"env.max_episode_tokens (or generation.max_new_tokens)")
            return generate_ids(self.policy.model, self.tokenizer, contexts, cfg.generation, self.device,
                                max_new_tokens, greedy=greedy, engine=self.engine, **kwargs)

        # Without gathered weights ZeRO-3 runs collectives in every forward: ranks play the same number of turns
        any_active = ((lambda n: self.strategy.all_reduce_sum(torch.tensor(float(n), device=self.device)).item() > 0)
                      if kwargs.get("synced_gpus") else None)
        with self.strategy.generation_context(self.policy):
            return play_episodes(self.env_pool(len(rows)), starts, sample, self.tokenizer, self.renderer, cfg.env,
                                 cfg.generation.max_new_tokens, cfg.env.name, cfg.reward.on_error == "skip",
                                 any_active)

    @torch.no_grad()
    def eval_samples(self, batch_size: int) -> tuple[list[tuple[str, str, float | None]], dict]:
        """Single-turn: the base trainer's. Episodes: the held-out episodes, their transcripts as the samples (the
        return, or None for an episode dropped by an env error), with the success rate, turns and end reasons."""
        if not self.plays_episodes:
            return super().eval_samples(batch_size)
        episodes = []
        for start in range(0, len(self.eval_rows), batch_size):
            episodes += self.play(self.eval_rows[start:start + batch_size], greedy=not self.cfg.run.eval_sampled)
        samples = [(ep.transcript[0][1] if ep.transcript else "", ep.transcript_text(),
                    ep.total_reward if ep.error is None else None) for ep in episodes]
        return samples, episode_stats(episodes, "eval")

    @torch.no_grad()
    def fit_reward_normalizer(self) -> None:
        """reward.normalize: reference: the mean/std of scores of the reference policy's completions."""
        rows = self.rows_for_step(0)
        with self.policy.reference():
            self.policy.eval()
            _, result, _ = self.rollout(rows)
        scores, valid = (torch.tensor(x, device=self.device) for x in (result.scores, result.valid))
        moments = self.strategy.all_reduce_sum(rl.masked_moments(scores, valid.double()))
        n, mean, m2 = rl.moments_stats(moments)  # over every rank's samples
        if n < 2:
            raise RewardError(f"reward.normalize = reference needs at least 2 scored reference samples, got "
                              f"{n}: check the reward or use normalize: running")
        if m2 == 0:  # every later score would be divided by ~1e-8
            raise RewardError(f"reward.normalize = reference: all {n} reference samples scored {mean:g}, so "
                              f"there is no spread to scale by: use normalize: running or none (a sparse reward "
                              f"the base model never earns does this)")
        self.reward_norm.update_moments(moments)

    # ------------------------------------------------------------------------------------------
    # rollout

    def forward_logprobs(self, exp: Experience, with_values: bool, entropy_grad: bool = False):
        """(logprobs, values, entropy), each (B', T), for the response tokens of ``exp``.

        The entropy is a metric unless it is in the loss (``entropy_grad``): then only is its (B', T, V)
        softmax kept for the backward pass.
        """
        logits, values = self.policy.response_outputs(exp.query, exp.query_mask, exp.response, exp.response_mask,
                                                      with_values)
        logits = logits.float()
        temperature = self.cfg.generation.temperature
        logprobs = rl.logprobs_from_logits(logits, exp.response, temperature)
        with torch.set_grad_enabled(entropy_grad and torch.is_grad_enabled()):
            entropy = rl.entropy_from_logits(logits, temperature)
        return logprobs, values, entropy

    @torch.no_grad()
    def fill_logprobs(self, exp: Experience) -> torch.Tensor:
        """Set ``exp.logprobs``, ``.ref_logprobs`` and ``.values`` (zeros without a critic) of a rollout;
        returns its (B, T) entropy. Microbatches of similar lengths, each cut to its own longest row: less
        padding to compute.

        Without a critic, where the sampler is exact (``train.old_logprobs``), the log-probs and entropies the
        rollout engine recorded while sampling are pi_old's, so the policy pass is skipped (PPO runs it for the
        values anyway). When the pass runs, the sampler's log-probs are kept as ``exp.sampler_logprobs``."""
        critic = self.estimator is not None and self.estimator.uses_critic
        policy_pass = critic or self.recompute_old_logprobs or exp.logprobs is None or exp.entropy is None
        if policy_pass:
            exp.sampler_logprobs = exp.logprobs
            exp.logprobs, exp.entropy = torch.zeros_like(exp.response_mask), torch.zeros_like(exp.response_mask)
        exp.ref_logprobs, exp.values = torch.zeros_like(exp.response_mask), torch.zeros_like(exp.response_mask)
        entropy = exp.entropy
        order = torch.argsort(exp.lengths, stable=True)
        chunks = [(idx, exp.select(idx).trimmed()) for idx in order.split(self.cfg.train.micro_batch_size)]
        for idx, chunk in chunks if policy_pass else ():
            T = chunk.response.shape[1]
            exp.logprobs[idx, :T], v, entropy[idx, :T] = self.forward_logprobs(chunk, critic)
            if v is not None:
                exp.values[idx, :T] = v.float()
        with self.policy.reference():  # entered once: switching the adapter off walks the whole model
            for idx, chunk in chunks:
                exp.ref_logprobs[idx, :chunk.response.shape[1]] = self.forward_logprobs(chunk, False)[0]
        return entropy

    @torch.no_grad()
    def make_experience(self, rows: list[dict]) -> tuple[Experience, dict]:
        cfg = self.cfg
        self.policy.eval()
        t0 = time.perf_counter()
        if self.plays_episodes:  # the environment's rewards come with the episodes
            exp, result, _ = self.rollout(rows)
            t1 = time.perf_counter()
        else:
            exp = self.generate(self.prompt_texts(rows))
            t1 = time.perf_counter()
            _, result = self.score(rows, exp)
        t2 = time.perf_counter()

        raw = torch.tensor(result.scores, dtype=torch.float32, device=self.device)
        valid = torch.tensor(result.valid, device=self.device)
        scores = raw
        # Each shaping step between the reward's own scores and the trained ones is logged as what it is (docs/runs.md)
        n_valid = max(valid.float().sum().item(), 1.0)
        shaping = {}
        if cfg.reward.normalize == "running":  # statistics of every rank's scores: the same on every rank
            self.reward_norm.update_moments(self.strategy.all_reduce_sum(rl.masked_moments(raw, valid.double())))
        if cfg.reward.normalize != "none":
            scores = self.reward_norm.normalize(scores).float()
            shaping["reward/normalized_mean"] = scores[valid].mean().item() if valid.any() else math.nan
        eos = exp.ended
        if cfg.generation.missing_eos_penalty is not None and not self.plays_episodes:
            penalised = ~eos & valid
            scores = torch.where(eos, scores, scores - cfg.generation.missing_eos_penalty)
            shaping["reward/eos_penalized"] = penalised.float().sum().item() / n_valid
            shaping["reward/eos_penalty"] = cfg.generation.missing_eos_penalty * shaping["reward/eos_penalized"]
        if cfg.reward.clip is not None:
            clipped = (scores.abs() > cfg.reward.clip) & valid
            scores = scores.clamp(-cfg.reward.clip, cfg.reward.clip)
            shaping["reward/clipped"] = clipped.float().sum().item() / n_valid
        scores = torch.where(valid, scores, torch.zeros_like(scores))

        entropy = self.fill_logprobs(exp)
        exp.scores = scores
        # Skipped samples (reward.on_error: skip) keep their tokens out of every baseline, loss and statistic;
        # samples the estimator does not train on (DAPO's uninformative groups) out of the update.
        scored = exp.loss_mask * valid.unsqueeze(1).float()
        trained = self.estimator.keep(scores, valid)
        exp.action_mask = mask = exp.loss_mask * trained.unsqueeze(1).float()

        # the KL the estimator trains with, as it uses it: PPO's in the reward, GRPO's k3 loss term, or for
        # information only (Estimator.logged_kl)
        kl_key, kl_estimator, kl_coef = self.estimator.logged_kl(self.kl_ctl.value)
        kl = rl.kl_penalty(exp.logprobs, exp.ref_logprobs, kl_estimator) * scored
        extra = {} if exp.step_rewards is None else {"step_rewards": self.step_rewards(exp, raw, scores, mask)}
        advantages, exp.returns = self.estimator.advantages(scores, exp.logprobs, exp.ref_logprobs, exp.values,
                                                            mask, self.kl_ctl.value, trained, **extra)
        if self.estimator.uses_critic and self.strategy.all_reduce_sum(mask.sum()) >= 2:  # critic-free: scaled
            exp.advantages = self.whiten(advantages, mask)
        else:
            exp.advantages = advantages * mask
        sampling = {} if exp.sampler_logprobs is None else self.correct_sampler_mismatch(exp, mask)
        t3 = time.perf_counter()

        seq_kl = kl.sum(1)[valid]
        kept = scores[valid]
        stats = {
            "reward/mean": kept.mean().item() if len(kept) else math.nan,
            "reward/std": kept.std().item() if len(kept) > 1 else 0.0,
            "reward/raw_mean": raw[valid].mean().item() if len(kept) else math.nan,
            "reward/raw_std": raw[valid].std().item() if len(kept) > 1 else 0.0,
            **shaping,
            **result.metrics,
            kl_key: seq_kl.mean().item() if len(kept) else 0.0,
            **({} if kl_coef is None else {"objective/kl_coef": kl_coef}),
            "objective/entropy": rl.masked_mean(entropy, scored).item(),
            **({"objective/non_score_reward": (-kl_coef * seq_kl).mean().item() if len(kept) else 0.0}
               if self.estimator.kl_in_reward else {}),  # -beta * KL, only where it is in the reward
            "response/length": scored.sum(1)[valid].mean().item() if len(kept) else 0.0,
            "response/eos_rate": eos.float().mean().item(),
            **({"value/mean": rl.masked_mean(exp.values, mask).item()} if self.estimator.uses_critic else {}),
            "train/kept": trained.float().sum().item() / max(valid.float().sum().item(), 1.0),
            **sampling,
            "time/generate": t1 - t0,
            "time/reward": t2 - t1,
            "time/forward": t3 - t2,
        }
        return exp, stats

    def correct_sampler_mismatch(self, exp: Experience, mask: torch.Tensor) -> dict:
        """How far the sampler's log-probs are from the trainer's recomputed pi_old on the tokens trained on
        (the sampler samples in another dtype, kernel or engine); with truncated importance sampling (Yao et al.
        2025) each token's advantage is weighted by w = min(pi_old / pi_sampler, cap) (w > 0, so every clipped
        loss becomes w times itself; GSPO's sequence advantage, the mean of its tokens', by their mean weight)."""
        log_ratio = (exp.logprobs - exp.sampler_logprobs) * mask
        diff = log_ratio.abs()
        stats = {"sampling/logprob_diff_mean": rl.masked_mean(diff, mask).item() if mask.any() else 0.0,
                 "sampling/logprob_diff_max": diff.max().item()}
        if self.tis_cap is not None:
            ratio = torch.exp(log_ratio)
            weight = ratio.clamp(max=self.tis_cap)
            exp.advantages = exp.advantages * weight
            stats["sampling/is_weight_mean"] = rl.masked_mean(weight, mask).item() if mask.any() else 1.0
            stats["sampling/is_clipped"] = rl.masked_mean((ratio > self.tis_cap).float(), mask).item() \
                if mask.any() else 0.0
        return stats

    @staticmethod
    def step_rewards(exp: Experience, raw: torch.Tensor, scores: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        """The per-turn rewards with what normalising and clipping changed in an episode's return (``scores`` -
        ``raw``) added on its last model token, so that each row still sums to its score."""
        step = exp.step_rewards.clone()
        rows = torch.nonzero(mask.sum(1) > 0).flatten()
        if len(rows):
            step[rows, rl.last_token_index(mask[rows])] += (scores - raw)[rows].to(step.dtype)
        return step * mask

    # ------------------------------------------------------------------------------------------
    # update

    def update(self, exp: Experience) -> dict:
        """``train.epochs`` passes over ``exp``; each pass reshuffles it into minibatches of microbatches."""
        cfg, t, sizes = self.cfg.ppo, self.cfg.train, self.sizes
        self.policy.train()
        B = exp.query.shape[0]
        local_mini = t.mini_batch_size // sizes.world_size
        # Detached statistics accumulate on the device and are read once, after the last microbatch: an .item()
        # per statistic and microbatch would wait for the device each time.
        zero = torch.zeros((), dtype=torch.float64, device=self.device)
        sums: dict[str, torch.Tensor] = defaultdict(lambda: zero.clone())
        total_tokens = zero.clone()
        grad_norms = []
        for _ in range(t.epochs):
            perm = torch.randperm(B, device=self.device)
            for mb_start in range(0, B, local_mini):
                mb_idx = perm[mb_start:mb_start + local_mini]
                mb_idx = mb_idx[torch.argsort(exp.lengths[mb_idx], stable=True)]  # microbatches of like lengths
                # Every microbatch divides by the minibatch's token and sequence counts, so the accumulated
                # gradient is the minibatch's whatever the microbatch size. Only rows trained on count (not
                # skipped samples nor dropped groups, whose mask is all zero). Over ranks, whose gradients are
                # averaged, each divisor is the global count / world size.
                mb_mask = exp.loss_mask[mb_idx]
                counts = torch.stack([mb_mask.sum(), (mb_mask.sum(1) > 0).sum().to(mb_mask.dtype)]).float()
                num_tokens, num_sequences = (self.strategy.all_reduce_sum(counts) / sizes.world_size).clamp(min=1.0)
                starts = range(0, local_mini, t.micro_batch_size)
                for j, micro_start in enumerate(starts):
                    mb = exp.select(mb_idx[micro_start:micro_start + t.micro_batch_size]).trimmed()
                    critic = self.estimator.uses_critic
                    logprobs, vpred, entropy = self.forward_logprobs(mb, critic, entropy_grad=cfg.ent_coef != 0)
                    pg_loss, pg_stats = self.estimator.policy_loss(logprobs, mb.logprobs, mb.advantages,
                                                                   mb.loss_mask, num_tokens, num_sequences)
                    ent = self.estimator.reduce(entropy, mb.loss_mask, num_tokens, num_sequences)
                    loss = pg_loss - cfg.ent_coef * ent
                    if critic:
                        vf_loss, vf_stats = rl.value_loss(vpred.float(), mb.values, mb.returns, mb.loss_mask,
                                                          cfg.clip_range_value, num_tokens)
                        loss = loss + cfg.vf_coef * vf_loss
                    if self.estimator.loss_kl_coef:  # GRPO: KL to the reference as a loss term (k3)
                        kl_loss = self.estimator.reduce(rl.kl_penalty(logprobs, mb.ref_logprobs, "k3"), mb.loss_mask,
                                                        num_tokens, num_sequences)
                        loss = loss + self.estimator.loss_kl_coef * kl_loss
                        sums["loss/kl"] += kl_loss.detach().double() * num_tokens.double()
                    boundary = j == len(starts) - 1
                    self.strategy.backward(loss, boundary)
                    grad_norm = self.strategy.step(boundary)
                    if grad_norm is not None:
                        grad_norms.append(grad_norm)

                    n = mb.loss_mask.sum().double()
                    total_tokens += n
                    # pg_loss etc. are already scaled by n / num_tokens; the *_stats are microbatch means.
                    scale = num_tokens.double()
                    sums["loss/policy"] += pg_loss.detach().double() * scale
                    if critic:
                        sums["loss/value"] += vf_loss.detach().double() * scale
                        sums["value/clipfrac"] += vf_stats["clipfrac"].double() * n
                    sums["policy/entropy"] += ent.detach().double() * scale
                    sums["policy/clipfrac"] += pg_stats["clipfrac"].double() * n
                    sums["policy/approx_kl"] += pg_stats["approx_kl"].double() * n
                    sums["policy/ratio"] += pg_stats["ratio"].double() * n
        # Token-weighted over all ranks: sums and counts are reduced separately.
        keys = sorted(sums)
        reduced = self.strategy.all_reduce_sum(torch.stack([sums[k] for k in keys] + [total_tokens]))
        total = max(reduced[-1].item(), 1.0)
        stats = {k: v / total for k, v in zip(keys, reduced[:-1].tolist())}
        stats["optim/grad_norm"] = sum(grad_norms) / len(grad_norms)
        stats["optim/lr"] = self.scheduler.get_last_lr()[0]
        return stats

    def train_step(self) -> dict:
        t0 = time.perf_counter()
        exp, stats = self.make_experience(self.rows_for_step(self.step))
        t1 = time.perf_counter()
        stats.update(self.update(exp))
        stats["time/update"] = time.perf_counter() - t1
        stats["time/step"] = time.perf_counter() - t0
        stats["memory/peak_gib"] = self.strategy.peak_memory_gib()
        stats = self.strategy.all_reduce_mean(stats)  # before the KL update: every rank moves beta alike
        self.check_finite(self.step + 1, stats)
        if self.estimator.kl_in_reward:
            self.kl_ctl.update(stats["objective/kl"], self.cfg.train.rollout_batch_size)
        self.step += 1
        return stats

    def progress(self, stats: dict) -> dict:
        kl = stats.get("objective/kl", stats.get("info/kl_ref"))
        return {"reward": f"{stats['reward/mean']:.3f}", **({} if kl is None else {"kl": f"{kl:.3f}"})}

    def apply_settings(self, values: dict) -> None:
        """Also where the online trainer holds its own copy: ppo.init_kl_coef replaces the KL controller's current
        beta (the adaptive controller adapts on from it), critic_free.kl_coef the KL loss term's weight."""
        super().apply_settings(values)
        if "ppo.init_kl_coef" in values:
            self.kl_ctl.value = float(values["ppo.init_kl_coef"])
        if "critic_free.kl_coef" in values and getattr(self.estimator, "loss_kl", False):
            self.estimator.loss_kl_coef = float(values["critic_free.kl_coef"])

    def extra_state(self) -> dict:
        return {"kl_ctl": self.kl_ctl.state_dict(), "reward_norm": self.reward_norm.state_dict(),
                "estimator": self.estimator.state_dict()}

    def load_extra_state(self, state: dict) -> None:
        self.kl_ctl.load_state_dict(state["kl_ctl"])
        self.reward_norm.load_state_dict(state["reward_norm"])
        self.estimator.load_state_dict(state["estimator"])


def sampler_is_exact(cfg: Config) -> bool:
    """Whether the rollout engine's recorded log-probs are the trainer's within float rounding (1e-5, tested):
    llmrl's fast engine, eager, on float32 weights over a full-precision base. In bf16/fp16, with the compiled
    static-cache step, over a quantized base or from vLLM, a token-by-token decode does not give the numbers of
    the trainer's one forward over the whole sequence (docs/algorithms.md has the measured gaps)."""
    g, m = cfg.generation, cfg.model
    return g.engine == "fast" and not g.compile and m.dtype == "float32" and m.quantization is None


def importance_sampling_cap(cfg: Config) -> float | None:
    """The cap of truncated importance sampling, or None when it is off (``train.importance_sampling``; null: on
    with vLLM, as TRL's vllm_importance_sampling_correction)."""
    t = cfg.train
    on = cfg.generation.engine == "vllm" if t.importance_sampling is None else t.importance_sampling
    return t.importance_sampling_cap if on else None


def build_trainer(cfg: Config, strategy, run_dir: Path | None = None) -> OnlineTrainer:
    """An online trainer (``cfg.algorithm``'s estimator: PPO, GRPO, ...) on ``strategy`` as ``cfg`` says: seeded, policy and rewards built, prompts loaded.

    ``run_dir`` defaults to ``run.output_dir``. ``llmrl.api.run`` does more in between (run directory,
    warm start, prompt-length checks, DPO); evaluation, tests and benchmarks build one with this.
    """
    from llmrl.data.prompts import load_prompts
    from llmrl.models.policy import build_policy
    from llmrl.packages import check_packages
    from llmrl.rewards.base import build_eval_reward, build_reward

    check_packages(cfg)  # before the model loads
    strategy.seed_everything(cfg.run.seed)
    policy, tokenizer = build_policy(cfg.model, cfg.lora, strategy.device, cfg.ppo.critic == "separate")
    train_rows, eval_rows = load_prompts(cfg.data, cfg.env)
    reward = None if cfg.env.name else build_reward(cfg.reward, strategy.device)
    return OnlineTrainer(cfg, policy, tokenizer, reward, train_rows, eval_rows, strategy,
                         Path(run_dir or cfg.run.output_dir), build_eval_reward(cfg.reward))
