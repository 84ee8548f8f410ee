"""The shared-prompt path ([prompt | chosen | rejected] in one masked row) equals the plain path (two padded rows
per pair) in log-probs and parameter gradients, for a plain and a LoRA model; and a DPO run gives the same
per-step losses with share_prompt on and off."""

from __future__ import annotations

import json
import math
from types import SimpleNamespace

import pytest
import torch

from alignkit.cli import main
from alignkit.data.collate import collate_pairs
from alignkit.data.tokenize import encode_pair
from alignkit.models.forward import sequence_logprobs
from alignkit.models.loading import apply_lora
from alignkit.models.packed import can_share_prompt, pack_pair, shared_prompt_logprobs, split_pairs

from conftest import build_tiny_model

# Prompts of 1 to 3 messages and completions from 1 word to a sentence: every row has its own length, and one
# rejected is longer than its chosen while another is shorter.
PAIRS = [
    ("what is the capital of france?", "paris.", "i am sorry, but i cannot help with that request."),
    ([{"role": "user", "content": "please write a short poem"}], "the sea and the sky.", "no."),
    (
        [
            {"role": "system", "content": "here is a helpful and harmless answer"},
            {"role": "user", "content": "the quick brown fox"},
            {"role": "assistant", "content": "jumps over the lazy dog"},
            {"role": "user", "content": "0 1 2 3 4 5 6 7 8 9"},
        ],
        "+ - = ?",
        "the capital of france is paris. the quick brown fox jumps over the lazy dog",
    ),
]
TOL = 1e-5


def _batch(tokenizer, max_length: int = 256) -> dict:
    return collate_pairs(
        [encode_pair(tokenizer, *p, max_length=max_length) for p in PAIRS], tokenizer.pad_token_id
    )


def _plain(model, batch, chunk_size):
    return sequence_logprobs(
        model, batch["input_ids"], batch["attention_mask"], batch["loss_mask"], chunk_size
    )


def _values_and_grads(fn, model, batch, chunk_size):
    """Log-probs and the gradient of a weighted sum of every sequence's sum and mean (distinct weights, so a row
    mix-up shows), for each trainable parameter."""
    model.zero_grad(set_to_none=True)
    out = fn(model, batch, chunk_size)
    w = torch.linspace(-1.0, 2.0, out.sum.shape[0])
    ((out.sum * w).sum() + (out.mean * w.flip(0)).sum()).backward()
    grads = {n: p.grad.clone() for n, p in model.named_parameters() if p.requires_grad}
    return out, grads


def _assert_same(model, batch, chunk_size, **kwargs):
    shared_fn = lambda m, b, c: shared_prompt_logprobs(m, b, c, **kwargs)  # noqa: E731
    plain, g_plain = _values_and_grads(_plain, model, batch, chunk_size)
    shared, g_shared = _values_and_grads(shared_fn, model, batch, chunk_size)
    torch.testing.assert_close(shared.sum, plain.sum, atol=TOL, rtol=0)
    torch.testing.assert_close(shared.mean, plain.mean, atol=TOL, rtol=0)
    torch.testing.assert_close(shared.token_logps, plain.token_logps, atol=TOL, rtol=0)
    assert shared.n_tokens.tolist() == plain.n_tokens.tolist()
    assert shared.token_rows.tolist() == plain.token_rows.tolist()
    assert g_shared.keys() == g_plain.keys() and len(g_plain) > 0
    for name, grad in g_plain.items():
        assert grad.abs().max() > 0, name  # every compared gradient carries signal
        torch.testing.assert_close(g_shared[name], grad, atol=TOL, rtol=0, msg=name)


def test_pack_pair_layout_by_hand():
    """prompt [10, 11], chosen [20, 21], rejected [30]: positions 0 1 | 2 3 | 2 (rejected continues the prompt);
    chosen attends causally to prompt + chosen; rejected to the prompt and itself, never to chosen."""
    p = pack_pair([10, 11], [20, 21], [30])
    assert p.input_ids.tolist() == [10, 11, 20, 21, 30]
    assert p.position_ids.tolist() == [0, 1, 2, 3, 2]
    assert p.allowed.int().tolist() == [
        [1, 0, 0, 0, 0],
        [1, 1, 0, 0, 0],
        [1, 1, 1, 0, 0],
        [1, 1, 1, 1, 0],
        [1, 1, 0, 0, 1],
    ]


def test_split_pairs_reads_the_collated_batch(tiny_tokenizer):
    batch = _batch(tiny_tokenizer)
    pairs = split_pairs(batch)
    encoded = [encode_pair(tiny_tokenizer, *p, max_length=256) for p in PAIRS]
    assert pairs == [(e.prompt_ids, e.chosen_ids, e.rejected_ids) for e in encoded]
    # rows that do not share their prompt cannot be packed
    other = collate_pairs([encoded[0], encoded[1]], tiny_tokenizer.pad_token_id)
    other["input_ids"][2] = other["input_ids"][0]  # rejected of pair 0 now carries pair 0's chosen row...
    other["input_ids"][2, 0] += 1  # ...with a different first prompt token
    assert split_pairs(other) is None


@pytest.mark.parametrize("pairs_per_call", [None, 2, 3])
@pytest.mark.parametrize("chunk_size", [5, 1024])
def test_shared_prompt_equals_plain(tiny_tokenizer, pairs_per_call, chunk_size):
    """One pair per decoder call (the CPU default), and several right-padded rows per call."""
    model = build_tiny_model(len(tiny_tokenizer)).train()
    assert can_share_prompt(model)
    _assert_same(model, _batch(tiny_tokenizer), chunk_size, pairs_per_call=pairs_per_call)


def test_shared_prompt_equals_plain_eager_attention(tiny_tokenizer):
    model = build_tiny_model(len(tiny_tokenizer)).train()
    model.set_attn_implementation("eager")
    assert model.config._attn_implementation == "eager"
    _assert_same(model, _batch(tiny_tokenizer), 1024, pairs_per_call=3)


def test_shared_prompt_equals_plain_truncated(tiny_tokenizer):
    """max_length cuts prompts and completions (one chosen loses its EOS)."""
    batch = _batch(tiny_tokenizer, max_length=24)
    assert batch["attention_mask"].sum(1).max() == 24
    _assert_same(build_tiny_model(len(tiny_tokenizer)).train(), batch, 1024)


def test_shared_prompt_equals_plain_lora(tiny_tokenizer):
    """PEFT-wrapped model; B is randomised (it starts at 0) so the adapters change the forward pass and both
    LoRA matrices get gradients."""
    cfg = SimpleNamespace(lora_r=4, lora_alpha=8, lora_dropout=0.0, lora_target_modules=["q_proj", "v_proj"])
    model = apply_lora(build_tiny_model(len(tiny_tokenizer)), cfg).train()
    torch.manual_seed(1)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "lora_B" in name:
                p.normal_(0, 0.1)
    assert can_share_prompt(model)
    batch = _batch(tiny_tokenizer)
    _assert_same(model, batch, 1024)
    with model.disable_adapter(), torch.no_grad():  # the adapter-disabled reference path, too
        torch.testing.assert_close(
            shared_prompt_logprobs(model, batch).sum, _plain(model, batch, 1024).sum, atol=TOL, rtol=0
        )


def test_falls_back_to_plain_when_rows_do_not_pair(tiny_tokenizer):
    model = build_tiny_model(len(tiny_tokenizer))
    encoded = [encode_pair(tiny_tokenizer, *p, max_length=256) for p in PAIRS[:2]]
    batch = collate_pairs(encoded, tiny_tokenizer.pad_token_id)
    batch["input_ids"][2, 0] += 1  # pair 0's rows no longer share the prompt
    with torch.no_grad():
        torch.testing.assert_close(shared_prompt_logprobs(model, batch).sum, _plain(model, batch, 1024).sum)


# ---------------------------------------------------------------------------------------------
# The DPO stage with share_prompt on and off
# ---------------------------------------------------------------------------------------------


def _dpo_losses(tmp_path, monkeypatch, name, model_dir, data, *extra):
    out = tmp_path / name
    # A cache per run, so each run computes its reference log-probs on its own path.
    monkeypatch.setenv("ALIGNKIT_CACHE", str(tmp_path / f"cache-{name}"))
    args = [
        "dpo",
        f"model={model_dir}",
        f"train_data={data}",
        f"output_dir={out}",
        "batch_size=4",
        "micro_batch_size=2",
        "max_steps=4",
        "learning_rate=5e-3",
        "lr_scheduler=constant",
        "progress=false",
        "tensorboard=false",
        "dtype=float32",  # the two paths are compared at fp32 resolution, on any CPU
        *extra,
    ]
    # The stage initialises LoRA's A matrices from the global RNG before the loop seeds it, so two runs in one
    # process start from different adapters unless the RNG is reset first.
    torch.manual_seed(0)
    assert main(args) == 0
    rows = [json.loads(x) for x in (out / "metrics.jsonl").read_text().splitlines()]
    return [r["loss"] for r in rows if "loss" in r and "event" not in r]


@pytest.mark.parametrize(
    "extra",
    [("reference=precomputed",), ("lora=true", "lora_r=4", "reference=adapter", "learning_rate=1e-2")],
    ids=["full-precomputed", "lora-adapter"],
)
def test_dpo_share_prompt_on_and_off_give_the_same_losses(tiny_model_dir, tmp_path, monkeypatch, extra):
    """Step 1 is ln 2 (policy = reference) on both; the later steps follow updates made from the two paths'
    gradients, so equal losses there mean equal gradients too."""
    rows = [{"prompt": p, "chosen": c, "rejected": r} for p, c, r in PAIRS] * 3
    data = tmp_path / "pairs.jsonl"
    data.write_text("".join(json.dumps(r) + "\n" for r in rows))
    on = _dpo_losses(tmp_path, monkeypatch, "on", tiny_model_dir, data, "share_prompt=true", *extra)
    off = _dpo_losses(tmp_path, monkeypatch, "off", tiny_model_dir, data, "share_prompt=false", *extra)
    assert len(on) == len(off) == 4
    assert on[0] == pytest.approx(math.log(2), abs=1e-6)
    assert abs(on[-1] - on[0]) > 1e-3  # the weights moved, so the comparison below covers updated weights
    assert on == pytest.approx(off, abs=1e-5)
