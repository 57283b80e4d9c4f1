"""Export of an ILQL policy by distillation: the adapter learns to imitate logits + beta * (Q - V) on the logged
prompts (the KL to the ILQL policy falls, the base is untouched), and the distilled checkpoint exports to a folder
that plain transformers loads and that decodes as the distilled adapter does."""
import json
import math
import random
import shutil

import pytest
import torch
from helpers import make_trainer, tiny_config

from llmrl.config import ConfigError, GenerationConfig
from llmrl.models.ilql_heads import HEADS_FILE, ILQLHeads
from llmrl.models.policy import build_policy
from llmrl.rollout.ilql import ilql_generate
from llmrl.trainers.ilql_distill import (distill_checkpoint, distill_ilql, per_token_kl, read_report,
                                        teacher_logprobs)

rng = random.Random(0)
PROMPTS = ["".join(rng.choice("abcdef") for _ in range(rng.randint(3, 5))) + ">" for _ in range(48)]


def random_heads(hidden, vocab, seed=0, scale=0.3):
    torch.manual_seed(seed)
    heads = ILQLHeads(hidden, vocab)
    with torch.no_grad():
        for head in [*heads.target_q_heads, heads.v_head]:
            head[2].weight.normal_(0, scale)
    return heads


def test_per_token_kl_on_a_hand_worked_case():
    # teacher (0.5, 0.5), student softmax(0, ln 3) = (0.25, 0.75):
    # KL = 0.5 ln(0.5 / 0.25) + 0.5 ln(0.5 / 0.75) = 0.5 ln(4 / 3) = 0.1438410...; the masked token counts nothing
    teacher = torch.tensor([[[0.5, 0.5], [0.9, 0.1]]]).log()
    student = torch.tensor([[[0.0, math.log(3.0)], [0.0, 0.0]]])
    total, count = per_token_kl(teacher, student, torch.tensor([[1.0, 0.0]]))
    assert count.item() == 1 and total.item() == pytest.approx(0.5 * math.log(4 / 3), abs=1e-6)


def test_distillation_moves_the_adapter_towards_the_ilql_policy_and_leaves_the_base(tiny_model_dir, tmp_path):
    cfg = tiny_config(tiny_model_dir, tmp_path)
    policy, tok = build_policy(cfg.model, cfg.lora, torch.device("cpu"))
    model = policy.model
    heads = random_heads(model.config.hidden_size, len(tok))
    frozen = {n: p.detach().clone() for n, p in model.named_parameters() if not p.requires_grad}
    adapter = {n: p.detach().clone() for n, p in model.named_parameters() if p.requires_grad}
    # the teacher's distribution sits at the right positions: its argmax along its own greedy completions is them
    greedy = ilql_generate(model, heads, tok, PROMPTS[40:], 1.0, 20, greedy=True, max_new_tokens=8)
    choice = teacher_logprobs(model, heads, adapter, greedy, 1.0).argmax(-1)
    assert torch.equal(choice[greedy.response_mask.bool()], greedy.response[greedy.response_mask.bool()])
    report = distill_ilql(model, heads, tok, PROMPTS[:40], PROMPTS[40:], beta=1.0, top_k=20, steps=100, lr=5e-3,
                          batch_size=16, cfg=GenerationConfig(max_new_tokens=8))
    assert report.kl_before > 0.1  # the shift is far from nothing: there is something to learn
    assert report.kl_after <= 0.5 * report.kl_before, report
    assert report.accuracy_after > report.accuracy_before + 0.2, report
    assert report.loss_last < 0.5 * report.loss_first
    # only the adapter trained: the base (the reference of later runs) and the heads are as they were
    assert all(torch.equal(p, frozen[n]) for n, p in model.named_parameters() if n in frozen)
    assert any(not torch.equal(p, adapter[n]) for n, p in model.named_parameters() if n in adapter)
    assert all("lora_" in n for n in adapter)


@pytest.fixture(scope="module")
def ilql_checkpoint(tiny_model_dir, tmp_path_factory):
    """A checkpoint as an ILQL run leaves it: adapter, config naming the logged answers, and the heads."""
    run_dir = tmp_path_factory.mktemp("run")
    logged = run_dir.parent / "logged.jsonl"
    logged.write_text("".join(json.dumps({"prompt": p, "completion": p[-2::-1], "reward": 1.0}) + "\n"
                              for p in PROMPTS))
    trainer = make_trainer(tiny_config(tiny_model_dir, run_dir, f"ilql.data={logged}", "ilql.beta=1.0"))
    path = trainer.save_checkpoint(run_dir / "final")
    random_heads(trainer.policy.model.config.hidden_size, len(trainer.tokenizer)).save(path / HEADS_FILE)
    return path


def test_a_distilled_checkpoint_exports_to_a_plain_model_that_decodes_as_the_student(ilql_checkpoint, tmp_path,
                                                                                      capsys):
    from transformers import AutoModelForCausalLM

    from llmrl.cli.export import main
    from llmrl.exporter import load_adapted_model

    distilled = tmp_path / "distilled"
    report = distill_checkpoint(ilql_checkpoint, distilled, steps=20, lr=5e-3, held_out=8)
    assert report.held_out_prompts == 8 and report.train_prompts == len(set(PROMPTS)) - 8  # distinct prompts
    assert report.kl_after < report.kl_before
    assert read_report(distilled) == report and not (distilled / HEADS_FILE).exists()
    assert main(["--checkpoint", str(distilled), "--out", str(tmp_path / "out")]) == 0
    card = (tmp_path / "out" / "README.md").read_text()
    assert "Distilled from the ILQL policy" in card and f"{report.kl_after:.4g}" in card

    plain = AutoModelForCausalLM.from_pretrained(tmp_path / "out").eval()
    student, tok, _ = load_adapted_model(distilled)
    enc = tok(PROMPTS[40:], return_tensors="pt", padding=True, add_special_tokens=False)
    settings = dict(max_new_tokens=8, do_sample=False, pad_token_id=tok.pad_token_id, eos_token_id=tok.eos_token_id)
    with torch.no_grad():
        exported = plain.generate(**enc, **settings)
        adapted = student.generate(**enc, **settings)
        base = AutoModelForCausalLM.from_pretrained(student.peft_config["default"].base_model_name_or_path).eval()
        untouched = base.generate(**enc, **settings)
    assert torch.equal(exported, adapted)
    assert not torch.equal(exported, untouched)  # the distilled adapter is in the export: it decodes otherwise


def test_the_export_command_distils_an_ilql_checkpoint_and_refuses_to_drop_its_heads_silently(ilql_checkpoint,
                                                                                            tmp_path, capsys):
    from llmrl.cli.export import main

    assert main(["--checkpoint", str(ilql_checkpoint), "--out", str(tmp_path / "plain")]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "ILQL run" in err[0] and "--distill-steps N" in err[0] and "Traceback" not in err[0]
    assert not (tmp_path / "plain").exists()

    assert main(["--checkpoint", str(ilql_checkpoint), "--out", str(tmp_path / "lm"), "--distill-steps", "0"]) == 0
    assert "ILQL heads not exported" in (tmp_path / "lm" / "README.md").read_text()

    assert main(["--checkpoint", str(ilql_checkpoint), "--out", str(tmp_path / "out"), "--distill-steps", "3"]) == 0
    out = capsys.readouterr().out
    assert "distilled the ILQL policy: KL per token on held-out prompts" in out
    assert "Distilled from the ILQL policy" in (tmp_path / "out" / "README.md").read_text()


def test_bad_distillation_settings_are_one_line(ilql_checkpoint, tmp_path):
    for kwargs, fragment in [(dict(steps=0), "--distill-steps"), (dict(steps=2, lr=float("nan")), "--distill-lr"),
                             (dict(steps=2, held_out=48), "distinct prompts")]:
        with pytest.raises(ConfigError, match=fragment):
            distill_checkpoint(ilql_checkpoint, tmp_path / "d", **kwargs)
    ppo = tmp_path / "ppo"
    shutil.copytree(ilql_checkpoint, ppo)
    (ppo / HEADS_FILE).unlink()
    with pytest.raises(ConfigError, match="holds no ilql_heads"):
        distill_checkpoint(ppo, tmp_path / "d", steps=2)
    assert not (tmp_path / "d").exists()
