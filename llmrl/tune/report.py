"""What a search leaves to look at (``llmrl tune``'s end, or ``llmrl tune --report`` again later), from the Optuna
study alone:

- ``best.yaml``: the best trial's config, a recipe that runs as it is (``llmrl train --config OUT/best.yaml``);
- ``trials.csv`` and ``trials.md``: one row per trial (state, value, each searched key, steps, seconds, run folder,
  error), the best one marked;
- PNG plots drawn by Optuna's matplotlib visualisations: ``history.png`` (the metric of each trial and the best so
  far), ``importances.png`` (which keys mattered), ``parallel_coordinate.png`` and ``slice.png`` (the metric against
  each key), ``intermediate_values.png`` (the metric at each evaluation: pruned trials stop early there).

What the study holds (``llmrl.tune.search`` records it): user attributes ``recipe``, ``base_config`` (the resolved
config as a dict, paths relative to the working directory of the search), ``space``, ``metric``, ``direction``
(and, when recorded, ``cwd``: that working directory); each trial's params keyed by the dotted config key, its
``run_dir``, ``overrides`` and, when it failed, ``error``; the metric reported at each evaluation.
"""
from __future__ import annotations

import copy
import csv
import json
import math
import os
import warnings
from pathlib import Path
from typing import Any

from llmrl.errors import ConfigError

BEST = "best.yaml"
TUNE_MARK = ".llmrl-tune"  # llmrl tune writes it into its OUT: a folder holding other things is not a study's
PLOTS = ("history.png", "importances.png", "parallel_coordinate.png", "slice.png", "intermediate_values.png")


def write_report(study, out_dir: str | Path) -> dict:
    """Write the search's results into ``out_dir`` (made if missing); returns ``{file name: path}`` for each file
    written, plus ``"skipped"``: ``{file name: why it was not written}`` (no finished trial for best.yaml, too few
    for a plot) and ``"summary"``: a few lines to print (the best value and keys, where the files are)."""
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    metric, direction = _metric(study)
    trials = study.get_trials(deepcopy=False)
    complete = [t for t in trials if t.state.name == "COMPLETE"]
    best = _best(study) if complete else None
    written: dict[str, Any] = {}
    skipped: dict[str, str] = {}

    if best is None:
        skipped[BEST] = f"no trial finished (of {len(trials)}: {_states(trials)}), so there is no best config"
    else:
        try:
            written[BEST] = write_best_config(study, best, out)
        except ConfigError as e:
            skipped[BEST] = f"the best trial's config is refused: {e}"
    written["trials.csv"], written["trials.md"] = write_trials_table(study, out, best)
    for name, reason_or_path in _plots(study, out, metric, direction).items():
        if isinstance(reason_or_path, Path):
            written[name] = reason_or_path
        else:
            skipped[name] = reason_or_path
    return {**written, "skipped": skipped, "summary": summary_text(study, best, out, written, skipped)}


def main_report(storage, study_name: str | None = None, out_dir: str | Path | None = None) -> dict:
    """``llmrl tune --report``: open the study in ``storage`` (an Optuna storage URL or object; ``study_name`` may
    be left out when it holds one study), write its report into ``out_dir`` (default: the folder of a
    ``sqlite:///`` file), print the summary and return what ``write_report`` returns."""
    study = open_study(storage, study_name)
    database = _sqlite_file(storage)
    if out_dir is None:
        if database is None:
            raise ConfigError(f"--out is missing: give the folder to write the report into (only a sqlite:/// "
                              f"storage has a folder of its own, and {storage!r} is not one)")
        out_dir = database.parent
    out = Path(out_dir)
    # the report (re)writes best.yaml, trials.* and the PNGs: only into a study's folder (its mark, or the folder of
    # its own database), or a new or empty one; never over files of the user's that happen to share those names
    studys = (out / TUNE_MARK).is_file() or (database is not None and database.parent.resolve() == out.resolve())
    if out.exists() and (not out.is_dir() or (any(out.iterdir()) and not studys)):
        raise ConfigError(f"--out {str(out)!r} is {'a file' if not out.is_dir() else 'a folder of other things'}: the "
                          f"report writes best.yaml, trials.csv, trials.md and PNGs; give the study's folder or a new "
                          f"one")
    report = write_report(study, out)
    print(report["summary"], flush=True)
    return report


def open_study(storage, study_name: str | None = None):
    """The Optuna study ``study_name`` in ``storage`` (a URL, or an Optuna storage object such as a JournalStorage).
    A missing database, a storage that cannot be opened, an unknown name, or no name where there are several is one
    line, and nothing is created."""
    import optuna

    database = _sqlite_file(storage)
    if database is not None and not database.is_file():
        raise ConfigError(f"--storage {storage!r}: {str(database)!r} does not exist: give the database a search "
                          f"wrote (e.g. sqlite:///runs/tune/study.db)")
    try:
        names = optuna.get_all_study_names(storage)
    except Exception as e:  # noqa: BLE001 (SQLAlchemy's, a driver's or Optuna's own: the storage cannot be read)
        raise ConfigError(f"--storage {storage!r} cannot be opened ({type(e).__name__}: "
                          f"{str(e).splitlines()[0] if str(e) else ''}): give an Optuna storage URL, e.g. "
                          f"sqlite:///runs/tune/study.db") from None
    if study_name is None:
        if len(names) != 1:
            raise ConfigError(f"--storage {storage!r} holds {'no study' if not names else f'{len(names)} studies'}"
                              f"{': ' + ', '.join(names) if names else ''}: "
                              f"{'name one with --study-name' if names else 'give the storage a search wrote'}")
        study_name = names[0]
    elif study_name not in names:
        raise ConfigError(f"--study-name {study_name!r} is not in {storage!r}, which holds "
                          f"{', '.join(names) if names else 'no study'}")
    return optuna.load_study(study_name=study_name, storage=storage)


def _sqlite_file(storage: str) -> Path | None:
    """The database file of a ``sqlite:///PATH`` URL (``sqlite:////abs/path`` for an absolute one), else None."""
    prefix = "sqlite:///"
    if not isinstance(storage, str) or not storage.startswith(prefix):
        return None
    path = storage[len(prefix):].split("?", 1)[0]
    return None if path in ("", ":memory:") else Path(path)


# ---- best.yaml -------------------------------------------------------------------------------------------------

def best_config(study, trial) -> dict:
    """The study's base config with ``trial``'s values set as the trial got them (the same overrides), checked by
    the config's own from_dict/validate; paths as in base_config (relative to the search's working directory)."""
    from llmrl.api import _config
    from llmrl.config import to_dict
    from llmrl.tune.space import overrides

    base = study.user_attrs.get("base_config")
    if not isinstance(base, dict):
        raise ConfigError("the study records no base_config (was it made by llmrl tune?)")
    return to_dict(_config(base, overrides(trial.params)))  # as RLTrainer builds a trial's config: a copy


def write_best_config(study, trial, out: Path) -> Path:
    """``out/best.yaml``: the best trial's config with its own run folder (``out/best-run``, or the next free
    ``best-run-N``) and a header saying where it came from. Relative paths are rewritten relative to ``out`` (a
    config file's paths are read from its own folder), so that it reads the same files from any working
    directory; ``run.output_dir`` stays relative to the working directory, as in any recipe."""
    from llmrl.config import Config, from_dict, save_config

    data = best_config(study, trial)
    cwd = Path(study.user_attrs.get("cwd") or os.getcwd())
    data["run"]["output_dir"] = _fresh_folder(out / "best-run")
    data = relative_to_folder(data, cwd, out)
    path = out / BEST
    save_config(from_dict(Config, data), path)
    path.write_text(_best_header(study, trial, path, data) + path.read_text())
    return path


def relative_to_folder(data: dict, cwd: Path, folder: Path) -> dict:
    """``data`` with each relative path (llmrl.config.PATH_KEYS) that is meant from ``cwd`` written relative to
    ``folder``, where ``load_config`` reads a file's paths from: a ``file.py:name``, a data or model file, or
    anything that exists from ``cwd``. Hub names, packages and folders that do not exist yet (a warm start's) are
    left as they are: ``load_config`` keeps those relative to the working directory."""
    from llmrl.config import FILE_SUFFIXES, PATH_KEYS, _path_nodes

    data = copy.deepcopy(data)
    folder = Path(os.path.abspath(folder))
    for dotted in PATH_KEYS["Config"]:
        for node, key in _path_nodes(data, dotted.split(".")):
            value = node[key]
            if not value or value.startswith(("/", "~", "pkg:", "task:", "in-memory:", "http://", "https://")):
                continue
            target, colon, name = value.rpartition(":")
            path, tail = (target, colon + name) if colon and target.endswith(".py") else (value, "")
            if ":" in path:
                continue  # package.module:name, a built-in rule, a hub revision...
            is_file = bool(tail) or path.endswith(FILE_SUFFIXES) or dotted == "deepspeed.config_file"
            if is_file or (cwd / path).exists():
                node[key] = os.path.relpath(os.path.normpath(cwd / path), folder) + tail
    return data


def _fresh_folder(path: Path) -> str:
    """``path``, or ``path-2``, ``path-3``...: the first that does not exist (a run there is never touched)."""
    candidate, n = path, 1
    while candidate.exists():
        n += 1
        candidate = path.with_name(f"{path.name}-{n}")
    return str(candidate)


def _best_header(study, trial, path: Path, data: dict) -> str:
    metric, direction = _metric(study)
    trials = study.get_trials(deepcopy=False)
    lines = [f"The best trial of the search {study.study_name!r} (llmrl tune): trial {trial.number}, {metric} = "
             f"{_number(trial.value)} ({direction}), of {len(trials)} trials ({_states(trials)}).",
             f"The recipe {study.user_attrs.get('recipe', '?')} with the searched keys set to that trial's values:"]
    lines += [f"  {key}: {json.dumps(value)}" for key, value in trial.params.items()]
    if trial.user_attrs.get("run_dir"):
        lines.append(f"That trial's run: {trial.user_attrs['run_dir']}; this file trains afresh into "
                     f"run.output_dir ({data['run']['output_dir']}).")
    lines.append("Relative paths below are read from this file's folder, run.output_dir from the working directory.")
    lines.append(f"Run it: llmrl train --config {path}")
    in_memory = sorted({value for value in _strings(data) if value.startswith("in-memory:")})
    if in_memory:
        lines.append(f"It names Python objects ({', '.join(in_memory)}): run it from Python with llmrl.RLTrainer and "
                     f"the same objects.")
    return "".join(f"# {line}\n" for line in lines)


def _strings(node: Any):
    if isinstance(node, dict):
        for value in node.values():
            yield from _strings(value)
    elif isinstance(node, list):
        for value in node:
            yield from _strings(value)
    elif isinstance(node, str):
        yield node


# ---- the table of trials ---------------------------------------------------------------------------------------

def trial_rows(study, best=None) -> list[dict]:
    """One dict per trial, by number: number, state, value, best, each searched key, steps (run), wall_seconds,
    last_report (the last evaluation reported, ``value @ step``: where a pruned trial stopped), run_dir, error."""
    keys = _param_keys(study)
    cwd = Path(study.user_attrs.get("cwd") or os.getcwd())  # a relative run_dir is the search's working directory's
    rows = []
    for t in sorted(study.get_trials(deepcopy=False), key=lambda t: t.number):
        run_dir = t.user_attrs.get("run_dir")
        summary, steps = _run_facts(cwd / run_dir if run_dir else None)
        last = max(t.intermediate_values) if t.intermediate_values else None
        rows.append({"number": t.number, "state": t.state.name, "value": t.value,
                     "best": "best" if best is not None and t.number == best.number else "",
                     **{key: t.params.get(key) for key in keys},
                     "steps": summary.get("steps", steps), "wall_seconds": summary.get("wall_seconds"),
                     "last_report": None if last is None else f"{_number(t.intermediate_values[last])} @ {last}",
                     "run_dir": run_dir, "error": t.user_attrs.get("error")})
    return rows


def write_trials_table(study, out: Path, best=None) -> tuple[Path, Path]:
    """``out/trials.csv`` (every value as Python writes it) and ``out/trials.md`` (a Markdown table, numbers to 4
    significant digits, the best trial's row in bold)."""
    from llmrl.tracking import markdown_cell

    rows = trial_rows(study, best)
    columns = ["number", "state", "value", "best", *_param_keys(study), "steps", "wall_seconds", "last_report",
               "run_dir", "error"]
    csv_path, md_path = out / "trials.csv", out / "trials.md"
    with csv_path.open("w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=columns)
        writer.writeheader()
        writer.writerows({k: "" if v is None else v for k, v in row.items()} for row in rows)
    metric, direction = _metric(study)
    lines = [f"Trials of the search {study.study_name!r}: {metric} ({direction}), {_states(rows)}.", "",
             "| " + " | ".join(columns) + " |", "|" + "|".join("---" for _ in columns) + "|"]
    for row in rows:
        cells = ["" if row[c] is None else markdown_cell(_number(row[c])) for c in columns]
        if row["best"]:
            cells = [f"**{c}**" if c else c for c in cells]
        lines.append("| " + " | ".join(cells) + " |")
    md_path.write_text("\n".join(lines) + "\n")
    return csv_path, md_path


def _run_facts(run_dir: Path | None) -> tuple[dict, int | None]:
    """(summary.json's dict or {}, the last step log.jsonl names or None) of a trial's run folder; a folder that is
    missing or half-written (a killed trial) gives what can be read."""
    if not run_dir:
        return {}, None
    run_dir = Path(run_dir)
    try:
        summary = json.loads((run_dir / "summary.json").read_text())
        summary = summary if isinstance(summary, dict) else {}
    except (OSError, ValueError):
        summary = {}
    steps = None
    try:
        from llmrl.tracking import read_log

        steps = max((r["step"] for r in read_log(run_dir) if isinstance(r.get("step"), int)), default=None)
    except (OSError, ConfigError):
        pass
    return summary, steps


# ---- plots -----------------------------------------------------------------------------------------------------

def _plots(study, out: Path, metric: str, direction: str) -> dict[str, Path | str]:
    """Each PLOTS file written (its path) or skipped (why), drawn by optuna.visualization.matplotlib."""
    import matplotlib

    matplotlib.use("Agg")
    import optuna.visualization.matplotlib as plots

    complete = [t for t in study.get_trials(deepcopy=False) if t.state.name == "COMPLETE"]
    reported = [t for t in study.get_trials(deepcopy=False) if t.intermediate_values]
    varying = [k for k in _param_keys(study) if len({json.dumps(t.params.get(k)) for t in complete}) > 1]
    better = "higher is better" if direction == "maximize" else "lower is better"
    none = f"no trial finished yet ({_states(study.get_trials(deepcopy=False))})"
    if not complete:
        alike = none
    elif len(complete) < 2:
        alike = f"only {len(complete)} trial finished: nothing to compare yet"
    elif not varying:
        alike = "the finished trials all have the same values: nothing to compare"
    else:
        alike = None
    results: dict[str, Path | str] = {}

    def draw(name: str, why_not: str | None, title: str, plot, steps_axis: str | None = None) -> None:
        results[name] = why_not or _save(plot, title, out / name, steps_axis)

    draw("history.png", none if not complete else None,
         f"{metric} of each trial ({better}), and the best so far", lambda: plots.plot_optimization_history(
             study, target_name=metric), "trial")
    draw("importances.png", alike,
         f"Which keys mattered to {metric} (Optuna's importance, over {len(complete)} finished trials)",
         lambda: plots.plot_param_importances(study, target_name=metric))
    draw("parallel_coordinate.png", alike,
         f"{metric} ({better}) against each searched key, one line per finished trial",
         lambda: plots.plot_parallel_coordinate(study, params=varying, target_name=metric))
    draw("slice.png", alike, f"{metric} ({better}) against each searched key",
         lambda: plots.plot_slice(study, params=varying, target_name=metric))
    draw("intermediate_values.png", "no trial reported an evaluation" if not reported else None,
         f"{metric} at each evaluation of each trial (a pruned trial stops early)",
         lambda: _labelled(plots.plot_intermediate_values(study), metric), "step")
    return results


def _labelled(ax, ylabel: str):
    ax.set_ylabel(ylabel)
    return ax


def _save(plot, title: str, path: Path, steps_axis: str | None = None) -> Path | str:
    """``plot()``'s figure, titled ``title``, as the PNG ``path``; or why it could not be drawn (Optuna's message).
    ``steps_axis``: the x axis counts trials or steps (whole numbers), with this label."""
    import matplotlib.pyplot as plt
    import numpy as np
    from matplotlib.ticker import MaxNLocator
    from optuna.exceptions import ExperimentalWarning

    before = set(plt.get_fignums())

    def close_new() -> None:  # only the figures drawn here (a notebook's own stay open)
        for number in set(plt.get_fignums()) - before:
            plt.close(number)

    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        warnings.simplefilter("ignore", ExperimentalWarning)  # the matplotlib module is experimental in Optuna
        try:
            axes = plot()
        except (ValueError, RuntimeError) as e:  # Optuna's own refusals (e.g. an importance it cannot fit)
            close_new()
            return f"Optuna could not draw it: {str(e).splitlines()[0] if str(e) else type(e).__name__}"
    # Optuna (or matplotlib) warns when the figure would mislead: e.g. importances "will be equal" because too few
    # trials differ. Such a figure is not written; the reason is given instead, and nothing is printed.
    misleading = [w for w in caught if issubclass(w.category, UserWarning)]
    for w in caught:
        if w not in misleading:
            warnings.warn_explicit(w.message, w.category, w.filename, w.lineno)
    if misleading:
        close_new()
        return f"Optuna: {str(misleading[0].message).splitlines()[0]}"
    ax = axes.flat[0] if isinstance(axes, np.ndarray) else axes
    fig = ax.figure
    try:
        if isinstance(axes, np.ndarray) and axes.size > 1:
            fig.set_size_inches(max(4.0 * axes.size, 8.0), 4.5)
            fig.suptitle(title)
        else:
            fig.set_size_inches(9, 5)
            if fig._suptitle is not None:
                fig._suptitle.set_text("")
            for side in ("left", "right"):  # Optuna titles some plots on the left (importances): ours replaces it
                ax.set_title("", loc=side)
            ax.set_title(title)
        if steps_axis:
            ax.xaxis.set_major_locator(MaxNLocator(integer=True))
            ax.set_xlabel(steps_axis)
        fig.savefig(path, dpi=100, bbox_inches="tight")
    finally:
        close_new()
    return path


# ---- the printed summary ---------------------------------------------------------------------------------------

def summary_text(study, best, out: Path, written: dict, skipped: dict) -> str:
    metric, direction = _metric(study)
    trials = study.get_trials(deepcopy=False)
    if best is None:
        lines = [f"search {study.study_name!r}: no trial finished ({_states(trials)}): no best config"]
    else:
        keys = ", ".join(f"{k}={_number(v)}" for k, v in best.params.items())
        lines = [f"search {study.study_name!r}: best {metric} = {_number(best.value)} ({direction}) at trial "
                 f"{best.number} of {len(trials)} ({_states(trials)}): {keys}"]
        if BEST in written:
            lines.append(f"best config: {written[BEST]} (llmrl train --config {written[BEST]})")
    lines.append(f"table: {out / 'trials.md'} (and .csv); plots: "
                 f"{', '.join(str(written[n].name) for n in PLOTS if n in written) or 'none'} in {out}")
    lines += [f"not written: {name}: {why}" for name, why in skipped.items()]
    return "\n".join(lines)


# ---- small helpers ---------------------------------------------------------------------------------------------

def _metric(study) -> tuple[str, str]:
    direction = study.user_attrs.get("direction") or study.direction.name.lower()
    return str(study.user_attrs.get("metric") or "objective"), str(direction)


def _best(study):
    """The best COMPLETE trial (Optuna's own choice; None without one)."""
    try:
        return study.best_trial
    except ValueError:
        return None


def _param_keys(study) -> list[str]:
    """The searched keys: the space's order, then any a trial has that the space does not name."""
    keys = list((study.user_attrs.get("space") or {}).keys())
    for t in study.get_trials(deepcopy=False):
        keys += [k for k in t.params if k not in keys]
    return keys


def _states(trials) -> str:
    """'3 complete, 1 pruned, 1 failed' of trials (FrozenTrials or table rows)."""
    names = [t["state"] if isinstance(t, dict) else t.state.name for t in trials]
    words = {"COMPLETE": "complete", "PRUNED": "pruned", "FAIL": "failed", "RUNNING": "running", "WAITING": "waiting"}
    counts = [f"{names.count(s)} {w}" for s, w in words.items() if names.count(s)]
    return ", ".join(counts) if counts else "none"


def _number(value: Any) -> str:
    if isinstance(value, float) and math.isfinite(value):  # 0.003 and 1.0 as written, 0.0012345678 as 0.001235
        return repr(value) if len(repr(value)) <= 7 else f"{value:.4g}"
    return str(value)
