"""Shared prompts (llmrl.models.prompt_cache): each distinct prompt and the common prefix encoded once must give the
logits, values, gradients and rollouts of encoding every row in full, on GPT-2 and Llama, with left padding,
repeated prompts and ragged responses."""
import pytest
import torch
from peft import LoraConfig, get_peft_model
from transformers import GPT2Config, GPT2LMHeadModel, LlamaConfig, LlamaForCausalLM

from llmrl.models.policy import Policy
from llmrl.models.prompt_cache import plan_prompts
from llmrl.rollout.engine import RolloutEngine, Sampling

V = 40


def tiny(kind: str):
    torch.manual_seed(0)
    if kind == "gpt2":
        model = GPT2LMHeadModel(GPT2Config(vocab_size=V, n_positions=64, n_embd=32, n_layer=2, n_head=4))
    else:  # RoPE and grouped-query attention
        model = LlamaForCausalLM(LlamaConfig(vocab_size=V, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                                             num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=64))
    model = get_peft_model(model, LoraConfig(r=4, lora_alpha=8, target_modules="all-linear"))
    with torch.no_grad():  # a trained-looking adapter, so that it matters in every pass
        for name, p in model.named_parameters():
            if "lora_B" in name:
                p.normal_(0, 0.3)
    policy = Policy(model, 32)
    torch.nn.init.normal_(policy.value_head.weight, std=0.5)
    return policy.eval()


def batch():
    """Six rows: a shared 6-token prefix ("system prompt"), prompts of 2-5 more tokens, two of them repeated
    (as GRPO's groups), left-padded; responses of 1-4 tokens, right-padded."""
    prefix = [3, 4, 5, 6, 7, 8]
    own = [[9, 10], [11, 12, 13, 14, 15], [9, 10], [16, 17, 18], [11, 12, 13, 14, 15], [19, 20, 21, 22]]
    responses = [[23, 24, 25, 26], [27], [28, 29], [30, 31, 32], [23, 24], [33, 34, 35]]
    prompts = [prefix + o for o in own]
    P, T = max(map(len, prompts)), max(map(len, responses))
    query = torch.tensor([[0] * (P - len(p)) + p for p in prompts])
    query_mask = torch.tensor([[0] * (P - len(p)) + [1] * len(p) for p in prompts])
    response = torch.tensor([r + [0] * (T - len(r)) for r in responses])
    response_mask = torch.tensor([[1.0] * len(r) + [0.0] * (T - len(r)) for r in responses])
    return query, query_mask, response, response_mask


def test_the_plan_finds_the_prefix_and_the_distinct_prompts():
    query, query_mask, _, _ = batch()
    plan = plan_prompts(query, query_mask)
    assert plan.prefix.tolist() == [3, 4, 5, 6, 7, 8]
    assert plan.row_prompt.tolist() == [0, 1, 0, 2, 1, 3]  # rows 0 and 2, 1 and 4 hold the same prompt
    assert plan.suffix.shape == (4, 5) and plan.suffix_mask.sum(1).tolist() == [2, 5, 3, 4]
    assert plan.lengths.tolist() == [8, 11, 8, 9, 11, 10]
    # nothing repeated, under 4 tokens in common: nothing to share
    assert plan_prompts(torch.tensor([[1, 2, 3, 4], [1, 2, 3, 5]]), torch.ones(2, 4, dtype=torch.long)) is None
    # the prefix stops one token short of the shortest prompt: each keeps a position of its own
    plan = plan_prompts(torch.tensor([[0, 1, 2, 3, 4, 5], [1, 2, 3, 4, 5, 6]]),
                        torch.tensor([[0, 1, 1, 1, 1, 1], [1, 1, 1, 1, 1, 1]]))
    assert plan.prefix.tolist() == [1, 2, 3, 4] and plan.suffix.tolist() == [[0, 5], [5, 6]]


@pytest.mark.parametrize("kind", ["gpt2", "llama"])
def test_shared_prompts_give_the_plain_forwards_logits_values_and_gradients(kind):
    policy = tiny(kind)
    query, query_mask, response, response_mask = batch()
    outs = {}
    for share in (False, True):
        policy.share_prompts = share
        policy.zero_grad()
        logits, values = policy.response_outputs(query, query_mask, response, response_mask)
        # a loss that reaches every output: logits and values at every real response position
        loss = ((logits.log_softmax(-1)[..., :5].sum(-1) + values) * response_mask).sum()
        loss.backward()
        grads = {n: p.grad.clone() for n, p in policy.named_parameters() if p.requires_grad}
        outs[share] = (logits.detach(), values.detach(), grads)
    (l0, v0, g0), (l1, v1, g1) = outs[False], outs[True]
    real = response_mask.bool()
    assert torch.allclose(l0[real], l1[real], atol=1e-5), (l0 - l1)[real].abs().max()
    assert torch.allclose(v0[real], v1[real], atol=1e-5), (v0 - v1)[real].abs().max()
    assert g0.keys() == g1.keys() and len(g0) > 4
    for name in g0:  # float32 sums in another order: within 1e-5 of each gradient's own scale
        scale = g0[name].abs().max()
        assert scale > 0 and (g0[name] - g1[name]).abs().max() <= 1e-5 * scale, (name, (g0[name] - g1[name]).abs().max())
    # and the shared path did share: fewer prompt rows went through the model than the batch has
    calls = []
    hook = policy.model.get_base_model().get_input_embeddings().register_forward_hook(
        lambda m, i, o: calls.append(tuple(i[0].shape)))
    policy.response_outputs(query, query_mask, response, response_mask)
    hook.remove()
    assert calls == [(1, 6), (4, 5), (6, 3)], calls  # prefix once, 4 distinct prompts, 6 responses minus one token


@pytest.mark.parametrize("kind", ["gpt2", "llama"])
def test_rollouts_with_shared_prompts_equal_the_plain_prefill(kind):
    policy = tiny(kind)
    query, query_mask, _, _ = batch()
    results = {}
    for share in (False, True):
        engine = RolloutEngine(eos_token_id=1, pad_token_id=0, share_prompts=share)
        greedy = engine.generate(policy.model, query, query_mask, 6, Sampling(greedy=True))
        sampled = engine.generate(policy.model, query, query_mask, 6, Sampling(temperature=1.0),
                                  generator=torch.Generator().manual_seed(3))
        results[share] = greedy, sampled
    for (t0, lp0), (t1, lp1) in zip(results[False], results[True]):
        assert torch.equal(t0, t1)
        assert torch.allclose(lp0, lp1, atol=1e-5)
