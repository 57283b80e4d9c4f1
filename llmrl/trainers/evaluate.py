"""``llmrl eval --checkpoint RUN/final``: reward and KL to the base on held-out prompts, with a table of
greedy generations before (the base: adapter disabled) and after (the trained adapter), as JSON and Markdown.
RUN may be an RL run or a LoRA ``llmrl sft`` run (its final/ holds the adapter and no value head).
"""
from __future__ import annotations

import json
from pathlib import Path

import torch


@torch.no_grad()
def evaluate_checkpoint(checkpoint: str | Path, config: str | Path | None = None, out: str | Path | None = None,
                        n_samples: int = 8, overrides: list[str] = (), trust_checkpoint_code: bool = False) -> dict:
    """``trust_checkpoint_code``: let the checkpoint's own config.yaml (read when ``config`` is None) run model
    code from the hub and import the reward files and modules it names (see ``llmrl.trust``)."""
    from llmrl.config import ConfigError, load_config
    from llmrl.distributed.strategy import SingleProcess
    from llmrl.trainers.online import build_trainer
    from llmrl.trust import check_checkpoint_algorithm, check_checkpoint_config

    checkpoint = Path(checkpoint)
    if not (checkpoint / "adapter").is_dir() and not (checkpoint / "model").is_dir():  # model: lora: null
        raise ConfigError(f"--checkpoint {str(checkpoint)!r} is not an llmrl checkpoint: pass a run's final/ or "
                          f"step-N/ folder")
    if config is None:
        check_checkpoint_algorithm(checkpoint / "config.yaml", list(overrides), trust_checkpoint_code)
    cfg = load_config(config or checkpoint / "config.yaml", list(overrides), saved=config is None)
    if config is None:
        check_checkpoint_config(cfg, checkpoint, trust_checkpoint_code)
    if cfg.data.eval_size == 0:  # the run trained with evaluation off: it set aside no held-out prompts
        raise ConfigError("data.eval_size is 0: the run had evaluation off, so it has no held-out prompts (a file "
                          "source was trained on in full); pass data.eval_source=FILE data.eval_size=N (prompts "
                          "it never saw; a task:NAME source needs only data.eval_size=N) to evaluate")
    # an llmrl sft run's final/ (a LoRA adapter, no value head): the policy is the base with that adapter, as an RL
    # run started from it (model.adapter) is; "before" is still the base, the adapter disabled
    sft_adapter = not (checkpoint / "value_head.safetensors").is_file() and (checkpoint / "adapter").is_dir()
    if sft_adapter:
        cfg.model.adapter = str(checkpoint / "adapter")
    elif not (checkpoint / "value_head.safetensors").is_file():
        raise ConfigError(f"--checkpoint {str(checkpoint)!r} holds a whole model (model/) and no value head: an llmrl "
                          f"sft run with lora: null; it has no base to compare with: run llmrl eval on an RL run "
                          f"started from it (model.name_or_path={checkpoint / 'model'})")
    trainer = build_trainer(cfg, SingleProcess(cfg.run.device, cfg.run.threads), run_dir=checkpoint.parent)
    if not sft_adapter:
        trainer.load_weights(checkpoint)
    policy, eval_rows = trainer.policy, trainer.eval_rows
    if cfg.algorithm == "ilql":  # "after" decodes from the learned policy, logits + ilql.beta * (Q - V)
        from llmrl.trainers.ilql import attach_heads

        attach_heads(policy, checkpoint, trainer.device, cfg.ilql.two_qs)

    with policy.reference():
        before = trainer.evaluate()
        before_samples = trainer.last_eval_samples
    after = trainer.evaluate()
    after_samples = trainer.last_eval_samples

    # KL(policy || base) on sampled completions of the policy: the mean over prompts of the summed k1.
    kls = []
    for start in range(0, len(eval_rows), 64):
        rows = eval_rows[start:start + 64]
        exp = trainer.rollout(rows)[0] if trainer.plays_episodes else trainer.generate(trainer.prompt_texts(rows))
        trainer.fill_logprobs(exp)
        kls.extend(((exp.logprobs - exp.ref_logprobs) * exp.loss_mask).sum(1).tolist())

    samples = [{"prompt": b[0], "before": b[1], "reward_before": b[2], "after": a[1], "reward_after": a[2]}
               for b, a in zip(before_samples[:n_samples], after_samples[:n_samples])]
    result = {"checkpoint": str(checkpoint), "prompts": len(eval_rows),
              "reward_before": before["eval/reward"], "reward_after": after["eval/reward"],
              "kl_to_base": sum(kls) / len(kls), "samples": samples}
    if trainer.plays_episodes:  # success rate, turns, truncations and how episodes ended, before and after
        result["episodes_before"], result["episodes_after"] = (
            {k: v for k, v in m.items() if k.startswith("eval/") and k != "eval/reward"} for m in (before, after))
    out = Path(out) if out else checkpoint / "eval"
    out.mkdir(parents=True, exist_ok=True)
    (out / "eval.json").write_text(json.dumps(result, indent=2))
    (out / "eval.md").write_text(markdown(result))
    return result


def markdown(result: dict) -> str:
    from llmrl.tracking import markdown_cell as cell

    lines = [f"# Evaluation of `{result['checkpoint']}`", "",
             f"- held-out prompts: {result['prompts']}",
             f"- reward (greedy) before, the base with the adapter disabled: {result['reward_before']:.4f}",
             f"- reward (greedy) after, with the trained adapter: {result['reward_after']:.4f}",
             f"- KL(policy || base) per completion, on sampled completions: {result['kl_to_base']:.4f}",
             *([f"- episode success rate before {result['episodes_before']['eval/success']:.4f}, after "
                f"{result['episodes_after']['eval/success']:.4f}; turns per episode before "
                f"{result['episodes_before']['eval/turns']:.2f}, after {result['episodes_after']['eval/turns']:.2f}"]
               if "episodes_before" in result else []), "",
             "| prompt | before | reward | after | reward |", "|---|---|---|---|---|"]
    for s in result["samples"]:
        lines.append(f"| {cell(s['prompt'])} | {cell(s['before'])} | {s['reward_before']} | {cell(s['after'])} | "
                     f"{s['reward_after']} |")
    return "\n".join(lines) + "\n"
