"""A normal run shows no warnings of llmrl's making. pyproject's pytest settings hide FutureWarning and
DeprecationWarning, so the test records every warning itself."""
import warnings

from helpers import tiny_config

from llmrl.api import run

# Third-party warnings llmrl cannot avoid, should a package emit them during the run (e.g. on a first import).
UNAVOIDABLE = ("`torch.jit.script_method` is deprecated",)


def test_two_steps_of_the_tiny_default_warn_nothing(tiny_model_dir, tmp_path):
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")  # every warning, each time, whatever was shown before in this process
        run(tiny_config(tiny_model_dir, tmp_path / "run", "train.total_steps=2", "run.log_samples=2"))
    shown = [f"{w.category.__name__} {w.filename}:{w.lineno}: {w.message}" for w in caught
             if not str(w.message).startswith(UNAVOIDABLE)]
    assert shown == [], "\n".join(shown)


def test_a_separate_critic_and_ppo_warn_nothing(tiny_model_dir, tmp_path):
    """The critic's adapter is added beside the policy's (peft's add_adapter): no warning there either."""
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        run(tiny_config(tiny_model_dir, tmp_path / "run", "train.total_steps=1", "algorithm=ppo",
                        "ppo.critic=separate"))
    shown = [f"{w.category.__name__} {w.filename}:{w.lineno}: {w.message}" for w in caught
             if not str(w.message).startswith(UNAVOIDABLE)]
    assert shown == [], "\n".join(shown)
