"""Hyper-parameter search (``llmrl tune``, on Optuna) and population-based training (``llmrl pbt``, on Ray Tune) over
llmrl's ordinary runs: each trial or member is a run folder that resumes, plots and exports as any other."""

import sys
import types


class _CallableModule(types.ModuleType):
    """``llmrl.tune(config, space, trials=N)`` is ``llmrl.tune.search.tune``: the name is also this package's, which
    Python binds to ``llmrl.tune`` as soon as any of its modules is imported, so the package itself is callable."""

    def __call__(self, *args, **kwargs):
        from llmrl.tune.search import tune

        return tune(*args, **kwargs)


sys.modules[__name__].__class__ = _CallableModule
