"""DeepSpeed with two real CPU ranks (gloo): ZeRO-2 and ZeRO-3 give the single-process run's numbers,
checkpoints resume, LoRA under ZeRO-3 saves a non-empty adapter that exports; combinations that cannot
work are refused at start-up."""
import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from helpers import EQUAL, MASTER_PORT, assert_one_line, free_port, launch_ppo, ppo_command, subprocess_env, training_rows

from llmrl.config import ConfigError, load_config

REPO = Path(__file__).resolve().parent.parent
pytestmark = pytest.mark.slow
import deepspeed  # noqa: F401  (installed by the README's test command: a missing one fails)

TOLERANCE = 1e-5  # absolute, on losses and gradient norms of order 0.01-0.2 (measured differences ~1e-7)


@pytest.fixture(scope="module")
def warm(tmp_path_factory):
    path = tmp_path_factory.mktemp("warm") / "model"
    out = subprocess.run([sys.executable, str(REPO / "launch" / "sft.py"), "--config", str(REPO / "configs/tiny.yaml"),
                          f"model.name_or_path={path}", "warm_start.steps=200", "run.progress=false"],
                         capture_output=True, text=True, timeout=600, cwd=REPO, env=subprocess_env())
    assert out.returncode == 0, out.stderr[-2000:]
    return path


@pytest.fixture(scope="module")
def equal_runs(warm, tmp_path_factory):
    base = tmp_path_factory.mktemp("equal")
    runs = {
        "single": (0, ["train.micro_batch_size=4"]),  # 4 microbatches of 4 per step
        "zero2": (2, ["deepspeed.zero_stage=2", "train.micro_batch_size=4"]),  # 2 ranks x 2 microbatches of 4
        "zero3": (2, ["deepspeed.zero_stage=3", "train.micro_batch_size=8"]),  # 2 ranks x 1 microbatch of 8
    }
    for name, (ranks, extra) in runs.items():
        # running reward normalisation: its statistics must span every rank's scores for the runs to agree
        out = launch_ppo([*EQUAL, "reward.normalize=running", f"model.name_or_path={warm}",
                          f"run.output_dir={base / name}", *extra], ranks)
        assert out.returncode == 0, out.stderr[-3000:]
    return base


def test_zero2_and_zero3_match_the_single_process_run(equal_runs):
    single, zero2, zero3 = (training_rows(equal_runs / n) for n in ("single", "zero2", "zero3"))
    assert len(single) == len(zero2) == len(zero3) == 3
    for key in ("reward/mean", "loss/value", "optim/grad_norm", "objective/kl", "response/length"):
        for a, b, c in zip(single, zero2, zero3):
            assert abs(a[key] - b[key]) < TOLERANCE and abs(a[key] - c[key]) < TOLERANCE, (key, a[key], b[key], c[key])
    assert single[-1]["objective/kl"] != 0.0  # the policy moved: equal numbers are not trivially equal


def test_torchrun_as_two_nodes_of_one_rank_each_matches_one_process(warm, tmp_path):
    """docs/scaling.md's multi-node torchrun command, both "nodes" on this machine: both finish, node 0 alone says
    the layout, and the run computes what one process computes."""
    port, common = free_port(), [*EQUAL, "train.total_steps=2", f"model.name_or_path={warm}"]
    nodes = [subprocess.Popen([sys.executable, "-m", "torch.distributed.run", "--nnodes", "2", "--nproc-per-node", "1",
                               "--node-rank", str(node), "--master-addr", "127.0.0.1", "--master-port", str(port),
                               *ppo_command([*common, "train.micro_batch_size=8", f"run.output_dir={tmp_path / 'nodes'}"]
                                            )[1:]],
                              stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, cwd=REPO, env=subprocess_env())
             for node in (1, 0)]
    (out1, err1), (out0, err0) = (node.communicate(timeout=600) for node in nodes)
    assert [node.returncode for node in nodes] == [0, 0], (err0[-3000:], err1[-3000:])
    assert "strategy: DeepSpeed ZeRO-2, 2 ranks on 2 nodes (gloo, cpu); per rank: 1 microbatch of 8" in out0
    assert "strategy:" not in out1 and "done: 2 steps" not in out1  # the layout and the summary: once, from rank 0
    single = launch_ppo([*common, "train.micro_batch_size=8", f"run.output_dir={tmp_path / 'single'}"], ranks=0)
    assert single.returncode == 0, single.stderr[-3000:]
    assert "strategy: one process on cpu; 2 microbatches of 8 sequences" in single.stdout
    a, b = training_rows(tmp_path / "single"), training_rows(tmp_path / "nodes")
    assert [r["step"] for r in a] == [r["step"] for r in b] == [1, 2]
    for key in ("reward/mean", "loss/value", "optim/grad_norm", "objective/kl"):
        for x, y in zip(a, b):
            assert abs(x[key] - y[key]) < TOLERANCE, (key, x[key], y[key])
    assert b[-1]["objective/kl"] != 0.0  # the policy moved at step 1


def test_a_bad_setting_on_two_ranks_is_one_line_with_the_sizes_to_use(tmp_path):
    """Issue 31: the tiny recipe (mini = micro = 32) on 2 ranks printed its divisibility error once per rank."""
    out = launch_ppo([f"run.output_dir={tmp_path / 'run'}"])
    assert_one_line(out, "train.mini_batch_size / world size = 32 / 2 = 16 is not divisible by train.micro_batch_size "
                         "= 32: use train.micro_batch_size = 16")
    assert out.stderr.count("error: ") == 1, out.stderr[-3000:]


def test_cpu_ranks_leave_no_shared_memory_behind(equal_runs):
    # DeepSpeed's CPU all-reduce maps one /dev/shm file per rank (~66 MB of RAM) and never removes it.
    assert not list(Path("/dev/shm").glob(f"deepspeed_allreduce_buffer_{os.getuid()}_*_{MASTER_PORT}_*"))


def test_lora_under_zero3_is_saved_non_empty_and_exports(equal_runs, tmp_path):
    final = equal_runs / "zero3" / "final"
    adapter = load_file(final / "adapter" / "adapter_model.safetensors")
    lora_b = [v for k, v in adapter.items() if "lora_B" in k]
    assert lora_b and all(v.numel() > 0 for v in adapter.values())
    assert max(v.abs().max().item() for v in lora_b) > 0  # trained, not the zero init
    assert (final / "rng_rank0.pt").is_file() and (final / "rng_rank1.pt").is_file()
    # The same adapter as the single-process run. Adam divides each gradient by its own running scale, so
    # 1e-7 differences in near-zero gradient entries become ~1e-5 in the weights after 3 steps of lr 1e-3.
    single = load_file(equal_runs / "single" / "final" / "adapter" / "adapter_model.safetensors")
    assert max((adapter[k] - single[k]).abs().max().item() for k in single) < 1e-4
    out = subprocess.run([sys.executable, str(REPO / "launch" / "export.py"), "--checkpoint", str(final), "--out",
                          str(tmp_path / "merged")], capture_output=True, text=True, timeout=300, cwd=REPO,
                         env=subprocess_env())
    assert out.returncode == 0, out.stderr[-2000:]
    assert (tmp_path / "merged" / "model.safetensors").is_file()


# Rank 0 writes the trainer state that every rank reloads: statistics kept per rank would not survive it.
# (ZeRO-1 shares ZeRO-2's optimizer code in DeepSpeed; it is left out to keep CI short. ZeRO-2 with REINFORCE is
# test_envs_e2e.py::test_two_zero2_ranks_resume_an_env_run_with_the_same_episodes, with episodes.)
@pytest.mark.parametrize("stage,micro,algorithm", [(3, 4, "ppo")])
def test_two_rank_run_resumes_from_its_checkpoint(warm, tmp_path, stage, micro, algorithm):
    common = [f"model.name_or_path={warm}", f"algorithm={algorithm}", "reward.normalize=running",
              f"deepspeed.zero_stage={stage}", "train.rollout_batch_size=16",
              "train.mini_batch_size=8", f"train.micro_batch_size={micro}", "train.epochs=2", "run.save_every=2",
              "run.eval_every=0", "run.progress=false", "data.eval_size=16", "run.threads=1", "run.seed=5"]
    whole = launch_ppo([*common, "train.total_steps=4", f"run.output_dir={tmp_path / 'whole'}"])
    assert whole.returncode == 0, whole.stderr[-3000:]
    first = launch_ppo([*common, "train.total_steps=2", f"run.output_dir={tmp_path / 'split'}"])
    assert first.returncode == 0, first.stderr[-3000:]
    second = launch_ppo([*common, "train.total_steps=4", f"run.output_dir={tmp_path / 'split'}", "--resume"])
    assert second.returncode == 0, second.stderr[-3000:]
    assert "resumed from" in second.stdout
    a, b = training_rows(tmp_path / "whole"), training_rows(tmp_path / "split")
    assert [r["step"] for r in b] == [1, 2, 3, 4]
    for key in ("reward/mean", "loss/policy", "loss/value", "objective/kl"):
        if key in a[-1] or key in b[-1]:  # REINFORCE has no value loss
            assert abs(a[-1][key] - b[-1][key]) < TOLERANCE, (key, a[-1][key], b[-1][key])


def test_resume_on_another_number_of_ranks_where_deepspeed_allows_it(warm, tmp_path):
    common = [f"model.name_or_path={warm}", "train.rollout_batch_size=16", "train.mini_batch_size=8",
              "train.micro_batch_size=2", "run.eval_every=0", "run.progress=false", "data.eval_size=16", "run.threads=1"]
    for stage in (0, 2):
        run_dir = tmp_path / f"zero{stage}"
        first = launch_ppo([*common, f"deepspeed.zero_stage={stage}", "train.total_steps=2", f"run.output_dir={run_dir}"])
        assert first.returncode == 0, first.stderr[-3000:]
        if stage == 0:  # one plain process has no DeepSpeed engine to reload it into: refused, with the way out
            plain = launch_ppo([*common, "train.total_steps=3", f"run.output_dir={run_dir}", "--resume"], ranks=0)
            assert plain.returncode == 2 and "was written under DeepSpeed (ZeRO-0, 2 ranks): resume it under the " \
                "deepspeed launcher" in plain.stderr, plain.stderr[-3000:]
        second = launch_ppo([*common, f"deepspeed.zero_stage={stage}", "train.total_steps=3", f"run.output_dir={run_dir}",
                         "--resume"], ranks=1)
        if stage == 0:  # whole optimizer state on every rank: 2 ranks -> 1 rank continues
            assert second.returncode == 0, second.stderr[-3000:]
            assert [r["step"] for r in training_rows(run_dir)] == [1, 2, 3]
        else:  # partitioned optimizer state: refused before training, with the reason
            assert second.returncode != 0
            assert "DeepSpeed reloads ZeRO-2 optimizer state only on as many ranks" in second.stderr + second.stdout


@pytest.mark.parametrize("quantization", ["8bit", "4bit"])
def test_quantized_base_with_zero2_on_two_ranks(warm, tmp_path, quantization):
    out = launch_ppo([f"model.name_or_path={warm}", f"model.quantization={quantization}", "deepspeed.zero_stage=2",
                  "train.total_steps=2", "train.rollout_batch_size=8", "train.mini_batch_size=8", "train.micro_batch_size=2",
                  "train.epochs=1", "run.eval_every=0", "run.progress=false", "data.eval_size=8", "run.threads=1",
                  f"run.output_dir={tmp_path / 'q'}"])
    assert out.returncode == 0, out.stderr[-3000:]
    adapter = load_file(tmp_path / "q" / "final" / "adapter" / "adapter_model.safetensors")
    assert max(v.abs().max().item() for k, v in adapter.items() if "lora_B" in k) > 0


def test_the_deepspeed_json_is_merged_section_by_section():
    """config.update replaced whole sections: zero2_offload.json (as the README documents it) died with
    'ZeRO-Offload with a client provided optimizer', and offload_optimizer: true with zero2.json lost the offload
    while still building DeepSpeed's CPU Adam."""
    from llmrl.config import DeepSpeedConfig
    from llmrl.distributed.strategy import DeepSpeed

    strategy = DeepSpeed.__new__(DeepSpeed)  # only its config logic: no process group needed
    for file, offload, expected in (("zero2.json", True, True), ("zero2_offload.json", False, True),
                                    ("zero2.json", False, False), ("zero3_offload.json", False, True)):
        strategy.ds_cfg = DeepSpeedConfig(zero_stage=3 if "zero3" in file else 2, offload_optimizer=offload,
                                          config_file=str(REPO / "configs" / "deepspeed" / file))
        strategy.zero_stage = strategy.ds_cfg.zero_stage  # as make_strategy resolves it
        strategy.dtype = "float32"
        config = strategy.config_dict(1.0, 2, 4)
        assert strategy.offloads_optimizer(config) is expected, file
        assert config["zero_optimization"]["stage"] == strategy.ds_cfg.zero_stage
        assert config["gradient_clipping"] == 1.0 and config["train_micro_batch_size_per_gpu"] == 4


def test_the_shipped_zero3_json_starts_a_run_without_zero_stage(warm, tmp_path):
    """deepspeed.zero_stage left out: the file's stage is taken (issue 31: zero3.json was refused against the default
    2), and the start-up line names it. One real launch (CI time); every shipped JSON's stage is resolved in
    tests/test_ranks.py."""
    file = "zero3.json"
    stage = json.loads((REPO / "configs" / "deepspeed" / file).read_text())["zero_optimization"]["stage"]
    out = launch_ppo([f"model.name_or_path={warm}", f"deepspeed.config_file=configs/deepspeed/{file}",
                      "train.total_steps=1", "train.rollout_batch_size=8",
                      "train.mini_batch_size=8", "train.micro_batch_size=4", "train.epochs=1", "data.eval_size=8",
                      "run.progress=false", "run.eval_every=0", f"run.output_dir={tmp_path / 'run'}"])
    assert out.returncode == 0, out.stderr[-3000:]
    assert f"strategy: DeepSpeed ZeRO-{stage}" in out.stdout
    assert len(training_rows(tmp_path / "run")) == 1


def test_impossible_combinations_fail_at_start_up(tmp_path, monkeypatch):
    from llmrl.distributed.strategy import make_strategy

    monkeypatch.setenv("WORLD_SIZE", "2")
    cfg = load_config(REPO / "configs" / "tiny.yaml", ["run.strategy=deepspeed", "model.quantization=8bit",
                                                        "deepspeed.zero_stage=3"])
    with pytest.raises(ConfigError, match="cannot be used with ZeRO-3"):
        make_strategy(cfg)
    cfg = load_config(REPO / "configs" / "tiny.yaml", ["run.strategy=deepspeed", "deepspeed.zero_stage=3",
                                                        "train.mini_batch_size=32", "train.micro_batch_size=4"])
    with pytest.raises(ConfigError, match=r"ZeRO-3 with gradient accumulation \(4 microbatches"):
        make_strategy(cfg)
    cfg = load_config(REPO / "configs" / "tiny.yaml", ["run.strategy=deepspeed", "deepspeed.zero_stage=2",
                                                        "deepspeed.offload_params=true", "train.micro_batch_size=16"])
    with pytest.raises(ConfigError, match="offload_params needs deepspeed.zero_stage: 3"):
        make_strategy(cfg)


ZERO3_GENERATION = """
import json
import sys
import torch
import torch.distributed as dist

calls = []  # every collective this rank makes, by name; patched before DeepSpeed caches the functions
for name in ("all_gather_into_tensor", "all_gather", "broadcast", "all_reduce", "reduce_scatter_tensor"):
    def counted(*args, _name=name, _fn=getattr(dist, name), **kwargs):
        calls.append(_name)
        return _fn(*args, **kwargs)
    setattr(dist, name, counted)

tests_dir, model_dir, run_dir = sys.argv[-3:]  # after the launcher's --local_rank
sys.path.insert(0, tests_dir)
from helpers import make_trainer, tiny_config
from llmrl.distributed.strategy import make_strategy

cfg = tiny_config(model_dir, run_dir, "run.strategy=deepspeed", "deepspeed.zero_stage=3",
                  "train.rollout_batch_size=8", "train.mini_batch_size=4", "train.micro_batch_size=2", "train.epochs=2",
                  "generation.do_sample=false")
strategy = make_strategy(cfg)
trainer = make_trainer(cfg, strategy)
rank = strategy.rank
prompts = [r[cfg.data.prompt_column] for r in trainer.train_rows[:4]]
lengths, counts = [], []
for new_tokens in ((1, 12), (12, 1)):  # the ranks decode different numbers of tokens, both ways round
    cfg.generation.max_new_tokens = new_tokens[rank]
    before = len(calls)
    exp = trainer.generate(prompts)
    counts.append(len(calls) - before)
    lengths.append(exp.response.shape[1])
cfg.generation.max_new_tokens = (1, 12)[rank]
trainer.train_step()  # ranks with unequal rollouts train together: 2 minibatches x 2 epochs
trainer.train_step()
# Without gathering, every forward fetches weights collectively: the ranks decode in lockstep (the engine's
# all_finished all-reduce), so both return as many columns, whatever their own prompts need.
cfg.generation.max_new_tokens = 12
mine = [r["prompt"] for r in trainer.train_rows if len(r["answer"]) == (3, 5)[rank]][:4]  # 3 or 5 letters
natural = trainer.generate(mine).response.shape[1]  # gathered weights: each rank at its own pace
strategy.ds_cfg.gather_for_generation = False
synced = trainer.generate(mine).response.shape[1]
with open(f"{run_dir}.rank{rank}.json", "w") as f:  # a file each: the ranks share one stdout
    json.dump({"rank": rank, "lengths": lengths, "counts": counts, "natural": natural, "synced": synced}, f)
strategy.barrier()
"""


def test_zero3_rollout_gathers_once_and_ranks_may_decode_unequal_lengths(warm, tmp_path):
    """Regression: ZeRO-3 hung when one rank kept decoding after the other had finished, because DeepSpeed's
    hooks re-gathered the weights for each token (collectives the finished rank never joined). Also the
    other mode, gather_for_generation: false, where the ranks must decode in lockstep instead."""
    script = tmp_path / "generate.py"
    script.write_text(ZERO3_GENERATION)
    out = subprocess.run(["deepspeed", "--num_gpus", "2", "--master_port", str(free_port()),
                          str(script), str(REPO / "tests"), str(warm), str(tmp_path / "run")],
                         capture_output=True, text=True, timeout=300, cwd=tmp_path, env=subprocess_env())
    assert out.returncode == 0, out.stderr[-3000:]
    results = [json.loads((tmp_path / f"run.rank{rank}.json").read_text()) for rank in (0, 1)]
    for r in results:
        rank, lengths, counts = r["rank"], r["lengths"], r["counts"]
        assert lengths[rank] == 1 and lengths[1 - rank] > 1, lengths  # this rank decoded 1 token, then several
        # One gather per rollout, however many tokens: the same collectives for 1 token as for several.
        assert counts[0] == counts[1] and counts[0] > 0, counts
    natural = [r["natural"] for r in results]
    assert natural[0] < natural[1], results  # rank 1's answers are longer
    assert [r["synced"] for r in results] == [natural[1], natural[1]], results  # both ran as long as the slowest


def test_zero3_gradient_accumulation_problem_is_real(tmp_path):
    """The reason for the ZeRO-3 accumulation guard, kept honest: if a DeepSpeed upgrade fixes it, this
    test fails and the guard in llmrl/distributed/strategy.py can go."""
    script = tmp_path / "accum.py"
    script.write_text(
        "import torch, deepspeed\n"
        "deepspeed.init_distributed(dist_backend='gloo')\n"
        "rank = torch.distributed.get_rank()\n"
        "torch.manual_seed(0)\n"
        "model = torch.nn.Sequential(torch.nn.Linear(8, 16), torch.nn.Tanh(), torch.nn.Linear(16, 1))\n"
        "cfg = {'train_micro_batch_size_per_gpu': 2, 'gradient_accumulation_steps': 2,\n"
        "       'zero_optimization': {'stage': 3}, 'zero_allow_untested_optimizer': True}\n"
        "engine, *_ = deepspeed.initialize(model=model, optimizer=torch.optim.SGD(model.parameters(), lr=0.0),\n"
        "                                  config=cfg)\n"
        "g = torch.Generator().manual_seed(rank)\n"
        "for i in range(2):\n"
        "    engine.backward(model(torch.randn(2, 8, generator=g)).pow(2).sum())\n"
        "    engine.step()\n"
        "if rank == 0:\n"
        "    print('NORM', float(engine.get_global_grad_norm()), flush=True)\n"
        "torch.distributed.barrier()\n"
        "from llmrl.distributed.strategy import unlink_cpu_allreduce_buffer\n"
        "unlink_cpu_allreduce_buffer(rank)  # plain DeepSpeed leaves it in /dev/shm\n"
        "torch.distributed.destroy_process_group()\n")
    out = subprocess.run(["deepspeed", "--num_gpus", "2", "--master_port", str(free_port()),
                          str(script)], capture_output=True, text=True, timeout=300, cwd=tmp_path, env=subprocess_env())
    assert out.returncode == 0, out.stderr[-2000:]
    norm = float(out.stdout.split("NORM")[1].split()[0])
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Linear(8, 16), torch.nn.Tanh(), torch.nn.Linear(16, 1))
    for rank in range(2):  # both microbatches of both ranks, averaged over ranks and microbatches
        g = torch.Generator().manual_seed(rank)
        for _ in range(2):
            model(torch.randn(2, 8, generator=g)).pow(2).sum().div(4).backward()
    expected = torch.norm(torch.stack([p.grad.norm() for p in model.parameters()])).item()
    assert abs(norm - expected) > 0.1 * expected, "ZeRO-3 accumulation now looks right: drop the guard"


def test_a_single_process_checkpoint_is_not_resumed_under_deepspeed(equal_runs, warm, tmp_path):
    # DeepSpeed 0.19.8 failed with a bare AssertionError (len(self.ckpt_list) > 0) in its checkpoint loader.
    shutil.copytree(equal_runs / "single" / "final", tmp_path / "step-000003")  # a complete checkpoint
    out = launch_ppo([*EQUAL, "train.total_steps=4", "deepspeed.zero_stage=2", "train.micro_batch_size=4",
                      f"model.name_or_path={warm}", f"run.output_dir={tmp_path}", "--resume"])
    assert out.returncode != 0
    assert "was written by one plain process, not under DeepSpeed: resume it the same way" in out.stderr + out.stdout
