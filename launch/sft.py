"""Only the supervised warm start of a recipe: python launch/sft.py --config configs/tiny.yaml"""
import os
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))  # run from a clone, uninstalled

from llmrl.cli.sft import main  # noqa: E402

if __name__ == "__main__":
    sys.exit(main())
