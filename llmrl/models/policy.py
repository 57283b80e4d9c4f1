"""The policy: a causal LM with a LoRA adapter and a value head; the reference is the adapter switched off."""
from __future__ import annotations

import warnings
from contextlib import contextmanager

import torch
from torch import nn

from llmrl.config import ConfigError, LoraConfig, ModelConfig
from llmrl.models import prompt_cache
from llmrl.models.sources import resolve_model
from llmrl.models.forward import forward_arguments, last_positions

DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


def disable_dropout(model: nn.Module) -> None:
    """Dropout off everywhere: rollout, reference and update passes must see the same function."""
    for module in model.modules():
        if isinstance(module, nn.Dropout):
            module.p = 0.0


def position_ids_from_mask(attention_mask: torch.Tensor) -> torch.Tensor:
    """Left padding: positions count real tokens only, so a padded prompt sees the positions it would alone."""
    return (attention_mask.long().cumsum(-1) - 1).clamp(min=0)


def choose_pad_token(tokenizer) -> None:
    """Give ``tokenizer`` a pad token from its own vocabulary: its pad token, else its unknown token when that is
    not EOS, else EOS itself.

    No token is added, so a real model's embedding is never resized (peft would then save the whole embedding
    with every adapter). The pad id only fills positions; every mask llmrl uses comes from lengths (the
    tokenizer's attention mask, the response cut after the first EOS), never from comparing ids with the pad
    id, so a pad equal to EOS cannot mask a real stop token out of the loss (Huang et al. 2024, detail 1;
    tested with pad == EOS).
    """
    eos = tokenizer.eos_token_id
    if tokenizer.pad_token_id is not None and tokenizer.pad_token_id != eos:
        return
    if tokenizer.unk_token_id is not None and tokenizer.unk_token_id != eos:
        tokenizer.pad_token = tokenizer.unk_token
    else:
        tokenizer.pad_token = tokenizer.eos_token


def load_tokenizer(cfg: ModelConfig):
    """The policy's tokenizer, left-padding, with a pad token (see ``choose_pad_token``)."""
    from transformers import AutoTokenizer

    key = "model.tokenizer" if cfg.tokenizer else "model.name_or_path"
    name = resolve_model(cfg.tokenizer or cfg.name_or_path, key)
    try:
        tokenizer = AutoTokenizer.from_pretrained(name, trust_remote_code=cfg.trust_remote_code)
    except (OSError, ValueError) as e:
        raise ConfigError(f"could not load a tokenizer from {key} = {cfg.tokenizer or cfg.name_or_path!r}: {e}. "
                          f"Check the name or folder (offline runs need a local folder)") from e
    tokenizer.padding_side = "left"
    if tokenizer.eos_token_id is None:
        raise ConfigError(f"tokenizer {name!r} has no EOS token: set one (tokenizer.eos_token) before training")
    choose_pad_token(tokenizer)
    return tokenizer


def load_base_model(cfg: ModelConfig, tokenizer, device: torch.device):
    """The frozen base model, optionally quantized, with dropout disabled."""
    from transformers import AutoModelForCausalLM

    path = resolve_model(cfg.name_or_path, "model.name_or_path")
    kwargs = {"dtype": DTYPES[cfg.dtype], "trust_remote_code": cfg.trust_remote_code}
    if cfg.quantization is not None:
        from transformers import BitsAndBytesConfig

        if cfg.quantization == "8bit":
            kwargs["quantization_config"] = BitsAndBytesConfig(load_in_8bit=True)
        else:
            kwargs["quantization_config"] = BitsAndBytesConfig(
                load_in_4bit=True, bnb_4bit_quant_type="nf4", bnb_4bit_compute_dtype=DTYPES[cfg.dtype])
        kwargs["device_map"] = {"": device}
    try:
        model = AutoModelForCausalLM.from_pretrained(path, **kwargs)
    except (OSError, ValueError) as e:
        raise ConfigError(f"could not load model.name_or_path = {cfg.name_or_path!r}: {e}") from e
    if cfg.quantization is None:
        model.to(device)
    model.llmrl_base_fingerprint = base_fingerprint(model)
    model.config.pad_token_id = tokenizer.pad_token_id
    model.generation_config.pad_token_id = tokenizer.pad_token_id
    model.generation_config.eos_token_id = tokenizer.eos_token_id
    disable_dropout(model)
    if cfg.quantization == "4bit":
        _disable_avx512bf16_repacking(model)
    return model


def context_length(model) -> int | None:
    """The longest sequence the model's positions cover, where its config says (GPT-2 and most others)."""
    config = model.config
    return getattr(config, "n_positions", None) or getattr(config, "max_position_embeddings", None)


def base_fingerprint(model) -> dict:
    """What identifies a base model: its shape, a sample of its embedding weights (never quantized) and the
    first values of every other floating-point weight matrix (quantized ones are integers, left out).

    Saved with every checkpoint, so that an adapter is never resumed on, evaluated on or merged into a base it
    was not trained on. The weight samples tell a base from itself with a LoRA adapter merged in, which has the
    same embeddings.
    """
    config = model.config.get_text_config()
    embeddings = model.get_input_embeddings().weight
    sample = embeddings[:4, :16].detach().float().flatten().tolist()
    weights = {name: w.detach().flatten()[:8].float().tolist() for name, w in model.named_parameters()
               if w.dim() == 2 and w.is_floating_point() and w is not embeddings and w.numel() >= 8}
    return {"model_type": model.config.model_type, "hidden_size": config.hidden_size,
            "num_hidden_layers": config.num_hidden_layers, "vocab_size": config.vocab_size,
            "embedding_sample": sample, "weight_samples": weights}


def fingerprint_mismatch(saved: dict, current: dict) -> str | None:
    """A description of how two fingerprints differ, or None when they match (bf16 vs fp32 allowed). Weight
    matrices sampled in one only (one base quantized, or an older checkpoint) are not compared."""
    for key in ("model_type", "hidden_size", "num_hidden_layers", "vocab_size"):
        if saved.get(key) != current.get(key):
            return f"{key} {saved.get(key)!r} != {current.get(key)!r}"
    theirs, ours = saved.get("weight_samples", {}), current.get("weight_samples", {})
    samples = [("the embedding weights", saved["embedding_sample"], current["embedding_sample"])]
    samples += [(f"the weights of {name}", theirs[name], ours[name]) for name in sorted(theirs.keys() & ours.keys())]
    for what, a, b in samples:
        a, b = torch.tensor(a), torch.tensor(b)
        if a.shape != b.shape or not torch.allclose(a, b, rtol=1e-2, atol=1e-3):
            return f"{what} differ"
    return None


def _disable_avx512bf16_repacking(model: nn.Module) -> None:
    # bitsandbytes repacks 4-bit weights for avx512_bf16 CPUs after a no-grad forward, after which a
    # grad-enabled forward fails; opting out keeps train/eval alternation working on such CPUs.
    import bitsandbytes as bnb

    for module in model.modules():
        if isinstance(module, bnb.nn.Linear4bit):
            module.support_avx512bf16_for_cpu = False


def add_lora(model, cfg: LoraConfig):
    from peft import LoraConfig as PeftLoraConfig
    from peft import get_peft_model

    from transformers.pytorch_utils import Conv1D

    peft_config = PeftLoraConfig(
        r=cfg.r, lora_alpha=cfg.alpha, lora_dropout=cfg.dropout,
        target_modules=cfg.target_modules or "all-linear", task_type="CAUSAL_LM",
        # GPT-2's Conv1D layers store weights (in, out): said here, peft need not correct it with a warning
        fan_in_fan_out=any(isinstance(m, Conv1D) for m in model.modules()),
    )
    try:
        with warnings.catch_warnings():
            # peft reads transformers' deprecated is_gradient_checkpointing while it wraps the model: a FutureWarning
            # on every run that no setting avoids (peft's to fix); this one message only
            warnings.filterwarnings("ignore", message="`is_gradient_checkpointing` is deprecated",
                                    category=FutureWarning)
            return get_peft_model(model, peft_config)
    except ValueError as e:
        raise ConfigError(f"LoRA could not be attached (lora.target_modules = {cfg.target_modules!r}): {e}") from e


ADAPTER_FINGERPRINT = "llmrl_base_fingerprint.json"  # written beside an adapter llmrl sft saves: its base


def load_adapter(model, cfg: ModelConfig):
    """``model`` (the base) with the peft LoRA adapter of folder ``cfg.adapter`` attached, trainable. An adapter made
    for another base is refused in one line: by the base fingerprint llmrl sft saves beside it, else by the base
    name peft recorded (its last path part, so a hub name and a local copy of it agree), else by its shapes."""
    import json
    from pathlib import Path

    from peft import PeftModel

    folder = Path(cfg.adapter)
    config_file = folder / "adapter_config.json"
    if not config_file.is_file():
        raise ConfigError(f"model.adapter = {cfg.adapter!r} is not a peft adapter folder (no adapter_config.json "
                          f"there): point it at a folder a LoRA run saved, e.g. RUN/final/adapter")
    try:
        adapter_config = json.loads(config_file.read_text())
    except ValueError as e:
        raise ConfigError(f"model.adapter = {cfg.adapter!r}: adapter_config.json is not valid JSON ({e})") from None
    if adapter_config.get("peft_type") != "LORA":
        raise ConfigError(f"model.adapter = {cfg.adapter!r} is a {adapter_config.get('peft_type')} adapter: llmrl "
                          f"trains LoRA adapters only")
    fingerprint = folder / ADAPTER_FINGERPRINT
    if fingerprint.is_file():
        why = fingerprint_mismatch(json.loads(fingerprint.read_text()), model.llmrl_base_fingerprint)
        if why:
            raise ConfigError(f"model.adapter = {cfg.adapter!r} was trained on another base than model.name_or_path = "
                              f"{cfg.name_or_path!r} ({why}): name the base it was trained on")
    else:
        recorded = adapter_config.get("base_model_name_or_path") or ""
        if recorded and Path(recorded.rstrip("/")).name.lower() != Path(cfg.name_or_path.rstrip("/")).name.lower():
            raise ConfigError(f"model.adapter = {cfg.adapter!r} was made for base {recorded!r}, not model.name_or_path "
                              f"= {cfg.name_or_path!r}: name the base it was trained on (if it is the same model "
                              f"under another name, write that name as base_model_name_or_path in "
                              f"{config_file})")
    try:
        return PeftModel.from_pretrained(model, str(folder), is_trainable=True)
    except (RuntimeError, ValueError, KeyError) as e:  # size mismatch, modules the base lacks
        raise ConfigError(f"model.adapter = {cfg.adapter!r} does not fit model.name_or_path = {cfg.name_or_path!r} "
                          f"({str(e).strip().splitlines()[0][:160]}): name the base it was trained on") from None


CRITIC_ADAPTER = "critic"  # the peft adapter of a separate critic (ppo.critic: separate), beside peft's "default"


class Policy(nn.Module):
    """A peft causal LM plus a scalar value head on its last hidden state.

    The value head starts at zero (weights and bias) so that the critic's first estimates do not inject
    noise into the advantages; it is saved separately from the adapter and never exported with the model.

    Shared critic (default): the value head reads the policy's adapted hidden state, so the value loss's gradient
    also moves the policy's adapter. Separate critic (``separate_critic``): the value head reads the hidden state
    of the same base under a second LoRA adapter of its own (``CRITIC_ADAPTER``; one copy of the base, one more
    forward pass for the values), so policy and critic share no trained weight, as in OpenRLHF.
    """

    def __init__(self, model, hidden_size: int, base_fingerprint: dict | None = None, share_prompts: bool = True,
                 separate_critic: bool = False):
        super().__init__()
        self.model = model
        self.separate_critic = separate_critic
        self.base_fingerprint = base_fingerprint
        self.share_prompts = share_prompts  # encode each distinct prompt and the common prefix once (prompt_cache)
        self.as_reference = False  # True inside ``reference()``
        self._keeps_logits: bool | None = None  # whether the model's forward takes logits_to_keep
        self.value_head = nn.Linear(hidden_size, 1)
        nn.init.zeros_(self.value_head.weight)
        nn.init.zeros_(self.value_head.bias)

    def forward(self, input_ids: torch.Tensor, attention_mask: torch.Tensor, with_values: bool = True,
                logits_to_keep: int = 0):
        """(B, L) ids and mask -> logits (B, L, V) and values (B, L) (None without ``with_values``).

        ``logits_to_keep`` > 0: logits of the last that many positions only, (B, logits_to_keep, V), where
        the model supports it (it saves the output layer's work on the prompt), else all L.
        """
        if self._keeps_logits is None:
            self._keeps_logits = forward_arguments(self.model)[1]
        extra = {"logits_to_keep": last_positions(logits_to_keep, input_ids.shape[1], input_ids.device)} \
            if logits_to_keep and self._keeps_logits else {}
        out = self.model(input_ids=input_ids, attention_mask=attention_mask,
                         position_ids=position_ids_from_mask(attention_mask),
                         output_hidden_states=with_values, use_cache=False, **extra)
        values = None
        if with_values:
            hidden = out.hidden_states[-1]
            values = self.value_head(hidden.to(self.value_head.weight.dtype)).squeeze(-1)
        return out.logits, values

    def logits_and_hidden(self, input_ids: torch.Tensor, attention_mask: torch.Tensor):
        """(B, L) ids and mask -> logits (B, L, V) and the last hidden state (B, L, H), which heads other than the
        value head read (ILQL's Q and V heads)."""
        out = self.model(input_ids=input_ids, attention_mask=attention_mask,
                         position_ids=position_ids_from_mask(attention_mask), output_hidden_states=True,
                         use_cache=False)
        return out.logits, out.hidden_states[-1]

    def response_outputs(self, query: torch.Tensor, query_mask: torch.Tensor, response: torch.Tensor,
                         response_mask: torch.Tensor, with_values: bool = True):
        """(B, P) left-padded prompts and (B, T) responses -> logits (B, T, V) of the positions that predict
        each response token, and values (B, T) there (None without ``with_values``).

        Through ``llmrl.models.prompt_cache`` (each distinct prompt and the prefix all prompts share encoded once)
        when that saves work, else one forward pass over prompt + response: the same numbers either way.
        """
        if self.separate_critic and with_values:  # the policy's logits, then the critic's hidden states
            logits, _ = self.outputs(query, query_mask, response, response_mask, False)
            with self.critic():
                _, values = self.outputs(query, query_mask, response, response_mask, True)
            return logits, values
        return self.outputs(query, query_mask, response, response_mask, with_values)

    def outputs(self, query, query_mask, response, response_mask, with_values: bool):
        """``response_outputs`` with the values read from the adapter that is active now."""
        if self._keeps_logits is None:
            self._keeps_logits = forward_arguments(self.model)[1]
        checkpointing = getattr(self.model, "is_activation_checkpointing", None)  # transformers >= 5.20
        if checkpointing is None:
            checkpointing = getattr(self.model, "is_gradient_checkpointing", False)
        recomputes = torch.is_grad_enabled() and checkpointing
        if self.share_prompts and not recomputes:
            out = prompt_cache.response_outputs(self.model, query, query_mask, response, response_mask,
                                                forward_arguments(self.model)[0], self._keeps_logits, with_values)
            if out is not None:
                logits, hidden = out
                values = self.value_head(hidden.to(self.value_head.weight.dtype)).squeeze(-1) if with_values else None
                return logits, values
        P, T = query.shape[1], response.shape[1]
        # The logits at position i predict token i + 1: response token t is predicted at P - 1 + t, so only
        # the last T + 1 positions need logits (all but the very last).
        logits, values = self(torch.cat([query, response], 1),
                              torch.cat([query_mask, response_mask.to(query_mask.dtype)], 1), with_values,
                              logits_to_keep=T + 1)
        return logits[:, -(T + 1):-1], values[:, P - 1:-1] if with_values else None

    @contextmanager
    def keeping_trainable(self):
        """peft freezes every adapter but the active one whenever it activates adapters (``set_adapter``, and on
        leaving ``disable_adapter``): with a separate critic the trainable flags are put back afterwards, so both
        adapters keep training."""
        trainable = [p for p in self.model.parameters() if p.requires_grad] if self.separate_critic else []
        try:
            yield
        finally:
            for p in trainable:
                p.requires_grad_(True)

    @contextmanager
    def critic(self):
        """The separate critic's adapter active instead of the policy's."""
        with self.keeping_trainable():
            self.model.base_model.set_adapter(CRITIC_ADAPTER)
            try:
                yield
            finally:
                self.model.base_model.set_adapter("default")

    @contextmanager
    def reference(self):
        """The reference policy: the same base with the adapter disabled (no second copy of the weights); with full
        fine-tuning (``lora: null``), the frozen copy of the starting model that ``build_policy`` made."""
        self.as_reference = True  # read by what the trained policy adds on top of the LM (ILQL's heads)
        try:
            frozen = self.__dict__.get("frozen_reference")  # not a submodule: never trained, saved or given DeepSpeed
            if frozen is not None:
                trained = self._modules["model"]
                self._modules["model"] = frozen
                try:
                    yield
                finally:
                    self._modules["model"] = trained
                return
            with self.keeping_trainable(), self.model.disable_adapter():
                yield
        finally:
            self.as_reference = False

    @property
    def full_fine_tuning(self) -> bool:
        """All weights trained (``lora: null``): no peft adapter, a frozen copy as the reference."""
        return self.__dict__.get("frozen_reference") is not None

    def trainable_parameters(self) -> list[nn.Parameter]:
        return [p for p in self.parameters() if p.requires_grad]


def build_policy(model_cfg: ModelConfig, lora_cfg: LoraConfig | None, device: torch.device,
                 separate_critic: bool = False):
    """(policy, tokenizer) ready to train: base (maybe quantized) + LoRA + zero value head; with
    ``separate_critic`` a second LoRA adapter (the same settings) for the value head. ``lora_cfg`` None: every
    weight is trained and the reference is a frozen copy of the starting model."""
    tokenizer = load_tokenizer(model_cfg)
    if lora_cfg is None:
        from llmrl.models.memory import check_full_fine_tuning_fits

        check_full_fine_tuning_fits(model_cfg, device, copies=5, why="the frozen reference copy, ")
    base = load_base_model(model_cfg, tokenizer, device)
    frozen = None
    if lora_cfg is None:  # full fine-tuning: the reference is a frozen copy of the starting model (memory doubles)
        import copy

        frozen = copy.deepcopy(base).requires_grad_(False).eval()
        model = base.requires_grad_(True)
    else:
        model = load_adapter(base, model_cfg) if model_cfg.adapter else add_lora(base, lora_cfg)
    if separate_critic:
        model.add_adapter(CRITIC_ADAPTER, model.peft_config["default"])
        model.base_model.set_adapter("default")
        for name, p in model.named_parameters():  # add_adapter leaves the new adapter frozen
            if f".{CRITIC_ADAPTER}." in name:
                p.requires_grad_(True)
    if model_cfg.gradient_checkpointing:
        # Non-reentrant checkpointing: gradients reach the adapter although the frozen embeddings need none.
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    policy = Policy(model, base.config.get_text_config().hidden_size, base.llmrl_base_fingerprint,
                    share_prompts=model_cfg.share_prompts, separate_critic=separate_critic)
    policy.value_head.to(device)  # the LM is already placed; quantized models refuse .to()
    if frozen is not None:
        policy.__dict__["frozen_reference"] = frozen
    return policy, tokenizer
