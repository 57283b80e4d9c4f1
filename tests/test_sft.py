"""Supervised fine-tuning on the user's data (llmrl.trainers.sft): the masks, the loss, LoRA and full fine-tuning,
the command line, an RL run starting from the adapter, and bad input in one line. Tiny models built in-process."""
import itertools
import json
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from helpers import REPO, assert_one_line, subprocess_env
from llmrl.config import ConfigError, SFTConfig, load_config

ROWS = [{"prompt": "".join(p) + ">", "completion": "".join(reversed(p))} for p in itertools.product("abcdef", repeat=3)]


def sft_config(model_dir, run_dir, **sft):
    return {"model": {"name_or_path": str(model_dir)}, "lora": {"r": 8, "alpha": 16},
            "sft": {"eval_size": 16, "batch_size": 16, "max_steps": 30, "lr": 3e-3, **sft},
            "run": {"output_dir": str(run_dir), "progress": False, "device": "cpu", "threads": 1}}


def test_prompt_completion_rows_train_on_the_completion_and_eos_only(tiny_model_dir):
    from transformers import AutoTokenizer

    from llmrl.data.supervised import padded_segments
    from llmrl.trainers.sft import encode_rows

    tok = AutoTokenizer.from_pretrained(tiny_model_dir)
    episodes, cut = encode_rows(tok, [{"prompt": "abc>", "completion": "cba"}, {"prompt": "ab>", "completion": "b"}],
                                SFTConfig(), "sft.data")
    ids, mask, labels = padded_segments(tok, episodes)
    enc = lambda s: tok(s, add_special_tokens=False)["input_ids"]  # noqa: E731
    eos = tok.eos_token_id
    # row 0: a b c > c b a EOS -> the last four are trained; row 1: a b > b EOS, then 3 pads
    assert ids[0].tolist() == enc("abc>cba") + [eos] and mask[0].tolist() == [1] * 8 and cut == 0
    assert labels[0].tolist() == [-100] * 4 + enc("cba") + [eos]
    assert labels[1].tolist() == [-100] * 3 + enc("b") + [eos] + [-100] * 3
    assert mask[1].tolist() == [1] * 5 + [0] * 3


def test_the_loss_is_the_mean_over_trained_tokens_by_hand():
    from llmrl.trainers.sft import sft_loss

    torch.manual_seed(0)
    logits = torch.randn(2, 4, 5)
    labels = torch.tensor([[-100, 3, 1, -100], [-100, -100, 4, -100]])
    loss, n, correct = sft_loss(logits, labels)
    logp = logits.log_softmax(-1)
    # label at t is predicted by the logits at t - 1: (0,1)<-(0,0), (0,2)<-(0,1), (1,2)<-(1,1); 3 tokens
    expected = -(logp[0, 0, 3] + logp[0, 1, 1] + logp[1, 1, 4]) / 3
    assert n == 3 and abs(loss.item() - expected.item()) < 1e-6
    hits = int(logits[0, 0].argmax() == 3) + int(logits[0, 1].argmax() == 1) + int(logits[1, 1].argmax() == 4)
    assert correct == hits


def test_conversations_train_on_the_assistant_turns_only(chat_model_dir):
    from transformers import AutoTokenizer

    from llmrl.trainers.sft import row_segments

    tok = AutoTokenizer.from_pretrained(chat_model_dir)
    dec = lambda segs, t: "".join(tok.decode(ids) for ids, trained in segs if trained == t)  # noqa: E731
    messages = [{"role": "user", "content": "What is 2 + 3?"}, {"role": "assistant", "content": "5"},
                {"role": "user", "content": "and 2 + 2?"}, {"role": "assistant", "content": "4"}]
    segs = row_segments(tok, {"messages": messages}, SFTConfig(), "row 0")
    # the template writes "role: content\n" and opens a turn with "assistant: ": both answers (and their newline,
    # the end of the turn as the template writes it) and a final EOS are trained, nothing else
    assert dec(segs, True) == "5\n4\n" + tok.eos_token
    assert dec(segs, False) == "user: What is 2 + 3?\nassistant: user: and 2 + 2?\nassistant: "
    # conversational prompt/completion: the prompt as a rollout sees it, the answer's content + EOS trained
    segs = row_segments(tok, {"prompt": messages[:1], "completion": [{"role": "assistant", "content": "5"}]},
                        SFTConfig(), "row 0")
    assert dec(segs, False) == "user: What is 2 + 3?\nassistant: " and dec(segs, True) == "5" + tok.eos_token


def test_lora_sft_lowers_held_out_loss_and_an_rl_run_starts_from_its_adapter(tiny_model_dir, tmp_path):
    import llmrl
    from llmrl.models.policy import build_policy

    result = llmrl.SFTTrainer(sft_config(tiny_model_dir, tmp_path / "sft"), train_dataset=ROWS).train()
    s = result.summary
    assert s["eval_loss_after"] < s["eval_loss_before"] - 0.3 and s["steps"] == 30
    assert result.output == tmp_path / "sft" / "final" / "adapter" and not s["full_fine_tuning"]
    rows = [json.loads(line) for line in (tmp_path / "sft" / "log.jsonl").read_text().splitlines()]
    assert rows[0]["step"] == 0 and "eval/loss" in rows[0] and "loss/sft" in rows[1] and "eval/loss" in rows[-1]
    assert s["rl_start"] == f"model.name_or_path: {tiny_model_dir} and model.adapter: {result.output}"

    cfg = load_config(REPO / "configs" / "tiny.yaml", [f"model.name_or_path={tiny_model_dir}",
                                                       f"model.adapter={result.output}", "warm_start=null"])
    policy, tok = build_policy(cfg.model, cfg.lora, torch.device("cpu"))
    ids = tok(["abc>", "fed>"], return_tensors="pt")
    sft_model, base = result.model, result.model.get_base_model()
    with torch.no_grad():
        expected = sft_model(**ids).logits
        with sft_model.disable_adapter():
            base_logits = sft_model(**ids).logits
        policy.eval()
        logits, _ = policy(ids["input_ids"], ids["attention_mask"], with_values=False)
        with policy.reference():
            ref, _ = policy(ids["input_ids"], ids["attention_mask"], with_values=False)
    assert not torch.allclose(expected, base_logits, atol=1e-3)  # the adapter learned something
    assert torch.allclose(logits, expected, atol=1e-5)  # the RL policy begins with the adapter's outputs
    assert torch.allclose(ref, base_logits, atol=1e-5)  # its reference is the base, adapter off
    assert all(p.requires_grad for n, p in policy.model.named_parameters() if "lora_" in n)  # trained further
    assert base is not None


def test_full_sft_changes_every_weight_and_saves_a_plain_model(tiny_model_dir, tmp_path):
    from transformers import AutoModelForCausalLM

    import llmrl

    cfg = sft_config(tiny_model_dir, tmp_path / "sft", max_steps=10)
    cfg["lora"] = None
    result = llmrl.SFTTrainer(cfg, train_dataset=ROWS).train()
    assert result.output == tmp_path / "sft" / "final" / "model" and result.summary["full_fine_tuning"]
    assert result.summary["eval_loss_after"] < result.summary["eval_loss_before"]
    assert result.summary["rl_start"] == f"model.name_or_path: {result.output}"
    before = AutoModelForCausalLM.from_pretrained(tiny_model_dir).state_dict()
    after = AutoModelForCausalLM.from_pretrained(result.output).state_dict()  # plain transformers loads it
    params = dict(AutoModelForCausalLM.from_pretrained(tiny_model_dir).named_parameters())
    changed = [k for k in params if not torch.equal(before[k], after[k])]
    assert sorted(changed) == sorted(params)  # every trained weight moved, none is an adapter's


def test_llmrl_sft_command_trains_on_a_jsonl_file(tiny_model_dir, tmp_path):
    data = tmp_path / "sft.jsonl"
    data.write_text("".join(json.dumps(r) + "\n" for r in ROWS))
    config = tmp_path / "sft.yaml"
    config.write_text(f"algorithm: sft\nmodel:\n  name_or_path: {tiny_model_dir}\nlora:\n  r: 8\n  alpha: 16\n"
                      f"sft:\n  data: {data}\n  eval_size: 16\n  batch_size: 16\n  max_steps: 20\n  lr: 3.0e-3\n"
                      f"run:\n  output_dir: {tmp_path / 'run'}\n  progress: false\n  threads: 1\n")
    out = subprocess.run([sys.executable, str(REPO / "launch" / "sft.py"), "--config", str(config)],
                         capture_output=True, text=True, env=subprocess_env(), timeout=600)
    assert out.returncode == 0, out.stderr[-3000:]
    summary = json.loads((tmp_path / "run" / "summary.json").read_text())
    assert summary["eval_loss_after"] < summary["eval_loss_before"] and summary["steps"] == 20
    assert (tmp_path / "run" / "final" / "adapter" / "adapter_model.safetensors").is_file()
    assert "model.adapter: " in out.stdout
    # the same run again is refused in one line, before any training
    again = subprocess.run([sys.executable, str(REPO / "launch" / "sft.py"), "--config", str(config)],
                           capture_output=True, text=True, env=subprocess_env(), timeout=600)
    assert_one_line(again, "already holds a run")
    full = subprocess.run([sys.executable, str(REPO / "launch" / "sft.py"), "--config", str(config), "--overwrite",
                           "lora=null", "sft.max_steps=2"], capture_output=True, text=True, env=subprocess_env(),
                          timeout=600)
    assert full.returncode == 0, full.stderr[-3000:]
    assert (tmp_path / "run" / "final" / "model" / "config.json").is_file()
    assert not (tmp_path / "run" / "final" / "adapter").exists()


@pytest.mark.parametrize("rows, fragment", [
    ([{"prompt": f"{p}>", "answer": "cba"} for p in ("abc", "bca", "cab", "acb") * 5],
     "has neither a 'completion' column"),
    ([{"prompt": f"{p}>", "completion": "  "} for p in ("abc", "bca", "cab", "acb") * 5],
     "completion is empty: nothing to learn from"),
    ([{"messages": [{"role": "user", "content": f"hi {i}"}]} for i in range(20)], "has no assistant turn with text"),
])
def test_sft_rows_without_completions_are_one_line(tiny_model_dir, tmp_path, rows, fragment, monkeypatch):
    import llmrl
    from llmrl.models import policy

    monkeypatch.setattr(policy, "load_base_model", lambda *a: pytest.fail("loaded the model before checking rows"))

    with pytest.raises(ConfigError, match=fragment):
        llmrl.SFTTrainer(sft_config(tiny_model_dir, tmp_path / "run"), train_dataset=rows).train()
    assert not (tmp_path / "run" / "log.jsonl").exists()


def sft_adapter_of_another_base(tmp_path, name: str, n_embd: int, seed: int) -> Path:
    """An adapter trained for one SFT step on a tiny GPT-2 of its own (saved in tmp_path / name)."""
    import llmrl
    from llmrl.demo.tiny import char_tokenizer, tiny_gpt2

    base = tmp_path / name
    tok = char_tokenizer("abcdef>")
    tiny_gpt2(tok, n_layer=2, n_embd=n_embd, n_head=4, n_positions=32, seed=seed).save_pretrained(base)
    tok.save_pretrained(base)
    return llmrl.SFTTrainer(sft_config(base, tmp_path / "sft", max_steps=1), train_dataset=ROWS).train().output


def test_an_adapter_of_another_base_is_refused_at_start_up(tiny_model_dir, tmp_path):
    from llmrl.models.policy import build_policy

    adapter = sft_adapter_of_another_base(tmp_path, "other-base", n_embd=64, seed=1)
    cfg = load_config(REPO / "configs" / "tiny.yaml", [f"model.name_or_path={tiny_model_dir}",
                                                       f"model.adapter={adapter}", "warm_start=null"])
    with pytest.raises(ConfigError, match="was trained on another base than model.name_or_path"):
        build_policy(cfg.model, cfg.lora, torch.device("cpu"))
    # without llmrl's fingerprint (an adapter from elsewhere): peft's recorded base name decides
    (adapter / "llmrl_base_fingerprint.json").unlink()
    with pytest.raises(ConfigError, match="was made for base .*other-base"):
        build_policy(cfg.model, cfg.lora, torch.device("cpu"))
    with pytest.raises(ConfigError, match="is not a peft adapter folder"):
        build_policy(load_config(REPO / "configs" / "tiny.yaml", [
            f"model.name_or_path={tiny_model_dir}", f"model.adapter={tmp_path}", "warm_start=null"]).model,
            cfg.lora, torch.device("cpu"))


def test_an_adapter_whose_shapes_do_not_fit_is_one_line(tiny_model_dir, tmp_path):
    from llmrl.models.policy import build_policy

    adapter = sft_adapter_of_another_base(tmp_path, "tiny-model-wide", n_embd=128, seed=0)
    (adapter / "llmrl_base_fingerprint.json").unlink()
    config = json.loads((adapter / "adapter_config.json").read_text())
    (adapter / "adapter_config.json").write_text(json.dumps({**config, "base_model_name_or_path": None}))
    cfg = load_config(REPO / "configs" / "tiny.yaml", [f"model.name_or_path={tiny_model_dir}",
                                                       f"model.adapter={adapter}", "warm_start=null"])
    with pytest.raises(ConfigError, match="does not fit model.name_or_path") as e:
        build_policy(cfg.model, cfg.lora, torch.device("cpu"))
    assert "\n" not in str(e.value)


def test_full_fine_tuning_too_large_for_memory_is_refused_before_loading(tiny_model_dir, tmp_path, monkeypatch):
    import llmrl
    from llmrl.models import memory, policy

    monkeypatch.setattr(memory, "available_memory_bytes", lambda device: 1000)
    monkeypatch.setattr(policy, "load_base_model", lambda *a: pytest.fail("loaded the model before the check"))
    cfg = sft_config(tiny_model_dir, tmp_path / "run")
    cfg["lora"] = None
    with pytest.raises(ConfigError, match=r"lora is null \(full fine-tuning\) .* need about .* more than the 0.0 GiB"):
        llmrl.SFTTrainer(cfg, train_dataset=ROWS).train()
    n = sum(p.numel() for p in __import__("transformers").AutoModelForCausalLM.from_pretrained(
        tiny_model_dir).parameters())
    assert memory.parameter_count(llmrl.load_config(REPO / "configs" / "tiny.yaml", [
        f"model.name_or_path={tiny_model_dir}"]).model) == n  # counted from config.json, on the meta device


@pytest.mark.parametrize("overrides, fragment", [
    (["lora.r=0"], "lora.r is 0: must be at least 1 (e.g. 8); to train all weights instead, write lora: null"),
    (["lora=null", "ppo.critic=separate"], "lora is null (full fine-tuning) with ppo.critic: separate"),
    (["lora=null", "model.quantization=4bit"], "lora is null (full fine-tuning) with model.quantization = '4bit'"),
    (["lora=null", "model.adapter=x"], "lora is null (full fine-tuning) with model.adapter set"),
    (["algorithm=sft"], "sft.data is empty"),
])
def test_config_errors_are_one_line(overrides, fragment):
    with pytest.raises(ConfigError) as e:
        load_config(REPO / "configs" / "tiny.yaml", overrides)
    assert fragment in str(e.value) and "\n" not in str(e.value)


def test_an_sft_config_runs_with_llmrl_sft_not_llmrl_train(tiny_model_dir, tmp_path):
    from llmrl.api import RLTrainer

    cfg = sft_config(tiny_model_dir, tmp_path / "run", data="x.jsonl")
    with pytest.raises(ConfigError, match="runs with llmrl sft"):
        RLTrainer({**cfg, "algorithm": "sft"}).train()


def test_a_chat_template_that_rewrites_earlier_turns_is_one_line(chat_model_dir):
    from transformers import AutoTokenizer

    from llmrl.trainers.sft import row_segments

    tok = AutoTokenizer.from_pretrained(chat_model_dir)
    # marks the last message: a turn's text then depends on what follows, so no span of it is "the turn"
    tok.chat_template = ("{% for m in messages %}{{ m['role'] }}: {{ m['content'] }}{% if loop.last %}!{% endif %}\n"
                         "{% endfor %}{% if add_generation_prompt %}assistant: {% endif %}")
    messages = [{"role": "user", "content": "2 + 3?"}, {"role": "assistant", "content": "5"},
                {"role": "user", "content": "2 + 2?"}, {"role": "assistant", "content": "4"}]
    with pytest.raises(ConfigError, match="row 3: the chat template does not write the conversation turn by turn"):
        row_segments(tok, {"messages": messages}, SFTConfig(), "row 3")


def test_sft_follows_train_lr_schedule(tiny_model_dir, tmp_path):
    import llmrl

    cfg = sft_config(tiny_model_dir, tmp_path / "run", max_steps=4, lr=1e-3)
    cfg["train"] = {"lr_schedule": "linear"}
    result = llmrl.SFTTrainer(cfg, train_dataset=ROWS).train()
    lrs = [row["optim/lr"] for row in result.metrics if "optim/lr" in row]
    # linear to 0 over 4 steps, no warmup: step k (from 0) uses 1e-3 * (1 - k / 4)
    assert lrs == pytest.approx([1e-3, 7.5e-4, 5e-4, 2.5e-4], rel=1e-9)


def test_an_rl_run_from_an_sft_adapter_trains_it_further_and_exports(tiny_model_dir, tmp_path):
    from safetensors.torch import load_file

    import llmrl

    adapter = llmrl.SFTTrainer(sft_config(tiny_model_dir, tmp_path / "sft", max_steps=5), train_dataset=ROWS
                               ).train().output
    small = ["train.total_steps=1", "train.rollout_batch_size=8", "train.mini_batch_size=8",
             "train.micro_batch_size=8", "train.epochs=1", "run.eval_every=0", "run.progress=false",
             "data.eval_size=8", "warm_start=null", f"model.name_or_path={tiny_model_dir}",
             f"model.adapter={adapter}", f"run.output_dir={tmp_path / 'rl'}"]
    result = llmrl.RLTrainer(REPO / "configs" / "tiny.yaml", overrides=small).train()
    start = load_file(adapter / "adapter_model.safetensors")
    trained = load_file(result.final_checkpoint / "adapter" / "adapter_model.safetensors")
    # the same adapter, with its own r = 8 (not the lora section's r: 16 of configs/tiny.yaml)
    assert start.keys() == trained.keys() and all(start[k].shape == trained[k].shape for k in start)
    assert any(not torch.equal(start[k], trained[k]) for k in start)  # trained further
    llmrl.export(result.final_checkpoint, tmp_path / "exported")  # merged into the base it was trained on
    card = (tmp_path / "exported" / "README.md").read_text()
    assert f"started from the adapter `{adapter}`" in card and "r=16" not in card  # not the lora section's r


def test_without_eval_data_the_held_out_rows_are_drawn_by_hash_over_the_whole_file(tmp_path, capsys):
    """As data.source (issue 31): not the last rows of a sorted file; every completion of a held-out prompt is kept
    out of training; a small file holds out a quarter, with a line naming sft.eval_size."""
    from llmrl.config import Config
    from llmrl.trainers.sft import split_rows

    rows = [{"prompt": f"p{i:03d}", "completion": f"c{i}{k}"} for i in range(40) for k in range(2)]  # sorted by prompt
    data = tmp_path / "sft.jsonl"
    data.write_text("".join(json.dumps(r) + "\n" for r in rows))
    cfg = Config(algorithm="sft", sft=SFTConfig(data=str(data), eval_size=10))
    train, held = split_rows(cfg)
    held_prompts = {r["prompt"] for r in held}
    assert len(held) == 10 and not held_prompts & {r["prompt"] for r in train}
    assert held_prompts != {f"p{i:03d}" for i in range(35, 40)}  # not the file's tail
    assert min(int(p[1:]) for p in held_prompts) < 20 < max(int(p[1:]) for p in held_prompts)  # spread over it
    assert split_rows(cfg) == (train, held)  # the same every time
    cfg = Config(algorithm="sft", sft=SFTConfig(data=str(data), eval_size=64))
    train, held = split_rows(cfg)
    assert len(held) == 20 and "sft.data has 80 rows: holding out 20 for evaluation (sft.eval_size 64" in \
        capsys.readouterr().out


def test_a_resumed_sft_run_ends_where_an_uninterrupted_one_does(tiny_model_dir, tmp_path):
    """run.save_every writes step-N checkpoints (weights, optimizer, schedule, RNG); --resume continues from the
    newest with the same data order: 4 steps, then resumed to 6, gives the weights of 6 steps run at once, and
    log.jsonl holds each step once."""
    from safetensors.torch import load_file

    import llmrl

    def run(name, steps, resume=False):
        cfg = sft_config(tiny_model_dir, tmp_path / name, max_steps=steps, batch_size=8)
        cfg["run"]["save_every"] = 3
        return llmrl.SFTTrainer(cfg, train_dataset=ROWS, resume=resume).train()

    whole = run("whole", 6)
    assert (tmp_path / "whole" / "step-000003" / "trainer_state.pt").is_file()
    run("cut", 4)  # stands for a run killed after its step-3 checkpoint: step 4 is redone on resume
    resumed = run("cut", 6, resume=True)
    assert resumed.summary["steps"] == 6
    a = load_file(whole.output / "adapter_model.safetensors")
    b = load_file(resumed.output / "adapter_model.safetensors")
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    steps = [r["step"] for r in resumed.metrics if "loss/sft" in r]
    assert steps == [1, 2, 3, 4, 5, 6]
    assert resumed.summary["eval_loss_before"] == whole.summary["eval_loss_before"]


def test_resuming_an_sft_run_with_other_data_is_one_line(tiny_model_dir, tmp_path):
    import llmrl

    cfg = sft_config(tiny_model_dir, tmp_path / "run", max_steps=3, batch_size=8)
    cfg["run"]["save_every"] = 2
    llmrl.SFTTrainer(cfg, train_dataset=ROWS).train()
    with pytest.raises(ConfigError, match=r"--resume: sft.data is .* but the run in .* was started with"):
        llmrl.SFTTrainer(cfg, train_dataset=ROWS[:100], resume=True).train()
    with pytest.raises(ConfigError, match="already holds a run: pass --resume"):
        llmrl.SFTTrainer(cfg, train_dataset=ROWS).train()
