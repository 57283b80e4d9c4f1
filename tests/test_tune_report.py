"""What a search leaves to look at (llmrl.tune.report): best.yaml runs as it is and holds the best trial's values,
the table of trials matches the study, the plots are PNGs or skipped with a reason, and a study with no finished
trial says so. Studies are built in memory from hand-made trials over small fake run folders; one slow test runs
a real 2-trial search, then ``llmrl train --config best.yaml``."""
import csv
import json
import subprocess
import sys
from pathlib import Path

import optuna
import pytest
import yaml
from helpers import REPO, subprocess_env

from llmrl.config import load_config, to_dict
from llmrl.errors import ConfigError
from llmrl.tune.report import PLOTS, main_report, write_best_config, write_report

COMPLETE, PRUNED, FAIL = optuna.trial.TrialState.COMPLETE, optuna.trial.TrialState.PRUNED, optuna.trial.TrialState.FAIL
LR = optuna.distributions.FloatDistribution(1e-5, 1e-2, log=True)
TEMPERATURE = optuna.distributions.CategoricalDistribution([0.7, 1.0, 1.3])
SPACE = {"train.lr": {"type": "float", "low": 1e-5, "high": 1e-2, "log": True},
         "generation.temperature": {"type": "categorical", "choices": [0.7, 1.0, 1.3]}}
PNG = b"\x89PNG\r\n\x1a\n"


def base_config() -> dict:
    return to_dict(load_config(REPO / "configs" / "tiny.yaml", ["train.total_steps=4", "run.output_dir=runs/tune"]))


def fake_run(folder: Path, steps: int, seconds: float | None, evals: dict) -> str:
    """A trial's run folder as llmrl writes it: log.jsonl (a training row per step, evaluations), and summary.json
    when the run finished (``seconds`` not None)."""
    folder.mkdir(parents=True)
    rows = [{"step": s, "reward/mean": 0.1 * s} for s in range(1, steps + 1)]
    rows += [{"step": s, "eval/reward": v} for s, v in evals.items()]
    (folder / "log.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    if seconds is not None:
        (folder / "summary.json").write_text(json.dumps({"steps": steps, "wall_seconds": seconds}))
    return str(folder)


def trial(tmp_path, number, state, lr, temperature=None, value=None, evals=None, seconds=12.5, error=None,
          relative=False):
    """A finished Optuna trial of train.lr (and generation.temperature), its run folder in tmp_path/runs (named
    relative to tmp_path when ``relative``)."""
    evals = evals or {}
    params, dists = {"train.lr": lr}, {"train.lr": LR}
    if temperature is not None:
        params["generation.temperature"], dists["generation.temperature"] = temperature, TEMPERATURE
    steps = max(evals, default=1)
    attrs = {"run_dir": fake_run(tmp_path / "runs" / f"trial-{number}", steps, seconds if state != FAIL else None,
                                 evals),
             "overrides": [f"{k}={json.dumps(v)}" for k, v in params.items()]}
    if relative:
        attrs["run_dir"] = f"runs/trial-{number}"
    if error:
        attrs["error"] = error
    return optuna.trial.create_trial(params=params, distributions=dists, value=value, user_attrs=attrs,
                                     intermediate_values=evals, state=state)


def study_of(trials, direction="maximize", base=None):
    study = optuna.create_study(storage=None, direction=direction, study_name="tiny-search")
    for key, value in {"recipe": "configs/tiny.yaml", "base_config": base or base_config(), "space": SPACE,
                       "metric": "eval/reward", "direction": direction}.items():
        study.set_user_attr(key, value)
    for t in trials:
        study.add_trial(t)
    return study


def four_trials(tmp_path):
    """0 and 2 complete (2 is best), 1 pruned after one evaluation, 3 failed."""
    return [trial(tmp_path, 0, COMPLETE, 2e-3, 0.7, value=0.25, evals={0: 0.1, 2: 0.2, 4: 0.25}),
            trial(tmp_path, 1, PRUNED, 3e-5, 1.3, evals={0: 0.1, 2: 0.05}, seconds=5.0),
            trial(tmp_path, 2, COMPLETE, 3e-3, 1.0, value=0.5, evals={0: 0.1, 2: 0.3, 4: 0.5}),
            trial(tmp_path, 3, FAIL, 8e-3, 1.0, error="RuntimeError: CUDA out of memory")]


def test_best_yaml_holds_the_best_trials_values_and_loads(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)  # the search's working directory: no runs/tiny-warm-start there (a test may build one)
    base = base_config()
    report = write_report(study_of(four_trials(tmp_path), base=base), tmp_path / "out")
    path = report["best.yaml"]
    header = [line for line in path.read_text().splitlines() if line.startswith("#")]
    assert "trial 2, eval/reward = 0.5 (maximize), of 4 trials (2 complete, 1 pruned, 1 failed)" in header[0]
    assert "#   train.lr: 0.003" in header and "#   generation.temperature: 1.0" in header
    loaded = to_dict(load_config(path))
    assert loaded["train"]["lr"] == 3e-3 and loaded["generation"]["temperature"] == 1.0
    assert loaded["run"]["output_dir"] == str(tmp_path / "out" / "best-run")
    expected = json.loads(json.dumps(base))
    expected["train"]["lr"], expected["generation"]["temperature"] = 3e-3, 1.0
    expected["run"]["output_dir"] = str(tmp_path / "out" / "best-run")
    assert loaded == expected  # every other key as the search's recipe had it
    assert "best" in report["summary"] and "eval/reward = 0.5" in report["summary"]
    assert "train.lr=0.003" in report["summary"]


def test_minimize_picks_the_lowest_and_a_second_report_never_reuses_a_run_folder(tmp_path):
    study = study_of(four_trials(tmp_path), direction="minimize")
    first = write_report(study, tmp_path / "out")
    assert load_config(first["best.yaml"]).train.lr == 2e-3  # trial 0: 0.25 < 0.5
    (tmp_path / "out" / "best-run").mkdir()  # best.yaml was run
    again = write_report(study, tmp_path / "out")
    assert load_config(again["best.yaml"]).run.output_dir == str(tmp_path / "out" / "best-run-2")


def test_a_search_from_python_objects_says_best_yaml_needs_them(tmp_path):
    base = base_config()
    base["reward"]["function"] = "in-memory:score"
    study = study_of(four_trials(tmp_path), base=base)
    header = write_best_config(study, study.best_trial, tmp_path).read_text().splitlines()[:8]
    assert "# It names Python objects (in-memory:score): run it from Python with llmrl.RLTrainer and the same " \
           "objects." in header


def test_relative_paths_read_the_same_files_from_the_reports_folder(tmp_path, monkeypatch):
    """base_config's relative paths are the search's working directory's; load_config reads a file's paths from
    its own folder, so best.yaml must name them relative to its folder to mean the same files."""
    monkeypatch.chdir(tmp_path)
    (tmp_path / "data").mkdir()
    (tmp_path / "data" / "prompts.jsonl").write_text('{"prompt": "abc>", "answer": "cba"}\n')
    (tmp_path / "models" / "tiny").mkdir(parents=True)
    (tmp_path / "rewards.py").write_text("def score(prompts, completions, **kw):\n    return [0.0] * len(prompts)\n")
    base = base_config()
    base["data"]["source"], base["model"]["name_or_path"] = "data/prompts.jsonl", "models/tiny"
    base["reward"]["function"], base["data"]["eval_source"] = "rewards.py:score", "data/held_out.jsonl"  # not yet made
    base["model"]["tokenizer"] = "gpt2"  # a hub name: stays as it is
    study = study_of([trial(tmp_path, 0, COMPLETE, 1e-3, value=0.5, evals={2: 0.5}, relative=True)], base=base)
    path = write_report(study, "search/report")["best.yaml"]
    written = yaml.safe_load(path.read_text())
    assert written["data"]["source"] == "../../data/prompts.jsonl" and written["model"]["tokenizer"] == "gpt2"
    assert written["run"]["output_dir"] == "search/report/best-run"  # from the working directory, as any run's
    loaded = to_dict(load_config(path))
    assert (loaded["data"]["source"], loaded["model"]["name_or_path"], loaded["reward"]["function"],
            loaded["data"]["eval_source"], loaded["model"]["tokenizer"]) == (
        "data/prompts.jsonl", "models/tiny", "rewards.py:score", "data/held_out.jsonl", "gpt2")
    monkeypatch.chdir(tmp_path / "models")  # from elsewhere, by its full path: the same files
    elsewhere = to_dict(load_config(tmp_path / path))
    assert elsewhere["data"]["source"] == str(tmp_path / "data" / "prompts.jsonl")
    assert elsewhere["model"]["name_or_path"] == str(tmp_path / "models" / "tiny")
    # written again from elsewhere: the study's recorded working directory is the one its paths are relative to
    study.set_user_attr("cwd", str(tmp_path))
    again = write_report(study, tmp_path / "search" / "report")
    assert to_dict(load_config(again["best.yaml"]))["data"]["source"] == str(tmp_path / "data" / "prompts.jsonl")
    assert list(csv.DictReader(again["trials.csv"].open()))[0]["steps"] == "2"  # its run_dir, from there too


def test_the_table_lists_every_trial_with_its_state_values_steps_and_error(tmp_path):
    report = write_report(study_of(four_trials(tmp_path)), tmp_path / "out")
    rows = list(csv.DictReader(report["trials.csv"].open()))
    assert [(r["number"], r["state"], r["value"], r["best"]) for r in rows] == [
        ("0", "COMPLETE", "0.25", ""), ("1", "PRUNED", "", ""), ("2", "COMPLETE", "0.5", "best"), ("3", "FAIL", "", "")]
    assert [r["train.lr"] for r in rows] == ["0.002", "3e-05", "0.003", "0.008"]
    assert [r["generation.temperature"] for r in rows] == ["0.7", "1.3", "1.0", "1.0"]
    assert [r["steps"] for r in rows] == ["4", "2", "4", "1"]  # the failed one's from its log.jsonl
    assert [r["wall_seconds"] for r in rows] == ["12.5", "5.0", "12.5", ""]
    assert rows[1]["last_report"] == "0.05 @ 2"
    assert rows[3]["error"] == "RuntimeError: CUDA out of memory" and rows[0]["error"] == ""
    assert rows[2]["run_dir"] == str(tmp_path / "runs" / "trial-2")
    md = report["trials.md"].read_text().splitlines()
    assert md[2].startswith("| number | state | value | best | train.lr | generation.temperature | steps |")
    assert md[4].startswith("| 0 | COMPLETE | 0.25 |") and md[6].startswith("| **2** | **COMPLETE** | **0.5** |")
    assert "| FAIL |" in md[7] and "CUDA out of memory" in md[7] and len(md) == 8


def test_each_plot_is_a_png_and_prints_no_warning(tmp_path):
    import warnings

    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        report = write_report(study_of(four_trials(tmp_path)), tmp_path / "out")
    assert report["skipped"] == {}
    for name in PLOTS:
        assert report[name] == tmp_path / "out" / name and report[name].read_bytes()[:8] == PNG, name
    assert [str(w.message) for w in caught] == []


def test_importances_need_two_finished_trials_and_say_so(tmp_path):
    import warnings

    trials = [trial(tmp_path, 0, COMPLETE, 1e-3, value=0.25, evals={2: 0.25}),
              trial(tmp_path, 1, PRUNED, 3e-5, evals={2: 0.05})]
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        report = write_report(study_of(trials), tmp_path / "out")
    assert "importances.png" not in report and not (tmp_path / "out" / "importances.png").exists()
    assert report["skipped"] == {name: "only 1 trial finished: nothing to compare yet" for name in
                                 ("importances.png", "parallel_coordinate.png", "slice.png")}
    assert "not written: importances.png: only 1 trial finished" in report["summary"]
    for name in ("history.png", "intermediate_values.png"):
        assert report[name].read_bytes()[:8] == PNG, name
    assert [str(w.message) for w in caught] == []


def test_a_figure_optuna_warns_about_is_skipped_with_its_reason_and_prints_nothing(tmp_path):
    """Two finished trials with the same value: Optuna's importance cannot tell the keys apart (it warns that they
    "will be equal"), so importances.png is not written, and its warning is the reason, not printed."""
    import warnings

    trials = [trial(tmp_path, 0, COMPLETE, 1e-3, 0.7, value=0.25, evals={2: 0.25}),
              trial(tmp_path, 1, COMPLETE, 3e-5, 1.3, value=0.25, evals={2: 0.25})]
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        report = write_report(study_of(trials), tmp_path / "out")
    assert report["skipped"] == {"importances.png": "Optuna: Target and region quantiles select the same set of "
                                                    "trials. Parameter importances will be equal."}
    assert [str(w.message) for w in caught] == []
    assert report["slice.png"].read_bytes()[:8] == PNG


def test_no_finished_trial_writes_no_best_yaml_and_says_so(tmp_path):
    trials = [trial(tmp_path, 0, PRUNED, 1e-3, evals={2: 0.05}), trial(tmp_path, 1, FAIL, 3e-5, error="boom")]
    report = write_report(study_of(trials), tmp_path / "out")
    assert "best.yaml" not in report and not (tmp_path / "out" / "best.yaml").exists()
    assert report["skipped"]["best.yaml"] == \
        "no trial finished (of 2: 1 pruned, 1 failed), so there is no best config"
    assert report["summary"].splitlines()[0] == \
        "search 'tiny-search': no trial finished (1 pruned, 1 failed): no best config"
    assert report["intermediate_values.png"].read_bytes()[:8] == PNG  # the pruned trial's evaluation
    assert set(report["skipped"]) == {"best.yaml", "history.png", "importances.png", "parallel_coordinate.png",
                                      "slice.png"}
    assert len(list(csv.DictReader(report["trials.csv"].open()))) == 2


def test_main_report_opens_a_stored_study_and_refuses_what_it_cannot_open(tmp_path, capsys):
    db = tmp_path / "search" / "study.db"
    db.parent.mkdir()
    storage = f"sqlite:///{db}"
    stored = optuna.create_study(storage=storage, study_name="s1", direction="maximize")
    memory = study_of(four_trials(tmp_path))
    for key, value in memory.user_attrs.items():
        stored.set_user_attr(key, value)
    for t in memory.get_trials():
        stored.add_trial(t)
    report = main_report(storage)  # the one study, into the database's folder
    assert report["best.yaml"] == db.parent / "best.yaml" and "trial 2" in capsys.readouterr().out
    optuna.create_study(storage=storage, study_name="s2")
    (tmp_path / "mine").mkdir()
    (tmp_path / "mine" / "trials.md").write_text("my own table")
    for call, expected in [
        (lambda: main_report(storage), "holds 2 studies: s1, s2: name one with --study-name"),
        (lambda: main_report(storage, "s3"), "--study-name 's3' is not in"),
        (lambda: main_report(f"sqlite:///{tmp_path / 'none.db'}"), "does not exist"),
        (lambda: main_report("nosuchdb://x"), "cannot be opened"),
        (lambda: main_report("nosuchdb://x", "s1"), "cannot be opened"),
        (lambda: main_report(storage, "s1", tmp_path / "mine"), "a folder of other things"),
    ]:
        with pytest.raises(ConfigError) as err:
            call()
        assert expected in str(err.value) and "\n" not in str(err.value), str(err.value)
    assert not (tmp_path / "none.db").exists()  # a wrong path is not made into an empty database
    assert (tmp_path / "mine" / "trials.md").read_text() == "my own table"


@pytest.mark.slow
def test_a_real_search_then_best_yaml_trains(tiny_model_dir, tmp_path, monkeypatch):
    """Two trials of 2 steps each through llmrl.RLTrainer, the report, then ``llmrl train --config best.yaml``
    from the search's working directory, the model named by a path relative to it."""
    import llmrl
    from llmrl.tune.space import load_space, overrides

    monkeypatch.chdir(tmp_path)
    (tmp_path / "model").symlink_to(tiny_model_dir)
    settings = ["model.name_or_path=model", "run.progress=false", "train.rollout_batch_size=8",
                "train.mini_batch_size=4", "train.micro_batch_size=4", "train.epochs=1", "run.eval_every=1",
                "run.save_every=0", "run.device=cpu", "run.threads=1", "train.total_steps=2", "data.eval_size=8",
                "run.log_samples=0", "run.output_dir=search/base"]
    base = to_dict(load_config(REPO / "configs" / "tiny.yaml", settings))
    assert base["model"]["name_or_path"] == "model"
    space = {"train.lr": SPACE["train.lr"]}
    params = load_space(space, base)
    study = optuna.create_study(direction="maximize", sampler=optuna.samplers.RandomSampler(seed=0))
    for key, value in {"recipe": str(REPO / "configs" / "tiny.yaml"), "base_config": base, "space": space,
                       "metric": "eval/reward", "direction": "maximize"}.items():
        study.set_user_attr(key, value)

    class Report(llmrl.Callback):
        def __init__(self, trial):
            self.trial = trial

        def on_evaluate(self, trainer, step, metrics):
            self.trial.report(metrics["eval/reward"], step)

    def objective(t):
        values = {p.key: p.suggest(t) for p in params}
        run_dir = f"search/trial-{t.number}"
        t.set_user_attr("run_dir", run_dir)
        t.set_user_attr("overrides", overrides(values))
        result = llmrl.RLTrainer(base, overrides=[*overrides(values), f"run.output_dir={run_dir}"],
                                 callbacks=[Report(t)]).train()
        return result.summary["eval_reward_after"]

    study.optimize(objective, n_trials=2)
    report = write_report(study, "search")
    assert [r["state"] for r in csv.DictReader(report["trials.csv"].open())] == ["COMPLETE", "COMPLETE"]
    assert report["history.png"].read_bytes()[:8] == report["intermediate_values.png"].read_bytes()[:8] == PNG
    assert [int(r["steps"]) for r in csv.DictReader(report["trials.csv"].open())] == [2, 2]
    out = subprocess.run([sys.executable, "-m", "llmrl", "train", "--config", "search/best.yaml"],
                         capture_output=True, text=True, cwd=tmp_path, env=subprocess_env(), timeout=600)
    assert out.returncode == 0, out.stderr[-3000:]
    summary = json.loads((tmp_path / "search" / "best-run" / "summary.json").read_text())
    assert summary["steps"] == 2
    saved = yaml.safe_load((tmp_path / "search" / "best-run" / "final" / "config.yaml").read_text())
    assert saved["train"]["lr"] == study.best_trial.params["train.lr"]
    assert saved["model"]["name_or_path"] == "model"


def test_our_title_replaces_optunas_left_title(tmp_path, monkeypatch):
    """Optuna titles its importances plot on the left; ours (centred) drew over it until both were cleared."""
    import matplotlib.figure
    import matplotlib.pyplot as plt

    from llmrl.tune.report import _save

    seen = {}

    def record(fig, path, **kwargs):
        ax = fig.axes[0]
        seen.update({side: ax.get_title(loc=side) for side in ("left", "center", "right")})

    def optunas_plot():
        ax = plt.figure().add_subplot()
        ax.set_title("Hyperparameter Importances", loc="left")
        return ax

    monkeypatch.setattr(matplotlib.figure.Figure, "savefig", record)
    _save(optunas_plot, "Which keys mattered", tmp_path / "x.png")
    assert seen == {"left": "", "center": "Which keys mattered", "right": ""}
