"""The PPO trainer: rollout -> score -> advantages -> PPO epochs over shuffled minibatches.

The maths lives in ``llmrl.rl`` (pure torch); devices and processes go through ``self.strategy``; this
module owns the loop, the optimizer, checkpoints and metrics.
"""
from __future__ import annotations

import errno
import json
import math
import shutil
import time
from collections import defaultdict
from contextlib import nullcontext
from pathlib import Path

import torch
from safetensors.torch import load_file, save_file

from llmrl import rl
from llmrl.algorithms import make_estimator
from llmrl.chat import as_completions, content, render_prompts
from llmrl.checkpoint import (COMPLETE_MARK, begin_checkpoint, commit_checkpoint, load_state_file, prune_checkpoints,
                              step_dir_name)
from llmrl.config import Config, ConfigError, RunStopped, save_config
from llmrl.engine import RolloutEngine
from llmrl.policy import context_length, fingerprint_mismatch
from llmrl.rewards import CombinedReward, RewardError, RewardResult
from llmrl.rollout import Experience, decode_completions, generate
from llmrl.vllm_engine import VLLMEngine


def lr_lambda(schedule: str, warmup_steps: int, total_steps: int):
    def factor(step: int) -> float:
        if step < warmup_steps:
            return (step + 1) / warmup_steps
        progress = min(1.0, (step - warmup_steps) / max(1, total_steps - warmup_steps))
        if schedule == "linear":
            return 1.0 - progress
        if schedule == "cosine":
            return 0.5 * (1.0 + math.cos(math.pi * progress))
        return 1.0
    return factor


def make_engine(cfg: Config, tokenizer, strategy, context: int | None = None):
    """The rollout decoder ``generation.engine`` names; None means transformers' ``model.generate``."""
    g = cfg.generation
    if g.engine == "fast":
        return RolloutEngine(tokenizer.eos_token_id, tokenizer.pad_token_id, compile=g.compile,
                             share_prompts=cfg.model.share_prompts)
    if g.engine == "vllm":
        return VLLMEngine(cfg.model, g, cfg.data.max_prompt_length, cfg.run.seed + strategy.rank,
                          tokenizer.eos_token_id, tokenizer.pad_token_id, context, strategy.gathered)
    return None


class PPOTrainer:
    def __init__(self, cfg: Config, policy, tokenizer, reward: CombinedReward, train_rows: list[dict],
                 eval_rows: list[dict], strategy, run_dir: Path, eval_reward: CombinedReward | None = None):
        self.cfg = cfg
        self.policy = policy
        self.tokenizer = tokenizer
        self.reward = reward
        self.eval_reward = eval_reward or reward  # reward.eval_function, when set, scores evaluations
        self.reward_norm = rl.RunningMeanStd()  # used when reward.normalize is running or reference
        self.train_rows = train_rows
        self.eval_rows = eval_rows
        self.strategy = strategy
        self.device = strategy.device
        self.run_dir = Path(run_dir)
        self.sizes = cfg.sizes(strategy.world_size)
        if len(train_rows) < cfg.ppo.rollout_batch_size // cfg.group_size:
            raise ConfigError(f"data.source has {len(train_rows)} prompts, fewer than the "
                              f"{cfg.ppo.rollout_batch_size // cfg.group_size} one rollout needs: add prompts or "
                              f"lower ppo.rollout_batch_size")
        self.params = policy.trainable_parameters()
        p = cfg.ppo
        self.optimizer = torch.optim.AdamW(self.params, lr=p.lr, weight_decay=p.weight_decay)
        self.scheduler = torch.optim.lr_scheduler.LambdaLR(
            self.optimizer, lr_lambda(p.lr_schedule, p.warmup_steps, self.sizes.optimizer_steps))
        accum, micro = self.accumulation()
        # DeepSpeed wraps the optimizer (or replaces it): train with what the strategy returns
        self.optimizer, self.scheduler = strategy.prepare(policy, self.optimizer, self.scheduler, p.max_grad_norm,
                                                          accum, micro)
        self.kl_ctl = rl.make_kl_controller(p.init_kl_coef, p.adaptive_kl, p.kl_target, p.kl_horizon)
        self.estimator = make_estimator(cfg, strategy.all_reduce_sum)
        self.engine = make_engine(cfg, tokenizer, strategy, context_length(policy.model))
        self.step = 0
        self.process_started = time.perf_counter()  # the run command sets its own start
        self.wall_seconds_before = 0.0  # spent by the processes this run was resumed from
        self.eval_reward_before: float | None = None
        self.last_eval_samples: list[tuple] = []  # (prompt, completion, reward) of the latest evaluation

    def accumulation(self) -> tuple[int, int]:
        """(microbatches per optimizer step on one rank, sequences per microbatch)."""
        return self.sizes.grad_accum_steps, self.cfg.ppo.micro_batch_size

    def generate(self, prompts: list[str], greedy: bool = False) -> Experience:
        if isinstance(self.engine, VLLMEngine):  # vLLM decodes: the model is only read, block by block
            context, kwargs = nullcontext(), {}
        else:
            context, kwargs = self.strategy.generation_context(self.policy), self.strategy.generate_kwargs
        with context:
            return generate(self.policy.model, self.tokenizer, prompts, self.cfg.generation, self.device,
                            greedy=greedy, engine=self.engine, **kwargs)

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
        B = self.cfg.ppo.rollout_batch_size // k
        per_epoch = len(self.train_rows) // B
        epoch, offset = divmod(step, per_epoch)
        g = torch.Generator().manual_seed(self.cfg.run.seed * 100_003 + epoch)
        perm = torch.randperm(len(self.train_rows), generator=g)[offset * B:(offset + 1) * B]
        local = self.sizes.local_rollout_batch_size // k
        mine = perm[self.strategy.rank * local:(self.strategy.rank + 1) * local]
        return [self.train_rows[i] for i in mine.tolist() for _ in range(k)]

    def prompt_texts(self, rows: list[dict]) -> list[str]:
        """The texts the policy continues: plain prompts, or conversations through the chat template."""
        return render_prompts(self.tokenizer, [r[self.cfg.data.prompt_column] for r in rows])

    def score(self, rows: list[dict], exp: Experience, reward: CombinedReward | None = None
              ) -> tuple[list[str], RewardResult]:
        """Completion texts and the (training) reward's scores; extra dataset columns go in as kwargs.

        The reward gets the prompts as the data holds them and, for conversations, each completion as TRL's
        list of one assistant message."""
        column = self.cfg.data.prompt_column
        prompts = [r[column] for r in rows]
        completions = decode_completions(self.tokenizer, exp)
        extra = {k: [r[k] for r in rows] for k in rows[0] if k != column}
        completion_ids = [ids[m.bool()].tolist() for ids, m in zip(exp.response, exp.response_mask)]
        reward = reward or self.reward
        return completions, reward(prompts, as_completions(prompts, completions), completion_ids=completion_ids,
                                   **extra)

    @torch.no_grad()
    def fit_reward_normalizer(self) -> None:
        """reward.normalize: reference: the mean/std of scores of the reference policy's completions."""
        rows = self.rows_for_step(0)
        with self.policy.reference():
            self.policy.eval()
            exp = self.generate(self.prompt_texts(rows))
        _, result = self.score(rows, exp)
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

        Without a critic, the log-probs and entropies the rollout engine recorded while sampling are pi_old's,
        so the policy pass is skipped (PPO runs it for the values anyway)."""
        critic = self.estimator is not None and self.estimator.uses_critic
        policy_pass = critic or exp.logprobs is None or exp.entropy is None
        if policy_pass:
            exp.logprobs, exp.entropy = torch.zeros_like(exp.response_mask), torch.zeros_like(exp.response_mask)
        exp.ref_logprobs, exp.values = torch.zeros_like(exp.response_mask), torch.zeros_like(exp.response_mask)
        entropy = exp.entropy
        order = torch.argsort(exp.lengths, stable=True)
        chunks = [(idx, exp.select(idx).trimmed()) for idx in order.split(self.cfg.ppo.micro_batch_size)]
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
        exp = self.generate(self.prompt_texts(rows))
        t1 = time.perf_counter()
        _, result = self.score(rows, exp)
        t2 = time.perf_counter()

        raw = torch.tensor(result.scores, dtype=torch.float32, device=self.device)
        valid = torch.tensor(result.valid, device=self.device)
        scores = raw
        if cfg.reward.normalize == "running":  # statistics of every rank's scores: the same on every rank
            self.reward_norm.update_moments(self.strategy.all_reduce_sum(rl.masked_moments(raw, valid.double())))
        if cfg.reward.normalize != "none":
            scores = self.reward_norm.normalize(scores).float()
        eos = exp.ended
        if cfg.generation.missing_eos_penalty is not None:
            scores = torch.where(eos, scores, scores - cfg.generation.missing_eos_penalty)
        if cfg.reward.clip is not None:
            scores = scores.clamp(-cfg.reward.clip, cfg.reward.clip)
        scores = torch.where(valid, scores, torch.zeros_like(scores))

        entropy = self.fill_logprobs(exp)
        exp.scores = scores
        # Skipped samples (reward.on_error: skip) keep their tokens out of every baseline, loss and statistic;
        # samples the estimator does not train on (DAPO's uninformative groups) out of the update.
        scored = exp.response_mask * valid.unsqueeze(1).float()
        trained = self.estimator.keep(scores, valid)
        exp.response_mask = mask = exp.response_mask * trained.unsqueeze(1).float()

        kl = rl.kl_penalty(exp.logprobs, exp.ref_logprobs, cfg.ppo.kl_estimator) * scored
        advantages, exp.returns = self.estimator.advantages(scores, exp.logprobs, exp.ref_logprobs, exp.values,
                                                            mask, self.kl_ctl.value, trained)
        if self.estimator.uses_critic and self.strategy.all_reduce_sum(mask.sum()) >= 2:  # critic-free: scaled
            exp.advantages = self.whiten(advantages, mask)
        else:
            exp.advantages = advantages * mask
        t3 = time.perf_counter()

        seq_kl = kl.sum(1)[valid]
        kept = scores[valid]
        stats = {
            "reward/mean": kept.mean().item() if len(kept) else math.nan,
            "reward/std": kept.std().item() if len(kept) > 1 else 0.0,
            "reward/raw_mean": raw[valid].mean().item() if len(kept) else math.nan,
            **result.metrics,
            "objective/kl": seq_kl.mean().item() if len(kept) else 0.0,
            "objective/kl_coef": self.kl_ctl.value,
            "objective/entropy": rl.masked_mean(entropy, scored).item(),
            "objective/non_score_reward": (-self.kl_ctl.value * seq_kl).mean().item() if len(kept) else 0.0,
            "response/length": scored.sum(1)[valid].mean().item() if len(kept) else 0.0,
            "response/eos_rate": eos.float().mean().item(),
            "value/mean": rl.masked_mean(exp.values, mask).item(),
            "train/kept": trained.float().sum().item() / max(valid.float().sum().item(), 1.0),
            "time/generate": t1 - t0,
            "time/reward": t2 - t1,
            "time/forward": t3 - t2,
        }
        return exp, stats

    # ------------------------------------------------------------------------------------------
    # update

    def update(self, exp: Experience) -> dict:
        """``ppo_epochs`` passes over ``exp``; each pass reshuffles it into minibatches of microbatches."""
        cfg, sizes = self.cfg.ppo, self.sizes
        self.policy.train()
        B = exp.query.shape[0]
        local_mini = cfg.mini_batch_size // sizes.world_size
        # Detached statistics accumulate on the device and are read once, after the last microbatch: an .item()
        # per statistic and microbatch would wait for the device each time.
        zero = torch.zeros((), dtype=torch.float64, device=self.device)
        sums: dict[str, torch.Tensor] = defaultdict(lambda: zero.clone())
        total_tokens = zero.clone()
        grad_norms = []
        for _ in range(cfg.ppo_epochs):
            perm = torch.randperm(B, device=self.device)
            for mb_start in range(0, B, local_mini):
                mb_idx = perm[mb_start:mb_start + local_mini]
                mb_idx = mb_idx[torch.argsort(exp.lengths[mb_idx], stable=True)]  # microbatches of like lengths
                # Every microbatch divides by the minibatch's token count, so the accumulated gradient is
                # the token mean over the whole minibatch whatever the microbatch size. Over ranks, whose
                # gradients are averaged, the divisor is the global count / world size.
                num_tokens = (self.strategy.all_reduce_sum(exp.response_mask[mb_idx].sum()).float()
                              / sizes.world_size).clamp(min=1.0)
                starts = range(0, local_mini, cfg.micro_batch_size)
                for j, micro_start in enumerate(starts):
                    mb = exp.select(mb_idx[micro_start:micro_start + cfg.micro_batch_size]).trimmed()
                    critic = self.estimator.uses_critic
                    logprobs, vpred, entropy = self.forward_logprobs(mb, critic, entropy_grad=cfg.ent_coef != 0)
                    pg_loss, pg_stats = self.estimator.policy_loss(logprobs, mb.logprobs, mb.advantages,
                                                                   mb.response_mask, num_tokens, local_mini)
                    ent = rl.masked_mean(entropy, mb.response_mask, num_tokens)
                    loss = pg_loss - cfg.ent_coef * ent
                    if critic:
                        vf_loss, vf_stats = rl.value_loss(vpred.float(), mb.values, mb.returns, mb.response_mask,
                                                          cfg.clip_range_value, num_tokens)
                        loss = loss + cfg.vf_coef * vf_loss
                    if self.estimator.loss_kl_coef:  # GRPO: KL to the reference as a loss term (k3)
                        kl_loss = rl.masked_mean(rl.kl_penalty(logprobs, mb.ref_logprobs, "k3"), mb.response_mask,
                                                 num_tokens)
                        loss = loss + self.estimator.loss_kl_coef * kl_loss
                        sums["loss/kl"] += kl_loss.detach().double() * num_tokens.double()
                    boundary = j == len(starts) - 1
                    self.strategy.backward(loss, boundary)
                    grad_norm = self.strategy.step(boundary)
                    if grad_norm is not None:
                        grad_norms.append(grad_norm)

                    n = mb.response_mask.sum().double()
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
            self.kl_ctl.update(stats["objective/kl"], self.cfg.ppo.rollout_batch_size)
        self.step += 1
        return stats

    def check_finite(self, step: int, stats: dict) -> None:
        """Stop the run (every rank alike) when the update left a non-finite trainable weight: nothing of this
        step is saved, and the last checkpoint stays the good one."""
        trainable = [p for p in self.policy.parameters() if p.requires_grad]
        with self.strategy.gathered(trainable):
            bad = sum(int(not torch.isfinite(p).all()) for p in trainable)
        if self.strategy.all_reduce_sum(torch.tensor(float(bad), device=self.device)).item() == 0:
            return
        from llmrl.checkpoint import latest_checkpoint

        last = latest_checkpoint(self.run_dir)
        shown = ", ".join(f"{k} {stats[k]:.3g}" for k in ("loss/policy", "loss/dpo", "optim/grad_norm")
                          if isinstance(stats.get(k), float))
        raise RunStopped(f"step {step}: training diverged: {bad} trainable tensors hold NaN or inf ({shown}); nothing "
                         f"of this step was saved. Last good checkpoint: {last or 'none yet'}. Lower ppo.lr (or clip "
                         f"harder with ppo.max_grad_norm) and {'pass --resume' if last else 'start again'}")

    # ------------------------------------------------------------------------------------------
    # evaluation

    @torch.no_grad()
    def evaluate(self, batch_size: int = 64) -> dict:
        """Greedy completions of the held-out prompts; mean raw reward and a few samples (a conversation is shown
        by its last message)."""
        self.policy.eval()
        scores, samples, skipped = [], [], 0
        for start in range(0, len(self.eval_rows), batch_size):
            rows = self.eval_rows[start:start + batch_size]
            exp = self.generate(self.prompt_texts(rows), greedy=True)
            completions, result = self.score(rows, exp, self.eval_reward)
            kept = [s for s, ok in zip(result.scores, result.valid) if ok]
            scores.extend(kept)
            skipped += len(rows) - len(kept)
            samples.extend((content(r[self.cfg.data.prompt_column]), c, s if ok else None)
                           for r, c, s, ok in zip(rows, completions, result.scores, result.valid))
        mean = sum(scores) / len(scores) if scores else math.nan
        self.last_eval_samples = samples
        return {"eval/reward": mean, "eval/skipped": skipped, "samples": samples[:5]}

    # ------------------------------------------------------------------------------------------
    # checkpoints

    def save_checkpoint(self, target: Path) -> Path:
        """Every rank calls this: the adapter and value head (gathered under ZeRO-3) from the main rank, the
        optimizer state from the strategy (sharded under DeepSpeed), an RNG state per rank; written into a
        temporary folder that the main rank renames into place once everything is there.

        A write that fails (a full disk) on any rank stops the run on every rank: the temporary folder is removed,
        the checkpoints already there stay as they were."""
        s = self.strategy
        target = Path(target)
        tmp = target.parent / f".tmp-{target.name}"
        failure: list[BaseException] = []

        def attempt(write, collective: bool = False) -> None:
            if not failure or collective:  # a collective write runs on every rank, or the others would wait
                try:
                    write()
                except (OSError, RuntimeError) as e:  # torch.save reports a full disk as a RuntimeError
                    failure.append(e)

        def write_weights() -> None:
            self.policy.model.save_pretrained(tmp / "adapter")
            save_file({k: v.detach().cpu().contiguous() for k, v in self.policy.value_head.state_dict().items()},
                      tmp / "value_head.safetensors")

        def write_rest() -> None:
            self.tokenizer.save_pretrained(tmp / "tokenizer")
            save_config(self.cfg, tmp / "config.yaml")
            (tmp / "base_fingerprint.json").write_text(json.dumps(self.policy.base_fingerprint))

        engine_state: dict = {}
        if s.is_main:
            attempt(lambda: begin_checkpoint(tmp))
        s.barrier()
        trainable = [p for p in self.policy.parameters() if p.requires_grad]
        with s.gathered(trainable):
            if s.is_main:
                attempt(write_weights)
        if s.is_main:
            attempt(write_rest)
        attempt(lambda: engine_state.update(s.save_state(tmp)), collective=True)
        attempt(lambda: torch.save(s.rng_state(), tmp / f"rng_rank{s.rank}.pt"))
        self._stop_if_a_write_failed(failure, target, tmp)
        if s.is_main:
            attempt(lambda: torch.save({  # written last: its presence marks a complete checkpoint
                "step": self.step,
                **engine_state,
                "kl_ctl": self.kl_ctl.state_dict(),
                "eval_reward_before": self.eval_reward_before,
                "reward_norm": self.reward_norm.state_dict(),
                "estimator": self.estimator.state_dict() if self.estimator else {},
                "wall_seconds": self.wall_seconds(),
            }, tmp / COMPLETE_MARK))
            attempt(lambda: commit_checkpoint(tmp, target))
            if not failure:
                prune_checkpoints(self.run_dir, self.cfg.run.keep_last)
        self._stop_if_a_write_failed(failure, target, tmp)
        return target

    def _stop_if_a_write_failed(self, failure: list, target: Path, tmp: Path) -> None:
        """Agree over the ranks whether a checkpoint write failed; if one did, clean up and stop them all."""
        failed = self.strategy.all_reduce_sum(torch.tensor(float(bool(failure)), device=self.device)).item()
        self.strategy.barrier()
        if not failed:
            return
        if self.strategy.is_main:
            shutil.rmtree(tmp, ignore_errors=True)
        from llmrl.checkpoint import latest_checkpoint

        try:
            free_bytes = shutil.disk_usage(target.parent).free
            free = f"{free_bytes / 2**20:,.1f} MB free there"
        except OSError:
            free_bytes, free = None, "free space unknown"
        if not failure:
            why = "another rank could not write its part"
        elif getattr(failure[0], "errno", None) == errno.ENOSPC or (free_bytes is not None and free_bytes < 2**20):
            why = "no space left on the device"  # torch.save says "enforce fail at inline_container.cc"
        else:
            why = (str(failure[0]).strip().splitlines() or [type(failure[0]).__name__])[0][:160]
        last = latest_checkpoint(self.run_dir)
        raise RunStopped(f"step {self.step}: could not write checkpoint {target} ({why}; {free}): nothing was "
                         f"replaced and the half-written folder was removed. Last good checkpoint: "
                         f"{last or 'none yet'}. Free some space (or choose another run.output_dir) and "
                         f"{'pass --resume' if last else 'start again'}")

    def wall_seconds(self) -> float:
        """Wall time of the whole run: earlier processes (saved in checkpoints) plus this one."""
        return self.wall_seconds_before + time.perf_counter() - self.process_started

    def set_learning_rate(self, lr: float) -> None:
        """A new base learning rate from the current step on (``ppo.lr`` changed on resume): the schedule's factor
        stays where the run is."""
        self.scheduler.base_lrs = [lr] * len(self.scheduler.base_lrs)
        factors = [f(self.scheduler.last_epoch) for f in self.scheduler.lr_lambdas]
        for group, factor in zip(self.optimizer.param_groups, factors):
            group["initial_lr"], group["lr"] = lr, lr * factor

    def check_base(self, path: Path) -> None:
        """Refuses checkpoint ``path`` when its adapter was trained on another base than this policy's."""
        saved = Path(path) / "base_fingerprint.json"
        if saved.is_file() and self.policy.base_fingerprint is not None:
            try:
                fingerprint = json.loads(saved.read_text())
                why = fingerprint_mismatch(fingerprint, self.policy.base_fingerprint)
            except (ValueError, KeyError, TypeError, AttributeError) as e:
                raise ConfigError(f"checkpoint {path}: base_fingerprint.json is damaged ({type(e).__name__}: "
                                  f"{str(e)[:100]}): move this folder away to resume from the checkpoint before it"
                                  ) from None
            if why:
                raise ConfigError(f"checkpoint {path} was trained on another base than model.name_or_path = "
                                  f"{self.cfg.model.name_or_path!r} ({why}): point model.name_or_path at the base "
                                  f"it was trained on")

    def load_weights(self, path: Path) -> None:
        """The adapter and value head of checkpoint ``path`` (whatever strategy wrote it)."""
        from peft.utils import set_peft_model_state_dict

        path = Path(path)
        self.check_base(path)
        adapter = read_weights(path / "adapter" / "adapter_model.safetensors", self.device)
        result = set_peft_model_state_dict(self.policy.model, adapter)
        if getattr(result, "unexpected_keys", None):
            raise ConfigError(f"checkpoint {path} does not match this model (unexpected adapter weights "
                              f"{result.unexpected_keys[:3]}): use the config it was trained with")
        try:
            self.policy.value_head.load_state_dict(read_weights(path / "value_head.safetensors", self.device))
        except RuntimeError as e:  # wrong shapes
            raise ConfigError(f"checkpoint {path}: value_head.safetensors does not fit this model "
                              f"({str(e).splitlines()[0][:150]}): use the config it was trained with") from None

    def load_checkpoint(self, path: Path) -> None:
        path = Path(path)
        state = load_state_file(path / COMPLETE_MARK)
        if self.strategy.loads_module_weights:
            self.check_base(path)
        else:
            self.load_weights(path)
        self.strategy.load_state(path, state)
        rng = path / f"rng_rank{self.strategy.rank}.pt"
        if rng.is_file() and state.get("world_size", 1) == self.strategy.world_size:
            self.strategy.set_rng_state(load_state_file(rng))
        else:  # another number of ranks: the run continues, but cannot repeat the original's samples
            self.strategy.seed_everything(self.cfg.run.seed + 7919 * state["step"])
        self.kl_ctl.load_state_dict(state["kl_ctl"])
        self.step = state["step"]
        self.wall_seconds_before = float(state.get("wall_seconds", 0.0))
        self.eval_reward_before = state["eval_reward_before"]
        self.reward_norm.load_state_dict(state["reward_norm"])
        if self.estimator:
            self.estimator.load_state_dict(state["estimator"])

    def checkpoint_path(self, step: int) -> Path:
        return self.run_dir / step_dir_name(step)


def read_weights(path: Path, device) -> dict:
    """A checkpoint's safetensors file, or a ConfigError naming it (missing, truncated, not finite)."""
    path = Path(path)
    if not path.is_file():
        raise ConfigError(f"checkpoint {path.parent.parent if path.parent.name == 'adapter' else path.parent}: "
                          f"{path.name} is missing: move this folder away to resume from the checkpoint before it")
    try:
        weights = load_file(path, device=str(device))
    except Exception as e:  # safetensors raises its own error type for a truncated or damaged file
        raise ConfigError(f"checkpoint file {path} is damaged ({str(e).splitlines()[0][:120]}): move its "
                          f"checkpoint folder away to resume from the one before it") from None
    bad = [k for k, v in weights.items() if v.is_floating_point() and not torch.isfinite(v).all()]
    if bad:
        raise ConfigError(f"checkpoint file {path} holds NaN or inf ({bad[0]}): the run had diverged when it was "
                          f"written; move its checkpoint folder away to resume from the one before it")
    return weights


__all__ = ["PPOTrainer", "RewardError"]


def build_trainer(cfg: Config, strategy, run_dir: Path | None = None) -> PPOTrainer:
    """A PPO trainer on ``strategy`` as ``cfg`` says: seeded, policy and rewards built, prompts loaded.

    ``run_dir`` defaults to ``run.output_dir``. ``llmrl.train.run`` does more in between (run directory,
    warm start, prompt-length checks, DPO); evaluation, tests and benchmarks build one with this.
    """
    from llmrl.data import load_prompts
    from llmrl.policy import build_policy
    from llmrl.rewards import build_eval_reward, build_reward

    strategy.seed_everything(cfg.run.seed)
    policy, tokenizer = build_policy(cfg.model, cfg.lora, strategy.device)
    train_rows, eval_rows = load_prompts(cfg.data)
    return PPOTrainer(cfg, policy, tokenizer, build_reward(cfg.reward, strategy.device), train_rows, eval_rows,
                      strategy, Path(run_dir or cfg.run.output_dir), build_eval_reward(cfg.reward))
