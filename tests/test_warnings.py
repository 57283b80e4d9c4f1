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


def test_the_tiny_models_loss_is_named_so_the_warm_start_logs_nothing(monkeypatch):
    """transformers picks a model's loss from its class name, which GPT2LMHeadModel does not match, and logs a
    fallback notice on the first supervised step of the warm start unless the model names its loss."""
    import torch
    import transformers.modeling_utils

    from llmrl.data.tasks import SEPARATOR
    from llmrl.demo.tiny import char_tokenizer, tiny_gpt2

    logged = []
    monkeypatch.setattr(transformers.modeling_utils.logger, "warning_once", lambda *a, **k: logged.append(a))
    tokenizer = char_tokenizer("abcdef" + SEPARATOR)
    model = tiny_gpt2(tokenizer, n_layer=1, n_embd=32, n_head=2, n_positions=16)
    ids = torch.tensor([[3, 4, 5, 9]])
    loss = model(input_ids=ids, labels=ids).loss
    assert torch.isfinite(loss) and logged == []
