"""``python -m llmrl.cli.docs``: regenerate docs/config.md, the config reference, from the dataclasses' help."""
from __future__ import annotations

import sys
from pathlib import Path

from llmrl.config import Config, RewardComponentConfig, RewardTrainConfig, help_text

OUT = Path(__file__).resolve().parents[2] / "docs" / "config.md"


def reference() -> str:
    def table(rows) -> list[str]:
        lines = ["| key | default | meaning |", "|---|---|---|"]
        for key, default, text in rows:
            lines.append(f"| `{key}` | {f'`{default}`' if default else ''} | {text.replace('|', '/')} |")
        return lines

    parts = ["# Config reference", "",
             "Generated from the help text of the dataclasses in `llmrl/config.py` by `python -m llmrl.cli.docs`;",
             "a test fails when this file is stale. Any key can be overridden on the command line as",
             "`section.key=value`. Relative paths in a config file are read from the file's folder, those on the",
             "command line from the working directory; `run.output_dir` is always relative to the working",
             "directory (docs/runs.md, Paths in a config).", "",
             "## Training recipes (`launch/ppo.py`, `llmrl train`)", "", *table(help_text(Config)), "",
             "### Each entry of `reward.components`", "", *table(help_text(RewardComponentConfig)), "",
             "## Reward-model training (`launch/train_reward.py`, `llmrl train-reward`)", "",
             *table(help_text(RewardTrainConfig)), ""]
    return "\n".join(parts)


if __name__ == "__main__":
    OUT.parent.mkdir(exist_ok=True)
    OUT.write_text(reference())
    print(f"wrote {OUT}", file=sys.stderr)
