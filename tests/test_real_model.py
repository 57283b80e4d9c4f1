"""Through the real command line: SmolLM2-135M-Instruct (the packaged GGUF, from this session's cache) on the
conversational arithmetic recipe, then ``llmrl eval`` and a merged export that plain transformers loads; and
the conversational path with TRL's shipped rewards on a tiny chat model."""
import json
import subprocess
import sys

import pytest
import torch
from helpers import REPO, launch_ppo, subprocess_env
from safetensors import safe_open

pytestmark = pytest.mark.slow

FEW = ["run.progress=false", "train.total_steps=2", "train.rollout_batch_size=4", "train.mini_batch_size=4",
       "train.micro_batch_size=4", "train.epochs=1", "generation.max_new_tokens=6", "data.eval_size=4",
       "run.save_every=1", "run.device=cpu"]


def llmrl(*args, timeout=600):
    return subprocess.run([sys.executable, "-m", "llmrl", *map(str, args)], capture_output=True, text=True,
                          timeout=timeout, cwd=REPO, env=subprocess_env())


def test_smollm2_recipe_trains_evaluates_and_exports(smollm2_dir, tmp_path):
    run = tmp_path / "run"
    out = launch_ppo([*FEW, f"run.output_dir={run}"], ranks=0, config=REPO / "configs" / "smollm2.yaml")
    assert out.returncode == 0, out.stderr[-3000:]
    assert "converting" not in out.stdout  # the session's cache already holds the converted checkpoint
    summary = json.loads((run / "summary.json").read_text())
    assert summary["steps"] == 2 and 0.0 <= summary["eval_reward_after"] <= 1.0
    final = run / "final"
    # no pad token was added: the adapter holds LoRA matrices only, no copy of the 49k x 576 embedding
    with safe_open(final / "adapter" / "adapter_model.safetensors", "pt") as f:
        keys = list(f.keys())
    assert keys and all("lora_" in k for k in keys), [k for k in keys if "lora_" not in k][:3]
    assert (final / "adapter" / "adapter_model.safetensors").stat().st_size < 12e6
    tokenizer_config = json.loads((final / "tokenizer" / "tokenizer_config.json").read_text())
    assert tokenizer_config["pad_token"] == "<|endoftext|>" and tokenizer_config["eos_token"] == "<|im_end|>"

    evaluated = llmrl("eval", "--checkpoint", final, "--samples", 4)
    assert evaluated.returncode == 0, evaluated.stderr[-3000:]
    result = json.loads((final / "eval" / "eval.json").read_text())
    assert result["prompts"] == 4 and result["reward_after"] == pytest.approx(summary["eval_reward_after"])

    merged = tmp_path / "merged"
    exported = llmrl("export", "--checkpoint", final, "--out", merged)
    assert exported.returncode == 0, exported.stderr[-3000:]
    # plain transformers, in a process where llmrl and peft cannot be imported: its greedy answers to the
    # held-out conversations are the ones llmrl's evaluation gave
    script = (
        "import json, sys, torch\n"
        "sys.modules['peft'] = None; sys.modules['llmrl'] = None\n"
        "from transformers import AutoModelForCausalLM, AutoTokenizer\n"
        f"tok = AutoTokenizer.from_pretrained({str(merged)!r}); tok.padding_side = 'left'\n"
        f"model = AutoModelForCausalLM.from_pretrained({str(merged)!r}, dtype=torch.float32)\n"
        f"rows = [json.loads(l) for l in open({str(REPO / 'configs/data/arithmetic_eval.jsonl')!r})]\n"
        "questions = json.loads(sys.argv[1])\n"
        "prompts = [r['prompt'] for r in rows if r['prompt'][-1]['content'] in questions]\n"
        "texts = [tok.apply_chat_template(p, tokenize=False, add_generation_prompt=True) for p in prompts]\n"
        "enc = tok(texts, return_tensors='pt', padding=True, add_special_tokens=False)\n"
        "out = model.generate(**enc, max_new_tokens=6, do_sample=False)\n"
        "answers = tok.batch_decode(out[:, enc['input_ids'].shape[1]:], skip_special_tokens=True)\n"
        "print(json.dumps(dict(zip([p[-1]['content'] for p in prompts], answers))))\n")
    questions = [s["prompt"] for s in result["samples"]]
    plain = subprocess.run([sys.executable, "-c", script, json.dumps(questions)], capture_output=True, text=True,
                           timeout=300, env=subprocess_env())
    assert plain.returncode == 0, plain.stderr[-3000:]
    answers = json.loads(plain.stdout.strip().splitlines()[-1])
    assert answers == {s["prompt"]: s["after"] for s in result["samples"]}


def test_conversations_with_trls_shipped_rewards_through_the_command_line(chat_model_dir, tmp_path):
    from test_chat import write_chat_data

    data = write_chat_data(tmp_path / "chat.jsonl")
    run = tmp_path / "run"
    components = ("[{function: 'trl.rewards:think_format_reward'}, {function: 'trl.rewards:accuracy_reward'}, "
                  "{function: 'trl.rewards:get_soft_overlong_punishment', "
                  "factory_kwargs: {max_completion_len: 12, soft_punish_cache: 8}, weight: 0.5}]")
    out = launch_ppo([*FEW, f"run.output_dir={run}", f"model.name_or_path={chat_model_dir}", f"data.source={data}",
                      "data.max_prompt_length=64", "reward.function=", f"reward.components={components}",
                      "generation.max_new_tokens=8", "algorithm=grpo", "critic_free.num_generations=2"],
                     ranks=0)
    assert out.returncode == 0, out.stderr[-3000:]
    rows = [json.loads(line) for line in (run / "log.jsonl").read_text().splitlines()]
    step = [r for r in rows if "reward/mean" in r][-1]
    for name in ("think_format_reward", "accuracy_reward", "get_soft_overlong_punishment"):
        assert step[f"reward/{name}/mean"] is not None and step[f"reward/{name}/none_rate"] == 0.0
    # at most 8 new tokens: (12 - 8 - length) / 8 >= -0.5; completion_ids padded past 8 tokens would go below
    assert -0.5 <= step["reward/get_soft_overlong_punishment/mean"] <= 0.0
    samples = [r for r in rows if "samples" in r][-1]["samples"]
    assert all(s["prompt"] in {f"What is {a} + {b}?" for a in range(1, 5) for b in range(1, 5)} for s in samples)
    evaluated = llmrl("eval", "--checkpoint", run / "final", "--samples", 2)
    assert evaluated.returncode == 0, evaluated.stderr[-3000:]
    assert json.loads((run / "final" / "eval" / "eval.json").read_text())["prompts"] == 4
    assert torch.load(run / "final" / "trainer_state.pt", weights_only=True)["step"] == 2
