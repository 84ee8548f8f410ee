"""Stack encoded examples into right-padded tensors for one forward pass, with a mask that marks exactly
the completion tokens and the counts the training loop normalises the loss by.
"""

from __future__ import annotations

import torch

from alignkit.data.tokenize import Encoded, EncodedPair, EncodedUnpaired


def collate_sft(batch: list[Encoded], pad_id: int) -> dict:
    """Prompt + completion rows, right-padded.

    Returns:
        input_ids: (B, T) long.
        attention_mask: (B, T) long, 1 on real tokens, 0 on padding.
        loss_mask: (B, T) bool, True where input_ids[b, t] is a completion token (EOS included). It is aligned
            with input_ids, not with the next-token targets: the loss shifts it together with the labels.
        n_items: number of completion tokens in the batch (SFT averages its loss over tokens).
        n_tokens: number of non-padding tokens.
    """
    return _pad_rows([(e.prompt_ids, e.completion_ids) for e in batch], pad_id, n_items=None)


def collate_pairs(batch: list[EncodedPair], pad_id: int) -> dict:
    """Preference pairs as ONE batch of 2B rows, chosen rows first, then rejected rows (row i and row B + i
    are a pair), so a single forward pass scores both sides.

    Returns the keys of ``collate_sft`` with shapes (2B, T), and n_items = B (the loss is per pair).
    """
    rows = [(e.prompt_ids, e.chosen_ids) for e in batch] + [(e.prompt_ids, e.rejected_ids) for e in batch]
    return _pad_rows(rows, pad_id, n_items=len(batch))


def collate_unpaired(batch: list[EncodedUnpaired], pad_id: int) -> dict:
    """Unpaired (KTO) examples: the keys of ``collate_sft`` with shapes (B, T), plus labels (B,) bool
    (True: desirable), and n_items = B (the loss is per example)."""
    out = _pad_rows([(e.prompt_ids, e.completion_ids) for e in batch], pad_id, n_items=len(batch))
    out["labels"] = torch.tensor([e.label for e in batch], dtype=torch.bool)  # (B,)
    return out


def pair_length(pair: EncodedPair) -> int:
    """The padded width a pair asks of a batch: its prompt and its longer reply."""
    return len(pair.prompt_ids) + max(len(pair.chosen_ids), len(pair.rejected_ids))


def length_sorted_batches(lengths: list[int], batch_size: int, indices=None) -> list[list[int]]:
    """Index batches of similar length (from `indices`, default all), so forward-only passes such as
    evaluation and reference log-probs pad little."""
    order = sorted(range(len(lengths)) if indices is None else indices, key=lambda i: lengths[i])
    return [order[i : i + batch_size] for i in range(0, len(order), batch_size)]


def _pad_rows(rows: list[tuple[list[int], list[int]]], pad_id: int, n_items: int | None) -> dict:
    """Right-pad (prompt_ids, completion_ids) rows; ``n_items=None`` means "count completion tokens"."""
    if not rows:
        raise ValueError("cannot collate an empty batch")
    width = max(len(prompt) + len(completion) for prompt, completion in rows)
    input_ids = torch.full((len(rows), width), pad_id, dtype=torch.long)  # (B, T)
    attention_mask = torch.zeros((len(rows), width), dtype=torch.long)  # (B, T)
    loss_mask = torch.zeros((len(rows), width), dtype=torch.bool)  # (B, T)
    for b, (prompt, completion) in enumerate(rows):
        n_prompt, n_total = len(prompt), len(prompt) + len(completion)
        input_ids[b, :n_total] = torch.tensor(prompt + completion, dtype=torch.long)
        attention_mask[b, :n_total] = 1
        loss_mask[b, n_prompt:n_total] = True
    n_completion_tokens = int(loss_mask.sum())
    return {
        "input_ids": input_ids,
        "attention_mask": attention_mask,
        "loss_mask": loss_mask,
        "n_items": n_completion_tokens if n_items is None else n_items,
        "n_tokens": int(attention_mask.sum()),
    }
