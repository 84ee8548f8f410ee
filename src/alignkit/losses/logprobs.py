"""Log-probabilities of completion tokens without a (batch, time, vocab) tensor.

The language-model head is applied only at the positions that predict a completion token, a chunk of
tokens at a time, and recomputed chunk by chunk in the backward pass. Peak extra memory is one
(chunk, vocab) block instead of (B, T, V) logits plus their log-softmax.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch


@dataclass
class SequenceLogprobs:
    """Per-sequence log-probabilities of the completion tokens."""

    sum: torch.Tensor  # (B,) summed log p(y_t | x, y_<t) over completion tokens
    mean: torch.Tensor  # (B,) the same, divided by the number of completion tokens
    n_tokens: torch.Tensor  # (B,) completion tokens per sequence
    token_logps: torch.Tensor  # (N,) log-prob of each completion token, in (row, position) order
    token_rows: torch.Tensor  # (N,) the row each entry of token_logps belongs to


class _ChunkedTokenLogprobs(torch.autograd.Function):
    """log softmax(h W^T + b)[target] per row of h, computed `chunk_size` rows at a time.

    Forward keeps only h, W and the per-token logsumexp; backward recomputes each chunk's logits:
    d/dlogits = g * (onehot(target) - softmax(logits)).

    The matmul runs in the dtype autocast gives it in the forward (bf16 in mixed precision), chosen once and
    used again in the backward (which autocast does not cover), so the recomputed logits match the logsumexp
    kept; the log-softmax itself is always fp32.
    """

    @staticmethod
    def forward(ctx, hidden, weight, bias, targets, chunk_size):
        # hidden (N, H), weight (V, H), bias (V,) or None, targets (N,)
        out = torch.empty(hidden.shape[0], dtype=torch.float32, device=hidden.device)  # (N,)
        lse = torch.empty_like(out)
        ctx.compute_dtype = _matmul_dtype(hidden, weight)
        w = weight.to(ctx.compute_dtype)  # (V, H), cast once for all chunks
        for start in range(0, hidden.shape[0], chunk_size):
            h = hidden[start : start + chunk_size].to(ctx.compute_dtype)
            logits = (h @ w.T).float()  # (n, V)
            if bias is not None:
                logits += bias.float()
            lse_chunk = torch.logsumexp(logits, dim=-1)
            lse[start : start + chunk_size] = lse_chunk
            tgt = targets[start : start + chunk_size]
            out[start : start + chunk_size] = logits.gather(1, tgt[:, None]).squeeze(1) - lse_chunk
        ctx.save_for_backward(hidden, weight, bias, targets, lse)
        ctx.chunk_size = chunk_size
        return out

    @staticmethod
    def backward(ctx, grad_out):
        hidden, weight, bias, targets, lse = ctx.saved_tensors
        chunk = ctx.chunk_size
        grad_hidden = torch.zeros_like(hidden) if ctx.needs_input_grad[0] else None
        grad_weight = torch.zeros_like(weight, dtype=torch.float32) if ctx.needs_input_grad[1] else None
        grad_bias = None
        if bias is not None and ctx.needs_input_grad[2]:
            grad_bias = torch.zeros_like(bias, dtype=torch.float32)
        w = weight.to(ctx.compute_dtype)  # (V, H)
        for start in range(0, hidden.shape[0], chunk):
            h = hidden[start : start + chunk].to(ctx.compute_dtype)
            logits = (h @ w.T).float()  # (n, V)
            if bias is not None:
                logits += bias.float()
            g = grad_out[start : start + chunk]  # (n,)
            # d logp / d logits = onehot - softmax; scaled by the incoming gradient.
            dlogits = torch.exp(logits - lse[start : start + chunk, None]).mul_(-g[:, None])
            dlogits.scatter_add_(1, targets[start : start + chunk, None], g[:, None])
            dlogits = dlogits.to(ctx.compute_dtype)
            if grad_hidden is not None:
                grad_hidden[start : start + chunk] = dlogits @ w
            if grad_weight is not None:
                grad_weight += (dlogits.T @ h).float()
            if grad_bias is not None:
                grad_bias += dlogits.float().sum(0)
        if grad_weight is not None:
            grad_weight = grad_weight.to(weight.dtype)
        if grad_bias is not None:
            grad_bias = grad_bias.to(bias.dtype)
        return grad_hidden, grad_weight, grad_bias, None, None


def _matmul_dtype(hidden: torch.Tensor, weight: torch.Tensor) -> torch.dtype:
    """The dtype of ``hidden @ weight.T`` here: autocast's where it is on (mixed precision), else the
    inputs' promoted dtype."""
    device_type = hidden.device.type
    if torch.is_autocast_enabled(device_type):
        return torch.get_autocast_dtype(device_type)
    return torch.promote_types(hidden.dtype, weight.dtype)


def completion_logprobs(
    hidden: torch.Tensor,
    lm_head_weight: torch.Tensor,
    input_ids: torch.Tensor,
    loss_mask: torch.Tensor,
    chunk_size: int = 1024,
    lm_head_bias: torch.Tensor | None = None,
) -> SequenceLogprobs:
    """Summed and length-averaged log-probs of the tokens where ``loss_mask`` is 1.

    hidden: (B, T, H) final hidden states (after the model's last norm).
    input_ids, loss_mask: (B, T); loss_mask[b, t] = 1 when input_ids[b, t] is a completion token.
    The token at t is predicted from the hidden state at t - 1, so position 0 is never scored.
    """
    B, T, _ = hidden.shape
    target_mask = loss_mask[:, 1:].bool()  # (B, T-1): positions t >= 1 that are scored
    rows, cols = target_mask.nonzero(as_tuple=True)  # (N,), (N,)
    h = hidden[rows, cols]  # (N, H): hidden state at t - 1 for each scored token t
    targets = input_ids[rows, cols + 1]  # (N,)
    token_logps = _ChunkedTokenLogprobs.apply(h, lm_head_weight, lm_head_bias, targets, chunk_size)  # (N,)
    total = torch.zeros(B, dtype=token_logps.dtype, device=hidden.device).index_add(0, rows, token_logps)
    n_tokens = target_mask.sum(1)  # (B,)
    mean = total / n_tokens.clamp(min=1)
    return SequenceLogprobs(sum=total, mean=mean, n_tokens=n_tokens, token_logps=token_logps, token_rows=rows)


def naive_completion_logprobs(logits: torch.Tensor, input_ids: torch.Tensor, loss_mask: torch.Tensor):
    """Reference path: full (B, T, V) log-softmax and a gather. Returns (sum (B,), mean (B,))."""
    logps = torch.log_softmax(logits[:, :-1].float(), dim=-1)  # (B, T-1, V)
    token_logps = logps.gather(2, input_ids[:, 1:, None]).squeeze(2)  # (B, T-1)
    mask = loss_mask[:, 1:].float()
    total = (token_logps * mask).sum(1)
    return total, total / mask.sum(1).clamp(min=1)
