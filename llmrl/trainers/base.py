"""The part every trainer shares: optimizer and schedule (through the strategy), evaluation, the divergence
check, checkpoints and resume. Online RL (``online.py``) and DPO (``dpo.py``) are its two subclasses; each
gives ``accumulation`` and ``train_step``, and what it adds to a checkpoint.
"""
from __future__ import annotations

import errno
import json
import math
import shutil
import signal
import threading
import time
from contextlib import contextmanager, nullcontext
from pathlib import Path

import torch
from safetensors.torch import load_file, save_file

from llmrl import rl
from llmrl.config import Config, ConfigError, RunStopped, save_config
from llmrl.data.chat import as_completions, content, render_prompts
from llmrl.errors import UserError, first_line
from llmrl.distributed.checkpoint import (COMPLETE_MARK, begin_checkpoint, commit_checkpoint, latest_checkpoint,
                                          load_state_file, prune_checkpoints, step_dir_name,
                                          write_text_atomically)
from llmrl.models.policy import context_length, fingerprint_mismatch
from llmrl.rewards.base import CombinedReward, RewardResult
from llmrl.rollout.engine import RolloutEngine
from llmrl.rollout.experience import Experience, decode_completions, generate
from llmrl.rollout.vllm_engine import VLLMEngine


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
        # an episode's later turns continue the whole transcript so far: up to env.max_episode_tokens past the prompt
        longest_context = cfg.data.max_prompt_length + (cfg.env.max_episode_tokens if cfg.env.name else 0)
        return VLLMEngine(cfg.model, g, longest_context, cfg.run.seed + strategy.rank,
                          tokenizer.eos_token_id, tokenizer.pad_token_id, context, strategy.gathered)
    return None


class Terminated(RunStopped):
    """SIGTERM (a scheduler's "stop", SIGKILL follows after a grace period): the command exits with 143 = 128 + 15,
    the code of a process the signal ended."""

    exit_code = 143


def eval_metrics(evaluation: dict) -> dict:
    """The numbers of an evaluation (``eval/reward``, ...), as logged: what ``on_evaluate`` callbacks receive."""
    return {k: v for k, v in evaluation.items() if k.startswith("eval/") and k != "eval/skipped"}


def last_checkpoint_text(run_dir: Path) -> str:
    """'the last checkpoint is ...; pass --resume ...': how a stopped run (Ctrl-C, SIGTERM) says where to go on."""
    last = latest_checkpoint(run_dir)
    return f"the last checkpoint is {last or 'none yet'}; {'pass --resume to continue from it' if last else 'start again'}"


@contextmanager
def sigterm_recorded():
    """While the block runs, SIGTERM appends the time it arrived (``time.monotonic``) to the yielded list instead of
    ending the process, so that the fit loop can stop at the next step boundary. Only the main thread may install a
    handler: elsewhere SIGTERM keeps its action (the list stays empty). The previous handler is restored after."""
    received: list[float] = []
    if threading.current_thread() is not threading.main_thread():
        yield received
        return

    def record(signum, frame) -> None:
        if not received:  # the first one counts: the launcher and the scheduler may both send it
            received.append(time.monotonic())

    previous = signal.signal(signal.SIGTERM, record)
    try:
        yield received
    finally:  # None: a handler installed from C, which Python cannot reinstall; the default is the closest
        signal.signal(signal.SIGTERM, signal.SIG_DFL if previous is None else previous)


def agree_to_stop(strategy, received_at: float | None, grace: float, save_seconds: float,
                  now: float) -> tuple[bool, bool]:
    """At a step boundary, the same on every rank: (stop, save). Stop when SIGTERM reached any rank (a launcher may
    signal only some). Save a checkpoint only when it fits in the grace on every signalled rank: the seconds since
    its signal plus ``save_seconds`` (the last checkpoint write's duration, 0 before the first) at most ``grace``;
    grace 0 never saves. One all-reduce: the save is a collective, so no rank may take another branch."""
    signalled = received_at is not None
    late = signalled and (grace <= 0 or now - received_at + save_seconds > grace)
    stop, too_late = strategy.any_rank(signalled, late)
    return stop, stop and not too_late


class Interrupted(RunStopped):
    """Ctrl-C: the command exits with 130, as a shell expects. (SIGTERM is ``Terminated``, 143: the trainer stops
    every rank at a step boundary and saves that step first.)"""

    exit_code = 130


class CallbackError(UserError):
    """A callback given to the run raised: the message names it, the hook and the step."""


class Hooks:
    """The callbacks of a run (objects with any of ``on_step_end(run, step, metrics)``, ``on_evaluate(run, step,
    metrics)`` and ``on_save(run, step, path)``), each called with ``owner`` (the ``llmrl.RLTrainer``, whose
    ``stop()`` ends the run cleanly at the next step boundary). One that raises stops the run with one line."""

    def __init__(self, callbacks=(), owner=None):
        self.callbacks, self.owner = list(callbacks), owner

    def call(self, hook: str, step: int, value) -> None:
        for cb in self.callbacks:
            method = getattr(cb, hook, None)
            if method is None:
                continue
            try:
                method(self.owner, step, value)
            except UserError:
                raise
            except Exception as e:  # noqa: BLE001 (the user's code: name it instead of a traceback from deep here)
                name = getattr(cb, "__qualname__", None) or type(cb).__qualname__
                raise CallbackError(f"callback {name}.{hook} raised {type(e).__name__} at step {step}: "
                                    f"{first_line(e, 150)}: fix the callback (the checkpoints already saved are "
                                    f"kept; resume=True goes on from the last)") from e



def epoch_batch(n_rows: int, batch_size: int, seed: int, step: int) -> list[int]:
    """Row numbers of ``step``'s global batch over a fixed set of ``n_rows`` rows (the offline algorithms: DPO, KTO,
    ILQL): a fresh permutation per pass over the rows, fixed by the seed and the step, so a resumed run reads what
    the uninterrupted one would."""
    epoch, offset = divmod(step, n_rows // batch_size)
    g = torch.Generator().manual_seed(seed * 100_003 + epoch)
    return torch.randperm(n_rows, generator=g)[offset * batch_size:(offset + 1) * batch_size].tolist()


def share_counts(share: float, batch_size: int, positives: int, negatives: int, key: str, kinds: str,
                 threshold: str = "") -> tuple[int, int]:
    """(rows from the positive group, rows from the other) per batch of ``batch_size`` for ``key`` = ``share``
    (rounded half up); refuses in one line a share that leaves a batch without one of the groups, or a group too small
    for its part. ``kinds``: "positive/other" as the message names them; ``threshold``: the key that splits the
    rows, when there is one (ILQL's reward threshold)."""
    first = int(share * batch_size + 0.5)
    pos, neg = kinds.split("/")
    if not 1 <= first <= batch_size - 1:
        raise ConfigError(f"{key} is {share}: with a batch of {batch_size} it draws {first} {pos} rows per batch; "
                          f"pick a share that leaves at least one row of each kind, or null")
    if positives < first:
        also = f", lower {threshold}" if threshold else ""
        raise ConfigError(f"{key} is {share}: each batch draws {first} {pos} rows but the log has {positives}: lower "
                          f"{key} or the batch size{also}, or set {key} to null")
    if negatives < batch_size - first:
        also = f", raise {threshold}" if threshold else ""
        raise ConfigError(f"{key} is {share}: each batch draws {batch_size - first} {neg} rows but the log has "
                          f"{negatives}: raise {key} or lower the batch size{also}, or set {key} to null")
    return first, batch_size - first


def balanced_batch(groups: tuple[list[int], list[int]], counts: tuple[int, int], seed: int, step: int) -> list[int]:
    """Row numbers of ``step``'s global batch drawn ``counts[k]`` from ``groups[k]`` (e.g. the desirable and the
    undesirable answers of a log), each group cycled in its own fresh permutation per pass (``epoch_batch``), then
    mixed in an order fixed by the seed and the step: so a resumed run reads what the uninterrupted one would, and
    a group of 50 rows is seen as often as a batch asks, however long the other is."""
    rows = [group[i] for k, (group, count) in enumerate(zip(groups, counts))
            for i in epoch_batch(len(group), count, seed * 3 + k + 1, step)]
    order = torch.randperm(len(rows), generator=torch.Generator().manual_seed(seed * 100_003 + step))
    return [rows[i] for i in order.tolist()]


class Trainer:
    def __init__(self, cfg: Config, policy, tokenizer, eval_rows: list[dict], strategy, run_dir: Path,
                 eval_reward: CombinedReward | None):
        self.cfg = cfg
        self.policy = policy
        self.tokenizer = tokenizer
        self.eval_reward = eval_reward  # scores evaluations (greedy completions of eval_rows)
        self.eval_rows = eval_rows
        self.strategy = strategy
        self.device = strategy.device
        self.run_dir = Path(run_dir)
        self.sizes = cfg.sizes(strategy.world_size)
        self.params = policy.trainable_parameters()
        p = cfg.train
        self.optimizer = torch.optim.AdamW(self.params, lr=p.lr, weight_decay=p.weight_decay)
        self.scheduler = torch.optim.lr_scheduler.LambdaLR(
            self.optimizer, lr_lambda(p.lr_schedule, p.warmup_steps, self.sizes.optimizer_steps))
        accum, micro = self.accumulation()
        # DeepSpeed wraps the optimizer (or replaces it): train with what the strategy returns
        self.optimizer, self.scheduler = strategy.prepare(policy, self.optimizer, self.scheduler, p.max_grad_norm,
                                                          accum, micro)
        self.engine = make_engine(cfg, tokenizer, strategy, context_length(policy.model))  # rollouts, evaluation
        self.step = 0
        self.process_started = time.perf_counter()  # the run command sets its own start
        self.wall_seconds_before = 0.0  # spent by the processes this run was resumed from
        self.eval_reward_before: float | None = None
        self.last_eval_samples: list[tuple] = []  # (prompt, completion, reward) of the latest evaluation
        self.save_seconds = 0.0  # how long the last checkpoint write took: whether another fits in a SIGTERM's grace
        self.hooks = Hooks()  # the Python API's callbacks (llmrl.api); none from the command line
        self.stop_requested = False  # set by a callback (RLTrainer.stop()): the run ends at the next step boundary

    @property
    def evaluates(self) -> bool:
        """Whether there is a held-out set to evaluate on (none with data.eval_size 0)."""
        return bool(self.eval_rows)

    def accumulation(self) -> tuple[int, int]:
        """(microbatches per optimizer step on one rank, sequences per microbatch)."""
        raise NotImplementedError

    def train_step(self) -> dict:
        """One training step; returns its metrics, averaged over the ranks."""
        raise NotImplementedError

    def progress(self, stats: dict) -> dict:
        """What the progress bar shows after a step."""
        return {}

    def fit(self, logger, bar=None) -> tuple[dict, dict | None]:
        """The run loop every trainer shares: steps until ``train.total_steps``, evaluating and checkpointing as
        ``run:`` says, metrics to ``logger``; returns the last step's metrics and the last evaluation (None when
        no step was left to take).

        SIGTERM (see ``stop_if_terminated``) never interrupts a step: the step it arrives in finishes (evaluation and
        periodic checkpoint included), then every rank stops at that boundary and ``Terminated`` is raised."""
        cfg = self.cfg
        total = cfg.train.total_steps
        stats, after = {}, None
        with sigterm_recorded() as received:
            if self.step == 0:
                self.apply_schedule()
            while self.step < total:
                stats = self.train_step()
                step = self.step
                evaluated = self.evaluates and (step == total or bool(cfg.run.eval_every and
                                                                      step % cfg.run.eval_every == 0))
                if evaluated:
                    after = self.evaluate()
                    stats.update({k: v for k, v in after.items() if k.startswith("eval/") and k != "eval/skipped"})
                    logger.log_samples(step, self.last_eval_samples[:cfg.run.log_samples])
                logger.log(step, stats)
                if bar is not None:
                    bar.update(1)
                    bar.set_postfix(self.progress(stats), refresh=False)
                self.hooks.call("on_step_end", step, stats)
                if evaluated:
                    self.hooks.call("on_evaluate", step, eval_metrics(after))
                self.apply_schedule()  # before this step's checkpoint: a resume from it goes on with the new values
                saved = bool(cfg.run.save_every and step % cfg.run.save_every == 0 and step < total)
                if saved:
                    self.save_checkpoint(self.checkpoint_path(step))  # collective: every rank takes part
                self.stop_if_terminated(received[0] if received else None, saved)
                if self.step < total and self.strategy.any_rank(self.stop_requested)[0]:
                    return stats, (after if evaluated else None)  # a callback stopped the run: it ends as usual
        return stats, after

    def run(self, logger, eval_rows: list) -> dict:
        """The whole run once the trainer is built: the evaluation before training (unless resumed past it),
        ``fit``, the evaluation after, the last step's and the final checkpoint, and ``summary.json``; returns the
        summary. Ctrl-C raises ``Interrupted`` naming the checkpoint to resume from."""
        from tqdm.auto import tqdm

        from llmrl.tracking import read_log

        cfg, main = self.cfg, self.strategy.is_main
        if main:  # the algorithm run and its own settings, as the model card will list them
            from llmrl.algorithms import describe

            print("; ".join(f"{label}: {text}" for label, text in describe(cfg)), flush=True)
        if not self.evaluates:
            if main and self.step == 0:
                print("evaluation off (data.eval_size is 0): no held-out set, no eval/* metrics", flush=True)
        elif self.eval_reward_before is None:
            before = self.evaluate()
            self.eval_reward_before = before["eval/reward"]
            logger.log(0, eval_metrics(before))
            logger.log_samples(0, self.last_eval_samples[:cfg.run.log_samples])
            how, what = "sampled" if cfg.run.eval_sampled else "greedy", "episodes" if cfg.env.name else "prompts"
            if main:
                print(f"eval reward before training ({how}, {len(eval_rows)} held-out {what}): "
                      f"{self.eval_reward_before:.4f}", flush=True)
            self.hooks.call("on_evaluate", 0, eval_metrics(before))

        bar = tqdm(total=cfg.train.total_steps, initial=self.step, desc=cfg.algorithm,
                   disable=not (cfg.run.progress and main), dynamic_ncols=True)
        try:
            stats, after = self.fit(logger, bar)
        except KeyboardInterrupt:
            raise Interrupted(f"interrupted (Ctrl-C) at step {self.step}: {last_checkpoint_text(self.run_dir)}"
                              ) from None
        finally:
            bar.close()
        if after is None:  # resumed from the last step, or stopped by a callback: evaluate what is there
            if self.evaluates:
                after = self.evaluate()
                self.hooks.call("on_evaluate", self.step, eval_metrics(after))
            if not stats:  # the last training step's metrics, from the log
                rows = [r for r in read_log(self.run_dir)
                        if {"reward/mean", "loss/dpo", "loss/kto", "loss/ilql"} & set(r)] if main else []
                stats = rows[-1] if rows else {}
        self.save_checkpoint(self.checkpoint_path(self.step))
        final = self.save_checkpoint(self.run_dir / "final")
        summary = {
            "eval_reward_before": self.eval_reward_before,
            "eval_reward_after": after["eval/reward"] if after is not None else None,  # None: evaluation off
            "steps": self.step,
            "wall_seconds": round(self.wall_seconds(), 2),  # over every process of the run (resumes included)
            "train_reward_last": stats.get("reward/mean"),
            "kl_last": stats.get("objective/kl", stats.get("info/kl_ref")),
            "run_dir": str(self.run_dir),
            "final_checkpoint": str(final),
            "eval_samples": [{"prompt": p, "completion": c, "reward": r}
                             for p, c, r in (after["samples"] if after is not None else [])],
        }
        if main:
            write_text_atomically(self.run_dir / "summary.json", json.dumps(summary, indent=2))
            rewards = (f"eval reward {summary['eval_reward_before']:.4f} -> {summary['eval_reward_after']:.4f}"
                       if self.evaluates else "no evaluation (data.eval_size 0)")
            print(f"done: {self.step} steps, {rewards}; final checkpoint {final}", flush=True)
        return summary

    def stop_if_terminated(self, received_at: float | None, saved: bool) -> None:
        """At a step boundary: when SIGTERM reached any rank (``received_at``: when it reached this one), every rank
        stops here. The finished step is saved unless it just was, if ``run.stop_grace_seconds`` leaves time (the
        time since the signal plus the last save's duration must fit in it; 0 never saves); otherwise nothing is
        written and the last checkpoint, intact, is named. Raises ``Terminated`` (exit 143) saying where to resume.
        A save that SIGKILL cuts short leaves only a temporary folder, which the next start clears."""
        grace = self.cfg.run.stop_grace_seconds
        stop, save = agree_to_stop(self.strategy, received_at, grace, self.save_seconds, time.monotonic())
        if not stop:
            return
        where = self.checkpoint_path(self.step)
        if save and not saved:
            self.save_checkpoint(where)  # collective: every rank agreed to save
        if save or saved:
            done = f"saved checkpoint {where}; pass --resume to continue from it"
        else:
            why = "run.stop_grace_seconds is 0" if grace <= 0 else \
                f"the step ended too late for run.stop_grace_seconds = {grace:g} after the signal"
            done = f"no checkpoint was saved ({why}); {last_checkpoint_text(self.run_dir)}"
        raise Terminated(f"terminated (SIGTERM) at step {self.step}: {done}")

    def save_extra_weights(self, folder: Path) -> None:
        """Weights this trainer adds beside the adapter and value head (ILQL's heads), written by the main rank with
        the trainable parameters gathered."""

    def load_extra_weights(self, path: Path) -> None:
        """Restores what ``save_extra_weights`` wrote into checkpoint ``path``."""

    def extra_state(self) -> dict:
        """What this trainer adds to a checkpoint's trainer_state.pt (tensors, numbers, strings only)."""
        return {}

    def load_extra_state(self, state: dict) -> None:
        """Restores what ``extra_state`` saved."""

    def after_update(self) -> None:
        """Called after each optimizer step of ``offline_update``, once ``self.step`` counts it (ILQL: the targets)."""

    def offline_update(self, loss: torch.Tensor, stats: dict, start: float) -> dict:
        """The optimizer step of an offline trainer (DPO, KTO, ILQL) on ``loss``: backward, step, ``after_update``, a
        stop on non-finite weights, then the step's metrics averaged over the ranks: ``stats`` (tensors, the loss
        among them as ``loss/NAME``), the optimizer's, the step's seconds since ``start`` and the peak memory."""
        self.strategy.backward(loss, boundary=True)
        grad_norm = self.strategy.step(boundary=True)
        self.step += 1
        self.after_update()
        metrics = {k: v.item() for k, v in stats.items()}
        self.check_finite(self.step, {**metrics, "optim/grad_norm": grad_norm})
        out = {**metrics, "optim/grad_norm": grad_norm, "optim/lr": self.scheduler.get_last_lr()[0],
               "time/step": time.perf_counter() - start, "memory/peak_gib": self.strategy.peak_memory_gib()}
        return self.strategy.all_reduce_mean(out)

    def sequence_logprobs(self, exp: Experience) -> torch.Tensor:
        """(B,) summed log-probabilities of each completion of ``exp`` (temperature 1: the model's own distribution),
        with gradient: what DPO and KTO compare to the reference's."""
        P = exp.query.shape[1]
        logits, _ = self.policy(exp.input_ids, exp.attention_mask, with_values=False)
        logprobs = rl.logprobs_from_logits(logits[:, P - 1:-1].float(), exp.response)
        return (logprobs * exp.response_mask).sum(1)

    def generate(self, prompts: list[str], greedy: bool = False) -> Experience:
        heads = getattr(self.policy, "ilql_heads", None)
        if heads is not None and self.cfg.ilql.beta != 0 and not self.policy.as_reference:
            # ILQL's learned policy: logits + ilql.beta * (Q_target - V), greedy on them or sampled from their
            # ilql.top_k best, in llmrl's decode loop (vLLM cannot read the heads); the reference is the LM alone
            from llmrl.rollout.ilql import ilql_generate

            engine = self.engine if isinstance(self.engine, RolloutEngine) else None
            with self.strategy.generation_context(self.policy):
                return ilql_generate(self.policy.model, heads, self.tokenizer, prompts, self.cfg.ilql.beta,
                                     self.cfg.ilql.top_k, greedy=greedy, cfg=self.cfg.generation,
                                     device=self.device, engine=engine, **self.strategy.generate_kwargs)
        if isinstance(self.engine, VLLMEngine):  # vLLM decodes: the model is only read, block by block
            context, kwargs = nullcontext(), {}
        else:
            context, kwargs = self.strategy.generation_context(self.policy), self.strategy.generate_kwargs
        with context:
            return generate(self.policy.model, self.tokenizer, prompts, self.cfg.generation, self.device,
                            greedy=greedy, engine=self.engine, **kwargs)

    def prompt_texts(self, rows: list[dict]) -> list[str]:
        """The texts the policy continues: plain prompts, or conversations through the chat template."""
        return render_prompts(self.tokenizer, [r[self.cfg.data.prompt_column] for r in rows])

    def score(self, rows: list[dict], exp: Experience, reward: CombinedReward) -> tuple[list[str], RewardResult]:
        """Completion texts and ``reward``'s scores; extra dataset columns go in as kwargs.

        The reward gets the prompts as the data holds them and, for conversations, each completion as TRL's
        list of one assistant message."""
        column = self.cfg.data.prompt_column
        prompts = [r[column] for r in rows]
        completions = decode_completions(self.tokenizer, exp)
        extra = {k: [r[k] for r in rows] for k in rows[0] if k != column}
        completion_ids = [ids[m.bool()].tolist() for ids, m in zip(exp.response, exp.response_mask)]
        return completions, reward(prompts, as_completions(prompts, completions), completion_ids=completion_ids,
                                   **extra)

    def check_finite(self, step: int, stats: dict) -> None:
        """Stop the run (every rank alike) when the update left a non-finite trainable weight: nothing of this
        step is saved, and the last checkpoint stays the good one."""
        trainable = [p for p in self.policy.parameters() if p.requires_grad]
        with self.strategy.gathered(trainable):
            bad = sum(int(not torch.isfinite(p).all()) for p in trainable)
        if self.strategy.all_reduce_sum(torch.tensor(float(bad), device=self.device)).item() == 0:
            return
        last = latest_checkpoint(self.run_dir)
        shown = ", ".join(f"{k} {stats[k]:.3g}" for k in ("loss/policy", "loss/dpo", "loss/kto", "loss/ilql",
                                                          "optim/grad_norm")
                          if isinstance(stats.get(k), float))
        raise RunStopped(f"step {step}: training diverged: {bad} trainable tensors hold NaN or inf ({shown}); nothing "
                         f"of this step was saved. Last good checkpoint: {last or 'none yet'}. Lower train.lr (or clip "
                         f"harder with train.max_grad_norm) and {'pass --resume' if last else 'start again'}")

    # ------------------------------------------------------------------------------------------
    # evaluation

    @torch.no_grad()
    def evaluate(self, batch_size: int = 64) -> dict:
        """Greedy (or, with run.eval_sampled, sampled) rollouts of the held-out rows: the mean raw reward of those
        scored, what ``eval_samples`` adds, and a few samples. The random generators are left as they were, so
        that evaluating (how often, or a last evaluation before a run is extended with --resume) never changes
        what training samples."""
        self.policy.eval()
        rng = self.strategy.rng_state()
        try:
            samples, stats = self.eval_samples(batch_size)
        finally:
            self.strategy.set_rng_state(rng)
        scores = [score for *_, score in samples if score is not None]
        self.last_eval_samples = samples
        return {"eval/reward": sum(scores) / len(scores) if scores else math.nan, **stats, "samples": samples[:5]}

    def eval_samples(self, batch_size: int) -> tuple[list[tuple[str, str, float | None]], dict]:
        """((prompt, completion, reward or None when it was not scored) of every held-out prompt (a conversation
        is shown by its last message), {"eval/skipped": the unscored})."""
        samples = []
        for start in range(0, len(self.eval_rows), batch_size):
            rows = self.eval_rows[start:start + batch_size]
            exp = self.generate(self.prompt_texts(rows), greedy=not self.cfg.run.eval_sampled)
            completions, result = self.score(rows, exp, self.eval_reward)
            samples.extend((content(r[self.cfg.data.prompt_column]), c, s if ok else None)
                           for r, c, s, ok in zip(rows, completions, result.scores, result.valid))
        return samples, {"eval/skipped": sum(score is None for *_, score in samples)}

    # ------------------------------------------------------------------------------------------
    # checkpoints

    def save_checkpoint(self, target: Path) -> Path:
        """Every rank calls this: the adapter and value head (gathered under ZeRO-3) from the main rank, the
        optimizer state from the strategy (sharded under DeepSpeed), an RNG state per rank; written into a
        temporary folder that the main rank renames into place once everything is there.

        A write that fails (a full disk) on any rank stops the run on every rank: the temporary folder is removed,
        the checkpoints already there stay as they were."""
        s = self.strategy
        started = time.monotonic()
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
            # full fine-tuning: the whole model, a plain transformers folder (export copies it), in one file
            self.policy.model.save_pretrained(tmp / ("model" if self.policy.full_fine_tuning else "adapter"),
                                              **({"max_shard_size": "10000GB"} if self.policy.full_fine_tuning else {}))
            save_file({k: v.detach().cpu().contiguous() for k, v in self.policy.value_head.state_dict().items()},
                      tmp / "value_head.safetensors")
            self.save_extra_weights(tmp)

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
                "eval_reward_before": self.eval_reward_before,
                "wall_seconds": self.wall_seconds(),
                **self.extra_state(),
            }, tmp / COMPLETE_MARK))
            attempt(lambda: commit_checkpoint(tmp, target))
            if not failure:
                prune_checkpoints(self.run_dir, self.cfg.run.keep_last)
        self._stop_if_a_write_failed(failure, target, tmp)
        self.save_seconds = time.monotonic() - started
        self.hooks.call("on_save", self.step, target)
        return target

    def _stop_if_a_write_failed(self, failure: list, target: Path, tmp: Path) -> None:
        """Agree over the ranks whether a checkpoint write failed; if one did, clean up and stop them all."""
        failed = self.strategy.all_reduce_sum(torch.tensor(float(bool(failure)), device=self.device)).item()
        self.strategy.barrier()
        if not failed:
            return
        if self.strategy.is_main:
            shutil.rmtree(tmp, ignore_errors=True)
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
            why = first_line(failure[0], 160)
        last = latest_checkpoint(self.run_dir)
        raise RunStopped(f"step {self.step}: could not write checkpoint {target} ({why}; {free}): nothing was "
                         f"replaced and the half-written folder was removed. Last good checkpoint: "
                         f"{last or 'none yet'}. Free some space (or choose another run.output_dir) and "
                         f"{'pass --resume' if last else 'start again'}")

    def wall_seconds(self) -> float:
        """Wall time of the whole run: earlier processes (saved in checkpoints) plus this one."""
        return self.wall_seconds_before + time.perf_counter() - self.process_started

    def apply_settings(self, values: dict) -> None:
        """New values of hyper-parameters (``config.SCHEDULABLE``: a ``schedule:`` entry, or a resumed run's changes)
        from the current step on: written into the run's config (saved with later checkpoints, read where they are
        used), and where the trainer holds its own copy (the optimizer's learning rate), set there too."""
        for key, value in values.items():
            section, name = key.split(".")
            setattr(getattr(self.cfg, section), name, value)
            if key == "train.lr":
                self.set_learning_rate(value)

    def apply_schedule(self) -> None:
        """The ``schedule:`` entry of the step just finished (or of step 0, before the first), if any: applied
        before that step's checkpoint is saved, so that a run resumed from it goes on with these values."""
        for entry in self.cfg.schedule:
            if entry.step == self.step:
                self.apply_settings(dict(entry.set))
                if self.strategy.is_main:
                    print(f"schedule: from step {self.step}: " +
                          ", ".join(f"{k} = {v!r}" for k, v in entry.set.items()), flush=True)

    def set_learning_rate(self, lr: float) -> None:
        """A new base learning rate from the current step on (``train.lr`` changed on resume): the schedule's factor
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
        if self.policy.full_fine_tuning:
            self.load_full_weights(path)
            return
        adapter = read_weights(path / "adapter" / "adapter_model.safetensors", self.device)
        result = set_peft_model_state_dict(self.policy.model, adapter)
        if getattr(result, "unexpected_keys", None):
            raise ConfigError(f"checkpoint {path} does not match this model (unexpected adapter weights "
                              f"{result.unexpected_keys[:3]}): use the config it was trained with")
        if self.policy.separate_critic:  # peft writes a second adapter to a folder of its name
            from llmrl.models.policy import CRITIC_ADAPTER

            critic = path / "adapter" / CRITIC_ADAPTER / "adapter_model.safetensors"
            if not critic.is_file():
                raise ConfigError(f"checkpoint {path} has no separate critic ({critic} is missing): it was trained "
                                  f"with ppo.critic: shared; resume it so")
            set_peft_model_state_dict(self.policy.model, read_weights(critic, self.device), CRITIC_ADAPTER)
        try:
            self.policy.value_head.load_state_dict(read_weights(path / "value_head.safetensors", self.device))
        except RuntimeError as e:  # wrong shapes
            raise ConfigError(f"checkpoint {path}: value_head.safetensors does not fit this model "
                              f"({str(e).splitlines()[0][:150]}): use the config it was trained with") from None
        self.load_extra_weights(path)

    def load_full_weights(self, path: Path) -> None:
        """Full fine-tuning: the whole model and the value head of checkpoint ``path`` (tied weights are saved once
        and tied again here, as safetensors' ``load_model`` does)."""
        from safetensors.torch import load_model

        weights = path / "model" / "model.safetensors"
        if not weights.is_file() and (path / "adapter").is_dir():
            raise ConfigError(f"checkpoint {path} holds a LoRA adapter, but lora is null (full fine-tuning): resume it "
                              f"with the lora section it was trained with")
        read_weights(weights, self.device)  # missing, damaged or not finite: one line naming it
        try:
            load_model(self.policy.model, weights, strict=True, device=str(self.device))
        except RuntimeError as e:
            raise ConfigError(f"checkpoint {path}: model/model.safetensors does not fit this model "
                              f"({str(e).splitlines()[0][:150]}): use the config it was trained with") from None
        self.policy.value_head.load_state_dict(read_weights(path / "value_head.safetensors", self.device))
        self.load_extra_weights(path)

    def load_checkpoint(self, path: Path, state: dict | None = None) -> None:
        """Continue from checkpoint ``path``; ``state``: its trainer_state.pt, when the caller has read it already."""
        path = Path(path)
        if state is None:
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
        self.step = state["step"]
        self.wall_seconds_before = float(state.get("wall_seconds", 0.0))
        self.eval_reward_before = state["eval_reward_before"]
        self.load_extra_state(state)

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
