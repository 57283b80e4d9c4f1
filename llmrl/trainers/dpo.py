"""DPO: learn from preference pairs directly, no reward and no rollouts (``algorithm: dpo``).

The reference is the base with the adapter disabled. ``DPOTrainer`` and the online ``OnlineTrainer`` are siblings on
``Trainer``: the run loop, evaluation, checkpoints, resume and logging are shared; DPO has no training reward,
no rollouts and no KL controller.
"""
from __future__ import annotations

import time

import torch

from llmrl import rl
from llmrl.config import ConfigError
from llmrl.data.chat import content, is_conversation, message_problem, render_prompts
from llmrl.rollout.experience import Experience, right_padded
from llmrl.trainers.base import Trainer, epoch_batch

PAIR_COLUMNS = ("prompt", "chosen", "rejected")


def load_pairs(source: str) -> list[dict]:
    from llmrl.data.prompts import read_table

    rows = read_table(source, "dpo.data")
    missing = [c for c in PAIR_COLUMNS if c not in rows[0]]
    if missing:
        raise ConfigError(f"dpo.data = {source!r} lacks column(s) {', '.join(missing)}: preference pairs need "
                          f"prompt, chosen and rejected (columns: {', '.join(rows[0])})")
    for i, row in enumerate(rows):
        problem = message_problem(row["prompt"]) if not isinstance(row["prompt"], (int, float)) else None
        if problem:
            raise ConfigError(f"dpo.data = {source!r}: pair {i}'s prompt {problem}")
    return rows


def encode(tokenizer, prompts: list[str], completions: list[str], device) -> Experience:
    """Left-padded prompts and right-padded completions (each ending with EOS), as an Experience."""
    query = tokenizer(prompts, return_tensors="pt", padding=True, add_special_tokens=False)
    ids = [tokenizer(c, add_special_tokens=False)["input_ids"] + [tokenizer.eos_token_id] for c in completions]
    response, mask = right_padded(ids, tokenizer.pad_token_id)
    return Experience(query=query["input_ids"].to(device), query_mask=query["attention_mask"].to(device),
                      response=response.to(device), response_mask=mask.to(device))


class DPOTrainer(Trainer):
    def __init__(self, cfg, policy, tokenizer, pairs: list[dict], eval_rows: list[dict], strategy, run_dir,
                 eval_reward):
        if len(pairs) < cfg.dpo.batch_size:
            raise ConfigError(f"dpo.data has {len(pairs)} pairs, fewer than dpo.batch_size = {cfg.dpo.batch_size}")
        self.pairs = pairs
        super().__init__(cfg, policy, tokenizer, eval_rows, strategy, run_dir, eval_reward)
        conversations = [p["prompt"] for p in pairs if is_conversation(p["prompt"])]
        render_prompts(self.tokenizer, conversations[:1])  # a chat template is needed: say so before training

    def accumulation(self) -> tuple[int, int]:
        return 1, self.cfg.dpo.batch_size // self.strategy.world_size

    def pairs_for_step(self, step: int) -> list[dict]:
        """A fresh permutation per pass over the pairs, fixed by the seed and the step (so resume is exact)."""
        perm = epoch_batch(len(self.pairs), self.cfg.dpo.batch_size, self.cfg.run.seed, step)
        local = len(perm) // self.strategy.world_size  # this rank's share of the global batch
        return [self.pairs[i] for i in perm[self.strategy.rank * local:(self.strategy.rank + 1) * local]]

    def progress(self, stats: dict) -> dict:
        return {"loss": f"{stats['loss/dpo']:.3f}", "acc": f"{stats['rewards/accuracy']:.2f}"}

    def train_step(self) -> dict:
        start = time.perf_counter()
        batch = self.pairs_for_step(self.step)
        # A conversational pair (TRL's format): the prompt through the chat template, the answers as the
        # content of their one assistant message, ending with EOS as a sampled turn does.
        prompts = render_prompts(self.tokenizer, [p["prompt"] if is_conversation(p["prompt"]) else str(p["prompt"])
                                                  for p in batch])
        chosen = encode(self.tokenizer, prompts, [content(p["chosen"]) for p in batch], self.device)
        rejected = encode(self.tokenizer, prompts, [content(p["rejected"]) for p in batch], self.device)
        with torch.no_grad(), self.policy.reference():
            self.policy.eval()
            ref_chosen, ref_rejected = self.sequence_logprobs(chosen), self.sequence_logprobs(rejected)
        self.policy.train()
        loss, stats = rl.dpo_loss(self.sequence_logprobs(chosen), self.sequence_logprobs(rejected),
                                  ref_chosen, ref_rejected, self.cfg.dpo.beta, self.cfg.dpo.loss,
                                  chosen.response_mask.sum(1), rejected.response_mask.sum(1))
        return self.offline_update(loss, {"loss/dpo": loss.detach(), **stats}, start)
