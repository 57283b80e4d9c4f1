"""Batches for a supervised loss on some tokens only (SFT's completions and assistant turns, the warm start's
demonstrations): token segments, each trained or not, padded into (input_ids, attention_mask, labels)."""
from __future__ import annotations

import torch


def padded_segments(tokenizer, episodes: list[list[tuple[list[int], bool]]]):
    """(input_ids, attention_mask, labels) of token segments, each (ids, trained): the loss is on trained ones."""
    L = max(sum(len(ids) for ids, _ in ep) for ep in episodes)
    ids = torch.full((len(episodes), L), tokenizer.pad_token_id)
    mask = torch.zeros((len(episodes), L), dtype=torch.long)
    labels = torch.full((len(episodes), L), -100)
    for row, ep in enumerate(episodes):
        at = 0
        for segment, trained in ep:
            ids[row, at:at + len(segment)] = torch.tensor(segment)
            if trained:
                labels[row, at:at + len(segment)] = torch.tensor(segment)
            at += len(segment)
        mask[row, :at] = 1
    return ids, mask, labels
