"""Population-based training (``llmrl pbt``, ``llmrl.pbt``) on Ray Tune's ``PopulationBasedTraining``.

A population of ordinary llmrl runs (``OUT/members/member-K/``) trains side by side. Every ``interval`` steps each
member evaluates, saves a checkpoint and reports the metric with that checkpoint to Ray. Ray's scheduler (Jaderberg
et al. 2017, "Population Based Training of Neural Networks") then has a member of the worst ``quantile`` exploit one
of the best: the member continues from the better one's checkpoint (llmrl's ``--resume``) with its hyper-parameters
perturbed (multiplied by one of ``perturbation_factors``, or resampled from the space with
``resample_probability``). Ray decides who copies whom and how values move; llmrl trains, checkpoints and resumes.

Only the hyper-parameters a run may change part-way (``llmrl.config.SCHEDULABLE``) can be in the space. Layout::

    OUT/members/member-K/          the member's run (its lineage: after an exploit, the donor's checkpoint and
                                   log up to that step, then its own), with schedule.yaml and replay.yaml
    OUT/replaced/member-K/until-step-N/   the member's own run as it was when it exploited another at step N
                                   (moved whole, never deleted: an ordinary run folder, resumable and plottable)
    OUT/population.md, .csv        one row per member: final metric, final hyper-parameters, exploits
    OUT/population.png             the hyper-parameters and the metric over steps, one line per member
    OUT/replays/member-K/          where ``llmrl train --config OUT/members/member-K/replay.yaml`` writes
    OUT/ray/                       Ray Tune's own files (its copies of the reported checkpoints)

Every member uses the recipe's ``run.seed``, and a resume restores the random state: a member's replay.yaml (its
lineage's hyper-parameters as a ``schedule:``) trains the same samples as the member did.
"""
from __future__ import annotations

import csv
import json
import math
import os
import random
import re
import shutil
import tempfile
import warnings
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path

import yaml

from llmrl.errors import ConfigError, RunStopped

SCORE = "pbt_score"  # what the members report to Ray: the metric, signed so that Ray may maximise it
INFO = "pbt.json"  # inside every checkpoint reported to Ray: whose it is, its step and its lineage


@dataclass
class PBTResult:
    """What ``pbt`` returns: where everything is, and one row per member (``member``, ``metric``, ``values``,
    ``exploits``, ``status``), best first."""

    out_dir: Path
    members: list[dict] = field(default_factory=list)
    table: Path | None = None
    plot: Path | None = None

    @property
    def best(self) -> dict | None:
        ok = [m for m in self.members if m["status"] == "done"]
        return ok[0] if ok else None


# --------------------------------------------------------------------------------------------- the lineage

def segment(from_step: int, member: int, values: dict, continued_from: dict | None = None) -> dict:
    """One stretch of a lineage: trained by ``member`` from ``from_step`` with ``values`` (``to_step`` is set when
    it closes); ``continued_from``: {member, step} of the checkpoint it started from, at an exploit."""
    row = {"from_step": from_step, "to_step": None, "member": member, "values": dict(values)}
    if continued_from is not None:
        row["continued_from"] = dict(continued_from)
    return row


def closed(lineage: list[dict], step: int) -> list[dict]:
    """A copy of ``lineage`` whose last segment ends at ``step``."""
    out = [dict(s) for s in lineage]
    out[-1]["to_step"] = step
    return out


def exploited(donor_lineage: list[dict], step: int, member: int, donor: int, values: dict) -> list[dict]:
    """The lineage of ``member`` after it continued from ``donor``'s checkpoint of ``step`` with ``values``: the
    donor's lineage up to ``step``, then a segment of its own."""
    return [*closed(donor_lineage, step), segment(step, member, values, {"member": donor, "step": step})]


def schedule_of(lineage: list[dict]) -> list[dict]:
    """The ``schedule:`` of a lineage: its hyper-parameters from each segment's first step on (the first at 0), as
    Ray's PopulationBasedTrainingReplay replays a member."""
    return [{"step": s["from_step"], "set": dict(s["values"])} for s in lineage]


def replay_config(recipe: dict, lineage: list[dict], output_dir: str | Path) -> dict:
    """``recipe`` (a whole config as a dict) with the lineage's first values and its schedule, writing to
    ``output_dir``: a config that runs as it is."""
    data = json.loads(json.dumps(recipe))
    for key, value in lineage[0]["values"].items():
        section, name = key.split(".")
        data[section][name] = value
    data["schedule"] = schedule_of(lineage)
    data["run"]["output_dir"] = str(output_dir)
    return data


def write_member_files(run_dir: Path, member: int, lineage: list[dict], exploits: list[dict], recipe: dict,
                       replay_dir: Path) -> None:
    """``schedule.yaml`` (the segments the member's weights followed, and its exploits) and ``replay.yaml``."""
    from llmrl.config import _PlainDumper  # no aliases: llmrl's YAML loader refuses them

    doc = {"member": member, "segments": lineage, "exploits": exploits}
    header = (f"# member-{member}: the hyper-parameters its weights were trained with, segment by segment (member: "
              f"whose run trained it; continued_from: the checkpoint it went on from at an exploit).\n"
              f"# Replay: llmrl train --config {run_dir / 'replay.yaml'}\n")
    (run_dir / "schedule.yaml").write_text(header + yaml.dump(doc, Dumper=_PlainDumper, sort_keys=False))
    replay = replay_config(recipe, lineage, replay_dir)
    (run_dir / "replay.yaml").write_text(f"# member-{member}'s lineage as one run: the recipe with its schedule.\n"
                                         + yaml.dump(replay, Dumper=_PlainDumper, sort_keys=False))


# --------------------------------------------------------------------------------------------- the space

def ray_domain(param):
    """A ``llmrl.tune.space.Param`` as Ray Tune's sampling domain (for the initial sample and resampling)."""
    from ray import tune

    if param.kind == "categorical":
        return tune.choice(list(param.choices))
    if param.kind == "int":
        if param.step:
            return tune.qrandint(int(param.low), int(param.high), int(param.step))
        return (tune.lograndint if param.log else tune.randint)(int(param.low), int(param.high) + 1)  # high included
    if param.step:
        return tune.quniform(param.low, param.high, param.step)
    return (tune.loguniform if param.log else tune.uniform)(param.low, param.high)


def mutation(param):
    """What Ray's PBT perturbs ``param`` with: a categorical's list (it moves to a neighbour or resamples), else the
    domain (multiplied by a perturbation factor or resampled)."""
    return list(param.choices) if param.kind == "categorical" else ray_domain(param)


def clip_to_space(values: dict, params: list) -> dict:
    """A perturbed value kept inside its range (Ray multiplies without bounds): clipped, ints rounded."""
    for p in params:
        if p.kind == "categorical" or p.key not in values:
            continue
        v = min(max(values[p.key], p.low), p.high)
        values[p.key] = int(round(v)) if p.kind == "int" else float(f"{v:.6g}")  # 0.0024, not 0.0024000000000000002
    return values


def member_of_folder(path: str | None) -> int:
    """The member index of a Ray trial folder, NAME_<5 hex digits of the experiment>_<5-digit index>_...: the hex
    part may be all digits too (40421), so the index is the group after it; -1 when it cannot be read."""
    found = re.search(r"_[0-9a-f]{5}_(\d{5})_", Path(path).name) if path else None
    return int(found.group(1)) if found else -1


def check_space(params: list) -> None:
    from llmrl.config import SCHEDULABLE

    for p in params:
        if p.key not in SCHEDULABLE:
            raise ConfigError(f"space: {p.key} is not a key a run may change part-way: a PBT member continues from "
                              f"another's checkpoint with new values of {', '.join(SCHEDULABLE)} only (the others "
                              f"fix what the run is; search them with llmrl tune)")


# --------------------------------------------------------------------------------------------- a member (in Ray)

def member_index() -> int:
    from ray import tune

    return int(tune.get_context().get_trial_id().rsplit("_", 1)[1])


def _latest_step(run_dir: Path) -> int | None:
    from llmrl.distributed.checkpoint import step_checkpoints

    found = step_checkpoints(run_dir) if run_dir.is_dir() else []
    return max(step for step, _ in found) if found else None


def _move_away(run_dir: Path, out: Path, member: int, step: int | None) -> Path | None:
    """Move the member's own run (nothing is deleted) to OUT/replaced/member-K/until-step-N[-i]."""
    if not run_dir.exists():
        return None
    base = out / "replaced" / f"member-{member}" / f"until-step-{step if step is not None else 0}"
    target, i = base, 1
    while target.exists():
        target, i = base.with_name(f"{base.name}-{i}"), i + 1
    target.parent.mkdir(parents=True, exist_ok=True)
    os.rename(run_dir, target)
    return target


def _report(setup: dict, member: int, step: int, metrics: dict, checkpoint: Path | None, lineage: list[dict],
            exploits: list[dict], values: dict) -> None:
    """The member's result at ``step`` to Ray, with its checkpoint (a copy with its log and lineage)."""
    from ray import tune

    metric = setup["metric"]
    if metric not in metrics or not isinstance(metrics[metric], (int, float)) or math.isnan(metrics[metric]):
        logged = sorted(k for k in metrics if "/" in k and not k.startswith(("time/", "memory/")))
        raise ConfigError(f"metric {metric!r} was not logged at step {step} (logged: {', '.join(logged[:20])}): "
                          f"choose --metric among them")
    score = metrics[metric] if setup["direction"] == "maximize" else -metrics[metric]
    result = {SCORE: score, "step": step, "metric": metrics[metric], "member": member, "exploits": len(exploits),
              **{f"hp:{k}": v for k, v in values.items()}}
    run_dir = Path(setup["out"]) / "members" / f"member-{member}"
    write_member_files(run_dir, member, closed(lineage, step), exploits, setup["recipe"],
                       Path(setup["out"]) / "replays" / f"member-{member}")
    if checkpoint is None:
        tune.report(result)
        return
    staging = Path(tempfile.mkdtemp(prefix=f"member-{member}-", dir=Path(setup["out"]) / "ray" / "staging"))
    try:
        shutil.copytree(checkpoint, staging / "checkpoint")
        shutil.copy2(run_dir / "log.jsonl", staging / "log.jsonl")
        (staging / INFO).write_text(json.dumps({"member": member, "step": step, "lineage": closed(lineage, step)}))
        tune.report(result, checkpoint=tune.Checkpoint.from_directory(str(staging)))
    finally:
        shutil.rmtree(staging, ignore_errors=True)


def member_trainable(config: dict, setup: dict) -> None:
    """One member's turn in Ray: start (no checkpoint), go on from its own checkpoint, or continue from another
    member's (an exploit), then train, reporting every ``interval`` steps, until ``total_steps``."""
    from ray import tune

    from llmrl.api import Callback, RLTrainer
    from llmrl.distributed.checkpoint import step_dir_name
    from llmrl.distributed.run_dir import RUN_MARK
    from llmrl.tune.space import overrides as space_overrides

    member, out = member_index(), Path(setup["out"])
    run_dir = out / "members" / f"member-{member}"
    values = {k: config[k] for k in setup["keys"]}
    checkpoint, resume, exploits = tune.get_checkpoint(), False, []
    if (run_dir / "schedule.yaml").is_file():
        exploits = (yaml.safe_load((run_dir / "schedule.yaml").read_text()) or {}).get("exploits") or []
    if checkpoint is None:
        lineage = [segment(0, member, values)]
        if run_dir.exists():  # a member Ray restarts from the beginning: its earlier try is kept
            _move_away(run_dir, out, member, _latest_step(run_dir))
    else:
        with checkpoint.as_directory() as folder:
            folder = Path(folder)
            info = json.loads((folder / INFO).read_text())
            step = info["step"]
            if info["member"] == member and _latest_step(run_dir) == step:  # its own: go on in place
                lineage = info["lineage"]
                lineage[-1]["to_step"] = None
                if lineage[-1]["values"] != values:
                    lineage = [*closed(lineage, step), segment(step, member, values)]
            else:  # an exploit: the donor's checkpoint and log, then our own values
                before = _latest_step(run_dir)
                own = [s for s in exploits]
                replaced = _move_away(run_dir, out, member, before)
                run_dir.mkdir(parents=True)
                (run_dir / RUN_MARK).write_text("a run folder made by llmrl: its checkpoints, logs and summary\n")
                shutil.copytree(folder / "checkpoint", run_dir / step_dir_name(step))
                shutil.copy2(folder / "log.jsonl", run_dir / "log.jsonl")
                lineage = exploited(info["lineage"], step, member, info["member"], values)
                donor_values = info["lineage"][-1]["values"]
                exploits = [*own, {"step": step, "donor": info["member"], "donor_values": donor_values,
                                   "values": dict(values),
                                   "replaced": str(replaced.relative_to(out)) if replaced else None}]
            resume = True
    metrics: dict = {}
    interval, total = setup["interval"], setup["total_steps"]

    class Reporter(Callback):
        def on_step_end(self, trainer, step, m):
            metrics.clear()
            metrics.update(m)

        def on_evaluate(self, trainer, step, m):
            metrics.update(m)

        def on_save(self, trainer, step, path):
            if Path(path).name.startswith("step-") and step % interval == 0 and step < total:
                _report(setup, member, step, metrics, Path(path), lineage, exploits, values)

    overrides = [*setup["overrides"], *space_overrides(values), f"run.output_dir={run_dir}"]
    trainer = RLTrainer(setup["recipe"], overrides=overrides, resume=resume, callbacks=[Reporter()])
    result = trainer.train()
    final = dict(metrics)
    last = [r for r in result.metrics if setup["metric"] in r and "samples" not in r]
    if setup["metric"] not in final and last:
        final[setup["metric"]] = last[-1][setup["metric"]]
    _report(setup, member, result.summary["steps"], final, run_dir / step_dir_name(result.summary["steps"]),
            lineage, exploits, values)


# --------------------------------------------------------------------------------------------- the population

def _line_printer(keys: list[str], metric: str):
    """A Ray Tune callback printing llmrl's one line per member report (Ray's own output stays off)."""
    from ray.tune import Callback

    class Lines(Callback):
        def on_trial_result(self, iteration, trials, trial, result, **info):
            shown = ", ".join(f"{k}={result.get(f'hp:{k}'):.4g}" if isinstance(result.get(f"hp:{k}"), float)
                              else f"{k}={result.get(f'hp:{k}')}" for k in keys)
            print(f"member-{result.get('member')} step {result.get('step')}: {metric} "
                  f"{result.get('metric', float('nan')):.4f} ({shown}; exploits {result.get('exploits', 0)})",
                  flush=True)

        def on_trial_error(self, iteration, trials, trial, **info):
            found = re.search(r"_(\d{5})$", trial.trial_id)
            error = getattr(trial, "error_file", None)
            text = Path(error).read_text() if error and Path(error).is_file() else "see OUT/ray"
            print(f"member-{int(found.group(1)) if found else trial.trial_id} failed: "
                  f"{_first_line(RuntimeError(text))}", flush=True)

    return Lines()


def pbt(config, space, *, population: int = 4, interval: int, total_steps: int | None = None,
        out_dir: str | Path | None = None, metric: str = "eval/reward", direction: str = "maximize",
        quantile: float = 0.25, resample_probability: float = 0.25, perturbation_factors=(1.2, 0.8),
        workers: int | None = None, seed: int = 0, overrides=(), initial: list[dict] | None = None,
        synch: bool = False) -> PBTResult:
    """Population-based training of the recipe ``config`` (a YAML path, a dict or a Config) over ``space`` (a YAML
    path or dict, ``llmrl.tune.space``'s format; only keys a run may change part-way). ``population`` members,
    each an llmrl run of ``total_steps`` (default: the recipe's), report ``metric`` every ``interval`` steps; then
    Ray's PBT makes those in the worst ``quantile`` continue from one in the best with perturbed values.
    ``workers``: members training at once (default: as many as the CPU cores allow, up to ``population``); the
    cores are split between them (``run.threads``). ``initial``: the first members' starting values (the rest are
    sampled from the space with ``seed``). ``synch``: Ray's synchronous PBT (every member waits at each interval for
    the others, then the worst exploit the best: reproducible, but each member restarts at every interval); default
    asynchronous (a member is compared with the others' latest reports when it reports). Writes under ``out_dir``
    (see the module's docstring)."""
    from llmrl.api import _config
    from llmrl.config import to_dict
    from llmrl.tune.space import load_space

    overrides = list(overrides)
    cfg = _config(str(Path(config).resolve()) if isinstance(config, (str, Path)) else config, overrides)
    params = load_space(space, cfg, [])
    check_space(params)
    total = int(total_steps or cfg.train.total_steps)
    if population < 2:
        raise ConfigError(f"population is {population}: PBT needs at least 2 members to compare")
    if not 1 <= interval < total:
        raise ConfigError(f"interval is {interval}: members report every interval steps, so it must be at least 1 "
                          f"and below the {total} training steps")
    if not 0 < quantile <= 0.5:
        raise ConfigError(f"quantile is {quantile}: the share of members that exploit (and are exploited) must be "
                          f"in (0, 0.5]")
    if not 0 <= resample_probability <= 1:
        raise ConfigError(f"resample_probability is {resample_probability}: must be in [0, 1]")
    factors = tuple(perturbation_factors)
    if len(factors) < 1 or any(not isinstance(f, (int, float)) or f <= 0 for f in factors):
        raise ConfigError(f"perturbation_factors {factors}: give positive numbers, e.g. 1.2 0.8")
    if direction not in ("maximize", "minimize"):
        raise ConfigError(f"direction is {direction!r}: use maximize or minimize")
    from llmrl.tune.search import check_metric

    check_metric(metric, cfg)  # one the members never log (misspelt, or eval/* without a held-out set)
    if cfg.schedule:
        raise ConfigError("the recipe has a schedule: PBT makes each member's own; remove schedule from the recipe")
    initial = [dict(point) for point in initial or []]
    if len(initial) > population:
        raise ConfigError(f"initial gives {len(initial)} members' values for a population of {population}")
    for i, point in enumerate(initial):
        for p in params:
            if p.key not in point or not p.contains(point[p.key]):
                raise ConfigError(f"initial[{i}]: {p.key} = {point.get(p.key)!r} is not in the space "
                                  f"({p.describe()})")
        if set(point) - {p.key for p in params}:
            raise ConfigError(f"initial[{i}] names {sorted(set(point) - {p.key for p in params})}, not in the space")
    out = Path(out_dir if out_dir is not None else f"{cfg.run.output_dir}-pbt").resolve()
    if out.exists() and not out.is_dir():
        raise ConfigError(f"out_dir {str(out)!r} is a file: give a new or empty folder for the population")
    if out.exists() and any(out.iterdir()):
        raise ConfigError(f"out_dir {str(out)!r} is not empty: PBT writes a new population there; choose another "
                          f"--out (nothing there is deleted)")
    cores = os.cpu_count() or 1
    workers = min(population, int(workers or max(1, cores)))
    if workers < 1:
        raise ConfigError(f"workers is {workers}: must be at least 1")
    threads = max(1, cores // workers) if cfg.run.threads is None else cfg.run.threads
    keys = [p.key for p in params]
    base = [*overrides, f"train.total_steps={total}", f"run.eval_every={interval}", f"run.save_every={interval}",
            f"run.threads={threads}", "run.progress=false"]
    recipe = to_dict(_config(to_dict(cfg), base[len(overrides):]))  # the whole recipe, paths resolved
    recipe["schedule"] = []
    setup = {"recipe": recipe, "overrides": [], "keys": keys, "out": str(out), "interval": interval,
             "total_steps": total, "metric": metric, "direction": direction}
    (out / "ray" / "staging").mkdir(parents=True, exist_ok=True)
    return _run_ray(setup, params, population, workers, threads, quantile, resample_probability, factors, seed,
                    initial, synch)


def _run_ray(setup: dict, params: list, population: int, workers: int, threads: int, quantile: float,
             resample_probability: float, factors: tuple, seed: int, initial: list[dict], synch: bool) -> PBTResult:
    import logging

    import numpy as np
    import ray
    from ray import tune
    from ray.tune.schedulers import PopulationBasedTraining
    from ray.tune.search.basic_variant import BasicVariantGenerator

    import llmrl

    out = Path(setup["out"])
    random.seed(seed)  # Ray's PBT draws its perturbations from these
    np.random.seed(seed)
    started_here, temp = not ray.is_initialized(), None
    if started_here:
        temp = tempfile.mkdtemp(prefix="llmrl-ray-", dir="/tmp" if os.path.isdir("/tmp") else None)
        source = str(Path(llmrl.__file__).resolve().parent.parent)  # the members import this llmrl
        path = os.pathsep.join([source, *filter(None, [os.environ.get("PYTHONPATH")])])
        ray.init(num_cpus=workers * threads, include_dashboard=False, log_to_driver=False, _temp_dir=temp,
                 logging_level=logging.ERROR, runtime_env={"env_vars": {"PYTHONPATH": path, "RAY_DEDUP_LOGS": "0"}})
    try:
        scheduler = PopulationBasedTraining(
            time_attr="step", perturbation_interval=setup["interval"], metric=SCORE, mode="max",
            hyperparam_mutations={p.key: mutation(p) for p in params}, quantile_fraction=quantile,
            resample_probability=resample_probability, perturbation_factors=factors,
            custom_explore_fn=lambda values: clip_to_space(values, params), synch=synch)
        trainable = tune.with_resources(tune.with_parameters(member_trainable, setup=setup), {"cpu": threads})
        tuner = tune.Tuner(
            trainable, param_space={p.key: ray_domain(p) for p in params},
            tune_config=tune.TuneConfig(num_samples=population, scheduler=scheduler, reuse_actors=False,
                                        max_concurrent_trials=workers,
                                        search_alg=BasicVariantGenerator(points_to_evaluate=initial or None,
                                                                         random_state=seed)),
            run_config=tune.RunConfig(name="pbt", storage_path=str(out / "ray"), verbose=0,
                                      stop={"step": setup["total_steps"]},
                                      callbacks=[_line_printer([p.key for p in params], setup["metric"])],
                                      checkpoint_config=tune.CheckpointConfig(num_to_keep=4)))
        with warnings.catch_warnings(), _quiet_ray():
            warnings.simplefilter("ignore")  # Ray's advice on actor reuse: a member restarts in a fresh process
            grid = tuner.fit()
        errors = {}
        for r in grid:
            if r.error is not None:
                errors[member_of_folder(r.path)] = _first_line(r.error)
    finally:
        if started_here:
            ray.shutdown()
            shutil.rmtree(temp, ignore_errors=True)
        shutil.rmtree(out / "ray" / "staging", ignore_errors=True)
    result = write_population(out, population, [p.key for p in params], {p.key: p for p in params},
                              setup["metric"], setup["direction"], errors)
    if result.best is None:
        first = sorted(result.members, key=lambda m: m["member"])[0]
        raise RunStopped(f"no member of the population finished: member-{first['member']} "
                         f"{first['status']} (every member's status: {result.table})")
    return result


@contextmanager
def _quiet_ray():
    """Ray Tune's tables and progress off (llmrl prints one line per member report instead)."""
    import logging

    before = os.environ.get("RAY_AIR_NEW_OUTPUT")
    os.environ["RAY_AIR_NEW_OUTPUT"] = "0"
    ray_logger = logging.getLogger("ray")
    level = ray_logger.level
    ray_logger.setLevel(logging.CRITICAL)  # a failed member's traceback: llmrl says its one line instead
    try:
        yield
    finally:
        ray_logger.setLevel(level)
        if before is None:
            os.environ.pop("RAY_AIR_NEW_OUTPUT", None)
        else:
            os.environ["RAY_AIR_NEW_OUTPUT"] = before


def _first_line(error: BaseException) -> str:
    """The member's own one-line error out of Ray's report of it (a traceback ending in llmrl's error)."""
    lines = [line.strip() for line in str(error).splitlines() if line.strip()]
    user = [line for line in lines if line.startswith("llmrl.errors.")]
    line = (user or lines or [type(error).__name__])[-1]
    return re.sub(r"^llmrl\.errors\.\w+: ", "", line)[:600]


# --------------------------------------------------------------------------------------------- the results

def read_member(out: Path, member: int, metric: str) -> dict:
    """A member's lineage and exploits (its schedule.yaml) and its metric over steps (its log)."""
    from llmrl.tracking import read_log

    run_dir = out / "members" / f"member-{member}"
    doc = yaml.safe_load((run_dir / "schedule.yaml").read_text()) if (run_dir / "schedule.yaml").is_file() else {}
    rows = read_log(run_dir) if (run_dir / "log.jsonl").is_file() else []
    curve = [(r["step"], r[metric]) for r in rows if metric in r and "samples" not in r]
    return {"member": member, "segments": (doc or {}).get("segments") or [], "exploits": (doc or {}).get(
        "exploits") or [], "curve": curve, "done": (run_dir / "final").is_dir()}


def write_population(out: Path, population: int, keys: list[str], params: dict, metric: str, direction: str,
                     errors: dict | None = None) -> PBTResult:
    """OUT/population.md and .csv (best first) and OUT/population.png, from the members' files."""
    errors = errors or {}
    members = []
    for k in range(population):
        m = read_member(out, k, metric)
        final = m["curve"][-1][1] if m["curve"] else None
        status = "done" if m["done"] and k not in errors else f"failed: {errors.get(k, 'no final checkpoint')}"
        members.append({"member": k, "metric": final, "values": m["segments"][-1]["values"] if m["segments"] else {},
                        "exploits": len(m["exploits"]), "status": status,
                        "run_dir": str(out / "members" / f"member-{k}"), "_m": m})
    sign = -1 if direction == "maximize" else 1
    members.sort(key=lambda r: (r["status"] != "done", math.inf if r["metric"] is None else sign * r["metric"]))
    header = ["member", metric, *keys, "exploits", "status"]
    with open(out / "population.csv", "w", newline="") as f:
        writer = csv.writer(f)
        writer.writerow(header)
        for r in members:
            writer.writerow([f"member-{r['member']}", r["metric"], *[r["values"].get(k) for k in keys], r["exploits"],
                             r["status"]])
    lines = [f"# Population ({direction} {metric}, best first)", "", "| " + " | ".join(header) + " |",
             "|" + "---|" * len(header)]
    for r in members:
        cells = [f"member-{r['member']}", "" if r["metric"] is None else f"{r['metric']:.4f}",
                 *[f"{r['values'][k]:.4g}" if isinstance(r["values"].get(k), float) else str(r["values"].get(k))
                   for k in keys], str(r["exploits"]), r["status"]]
        lines.append("| " + " | ".join(cells) + " |")
    lines += ["", "Each member's hyper-parameters segment by segment: members/member-K/schedule.yaml; its lineage as "
              "one run: llmrl train --config members/member-K/replay.yaml"]
    (out / "population.md").write_text("\n".join(lines) + "\n")
    plot = plot_population(out / "population.png", [r["_m"] for r in sorted(members, key=lambda r: r["member"])],
                           keys, params, metric)
    for r in members:
        r.pop("_m")
    return PBTResult(out, members, out / "population.md", plot)


def plot_population(path: Path, members: list[dict], keys: list[str], params: dict, metric: str) -> Path:
    """One panel per hyper-parameter (its value over steps per member, log scale where the space is; x marks an
    exploit) and one of the metric over steps per member (the member's lineage, as its log holds it)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(len(keys) + 1, 1, figsize=(8, 2.6 * (len(keys) + 1)), sharex=True, squeeze=False)
    colours = plt.rcParams["axes.prop_cycle"].by_key()["color"]
    for m in members:
        colour = colours[m["member"] % len(colours)]
        for ax, key in zip(axes[:, 0], keys):
            xs, ys = [], []
            for s in m["segments"]:
                end = s["to_step"] if s["to_step"] is not None else s["from_step"]
                xs += [s["from_step"], end]
                ys += [s["values"][key]] * 2
            ax.plot(xs, ys, color=colour, label=f"member-{m['member']}", drawstyle="steps-post")
            for e in m["exploits"]:
                ax.plot([e["step"]], [e["values"][key]], "x", color=colour, markersize=9)
        if m["curve"]:
            axes[-1, 0].plot(*zip(*m["curve"]), marker="o", color=colour, label=f"member-{m['member']}")
        for e in m["exploits"]:
            y = dict(m["curve"]).get(e["step"])
            if y is not None:
                axes[-1, 0].plot([e["step"]], [y], "x", color=colour, markersize=9)
    for ax, key in zip(axes[:, 0], keys):
        p = params.get(key)
        if p is not None and p.log:
            ax.set_yscale("log")
        ax.set_title(f"{key} (x: an exploit, then the perturbed value)", fontsize=9)
    axes[-1, 0].set_title(f"{metric} (each member's lineage)", fontsize=9)
    axes[-1, 0].set_xlabel("step")
    axes[0, 0].legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)
    return path
