"""The chunked completion log-probs equal the naive full log-softmax path, in values and gradients."""

from __future__ import annotations

import math

import pytest
import torch

from alignkit.losses.logprobs import completion_logprobs, naive_completion_logprobs
from alignkit.models.forward import sequence_logprobs

from conftest import build_tiny_model


def _batch(vocab: int):
    g = torch.Generator().manual_seed(0)
    input_ids = torch.randint(0, vocab, (3, 11), generator=g)
    attention_mask = torch.ones(3, 11, dtype=torch.long)
    attention_mask[2, 8:] = 0  # a right-padded row
    loss_mask = torch.zeros(3, 11)
    loss_mask[0, 5:] = 1
    loss_mask[1, 2:9] = 1
    loss_mask[2, 4:8] = 1
    return input_ids, attention_mask, loss_mask


def test_hand_computed_two_token_vocab():
    """V=2, H=1, W = [[1], [-1]], h = 1 at every position, targets [0, 1]:
    logits = [1, -1]; log p(0) = 1 - log(e + e^-1) = -0.126928; log p(1) = -1 - log(e + e^-1) = -2.126928.
    Sequence "x 0 1" with both completion tokens masked: sum = -2.253856, mean = -1.126928."""
    hidden = torch.ones(1, 3, 1)
    weight = torch.tensor([[1.0], [-1.0]])
    input_ids = torch.tensor([[0, 0, 1]])
    loss_mask = torch.tensor([[0, 1, 1]])
    out = completion_logprobs(hidden, weight, input_ids, loss_mask, chunk_size=1)
    lse = math.log(math.e + math.exp(-1))
    assert out.sum.item() == pytest.approx((1 - lse) + (-1 - lse), abs=1e-6)
    assert out.mean.item() == pytest.approx(-1.126928, abs=1e-6)
    assert out.n_tokens.tolist() == [2]


@pytest.mark.parametrize("chunk_size", [1, 4, 1024])
def test_chunked_equals_naive_values_and_grads(chunk_size):
    torch.manual_seed(0)
    B, T, H, V = 3, 11, 8, 50
    hidden = torch.randn(B, T, H, requires_grad=True)
    weight = torch.randn(V, H, requires_grad=True)
    input_ids, _, loss_mask = _batch(V)

    fast = completion_logprobs(hidden, weight, input_ids, loss_mask, chunk_size=chunk_size)
    (fast.sum * torch.tensor([1.0, -2.0, 0.5])).sum().backward()
    g_h, g_w = hidden.grad.clone(), weight.grad.clone()
    hidden.grad = weight.grad = None

    logits = hidden @ weight.T  # (B, T, V)
    total, mean = naive_completion_logprobs(logits, input_ids, loss_mask)
    (total * torch.tensor([1.0, -2.0, 0.5])).sum().backward()

    torch.testing.assert_close(fast.sum, total, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(fast.mean, mean, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(g_h, hidden.grad, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(g_w, weight.grad, atol=1e-5, rtol=1e-5)
    # the prompt positions get no gradient: row 0's completion starts at 5, so h[0, :4] is unused
    assert g_h[0, :4].abs().sum() == 0


def test_model_path_equals_full_logits(tiny_tokenizer):
    """Through a real (tiny) Llama with tied embeddings: chunked head == model(...).logits path."""
    model = build_tiny_model(len(tiny_tokenizer))
    input_ids, attention_mask, loss_mask = _batch(len(tiny_tokenizer))
    fast = sequence_logprobs(model, input_ids, attention_mask, loss_mask, chunk_size=3)
    fast.sum.sum().backward()
    grads = {n: p.grad.clone() for n, p in model.named_parameters()}
    model.zero_grad()
    logits = model(input_ids=input_ids, attention_mask=attention_mask).logits
    total, _ = naive_completion_logprobs(logits, input_ids, loss_mask)
    total.sum().backward()
    torch.testing.assert_close(fast.sum, total, atol=1e-5, rtol=1e-5)
    for name, p in model.named_parameters():
        torch.testing.assert_close(grads[name], p.grad, atol=1e-5, rtol=1e-4, msg=name)


def test_lora_wrapped_model_uses_adapters(tiny_tokenizer):
    """Under PEFT the backbone call keeps LoRA active, and disable_adapter() gives the base log-probs."""
    import peft

    model = build_tiny_model(len(tiny_tokenizer))
    input_ids, attention_mask, loss_mask = _batch(len(tiny_tokenizer))
    base_logps = sequence_logprobs(model, input_ids, attention_mask, loss_mask).sum.detach()
    pm = peft.get_peft_model(
        model, peft.LoraConfig(r=2, target_modules=["q_proj", "v_proj"], init_lora_weights=False)
    )
    lora_logps = sequence_logprobs(pm, input_ids, attention_mask, loss_mask).sum.detach()
    full = pm(input_ids=input_ids, attention_mask=attention_mask).logits
    torch.testing.assert_close(
        lora_logps, naive_completion_logprobs(full, input_ids, loss_mask)[0], atol=1e-5, rtol=1e-5
    )
    assert not torch.allclose(lora_logps, base_logps)
    with pm.disable_adapter():
        torch.testing.assert_close(
            sequence_logprobs(pm, input_ids, attention_mask, loss_mask).sum, base_logps
        )
