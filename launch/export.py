"""Export a checkpoint: python launch/export.py --checkpoint runs/tiny/final --out merged/"""
import os
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))  # run from a clone, uninstalled

from llmrl.cli.export import main  # noqa: E402

if __name__ == "__main__":
    sys.exit(main())
