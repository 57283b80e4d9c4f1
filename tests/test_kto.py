"""KTO (algorithm: kto): the loss against hand-worked numbers, a plain loop and TRL's own KTOTrainer; the trainer's
wiring (log-probs, mismatched pairs, labels, weights, ranks); a tiny run that learns; the config's checks."""
import math
import random
from collections import defaultdict
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch

from helpers import make_trainer, tiny_config
from llmrl.config import ConfigError
from llmrl.rl.kto import kto_loss

REPO = Path(__file__).resolve().parent.parent


def sigmoid(x: float) -> float:
    return 1 / (1 + math.exp(-x))


def test_kto_loss_hand_worked():
    # Row 0 is desirable, row 1 undesirable; beta = 1, desirable_weight 2, undesirable_weight 0.5.
    # log-ratios r = logps - ref_logps = [-1 + 2.5, -2 + 2.5] = [1.5, 0.5].
    # Mismatched pairs: [-1 + 2, -3 + 3] = [1, 0], mean 0.5 = z0 (positive: not clamped).
    # desirable:   2   * (1 - sigmoid(1.5 - 0.5)) = 2 * (1 - 0.7310585786) = 0.5378828428
    # undesirable: 0.5 * (1 - sigmoid(0.5 - 0.5)) = 0.5 * 0.5             = 0.25
    # loss = (0.5378828428 + 0.25) / 2 = 0.3939414214
    # d loss / d logps[0] = -2 * sigmoid'(1) / 2 = -0.7310585786 * 0.2689414214 = -0.1966119332
    # d loss / d logps[1] = +0.5 * sigmoid'(0) / 2 = 0.5 * 0.25 / 2             = +0.0625
    logps = torch.tensor([-1.0, -2.0], dtype=torch.float64, requires_grad=True)
    kl_logps = torch.tensor([-1.0, -3.0], dtype=torch.float64, requires_grad=True)
    loss, stats = kto_loss(logps, torch.tensor([-2.5, -2.5], dtype=torch.float64), torch.tensor([True, False]),
                           kl_logps, torch.tensor([-2.0, -3.0], dtype=torch.float64), beta=1.0,
                           desirable_weight=2.0, undesirable_weight=0.5)
    assert loss.item() == pytest.approx(0.3939414214, abs=1e-9)
    loss.backward()
    assert logps.grad.tolist() == pytest.approx([-0.1966119332, 0.0625], abs=1e-9)
    assert kl_logps.grad is None  # z0 is detached: the reference point is not trained
    assert stats["kl"].item() == pytest.approx(0.5)
    assert stats["rewards/chosen"].item() == pytest.approx(1.5) and stats["rewards/rejected"].item() == 0.5
    assert stats["rewards/margins"].item() == pytest.approx(1.0)
    assert stats["logps/chosen"].item() == -1.0 and stats["logps/rejected"].item() == -2.0


def test_kto_reference_point_is_clamped_at_zero():
    # mismatched log-ratios [-1, -2]: mean -1.5, clamped to z0 = 0; beta = 0.5
    # desirable r = 1:    1 - sigmoid(0.5 * 1)    = 1 - 0.6224593312 = 0.3775406688
    # undesirable r = -2: 1 - sigmoid(0.5 * 2)    = 1 - 0.7310585786 = 0.2689414214; mean 0.3232410451
    loss, stats = kto_loss(torch.tensor([0.0, -3.0]), torch.tensor([-1.0, -1.0]), torch.tensor([True, False]),
                           torch.tensor([-2.0, -3.0]), torch.tensor([-1.0, -1.0]), beta=0.5)
    assert stats["kl"].item() == 0.0
    assert loss.item() == pytest.approx(0.3232410451, abs=1e-7)


def loop_kto(logps, ref, labels, kl, ref_kl, beta, wd, wu):
    z0 = max(0.0, sum(a - b for a, b in zip(kl, ref_kl)) / len(kl))
    losses = []
    for lp, rp, good in zip(logps, ref, labels):
        r = lp - rp
        losses.append(wd * (1 - sigmoid(beta * (r - z0))) if good else wu * (1 - sigmoid(beta * (z0 - r))))
    return sum(losses) / len(losses), z0


@pytest.mark.parametrize("seed", range(4))
def test_kto_loss_matches_a_plain_loop(seed):
    rng = random.Random(seed)
    B = rng.randint(2, 9)
    x = [[rng.gauss(-5, 3) for _ in range(B)] for _ in range(4)]
    labels = [rng.random() < 0.5 for _ in range(B)]
    beta, wd, wu = rng.uniform(0.05, 2), rng.uniform(0, 3), rng.uniform(0, 3)
    expected, z0 = loop_kto(*x[:2], labels, *x[2:], beta, wd, wu)
    t = [torch.tensor(v, dtype=torch.float64) for v in x]
    loss, stats = kto_loss(t[0], t[1], torch.tensor(labels), t[2], t[3], beta, wd, wu)
    assert loss.item() == pytest.approx(expected, abs=1e-9) and stats["kl"].item() == pytest.approx(z0, abs=1e-9)


def test_two_ranks_share_the_reference_point_and_average_to_the_whole_batch():
    """Each rank's half with its totals summed over both (all_reduce_sum): z0 and the stats are the whole batch's,
    and the mean of the two losses is the whole batch's loss."""
    g = torch.Generator().manual_seed(0)
    logps, ref, kl, ref_kl = (torch.randn(8, generator=g, dtype=torch.float64) - 3 for _ in range(4))
    kl = kl + 1.0  # a positive reference point
    labels = torch.tensor([True, False, False, True, True, True, False, True])
    args = dict(beta=0.3, desirable_weight=1.5, undesirable_weight=0.7)
    whole, whole_stats = kto_loss(logps, ref, labels, kl, ref_kl, **args)
    assert whole_stats["kl"].item() > 0
    halves = [slice(0, 4), slice(4, 8)]
    local = []
    for h in halves:  # each rank's own totals, as it would send them
        kto_loss(logps[h], ref[h], labels[h], kl[h], ref_kl[h], **args, all_reduce_sum=lambda x: local.append(x) or x)
    summed = local[0] + local[1]
    losses = [kto_loss(logps[h], ref[h], labels[h], kl[h], ref_kl[h], **args, all_reduce_sum=lambda x: summed)
              for h in halves]
    assert ((losses[0][0] + losses[1][0]) / 2).item() == pytest.approx(whole.item(), abs=1e-12)
    for key, value in whole_stats.items():
        assert losses[0][1][key].item() == pytest.approx(value.item(), abs=1e-12), key


def test_kto_loss_equals_trls_own():
    """TRL's KTOTrainer._compute_loss (loss_type="kto", reference log-probs precomputed) run on a stand-in model whose
    per-token log-probs sum to the chosen sequence log-probs: the same loss and the same logged kl and rewards."""
    trl_kto = pytest.importorskip("trl.trainer.kto_trainer")
    g = torch.Generator().manual_seed(1)
    B, L = 6, 4
    logps, ref, kl, ref_kl = (torch.randn(B, generator=g, dtype=torch.float64) * 2 - 4 for _ in range(4))
    kl = kl + 0.8
    labels = torch.tensor([True, False, True, True, False, False])
    per_token = torch.zeros(B, L - 1, dtype=torch.float64)
    per_token[:, -1] = logps  # TRL sums the completion's per-token log-probs
    model = lambda **kwargs: SimpleNamespace(log_probs=per_token, entropy=torch.zeros(B, L - 1),  # noqa: E731
                                             mean_logits=torch.zeros(B, L - 1))
    model.training = True
    fake = SimpleNamespace(
        model=model, beta=0.2, desirable_weight=1.3, undesirable_weight=0.6, loss_type="kto", calculate_KL=True,
        precompute_ref_logps=True, aux_loss_enabled=False, _total_train_tokens=0, _tp_size=1,
        _metrics={"train": defaultdict(list)}, _compute_kl_logps=lambda m, batch: kl,
        accelerator=SimpleNamespace(device=torch.device("cpu"), gather_for_metrics=lambda x: x))
    batch = {"input_ids": torch.ones(B, L, dtype=torch.long), "attention_mask": torch.ones(B, L, dtype=torch.long),
             "completion_mask": torch.ones(B, L, dtype=torch.long), "label": labels, "ref_logps": ref,
             "ref_KL_logps": ref_kl}
    theirs = trl_kto.KTOTrainer._compute_loss(fake, model, batch, return_outputs=False)
    ours, stats = kto_loss(logps, ref, labels, kl, ref_kl, beta=0.2, desirable_weight=1.3, undesirable_weight=0.6)
    assert ours.item() == pytest.approx(theirs.item(), abs=1e-12)
    logged = fake._metrics["train"]
    for key in ("kl", "rewards/chosen", "rewards/rejected", "rewards/margins", "logps/chosen", "logps/rejected"):
        assert stats[key].item() == pytest.approx(logged[key][-1], abs=1e-9), key


# ---------------------------------------------------------------------------------------------------------------
# the trainer

def rows_of(n: int = 16) -> list[dict]:
    from llmrl.data.logged import load_labelled

    rows = load_labelled(str(REPO / "configs/data/reverse_labels.jsonl"))
    return rows[:n]


def kto_trainer(tiny_model_dir, tmp_path, *extra, rows=None):
    from llmrl.distributed.strategy import SingleProcess
    from llmrl.trainers.kto import KTOTrainer

    cfg = tiny_config(tiny_model_dir, tmp_path / "run", "algorithm=kto", "kto.batch_size=8", *extra)
    base = make_trainer(cfg)
    return KTOTrainer(cfg, base.policy, base.tokenizer, rows or rows_of(), base.eval_rows, SingleProcess("cpu"),
                      tmp_path / "run", None)


def row_logprob(trainer, prompt: str, completion: str) -> float:
    """log pi(completion + EOS | prompt), one unpadded sequence at a time."""
    tok = trainer.tokenizer
    head = tok(prompt, add_special_tokens=False)["input_ids"]
    tail = tok(completion, add_special_tokens=False)["input_ids"] + [tok.eos_token_id]
    ids = torch.tensor([head + tail])
    logits, _ = trainer.policy(ids, torch.ones_like(ids), with_values=False)
    logp = torch.log_softmax(logits[0, len(head) - 1:-1].double(), -1)
    return logp.gather(-1, torch.tensor(tail)[:, None]).sum().item()


def test_step_zero_starts_at_half_the_weights(tiny_model_dir, tmp_path):
    """policy == reference at step 0: every log-ratio and z0 are 0, so each row's loss is weight x (1 - sigmoid(0))."""
    trainer = kto_trainer(tiny_model_dir, tmp_path, "kto.desirable_weight=2.0", "kto.undesirable_weight=0.5")
    labels = [trainer.rows[i]["label"] for i in trainer.batch_for_step(0)]
    assert 0 < sum(labels) < len(labels)
    stats = trainer.train_step()
    assert stats["kl"] == pytest.approx(0.0, abs=1e-6)
    assert stats["loss/kto"] == pytest.approx(sum(1.0 if good else 0.25 for good in labels) / len(labels), abs=1e-6)
    assert stats["rewards/chosen"] == pytest.approx(0.0, abs=1e-6)


def test_a_desirable_share_sets_each_batchs_labels_and_the_loss_reads_that_batch(tiny_model_dir, tmp_path):
    """kto.desirable_share=0.25 of 8: two label-true rows per batch, whatever the log's own share; step 0's loss
    (policy == reference) is then (2 x 2.0 + 6 x 0.5) x 0.5 / 8."""
    rows = rows_of(64)
    assert sum(r["label"] for r in rows) / len(rows) > 0.35  # the log's own share: about 3 of 8
    trainer = kto_trainer(tiny_model_dir, tmp_path, "kto.desirable_share=0.25", "kto.desirable_weight=2.0",
                          "kto.undesirable_weight=0.5", rows=rows)
    for step in range(6):
        assert sum(trainer.rows[i]["label"] for i in trainer.batch_for_step(step)) == 2
    assert trainer.train_step()["loss/kto"] == pytest.approx((2 * 2.0 + 6 * 0.5) * 0.5 / 8, abs=1e-6)


def test_a_desirable_share_the_log_cannot_fill_is_refused(tiny_model_dir, tmp_path):
    rows = [r for r in rows_of(64) if not r["label"]][:14] + [r for r in rows_of(64) if r["label"]][:2]
    with pytest.raises(ConfigError, match=r"kto\.desirable_share is 0\.5: each batch draws 4 desirable rows but the "
                                          r"log has 2"):
        kto_trainer(tiny_model_dir, tmp_path, "kto.desirable_share=0.5", rows=rows)


def test_the_loss_sees_each_rows_log_probs_its_mismatched_pair_labels_and_weights(tiny_model_dir, tmp_path,
                                                                                   monkeypatch):
    from llmrl import rl
    from llmrl.trainers import kto

    trainer = kto_trainer(tiny_model_dir, tmp_path, "kto.beta=0.3", "kto.desirable_weight=1.7",
                          "kto.undesirable_weight=0.4")
    with torch.no_grad():  # an adapter that changes the outputs: the policy is no longer its reference
        for name, p in trainer.policy.named_parameters():
            if "lora_B" in name:
                p.normal_(0, 0.5, generator=torch.Generator().manual_seed(hash(name) % 1000))
    seen = []
    real = rl.kto_loss
    monkeypatch.setattr(kto.rl, "kto_loss", lambda *a: seen.append(a) or real(*a))
    index = trainer.batch_for_step(0)
    rows = [trainer.rows[i] for i in index]
    with torch.no_grad():
        policy = [row_logprob(trainer, r["prompt"], r["completion"]) for r in rows]
        shifted = [rows[i - 1]["completion"] for i in range(len(rows))]  # row i's prompt, row i-1's answer
        policy_kl = [row_logprob(trainer, r["prompt"], c) for r, c in zip(rows, shifted)]
        with trainer.policy.reference():
            ref = [row_logprob(trainer, r["prompt"], r["completion"]) for r in rows]
            ref_kl = [row_logprob(trainer, r["prompt"], c) for r, c in zip(rows, shifted)]
    assert max(abs(a - b) for a, b in zip(policy, ref)) > 0.1  # the check below tells policy from reference
    trainer.train_step()
    logps, ref_logps, labels, kl_logps, ref_kl_logps, beta, wd, wu, reduce = seen[0]
    assert logps.tolist() == pytest.approx(policy, abs=1e-4) and ref_logps.tolist() == pytest.approx(ref, abs=1e-4)
    assert kl_logps.tolist() == pytest.approx(policy_kl, abs=1e-4)
    assert ref_kl_logps.tolist() == pytest.approx(ref_kl, abs=1e-4)
    assert labels.tolist() == [r["label"] for r in rows]
    assert (beta, wd, wu) == (0.3, 1.7, 0.4) and reduce == trainer.strategy.all_reduce_sum


def test_ranks_split_the_batch_and_share_the_mismatched_pairs(tiny_model_dir, tmp_path):
    """Two ranks' shares of a step, each with the mismatched pairs of the global batch, put together are the one
    process's: the reference point does not depend on how many ranks there are."""
    trainer = kto_trainer(tiny_model_dir, tmp_path)
    index = trainer.batch_for_step(3)
    with torch.no_grad():
        whole = [trainer.sequence_logprobs(e) for e in trainer.encode(index)]
        one = trainer.strategy
        parts = []
        for rank in (0, 1):
            trainer.strategy = SimpleNamespace(rank=rank, world_size=2)
            parts.append([trainer.sequence_logprobs(e) for e in trainer.encode(index)])
        trainer.strategy = one
    for k in (0, 1):  # the logged pairs, then the mismatched ones
        assert torch.allclose(torch.cat([parts[0][k], parts[1][k]]), whole[k], atol=1e-5)
        assert len(parts[0][k]) == 4


def test_each_pass_over_the_rows_is_a_fresh_permutation_fixed_by_the_seed(tiny_model_dir, tmp_path):
    trainer = kto_trainer(tiny_model_dir, tmp_path)
    first, second = trainer.batch_for_step(0) + trainer.batch_for_step(1), trainer.batch_for_step(2)
    assert sorted(first) == list(range(16)) and second != first[:8]
    again = kto_trainer(tiny_model_dir, tmp_path / "b")
    assert again.batch_for_step(1) == trainer.batch_for_step(1)  # a resumed run takes the same batch


def test_kto_learns_to_prefer_the_desirable_answers(tiny_model_dir, tmp_path):
    """16 steps on 64 logged answers: over all of them, the desirable answers' log-ratios to the reference rise above 0
    and the undesirable ones' fall below it (a flipped sign or swapped labels would do the opposite)."""
    trainer = kto_trainer(tiny_model_dir, tmp_path, "train.lr=3e-3", "kto.beta=1.0", rows=rows_of(64))
    first = trainer.train_step()
    for _ in range(15):
        last = trainer.train_step()
    assert last["loss/kto"] < first["loss/kto"] - 0.1
    everything = list(range(64))
    with torch.no_grad():
        logged, _ = trainer.encode(everything)
        logratios = trainer.sequence_logprobs(logged)
        with trainer.policy.reference():
            logratios -= trainer.sequence_logprobs(logged)
    good = torch.tensor([r["label"] for r in trainer.rows])
    assert logratios[good].mean() > 0.5 and logratios[~good].mean() < 0


@pytest.mark.parametrize("bits", ["8bit", "4bit"])
def test_kto_trains_lora_on_a_quantized_base_with_the_adapter_off_as_reference(tiny_model_dir, tmp_path, bits):
    """Step 0 on a quantized base: policy == reference (the same quantized base, adapter off), so the loss is
    half the weights (within 1e-3: bitsandbytes' 8-bit layers compute a little differently in train and eval mode,
    measured 3e-5); then the adapter moves."""
    import bitsandbytes as bnb

    trainer = kto_trainer(tiny_model_dir, tmp_path, f"model.quantization={bits}", "train.lr=1e-2")
    layer = bnb.nn.Linear8bitLt if bits == "8bit" else bnb.nn.Linear4bit
    assert any(isinstance(m, layer) for m in trainer.policy.modules())
    lora = {n: p.detach().clone() for n, p in trainer.policy.model.named_parameters() if "lora_B" in n}
    first = trainer.train_step()
    assert first["kl"] == pytest.approx(0.0, abs=1e-3) and first["loss/kto"] == pytest.approx(0.5, abs=1e-3)
    assert math.isfinite(trainer.train_step()["loss/kto"])
    after = dict(trainer.policy.model.named_parameters())
    assert any(not torch.equal(lora[n], after[n]) for n in lora)


def test_an_offline_step_that_leaves_a_nan_weight_stops_the_run(tiny_model_dir, tmp_path, monkeypatch):
    """The offline trainers' shared step (Trainer.offline_update) checks the weights after the update: a NaN stops
    the run in one line before the step is counted as done."""
    from llmrl.config import RunStopped

    trainer = kto_trainer(tiny_model_dir, tmp_path)
    step = trainer.strategy.step

    def poisoned(boundary):
        norm = step(boundary)
        trainer.params[0].data.fill_(float("nan"))
        return norm

    monkeypatch.setattr(trainer.strategy, "step", poisoned)
    with pytest.raises(RunStopped, match="step 1: training diverged: 1 trainable tensors hold NaN or inf"):
        trainer.train_step()


def test_a_mismatched_answer_is_cut_to_fit_the_context(tiny_model_dir, tmp_path):
    """Each row fits the model's 32 positions, but a long prompt with another row's long answer does not."""
    long = "abcdef" * 2
    rows = [{"prompt": long + ">", "completion": "a", "label": True},
            {"prompt": "a>", "completion": long[::-1] * 2, "label": False}] * 4
    trainer = kto_trainer(tiny_model_dir, tmp_path, rows=rows)
    logged, pairs = trainer.encode(trainer.batch_for_step(0))
    lengths = pairs.query_mask.sum(1) + pairs.response_mask.sum(1)
    assert lengths.max() == 32  # 13 prompt tokens + 24 answer tokens + EOS = 38, cut to the 32 positions
    with torch.no_grad():
        assert torch.isfinite(trainer.sequence_logprobs(pairs)).all()


@pytest.mark.parametrize("override,message", [
    ("kto.data=", "kto.data is empty: algorithm kto needs logged answers"),
    ("kto.batch_size=1", "kto.batch_size is 1: must be at least 2"),
    ("kto.beta=0", "kto.beta is 0.0: must be > 0"),
    ("kto.desirable_weight=-1", "kto.desirable_weight is -1.0: must be >= 0"),
    ("kto.undesirable_weight=-0.5", "kto.undesirable_weight is -0.5: must be >= 0"),
    ("kto.desirable_share=1", "kto.desirable_share is 1.0: must be in "),
    ("kto.desirable_share=0", "kto.desirable_share is 0.0: must be in "),
    ("env.name=guess_number", "algorithm is kto with an env.name"),
    ("desirable_weight=2", "'desirable_weight' is TRL's name; llmrl's is kto.desirable_weight"),
])
def test_kto_settings_are_checked(tiny_model_dir, tmp_path, override, message):
    extra = ["reward.function=", "data.source="] if override.startswith("env.") else []
    with pytest.raises(ConfigError, match=message.replace(".", r"\.")):
        tiny_config(tiny_model_dir, tmp_path, "algorithm=kto", *extra, override)


def test_both_weights_zero_would_learn_nothing(tiny_model_dir, tmp_path):
    with pytest.raises(ConfigError, match="kto.desirable_weight and kto.undesirable_weight are both 0"):
        tiny_config(tiny_model_dir, tmp_path, "algorithm=kto", "kto.desirable_weight=0", "kto.undesirable_weight=0")


def test_too_few_rows_for_the_batch(tiny_model_dir, tmp_path):
    with pytest.raises(ConfigError, match="kto.data has 4 rows, fewer than kto.batch_size = 8"):
        kto_trainer(tiny_model_dir, tmp_path, rows=rows_of(4))


def test_conversational_answers_are_encoded_as_a_sampled_turn(chat_model_dir, tmp_path):
    """TRL's conversational format: the prompt through the chat template with its generation prompt, an answer of
    one assistant message as its text and EOS (as DPO's answers and as a rollout samples them)."""
    rows = [{"prompt": [{"role": "user", "content": f"What is 2 + {n}?"}],
             "completion": [{"role": "assistant", "content": str(2 + n if n % 2 else 9)}], "label": bool(n % 2)}
            for n in range(8)]
    trainer = kto_trainer(chat_model_dir, tmp_path, rows=rows)
    index = trainer.batch_for_step(0)
    logged, pairs = trainer.encode(index)
    tok = trainer.tokenizer
    first = trainer.rows[index[0]]
    head = tok.apply_chat_template(first["prompt"], tokenize=False, add_generation_prompt=True)
    assert logged.query[0][logged.query_mask[0].bool()].tolist() == tok(head, add_special_tokens=False)["input_ids"]
    answer = tok(first["completion"][0]["content"], add_special_tokens=False)["input_ids"] + [tok.eos_token_id]
    assert logged.response[0][logged.response_mask[0].bool()].tolist() == answer
    assert pairs.response[1][pairs.response_mask[1].bool()].tolist() == answer  # row 1's prompt, row 0's answer
    assert math.isfinite(trainer.train_step()["loss/kto"])
