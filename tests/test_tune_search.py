"""llmrl tune (llmrl.tune.search): Optuna trials that are ordinary run folders; failures, pruning and a stopped study
that continues; workers sharing one SQLite study, one of them killed mid-trial; each bad input one line before any
trial. Trials are 1-3 steps of the tiny model (about a second each)."""
import importlib.util
import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import optuna
import pytest
from helpers import REPO, subprocess_env

import llmrl
from llmrl.cli.tune import main as tune_main
from llmrl.config import load_config
from llmrl.errors import ConfigError
from llmrl.tune.search import Reporter, check_metric, logged_metrics, tune

TINY = REPO / "configs" / "tiny.yaml"
LR = {"train.lr": {"type": "float", "low": 1.0e-4, "high": 1.0e-1, "log": True}}


def small(model_dir, *extra):
    return ["run.progress=false", "train.rollout_batch_size=8", "train.mini_batch_size=4", "train.micro_batch_size=4",
            "train.epochs=1", "run.device=cpu", "run.threads=1", "train.total_steps=2", "run.eval_every=1",
            "run.save_every=0", "data.eval_size=8", f"model.name_or_path={model_dir}", *extra]


def letters_reward(prompts, completions, **kwargs):
    """Moves with a few large steps of the random tiny model, so that trials and evaluations differ (exact match
    stays 0 there)."""
    return [float(c.count("a") - c.count("b")) for c in completions]


def summary(run_dir) -> dict:
    return json.loads((Path(run_dir) / "summary.json").read_text())


def trained_steps(run_dir) -> list[int]:
    return [r["step"] for r in map(json.loads, (Path(run_dir) / "log.jsonl").read_text().splitlines())
            if "reward/mean" in r]


def test_three_trials_are_run_folders_and_the_best_is_the_best_final_eval_reward(tiny_model_dir, tmp_path, capsys):
    space = {"train.lr": {"type": "float", "low": 1.0e-2, "high": 3.0e-1, "log": True}}
    result = llmrl.tune(TINY, space, trials=3, out_dir=tmp_path / "study", overrides=small(tiny_model_dir),
                        pruner="none", reward_funcs=[letters_reward])
    assert isinstance(result, llmrl.TuneResult)
    study = result.study
    assert [t.state.name for t in study.trials] == ["COMPLETE"] * 3
    finals, evaluations = {}, []
    for t in study.trials:
        run_dir = Path(t.user_attrs["run_dir"])
        assert run_dir == tmp_path / "study" / "trials" / f"trial-{t.number:04d}"
        assert (run_dir / "log.jsonl").is_file() and (run_dir / "final").is_dir()
        assert f"train.lr={json.dumps(t.params['train.lr'])}" in t.user_attrs["overrides"]
        finals[t.number] = summary(run_dir)["eval_reward_after"]
        evaluations.append([r["eval/reward"] for r in map(json.loads, (run_dir / "log.jsonl").read_text().splitlines())
                            if "eval/reward" in r])
        assert t.value == pytest.approx(finals[t.number])  # the objective: eval/reward after the last step
        assert sorted(t.intermediate_values) == [1, 2]  # each evaluation after training reported to the pruner
    assert result.best_value == pytest.approx(max(finals.values()))
    assert len(set(finals.values())) > 1 and any(e[-1] != e[0] for e in evaluations)  # the values above say something
    assert result.best_run_dir == tmp_path / "study" / "trials" / f"trial-{study.best_trial.number:04d}"
    assert result.best_params == study.best_trial.params
    # what a report (and a worker on another machine) reads from the study
    attrs = study.user_attrs
    assert attrs["recipe"] == str(TINY) and attrs["metric"] == "eval/reward" and attrs["direction"] == "maximize"
    assert attrs["space"] == space and attrs["base_config"]["train"]["total_steps"] == 2
    assert attrs["cwd"] == os.getcwd()  # where the report reads the recipe's relative paths from
    assert (tmp_path / "study" / "study.db").is_file()
    lines = [line for line in capsys.readouterr().out.splitlines() if line.startswith("trial ")]
    assert len(lines) == 3 and lines[0].startswith("trial 0: COMPLETE eval/reward ") and '"train.lr"' in lines[0]


def test_a_trial_that_raises_is_fail_with_its_error_and_the_study_goes_on(tiny_model_dir, tmp_path):
    (tmp_path / "rewards.py").write_text("def boom(prompts, completions, **kwargs):\n"
                                         "    raise ValueError('boom for this value')\n")
    space = {"reward.function": {"type": "categorical", "choices": ["exact_match", f"{tmp_path}/rewards.py:boom"]}}
    result = tune(TINY, space, trials=4, out_dir=tmp_path / "study", overrides=small(tiny_model_dir),
                  sampler="random", pruner="none", seed=1)
    trials = result.study.trials
    assert len(trials) == 4
    for t in trials:
        if t.params["reward.function"] == "exact_match":
            assert t.state.name == "COMPLETE"
        else:
            assert t.state.name == "FAIL" and "boom for this value" in t.user_attrs["error"]
            assert "\n" not in t.user_attrs["error"]
    states = [t.state.name for t in trials]
    assert "FAIL" in states and states.index("FAIL") < 3 and "COMPLETE" in states[states.index("FAIL"):]


class AlwaysPrune(optuna.pruners.BasePruner):
    def prune(self, study, trial) -> bool:
        return True


def test_a_pruned_trial_is_stopped_early_and_recorded_pruned(tiny_model_dir, tmp_path, monkeypatch):
    import llmrl.tune.search as search

    monkeypatch.setattr(search, "make_pruner", lambda name, total_steps: AlwaysPrune())
    result = tune(TINY, LR, trials=1, out_dir=tmp_path / "study", overrides=small(tiny_model_dir,
                                                                                  "train.total_steps=3"))
    trial = result.study.trials[0]
    assert trial.state.name == "PRUNED" and list(trial.intermediate_values) == [1]
    run_dir = Path(trial.user_attrs["run_dir"])
    assert trained_steps(run_dir) == [1]  # stopped at the first evaluation, of 3 steps
    assert summary(run_dir)["steps"] == 1 and (run_dir / "final").is_dir()  # ended as a finished run does
    assert result.best_value is None


class FakeTrial:
    def __init__(self, prune_at):
        self.reported, self.prune_at = [], prune_at

    def report(self, value, step):
        self.reported.append((step, value))

    def should_prune(self):
        return self.reported[-1][0] == self.prune_at


class FakeTrainer:
    stopped = False

    def stop(self):
        self.stopped = True


def test_the_reporter_sends_the_metric_and_stops_the_run_when_the_pruner_says_so():
    trial, trainer = FakeTrial(prune_at=2), FakeTrainer()
    evaluations = Reporter(trial, "eval/reward")
    evaluations.on_evaluate(trainer, 0, {"eval/reward": 0.1})  # the untrained model: the same in every trial
    evaluations.on_step_end(trainer, 1, {"reward/mean": 5.0, "eval/reward": 0.2})
    evaluations.on_evaluate(trainer, 1, {"eval/reward": 0.2})
    assert trial.reported == [(1, 0.2)] and not trainer.stopped
    evaluations.on_evaluate(trainer, 2, {"eval/reward": 0.3})
    assert trainer.stopped and evaluations.pruned == 2
    steps = Reporter(FakeTrial(prune_at=None), "reward/mean")
    steps.on_step_end(trainer, 1, {"reward/mean": 5.0})
    steps.on_evaluate(trainer, 1, {"eval/reward": 0.2})
    assert steps.trial.reported == [(1, 5.0)]


def test_the_median_pruner_prunes_a_trial_worse_than_the_earlier_ones_at_the_same_step():
    from llmrl.tune.search import make_pruner

    study = optuna.create_study(direction="maximize", pruner=make_pruner("median", 3))
    for value in (0.8, 0.9):
        trial = study.ask()
        trial.report(value, 1)
        study.tell(trial, value)
    worse, trainer = study.ask(), FakeTrainer()
    reporter = Reporter(worse, "eval/reward")
    reporter.on_evaluate(trainer, 1, {"eval/reward": 0.1})
    assert trainer.stopped and reporter.pruned == 1


def test_a_stopped_study_continues_with_only_the_missing_trials(tiny_model_dir, tmp_path):
    out = tmp_path / "study"
    first = tune(TINY, LR, trials=2, out_dir=out, overrides=small(tiny_model_dir), pruner="none")
    assert len(first.study.trials) == 2
    again = tune(TINY, LR, trials=3, out_dir=out, overrides=small(tiny_model_dir), pruner="none")
    assert [t.number for t in again.study.trials] == [0, 1, 2]
    assert sorted(p.name for p in (out / "trials").iterdir()) == ["trial-0000", "trial-0001", "trial-0002"]
    done = tune(TINY, LR, trials=3, out_dir=out, overrides=small(tiny_model_dir), pruner="none")
    assert len(done.study.trials) == 3  # nothing missing: nothing run
    with pytest.raises(ConfigError, match="was started with other settings.*train.total_steps 2 -> 3"):
        tune(TINY, LR, trials=4, out_dir=out, overrides=small(tiny_model_dir, "train.total_steps=3"))


def test_logged_metrics_are_what_a_real_run_logs(tiny_model_dir, tmp_path):
    """logged_metrics(cfg) against log.jsonl's keys of real 1-step runs (PPO with evaluation, GRPO without): a
    metric the trainers add or drop fails here, so the metric check cannot drift."""
    for algorithm, extra in (("ppo", ["data.eval_size=8"]), ("grpo", ["data.eval_size=0"])):
        run_dir = tmp_path / algorithm
        overrides = small(tiny_model_dir, f"algorithm={algorithm}", "train.total_steps=1",
                          f"run.output_dir={run_dir}", *extra)
        llmrl.RLTrainer(TINY, overrides=overrides).train()
        keys = set().union(*(r.keys() for r in map(json.loads, (run_dir / "log.jsonl").read_text().splitlines())))
        keys -= {"step", "samples"}
        components = {k for k in keys if k.startswith("reward/") and k.count("/") == 2}  # reward/exact_match/mean
        assert components
        cfg = load_config(TINY, overrides)
        assert keys - components == logged_metrics(cfg), algorithm
        for key in keys:
            check_metric(key, cfg)


def one_line(capsys, argv) -> str:
    code = tune_main(argv)
    err = capsys.readouterr().err.strip().splitlines()
    assert code == 2 and len(err) == 1 and err[0].startswith("error: "), (code, err)
    return err[0]


@pytest.mark.parametrize("space, flags, expected", [
    ({"train.lrr": LR["train.lr"]}, [], "did you mean 'train.lr'"),
    ({"train.lr": {"type": "float", "low": 1e-2, "high": 1e-4}}, [], "an inverted range"),
    ({"train.lr": {"type": "float", "low": 1e-2, "high": 1e-2}}, [], "an empty range"),
    ({"generation.temperature": {"type": "categorical", "choices": [1.0]}}, [], "two values or more"),
    (LR, ["--trials", "0"], "trials is 0: give a whole number of at least 1"),
    (LR, ["--workers", "0"], "workers is 0"),
    (LR, ["--sampler", "grid"], "sampler is 'grid': use one of tpe, random, cmaes, qmc, gp"),
    pytest.param(LR, ["--sampler", "cmaes"], "sampler cmaes needs the cmaes package: pip install cmaes",
                 marks=pytest.mark.skipif(importlib.util.find_spec("cmaes") is not None, reason="cmaes installed")),
    (LR, ["--pruner", "asha"], "pruner is 'asha': use one of median, hyperband, none"),
    (LR, ["--direction", "up"], "direction is 'up'"),
    (LR, ["--metric", "eval/rewrd"], "metric 'eval/rewrd' is never logged by this recipe (ppo): did you mean "
                                     "'eval/reward'?"),
    (LR, ["--metric", "eval/reward", "data.eval_size=0"], "data.eval_size is 0"),
    (LR, ["--storage", "sqlite:////no/such/folder/study.db"], "storage 'sqlite:////no/such/folder/study.db' cannot "
                                                              "be opened"),
    (LR, ["--storage", "postgresql://tuner@127.0.0.1:1/study"], "cannot be opened"),
    (LR, ["--storage", "journal:/no/such/folder/journal.log"], "cannot be opened"),
])
def test_bad_input_is_one_line_before_any_trial(tiny_model_dir, tmp_path, capsys, space, flags, expected):
    (tmp_path / "space.yaml").write_text(json.dumps(space))
    out = tmp_path / "study"
    line = one_line(capsys, ["--config", str(TINY), "--space", str(tmp_path / "space.yaml"), "--trials", "2",
                             "--out", str(out), *small(tiny_model_dir), *flags])
    assert expected in line
    assert not (out / "trials").exists()


def test_an_out_dir_that_holds_something_else_is_refused_and_left_alone(tiny_model_dir, tmp_path, capsys):
    (tmp_path / "space.yaml").write_text(json.dumps(LR))
    (tmp_path / "mine").mkdir()
    (tmp_path / "mine" / "notes.txt").write_text("mine")
    line = one_line(capsys, ["--config", str(TINY), "--space", str(tmp_path / "space.yaml"), "--trials", "2",
                             "--out", str(tmp_path / "mine"), *small(tiny_model_dir)])
    assert "holds notes.txt but no study of llmrl tune" in line
    assert sorted(p.name for p in (tmp_path / "mine").iterdir()) == ["notes.txt"]
    with pytest.raises(ConfigError, match="objects in memory cannot cross to worker processes"):
        tune(TINY, LR, trials=2, out_dir=tmp_path / "s", workers=2, overrides=small(tiny_model_dir),
             reward_funcs=[letters_reward])


def test_a_study_llmrl_did_not_make_or_of_the_other_direction_is_refused_and_left_alone(tiny_model_dir, tmp_path,
                                                                                          capsys):
    (tmp_path / "space.yaml").write_text(json.dumps(LR))
    url = f"sqlite:///{tmp_path / 'theirs.db'}"
    theirs = optuna.create_study(storage=url, study_name="theirs", direction="minimize")
    theirs.add_trial(optuna.trial.create_trial(value=1.0))
    for name, expected in (("theirs", "was made to minimize its objective, not to maximize"),):
        line = one_line(capsys, ["--config", str(TINY), "--space", str(tmp_path / "space.yaml"), "--trials", "2",
                                 "--out", str(tmp_path / "s"), "--storage", url, "--study-name", name,
                                 *small(tiny_model_dir)])
        assert expected in line
    line = one_line(capsys, ["--config", str(TINY), "--space", str(tmp_path / "space.yaml"), "--trials", "2",
                             "--out", str(tmp_path / "s"), "--storage", url, "--study-name", "theirs",
                             "--direction", "minimize", *small(tiny_model_dir)])
    assert "already holds trials that llmrl tune did not make" in line
    study = optuna.load_study(study_name="theirs", storage=url)
    assert study.user_attrs == {} and len(study.trials) == 1  # untouched


def test_a_database_password_is_never_shown():
    from llmrl.tune.search import shown

    assert shown("postgresql://tuner:s3cret@db-host:5432/llmrl") == "postgresql://tuner:***@db-host:5432/llmrl"
    assert shown("sqlite:////runs/study.db") == "sqlite:////runs/study.db"
    with pytest.raises(ConfigError) as e:
        tune(TINY, LR, trials=1, storage="postgresql://tuner:s3cret@127.0.0.1:1/llmrl")
    assert "s3cret" not in str(e.value) and "tuner:***@" in str(e.value)


def test_workers_that_all_fail_end_the_command_with_one_line(tmp_path, monkeypatch, capsys):
    import llmrl.tune.search as search

    real = subprocess.Popen
    seen = []

    def failing_worker(command, **kwargs):
        seen.append((command, kwargs["env"][search.STORAGE_VARIABLE]))
        return real([sys.executable, "-c", "raise SystemExit(3)"])

    monkeypatch.setattr(search.subprocess, "Popen", failing_worker)
    with pytest.raises(ConfigError, match=r"all 2 workers failed \(exit codes 3, 3"):
        search._run_workers("postgresql://u:pw@h/db", "s", tmp_path, 2, "tpe", "none", 0, 2, 30, 2)
    assert all("pw" not in " ".join(command) and url == "postgresql://u:pw@h/db" for command, url in seen)
    assert "u:***@h/db" in capsys.readouterr().out


# ---------------------------------------------------------------------------------------------------------------
# processes: the command line, workers sharing a study, a worker killed mid-trial


def tune_command(model_dir, space_file, out, *flags) -> list[str]:
    return [sys.executable, "-m", "llmrl", "tune", "--config", str(TINY), "--space", str(space_file),
            "--out", str(out), *small(model_dir), *map(str, flags)]


@pytest.mark.slow
def test_the_command_line_runs_a_study_and_continues_it(tiny_model_dir, tmp_path):
    (tmp_path / "space.yaml").write_text("train.lr: {type: float, low: 1.0e-4, high: 1.0e-1, log: true}\n"
                                         "generation.temperature: {type: categorical, choices: [0.7, 1.0]}\n")
    out = tmp_path / "study"
    done = subprocess.run(tune_command(tiny_model_dir, tmp_path / "space.yaml", out, "--trials", 2),
                          capture_output=True, text=True, timeout=300, cwd=tmp_path, env=subprocess_env())
    assert done.returncode == 0, done.stderr[-3000:]
    assert [line.split(":")[0] for line in done.stdout.splitlines() if line.startswith("trial ")] == \
        ["trial 0", "trial 1"]
    assert "best: eval/reward " in done.stdout
    study = optuna.load_study(study_name="study", storage=f"sqlite:///{out}/study.db")
    assert [t.state.name for t in study.trials] == ["COMPLETE", "COMPLETE"]
    assert all(set(t.params) == {"train.lr", "generation.temperature"} for t in study.trials)
    again = subprocess.run(tune_command(tiny_model_dir, tmp_path / "space.yaml", out, "--trials", 3),
                           capture_output=True, text=True, timeout=300, cwd=tmp_path, env=subprocess_env())
    assert again.returncode == 0, again.stderr[-3000:]
    assert [line.split(":")[0] for line in again.stdout.splitlines() if line.startswith("trial ")] == ["trial 2"]
    assert "best.yaml" in again.stdout and (out / "best.yaml").is_file()  # the report's summary is printed
    (out / "trials.md").unlink()
    report = subprocess.run([sys.executable, "-m", "llmrl", "tune", "--report", "--storage",
                             f"sqlite:///{out}/study.db"], capture_output=True, text=True, timeout=120, cwd=tmp_path,
                            env=subprocess_env())
    assert report.returncode == 0, report.stderr[-3000:]
    rows = [line for line in (out / "trials.md").read_text().splitlines() if line.startswith("|")]
    assert sum("COMPLETE" in row for row in rows) == 3


def load_study(out: Path):
    return optuna.load_study(study_name="study", storage=f"sqlite:///{out}/study.db")


@pytest.mark.slow
def test_two_worker_processes_share_one_sqlite_study(tiny_model_dir, tmp_path):
    (tmp_path / "space.yaml").write_text(json.dumps(LR))
    out = tmp_path / "study"
    done = subprocess.run(tune_command(tiny_model_dir, tmp_path / "space.yaml", out, "--trials", 4, "--workers", 2),
                          capture_output=True, text=True, timeout=400, cwd=tmp_path, env=subprocess_env())
    assert done.returncode == 0, done.stderr[-3000:]
    assert "2 workers, 1 threads each" in done.stdout
    trials = load_study(out).trials
    assert sorted(t.number for t in trials) == [0, 1, 2, 3] and all(t.state.name == "COMPLETE" for t in trials)
    run_dirs = [t.user_attrs["run_dir"] for t in trials]
    assert len(set(run_dirs)) == 4 and all((Path(d) / "final").is_dir() for d in run_dirs)


@pytest.mark.slow
def test_a_worker_killed_mid_trial_leaves_it_failed_and_its_retry_resumes_the_run(tiny_model_dir, tmp_path):
    (tmp_path / "space.yaml").write_text(json.dumps(LR))
    out = tmp_path / "study"
    # a heartbeat every 3 s (a trial silent for 6 s is stale): 1 s failed once here under load (a live worker's
    # heartbeat thread missed 2 s, it seems, and its trial was taken for a killed one)
    command = tune_command(tiny_model_dir, tmp_path / "space.yaml", out, "--trials", 3, "--workers", 2,
                           "--heartbeat", 3, "--pruner", "none", "train.total_steps=8", "run.save_every=1",
                           "run.eval_every=0")
    proc = subprocess.Popen(command, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, cwd=tmp_path,
                            env=subprocess_env())
    killed = None
    try:
        deadline = time.monotonic() + 300
        while killed is None and time.monotonic() < deadline and proc.poll() is None:
            time.sleep(0.2)
            if not (out / "study.db").is_file():
                continue
            try:
                running = [t for t in load_study(out).get_trials(states=[optuna.trial.TrialState.RUNNING])]
            except Exception:  # noqa: BLE001 - the study is being created
                continue
            for t in running:  # once it saved a checkpoint: its retry has something to resume
                if "pid" in t.user_attrs and list(Path(t.user_attrs["run_dir"]).glob("step-*")):
                    os.kill(t.user_attrs["pid"], signal.SIGKILL)
                    killed = t
                    break
        output, _ = proc.communicate(timeout=400)
    finally:
        if proc.poll() is None:
            proc.kill()
    assert killed is not None, output[-3000:]
    assert proc.returncode == 0, output[-3000:]
    trials = {t.number: t for t in load_study(out).trials}
    assert trials[killed.number].state.name == "FAIL"
    retry = [t for t in trials.values() if t.system_attrs.get("failed_trial") == killed.number]
    assert len(retry) == 1 and retry[0].state.name == "COMPLETE"
    assert retry[0].user_attrs["run_dir"] == killed.user_attrs["run_dir"]  # the same run folder, resumed
    assert retry[0].params == killed.params
    assert "resumed from" in output
    assert summary(killed.user_attrs["run_dir"])["steps"] == 8
    finished = [t for t in trials.values() if t.state.name in ("COMPLETE", "PRUNED", "FAIL")]
    assert len(finished) == 4 and len(trials) == 4  # the killed one, retried, and 3 that count


class CtrlC(llmrl.Callback):
    def on_step_end(self, trainer, step, metrics):
        from llmrl.trainers.base import Interrupted

        raise Interrupted(f"interrupted (Ctrl-C) at step {step}")


def test_ctrl_c_stops_the_study_and_the_same_command_resumes_the_trial(tiny_model_dir, tmp_path):
    from llmrl.trainers.base import Interrupted

    out = tmp_path / "study"
    settings = small(tiny_model_dir, "run.save_every=1", "train.total_steps=3", "run.eval_every=0")
    with pytest.raises(Interrupted, match="at step 1; the study stops here: run the same llmrl tune command again"):
        tune(TINY, LR, trials=2, out_dir=out, overrides=settings, callbacks=[CtrlC()])
    study = optuna.load_study(study_name="study", storage=f"sqlite:///{out}/study.db")
    assert [t.state.name for t in study.trials] == ["FAIL", "WAITING"]  # no second trial started
    result = tune(TINY, LR, trials=2, out_dir=out, overrides=settings)
    trials = result.study.trials
    assert [t.state.name for t in trials] == ["FAIL", "COMPLETE", "COMPLETE"]
    assert trials[1].params == trials[0].params and trials[1].user_attrs["run_dir"] == trials[0].user_attrs["run_dir"]
    assert trained_steps(trials[0].user_attrs["run_dir"]) == [1, 2, 3]  # resumed after step 1, not started again


def test_a_journal_file_holds_the_study_too(tiny_model_dir, tmp_path):
    journal = tmp_path / "journal.log"
    for trials in (1, 2):  # the second call continues the study in the journal
        result = tune(TINY, LR, trials=trials, out_dir=tmp_path / "study", overrides=small(tiny_model_dir),
                      storage=f"journal:{journal}", study_name="lr", pruner="none")
    assert [t.state.name for t in result.study.trials] == ["COMPLETE", "COMPLETE"]
    assert journal.is_file() and not (tmp_path / "study" / "study.db").exists()


@pytest.mark.slow
def test_sigterm_to_the_command_stops_every_worker_at_a_step_and_queues_their_trials(tiny_model_dir, tmp_path):
    (tmp_path / "space.yaml").write_text(json.dumps(LR))
    out = tmp_path / "study"
    command = tune_command(tiny_model_dir, tmp_path / "space.yaml", out, "--trials", 4, "--workers", 2,
                           "--pruner", "none", "train.total_steps=8", "run.save_every=1", "run.eval_every=0")
    proc = subprocess.Popen(command, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, cwd=tmp_path,
                            env=subprocess_env())
    try:
        deadline = time.monotonic() + 300
        while time.monotonic() < deadline and proc.poll() is None:
            time.sleep(0.2)
            try:
                running = load_study(out).get_trials(states=[optuna.trial.TrialState.RUNNING])
            except Exception:  # noqa: BLE001 - the study is being created
                continue
            if any(list(Path(t.user_attrs.get("run_dir", "-")).glob("step-*")) for t in running):
                proc.send_signal(signal.SIGTERM)
                break
        _, err = proc.communicate(timeout=300)
    finally:
        if proc.poll() is None:
            proc.kill()
    assert proc.returncode == 143, err[-3000:]
    assert err.strip().splitlines()[-1].startswith("error: terminated (SIGTERM): the workers stopped at a step "
                                                   "boundary; run the same llmrl tune command again")
    trials = load_study(out).trials
    assert not [t for t in trials if t.state.name == "RUNNING"]  # every worker stopped its trial cleanly
    stopped = [t for t in trials if t.state.name == "FAIL"]
    assert stopped and all(any(r.system_attrs.get("failed_trial") == t.number and r.state.name == "WAITING"
                               for r in trials) for t in stopped)
