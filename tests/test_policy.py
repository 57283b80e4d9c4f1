"""Policy, reference and rollout on a tiny model: LoRA starts as the identity, left padding changes nothing,
rollout and training see the same log-probs, and an update touches only the adapter and the value head."""
import json
import pytest
import torch

from helpers import REPO, make_trainer, tiny_config
from llmrl.config import ConfigError, LoraConfig, ModelConfig
from llmrl.models.policy import build_policy, load_tokenizer
from llmrl.rollout.experience import generate, truncate_at_eos

CPU = torch.device("cpu")


def test_truncate_at_eos_hand_worked():
    eos, pad = 1, 0
    response = torch.tensor([[5, 1, 7, 7], [5, 6, 7, 8], [1, 1, 9, 9]])
    ids, mask, has_eos = truncate_at_eos(response, eos, pad)
    assert ids.tolist() == [[5, 1, 0, 0], [5, 6, 7, 8], [1, 0, 0, 0]]
    assert mask.tolist() == [[1, 1, 0, 0], [1, 1, 1, 1], [1, 0, 0, 0]]
    assert has_eos.tolist() == [True, False, True]


def test_fresh_policy_equals_reference_and_value_head_is_zero(tiny_model_dir):
    policy, tokenizer = build_policy(ModelConfig(name_or_path=str(tiny_model_dir)), LoraConfig(), CPU)
    enc = tokenizer(["abc>cba", "ab>"], return_tensors="pt", padding=True)
    logits, values = policy(enc["input_ids"], enc["attention_mask"])
    with policy.reference():
        ref_logits, _ = policy(enc["input_ids"], enc["attention_mask"], with_values=False)
    assert torch.equal(logits, ref_logits)  # LoRA's B starts at zero: KL to the reference is 0 at step 0
    assert torch.count_nonzero(values) == 0
    names = [n for n, p in policy.named_parameters() if p.requires_grad]
    assert names and all("lora_" in n or n.startswith("value_head") for n in names)


def test_dropout_is_disabled(tiny_model_dir):
    policy, _ = build_policy(ModelConfig(name_or_path=str(tiny_model_dir)), LoraConfig(), CPU)
    assert all(m.p == 0.0 for m in policy.modules() if isinstance(m, torch.nn.Dropout))


def test_left_padding_does_not_change_logprobs(tiny_model_dir):
    policy, tokenizer = build_policy(ModelConfig(name_or_path=str(tiny_model_dir)), LoraConfig(), CPU)
    alone = tokenizer(["ab>ba"], return_tensors="pt")
    batch = tokenizer(["ab>ba", "abcde>edcba"], return_tensors="pt", padding=True)
    assert batch["attention_mask"][0, 0] == 0  # the short one is left padded
    logits_alone, values_alone = policy(alone["input_ids"], alone["attention_mask"])
    logits_batch, values_batch = policy(batch["input_ids"], batch["attention_mask"])
    n = alone["input_ids"].shape[1]
    assert torch.allclose(logits_batch[0, -n:], logits_alone[0], atol=1e-5)


def test_trimmed_microbatch_gives_the_same_logprobs_and_values(tiny_model_dir, tmp_path):
    """Columns that are padding in every row are cut before a forward pass; nothing else changes."""
    trainer = make_trainer(tiny_config(tiny_model_dir, tmp_path / "run", "generation.max_new_tokens=10"))
    exp = generate(trainer.policy.model, trainer.tokenizer, ["abcde>", "abcdef>", "fa>", "bbb>"], trainer.cfg.generation,
                   CPU, greedy=True)
    short = exp.select(torch.tensor([2, 3]))  # the two short prompts: leading columns are all padding
    lengths = short.response_mask.sum(1)
    short.response_mask[:, int(lengths.max()) - 1:] = 0  # and the last response columns too
    short.response[:, int(lengths.max()) - 1:] = trainer.tokenizer.pad_token_id
    cut = short.trimmed()
    assert cut.query.shape[1] < short.query.shape[1] and cut.response.shape[1] < short.response.shape[1]
    assert torch.equal(cut.lengths, short.lengths)
    with torch.no_grad():
        full_lp, full_v, _ = trainer.forward_logprobs(short, with_values=True)
        cut_lp, cut_v, _ = trainer.forward_logprobs(cut, with_values=True)
    T, mask = cut.response.shape[1], cut.response_mask.bool()
    assert torch.allclose(full_lp[:, :T][mask], cut_lp[mask], atol=1e-5)
    assert torch.allclose(full_v[:, :T][mask], cut_v[mask], atol=1e-5)


def test_the_pad_token_comes_from_the_vocabulary_and_no_embedding_is_resized(english_model_dir):
    from transformers import AutoTokenizer

    fresh = AutoTokenizer.from_pretrained(english_model_dir)
    assert fresh.pad_token is None  # like gpt2's
    tokenizer = load_tokenizer(ModelConfig(name_or_path=str(english_model_dir)))
    assert tokenizer.pad_token == "<unk>" and tokenizer.pad_token_id != tokenizer.eos_token_id
    assert len(tokenizer) == len(fresh) and tokenizer.padding_side == "left"
    policy, tokenizer = build_policy(ModelConfig(name_or_path=str(english_model_dir)), LoraConfig(), CPU)
    assert policy.model.get_input_embeddings().weight.shape[0] == len(fresh)


def test_a_pad_equal_to_eos_keeps_the_stop_token_in_the_masks(english_model_dir, tmp_path):
    """With no other token to pad with, EOS pads: every mask comes from lengths, so the real EOS still counts
    (a mask built as ids != pad would drop it: Huang et al. 2024, detail 1)."""
    import shutil

    from transformers import AutoTokenizer, PreTrainedTokenizerFast

    from llmrl.trainers.dpo import encode

    folder = tmp_path / "eos-only"
    shutil.copytree(english_model_dir, folder)
    bare = PreTrainedTokenizerFast(tokenizer_object=AutoTokenizer.from_pretrained(english_model_dir).backend_tokenizer,
                                   eos_token="<eos>", unk_token="<eos>", bos_token="<eos>")
    bare.save_pretrained(folder)
    tokenizer = load_tokenizer(ModelConfig(name_or_path=str(folder)))
    eos = tokenizer.eos_token_id
    assert tokenizer.pad_token_id == eos
    response, mask, ended = truncate_at_eos(torch.tensor([[5, eos, 7, 8], [5, 6, 7, eos], [5, 6, 7, 8]]), eos, eos)
    assert mask.tolist() == [[1, 1, 0, 0], [1, 1, 1, 1], [1, 1, 1, 1]] and ended.tolist() == [True, True, False]
    assert response.tolist()[0] == [5, eos, eos, eos]
    exp = encode(tokenizer, ["a", "abc"], ["ab", "the film"], CPU)  # DPO's answers end with EOS, then EOS pads
    lengths = [len(tokenizer(c, add_special_tokens=False)["input_ids"]) + 1 for c in ("ab", "the film")]
    assert exp.response_mask.sum(1).tolist() == lengths and lengths[0] < lengths[1]
    assert exp.response[0, lengths[0] - 1].item() == eos and exp.response_mask[0, lengths[0] - 1] == 1


def test_missing_model_path_is_a_clear_error(tmp_path):
    with pytest.raises(ConfigError, match=r"model.name_or_path = '.*no-such-model' does not exist"):
        build_policy(ModelConfig(name_or_path=str(tmp_path / "no-such-model")), LoraConfig(), CPU)


def test_rollout_logprobs_match_the_sampling_distribution(tiny_model_dir, tmp_path):
    """Greedy tokens are the argmax of the training forward pass, and sampled-token log-probs under the
    generate() scores equal those the trainer recomputes (same positions, padding and temperature)."""
    cfg = tiny_config(tiny_model_dir, tmp_path / "run", "generation.temperature=0.7")
    trainer = make_trainer(cfg)
    prompts = ["abc>", "abcde>", "fa>", "bbbb>"]
    exp = generate(trainer.policy.model, trainer.tokenizer, prompts, cfg.generation, CPU, greedy=True)
    with torch.no_grad():
        P = exp.query.shape[1]
        logits, _ = trainer.policy(exp.input_ids, exp.attention_mask, with_values=False)
        argmax = logits[:, P - 1:-1].argmax(-1)
    mask = exp.response_mask.bool()
    assert torch.equal(argmax[mask], exp.response[mask])

    torch.manual_seed(0)
    enc = trainer.tokenizer(prompts, return_tensors="pt", padding=True)
    out = trainer.policy.model.generate(**enc, do_sample=True, temperature=0.7, top_k=None, max_new_tokens=4,
                                        output_scores=True, return_dict_in_generate=True,
                                        pad_token_id=trainer.tokenizer.pad_token_id)
    tokens = out.sequences[:, enc["input_ids"].shape[1]:]
    gen_logprobs = torch.stack([torch.log_softmax(s, -1) for s in out.scores], 1).gather(
        -1, tokens.unsqueeze(-1)).squeeze(-1)  # scores are already divided by the temperature
    exp.query, exp.query_mask = enc["input_ids"], enc["attention_mask"]
    exp.response, exp.response_mask = tokens, torch.ones_like(tokens, dtype=torch.float)
    with torch.no_grad():
        logprobs, _, _ = trainer.forward_logprobs(exp, with_values=False)
    finished = torch.cumsum((tokens == trainer.tokenizer.eos_token_id).long(), 1)
    live = (finished == 0) | ((finished == 1) & (tokens == trainer.tokenizer.eos_token_id))
    assert torch.allclose(logprobs[live], gen_logprobs[live], atol=1e-4)


@pytest.mark.parametrize("dtype", ["float32", "bfloat16"])
def test_an_update_changes_only_adapter_and_value_head(tiny_model_dir, tmp_path, dtype):
    trainer = make_trainer(tiny_config(tiny_model_dir, tmp_path / "run", f"model.dtype={dtype}"))
    base_dtypes = {p.dtype for n, p in trainer.policy.named_parameters() if not p.requires_grad}
    assert base_dtypes == {getattr(torch, dtype)}
    before = {n: p.detach().clone() for n, p in trainer.policy.named_parameters()}
    stats = trainer.train_step()
    after = dict(trainer.policy.named_parameters())
    changed = {n for n in before if not torch.equal(before[n], after[n])}
    assert changed, "nothing was trained"
    assert all("lora_" in n or n.startswith("value_head") for n in changed), sorted(changed)[:5]
    assert any(n.startswith("value_head") for n in changed)
    assert stats["objective/kl"] == pytest.approx(0.0, abs=1e-6)  # first rollout: policy == reference
    for key in ("reward/mean", "loss/policy", "loss/value", "policy/clipfrac", "policy/approx_kl",
                "objective/entropy", "response/length", "response/eos_rate", "time/generate", "time/update"):
        assert key in stats and stats[key] == stats[key], key


@pytest.mark.parametrize("bits", ["8bit", "4bit"])
def test_quantized_base_trains_lora_on_cpu(tiny_model_dir, tmp_path, bits):
    trainer = make_trainer(tiny_config(tiny_model_dir, tmp_path / "run", f"model.quantization={bits}"))
    import bitsandbytes as bnb

    layer = bnb.nn.Linear8bitLt if bits == "8bit" else bnb.nn.Linear4bit
    assert any(isinstance(m, layer) for m in trainer.policy.modules())
    lora_before = {n: p.detach().clone() for n, p in trainer.policy.named_parameters() if "lora_" in n}
    stats = trainer.train_step()
    trainer.evaluate()  # eval (no grad) then train again: the 4-bit CPU path must survive this order
    trainer.train_step()
    after = dict(trainer.policy.named_parameters())
    assert any(not torch.equal(lora_before[n], after[n]) for n in lora_before)
    assert stats["loss/policy"] == stats["loss/policy"]


def test_gradient_checkpointing_gives_the_same_update(tiny_model_dir, tmp_path):
    """model.gradient_checkpointing recomputes activations in backward: same losses, same adapter after a step."""
    runs = {}
    for flag in (False, True):
        trainer = make_trainer(tiny_config(tiny_model_dir, tmp_path / str(flag), f"model.gradient_checkpointing={flag}"))
        assert trainer.policy.model.get_base_model().is_gradient_checkpointing == flag
        stats = trainer.train_step()
        runs[flag] = stats, {n: p.detach().clone() for n, p in trainer.policy.named_parameters() if p.requires_grad}
    (plain, plain_w), (ckpt, ckpt_w) = runs[False], runs[True]
    for key in ("loss/policy", "loss/value", "optim/grad_norm"):
        assert plain[key] == pytest.approx(ckpt[key], rel=1e-5, abs=1e-7), key
    assert plain["optim/grad_norm"] > 0
    assert max((plain_w[n] - ckpt_w[n]).abs().max().item() for n in plain_w) < 1e-6


def test_entropy_bonus_reaches_the_gradient(tiny_model_dir, tmp_path):
    """The entropy is only a metric at ent_coef 0; with a bonus it must move the update (it needs its graph)."""
    norms = {}
    for coef in (0.0, 0.5):
        trainer = make_trainer(tiny_config(tiny_model_dir, tmp_path / str(coef), f"ppo.ent_coef={coef}"))
        stats = trainer.train_step()
        norms[coef] = stats["optim/grad_norm"]
        assert stats["policy/entropy"] > 0
    assert abs(norms[0.5] - norms[0.0]) > 1e-3 * norms[0.0], norms


def test_a_sampled_evaluation_leaves_training_samples_as_they_were(tiny_model_dir, tmp_path):
    """A sampled evaluation draws from the generators training samples from. Before the fix, a finished run
    extended with --resume (its last checkpoint written after its final evaluation) sampled other rollouts than
    the longer uninterrupted run, which never evaluated at that step."""
    trainer = make_trainer(tiny_config(tiny_model_dir, tmp_path, "run.eval_sampled=true", "data.eval_size=8"))
    prompts = ["abc>", "fed>", "ab>", "cafe>"]
    torch.manual_seed(3)
    plain = trainer.generate(prompts).response
    torch.manual_seed(3)
    first = trainer.evaluate()
    assert trainer.generate(prompts).response.tolist() == plain.tolist()
    torch.manual_seed(4)  # the evaluation did sample: from another state, other completions
    trainer.evaluate()
    assert [s[1] for s in trainer.last_eval_samples[:5]] != [s[1] for s in first["samples"]]


def value_loss_grads(trainer):
    """The gradient of a value loss alone: (does it reach the policy's adapter, does it reach a critic adapter)."""
    from llmrl.models.policy import CRITIC_ADAPTER

    exp = trainer.generate(trainer.prompt_texts(trainer.rows_for_step(0)))
    trainer.policy.zero_grad(set_to_none=True)
    trainer.policy.train()
    _, values = trainer.policy.response_outputs(exp.query, exp.query_mask, exp.response, exp.response_mask, True)
    ((values - 1.0) ** 2 * exp.response_mask).sum().backward()
    touched = {"policy": False, "critic": False}
    for name, p in trainer.policy.model.named_parameters():
        if "lora_" in name and p.grad is not None and p.grad.abs().sum() > 0:
            touched["critic" if f".{CRITIC_ADAPTER}." in name else "policy"] = True
    return touched


def test_a_separate_critic_trains_an_adapter_of_its_own(tiny_model_dir, tmp_path):
    """ppo.critic: separate: the value loss moves the critic's adapter and the value head, never the policy's
    adapter, and the policy's log-probs are the same with the critic there; shared: it moves the policy's."""

    shared = make_trainer(tiny_config(tiny_model_dir, tmp_path / "shared"))
    torch.manual_seed(0)
    with torch.no_grad():  # B != 0 and a value head != 0: zeros there pass no gradient back
        for name, p in shared.policy.model.named_parameters():
            if "lora_B" in name:
                p.normal_(0, 0.1)
        shared.policy.value_head.weight.normal_(0, 0.1)
    assert value_loss_grads(shared) == {"policy": True, "critic": False}

    separate = make_trainer(tiny_config(tiny_model_dir, tmp_path / "separate", "ppo.critic=separate"))
    with torch.no_grad():
        for name, p in separate.policy.model.named_parameters():
            if "lora_B" in name:
                p.normal_(0, 0.1)
        separate.policy.value_head.weight.normal_(0, 0.1)
    trainable = {n for n, p in separate.policy.named_parameters() if p.requires_grad}
    assert any(".critic." in n for n in trainable) and any(".default." in n for n in trainable)
    with separate.policy.reference():  # leaving it, peft re-activates "default" and freezes the rest
        pass
    assert value_loss_grads(separate) == {"policy": False, "critic": True}
    assert {n for n, p in separate.policy.named_parameters() if p.requires_grad} == trainable  # flags put back
    exp = separate.generate(separate.prompt_texts(separate.rows_for_step(0)))
    with torch.no_grad():
        with_values, values = separate.policy.response_outputs(exp.query, exp.query_mask, exp.response,
                                                               exp.response_mask, True)
        alone, _ = separate.policy.response_outputs(exp.query, exp.query_mask, exp.response, exp.response_mask, False)
        with separate.policy.critic():
            critic_logits, _ = separate.policy.response_outputs(exp.query, exp.query_mask, exp.response,
                                                                exp.response_mask, False)
    assert torch.equal(with_values, alone) and values is not None
    assert not torch.allclose(alone, critic_logits)  # the critic's adapter is another function


def test_a_separate_critic_is_saved_and_resumed(tiny_model_dir, tmp_path):
    from helpers import launch_ppo

    run = tmp_path / "run"
    args = [f"model.name_or_path={tiny_model_dir}", f"run.output_dir={run}", "ppo.critic=separate",
            "train.total_steps=2", "run.save_every=1", "run.eval_every=0", "data.eval_size=4", "run.progress=false",
            "train.rollout_batch_size=8", "train.mini_batch_size=8", "train.micro_batch_size=8", "train.epochs=1"]
    out = launch_ppo(args, ranks=0)
    assert out.returncode == 0, out.stderr[-3000:]
    from safetensors.torch import load_file

    def critic(folder):
        return load_file(run / folder / "adapter" / "critic" / "adapter_model.safetensors")

    critic_weights = [critic("step-000001"), critic("final")]
    from llmrl.config import load_config  # loading a checkpoint puts the critic's weights back, not only the policy's
    from llmrl.models.policy import CRITIC_ADAPTER

    trainer = make_trainer(load_config(REPO / "configs" / "tiny.yaml", [*args, "run.output_dir=" + str(tmp_path / "x")]))
    trainer.load_weights(run / "final")
    loaded = {n: p for n, p in trainer.policy.model.named_parameters() if f".{CRITIC_ADAPTER}." in n}
    assert len(loaded) == len(critic_weights[-1]) > 0
    for name, saved in critic_weights[-1].items():  # peft's saved names drop the adapter's name
        match = [p for n, p in loaded.items() if n.replace(f".{CRITIC_ADAPTER}.", ".") == name]
        assert len(match) == 1 and torch.equal(match[0].detach(), saved), name
    out = launch_ppo([*args, "train.total_steps=3", "--resume"], ranks=0)
    assert out.returncode == 0, out.stderr[-3000:]
    critic_weights.append(critic("final"))
    assert json.loads((run / "summary.json").read_text())["steps"] == 3
    for before, after in zip(critic_weights, critic_weights[1:]):  # it trained at every step, the resumed one too
        assert before.keys() == after.keys() and any(not torch.equal(before[k], after[k]) for k in before)
    from llmrl import export  # the export is the policy alone: the base's weights, no adapter of either kind

    export(run / "final", tmp_path / "exported")
    exported = load_file(tmp_path / "exported" / "model.safetensors")
    assert exported and not any("lora" in k or CRITIC_ADAPTER in k for k in exported)
