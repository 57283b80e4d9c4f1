"""Prompts and preference data: files, `datasets` names, the built-in tasks, chat templates (TRL's format)."""
