"""Run a causal LM and return completion log-probs, via the chunked head where the model allows it.

The backbone gives final hidden states; the LM head is applied only at completion positions
(`alignkit.losses.logprobs`). Models whose logits are not a plain linear map of the hidden state
(soft-capped or scaled logits) fall back to full logits, which is exact but uses more memory.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

import torch

from alignkit.data.collate import collate_sft
from alignkit.data.tokenize import Encoded
from alignkit.losses.logprobs import SequenceLogprobs, completion_logprobs, naive_completion_logprobs

if TYPE_CHECKING:
    from alignkit.models.generation import Generation


def _base(model):
    """The transformers model under a PEFT wrapper (LoRA layers stay active inside it)."""
    return model.get_base_model() if hasattr(model, "get_base_model") else model


def sharded_outside_forward(weight: torch.Tensor) -> bool:
    """Whether ``weight`` holds only this rank's slice outside its module's forward: DeepSpeed ZeRO-3 (its
    weights carry a ``ds_id``) and FSDP2 (a sharded DTensor) gather a module's weights only in that module's own
    forward, so code that reads the weight directly must run the module instead."""
    if hasattr(weight, "ds_id"):
        return True
    if not torch.distributed.is_available():
        return False
    from torch.distributed.tensor import DTensor

    return isinstance(weight, DTensor)


def supports_chunked_head(model) -> bool:
    cfg = _base(model).config
    for name in ("final_logit_softcapping", "logit_scale", "output_multiplier_scale", "logits_scaling"):
        value = getattr(cfg, name, None)
        if value not in (None, 1, 1.0):
            return False
    head = _base(model).get_output_embeddings() if hasattr(_base(model), "get_decoder") else None
    # The chunked head reads the head's weight outside the head's forward: a weight sharded across the
    # processes (ZeRO-3, FSDP) is incomplete there, so such a model takes the plain path, through its forward.
    return head is not None and not sharded_outside_forward(head.weight)


def sequence_logprobs(
    model,
    input_ids: torch.Tensor,
    attention_mask: torch.Tensor,
    loss_mask: torch.Tensor,
    chunk_size: int = 1024,
) -> SequenceLogprobs:
    """Completion log-probs of each row. input_ids, attention_mask, loss_mask: (B, T)."""
    base = _base(model)
    if not supports_chunked_head(model):
        logits = model(
            input_ids=input_ids, attention_mask=attention_mask, use_cache=False
        ).logits  # (B, T, V)
        total, mean = naive_completion_logprobs(logits, input_ids, loss_mask)
        n_tokens = loss_mask[:, 1:].sum(1)
        rows, cols = loss_mask[:, 1:].bool().nonzero(as_tuple=True)
        logps = torch.log_softmax(logits[rows, cols].float(), -1).gather(1, input_ids[rows, cols + 1, None])
        return SequenceLogprobs(total, mean, n_tokens, logps.squeeze(1), rows)
    hidden = base.get_decoder()(
        input_ids=input_ids, attention_mask=attention_mask, use_cache=False
    ).last_hidden_state  # (B, T, H)
    head = base.get_output_embeddings()
    return completion_logprobs(hidden, head.weight, input_ids, loss_mask, chunk_size, head.bias)


def sample_batches(samples: list[Generation], batch_size: int):
    """(indices, batch) over sampled responses (``Generation``s, or anything with ``prompt_ids`` and
    ``response_ids``) as prompt + response rows of ``collate_sft``, sorted by length (little padding)."""
    order = sorted(
        range(len(samples)), key=lambda i: len(samples[i].prompt_ids) + len(samples[i].response_ids)
    )
    for start in range(0, len(order), batch_size):
        idx = order[start : start + batch_size]
        rows = [Encoded(samples[i].prompt_ids, samples[i].response_ids, False) for i in idx]
        yield idx, collate_sft(rows, pad_id=0)  # padding is masked out, so any id pads


@torch.no_grad()
def response_token_logprobs(
    model, samples: list[Generation], batch_size: int, chunk: int
) -> list[torch.Tensor]:
    """log p(y_t | x, y_<t) of every response token under ``model``: one (T_i,) float tensor per sample."""
    device = next(model.parameters()).device
    out: list[torch.Tensor] = [torch.zeros(0)] * len(samples)
    for idx, batch in sample_batches(samples, batch_size):
        ids, attn, mask = (batch[k].to(device) for k in ("input_ids", "attention_mask", "loss_mask"))
        lp = sequence_logprobs(model, ids, attn, mask, chunk)
        rows = lp.token_rows.cpu()
        token_logps = lp.token_logps.float().cpu()  # (N,) in (row, position) order
        for row, i in enumerate(idx):
            out[i] = token_logps[rows == row]
    return out
