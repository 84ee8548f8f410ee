"""Batched sampling from a causal LM: left padding, the KV cache, seeded, with a progress bar.

Shared by every stage that generates (quickstart, build-prefs, PPO, CAI, eval).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from tqdm.auto import tqdm


@dataclass
class SamplingConfig:
    """How responses are sampled; recorded next to every generated sample."""

    max_new_tokens: int = 128
    temperature: float = 1.0  # 0 means greedy decoding
    top_p: float = 1.0
    seed: int = 0


@dataclass
class Generation:
    prompt_ids: list[int]
    response_ids: list[int]  # generated tokens, up to and including EOS when it was produced
    text: str  # decoded response without special tokens
    finished: bool  # True when the model emitted EOS before max_new_tokens


@torch.no_grad()
def generate(
    model,
    tokenizer,
    prompt_ids: list[list[int]],
    sampling: SamplingConfig,
    batch_size: int = 8,
    progress: bool = True,
    desc: str = "generating",
) -> list[Generation]:
    """Sample one response per prompt (prompts given as token ids, e.g. from `encode_prompt`)."""
    was_training = model.training
    model.eval()
    device = next(model.parameters()).device
    eos_ids = _eos_ids(model, tokenizer)
    pad_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else eos_ids[0]
    generator_seed = torch.Generator().manual_seed(sampling.seed)
    # Sort by length so batches need little padding; results are returned in input order.
    order = sorted(range(len(prompt_ids)), key=lambda i: len(prompt_ids[i]))
    results: dict[int, Generation] = {}
    bar = tqdm(total=len(order), desc=desc, disable=not progress, unit="prompt")
    for start in range(0, len(order), batch_size):
        idx = order[start : start + batch_size]
        width = max(len(prompt_ids[i]) for i in idx)
        ids = torch.full((len(idx), width), pad_id, dtype=torch.long)  # (b, T) left-padded
        attn = torch.zeros((len(idx), width), dtype=torch.long)
        for row, i in enumerate(idx):
            p = prompt_ids[i]
            ids[row, width - len(p) :] = torch.tensor(p)
            attn[row, width - len(p) :] = 1
        # Each batch draws from a seed derived from the run seed, so results do not depend on timing.
        torch.manual_seed(int(torch.randint(0, 2**31 - 1, (1,), generator=generator_seed)))
        greedy = sampling.temperature <= 0
        seqs = model.generate(
            input_ids=ids.to(device),
            attention_mask=attn.to(device),
            max_new_tokens=sampling.max_new_tokens,
            do_sample=not greedy,
            temperature=None if greedy else sampling.temperature,
            top_p=None if greedy else sampling.top_p,
            top_k=None if greedy else 0,
            eos_token_id=eos_ids,
            pad_token_id=pad_id,
            use_cache=True,
        )
        for row, i in enumerate(idx):
            response = seqs[row, width:].tolist()
            cut = next((k for k, t in enumerate(response) if t in eos_ids), None)
            finished = cut is not None
            response = response[: cut + 1] if finished else response
            text = tokenizer.decode(response, skip_special_tokens=True).strip()
            results[i] = Generation(list(prompt_ids[i]), response, text, finished)
        bar.update(len(idx))
    bar.close()
    model.train(was_training)
    return [results[i] for i in range(len(prompt_ids))]


def _eos_ids(model, tokenizer) -> list[int]:
    ids = set()
    gen_cfg = getattr(model, "generation_config", None)
    eos = getattr(gen_cfg, "eos_token_id", None) if gen_cfg is not None else None
    for value in (eos, tokenizer.eos_token_id):
        if isinstance(value, int):
            ids.add(value)
        elif isinstance(value, (list, tuple)):
            ids.update(value)
    if not ids:
        raise ValueError("the tokenizer defines no EOS token; generation would never stop")
    return sorted(ids)
