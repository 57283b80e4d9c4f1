"""Hyper-parameters a run changes part-way (a resume's new values, a ``schedule:``) and population-based training
on Ray Tune (``llmrl pbt``): its lineage bookkeeping, the files it writes, and one small population end to end."""
import json
import re

import pytest
import yaml
from helpers import REPO, training_rows

import llmrl
from llmrl.errors import ConfigError

TINY = REPO / "configs" / "tiny.yaml"
SMALL = ["run.progress=false", "train.rollout_batch_size=8", "train.mini_batch_size=4", "train.micro_batch_size=4",
         "train.epochs=1", "run.eval_every=0", "run.device=cpu", "run.threads=1", "data.eval_size=4"]


def settings(model_dir, run_dir, *extra):
    return [*SMALL, f"model.name_or_path={model_dir}", f"run.output_dir={run_dir}", *extra]


def column(run_dir, key):
    return [(r["step"], r.get(key)) for r in training_rows(run_dir)]


# ----------------------------------------------------------------------------------------------- resume's new values

@pytest.mark.parametrize("algorithm,key,before,after", [
    ("ppo", "ppo.init_kl_coef", 0.02, 0.3),      # tiny.yaml's beta; the adaptive controller's value is replaced
    ("grpo", "critic_free.kl_coef", 0.04, 0.5),  # tiny.yaml's KL loss weight
])
def test_a_resume_applies_a_new_kl_weight_from_the_resumed_step(tiny_model_dir, tmp_path, algorithm, key, before,
                                                                 after):
    run = tmp_path / "run"
    llmrl.RLTrainer(TINY, overrides=settings(tiny_model_dir, run, f"algorithm={algorithm}", "train.total_steps=2",
                                             "generation.temperature=1.0")).train()
    resumed = llmrl.RLTrainer(None, overrides=[f"run.output_dir={run}", "train.total_steps=3", f"{key}={after}",
                                               "generation.temperature=0.7", "ppo.clip_range=0.1"], resume=True)
    resumed.train()
    kl = column(run, "objective/kl_coef")
    # logged as used at each step's rollout: the first two with the run's own value (the adaptive controller moves
    # PPO's a little after step 1), step 3 with exactly the new one
    assert kl[0] == (1, pytest.approx(before)) and kl[-1] == (3, pytest.approx(after))
    saved = yaml.safe_load((run / "final" / "config.yaml").read_text())
    assert (saved["generation"]["temperature"], saved["ppo"]["clip_range"]) == (0.7, 0.1)
    assert resumed.trainer.cfg.generation.temperature == 0.7  # what the rollouts read


@pytest.mark.parametrize("change", ["ppo.kl_target=3.0", "critic_free.num_generations=2", "ppo.adaptive_kl=false"])
def test_a_resume_still_refuses_other_hyper_parameters(tiny_model_dir, tmp_path, change):
    run = tmp_path / "run"
    llmrl.RLTrainer(TINY, overrides=settings(tiny_model_dir, run, "train.total_steps=1")).train()
    with pytest.raises(ConfigError, match=rf"^--resume: {re.escape(change.split('=')[0])} .* differ .* "
                                          r"A resume may change only .*ppo\.init_kl_coef, critic_free\.kl_coef"):
        llmrl.RLTrainer(None, overrides=[f"run.output_dir={run}", change], resume=True)


# ----------------------------------------------------------------------------------------------- schedule:

SCHEDULE = "schedule=[{step: 1, set: {train.lr: 3.0e-4, ppo.init_kl_coef: 0.2}}]"


def test_a_schedule_applies_its_values_after_its_step(tiny_model_dir, tmp_path):
    run = tmp_path / "run"
    llmrl.RLTrainer(TINY, overrides=settings(tiny_model_dir, run, "train.total_steps=3", "ppo.adaptive_kl=false",
                                             SCHEDULE)).train()
    # tiny.yaml: lr 1e-3, beta 0.02 (fixed); after step 1: 3e-4 and 0.2
    assert column(run, "optim/lr") == [(1, pytest.approx(1e-3)), (2, pytest.approx(3e-4)), (3, pytest.approx(3e-4))]
    assert column(run, "objective/kl_coef") == [(1, pytest.approx(0.02)), (2, pytest.approx(0.2)),
                                                (3, pytest.approx(0.2))]
    saved = yaml.safe_load((run / "final" / "config.yaml").read_text())
    assert saved["schedule"] == [{"step": 1, "set": {"train.lr": 3e-4, "ppo.init_kl_coef": 0.2}}]
    assert (saved["train"]["lr"], saved["ppo"]["init_kl_coef"]) == (3e-4, 0.2)  # the values in effect


def test_a_schedule_equals_a_run_stopped_there_and_resumed_with_the_new_values(tiny_model_dir, tmp_path):
    scheduled, resumed = tmp_path / "scheduled", tmp_path / "resumed"
    llmrl.RLTrainer(TINY, overrides=settings(tiny_model_dir, scheduled, "train.total_steps=3", SCHEDULE)).train()
    llmrl.RLTrainer(TINY, overrides=settings(tiny_model_dir, resumed, "train.total_steps=1")).train()
    llmrl.RLTrainer(None, overrides=[f"run.output_dir={resumed}", "train.total_steps=3", "train.lr=3.0e-4",
                                     "ppo.init_kl_coef=0.2"], resume=True).train()
    keys = ("reward/mean", "objective/kl", "objective/kl_coef", "loss/policy", "loss/value", "optim/lr")
    a, b = training_rows(scheduled), training_rows(resumed)
    assert [r["step"] for r in a] == [r["step"] for r in b] == [1, 2, 3]
    for x, y in zip(a, b):
        for key in keys:
            assert x[key] == pytest.approx(y[key], rel=1e-6, abs=1e-9), (x["step"], key)


def test_a_resumed_scheduled_run_goes_on_with_the_schedule(tiny_model_dir, tmp_path):
    """Stopped at step 2 (after the entry of step 1), resumed: the values in effect come from the checkpoint, and an
    entry after the checkpoint's step still applies."""
    run = tmp_path / "run"
    two = "schedule=[{step: 1, set: {train.lr: 3.0e-4}}, {step: 3, set: {train.lr: 1.0e-4}}]"
    llmrl.RLTrainer(TINY, overrides=settings(tiny_model_dir, run, "train.total_steps=4", two,
                                             "run.save_every=2")).train()
    first = column(run, "optim/lr")
    (run / "final").rename(tmp_path / "final-kept")
    for path in ("step-000004",):
        (run / path).rename(tmp_path / path)
    llmrl.RLTrainer(None, overrides=[f"run.output_dir={run}"], resume=True).train()
    assert column(run, "optim/lr") == first == [(1, pytest.approx(1e-3)), (2, pytest.approx(3e-4)),
                                                (3, pytest.approx(3e-4)), (4, pytest.approx(1e-4))]


@pytest.mark.parametrize("schedule,fragment", [
    ("[{step: 1, set: {lora.r: 4}}]", "schedule[0].set names 'lora.r': a schedule may change only train.lr"),
    ("[{step: 1, set: {train.lr: -1}}]", "schedule[0]: train.lr is -1.0: must be > 0"),
    ("[{step: 2, set: {train.lr: 0.1}}, {step: 1, set: {train.lr: 0.2}}]", "schedule[1].step is 1: comes after"),
    ("[{step: 9, set: {train.lr: 0.1}}]", "schedule[0].step is 9: is not before train.total_steps = 3"),
    ("[{step: 1, set: {train.lr: 0.1}}]|algorithm=sft|sft.data=rows.jsonl", "algorithm is sft: supervised fine-tuning (llmrl sft) does "
                                                         "not apply a schedule"),
])
def test_a_bad_schedule_is_one_line(schedule, fragment):
    schedule, *more = schedule.split("|")  # and other overrides
    with pytest.raises(ConfigError) as e:
        llmrl.load_config(TINY, ["train.total_steps=3", f"schedule={schedule}", *more])
    assert fragment in str(e.value) and "\n" not in str(e.value)


# ----------------------------------------------------------------------------------------------- PBT: bookkeeping

def recipe(model_dir="tiny-model"):
    return llmrl.load_config(TINY, [f"model.name_or_path={model_dir}", "train.total_steps=6"])


def test_recorded_exploits_give_each_member_its_lineage_schedule_and_replay(tmp_path):
    """Member 0 starts with lr 1e-3, member 1 with 1e-4; at step 2 member 1 exploits member 0 (perturbed to 1.2e-3),
    at step 4 member 0 exploits member 1 (perturbed to 9.6e-4)."""
    from llmrl.config import to_dict
    from llmrl.tune.pbt import closed, exploited, schedule_of, segment, write_member_files

    zero, one = [segment(0, 0, {"train.lr": 1e-3})], [segment(0, 1, {"train.lr": 1e-4})]
    one = exploited(closed(zero, 2), 2, 1, 0, {"train.lr": 1.2e-3})  # member 0's checkpoint of step 2
    zero = exploited(closed(one, 4), 4, 0, 1, {"train.lr": 9.6e-4})  # member 1's checkpoint of step 4
    assert closed(zero, 6) == [
        {"from_step": 0, "to_step": 2, "member": 0, "values": {"train.lr": 1e-3}},
        {"from_step": 2, "to_step": 4, "member": 1, "values": {"train.lr": 1.2e-3},
         "continued_from": {"member": 0, "step": 2}},
        {"from_step": 4, "to_step": 6, "member": 0, "values": {"train.lr": 9.6e-4},
         "continued_from": {"member": 1, "step": 4}},
    ]
    assert schedule_of(zero) == [{"step": 0, "set": {"train.lr": 1e-3}}, {"step": 2, "set": {"train.lr": 1.2e-3}},
                                 {"step": 4, "set": {"train.lr": 9.6e-4}}]
    run_dir = tmp_path / "members" / "member-0"
    run_dir.mkdir(parents=True)
    events = [{"step": 4, "donor": 1, "donor_values": {"train.lr": 1.2e-3}, "values": {"train.lr": 9.6e-4}}]
    write_member_files(run_dir, 0, closed(zero, 6), events, to_dict(recipe()), tmp_path / "replays" / "member-0")
    written = yaml.safe_load((run_dir / "schedule.yaml").read_text())
    assert written["segments"] == closed(zero, 6) and written["exploits"] == events
    replay = llmrl.load_config(run_dir / "replay.yaml")  # runs as it is: a whole valid config
    assert [(e.step, e.set) for e in replay.schedule] == [(0, {"train.lr": 1e-3}), (2, {"train.lr": 1.2e-3}),
                                                          (4, {"train.lr": 9.6e-4})]
    assert replay.train.lr == 1e-3 and replay.run.output_dir == str(tmp_path / "replays" / "member-0")
    assert replay.model.name_or_path == "tiny-model" and replay.train.total_steps == 6


def test_a_perturbed_value_stays_in_its_range_and_the_space_becomes_rays():
    from ray.tune.search.sample import Categorical, Float, Integer

    from llmrl.tune.pbt import clip_to_space, mutation, ray_domain
    from llmrl.tune.space import load_space

    params = load_space({"train.lr": {"type": "float", "low": 1e-5, "high": 1e-2, "log": True},
                         "ppo.clip_range": {"type": "float", "low": 0.1, "high": 0.3},
                         "generation.temperature": {"type": "categorical", "choices": [0.7, 1.0]}})
    assert clip_to_space({"train.lr": 1e-2 * 1.2, "ppo.clip_range": 0.1 * 0.8, "generation.temperature": 0.7},
                         params) == {"train.lr": 1e-2, "ppo.clip_range": 0.1, "generation.temperature": 0.7}
    assert clip_to_space({"train.lr": 0.0024000000000000002}, params[:1]) == {"train.lr": 0.0024}
    lr, clip, temperature = (ray_domain(p) for p in params)
    assert isinstance(lr, Float) and (lr.lower, lr.upper) == (1e-5, 1e-2) and type(lr.sampler).__name__ == "_LogUniform"
    assert isinstance(clip, Float) and type(clip.sampler).__name__ == "_Uniform"
    assert isinstance(temperature, Categorical) and mutation(params[2]) == [0.7, 1.0]
    integer = ray_domain(load_space({"train.lr": {"type": "int", "low": 2, "high": 8}})[0])
    assert isinstance(integer, Integer) and (integer.lower, integer.upper) == (2, 9)  # Ray's upper bound is excluded


@pytest.mark.parametrize("space,kwargs,fragment", [
    ({"lora.r": {"type": "int", "low": 4, "high": 16}}, {}, "space: lora.r is not a key a run may change part-way"),
    ({"ppo.kl_target": {"type": "float", "low": 1, "high": 9}}, {}, "space: ppo.kl_target is not a key"),
    ({"train.lrr": {"type": "float", "low": 1e-5, "high": 1e-3}}, {}, "did you mean 'train.lr'"),
    ({"train.lr": {"type": "float", "low": 1e-3, "high": 1e-5}}, {}, "an inverted range"),
    ({"train.lr": {"type": "float", "low": 1e-5, "high": 1e-3}}, {"population": 1}, "at least 2 members"),
    ({"train.lr": {"type": "float", "low": 1e-5, "high": 1e-3}}, {"interval": 6}, "below the 6 training steps"),
    ({"train.lr": {"type": "float", "low": 1e-5, "high": 1e-3}}, {"quantile": 0.7}, "quantile is 0.7"),
    ({"train.lr": {"type": "float", "low": 1e-5, "high": 1e-3}}, {"initial": [{"train.lr": 1.0}]},
     "initial[0]: train.lr = 1.0 is not in the space"),
    ({"train.lr": {"type": "float", "low": 1e-5, "high": 1e-3}}, {"metric": "eval/rewrd"},
     "did you mean 'eval/reward'?"),
])
def test_a_bad_population_is_one_line_before_anything_starts(tmp_path, space, kwargs, fragment):
    out = tmp_path / "out"
    args = {"population": 2, "interval": 2, "out_dir": out, **kwargs}
    with pytest.raises(ConfigError) as e:
        llmrl.pbt(TINY, space, overrides=["train.total_steps=6"], **args)
    assert fragment in str(e.value) and "\n" not in str(e.value)
    assert not out.exists()


def test_an_out_dir_in_use_is_refused_and_left_alone(tmp_path):
    (tmp_path / "out").mkdir()
    (tmp_path / "out" / "mine.txt").write_text("keep")
    with pytest.raises(ConfigError, match="is not empty: PBT writes a new population there"):
        llmrl.pbt(TINY, {"train.lr": {"type": "float", "low": 1e-5, "high": 1e-3}}, interval=2,
                  out_dir=tmp_path / "out", overrides=["train.total_steps=6"])
    assert [p.name for p in (tmp_path / "out").iterdir()] == ["mine.txt"]


def test_the_population_table_ranks_members_and_the_plot_is_drawn(tmp_path):
    from llmrl.tune.pbt import closed, exploited, segment, write_member_files, write_population
    from llmrl.tune.space import load_space

    params = load_space({"train.lr": {"type": "float", "low": 1e-5, "high": 1e-2, "log": True}})
    good = closed([segment(0, 1, {"train.lr": 1e-3})], 4)
    bad = closed(exploited(closed([segment(0, 0, {"train.lr": 1e-5})], 2), 2, 0, 1, {"train.lr": 8e-4}), 4)
    for k, lineage, exploits, rewards in ((0, bad, [{"step": 2, "donor": 1, "values": {"train.lr": 8e-4}}], [0.1, 0.3]),
                                          (1, good, [], [0.2, 0.5])):
        run_dir = tmp_path / "members" / f"member-{k}"
        (run_dir / "final").mkdir(parents=True)
        (run_dir / "log.jsonl").write_text("".join(json.dumps({"step": s, "eval/reward": r}) + "\n"
                                                   for s, r in zip((2, 4), rewards)))
        write_member_files(run_dir, k, lineage, exploits, {"train": {}, "run": {}}, tmp_path / "replays")
    result = write_population(tmp_path, 2, ["train.lr"], {p.key: p for p in params}, "eval/reward", "maximize")
    assert [(m["member"], m["metric"], m["values"], m["exploits"]) for m in result.members] == \
        [(1, 0.5, {"train.lr": 1e-3}, 0), (0, 0.3, {"train.lr": 8e-4}, 1)]
    table = (tmp_path / "population.md").read_text()
    assert "| member-1 | 0.5000 | 0.001 | 0 | done |" in table and "| member-0 | 0.3000 | 0.0008 | 1 | done |" in table
    assert (tmp_path / "population.csv").read_text().splitlines()[0] == "member,eval/reward,train.lr,exploits,status"
    assert (tmp_path / "population.png").stat().st_size > 10_000
    # a member that failed is listed last with its one line
    failed = write_population(tmp_path, 2, ["train.lr"], {p.key: p for p in params}, "eval/reward", "maximize",
                              {1: "metric 'x' was not logged at step 2"})
    assert [(m["member"], m["status"]) for m in failed.members] == \
        [(0, "done"), (1, "failed: metric 'x' was not logged at step 2")]
    assert failed.best["member"] == 0


# ----------------------------------------------------------------------------------------------- PBT: end to end

@pytest.mark.slow
def test_a_small_population_exploits_its_better_member_and_writes_what_it_followed(tiny_model_dir, tmp_path, capsys):
    """Member 0 starts with a learning rate that learns nothing (1e-9). Synchronous PBT (each member waits for the
    other at each interval) with two members and quantile 0.5: at step 2 the worse continues from the better one's
    checkpoint with its learning rate times 1.2 or 0.8; step 4 ends the run (no exploit at the end)."""
    from llmrl.tracking import read_log

    out = tmp_path / "pbt"
    result = llmrl.pbt(TINY, {"train.lr": {"type": "float", "low": 1e-9, "high": 1e-2, "log": True}},
                       population=2, interval=2, total_steps=4, out_dir=out, quantile=0.5, resample_probability=0.0,
                       workers=2, synch=True, initial=[{"train.lr": 1e-9}, {"train.lr": 3e-3}],
                       overrides=settings(tiny_model_dir, tmp_path / "unused"))
    printed = capsys.readouterr().out
    assert re.search(r"member-0 step 2: eval/reward \S+ \(train\.lr=1e-09; exploits 0\)", printed), printed
    assert "Trial" not in printed and "\u256d" not in printed  # Ray's own tables stay off
    assert {m["status"] for m in result.members} == {"done"}
    exploiters = [m["member"] for m in result.members if m["exploits"]]
    assert len(exploiters) == 1, result.members
    k = exploiters[0]
    donor = 1 - k
    run_dir = out / "members" / f"member-{k}"
    doc = yaml.safe_load((run_dir / "schedule.yaml").read_text())
    (exploit,) = doc["exploits"]
    assert (exploit["step"], exploit["donor"]) == (2, donor)
    donor_lr = 1e-9 if donor == 0 else 3e-3
    assert exploit["donor_values"] == {"train.lr": donor_lr}
    assert exploit["values"]["train.lr"] in (pytest.approx(donor_lr * 1.2), pytest.approx(donor_lr * 0.8))
    # the lineage: the donor's segment up to step 2, then the member's own from the donor's checkpoint
    assert doc["segments"] == [
        {"from_step": 0, "to_step": 2, "member": donor, "values": {"train.lr": donor_lr}},
        {"from_step": 2, "to_step": 4, "member": k, "values": exploit["values"],
         "continued_from": {"member": donor, "step": 2}}]
    # the member's folder is a valid run: its log is the donor's up to step 2 (the same numbers), then its own
    rows = [r for r in read_log(run_dir) if "reward/mean" in r]
    donor_rows = [r for r in read_log(out / "members" / f"member-{donor}") if "reward/mean" in r]
    assert [r["step"] for r in rows] == [1, 2, 3, 4] and (run_dir / "final" / "trainer_state.pt").is_file()
    assert rows[:2] == donor_rows[:2]
    assert [r["optim/lr"] for r in rows] == [pytest.approx(v) for v in (donor_lr, donor_lr, *[
        exploit["values"]["train.lr"]] * 2)]
    # its own run before the exploit is kept, whole
    replaced = out / "replaced" / f"member-{k}" / "until-step-2"
    assert exploit["replaced"] == "replaced/member-%d/until-step-2" % k
    assert (replaced / "step-000002" / "trainer_state.pt").is_file()
    assert [r["step"] for r in read_log(replaced) if "reward/mean" in r] == [1, 2]
    # the table and the plot
    table = (out / "population.md").read_text()
    assert f"| member-{k} |" in table and "| 1 | done |" in table and (out / "population.csv").is_file()
    assert (out / "population.png").stat().st_size > 10_000
    # replay.yaml is a config whose schedule is the lineage
    replay = llmrl.load_config(run_dir / "replay.yaml")
    assert [(e.step, e.set) for e in replay.schedule] == [(s["from_step"], s["values"]) for s in doc["segments"]]
    assert replay.train.total_steps == 4 and replay.run.output_dir == str(out / "replays" / f"member-{k}")
    # ... and trains the member's numbers again: one seed, the random state carried by the checkpoints
    llmrl.RLTrainer(run_dir / "replay.yaml").train()
    again = [r for r in read_log(out / "replays" / f"member-{k}") if "reward/mean" in r]
    for key in ("reward/mean", "loss/policy", "objective/kl", "optim/lr"):
        assert [r[key] for r in again] == pytest.approx([r[key] for r in rows], rel=1e-6, abs=1e-9), key


def test_the_command_line_calls_the_same_function_and_says_a_bad_space_in_one_line(tmp_path, capsys, monkeypatch):
    from llmrl.cli.pbt import main
    from llmrl.tune import pbt as module

    (tmp_path / "bad.yaml").write_text("lora.r: {type: int, low: 4, high: 8}\n")
    assert main(["--config", str(TINY), "--space", str(tmp_path / "bad.yaml"), "--interval", "5"]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("error: space: lora.r is not a key a run may change part-way")
    calls = []
    monkeypatch.setattr(module, "pbt", lambda *a, **k: calls.append((a, k)) or module.PBTResult(tmp_path))
    assert main(["--config", "r.yaml", "--space", "s.yaml", "--population", "3", "--interval", "5", "--quantile",
                 "0.5", "--perturbation-factors", "1.5", "0.5", "--synch", "train.total_steps=20"]) == 0
    (args, kwargs), = calls
    assert args == ("r.yaml", "s.yaml") and kwargs["population"] == 3 and kwargs["interval"] == 5
    assert (kwargs["quantile"], kwargs["perturbation_factors"], kwargs["synch"]) == (0.5, (1.5, 0.5), True)
    assert kwargs["overrides"] == ["train.total_steps=20"] and kwargs["metric"] == "eval/reward"


def test_a_failed_members_error_is_pinned_on_that_member():
    """Ray's folder names carry 5 hex digits of the experiment before the member's index: when those are all digits
    (seen: member_trainable_40421_00001_...), the index is still the second group."""
    from llmrl.tune.pbt import member_of_folder

    assert member_of_folder("/o/ray/x/member_trainable_40421_00001_1_train_lr=0.0008_2026-12-07_03-42-39") == 1
    assert member_of_folder("/o/ray/x/member_trainable_a1b2c_00003_3_train_lr=0.01_2026-12-07") == 3
    assert member_of_folder(None) == -1


@pytest.mark.parametrize("direction, score", [("maximize", 0.25), ("minimize", -0.25)])
def test_a_member_reports_a_score_ray_maximises_in_either_direction(tmp_path, monkeypatch, direction, score):
    """Ray's scheduler runs with mode=max on the score: a metric to minimise is reported negated."""
    import ray.tune

    from llmrl.config import to_dict
    from llmrl.tune.pbt import SCORE, _report, segment

    sent = []
    monkeypatch.setattr(ray.tune, "report", lambda result, **kwargs: sent.append(result))
    (tmp_path / "members" / "member-0").mkdir(parents=True)
    setup = {"metric": "eval/reward", "direction": direction, "out": str(tmp_path), "recipe": to_dict(recipe())}
    _report(setup, 0, 2, {"eval/reward": 0.25}, None, [segment(0, 0, {"train.lr": 1e-3})], [], {"train.lr": 1e-3})
    assert sent[0][SCORE] == score and sent[0]["metric"] == 0.25 and sent[0]["step"] == 2
