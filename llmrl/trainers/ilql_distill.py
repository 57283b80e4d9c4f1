"""ILQL's policy as a plain model: distil it into the LoRA adapter, then export as usual.

ILQL's policy samples from ``logits + beta * (Q - V)`` (``llmrl.rollout.ilql``): it needs the Q and V heads at
every token, which plain transformers cannot run. Distillation trains the adapter (the student, starting as the
ILQL adapter) so that its own logits give that distribution:

1. the teacher (the ILQL adapter, frozen, with its heads and ``beta``) samples a completion of every logged
   prompt, with its own sampling settings (``ilql.top_k``, ``generation.temperature``), drawn once before training;
2. each step takes a batch of those sequences and minimises the mean per-token KL(teacher || student) over their
   completion tokens, the teacher's full distribution ``softmax(logits + beta * (Q - V))`` at every position (no
   top-k: the student learns the shifted logits themselves, up to a constant per position, so that sampling it
   with the same top_k and temperature approximates sampling the ILQL policy). The teacher's logits come from the
   same model with the adapter's weights as they were before training (kept aside, ``torch.func.functional_call``);
   the base is never trained, so the reference of later runs stays the base;
3. on held-out prompts, before and after: the mean per-token KL(teacher || student) on teacher samples, how often
   the student's greedy next token is the teacher's along the teacher's greedy completions (accuracy), and how
   often the two greedy completions agree token for token (whole completions).

trlX has no export of an ILQL policy: its heads stay beside the model. The loss is TRL's ``DistillationTrainer``
(and ``GKDTrainer``) loss with ``beta=0`` (the forward KL) on teacher-generated sequences, with a separate teacher
model there; here the teacher is the student's own starting point plus the heads.
"""
from __future__ import annotations

import json
import math
import random
import shutil
from dataclasses import asdict, dataclass
from pathlib import Path

import torch

from llmrl.config import ConfigError, GenerationConfig
from llmrl.models.ilql_heads import HEADS_FILE, ILQLHeads, shifted_logits
from llmrl.models.policy import position_ids_from_mask
from llmrl.rollout.engine import RolloutEngine, Sampling
from llmrl.rollout.experience import Experience, stop_criteria, stops_of, truncate_at_eos
from llmrl.rollout.ilql import check_sampling, ilql_generate

REPORT_FILE = "distill.json"  # written into a distilled checkpoint: the report below


@dataclass
class DistillReport:
    """How far the distilled model is from the ILQL policy, on held-out prompts, before and after."""

    steps: int
    beta: float
    top_k: int
    train_prompts: int
    held_out_prompts: int
    kl_before: float  # mean per-token KL(teacher || student) on teacher samples; before: the ILQL adapter alone
    kl_after: float
    accuracy_before: float  # share of the teacher's greedy tokens that are the student's greedy (argmax) choice too
    accuracy_after: float
    agreement_before: float  # share of held-out prompts whose greedy completions are equal token for token
    agreement_after: float
    loss_first: float  # the training loss (mean per-token KL on the training batch) of the first and last step
    loss_last: float

    def markdown(self) -> str:
        return "\n".join([
            "## Distilled from the ILQL policy", "",
            f"The adapter was trained for {self.steps} steps to imitate ILQL's policy (logits + beta * (Q - V), "
            f"beta={self.beta:g}, sampled with top_k={self.top_k}) on {self.train_prompts} logged prompts, so that "
            f"this model alone (no Q/V heads) stands in for it. Distance on {self.held_out_prompts} held-out prompts:",
            "", "| | before (the ILQL adapter alone) | after (this model) |", "|---|---|---|",
            f"| KL(ILQL policy \\|\\| model) per token, on the policy's samples | {self.kl_before:.4g} | "
            f"{self.kl_after:.4g} |",
            f"| greedy token accuracy along the policy's greedy completions | {self.accuracy_before:.4g} | "
            f"{self.accuracy_after:.4g} |",
            f"| greedy completions equal token for token | {self.agreement_before:.4g} | {self.agreement_after:.4g} |",
            "", "Sample this model with top_k as above (and the same temperature) to approximate the ILQL policy.", ""])


def _outputs(model, exp: Experience, params: dict | None = None, hidden: bool = False):
    """(logits (B, T, V) predicting each completion token, last-layer hidden states (B, T, H) there or None) of one
    full forward over prompt + completion; ``params``: weights to use instead of the model's own (the teacher)."""
    ids, mask = exp.input_ids, exp.attention_mask
    kwargs = dict(input_ids=ids, attention_mask=mask, position_ids=position_ids_from_mask(mask), use_cache=False,
                  output_hidden_states=hidden)
    out = torch.func.functional_call(model, params, args=(), kwargs=kwargs, strict=False) if params is not None \
        else model(**kwargs)
    P, T = exp.query.shape[1], exp.response.shape[1]
    logits = out.logits[:, P - 1:P - 1 + T].float()
    return logits, out.hidden_states[-1][:, P - 1:P - 1 + T] if hidden else None


@torch.no_grad()
def teacher_logprobs(model, heads: ILQLHeads, teacher: dict, exp: Experience, beta: float) -> torch.Tensor:
    """(B, T, V) log-softmax of the ILQL policy's shifted logits at each completion position."""
    logits, hidden = _outputs(model, exp, teacher, hidden=True)
    return shifted_logits(logits, heads.advantage(hidden), beta).log_softmax(-1)


def per_token_kl(teacher_lp: torch.Tensor, student_logits: torch.Tensor, mask: torch.Tensor) -> tuple[torch.Tensor,
                                                                                                       torch.Tensor]:
    """(sum over real tokens of KL(teacher || student), their count): teacher_lp (B, T, V) log-probs, student_logits
    (B, T, V), mask (B, T)."""
    kl = (teacher_lp.exp() * (teacher_lp - student_logits.float().log_softmax(-1))).sum(-1)
    return (kl * mask).sum(), mask.sum()


def _batches(items: list, size: int):
    for start in range(0, len(items), size):
        yield items[start:start + size]


def _completions(exp: Experience) -> list[list[int]]:
    return [row[m.bool()].tolist() for row, m in zip(exp.response, exp.response_mask)]


@torch.no_grad()
def distance(model, heads: ILQLHeads, teacher: dict, beta: float, tokenizer, sampled: list[Experience],
             greedy: list[Experience], cfg: GenerationConfig, device) -> tuple[float, float, float]:
    """(mean per-token KL(teacher || student) on the teacher's ``sampled`` completions, greedy token accuracy along
    the teacher's ``greedy`` completions, share of prompts whose greedy completions are equal) for the model as it
    is now (the student)."""
    kl_sum = kl_count = hit = tokens = equal = prompts = 0
    for exp in sampled:
        s, n = per_token_kl(teacher_logprobs(model, heads, teacher, exp, beta), _outputs(model, exp)[0],
                            exp.response_mask)
        kl_sum, kl_count = kl_sum + s.item(), kl_count + n.item()
    engine = RolloutEngine(tokenizer.eos_token_id, tokenizer.pad_token_id)
    for exp in greedy:
        choice = _outputs(model, exp)[0].argmax(-1)
        hit += ((choice == exp.response).float() * exp.response_mask).sum().item()
        tokens += exp.response_mask.sum().item()
        mine = _student_greedy(model, tokenizer, exp, cfg, engine)
        equal += sum(a == b for a, b in zip(_completions(mine), _completions(exp)))
        prompts += exp.query.shape[0]
    return kl_sum / max(kl_count, 1), hit / max(tokens, 1), equal / max(prompts, 1)


def _student_greedy(model, tokenizer, exp: Experience, cfg: GenerationConfig, engine: RolloutEngine) -> Experience:
    """The student's greedy completions of the prompts of ``exp`` (the same token ids, never re-tokenised)."""
    tokens, _ = engine.generate(model, exp.query, exp.query_mask, cfg.max_new_tokens, Sampling(greedy=True),
                                stopped=stop_criteria(tokenizer, cfg.stop))
    response, mask, ended = truncate_at_eos(tokens, tokenizer.eos_token_id, tokenizer.pad_token_id,
                                            stops_of(tokenizer, cfg, exp.query, tokens))
    return Experience(query=exp.query, query_mask=exp.query_mask, response=response, response_mask=mask, ended=ended)


def check_settings(steps: int, lr: float, batch_size: int) -> None:
    if not isinstance(steps, int) or isinstance(steps, bool) or steps < 1:
        raise ConfigError(f"--distill-steps {steps!r} must be a whole number >= 1")
    if not isinstance(lr, (int, float)) or not math.isfinite(lr) or lr <= 0:
        raise ConfigError(f"--distill-lr {lr!r} must be a number > 0 (the default is 1e-3)")
    if not isinstance(batch_size, int) or isinstance(batch_size, bool) or batch_size < 1:
        raise ConfigError(f"--distill-batch-size {batch_size!r} must be a whole number >= 1")


def distill_ilql(model, heads: ILQLHeads, tokenizer, prompts: list[str], held_out: list[str], beta: float,
                 top_k: int, steps: int, lr: float = 1e-3, batch_size: int = 16, cfg: GenerationConfig | None = None,
                 seed: int = 0, say=None) -> DistillReport:
    """Train ``model``'s adapter (its parameters that require grad; the ILQL adapter on entry) to imitate ILQL's
    policy (``model`` + ``heads`` + ``beta`` as it is on entry) on completions of ``prompts`` sampled from that
    policy; see the module docstring. ``held_out``: prompts to measure the distance on, never trained on. ``cfg``:
    the generation settings (max_new_tokens, temperature, stop strings) of the teacher's samples. Returns the
    report; the model is left distilled, in eval mode."""
    check_sampling(beta, top_k)
    check_settings(steps, lr, batch_size)
    if not prompts or not held_out:
        raise ConfigError(f"distillation needs prompts to train on and held-out prompts to measure on (got "
                          f"{len(prompts)} and {len(held_out)}): log more answers in ilql.data")
    cfg = cfg or GenerationConfig()
    say = say or (lambda line: None)
    trainable = [p for p in model.parameters() if p.requires_grad]
    if not trainable:
        raise ConfigError("distillation trains the LoRA adapter, but the model has no trainable weight: load the "
                          "adapter trainable (peft's is_trainable=True)")
    model.eval()  # dropout off: teacher and student are the same function at step 0
    heads.eval()
    device = model.get_input_embeddings().weight.device
    # the teacher: the adapter's weights as they are now, used instead of the trained ones (functional_call)
    teacher = {name: p.detach().clone() for name, p in model.named_parameters() if p.requires_grad}
    with torch.random.fork_rng(devices=[device] if device.type == "cuda" else []):
        torch.manual_seed(seed)
        say(f"distill: sampling the ILQL policy (beta={beta:g}, top_k={top_k}) on {len(prompts)} + {len(held_out)} "
            f"prompts")
        pool = [ilql_generate(model, heads, tokenizer, chunk, beta, top_k, cfg=cfg, device=device)
                for chunk in _batches(prompts, batch_size)]
        held_sampled = [ilql_generate(model, heads, tokenizer, chunk, beta, top_k, cfg=cfg, device=device)
                        for chunk in _batches(held_out, batch_size)]
        held_greedy = [ilql_generate(model, heads, tokenizer, chunk, beta, top_k, greedy=True, cfg=cfg,
                                     device=device) for chunk in _batches(held_out, batch_size)]
    before = distance(model, heads, teacher, beta, tokenizer, held_sampled, held_greedy, cfg, device)
    say(f"distill: before: KL {before[0]:.4g} per token, greedy accuracy {before[1]:.3f}, agreement {before[2]:.3f}")
    rows = [(i, j) for i, exp in enumerate(pool) for j in range(exp.query.shape[0])]
    order = random.Random(seed)
    optimizer = torch.optim.AdamW(trainable, lr=lr, weight_decay=0.0)
    queue: list = []
    losses = []
    for step in range(steps):
        if len(queue) < batch_size:  # every sequence once per pass, reshuffled each pass
            more = rows[:]
            order.shuffle(more)
            queue += more
        picked, queue = queue[:batch_size], queue[batch_size:]
        loss_sum = loss_count = 0.0
        optimizer.zero_grad(set_to_none=True)
        total = max(sum(pool[i].response_mask[j].sum().item() for i, j in picked), 1.0)  # the batch's tokens
        # one forward per teacher batch the picked rows come from (their padding is that batch's)
        for i in sorted({i for i, _ in picked}):
            exp = pool[i].select(torch.tensor([j for k, j in picked if k == i], device=device)).trimmed()
            s, n = per_token_kl(teacher_logprobs(model, heads, teacher, exp, beta), _outputs(model, exp)[0],
                                exp.response_mask)
            (s / total).backward()  # the mean over the batch's tokens, whichever teacher batch they came from
            loss_sum, loss_count = loss_sum + s.item(), loss_count + n.item()
        optimizer.step()
        losses.append(loss_sum / max(loss_count, 1.0))
        if step == 0 or (step + 1) % max(1, steps // 10) == 0:
            say(f"distill: step {step + 1}/{steps}: KL {losses[-1]:.4g} per token")
    optimizer.zero_grad(set_to_none=True)
    after = distance(model, heads, teacher, beta, tokenizer, held_sampled, held_greedy, cfg, device)
    say(f"distill: after: KL {after[0]:.4g} per token, greedy accuracy {after[1]:.3f}, agreement {after[2]:.3f}")
    return DistillReport(steps=steps, beta=float(beta), top_k=top_k, train_prompts=len(prompts),
                         held_out_prompts=len(held_out), kl_before=before[0], kl_after=after[0],
                         accuracy_before=before[1], accuracy_after=after[1], agreement_before=before[2],
                         agreement_after=after[2], loss_first=losses[0], loss_last=losses[-1])


# ----------------------------------------------------------------------------------------------
# a checkpoint of an ILQL run -> a distilled checkpoint that ``llmrl export`` merges like any other


def distill_prompts(cfg, tokenizer, held_out: int | None = None, seed: int = 0) -> tuple[list[str], list[str]]:
    """(prompts to distil on, held-out prompts) as the policy reads them: the distinct prompts of the logged answers
    (``ilql.data``), shuffled by ``seed``, ``held_out`` of them (default: a tenth, 1 to 64) set aside; without
    ``ilql.data``, the run's prompts and its held-out split (``data``)."""
    from llmrl.data.chat import render_prompt

    if not cfg.ilql.data:
        from llmrl.data.prompts import load_prompts

        train, evals = load_prompts(cfg.data)
        column = cfg.data.prompt_column
        texts = [render_prompt(tokenizer, r[column], f"prompt {i}") for i, r in enumerate(train)]
        held = [render_prompt(tokenizer, r[column], f"held-out prompt {i}") for i, r in enumerate(evals)]
        return list(dict.fromkeys(texts)), list(dict.fromkeys(held))[:held_out] if held_out else \
            list(dict.fromkeys(held))
    from llmrl.data.logged import load_rewarded

    rows = load_rewarded(cfg.ilql.data)
    texts = list(dict.fromkeys(render_prompt(tokenizer, r["prompt"], f"ilql.data row {i}") for i, r in
                               enumerate(rows)))
    random.Random(seed).shuffle(texts)
    n = held_out if held_out is not None else max(1, min(64, len(texts) // 10))
    if len(texts) < 2 or not 1 <= n < len(texts):
        raise ConfigError(f"ilql.data = {cfg.ilql.data!r} holds {len(texts)} distinct prompts: distillation needs "
                          f"some to train on and {n} held out to measure on; log more answers (or hold out fewer)")
    return texts[n:], texts[:n]


def distill_checkpoint(checkpoint: str | Path, out: str | Path, steps: int, lr: float = 1e-3, batch_size: int = 16,
                       beta: float | None = None, top_k: int | None = None, held_out: int | None = None,
                       base: str | None = None, device: str = "cpu", trust_checkpoint_code: bool = False,
                       say=None) -> DistillReport:
    """Distil the ILQL policy of ``checkpoint`` (its adapter, ``ilql_heads.safetensors``, ``ilql.beta`` and
    ``ilql.top_k`` unless ``beta``/``top_k`` are given) into its adapter (``distill_ilql``), and write ``out``: a
    checkpoint like the original without the heads, the adapter distilled, the report in ``distill.json``.
    ``llmrl export --checkpoint OUT`` then merges it as usual."""
    from llmrl.distributed.checkpoint import COMPLETE_MARK, write_atomically
    from llmrl.exporter import DISTILL_CARD, check_out, load_adapted_model

    checkpoint, out = Path(checkpoint), Path(out)
    check_settings(steps, lr, batch_size)
    if not (checkpoint / COMPLETE_MARK).is_file():
        raise ConfigError(f"--checkpoint {str(checkpoint)!r} is not a complete llmrl checkpoint folder: pass a run's "
                          f"final/ or step-N/ folder")
    if not (checkpoint / HEADS_FILE).is_file():
        raise ConfigError(f"--checkpoint {str(checkpoint)!r} holds no {HEADS_FILE}: it is not of an ILQL run, so "
                          f"there is nothing to distil; export it without --distill-steps")
    check_out(checkpoint, out, overwrite=False)
    model, tokenizer, cfg = load_adapted_model(checkpoint, base, torch.float32, trust_checkpoint_code)
    tokenizer.padding_side = "left"
    device = torch.device(device)
    model.to(device)
    for name, p in model.named_parameters():  # peft loads an adapter frozen: the student trains it
        if "lora_" in name:
            p.requires_grad_(True)
    heads = ILQLHeads(model.config.get_text_config().hidden_size, model.get_output_embeddings().weight.shape[0],
                      cfg.ilql.two_qs)
    heads.load(checkpoint / HEADS_FILE, device)
    heads.to(device)
    train, held = distill_prompts(cfg, tokenizer, held_out, cfg.run.seed)
    report = distill_ilql(model, heads, tokenizer, train, held, cfg.ilql.beta if beta is None else beta,
                          cfg.ilql.top_k if top_k is None else top_k, steps, lr, batch_size, cfg.generation,
                          cfg.run.seed, say)

    def write(tmp: Path) -> None:
        for name in ("config.yaml", "base_fingerprint.json", "value_head.safetensors", COMPLETE_MARK):
            if (checkpoint / name).is_file():
                shutil.copy2(checkpoint / name, tmp / name)
        shutil.copytree(checkpoint / "tokenizer", tmp / "tokenizer")
        model.save_pretrained(tmp / "adapter")
        (tmp / REPORT_FILE).write_text(json.dumps({"distilled_from": str(checkpoint), **asdict(report)}, indent=2))
        (tmp / DISTILL_CARD).write_text(report.markdown())  # export puts it in the model card

    out.parent.mkdir(parents=True, exist_ok=True)
    write_atomically(out, write)
    return report


def read_report(checkpoint: str | Path) -> DistillReport | None:
    """The distillation report of a distilled checkpoint, or None for any other checkpoint."""
    path = Path(checkpoint) / REPORT_FILE
    if not path.is_file():
        return None
    try:
        saved = json.loads(path.read_text())
        return DistillReport(**{k: saved[k] for k in DistillReport.__dataclass_fields__})
    except (ValueError, KeyError, TypeError) as e:
        raise ConfigError(f"{path} is damaged ({type(e).__name__}): distil the ILQL checkpoint again") from None


def export_distilled(checkpoint: str | Path, out: str | Path, steps: int, lr: float = 1e-3, batch_size: int = 16,
                     dtype: str = "fp32", adapter_only: bool = False, overwrite: bool = False, base: str | None = None,
                     tolerance: float | None = None, device: str = "cpu", trust_checkpoint_code: bool = False,
                     say=None) -> tuple[DistillReport, float]:
    """``llmrl export --checkpoint RUN/final --distill-steps N --out DIR``: ``distill_checkpoint`` into a temporary
    folder, then ``llmrl.exporter.export`` of it to ``out`` (merged and verified as usual; the model card carries
    the distance to the ILQL policy). Returns (the report, the export's max logit difference to base + adapter)."""
    import tempfile

    from llmrl.exporter import check_out, export

    checkpoint, out = Path(checkpoint), Path(out)
    check_out(checkpoint, out, overwrite)  # before the distillation's minutes, not after
    with tempfile.TemporaryDirectory(prefix="llmrl-distill-") as tmp:
        distilled = Path(tmp) / checkpoint.name
        report = distill_checkpoint(checkpoint, distilled, steps, lr, batch_size, base=base, device=device,
                                    trust_checkpoint_code=trust_checkpoint_code, say=say)
        diff = export(distilled, out, dtype, adapter_only, overwrite, base, tolerance, trust_checkpoint_code)
    return report, diff
