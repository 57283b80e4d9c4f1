"""ILQL (algorithm: ilql): the per-token losses against a hand-worked case and a plain loop, the heads' Polyak
targets and shifted logits, the trainer's encoding, wiring, checkpoints and resume, and a tiny run that learns."""
import json
import math
import re
from pathlib import Path

import pytest
import torch

from llmrl.config import ConfigError
from llmrl.rl.ilql import action_states, expectile_loss, gather_states, ilql_loss, terminal_rewards

REPO = Path(__file__).resolve().parent.parent


# ------------------------------------------------------------------------------------------------------------------
# the maths

def hand_case():
    """One sequence of 3 actions a = (0, 2, 1) over a 3-token vocabulary, one Q head, reward 1 at the end.

    gamma 0.5, tau 0.7. V = (0.5, 1.0, 0.2); the Q head's rows (0, 1, 2 below) take Q(s_k, a_k) = 1.0, 0.5, 1.5;
    the targets' minimum takes Qt(s_k, a_k) = 0.8, 0.6, 0.4 (other tokens' values do not matter for them).
    Bellman targets: y_0 = 0 + 0.5 * V_1 = 0.5, y_1 = 0 + 0.5 * V_2 = 0.1, y_2 = 1 + 0.5 * 0 (done) = 1.0.
    Q loss = ((1.0 - 0.5)^2 + (0.5 - 0.1)^2 + (1.5 - 1.0)^2) / 3 = (0.25 + 0.16 + 0.25) / 3 = 0.22.
    Qt - V = (0.3, -0.4, 0.2): above V weighs tau = 0.7, below 1 - tau = 0.3:
    V loss = (0.7 * 0.09 + 0.3 * 0.16 + 0.7 * 0.04) / 3 = (0.063 + 0.048 + 0.028) / 3 = 0.139 / 3 = 0.046333...
    CQL: -log softmax of each Q row at a_k: row 0 (1, 0, 0) at 0: log(e + 2) - 1 = 0.551445; row 1 (0, 0, 0.5) at 2:
    log(2 + e^0.5) - 0.5 = 0.794377; row 2 (0, 1.5, 0) at 1: log(2 + e^1.5) - 1.5 = 0.368981; mean 0.571601.
    AWAC: the LM's logits are all 0: -log(1/3) = 1.098612 per token.
    Total with cql_scale 0.1, awac_scale 1: 0.22 + 0.046333 + 0.0571601 + 1.098612 = 1.422106.
    """
    q = torch.tensor([[[1.0, 0.0, 0.0], [0.0, 0.0, 0.5], [0.0, 1.5, 0.0]]], requires_grad=True)
    target = torch.tensor([[[0.8, 9.0, 9.0], [9.0, 9.0, 0.6], [9.0, 0.4, 9.0]]])
    values = torch.tensor([[0.5, 1.0, 0.2]], requires_grad=True)
    logits = torch.zeros(1, 3, 3, requires_grad=True)
    actions = torch.tensor([[0, 2, 1]])
    mask = torch.ones(1, 3, dtype=torch.bool)
    rewards, dones = terminal_rewards(mask, torch.tensor([1.0]))
    return q, target, values, logits, actions, mask, rewards, dones


def test_ilql_loss_matches_the_hand_worked_case():
    q, target, values, logits, actions, mask, rewards, dones = hand_case()
    assert rewards.tolist() == [[0.0, 0.0, 1.0]] and dones.tolist() == [[0.0, 0.0, 1.0]]
    loss, stats = ilql_loss(logits, [q], target, values, actions, mask, rewards, dones, gamma=0.5, tau=0.7,
                            cql_scale=0.1, awac_scale=1.0)
    cql = (math.log(math.e + 2) - 1 + math.log(2 + math.exp(0.5)) - 0.5 + math.log(2 + math.exp(1.5)) - 1.5) / 3
    assert stats["loss/q"].item() == pytest.approx(0.22, abs=1e-6)
    assert stats["loss/v"].item() == pytest.approx(0.139 / 3, abs=1e-6)
    assert stats["loss/cql"].item() == pytest.approx(cql, abs=1e-6) and cql == pytest.approx(0.571601, abs=1e-6)
    assert stats["loss/awac"].item() == pytest.approx(math.log(3), abs=1e-6)
    assert loss.item() == pytest.approx(0.22 + 0.139 / 3 + 0.1 * cql + math.log(3), abs=1e-6)
    assert loss.item() == pytest.approx(1.422106, abs=1e-6)
    assert stats["ilql/advantage_mean"].item() == pytest.approx(0.1 / 3, abs=1e-6)  # (0.3 - 0.4 + 0.2) / 3
    assert stats["ilql/advantage_min"].item() == pytest.approx(-0.4, abs=1e-6)
    assert stats["ilql/advantage_max"].item() == pytest.approx(0.3, abs=1e-6)
    assert stats["ilql/q_mean"].item() == pytest.approx(1.0, abs=1e-6)  # (1.0 + 0.5 + 1.5) / 3
    assert stats["ilql/v_mean"].item() == pytest.approx(1.7 / 3, abs=1e-6)
    loss.backward()
    # V(s_{k+1}) in the Q target is held fixed: V's only gradient is the expectile's, -2 w (Qt - V) / 3:
    # (-2 * 0.7 * 0.3, -2 * 0.3 * -0.4, -2 * 0.7 * 0.2) / 3 = (-0.14, 0.08, -0.093333)
    assert torch.allclose(values.grad, torch.tensor([[-0.14, 0.08, -0.28 / 3]]), atol=1e-6)
    # Q's gradient at the taken tokens: 2 (Q - y) / 3 plus 0.1 x CQL's (softmax - 1) / 3; row 0 at token 0:
    # 2 * 0.5 / 3 + 0.1 * (e / (e + 2) - 1) / 3
    assert q.grad[0, 0, 0].item() == pytest.approx(1.0 / 3 + 0.1 * (math.e / (math.e + 2) - 1) / 3, abs=1e-6)


def test_expectile_weighs_both_sides():
    # tau 0.7: 0.7 * 2^2 above, 0.3 * 2^2 below; 0.5 is half the squared error on both
    assert expectile_loss(torch.tensor([2.0, -2.0, 0.0]), 0.7).tolist() == pytest.approx([2.8, 1.2, 0.0], abs=1e-6)
    assert expectile_loss(torch.tensor([2.0, -2.0]), 0.5).tolist() == pytest.approx([2.0, 2.0], abs=1e-6)


def loop_ilql(logits, qs, target, values, ids, action_mask, lengths, reward, gamma, tau, cql_scale, awac_scale):
    """Plain loops over sequences and tokens on per-position tensors ((B, L, ...): position j - 1 chooses token j)."""
    terms = {"q": 0.0, "v": 0.0, "cql": 0.0, "awac": 0.0}
    n = 0
    for b in range(ids.shape[0]):
        js = [j for j in range(1, int(lengths[b])) if action_mask[b, j]]
        for k, j in enumerate(js):
            s, a = j - 1, int(ids[b, j])
            last = k == len(js) - 1
            y = (float(reward[b]) if last else 0.0) + gamma * (0.0 if last else float(values[b, js[k + 1] - 1]))
            for q in qs:
                terms["q"] += (float(q[b, s, a]) - y) ** 2
                terms["cql"] += -math.log(math.exp(float(q[b, s, a])) / sum(math.exp(float(x)) for x in q[b, s]))
            diff = float(target[b, s, a]) - float(values[b, s])
            terms["v"] += (tau if diff >= 0 else 1 - tau) * diff ** 2
            terms["awac"] += -math.log(math.exp(float(logits[b, s, a])) / sum(math.exp(float(x))
                                                                               for x in logits[b, s]))
            n += 1
    terms = {k: v / n for k, v in terms.items()}
    return terms["q"] + terms["v"] + cql_scale * terms["cql"] + awac_scale * terms["awac"], terms


def test_ilql_loss_matches_a_plain_loop_with_padding_and_several_action_spans():
    g = torch.Generator().manual_seed(0)
    B, L, V = 3, 10, 5
    lengths = torch.tensor([10, 7, 5])  # right padding after these
    ids = torch.randint(0, V, (B, L), generator=g)
    action_mask = torch.zeros(B, L, dtype=torch.bool)
    action_mask[0, 3:5] = action_mask[0, 7:10] = True  # two assistant turns with a user turn between
    action_mask[1, 2:7] = True
    action_mask[2, 1:3] = action_mask[2, 4] = True
    qs = [torch.randn(B, L, V, generator=g) for _ in range(2)]
    target = torch.randn(B, L, V, generator=g)
    values = torch.randn(B, L, generator=g)
    logits = torch.randn(B, L, V, generator=g)
    reward = torch.tensor([1.0, -0.5, 2.0])
    expected, terms = loop_ilql(logits, qs, target, values, ids, action_mask, lengths, reward, gamma=0.9, tau=0.7,
                                cql_scale=0.3, awac_scale=0.5)

    positions, mask = action_states(action_mask)
    assert positions.tolist() == [[2, 3, 6, 7, 8], [1, 2, 3, 4, 5], [0, 1, 3, 0, 0]]
    assert mask.sum(1).tolist() == [5, 5, 3]
    actions = ids.gather(1, positions + 1)
    rewards, dones = terminal_rewards(mask, reward)
    loss, stats = ilql_loss(gather_states(logits, positions), [gather_states(q, positions) for q in qs],
                            gather_states(target, positions), gather_states(values, positions), actions, mask,
                            rewards, dones, gamma=0.9, tau=0.7, cql_scale=0.3, awac_scale=0.5)
    assert loss.item() == pytest.approx(expected, abs=1e-5)
    for k in terms:
        assert stats[f"loss/{k}"].item() == pytest.approx(terms[k], abs=1e-5)
    assert stats["ilql/actions"].item() == 13


def test_two_ranks_halves_average_to_the_whole_batch():
    """Over data-parallel ranks each divides by all ranks' actions / ranks: the average of the halves' losses (what
    DeepSpeed's averaged gradients follow) is the whole batch's loss, although the halves hold 3 and 7 actions."""
    g = torch.Generator().manual_seed(1)
    B, N, V = 4, 4, 5
    mask = torch.tensor([[1, 1, 0, 0], [1, 0, 0, 0], [1, 1, 1, 1], [1, 1, 1, 0]], dtype=torch.bool)
    rewards, dones = terminal_rewards(mask, torch.tensor([1.0, 0.0, -1.0, 2.0]))
    parts = dict(logits=torch.randn(B, N, V, generator=g), qs=[torch.randn(B, N, V, generator=g)],
                 target_q=torch.randn(B, N, V, generator=g), values=torch.randn(B, N, generator=g),
                 actions=torch.randint(0, V, (B, N), generator=g), mask=mask, rewards=rewards, dones=dones)
    settings = dict(gamma=0.9, tau=0.7, cql_scale=0.1, awac_scale=1.0)
    whole, _ = ilql_loss(**parts, **settings)

    def half(rows):
        return {k: ([x[rows] for x in v] if isinstance(v, list) else v[rows]) for k, v in parts.items()}

    halves = [ilql_loss(**half(rows), **settings, num_actions=mask.sum() / 2)[0] for rows in (slice(0, 2), slice(2, 4))]
    assert ((halves[0] + halves[1]) / 2).item() == pytest.approx(whole.item(), abs=1e-6)
    assert ilql_loss(**half(slice(0, 2)), **settings)[0].item() != pytest.approx(halves[0].item(), abs=1e-3)


def test_float32_targets_beside_bf16_heads_follow_a_small_alpha():
    """DeepSpeed's bf16 casts the heads; the trainer keeps the targets in float32, where a Polyak step of alpha 1e-3
    is exact, not rounded as in bf16 (8 bits of mantissa: measured off by 40% of the step on average, 0 for 22%)."""
    from llmrl.models.ilql_heads import ILQLHeads

    torch.manual_seed(0)
    heads = ILQLHeads(4, 6).bfloat16()
    for p in heads.q_heads.parameters():
        p.data.add_(1.0)  # every Q weight 1 above its target: each target should move by 1e-3
    bf16_before = [t.detach().float() for t in heads.target_q_heads.buffers()]
    heads.sync_targets(1e-3)
    moved = torch.cat([(t.float() - b).flatten() for t, b in zip(heads.target_q_heads.buffers(), bf16_before)])
    assert (moved - 1e-3).abs().mean() > 2.5e-4  # what the float32 targets avoid
    heads.target_q_heads.float()
    before = [t.detach().clone() for t in heads.target_q_heads.buffers()]
    heads.sync_targets(1e-3)
    for t, b, q in zip(heads.target_q_heads.buffers(), before, heads.q_heads.parameters()):
        assert t.dtype == torch.float32 and torch.allclose(t, 0.999 * b + 1e-3 * q.float(), atol=1e-7)
    qs, target, v = heads(torch.randn(2, 3, 4))  # every head reads the hidden state in its own dtype
    assert qs[0].dtype == v.dtype == torch.bfloat16 and target.dtype == torch.float32


def test_action_states_refuses_token_zero():
    with pytest.raises(ValueError, match="token 0"):
        action_states(torch.tensor([[True, False]]))


def test_polyak_targets_and_shifted_logits():
    from llmrl.models.ilql_heads import ILQLHeads, shifted_logits

    torch.manual_seed(0)
    heads = ILQLHeads(4, 6, two_qs=True)
    for p in heads.q_heads.parameters():  # the online heads move away from their targets
        p.data.add_(1.0)
    before = [t.detach().clone() for t in heads.target_q_heads.buffers()]
    online = [p.detach().clone() for p in heads.q_heads.parameters()]
    heads.sync_targets(0.25)
    for t, b, p in zip(heads.target_q_heads.buffers(), before, online):
        assert torch.allclose(t, 0.25 * p + 0.75 * b, atol=1e-6)
    heads.sync_targets(1.0)
    assert all(torch.equal(t, p) for t, p in zip(heads.target_q_heads.buffers(), heads.q_heads.parameters()))

    hidden = torch.randn(2, 3, 4)
    qs, target, v = heads(hidden)
    assert torch.allclose(target, torch.minimum(qs[0], qs[1]))  # synced: the targets are the online heads
    logits = torch.randn(2, 3, 6)
    advantage = heads.advantage(hidden)
    assert torch.allclose(advantage, target - v[..., None])
    assert torch.equal(shifted_logits(logits, advantage, 0.0), logits)  # beta 0 is the LM
    assert torch.allclose(shifted_logits(logits, advantage, 2.0), logits + 2.0 * advantage)


# ------------------------------------------------------------------------------------------------------------------
# the trainer

def logged_file(path: Path, n: int = 16, chosen_reward: float = 1.0, rejected_reward: float = 0.0) -> Path:
    """Logged answers from the project's reverse-the-letters pairs: each prompt's right answer and its wrong one."""
    pairs = [json.loads(line) for line in (REPO / "configs/data/reverse_prefs.jsonl").read_text().splitlines()][:n]
    with open(path, "w") as f:
        for p in pairs:
            f.write(json.dumps({"prompt": p["prompt"], "completion": p["chosen"], "reward": chosen_reward}) + "\n")
            f.write(json.dumps({"prompt": p["prompt"], "completion": p["rejected"], "reward": rejected_reward}) + "\n")
    return path


def ilql_trainer(model_dir, tmp_path, *overrides, data=None, strategy=None):
    from helpers import make_trainer, tiny_config

    from llmrl.distributed.strategy import SingleProcess
    from llmrl.trainers.ilql import ILQLTrainer, load_logged_rows

    data = data or logged_file(tmp_path / "logged.jsonl")
    cfg = tiny_config(model_dir, tmp_path / "run", "algorithm=ilql", f"ilql.data={data}", "ilql.batch_size=8",
                      *overrides)
    base = make_trainer(cfg)  # its policy and held-out rows
    rows = load_logged_rows(cfg, base.tokenizer, 32)
    return ILQLTrainer(cfg, base.policy, base.tokenizer, rows, base.eval_rows, strategy or SingleProcess("cpu"),
                       tmp_path / "run", None)


def summed_advantages(trainer, indices) -> torch.Tensor:
    """(len(indices),) each logged answer's summed advantage Qt(s, a) - V(s) over its tokens: about its reward minus
    V(prompt) once learned (the advantages telescope)."""
    from llmrl import rl

    with torch.no_grad():
        b = trainer.batch(indices)
        _, hidden = trainer.policy.logits_and_hidden(b["input_ids"], b["attention_mask"])
        states = rl.gather_states(hidden, b["positions"])
        advantage = trainer.heads.advantage(states).gather(-1, b["actions"][..., None]).squeeze(-1)
        qs, _, values = trainer.heads(states)
        assert all(torch.isfinite(q).all() for q in qs) and torch.isfinite(values).all()
        return (advantage * b["mask"]).sum(1)


def test_a_positive_share_sets_each_batchs_rewards(tiny_model_dir, tmp_path):
    """ilql.positive_share=0.25 of 8 on a log where half the answers are right: two rows per batch with a reward of
    at least ilql.positive_reward; with the threshold above every reward there are no positives to draw."""
    trainer = ilql_trainer(tiny_model_dir, tmp_path, "ilql.positive_share=0.25", "ilql.positive_reward=0.75",
                           data=logged_file(tmp_path / "logged.jsonl", chosen_reward=0.8, rejected_reward=0.7))
    for step in range(6):
        assert sorted(trainer.rows[i]["reward"] for i in trainer.rows_for_step(step)) == [0.7] * 6 + [0.8] * 2
    from llmrl.config import ConfigError

    with pytest.raises(ConfigError, match=re.escape("ilql.positive_share is 0.25: each batch draws 2 positive "
                                                    "(reward >= ilql.positive_reward = 0.9) rows but the log has 0: "
                                                    "lower ilql.positive_share or the batch size, lower "
                                                    "ilql.positive_reward")):
        ilql_trainer(tiny_model_dir, tmp_path, "ilql.positive_share=0.25", "ilql.positive_reward=0.9",
                     data=tmp_path / "logged.jsonl")


def test_encoding_marks_the_answer_and_eos_as_actions(tiny_model_dir, tmp_path):
    trainer = ilql_trainer(tiny_model_dir, tmp_path)
    tok = trainer.tokenizer
    ids, actions = trainer.encoded[0]  # "aab>" -> "baa"
    assert ids == tok("aab>", add_special_tokens=False)["input_ids"] + tok("baa", add_special_tokens=False)[
        "input_ids"] + [tok.eos_token_id]
    assert actions == [False] * 4 + [True] * 4
    b = trainer.batch([0, 1])  # "baa" (reward 1) and the wrong "baaa" (reward 0), padded to 5 actions
    assert b["positions"][0].tolist() == [3, 4, 5, 6, 0] and b["mask"].sum(1).tolist() == [4, 5]
    assert b["actions"][0, :4].tolist() == ids[4:]
    assert b["rewards"].tolist() == [[0, 0, 0, 1, 0], [0, 0, 0, 0, 0]]
    assert b["dones"].tolist() == [[0, 0, 0, 1, 0], [0, 0, 0, 0, 1]]


def test_a_multi_turn_answer_trains_only_the_assistants_tokens(chat_model_dir):
    from llmrl.models.policy import load_tokenizer
    from llmrl.config import ModelConfig
    from llmrl.trainers.ilql import encode_logged

    tok = load_tokenizer(ModelConfig(name_or_path=str(chat_model_dir)))
    prompt = [{"role": "user", "content": "What is 2 + 3?"}]
    completion = [{"role": "assistant", "content": "5"}, {"role": "user", "content": "be brief"},
                  {"role": "assistant", "content": "yes"}]
    ids, actions = encode_logged(tok, prompt, completion, "row 0")
    spans, start = [], None  # the action spans, decoded
    for i, a in enumerate(actions + [False]):
        if a and start is None:
            start = i
        elif not a and start is not None:
            spans.append(tok.decode(ids[start:i]))
            start = None
    # the template's "assistant: " opening and the user's turn are the environment's; EOS closes the last turn
    assert spans == ["5\n", "yes\n" + tok.eos_token]
    assert tok.decode(ids[:actions.index(True)]) == "user: What is 2 + 3?\nassistant: "
    assert tok.decode([t for t, a in zip(ids, actions) if not a]) == \
        "user: What is 2 + 3?\nassistant: user: be brief\nassistant: "


@pytest.mark.parametrize("rewarded", ["right", "wrong"])
def test_ilql_learns_which_logged_answer_is_rewarded(tiny_model_dir, tmp_path, rewarded):
    # Each prompt has its right answer and a wrong one; only one of them earns reward 1. The summed advantage of the
    # rewarded answers must end above the others' by a clear margin, whichever is rewarded. The heads start at zero
    # (the policy is the LM at first), so every answer's advantage starts at exactly 0.
    data = logged_file(tmp_path / "logged.jsonl", chosen_reward=float(rewarded == "right"),
                       rejected_reward=float(rewarded == "wrong"))
    trainer = ilql_trainer(tiny_model_dir, tmp_path, "train.lr=1e-2", "ilql.alpha=0.1", "ilql.batch_size=16",
                           "ilql.steps_for_target_q_sync=1", data=data)
    right, wrong = list(range(0, 32, 2)), list(range(1, 32, 2))
    assert summed_advantages(trainer, right).abs().max() == summed_advantages(trainer, wrong).abs().max() == 0
    for _ in range(60):
        stats = trainer.train_step()
    gap = summed_advantages(trainer, right).mean() - summed_advantages(trainer, wrong).mean()
    assert (gap if rewarded == "right" else -gap) > 0.15
    for key in ("ilql/q_mean", "ilql/v_mean", "ilql/advantage_mean", "loss/ilql", "loss/q", "loss/v", "loss/cql",
                "loss/awac"):
        assert math.isfinite(stats[key]), key


def test_the_trainer_computes_the_loss_of_its_batch_as_the_loop_says(tiny_model_dir, tmp_path):
    """The wiring: the trainer's loss on a real batch equals the plain loop's on the same per-position tensors, with
    gamma, tau and both scales away from their defaults (a swapped or dropped setting, a shifted state, a reward in
    the wrong place or the online Q in V's regression changes it)."""
    trainer = ilql_trainer(tiny_model_dir, tmp_path, "ilql.gamma=0.8", "ilql.tau=0.6", "ilql.cql_scale=0.3",
                           "ilql.awac_scale=0.7")
    for p in trainer.heads.q_heads.parameters():  # targets != online heads
        p.data.mul_(1.5).add_(0.01)
    for p in trainer.heads.v_head.parameters():  # V != 0 (it starts at zero), so gamma reaches the Q target
        p.data.add_(0.01)
    indices = [0, 1, 2, 5]
    b = trainer.batch(indices)
    with torch.no_grad():
        loss, stats = trainer.loss(b)
        logits, hidden = trainer.policy.logits_and_hidden(b["input_ids"], b["attention_mask"])
        qs, target, values = trainer.heads(hidden)
    ids, attention = b["input_ids"], b["attention_mask"]
    action_mask = torch.zeros_like(ids, dtype=torch.bool)
    for row, i in enumerate(indices):
        action_mask[row, :len(trainer.encoded[i][1])] = torch.tensor(trainer.encoded[i][1])
    reward = torch.tensor([trainer.rows[i]["reward"] for i in indices])
    expected, terms = loop_ilql(logits, qs, target, values, ids, action_mask, attention.sum(1), reward, gamma=0.8,
                                tau=0.6, cql_scale=0.3, awac_scale=0.7)
    assert loss.item() == pytest.approx(expected, abs=1e-5)
    for k in terms:
        assert stats[f"loss/{k}"].item() == pytest.approx(terms[k], abs=1e-5)


def test_targets_follow_every_sync_steps_and_only_heads_and_adapter_train(tiny_model_dir, tmp_path):
    trainer = ilql_trainer(tiny_model_dir, tmp_path, "ilql.alpha=0.25", "ilql.steps_for_target_q_sync=2",
                           "train.lr=1e-2")
    heads = trainer.heads
    target0 = [t.detach().clone() for t in heads.target_q_heads.buffers()]
    assert {id(p) for p in heads.q_heads.parameters()} | {id(p) for p in heads.v_head.parameters()} <= \
        {id(p) for g in trainer.optimizer.param_groups for p in g["params"]}
    assert not {id(p) for p in heads.target_q_heads.buffers()} & \
        {id(p) for g in trainer.optimizer.param_groups for p in g["params"]}
    base = {n: p.detach().clone() for n, p in trainer.policy.model.named_parameters() if not p.requires_grad}
    trainer.train_step()
    assert all(torch.equal(t, t0) for t, t0 in zip(heads.target_q_heads.buffers(), target0))  # step 1: no sync
    trainer.train_step()
    for t, t0, q in zip(heads.target_q_heads.buffers(), target0, heads.q_heads.parameters()):
        assert torch.allclose(t, 0.25 * q + 0.75 * t0, atol=1e-7) and not torch.equal(t, t0)
    assert all(torch.equal(p, base[n]) for n, p in trainer.policy.model.named_parameters() if not p.requires_grad)
    lora = [p for n, p in trainer.policy.model.named_parameters() if "lora_B" in n]
    assert any(p.abs().sum() > 0 for p in lora)  # the adapter moved (lora_B starts at zero)


def test_resumed_equals_straight_heads_and_adapter(tiny_model_dir, tmp_path):
    common = ("ilql.alpha=0.5", "ilql.steps_for_target_q_sync=2", "train.lr=1e-2", "data.eval_size=0")
    data = logged_file(tmp_path / "logged.jsonl")
    straight = ilql_trainer(tiny_model_dir, tmp_path / "a", *common, data=data)
    for _ in range(5):
        straight.train_step()

    first = ilql_trainer(tiny_model_dir, tmp_path / "b", *common, data=data)
    for _ in range(3):
        first.train_step()
    checkpoint = first.save_checkpoint(tmp_path / "b" / "run" / "step-3")
    assert (checkpoint / "ilql_heads.safetensors").is_file()
    from llmrl.distributed.run_dir import foreign_entries

    assert foreign_entries(tmp_path / "b" / "run") == []
    resumed = ilql_trainer(tiny_model_dir, tmp_path / "c", *common, data=data)
    resumed.load_checkpoint(checkpoint)
    assert resumed.step == 3
    for _ in range(2):
        resumed.train_step()
    a, b = straight.heads.state_dict(), resumed.heads.state_dict()
    assert all(torch.equal(a[k], b[k]) for k in a)
    adapter = lambda t: {n: p for n, p in t.policy.model.named_parameters() if p.requires_grad}  # noqa: E731
    assert all(torch.equal(p, adapter(resumed)[n]) for n, p in adapter(straight).items())


def test_a_strategy_that_restores_the_weights_itself_still_gets_the_saved_targets(tiny_model_dir, tmp_path):
    """Under DeepSpeed the engine restores the trainable weights (base.load_checkpoint skips load_weights); the
    targets come from the checkpoint's heads file too, so a checkpoint whose engine state lacks them (written before
    they were buffers) does not resume with fresh ones."""
    from llmrl.distributed.strategy import SingleProcess

    trainer = ilql_trainer(tiny_model_dir, tmp_path, "ilql.alpha=0.5", "ilql.steps_for_target_q_sync=1",
                           "train.lr=1e-2")
    trainer.train_step()
    trainer.train_step()
    trainer.save_checkpoint(tmp_path / "run" / "step-2")
    saved = [t.detach().clone() for t in trainer.heads.target_q_heads.buffers()]

    class RestoresWeightsItself(SingleProcess):  # as DeepSpeed: load_state restores the module (here: nothing)
        loads_module_weights = True

    (tmp_path / "again").mkdir()
    again = ilql_trainer(tiny_model_dir, tmp_path / "again", strategy=RestoresWeightsItself("cpu"))
    fresh = [t.detach().clone() for t in again.heads.target_q_heads.buffers()]
    assert not all(torch.equal(a, b) for a, b in zip(fresh, saved))
    again.load_checkpoint(tmp_path / "run" / "step-2")
    assert all(torch.equal(a, b) for a, b in zip(again.heads.target_q_heads.buffers(), saved))


def test_a_checkpoint_without_its_heads_is_refused_in_one_line(tiny_model_dir, tmp_path):
    from llmrl.config import ConfigError

    trainer = ilql_trainer(tiny_model_dir, tmp_path, "data.eval_size=0")
    checkpoint = trainer.save_checkpoint(tmp_path / "run" / "step-0")
    (checkpoint / "ilql_heads.safetensors").unlink()
    with pytest.raises(ConfigError, match="ilql_heads.safetensors is missing"):
        trainer.load_weights(checkpoint)


@pytest.mark.parametrize("override, message", [
    ("ilql.data=", "ilql.data is empty: algorithm ilql needs logged answers"),
    ("ilql.tau=1.0", "ilql.tau is 1.0: must be in (0, 1)"),
    ("ilql.tau=0", "ilql.tau is 0"),
    ("ilql.gamma=1.5", "ilql.gamma is 1.5: must be in [0, 1]"),
    ("ilql.cql_scale=-1", "ilql.cql_scale is -1"),
    ("ilql.awac_scale=-0.5", "ilql.awac_scale is -0.5"),
    ("ilql.alpha=0", "ilql.alpha is 0"),
    ("ilql.alpha=1.5", "ilql.alpha is 1.5"),
    ("ilql.steps_for_target_q_sync=0", "ilql.steps_for_target_q_sync is 0"),
    ("ilql.batch_size=0", "ilql.batch_size is 0"),
    ("ilql.positive_share=1.5", "ilql.positive_share is 1.5: must be in (0, 1)"),
    ("ilql.positive_reward=.nan", "ilql.positive_reward is nan: must be a finite number"),
    ("env.name=guess_number", "algorithm is ilql with an env.name"),
    ("reward.normalize=reference", "reward.normalize is 'reference' with algorithm ilql"),
])
def test_bad_ilql_settings_are_one_line(tmp_path, override, message):
    from helpers import tiny_config

    from llmrl.config import ConfigError

    extra = ["reward.function=", "data.source="] if override.startswith("env.") else []
    with pytest.raises(ConfigError, match=re.escape(message)):
        tiny_config(tmp_path / "m", tmp_path / "run", "algorithm=ilql", "ilql.data=x.jsonl", *extra, override)


def test_ilql_is_an_algorithm_with_its_settings_named(tmp_path):
    from helpers import tiny_config

    from llmrl.algorithms import describe
    from llmrl.distributed.strategy import accumulation

    cfg = tiny_config(tmp_path / "m", tmp_path / "run", "algorithm=ilql", "ilql.data=x.jsonl", "ilql.batch_size=6",
                      "train.total_steps=7")
    (label, text), (kl, why) = describe(cfg)
    assert label == "ilql" and all(f"ilql.{k}=" in text for k in ("tau", "gamma", "cql_scale", "awac_scale",
                                                                   "alpha", "beta"))
    assert cfg.sizes(1).optimizer_steps == 7 and accumulation(cfg, 2) == (1, 3)
    # train's rollout sizes (mini 32, micro 32 in tiny.yaml: 32 / 2 ranks < 32) are not ILQL's: no error on 2 ranks
    assert cfg.sizes(2).optimizer_steps == 7
    with pytest.raises(ConfigError, match="ilql.batch_size = 6 is not divisible by the world size = 4"):
        accumulation(cfg, 4)


def test_a_relative_ilql_data_path_is_read_from_the_recipes_folder(tmp_path):
    from llmrl.config import load_config

    (tmp_path / "recipe").mkdir()
    (tmp_path / "recipe" / "r.yaml").write_text("algorithm: ilql\nmodel: {name_or_path: m}\n"
                                                "data: {source: task:reverse}\nreward: {function: exact_match}\n"
                                                "ilql: {data: logs/l.jsonl}\n")
    cfg = load_config(tmp_path / "recipe" / "r.yaml")
    assert cfg.ilql.data == str(tmp_path / "recipe" / "logs" / "l.jsonl")


def test_a_logged_row_longer_than_the_context_is_refused_before_training(tiny_model_dir, tmp_path):
    data = tmp_path / "long.jsonl"
    rows = [{"prompt": "ab>", "completion": "ba", "reward": 1.0}] * 8 + [
        {"prompt": "abc>", "completion": "a" * 40, "reward": 0.0}]  # 4 + 40 + EOS = 45 characters, one token each
    data.write_text("".join(json.dumps(r) + "\n" for r in rows))
    with pytest.raises(ConfigError, match=r"ilql.data: row 8 \(counting from 0\) has 45 tokens \(with EOS\), more "
                                          r"than the model's context of 32 tokens"):
        ilql_trainer(tiny_model_dir, tmp_path, data=data)


@pytest.mark.slow
def test_command_line_run_then_resume_longer(tiny_model_dir, tmp_path):
    """``launch/ppo.py ... algorithm=ilql``: 3 steps with checkpoints holding the heads, then --resume to 5; every
    step logged once with ILQL's metrics (exactly those llmrl.tune knows), held-out evaluation before and after."""
    from helpers import launch_ppo

    from llmrl.config import load_config
    from llmrl.distributed.checkpoint import step_dir_name
    from llmrl.tracking import read_log
    from llmrl.tune.search import logged_metrics

    data = logged_file(tmp_path / "logged.jsonl")
    run_dir = tmp_path / "run"
    common = [f"model.name_or_path={tiny_model_dir}", f"run.output_dir={run_dir}", "algorithm=ilql",
              f"ilql.data={data}", "ilql.batch_size=8", "data.eval_size=8", "run.eval_every=0", "run.save_every=2",
              "run.keep_last=5", "run.progress=false", "run.device=cpu", "run.threads=1"]
    out = launch_ppo([*common, "train.total_steps=3"], ranks=0)
    assert out.returncode == 0, out.stderr[-3000:]
    assert "ilql: ilql.tau=0.7, ilql.gamma=0.99" in out.stdout
    for folder in (step_dir_name(2), "final"):
        assert (run_dir / folder / "ilql_heads.safetensors").is_file(), folder
    heads_at_3 = (run_dir / "final" / "ilql_heads.safetensors").read_bytes()
    out = launch_ppo([*common, "train.total_steps=5", "--resume"], ranks=0)
    assert out.returncode == 0, out.stderr[-3000:]
    assert "resumed from" in out.stdout
    assert (run_dir / "final" / "ilql_heads.safetensors").read_bytes() != heads_at_3
    rows = [r for r in read_log(run_dir) if "loss/ilql" in r]
    assert [r["step"] for r in rows] == [1, 2, 3, 4, 5]
    assert all(math.isfinite(r[k]) for r in rows for k in ("loss/ilql", "ilql/q_mean", "ilql/v_mean"))
    keys = set().union(*(r.keys() for r in read_log(run_dir))) - {"step", "samples"}
    keys -= {k for k in keys if k.startswith("reward/") and k.count("/") == 2}
    assert keys == logged_metrics(load_config(REPO / "configs" / "tiny.yaml", [*common, "train.total_steps=5"]))
    summary = json.loads((run_dir / "summary.json").read_text())
    assert summary["steps"] == 5 and summary["eval_reward_after"] is not None


def test_evaluation_decodes_greedily_from_the_shifted_logits(tiny_model_dir, tmp_path):
    """ILQLTrainer.generate (KV cache, one token a step) against full forwards of the shifted logits; and heads whose
    advantage favours one token make every greedy token that one once beta is large, and none with beta 0."""
    trainer = ilql_trainer(tiny_model_dir, tmp_path, "ilql.beta=2.0", "generation.max_new_tokens=6")
    torch.manual_seed(1)
    for p in trainer.heads.parameters():
        p.data.add_(0.3 * torch.randn_like(p))
    prompts = ["abc>", "fedcba>", "aa>"]
    exp = trainer.generate(prompts, greedy=True)
    tok = trainer.tokenizer
    for row, prompt in enumerate(prompts):
        ids = tok(prompt, add_special_tokens=False)["input_ids"]
        expected = []
        for _ in range(6):  # plain: the whole sequence through the model for each token
            x = torch.tensor([ids + expected])
            expected.append(int(trainer.shifted_logits(x, torch.ones_like(x))[0, -1].argmax()))
            if expected[-1] == tok.eos_token_id:
                break
        got = exp.response[row][exp.response_mask[row].bool()].tolist()
        assert got == expected, prompt
    trainer.cfg.ilql.top_k = 1  # sampling from the single best shifted logit is greedy
    assert torch.equal(trainer.generate(prompts, greedy=False).response, exp.response)

    c = tok.convert_tokens_to_ids("c")
    for head in [*trainer.heads.target_q_heads, trainer.heads.v_head]:
        head[-1].weight.data.zero_()
        head[-1].bias.data.zero_()
    for head in trainer.heads.target_q_heads:
        head[-1].bias.data[c] = 10.0  # Q_target - V = 10 on "c", 0 elsewhere
    trainer.cfg.ilql.beta = 100.0
    exp = trainer.generate(prompts, greedy=True)
    assert exp.response.tolist() == [[c] * 6] * 3 and not exp.ended.any()
    with trainer.policy.reference():  # the reference (as evaluation's "before") is the LM alone, heads or not
        assert (trainer.generate(prompts, greedy=True).response != c).any()
    trainer.cfg.ilql.beta = 0.0  # the LM alone, through the shared decoder
    assert (trainer.generate(prompts, greedy=True).response != c).any()


def test_llmrl_eval_of_a_checkpoint_decodes_after_training_through_its_heads(tiny_model_dir, tmp_path):
    """evaluate_checkpoint (llmrl eval) loads the saved heads: "after" answers come from the shifted logits at the
    ilql.beta given at evaluation time, "before" (the base) from the LM alone."""
    from llmrl.trainers.evaluate import evaluate_checkpoint

    trainer = ilql_trainer(tiny_model_dir, tmp_path, "generation.max_new_tokens=4", "data.eval_size=3")
    c = trainer.tokenizer.convert_tokens_to_ids("c")
    for head in trainer.heads.target_q_heads:
        head[-1].bias.data[c] = 10.0  # Q_target - V = 10 on "c", 0 elsewhere (the heads start at zero)
    trainer.save_checkpoint(tmp_path / "run" / "step-1")
    result = evaluate_checkpoint(tmp_path / "run" / "step-1", overrides=["ilql.beta=100"], n_samples=3)
    assert [s["after"] for s in result["samples"]] == ["cccc"] * 3
    assert all(s["before"] != "cccc" for s in result["samples"])
    result = evaluate_checkpoint(tmp_path / "run" / "step-1", overrides=["ilql.beta=0"], n_samples=3)
    assert [s["after"] for s in result["samples"]] == [s["before"] for s in result["samples"]]  # LM alone, untrained


@pytest.mark.slow
def test_two_cpu_ranks_under_zero2_and_zero3_train_as_one_process_and_zero3_resumes(tmp_path, tiny_model_dir):
    """deepspeed, 2 CPU ranks, each with half of ilql.batch_size: every step's loss is the one process's (each rank
    divides by all ranks' answer tokens / 2), and so are the token counts, under ZeRO-2 and under ZeRO-3 (the Q heads
    partitioned, gathered for the Polyak update); ZeRO-3 stopped after step 2 and resumed goes on with the same
    targets (buffers in DeepSpeed's checkpoint): step 3's loss reads them (alpha 0.5, a sync every step)."""
    from helpers import launch_ppo

    from llmrl.tracking import read_log

    data = logged_file(tmp_path / "logged.jsonl")
    common = [f"model.name_or_path={tiny_model_dir}", "algorithm=ilql", f"ilql.data={data}", "ilql.batch_size=8",
              "ilql.alpha=0.5", "ilql.steps_for_target_q_sync=1", "data.eval_size=0",
              "run.save_every=2", "run.progress=false", "run.device=cpu", "run.threads=1", "train.total_steps=3"]
    runs = {"one": (0, [[]]), "zero2": (2, [["deepspeed.zero_stage=2"]]),
            "zero3": (2, [["deepspeed.zero_stage=3", "train.total_steps=2"], ["deepspeed.zero_stage=3", "--resume"]])}
    logs = {}
    for name, (ranks, launches) in runs.items():
        for extra in launches:
            out = launch_ppo([*common, f"run.output_dir={tmp_path / name}", *extra], ranks=ranks)
            assert out.returncode == 0, out.stderr[-3000:]
        logs[name] = [r for r in read_log(tmp_path / name) if "loss/ilql" in r]
    assert "resumed from" in out.stdout
    one = logs["one"]
    for name in ("zero2", "zero3"):
        assert [r["step"] for r in logs[name]] == [1, 2, 3], name
        for a, b in zip(one, logs[name]):
            assert b["loss/ilql"] == pytest.approx(a["loss/ilql"], abs=1e-5), (name, a["step"])
            assert b["ilql/actions"] == a["ilql/actions"]
        # the targets read at step 3 (a fresh run's are 0: their output layers start at zero); a mean of the ranks'
        # means, so near the one process's, not equal
        assert abs(logs[name][2]["ilql/target_q_mean"] - one[2]["ilql/target_q_mean"]) < \
            0.05 * abs(one[2]["ilql/target_q_mean"]), name
    from safetensors.torch import load_file

    heads = load_file(str(tmp_path / "zero3" / "final" / "ilql_heads.safetensors"))
    assert all(t.numel() > 0 for t in heads.values())  # written whole from partitioned Q and V heads


@pytest.mark.slow
def test_a_row_too_long_stops_the_command_in_one_line_before_training(tmp_path, tiny_model_dir):
    from helpers import assert_one_line, launch_ppo

    data = tmp_path / "long.jsonl"
    rows = [{"prompt": "ab>", "completion": "ba", "reward": 1.0}] * 8 + [
        {"prompt": "abc>", "completion": "a" * 40, "reward": 0.0}]
    data.write_text("".join(json.dumps(r) + "\n" for r in rows))
    out = launch_ppo([f"model.name_or_path={tiny_model_dir}", f"run.output_dir={tmp_path / 'run'}", "algorithm=ilql",
                      f"ilql.data={data}", "ilql.batch_size=8", "run.progress=false", "run.device=cpu"], ranks=0)
    assert_one_line(out, "ilql.data: row 8 (counting from 0) has 45 tokens", "shorten or remove the row")
    assert not (tmp_path / "run" / "log.jsonl").exists()


def test_the_targets_start_as_the_q_heads_rank_0_gave_every_rank(tiny_model_dir, tmp_path):
    """DeepSpeed gives every rank rank 0's parameters, not its buffers: a rank whose own draw of the targets differs
    (as rank 1's did) still starts with targets equal to the (broadcast) Q heads, which are not in the optimizer."""
    from llmrl.distributed.strategy import SingleProcess

    class RedrawsTheTargets(SingleProcess):
        def prepare(self, model, *args):
            for t in model.ilql_heads.target_q_heads.buffers():
                t.normal_()
            return super().prepare(model, *args)

    trainer = ilql_trainer(tiny_model_dir, tmp_path, strategy=RedrawsTheTargets("cpu"))
    heads = trainer.heads
    assert all(torch.equal(t, q) for t, q in zip(heads.target_q_heads.buffers(), heads.q_heads.parameters()))
    assert not list(heads.target_q_heads.parameters())
    assert {k for k in heads.state_dict() if k.startswith("target_q_heads.")} == \
        {k.replace("q_heads.", "target_q_heads.", 1) for k in heads.state_dict() if k.startswith("q_heads.")}


@pytest.mark.parametrize("bits", ["8bit", "4bit"])
def test_ilql_trains_lora_and_its_heads_on_a_quantized_base(tiny_model_dir, tmp_path, bits):
    import bitsandbytes as bnb

    trainer = ilql_trainer(tiny_model_dir, tmp_path, f"model.quantization={bits}", "ilql.alpha=0.5",
                           "ilql.steps_for_target_q_sync=1")
    layer = bnb.nn.Linear8bitLt if bits == "8bit" else bnb.nn.Linear4bit
    assert any(isinstance(m, layer) for m in trainer.policy.modules())
    lora = {n: p.detach().clone() for n, p in trainer.policy.model.named_parameters() if "lora_B" in n}
    targets = [t.detach().clone() for t in trainer.heads.target_q_heads.buffers()]
    stats = [trainer.train_step() for _ in range(2)]
    assert all(math.isfinite(s["loss/ilql"]) for s in stats)
    after = dict(trainer.policy.model.named_parameters())
    assert any(not torch.equal(lora[n], after[n]) for n in lora)
    assert any(not torch.equal(t, t0) for t, t0 in zip(trainer.heads.target_q_heads.buffers(), targets))


def test_the_trainer_keeps_the_targets_in_float32_after_a_bf16_cast(tiny_model_dir, tmp_path):
    from llmrl.distributed.strategy import SingleProcess

    class CastsLikeDeepSpeed(SingleProcess):  # DeepSpeed's bf16 casts the module it is given
        def prepare(self, model, *args):
            model.ilql_heads.bfloat16()
            return super().prepare(model, *args)

    trainer = ilql_trainer(tiny_model_dir, tmp_path, strategy=CastsLikeDeepSpeed("cpu"))
    assert {p.dtype for p in trainer.heads.target_q_heads.buffers()} == {torch.float32}
    assert {p.dtype for p in trainer.heads.q_heads.parameters()} == {torch.bfloat16}
    assert math.isfinite(trainer.train_step()["loss/ilql"])
