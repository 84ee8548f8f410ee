"""Sampling: the shared prompt prefill (models.generation.shared_prompt_cache) gives the samples the plain
prefill gives, on the same seed, and runs the model once per distinct prompt."""

from __future__ import annotations

import pytest
import torch

from alignkit.models.generation import SamplingConfig, generate, sample_batch, shared_prompt_cache
from alignkit.models.loading import load_model


@pytest.fixture(scope="module")
def tiny(tiny_model_dir, tiny_tokenizer):
    return load_model(str(tiny_model_dir), "float32"), tiny_tokenizer


def _prompts(tokenizer) -> list[list[int]]:
    texts = [
        "what is the capital of france?",
        "the quick brown fox",
        "a short poem about the sea and the sky",
    ]
    return [tokenizer.encode(t) for t in texts]


@pytest.mark.parametrize("temperature", [0.0, 1.0])
def test_shared_prefill_gives_the_plain_samples(tiny, temperature):
    model, tok = tiny
    groups = [p for p in _prompts(tok) for _ in range(4)]  # 3 prompts x 4 samples, of different lengths
    sampling = SamplingConfig(max_new_tokens=12, temperature=temperature)
    shared = sample_batch(model, tok, groups, sampling, seed=7, share_prompts=True)
    plain = sample_batch(model, tok, groups, sampling, seed=7, share_prompts=False)
    assert [g.response_ids for g in shared] == [g.response_ids for g in plain]
    if temperature:  # sampling differs between a group's rows: the copied cache rows are independent
        assert len({tuple(g.response_ids) for g in shared[:4]}) > 1


def test_shared_prefill_through_the_root_model_as_fsdp_needs(tiny, monkeypatch):
    """A sharded (FSDP2) model runs forwards from its root only: there the prefill goes through the whole model
    with logits of one position kept, and the samples are still the plain path's."""
    from alignkit.training import distributed

    model, tok = tiny
    monkeypatch.setattr(distributed, "is_sharded", lambda m: True)
    decoder = model.get_decoder()
    calls = []
    handle = decoder.register_forward_pre_hook(lambda *a: calls.append("decoder"))
    root = model.register_forward_pre_hook(lambda *a, **k: calls.append("root"), with_kwargs=True)
    try:
        groups = [p for p in _prompts(tok) for _ in range(3)]
        sampling = SamplingConfig(max_new_tokens=8, temperature=1.0)
        shared = sample_batch(model, tok, groups, sampling, seed=3, share_prompts=True)
    finally:
        handle.remove()
        root.remove()
    assert calls[:2] == ["root", "decoder"]  # the prefill entered through the root
    plain = sample_batch(model, tok, groups, sampling, seed=3, share_prompts=False)
    assert [g.response_ids for g in shared] == [g.response_ids for g in plain]


def test_shared_cache_holds_each_rows_prompt(tiny):
    """The copied cache equals each row's own prefill of its prompt but the last token (left padding kept)."""
    model, tok = tiny
    prompts = _prompts(tok)
    rows = [prompts[0], prompts[1], prompts[0], prompts[2], prompts[1]]
    width = max(map(len, rows))
    ids = torch.zeros((len(rows), width), dtype=torch.long)
    attn = torch.zeros_like(ids)
    for r, p in enumerate(rows):
        ids[r, width - len(p) :], attn[r, width - len(p) :] = torch.tensor(p), 1
    cache = shared_prompt_cache(model, ids, attn, rows)
    positions = (attn[:, :-1].cumsum(-1) - 1).clamp(min=0)
    own = model.model(
        input_ids=ids[:, :-1], attention_mask=attn[:, :-1], position_ids=positions, use_cache=True
    )
    for layer, ref in zip(cache.layers, own.past_key_values.layers):
        keep = attn[:, :-1].bool()  # padding positions' keys are masked out anyway
        torch.testing.assert_close(layer.keys.permute(0, 2, 1, 3)[keep], ref.keys.permute(0, 2, 1, 3)[keep])
        torch.testing.assert_close(
            layer.values.permute(0, 2, 1, 3)[keep], ref.values.permute(0, 2, 1, 3)[keep]
        )


def test_prefill_runs_once_per_distinct_prompt(tiny, monkeypatch):
    """The model sees 3 distinct prompts' tokens in the prefill, not 12 rows', then one token per row."""
    model, tok = tiny
    seen: list[tuple[int, int]] = []
    hook = model.model.embed_tokens.register_forward_hook(
        lambda m, args, out: seen.append(tuple(args[0].shape))
    )
    try:
        groups = [p for p in _prompts(tok) for _ in range(4)]
        sample_batch(model, tok, groups, SamplingConfig(max_new_tokens=1, temperature=0), seed=0)
    finally:
        hook.remove()
    width = max(map(len, groups))
    assert seen == [(3, width - 1), (12, 1)]


def test_distinct_prompts_take_the_plain_path(tiny):
    model, tok = tiny
    prompts = _prompts(tok)
    ids = torch.zeros((3, max(map(len, prompts))), dtype=torch.long)
    assert shared_prompt_cache(model, ids, torch.ones_like(ids), prompts) is None
    out = generate(model, tok, prompts, SamplingConfig(max_new_tokens=4, temperature=0), progress=False)
    assert len(out) == 3
