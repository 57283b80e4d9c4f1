"""Full fine-tuning of the RL algorithms (lora: null): every weight trains, the value head too, the reference is a
frozen copy of the starting model, and checkpoints resume and export. Tiny models built in-process."""
import pytest
import torch

from helpers import make_trainer, tiny_config


def reference_logits(trainer, ids):
    with torch.no_grad(), trainer.policy.reference():
        return trainer.policy(ids, torch.ones_like(ids), with_values=False)[0]


@pytest.mark.parametrize("algorithm", ["ppo", "grpo"])
def test_full_fine_tuning_trains_every_weight_and_keeps_the_reference(tiny_model_dir, tmp_path, algorithm):
    trainer = make_trainer(tiny_config(tiny_model_dir, tmp_path / "run", "lora=null", f"algorithm={algorithm}",
                                       "train.lr=1e-3"))
    policy = trainer.policy
    assert policy.full_fine_tuning and not hasattr(policy.model, "peft_config")
    ids = trainer.tokenizer(["abc>", "fed>"], return_tensors="pt")["input_ids"]
    ref_before = reference_logits(trainer, ids)
    before = {n: p.detach().clone() for n, p in policy.named_parameters()}
    assert all(p.requires_grad for p in policy.parameters())
    stats = trainer.train_step()
    after = dict(policy.named_parameters())
    unchanged = [n for n in before if torch.equal(before[n], after[n])]
    if algorithm == "ppo":
        assert unchanged == [], unchanged  # every weight of the model moved, the value head too
    else:  # no critic: the value head is not in the loss
        assert all(n.startswith("value_head") for n in unchanged), unchanged
    assert stats["objective/kl"] == pytest.approx(0.0, abs=1e-6)  # first rollout: policy == its frozen copy
    assert torch.equal(reference_logits(trainer, ids), ref_before)  # the reference stays fixed
    with torch.no_grad():
        assert not torch.allclose(policy(ids, torch.ones_like(ids), with_values=False)[0], ref_before)
    # the frozen copy is neither trained nor part of the policy's parameters (nor of a checkpoint)
    assert len(list(policy.parameters())) == len(before)


def test_full_fine_tuning_checkpoints_resume_and_export(tiny_model_dir, tmp_path):
    from transformers import AutoModelForCausalLM

    import llmrl

    cfg = tiny_config(tiny_model_dir, tmp_path / "run", "lora=null")
    trainer = make_trainer(cfg)
    trainer.train_step()
    trainer.eval_reward_before = 0.0
    path = trainer.save_checkpoint(tmp_path / "run" / "step-1")
    assert (path / "model" / "model.safetensors").is_file() and not (path / "adapter").exists()
    fresh = make_trainer(cfg)
    fresh.load_checkpoint(path)
    trained = dict(trainer.policy.named_parameters())
    assert all(torch.equal(p, trained[n]) for n, p in fresh.policy.named_parameters())
    ids = trainer.tokenizer(["abc>"], return_tensors="pt")["input_ids"]
    assert torch.equal(reference_logits(fresh, ids), reference_logits(trainer, ids))  # still the starting model
    llmrl.export(path, tmp_path / "exported")
    from llmrl.exporter import verify_export

    assert verify_export(tmp_path / "exported") >= 3  # checksums written, as for a merged export
    plain = AutoModelForCausalLM.from_pretrained(tmp_path / "exported")
    with torch.no_grad():
        expected = trainer.policy(ids, torch.ones_like(ids), with_values=False)[0]
        assert torch.allclose(plain(input_ids=ids).logits, expected, atol=1e-5)


def test_full_fine_tuning_dpo_step_keeps_the_reference(tiny_model_dir, tmp_path):
    from llmrl.distributed.strategy import SingleProcess
    from llmrl.models.policy import build_policy
    from llmrl.trainers.dpo import DPOTrainer, load_pairs
    from helpers import REPO

    cfg = tiny_config(tiny_model_dir, tmp_path / "run", "lora=null", "algorithm=dpo", "dpo.batch_size=4",
                      f"dpo.data={REPO / 'configs/data/reverse_prefs.jsonl'}")
    strategy = SingleProcess("cpu")
    policy, tok = build_policy(cfg.model, cfg.lora, strategy.device)
    trainer = DPOTrainer(cfg, policy, tok, load_pairs(cfg.dpo.data), [], strategy, tmp_path / "run", None)
    ids = tok(["abc>"], return_tensors="pt")["input_ids"]
    ref = reference_logits(trainer, ids)
    stats = trainer.train_step()
    assert stats["loss/dpo"] == pytest.approx(0.6931, abs=1e-3)  # log 2: policy == reference at the first step
    assert torch.equal(reference_logits(trainer, ids), ref)
    with torch.no_grad():
        assert not torch.allclose(policy(ids, torch.ones_like(ids), with_values=False)[0], ref)


def test_full_fine_tuning_from_the_command_line_resumes_exports_and_evaluates(tiny_model_dir, tmp_path):
    import json
    import subprocess
    import sys

    from helpers import REPO, subprocess_env

    run = tmp_path / "run"
    common = ["--config", str(REPO / "configs/tiny.yaml"), "lora=null", f"model.name_or_path={tiny_model_dir}",
              "warm_start=null", f"run.output_dir={run}", "train.rollout_batch_size=8", "train.mini_batch_size=8",
              "train.micro_batch_size=8", "train.epochs=1", "data.eval_size=8", "run.progress=false",
              "run.save_every=1", "run.eval_every=0", "run.threads=1"]

    def llmrl(*args):
        out = subprocess.run([sys.executable, "-m", "llmrl", *args], capture_output=True, text=True,
                             env=subprocess_env(), timeout=600)
        assert out.returncode == 0, out.stderr[-3000:]
        return out

    llmrl("train", *common, "train.total_steps=2")
    assert "resumed from" in llmrl("train", *common, "train.total_steps=3", "--resume").stdout
    assert json.loads((run / "summary.json").read_text())["steps"] == 3
    out = llmrl("export", "--checkpoint", str(run / "final"), "--out", str(tmp_path / "exported")).stdout
    assert (tmp_path / "exported" / "model.safetensors").is_file()
    assert "nothing to merge" in out and "merged model" not in out  # not a merge's difference to base + adapter
    card = (tmp_path / "exported" / "README.md").read_text()
    assert "on all weights" in card and "| weights | all trained (lora: null)" in card and "| LoRA |" not in card
    assert "KL to base" in llmrl("eval", "--checkpoint", str(run / "final")).stdout


@pytest.mark.slow
def test_full_fine_tuning_on_two_zero3_ranks_saves_a_whole_trained_model(tiny_model_dir, tmp_path):
    """lora: null under DeepSpeed ZeRO-3, whose weights are partitioned over the ranks: the run trains, and the
    checkpoint's model/ holds every weight whole (gathered), each moved from the start."""
    from transformers import AutoModelForCausalLM

    from helpers import launch_ppo

    out = launch_ppo([f"model.name_or_path={tiny_model_dir}", "warm_start=null", "lora=null",
                      "deepspeed.zero_stage=3", "train.total_steps=1", "train.rollout_batch_size=8",
                      "train.mini_batch_size=8", "train.micro_batch_size=4", "train.epochs=1", "data.eval_size=8",
                      "run.progress=false", "run.eval_every=0", "train.lr=1e-3", f"run.output_dir={tmp_path / 'run'}"])
    assert out.returncode == 0, out.stderr[-3000:]
    assert "strategy: DeepSpeed ZeRO-3, 2 ranks" in out.stdout
    start = dict(AutoModelForCausalLM.from_pretrained(tiny_model_dir).named_parameters())
    trained = dict(AutoModelForCausalLM.from_pretrained(tmp_path / "run" / "final" / "model").named_parameters())
    assert trained.keys() == start.keys()
    assert all(trained[n].shape == start[n].shape and not torch.equal(trained[n], start[n]) for n in start)
