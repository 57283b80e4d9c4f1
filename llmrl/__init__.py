"""llmrl: fine-tune causal language models with reinforcement learning from feedback.

Kept light on purpose: importing ``llmrl`` (or the pure-torch ``llmrl.rl``) loads no transformers, peft
or deepspeed; the modules that need them import them themselves.
"""

__version__ = "0.1.0"
