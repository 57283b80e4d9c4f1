"""Train a reward model: python launch/train_reward.py --config configs/reward_minilm.yaml"""
import os
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))  # run from a clone, uninstalled

from llmrl.cli.train_reward import main  # noqa: E402

if __name__ == "__main__":
    sys.exit(main())
