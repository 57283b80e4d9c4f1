"""The DeepSpeed internals llmrl relies on (llmrl/distributed/deepspeed_internals.py) are where it expects them on
the installed DeepSpeed: checked on a real ZeRO-3 engine, one rank (gloo, CPU) in this process. A release that moves
one fails here, naming it and the installed version, instead of in a user's first ZeRO-3 rollout."""
import importlib
import inspect
import math
import re
from pathlib import Path

import pytest
import torch

import deepspeed  # installed by the README's test command: a missing one fails, not skips

from helpers import free_port, make_trainer, tiny_config

import llmrl.trainers.base as trainers_base
from llmrl.distributed import deepspeed_internals
from llmrl.distributed.deepspeed_internals import TESTED_RANGE, missing_internals
from llmrl.errors import UserError, first_line

REPO = Path(__file__).resolve().parent.parent
VERSION = deepspeed.__version__
FIX = (f"update llmrl/distributed/deepspeed_internals.py for this release, or leave the release out of the pin in "
       f"pyproject.toml (now deepspeed{TESTED_RANGE})")


def test_pyproject_pins_the_range_the_internals_were_checked_on():
    pins = re.findall(r'"deepspeed([^"]*)"', (REPO / "pyproject.toml").read_text())
    assert pins == [TESTED_RANGE], f"pyproject.toml pins deepspeed{pins}, deepspeed_internals.py names {TESTED_RANGE}"


def test_the_offload_class_keeps_the_method_llmrl_calls():
    module_name = "deepspeed.runtime.zero.parameter_offload"
    try:
        offload_class = importlib.import_module(module_name).DeepSpeedZeRoOffload
    except (ImportError, AttributeError) as e:
        pytest.fail(f"DeepSpeed {VERSION}: {module_name}.DeepSpeedZeRoOffload is gone ({e}): {FIX}")
    method = getattr(offload_class, "_register_deepspeed_module", None)
    assert method is not None, f"DeepSpeed {VERSION}: DeepSpeedZeRoOffload._register_deepspeed_module is gone: {FIX}"
    try:
        inspect.signature(method).bind(object(), torch.nn.Linear(1, 1))  # called as offload._register_...(module)
    except TypeError:
        pytest.fail(f"DeepSpeed {VERSION}: DeepSpeedZeRoOffload._register_deepspeed_module{inspect.signature(method)} "
                    f"no longer takes (self, module): {FIX}")


def test_the_checkpoint_classes_are_where_the_safe_loader_looks():
    classes = deepspeed_internals.checkpoint_classes()  # raises naming the class and the version
    assert [c.__name__ for c in classes] == [name for _, name in deepspeed_internals.CHECKPOINT_CLASSES]


def test_a_moved_internal_is_one_line_naming_it_the_version_and_the_ways_out():
    class Stage3Optimizer:  # a release whose ZeRO-3 optimizer keeps its offload object under another name
        offload = None

    engine = type("Engine", (), {"optimizer": Stage3Optimizer()})()
    assert missing_internals(engine) == ["engine.optimizer.parameter_offload"]
    with pytest.raises(UserError) as raised:
        deepspeed_internals.check_internals(engine)
    assert str(raised.value) == (
        f"DeepSpeed {VERSION} has moved internals that ZeRO-3 rollouts with gathered weights use "
        f"(engine.optimizer.parameter_offload): set deepspeed.gather_for_generation: false, or install a tested "
        f"DeepSpeed: pip install 'deepspeed{TESTED_RANGE}'")


@pytest.fixture(scope="module")
def zero3(tiny_model_dir, tmp_path_factory):
    """A trainer on one ZeRO-3 rank in this process (as under ``deepspeed --num_gpus 1``); the process group is
    torn down after this file's tests."""
    from llmrl.distributed.strategy import make_strategy, unlink_cpu_allreduce_buffer

    with pytest.MonkeyPatch.context() as env:
        for key, value in {"RANK": "0", "LOCAL_RANK": "0", "WORLD_SIZE": "1", "MASTER_ADDR": "127.0.0.1",
                           "MASTER_PORT": str(free_port())}.items():
            env.setenv(key, value)
        # gather_for_generation false: prepare() does not check the internals; the tests below do, with their messages
        cfg = tiny_config(tiny_model_dir, tmp_path_factory.mktemp("run"), "run.strategy=deepspeed",
                          "deepspeed.zero_stage=3", "train.micro_batch_size=4", "train.epochs=1",
                          "generation.do_sample=false", "deepspeed.gather_for_generation=false")
        strategy = make_strategy(cfg)
        try:
            yield make_trainer(cfg, strategy)
        finally:
            strategy.close()  # the next test file in this process finds no process group
            unlink_cpu_allreduce_buffer(strategy.rank)  # while MASTER_ADDR/PORT still name it


def hook_counts(engine) -> dict[str, int]:
    """The forward (pre-)hooks on every submodule, and those DeepSpeed's offload object holds handles of."""
    offload = engine.optimizer.parameter_offload
    return {"on modules": sum(len(m._forward_pre_hooks) + len(m._forward_hooks) for m in offload.module.modules()),
            "forward_hooks": len(offload.forward_hooks), "backward_hooks": len(offload.backward_hooks)}


def test_a_zero3_engine_has_every_internal_llmrl_touches(zero3):
    missing = missing_internals(zero3.strategy.engine)
    assert not missing, f"DeepSpeed {VERSION} moved or renamed {', '.join(missing)}: {FIX}"


def test_a_rollout_runs_with_the_hooks_off_and_they_come_back_after(zero3, monkeypatch):
    strategy, engine = zero3.strategy, zero3.strategy.engine
    prompts = zero3.prompt_texts(zero3.train_rows[:4])
    assert not strategy.ds_cfg.gather_for_generation  # as built: DeepSpeed's hooks fetch every weight in every forward
    with_hooks = zero3.generate(prompts)

    before = hook_counts(engine)
    assert before["forward_hooks"] > 0 and before["backward_hooks"] > 0, before
    seen, plain_generate = {}, trainers_base.generate

    def recording(*args, **kwargs):  # trainer.generate's call, inside strategy.generation_context
        seen.update(hook_counts(engine))
        return plain_generate(*args, **kwargs)

    monkeypatch.setattr(trainers_base, "generate", recording)
    strategy.ds_cfg.gather_for_generation = True  # the default: gathered once, DeepSpeed's hooks removed
    gathered = zero3.generate(prompts)
    removed = before["forward_hooks"] + before["backward_hooks"] + 1  # and the model-level pre-forward hook
    assert seen == {"on modules": before["on modules"] - removed, "forward_hooks": 0, "backward_hooks": 0}, \
        (seen, before)
    assert torch.equal(gathered.response, with_hooks.response)  # greedy: the same tokens both ways
    assert gathered.response.shape[1] > 1

    assert hook_counts(engine) == before, f"DeepSpeed {VERSION}: the hooks did not all come back: {FIX}"
    assert not missing_internals(engine)  # the model-level hook is back under the handle DeepSpeed holds
    assert torch.equal(zero3.generate(prompts).response, gathered.response)  # entered again after the restore
    # The weights are partitioned again: without the restored hooks a forward would find them empty.
    assert hook_counts(engine) == before
    assert math.isfinite(zero3.train_step()["loss/policy"])


def test_a_zero3_checkpoint_holds_no_class_the_safe_loader_is_not_told_of(zero3, tmp_path):
    strategy = zero3.strategy
    state = strategy.save_state(tmp_path)
    assert list((tmp_path / strategy.ENGINE_DIR).rglob("*.pt"))  # model and optimizer states
    try:
        strategy.check_engine_files(tmp_path / strategy.ENGINE_DIR)  # torch's safe loader, checkpoint_classes() allowed
    except Exception as e:  # llmrl's one line hides torch's message, which names the class ("GLOBAL module.Class")
        cause = str(e.__context__ or e)
        classes = ", ".join(sorted(set(re.findall(r"GLOBAL ([\w.]+)", cause)))) or first_line(e.__context__ or e)
        pytest.fail(f"DeepSpeed {VERSION}'s checkpoint files hold {classes}, which checkpoint_classes() does not "
                    f"allow: {FIX}")
    strategy.load_state(tmp_path, state)
