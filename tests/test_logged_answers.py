"""llmrl log-answers: a model's own sampled answers, scored, written as the four offline-RL files (rewarded for ILQL,
labelled for KTO, positives for filtered SFT, pairs for DPO) that agree with each other and load in every reader."""
import json
from pathlib import Path

import pytest

from helpers import REPO, tiny_config

# A rule with spread on a random tiny model's answers: a quarter per letter (0 .. 2 for 8 new tokens), and no score
# (None: the rule does not apply) for answers starting with "f".
REWARD = '''
def length_score(prompts, completions, **kwargs):
    texts = [c if isinstance(c, str) else c[0]["content"] for c in completions]
    return [None if t.startswith("f") else len(t) / 4 for t in texts]
'''
MAX_NEW = 8
PENALTY = 0.75


def rule(text: str) -> float | None:
    return None if text.startswith("f") else len(text) / 4


def read(path: Path) -> list[dict]:
    return [json.loads(line) for line in path.read_text().splitlines()]


@pytest.fixture
def reward_file(tmp_path) -> Path:
    path = tmp_path / "length_reward.py"
    path.write_text(REWARD)
    return path


def config(model_dir, tmp_path, reward_file, *overrides):
    return tiny_config(model_dir, tmp_path / "run", f"reward.function={reward_file}:length_score",
                       f"generation.max_new_tokens={MAX_NEW}", f"generation.missing_eos_penalty={PENALTY}",
                       "reward.clip=null", "reward.on_error=skip", *overrides)


def test_the_four_files_agree_with_each_other_and_load_in_every_reader(tiny_model_dir, tmp_path, reward_file):
    from llmrl.data.logged import load_labelled, load_rewarded
    from llmrl.trainers.dpo import load_pairs
    from llmrl.trainers.logs import log_answers
    from llmrl.trainers.sft import load_sft_rows

    cfg = config(tiny_model_dir, tmp_path, reward_file)
    out = tmp_path / "logs"
    threshold = 1.0
    summary = log_answers(cfg, out, per_prompt=4, max_prompts=12, threshold=threshold, batch_size=16)
    rewarded, labelled = read(out / "rewarded.jsonl"), read(out / "labelled.jsonl")
    positives, pairs = read(out / "positives.jsonl"), read(out / "pairs.jsonl")

    # every sampled answer is written, or counted as unusable (empty) or unscored: 12 prompts x 4
    assert summary["prompts"] == 12 and summary["answers"] == 48
    assert len(rewarded) + summary["unusable"] + summary["unscored"] == 48
    assert summary["unscored"] > 0 and 0 < summary["positives"] < len(rewarded)  # the rule's spread reached both sides
    # each reward is the rule's, minus the missing-EOS penalty for an answer cut at max_new_tokens: certainly one of
    # MAX_NEW characters (a character per token; a random model may also sample a special token, which decodes to
    # nothing, so a shorter answer may be cut too: test_rewards_labels_and_pairs_by_hand checks that case)
    for r in rewarded:
        assert r["reward"] in (rule(r["completion"]), rule(r["completion"]) - PENALTY)
        if len(r["completion"]) == MAX_NEW:
            assert r["reward"] == rule(r["completion"]) - PENALTY
    assert any(len(r["completion"]) == MAX_NEW for r in rewarded)  # the penalty was exercised
    # labels, positives and pairs, rebuilt from the rewarded rows with plain loops
    assert [(r["prompt"], r["completion"]) for r in labelled] == [(r["prompt"], r["completion"]) for r in rewarded]
    assert [r["label"] for r in labelled] == [r["reward"] >= threshold for r in rewarded]
    assert positives == [{"prompt": r["prompt"], "completion": r["completion"]} for r in rewarded
                         if r["reward"] >= threshold]
    expected_pairs = []
    for prompt in dict.fromkeys(r["prompt"] for r in rewarded):
        mine = [r for r in rewarded if r["prompt"] == prompt]
        expected_pairs += [{"prompt": prompt, "chosen": c["completion"], "rejected": x["completion"]}
                           for c in mine if c["reward"] >= threshold for x in mine if x["reward"] < threshold]
    assert pairs == expected_pairs and pairs
    reward_of = {(r["prompt"], r["completion"]): r["reward"] for r in rewarded}
    assert all(reward_of[p["prompt"], p["chosen"]] > reward_of[p["prompt"], p["rejected"]] for p in pairs)
    assert summary["positives"] == len(positives) and summary["pairs"] == len(pairs)
    assert summary["negatives"] == len(rewarded) - len(positives)
    assert summary["positive_share"] == pytest.approx(len(positives) / len(rewarded), abs=1e-12)
    assert summary["mean_reward"] == pytest.approx(sum(reward_of_row["reward"] for reward_of_row in rewarded)
                                                   / len(rewarded), abs=1e-12)
    assert json.loads((out / "summary.json").read_text())["pairs"] == len(pairs)

    # the readers of each method take the files as written
    assert load_rewarded(str(out / "rewarded.jsonl")) == [{**r, "reward": float(r["reward"])} for r in rewarded]
    assert load_labelled(str(out / "labelled.jsonl")) == labelled
    assert load_pairs(str(out / "pairs.jsonl")) == pairs
    assert load_sft_rows(str(out / "positives.jsonl"), "sft.data") == positives

    # held-out prompts are never logged; each logged prompt is a training prompt with 4 answers
    from llmrl.data.prompts import load_prompts

    train_rows, eval_rows = load_prompts(cfg.data, cfg.env)
    logged = {r["prompt"] for r in rewarded}
    assert logged <= {r["prompt"] for r in train_rows} and not logged & {r["prompt"] for r in eval_rows}


def test_rewards_labels_and_pairs_by_hand():
    """The penalty for a missing EOS, the clip, the threshold (a reward equal to it is positive), the answers left
    out (empty, with a NUL character, unscored) and every (positive, negative) pair of a prompt, in order, on
    hand-built answers."""
    from llmrl.config import load_config
    from llmrl.trainers.logs import logged_files

    cfg = load_config(REPO / "configs" / "tiny.yaml", ["generation.missing_eos_penalty=0.5", "reward.clip=2.0"])
    rows = [{"prompt": "ab>"}, {"prompt": "cd>"}, {"prompt": "ef>"}]
    answers = [  # (prompt, text, the rule's score or None, ended)
        (0, "ba", 1.0, True),    # 1.0: positive
        (0, "ab", 0.0, True),    # 0.0: negative
        (0, "aa", 0.0, True),    # 0.0: negative
        (0, "bab", 1.0, False),  # 1.0 - 0.5 = 0.5, equal to the threshold: positive
        (0, "", 1.0, True),      # empty: left out
        (0, "b\x00", 1.0, True),  # a NUL character, which the readers refuse: left out
        (1, "dc", 5.0, True),    # clipped to 2.0: positive
        (1, "c", None, True),    # unscored: left out
        (1, "x", 0.9, False),    # 0.9 - 0.5 = 0.4: negative
        (2, "fe", -3.0, True),   # clipped to -2.0: negative, and no positive for this prompt: no pair
    ]
    files, summary = logged_files(rows, "prompt", [{"prompt_index": i, "text": t, "raw": r, "ended": e}
                                                   for i, t, r, e in answers], cfg, threshold=0.5)
    assert [(r["prompt"], r["completion"], r["reward"]) for r in files["rewarded.jsonl"]] == [
        ("ab>", "ba", 1.0), ("ab>", "ab", 0.0), ("ab>", "aa", 0.0), ("ab>", "bab", 0.5), ("cd>", "dc", 2.0),
        ("cd>", "x", 0.9 - 0.5),
        ("ef>", "fe", -2.0)]
    assert [r["label"] for r in files["labelled.jsonl"]] == [True, False, False, True, True, False, False]
    assert files["positives.jsonl"] == [{"prompt": "ab>", "completion": c} for c in ("ba", "bab")] + [
        {"prompt": "cd>", "completion": "dc"}]
    assert [(p["prompt"], p["chosen"], p["rejected"]) for p in files["pairs.jsonl"]] == [
        ("ab>", "ba", "ab"), ("ab>", "ba", "aa"), ("ab>", "bab", "ab"), ("ab>", "bab", "aa"), ("cd>", "dc", "x")]
    assert {k: summary[k] for k in ("prompts", "answers", "written", "unusable", "unscored", "unfinished", "positives",
                                    "negatives", "pairs", "prompts_with_pairs")} == {
        "prompts": 3, "answers": 10, "written": 7, "unusable": 2, "unscored": 1, "unfinished": 2, "positives": 3,
        "negatives": 4, "pairs": 5, "prompts_with_pairs": 2}
    assert summary["mean_raw_reward"] == pytest.approx((1 + 0 + 0 + 1 + 1 + 1 + 5 + 0.9 - 3) / 9, abs=1e-12)
    assert summary["mean_reward"] == pytest.approx((1 + 0 + 0 + 0.5 + 2 + 0.4 - 2) / 7, abs=1e-12)
    assert summary["positive_share"] == pytest.approx(3 / 7, abs=1e-12)


def test_conversations_are_logged_with_assistant_messages_and_held_out_prompts_never(chat_model_dir, tmp_path,
                                                                                     reward_file):
    """A prompt of data.eval_source that data.source repeats is still never logged."""
    from llmrl.data.logged import load_rewarded
    from llmrl.data.prompts import prompt_hash
    from llmrl.trainers.logs import log_answers
    from llmrl.trainers.sft import encode_rows

    conversation = lambda q: [{"role": "user", "content": q}]  # noqa: E731
    train = [{"prompt": conversation(f"What is {a} + {b}?")} for a in range(1, 4) for b in range(1, 4)]
    held = train[:3] + [{"prompt": conversation("What is 7 + 7?")}]
    for name, rows in (("train.jsonl", train), ("eval.jsonl", held)):
        (tmp_path / name).write_text("".join(json.dumps(r) + "\n" for r in rows))
    cfg = config(chat_model_dir, tmp_path, reward_file, f"data.source={tmp_path / 'train.jsonl'}",
                 f"data.eval_source={tmp_path / 'eval.jsonl'}", "data.eval_size=4", "data.max_prompt_length=32")
    out = tmp_path / "logs"
    summary = log_answers(cfg, out, per_prompt=2, threshold=0.5)
    assert summary["prompts"] == 6 and summary["answers"] == 12  # 9 training prompts, 3 of them held out
    rows = load_rewarded(str(out / "rewarded.jsonl"))
    assert {prompt_hash(r["prompt"]) for r in rows} <= {prompt_hash(r["prompt"]) for r in train[3:]}
    for r in rows:  # TRL's conversational format: the answer as one assistant message
        assert isinstance(r["completion"], list) and len(r["completion"]) == 1
        assert r["completion"][0]["role"] == "assistant" and r["completion"][0]["content"].strip()
    positives = read(out / "positives.jsonl")
    assert positives and isinstance(positives[0]["completion"], list)
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(chat_model_dir)
    segments, _ = encode_rows(tokenizer, positives, cfg.sft, "sft.data")  # SFT renders them through the template
    eos = tokenizer.eos_token_id
    assert [ids for ids, trained in segments[0] if trained] == [
        tokenizer(positives[0]["completion"][0]["content"], add_special_tokens=False)["input_ids"] + [eos]]


def test_the_same_seed_writes_the_same_files_and_another_seed_other_answers(tiny_model_dir, tmp_path, reward_file):
    from llmrl.trainers.logs import log_answers

    texts = {}
    for name, seed in (("a", 0), ("b", 0), ("c", 1)):
        log_answers(config(tiny_model_dir, tmp_path, reward_file, f"run.seed={seed}"), tmp_path / name, per_prompt=3,
                    max_prompts=6)
        texts[name] = (tmp_path / name / "rewarded.jsonl").read_text()
    assert texts["a"] == texts["b"] and texts["a"] != texts["c"]
    assert all((tmp_path / "a" / f).read_text() == (tmp_path / "b" / f).read_text()
               for f in ("labelled.jsonl", "positives.jsonl", "pairs.jsonl"))


def run_command(capsys, *args) -> tuple[int, str]:
    from llmrl.cli import main

    code = main(["log-answers", *map(str, args)])
    return code, capsys.readouterr().err


def test_the_command_writes_the_files_and_refuses_to_overwrite_them(tiny_model_dir, tmp_path, reward_file, capsys):
    out = tmp_path / "logs"
    common = ["--config", REPO / "configs" / "tiny.yaml", "--per-prompt", 2, "--prompts", 3, "--out", out,
              f"model.name_or_path={tiny_model_dir}", f"reward.function={reward_file}:length_score",
              "reward.on_error=skip", "run.progress=false", "run.device=cpu"]
    code, err = run_command(capsys, *common)
    assert code == 0, err
    first = (out / "rewarded.jsonl").read_text()
    assert len(first.splitlines()) + json.loads((out / "summary.json").read_text())["unusable"] + \
        json.loads((out / "summary.json").read_text())["unscored"] == 6
    code, err = run_command(capsys, *common, "run.seed=5")
    assert code == 2 and err.strip().splitlines() == [err.strip()] and "already holds rewarded.jsonl" in err
    assert "--overwrite" in err and (out / "rewarded.jsonl").read_text() == first  # untouched
    code, err = run_command(capsys, *common, "run.seed=5", "--overwrite")
    assert code == 0, err
    assert (out / "rewarded.jsonl").read_text() != first


@pytest.mark.parametrize("recipe, args, fragment", [
    ("tiny", ["--per-prompt", 0], "--per-prompt is 0"),
    ("tiny", ["--per-prompt", 2, "--prompts", -1], "--prompts is -1"),
    ("tiny", ["--per-prompt", 2, "--threshold", "nan"], "--threshold is nan"),
    ("guess_number", ["--per-prompt", 2], "episodes against an environment are not logged"),
])
def test_bad_arguments_are_one_line(tiny_model_dir, tmp_path, capsys, recipe, args, fragment):
    code, err = run_command(capsys, "--config", REPO / "configs" / f"{recipe}.yaml", "--out", tmp_path / "logs",
                            f"model.name_or_path={tiny_model_dir}", *args)
    assert code == 2 and len(err.strip().splitlines()) == 1 and err.startswith("error: "), err
    assert fragment in err and "Traceback" not in err
    assert not (tmp_path / "logs").exists()  # nothing was written


def test_an_output_path_that_is_a_file_is_one_line(tiny_model_dir, tmp_path, capsys):
    (tmp_path / "logs").write_text("mine")
    code, err = run_command(capsys, "--config", REPO / "configs" / "tiny.yaml", "--out", tmp_path / "logs",
                            "--per-prompt", 2, f"model.name_or_path={tiny_model_dir}")
    assert code == 2 and "is a file" in err and (tmp_path / "logs").read_text() == "mine"


def test_llmrl_eval_judges_an_sft_run_on_the_logged_positives_against_the_base(tiny_model_dir, tmp_path):
    """Filtered SFT's chain: log the base's answers, SFT on the positives (llmrl sft), then llmrl eval on that SFT
    run's final/ (an adapter, no value head): "before" is the base, "after" the base with the SFT adapter."""
    import llmrl
    from llmrl.trainers.evaluate import evaluate_checkpoint
    from llmrl.trainers.logs import log_answers

    cfg = tiny_config(tiny_model_dir, tmp_path / "unused", "generation.max_new_tokens=6")
    log_answers(cfg, tmp_path / "logs", per_prompt=2, max_prompts=40, threshold=0.0)  # every answer is positive
    positives = tmp_path / "logs" / "positives.jsonl"
    run = tmp_path / "sft"
    llmrl.SFTTrainer(REPO / "configs" / "tiny.yaml", overrides=[
        "algorithm=sft", f"model.name_or_path={tiny_model_dir}", f"sft.data={positives}",
        f"sft.eval_data={positives}", "sft.eval_size=4", "sft.max_steps=6", "sft.batch_size=16", "sft.lr=3e-2",
        f"run.output_dir={run}", "run.progress=false", "run.device=cpu"]).train()
    judged = ["run.progress=false", "run.device=cpu", f"model.name_or_path={tiny_model_dir}", "data.eval_size=8",
              "generation.max_new_tokens=6"]
    result = evaluate_checkpoint(run / "final", REPO / "configs" / "tiny.yaml", tmp_path / "eval", 8, judged)
    base = tiny_config(tiny_model_dir, tmp_path / "unused", "generation.max_new_tokens=6")
    from helpers import make_trainer

    trainer = make_trainer(base)
    assert trainer.evaluate()["eval/reward"] == result["reward_before"]  # before: the base itself
    base_texts = [c for _, c, _ in trainer.last_eval_samples]
    assert [s["before"] for s in result["samples"]] == base_texts
    assert [s["after"] for s in result["samples"]] != base_texts and result["kl_to_base"] > 0  # after: the adapter


def test_llmrl_eval_on_a_full_sft_run_says_what_to_do_in_one_line(tmp_path):
    from llmrl.config import ConfigError
    from llmrl.trainers.evaluate import evaluate_checkpoint

    (tmp_path / "final" / "model").mkdir(parents=True)  # what llmrl sft with lora: null saves: no value head
    with pytest.raises(ConfigError, match=r"lora: null; it has no base to compare with") as e:
        evaluate_checkpoint(tmp_path / "final", REPO / "configs" / "tiny.yaml")
    assert "\n" not in str(e.value) and f"model.name_or_path={tmp_path / 'final' / 'model'}" in str(e.value)
