"""``python launch/ppo.py --config configs/tiny.yaml [section.key=value ...] [--resume]``: a whole PPO run."""
from __future__ import annotations

import argparse
import json
import re
import shutil
import sys
import time
from pathlib import Path

from tqdm.auto import tqdm

from llmrl.checkpoint import latest_checkpoint, step_checkpoints, write_text_atomically
from llmrl.config import Config, ConfigError, load_config, to_dict
from llmrl.data import check_prompt_lengths, load_prompts
from llmrl.console import config_parser, run_cli
from llmrl.rewards import build_eval_reward, build_reward


def parse_args(argv: list[str] | None, description: str) -> argparse.Namespace:
    parser = config_parser(description, "YAML recipe, e.g. configs/tiny.yaml")
    parser.add_argument("--resume", action="store_true", help="continue from the last checkpoint in run.output_dir")
    parser.add_argument("--overwrite", action="store_true", help="delete an existing run.output_dir first")
    parser.add_argument("--local_rank", type=int, default=None, help=argparse.SUPPRESS)  # set by deepspeed
    return parser.parse_intermixed_args(argv)


# What a run writes in run.output_dir; --overwrite deletes a folder only when it holds nothing else.
RUN_ENTRY = re.compile(r"^(log\.jsonl|log\.tmp|summary\.json|tensorboard|wandb|final|curves\.png|step-\d+|"
                       r"\.(tmp|old)-.+)$")


def check_run_dir(run_dir: Path, resume: bool, overwrite: bool) -> Path | None:
    """Returns the checkpoint to resume from (or None); refuses to clobber a run that holds checkpoints.

    Reads only, so every rank can call it and reach the same verdict.
    """
    if overwrite:
        foreign = sorted(p.name for p in run_dir.iterdir() if not RUN_ENTRY.match(p.name)) if run_dir.is_dir() else []
        if foreign:
            shown = ", ".join(foreign[:5]) + (f" and {len(foreign) - 5} more" if len(foreign) > 5 else "")
            raise ConfigError(f"--overwrite: run.output_dir = {str(run_dir)!r} also holds {shown}, which llmrl "
                              f"did not write there: --overwrite replaces a run folder only; choose another "
                              f"run.output_dir or move those away")
        return None
    found = step_checkpoints(run_dir)
    if resume:
        if not found:
            raise ConfigError(f"--resume: run.output_dir = {str(run_dir)!r} holds no complete checkpoint; "
                              f"run without --resume to start")
        return latest_checkpoint(run_dir)
    if found or (run_dir / "final").exists():
        raise ConfigError(f"run.output_dir = {str(run_dir)!r} already holds a run: pass --resume to continue it, "
                          f"--overwrite to replace it, or choose another run.output_dir")
    return None


def make_run_dir(run_dir: Path, overwrite: bool) -> None:
    if overwrite and run_dir.exists():
        shutil.rmtree(run_dir)
    run_dir.mkdir(parents=True, exist_ok=True)


def run(cfg: Config, resume: bool = False, overwrite: bool = False) -> dict:
    """Train with PPO as ``cfg`` says; returns the summary written to run_dir/summary.json."""
    from llmrl.policy import build_policy, context_length
    from llmrl.sources import resolve_model
    from llmrl.sft import run_warm_start
    from llmrl.strategy import make_strategy
    from llmrl.trainer import PPOTrainer
    from llmrl.tracking import MetricsLogger

    started = time.perf_counter()
    run_dir = Path(cfg.run.output_dir)
    strategy = make_strategy(cfg)
    main = strategy.is_main
    reward = build_reward(cfg.reward, strategy.device)  # bad paths, models, URLs fail before anything heavy
    eval_reward = build_eval_reward(cfg.reward)
    train_rows, eval_rows = load_prompts(cfg.data)
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
    resume_from = check_run_dir(run_dir, resume, overwrite)
    strategy.barrier()  # every rank has read the run directory before the main rank changes it
    if main:
        make_run_dir(run_dir, overwrite)
        if builds:
            run_warm_start(cfg, progress=cfg.run.progress)
    strategy.barrier()

    strategy.seed_everything(cfg.run.seed)
    policy, tokenizer = build_policy(cfg.model, cfg.lora, strategy.device)
    context = context_length(policy.model)
    for rows, where in ((train_rows, "data.source"), (eval_rows, "data.eval_source")):
        check_prompt_lengths(rows, cfg.data.prompt_column, tokenizer, cfg.data.max_prompt_length,
                             cfg.generation.max_new_tokens, context, where)

    if cfg.algorithm == "dpo":
        from llmrl.dpo import DPOTrainer, load_pairs

        trainer = DPOTrainer(cfg, policy, tokenizer, reward, train_rows, eval_rows, strategy, run_dir, eval_reward,
                             pairs=load_pairs(cfg.dpo.data))
    else:
        trainer = PPOTrainer(cfg, policy, tokenizer, reward, train_rows, eval_rows, strategy, run_dir, eval_reward)
    if resume_from is not None:
        trainer.load_checkpoint(resume_from)
        say(main, f"resumed from {resume_from} at step {trainer.step}")
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
        logger.log(0, {"eval/reward": trainer.eval_reward_before})
        logger.log_samples(0, trainer.last_eval_samples[:cfg.run.log_samples])
        say(main, f"eval reward before training (greedy, {len(eval_rows)} held-out prompts): "
                  f"{trainer.eval_reward_before:.4f}")

    total = cfg.total_steps
    bar = tqdm(total=total, initial=trainer.step, desc="ppo", disable=not (cfg.run.progress and strategy.is_main),
               dynamic_ncols=True)
    stats, after = {}, None
    while trainer.step < total:
        stats = trainer.train_step()
        step = trainer.step
        if step == total or (cfg.run.eval_every and step % cfg.run.eval_every == 0):
            after = trainer.evaluate()
            stats["eval/reward"] = after["eval/reward"]
            logger.log_samples(step, trainer.last_eval_samples[:cfg.run.log_samples])
        logger.log(step, stats)
        bar.update(1)
        if "reward/mean" in stats:
            bar.set_postfix(reward=f"{stats['reward/mean']:.3f}", kl=f"{stats['objective/kl']:.3f}", refresh=False)
        else:  # DPO: no rollouts
            bar.set_postfix(loss=f"{stats['loss/dpo']:.3f}", acc=f"{stats['rewards/accuracy']:.2f}", refresh=False)
        if cfg.run.save_every and step % cfg.run.save_every == 0 and step < total:
            trainer.save_checkpoint(trainer.checkpoint_path(step))  # collective: every rank takes part
    bar.close()

    if after is None:  # resumed from the last step: nothing left to train, evaluate what is there
        after = trainer.evaluate()
    trainer.save_checkpoint(trainer.checkpoint_path(trainer.step))
    final = trainer.save_checkpoint(run_dir / "final")
    summary = {
        "eval_reward_before": trainer.eval_reward_before,
        "eval_reward_after": after["eval/reward"],
        "steps": trainer.step,
        "wall_seconds": round(time.perf_counter() - started, 2),
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
    return summary


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
