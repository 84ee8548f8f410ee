"""Completion log-probs of preference pairs with each prompt run once: [prompt | chosen | rejected] in one row.

Chosen and rejected follow the same prompt, so the plain path (two padded rows per pair) runs every prompt
twice and pads every row to the longest of the batch. Here each pair is one packed row whose attention mask
lets chosen tokens see the prompt and earlier chosen tokens, and rejected tokens the prompt and earlier rejected
tokens (never chosen), with positions restarting after the prompt: every completion token gets the same keys,
values and positions as on the plain path, so the log-probs and gradients are the same up to float rounding.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch.nn.utils.rnn import pad_sequence

from alignkit.losses.logprobs import SequenceLogprobs, completion_logprobs
from alignkit.models.forward import _base, sequence_logprobs, supports_chunked_head

# Attention implementations that take a custom 4D mask as it is: transformers' masking_utils returns a 4D mask
# unchanged and these add it to the scores (on CPU, sdpa runs its flash kernel with the mask: no (L, L) scores
# are kept per head). Flash-attention-2/3 kernels take no dense mask, so those models use the plain path.
_MASKABLE_ATTENTION = ("sdpa", "eager")


@dataclass
class PackedPair:
    """One pair as one row: [prompt (P) | chosen (C) | rejected (R)], L = P + C + R tokens."""

    input_ids: torch.Tensor  # (L,)
    position_ids: torch.Tensor  # (L,) 0..P+C-1, then P..P+R-1: rejected continues the prompt, not chosen
    allowed: torch.Tensor  # (L, L) bool, True where query t may attend to key s
    n_prompt: int
    n_chosen: int
    n_rejected: int


def pack_pair(prompt: list[int], chosen: list[int], rejected: list[int]) -> PackedPair:
    n_p, n_c, n_r = len(prompt), len(chosen), len(rejected)
    end_c, end_r = n_p + n_c, n_p + n_c + n_r
    position_ids = torch.cat([torch.arange(end_c), torch.arange(n_p, n_p + n_r)])  # (L,)
    allowed = torch.ones(end_r, end_r, dtype=torch.bool).tril_()  # (L, L) causal over the row...
    allowed[end_c:, n_p:end_c] = False  # ...except that rejected never sees chosen
    input_ids = torch.tensor(prompt + chosen + rejected, dtype=torch.long)  # (L,)
    return PackedPair(input_ids, position_ids, allowed, n_p, n_c, n_r)


def split_pairs(batch: dict) -> list[tuple[list[int], list[int], list[int]]] | None:
    """(prompt, chosen, rejected) ids of each pair of a ``collate_pairs`` batch (row i and row B + i are a pair),
    or None when a pair cannot be packed: an empty prompt (the plain path never scores a row's first token,
    which this layout cannot express) or two rows that do not share their prompt."""
    n_pairs = batch["input_ids"].shape[0] // 2
    lengths = batch["attention_mask"].bool().sum(1).tolist()
    n_completion = batch["loss_mask"].bool().sum(1).tolist()
    ids = batch["input_ids"].tolist()
    pairs = []
    for i in range(n_pairs):
        j = n_pairs + i
        n_prompt = lengths[i] - n_completion[i]
        if n_prompt < 1 or lengths[j] - n_completion[j] != n_prompt or ids[i][:n_prompt] != ids[j][:n_prompt]:
            return None
        pairs.append((ids[i][:n_prompt], ids[i][n_prompt : lengths[i]], ids[j][n_prompt : lengths[j]]))
    return pairs


def can_share_prompt(model) -> bool:
    """The model takes a custom 4D mask with position ids, and has a plain linear LM head."""
    attention = getattr(_base(model).config, "_attn_implementation", None)
    return supports_chunked_head(model) and attention in _MASKABLE_ATTENTION


def shared_prompt_logprobs(
    model, batch: dict, chunk_size: int = 1024, pairs_per_call: int | None = None
) -> SequenceLogprobs:
    """``sequence_logprobs`` of a ``collate_pairs`` batch (2B rows: chosen, then rejected) with each prompt run
    once: the same 2B rows in the same order. Models or pairs that cannot be packed take the plain path.

    pairs_per_call: packed rows per decoder call. None: 1 on CPU, where fp32 matmul throughput hardly depends on
    the row count while padding is pure waste (HH-RLHF pairs differ in length by 2-3x); on accelerators all of
    them in one call, right-padded. With dropout active the prompt draws one dropout mask instead of two (the
    same expectation, not the same numbers); alignkit's models train without dropout by default.
    """
    pairs = split_pairs(batch) if can_share_prompt(model) else None
    if pairs is None:
        return sequence_logprobs(
            model, batch["input_ids"], batch["attention_mask"], batch["loss_mask"], chunk_size
        )
    base = _base(model)
    device = batch["input_ids"].device
    if pairs_per_call is None:
        pairs_per_call = 1 if device.type == "cpu" else len(pairs)
    packed = [pack_pair(*pair) for pair in pairs]
    hidden: list[torch.Tensor] = []  # (L_b, H) per pair
    for start in range(0, len(packed), pairs_per_call):
        hidden += _packed_hidden(base, packed[start : start + pairs_per_call], device)

    # Each scored sequence as a contiguous row (last prompt token, completion tokens...), so the shift by one in
    # completion_logprobs reads, for every completion token, the hidden state the plain path reads: the first
    # token of chosen AND of rejected is predicted from the last prompt token.
    rows_h, rows_ids = [], []
    for side in ("chosen", "rejected"):
        for p, h in zip(packed, hidden):
            start = p.n_prompt if side == "chosen" else p.n_prompt + p.n_chosen
            n = p.n_chosen if side == "chosen" else p.n_rejected
            index = torch.cat([torch.tensor([p.n_prompt - 1]), torch.arange(start, start + n)]).to(device)
            rows_h.append(h[index])  # (1 + n, H)
            rows_ids.append(p.input_ids.to(device)[index])  # (1 + n,)
    n_scored = torch.tensor([len(ids) - 1 for ids in rows_ids], device=device)  # (2B,)
    score_hidden = pad_sequence(rows_h, batch_first=True)  # (2B, W, H)
    score_ids = pad_sequence(rows_ids, batch_first=True)  # (2B, W)
    column = torch.arange(score_ids.shape[1], device=device)
    score_mask = (column >= 1) & (column <= n_scored[:, None])  # (2B, W): the completion tokens
    head = base.get_output_embeddings()
    return completion_logprobs(score_hidden, head.weight, score_ids, score_mask, chunk_size, head.bias)


def _packed_hidden(base, packed: list[PackedPair], device: torch.device) -> list[torch.Tensor]:
    """Final hidden states (L_b, H) of packed rows run in one decoder call, right-padded to the longest.

    Padding positions attend only to themselves: an all-masked softmax row is NaN, and a NaN in an unused
    position still poisons the backward pass (NaN * 0 = NaN).
    """
    width = max(len(p.input_ids) for p in packed)
    input_ids = torch.zeros((len(packed), width), dtype=torch.long)  # (b, L)
    position_ids = torch.zeros((len(packed), width), dtype=torch.long)  # (b, L)
    allowed = torch.eye(width, dtype=torch.bool).repeat(len(packed), 1, 1)  # (b, L, L)
    for b, p in enumerate(packed):
        n = len(p.input_ids)
        input_ids[b, :n], position_ids[b, :n], allowed[b, :n, :n] = p.input_ids, p.position_ids, p.allowed
    dtype = next(base.parameters()).dtype
    # Additive mask, 0 where allowed and the dtype's minimum elsewhere: what sdpa and eager attention add to the
    # scores; exp(min - max) is exactly 0, so masked keys drop out of the softmax as on the plain path.
    mask = torch.zeros((len(packed), 1, width, width), dtype=dtype, device=device)  # (b, 1, L, L)
    mask.masked_fill_(~allowed[:, None].to(device), torch.finfo(dtype).min)
    hidden = base.get_decoder()(
        input_ids=input_ids.to(device),
        attention_mask=mask,
        position_ids=position_ids.to(device),
        use_cache=False,
    ).last_hidden_state  # (b, L, H)
    return [hidden[b, : len(p.input_ids)] for b, p in enumerate(packed)]
