"""The model-side half of the reward-model diagnostics: the base model's zero-shot mean log-prob of each reply
(a baseline the reward model must beat), and the diagnostics of a set of scored pairs printed and packed for a
summary. Shared by `alignkit rm`, `alignkit score` and `alignkit rm-eval`; the arithmetic is in
``reward_diagnostics``.
"""

from __future__ import annotations

import sys

import torch

from alignkit.data.collate import collate_pairs, length_sorted_batches, pair_length
from alignkit.data.tokenize import EncodedPair
from alignkit.evaluation.reward_diagnostics import diagnose, format_text
from alignkit.models.forward import sequence_logprobs
from alignkit.models.loading import load_model, model_load_errors, pick_device, resolve_model


def is_causal_lm(name: str, trust_remote_code: bool = False) -> bool:
    """Whether ``name`` holds a generating model (not, e.g., a reward model being trained further)."""
    from transformers import AutoConfig

    with model_load_errors(name, "config"):
        config = AutoConfig.from_pretrained(resolve_model(name), trust_remote_code=trust_remote_code)
    architectures = getattr(config, "architectures", None) or []
    return any(a.endswith(("ForCausalLM", "LMHeadModel")) for a in architectures)


@torch.no_grad()
def reply_mean_logprobs(
    model_name: str,
    pairs: list[EncodedPair],
    pad_id: int,
    dtype: str = "auto",
    trust_remote_code: bool = False,
    batch_size: int = 8,
) -> tuple[list[float], list[float]]:
    """Mean log p(reply token | prompt, earlier reply tokens) under the causal LM ``model_name`` for the
    chosen and the rejected reply of every pair: one forward pass per reply, batched by length. The pairs
    must be tokenized with that model's tokenizer (the reward model's, when it was trained from it)."""
    model = load_model(model_name, dtype, trust_remote_code, pick_device(), use="score")
    model.eval()
    device = next(model.parameters()).device
    chosen, rejected = [0.0] * len(pairs), [0.0] * len(pairs)
    for idx in length_sorted_batches([pair_length(p) for p in pairs], batch_size):
        batch = collate_pairs([pairs[i] for i in idx], pad_id)  # 2B rows: chosen, then rejected
        ids, mask, loss_mask = (batch[k].to(device) for k in ("input_ids", "attention_mask", "loss_mask"))
        out = sequence_logprobs(model, ids, mask, loss_mask)
        means = out.mean.float().tolist()  # (2B,)
        for k, i in enumerate(idx):
            chosen[i], rejected[i] = means[k], means[len(idx) + k]
    return chosen, rejected


def pair_diagnostics(
    chosen_rewards: list[float],
    rejected_rewards: list[float],
    pairs: list[EncodedPair],
    title: str,
    seed: int = 0,
    base_model: str | None = None,
    pad_id: int | None = None,
    dtype: str = "auto",
    trust_remote_code: bool = False,
    batch_size: int = 8,
) -> dict:
    """The diagnostics of scored ``pairs`` (reply lengths in tokens from their encoding), printed to stderr
    as a table; with ``base_model`` also its zero-shot log-prob baseline. Returns the JSON-able dict."""
    logprobs: tuple[list[float], list[float]] | tuple[None, None] = (None, None)
    if base_model is not None:
        logprobs = reply_mean_logprobs(base_model, pairs, pad_id, dtype, trust_remote_code, batch_size)
    found = diagnose(
        chosen_rewards,
        rejected_rewards,
        [len(p.chosen_ids) for p in pairs],
        [len(p.rejected_ids) for p in pairs],
        *logprobs,
        seed=seed,
    ).to_dict()
    if base_model is not None:
        found["base_model"] = base_model
    print(format_text(found, title), file=sys.stderr)
    return found
