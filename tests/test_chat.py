"""Conversational data in TRL's format: prompts rendered with the chat template, rewards called as TRL's
trainers call them (TRL's own rewards unchanged), reward factories and reward files from the config, learned
reward models and DPO on conversations, and one-line errors for what cannot work."""
import json

import pytest
import torch
from helpers import make_trainer, tiny_config

from llmrl.config import ConfigError, RewardComponentConfig, RewardConfig
from llmrl.data.chat import as_completions, render_prompt
from llmrl.data.prompts import check_prompt_lengths
from llmrl.rewards.base import RewardError, build_reward

QUESTIONS = [f"What is {a} + {b}?" for a in range(1, 5) for b in range(1, 5)]


def write_chat_data(path, system: bool = True):
    """Conversations (an optional system message and a user question) with answer and solution columns."""
    with open(path, "w") as f:
        for i, q in enumerate(QUESTIONS):
            a, b = int(q.split()[2]), int(q.split()[4][:-1])
            messages = ([{"role": "system", "content": "be brief"}] if system else []) + [{"role": "user", "content": q}]
            f.write(json.dumps({"prompt": messages, "answer": a + b, "solution": str(a + b)}) + "\n")
    return path


def chat_config(model_dir, tmp_path, *overrides):
    data = write_chat_data(tmp_path / "chat.jsonl")
    return tiny_config(model_dir, tmp_path / "run", f"data.source={data}", "data.eval_size=4",
                       "data.max_prompt_length=64", *overrides)


def test_prompts_are_rendered_with_the_chat_template(chat_model_dir, tmp_path):
    trainer = make_trainer(chat_config(chat_model_dir, tmp_path))
    rows = trainer.train_rows[:2]
    texts = trainer.prompt_texts(rows)
    assert texts[0] == f"system: be brief\nuser: {rows[0]['prompt'][1]['content']}\nassistant: "
    assert texts == [trainer.tokenizer.apply_chat_template(r["prompt"], tokenize=False, add_generation_prompt=True)
                     for r in rows]
    assert render_prompt(trainer.tokenizer, "plain text") == "plain text"  # text prompts stay as they are


def test_rewards_get_conversations_and_trl_completions(chat_model_dir, tmp_path):
    seen = tmp_path / "seen.json"
    (tmp_path / "rw.py").write_text(
        "import json\n"
        "def record(prompts, completions, solution, **kwargs):\n"
        f"    json.dump({{'prompts': prompts, 'completions': completions, 'solution': solution}}, open({str(seen)!r}, 'w'))\n"
        "    return [float(len(c[0]['content'])) for c in completions]\n")
    trainer = make_trainer(chat_config(chat_model_dir, tmp_path, f"reward.function={tmp_path / 'rw.py'}:record"))
    rows = trainer.rows_for_step(0)
    exp = trainer.generate(trainer.prompt_texts(rows))
    texts, result = trainer.score(rows, exp)
    got = json.loads(seen.read_text())
    assert got["prompts"] == [r["prompt"] for r in rows]  # the messages, as the data holds them
    assert got["completions"] == [[{"role": "assistant", "content": t}] for t in texts]
    assert got["solution"] == [r["solution"] for r in rows]
    assert result.scores == [float(len(t)) for t in texts]
    assert as_completions(["text prompt"], ["a"]) == ["a"]  # plain prompts keep plain completions


def test_trls_shipped_rewards_run_unchanged(chat_model_dir, tmp_path):
    trainer = make_trainer(chat_config(chat_model_dir, tmp_path, "reward.function=",
                                       "reward.components=[{function: 'trl.rewards:think_format_reward'}, "
                                       "{function: 'trl.rewards:accuracy_reward'}]"))
    rows = trainer.rows_for_step(0)[:4]
    exp = trainer.generate(trainer.prompt_texts(rows))
    # hand-written completions with a known score, put through the trainer's own scoring
    completions = ["<think>4</think> $\\boxed{" + r["solution"] + "}$" for r in rows[:2]] + ["no", "$\\boxed{0}$"]
    ids = [trainer.tokenizer(c, add_special_tokens=False)["input_ids"] + [trainer.tokenizer.eos_token_id]
           for c in completions]
    from llmrl.rollout.experience import right_padded

    exp.response, exp.response_mask = right_padded(ids, trainer.tokenizer.pad_token_id)
    texts, result = trainer.score(rows, exp)
    assert texts == completions
    assert result.metrics["reward/think_format_reward/mean"] == 0.5
    assert result.metrics["reward/accuracy_reward/mean"] == 0.5
    assert result.scores == [2.0, 2.0, 0.0, 0.0]


def test_a_reward_factory_is_built_from_the_config():
    reward = build_reward(RewardConfig(components=[RewardComponentConfig(
        function="trl.rewards:get_soft_overlong_punishment",
        factory_kwargs={"max_completion_len": 10, "soft_punish_cache": 4})]))
    reward.check_arguments(set(), "data.jsonl")
    # DAPO's soft overlong punishment (Yu et al. 2025, eq. 13): 0 up to 10 - 4 = 6 tokens, then -(n - 6) / 4
    # down to -1 at 10 tokens, and -1 beyond
    result = reward(["p"] * 4, ["a"] * 4, completion_ids=[[1] * 5, [1] * 8, [1] * 10, [1] * 12])
    assert result.scores == [0.0, -0.5, -1.0, -1.0]
    bare = build_reward(RewardConfig(function="trl.rewards:get_soft_overlong_punishment"))
    with pytest.raises(ConfigError, match=r"takes 'max_completion_len', 'soft_punish_cache' but no completions: if "
                                          r"it is a factory .* give those arguments in the component's factory_kwargs"):
        bare.check_arguments(set(), "data.jsonl")
    with pytest.raises(ConfigError, match=r"called with factory_kwargs \{'max_len': 3\} raised TypeError"):
        build_reward(RewardConfig(components=[RewardComponentConfig(
            function="trl.rewards:get_soft_overlong_punishment", factory_kwargs={"max_len": 3})]))


def test_a_reward_file_imports_the_modules_beside_it(tmp_path):
    folder = tmp_path / "my_rewards"
    folder.mkdir()
    (folder / "helper_mod_q7.py").write_text("def score(text):\n    return float(len(text))\n")
    (folder / "rw.py").write_text("from helper_mod_q7 import score\n"
                                  "def length(prompts, completions, **kwargs):\n"
                                  "    return [score(c) for c in completions]\n")
    assert build_reward(RewardConfig(function=f"{folder / 'rw.py'}:length"))(["p"] * 2, ["ab", "c"]).scores == [2.0, 1.0]


def test_a_reward_returning_none_for_every_sample_is_one_clear_error(tmp_path):
    (tmp_path / "rw.py").write_text("def never(prompts, completions, **kwargs):\n    return [None] * len(completions)\n")
    for on_error in ("raise", "skip"):
        reward = build_reward(RewardConfig(function=f"{tmp_path / 'rw.py'}:never", on_error=on_error))
        with pytest.raises(RewardError, match=r"reward 'never' returned None for all 3 samples of a batch: None means "
                                              r"'does not apply' \(TRL's convention\).*accuracy_reward needs a 'solution' column"):
            reward(["p"] * 3, ["a", "b", "c"])


def test_a_conversation_for_a_tokenizer_without_a_chat_template_is_refused(tiny_model_dir, tmp_path):
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(tiny_model_dir)
    rows = [{"prompt": [{"role": "user", "content": "abc"}]}]
    with pytest.raises(ConfigError, match=r"^data.source: prompt 0 is a conversation \(a list of messages\), but the "
                                          r"policy's tokenizer has no chat template: give the prompts as text"):
        check_prompt_lengths(rows, "prompt", tokenizer, 64, 8, 128)


def test_a_learned_reward_model_reads_conversations_with_its_own_chat_template(tmp_path):
    from conftest import CHAT_TEMPLATE, build_tiny_reward_model

    from llmrl.models.reward_model import LearnedReward, format_texts

    path = build_tiny_reward_model(tmp_path / "rm", chat_template=CHAT_TEMPLATE)
    reward = LearnedReward(str(path))
    prompt = [{"role": "system", "content": "be brief"}, {"role": "user", "content": "abc"}]
    texts = format_texts(reward.tokenizer, [prompt], [[{"role": "assistant", "content": "cba"}]])
    assert texts == ["system: be brief\nuser: abc\nassistant: cba\n"]
    conversational = reward([prompt], [[{"role": "assistant", "content": "cba"}]])
    as_text = reward(["ignored"], ["ignored"])  # a different text: a different score (the model reads the text)
    assert conversational != as_text
    direct = reward.model(**reward.tokenizer(texts, return_tensors="pt")).logits[0, 0].item()
    assert abs(conversational[0] - direct) < 1e-5


def test_dpo_encodes_conversational_pairs_as_a_rollout_would(chat_model_dir, tmp_path):
    pairs = tmp_path / "pairs.jsonl"
    with open(pairs, "w") as f:
        for q in QUESTIONS:
            f.write(json.dumps({"prompt": [{"role": "user", "content": q}],
                                "chosen": [{"role": "assistant", "content": "5"}],
                                "rejected": [{"role": "assistant", "content": "7"}]}) + "\n")
    cfg = chat_config(chat_model_dir, tmp_path, "algorithm=dpo", f"dpo.data={pairs}", "dpo.batch_size=4",
                      "reward.function=exact_match")
    from llmrl.data.prompts import load_prompts
    from llmrl.trainers.dpo import DPOTrainer, encode, load_pairs
    from llmrl.models.policy import build_policy
    from llmrl.distributed.strategy import SingleProcess

    policy, tokenizer = build_policy(cfg.model, cfg.lora, torch.device("cpu"))
    train_rows, eval_rows = load_prompts(cfg.data)
    trainer = DPOTrainer(cfg, policy, tokenizer, load_pairs(str(pairs)), eval_rows, SingleProcess("cpu"),
                         tmp_path / "run", build_reward(cfg.reward))
    stats = trainer.train_step()
    assert torch.isfinite(torch.tensor(stats["loss/dpo"]))
    tok = trainer.tokenizer
    exp = encode(tok, [f"user: {QUESTIONS[0]}\nassistant: "], ["5"], "cpu")
    real = exp.response[0][exp.response_mask[0].bool()].tolist()
    assert real == tok("5", add_special_tokens=False)["input_ids"] + [tok.eos_token_id]
    with pytest.raises(ConfigError, match=r"pair 2's prompt has message 0"):
        bad = tmp_path / "bad.jsonl"
        bad.write_text("".join(json.dumps({"prompt": [{"role": "user", "content": 1 if i == 2 else "q"}],
                                           "chosen": "a", "rejected": "b"}) + "\n" for i in range(5)))
        load_pairs(str(bad))
