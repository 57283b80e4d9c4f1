"""The ``llmrl`` command: ``llmrl train|sft|export ...``, the same entry points as ``launch/*.py``."""
from __future__ import annotations

import sys

COMMANDS = {
    "train": ("llmrl.cli.train", "an RL run: the config's algorithm (same as launch/ppo.py)"),
    "sft": ("llmrl.cli.sft", "the supervised warm start of a recipe (same as launch/sft.py)"),
    "export": ("llmrl.cli.export", "a checkpoint as a plain transformers model (same as launch/export.py)"),
    "train-reward": ("llmrl.cli.train_reward", "a Bradley-Terry reward model (same as launch/train_reward.py)"),
    "serve-reward": ("llmrl.cli.serve_reward", "a config's reward over HTTP (same as launch/serve_reward.py)"),
    "log-answers": ("llmrl.cli.log_answers", "a model's own sampled answers, scored, as offline-RL data (ILQL, KTO, "
                                             "filtered SFT, DPO)"),
    "eval": ("llmrl.cli.evaluate", "reward and KL to the base on held-out prompts, samples before and after"),
    "plot": ("llmrl.cli.plot", "PNG curves of a run's metrics"),
    "tune": ("llmrl.cli.tune", "search a recipe's hyper-parameters (Optuna trials, each an ordinary run)"),
    "pbt": ("llmrl.cli.pbt", "population-based training: members copy better ones and perturb (Ray Tune)"),
}


def usage() -> str:
    lines = ["usage: llmrl COMMAND [options]   (llmrl COMMAND --help for its options; llmrl --version)", "",
             "commands:"]
    lines += [f"  {name:<13} {help}" for name, (_, help) in COMMANDS.items()]
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    if not argv or argv[0] in ("-h", "--help"):
        print(usage())
        return 0
    if argv[0] in ("-V", "--version"):
        from llmrl import __version__

        print(f"llmrl {__version__}")
        return 0
    if argv[0] not in COMMANDS:
        print(f"error: unknown command {argv[0]!r}\n{usage()}", file=sys.stderr)
        return 2
    import importlib

    module = importlib.import_module(COMMANDS[argv[0]][0])
    sys.argv[0] = f"llmrl {argv[0]}"
    return module.main(argv[1:])


if __name__ == "__main__":
    sys.exit(main())
