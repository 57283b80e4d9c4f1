"""Optional packages (wandb, bitsandbytes, vllm, deepspeed) checked at start-up, before a model loads, and the
W&B settings (run.wandb_project, wandb_entity, wandb_run_name; WANDB_DIR) as wandb.init receives them. wandb is
not installed here: a fake module in sys.modules stands in for it where it must be present."""
import sys
import types
from pathlib import Path

import pytest
from helpers import tiny_config

from llmrl.api import run
from llmrl.config import ConfigError
from llmrl.packages import check_packages
from llmrl.tracking import MetricsLogger, wandb_arguments


@pytest.fixture
def no_model_loads(monkeypatch):
    """Any model load fails the test: the checks must come first."""
    import llmrl.models.policy

    def load(*args, **kwargs):
        raise AssertionError("a model was loaded before the check")

    monkeypatch.setattr(llmrl.models.policy, "build_policy", load)


def absent(monkeypatch, *packages):
    for package in packages:
        monkeypatch.setitem(sys.modules, package, None)  # `import package` now raises ImportError


@pytest.fixture
def fake_wandb(monkeypatch):
    """A wandb module that records what wandb.init was given."""
    calls = []
    run = types.SimpleNamespace(log=lambda *a, **k: None, finish=lambda: None)
    module = types.ModuleType("wandb")
    module.init = lambda **kwargs: calls.append(kwargs) or run
    module.Table = lambda **kwargs: kwargs
    monkeypatch.setitem(sys.modules, "wandb", module)
    return calls


@pytest.mark.parametrize("override,message", [
    ("run.report_to=[wandb]", "run.report_to names wandb but wandb is not installed: pip install wandb"),
    ("model.quantization=8bit", "model.quantization is '8bit' but bitsandbytes is not installed: pip install "
                                "'llmrl[quant]'"),
    ("generation.engine=vllm", "generation.engine is 'vllm' but vllm is not installed: pip install vllm"),
    ("run.strategy=deepspeed", "run.strategy is 'deepspeed' but deepspeed is not installed: pip install "
                               "'deepspeed>="),
])
def test_a_missing_optional_package_is_one_line_before_the_model_loads(tiny_model_dir, tmp_path, monkeypatch,
                                                                       no_model_loads, override, message):
    absent(monkeypatch, "wandb", "bitsandbytes", "vllm", "deepspeed")
    cfg = tiny_config(tiny_model_dir, tmp_path / "run", override)
    with pytest.raises(ConfigError) as error:
        run(cfg)  # the library call the command line makes
    text = str(error.value)
    assert text.startswith(message) and "\n" not in text, text
    assert not (tmp_path / "run").exists()  # nothing started: not even the run folder


def test_every_missing_package_is_named_at_once(tiny_model_dir, tmp_path, monkeypatch):
    absent(monkeypatch, "wandb", "vllm")
    cfg = tiny_config(tiny_model_dir, tmp_path, "run.report_to=[wandb]", "generation.engine=vllm")
    with pytest.raises(ConfigError, match=r"pip install wandb, .*; generation.engine is 'vllm' .*pip install vllm"):
        check_packages(cfg)


def test_installed_packages_pass(tiny_model_dir, tmp_path, fake_wandb):
    check_packages(tiny_config(tiny_model_dir, tmp_path, "run.report_to=[wandb]", "run.wandb_project=p"))


@pytest.mark.parametrize("key", ["wandb_project", "wandb_entity", "wandb_run_name"])
def test_a_wandb_key_without_report_to_wandb_is_refused(tiny_model_dir, tmp_path, key):
    with pytest.raises(ConfigError, match=rf"run.{key} is 'x' but run.report_to does not name wandb: add "
                                          rf"report_to: \[wandb\]"):
        tiny_config(tiny_model_dir, tmp_path, f"run.{key}=x")


def test_wandb_init_gets_project_entity_and_name_and_honours_wandb_dir(tmp_path, monkeypatch):
    monkeypatch.delenv("WANDB_DIR", raising=False)
    kwargs = wandb_arguments(tmp_path / "my-run", {"a": 1}, project="proj", entity="team", name="first try")
    assert kwargs == dict(name="first try", config={"a": 1}, resume="allow", dir=str(tmp_path / "my-run"),
                          project="proj", entity="team")
    plain = wandb_arguments(tmp_path / "my-run", None)  # W&B's own defaults (WANDB_PROJECT...) then apply
    assert plain == dict(name="my-run", config=None, resume="allow", dir=str(tmp_path / "my-run"))
    monkeypatch.setenv("WANDB_DIR", str(tmp_path / "elsewhere"))
    assert "dir" not in wandb_arguments(tmp_path / "my-run", None)  # wandb reads WANDB_DIR itself


def test_a_run_passes_the_wandb_settings_to_wandb_init(tiny_model_dir, tmp_path, fake_wandb, monkeypatch):
    monkeypatch.delenv("WANDB_DIR", raising=False)
    cfg = tiny_config(tiny_model_dir, tmp_path / "run", "run.report_to=[wandb]", "run.wandb_project=proj",
                      "run.wandb_entity=team", "run.wandb_run_name=try-1", "train.total_steps=1",
                      "run.eval_every=0", "run.log_samples=0")
    run(cfg)
    (kwargs,) = fake_wandb
    assert (kwargs["project"], kwargs["entity"], kwargs["name"]) == ("proj", "team", "try-1")
    assert kwargs["dir"] == str(Path(tmp_path / "run")) and kwargs["config"]["run"]["wandb_project"] == "proj"


def test_metrics_logger_without_wandb_keeps_its_message(tmp_path, monkeypatch):
    absent(monkeypatch, "wandb")
    with pytest.raises(ConfigError, match="run.report_to names wandb but it is not installed: pip install wandb"):
        MetricsLogger(tmp_path, report_to=["wandb"])
