"""The trainer's wiring, pinned like its maths: ``OnlineTrainer.make_experience`` and ``update`` run on
hand-built rollouts (the model's forward, the sampler and the reward replaced by fixed numbers), and what they
produce (scores after the EOS penalty and clipping, advantages and their whitening, the loss with each term's
sign, weight and divisor) is compared with plain-loop references written from the papers' formulas. A wrong sign,
weight, divisor or clip bound in the trainer or an estimator fails here in seconds."""
import math

import pytest
import torch
from helpers import ThreadRanks, make_trainer, tiny_config

from llmrl.rewards.base import RewardResult
from llmrl.rollout.experience import Experience

# Four samples, two prompts of two completions (group estimators), responses of 3, 2, 1 and 3 tokens.
MASK = [[1, 1, 1], [1, 1, 0], [1, 0, 0], [1, 1, 1]]
OLD = [[-1.0, -0.5, -2.0], [-0.7, -1.2, 0.0], [-0.3, 0.0, 0.0], [-1.5, -0.9, -0.4]]
# new - old: inside the clip window, past 1 + 0.2 (and past 1 + 0.28), inside (1.2, 1.28), below 1 - 0.2
DELTA = [[0.05, 0.30, -0.30], [0.22, -0.05, 0.0], [0.40, 0.0, 0.0], [-0.10, 0.23, 0.02]]
REF = [[-1.1, -0.4, -1.8], [-0.9, -1.0, 0.0], [-0.2, 0.0, 0.0], [-1.2, -1.0, -0.6]]
ENTROPY = [[1.0, 2.0, 0.5], [1.5, 0.7, 0.0], [2.5, 0.0, 0.0], [0.3, 0.9, 1.1]]
VALUES = [[0.1, 0.2, 0.3], [-0.2, 0.4, 0.0], [0.5, 0.0, 0.0], [0.0, -0.1, 0.2]]
VPRED = [[0.4, 0.1, 0.2], [-0.1, 0.1, 0.0], [0.9, 0.0, 0.0], [0.1, -0.3, 0.25]]
RETURNS = [[0.5, 0.6, 0.7], [0.3, 0.2, 0.0], [1.0, 0.0, 0.0], [-0.4, -0.2, 0.1]]
ADV_TOKENS = [[0.8, -0.6, 1.2], [-1.0, 0.5, 0.0], [1.5, 0.0, 0.0], [-0.7, 0.9, -0.2]]  # PPO's, per token
ADV_SEQ = [0.9, -0.9, 1.3, -1.3]  # critic-free, one per sequence


def cells(rows):
    return [(b, t) for b in range(len(rows)) for t in range(len(rows[b])) if rows[b][t]]


def trainer_for(tiny_model_dir, tmp_path, algorithm, *extra, strategy=None):
    cfg = tiny_config(tiny_model_dir, tmp_path / "run", f"algorithm={algorithm}", "train.rollout_batch_size=4",
                      "train.mini_batch_size=4", "train.micro_batch_size=4", "train.epochs=1",
                      "critic_free.num_generations=2", "ppo.ent_coef=0.05", "ppo.vf_coef=0.3",
                      "critic_free.kl_coef=0.07", "ppo.clip_range=0.2", "ppo.clip_range_value=0.15",
                      "critic_free.clip_range_high=0.28", "critic_free.sequence_clip_low=0.1",
                      "critic_free.sequence_clip_high=0.15", "generation.max_new_tokens=5", *extra)
    return make_trainer(cfg, strategy)


def hand_built(advantages) -> Experience:
    """A rollout whose query's first token is the row's number, so a stub forward knows which rows it got."""
    mask = torch.tensor(MASK, dtype=torch.float32)
    advantages = torch.as_tensor(advantages, dtype=torch.float32)
    advantages = advantages.unsqueeze(1) if advantages.dim() == 1 else advantages  # a sequence's on its tokens
    return Experience(query=torch.arange(4).unsqueeze(1), query_mask=torch.ones(4, 1, dtype=torch.long),
                      response=torch.ones(4, 3, dtype=torch.long), response_mask=mask,
                      logprobs=torch.tensor(OLD) * mask, ref_logprobs=torch.tensor(REF) * mask,
                      values=torch.tensor(VALUES) * mask, returns=torch.tensor(RETURNS) * mask,
                      advantages=advantages * mask)


def recorded_loss(trainer, exp) -> float:
    """The loss ``update`` passes to backward, summed over the microbatches of its one minibatch (what the
    accumulated gradient is the gradient of), with the forward replaced."""
    new = (torch.tensor(OLD) + torch.tensor(DELTA)).requires_grad_()
    losses = []

    def forward(mb, with_values, entropy_grad=False):
        rows = mb.query[:, 0]
        T = mb.response.shape[1]
        return new[rows, :T], torch.tensor(VPRED)[rows, :T], torch.tensor(ENTROPY)[rows, :T]

    trainer.forward_logprobs = forward
    trainer.strategy.backward = lambda loss, boundary: losses.append(loss.item())
    trainer.strategy.step = lambda boundary: 0.0
    trainer.update(exp)
    assert len(losses) == trainer.sizes.grad_accum_steps  # the microbatches of one minibatch on this rank
    return sum(losses)


def token_terms(clip_high=0.2, adv=None):
    """Plain loops: (policy loss sum over tokens, entropy sum, k3 KL sum, value loss sum), before any divisor."""
    pg = ent = kl = vf = 0.0
    for b, t in cells(MASK):
        ratio = math.exp(DELTA[b][t])
        a = ADV_TOKENS[b][t] if adv is None else adv[b]
        pg += max(-a * ratio, -a * min(max(ratio, 1 - 0.2), 1 + clip_high))
        ent += ENTROPY[b][t]
        log_r = OLD[b][t] + DELTA[b][t] - REF[b][t]  # log pi / pi_ref
        kl += math.exp(-log_r) - 1 + log_r
        clipped = VALUES[b][t] + min(max(VPRED[b][t] - VALUES[b][t], -0.15), 0.15)
        vf += 0.5 * max((VPRED[b][t] - RETURNS[b][t]) ** 2, (clipped - RETURNS[b][t]) ** 2)
    return pg, ent, kl, vf


N_TOKENS = sum(map(sum, MASK))  # 9


def test_ppo_loss_is_clipped_surrogate_minus_entropy_plus_weighted_value_loss(tiny_model_dir, tmp_path):
    pg, ent, _, vf = token_terms()
    expected = pg / N_TOKENS - 0.05 * ent / N_TOKENS + 0.3 * vf / N_TOKENS
    assert recorded_loss(trainer_for(tiny_model_dir, tmp_path, "ppo"), hand_built(ADV_TOKENS)) == \
        pytest.approx(expected, rel=1e-5)


@pytest.mark.parametrize("algorithm,kl_weight", [("grpo", 0.07), ("rloo", 0.0), ("reinforce", 0.0)])
def test_critic_free_token_loss_and_grpos_k3_term(tiny_model_dir, tmp_path, algorithm, kl_weight):
    """GRPO adds + kl_coef * k3 (never negative); RLOO and REINFORCE keep the KL in the reward, not the loss."""
    pg, ent, kl, _ = token_terms(adv=ADV_SEQ)
    expected = pg / N_TOKENS - 0.05 * ent / N_TOKENS + kl_weight * kl / N_TOKENS
    assert kl > 0
    assert recorded_loss(trainer_for(tiny_model_dir, tmp_path, algorithm), hand_built(ADV_SEQ)) == \
        pytest.approx(expected, rel=1e-5)


def test_dapo_clips_higher_and_adds_no_kl(tiny_model_dir, tmp_path):
    pg, ent, _, _ = token_terms(clip_high=0.28, adv=ADV_SEQ)
    assert pg != pytest.approx(token_terms(adv=ADV_SEQ)[0])  # the cells inside (1.2, 1.28) make a difference
    expected = pg / N_TOKENS - 0.05 * ent / N_TOKENS
    assert recorded_loss(trainer_for(tiny_model_dir, tmp_path, "dapo"), hand_built(ADV_SEQ)) == \
        pytest.approx(expected, rel=1e-5)


def test_dr_grpo_divides_every_term_by_sequences_times_max_new_tokens(tiny_model_dir, tmp_path):
    pg, ent, kl, _ = token_terms(adv=ADV_SEQ)
    expected = (pg - 0.05 * ent + 0.07 * kl) / (4 * 5)
    assert recorded_loss(trainer_for(tiny_model_dir, tmp_path, "dr_grpo"), hand_built(ADV_SEQ)) == \
        pytest.approx(expected, rel=1e-5)


def test_gspo_clips_one_length_normalised_ratio_per_sequence(tiny_model_dir, tmp_path):
    pg = 0.0
    for b in range(4):
        tokens = [t for t in range(3) if MASK[b][t]]
        s = math.exp(sum(DELTA[b][t] for t in tokens) / len(tokens))
        a = ADV_SEQ[b]
        pg += max(-a * s, -a * min(max(s, 1 - 0.1), 1 + 0.15))
    _, ent, kl, _ = token_terms(adv=ADV_SEQ)
    expected = pg / 4 - 0.05 * ent / N_TOKENS + 0.07 * kl / N_TOKENS
    assert recorded_loss(trainer_for(tiny_model_dir, tmp_path, "gspo"), hand_built(ADV_SEQ)) == \
        pytest.approx(expected, rel=1e-5)


# ------------------------------------------------------------------------------------------------------------
# make_experience: scores, penalties, clipping, skipped samples and advantages

RAW = [0.6, 3.0, -0.4, 12.0]  # the reward's scores; the last is past reward.clip
ENDED = [True, False, True, False]  # samples 1 and 3 never emitted the stop token


def experience_of(trainer, valid=(True, True, True, True), sampler=None):
    """make_experience on four hand-built samples, the sampler, the reward and the forward passes replaced;
    ``sampler``: the sampler's own log-probs, beside the recomputed pi_old (``OLD``)."""
    mask = torch.tensor(MASK, dtype=torch.float32)

    def generate(prompts):
        return Experience(query=torch.arange(4).unsqueeze(1), query_mask=torch.ones(4, 1, dtype=torch.long),
                          response=torch.ones(4, 3, dtype=torch.long), response_mask=mask.clone(),
                          ended=torch.tensor(ENDED), logprobs=torch.tensor(OLD) * mask,
                          entropy=torch.tensor(ENTROPY) * mask)

    def fill_logprobs(exp):
        exp.sampler_logprobs = None if sampler is None else torch.tensor(sampler) * mask
        exp.logprobs, exp.ref_logprobs = torch.tensor(OLD) * mask, torch.tensor(REF) * mask
        exp.values = torch.tensor(VALUES) * mask
        return torch.tensor(ENTROPY) * mask

    trainer.generate = generate
    trainer.score = lambda rows, exp: (None, RewardResult(list(RAW), list(valid), {}))
    trainer.fill_logprobs = fill_logprobs
    rows = [{"prompt": "abc>", "answer": "cba"}] * 4
    return trainer.make_experience(rows)


def shaped(penalty=0.5, clip=10.0, valid=(True, True, True, True)):
    """The scores the estimator sees: minus the penalty where no stop token came, clipped, 0 where skipped."""
    out = []
    for raw, ended, ok in zip(RAW, ENDED, valid):
        s = raw if ended else raw - penalty
        out.append(min(max(s, -clip), clip) if ok else 0.0)
    return out


def test_missing_eos_penalty_and_clip_shape_the_scores(tiny_model_dir, tmp_path):
    trainer = trainer_for(tiny_model_dir, tmp_path, "grpo", "generation.missing_eos_penalty=0.5", "reward.clip=10")
    exp, stats = experience_of(trainer)
    assert exp.scores.tolist() == pytest.approx(shaped())  # [0.6, 2.5, -0.4, 10.0]
    assert stats["reward/raw_mean"] == pytest.approx(sum(RAW) / 4)
    assert stats["reward/mean"] == pytest.approx(sum(shaped()) / 4)


def group_normalised(scores, scale):
    out = []
    for g in range(0, len(scores), 2):
        pair = scores[g:g + 2]
        mean = sum(pair) / 2
        std = math.sqrt(sum((s - mean) ** 2 for s in pair) / 1)
        if scale == "batch":
            m = sum(scores) / len(scores)
            std = math.sqrt(sum((s - m) ** 2 for s in scores) / (len(scores) - 1))
        out += [(s - mean) / (std + 1e-4) if scale != "none" else s - mean for s in pair]
    return out


@pytest.mark.parametrize("algorithm,scale", [("grpo", "group"), ("grpo", "batch"), ("grpo", "none"),
                                             ("dr_grpo", "group"), ("dapo", "group"), ("gspo", "group")])
def test_group_advantages_follow_the_estimators_scale(tiny_model_dir, tmp_path, algorithm, scale):
    """GRPO honours critic_free.scale; Dr. GRPO only centres; DAPO and GSPO divide by the group's std. The
    advantage is the sequence's, on each of its tokens, and is not whitened again."""
    trainer = trainer_for(tiny_model_dir, tmp_path, algorithm, f"critic_free.scale={scale}",
                          "generation.missing_eos_penalty=0.5", "reward.clip=10")
    exp, _ = experience_of(trainer)
    expected = group_normalised(shaped(), "none" if algorithm == "dr_grpo" else scale)
    for b, t in cells(MASK):
        assert exp.advantages[b, t].item() == pytest.approx(expected[b], rel=1e-5, abs=1e-6), (b, t)
    assert exp.advantages[1, 2].item() == 0.0  # padding carries nothing


def test_rloo_advantages_leave_one_out_with_the_kl_in_the_reward(tiny_model_dir, tmp_path):
    """RLOO: the score minus beta * the sequence's k1 KL, then minus the other completion's (same prompt)."""
    trainer = trainer_for(tiny_model_dir, tmp_path, "rloo", "generation.missing_eos_penalty=0.5", "reward.clip=10",
                          "ppo.init_kl_coef=0.2", "ppo.kl_estimator=k1")
    exp, stats = experience_of(trainer)
    seq = []
    for b, s in enumerate(shaped()):
        kl = sum(OLD[b][t] - REF[b][t] for t in range(3) if MASK[b][t])
        seq.append(s - 0.2 * kl)
    expected = [seq[0] - seq[1], seq[1] - seq[0], seq[2] - seq[3], seq[3] - seq[2]]
    for b, t in cells(MASK):
        assert exp.advantages[b, t].item() == pytest.approx(expected[b], rel=1e-5), (b, t)
    kl_mean = sum(sum(OLD[b][t] - REF[b][t] for t in range(3) if MASK[b][t]) for b in range(4)) / 4
    assert stats["objective/kl"] == pytest.approx(kl_mean, rel=1e-5)


def test_ppo_advantages_are_gae_over_the_kl_shaped_rewards_then_whitened(tiny_model_dir, tmp_path):
    gamma, lam, beta = 0.9, 0.8, 0.2
    trainer = trainer_for(tiny_model_dir, tmp_path, "ppo", "generation.missing_eos_penalty=0.5", "reward.clip=10",
                          f"ppo.gamma={gamma}", f"ppo.lam={lam}", f"ppo.init_kl_coef={beta}", "ppo.kl_estimator=k1",
                          "ppo.whiten_rewards=false")
    exp, _ = experience_of(trainer)
    gae = {}
    for b in range(4):
        tokens = [t for t in range(3) if MASK[b][t]]
        last, next_value = 0.0, 0.0
        for t in reversed(tokens):
            r = -beta * (OLD[b][t] - REF[b][t]) + (shaped()[b] if t == tokens[-1] else 0.0)
            delta = r + gamma * next_value - VALUES[b][t]
            last = delta + gamma * lam * last
            gae[b, t], next_value = last, VALUES[b][t]
    values = list(gae.values())
    mean = sum(values) / len(values)
    std = math.sqrt(sum((v - mean) ** 2 for v in values) / (len(values) - 1))
    for (b, t), a in gae.items():
        assert exp.advantages[b, t].item() == pytest.approx((a - mean) / std, rel=1e-4), (b, t)
        assert exp.returns[b, t].item() == pytest.approx(a + VALUES[b][t], rel=1e-5), (b, t)


def test_a_skipped_sample_scores_zero_and_leaves_the_group_baseline(tiny_model_dir, tmp_path):
    trainer = trainer_for(tiny_model_dir, tmp_path, "grpo", "generation.missing_eos_penalty=0.5", "reward.clip=10",
                          "reward.on_error=skip")
    valid = (True, True, False, True)
    exp, stats = experience_of(trainer, valid)
    assert exp.scores.tolist() == pytest.approx(shaped(valid=valid))
    assert exp.advantages[2].abs().sum().item() == 0.0 and exp.advantages[3].abs().sum().item() == 0.0
    assert stats["reward/mean"] == pytest.approx((0.6 + 2.5 + 10.0) / 3)


@pytest.mark.parametrize("algorithm,extra", [("ppo", ()), ("grpo", ()), ("dr_grpo", ()), ("gspo", ()), ("cispo", ()),
                                             ("sapo", ()), ("grpo", ("train.loss_aggregation=sequence_mean",))])
def test_microbatches_add_up_to_the_minibatchs_loss(tiny_model_dir, tmp_path, algorithm, extra):
    """Gradient accumulation is exact: two microbatches of two divide by the whole minibatch's counts, so their
    losses sum to the loss of one microbatch of four (every term: policy, entropy, value, KL)."""
    adv = ADV_TOKENS if algorithm == "ppo" else ADV_SEQ
    whole = recorded_loss(trainer_for(tiny_model_dir, tmp_path / "whole", algorithm, *extra), hand_built(adv))
    split = recorded_loss(trainer_for(tiny_model_dir, tmp_path / "split", algorithm, *extra,
                                      "train.micro_batch_size=2"), hand_built(adv))
    assert split == pytest.approx(whole, rel=1e-5)


def test_running_normalisation_comes_before_the_eos_penalty_and_the_clip(tiny_model_dir, tmp_path):
    trainer = trainer_for(tiny_model_dir, tmp_path, "grpo", "reward.normalize=running",
                          "generation.missing_eos_penalty=0.5", "reward.clip=1.5")
    exp, stats = experience_of(trainer)
    mean = sum(RAW) / 4
    std = math.sqrt(sum((r - mean) ** 2 for r in RAW) / 4)  # over every score seen so far: this batch
    expected = []
    for raw, ended in zip(RAW, ENDED):
        s = (raw - mean) / std - (0 if ended else 0.5)
        expected.append(min(max(s, -1.5), 1.5))
    assert exp.scores.tolist() == pytest.approx(expected, rel=1e-5)
    assert stats["reward/raw_mean"] == pytest.approx(mean)


@pytest.mark.parametrize("keep_last,kept", [(2, [4, 5]), (1, [5]), (10, [1, 2, 3, 4, 5])])
def test_pruning_keeps_the_newest_keep_last_step_checkpoints_and_final(tmp_path, keep_last, kept):
    from llmrl.distributed.checkpoint import COMPLETE_MARK, prune_checkpoints, step_checkpoints, step_dir_name

    for step in [*range(1, 6)]:
        (tmp_path / step_dir_name(step)).mkdir()
        (tmp_path / step_dir_name(step) / COMPLETE_MARK).write_bytes(b"")
    (tmp_path / "final").mkdir()
    prune_checkpoints(tmp_path, keep_last)
    assert [step for step, _ in step_checkpoints(tmp_path)] == kept
    assert (tmp_path / "final").is_dir()



def per_token(b, t, adv):
    """(policy loss, entropy, k3 KL) of one token, by the formulas."""
    ratio = math.exp(DELTA[b][t])
    a = adv[b]
    pg = max(-a * ratio, -a * min(max(ratio, 1 - 0.2), 1 + 0.2))
    log_r = OLD[b][t] + DELTA[b][t] - REF[b][t]
    return pg, ENTROPY[b][t], math.exp(-log_r) - 1 + log_r


def test_grpo_with_sequence_mean_aggregation_averages_each_sequence_then_the_sequences(tiny_model_dir, tmp_path):
    """train.loss_aggregation: sequence_mean (GRPO's paper, TRL's loss_type="grpo"): every term alike."""
    total = 0.0
    for b in range(4):
        tokens = [t for t in range(3) if MASK[b][t]]
        terms = [per_token(b, t, ADV_SEQ) for t in tokens]
        total += sum(pg - 0.05 * ent + 0.07 * kl for pg, ent, kl in terms) / len(tokens)
    trainer = trainer_for(tiny_model_dir, tmp_path, "grpo", "train.loss_aggregation=sequence_mean")
    assert recorded_loss(trainer, hand_built(ADV_SEQ)) == pytest.approx(total / 4, rel=1e-5)


def test_cispo_weighs_log_probs_by_the_capped_stopped_ratio(tiny_model_dir, tmp_path):
    loss = 0.0
    for b, t in cells(MASK):
        weight = min(math.exp(DELTA[b][t]), 1 + 0.28)
        _, ent, kl = per_token(b, t, ADV_SEQ)
        loss += -weight * ADV_SEQ[b] * (OLD[b][t] + DELTA[b][t]) - 0.05 * ent + 0.07 * kl
    assert recorded_loss(trainer_for(tiny_model_dir, tmp_path, "cispo"), hand_built(ADV_SEQ)) == \
        pytest.approx(loss / N_TOKENS, rel=1e-5)


def test_sapo_gates_the_ratio_softly_with_the_advantages_sign_temperature(tiny_model_dir, tmp_path):
    loss = 0.0
    for b, t in cells(MASK):
        tau = 1.0 if ADV_SEQ[b] > 0 else 1.05
        gate = 4 / tau / (1 + math.exp(-tau * (math.exp(DELTA[b][t]) - 1)))
        _, ent, kl = per_token(b, t, ADV_SEQ)
        loss += -gate * ADV_SEQ[b] - 0.05 * ent + 0.07 * kl
    assert recorded_loss(trainer_for(tiny_model_dir, tmp_path, "sapo"), hand_built(ADV_SEQ)) == \
        pytest.approx(loss / N_TOKENS, rel=1e-5)


# ------------------------------------------------------------------------------------------------------------
# divisors: only the rows trained on count; ranks give one process's numbers

def without_row(exp: Experience, row: int) -> Experience:
    """``exp`` with one sample dropped from training (a skipped sample, or a group DAPO drops): its mask is 0."""
    keep = torch.ones(4, 1)
    keep[row] = 0.0
    exp.action_mask = keep.expand(4, 3).clone()
    return exp


def test_divisors_count_only_the_rows_trained_on(tiny_model_dir, tmp_path):
    """Sample 2 is dropped: the per-sequence divisors (GSPO's mean over sequences, GRPO's sequence_mean, Dr. GRPO's
    sequences x max_new_tokens) count the 3 rows trained on, not the minibatch's 4."""
    rows = [0, 1, 3]
    tokens = sum(sum(MASK[b]) for b in rows)
    seq_mean = sum(sum(sum(t_ - 0.05 * e + 0.07 * k for t_, e, k in [per_token(b, t, ADV_SEQ)])
                           for t in range(3) if MASK[b][t]) / sum(MASK[b]) for b in rows) / 3
    trainer = trainer_for(tiny_model_dir, tmp_path / "grpo", "grpo", "train.loss_aggregation=sequence_mean")
    assert recorded_loss(trainer, without_row(hand_built(ADV_SEQ), 2)) == pytest.approx(seq_mean, rel=1e-5)

    token_sum = sum(pg - 0.05 * e + 0.07 * k for b in rows for t in range(3) if MASK[b][t]
                    for pg, e, k in [per_token(b, t, ADV_SEQ)])
    trainer = trainer_for(tiny_model_dir, tmp_path / "dr", "dr_grpo")
    assert recorded_loss(trainer, without_row(hand_built(ADV_SEQ), 2)) == pytest.approx(token_sum / (3 * 5), rel=1e-5)

    pg = 0.0
    for b in rows:
        s = math.exp(sum(DELTA[b][t] for t in range(3) if MASK[b][t]) / sum(MASK[b]))
        pg += max(-ADV_SEQ[b] * s, -ADV_SEQ[b] * min(max(s, 1 - 0.1), 1 + 0.15))
    rest = sum(-0.05 * e + 0.07 * k for b in rows for t in range(3) if MASK[b][t]
               for _, e, k in [per_token(b, t, ADV_SEQ)])
    trainer = trainer_for(tiny_model_dir, tmp_path / "gspo", "gspo")
    assert recorded_loss(trainer, without_row(hand_built(ADV_SEQ), 2)) == \
        pytest.approx(pg / 3 + rest / tokens, rel=1e-5)


@pytest.mark.parametrize("algorithm,extra", [("ppo", ()), ("grpo", ()), ("dr_grpo", ()), ("gspo", ()),
                                             ("grpo", ("train.loss_aggregation=sequence_mean",))])
def test_two_ranks_give_one_processs_loss(tiny_model_dir, tmp_path, algorithm, extra):
    """Two ranks holding two rows each, one of them dropped (sample 2): the mean of the ranks' losses (what the
    averaged gradients are the gradient of) equals one process's loss on all four, every term and divisor."""
    adv = ADV_TOKENS if algorithm == "ppo" else ADV_SEQ
    whole = recorded_loss(trainer_for(tiny_model_dir, tmp_path / "one", algorithm, *extra),
                          without_row(hand_built(adv), 2))
    ranks = ThreadRanks(2)
    trainers = [trainer_for(tiny_model_dir, tmp_path / f"rank{r}", algorithm, *extra, "train.micro_batch_size=1",
                            strategy=ranks.strategy(r)) for r in range(2)]
    shares = [without_row(hand_built(adv), 2).select(torch.tensor(rows)) for rows in ([0, 1], [2, 3])]
    per_rank = ranks.run(lambda r: recorded_loss(trainers[r], shares[r]))
    assert sum(per_rank) / 2 == pytest.approx(whole, rel=1e-5)


def test_ppo_whitens_rewards_over_every_ranks_tokens(tiny_model_dir, tmp_path):
    """ppo.whiten_rewards: the mean and variance are the global batch's, so two ranks holding two rows each get
    the advantages and returns one process gets for all four."""
    from llmrl.algorithms import make_estimator

    cfg = tiny_config(tiny_model_dir, tmp_path, "ppo.whiten_rewards=true", "ppo.init_kl_coef=0.2")
    mask = torch.tensor(MASK, dtype=torch.float32)
    inputs = [torch.tensor([0.6, 2.5, -0.4, 10.0]), torch.tensor(OLD) * mask, torch.tensor(REF) * mask,
              torch.tensor(VALUES) * mask, mask]

    def advantages(all_reduce_sum, rows):
        estimator = make_estimator(cfg, all_reduce_sum)
        part = [x[rows] for x in inputs]
        return estimator.advantages(*part[:4], part[4], 0.2, torch.ones(len(rows), dtype=torch.bool))

    one = advantages(lambda x: x, [0, 1, 2, 3])
    ranks = ThreadRanks(2)
    halves = ranks.run(lambda r: advantages(lambda x: ranks.all_reduce_sum(r, x), [[0, 1], [2, 3]][r]))
    for i in range(2):  # advantages, returns
        assert torch.cat([h[i] for h in halves]).flatten().tolist() == \
            pytest.approx(one[i].flatten().tolist(), rel=1e-5, abs=1e-6)
    alone = advantages(lambda x: x, [0, 1])  # one rank's own moments: what the old code did
    assert alone[0].flatten().tolist() != pytest.approx(one[0][:2].flatten().tolist(), rel=1e-3)



# ------------------------------------------------------------------------------------------------------------
# the sampler's log-probs against the trainer's: logged, and truncated importance sampling

SAMPLER = [[-1.3, -0.5, -1.0], [-0.7, -0.2, 0.0], [-0.35, 0.0, 0.0], [-1.5, -0.95, -0.4]]
# OLD - SAMPLER per token: 0.3, 0, -1, | 0, -1, | 0.05, | 0, 0.05, 0: one ratio (exp 0.3 = 1.35) past a cap of 1.3


def test_truncated_importance_sampling_weighs_each_tokens_advantage(tiny_model_dir, tmp_path):
    """train.importance_sampling: true: each token's advantage times min(pi_old / pi_sampler, cap); the mismatch
    and the share of capped weights are logged."""
    trainer = trainer_for(tiny_model_dir, tmp_path, "grpo", "train.importance_sampling=true",
                          "train.importance_sampling_cap=1.3", "generation.missing_eos_penalty=0.5", "reward.clip=10")
    exp, stats = experience_of(trainer, sampler=SAMPLER)
    expected = group_normalised(shaped(), "group")
    diffs, weights, clipped = [], [], 0
    for b, t in cells(MASK):
        ratio = math.exp(OLD[b][t] - SAMPLER[b][t])
        diffs.append(abs(OLD[b][t] - SAMPLER[b][t]))
        weights.append(min(ratio, 1.3))
        clipped += ratio > 1.3
        assert exp.advantages[b, t].item() == pytest.approx(expected[b] * weights[-1], rel=1e-5, abs=1e-6), (b, t)
    assert clipped == 1
    assert stats["sampling/is_clipped"] == pytest.approx(clipped / len(diffs))
    assert stats["sampling/logprob_diff_mean"] == pytest.approx(sum(diffs) / len(diffs), rel=1e-5)
    assert stats["sampling/logprob_diff_max"] == pytest.approx(max(diffs), rel=1e-5)
    assert stats["sampling/is_weight_mean"] == pytest.approx(sum(weights) / len(weights), rel=1e-5)

    # false: the same rollout's advantages unweighted, the mismatch still logged
    trainer = trainer_for(tiny_model_dir, tmp_path / "off", "grpo", "train.importance_sampling=false",
                          "generation.missing_eos_penalty=0.5", "reward.clip=10")
    exp, stats = experience_of(trainer, sampler=SAMPLER)
    for b, t in cells(MASK):
        assert exp.advantages[b, t].item() == pytest.approx(expected[b], rel=1e-5, abs=1e-6), (b, t)
    assert "sampling/is_clipped" not in stats
    assert stats["sampling/logprob_diff_max"] == pytest.approx(max(diffs), rel=1e-5)
