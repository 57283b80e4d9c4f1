"""``llmrl tune``: a hyper-parameter search over a recipe, on Optuna. Optuna samples (TPE by default), prunes (median
or Hyperband), stores the study (SQLite beside the runs by default, or any Optuna storage URL) and watches workers'
heartbeats; this module is the glue to llmrl's runs:

- each trial is an ordinary run folder ``OUT/trials/trial-NNNN`` (``run.output_dir``), trained by ``RLTrainer`` with
  the trial's parameters as overrides, so it resumes, plots and exports as any run;
- its objective is the metric's value at the run's last logged row holding it (for ``eval/reward``, the default,
  the evaluation after the last step); every evaluation is reported to Optuna, and a trial the pruner stops is
  ended cleanly (``RLTrainer.stop()``: it evaluates and saves as a finished run does) and recorded PRUNED;
- a trial that raises is recorded FAIL with its one-line error and the study goes on (it counts as one of the N
  trials); a trial whose worker was killed is found by its stopped heartbeat, marked FAIL and retried once: the
  retry resumes the killed trial's run folder from its last checkpoint (nothing trained is lost) and takes its
  place among the N. Ctrl-C or SIGTERM stops the study at a step boundary and queues the trial's retry the same way;
- the study lives in the storage with what a report or another worker needs (the recipe as resolved, the space,
  the metric and its direction), so running the same command again, or on another machine, continues it.
"""
from __future__ import annotations

import contextlib
import json
import math
import os
import re
import signal
import socket
import subprocess
import sys
import threading
import time
import warnings
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from llmrl.errors import ConfigError, UserError, first_line
from llmrl.tune.report import TUNE_MARK  # written into OUT: a folder holding other things is not a study's

SAMPLERS = ("tpe", "random", "cmaes", "qmc", "gp")
PRUNERS = ("median", "hyperband", "none")
DIRECTIONS = ("maximize", "minimize")
HEARTBEAT_SECONDS = 30  # a running trial writes a heartbeat this often; silent for 2x this, it is marked FAIL
STORAGE_VARIABLE = "LLMRL_TUNE_STORAGE"  # how --workers hands the storage URL to its worker processes
RETRIES = 1  # a killed trial is retried once (resuming its run folder); a trial that raises is not retried


@dataclass
class TuneResult:
    """What ``tune`` returns."""

    study: Any  # the optuna.Study (study.trials_dataframe(), optuna.visualization, ...)
    best_params: dict | None  # {config key: value} of the best trial; None when no trial completed
    best_value: float | None
    best_run_dir: Path | None  # the best trial's run folder: export, evaluate or plot it as any run
    out_dir: Path
    report: Any = None  # what llmrl.tune.report.write_report returned (best.yaml, the table, the plots)


def tune(config, space, *, trials: int, out_dir=None, metric: str = "eval/reward", direction: str = "maximize",
         sampler: str = "tpe", pruner: str = "median", storage: str | None = None, study_name: str | None = None,
         workers: int = 1, seed: int = 0, overrides=(), heartbeat: int = HEARTBEAT_SECONDS,
         **objects) -> TuneResult:
    """Search ``space`` (a YAML path or a dict of config keys and ranges, see ``llmrl.tune.space``) over the recipe
    ``config`` (a YAML path, a dict or a Config, with ``overrides``) until the study holds ``trials`` finished
    trials (completed, pruned or failed). ``objects`` (reward_funcs, train_dataset, eval_dataset, model, tokenizer,
    env, callbacks, ...) go to every trial's ``RLTrainer``. Every bad input is one ConfigError line before any
    trial starts."""
    from llmrl.api import _config
    from llmrl.config import to_dict
    from llmrl.tune.space import load_space, read_space

    overrides = list(overrides)
    _check_settings(trials, workers, sampler, pruner, direction, heartbeat)
    if workers > 1 and objects:
        raise ConfigError(f"workers = {workers} with {', '.join(sorted(objects))} given as Python objects: objects "
                          f"in memory cannot cross to worker processes; use workers=1, or name them in the recipe "
                          f"(e.g. reward.function: my_rewards.py:score, data.source: rows.jsonl)")
    params = load_space(space, config, overrides)  # unknown keys, bad ranges: the recipe's own one-line errors
    cfg = _config(config, overrides)
    check_metric(metric, cfg)
    make_sampler(sampler, seed)  # a sampler whose package is missing: one line now
    out = Path(out_dir) if out_dir is not None else Path(cfg.run.output_dir).with_name(
        Path(cfg.run.output_dir).name + "-tune")
    check_out_dir(out)
    storage_url = storage or f"sqlite:///{out.resolve() / 'study.db'}"
    name = study_name or out.resolve().name
    attrs = {"recipe": str(config) if isinstance(config, (str, Path)) else "in-memory",
             "base_config": json.loads(json.dumps(to_dict(cfg), default=str)),
             "space": read_space(space)[0], "metric": metric, "direction": direction,
             "cwd": os.getcwd()}  # where the recipe's relative paths and run folders are read from (the report)
    with _quiet_optuna():
        if storage is not None and not storage.startswith(f"sqlite:///{out.resolve()}/"):
            open_storage(storage, heartbeat)  # a URL that cannot be opened: one line, before OUT is made
        out.mkdir(parents=True, exist_ok=True)
        (out / TUNE_MARK).write_text("a study made by llmrl tune: its trials' run folders and its report\n")
        study = open_study(storage_url, name, direction, heartbeat)
        _record_or_compare(study, attrs, storage_url)
        if workers == 1:
            run_trials(study, params, out, trials, sampler, pruner, seed, _heartbeat(storage_url, heartbeat),
                       objects=objects)
        else:
            _run_workers(storage_url, name, out, trials, sampler, pruner, seed, workers, heartbeat, cfg.run.threads)
        study = open_study(storage_url, name, direction, heartbeat)  # what every worker wrote
    return _result(study, out)


# ---------------------------------------------------------------------------------------------------------------
# checks, before any trial


def _check_settings(trials, workers, sampler, pruner, direction, heartbeat) -> None:
    for what, value in (("trials", trials), ("workers", workers), ("heartbeat", heartbeat)):
        if isinstance(value, bool) or not isinstance(value, int) or value < 1:
            raise ConfigError(f"{what} is {value!r}: give a whole number of at least 1")
    for what, value, valid in (("sampler", sampler, SAMPLERS), ("pruner", pruner, PRUNERS),
                               ("direction", direction, DIRECTIONS)):
        if value not in valid:
            raise ConfigError(f"{what} is {value!r}: use one of {', '.join(valid)}")


def logged_metrics(cfg) -> set[str]:
    """The metric names a run of ``cfg`` writes to log.jsonl (the trainers' own, as ``OnlineTrainer.make_experience``
    and ``update`` and ``DPOTrainer.train_step`` log them; tests compare this with a real run's keys). A reward
    component's numbers (``reward/NAME/mean``, ...) and an environment's (``env/*``, ``eval/*``) are named by the
    user's code: ``check_metric`` accepts those by their form."""
    from llmrl.algorithms import OFFLINE, make_estimator
    from llmrl.trainers.online import importance_sampling_cap, sampler_is_exact

    names = {"eval/reward"} if cfg.data.eval_size > 0 else set()
    times = {"time/step", "memory/peak_gib", "optim/grad_norm", "optim/lr"}
    if cfg.algorithm == "ilql":  # ILQLTrainer.train_step, llmrl.rl.ilql.ilql_loss
        return names | times | {"loss/ilql", "loss/q", "loss/v", "loss/cql", "loss/awac", "ilql/actions"} | {
            f"ilql/{name}_{stat}" for name in ("q", "target_q", "v", "advantage") for stat in ("mean", "min", "max")}
    if cfg.algorithm in OFFLINE:
        return names | times | {"loss/dpo", "rewards/chosen", "rewards/rejected", "rewards/accuracy", "rewards/margin"}
    estimator = make_estimator(cfg)
    names |= times | {"reward/mean", "reward/std", "reward/raw_mean", "reward/raw_std", "objective/entropy",
                      "response/length", "response/eos_rate", "train/kept", "time/generate", "time/reward",
                      "time/forward", "time/update", "loss/policy", "policy/entropy", "policy/clipfrac",
                      "policy/approx_kl", "policy/ratio"}
    kl_key, _, kl_coef = estimator.logged_kl(cfg.ppo.init_kl_coef)
    names.add(kl_key)
    names |= {"objective/kl_coef"} if kl_coef is not None else set()
    names |= {"objective/non_score_reward"} if estimator.kl_in_reward else set()
    names |= {"value/mean", "loss/value", "value/clipfrac"} if estimator.uses_critic else set()
    names |= {"loss/kl"} if estimator.loss_kl_coef else set()
    plays_episodes = bool(cfg.env.name)
    if not plays_episodes:
        names.add("reward/skipped")
        names |= {"reward/eos_penalized", "reward/eos_penalty"} if cfg.generation.missing_eos_penalty is not None \
            else set()
    names |= {"reward/normalized_mean"} if cfg.reward.normalize != "none" else set()
    names |= {"reward/clipped"} if cfg.reward.clip is not None else set()
    # the sampler's log-probs beside the trainer's recomputed ones: when the engine records them and pi_old is
    # recomputed (OnlineTrainer.fill_logprobs)
    tis_cap = importance_sampling_cap(cfg)
    old = cfg.train.old_logprobs
    recomputed = estimator.uses_critic or old == "recompute" or tis_cap is not None or (
        old == "auto" and not sampler_is_exact(cfg))
    if cfg.generation.engine in ("fast", "vllm") and recomputed:
        names |= {"sampling/logprob_diff_mean", "sampling/logprob_diff_max"}
        names |= {"sampling/is_weight_mean", "sampling/is_clipped"} if tis_cap is not None else set()
    return names


def check_metric(metric: str, cfg) -> None:
    """One line when a run of ``cfg`` never logs ``metric``: the objective would never get a value."""
    if not isinstance(metric, str) or not metric:
        raise ConfigError(f"metric is {metric!r}: name a metric the runs log, e.g. eval/reward")
    names = logged_metrics(cfg)
    if metric in names:
        return
    if not cfg.env.name and metric.startswith("reward/") and metric.count("/") >= 2:
        return  # a reward component's own number, reward/NAME/KEY
    if cfg.env.name and (metric.startswith("env/") or (metric.startswith("eval/") and cfg.data.eval_size > 0)):
        return  # an environment's episode numbers
    if metric.startswith("eval/") and cfg.data.eval_size == 0:
        raise ConfigError(f"metric {metric!r} is never logged: data.eval_size is 0 (no held-out set, no evaluation); "
                          f"set data.eval_size (e.g. 64) or choose a training metric such as reward/mean")
    import difflib

    close = difflib.get_close_matches(metric, sorted(names), n=1)
    hint = f"did you mean {close[0]!r}? " if close else ""
    raise ConfigError(f"metric {metric!r} is never logged by this recipe ({cfg.algorithm}): {hint}it logs "
                      f"{', '.join(sorted(names))}")


def check_out_dir(out: Path) -> None:
    """OUT is new, empty, or a study's folder (it holds TUNE_MARK): nothing else of the user's is written into."""
    if out.exists() and not out.is_dir():
        raise ConfigError(f"out dir {str(out)!r} is a file: give a folder for the study (its trials' run folders, "
                          f"study.db and the report)")
    if out.is_dir() and any(out.iterdir()) and not (out / TUNE_MARK).is_file():
        held = sorted(e.name for e in out.iterdir())
        shown = ", ".join(held[:5]) + (f" and {len(held) - 5} more" if len(held) > 5 else "")
        raise ConfigError(f"out dir {str(out)!r} holds {shown} but no study of llmrl tune (no {TUNE_MARK}): give a "
                          f"new or empty folder (nothing there is deleted)")


# ---------------------------------------------------------------------------------------------------------------
# the study


@contextlib.contextmanager
def _quiet_optuna():
    """Optuna's own log lines (a trial's traceback, experimental-feature warnings) off while tune runs: tune prints
    one line per finished trial, and a failed trial's error is in its user attrs."""
    import optuna

    level = optuna.logging.get_verbosity()
    optuna.logging.set_verbosity(optuna.logging.ERROR)
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", optuna.exceptions.ExperimentalWarning)
            yield
    finally:
        optuna.logging.set_verbosity(level)


def open_storage(url: str, heartbeat: int = HEARTBEAT_SECONDS):
    """The Optuna storage ``url`` names: ``journal:PATH`` (a journal file, e.g. on a shared filesystem: no
    heartbeats), or a database URL (sqlite:///, postgresql://, mysql://) with heartbeats, so that a trial whose
    worker died is marked FAIL and retried. One line when it cannot be opened."""
    from optuna.storages import JournalStorage, RDBStorage, RetryHeartbeatStaleTrialCallback
    from optuna.storages.journal import JournalFileBackend

    try:
        if url.startswith("journal:"):
            path = Path(url[len("journal:"):])
            if not path.parent.is_dir():
                raise OSError(f"no folder {str(path.parent)!r}")
            return JournalStorage(JournalFileBackend(str(path)))
        engine = {"connect_args": {"timeout": 60}} if url.startswith("sqlite") else {}  # workers wait for the lock
        return RDBStorage(url, engine_kwargs=engine, heartbeat_interval=heartbeat, grace_period=2 * heartbeat,
                          heartbeat_stale_trial_callback=RetryHeartbeatStaleTrialCallback(max_retry=RETRIES))
    except Exception as e:  # noqa: BLE001 (a driver missing, a refused connection, a bad URL: all one line)
        raise ConfigError(f"storage {shown(url)!r} cannot be opened ({first_line(e, 160).replace(url, shown(url))}): give a database URL that this "
                          f"machine can reach (sqlite:///PATH/study.db, postgresql://USER:PASS@HOST/DB with psycopg2, "
                          f"mysql://USER:PASS@HOST/DB with pymysql) or journal:PATH in an existing folder") from None


def shown(url: str) -> str:
    """``url`` as printed: a database password replaced by *** (a line on screen or in a log is no place for it)."""
    return re.sub(r"(://[^:/@]+):[^@/]*@", r"\1:***@", url)


def _heartbeat(url: str, heartbeat: int) -> int | None:
    return None if url.startswith("journal:") else heartbeat


def open_study(url: str, name: str, direction: str, heartbeat: int = HEARTBEAT_SECONDS):
    import optuna

    return optuna.create_study(storage=open_storage(url, heartbeat), study_name=name, direction=direction,
                               load_if_exists=True)


def _record_or_compare(study, attrs: dict, url: str) -> None:
    """A new study records what it searches; a study continued (the same command again, or a worker on another
    machine) must search the same recipe, space, metric and direction."""
    saved = study.user_attrs
    if study.direction.name.lower() != attrs["direction"]:
        raise ConfigError(f"study {study.study_name!r} in {shown(url)} was made to {study.direction.name.lower()} "
                          f"its objective, not to {attrs['direction']}: give --direction "
                          f"{study.direction.name.lower()}, or start another study (another --out or --study-name)")
    if not saved and study.get_trials(deepcopy=False):
        raise ConfigError(f"study {study.study_name!r} in {shown(url)} already holds trials that llmrl tune did not "
                          f"make: it is left as it is; give another --study-name")
    if not saved:
        for key, value in attrs.items():
            study.set_user_attr(key, value)
        return
    from llmrl.distributed.run_dir import _flat

    for key in ("metric", "direction", "space", "base_config"):
        if saved.get(key) != attrs[key]:
            if key == "base_config":
                old, new = _flat(saved[key]), _flat(attrs[key])
                diff = [k for k in sorted(old.keys() | new.keys()) if old.get(k) != new.get(k)]
                what = f"the recipe differs in {', '.join(f'{k} {old.get(k)!r} -> {new.get(k)!r}' for k in diff[:3])}"
            else:
                what = f"its {key} was {saved.get(key)!r}, now {attrs[key]!r}"
            raise ConfigError(f"study {study.study_name!r} in {shown(url)} was started with other settings ({what}): give "
                              f"the same to continue it, or start another study (another --out or --study-name)")


def counts(study) -> dict[str, int]:
    """Trials by state; a failed trial that was retried (its worker was killed) is counted as RETRIED: its retry
    takes its place among the N."""
    from optuna.trial import TrialState

    trials = study.get_trials(deepcopy=False)
    retried = {n for t in trials for n in t.system_attrs.get("retry_history", ())}
    states = ["RETRIED" if t.state == TrialState.FAIL and t.number in retried else t.state.name for t in trials]
    return {name: states.count(name) for name in [*TrialState.__members__, "RETRIED"]}


def finished(c: dict[str, int]) -> int:
    """Trials that count towards N: completed, pruned, and failed ones (not retried)."""
    return c["COMPLETE"] + c["PRUNED"] + c["FAIL"]


def run_trials(study, params, out: Path, trials: int, sampler: str, pruner: str, seed: int, heartbeat: int | None,
               objects=None, threads: int | None = None, sigterm: list | None = None) -> None:
    """This process's share of the study: one trial at a time until the study holds ``trials`` finished ones. When
    the rest are running elsewhere, wait for them (a killed worker's trial is failed once its heartbeat is stale,
    and its retry is taken here) rather than start more than asked for. ``heartbeat`` None: the storage has none
    (a journal file), so a trial running elsewhere cannot be told from a dead one: then leave them. ``sigterm``: a
    list that a SIGTERM handler appends to (a worker's): this process then stops at the next step or trial."""
    from llmrl.trainers.base import Terminated

    import optuna

    study.sampler = make_sampler(sampler, seed + len(study.get_trials(deepcopy=False)))
    study.pruner = make_pruner(pruner, study.user_attrs["base_config"]["train"]["total_steps"])
    sigterm = [] if sigterm is None else sigterm
    while True:
        if sigterm:
            raise Terminated("terminated (SIGTERM) between trials")
        optuna.storages.fail_stale_trials(study)  # a killed worker's trial: FAIL, and its retry WAITING
        c = counts(study)
        if finished(c) >= trials:
            return
        if finished(c) + c["RUNNING"] >= trials and not c["WAITING"]:
            if heartbeat is None:
                return
            time.sleep(min(5, heartbeat))
            continue
        objective = Objective(study, params, out, objects or {}, threads, sigterm)
        try:
            study.optimize(objective, n_trials=1, catch=(Exception,), callbacks=[progress_line])
        except _Stopped as stop:  # Ctrl-C or SIGTERM: the study stops; the trial (FAIL) is retried when it continues
            from optuna.storages import RetryHeartbeatStaleTrialCallback
            from optuna.trial import TrialState

            if study.get_trials(deepcopy=False)[stop.number].state == TrialState.RUNNING:
                study.tell(stop.number, state=TrialState.FAIL)
            RetryHeartbeatStaleTrialCallback()(study, study.get_trials()[stop.number])
            error = stop.error
            raise type(error)(f"{error}; the study stops here: run the same llmrl tune command again to continue it "
                              f"(this trial then resumes from its last checkpoint)") from None


def make_sampler(name: str, seed: int):
    import optuna

    if name == "cmaes":
        try:
            import cmaes  # noqa: F401
        except ImportError:
            raise ConfigError("sampler cmaes needs the cmaes package: pip install cmaes (or use tpe, random, qmc, "
                              "gp)") from None
    return {"tpe": lambda: optuna.samplers.TPESampler(seed=seed),
            "random": lambda: optuna.samplers.RandomSampler(seed=seed),
            "cmaes": lambda: optuna.samplers.CmaEsSampler(seed=seed),
            "qmc": lambda: optuna.samplers.QMCSampler(seed=seed),
            "gp": lambda: optuna.samplers.GPSampler(seed=seed)}[name]()


def make_pruner(name: str, total_steps: int):
    """median: a trial is stopped at an evaluation where its value is worse than the median of the earlier trials'
    at the same step, once 2 trials have finished (fewer make a noisy median) and past step 0 (the untrained
    model, the same in every trial). hyperband: Optuna's, over the run's steps. none: every trial runs to its end."""
    import optuna

    if name == "median":
        return optuna.pruners.MedianPruner(n_startup_trials=2, n_warmup_steps=1)
    if name == "hyperband":
        return optuna.pruners.HyperbandPruner(min_resource=1, max_resource=max(total_steps, 1))
    return optuna.pruners.NopPruner()


def progress_line(study, trial) -> None:
    seconds = (trial.datetime_complete - trial.datetime_start).total_seconds() \
        if trial.datetime_complete and trial.datetime_start else 0.0
    value = f"{trial.value:.4f}" if trial.value is not None else "-"
    error = f"; error: {trial.user_attrs['error']}" if trial.user_attrs.get("error") else ""
    print(f"trial {trial.number}: {trial.state.name} {study.user_attrs.get('metric')} {value} "
          f"{json.dumps(trial.params)} {seconds:.1f}s{error}", flush=True)


# ---------------------------------------------------------------------------------------------------------------
# one trial: an ordinary run


class Objective:
    """One trial: the parameters as overrides of the study's recipe, a run in ``OUT/trials/trial-NNNN``, the
    metric's last logged value; evaluations reported to the pruner."""

    def __init__(self, study, params, out: Path, objects: dict, threads: int | None, sigterm: list):
        self.study, self.params, self.out, self.objects, self.threads = study, params, out, objects, threads
        self.sigterm = sigterm

    def __call__(self, trial) -> float:
        import optuna

        from llmrl.api import RLTrainer
        from llmrl.distributed.checkpoint import latest_checkpoint
        from llmrl.trainers.base import Interrupted, Terminated
        from llmrl.tune.space import overrides

        base = self.study.user_attrs["base_config"]
        metric = self.study.user_attrs["metric"]
        values = {p.key: p.suggest(trial) for p in self.params}
        # a retry of a killed trial inherits its user attrs: it continues that trial's run folder from its last
        # checkpoint (or starts it again when the trial was killed before its first)
        retried = trial.user_attrs.get("run_dir")
        run_dir = Path(retried or self.out / "trials" / f"trial-{trial.number:04d}")
        resume = bool(retried) and run_dir.is_dir() and latest_checkpoint(run_dir) is not None
        overwrite = bool(retried) and run_dir.is_dir() and not resume
        trial_overrides = [*overrides(values), f"run.output_dir={json.dumps(str(run_dir))}",
                           *([f"run.threads={self.threads}"] if self.threads else [])]
        trial.set_user_attr("run_dir", str(run_dir))
        trial.set_user_attr("overrides", trial_overrides)
        trial.set_user_attr("host", socket.gethostname())
        trial.set_user_attr("pid", os.getpid())
        reporter = Reporter(trial, metric, self.sigterm)
        try:
            trainer = RLTrainer(base, overrides=trial_overrides, resume=resume, overwrite=overwrite,
                                callbacks=[*self.objects.get("callbacks", ()), reporter],
                                **{k: v for k, v in self.objects.items() if k != "callbacks"})
            result = trainer.train()
        except (Interrupted, Terminated) as e:  # not a failure of the trial: the whole study is asked to stop
            raise _Stopped(e, trial.number) from None
        except KeyboardInterrupt:  # before training started (loading): the same
            raise _Stopped(Interrupted("interrupted (Ctrl-C) before training started"), trial.number) from None
        except Exception as e:  # noqa: BLE001 (a trial's failure is recorded, and the study goes on)
            trial.set_user_attr("error", f"{type(e).__name__}: {first_line(e, 300)}" if not isinstance(e, UserError)
                                else first_line(e, 300))
            raise
        if self.sigterm:  # it came while the run was loading or saving: the run stopped at its first step boundary
            raise _Stopped(Terminated(f"terminated (SIGTERM) at step {trainer.step}"), trial.number)
        if reporter.pruned:
            raise optuna.TrialPruned(f"stopped at step {reporter.pruned}")
        rows = [r for r in result.metrics if r.get(metric) is not None]
        if not rows:
            raise _failed(trial, f"the run logged no {metric}")
        value = float(rows[-1][metric])
        if math.isnan(value):  # e.g. every evaluation sample was skipped
            raise _failed(trial, f"{metric} is NaN at step {rows[-1].get('step')}")
        return value


class _Stopped(BaseException):
    """Ctrl-C or SIGTERM during a trial, carried past Optuna's ``catch`` (which would go on to the next trial)."""

    def __init__(self, error: Exception, number: int):
        super().__init__(str(error))
        self.error, self.number = error, number


def _failed(trial, message: str) -> Exception:
    """Records ``message`` as the trial's error; the exception to raise."""
    trial.set_user_attr("error", message)
    return RuntimeError(message)


class Reporter:
    """A llmrl Callback: the metric at each evaluation (an eval/* metric) or each step (a training metric) goes to
    Optuna as an intermediate value; when the pruner says so, the run is stopped at that step boundary."""

    def __init__(self, trial, metric: str, sigterm: list = ()):
        self.trial, self.metric, self.pruned, self.sigterm = trial, metric, 0, sigterm

    def _report(self, trainer, step: int, metrics: dict) -> None:
        value = metrics.get(self.metric)
        if step == 0 or value is None or math.isnan(value) or self.pruned:
            return
        self.trial.report(float(value), step)
        if self.trial.should_prune():
            self.pruned = step
            trainer.stop()

    def on_evaluate(self, trainer, step: int, metrics: dict) -> None:
        if self.metric.startswith("eval/"):
            self._report(trainer, step, metrics)

    def on_step_end(self, trainer, step: int, metrics: dict) -> None:
        if self.sigterm:
            trainer.stop()
        if not self.metric.startswith("eval/"):
            self._report(trainer, step, metrics)


# ---------------------------------------------------------------------------------------------------------------
# workers


def _run_workers(url: str, name: str, out: Path, trials: int, sampler: str, pruner: str, seed: int, workers: int,
                 heartbeat: int, threads: int | None) -> None:
    """``workers`` processes (``python -m llmrl.cli.tune --worker``) sharing the study, the CPU threads split
    between them; waits for all of them. A worker that dies leaves its trial to the others (heartbeat, retry)."""
    per_worker = max(1, (threads or os.cpu_count() or 1) // workers)
    commands = [[sys.executable, "-m", "llmrl.cli.tune", "--worker", "--study-name", name,
                 "--out", str(out), "--trials", str(trials), "--sampler", sampler, "--pruner", pruner,
                 "--seed", str(seed + 1000 * (i + 1)), "--heartbeat", str(heartbeat), "--threads", str(per_worker)]
                for i in range(workers)]
    print(f"{workers} workers, {per_worker} threads each, sharing study {name!r} in {shown(url)}", flush=True)
    # Each worker in a session of its own: Ctrl-C and SIGTERM reach it once, forwarded from here, so that it stops
    # at a step boundary and queues its trial's retry (a second signal could cut that short).
    # the storage URL goes through the environment: a command line (with a database password) is visible in ps
    env = {**os.environ, STORAGE_VARIABLE: url}
    procs = [subprocess.Popen(c, start_new_session=True, env=env) for c in commands]
    stopped: list[int] = []

    def forward(signum, frame) -> None:
        stopped.append(signum)
        for p in procs:
            if p.poll() is None:
                p.send_signal(signum)

    main_thread = threading.current_thread() is threading.main_thread()  # only it may install handlers
    previous = {s: signal.signal(s, forward) for s in (signal.SIGINT, signal.SIGTERM)} if main_thread else {}
    try:
        for i, p in enumerate(procs):
            if p.wait() != 0 and not stopped:  # its trial, if one ran, is failed and retried by the others
                print(f"worker {i} (pid {p.pid}) ended with exit code {p.returncode}", flush=True)
    finally:
        for s, handler in previous.items():
            signal.signal(s, handler)
    if not stopped and all(p.returncode != 0 for p in procs):
        raise ConfigError(f"all {workers} workers failed (exit codes {', '.join(str(p.returncode) for p in procs)}; "
                          f"their lines are above): fix what they say and run the same command again to continue "
                          f"the study")
    if stopped:
        from llmrl.trainers.base import Interrupted, Terminated

        error = Interrupted if stopped[0] == signal.SIGINT else Terminated
        raise error(f"{'interrupted (Ctrl-C)' if error is Interrupted else 'terminated (SIGTERM)'}: the workers "
                    f"stopped at a step boundary; run the same llmrl tune command again to continue the study (their "
                    f"trials then resume from their last checkpoints)")


def run_worker(url: str | None, name: str, out: Path, trials: int, sampler: str, pruner: str, seed: int,
               heartbeat: int, threads: int | None) -> None:
    """A worker: joins the study ``name`` in ``url`` (None: the one ``tune`` passed in the environment) and runs
    trials of the recipe and space it recorded."""
    from llmrl.tune.space import load_space

    url = url or os.environ.get(STORAGE_VARIABLE)
    if not url:
        raise ConfigError(f"a worker needs the study's storage: --storage URL (or {STORAGE_VARIABLE})")

    # SIGTERM outside the training loop (which has its own handler: trainers.base.sigterm_recorded) is recorded,
    # and the worker stops at the next step boundary or between trials; its trial is failed and retried later
    sigterm: list[int] = []
    signal.signal(signal.SIGTERM, lambda signum, frame: sigterm.append(signum))

    with _quiet_optuna():
        import optuna

        try:
            study = optuna.load_study(study_name=name, storage=open_storage(url, heartbeat))
        except KeyError:
            raise ConfigError(f"no study {name!r} in {shown(url)}: start it with llmrl tune --config RECIPE --space "
                              f"SPACE.yaml first") from None
        attrs = study.user_attrs
        if "space" not in attrs or "base_config" not in attrs:
            raise ConfigError(f"study {name!r} in {shown(url)} was not made by llmrl tune (it records no space and "
                              f"recipe): start it with llmrl tune --config RECIPE --space SPACE.yaml")
        params = load_space(attrs["space"], attrs["base_config"])
        run_trials(study, params, out, trials, sampler, pruner, seed, _heartbeat(url, heartbeat), threads=threads,
                   sigterm=sigterm)


def _result(study, out: Path) -> TuneResult:
    from optuna.trial import TrialState

    complete = [t for t in study.get_trials(deepcopy=False) if t.state == TrialState.COMPLETE]
    best = study.best_trial if complete else None
    result = TuneResult(study, dict(best.params) if best else None, best.value if best else None,
                        Path(best.user_attrs["run_dir"]) if best else None, out)
    from llmrl.tune.report import write_report

    result.report = write_report(study, out)
    return result
