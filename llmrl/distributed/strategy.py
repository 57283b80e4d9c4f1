"""Where the trainer touches devices and processes: one small object (OpenRLHF's "strategy" pattern).

``SingleProcess`` runs on one CPU or GPU; ``DeepSpeed`` shards the same trainer over ranks and nodes with
ZeRO stages 0-3. The trainer calls only the methods below, so both paths run the same training code.

Calling convention, shared by both: ``backward(loss, boundary)`` after every microbatch, then
``step(boundary)``, where ``boundary`` is True on the last microbatch of a minibatch (the optimizer steps
only there). Losses
are already divided by the minibatch's (global) token count, so no strategy rescales them.
"""
from __future__ import annotations

import atexit
import os
import random
import sys
from contextlib import contextmanager, nullcontext
from pathlib import Path

import numpy as np
import torch

from llmrl.config import ConfigError


class SingleProcess:
    rank = 0
    world_size = 1
    is_main = True
    zero_stage = None

    def __init__(self, device: str = "auto", threads: int | None = None):
        if threads is not None:
            torch.set_num_threads(threads)
        if device == "auto":
            device = "cuda" if torch.cuda.is_available() else "cpu"
        if device == "cuda" and not torch.cuda.is_available():
            raise ConfigError("run.device = 'cuda' but no CUDA device is visible: use 'cpu' or 'auto'")
        self.device = torch.device(device)
        self.optimizer = self.scheduler = None
        self.params: list[torch.nn.Parameter] = []
        self.max_grad_norm = 0.0

    def describe(self, accum: int, micro: int) -> str:
        """The start-up line saying how this run is laid out (printed once, by the main rank)."""
        return f"strategy: one process on {self.device.type}; {accumulation_words(accum, micro)}"

    def seed_everything(self, seed: int) -> None:
        """Seeds differ per rank (seed + rank) so that ranks sample different completions."""
        s = seed + self.rank
        random.seed(s)
        np.random.seed(s)
        torch.manual_seed(s)

    def prepare(self, model, optimizer, scheduler, max_grad_norm: float, grad_accum_steps: int,
                micro_batch_size: int) -> tuple:
        """Sets up the optimizer step; returns the (optimizer, scheduler) to use from then on."""
        self.optimizer, self.scheduler = optimizer, scheduler
        self.params = [p for p in model.parameters() if p.requires_grad]
        self.max_grad_norm = max_grad_norm
        return self.optimizer, self.scheduler

    def backward(self, loss: torch.Tensor, boundary: bool = True) -> None:
        loss.backward()

    def step(self, boundary: bool) -> float | None:
        """At a minibatch boundary: clip, step, zero the gradients; returns the norm before clipping."""
        if not boundary:
            return None
        if self.max_grad_norm > 0:
            norm = float(torch.nn.utils.clip_grad_norm_(self.params, self.max_grad_norm))
        else:
            norm = float(torch.norm(torch.stack([p.grad.norm() for p in self.params if p.grad is not None])))
        self.optimizer.step()
        self.scheduler.step()
        self.optimizer.zero_grad(set_to_none=True)
        return norm

    def peak_memory_gib(self) -> float:
        """This process's peak memory so far: allocated GPU memory on CUDA, else resident CPU memory."""
        if self.device.type == "cuda":
            return torch.cuda.max_memory_allocated(self.device) / 2**30
        import resource

        return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20  # KiB on Linux

    # --- collectives (identities in one process) ---
    def all_reduce_sum(self, x: torch.Tensor) -> torch.Tensor:
        return x

    def all_reduce_mean(self, metrics: dict[str, float]) -> dict[str, float]:
        return metrics

    def barrier(self) -> None:
        pass

    def close(self) -> None:
        """After a finished run: nothing to release in one process."""

    def any_rank(self, *flags: bool) -> list[bool]:
        """For each flag, whether any rank has it set (one all-reduce): every rank then takes the same branch before
        a collective, e.g. stops at the same step when the launcher signalled only some of them."""
        counts = self.all_reduce_sum(torch.tensor([float(bool(f)) for f in flags], device=self.device))
        return [bool(c > 0) for c in counts.tolist()]

    def all_ranks_finished(self, finished: torch.Tensor) -> bool:
        """Whether every sequence on every rank has finished (one all-reduce)."""
        return self.all_reduce_sum((~finished).sum().reshape(1).float()).item() == 0

    # --- parameters ---
    def generation_context(self, model):
        """Around generate(): nothing to do when every rank holds the whole model."""
        return nullcontext()

    @property
    def generate_kwargs(self) -> dict:
        return {}

    def gathered(self, params):
        """Around reading partitioned parameters (saving): nothing to do in one process."""
        return nullcontext()

    # --- checkpoint state that is not the adapter ---
    def save_state(self, folder: Path) -> dict:
        """Optimizer and scheduler state, returned for trainer_state.pt."""
        return {"optimizer": self.optimizer.state_dict(), "scheduler": self.scheduler.state_dict()}

    def check_resumable(self, folder: Path, state: dict) -> None:
        """One line when this strategy cannot reload the checkpoint at ``folder`` (``state``: its trainer state);
        checked before the settings of a resume are compared, as the more basic mismatch."""
        if "optimizer" not in state:  # DeepSpeed keeps it in its own files, partitioned over the ranks
            raise ConfigError(f"checkpoint {folder} was written under DeepSpeed (ZeRO-{state.get('zero_stage')}, "
                              f"{state.get('world_size')} ranks): resume it under the deepspeed launcher "
                              f"(deepspeed --num_gpus N launch/ppo.py ... --resume)")

    def load_state(self, folder: Path, state: dict) -> None:
        self.check_resumable(folder, state)
        self.optimizer.load_state_dict(state["optimizer"])
        self.scheduler.load_state_dict(state["scheduler"])

    @property
    def loads_module_weights(self) -> bool:
        """Whether load_state also restores the trainable weights (DeepSpeed does; here the trainer does)."""
        return False

    def rng_state(self) -> dict:
        """Every generator's state as tensors, numbers and tuples: what torch's safe loader reads back."""
        kind, keys, pos, has_gauss, cached = np.random.get_state()
        state = {"python": random.getstate(), "torch": torch.get_rng_state(),
                 "numpy": {"kind": kind, "keys": torch.from_numpy(keys.astype(np.int64)), "pos": int(pos),
                           "has_gauss": int(has_gauss), "cached_gaussian": float(cached)}}
        if torch.cuda.is_available():
            state["cuda"] = torch.cuda.get_rng_state_all()
        return state

    def set_rng_state(self, state: dict) -> None:
        random.setstate(state["python"])
        saved = state["numpy"]
        if isinstance(saved, dict):
            saved = (saved["kind"], saved["keys"].numpy().astype(np.uint32), saved["pos"], saved["has_gauss"],
                     saved["cached_gaussian"])
        np.random.set_state(saved)  # a tuple holding an array in checkpoints written before
        torch.set_rng_state(state["torch"])
        if "cuda" in state and torch.cuda.is_available():
            torch.cuda.set_rng_state_all(state["cuda"])


def unlink_cpu_allreduce_buffer(rank: int) -> None:
    """DeepSpeed's CPU all-reduce maps a shared-memory file per rank (about 66 MB) and never removes it, so
    every CPU run would leave its files in /dev/shm, in RAM, until reboot. Each rank removes its own at exit
    (the other ranks keep their mappings)."""
    name = (f"deepspeed_allreduce_buffer_{os.getuid()}_{os.environ.get('MASTER_ADDR', '')}_"
            f"{os.environ.get('MASTER_PORT', '')}_{rank}")
    Path("/dev/shm", name).unlink(missing_ok=True)


class DeepSpeed(SingleProcess):
    """ZeRO data parallelism over ``deepspeed`` launcher ranks (gloo on CPU, NCCL on GPU)."""

    ENGINE_DIR = "deepspeed"

    def __init__(self, ds_cfg, dtype: str, device: str = "auto", threads: int | None = None,
                 zero_stage: int | None = None):
        import deepspeed

        if threads is not None:
            torch.set_num_threads(threads)
        use_cuda = torch.cuda.is_available() and device != "cpu"
        self.backend = "nccl" if use_cuda else "gloo"
        if not use_cuda:  # DeepSpeed's CPU communication backend builds it in init_distributed
            announce_op_build("ShareMemCommBuilder", "its shared-memory all-reduce for CPU ranks",
                              os.environ.get("RANK", "0") == "0")
        deepspeed.init_distributed(dist_backend=self.backend)
        self.rank = torch.distributed.get_rank()
        self.world_size = torch.distributed.get_world_size()
        self.is_main = self.rank == 0
        local_rank = int(os.environ.get("LOCAL_RANK", "0"))
        if use_cuda:
            torch.cuda.set_device(local_rank)
        self.device = torch.device(f"cuda:{local_rank}" if use_cuda else "cpu")
        if not use_cuda:
            atexit.register(unlink_cpu_allreduce_buffer, self.rank)
        self.ds_cfg = ds_cfg
        self.dtype = dtype
        # deepspeed.zero_stage, or the stage of deepspeed.config_file when that key is null (make_strategy resolves it)
        self.zero_stage = resolve_zero_stage(ds_cfg) if zero_stage is None else zero_stage
        self.engine = None

    def describe(self, accum: int, micro: int) -> str:
        local = int(os.environ.get("LOCAL_WORLD_SIZE") or os.environ.get("LOCAL_SIZE") or self.world_size)
        nodes = max(1, self.world_size // max(local, 1))
        offload = [what for on, what in ((self.ds_cfg.offload_optimizer, "optimizer"),
                                         (self.ds_cfg.offload_params, "weights")) if on]
        offloaded = f" with {' and '.join(offload)} offloaded to CPU" if offload else ""
        ranks = f"{self.world_size} rank{'s' if self.world_size != 1 else ''} on {nodes} node{'s' if nodes != 1 else ''}"
        return (f"strategy: DeepSpeed ZeRO-{self.zero_stage}{offloaded}, {ranks} "
                f"({self.backend}, {self.device.type}); per rank: {accumulation_words(accum, micro)}")

    def config_dict(self, max_grad_norm: float, grad_accum_steps: int, micro_batch_size: int) -> dict:
        import json

        c = self.ds_cfg
        zero = {"stage": self.zero_stage}
        if c.offload_optimizer:
            zero["offload_optimizer"] = {"device": "cpu"}
        if c.offload_params:
            zero["offload_param"] = {"device": "cpu"}
        config = {
            "train_micro_batch_size_per_gpu": micro_batch_size,
            "gradient_accumulation_steps": grad_accum_steps,  # informational: boundaries are set explicitly
            "gradient_clipping": max_grad_norm,
            "zero_optimization": zero,
            "zero_allow_untested_optimizer": True,
            "steps_per_print": 10**9,
            "wall_clock_breakdown": False,
        }
        if self.dtype == "bfloat16":
            config["bf16"] = {"enabled": True}
        elif self.dtype == "float16":
            config["fp16"] = {"enabled": True}
        if c.config_file:  # checked by check_config_file when the strategy was made
            config = deep_merge(config, json.loads(Path(c.config_file).read_text()))  # the user's JSON wins
        return config

    def offloads_optimizer(self, config: dict) -> bool:
        """Whether the merged config keeps optimizer state on the CPU (or NVMe): DeepSpeed then steps it with
        its own CPU Adam and refuses torch's."""
        offload = config.get("zero_optimization", {}).get("offload_optimizer") or {}
        return offload.get("device", "none") in ("cpu", "nvme")

    def prepare(self, model, optimizer, scheduler, max_grad_norm: float, grad_accum_steps: int,
                micro_batch_size: int) -> tuple:
        """DeepSpeed wraps the model and the optimizer (ZeRO-Offload replaces it with DeepSpeed's CPU Adam)."""
        import deepspeed

        config = self.config_dict(max_grad_norm, grad_accum_steps, micro_batch_size)
        if self.offloads_optimizer(config):  # asked for by deepspeed.offload_optimizer or by the JSON
            # ZeRO-Offload steps the optimizer on the CPU: DeepSpeed's vectorised Adam, not torch's.
            from deepspeed.ops.adam import DeepSpeedCPUAdam

            announce_op_build("CPUAdamBuilder", "its CPU Adam for ZeRO-Offload", self.is_main)
            group = optimizer.param_groups[0]
            optimizer = DeepSpeedCPUAdam([p for p in model.parameters() if p.requires_grad],
                                         lr=group["initial_lr"], weight_decay=group["weight_decay"], adamw_mode=True)
            scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, scheduler.lr_lambdas[0])
        super().prepare(model, optimizer, scheduler, max_grad_norm, grad_accum_steps, micro_batch_size)
        self.engine, self.optimizer, _, self.scheduler = deepspeed.initialize(
            model=model, optimizer=optimizer, lr_scheduler=scheduler, config=config)
        if self.zero_stage == 3 and self.ds_cfg.gather_for_generation:
            from llmrl.distributed.deepspeed_internals import check_internals

            check_internals(self.engine)  # a DeepSpeed that moved them fails here, not at the first rollout
        return self.optimizer, self.scheduler

    def backward(self, loss: torch.Tensor, boundary: bool = True) -> None:
        # The trainer owns the accumulation: ZeRO reduces gradients across ranks only at the boundary
        # (measured: letting the engine count microsteps gave wrong gradients under ZeRO-3 here).
        self.engine.set_gradient_accumulation_boundary(boundary)
        # The loss is already divided by the minibatch's tokens: DeepSpeed must not divide it again.
        self.engine.backward(loss, scale_wrt_gas=False)

    def step(self, boundary: bool) -> float | None:
        if not boundary:
            return None
        self.engine.step()  # optimizer and scheduler
        norm = self.engine.get_global_grad_norm()
        return float(norm) if norm is not None else float("nan")

    def all_reduce_sum(self, x: torch.Tensor) -> torch.Tensor:
        x = x.detach().clone().double()
        torch.distributed.all_reduce(x)
        return x

    def all_reduce_mean(self, metrics: dict[str, float]) -> dict[str, float]:
        keys = sorted(metrics)
        values = self.all_reduce_sum(torch.tensor([float(metrics[k]) for k in keys])) / self.world_size
        return dict(zip(keys, values.tolist()))

    def barrier(self) -> None:
        torch.distributed.barrier()

    def close(self) -> None:
        """After a finished run, on every rank: tear the process group down, as torch asks, instead of leaving it to
        the interpreter's exit (where a gloo rank once aborted after its run was written: "terminate called
        without an active exception")."""
        torch.distributed.barrier()
        torch.distributed.destroy_process_group()

    def generation_context(self, model):
        """ZeRO-3: gather the partitioned weights once per rollout instead of once per generated token."""
        if self.zero_stage == 3 and self.ds_cfg.gather_for_generation:
            return self._gathered_without_hooks(model)
        return nullcontext()

    @contextmanager
    def _gathered_without_hooks(self, model):
        """All weights gathered, and ZeRO-3's module hooks removed until generation ends.

        Left in place, the hooks re-partition each submodule's weights after its forward (so every token
        all-gathers them again), and the model-level pre-forward hook runs collectives while the trace is
        being recorded. Each rank stops decoding when its own sequences finish, so ranks run different
        numbers of forwards: those collectives then wait for one another forever.
        """
        import deepspeed

        from llmrl.distributed.deepspeed_internals import zero3_hooks_removed

        with deepspeed.zero.GatheredParameters(list(model.parameters())), zero3_hooks_removed(self.engine):
            yield

    @property
    def generate_kwargs(self) -> dict:
        # Without gathering, ZeRO-3 fetches weights with collectives inside every forward: all ranks must
        # run the same number of decoding steps even when one rank's sequences have all finished.
        if self.zero_stage == 3 and not self.ds_cfg.gather_for_generation:
            return {"synced_gpus": True, "all_finished": self.all_ranks_finished}
        return {}

    def gathered(self, params):
        if self.zero_stage == 3:
            import deepspeed

            return deepspeed.zero.GatheredParameters(list(params), modifier_rank=None)
        return nullcontext()

    def save_state(self, folder: Path) -> dict:
        # The frozen base is not saved (it is the base model itself): a LoRA checkpoint holds the adapter, the
        # optimizer state and any tied weight, which DeepSpeed keeps as a shared parameter (SmolLM2 under ZeRO-2,
        # measured: 159 MB, of which 113 MB is its tied embedding, instead of the 517 MB base in float32).
        self.engine.save_checkpoint(str(folder / self.ENGINE_DIR), tag="state", exclude_frozen_parameters=True)
        return {"world_size": self.world_size, "zero_stage": self.zero_stage}

    def check_resumable(self, folder: Path, state: dict) -> None:
        if not (folder / self.ENGINE_DIR).is_dir():  # DeepSpeed fails on that with a bare AssertionError
            raise ConfigError(f"checkpoint {folder} was written by one plain process, not under DeepSpeed: resume "
                              f"it the same way (python launch/ppo.py ... --resume)")
        saved = state.get("world_size")
        if saved is not None and saved != self.world_size and self.zero_stage != 0:
            # DeepSpeed itself refuses ("Automatic adjustment of ZeRO's optimizer state partitioning with a new
            # world size is not currently supported"); ZeRO-0 keeps whole optimizer states and reloads anywhere.
            raise ConfigError(f"checkpoint {folder} was written by {saved} ranks, this run has {self.world_size}: "
                              f"DeepSpeed reloads ZeRO-{self.zero_stage} optimizer state only on as many ranks "
                              f"(ZeRO-0 checkpoints can change the count)")

    def load_state(self, folder: Path, state: dict) -> None:
        self.check_resumable(folder, state)
        self.check_engine_files(folder / self.ENGINE_DIR)
        self.engine.load_checkpoint(str(folder / self.ENGINE_DIR), tag="state", load_optimizer_states=True,
                                    load_lr_scheduler_states=True, load_module_strict=False)  # no frozen base

    @staticmethod
    def check_engine_files(engine_dir: Path) -> None:
        """DeepSpeed unpickles its checkpoint files (``torch.load(weights_only=False)``): each is first read with
        torch's safe loader, which rebuilds tensors, numbers and DeepSpeed's own plain data classes only, so a
        tampered file is refused instead of run."""
        from llmrl.distributed.checkpoint import load_state_file
        from llmrl.distributed.deepspeed_internals import checkpoint_classes

        for path in sorted(Path(engine_dir).rglob("*.pt")):
            load_state_file(path, allowed=checkpoint_classes())

    @property
    def loads_module_weights(self) -> bool:
        return True


def deep_merge(base: dict, override: dict) -> dict:
    """``base`` with ``override`` laid over it, section by section: a JSON that sets
    ``zero_optimization.offload_optimizer`` keeps the generated ``zero_optimization.stage``.

    >>> deep_merge({"zero_optimization": {"stage": 2}, "x": 1}, {"zero_optimization": {"overlap_comm": True}})
    {'zero_optimization': {'stage': 2, 'overlap_comm': True}, 'x': 1}
    """
    merged = dict(base)
    for key, value in override.items():
        merged[key] = deep_merge(merged[key], value) if isinstance(value, dict) and isinstance(merged.get(key), dict) \
            else value
    return merged


def check_config_file(ds_cfg) -> int | None:
    """A DeepSpeed JSON may tune ZeRO, but its stage must be the one llmrl checks combinations against: an explicit
    deepspeed.zero_stage that differs is refused. Returns the JSON's stage (None when it sets none)."""
    if not ds_cfg.config_file:
        return None
    import json

    path = Path(ds_cfg.config_file)
    if not path.is_file():
        raise ConfigError(f"deepspeed.config_file = {ds_cfg.config_file!r} does not exist")
    try:
        data = json.loads(path.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise ConfigError(f"deepspeed.config_file = {ds_cfg.config_file!r} is not valid JSON: {e}") from e
    if not isinstance(data, dict):
        raise ConfigError(f"deepspeed.config_file = {ds_cfg.config_file!r} must hold a JSON object")
    for key in ("optimizer", "scheduler"):
        if key in data:
            raise ConfigError(f"deepspeed.config_file = {ds_cfg.config_file!r} sets {key!r}: llmrl builds the "
                              f"optimizer and its schedule (train.lr, train.lr_schedule...); remove {key!r} from the JSON")
    stage = (data.get("zero_optimization") or {}).get("stage")
    if stage is not None and (type(stage) is not int or stage not in (0, 1, 2, 3)):
        raise ConfigError(f"deepspeed.config_file = {ds_cfg.config_file!r} sets zero_optimization.stage {stage!r}: "
                          f"use 0, 1, 2 or 3")
    if stage is not None and ds_cfg.zero_stage is not None and stage != ds_cfg.zero_stage:
        raise ConfigError(f"deepspeed.config_file sets ZeRO stage {stage} but deepspeed.zero_stage is "
                          f"{ds_cfg.zero_stage}: make them agree, or remove deepspeed.zero_stage to take the file's")
    return stage


def resolve_zero_stage(ds_cfg) -> int:
    """The ZeRO stage a run uses: deepspeed.zero_stage when set, else the stage deepspeed.config_file sets, else 2."""
    from_file = check_config_file(ds_cfg)
    if ds_cfg.zero_stage is not None:
        return ds_cfg.zero_stage
    return 2 if from_file is None else from_file


def accumulation_words(accum: int, micro: int) -> str:
    """'2 microbatches of 8 sequences per optimizer step (gradient accumulation 2)', for the start-up line."""
    return (f"{accum} microbatch{'es' if accum != 1 else ''} of {micro} sequence{'s' if micro != 1 else ''} per "
            f"optimizer step (gradient accumulation {accum})")


def extensions_dir() -> Path:
    """Where torch's JIT builder keeps compiled extensions (torch.utils.cpp_extension's rule, without creating it)."""
    root = os.environ.get("TORCH_EXTENSIONS_DIR")
    if root:
        return Path(root)
    from torch.utils.cpp_extension import get_default_build_root

    accelerator = f"cu{torch.version.cuda.replace('.', '')}" if torch.version.cuda else "cpu"
    if torch.version.hip:
        accelerator = f"rocm{torch.version.hip.replace('.', '')}"
    return Path(get_default_build_root(), f"py{sys.version_info.major}{sys.version_info.minor}"
                                         f"{getattr(sys, 'abiflags', '')}_{accelerator}")


def op_needs_build(builder) -> bool:
    """Whether loading DeepSpeed op ``builder`` will compile it: not shipped prebuilt in the installed DeepSpeed
    and no compiled copy in torch's extensions folder yet (torch also rebuilds one whose sources changed: rare)."""
    from deepspeed.git_version_info import installed_ops

    if installed_ops.get(builder.name, False):
        return False
    return not (extensions_dir() / builder.name / f"{builder.name}.so").is_file()


def announce_op_build(builder_class: str, purpose: str, main: bool) -> None:
    """DeepSpeed compiles some C++ ops the first time a run needs them (a minute or two, silently): say so before
    it starts, once (the other ranks wait for the same build)."""
    if not main:
        return
    try:
        from deepspeed.accelerator import get_accelerator

        import deepspeed.ops

        builder = get_accelerator().create_op_builder(builder_class)
        compatible = builder is not None and deepspeed.ops.__compatible_ops__.get(builder.NAME, True)
        if not compatible or not op_needs_build(builder):
            return
    except Exception:  # noqa: BLE001 - an announcement only: DeepSpeed reports its own build errors
        return
    print(f"building DeepSpeed's {builder.name} op once ({purpose}); this takes a minute or two, later runs load it "
          f"from {extensions_dir() / builder.name}", flush=True)


def accumulation(cfg, world_size: int) -> tuple[int, int]:
    """(microbatches per optimizer step on one rank, sequences per microbatch) of ``cfg`` on ``world_size`` ranks; a
    size that does not divide is a ConfigError naming the nearest values that do."""
    if cfg.algorithm in ("dpo", "kto", "ilql"):  # one microbatch: the rank's share of dpo/kto/ilql.batch_size
        size = getattr(cfg, cfg.algorithm).batch_size
        if size % world_size:
            from llmrl.config import nearest_sizes

            raise ConfigError(f"{cfg.algorithm}.batch_size = {size} is not divisible by the world size = "
                              f"{world_size}: use {cfg.algorithm}.batch_size = "
                              f"{nearest_sizes(size, lambda n: n % world_size == 0)}")
        return 1, size // world_size
    return cfg.sizes(world_size).grad_accum_steps, cfg.train.micro_batch_size


def launched_by_deepspeed() -> bool:
    """True under the ``deepspeed`` (or torchrun) launcher, which sets these variables for every rank."""
    return "LOCAL_RANK" in os.environ and "WORLD_SIZE" in os.environ


def make_strategy(cfg):
    """DeepSpeed when started by its launcher (or run.strategy: deepspeed), else one process."""
    choice = cfg.run.strategy
    if choice == "deepspeed" or (choice == "auto" and launched_by_deepspeed()):
        stage = resolve_zero_stage(cfg.deepspeed)
        if cfg.model.quantization is not None and stage == 3:
            raise ConfigError(f"model.quantization = {cfg.model.quantization!r} cannot be used with ZeRO-3 "
                              f"(bitsandbytes weights cannot be partitioned): use deepspeed.zero_stage 0, 1 or 2")
        world = int(os.environ.get("WORLD_SIZE", "1"))
        accum, _ = accumulation(cfg, world)  # sizes that do not divide over the ranks fail here, before any model
        if stage == 3 and accum > 1:
            # Measured with deepspeed 0.19.8 on CPU: under ZeRO-3 only the last microbatch's gradient survived
            # accumulation (tests/test_deepspeed.py shows the check; README, "Scaling out").
            raise ConfigError(f"ZeRO-3 with gradient accumulation ({accum} microbatches per optimizer step) kept "
                              f"only the last microbatch's gradient in our tests: set train.micro_batch_size = "
                              f"train.mini_batch_size / ranks = {cfg.train.mini_batch_size // world}, or use ZeRO-2")
        if cfg.deepspeed.offload_params and stage != 3:
            raise ConfigError("deepspeed.offload_params needs deepspeed.zero_stage: 3 (only ZeRO-3 partitions "
                              "parameters)")
        return DeepSpeed(cfg.deepspeed, cfg.model.dtype, cfg.run.device, cfg.run.threads, zero_stage=stage)
    if launched_by_deepspeed() and int(os.environ["WORLD_SIZE"]) > 1:
        raise ConfigError(f"run.strategy = 'single' but this is one of {os.environ['WORLD_SIZE']} ranks: "
                          f"use run.strategy auto or deepspeed")
    return SingleProcess(cfg.run.device, cfg.run.threads)
