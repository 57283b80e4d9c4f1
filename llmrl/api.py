"""llmrl from Python: ``RLTrainer(config, reward_funcs=[fn], train_dataset=rows).train()`` runs a whole run (the
checks, resume, evaluation before and after, training, the final checkpoint and ``summary.json``) and returns a
``RunResult`` with the trained model. The command line (``llmrl train``, ``launch/ppo.py``) calls the same class.

Python objects (reward functions, datasets, a model, an environment class) are recorded in the run's
``config.yaml`` by name (``in-memory:NAME``; a dataset's name carries its row count and a hash of its rows, a
model object is saved into the run folder as ``base/``), so that a resume from Python checks that it was given the
same ones, and a command that needs one it was not given says so in one line.
"""
from __future__ import annotations

import hashlib
import inspect
import json
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Iterable

from llmrl.config import Config, ConfigError, RewardComponentConfig, apply_override, from_dict, load_config, to_dict
from llmrl.user_functions import BUILTIN, register_in_memory

__all__ = ["RLTrainer", "RunResult", "Callback"]

HOOKS = ("on_step_end", "on_evaluate", "on_save")


class Callback:
    """Subclass and override what you need; each hook gets the ``RLTrainer`` (call its ``stop()`` to end the run
    cleanly at the next step boundary: it then evaluates and saves as a finished run does), the step and:

    - ``on_step_end``: the step's metrics (what ``log.jsonl`` holds: ``reward/mean``, ``objective/kl``, ...);
    - ``on_evaluate``: the evaluation's metrics (``eval/reward``, ...), also at step 0 (before training); never
      with ``data.eval_size`` 0 (evaluation off);
    - ``on_save``: the checkpoint folder just written.
    """

    def on_step_end(self, trainer: "RLTrainer", step: int, metrics: dict) -> None:
        pass

    def on_evaluate(self, trainer: "RLTrainer", step: int, metrics: dict) -> None:
        pass

    def on_save(self, trainer: "RLTrainer", step: int, path: Path) -> None:
        pass


@dataclass
class RunResult:
    """What ``RLTrainer.train()`` returns."""

    model: Any  # the trained policy: a peft model (base + the trained LoRA adapter), in eval mode
    tokenizer: Any
    summary: dict  # what summary.json holds: eval reward before/after, steps, wall seconds, ...
    metrics: list[dict] = field(default_factory=list)  # log.jsonl's rows, one per step and evaluation
    final_checkpoint: Path | None = None  # RUN/final: export it with llmrl.export, evaluate with llmrl.evaluate
    stopped_early: bool = False  # a callback called RLTrainer.stop()
    # ILQL runs: the trained Q/V heads (llmrl.models.ilql_heads.ILQLHeads); the learned policy is the model's logits
    # shifted by beta * (Q - V): llmrl.ilql_generate(result.model, result.ilql_heads, result.tokenizer, prompts, ...)
    ilql_heads: Any = None


class RLTrainer:
    """One run, as ``llmrl train`` runs it, from Python.

    ``config``: a ``Config``, a dict (the YAML's structure) or a YAML path; ``overrides``: ``section.key=value``
    strings, as on the command line. The rest, each optional, replaces what the config names:

    - ``model``: a name, a folder, or a ``transformers`` causal LM object (then pass ``tokenizer`` too; it is saved
      into the run folder as ``base/``, so the run resumes and exports from the command line as well), or a peft
      model (e.g. after SFT): its adapter is merged into a copy of its base, which is then the run's base and the
      reference (adapter off), and a new LoRA adapter is trained on top;
    - ``reward_funcs``: reward functions with TRL's signature ``(prompts, completions, **kwargs) -> list[float |
      None]`` (sync or async; closures and lambdas too), reward-model objects (``llmrl.models.reward_model.
      LearnedReward``), or strings as ``reward.function`` takes them; ``reward_weights``: one weight each;
    - ``train_dataset`` / ``eval_dataset``: a ``datasets.Dataset`` or a list of dicts, rows as the prompt files'
      (a ``prompt`` column, text or TRL messages, and the columns the rewards read);
    - ``env``: an environment class (gymnasium-style or TRL-style), built with ``env.kwargs``;
    - ``callbacks``: ``Callback`` objects (or any objects with some of its methods).
    """

    def __init__(self, config: Config | dict | str | Path | None = None, *, overrides: Iterable[str] = (),
                 model=None, tokenizer=None, reward_funcs: list | Callable | str | None = None,
                 reward_weights: list[float] | None = None, train_dataset=None, eval_dataset=None,
                 env: type | None = None, callbacks: Iterable = (), resume: bool = False, overwrite: bool = False):
        overrides = list(overrides)
        self.resume, self.overwrite = resume, overwrite
        self.callbacks = _checked_callbacks(callbacks)
        self.model_object, self.tokenizer_object = _checked_model(model, tokenizer)
        self._objects: dict[str, object] = {}  # in-memory name -> object, registered when train() starts
        # With resume, the run's own saved config is the base and only the overrides (and the objects below) change
        # it: a resume need not repeat what the run was started with. What the given config says otherwise is
        # reported when the run resumes (resume_notes), never applied unasked.
        saved, checkpoint = _saved_run_config(config, overrides) if resume else (None, None)
        self.resume_notes: list[str] = []
        if saved is None:
            self.cfg = self._with_objects(to_dict(_config(config, overrides)), model, tokenizer, reward_funcs,
                                          reward_weights, train_dataset, eval_dataset, env)
        else:
            self.cfg = self._with_objects(saved, model, tokenizer, reward_funcs, reward_weights, train_dataset,
                                          eval_dataset, env)
            if config is not None:
                given = self._with_objects(to_dict(_config(config, overrides)), model, tokenizer, reward_funcs,
                                           reward_weights, train_dataset, eval_dataset, env)
                self.resume_notes = _ignored_differences(given, self.cfg, config)
            from llmrl.distributed.run_dir import resume_changes

            resume_changes(checkpoint, self.cfg)  # a change a resumed run cannot take: one line, before any loading
        self.trainer = None  # the engine (llmrl.trainers), while train() runs and after
        self._stop = False

    def _with_objects(self, data: dict, model, tokenizer, reward_funcs, reward_weights, train_dataset, eval_dataset,
                      env) -> Config:
        """The config ``data`` with what the Python objects given to RLTrainer replace, validated."""
        data = json.loads(json.dumps(data, default=str))
        if isinstance(model, (str, Path)):
            data["model"]["name_or_path"] = str(model)
        if isinstance(tokenizer, (str, Path)):
            data["model"]["tokenizer"] = str(tokenizer)
        if self.model_object is not None:
            data["model"]["name_or_path"] = str(Path(data["run"]["output_dir"]) / BASE_FOLDER)
            data["model"]["tokenizer"] = None
        if reward_funcs is not None:
            data["reward"]["function"] = ""
            data["reward"]["components"] = self._reward_components(reward_funcs, reward_weights)
        elif reward_weights is not None:
            raise ConfigError("reward_weights is given without reward_funcs: give one weight per reward function")
        for key, rows in (("source", train_dataset), ("eval_source", eval_dataset)):
            if rows is not None:
                data["data"][key] = self._dataset(rows, "train_dataset" if key == "source" else "eval_dataset")
        if env is not None:
            if not isinstance(env, type):
                raise ConfigError(f"env = {env!r} is a {type(env).__name__}: pass the environment's class (llmrl "
                                  f"builds one per episode batch with env.kwargs), not an instance")
            data["env"]["name"] = self._register(env.__name__, env)
        cfg = from_dict(Config, data)
        cfg.validate()
        return cfg

    # ------------------------------------------------------------------ what the user calls
    def train(self) -> RunResult:
        """Run: returns a ``RunResult`` (raises a ``llmrl.errors.UserError`` subclass, one line, on bad input)."""
        for name, value in self._objects.items():
            register_in_memory(name, value)
        return run(self.cfg, self.resume, self.overwrite, owner=self)

    def stop(self) -> None:
        """From a callback: end the run at the next step boundary (it then evaluates and saves as a finished run
        does, and ``RunResult.stopped_early`` is True)."""
        self._stop = True
        if self.trainer is not None:
            self.trainer.stop_requested = True

    @property
    def step(self) -> int:
        return self.trainer.step if self.trainer is not None else 0

    @property
    def model(self):
        """The policy being trained (a peft model), once ``train()`` has built it."""
        return self.trainer.policy.model if self.trainer is not None else None

    # ------------------------------------------------------------------ in-memory objects
    def _register(self, name: str, value: object) -> str:
        self._objects[name] = value
        return "in-memory:" + name

    def _reward_components(self, funcs, weights) -> list[dict]:
        funcs = list(funcs) if isinstance(funcs, (list, tuple)) else [funcs]
        if not funcs:
            raise ConfigError("reward_funcs is empty: give at least one reward function")
        if weights is not None and len(weights) != len(funcs):
            raise ConfigError(f"reward_weights has {len(weights)} values for {len(funcs)} reward_funcs: give one "
                              f"weight per function")
        components, names = [], set()
        for i, fn in enumerate(funcs):
            weight = 1.0 if weights is None else float(weights[i])
            if isinstance(fn, (str, Path)):
                fn = str(fn)
                is_function = fn in BUILTIN or ":" in fn
                components.append(to_dict(RewardComponentConfig(**{"function" if is_function else "model": fn},
                                                                weight=weight)))
                continue
            if not callable(fn):
                raise ConfigError(f"reward_funcs[{i}] = {str(fn)[:60]!r} is a {type(fn).__name__}: give a function "
                                  f"(prompts, completions, **kwargs) -> list of floats, a reward-model object or a "
                                  f"reward.function string")
            _check_reward_signature(fn, i)
            name = getattr(fn, "__name__", None) or type(fn).__name__
            if not name.isidentifier():  # a lambda
                name = f"reward_{i}"
            while name in names:
                name = f"{name}_{i}"
            names.add(name)
            components.append(to_dict(RewardComponentConfig(function=self._register(name, fn), weight=weight)))
        return components

    def _dataset(self, rows, what: str) -> str:
        if hasattr(rows, "to_list") and hasattr(rows, "column_names"):  # a datasets.Dataset
            rows = rows.to_list()
        if isinstance(rows, dict) or not isinstance(rows, (list, tuple)) or not all(isinstance(r, dict) for r in rows):
            raise ConfigError(f"{what} is a {type(rows).__name__}: give a datasets.Dataset or a list of dicts (one "
                              f"per row, e.g. {{'prompt': ..., 'answer': ...}})")
        rows = [dict(r) for r in rows]
        digest = hashlib.sha256(json.dumps(rows, sort_keys=True, default=str).encode()).hexdigest()[:12]
        # the name records the rows: a resume given other rows is refused as a change of data
        return self._register(f"{what}-{len(rows)}rows-{digest}", rows)


BASE_FOLDER = "base"  # where a model object given to RLTrainer is saved, inside the run folder


def _config(config, overrides: list[str]) -> Config:
    if config is None or isinstance(config, (Config, dict)):
        data = to_dict(config) if isinstance(config, Config) else dict(config or {})
        data = json.loads(json.dumps(data, default=str)) if data else {}
        for assignment in overrides:
            apply_override(data, assignment)
        cfg = from_dict(Config, data)
        cfg.validate()
        return cfg
    if isinstance(config, (str, Path)):
        return load_config(config, overrides)
    raise ConfigError(f"config is a {type(config).__name__}: give a llmrl Config, a dict or a YAML path")


def _saved_run_config(config, overrides: list[str]) -> tuple[dict | None, Path | None]:
    """For a resume: (the config.yaml of the latest checkpoint in the run folder that ``config`` and ``overrides``
    name (run.output_dir), with the overrides applied on top; that checkpoint), or (None, None) when there is none
    (the run then says why)."""
    from llmrl.config import (RunConfig, _read_yaml, is_checkpoint_config, load_yaml_text, resolve_config_paths,
                              upgrade_saved_config)
    from llmrl.distributed.checkpoint import latest_checkpoint

    if isinstance(config, (str, Path)):
        data = _read_yaml(config)
        if not is_checkpoint_config(config):
            resolve_config_paths(data, Path(config).parent, f"config file {str(config)!r}")
    elif isinstance(config, Config):
        data = to_dict(config)
    else:
        data = json.loads(json.dumps(config or {}, default=str))
    for assignment in overrides:
        apply_override(data, assignment)
    run_section = data.get("run") if isinstance(data.get("run"), dict) else {}
    run_dir = Path(str(run_section.get("output_dir") or RunConfig().output_dir))
    checkpoint = latest_checkpoint(run_dir)
    if checkpoint is None or not (checkpoint / "config.yaml").is_file():
        return None, None
    try:
        saved = load_yaml_text((checkpoint / "config.yaml").read_text(), f"{checkpoint}/config.yaml")
    except (OSError, ValueError) as e:
        raise ConfigError(f"--resume: {checkpoint}/config.yaml cannot be read ({str(e).splitlines()[0]}): move "
                          f"this checkpoint away to resume from the one before it") from None
    if not isinstance(saved, dict):
        raise ConfigError(f"--resume: {checkpoint}/config.yaml holds no mapping of settings: move this checkpoint "
                          f"away to resume from the one before it")
    saved = upgrade_saved_config(saved)
    for assignment in overrides:
        apply_override(saved, assignment)
    saved.setdefault("run", {})["output_dir"] = str(run_dir)  # where it was found (the folder may have moved)
    return saved, checkpoint


def _ignored_differences(given: Config, resumed: Config, config) -> list[str]:
    """One line for each setting where the config given to a resume differs from the run's own (kept)."""
    from llmrl.distributed.run_dir import _flat

    where = f"{str(config)!r}" if isinstance(config, (str, Path)) else "the config given"
    theirs, ours = _flat(to_dict(given)), _flat(to_dict(resumed))
    return [f"note: {where} has {key} = {theirs.get(key)!r}, the run's own config {ours.get(key)!r}: the run's is "
            f"kept (with --resume only what the command line overrides changes; give {key}=VALUE to change it)"
            for key in sorted(theirs.keys() | ours.keys()) if theirs.get(key) != ours.get(key)]


def _checked_callbacks(callbacks) -> list:
    callbacks = list(callbacks or ())
    for cb in callbacks:
        if not any(callable(getattr(cb, hook, None)) for hook in HOOKS):
            raise ConfigError(f"callback {cb!r} has none of {', '.join(HOOKS)}: subclass llmrl.Callback and override "
                              f"the hooks you need")
    return callbacks


def _checked_model(model, tokenizer):
    """(model object, tokenizer object) when ``model`` is an object; names and folders go into the config."""
    if model is None or isinstance(model, (str, Path)):
        if tokenizer is not None and not isinstance(tokenizer, (str, Path)):
            raise ConfigError("tokenizer is an object but model is a name or folder: pass the tokenizer's name or "
                              "folder, or pass both model and tokenizer as objects")
        return None, None
    if hasattr(model, "peft_config"):  # e.g. an SFT adapter: merged into a copy of its base, which llmrl starts from
        model = _merged_copy(model)
    from transformers import PreTrainedModel
    from transformers.models.auto.modeling_auto import MODEL_FOR_CAUSAL_LM_MAPPING_NAMES

    if not isinstance(model, PreTrainedModel):
        raise ConfigError(f"model is a {type(model).__name__}: give a model name, a folder or a transformers "
                          f"causal LM (AutoModelForCausalLM.from_pretrained(...))")
    if type(model).__name__ not in set(MODEL_FOR_CAUSAL_LM_MAPPING_NAMES.values()):
        raise ConfigError(f"model is a {type(model).__name__}, not a causal LM: load it with "
                          f"AutoModelForCausalLM (a reward model goes in reward_funcs)")
    if tokenizer is None or isinstance(tokenizer, (str, Path)) or not hasattr(tokenizer, "save_pretrained"):
        raise ConfigError("model is an object: pass its tokenizer object too (tokenizer=AutoTokenizer."
                          "from_pretrained(...))")
    return model, tokenizer


def _merged_copy(model):
    """A peft model's adapter merged into a copy of its base (the user's model is left as it is): the run starts
    from, and is kept near, what the user trained so far; llmrl's own LoRA adapter is trained on top of it."""
    import copy

    if getattr(model, "is_loaded_in_4bit", False) or getattr(model, "is_loaded_in_8bit", False) or \
            getattr(getattr(model, "config", None), "quantization_config", None) is not None:
        raise ConfigError(f"model is a {type(model).__name__} on a quantized base: its adapter cannot be merged there; "
                          f"save it (model.save_pretrained), merge it into a full-precision base and pass that, or "
                          f"pass the base's name with model.quantization")
    if not hasattr(model, "merge_and_unload"):
        raise ConfigError(f"model is a {type(model).__name__} (a peft model without merge_and_unload): pass a LoRA "
                          f"model, or its base with the adapter merged")
    return copy.deepcopy(model).merge_and_unload()


def _check_reward_signature(fn, i: int) -> None:
    """TRL's signature: prompts and completions by keyword, or **kwargs."""
    try:
        params = inspect.signature(fn).parameters
    except (TypeError, ValueError):
        return  # a builtin or C callable: found out when called
    has_var_kw = any(p.kind is p.VAR_KEYWORD for p in params.values())
    missing = [n for n in ("prompts", "completions") if n not in params and not has_var_kw]
    if missing:
        name = getattr(fn, "__name__", type(fn).__name__)
        raise ConfigError(f"reward_funcs[{i}] = {name}{inspect.signature(fn)} takes no {' and no '.join(missing)}: "
                          f"a reward function is called as fn(prompts=..., completions=..., **columns) (TRL's "
                          f"signature); write def {name}(prompts, completions, **kwargs)")


# ---------------------------------------------------------------------------------------------------------------
# The run itself (``llmrl train`` calls it through RLTrainer too)


def run(cfg: Config, resume: bool = False, overwrite: bool = False, owner: RLTrainer | None = None) -> RunResult:
    """Train as ``cfg`` says; returns a RunResult (its summary is what run_dir/summary.json holds). The run folder's
    lock is released when this returns or raises (a traceback kept in a notebook must not keep the folder locked)."""
    locks: list = []
    try:
        return _run(cfg, resume, overwrite, owner, locks)
    finally:
        for lock in locks:
            lock.release()


def _run(cfg: Config, resume: bool, overwrite: bool, owner: RLTrainer | None, locks: list) -> RunResult:
    from llmrl.data.prompts import check_prompt_lengths, load_prompts
    from llmrl.demo.warm_start import run_warm_start
    from llmrl.distributed.checkpoint import COMPLETE_MARK, load_state_file
    from llmrl.config import SCHEDULABLE
    from llmrl.distributed.run_dir import claim_run_dir, make_run_dir, resume_changes
    from llmrl.distributed.strategy import accumulation, make_strategy
    from llmrl.models.policy import build_policy, context_length
    from llmrl.models.sources import resolve_model
    from llmrl.packages import check_packages
    from llmrl.rewards.base import build_eval_reward, build_reward
    from llmrl.tracking import MetricsLogger, read_log
    from llmrl.trainers.base import Hooks, Terminated
    from llmrl.trainers.online import OnlineTrainer

    started = time.perf_counter()
    if cfg.algorithm == "sft":
        raise ConfigError("algorithm is sft: supervised fine-tuning runs with llmrl sft --config C.yaml (or "
                          "llmrl.SFTTrainer from Python), not llmrl train / RLTrainer")
    run_dir = Path(cfg.run.output_dir)
    check_packages(cfg)  # wandb, bitsandbytes, vllm, deepspeed: before anything loads
    strategy = make_strategy(cfg)
    main = strategy.is_main
    say(main, strategy.describe(*accumulation(cfg, strategy.world_size)))
    if cfg.env.name:  # the environment's rewards; a wrong name or kwargs fail here, before anything heavy
        from llmrl.envs import make_env

        make_env(cfg.env.name, cfg.env.kwargs)
        reward = eval_reward = None
    else:
        reward = build_reward(cfg.reward, strategy.device)  # bad paths, models, URLs fail before anything heavy
        eval_reward = build_eval_reward(cfg.reward)
    train_rows, eval_rows = load_prompts(cfg.data, cfg.env, say=lambda text: say(main, text))
    columns = set(train_rows[0]) - {cfg.data.prompt_column}
    for r in (reward, eval_reward):
        if r is not None:
            r.check_arguments(columns, cfg.data.source)
    name = cfg.model.name_or_path
    given = owner is not None and owner.model_object is not None  # saved into run_dir/base below
    # warm_start builds the recipe's tiny model into a missing local folder; a package path or a GGUF file is
    # never built, it must exist
    builds = (not given and cfg.warm_start is not None and not name.startswith("pkg:") and not name.endswith(".gguf")
              and not Path(name).exists())
    if not builds and not given:
        resolve_model(name, "model.name_or_path")  # a GGUF converts now, once
    # the main rank locks run_dir before checking it; held until run() returns or raises
    resume_from, run_lock = claim_run_dir(run_dir, resume, overwrite, strategy)
    if run_lock is not None:
        locks.append(run_lock)
    changed = {}
    if resume_from is not None:
        resume_state = load_state_file(resume_from / COMPLETE_MARK)
        strategy.check_resumable(resume_from, resume_state)  # plain vs DeepSpeed
        changed = resume_changes(resume_from, cfg)  # settings a resume may not change are refused here
    strategy.barrier()  # every rank has read the run directory before the main rank changes it
    if main:
        make_run_dir(run_dir, overwrite)
        if builds:
            run_warm_start(cfg, progress=cfg.run.progress)
        if given and resume_from is None:
            owner.model_object.save_pretrained(run_dir / BASE_FOLDER)
            owner.tokenizer_object.save_pretrained(run_dir / BASE_FOLDER)
    strategy.barrier()

    strategy.seed_everything(cfg.run.seed)
    policy, tokenizer = build_policy(cfg.model, cfg.lora, strategy.device, cfg.ppo.critic == "separate")
    context = context_length(policy.model)
    for rows, where in () if cfg.env.name else ((train_rows, "data.source"), (eval_rows, "data.eval_source")):
        check_prompt_lengths(rows, cfg.data.prompt_column, tokenizer, cfg.data.max_prompt_length,
                             cfg.generation.max_new_tokens, context, where)

    if cfg.algorithm == "dpo":
        from llmrl.trainers.dpo import DPOTrainer, load_pairs

        trainer = DPOTrainer(cfg, policy, tokenizer, load_pairs(cfg.dpo.data), eval_rows, strategy, run_dir,
                             eval_reward or reward)
    elif cfg.algorithm == "kto":
        from llmrl.data.logged import load_labelled
        from llmrl.trainers.kto import KTOTrainer

        trainer = KTOTrainer(cfg, policy, tokenizer, load_labelled(cfg.kto.data), eval_rows, strategy, run_dir,
                             eval_reward or reward)
    elif cfg.algorithm == "ilql":
        from llmrl.trainers.ilql import ILQLTrainer, load_logged_rows

        trainer = ILQLTrainer(cfg, policy, tokenizer, load_logged_rows(cfg, tokenizer, context), eval_rows, strategy,
                              run_dir, eval_reward or reward)
    else:
        trainer = OnlineTrainer(cfg, policy, tokenizer, reward, train_rows, eval_rows, strategy, run_dir, eval_reward)
    trainer.process_started = started
    if owner is not None:
        owner.trainer = trainer
        trainer.hooks = Hooks(owner.callbacks, owner)
        trainer.stop_requested = owner._stop
    if resume_from is not None:
        trainer.load_checkpoint(resume_from, resume_state)
        trainer.apply_settings({k: new for k, (_, new) in changed.items() if k in SCHEDULABLE})
        say(main, f"resumed from {resume_from} at step {trainer.step}" +
            (f"; changed: {', '.join(f'{k} {a!r} -> {b!r}' for k, (a, b) in changed.items())}" if changed else ""))
        for note in owner.resume_notes if owner is not None else ():
            say(main, note)
    elif cfg.reward.normalize == "reference":
        trainer.fit_reward_normalizer()
        say(main, f"reward normalisation fitted on reference samples: mean {trainer.reward_norm.mean:.4f}, "
                  f"std {trainer.reward_norm.std:.4f}")
    logger = MetricsLogger(run_dir, enabled=strategy.is_main,
                           resume_step=trainer.step if resume_from is not None else None,
                           report_to=cfg.run.report_to, config=to_dict(cfg),
                           wandb_project=cfg.run.wandb_project, wandb_entity=cfg.run.wandb_entity,
                           wandb_run_name=cfg.run.wandb_run_name)
    try:
        summary = trainer.run(logger, eval_rows)
    except Terminated:  # SIGTERM: every rank stopped at the same step (and saved it, if there was time)
        logger.close()
        strategy.close()  # as a finished run does: a process group left to the interpreter's exit may abort
        raise
    logger.close()
    strategy.close()
    policy.model.eval()
    return RunResult(model=policy.model, tokenizer=tokenizer, summary=summary,
                     metrics=read_log(run_dir) if main else [], final_checkpoint=Path(summary["final_checkpoint"]),
                     stopped_early=trainer.step < cfg.train.total_steps,
                     ilql_heads=getattr(policy, "ilql_heads", None))


def say(main: bool, text: str) -> None:
    """Print once per run, from the main rank."""
    if main:
        print(text, flush=True)
