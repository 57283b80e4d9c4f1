"""Memory a full fine-tuning needs, checked before a model is loaded (lora: null): from the model's config.json
alone and the device's free memory."""
from __future__ import annotations

import os
from pathlib import Path

import torch

from llmrl.config import ConfigError


BYTES = {"float32": 4, "bfloat16": 2, "float16": 2}


def available_memory_bytes(device: torch.device) -> int | None:
    """Free memory of ``device``: the GPU's free memory, or the machine's available RAM (None when unknown)."""
    if device.type == "cuda":
        return torch.cuda.mem_get_info(device)[0]
    try:
        for line in Path("/proc/meminfo").read_text().splitlines():
            if line.startswith("MemAvailable:"):
                return int(line.split()[1]) * 1024
    except OSError:
        pass
    try:
        return os.sysconf("SC_AVPHYS_PAGES") * os.sysconf("SC_PAGE_SIZE")
    except (ValueError, OSError, AttributeError):
        return None


def parameter_count(model_cfg) -> int | None:
    """Parameters of model.name_or_path, from its config.json alone (the model built on the meta device)."""
    from transformers import AutoConfig, AutoModelForCausalLM

    from llmrl.models.sources import resolve_model

    try:
        config = AutoConfig.from_pretrained(resolve_model(model_cfg.name_or_path, "model.name_or_path"),
                                            trust_remote_code=model_cfg.trust_remote_code)
        with torch.device("meta"):
            model = AutoModelForCausalLM.from_config(config, trust_remote_code=model_cfg.trust_remote_code)
    except (OSError, ValueError, KeyError, TypeError):
        return None  # loading says what is wrong
    return sum(p.numel() for p in model.parameters())


def check_full_fine_tuning_fits(model_cfg, device: torch.device, copies: int = 4, why: str = "") -> None:
    """Full fine-tuning holds weights, gradients and AdamW's two moments: about 4 x parameters x bytes per value
    (``copies``: 5 with an RL run's frozen reference). Refused before loading when that exceeds the device's free
    memory (activations come on top)."""
    n = parameter_count(model_cfg)
    free = available_memory_bytes(device)
    if n is None or free is None:
        return
    need = copies * n * BYTES[model_cfg.dtype]
    if need > free:
        raise ConfigError(f"lora is null (full fine-tuning) but model.name_or_path = {model_cfg.name_or_path!r} has "
                          f"{n / 1e6:,.0f}M parameters: weights, {why}gradients and AdamW's two moments need about "
                          f"{need / 2**30:,.1f} GiB in {model_cfg.dtype}, more than the {free / 2**30:,.1f} GiB free "
                          f"on {device}: train a LoRA adapter (a lora section, e.g. lora: {{r: 16}}) or use a "
                          f"bigger device")
