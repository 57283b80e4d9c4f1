"""llmrl's rollout engine against transformers' ``generate``, the reference: the same tokens (greedy, and
sampled from the same seed), the same log-probs, early stopping, and top-k/top-p filtering."""
import pytest
import torch
from helpers import make_trainer, tiny_config
from transformers.generation.logits_process import TopKLogitsWarper, TopPLogitsWarper

from llmrl.rollout.engine import RolloutEngine, Sampling, filter_logits
from llmrl.rollout.experience import generate

PROMPTS = ["abc>", "abcde>", "fa>", "bbbb>", "edcba>", "ff>"]  # different lengths: left padding matters


@pytest.fixture(scope="module")
def trainer(tiny_model_dir, tmp_path_factory):
    trainer = make_trainer(tiny_config(tiny_model_dir, tmp_path_factory.mktemp("run")))
    torch.manual_seed(1)
    with torch.no_grad():  # a trained-looking adapter: the engine must decode with it, not the bare base
        for name, p in trainer.policy.model.named_parameters():
            if "lora_B" in name:
                p.normal_(0, 0.2)
    trainer.policy.eval()
    return trainer


def reference(trainer, max_new_tokens, **sampling):
    """``model.generate`` tokens and the log-probs of those tokens under its logits / temperature."""
    tok = trainer.tokenizer
    enc = tok(PROMPTS, return_tensors="pt", padding=True, add_special_tokens=False)
    out = trainer.policy.model.generate(
        **enc, max_new_tokens=max_new_tokens, eos_token_id=tok.eos_token_id, pad_token_id=tok.pad_token_id,
        output_logits=True, return_dict_in_generate=True, **sampling)
    tokens = out.sequences[:, enc["input_ids"].shape[1]:]
    temperature = sampling.get("temperature", 1.0) if sampling.get("do_sample") else 1.0
    logprobs = (torch.stack(out.logits, 1).float() / temperature).log_softmax(-1).gather(2, tokens[..., None])[..., 0]
    return enc, tokens, logprobs


def live(tokens, eos):
    """Positions up to and including each sequence's first EOS."""
    ended = torch.cumsum((tokens == eos).long(), 1)
    return (ended == 0) | ((ended == 1) & (tokens == eos))


@pytest.mark.parametrize("static", [False, True])
def test_greedy_tokens_and_logprobs_equal_generate(trainer, static):
    tok = trainer.tokenizer
    enc, ref_tokens, ref_logprobs = reference(trainer, 10, do_sample=False)
    engine = RolloutEngine(tok.eos_token_id, tok.pad_token_id, static=static)
    tokens, logprobs = engine.generate(trainer.policy.model, enc["input_ids"], enc["attention_mask"], 10,
                                       Sampling(greedy=True))
    assert torch.equal(tokens, ref_tokens)
    keep = live(tokens, tok.eos_token_id)
    assert (~keep).any() and keep.any()  # some sequences stopped early, some tokens are real
    assert (tokens[~keep] == tok.pad_token_id).all() and (logprobs[~keep] == 0).all()
    assert torch.allclose(logprobs[keep], ref_logprobs[keep], atol=1e-5), (logprobs - ref_logprobs)[keep].abs().max()


@pytest.mark.slow
def test_compiled_step_gives_generates_greedy_tokens(trainer):
    """generation.compile: the torch.compile'd one-token step on a static cache (CUDA graphs on a GPU, the
    same code path compiled for the CPU here). The step must be one graph with no graph break (a break splits
    the CUDA graph and puts Python back between its pieces) and must not recompile from token to token or
    from one rollout to the next (the cache position changes each step: a guard on its value would)."""
    from torch._dynamo.utils import counters

    tok = trainer.tokenizer
    enc, ref_tokens, ref_logprobs = reference(trainer, 10, do_sample=False)
    engine = RolloutEngine(tok.eos_token_id, tok.pad_token_id, compile=True)
    torch._dynamo.reset()
    counters.clear()
    for _ in range(2):
        tokens, logprobs = engine.generate(trainer.policy.model, enc["input_ids"], enc["attention_mask"], 10,
                                           Sampling(greedy=True))
        assert torch.equal(tokens, ref_tokens)
        keep = live(tokens, tok.eos_token_id)
        assert torch.allclose(logprobs[keep], ref_logprobs[keep], atol=1e-5)
    assert len(engine._compiled) == 1
    assert dict(counters["graph_break"]) == {}
    assert counters["stats"]["unique_graphs"] == 1, dict(counters["stats"])
    assert dict(counters["recompiles"]) == {}


def test_sampled_tokens_equal_generate_from_the_same_seed(trainer):
    tok = trainer.tokenizer
    settings = dict(temperature=0.7, top_k=5, top_p=0.9)
    torch.manual_seed(123)
    enc, ref_tokens, ref_logprobs = reference(trainer, 10, do_sample=True, **settings)
    engine = RolloutEngine(tok.eos_token_id, tok.pad_token_id)
    torch.manual_seed(123)
    tokens, logprobs = engine.generate(trainer.policy.model, enc["input_ids"], enc["attention_mask"], 10,
                                       Sampling(**settings))
    assert tokens.shape == ref_tokens.shape and torch.equal(tokens, ref_tokens)  # both stop when all have ended
    keep = live(tokens, tok.eos_token_id)
    assert torch.allclose(logprobs[keep], ref_logprobs[keep], atol=1e-5)
    torch.manual_seed(124)  # and the draw really is random: another seed gives other tokens
    other, _ = engine.generate(trainer.policy.model, enc["input_ids"], enc["attention_mask"], 10,
                               Sampling(**settings))
    assert other.shape != tokens.shape or not torch.equal(other, tokens)


@pytest.mark.parametrize("settings", [{}, dict(repetition_penalty=1.5, min_p=0.2)])
def test_engine_logprobs_equal_the_trainers_recomputed_ones(trainer, settings):
    """What the trainer scores at training time is what the engine records (temperature 0.7): log pi(a|s) of
    logits / temperature. The repetition penalty and min-p choose the token only, as top-k/top-p do (TRL's
    training log-probs do not see them either), so pi_old may still come from the sampler (train.old_logprobs)."""
    tok = trainer.tokenizer
    enc = tok(PROMPTS, return_tensors="pt", padding=True, add_special_tokens=False)
    torch.manual_seed(5)
    tokens, logprobs, entropy = RolloutEngine(tok.eos_token_id, tok.pad_token_id).generate(
        trainer.policy.model, enc["input_ids"], enc["attention_mask"], 8, Sampling(temperature=0.7, **settings),
        with_entropy=True)
    cfg = trainer.cfg.generation
    old = cfg.temperature
    cfg.temperature = 0.7
    try:
        exp = generate(trainer.policy.model, tok, PROMPTS, cfg, torch.device("cpu"), greedy=True)  # shapes only
        exp.response = tokens
        exp.response_mask = live(tokens, tok.eos_token_id).float()
        with torch.no_grad():
            recomputed, _, recomputed_entropy = trainer.forward_logprobs(exp, with_values=False)
    finally:
        cfg.temperature = old
    keep = exp.response_mask.bool()
    assert torch.allclose(recomputed[keep], logprobs[keep], atol=1e-5)
    assert torch.allclose(recomputed_entropy[keep], entropy[keep], atol=1e-5)
    assert (entropy[keep] > 0).all() and (entropy[~keep] == 0).all()


@pytest.mark.parametrize("algorithm,extra,passes", [
    ("rloo", (), 1), ("ppo", (), 2), ("rloo", ("train.old_logprobs=recompute",), 2),
    ("rloo", ("model.dtype=bfloat16",), 2), ("rloo", ("train.importance_sampling=true",), 2)])
def test_pi_old_comes_from_the_sampler_only_where_it_is_exact(tiny_model_dir, tmp_path, algorithm, extra, passes):
    """train.old_logprobs: auto: GRPO/RLOO/REINFORCE in float32 on the fast engine take pi_old from what the engine
    sampled with, so make_experience runs the model only for the reference (adapter off). PPO runs the policy
    pass for the values; bfloat16, old_logprobs: recompute and importance sampling run it to recompute pi_old,
    keeping the sampler's log-probs beside it."""
    trainer = make_trainer(tiny_config(tiny_model_dir, tmp_path / algorithm, f"algorithm={algorithm}",
                                       "critic_free.num_generations=2", "model.share_prompts=false", *extra))
    with torch.no_grad():
        for name, p in trainer.policy.model.named_parameters():
            if "lora_B" in name:  # an adapter that matters, so that policy and reference differ
                p.normal_(0, 0.2)
    rows = trainer.rows_for_step(0)
    exp = trainer.generate(trainer.prompt_texts(rows))
    sampled = exp.logprobs.clone()
    calls = []  # rows through the model after the rollout
    hook = trainer.policy.model.get_base_model().get_input_embeddings().register_forward_hook(
        lambda m, i, o: calls.append(i[0].shape[0]))
    entropy_metric = trainer.fill_logprobs(exp)
    hook.remove()
    assert sum(calls) == passes * len(rows), calls
    if passes == 1:
        assert torch.equal(exp.logprobs, sampled) and exp.sampler_logprobs is None
    else:
        assert torch.equal(exp.sampler_logprobs, sampled)
    with torch.no_grad():
        recomputed, _, entropy = trainer.forward_logprobs(exp, with_values=False)
    keep = exp.response_mask.bool()
    tolerance = 1e-5 if "model.dtype=bfloat16" not in extra else 1e-2  # bf16: microbatches of other widths
    assert torch.allclose(exp.logprobs[keep], recomputed[keep], atol=tolerance)
    mean_entropy = (entropy_metric * exp.response_mask).sum().item() / keep.sum().item()
    assert abs(mean_entropy - (entropy * exp.response_mask).sum().item() / keep.sum().item()) < 1e-5
    assert not torch.allclose(exp.logprobs[keep], exp.ref_logprobs[keep], atol=1e-3)


def rows_with_a_common_stop(trainer):
    """A stop token and the prompts whose 20 greedy tokens all contain it, each with its first position."""
    tok = trainer.tokenizer
    enc = tok(PROMPTS, return_tensors="pt", padding=True, add_special_tokens=False)
    free, _ = RolloutEngine(-1, tok.pad_token_id).generate(  # no stop token: all 20 tokens
        trainer.policy.model, enc["input_ids"], enc["attention_mask"], 20, Sampling(greedy=True))
    rows = free.tolist()
    stop = max(set(free.flatten().tolist()), key=lambda t: sum(t in row for row in rows))  # most rows emit it
    keep = [i for i, row in enumerate(rows) if stop in row]
    assert len(keep) >= 2, rows
    first = torch.tensor([rows[i].index(stop) for i in keep])
    return stop, enc["input_ids"][keep], enc["attention_mask"][keep], free[keep], first


def test_stops_when_every_sequence_has_finished(trainer):
    pad = trainer.tokenizer.pad_token_id
    stop, ids, mask, free, first = rows_with_a_common_stop(trainer)
    model = trainer.policy.model
    calls = []
    handle = model.get_base_model().register_forward_hook(lambda *a: calls.append(1))
    try:
        tokens, _ = RolloutEngine(stop, pad).generate(model, ids, mask, 20, Sampling(greedy=True))
    finally:
        handle.remove()
    assert tokens.shape[1] == first.max().item() + 1 < 20
    assert len(calls) == tokens.shape[1]  # the prefill, then one forward per further token, none after the end
    for i, end in enumerate(first.tolist()):  # the same tokens up to the stop token, padding after it
        assert torch.equal(tokens[i, :end + 1], free[i, :end + 1])
        assert (tokens[i, end + 1:] == pad).all()


def test_all_finished_callback_keeps_decoding_in_step_with_other_ranks(trainer):
    """Under ZeRO-3 without gathered weights every rank must run as many forwards as the slowest one."""
    pad = trainer.tokenizer.pad_token_id
    stop, ids, mask, _, _ = rows_with_a_common_stop(trainer)
    engine = RolloutEngine(stop, pad)
    short, _ = engine.generate(trainer.policy.model, ids, mask, 20, Sampling(greedy=True))
    longer, _ = engine.generate(trainer.policy.model, ids, mask, 20, Sampling(greedy=True),
                                all_finished=lambda finished: False)  # another rank is still decoding
    assert longer.shape[1] == 20 > short.shape[1]
    assert torch.equal(longer[:, :short.shape[1]], short) and (longer[:, short.shape[1]:] == pad).all()


def test_filter_logits_keeps_the_tokens_generate_keeps():
    g = torch.Generator().manual_seed(0)
    logits = torch.randn(64, 50, generator=g) * 3
    for top_k, top_p in [(5, 1.0), (0, 0.9), (0, 0.3), (10, 0.8), (50, 0.999)]:
        ours = filter_logits(logits, top_k, top_p)
        theirs = logits.clone()
        if top_k:
            theirs = TopKLogitsWarper(top_k)(None, theirs)
        if top_p < 1:
            theirs = TopPLogitsWarper(top_p)(None, theirs)
        assert torch.equal(torch.isinf(ours), torch.isinf(theirs)), (top_k, top_p)
        assert torch.equal(ours[~torch.isinf(ours)], logits[~torch.isinf(ours)])
    # hand-worked: probabilities 0.5, 0.3, 0.2; top_p 0.6 keeps the two most likely (0.5 < 0.6 <= 0.8)
    row = torch.tensor([[0.5, 0.2, 0.3]]).log()
    assert torch.isinf(filter_logits(row, 0, 0.6)).tolist() == [[False, True, False]]
    assert torch.isinf(filter_logits(row, 1, 1.0)).tolist() == [[False, True, True]]


# generation.repetition_penalty and min_p: the fast engine applies transformers' own processors in generate's order
# (the penalty on the raw logits, greedy included; min-p after temperature, top-k and top-p, sampling only) and
# records the trainer's log-probs (logits / temperature, before either), so both engines agree token for token.
@pytest.mark.parametrize("settings,static", [(dict(repetition_penalty=1.5), False),
                                             (dict(repetition_penalty=0.7), False),
                                             (dict(repetition_penalty=1.5), True)])
def test_repetition_penalty_greedy_tokens_equal_generate(trainer, settings, static):
    tok = trainer.tokenizer
    enc, ref_tokens, ref_logprobs = reference(trainer, 12, do_sample=False, **settings)
    _, plain, _ = reference(trainer, 12, do_sample=False)
    assert plain.shape != ref_tokens.shape or not torch.equal(plain, ref_tokens)  # the setting changes the tokens
    engine = RolloutEngine(tok.eos_token_id, tok.pad_token_id, static=static)
    tokens, logprobs = engine.generate(trainer.policy.model, enc["input_ids"], enc["attention_mask"], 12,
                                       Sampling(greedy=True, **settings))
    assert torch.equal(tokens, ref_tokens)
    keep = live(tokens, tok.eos_token_id)
    assert torch.allclose(logprobs[keep], ref_logprobs[keep], atol=1e-5)  # raw logits: the penalty only chose


@pytest.mark.parametrize("settings", [dict(min_p=0.5), dict(repetition_penalty=1.5),
                                      dict(min_p=0.1, repetition_penalty=1.3, top_k=5)])
def test_min_p_and_repetition_penalty_sampled_tokens_equal_generate(trainer, settings):
    tok = trainer.tokenizer
    torch.manual_seed(7)
    enc, ref_tokens, ref_logprobs = reference(trainer, 10, do_sample=True, temperature=0.7, **settings)
    engine = RolloutEngine(tok.eos_token_id, tok.pad_token_id)
    torch.manual_seed(7)
    tokens, logprobs = engine.generate(trainer.policy.model, enc["input_ids"], enc["attention_mask"], 10,
                                       Sampling(temperature=0.7, **settings))
    assert tokens.shape == ref_tokens.shape and torch.equal(tokens, ref_tokens)
    keep = live(tokens, tok.eos_token_id)
    assert torch.allclose(logprobs[keep], ref_logprobs[keep], atol=1e-5)  # log-softmax(logits / 0.7), unfiltered
    differ = []  # and the setting bites: over a few seeds, the draws without it differ somewhere
    for seed in range(10):
        draws = []
        for sampling in (Sampling(temperature=0.7, **settings), Sampling(temperature=0.7)):
            torch.manual_seed(seed)
            draws.append(engine.generate(trainer.policy.model, enc["input_ids"], enc["attention_mask"], 10,
                                         sampling)[0])
        differ.append(draws[0].shape != draws[1].shape or not torch.equal(*draws))
    assert any(differ)


def test_min_p_keeps_the_tokens_generate_keeps():
    from transformers.generation.logits_process import MinPLogitsWarper

    # hand-worked: probabilities 0.5, 0.3, 0.2; min_p 0.5 keeps tokens with p >= 0.25: the first two
    row = torch.tensor([[0.5, 0.3, 0.2]]).log()
    assert torch.isinf(filter_logits(row, 0, 1.0, 0.5)).tolist() == [[False, False, True]]
    logits = torch.randn(16, 50, generator=torch.Generator().manual_seed(0)) * 3
    theirs = MinPLogitsWarper(0.2)(None, TopPLogitsWarper(0.9)(None, logits.clone()))
    assert torch.equal(torch.isinf(filter_logits(logits, 0, 0.9, 0.2)), torch.isinf(theirs))


def with_generation(trainer, **settings):
    """The trainer's generation settings with ``settings`` changed (a copy: the module's trainer is shared)."""
    import dataclasses

    return dataclasses.replace(trainer.cfg.generation, **settings)


def test_stop_strings_end_completions_alike_in_both_engines(trainer):
    """generation.stop: both engines end a completion at the token that completes a stop string, keep the string
    in the completion (as generate and vLLM's include_stop_str_in_output do), and count it as finished."""
    from llmrl.rollout.experience import decode_completions

    tok = trainer.tokenizer
    cfg = with_generation(trainer, stop=["b>", "dd"], max_new_tokens=12, temperature=1.0, top_k=0, top_p=1.0)
    model, cpu = trainer.policy.model, torch.device("cpu")
    torch.manual_seed(3)
    fast = generate(model, tok, PROMPTS, cfg, cpu, engine=RolloutEngine(tok.eos_token_id, tok.pad_token_id))
    torch.manual_seed(3)
    reference_exp = generate(model, tok, PROMPTS, cfg, cpu)  # model.generate with stop_strings
    assert torch.equal(fast.response, reference_exp.response)
    assert torch.equal(fast.response_mask, reference_exp.response_mask)
    assert torch.equal(fast.ended, reference_exp.ended)
    texts = decode_completions(tok, fast)
    by_string = [i for i, text in enumerate(texts) if text.endswith(("b>", "dd"))]
    assert by_string, texts  # some completions were cut at a stop string
    for i, text in enumerate(texts):
        ids = fast.response[i][fast.response_mask[i].bool()].tolist()
        cut = i in by_string and ids[-1] != tok.eos_token_id
        if cut:  # finished, the string kept, and none completed earlier (over the prompt's tail too, as generate)
            assert fast.ended[i]
            assert not any((PROMPTS[i] + text[:k]).endswith(("b>", "dd")) for k in range(len(text))), text
        assert (fast.logprobs[i][~fast.response_mask[i].bool()] == 0).all()
    greedy = [generate(model, tok, PROMPTS, cfg, cpu, greedy=True, engine=engine) for engine in
              (RolloutEngine(tok.eos_token_id, tok.pad_token_id), None)]
    assert torch.equal(greedy[0].response, greedy[1].response) and torch.equal(greedy[0].ended, greedy[1].ended)
    torch.manual_seed(3)  # without the stop strings the same draw runs on past them
    free = generate(model, tok, PROMPTS, with_generation(trainer, max_new_tokens=12, temperature=1.0, top_k=0,
                                                         top_p=1.0), cpu,
                    engine=RolloutEngine(tok.eos_token_id, tok.pad_token_id))
    assert free.response_mask.sum() > fast.response_mask.sum()


def test_a_completion_cut_at_a_stop_string_gets_no_missing_eos_penalty(tiny_model_dir, tmp_path, monkeypatch):
    """generation.missing_eos_penalty punishes completions that never finished; one ended by a stop string did."""
    trainer = make_trainer(tiny_config(tiny_model_dir, tmp_path, "generation.missing_eos_penalty=5.0",
                                       "generation.max_new_tokens=12", "reward.clip=null",
                                       "generation.stop=[a, b, c, d, e, f]"))
    raw = []
    score = trainer.score
    monkeypatch.setattr(trainer, "score", lambda rows, exp, reward=None: raw.append(score(rows, exp, reward)) or
                        raw[-1])
    exp, _ = trainer.make_experience(trainer.rows_for_step(0))
    ended = exp.ended.tolist()
    texts = raw[0][0]
    stopped_by_string = [i for i, text in enumerate(texts) if text and text[-1] in "abcdef"]
    assert stopped_by_string, texts
    expected = torch.tensor(raw[0][1].scores) - 5.0 * (~exp.ended).float()
    assert all(ended[i] for i in stopped_by_string)
    assert torch.allclose(exp.scores, expected)
