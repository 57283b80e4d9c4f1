"""Sampling from ILQL's policy in llmrl's decode loop: logits + beta * (Q - V), the heads read on each step's last
hidden state. Checked against the plain engine (beta 0), hand-set heads, and a plain loop with no KV cache."""
import pytest
import torch
from helpers import tiny_config

from llmrl.config import ConfigError, GenerationConfig
from llmrl.models.ilql_heads import ILQLHeads, shifted_logits
from llmrl.models.policy import build_policy, position_ids_from_mask
from llmrl.rollout.engine import RolloutEngine, Sampling
from llmrl.rollout.ilql import ILQLShift, ilql_generate

# different lengths (left padding matters) and repeats with a shared start (the shared-prompt prefill runs)
PROMPTS = ["abcdef>", "abcdea>", "fa>", "abcdef>", "edcba>", "abcdefab>"]


@pytest.fixture(scope="module")
def policy(tiny_model_dir, tmp_path_factory):
    cfg = tiny_config(tiny_model_dir, tmp_path_factory.mktemp("run"))
    policy, tokenizer = build_policy(cfg.model, cfg.lora, torch.device("cpu"))
    torch.manual_seed(1)
    with torch.no_grad():  # a trained-looking adapter: the heads must read the adapted hidden state
        for name, p in policy.model.named_parameters():
            if "lora_B" in name:
                p.normal_(0, 0.2)
    policy.eval()
    return policy, tokenizer


def random_heads(policy, tokenizer, seed=0, scale=1.0):
    torch.manual_seed(seed)
    heads = ILQLHeads(policy.model.config.hidden_size, len(tokenizer))
    with torch.no_grad():
        for head in [*heads.target_q_heads, heads.v_head]:  # targets differ from the Q heads: sampling reads targets
            head[2].weight.normal_(0, scale)
    return heads


def batch(tokenizer, prompts=PROMPTS):
    enc = tokenizer(prompts, return_tensors="pt", padding=True, add_special_tokens=False)
    return enc["input_ids"], enc["attention_mask"]


def plain_loop(model, heads, beta, ids, mask, n, eos, pad):
    """The reference: no cache, the whole sequence through the model at every step, argmax of the shifted logits
    at the last position; a finished row is fed pads (attended, as the engine and generate feed them)."""
    out_tokens = []
    finished = torch.zeros(ids.shape[0], dtype=torch.bool)
    for _ in range(n):
        out = model(input_ids=ids, attention_mask=mask, position_ids=position_ids_from_mask(mask),
                    output_hidden_states=True, use_cache=False)
        hidden = out.hidden_states[-1][:, -1]
        logits = out.logits[:, -1].float() + beta * heads.advantage(hidden).float()
        token = logits.argmax(-1).masked_fill(finished, pad)
        out_tokens.append(token)
        finished |= token == eos
        ids = torch.cat([ids, token[:, None]], 1)
        mask = torch.cat([mask, torch.ones_like(mask[:, :1])], 1)
        if finished.all():
            break
    return torch.stack(out_tokens, 1)


@pytest.mark.parametrize("share_prompts,static", [(False, False), (True, False), (False, True)])
def test_greedy_shifted_decoding_equals_a_plain_loop_without_cache(policy, share_prompts, static):
    policy, tok = policy
    heads = random_heads(policy, tok)
    ids, mask = batch(tok)
    engine = RolloutEngine(tok.eos_token_id, tok.pad_token_id, static=static, share_prompts=share_prompts)
    with torch.no_grad():
        ref = plain_loop(policy.model, heads, 3.0, ids, mask, 10, tok.eos_token_id, tok.pad_token_id)
        tokens, logprobs = engine.generate(policy.model, ids, mask, 10, Sampling(greedy=True),
                                           shift=ILQLShift(heads, 3.0))
        plain, _ = engine.generate(policy.model, ids, mask, 10, Sampling(greedy=True))
    assert torch.equal(tokens, ref), (tokens, ref)
    assert not torch.equal(plain, tokens)  # the shift changed the choice somewhere: the test can tell them apart
    # greedy: the log-probs are those of softmax(shifted logits), checked at the first token
    with torch.no_grad():
        out = policy.model(input_ids=ids, attention_mask=mask, position_ids=position_ids_from_mask(mask),
                           output_hidden_states=True)
        first = shifted_logits(out.logits[:, -1], heads.advantage(out.hidden_states[-1][:, -1]), 3.0)
    expected = first.log_softmax(-1).gather(1, tokens[:, :1])[:, 0]
    assert torch.allclose(logprobs[:, 0], expected, atol=1e-5)


def test_beta_zero_gives_the_plain_engines_tokens_and_logprobs(policy):
    policy, tok = policy
    heads = random_heads(policy, tok, scale=5.0)
    ids, mask = batch(tok)
    engine = RolloutEngine(tok.eos_token_id, tok.pad_token_id, share_prompts=True)
    with torch.no_grad():
        plain, plain_lp = engine.generate(policy.model, ids, mask, 10, Sampling(greedy=True))
        tokens, lp = engine.generate(policy.model, ids, mask, 10, Sampling(greedy=True), shift=ILQLShift(heads, 0.0))
        assert torch.equal(tokens, plain)
        assert torch.allclose(lp, plain_lp, atol=1e-6)
        # sampled from the same seed, top-k 3: the same draws (the log-probs differ by design: top-k is counted)
        torch.manual_seed(7)
        plain, _ = engine.generate(policy.model, ids, mask, 10, Sampling(top_k=3, temperature=0.8))
        torch.manual_seed(7)
        tokens, _ = engine.generate(policy.model, ids, mask, 10, Sampling(top_k=3, temperature=0.8),
                                    shift=ILQLShift(heads, 0.0))
    assert torch.equal(tokens, plain)


def test_heads_that_favour_one_token_make_greedy_decoding_pick_it(policy):
    policy, tok = policy
    favoured = tok.convert_tokens_to_ids("d")
    heads = ILQLHeads(policy.model.config.hidden_size, len(tok))
    with torch.no_grad():  # Q_target(s, a) = 1 for a = "d", 0 otherwise, whatever s; V(s) = 0.5
        for head in heads.target_q_heads:
            head[2].weight.zero_()
            head[2].bias.zero_()
            head[2].bias[favoured] = 1.0
        heads.v_head[2].weight.zero_()
        heads.v_head[2].bias.fill_(0.5)
    ids, mask = batch(tok)
    engine = RolloutEngine(tok.eos_token_id, tok.pad_token_id)
    with torch.no_grad():
        plain, _ = engine.generate(policy.model, ids, mask, 6, Sampling(greedy=True))
        tokens, _ = engine.generate(policy.model, ids, mask, 6, Sampling(greedy=True), shift=ILQLShift(heads, 100.0))
        weak, _ = engine.generate(policy.model, ids, mask, 6, Sampling(greedy=True), shift=ILQLShift(heads, 1e-4))
    assert (plain != favoured).any()
    assert (tokens == favoured).all()
    assert torch.equal(weak, plain)  # a tiny beta changes nothing: the shift is scaled by beta


def test_sampled_tokens_and_logprobs_come_from_the_shifted_top_k_distribution(policy):
    """Sampling: every token is among the top_k of the shifted logits, and its recorded log-prob is that of
    softmax(top_k(shifted / temperature)) at that token (recomputed by a full forward over the sampled sequence)."""
    policy, tok = policy
    heads = random_heads(policy, tok, seed=3)
    ids, mask = batch(tok)
    torch.manual_seed(11)
    with torch.no_grad():
        tokens, logprobs, entropy = RolloutEngine(tok.eos_token_id, tok.pad_token_id).generate(
            policy.model, ids, mask, 8, Sampling(temperature=0.7, top_k=3), with_entropy=True,
            shift=ILQLShift(heads, 2.0))
        full_ids, full_mask = torch.cat([ids, tokens], 1), torch.cat([mask, torch.ones_like(tokens)], 1)
        out = policy.model(input_ids=full_ids, attention_mask=full_mask, position_ids=position_ids_from_mask(full_mask),
                           output_hidden_states=True)
        P, T = ids.shape[1], tokens.shape[1]
        shifted = shifted_logits(out.logits[:, P - 1:P - 1 + T], heads.advantage(out.hidden_states[-1][:, P - 1:-1]),
                                 2.0) / 0.7
    live = torch.cumsum((tokens == tok.eos_token_id).long(), 1)
    live = (live == 0) | ((live == 1) & (tokens == tok.eos_token_id))
    top3 = shifted.topk(3, -1).indices
    assert ((top3 == tokens[..., None]).any(-1) | ~live).all()
    kept = torch.full_like(shifted, float("-inf")).scatter(-1, top3, shifted.gather(-1, top3))
    expected = kept.log_softmax(-1).gather(-1, tokens[..., None])[..., 0]
    assert torch.allclose(logprobs[live], expected[live], atol=1e-5)
    p = kept.softmax(-1)
    expected_entropy = -(p * kept.log_softmax(-1)).nan_to_num().sum(-1)
    assert torch.allclose(entropy[live], expected_entropy[live], atol=1e-5)
    assert (logprobs[~live] == 0).all()


def test_ilql_generate_takes_beta_and_top_k_and_refuses_bad_ones(policy):
    policy, tok = policy
    heads = random_heads(policy, tok)
    ids, mask = batch(tok)
    cfg = GenerationConfig(max_new_tokens=99, engine="generate")  # ILQL decodes with llmrl's loop whatever it says
    exp = ilql_generate(policy.model, heads, tok, PROMPTS, beta=3.0, top_k=20, greedy=True, max_new_tokens=10,
                        cfg=cfg)
    with torch.no_grad():
        ref = plain_loop(policy.model, heads, 3.0, ids, mask, 10, tok.eos_token_id, tok.pad_token_id)
    assert torch.equal(exp.response, ref[:, :exp.response.shape[1]])
    torch.manual_seed(0)
    sampled = ilql_generate(policy.model, heads, tok, PROMPTS, beta=3.0, top_k=1, max_new_tokens=10)
    assert torch.equal(sampled.response, exp.response)  # top_k = 1 samples the greedy tokens
    for beta, top_k, fragment in [(float("nan"), 20, "ilql.beta"), (1.0, -1, "ilql.top_k")]:
        with pytest.raises(ConfigError, match=fragment):
            ilql_generate(policy.model, heads, tok, PROMPTS, beta=beta, top_k=top_k)
