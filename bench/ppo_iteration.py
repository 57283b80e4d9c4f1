"""Whole RL iterations of llmrl (``algorithm=rloo``) against TRL's ``RLOOTrainer``, at equal settings.

    python bench/ppo_iteration.py                          # CPU: builds llmrl's tiny warm start first (0.5-2 min)
    python bench/ppo_iteration.py --iterations 3 --model /tmp/tiny   # keep the model in /tmp/tiny, reuse it later
    python bench/ppo_iteration.py --model-kind gpt2 --rollout 256 --micro 32 --new-tokens 128   # on a GPU
    python bench/ppo_iteration.py --model ~/.cache/llmrl/models/SmolLM2-135M-Instruct.Q4_1-* --data arithmetic \
        --rollout 16 --new-tokens 16 --threads 2    # SmolLM2 (converted by a first run of configs/smollm2.yaml)

One iteration = one rollout of R completions (R / K prompts, K completions each, at most N new tokens)
+ E passes over it, each pass one optimizer step on all R completions (microbatches of M, gradient
accumulation R / M). Both contenders get, from the same command line:

| what | llmrl (config overrides on configs/tiny.yaml) | TRL 1.16 ``RLOOConfig`` |
|---|---|---|
| model | ``model.name_or_path=DIR`` (+ ``model.dtype``) | the same folder, loaded by llmrl's ``load_base_model`` |
| LoRA | ``lora.*`` of the recipe (r 16, alpha 32, dropout 0, all linear layers) | ``peft.LoraConfig`` with those values |
| completions per rollout | ``train.rollout_batch_size=R`` | ``generation_batch_size=R`` |
| per prompt | ``critic_free.num_generations=K`` | ``num_generations=K`` |
| one optimizer step per pass | ``train.mini_batch_size=R`` | ``per_device_train_batch_size=M``, ``gradient_accumulation_steps=R/M`` |
| microbatch | ``train.micro_batch_size=M`` | ``per_device_train_batch_size=M`` (also the chunk of the no-grad log-prob passes) |
| passes per rollout | ``train.epochs=E`` | ``num_iterations=E`` |
| new tokens | ``generation.max_new_tokens=N`` | ``max_completion_length=N`` |
| KL to the reference | ``ppo.init_kl_coef=BETA ppo.adaptive_kl=false`` (+ ``critic_free.kl_coef``) | ``beta=BETA`` |
| optimizer | AdamW, ``train.lr=LR``, constant, clip 1.0 | ``optim=adamw_torch``, ``learning_rate=LR``, ``lr_scheduler_type=constant``, ``max_grad_norm=1.0`` |
| reward | ``reward_models.rules.exact_match`` (the recipe's) | ``reward_funcs=[exact_match]``, dataset column ``answer`` as kwarg |
| reward, random GPT-2 | ``reward.components`` = ``length_target`` with its kwargs | ``functools.partial(length_target, ...)`` |
| prompts | llmrl's task rows {prompt, answer} | a ``datasets.Dataset`` of the same rows |
| prompts, ``--data arithmetic`` | ``configs/data/arithmetic_train.jsonl`` (conversations, chat template) | the same rows, conversational (TRL applies the same template) |
| reward, ``--data arithmetic`` | ``numeric_match`` (the SmolLM2 recipe's) | ``reward_models.rules.numeric_match``, column ``answer`` |
| sampling | temperature 1, no top-k/top-p | ``temperature=1.0``, ``top_k=0``, ``top_p=1.0`` |

Both trainers are built in-process in their own subprocess (the script re-invokes itself with ``--worker``),
with the same seed and ``torch.set_num_threads(--threads)``. llmrl is timed per ``trainer.train_step()``;
TRL by a ``TrainerCallback`` at every E-th optimizer step (``on_step_end``), so both times are the wall time
of a whole iteration: generation, reward, old and reference log-probs, E optimizer steps. The first
``--warmup`` iterations (and all start-up) are left out. Each contender runs ``--rounds`` times, alternating
with the other (llmrl, TRL, llmrl, TRL, ...), and the timed iterations of its rounds are pooled: a 2-core
machine's speed drifts by tens of percent over minutes, and alternation spreads that drift over both. Each worker checks that the LoRA weights changed,
counts optimizer steps and rollouts (TRL: E steps and one generation of R completions per iteration), and
records the completion lengths, so that a no-op or a different schedule would show.

What TRL would otherwise do differently, and how it is pinned here:
- RLOO in llmrl puts ``ppo.init_kl_coef`` (adaptive by default) in the sequence reward; ``critic_free.kl_coef``
  is GRPO's and unused by RLOO. Both are set to BETA and the controller is fixed, so the penalty is
  ``-BETA * sum_t (logp - ref_logp)`` per sequence in both (TRL's RLOO uses the same k1 estimate).
  BETA > 0 (default 0.04) makes both compute reference log-probs (adapter disabled, no second model copy).
- ``RLOOConfig`` defaults to ``gradient_checkpointing=True``, ``bf16=True``, a linear LR decay and
  ``disable_dropout=False``: set to llmrl's ``model.gradient_checkpointing`` (off unless
  ``--llmrl-set model.gradient_checkpointing=true``, which then turns it on for both), ``--dtype``,
  constant and True.
- ``generation_batch_size`` defaults to M * gradient_accumulation_steps; it is set to R explicitly, which
  gives ``steps_per_generation = R / M``: one generation of R completions per optimizer step, reused
  ``num_iterations = E`` times before the next generation (TRL's ``_step`` counts microbatches; it
  regenerates every ``steps_per_generation * num_iterations`` of them). ``max_steps = iterations * E``.
- llmrl subtracts ``generation.missing_eos_penalty`` (1.0) from completions without EOS; TRL's RLOO has no
  such penalty, so llmrl runs with ``generation.missing_eos_penalty=null``.
- TRL tokenizes prompts with special tokens, llmrl without; for the models built here (no BOS template)
  the ids are identical (checked: ``prompt_ids_equal`` in the JSON).
- Pad token: TRL would use EOS as pad; it gets llmrl's tokenizer (distinct pad token), so the model and
  the masks are the same.

Remaining differences (not settings, but how each library works):
- The loss: TRL's RLOO clips a per-sequence ratio (sum of token log-probs) and averages over sequences;
  llmrl clips per token and averages over tokens. Same forward/backward work.
- The sampler: llmrl generates with its own decode loop (``generation.engine``, whatever the checkout's
  default is; ``--llmrl-set generation.engine=generate`` for ``model.generate``); TRL with
  ``model.generate``. Prompts are left-padded in both; llmrl passes position ids counted from the mask.
- TRL computes log-probs with a fused, chunked LM head (no full logits); llmrl materialises the logits
  of a microbatch (and its entropy). TRL shuffles a rollout once, llmrl reshuffles it every pass (the
  minibatch is the whole rollout, so only the microbatch order differs).
- The trainers draw different random completions (different RNG use); the completion lengths are reported
  so that the generated work can be compared (each is bounded by N; with a random-weight GPT-2 nearly
  every completion is exactly N tokens long).

Models: on CPU by default llmrl's tiny warm start (``launch/sft.py``, 300 steps, a 2-layer GPT-2 and a
character tokenizer), built in a temporary folder unless ``--model DIR`` names one (built there when
missing, reused after). On CUDA by default GPT-2 124M with random weights and the task's character tokenizer
padded with placeholder tokens to GPT-2's 50257 ids (``bench_models``, as the other benchmarks). A random model never produces an exact match, so all advantages would be zero and nothing
would train; with it the reward is ``reward_models.rules.length_target`` in characters (target 0, tolerance
3/4 of the expected length of N random tokens: shorter completions score higher, linearly), the same
function for both (``--reward`` overrides the choice).

Peak memory: on CPU ``ru_maxrss`` of the worker (KiB on Linux; it includes the Python imports, and TRL
imports more), with the RSS right after loading the model so that the increase during training can be
compared; on CUDA ``torch.cuda.max_memory_allocated()``. Results: a markdown table on stdout and JSON at
``--out`` (default ``bench/results/ppo_iteration_<device>.json``).
"""
from __future__ import annotations

import argparse
import json
import os
import platform
import resource
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
if str(REPO) not in sys.path:
    sys.path.insert(0, str(REPO))  # llmrl and reward_models from this checkout, installed or not

for _key in ("HF_HUB_OFFLINE", "TRANSFORMERS_OFFLINE", "HF_DATASETS_OFFLINE"):
    os.environ.setdefault(_key, "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
os.environ.setdefault("WANDB_DISABLED", "true")

RESULT_TAG = "PPO_ITERATION_RESULT "
MODEL_MARK = "bench_model.json"  # written beside a model this script built: {"kind": "tiny" | "gpt2"}


# --------------------------------------------------------------------------------------------------
# shared by the parent and the workers


def llmrl_overrides(spec: dict) -> list[str]:
    """The llmrl config overrides (on configs/tiny.yaml) that express the benchmark's settings."""
    return [
        f"model.name_or_path={spec['model_dir']}",
        f"model.dtype={spec['dtype']}",
        "algorithm=rloo",
        f"critic_free.num_generations={spec['K']}",
        f"train.rollout_batch_size={spec['R']}",
        f"train.mini_batch_size={spec['R']}",
        f"train.micro_batch_size={spec['M']}",
        f"train.epochs={spec['E']}",
        f"train.total_steps={spec['warmup'] + spec['iterations']}",
        f"train.lr={spec['lr']}",
        "train.lr_schedule=constant",
        "train.warmup_steps=0",
        "train.weight_decay=0.0",
        "train.max_grad_norm=1.0",
        "ppo.clip_range=0.2",
        f"ppo.init_kl_coef={spec['beta']}",  # RLOO's KL-in-reward coefficient
        "ppo.adaptive_kl=false",
        "ppo.kl_estimator=k1",
        f"critic_free.kl_coef={spec['beta']}",  # GRPO's; unused by RLOO, set for symmetry
        f"generation.max_new_tokens={spec['N']}",
        "generation.temperature=1.0",
        "generation.top_k=0",
        "generation.top_p=1.0",
        "generation.missing_eos_penalty=null",  # TRL's RLOO has no such penalty
        *reward_overrides(spec["reward"]),
        *DATA[spec.get("data", "task")],
        "reward.normalize=none",
        "run.eval_every=0",
        "run.progress=false",
        f"run.device={spec['device']}",
        f"run.seed={spec['seed']}",
        f"run.output_dir={spec['run_dir']}",
        *spec["llmrl_set"],
    ]


# Prompts: the tiny recipe's task (plain text), or the SmolLM2 recipe's conversational arithmetic.
DATA = {"task": [], "arithmetic": ["data.source=configs/data/arithmetic_train.jsonl",
                                   "data.eval_source=configs/data/arithmetic_eval.jsonl", "data.eval_size=125",
                                   "data.max_prompt_length=64"]}


def rendered(tokenizer, prompt) -> str:
    """A prompt as the policy reads it: text, or a conversation through the chat template."""
    from llmrl.data.chat import render_prompt

    return render_prompt(tokenizer, prompt)


def reward_overrides(reward: dict) -> list[str]:
    """llmrl's reward: the built-in function by name, or one component with its keyword arguments."""
    if not reward["kwargs"]:
        return [f"reward.function={reward['function']}"]
    return ['reward.function=""',
            "reward.components=" + json.dumps([{"function": reward["function"], "kwargs": reward["kwargs"]}])]


def reward_function(reward: dict):
    """The same function for TRL: reward_models.rules.NAME, its keyword arguments bound."""
    import functools

    from reward_models import rules

    fn = getattr(rules, reward["function"])
    return functools.partial(fn, **reward["kwargs"]) if reward["kwargs"] else fn


def load_llmrl_config(spec: dict):
    from llmrl.config import load_config

    return load_config(REPO / "configs" / "tiny.yaml", llmrl_overrides(spec))


def rss_now_kib() -> int | None:
    """The current resident set size in KiB (Linux), None where /proc is missing."""
    try:
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith("VmRSS:"):
                return int(line.split()[1])
    except OSError:
        pass
    return None


def peak_rss_kib() -> int:
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return peak // 1024 if sys.platform == "darwin" else peak  # bytes on macOS, KiB on Linux


def resolve_device(name: str) -> str:
    import torch

    if name == "auto":
        return "cuda" if torch.cuda.is_available() else "cpu"
    if name == "cuda" and not torch.cuda.is_available():
        raise SystemExit("--device cuda but no CUDA device is visible")
    return name


# --------------------------------------------------------------------------------------------------
# workers: one contender each, in its own process


def lora_state(model) -> dict:
    return {n: p.detach().float().cpu().clone() for n, p in model.named_parameters()
            if p.requires_grad and "lora_" in n}


def lora_change(before: dict, model) -> dict:
    after = lora_state(model)
    if set(after) != set(before):
        raise RuntimeError("the set of LoRA parameters changed during training")
    deltas = {n: (after[n] - before[n]).abs().max().item() for n in before}
    return {"lora_tensors": len(before), "lora_parameters": sum(t.numel() for t in before.values()),
            "lora_tensors_changed": sum(d > 0 for d in deltas.values()),
            "lora_max_abs_change": max(deltas.values()) if deltas else 0.0}


class Memory:
    """Memory at model load and at the end: CPU RSS always, CUDA allocator statistics on a GPU."""

    def __init__(self, device: str):
        self.cuda = device == "cuda"
        self.at_load: dict = {}

    def mark_load(self) -> None:
        import torch

        self.at_load = {"rss_after_load_kib": rss_now_kib(), "peak_rss_at_load_kib": peak_rss_kib()}
        if self.cuda:
            torch.cuda.synchronize()
            self.at_load["cuda_allocated_after_load_bytes"] = torch.cuda.memory_allocated()

    def report(self) -> dict:
        import torch

        out = {**self.at_load, "peak_rss_kib": peak_rss_kib()}
        if self.cuda:
            torch.cuda.synchronize()
            out["cuda_peak_allocated_bytes"] = torch.cuda.max_memory_allocated()
            out["cuda_peak_reserved_bytes"] = torch.cuda.max_memory_reserved()
        return out


def merge_rounds(runs: list[dict], spec: dict) -> dict:
    """One contender's rounds as one result: the timed iterations of all rounds pooled."""
    merged = dict(runs[0])
    timed = [t for r in runs for t in r["iteration_seconds"][spec["warmup"]:]]
    median, mean = statistics.median(timed), statistics.fmean(timed)
    merged.update(rounds=len(runs), iterations=len(timed), timed_seconds=timed, s_per_iter_median=median,
                  s_per_iter_mean=mean, samples_per_s=spec["R"] / median, samples_per_s_mean=spec["R"] / mean,
                  samples_per_s_by_round=[r["samples_per_s"] for r in runs])
    return merged


def summarize_times(times: list[float], spec: dict) -> dict:
    timed = times[spec["warmup"]:]
    median, mean = statistics.median(timed), statistics.fmean(timed)
    return {"iterations": len(timed), "warmup_iterations": spec["warmup"], "iteration_seconds": times,
            "s_per_iter_median": median, "s_per_iter_mean": mean,
            "samples_per_s": spec["R"] / median, "samples_per_s_mean": spec["R"] / mean}


def sync(device: str) -> None:
    if device == "cuda":
        import torch

        torch.cuda.synchronize()


def run_llmrl(spec: dict) -> dict:
    from llmrl.distributed.strategy import SingleProcess
    from llmrl.trainers.online import build_trainer

    device = spec["device"]
    memory = Memory(device)
    cfg = load_llmrl_config(spec)
    trainer = build_trainer(cfg, SingleProcess(device))
    policy = trainer.policy
    memory.mark_load()  # model, LoRA, prompts and reward loaded; no step taken yet

    rollouts: list[dict] = []  # one per generation call: completions and the longest completion
    generate = trainer.generate

    def counting_generate(*args, **kwargs):
        exp = generate(*args, **kwargs)
        rollouts.append({"completions": int(exp.response.shape[0]), "width": int(exp.response.shape[1]),
                         "max_length": int(exp.response_mask.sum(1).max().item())})
        return exp

    trainer.generate = counting_generate
    optimizer_steps = [0]
    inner = getattr(trainer.optimizer, "optimizer", trainer.optimizer)
    inner.register_step_post_hook(lambda *a, **k: optimizer_steps.__setitem__(0, optimizer_steps[0] + 1))

    before = lora_state(policy.model)
    times, lengths, rewards, phases = [], [], [], []
    for _ in range(spec["warmup"] + spec["iterations"]):
        sync(device)
        t0 = time.perf_counter()
        stats = trainer.train_step()
        sync(device)
        times.append(time.perf_counter() - t0)
        lengths.append(stats["response/length"])
        rewards.append(stats["reward/raw_mean"])
        phases.append({k: stats[k] for k in ("time/generate", "time/reward", "time/forward", "time/update")
                       if k in stats})
    total = spec["warmup"] + spec["iterations"]
    if len(rollouts) != total or any(r["completions"] != spec["R"] for r in rollouts):
        raise RuntimeError(f"llmrl: expected {total} rollouts of {spec['R']} completions, saw {rollouts}")
    if optimizer_steps[0] != total * spec["E"]:
        raise RuntimeError(f"llmrl: expected {total * spec['E']} optimizer steps, counted {optimizer_steps[0]}")
    gen = cfg.generation
    return {
        **summarize_times(times, spec),
        **memory.report(),
        **lora_change(before, policy.model),
        "optimizer_steps": optimizer_steps[0],
        "rollouts": len(rollouts),
        "completion_mean_length_per_iter": lengths,
        "completion_max_length": max(r["max_length"] for r in rollouts),
        "completion_max_width": max(r["width"] for r in rollouts),
        "reward_mean_per_iter": rewards,
        "phase_seconds_per_iter": phases,
        "generation": {"engine": getattr(gen, "engine", "generate"), "compile": getattr(gen, "compile", False),
                       "max_new_tokens": gen.max_new_tokens},
        "llmrl_overrides": llmrl_overrides(spec),
    }


def run_trl(spec: dict) -> dict:
    import datasets
    import peft
    import torch
    from transformers import TrainerCallback
    from trl import RLOOConfig, RLOOTrainer

    from llmrl.data.prompts import load_prompts
    from llmrl.models.policy import load_base_model, load_tokenizer

    device = spec["device"]
    memory = Memory(device)
    cfg = load_llmrl_config(spec)  # the same model, LoRA and data settings as llmrl's worker
    tokenizer = load_tokenizer(cfg.model)
    model = load_base_model(cfg.model, tokenizer, torch.device(device))  # dropout off, pad token as llmrl's
    memory.mark_load()
    train_rows, _ = load_prompts(cfg.data)
    dataset = datasets.Dataset.from_list(train_rows)
    prompts = [r["prompt"] for r in train_rows[:64]]
    if isinstance(prompts[0], list):  # conversations: TRL renders them with the template, llmrl too
        prompt_ids_equal = ([tokenizer.apply_chat_template(p, add_generation_prompt=True, tokenize=True,
                                                           return_dict=True)["input_ids"] for p in prompts]
                            == tokenizer([rendered(tokenizer, p) for p in prompts],
                                         add_special_tokens=False)["input_ids"])
    else:
        prompt_ids_equal = (tokenizer(prompts)["input_ids"]
                            == tokenizer(prompts, add_special_tokens=False)["input_ids"])
    lora = cfg.lora
    peft_config = peft.LoraConfig(r=lora.r, lora_alpha=lora.alpha, lora_dropout=lora.dropout,
                                  target_modules=lora.target_modules or "all-linear", task_type="CAUSAL_LM")
    R, M, E = spec["R"], spec["M"], spec["E"]
    total = spec["warmup"] + spec["iterations"]
    out_dir = Path(spec["run_dir"]) / "trl"
    checkpointing = bool(getattr(cfg.model, "gradient_checkpointing", False))
    args = RLOOConfig(
        output_dir=str(out_dir),
        per_device_train_batch_size=M,
        gradient_accumulation_steps=R // M,
        generation_batch_size=R,  # -> steps_per_generation = R / M: one generation per optimizer step
        num_generations=spec["K"],
        num_iterations=E,
        max_completion_length=spec["N"],
        beta=spec["beta"],
        epsilon=0.2,
        learning_rate=spec["lr"],
        lr_scheduler_type="constant",
        warmup_steps=0,
        weight_decay=0.0,
        max_grad_norm=1.0,
        optim="adamw_torch",
        temperature=1.0,
        top_k=0,
        top_p=1.0,
        max_steps=total * E,
        seed=spec["seed"],
        # llmrl's setting (model.gradient_checkpointing where the checkout has it; off by default), not TRL's True
        gradient_checkpointing=checkpointing,
        gradient_checkpointing_kwargs={"use_reentrant": False} if checkpointing else None,
        disable_dropout=True,
        bf16=spec["dtype"] == "bfloat16",
        fp16=False,
        use_cpu=device == "cpu",
        report_to="none",
        logging_steps=10**9,
        save_strategy="no",
        eval_strategy="no",
        disable_tqdm=True,
        dataloader_num_workers=0,
        log_completions=False,
    )
    if args.steps_per_generation != R // M or args.generation_batch_size != R:
        raise RuntimeError(f"TRL resolved steps_per_generation={args.steps_per_generation}, "
                           f"generation_batch_size={args.generation_batch_size}; expected {R // M} and {R}")

    class IterationTimer(TrainerCallback):
        """Wall time at every E-th optimizer step, i.e. at the end of each iteration."""

        def __init__(self):
            self.marks: list[float] = []
            self.lengths: list[float] = []
            self.max_lengths: list[float] = []
            self.rewards: list[float] = []
            self.trainer = None

        def on_train_begin(self, args, state, control, **kwargs):
            sync(device)
            self.marks.append(time.perf_counter())

        def on_step_end(self, args, state, control, **kwargs):
            if state.global_step % E == 0:
                sync(device)
                self.marks.append(time.perf_counter())
                metrics = self.trainer._metrics["train"]  # cleared only by log(), which never runs here
                self.lengths.append(metrics["completions/mean_length"][-1])
                self.max_lengths.append(metrics["completions/max_length"][-1])
                self.rewards.append(metrics["reward"][-1])

    timer = IterationTimer()
    trainer = RLOOTrainer(model=model, reward_funcs=[reward_function(spec["reward"])], args=args,
                          train_dataset=dataset, processing_class=tokenizer, peft_config=peft_config,
                          callbacks=[timer])
    timer.trainer = trainer
    if trainer.ref_model is not None:
        raise RuntimeError("TRL loaded a separate reference model; expected the adapter-disabled base")

    generations: list[int] = []
    generate_and_score = trainer._generate_and_score_completions

    def counting_generate_and_score(inputs):
        generations.append(len(inputs))
        return generate_and_score(inputs)

    trainer._generate_and_score_completions = counting_generate_and_score
    before = lora_state(trainer.model)
    trainer.train()
    times = [b - a for a, b in zip(timer.marks, timer.marks[1:])]
    if len(times) != total or trainer.state.global_step != total * E:
        raise RuntimeError(f"TRL: expected {total} iterations of {E} optimizer steps, saw {len(times)} "
                           f"iterations and {trainer.state.global_step} steps")
    if generations != [R] * total:
        raise RuntimeError(f"TRL: expected {total} generations of {R} completions, saw {generations}")
    return {
        **summarize_times(times, spec),
        **memory.report(),
        **lora_change(before, trainer.model),
        "optimizer_steps": trainer.state.global_step,
        "rollouts": len(generations),
        "completion_mean_length_per_iter": timer.lengths,
        "completion_max_length": int(max(timer.max_lengths)),
        "reward_mean_per_iter": timer.rewards,
        "prompt_ids_equal": prompt_ids_equal,
        "trl_args": {"steps_per_generation": args.steps_per_generation,
                     "generation_batch_size": args.generation_batch_size,
                     "gradient_accumulation_steps": args.gradient_accumulation_steps,
                     "per_device_train_batch_size": args.per_device_train_batch_size,
                     "num_iterations": args.num_iterations, "max_steps": args.max_steps,
                     "optim": getattr(args.optim, "value", args.optim),
                     "lr_scheduler_type": getattr(args.lr_scheduler_type, "value", args.lr_scheduler_type),
                     "gradient_checkpointing": args.gradient_checkpointing, "bf16": args.bf16,
                     "beta": args.beta, "reference": "adapter disabled"},
    }


def worker(name: str, spec: dict) -> int:
    import torch

    torch.set_num_threads(spec["threads"])
    with tempfile.TemporaryDirectory(prefix=f"bench-{name}-") as run_dir:
        spec = {**spec, "run_dir": run_dir}
        if spec["device"] == "cuda":
            torch.cuda.reset_peak_memory_stats()
        result = (run_llmrl if name == "llmrl" else run_trl)(spec)
    if result["lora_tensors_changed"] == 0 or result["lora_max_abs_change"] <= 0:
        raise RuntimeError(f"{name}: the LoRA weights did not change: nothing was trained (a reward without "
                           f"variance within groups gives zero advantages; see --reward)")
    longest = max(result["completion_max_length"], result.get("completion_max_width", 0))
    if longest > spec["N"]:
        raise RuntimeError(f"{name}: a completion of {longest} tokens, more than the bound N = {spec['N']}")
    result.update(contender=name, threads=torch.get_num_threads())
    print(RESULT_TAG + json.dumps(result), flush=True)
    return 0


# --------------------------------------------------------------------------------------------------
# the parent: model, workers, table


def build_tiny(model_dir: Path, spec: dict) -> None:
    """llmrl's tiny warm start (300 supervised steps), with a context long enough for N new tokens."""
    from llmrl.config import load_config

    task = load_config(REPO / "configs" / "tiny.yaml", []).data.task
    n_positions = max(32, task.max_len + 1 + spec["N"])
    cmd = [sys.executable, str(REPO / "launch" / "sft.py"), "--config", str(REPO / "configs" / "tiny.yaml"),
           f"model.name_or_path={model_dir}", "warm_start.steps=300", "run.progress=false",
           f"warm_start.n_positions={n_positions}", f"generation.max_new_tokens={spec['N']}",
           f"run.seed={spec['seed']}"]
    print(f"building the tiny warm start in {model_dir} ...", file=sys.stderr, flush=True)
    subprocess.run(cmd, check=True, cwd=REPO, stdout=sys.stderr)
    (model_dir / MODEL_MARK).write_text(json.dumps({"kind": "tiny", "warm_start_steps": 300}))


def build_gpt2(model_dir: Path, spec: dict) -> None:
    """GPT-2 124M with random weights and GPT-2's vocabulary size (``bench_models``; nothing downloaded)."""
    from bench_models import build

    print(f"building a random-weight GPT-2 124M in {model_dir} ...", file=sys.stderr, flush=True)
    model, tokenizer = build("gpt2", seed=spec["seed"])
    model.save_pretrained(model_dir)
    tokenizer.save_pretrained(model_dir)
    (model_dir / MODEL_MARK).write_text(json.dumps({"kind": "gpt2", "shape": "bench_models.SIZES['gpt2']",
                                                    "weights": "random"}))


def length_reward(model_dir: Path, n_new: int) -> dict:
    """For a random-weight model, which never matches an answer: reward_models.rules.length_target in
    characters, target 0, tolerance 3/4 of the expected length of N random tokens. Shorter completions
    score higher, linearly around the typical length, so advantages are non-zero and the LoRA trains."""
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(model_dir)
    texts = tokenizer.batch_decode([[i] for i in range(len(tokenizer))], skip_special_tokens=True)
    chars_per_token = sum(map(len, texts)) / len(texts)
    tolerance = max(1, round(0.75 * n_new * chars_per_token))
    return {"function": "length_target", "kwargs": {"unit": "chars", "target": 0, "tolerance": tolerance}}


def check_context(model_dir: Path, spec: dict) -> dict:
    """Fail early when the longest prompt plus N new tokens does not fit the model's context."""
    from transformers import AutoConfig, AutoTokenizer

    from llmrl.data.prompts import load_prompts

    config = AutoConfig.from_pretrained(model_dir)
    tokenizer = AutoTokenizer.from_pretrained(model_dir)
    rows, _ = load_prompts(load_llmrl_config({**spec, "run_dir": "unused"}).data)
    longest = max(len(tokenizer(rendered(tokenizer, r["prompt"]), add_special_tokens=False)["input_ids"])
                  for r in rows)
    context = getattr(config.get_text_config(), "max_position_embeddings", None) or getattr(config, "n_positions", None)
    if context is not None and longest + spec["N"] > context:
        raise SystemExit(f"{model_dir}: prompts of up to {longest} tokens + {spec['N']} new tokens exceed the "
                         f"model's context of {context}: lower --new-tokens or use another model")
    n_params = None
    try:
        import torch
        from transformers import AutoModelForCausalLM

        with torch.device("meta"):
            n_params = sum(p.numel() for p in AutoModelForCausalLM.from_config(config).parameters())
    except Exception:  # only for the description
        pass
    return {"model_type": config.model_type, "parameters": n_params, "context": context,
            "longest_prompt_tokens": longest, "train_prompts": len(rows)}


def run_worker(name: str, spec: dict) -> dict:
    cmd = [sys.executable, str(Path(__file__).resolve()), "--worker", name, "--worker-spec", json.dumps(spec)]
    env = dict(os.environ, OMP_NUM_THREADS=str(spec["threads"]), MKL_NUM_THREADS=str(spec["threads"]),
               PYTHONPATH=os.pathsep.join(filter(None, [str(REPO), os.environ.get("PYTHONPATH")])))
    print(f"running {name} ...", file=sys.stderr, flush=True)
    t0 = time.perf_counter()
    proc = subprocess.run(cmd, cwd=REPO, env=env, stdout=subprocess.PIPE, text=True)
    result = None
    for line in proc.stdout.splitlines():
        if line.startswith(RESULT_TAG):
            result = json.loads(line[len(RESULT_TAG):])
        elif line.strip():
            print(line, file=sys.stderr)
    if proc.returncode != 0 or result is None:
        raise SystemExit(f"the {name} worker failed (exit code {proc.returncode}); its errors are above")
    result["worker_wall_seconds"] = time.perf_counter() - t0
    return result


def fmt_memory(r: dict, device: str) -> str:
    if device == "cuda":
        return f"{r['cuda_peak_allocated_bytes'] / 2**20:,.0f} MiB alloc"
    text = f"{r['peak_rss_kib'] / 1024:,.0f} MiB RSS"
    if r.get("rss_after_load_kib"):
        text += f" (+{(r['peak_rss_kib'] - r['rss_after_load_kib']) / 1024:,.0f} after load)"
    return text


def table(results: list[dict], spec: dict, model_name: str, ratio: float | None) -> str:
    head = ["contender", "device", "model", "R", "K", "N", "E", "M", "s/iter (median)", "samples/s",
            "peak memory", "llmrl/TRL samples/s"]
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for r in results:
        rel = "" if ratio is None else (f"{ratio:.2f}x" if r["contender"] == "llmrl" else "1.00x (ref)")
        row = [r["contender"], spec["device_name"], model_name, spec["R"], spec["K"], spec["N"], spec["E"],
               spec["M"], f"{r['s_per_iter_median']:.3f} (mean {r['s_per_iter_mean']:.3f})",
               f"{r['samples_per_s']:.1f}", fmt_memory(r, spec["device"]), rel]
        lines.append("| " + " | ".join(map(str, row)) + " |")
    return "\n".join(lines)


def versions() -> dict:
    out = {"python": platform.python_version(), "platform": platform.platform(), "cpu_count": os.cpu_count()}
    for pkg in ("torch", "transformers", "trl", "peft", "accelerate", "datasets"):
        try:
            out[pkg] = __import__(pkg).__version__
        except Exception:
            out[pkg] = None
    try:
        out["llmrl_commit"] = subprocess.run(["git", "rev-parse", "HEAD"], cwd=REPO, capture_output=True,
                                             text=True).stdout.strip() or None
        out["llmrl_dirty"] = bool(subprocess.run(["git", "status", "--porcelain", "llmrl"], cwd=REPO,
                                                 capture_output=True, text=True).stdout.strip())
    except OSError:
        pass
    return out


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--iterations", type=int, default=5, help="timed iterations (after the warm-up)")
    p.add_argument("--warmup", type=int, default=1, help="first iterations left out of the timing")
    p.add_argument("--rounds", type=int, default=3,
                   help="each contender runs this many times, alternating; the timed iterations are pooled")
    p.add_argument("--rollout", type=int, default=64, help="R: completions per iteration")
    p.add_argument("--generations", type=int, default=4, help="K: completions per prompt")
    p.add_argument("--new-tokens", type=int, default=8, help="N: at most this many new tokens per completion")
    p.add_argument("--epochs", type=int, default=1, help="E: passes (optimizer steps) per rollout")
    p.add_argument("--micro", type=int, default=16, help="M: sequences per forward/backward")
    p.add_argument("--threads", type=int, default=1, help="torch CPU threads in each worker")
    p.add_argument("--lr", type=float, default=1e-3, help="learning rate (the tiny recipe's)")
    p.add_argument("--beta", type=float, default=0.04, help="KL coefficient (> 0: both compute reference log-probs)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--device", choices=["auto", "cpu", "cuda"], default="auto")
    p.add_argument("--dtype", choices=["float32", "bfloat16"], default="float32",
                   help="weights dtype (bfloat16: llmrl model.dtype, TRL the same weights + bf16 autocast)")
    p.add_argument("--model", type=Path, default=None,
                   help="model folder; built there (--model-kind) when missing; default: a temporary one")
    p.add_argument("--model-kind", choices=["tiny", "gpt2"], default=None,
                   help="what to build when no model folder exists: tiny (llmrl's warm start; default on CPU) or "
                        "gpt2 (GPT-2 124M, random weights; default on CUDA)")
    p.add_argument("--reward", choices=["auto", "exact_match", "numeric_match", "length"], default="auto",
                   help="exact_match (the tiny recipe's, default), numeric_match (default with --data arithmetic), "
                        "or length (reward_models.rules.length_target in characters; default for the random-weight "
                        "GPT-2, which never matches an answer). A pretrained model's completions nearly all fit "
                        "the length reward's tolerance: every score ~1, zero advantages, no real update")
    p.add_argument("--data", choices=list(DATA), default="task",
                   help="task: the tiny recipe's plain-text prompts; arithmetic: the SmolLM2 recipe's "
                        "conversations (for a pretrained chat model)")
    p.add_argument("--contenders", default="llmrl,trl", help="comma-separated subset of llmrl,trl")
    p.add_argument("--llmrl-set", action="append", default=[], metavar="KEY=VALUE",
                   help="extra llmrl config override (repeatable), e.g. generation.engine=generate")
    p.add_argument("--out", type=Path, default=None,
                   help="JSON output (default bench/results/ppo_iteration_<device>.json)")
    p.add_argument("--worker", choices=["llmrl", "trl"], help=argparse.SUPPRESS)
    p.add_argument("--worker-spec", help=argparse.SUPPRESS)
    return p.parse_args(argv)


def main(argv=None) -> int:
    args = parse_args(argv)
    if args.worker:
        return worker(args.worker, json.loads(args.worker_spec))

    import torch

    device = resolve_device(args.device)
    R, K, M, E, N = args.rollout, args.generations, args.micro, args.epochs, args.new_tokens
    for ok, why in ((R % K == 0, f"--rollout {R} must be divisible by --generations {K}"),
                    (R % M == 0, f"--rollout {R} must be divisible by --micro {M}"),
                    (K >= 2, "RLOO needs --generations >= 2"),
                    (args.iterations >= 1 and args.warmup >= 0 and args.rounds >= 1,
                     "--iterations >= 1, --warmup >= 0 and --rounds >= 1"),
                    (min(E, N, M, args.threads) >= 1, "--epochs, --new-tokens, --micro, --threads must be >= 1")):
        if not ok:
            raise SystemExit(why)
    contenders = [c.strip() for c in args.contenders.split(",") if c.strip()]
    if not contenders or set(contenders) - {"llmrl", "trl"}:
        raise SystemExit("--contenders takes llmrl, trl or both")
    kind = args.model_kind or ("gpt2" if device == "cuda" else "tiny")
    device_name = torch.cuda.get_device_name(0) if device == "cuda" else f"cpu x{args.threads} threads"
    spec = {"R": R, "K": K, "M": M, "E": E, "N": N, "iterations": args.iterations, "warmup": args.warmup,
            "threads": args.threads, "lr": args.lr, "beta": args.beta, "seed": args.seed, "device": device,
            "device_name": device_name, "dtype": args.dtype, "llmrl_set": args.llmrl_set}

    tmp = None
    if args.model is None:
        tmp = Path(tempfile.mkdtemp(prefix="bench-model-"))
        model_dir = tmp / "model"
    else:
        model_dir = args.model.resolve()
    try:
        if not model_dir.exists():
            (build_gpt2 if kind == "gpt2" else build_tiny)(model_dir, spec)
        mark = model_dir / MODEL_MARK
        built = json.loads(mark.read_text())["kind"] if mark.is_file() else None
        model_name = {"gpt2": "gpt2-124M (random)", "tiny": "tiny warm start"}.get(built, model_dir.name)
        spec["model_dir"] = str(model_dir)
        spec["data"] = args.data
        reward = args.reward if args.reward != "auto" else \
            ("numeric_match" if args.data == "arithmetic" else "length" if built == "gpt2" else "exact_match")
        spec["reward"] = (length_reward(model_dir, N) if reward == "length"
                          else {"function": reward, "kwargs": {}})
        model_info = check_context(model_dir, spec)
        rounds = {name: [] for name in contenders}
        for _ in range(args.rounds):  # alternating, so that a drift in the machine's speed reaches both alike
            for name in contenders:
                rounds[name].append(run_worker(name, spec))
        results = [merge_rounds(runs, spec) for runs in rounds.values()]
    finally:
        if tmp is not None:
            shutil.rmtree(tmp, ignore_errors=True)

    by_name = {r["contender"]: r for r in results}
    ratio = (by_name["llmrl"]["samples_per_s"] / by_name["trl"]["samples_per_s"]
             if {"llmrl", "trl"} <= set(by_name) else None)
    print(table(results, spec, model_name, ratio))
    print()
    for r in results:
        lengths = r["completion_mean_length_per_iter"]
        print(f"- {r['contender']}: {r['rollouts']} rollouts of {R}, {r['optimizer_steps']} optimizer steps; "
              f"completion length mean {statistics.fmean(lengths):.2f} (max {r['completion_max_length']}, "
              f"bound {N}); LoRA changed in {r['lora_tensors_changed']}/{r['lora_tensors']} tensors "
              f"(max |delta| {r['lora_max_abs_change']:.2e}, first round); reward mean by iteration "
              f"{', '.join(f'{x:.2f}' for x in r['reward_mean_per_iter'])}; samples/s by round "
              f"{', '.join(f'{x:.1f}' for x in r['samples_per_s_by_round'])}; timed seconds per iteration "
              f"{', '.join(f'{t:.3f}' for t in r['timed_seconds'])}")
    if "llmrl" in by_name and "trl" in by_name and \
            by_name["llmrl"]["lora_parameters"] != by_name["trl"]["lora_parameters"]:
        print(f"WARNING: LoRA sizes differ: llmrl {by_name['llmrl']['lora_parameters']} parameters, "
              f"TRL {by_name['trl']['lora_parameters']}")

    out = args.out or REPO / "bench" / "results" / f"ppo_iteration_{device}.json"
    out.parent.mkdir(parents=True, exist_ok=True)
    payload = {"command": [Path(sys.executable).name, *sys.argv], "settings": spec, "model": model_name,
               "model_info": model_info, "versions": versions(), "ratio_llmrl_over_trl_samples_per_s": ratio,
               "results": results, "finished": time.strftime("%Y-%m-%dT%H:%M:%S%z")}
    out.write_text(json.dumps(payload, indent=2) + "\n")
    print(f"\nwrote {out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
