"""ILQL: offline RL from logged answers with a reward (``algorithm: ilql``; Snell et al. 2022, trlX's ILQL).

No rollouts and no reference: each step reads ``ilql.batch_size`` logged rows (prompt, completion, reward) and trains
ILQL's heads (``llmrl.models.ilql_heads``: two Q heads with Polyak targets and a V head on the policy's last hidden
state) together with the LoRA adapter, whose LM keeps the logged answers likely (the AWAC term). The losses are
``llmrl.rl.ilql``'s. ``ILQLTrainer`` is a sibling of ``DPOTrainer`` on ``Trainer``: the run loop, evaluation,
checkpoints (the heads saved as ``ilql_heads.safetensors`` beside the adapter), resume and logging are shared.

Evaluation decodes from the learned policy, logits + ilql.beta * (Q_target - V) (``ILQLTrainer.generate``, greedy
on the shifted logits unless run.eval_sampled); ilql.beta = 0 is the LM alone (the adapter the AWAC term trained).
``llmrl eval --checkpoint`` does the same (``attach_heads``).
"""
from __future__ import annotations

import time
from pathlib import Path

import torch

from llmrl import rl
from llmrl.config import ConfigError
from llmrl.data.chat import render_prompt
from llmrl.models.ilql_heads import HEADS_FILE, ILQLHeads, shifted_logits
from llmrl.models.policy import context_length
from llmrl.rollout.experience import right_padded
from llmrl.trainers.base import Trainer, balanced_batch, epoch_batch, share_counts


def _ids(tokenizer, text: str) -> list[int]:
    return tokenizer(text, add_special_tokens=False)["input_ids"] if text else []


def encode_logged(tokenizer, prompt, completion, where: str) -> tuple[list[int], list[bool]]:
    """One logged row -> (token ids of prompt + answer, which of them are actions).

    A text answer: the prompt (through the chat template with its generation prompt when it is a conversation), then
    the answer's tokens and EOS, all actions. A conversation (assistant messages, with the user's or a tool's between
    them): the chat template's text of prompt + completion, cut where each assistant message starts (the template's
    text with the generation prompt) and ends; only the assistant's tokens are actions (as trlX's
    ``tokenize_dialogue``, each piece tokenised alone), and EOS closes the last assistant turn when the template
    does not end it with EOS already."""
    head = render_prompt(tokenizer, prompt, where)
    ids = _ids(tokenizer, head)
    if not ids:
        raise ConfigError(f"{where}: its prompt has no tokens: an answer needs a prompt to follow; fix the row")
    actions = [False] * len(ids)
    if isinstance(completion, str):
        answer = _ids(tokenizer, completion) + [tokenizer.eos_token_id]
        return ids + answer, actions + [True] * len(answer)
    messages, done = list(prompt), head
    last_assistant = max(i for i, m in enumerate(completion) if m["role"] == "assistant")
    for i, message in enumerate(completion):
        pieces = []
        if message["role"] == "assistant":  # the template's opening of the turn is the environment's
            opening = tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
            pieces.append((opening, False))
        messages.append(message)
        pieces.append((tokenizer.apply_chat_template(messages, tokenize=False), message["role"] == "assistant"))
        for text, is_action in pieces:
            if not text.startswith(done):
                raise ConfigError(f"{where}: the chat template renders this conversation differently once it goes on "
                                  f"(message {i} of its completion changes the text before it), so its assistant "
                                  f"tokens cannot be told apart: give the completion as text")
            piece = _ids(tokenizer, text[len(done):])
            if is_action and i == last_assistant and tokenizer.eos_token_id not in piece:
                piece.append(tokenizer.eos_token_id)
            ids += piece
            actions += [is_action] * len(piece)
            done = text
    if not any(actions):
        raise ConfigError(f"{where}: its assistant messages have no tokens: remove the row")
    return ids, actions


class ILQLTrainer(Trainer):
    def __init__(self, cfg, policy, tokenizer, rows: list[dict], eval_rows: list[dict], strategy, run_dir,
                 eval_reward):
        c = cfg.ilql
        if len(rows) < c.batch_size:
            raise ConfigError(f"ilql.data has {len(rows)} rows, fewer than ilql.batch_size = {c.batch_size}: lower "
                              f"ilql.batch_size or log more answers")
        self.rows = rows
        good = [r["reward"] >= c.positive_reward for r in rows]
        self.groups = ([i for i, g in enumerate(good) if g], [i for i, g in enumerate(good) if not g])
        self.counts = None if c.positive_share is None else share_counts(
            c.positive_share, c.batch_size, *map(len, self.groups), "ilql.positive_share",
            f"positive (reward >= ilql.positive_reward = {c.positive_reward})/other", "ilql.positive_reward")
        self.encoded = [encode_logged(tokenizer, r["prompt"], r["completion"],
                                      f"ilql.data: row {i} (counting from 0)") for i, r in enumerate(rows)]
        context = context_length(policy.model)
        for i, (ids, _) in enumerate(self.encoded):  # pieces tokenised alone may take a few more tokens than the text
            if context is not None and len(ids) > context:
                raise ConfigError(f"ilql.data: row {i} (counting from 0) has {len(ids)} tokens, more than the model's "
                                  f"context of {context} tokens: shorten or remove the row")
        config = policy.model.config.get_text_config()
        # a submodule of the policy: its parameters reach the optimizer and DeepSpeed with the adapter's, are gathered
        # with them for saving and checked with them for NaN; the targets (buffers) are not trained
        policy.ilql_heads = ILQLHeads(config.hidden_size, config.vocab_size, c.two_qs).to(strategy.device)
        policy.ilql_heads.start_at_zero()  # the policy starts as the LM: evaluation at step 0 is the base's
        super().__init__(cfg, policy, tokenizer, eval_rows, strategy, run_dir, eval_reward)
        # DeepSpeed's bf16/fp16 casts the whole module: the targets move by alpha (1e-3) of a difference per sync,
        # which bf16 rounds away, so they stay in float32 (buffers: no optimizer holds them, ZeRO-3 keeps them whole)
        self.heads.target_q_heads.float()
        # the targets start as copies of the Q heads: DeepSpeed gives every rank rank 0's parameters, not its
        # buffers, and each rank drew its own heads (measured: rank 1's targets differed from rank 0's)
        with self.strategy.gathered(self.heads.q_heads.parameters()):
            self.heads.sync_targets(1.0)

    @property
    def heads(self) -> ILQLHeads:
        return self.policy.ilql_heads

    def accumulation(self) -> tuple[int, int]:
        return 1, self.cfg.ilql.batch_size // self.strategy.world_size

    def rows_for_step(self, step: int) -> list[int]:
        """This rank's row indices for ``step``: a fresh permutation per pass over the rows, fixed by the seed and the
        step (so a resumed run reads what the straight one would); with ilql.positive_share, that share from the
        positive rows and the rest from the others."""
        if self.counts is not None:
            perm = balanced_batch(self.groups, self.counts, self.cfg.run.seed, step)
        else:
            perm = epoch_batch(len(self.rows), self.cfg.ilql.batch_size, self.cfg.run.seed, step)
        local = len(perm) // self.strategy.world_size
        return perm[self.strategy.rank * local:(self.strategy.rank + 1) * local]

    def batch(self, indices: list[int]) -> dict:
        """Right-padded ids (B, L) and mask, the actions' states (B, N) and mask, the tokens taken (B, N), rewards and
        dones (B, N)."""
        ids, attention = right_padded([self.encoded[i][0] for i in indices], self.tokenizer.pad_token_id)
        action_mask, _ = right_padded([[int(a) for a in self.encoded[i][1]] for i in indices], 0)
        positions, mask = rl.action_states(action_mask.bool())
        reward = torch.tensor([self.rows[i]["reward"] for i in indices])
        rewards, dones = rl.terminal_rewards(mask, reward)
        d = self.device
        return {"input_ids": ids.to(d), "attention_mask": attention.long().to(d), "positions": positions.to(d),
                "mask": mask.to(d), "actions": ids.gather(1, positions + 1).to(d), "rewards": rewards.to(d),
                "dones": dones.to(d)}

    def loss(self, batch: dict) -> tuple[torch.Tensor, dict]:
        """ILQL's loss and stats on ``batch`` (from ``batch``), through the policy and the heads."""
        logits, hidden = self.policy.logits_and_hidden(batch["input_ids"], batch["attention_mask"])
        positions = batch["positions"]
        qs, target_q, values = self.heads(rl.gather_states(hidden, positions))
        c = self.cfg.ilql
        # the mean over every rank's answer tokens: each rank divides its sums by their count / ranks
        local = batch["mask"].sum().float()
        num_actions = self.strategy.all_reduce_sum(local).to(local) / self.strategy.world_size
        return rl.ilql_loss(rl.gather_states(logits, positions), qs, target_q, values, batch["actions"],
                            batch["mask"], batch["rewards"], batch["dones"], gamma=c.gamma, tau=c.tau,
                            cql_scale=c.cql_scale, awac_scale=c.awac_scale, num_actions=num_actions.clamp(min=1))

    def progress(self, stats: dict) -> dict:
        return {"loss": f"{stats['loss/ilql']:.3f}", "adv": f"{stats['ilql/advantage_mean']:.3f}"}

    def train_step(self) -> dict:
        start = time.perf_counter()
        self.policy.train()
        loss, stats = self.loss(self.batch(self.rows_for_step(self.step)))
        out = self.offline_update(loss, stats, start)  # stats hold loss/ilql
        out["ilql/actions"] *= self.strategy.world_size  # the step's answer tokens over all ranks
        return out

    def after_update(self) -> None:
        if self.step % self.cfg.ilql.steps_for_target_q_sync == 0:  # trlX: every steps_for_target_q_sync steps
            with self.strategy.gathered(self.heads.q_heads.parameters()):  # ZeRO-3: the whole Q heads, read
                self.heads.sync_targets(self.cfg.ilql.alpha)

    @torch.no_grad()
    def shifted_logits(self, input_ids: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
        """The learned policy's logits at every position, (B, L, V): the LM's plus ilql.beta * (Q_target - V)."""
        logits, hidden = self.policy.logits_and_hidden(input_ids, attention_mask)
        return shifted_logits(logits, self.heads.advantage(hidden), self.cfg.ilql.beta)

    # checkpoints: the heads (targets included) beside the adapter
    def save_extra_weights(self, folder) -> None:
        self.heads.save(folder / HEADS_FILE)

    def load_extra_weights(self, path) -> None:
        from llmrl.trainers.base import read_weights

        read_weights(path / HEADS_FILE, self.device)  # missing, damaged or not finite: one line naming it
        self.heads.load(path / HEADS_FILE, self.device)

    def load_checkpoint(self, path, state: dict | None = None) -> None:
        """As every trainer; under DeepSpeed (which restores the trainable weights itself, the heads' included) the
        targets are also read from the checkpoint's heads file: DeepSpeed's module state carries them only since
        they are buffers, and an older checkpoint without them would otherwise resume with fresh targets."""
        super().load_checkpoint(path, state)
        if self.strategy.loads_module_weights:
            from llmrl.trainers.base import read_weights

            saved = read_weights(Path(path) / HEADS_FILE, self.device)
            with torch.no_grad():
                for name, target in self.heads.target_q_heads.named_buffers():
                    key = f"target_q_heads.{name}"
                    if key not in saved or saved[key].shape != target.shape:
                        raise ConfigError(f"{Path(path) / HEADS_FILE} does not fit this model's ILQL heads (e.g. "
                                          f"{key}): it was saved for another model or ilql.two_qs setting; resume "
                                          f"with the run's own model")
                    target.copy_(saved[key].to(target.dtype))


def load_logged_rows(cfg, tokenizer, context: int | None) -> list[dict]:
    """ilql.data's rows, each checked, and refused before training when one does not fit the model's context."""
    from llmrl.data.logged import check_logged_lengths, load_rewarded

    rows = load_rewarded(cfg.ilql.data)
    check_logged_lengths(rows, tokenizer, context, "ilql.data")
    return rows


def attach_heads(policy, checkpoint, device, two_qs: bool) -> None:
    """Give ``policy`` (its adapter loaded from ``checkpoint``) the ILQL heads saved there, so that its trainer's
    generation decodes from the learned policy (``Trainer.generate``), as ``llmrl eval`` needs."""
    from pathlib import Path

    from llmrl.trainers.base import read_weights

    path = Path(checkpoint) / HEADS_FILE
    read_weights(path, device)  # missing, damaged or not finite: one line naming it
    config = policy.model.config.get_text_config()
    heads = ILQLHeads(config.hidden_size, config.vocab_size, two_qs).to(device)
    heads.load(path, device)
    policy.ilql_heads = heads
