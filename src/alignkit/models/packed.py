"""Completion log-probs of preference pairs with each prompt run once: [prompt | chosen | rejected] in one row.

Chosen and rejected follow the same prompt, so the plain path (two padded rows per pair) runs every prompt
twice and pads every row to the longest of the batch. Here each pair is one packed row whose attention mask
lets chosen tokens see prompt + earlier chosen tokens and rejected tokens see prompt + earlier rejected tokens
(never chosen), with position ids restarting after the prompt, so every completion token gets the same keys,
values and positions as on the plain path: the same numbers, up to float summation order.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from alignkit.losses.logprobs import SequenceLogprobs, completion_logprobs
from alignkit.models.forward import _base, sequence_logprobs, supports_chunked_head

# Attention implementations that take a custom 4D mask as it is (transformers' masking_utils returns a 4D mask
# unchanged, and these kernels add it to the scores); flash-attention kernels take no dense mask.
_MASKABLE_ATTENTION = ("sdpa", "eager")


@dataclass
class PackedPairs:
    """B pairs packed into rows of [prompt | chosen | rejected | padding].

    input_ids, position_ids: (rows, L). attention_mask: (rows, 1, L, L) bool, True where query t may attend to
    key s. score_rows, score_cols: (2B, W) where the 2B scored sequences (chosen 0..B-1, then rejected) read
    their hidden states: column 0 is the last prompt token, then the completion's tokens; score_mask (2B, W)
    is True on the completion tokens (column 0 and the padding are not scored).
    """

    input_ids: torch.Tensor
    position_ids: torch.Tensor
    attention_mask: torch.Tensor
    score_rows: torch.Tensor
    score_cols: torch.Tensor
    score_mask: torch.Tensor


def split_pairs(batch: dict) -> list[tuple[list[int], list[int], list[int]]] | None:
    """(prompt, chosen, rejected) ids of each pair of a ``collate_pairs`` batch (row i and row B + i are a pair),
    or None when a pair cannot be packed: an empty prompt (its first completion token is never scored, which the
    virtual layout below cannot express) or two rows that do not share their prompt."""
    input_ids, attention, loss = batch["input_ids"], batch["attention_mask"].bool(), batch["loss_mask"].bool()
    n_pairs = input_ids.shape[0] // 2
    lengths = attention.sum(1).tolist()
    n_completion = loss.sum(1).tolist()
    ids = input_ids.tolist()
    pairs = []
    for i in range(n_pairs):
        j = n_pairs + i
        n_prompt = lengths[i] - n_completion[i]
        if n_prompt < 1 or lengths[j] - n_completion[j] != n_prompt or ids[i][:n_prompt] != ids[j][:n_prompt]:
            return None
        pairs.append((ids[i][:n_prompt], ids[i][n_prompt : lengths[i]], ids[j][n_prompt : lengths[j]]))
    return pairs


def pack_pairs(pairs: list[tuple[list[int], list[int], list[int]]], pad_id: int = 0) -> PackedPairs:
    """One row per pair, right-padded to the longest row. Padding positions attend only to themselves, so no
    softmax row is empty (an all-masked row is NaN, and NaN times a zero gradient is still NaN)."""
    n_pairs = len(pairs)
    width = max(len(p) + len(c) + len(r) for p, c, r in pairs)
    input_ids = torch.full((n_pairs, width), pad_id, dtype=torch.long)  # (B, L)
    position_ids = torch.zeros((n_pairs, width), dtype=torch.long)  # (B, L)
    allowed = torch.eye(width, dtype=torch.bool).repeat(n_pairs, 1, 1)  # (B, L, L)
    score_width = 1 + max(max(len(c), len(r)) for _, c, r in pairs)
    score_rows = torch.zeros((2 * n_pairs, score_width), dtype=torch.long)  # (2B, W)
    score_cols = torch.zeros((2 * n_pairs, score_width), dtype=torch.long)  # (2B, W)
    score_mask = torch.zeros((2 * n_pairs, score_width), dtype=torch.bool)  # (2B, W)
    for b, (prompt, chosen, rejected) in enumerate(pairs):
        n_p, n_c, n_r = len(prompt), len(chosen), len(rejected)
        end_c, end_r = n_p + n_c, n_p + n_c + n_r
        input_ids[b, :end_r] = torch.tensor(prompt + chosen + rejected)
        position_ids[b, :end_c] = torch.arange(end_c)
        position_ids[b, end_c:end_r] = torch.arange(n_p, n_p + n_r)  # rejected continues the prompt, not chosen
        causal = torch.ones(end_r, end_r, dtype=torch.bool).tril_()
        causal[end_c:end_r, n_p:end_c] = False  # rejected never sees chosen
        allowed[b, :end_r, :end_r] = causal
        # The hidden state at t predicts token t + 1: the last prompt token predicts each completion's first.
        for s, (start, n) in ((b, (n_p, n_c)), (n_pairs + b, (end_c, n_r))):
            score_rows[s] = b
            score_cols[s, 0] = n_p - 1
            score_cols[s, 1 : 1 + n] = torch.arange(start, start + n)
            score_mask[s, 1 : 1 + n] = True
    return PackedPairs(input_ids, position_ids, allowed[:, None], score_rows, score_cols, score_mask)


def can_share_prompt(model) -> bool:
    """The model takes a custom 4D mask and position ids and has a plain linear LM head."""
    base = _base(model)
    return supports_chunked_head(model) and getattr(base.config, "_attn_implementation", None) in _MASKABLE_ATTENTION


def shared_prompt_logprobs(model, batch: dict, chunk_size: int = 1024) -> SequenceLogprobs:
    """``sequence_logprobs`` of a ``collate_pairs`` batch (2B rows: chosen, then rejected), with each prompt run
    once. Returns the same 2B rows in the same order; falls back to the plain path for models or pairs that
    cannot be packed (see ``can_share_prompt``, ``split_pairs``)."""
    pairs = split_pairs(batch) if can_share_prompt(model) else None
    if pairs is None:
        return sequence_logprobs(model, batch["input_ids"], batch["attention_mask"], batch["loss_mask"], chunk_size)
    base = _base(model)
    device = batch["input_ids"].device
    packed = pack_pairs(pairs)
    dtype = next(base.parameters()).dtype
    # Additive mask (0 where allowed, dtype min elsewhere): what both sdpa and eager attention add to the scores.
    additive = torch.zeros(packed.attention_mask.shape, dtype=dtype, device=device)
    additive.masked_fill_(~packed.attention_mask.to(device), torch.finfo(dtype).min)  # (B, 1, L, L)
    hidden = base.get_decoder()(
        input_ids=packed.input_ids.to(device),
        attention_mask=additive,
        position_ids=packed.position_ids.to(device),
        use_cache=False,
    ).last_hidden_state  # (B, L, H)
    rows, cols = packed.score_rows.to(device), packed.score_cols.to(device)
    # Each scored sequence as a contiguous (last prompt token, completion...) row, so the shift-by-one of
    # completion_logprobs reads the same hidden state for each token as on the plain path.
    head = base.get_output_embeddings()
    return completion_logprobs(
        hidden[rows, cols],  # (2B, W, H)
        head.weight,
        packed.input_ids.to(device)[rows, cols],  # (2B, W)
        packed.score_mask.to(device),
        chunk_size,
        head.bias,
    )
