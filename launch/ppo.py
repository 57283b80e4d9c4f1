"""PPO fine-tuning. One process: python launch/ppo.py --config configs/tiny.yaml [section.key=value ...]"""
import os
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))  # run from a clone, uninstalled

from llmrl.cli.train import main  # noqa: E402

if __name__ == "__main__":
    sys.exit(main())
