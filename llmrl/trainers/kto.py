"""KTO: learn from logged answers with a thumbs up or down, unpaired, no reward and no rollouts (``algorithm: kto``).

Ethayarajh et al. 2024, "KTO: Model Alignment as Prospect Theoretic Optimization"; the loss is TRL's KTOTrainer's
(``llmrl.rl.kto``). The reference is the base with the adapter disabled. Like ``DPOTrainer`` it is a sibling of the
online trainer on ``Trainer``: the run loop, evaluation, checkpoints, resume and logging are shared.
"""
from __future__ import annotations

import time

import torch

from llmrl import rl
from llmrl.config import ConfigError
from llmrl.data.chat import content, is_conversation, render_prompts
from llmrl.data.logged import check_logged_lengths, logged_text
from llmrl.models.policy import context_length
from llmrl.rollout.experience import Experience, left_padded, right_padded
from llmrl.trainers.base import Trainer, balanced_batch, epoch_batch, share_counts


def answer_text(tokenizer, prompt, completion) -> tuple[str, str]:
    """(the prompt as the policy reads it, the answer's text). A text answer, or one assistant message, is the
    assistant's turn as a sampled one would be: its text, then EOS (as DPO's answers); an answer of several turns
    is the chat template's text after the prompt (``llmrl.data.logged.logged_text``)."""
    if isinstance(completion, list) and len(completion) == 1:
        completion = content(completion)
    return logged_text(tokenizer, prompt, completion)


def encode_ids(heads: list[list[int]], tails: list[list[int]], pad_token_id: int, device) -> Experience:
    """Left-padded prompts and right-padded answers (token ids; each answer already ends with EOS)."""
    query, query_mask = left_padded(heads, pad_token_id)
    response, response_mask = right_padded(tails, pad_token_id)
    return Experience(query=query.to(device), query_mask=query_mask.to(device), response=response.to(device),
                      response_mask=response_mask.to(device))


def mismatched(index: list[int]) -> list[int]:
    """Whose answer each row's prompt is paired with to estimate KTO's reference point: the previous row's, the
    first row taking the last's (TRL rotates the completions by one within each batch: (x_1, y_n), (x_2, y_1), ...).

    >>> mismatched([7, 3, 5])
    [5, 7, 3]
    """
    return index[-1:] + index[:-1]


class KTOTrainer(Trainer):
    def __init__(self, cfg, policy, tokenizer, rows: list[dict], eval_rows: list[dict], strategy, run_dir,
                 eval_reward):
        """``rows``: checked logged answers, ``{"prompt", "completion", "label": bool}``
        (``llmrl.data.logged.load_labelled``)."""
        if len(rows) < cfg.kto.batch_size:
            raise ConfigError(f"kto.data has {len(rows)} rows, fewer than kto.batch_size = {cfg.kto.batch_size}: "
                              f"lower kto.batch_size or add rows")
        self.rows = rows
        self.groups = ([i for i, r in enumerate(rows) if r["label"]], [i for i, r in enumerate(rows) if not r["label"]])
        self.counts = None if cfg.kto.desirable_share is None else share_counts(
            cfg.kto.desirable_share, cfg.kto.batch_size, *map(len, self.groups), "kto.desirable_share",
            "desirable/undesirable")
        super().__init__(cfg, policy, tokenizer, eval_rows, strategy, run_dir, eval_reward)
        conversations = [r["prompt"] for r in rows if is_conversation(r["prompt"])]
        render_prompts(self.tokenizer, conversations[:1])  # a chat template is needed: say so before training
        self.context = context_length(policy.model)
        check_logged_lengths(rows, self.tokenizer, self.context, "kto.data")

    def accumulation(self) -> tuple[int, int]:
        return 1, self.cfg.kto.batch_size // self.strategy.world_size

    def batch_for_step(self, step: int) -> list[int]:
        """The global batch's row numbers: a fresh permutation per pass over the rows, fixed by the seed and the step
        (so resume is exact); with kto.desirable_share, that share from the desirable rows and the rest from the
        others."""
        if self.counts is not None:
            return balanced_batch(self.groups, self.counts, self.cfg.run.seed, step)
        return epoch_batch(len(self.rows), self.cfg.kto.batch_size, self.cfg.run.seed, step)

    def encode(self, index: list[int]) -> tuple[Experience, Experience]:
        """This rank's share of the global batch ``index``: (the logged pairs, the mismatched pairs).

        The mismatched pairs are built over the global batch, so that the reference point is the same however many
        ranks share it; a mismatched answer is cut to fit the model's context after its new prompt."""
        local = len(index) // self.strategy.world_size
        mine = slice(self.strategy.rank * local, (self.strategy.rank + 1) * local)
        texts = {i: answer_text(self.tokenizer, self.rows[i]["prompt"], self.rows[i]["completion"])
                 for i in set(index)}

        def ids(text: str) -> list[int]:
            return self.tokenizer(text, add_special_tokens=False)["input_ids"]

        heads = [ids(texts[i][0]) for i in index[mine]]
        tails = {i: ids(texts[i][1]) + [self.tokenizer.eos_token_id] for i in set(index)}
        kl_tails = [tails[j] for j in mismatched(index)[mine]]
        if self.context is not None:
            kl_tails = [tail[:max(1, self.context - len(head))] for head, tail in zip(heads, kl_tails)]
        pad = self.tokenizer.pad_token_id
        return (encode_ids(heads, [tails[i] for i in index[mine]], pad, self.device),
                encode_ids(heads, kl_tails, pad, self.device))

    def progress(self, stats: dict) -> dict:
        return {"loss": f"{stats['loss/kto']:.3f}", "kl": f"{stats['kl']:.3f}"}

    def train_step(self) -> dict:
        start = time.perf_counter()
        index = self.batch_for_step(self.step)
        local = len(index) // self.strategy.world_size
        labels = torch.tensor([self.rows[i]["label"] for i in index[self.strategy.rank * local:
                                                                    (self.strategy.rank + 1) * local]],
                              dtype=torch.bool, device=self.device)
        logged, kl_pairs = self.encode(index)
        with torch.no_grad(), self.policy.reference():
            self.policy.eval()
            ref_logps, ref_kl_logps = self.sequence_logprobs(logged), self.sequence_logprobs(kl_pairs)
        self.policy.train()
        with torch.no_grad():  # z0 is detached in the loss: no graph for the mismatched pairs
            kl_logps = self.sequence_logprobs(kl_pairs)
        k = self.cfg.kto
        loss, stats = rl.kto_loss(self.sequence_logprobs(logged), ref_logps, labels, kl_logps, ref_kl_logps, k.beta,
                                  k.desirable_weight, k.undesirable_weight, self.strategy.all_reduce_sum)
        return self.offline_update(loss, {"loss/kto": loss.detach(), **stats}, start)
