"""Tiny tokenizers and GPT-2 models built in-process, so that nothing is downloaded (tests, embedded default)."""
from __future__ import annotations

import torch
from tokenizers import Regex, Tokenizer, decoders, models, pre_tokenizers, trainers
from transformers import GPT2Config, GPT2LMHeadModel, PreTrainedTokenizerFast

PAD, EOS, UNK = "<pad>", "<eos>", "<unk>"


def char_tokenizer(chars: str, vocab_size: int | None = None) -> PreTrainedTokenizerFast:
    """One token per character of ``chars``, plus pad, EOS and unknown tokens; left padding.

    ``vocab_size`` pads the vocabulary with unused tokens ``<t0>``, ``<t1>``... up to that size, for models
    whose output layer must be realistically wide (benchmarks).
    """
    vocab = {PAD: 0, EOS: 1, UNK: 2}
    for c in dict.fromkeys(chars):
        vocab[c] = len(vocab)
    while vocab_size is not None and len(vocab) < vocab_size:
        vocab[f"<t{len(vocab)}>"] = len(vocab)
    tok = Tokenizer(models.WordLevel(vocab, unk_token=UNK))
    tok.pre_tokenizer = pre_tokenizers.Split(Regex("."), behavior="isolated")
    tok.decoder = decoders.Fuse()
    return _wrap(tok)


def bpe_tokenizer(texts: list[str], vocab_size: int = 300) -> PreTrainedTokenizerFast:
    """A byte-level BPE (GPT-2 style) trained on ``texts``; pad and EOS are separate special tokens."""
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=vocab_size, special_tokens=[PAD, EOS, UNK],
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet(), show_progress=False)
    tok.train_from_iterator(texts, trainer)
    return _wrap(tok)


def _wrap(tok: Tokenizer) -> PreTrainedTokenizerFast:
    hf = PreTrainedTokenizerFast(tokenizer_object=tok, pad_token=PAD, eos_token=EOS, unk_token=UNK, bos_token=EOS)
    hf.padding_side = "left"
    return hf


def tiny_gpt2(tokenizer, n_layer: int = 2, n_embd: int = 64, n_head: int = 4, n_positions: int = 64,
              seed: int = 0) -> GPT2LMHeadModel:
    """A randomly initialised GPT-2 sized for ``tokenizer``, dropout off, pad/EOS ids set."""
    config = GPT2Config(
        vocab_size=len(tokenizer), n_positions=n_positions, n_embd=n_embd, n_layer=n_layer, n_head=n_head,
        resid_pdrop=0.0, embd_pdrop=0.0, attn_pdrop=0.0,
        bos_token_id=tokenizer.eos_token_id, eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.pad_token_id,
    )
    with torch.random.fork_rng():
        torch.manual_seed(seed)
        model = GPT2LMHeadModel(config)
    # transformers picks the loss from the class name, which GPT2LMHeadModel does not match: it would log that
    # it falls back to the causal-LM loss at every step of the warm start
    model.loss_type = "ForCausalLM"
    model.generation_config.pad_token_id = tokenizer.pad_token_id
    model.generation_config.eos_token_id = tokenizer.eos_token_id
    return model
