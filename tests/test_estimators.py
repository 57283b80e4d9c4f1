"""The estimator registry and the three estimators added through it (Dr. GRPO, DAPO, GSPO): their maths by hand
and against plain loops, inside the trainer, through the command line, and an estimator defined outside llmrl."""
import json
import math

import pytest
import torch

from helpers import launch_ppo, make_trainer, tiny_config, training_rows
from llmrl import rl
from llmrl.algorithms import ESTIMATORS, Estimator, estimator_class
from llmrl.config import ConfigError


def test_clip_higher_widens_only_the_upper_clip():
    # one token each; A = +1 with ratio 1.25, A = -1 with ratio 0.75
    old = torch.zeros(2, 1)
    new = torch.log(torch.tensor([[1.25], [0.75]]))
    adv, mask = torch.tensor([[1.0], [-1.0]]), torch.ones(2, 1)
    # PPO, eps 0.2: max(-1.25, -1.2) = -1.2 and max(0.75, 0.8) = 0.8 -> mean -0.2
    loss, stats = rl.policy_loss(new, old, adv, mask, 0.2)
    assert loss.item() == pytest.approx(-0.2) and stats["clipfrac"].item() == pytest.approx(1.0)
    # clip-higher 0.28: 1.25 is inside [0.8, 1.28], so -1.25; the lower side is unchanged, 0.8 -> mean -0.225
    loss, stats = rl.policy_loss(new, old, adv, mask, 0.2, clip_range_high=0.28)
    assert loss.item() == pytest.approx(-0.225) and stats["clipfrac"].item() == pytest.approx(0.5)


def test_informative_groups_by_hand():
    scores = torch.tensor([1.0, 1.0, 0.0, 1.0, 0.0, 0.0, 0.5, 0.2])
    # groups of 2: [1, 1] alike, [0, 1] differ, [0, 0] alike, [0.5, 0.2] differ
    kept = rl.informative_groups(scores, 2)
    assert kept.tolist() == [False, False, True, True, False, False, True, True]
    # a skipped sample counts neither way: [0, 1] with the 1 skipped leaves one score, nothing to compare
    valid = torch.tensor([True, True, True, False, True, True, True, True])
    assert rl.informative_groups(scores, 2, valid).tolist() == [False, False, False, False, False, False, True, True]
    with pytest.raises(ValueError, match="groups of 3"):
        rl.informative_groups(scores, 3)


def sequence_loss_loop(logprobs, old, adv, mask, low, high, divisor):
    """GSPO's loss written sequence by sequence, token by token."""
    total = 0.0
    for i in range(logprobs.shape[0]):
        tokens = [t for t in range(logprobs.shape[1]) if mask[i, t] > 0]
        if not tokens:
            continue
        s = torch.exp(sum(logprobs[i, t] - old[i, t] for t in tokens) / len(tokens))
        a = adv[i, tokens[0]]
        total = total + torch.maximum(-a * s, -a * torch.clamp(s, 1 - low, 1 + high))
    return total / divisor


def test_sequence_policy_loss_by_hand_and_against_a_loop():
    # one sequence of two tokens with log-ratios 0.1 and 0.3: s = exp(0.2) = 1.2214; A = 1
    old = torch.zeros(1, 2)
    new = torch.tensor([[0.1, 0.3]])
    loss, stats = rl.sequence_policy_loss(new, old, torch.ones(1, 2), torch.ones(1, 2), 3e-4, 4e-4)
    assert loss.item() == pytest.approx(-(1 + 4e-4))  # clipped: -min(1.2214, 1.0004)
    assert stats["ratio"].item() == pytest.approx(math.exp(0.2), rel=1e-6) and stats["clipfrac"].item() == 1.0
    # unclipped with wide ranges: -1.2214
    loss, _ = rl.sequence_policy_loss(new, old, torch.ones(1, 2), torch.ones(1, 2), 0.5, 0.5)
    assert loss.item() == pytest.approx(-math.exp(0.2), rel=1e-6)

    torch.manual_seed(0)
    B, T = 6, 5
    mask = torch.tensor([[1, 1, 1, 0, 0], [1, 1, 1, 1, 1], [1, 0, 0, 0, 0], [0, 0, 0, 0, 0], [1, 1, 0, 0, 0],
                         [1, 1, 1, 1, 0]], dtype=torch.float32)
    old = torch.randn(B, T) * 0.1 - 2
    adv = torch.randn(B).unsqueeze(1) * mask
    for low, high in ((3e-4, 4e-4), (0.2, 0.2)):
        new = (old + torch.randn(B, T) * 0.01).requires_grad_()
        loss, _ = rl.sequence_policy_loss(new, old, adv, mask, low, high, num_sequences=8)
        (grad,) = torch.autograd.grad(loss, new)
        new_loop = new.detach().clone().requires_grad_()
        reference = sequence_loss_loop(new_loop, old, adv, mask, low, high, 8)
        (grad_loop,) = torch.autograd.grad(reference, new_loop)
        assert loss.item() == pytest.approx(reference.item(), abs=1e-7)
        assert torch.allclose(grad, grad_loop, atol=1e-7)
        assert grad[3].abs().sum() == 0 and (grad * (1 - mask)).abs().sum() == 0  # no tokens, no gradient


def test_the_registry_holds_every_built_in_and_checks_their_settings(tiny_model_dir, tmp_path):
    assert list(ESTIMATORS) == ["ppo", "grpo", "rloo", "reinforce", "dr_grpo", "dapo", "gspo", "cispo", "sapo"]
    for name in ("dr_grpo", "dapo", "gspo", "cispo", "sapo"):
        with pytest.raises(ConfigError, match=rf"critic_free.num_generations is 1: {name.upper()} needs at least 2"):
            tiny_config(tiny_model_dir, tmp_path, f"algorithm={name}", "critic_free.num_generations=1")
    with pytest.raises(ConfigError, match="critic_free.clip_range_high is 0.1: DAPO's upper clip must be >= "
                                          "ppo.clip_range = 0.2"):
        tiny_config(tiny_model_dir, tmp_path, "algorithm=dapo", "critic_free.clip_range_high=0.1")
    with pytest.raises(ConfigError, match=r"critic_free.sequence_clip_low is 1.5: must be in \(0, 1\)"):
        tiny_config(tiny_model_dir, tmp_path, "algorithm=gspo", "critic_free.sequence_clip_low=1.5")
    with pytest.raises(ConfigError, match="critic_free.sapo_tau_neg is 0.5: must be >= critic_free.sapo_tau_pos"):
        tiny_config(tiny_model_dir, tmp_path, "algorithm=sapo", "critic_free.sapo_tau_neg=0.5")
    with pytest.raises(ConfigError, match="critic_free.clip_range_high is 0.0: CISPO caps the weight"):
        tiny_config(tiny_model_dir, tmp_path, "algorithm=cispo", "critic_free.clip_range_high=0")
    with pytest.raises(ConfigError, match="algorithm is 'grpoo': use ppo, grpo, rloo, reinforce, dr_grpo, dapo, "
                                          "gspo, cispo, sapo, dpo, kto, ilql, sft, or name an Estimator subclass"):
        tiny_config(tiny_model_dir, tmp_path, "algorithm=grpoo")


def test_dr_grpo_centres_and_divides_by_a_constant(tiny_model_dir, tmp_path):
    trainer = make_trainer(tiny_config(tiny_model_dir, tmp_path / "run", "algorithm=dr_grpo",
                                       "critic_free.num_generations=2", "generation.max_new_tokens=4"))
    est = trainer.estimator
    # groups [1, 0] and [3, 1]: centred only, no std -> [0.5, -0.5, 1, -1] (GRPO would give +-0.7071 each)
    adv = est.sequence_advantages(torch.tensor([1.0, 0.0, 3.0, 1.0]), torch.ones(4, dtype=torch.bool))
    assert adv.tolist() == [0.5, -0.5, 1.0, -1.0]
    # two sequences of 1 and 3 tokens, A = +1 and -1, ratio 1: the token sum -(1 - 3) = 2 over
    # 2 sequences x 4 max tokens = 0.25 (a token mean, GRPO's, would give 2 / 4 = 0.5)
    mask = torch.tensor([[1.0, 0, 0, 0], [1, 1, 1, 0]])
    lp = torch.zeros(2, 4)
    loss, _ = est.policy_loss(lp, lp, torch.tensor([[1.0], [-1.0]]) * mask, mask, mask.sum(), 2)
    assert loss.item() == pytest.approx(0.25)
    grpo = make_trainer(tiny_config(tiny_model_dir, tmp_path / "run2", "algorithm=grpo",
                                    "critic_free.num_generations=2")).estimator
    assert grpo.policy_loss(lp, lp, torch.tensor([[1.0], [-1.0]]) * mask, mask, mask.sum(), 2)[0].item() == \
        pytest.approx(0.5)


def test_dapo_trains_only_on_groups_whose_scores_differ(tiny_model_dir, tmp_path):
    # The reward scores a completion 1 if the prompt starts with "a" and it is long, else 0: every group of a
    # prompt that does not start with "a" scores all 0 and must be dropped from the update.
    (tmp_path / "rw.py").write_text("def r(prompts, completions, **kwargs):\n"
                                    "    return [float(p.startswith('a') and len(c) > 2) for p, c in "
                                    "zip(prompts, completions)]\n")
    trainer = make_trainer(tiny_config(tiny_model_dir, tmp_path / "run", "algorithm=dapo",
                                       "critic_free.num_generations=4", f"reward.function={tmp_path / 'rw.py'}:r",
                                       "train.rollout_batch_size=16", "train.mini_batch_size=8"))
    rows = trainer.rows_for_step(0)
    exp, stats = trainer.make_experience(rows)
    scores = exp.scores.view(-1, 4)
    informative = (scores.max(1).values > scores.min(1).values).repeat_interleave(4)
    trained = exp.loss_mask.sum(1) > 0
    assert not informative.all()  # the prompts that do not start with "a" gave uniform groups
    assert torch.equal(trained, informative)  # exactly the groups whose scores differ
    assert stats["train/kept"] == pytest.approx(informative.float().mean().item())
    assert (exp.advantages[~informative] == 0).all()
    assert stats["response/length"] > 0  # statistics still count every scored completion


EXTERNAL = '''
import torch
from llmrl.algorithms import SequenceEstimator

calls = []


class SignEstimator(SequenceEstimator):
    """+1 above the group's mean, -1 below: defined outside llmrl."""

    name, kl_in_reward = "sign", False

    def sequence_advantages(self, scores, valid):
        calls.append(scores.numel())
        g = scores.view(-1, self.group_size)
        return torch.sign(g - g.mean(dim=1, keepdim=True)).flatten()
'''


def test_an_estimator_defined_outside_llmrl_plugs_in_by_path(tiny_model_dir, tmp_path):
    path = tmp_path / "my_estimators.py"
    path.write_text(EXTERNAL)
    spec = f"{path}:SignEstimator"
    cls = estimator_class(spec)
    assert issubclass(cls, Estimator) and cls.name == "sign"
    trainer = make_trainer(tiny_config(tiny_model_dir, tmp_path / "run", f"algorithm={spec}",
                                       "critic_free.num_generations=2"))
    assert trainer.cfg.group_size == 2 and type(trainer.estimator) is cls
    exp, _ = trainer.make_experience(trainer.rows_for_step(0))
    g = exp.scores.view(-1, 2)
    expected = torch.sign(g - g.mean(dim=1, keepdim=True)).flatten()
    assert torch.equal(exp.advantages[:, 0], expected)  # the trainer trains on the outside estimator's advantages
    assert cls.sequence_advantages.__globals__["calls"] == [8]  # once, for the rollout of 8 completions

    (tmp_path / "not_one.py").write_text("class Plain:\n    pass\n")
    with pytest.raises(ConfigError, match="is not a subclass of llmrl.algorithms.Estimator"):
        tiny_config(tiny_model_dir, tmp_path, f"algorithm={tmp_path / 'not_one.py'}:Plain")
    with pytest.raises(ConfigError, match="has no callable named 'Nope'"):
        tiny_config(tiny_model_dir, tmp_path, f"algorithm={path}:Nope")


def test_eval_refuses_an_estimator_named_by_a_checkpoint(tiny_model_dir, tmp_path):
    """A checkpoint's config.yaml that names an estimator file: loading the config would import it."""
    import yaml

    from llmrl.config import save_config
    from llmrl.trainers.evaluate import evaluate_checkpoint

    marker = tmp_path / "imported"
    (tmp_path / "evil.py").write_text(f"open({str(marker)!r}, 'w')\n" + EXTERNAL)
    checkpoint = tmp_path / "final"
    (checkpoint / "adapter").mkdir(parents=True)
    cfg = tiny_config(tiny_model_dir, tmp_path / "run", "algorithm=grpo")
    save_config(cfg, checkpoint / "config.yaml")
    data = yaml.safe_load((checkpoint / "config.yaml").read_text())
    data["algorithm"] = f"{tmp_path / 'evil.py'}:SignEstimator"
    (checkpoint / "config.yaml").write_text(yaml.safe_dump(data))
    with pytest.raises(ConfigError, match=r"asks for algorithm = .*evil.py:SignEstimator' \(an estimator's code\).*"
                                          r"pass --trust-checkpoint-code"):
        evaluate_checkpoint(checkpoint)
    assert not marker.exists()


@pytest.mark.slow
@pytest.mark.parametrize("algorithm", ["dr_grpo", "dapo", "gspo", "cispo", "sapo"])
def test_the_new_estimators_train_through_the_command_line(tiny_model_dir, tmp_path, algorithm):
    run = tmp_path / "run"
    out = launch_ppo([f"model.name_or_path={tiny_model_dir}", f"run.output_dir={run}", f"algorithm={algorithm}",
                      "critic_free.num_generations=4", "train.total_steps=3", "train.rollout_batch_size=16",
                      "train.mini_batch_size=8", "train.micro_batch_size=8", "data.eval_size=16", "run.eval_every=0",
                      "run.progress=false", "train.lr=3e-3"], ranks=0)
    assert out.returncode == 0, out.stderr[-3000:]
    rows = training_rows(run)
    assert [r["step"] for r in rows] == [1, 2, 3]
    assert all(math.isfinite(r["loss/policy"]) for r in rows) and any(r["optim/grad_norm"] > 0 for r in rows)
    assert "loss/value" not in rows[0] and "value/mean" not in rows[0]
    if algorithm == "dapo":  # no KL term: the KL is information, with no coefficient
        assert "info/kl_ref" in rows[0] and "objective/kl_coef" not in rows[0]
    else:  # the k3 loss term's weight, critic_free.kl_coef
        assert rows[0]["objective/kl_coef"] == 0.04 and all(r["objective/kl"] >= 0 for r in rows)
    summary = json.loads((run / "summary.json").read_text())
    assert summary["steps"] == 3
