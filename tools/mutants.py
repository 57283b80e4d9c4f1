"""Mutation check: does a wrong line in the trainer, an estimator, the rewards or checkpointing fail the fast tests?

    python tools/mutants.py                 # every mutant, against FAST_TESTS; prints a table and the kill count
    python tools/mutants.py --only 3 7      # some of them
    python tools/mutants.py --list          # what each one changes

Each mutant replaces one exact piece of source (it must occur once) in a copy of the tracked files, then runs
the fast tests there (``-x``: the first failure kills it). The original tree is never touched. A mutant that
survives names a line no fast test pins. Not run in CI (about a minute per surviving mutant on 2 cores).
"""
from __future__ import annotations

import argparse
import os
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
FAST_TESTS = ["tests/test_wiring.py", "tests/test_aggregation.py", "tests/test_rl_math.py", "tests/test_estimators.py",
              "tests/test_algorithms.py", "tests/test_rewards_data.py", "tests/test_api.py", "tests/test_engine.py",
              "tests/test_config.py", "tests/test_policy.py",
              "tests/test_algorithm_wording.py", "tests/test_tune_space.py", "tests/test_tune_search.py",
              "tests/test_tune_report.py", "tests/test_tune_pbt.py", "tests/test_kto.py", "tests/test_ilql.py",
              "tests/test_ilql_sampling.py", "tests/test_ilql_distill.py"]

O, A = "llmrl/trainers/online.py", "llmrl/algorithms"
# (file, what is there, what replaces it, what the mutant means)
MUTANTS = [
    (O, "exp.advantages = self.whiten(advantages, mask)", "exp.advantages = advantages * mask",
     "PPO advantages no longer whitened"),
    (O, "loss = loss + self.estimator.loss_kl_coef * kl_loss", "loss = loss - self.estimator.loss_kl_coef * kl_loss",
     "GRPO's k3 KL term with the wrong sign"),
    (O, "scores = torch.where(eos, scores, scores - cfg.generation.missing_eos_penalty)",
     "scores = torch.where(eos, scores, scores + cfg.generation.missing_eos_penalty)",
     "the missing-EOS penalty turned into a bonus"),
    (O, "loss = pg_loss - cfg.ent_coef * ent", "loss = pg_loss + cfg.ent_coef * ent", "entropy bonus sign flipped"),
    (f"{A}/dapo.py", "clip_range_high=self.clip_high,", "clip_range_high=None,", "DAPO loses clip-higher"),
    (f"{A}/gspo.py", "return rl.sequence_policy_loss(logprobs, old_logprobs, advantages, mask, self.clip_low, "
                     "self.clip_high,\n                                       num_sequences)",
     "return rl.policy_loss(logprobs, old_logprobs, advantages, mask, self.ppo.clip_range, num_tokens)",
     "GSPO falls back to the token-level loss"),
    (f"{A}/grpo.py", "rl.grpo_advantages(scores, self.group_size, self.scale,",
     "rl.grpo_advantages(scores, self.group_size, \"group\",", "GRPO ignores critic_free.scale"),
    (O, "loss = loss + cfg.vf_coef * vf_loss", "loss = loss + vf_loss", "the value loss loses ppo.vf_coef"),
    (O, "scores = scores.clamp(-cfg.reward.clip, cfg.reward.clip)", "scores = scores.clamp(-cfg.reward.clip, None)",
     "reward.clip clips only from below"),
    (O, "scores = torch.where(valid, scores, torch.zeros_like(scores))", "scores = scores",
     "skipped samples keep their score"),
    (O, "rl.kl_penalty(logprobs, mb.ref_logprobs, \"k3\")", "rl.kl_penalty(logprobs, mb.ref_logprobs, \"k1\")",
     "GRPO's loss KL uses k1 (can go negative) instead of k3"),
    (O, "exp.advantages = self.whiten(advantages, mask)",
     "exp.advantages = self.whiten(advantages, torch.ones_like(mask))", "whitening counts padding"),
    (O, "ent = self.estimator.reduce(entropy, mb.loss_mask, num_tokens, num_sequences)",
     "ent = rl.masked_mean(entropy, mb.loss_mask)",
     "the entropy divides by the microbatch's tokens, not the minibatch's"),
    (O, "scores = self.reward_norm.normalize(scores).float()", "scores = scores.float()",
     "reward.normalize is ignored"),
    (f"{A}/base.py", "\"constant\": num_sequences * self.max_tokens}", "\"constant\": num_sequences}",
     "Dr. GRPO's constant forgets generation.max_new_tokens"),
    (f"{A}/dr_grpo.py", "aggregation = \"token_sum\"", "aggregation = \"token_mean\"",
     "Dr. GRPO divides by the tokens generated"),
    (f"{A}/dr_grpo.py", "rl.grpo_advantages(scores, self.group_size, \"none\", valid=valid)",
     "rl.grpo_advantages(scores, self.group_size, \"group\", valid=valid)", "Dr. GRPO divides by the group's std"),
    (f"{A}/dapo.py", "return rl.informative_groups(scores, self.group_size, valid)", "return valid",
     "DAPO keeps the groups without signal"),
    (f"{A}/gspo.py", "self.clip_low, self.clip_high = cfg.critic_free.sequence_clip_low, "
                     "cfg.critic_free.sequence_clip_high",
     "self.clip_low, self.clip_high = cfg.critic_free.sequence_clip_high, cfg.critic_free.sequence_clip_low",
     "GSPO's clip bounds swapped"),
    (f"{A}/base.py", "return scores - kl_coef * kl.sum(1)", "return scores + kl_coef * kl.sum(1)",
     "RLOO/REINFORCE: the KL raises the sequence reward"),
    (f"{A}/ppo.py", "return rl.compute_gae(rewards, values, mask, self.ppo.gamma, self.ppo.lam)",
     "return rl.compute_gae(rewards, values, mask, self.ppo.lam, self.ppo.gamma)", "PPO swaps gamma and lambda"),
    ("llmrl/rl/ppo.py", "rewards = -kl_coef * kl", "rewards = kl_coef * kl", "the per-token KL rewards"),
    ("llmrl/rl/ppo.py", "loss = aggregate(torch.maximum(pg_losses, pg_losses_clipped)",
     "loss = aggregate(torch.minimum(pg_losses, pg_losses_clipped)",
     "the surrogate takes the optimistic side"),
    ("llmrl/rl/ppo.py", "loss = 0.5 * masked_mean(torch.maximum(losses, losses_clipped), mask, num_tokens)",
     "loss = masked_mean(torch.maximum(losses, losses_clipped), mask, num_tokens)", "the value loss loses its 0.5"),
    ("llmrl/rl/critic_free.py", "baseline = ((g * w).sum(dim=1, keepdim=True) - g * w) / others.clamp(min=1)",
     "baseline = (g * w).sum(dim=1, keepdim=True) / w.sum(dim=1, keepdim=True).clamp(min=1)",
     "RLOO's baseline includes the sample itself"),
    ("llmrl/rl/critic_free.py",
     "self.value = mean if self.value is None else self.momentum * self.value + (1 - self.momentum) * mean",
     "self.value = mean", "REINFORCE's running baseline forgets its history"),
    ("llmrl/rl/kl_control.py", "self.value *= 1.0 + proportional_error * n_steps / self.horizon",
     "self.value *= 1.0 - proportional_error * n_steps / self.horizon", "the adaptive KL controller moves the wrong way"),
    ("llmrl/rewards/base.py", "total[i] += c.weight * v", "total[i] += v", "reward components lose their weights"),
    ("llmrl/distributed/checkpoint.py", "step_checkpoints(run_dir)[:-keep_last]", "step_checkpoints(run_dir)[:-1]",
     "run.keep_last ignored: only the newest checkpoint kept"),
    ("llmrl/rl/aggregate.py", "per_sequence = (x * mask).sum(dim=1) / lengths.clamp(min=1)",
     "per_sequence = (x * mask).sum(dim=1)", "sequence_mean sums each sequence instead of averaging it"),
    ("llmrl/rl/gated.py", "weight = torch.clamp(ratio, max=1.0 + clip_high).detach()",
     "weight = torch.clamp(ratio, max=1.0 + clip_high)", "CISPO's weight is not kept out of the gradient"),
    ("llmrl/rl/gated.py", "torch.full_like(ratio, tau_pos), torch.full_like(ratio, tau_neg)",
     "torch.full_like(ratio, tau_neg), torch.full_like(ratio, tau_pos)", "SAPO's temperatures swapped"),
    (O, "kl_loss = self.estimator.reduce(rl.kl_penalty(logprobs, mb.ref_logprobs, \"k3\"), mb.loss_mask,\n"
        "                                                        num_tokens, num_sequences)",
     "kl_loss = rl.masked_mean(rl.kl_penalty(logprobs, mb.ref_logprobs, \"k3\"), mb.loss_mask, num_tokens)",
     "the KL term ignores the loss aggregation"),
    ("llmrl/trainers/base.py", "if self.step < total and self.strategy.any_rank(self.stop_requested)[0]:",
     "if False:", "a callback's stop() is ignored"),
    (O, "(mb_mask.sum(1) > 0).sum().to(mb_mask.dtype)", "torch.tensor(float(mb_mask.shape[0]))",
     "the sequence divisors count skipped and dropped rows"),
    (O, "num_tokens, num_sequences = (self.strategy.all_reduce_sum(counts) / sizes.world_size)",
     "num_tokens, num_sequences = (self.strategy.all_reduce_sum(counts) / 1)",
     "the divisors forget that ranks' gradients are averaged"),
    (f"{A}/ppo.py", "moments = self.all_reduce_sum(rl.masked_moments(rewards, mask))",
     "moments = rl.masked_moments(rewards, mask)", "reward whitening over this rank's tokens only"),
    (O, "exp.advantages = exp.advantages * weight", "exp.advantages = exp.advantages",
     "truncated importance sampling weighs nothing"),
    (O, "weight = ratio.clamp(max=self.tis_cap)", "weight = ratio", "importance weights not truncated"),
    (O, "log_ratio = (exp.logprobs - exp.sampler_logprobs) * mask",
     "log_ratio = (exp.sampler_logprobs - exp.logprobs) * mask", "importance ratio upside down (sampler / trainer)"),
    (O, "return g.engine == \"fast\" and not g.compile and m.dtype == \"float32\" and m.quantization is None",
     "return g.engine == \"fast\" and not g.compile and m.quantization is None",
     "pi_old taken from a bfloat16 sampler"),
    ("llmrl/rl/dpo.py", "policy_chosen, ref_chosen = policy_chosen / chosen_tokens, ref_chosen / chosen_tokens",
     "policy_chosen, ref_chosen = policy_chosen, ref_chosen", "IPO sums the chosen completion's log-probs"),
    ("llmrl/models/policy.py", "            for p in trainable:\n                p.requires_grad_(True)",
     "            for p in trainable:\n                pass", "a separate critic's adapter left frozen by peft"),
    ("llmrl/trainers/base.py",
     "set_peft_model_state_dict(self.policy.model, read_weights(critic, self.device), CRITIC_ADAPTER)",
     "pass", "a separate critic is not loaded on resume"),
    ("llmrl/models/policy.py", "            with self.critic():\n                _, values = self.outputs(",
     "            if True:\n                _, values = self.outputs(", "a separate critic's values from the policy's adapter"),
    (f"{A}/base.py", 'return "objective/kl", "k3", self.loss_kl_coef', 'return "objective/kl", self.ppo.kl_estimator, '
     'self.loss_kl_coef', "GRPO's logged KL with PPO's estimator, not the k3 its loss uses"),
    (O, "penalised = ~eos & valid", "penalised = ~eos", "the missing-EOS share counts unscored completions"),
    (O, 'self.kl_ctl.value = float(values["ppo.init_kl_coef"])', "pass",
     "a resumed or scheduled ppo.init_kl_coef never reaches the KL controller"),
    ("llmrl/trainers/base.py", "if entry.step == self.step:", "if entry.step == self.step + 1:",
     "a schedule entry applied one step early"),
    ("llmrl/tune/pbt.py", 'score = metrics[metric] if setup["direction"] == "maximize" else -metrics[metric]',
     "score = metrics[metric]", "PBT ranks members as if every metric were to maximise"),
    ("llmrl/tune/search.py", "value = float(rows[-1][metric])", "value = float(rows[0][metric])",
     "a trial's objective read at its first logged value, not its last"),
    (O, "clipped = (scores.abs() > cfg.reward.clip) & valid", "clipped = scores.abs() > cfg.reward.clip",
     "the clipped share counts unscored completions"),
    ("llmrl/rollout/engine.py", "logits = MinPLogitsWarper(min_p)(None, logits)", "logits = logits",
     "the fast engine ignores min_p"),
    ("llmrl/rl/kto.py", "undesirable_weight * (1 - torch.sigmoid(beta * (z0 - logratios)))",
     "undesirable_weight * (1 - torch.sigmoid(beta * (logratios - z0)))", "KTO's undesirable loss with the wrong sign"),
    ("llmrl/rl/kto.py", "z0 = (kl_sum / rows).clamp(min=0)", "z0 = kl_sum / rows", "KTO's reference point not clamped"),
    ("llmrl/trainers/kto.py", "k.desirable_weight, k.undesirable_weight", "k.undesirable_weight, k.desirable_weight",
     "KTO's weights swapped"),
    ("llmrl/trainers/kto.py", "kl_tails = [tails[j] for j in mismatched(index)[mine]]",
     "kl_tails = [tails[j] for j in index[mine]]", "KTO's reference point from matched pairs"),
    ("llmrl/trainers/kto.py", "for j in mismatched(index)[mine]]", "for j in mismatched(index[mine])]",
     "KTO's mismatched pairs built per rank, not over the batch"),
    ("llmrl/rollout/engine.py", "            logits, cache = out.logits[:, -1], cache_of(out)\n            hidden = "
     "out.hidden_states[-1][:, -1] if shift is not None else None\n            next_position",
     "            logits, cache = out.logits[:, -1], cache_of(out)\n            next_position",
     "ILQL sampling reads the prompt's hidden state at every step"),
    ("llmrl/rollout/engine.py", "            scaled = filtered\n", "            scaled = scaled\n",
     "ILQL sampling records the unfiltered log-probs"),
    ("llmrl/trainers/ilql_distill.py", "strict=False) if params is not None", "strict=False) if False",
     "distillation's teacher is the student as it trains"),
    ("llmrl/trainers/ilql_distill.py", "(s / total).backward()", "(-s / total).backward()",
     "distillation maximises the KL to the ILQL policy"),
    ("llmrl/rl/ilql.py", "loss = loss_q + loss_v + cql_scale * loss_cql",
     "loss = loss_q + loss_v - cql_scale * loss_cql", "ILQL's CQL term with the wrong sign"),
    ("llmrl/rl/ilql.py", "q_target = rewards.float() + gamma * next_values", "q_target = rewards.float() + next_values",
     "ILQL's Q target drops gamma"),
    ("llmrl/rl/ilql.py", "advantage = target_taken - values", "advantage = torch.stack(q_taken).amin(0) - values",
     "ILQL's V regresses onto the online Q heads, not the targets"),
    ("llmrl/rl/ilql.py", "torch.where(dones.bool() | ~mask,", "torch.where(~mask,",
     "ILQL's Q target reads V after the last action"),
    ("llmrl/trainers/ilql.py", "gamma=c.gamma, tau=c.tau", "gamma=c.tau, tau=c.tau", "ILQLTrainer passes tau as gamma"),
    ("llmrl/trainers/ilql.py", "self.heads.sync_targets(self.cfg.ilql.alpha)",
     "self.heads.sync_targets(1 - self.cfg.ilql.alpha)", "ILQL's Polyak rate is 1 - alpha"),
    ("llmrl/trainers/ilql.py", "        self.heads.load(path / HEADS_FILE, self.device)", "        pass",
     "ILQL's heads are not loaded on resume"),
    ("llmrl/trainers/base.py", "self.cfg.ilql.beta != 0 and not self.policy.as_reference:",
     "self.cfg.ilql.beta != 0:", "the reference (evaluation's 'before') decodes through ILQL's heads"),
    ("llmrl/trainers/ilql.py", "        policy.ilql_heads.start_at_zero()", "        pass",
     "ILQL's heads start random: a fresh run's policy is not the LM"),
    ("llmrl/trainers/ilql.py", "            self.heads.sync_targets(1.0)", "            pass",
     "ILQL's targets keep each rank's own draw instead of the Q heads"),
    ("llmrl/models/ilql_heads.py", "        self.load_state_dict(state)",
     "        self.load_state_dict({k: v for k, v in state.items() if not k.startswith('target')}, strict=False)",
     "ILQL's targets are not restored on resume"),
    ("llmrl/trainers/kto.py", "        if self.counts is not None:\n", "        if False:\n",
     "KTO ignores kto.desirable_share"),
    ("llmrl/trainers/base.py", "    return [rows[i] for i in order.tolist()]", "    return rows",
     "a balanced batch puts one group first (rank 0 gets only it)"),
    ("llmrl/trainers/ilql.py", "        if self.strategy.loads_module_weights:\n", "        if False:\n",
     "ILQL under DeepSpeed resumes without the saved targets"),
    ("llmrl/trainers/base.py", "        self.step += 1\n        self.after_update()\n", "        self.step += 1\n",
     "the offline trainers' step skips after_update (ILQL's targets never follow)"),
    ("llmrl/trainers/base.py", "        self.check_finite(self.step, {**metrics, \"optim/grad_norm\": grad_norm})\n", "",
     "an offline trainer goes on after its weights turned NaN"),
]


def tracked_files() -> list[str]:
    out = subprocess.run(["git", "ls-files"], capture_output=True, text=True, cwd=REPO, check=True).stdout
    return [line for line in out.splitlines() if line]


def copy_tree(dest: Path) -> None:
    for name in tracked_files():
        source = REPO / name
        if source.is_file():
            (dest / name).parent.mkdir(parents=True, exist_ok=True)
            shutil.copy2(source, dest / name)


def run_tests(tree: Path, tests: list[str], timeout: int) -> tuple[bool, float, str]:
    """(passed, seconds, the first failing test's name or '')."""
    env = {**os.environ, "PYTHONPATH": str(tree), "HF_HUB_OFFLINE": "1"}
    started = time.monotonic()
    try:
        out = subprocess.run([sys.executable, "-m", "pytest", "-q", "-x", "-p", "no:cacheprovider", "-m", "not slow",
                              *tests], capture_output=True, text=True, cwd=tree, env=env, timeout=timeout)
    except subprocess.TimeoutExpired:
        return False, time.monotonic() - started, "(timed out)"
    failed = [line.split(" ")[1] for line in out.stdout.splitlines() if line.startswith(("FAILED ", "ERROR "))]
    return out.returncode == 0, time.monotonic() - started, failed[0] if failed else ""


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--only", type=int, nargs="*", help="mutant numbers (1-based) to run")
    parser.add_argument("--list", action="store_true", help="list the mutants and exit")
    parser.add_argument("--tests", nargs="*", default=FAST_TESTS, help="test files to run against each mutant")
    parser.add_argument("--timeout", type=int, default=900, help="seconds per mutant")
    args = parser.parse_args()
    chosen = [(i, m) for i, m in enumerate(MUTANTS, 1) if not args.only or i in args.only]
    if args.list:
        for i, (path, _, _, what) in chosen:
            print(f"{i:3d}  {path:38s} {what}")
        return 0
    for i, (path, old, _, what) in chosen:  # every mutant must still apply to today's source
        count = (REPO / path).read_text().count(old)
        if count != 1:
            print(f"mutant {i} ({what}): its text occurs {count} times in {path}, not once: update tools/mutants.py")
            return 2
    with tempfile.TemporaryDirectory(prefix="llmrl-mutants-") as tmp:
        tree = Path(tmp) / "tree"
        tree.mkdir()
        copy_tree(tree)
        ok, seconds, first = run_tests(tree, args.tests, args.timeout)
        print(f"unmutated: {'pass' if ok else 'FAIL ' + first} ({seconds:.0f} s)", flush=True)
        if not ok:
            return 2
        killed = 0
        print(f"{'#':>3}  {'killed':6}  {'s':>4}  {'what':58}  by")
        for i, (path, old, new, what) in chosen:
            target = tree / path
            original = target.read_text()
            target.write_text(original.replace(old, new, 1))
            try:
                ok, seconds, first = run_tests(tree, args.tests, args.timeout)
            finally:
                target.write_text(original)
            killed += not ok
            print(f"{i:3d}  {'yes' if not ok else 'NO':6}  {seconds:4.0f}  {what[:58]:58}  {first}", flush=True)
    print(f"killed {killed} of {len(chosen)} mutants")
    return 0


if __name__ == "__main__":
    sys.exit(main())
