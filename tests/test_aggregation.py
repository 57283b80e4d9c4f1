"""The loss aggregation modes and the gated losses (CISPO, SAPO) of ``llmrl.rl``, against hand-worked values."""
import math

import pytest
import torch

from llmrl import rl

X = torch.tensor([[1.0, 2.0, 3.0], [4.0, 5.0, 0.0], [6.0, 0.0, 0.0], [9.0, 9.0, 9.0]])
MASK = torch.tensor([[1.0, 1.0, 1.0], [1.0, 1.0, 0.0], [1.0, 0.0, 0.0], [0.0, 0.0, 0.0]])  # the last row: skipped


def test_the_three_modes_by_hand():
    # tokens: 1+2+3 + 4+5 + 6 = 21 over 6 tokens
    assert rl.aggregate(X, MASK, "token_mean").item() == pytest.approx(21 / 6)
    # sequences: (6/3 + 9/2 + 6/1) / 3 rows with a token
    assert rl.aggregate(X, MASK, "sequence_mean").item() == pytest.approx((2 + 4.5 + 6) / 3)
    # Dr. GRPO: the token sum over a constant
    assert rl.aggregate(X, MASK, "token_sum", constant=4 * 5).item() == pytest.approx(21 / 20)
    with pytest.raises(ValueError, match="unknown loss aggregation 'mean'"):
        rl.aggregate(X, MASK, "mean")


@pytest.mark.parametrize("mode", rl.AGGREGATIONS)
def test_microbatches_with_the_minibatchs_divisors_sum_to_the_whole(mode):
    whole = rl.aggregate(X, MASK, mode, num_tokens=MASK.sum(), num_sequences=4, constant=4 * 5)
    halves = [rl.aggregate(X[i:i + 2], MASK[i:i + 2], mode, num_tokens=MASK.sum(), num_sequences=4, constant=4 * 5)
              for i in (0, 2)]
    assert (halves[0] + halves[1]).item() == pytest.approx(whole.item())


def test_cispo_keeps_the_gradient_of_tokens_ppo_would_clip():
    old = torch.tensor([[-1.0, -1.0]])
    new = (old + torch.tensor([[0.5, 0.0]])).requires_grad_()  # ratio e^0.5 = 1.65 > 1.28, then exactly 1
    adv, mask = torch.tensor([[2.0, 2.0]]), torch.ones(1, 2)
    loss, stats = rl.cispo_loss(new, old, adv, mask, 0.28, aggregation="token_mean")
    # loss = -(min(1.65, 1.28) * 2 * (-0.5) + 1 * 2 * (-1)) / 2
    assert loss.item() == pytest.approx(-(1.28 * 2 * -0.5 + 1.0 * 2 * -1.0) / 2)
    loss.backward()
    # d/d logprob: -sg(weight) * A / N: the capped token keeps a gradient (PPO's clipped term has none)
    assert new.grad[0].tolist() == pytest.approx([-1.28 * 2 / 2, -1.0 * 2 / 2])
    assert stats["clipfrac"].item() == pytest.approx(0.5)
    ppo_new = (old + torch.tensor([[0.5, 0.0]])).requires_grad_()
    rl.policy_loss(ppo_new, old, adv, mask, 0.2)[0].backward()
    assert ppo_new.grad[0, 0].item() == 0.0


def test_sapo_by_hand_and_its_gradient_on_policy_is_the_surrogates():
    old = torch.tensor([[-1.0, -2.0, -0.5]])
    delta = torch.tensor([[0.0, 0.3, -0.4]])
    new = (old + delta).requires_grad_()
    adv, mask = torch.tensor([[1.5, 1.5, -1.0]]), torch.ones(1, 3)
    loss, _ = rl.sapo_loss(new, old, adv, mask, 1.0, 1.05, aggregation="token_mean")
    expected = 0.0
    for d, a in zip(delta[0].tolist(), adv[0].tolist()):
        tau = 1.0 if a > 0 else 1.05
        expected += -a * 4 / tau / (1 + math.exp(-tau * (math.exp(d) - 1)))
    assert loss.item() == pytest.approx(expected / 3)
    loss.backward()
    # at r = 1 the gate's slope is 1: the gradient is the plain surrogate's, -A * r / N
    assert new.grad[0, 0].item() == pytest.approx(-1.5 / 3)
    # off-policy it fades: smaller than the surrogate's -A * r / N
    assert abs(new.grad[0, 1].item()) < abs(-1.5 * math.exp(0.3) / 3)


def test_a_mode_that_does_not_exist_is_one_line():
    from helpers import REPO

    from llmrl.config import ConfigError, load_config

    with pytest.raises(ConfigError, match="train.loss_aggregation") as e:
        load_config(REPO / "configs" / "tiny.yaml", ["train.loss_aggregation=mean"])
    assert "sequence_mean" in str(e.value) and "\n" not in str(e.value)
