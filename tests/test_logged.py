"""Logged feedback files (llmrl.data.logged): every bad row refused with one line that names it and says what to do;
batches that draw a chosen share of a log's successes."""
import json
import re

import pytest

from llmrl.config import ConfigError
from llmrl.data.logged import check_logged_lengths, load_labelled, load_rewarded


def jsonl(path, rows):
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return str(path)


def refused(load, source, *words):
    with pytest.raises(ConfigError) as e:
        load(source)
    message = str(e.value)
    assert "\n" not in message, message  # one line
    for word in words:
        assert word in message, (word, message)
    return message


GOOD = {"prompt": "abc>", "completion": "cba", "label": True}
BAD = {"prompt": "abd>", "completion": "abd", "label": False}


def test_a_good_file_loads_as_prompt_completion_and_a_bool_label(tmp_path):
    rows = load_labelled(jsonl(tmp_path / "a.jsonl", [GOOD, BAD]))
    assert rows == [GOOD, BAD]
    rewarded = load_rewarded(jsonl(tmp_path / "r.jsonl", [{"prompt": "a", "completion": "b", "reward": 1}]))
    assert rewarded == [{"prompt": "a", "completion": "b", "reward": 1.0}] and type(rewarded[0]["reward"]) is float


def test_missing_columns_are_named(tmp_path):
    refused(load_labelled, jsonl(tmp_path / "a.jsonl", [{"prompt": "a", "completion": "b"}]),
            "kto.data", "lacks column(s) label", "prompt, completion and label", "columns: prompt, completion")
    refused(load_rewarded, jsonl(tmp_path / "r.jsonl", [{"prompt": "a", "completion": "b", "score": 1.0}]),
            "ilql.data", "lacks column(s) reward", "columns: prompt, completion, score")


@pytest.mark.parametrize("labels,row,shown", [(["true", "yes"], 1, "'yes'"), ([1, 0], 0, "1")])
def test_labels_must_be_true_or_false(tmp_path, labels, row, shown):
    rows = [{"prompt": "a>", "completion": "a", "label": label} for label in labels]
    refused(load_labelled, jsonl(tmp_path / "a.jsonl", rows), f"row {row} (counting from 0)",
            f"its label is {shown}: it must be true (a desirable answer) or false")


def test_only_one_kind_of_label_is_refused(tmp_path):
    refused(load_labelled, jsonl(tmp_path / "a.jsonl", [GOOD, GOOD]), "every label is true",
            "KTO needs both desirable (true) and undesirable (false) answers", "llmrl sft")
    refused(load_labelled, jsonl(tmp_path / "b.jsonl", [BAD, BAD]), "every label is false")


def test_an_empty_completion_is_refused(tmp_path):
    refused(load_labelled, jsonl(tmp_path / "a.jsonl", [GOOD, {**BAD, "completion": "  "}]),
            "row 1 (counting from 0): its completion is empty", "remove the row")


def test_a_csv_holds_labels_as_true_false_text(tmp_path):
    path = tmp_path / "a.csv"
    path.write_text("prompt,completion,label\nabc>,cba,true\nabd>,abd,FALSE\n")
    assert [r["label"] for r in load_labelled(str(path))] == [True, False]
    path.write_text("prompt,completion,label\nabc>,cba,true\nabd>,abd,maybe\n")
    refused(load_labelled, str(path), "row 1 (counting from 0)", "its label is 'maybe'")


@pytest.mark.parametrize("value,row", [(float("nan"), 1), (float("inf"), 0), (float("-inf"), 1)])
def test_rewards_must_be_finite(tmp_path, value, row):
    rows = [{"prompt": "a>", "completion": "b", "reward": 1.0}, {"prompt": "a>", "completion": "b", "reward": 2.0}]
    rows[row]["reward"] = value  # json.dumps writes NaN, Infinity, -Infinity
    refused(load_rewarded, jsonl(tmp_path / "r.jsonl", rows), f"row {row} (counting from 0)",
            f"its reward is {value}", "it must be a finite number")


def test_a_csv_reward_of_nan_is_refused(tmp_path):
    path = tmp_path / "r.csv"
    path.write_text("prompt,completion,reward\na>,b,1.0\na>,b,nan\n")
    refused(load_rewarded, str(path), "row 1 (counting from 0)", "it must be a finite number")


def test_a_reward_given_as_text_is_refused(tmp_path):
    rows = [{"prompt": "a", "completion": "b", "reward": "1"}]
    refused(load_rewarded, jsonl(tmp_path / "r.jsonl", rows), "row 0 (counting from 0): its reward is '1'")


def test_an_answer_longer_than_the_context_is_refused_before_training(tiny_model_dir, tmp_path):
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(tiny_model_dir)
    rows = load_labelled(jsonl(tmp_path / "a.jsonl", [GOOD, {**BAD, "completion": "abcdef" * 5}]))
    check_logged_lengths(rows[:1], tokenizer, 32, "kto.data")
    with pytest.raises(ConfigError) as e:
        check_logged_lengths(rows, tokenizer, 32, "kto.data")
    assert str(e.value) == ("kto.data: row 1 (counting from 0) has 35 tokens (with EOS), more than the model's context "
                            "of 32 tokens: shorten or remove the row")


def test_a_kto_run_refuses_a_bad_file_in_one_line(tiny_model_dir, tmp_path):
    """Through llmrl.train, before any step: the loader's message, naming the row."""
    from helpers import tiny_config

    from llmrl.api import run

    data = jsonl(tmp_path / "a.jsonl", [GOOD, {**BAD, "label": "no"}] * 4)
    cfg = tiny_config(tiny_model_dir, tmp_path / "run", "algorithm=kto", f"kto.data={data}", "kto.batch_size=4")
    with pytest.raises(ConfigError, match=r"row 1 \(counting from 0\): its label is 'no'"):
        run(cfg)
    assert not (tmp_path / "run" / "log.jsonl").exists()


# ---------------------------------------------------------------------------------------------------------------
# batches with a chosen share of successes (kto.desirable_share, ilql.positive_share)

def test_a_balanced_batch_takes_its_counts_and_cycles_each_group_in_its_own_order():
    from llmrl.trainers.base import balanced_batch

    good, bad = [3, 11, 17], list(set(range(20)) - {3, 11, 17})
    batches = [balanced_batch((good, bad), (1, 4), seed=5, step=s) for s in range(3)]
    for b in batches:
        assert len(b) == 5 and sum(i in good for i in b) == 1 and len(set(b)) == 5
    # three steps of one good row: each good row once (a pass over the group), in a seed-fixed order
    assert sorted(i for b in batches for i in b if i in good) == good
    # the 17 others: 4 per step, no row twice within a pass of 4 steps
    others = [i for s in range(4) for i in balanced_batch((good, bad), (1, 4), seed=5, step=s) if i in bad]
    assert len(set(others)) == 16
    # fixed by the seed and the step (a resumed run reads the same batch); another seed reads another
    assert balanced_batch((good, bad), (1, 4), seed=5, step=2) == batches[2]
    assert [balanced_batch((good, bad), (1, 4), seed=6, step=s) for s in range(3)] != batches


def test_a_balanced_batch_mixes_the_groups_in_a_seed_fixed_order():
    from llmrl.trainers.base import balanced_batch

    good, bad = list(range(10)), list(range(10, 40))
    firsts = [balanced_batch((good, bad), (4, 4), seed=0, step=s)[:4] for s in range(10)]
    assert any(not all(i in good for i in f) for f in firsts)  # not the good rows always first (rank 0's half)


@pytest.mark.parametrize("share,batch,groups,expected", [
    (0.5, 8, (51, 1949), (4, 4)), (0.3, 8, (51, 1949), (2, 6)), (0.05, 32, (10, 100), (2, 30))])
def test_share_counts_round_the_share_of_the_batch(share, batch, groups, expected):
    from llmrl.trainers.base import share_counts

    assert share_counts(share, batch, *groups, "kto.desirable_share", "desirable/undesirable") == expected


@pytest.mark.parametrize("share,batch,groups,message", [
    (0.05, 8, (51, 1949), "kto.desirable_share is 0.05: with a batch of 8 it draws 0 desirable rows per batch"),
    (0.97, 8, (51, 1949), "kto.desirable_share is 0.97: with a batch of 8 it draws 8 desirable rows per batch"),
    (0.5, 8, (3, 100), "kto.desirable_share is 0.5: each batch draws 4 desirable rows but the log has 3: lower "
                       "kto.desirable_share or the batch size, or set kto.desirable_share to null"),
    (0.5, 8, (100, 2), "kto.desirable_share is 0.5: each batch draws 4 undesirable rows but the log has 2: raise "
                       "kto.desirable_share or lower the batch size, or set kto.desirable_share to null"),
])
def test_share_counts_refuse_in_one_line(share, batch, groups, message):
    from llmrl.config import ConfigError
    from llmrl.trainers.base import share_counts

    with pytest.raises(ConfigError, match=re.escape(message)) as e:
        share_counts(share, batch, *groups, "kto.desirable_share", "desirable/undesirable")
    assert "\n" not in str(e.value)
