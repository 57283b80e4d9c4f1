"""RL fine-tuning with the config's algorithm (ppo, grpo, rloo, reinforce, dr_grpo, dapo, gspo, cispo, sapo or dpo;
the file keeps PPO's name for the commands that call it). Same as ``llmrl train``. One process:
python launch/ppo.py --config configs/tiny.yaml [section.key=value ...]"""
import os
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))  # run from a clone, uninstalled

from llmrl.cli.train import main  # noqa: E402

if __name__ == "__main__":
    sys.exit(main())
