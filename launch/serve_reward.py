"""Serve a reward over HTTP: python launch/serve_reward.py --config configs/tiny.yaml --port 8000"""
import os
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))  # run from a clone, uninstalled

from llmrl.cli.serve_reward import main  # noqa: E402

if __name__ == "__main__":
    sys.exit(main())
