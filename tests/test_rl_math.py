"""The PPO maths against hand-worked cases (arithmetic in the comments) and plain-loop references."""
import math
import subprocess
import sys

import pytest
import torch

from llmrl import rl


def test_rl_maths_imports_with_only_torch():
    # Block the heavy stack: importing llmrl.rl must not need any of it.
    code = (
        "import sys\n"
        "for m in ('transformers', 'peft', 'deepspeed', 'trl', 'datasets', 'bitsandbytes', 'yaml'):\n"
        "    sys.modules[m] = None\n"
        "import llmrl.rl\n"
        "heavy = ('transformers', 'peft', 'deepspeed', 'trl', 'datasets', 'bitsandbytes', 'yaml')\n"
        "print(sorted(k for k, v in sys.modules.items() if v is not None and k.split('.')[0] in heavy))\n"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "[]"


def test_masked_mean_var_whiten_hand_worked():
    x = torch.tensor([[1.0, 2.0], [3.0, 100.0]])
    mask = torch.tensor([[1.0, 1.0], [1.0, 0.0]])
    # mean of 1, 2, 3 = 2; unbiased var = (1 + 0 + 1) / 2 = 1
    assert rl.masked_mean(x, mask).item() == pytest.approx(2.0)
    assert rl.masked_var(x, mask).item() == pytest.approx(1.0)
    w = rl.masked_whiten(x, mask)
    assert torch.allclose(w, torch.tensor([[-1.0, 0.0], [1.0, 0.0]]), atol=1e-6)
    # keeping the mean: (x - 2) / 1 + 2 on real tokens, 0 on padding
    w = rl.masked_whiten(x, mask, shift_mean=False)
    assert torch.allclose(w, torch.tensor([[1.0, 2.0], [3.0, 0.0]]), atol=1e-6)
    # a microbatch dividing by its minibatch's token count: (1 + 2 + 3) / 6
    assert rl.masked_mean(x, mask, num_tokens=6).item() == pytest.approx(1.0)


def test_masked_var_needs_two_values():
    with pytest.raises(ValueError, match="at least 2"):
        rl.masked_var(torch.tensor([1.0, 2.0]), torch.tensor([1.0, 0.0]))


def test_logprobs_and_entropy_match_full_softmax():
    torch.manual_seed(0)
    logits = torch.randn(3, 5, 11)
    tokens = torch.randint(0, 11, (3, 5))
    for temperature in (1.0, 0.7):
        full = torch.log_softmax(logits / temperature, dim=-1)
        expected = full.gather(-1, tokens.unsqueeze(-1)).squeeze(-1)
        assert torch.allclose(rl.logprobs_from_logits(logits, tokens, temperature), expected, atol=1e-6)
        p = full.exp()
        assert torch.allclose(rl.entropy_from_logits(logits, temperature), -(p * full).sum(-1), atol=1e-5)
    # uniform over 4 tokens: entropy log 4
    assert rl.entropy_from_logits(torch.zeros(1, 1, 4)).item() == pytest.approx(math.log(4), abs=1e-6)


def test_kl_estimators_hand_worked():
    logp, ref = torch.tensor([-1.0]), torch.tensor([-1.5])  # log r = 0.5
    assert rl.kl_penalty(logp, ref, "k1").item() == pytest.approx(0.5)
    assert rl.kl_penalty(logp, ref, "k2").item() == pytest.approx(0.125)  # 0.5 * 0.5^2
    assert rl.kl_penalty(logp, ref, "k3").item() == pytest.approx(math.exp(-0.5) - 1 + 0.5, abs=1e-7)
    with pytest.raises(ValueError, match="k4"):
        rl.kl_penalty(logp, ref, "k4")


def test_token_rewards_hand_worked():
    scores = torch.tensor([2.0])
    logprobs = torch.tensor([[-1.0, -2.0, -3.0]])
    ref_logprobs = torch.tensor([[-1.5, -1.0, -9.0]])
    mask = torch.tensor([[1.0, 1.0, 0.0]])
    rewards, kl = rl.compute_token_rewards(scores, logprobs, ref_logprobs, mask, kl_coef=0.1)
    # kl = [0.5, -1.0, masked]; rewards = -0.1 * kl, plus the score 2.0 on the last real token (index 1)
    assert torch.allclose(kl, torch.tensor([[0.5, -1.0, 0.0]]))
    assert torch.allclose(rewards, torch.tensor([[-0.05, 2.1, 0.0]]))


def test_token_rewards_leave_a_skipped_sample_without_reward():
    # row 1 has no token (reward.on_error: skip zeroes its mask): no score anywhere, no error; row 0 as above
    scores = torch.tensor([2.0, 5.0])
    logprobs = torch.tensor([[-1.0, -2.0, -3.0], [-1.0, -1.0, -1.0]])
    ref_logprobs = torch.tensor([[-1.5, -1.0, -9.0], [-2.0, -2.0, -2.0]])
    mask = torch.tensor([[1.0, 1.0, 0.0], [0.0, 0.0, 0.0]])
    rewards, kl = rl.compute_token_rewards(scores, logprobs, ref_logprobs, mask, kl_coef=0.1)
    assert torch.allclose(rewards, torch.tensor([[-0.05, 2.1, 0.0], [0.0, 0.0, 0.0]]))
    assert kl[1].abs().sum() == 0


def test_gae_hand_worked():
    rewards = torch.tensor([[0.5, 1.0, 7.0]])
    values = torch.tensor([[0.2, 0.4, 9.0]])
    mask = torch.tensor([[1.0, 1.0, 0.0]])  # the third token is padding: its reward and value must not count
    adv, ret = rl.compute_gae(rewards, values, mask, gamma=1.0, lam=0.95)
    # t=1: delta = 1.0 + 1 * 0 - 0.4 = 0.6            A1 = 0.6
    # t=0: delta = 0.5 + 1 * 0.4 - 0.2 = 0.7          A0 = 0.7 + 1 * 0.95 * 0.6 = 1.27
    assert torch.allclose(adv, torch.tensor([[1.27, 0.6, 0.0]]), atol=1e-6)
    assert torch.allclose(ret, torch.tensor([[1.47, 1.0, 0.0]]), atol=1e-6)
    adv, _ = rl.compute_gae(rewards, values, mask, gamma=0.9, lam=0.5)
    # t=0: delta = 0.5 + 0.9 * 0.4 - 0.2 = 0.66       A0 = 0.66 + 0.45 * 0.6 = 0.93
    assert torch.allclose(adv, torch.tensor([[0.93, 0.6, 0.0]]), atol=1e-6)


def gae_loop(rewards, values, mask, gamma, lam):
    """Plain-Python GAE, one sequence at a time, over its real tokens only."""
    B, T = rewards.shape
    adv = torch.zeros(B, T)
    for b in range(B):
        n = int(mask[b].sum())
        running = 0.0
        for t in reversed(range(n)):
            next_v = values[b, t + 1].item() if t + 1 < n else 0.0
            delta = rewards[b, t].item() + gamma * next_v - values[b, t].item()
            running = delta + gamma * lam * running
            adv[b, t] = running
    return adv, (adv + values) * mask


def test_gae_matches_plain_loop_on_ragged_batch():
    torch.manual_seed(1)
    B, T = 6, 9
    lengths = torch.tensor([1, 9, 4, 6, 2, 9])
    mask = (torch.arange(T).unsqueeze(0) < lengths.unsqueeze(1)).float()
    rewards, values = torch.randn(B, T), torch.randn(B, T)
    for gamma, lam in ((1.0, 0.95), (0.99, 0.9), (0.5, 0.0)):
        adv, ret = rl.compute_gae(rewards, values, mask, gamma, lam)
        ref_adv, ref_ret = gae_loop(rewards, values, mask, gamma, lam)
        assert torch.allclose(adv, ref_adv, atol=1e-5)
        assert torch.allclose(ret, ref_ret, atol=1e-5)


def test_gae_skips_the_environment_tokens_of_a_multi_turn_episode():
    # Model tokens at 0, 1 and 4; positions 2-3 are the environment's reply, 5 is padding. Their rewards and
    # values (7, 9, ...) must not count, and the model token at 1 is followed by the one at 4.
    rewards = torch.tensor([[0.5, 1.0, 7.0, 7.0, 2.0, 7.0]])
    values = torch.tensor([[0.2, 0.4, 9.0, 9.0, 0.3, 9.0]])
    mask = torch.tensor([[1.0, 1.0, 0.0, 0.0, 1.0, 0.0]])
    adv, ret = rl.compute_gae(rewards, values, mask, gamma=0.9, lam=0.5)
    # t=4: delta = 2.0 + 0 - 0.3 = 1.7                     A4 = 1.7
    # t=1: delta = 1.0 + 0.9 * 0.3 - 0.4 = 0.87            A1 = 0.87 + 0.45 * 1.7 = 1.635
    # t=0: delta = 0.5 + 0.9 * 0.4 - 0.2 = 0.66            A0 = 0.66 + 0.45 * 1.635 = 1.39575
    assert torch.allclose(adv, torch.tensor([[1.39575, 1.635, 0.0, 0.0, 1.7, 0.0]]), atol=1e-6)
    assert torch.allclose(ret, torch.tensor([[1.59575, 2.035, 0.0, 0.0, 2.0, 0.0]]), atol=1e-6)


def test_gapped_gae_equals_gae_over_the_model_tokens_alone():
    """The reference: pull each row's model tokens together, run the plain loop, put the results back."""
    torch.manual_seed(2)
    B, T = 5, 12
    mask = (torch.rand(B, T) < 0.6).float()
    mask[:, 0] = 1.0
    rewards, values = torch.randn(B, T), torch.randn(B, T)
    for gamma, lam in ((1.0, 0.95), (0.9, 0.7)):
        adv, ret = rl.compute_gae(rewards, values, mask, gamma, lam)
        for b in range(B):
            keep = mask[b].bool()
            n = int(keep.sum())
            ref_adv, ref_ret = gae_loop(rewards[b, keep][None], values[b, keep][None], torch.ones(1, n), gamma, lam)
            assert torch.allclose(adv[b, keep], ref_adv[0], atol=1e-5)
            assert torch.allclose(ret[b, keep], ref_ret[0], atol=1e-5)
            assert (adv[b, ~keep] == 0).all() and (ret[b, ~keep] == 0).all()


def test_the_score_goes_to_the_last_model_token_of_a_gapped_mask():
    mask = torch.tensor([[1.0, 1.0, 0.0, 1.0, 0.0], [1.0, 0.0, 0.0, 0.0, 0.0]])
    assert rl.last_token_index(mask).tolist() == [3, 0]
    zeros = torch.zeros(2, 5)
    rewards, _ = rl.compute_token_rewards(torch.tensor([2.0, 3.0]), zeros, zeros, mask, kl_coef=0.1)
    assert rewards.tolist() == [[0.0, 0.0, 0.0, 2.0, 0.0], [3.0, 0.0, 0.0, 0.0, 0.0]]


def test_policy_loss_hand_worked():
    old = torch.zeros(1, 3)
    new = torch.log(torch.tensor([[1.5, 0.5, 0.5]]))  # ratios 1.5, 0.5, 0.5
    adv = torch.tensor([[1.0, 1.0, -1.0]])
    mask = torch.ones(1, 3)
    loss, stats = rl.policy_loss(new, old, adv, mask, clip_range=0.2)
    # token 1: max(-1.5, -1.2) = -1.2 (clipped); token 2: max(-0.5, -0.8) = -0.5 (unclipped);
    # token 3: max(0.5, 0.8) = 0.8 (clipped)  ->  loss = (-1.2 - 0.5 + 0.8) / 3 = -0.3, clipfrac = 2/3
    assert loss.item() == pytest.approx(-0.3, abs=1e-6)
    assert stats["clipfrac"].item() == pytest.approx(2 / 3, abs=1e-6)
    # approx_kl (k3 of the ratio): mean(r - 1 - log r)
    expected_kl = sum(r - 1 - math.log(r) for r in (1.5, 0.5, 0.5)) / 3
    assert stats["approx_kl"].item() == pytest.approx(expected_kl, abs=1e-6)


def test_policy_loss_ignores_masked_tokens():
    old = torch.zeros(1, 2)
    new = torch.tensor([[0.0, 5.0]])
    adv = torch.tensor([[2.0, 100.0]])
    loss, _ = rl.policy_loss(new, old, adv, torch.tensor([[1.0, 0.0]]), clip_range=0.2)
    assert loss.item() == pytest.approx(-2.0)  # ratio 1 on the only real token


def test_value_loss_hand_worked():
    values = torch.tensor([[0.5, -0.1]])
    old_values = torch.zeros(1, 2)
    returns = torch.tensor([[1.0, 0.0]])
    loss, stats = rl.value_loss(values, old_values, returns, torch.ones(1, 2), clip_range_value=0.2)
    # token 1: max((0.5 - 1)^2, (0.2 - 1)^2) = 0.64; token 2: max(0.01, 0.01) = 0.01
    # loss = 0.5 * (0.64 + 0.01) / 2 = 0.1625, the clipped term won on 1 of 2 tokens
    assert loss.item() == pytest.approx(0.1625, abs=1e-6)
    assert stats["clipfrac"].item() == pytest.approx(0.5)


def test_microbatch_accumulation_equals_full_minibatch():
    """1 x 8 and 8 x 1 give the same loss and gradient when microbatches divide by the minibatch's tokens."""
    torch.manual_seed(2)
    B, T = 8, 5
    mask = (torch.arange(T).unsqueeze(0) < torch.randint(1, T + 1, (B, 1))).float()
    old, adv = torch.randn(B, T) * 0.1, torch.randn(B, T)
    old_v, ret = torch.randn(B, T), torch.randn(B, T)
    theta = torch.randn(B, T) * 0.3

    def grads(micro):
        p = theta.clone().requires_grad_(True)
        n = mask.sum()
        total = 0.0
        for s in range(0, B, micro):
            sl = slice(s, s + micro)
            pg, _ = rl.policy_loss(old[sl] + p[sl], old[sl], adv[sl], mask[sl], 0.2, num_tokens=n)
            vf, _ = rl.value_loss(old_v[sl] + p[sl], old_v[sl], ret[sl], mask[sl], 0.2, num_tokens=n)
            loss = pg + 0.1 * vf
            loss.backward()
            total += loss.item()
        return total, p.grad

    loss_full, grad_full = grads(8)
    loss_micro, grad_micro = grads(1)
    assert loss_micro == pytest.approx(loss_full, abs=1e-6)
    assert torch.allclose(grad_micro, grad_full, atol=1e-7)


def test_adaptive_kl_controller_hand_worked():
    ctl = rl.AdaptiveKLController(0.2, target=6.0, horizon=10000)
    ctl.update(current_kl=9.0, n_steps=64)
    # error = clip(9 / 6 - 1, -0.2, 0.2) = 0.2;  beta = 0.2 * (1 + 0.2 * 64 / 10000) = 0.200256
    assert ctl.value == pytest.approx(0.200256)
    ctl.update(current_kl=3.0, n_steps=64)
    # error = clip(3 / 6 - 1) = -0.2;  beta = 0.200256 * (1 - 0.00128)
    assert ctl.value == pytest.approx(0.200256 * 0.99872)
    ctl2 = rl.AdaptiveKLController(1.0, 6.0, 10000)
    ctl2.load_state_dict(ctl.state_dict())
    assert ctl2.value == ctl.value
    fixed = rl.FixedKLController(0.1)
    fixed.update(100.0, 64)
    assert fixed.value == 0.1


def test_last_token_index_rejects_empty_responses():
    assert rl.last_token_index(torch.tensor([[1.0, 1.0, 0.0], [1.0, 0.0, 0.0]])).tolist() == [1, 0]
    with pytest.raises(ValueError, match=r"\[1\]"):
        rl.last_token_index(torch.tensor([[1.0, 0.0], [0.0, 0.0]]))


def test_grpo_advantages_hand_worked():
    scores = torch.tensor([1.0, 0.0, 0.0, 1.0, 2.0, 4.0])  # two prompts, k = 3
    # group 1: mean 1/3, unbiased std sqrt(((2/3)^2 + 2 (1/3)^2) / 2) = sqrt(1/3)
    # group 2: mean 7/3, deviations (-4/3, -1/3, 5/3), unbiased std sqrt((16 + 1 + 25) / 9 / 2) = sqrt(7/3)
    centred = torch.tensor([2 / 3, -1 / 3, -1 / 3, -4 / 3, -1 / 3, 5 / 3])
    assert torch.allclose(rl.grpo_advantages(scores, 3, "none"), centred, atol=1e-6)
    group_std = torch.tensor([(1 / 3) ** 0.5] * 3 + [(7 / 3) ** 0.5] * 3)
    assert torch.allclose(rl.grpo_advantages(scores, 3, "group", eps=0.0), centred / group_std, atol=1e-6)
    assert torch.allclose(rl.grpo_advantages(scores, 3, "batch", eps=0.0), centred / scores.std(), atol=1e-6)
    # a group where every completion scored the same carries no signal
    assert torch.equal(rl.grpo_advantages(torch.tensor([5.0, 5.0]), 2), torch.zeros(2))
    with pytest.raises(ValueError, match="do not split into groups of 4"):
        rl.grpo_advantages(scores, 4)


def test_rloo_advantages_hand_worked_and_against_a_loop():
    scores = torch.tensor([1.0, 0.0, 3.0, 2.0, 2.0, 5.0])  # k = 3
    # sample 0: 1 - (0 + 3) / 2 = -0.5; sample 1: 0 - (1 + 3) / 2 = -2; sample 2: 3 - (1 + 0) / 2 = 2.5
    # group 2: 2 - 3.5 = -1.5, 2 - 3.5 = -1.5, 5 - 2 = 3
    assert torch.allclose(rl.rloo_advantages(scores, 3), torch.tensor([-0.5, -2.0, 2.5, -1.5, -1.5, 3.0]))
    torch.manual_seed(3)
    r = torch.randn(20)
    loop = torch.tensor([r[i] - sum(r[j] for j in range(i // 4 * 4, i // 4 * 4 + 4) if j != i) / 3
                         for i in range(20)])
    assert torch.allclose(rl.rloo_advantages(r, 4), loop, atol=1e-6)
    with pytest.raises(ValueError, match="at least 2 completions"):
        rl.rloo_advantages(r, 1)


def test_running_baseline_hand_worked():
    b = rl.RunningBaseline(momentum=0.5)
    # first batch: the baseline is the batch's own mean, 2 -> advantages (-1, 1); baseline becomes 2
    assert rl.RunningBaseline(0.5).advantages(torch.tensor([1.0, 3.0])).tolist() == [-1.0, 1.0]
    b.advantages(torch.tensor([1.0, 3.0]))
    # second batch (mean 6) uses the old baseline 2 -> (3, 7); then 0.5 * 2 + 0.5 * 6 = 4
    assert b.advantages(torch.tensor([5.0, 7.0])).tolist() == [3.0, 5.0]
    assert b.value == 4.0


def test_skipped_samples_stay_out_of_the_critic_free_baselines():
    nan = float("nan")
    # k = 4; group 1: sample 2 skipped (its score NaN), so the others are scored as the group (1, 0, 3)
    # group 2: only sample 5 scored: nothing to compare it with, so every advantage there is 0
    scores = torch.tensor([1.0, 0.0, nan, 3.0, nan, 7.0, nan, nan])
    valid = ~scores.isnan()
    assert rl.rloo_advantages(scores, 4, valid).tolist() == [-0.5, -2.0, 0.0, 2.5, 0.0, 0.0, 0.0, 0.0]
    three = rl.grpo_advantages(torch.tensor([1.0, 0.0, 3.0]), 3, "group")
    expected = torch.tensor([three[0], three[1], 0.0, three[2], 0.0, 0.0, 0.0, 0.0])
    assert torch.allclose(rl.grpo_advantages(scores, 4, "group", valid=valid), expected, atol=1e-6)
    # batch scale: the std of the four scored samples (1, 0, 3, 7), not of all eight
    batch = rl.grpo_advantages(scores, 4, "batch", eps=0.0, valid=valid)
    centred = torch.tensor([-1 / 3, -4 / 3, 0.0, 5 / 3, 0.0, 0.0, 0.0, 0.0])
    assert torch.allclose(batch, centred / torch.tensor([1.0, 0.0, 3.0, 7.0]).std(), atol=1e-6)
    b = rl.RunningBaseline(momentum=0.5)
    assert b.advantages(torch.tensor([1.0, nan, 3.0]), torch.tensor([True, False, True])).tolist() == [-1.0, 0.0, 1.0]
    assert b.value == 2.0
    assert b.advantages(torch.tensor([nan]), torch.tensor([False])).tolist() == [0.0] and b.value == 2.0

    # against plain loops over random scores and random skips
    torch.manual_seed(0)
    r, keep = torch.randn(24), torch.rand(24) > 0.3
    rloo, grpo = [], []
    for i in range(24):
        group = [j for j in range(i // 4 * 4, i // 4 * 4 + 4) if keep[j]]
        others = [r[j].item() for j in group if j != i]
        rloo.append(r[i].item() - sum(others) / len(others) if keep[i] and others else 0.0)
        kept = torch.tensor([r[j].item() for j in group])
        grpo.append((r[i].item() - kept.mean().item()) / (kept.std().item() + 1e-4)
                    if keep[i] and len(group) > 1 else 0.0)
    assert torch.allclose(rl.rloo_advantages(r, 4, keep), torch.tensor(rloo), atol=1e-6)
    assert torch.allclose(rl.grpo_advantages(r, 4, "group", valid=keep), torch.tensor(grpo), atol=1e-5)


def test_dpo_and_ipo_losses_hand_worked():
    pc, pr = torch.tensor([-1.0]), torch.tensor([-3.0])
    rc, rr = torch.tensor([-2.0]), torch.tensor([-2.0])
    # h = (-1 + 2) - (-3 + 2) = 2; sigmoid loss = -log sigmoid(0.5 * 2) = log(1 + e^-1)
    loss, stats = rl.dpo_loss(pc, pr, rc, rr, beta=0.5)
    assert loss.item() == pytest.approx(math.log(1 + math.exp(-1)), abs=1e-6)
    assert stats["rewards/accuracy"].item() == 1.0 and stats["rewards/margin"].item() == pytest.approx(1.0)
    # ipo: (h - 1 / (2 * 0.5))^2 with log-probs per token; one token each: (2 - 1)^2 = 1
    one = torch.tensor([1.0])
    loss, _ = rl.dpo_loss(pc, pr, rc, rr, beta=0.5, loss_type="ipo", chosen_tokens=one, rejected_tokens=one)
    assert loss.item() == pytest.approx(1.0)
    # chosen 2 tokens, rejected 3 (TRL's IPO): h = (-1/2 + 2/2) - (-3/3 + 2/3) = 5/6; (5/6 - 1)^2 = 1/36
    loss, _ = rl.dpo_loss(pc, pr, rc, rr, beta=0.5, loss_type="ipo", chosen_tokens=torch.tensor([2.0]),
                          rejected_tokens=torch.tensor([3.0]))
    assert loss.item() == pytest.approx(1 / 36)
    # at the reference (h = 0), DPO's loss is log 2
    loss, _ = rl.dpo_loss(rc, rr, rc, rr, beta=0.1)
    assert loss.item() == pytest.approx(math.log(2), abs=1e-6)


def test_whitening_from_summed_rank_moments_equals_global_whitening():
    """Two data ranks each contribute moments; their sum whitens exactly like the whole batch in one place."""
    torch.manual_seed(4)
    x = torch.randn(8, 6) * 3 + 1
    mask = (torch.rand(8, 6) > 0.3).float()
    whole = rl.masked_whiten(x, mask)
    moments = rl.masked_moments(x[:4], mask[:4]) + rl.masked_moments(x[4:], mask[4:])
    assert torch.allclose(rl.whiten_with_moments(x, mask, moments).float(), whole, atol=1e-5)
    assert torch.allclose(rl.whiten_with_moments(x, mask, moments, shift_mean=False).float(),
                          rl.masked_whiten(x, mask, shift_mean=False), atol=1e-5)
