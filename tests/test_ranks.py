"""Several ranks, said plainly, without starting any: the start-up line, one error line instead of one per rank,
the announced DeepSpeed op build, batch sizes that do not divide over the ranks, and the ZeRO stage taken from a
DeepSpeed JSON. The real multi-rank runs are tests/test_deepspeed.py's."""
import json
import subprocess
import sys
from pathlib import Path

import pytest

from helpers import subprocess_env

from llmrl.config import ConfigError, load_config

REPO = Path(__file__).resolve().parent.parent
TINY = REPO / "configs" / "tiny.yaml"


# --- the start-up line ---------------------------------------------------------------------------------------------


def test_one_process_says_where_it_runs_and_how_it_accumulates():
    from llmrl.distributed.strategy import SingleProcess, accumulation

    cfg = load_config(TINY, ["train.mini_batch_size=32", "train.micro_batch_size=8"])
    line = SingleProcess("cpu").describe(*accumulation(cfg, 1))
    assert line == ("strategy: one process on cpu; 4 microbatches of 8 sequences per optimizer step "
                    "(gradient accumulation 4)")


def deepspeed_strategy(ds_overrides=(), world_size=2, rank=0):
    """A DeepSpeed strategy's own logic (no process group): as make_strategy builds it, rank and world size set."""
    from llmrl.distributed.strategy import DeepSpeed, resolve_zero_stage

    cfg = load_config(TINY, list(ds_overrides))
    strategy = DeepSpeed.__new__(DeepSpeed)
    strategy.ds_cfg, strategy.dtype, strategy.backend = cfg.deepspeed, "float32", "gloo"
    strategy.zero_stage = resolve_zero_stage(cfg.deepspeed)
    strategy.rank, strategy.world_size, strategy.is_main = rank, world_size, rank == 0
    import torch

    strategy.device = torch.device("cpu")
    return cfg, strategy


@pytest.mark.parametrize("env,nodes", [({"LOCAL_SIZE": "2"}, "2 ranks on 1 node"),  # deepspeed --num_gpus 2
                                       ({"LOCAL_WORLD_SIZE": "1"}, "2 ranks on 2 nodes")])  # torchrun --nnodes 2
def test_deepspeed_line_names_stage_ranks_nodes_backend_and_accumulation(monkeypatch, env, nodes):
    from llmrl.distributed.strategy import accumulation

    for key in ("LOCAL_SIZE", "LOCAL_WORLD_SIZE"):
        monkeypatch.delenv(key, raising=False)
    for key, value in env.items():
        monkeypatch.setenv(key, value)
    cfg, strategy = deepspeed_strategy(["deepspeed.zero_stage=3", "train.micro_batch_size=16"])
    assert strategy.describe(*accumulation(cfg, 2)) == (
        f"strategy: DeepSpeed ZeRO-3, {nodes} (gloo, cpu); per rank: 1 microbatch of 16 sequences per "
        f"optimizer step (gradient accumulation 1)")
    cfg, strategy = deepspeed_strategy(["deepspeed.offload_optimizer=true", "train.micro_batch_size=4"])
    assert strategy.describe(*accumulation(cfg, 2)).startswith(
        f"strategy: DeepSpeed ZeRO-2 with optimizer offloaded to CPU, {nodes} (gloo, cpu); per rank: 4 microbatches "
        f"of 4 sequences")


def test_the_start_up_line_is_printed_by_the_run_on_the_main_rank_only(monkeypatch, capsys):
    """The run prints strategy.describe() right after making the strategy (before any model is loaded), once."""
    import llmrl.api as api
    from llmrl.distributed.strategy import SingleProcess

    class Stop(Exception):
        pass

    for rank in (0, 1):
        strategy = SingleProcess("cpu")
        strategy.rank, strategy.is_main = rank, rank == 0
        monkeypatch.setattr("llmrl.distributed.strategy.make_strategy", lambda cfg, s=strategy: s)
        monkeypatch.setattr("llmrl.rewards.base.build_reward", lambda *a, **k: (_ for _ in ()).throw(Stop()))
        cfg = load_config(TINY, ["train.micro_batch_size=16"])
        with pytest.raises(Stop):
            api.run(cfg)
        out = capsys.readouterr().out
        expected = "strategy: one process on cpu; 2 microbatches of 16 sequences per optimizer step"
        assert (expected in out) == (rank == 0), out


# --- one error line, not one per rank ------------------------------------------------------------------------------


@pytest.mark.parametrize("rank,printed", [(None, True), ("0", True), ("1", False)])
def test_a_config_error_is_printed_by_rank_0_only_and_every_rank_exits_with_its_code(monkeypatch, capsys, rank,
                                                                                     printed):
    from llmrl.cli import console

    monkeypatch.setattr(console, "QUIET_RANK_GRACE", 0.0)
    if rank is None:
        monkeypatch.delenv("RANK", raising=False)
    else:
        monkeypatch.setenv("RANK", rank)

    def body():
        raise ConfigError("train.micro_batch_size is 0: must be a positive integer")

    assert console.run_cli(body) == 2
    err = capsys.readouterr().err
    assert err == ("error: train.micro_batch_size is 0: must be a positive integer\n" if printed else ""), err


def test_other_errors_of_later_ranks_are_still_printed(monkeypatch, capsys):
    """A reward or a stop may concern one rank only: only the config errors every rank shares are left to rank 0."""
    from llmrl.cli import console
    from llmrl.errors import RewardError

    monkeypatch.setenv("RANK", "1")

    def body():
        raise RewardError("reward 'flaky' raised")

    assert console.run_cli(body) == 2
    assert capsys.readouterr().err == "error: reward 'flaky' raised\n"


def test_a_later_rank_waits_before_exiting_so_the_launcher_does_not_cut_rank_0_off(tmp_path):
    """The launchers stop every rank once one exits with an error: rank 1 leaving at once could kill rank 0 before its
    line. Run as the command line runs it, RANK=1 prints nothing, exits 2 and took the grace period."""
    code = ("import sys, time; from llmrl.cli.console import run_cli, QUIET_RANK_GRACE; from llmrl.errors import "
            "ConfigError\nt = time.monotonic()\ndef body(): raise ConfigError('bad')\nc = run_cli(body)\n"
            "print(time.monotonic() - t >= QUIET_RANK_GRACE); sys.exit(c)")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=60,
                         env={**subprocess_env(), "RANK": "1"})
    assert (out.returncode, out.stderr, out.stdout.strip()) == (2, "", "True")


# --- the one-time DeepSpeed op build -------------------------------------------------------------------------------


def test_an_op_build_is_announced_once_before_it_starts_and_not_when_cached(monkeypatch, tmp_path, capsys):
    from deepspeed.accelerator import get_accelerator
    from deepspeed.git_version_info import installed_ops

    from llmrl.distributed.strategy import announce_op_build, op_needs_build

    monkeypatch.setenv("TORCH_EXTENSIONS_DIR", str(tmp_path))  # torch's JIT builds and caches ops here
    builder = get_accelerator().create_op_builder("CPUAdamBuilder")
    monkeypatch.setitem(installed_ops, "cpu_adam", True)  # a DeepSpeed installed with its ops prebuilt
    assert not op_needs_build(builder)
    monkeypatch.setitem(installed_ops, "cpu_adam", False)  # pip's DeepSpeed: built at first use
    assert op_needs_build(builder)
    capsys.readouterr()  # DeepSpeed's own accelerator notice
    announce_op_build("CPUAdamBuilder", "its CPU Adam for ZeRO-Offload", main=False)
    assert capsys.readouterr().out == ""  # the other ranks wait for the same build, silently
    announce_op_build("CPUAdamBuilder", "its CPU Adam for ZeRO-Offload", main=True)
    assert capsys.readouterr().out == (f"building DeepSpeed's cpu_adam op once (its CPU Adam for ZeRO-Offload); this "
                                       f"takes a minute or two, later runs load it from {tmp_path / 'cpu_adam'}\n")
    (tmp_path / "cpu_adam").mkdir()
    (tmp_path / "cpu_adam" / "cpu_adam.so").write_bytes(b"")  # what torch leaves after the build
    assert not op_needs_build(builder)
    announce_op_build("CPUAdamBuilder", "its CPU Adam for ZeRO-Offload", main=True)
    assert capsys.readouterr().out == ""


# --- batch sizes over the ranks ------------------------------------------------------------------------------------


@pytest.mark.parametrize("overrides,world,message", [
    # the case: the tiny recipe (mini 32, micro 32) on 2 ranks
    ([], 2, "train.mini_batch_size / world size = 32 / 2 = 16 is not divisible by train.micro_batch_size = 32: use "
            "train.micro_batch_size = 16 (sequences per forward on one rank), or train.mini_batch_size = 64"),
    (["train.micro_batch_size=8"], 3, "train.rollout_batch_size = 64 is not divisible by the world size = 3: use "
                                      "train.rollout_batch_size = 63 or 66 (to split evenly over 3 ranks)"),
    (["train.rollout_batch_size=48", "train.mini_batch_size=12", "train.micro_batch_size=2"], 8,
     "train.mini_batch_size = 12 is not divisible by the world size = 8: use train.mini_batch_size = 8 or 16 (it must "
     "divide train.rollout_batch_size and split evenly over 8 ranks)"),
    (["algorithm=grpo", "train.micro_batch_size=8"], 3,
     "train.rollout_batch_size = 64 is not divisible by the world size x critic_free.num_generations = 3 x 4 = 12: "
     "use train.rollout_batch_size = 60 or 72 (to sample whole groups of completions on each of 3 ranks)"),
    (["train.mini_batch_size=16", "train.micro_batch_size=6"], 1,
     "train.mini_batch_size = 16 is not divisible by train.micro_batch_size = 6: use train.micro_batch_size = 4 or 8 "
     "(sequences per forward on one rank)"),
    (["algorithm=dpo", "dpo.batch_size=30"], 4, "dpo.batch_size = 30 is not divisible by the world size = 4: use "
                                                "dpo.batch_size = 28 or 32"),
    (["algorithm=kto", "kto.batch_size=6"], 4, "kto.batch_size = 6 is not divisible by the world size = 4: use "
                                               "kto.batch_size = 4 or 8"),
])
def test_sizes_that_do_not_divide_over_the_ranks_name_the_nearest_that_do(overrides, world, message):
    from llmrl.distributed.strategy import accumulation

    with pytest.raises(ConfigError) as e:  # world 1: already when the config is loaded
        accumulation(load_config(TINY, overrides), world)
    assert str(e.value) == message


def test_the_suggested_sizes_do_divide():
    from llmrl.distributed.strategy import accumulation

    assert accumulation(load_config(TINY, ["train.micro_batch_size=16"]), 2) == (1, 16)
    assert accumulation(load_config(TINY, ["train.mini_batch_size=64"]), 2) == (1, 32)
    assert accumulation(load_config(TINY, ["train.rollout_batch_size=66",
                                           "train.mini_batch_size=66", "train.micro_batch_size=11"]), 3) == (2, 11)


def test_make_strategy_checks_the_sizes_before_any_model_is_loaded(monkeypatch):
    from llmrl.distributed.strategy import make_strategy

    monkeypatch.setenv("WORLD_SIZE", "2")
    with pytest.raises(ConfigError, match="use train.micro_batch_size = 16"):
        make_strategy(load_config(TINY, ["run.strategy=deepspeed"]))


# --- the ZeRO stage of a DeepSpeed JSON ----------------------------------------------------------------------------


def test_a_json_stage_is_taken_when_zero_stage_is_not_set(tmp_path):
    from llmrl.distributed.strategy import resolve_zero_stage

    zero3 = REPO / "configs" / "deepspeed" / "zero3.json"
    assert load_config(TINY).deepspeed.zero_stage is None  # null: "2 unless the JSON says otherwise"
    assert resolve_zero_stage(load_config(TINY).deepspeed) == 2
    assert resolve_zero_stage(load_config(TINY, [f"deepspeed.config_file={zero3}"]).deepspeed) == 3
    assert resolve_zero_stage(load_config(TINY, ["deepspeed.zero_stage=1"]).deepspeed) == 1
    assert resolve_zero_stage(load_config(TINY, [f"deepspeed.config_file={zero3}", "deepspeed.zero_stage=3"]
                                          ).deepspeed) == 3
    no_stage = tmp_path / "overlap.json"
    no_stage.write_text(json.dumps({"zero_optimization": {"overlap_comm": True}}))
    assert resolve_zero_stage(load_config(TINY, [f"deepspeed.config_file={no_stage}"]).deepspeed) == 2
    assert resolve_zero_stage(load_config(TINY, [f"deepspeed.config_file={no_stage}", "deepspeed.zero_stage=0"]
                                          ).deepspeed) == 0


def test_an_explicit_stage_that_contradicts_the_json_stays_an_error(tmp_path):
    from llmrl.distributed.strategy import resolve_zero_stage

    zero3 = REPO / "configs" / "deepspeed" / "zero3.json"
    with pytest.raises(ConfigError, match="deepspeed.config_file sets ZeRO stage 3 but deepspeed.zero_stage is 2: make "
                                          "them agree, or remove deepspeed.zero_stage to take the file's"):
        resolve_zero_stage(load_config(TINY, [f"deepspeed.config_file={zero3}", "deepspeed.zero_stage=2"]).deepspeed)
    bad = tmp_path / "bad.json"
    bad.write_text(json.dumps({"zero_optimization": {"stage": 4}}))
    with pytest.raises(ConfigError, match="sets zero_optimization.stage 4: use 0, 1, 2 or 3"):
        resolve_zero_stage(load_config(TINY, [f"deepspeed.config_file={bad}"]).deepspeed)


def test_the_json_stage_reaches_the_engine_config_and_the_start_up_checks(monkeypatch):
    from llmrl.distributed.strategy import make_strategy

    zero3 = REPO / "configs" / "deepspeed" / "zero3.json"
    cfg, strategy = deepspeed_strategy([f"deepspeed.config_file={zero3}"])
    assert strategy.zero_stage == 3
    assert strategy.config_dict(1.0, 1, 16)["zero_optimization"]["stage"] == 3
    monkeypatch.setenv("WORLD_SIZE", "2")  # ZeRO-3's refusals apply to the file's stage 3 as to an explicit one
    with pytest.raises(ConfigError, match=r"ZeRO-3 with gradient accumulation \(2 microbatches"):
        make_strategy(load_config(TINY, ["run.strategy=deepspeed", f"deepspeed.config_file={zero3}",
                                         "train.micro_batch_size=8"]))


def test_a_checkpoint_that_saved_stage_2_resumes_with_the_key_left_out(tmp_path):
    """Checkpoints written when the default was 2 hold zero_stage: 2; null now means the same stage there."""
    import yaml

    from llmrl.config import to_dict
    from llmrl.distributed.run_dir import resume_changes

    cfg = load_config(TINY)
    checkpoint = tmp_path / "final"
    checkpoint.mkdir()
    for saved, refused in ((2, False), (None, False), (3, True)):
        data = to_dict(cfg)
        data["deepspeed"]["zero_stage"] = saved
        (checkpoint / "config.yaml").write_text(yaml.safe_dump(data))
        if refused:
            with pytest.raises(ConfigError, match=r"deepspeed\.zero_stage 3 -> 2"):
                resume_changes(checkpoint, cfg)
        else:
            assert resume_changes(checkpoint, cfg) == {}


@pytest.mark.parametrize("file", sorted(p.name for p in (REPO / "configs" / "deepspeed").glob("*.json")))
def test_every_shipped_deepspeed_json_gives_its_own_stage_without_zero_stage(file):
    from llmrl.distributed.strategy import resolve_zero_stage

    path = REPO / "configs" / "deepspeed" / file
    stage = json.loads(path.read_text())["zero_optimization"]["stage"]
    assert resolve_zero_stage(load_config(TINY, [f"deepspeed.config_file={path}"]).deepspeed) == stage


@pytest.mark.parametrize("algorithm", ["dpo", "kto"])
def test_offline_algorithms_split_their_own_batch_not_the_rollout_sizes(algorithm):
    """tiny.yaml's train.mini_batch_size 32 = micro_batch_size 32 does not split over 2 ranks; DPO and KTO never
    read them (they stopped two-rank runs of both before the first step)."""
    from llmrl.distributed.strategy import accumulation

    cfg = load_config(TINY, [f"algorithm={algorithm}", f"{algorithm}.batch_size=8"])
    assert accumulation(cfg, 2) == (1, 4)
    assert cfg.sizes(2).optimizer_steps == cfg.train.total_steps
