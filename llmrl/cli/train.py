"""``python launch/ppo.py --config configs/tiny.yaml [section.key=value ...] [--resume]``: a whole PPO run."""
from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

from tqdm.auto import tqdm

from llmrl.cli.console import config_parser, run_cli
from llmrl.config import Config, RunStopped, load_config, to_dict
from llmrl.data.prompts import check_prompt_lengths, load_prompts
from llmrl.distributed.checkpoint import COMPLETE_MARK, load_state_file, write_text_atomically
from llmrl.distributed.run_dir import claim_run_dir, make_run_dir, resume_changes
from llmrl.rewards.base import build_eval_reward, build_reward
from llmrl.tracking import read_log


def parse_args(argv: list[str] | None, description: str) -> argparse.Namespace:
    parser = config_parser(description, "YAML recipe, e.g. configs/tiny.yaml")
    parser.add_argument("--resume", action="store_true", help="continue from the last checkpoint in run.output_dir")
    parser.add_argument("--overwrite", action="store_true", help="delete an existing run.output_dir first")
    parser.add_argument("--local_rank", type=int, default=None, help=argparse.SUPPRESS)  # set by deepspeed
    return parser.parse_intermixed_args(argv)


def run(cfg: Config, resume: bool = False, overwrite: bool = False) -> dict:
    """Train with PPO as ``cfg`` says; returns the summary written to run_dir/summary.json."""
    from llmrl.models.policy import build_policy, context_length
    from llmrl.models.sources import resolve_model
    from llmrl.demo.warm_start import run_warm_start
    from llmrl.distributed.strategy import make_strategy
    from llmrl.trainers.base import Terminated, last_checkpoint_text
    from llmrl.trainers.online import OnlineTrainer
    from llmrl.tracking import MetricsLogger

    started = time.perf_counter()
    run_dir = Path(cfg.run.output_dir)
    strategy = make_strategy(cfg)
    main = strategy.is_main
    if cfg.env.name:  # the environment's rewards; a wrong name or kwargs fail here, before anything heavy
        from llmrl.envs import make_env

        make_env(cfg.env.name, cfg.env.kwargs)
        reward = eval_reward = None
    else:
        reward = build_reward(cfg.reward, strategy.device)  # bad paths, models, URLs fail before anything heavy
        eval_reward = build_eval_reward(cfg.reward)
    train_rows, eval_rows = load_prompts(cfg.data, cfg.env)
    columns = set(train_rows[0]) - {cfg.data.prompt_column}
    for r in (reward, eval_reward):
        if r is not None:
            r.check_arguments(columns, cfg.data.source)
    name = cfg.model.name_or_path
    # warm_start builds the recipe's tiny model into a missing local folder; a package path or a GGUF file is
    # never built, it must exist
    builds = (cfg.warm_start is not None and not name.startswith("pkg:") and not name.endswith(".gguf")
              and not Path(name).exists())
    if not builds:
        resolve_model(name, "model.name_or_path")  # a GGUF converts now, once
    # the main rank locks run_dir before checking it; run_lock must live as long as the run (released when it ends)
    resume_from, run_lock = claim_run_dir(run_dir, resume, overwrite, strategy)
    changed = {}
    if resume_from is not None:
        resume_state = load_state_file(resume_from / COMPLETE_MARK)
        strategy.check_resumable(resume_from, resume_state)  # plain vs DeepSpeed
        changed = resume_changes(resume_from, cfg)  # settings a resume may not change are refused here
    strategy.barrier()  # every rank has read the run directory before the main rank changes it
    if main:
        make_run_dir(run_dir, overwrite)
        if builds:
            run_warm_start(cfg, progress=cfg.run.progress)
    strategy.barrier()

    strategy.seed_everything(cfg.run.seed)
    policy, tokenizer = build_policy(cfg.model, cfg.lora, strategy.device)
    context = context_length(policy.model)
    for rows, where in () if cfg.env.name else ((train_rows, "data.source"), (eval_rows, "data.eval_source")):
        check_prompt_lengths(rows, cfg.data.prompt_column, tokenizer, cfg.data.max_prompt_length,
                             cfg.generation.max_new_tokens, context, where)

    if cfg.algorithm == "dpo":
        from llmrl.trainers.dpo import DPOTrainer, load_pairs

        trainer = DPOTrainer(cfg, policy, tokenizer, load_pairs(cfg.dpo.data), eval_rows, strategy, run_dir,
                             eval_reward or reward)
    else:
        trainer = OnlineTrainer(cfg, policy, tokenizer, reward, train_rows, eval_rows, strategy, run_dir, eval_reward)
    trainer.process_started = started
    if resume_from is not None:
        trainer.load_checkpoint(resume_from, resume_state)
        if "train.lr" in changed:
            trainer.set_learning_rate(cfg.train.lr)
        say(main, f"resumed from {resume_from} at step {trainer.step}" +
            (f"; changed: {', '.join(f'{k} {a!r} -> {b!r}' for k, (a, b) in changed.items())}" if changed else ""))
    elif cfg.reward.normalize == "reference":
        trainer.fit_reward_normalizer()
        say(main, f"reward normalisation fitted on reference samples: mean {trainer.reward_norm.mean:.4f}, "
                  f"std {trainer.reward_norm.std:.4f}")
    logger = MetricsLogger(run_dir, enabled=strategy.is_main,
                           resume_step=trainer.step if resume_from is not None else None,
                           report_to=cfg.run.report_to, config=to_dict(cfg))
    if trainer.eval_reward_before is None:
        before = trainer.evaluate()
        trainer.eval_reward_before = before["eval/reward"]
        logger.log(0, {k: v for k, v in before.items() if k.startswith("eval/") and k != "eval/skipped"})
        logger.log_samples(0, trainer.last_eval_samples[:cfg.run.log_samples])
        how, what = "sampled" if cfg.run.eval_sampled else "greedy", "episodes" if cfg.env.name else "prompts"
        say(main, f"eval reward before training ({how}, {len(eval_rows)} held-out {what}): "
                  f"{trainer.eval_reward_before:.4f}")

    total = cfg.train.total_steps
    bar = tqdm(total=total, initial=trainer.step, desc="ppo", disable=not (cfg.run.progress and strategy.is_main),
               dynamic_ncols=True)
    stats, after = {}, None
    try:
        stats, after = trainer.fit(logger, bar)
    except KeyboardInterrupt:
        raise Interrupted(f"interrupted (Ctrl-C) at step {trainer.step}: {last_checkpoint_text(run_dir)}") from None
    except Terminated:  # SIGTERM: every rank stopped at the same step (and saved it, if there was time)
        logger.close()
        strategy.close()  # as a finished run does: a process group left to the interpreter's exit may abort
        raise
    finally:
        bar.close()

    if after is None:  # resumed from the last step: nothing left to train, evaluate what is there
        after = trainer.evaluate()
        stats = last_training_row(run_dir) if main else {}
    trainer.save_checkpoint(trainer.checkpoint_path(trainer.step))
    final = trainer.save_checkpoint(run_dir / "final")
    summary = {
        "eval_reward_before": trainer.eval_reward_before,
        "eval_reward_after": after["eval/reward"],
        "steps": trainer.step,
        "wall_seconds": round(trainer.wall_seconds(), 2),  # over every process of the run (resumes included)
        "train_reward_last": stats.get("reward/mean"),
        "kl_last": stats.get("objective/kl"),
        "run_dir": str(run_dir),
        "final_checkpoint": str(run_dir / "final"),
        "eval_samples": [{"prompt": p, "completion": c, "reward": r} for p, c, r in after["samples"]],
    }
    logger.close()
    if strategy.is_main:
        write_text_atomically(run_dir / "summary.json", json.dumps(summary, indent=2))
        print(json.dumps({k: v for k, v in summary.items() if k != "eval_samples"}, indent=2), flush=True)
        print(f"done: {trainer.step} steps, eval reward {summary['eval_reward_before']:.4f} -> "
              f"{summary['eval_reward_after']:.4f}; final checkpoint {final}", flush=True)
    strategy.close()
    return summary


class Interrupted(RunStopped):
    """Ctrl-C: the command exits with 130, as a shell expects. (SIGTERM is ``llmrl.trainers.base.Terminated``, 143:
    the trainer stops every rank at a step boundary and saves that step first.)"""

    exit_code = 130


def last_training_row(run_dir: Path) -> dict:
    """The last training step's metrics in log.jsonl (a run resumed at its last step takes none)."""
    rows = [r for r in read_log(run_dir) if "reward/mean" in r or "loss/dpo" in r]
    return rows[-1] if rows else {}


def say(main: bool, text: str) -> None:
    """Print once per run, from the main rank."""
    if main:
        print(text, flush=True)


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv, "Fine-tune a causal LM with PPO on a LoRA adapter.")
    return run_cli(lambda: run(load_config(args.config, args.overrides), resume=args.resume,
                               overwrite=args.overwrite))


if __name__ == "__main__":
    sys.exit(main())
