"""llmrl: fine-tune causal language models with reinforcement learning from feedback.

From Python::

    import llmrl

    result = llmrl.RLTrainer("configs/tiny.yaml", reward_funcs=[my_reward], train_dataset=rows).train()
    result.model, result.summary["eval_reward_after"]
    llmrl.export(result.final_checkpoint, "exported/")      # a plain transformers model
    llmrl.evaluate(result.final_checkpoint)                  # reward before/after and KL to the base

Kept light on purpose: importing ``llmrl`` (or the pure-torch ``llmrl.rl``) loads no transformers, peft
or deepspeed; the names above are imported when first used.
"""

__version__ = "0.1.0"

_LAZY = {
    "RLTrainer": ("llmrl.api", "RLTrainer"),
    "RunResult": ("llmrl.api", "RunResult"),
    "Callback": ("llmrl.api", "Callback"),
    "SFTTrainer": ("llmrl.trainers.sft", "SFTTrainer"),
    "Config": ("llmrl.config", "Config"),
    "load_config": ("llmrl.config", "load_config"),
    "export": ("llmrl.exporter", "export"),
    "evaluate": ("llmrl.trainers.evaluate", "evaluate_checkpoint"),
    "ilql_generate": ("llmrl.rollout.ilql", "ilql_generate"),
    "pbt": ("llmrl.tune.pbt", "pbt"),
    "tune": ("llmrl.tune.search", "tune"),
    "TuneResult": ("llmrl.tune.search", "TuneResult"),
}
__all__ = ["__version__", *_LAZY]


def __getattr__(name: str):
    if name in _LAZY:
        import importlib

        module, attr = _LAZY[name]
        return getattr(importlib.import_module(module), attr)
    raise AttributeError(f"module 'llmrl' has no attribute {name!r}")
