"""The reference abstraction (training.reference) and the reference log-prob cache (models.reference_cache):
named log-probs in and out, never a column number; an old or foreign cache file is recomputed, not misread."""

from __future__ import annotations

import contextlib

import pytest
import torch
from safetensors import safe_open
from safetensors.torch import save_file

from alignkit.models import reference_cache
from alignkit.training.preference import PairLogprobs
from alignkit.training.reference import PRECOMPUTED, Reference, apply, load_reference, stack, unstack

NAMES = ["chosen_sum", "rejected_sum", "chosen_mean", "rejected_mean"]


def _pairs(n: int) -> PairLogprobs:
    """Pair i: sums -(i+1) and -(i+2), means a tenth of them: every value tells its field and row apart."""
    base = torch.arange(n, dtype=torch.float32)
    return PairLogprobs(-(base + 1), -(base + 2), -(base + 1) / 10, -(base + 2) / 10)


def test_stack_and_unstack_are_inverse_and_keep_names():
    batch = _pairs(3)
    rows = unstack(batch)
    assert len(rows) == 3 and rows[1].rejected_sum.item() == -3.0
    assert rows[2].chosen_mean.item() == pytest.approx(-0.3)
    again = stack(rows)
    assert all(torch.equal(getattr(again, n), getattr(batch, n)) for n in NAMES)
    assert apply(batch, lambda t: t * 2).chosen_sum.tolist() == [-2.0, -4.0, -6.0]


def test_cache_stores_named_tensors_and_reads_them_back():
    """A saved entry is a safetensors file of exactly the four named (N,) tensors; NaN rows (not computed yet)
    come back NaN."""
    values = _pairs(4)
    values.chosen_sum[2] = float("nan")
    reference_cache.save("k1", values)
    with safe_open(str(reference_cache._path("k1")), "pt") as f:
        assert sorted(f.keys()) == sorted(NAMES)
    loaded = reference_cache.load("k1", PairLogprobs, 4)
    assert loaded.rejected_sum.tolist() == [-2.0, -3.0, -4.0, -5.0]
    assert torch.isnan(loaded.chosen_sum[2]) and loaded.chosen_sum[3].item() == -4.0


@pytest.mark.parametrize(
    "stored",
    [
        {"values": torch.ones(4, 4)},  # the old layout: one unnamed (N, 4) tensor read by column
        {n: torch.ones(4) for n in NAMES[:3]},  # a field missing
        {n: torch.ones(5) for n in NAMES},  # another number of rows
    ],
)
def test_a_cache_file_of_another_layout_counts_as_not_cached(stored):
    path = reference_cache._path("k2")
    path.parent.mkdir(parents=True, exist_ok=True)
    save_file(stored, str(path))
    loaded = reference_cache.load("k2", PairLogprobs, 4)
    assert all(torch.isnan(getattr(loaded, n)).all() for n in NAMES)


class _Policy(torch.nn.Module):
    """A policy whose log-probs say which model ran: 1 with adapters on, 0 with them off (the LoRA base)."""

    def __init__(self):
        super().__init__()
        self.adapters = True

    @contextlib.contextmanager
    def disable_adapter(self):
        self.adapters = False
        try:
            yield
        finally:
            self.adapters = True


def _compute(model, batch) -> PairLogprobs:
    value = torch.full((2,), float(getattr(model, "adapters", 7)), requires_grad=True) * 1.0
    return PairLogprobs(value, value, value, value)


def test_each_way_of_holding_the_reference():
    """precomputed: the batch's record (no model runs); adapter: the policy with adapters off, on again after;
    copy: the frozen copy. Model passes run without a graph."""
    policy, batch = _Policy(), {"input_ids": torch.zeros(4, 3, dtype=torch.long)}
    pre = PRECOMPUTED.logprobs(policy, {**batch, "ref": _pairs(2)}, _compute)
    assert pre.rejected_sum.tolist() == [-2.0, -3.0]
    adapter = Reference("adapter").logprobs(policy, batch, _compute)
    assert adapter.chosen_sum.tolist() == [0.0, 0.0] and not adapter.chosen_sum.requires_grad
    assert policy.adapters
    copy = load_reference("copy", torch.nn.Identity)
    assert copy.logprobs(policy, batch, _compute).chosen_sum.tolist() == [7.0, 7.0]
    with pytest.raises(RuntimeError, match="'precomputed' reference has no model"):
        PRECOMPUTED.logprobs(policy, batch, _compute)


def test_adapter_reference_leaves_every_trained_adapter_trainable(tiny_model_dir):
    """PPO's LoRA policy trains two adapters: its own and the value model's. PEFT's disable_adapter re-freezes
    every adapter but the active one on the way out; the adapter reference gives back all that was trainable
    (else the value adapter would silently stop training after the first rollout)."""
    from alignkit.config import LoRAFields
    from alignkit.models.loading import apply_lora, load_model
    from alignkit.models.value import add_value_adapter

    policy = apply_lora(load_model(str(tiny_model_dir), "float32"), LoRAFields())
    add_value_adapter(policy)

    def trainable() -> set[str]:
        return {name for name, p in policy.named_parameters() if p.requires_grad}

    before = trainable()
    assert any(".value." in name for name in before) and any(".default." in name for name in before)
    with Reference("adapter").model(policy) as model:
        assert model is policy and not torch.is_grad_enabled()
    assert trainable() == before
    with policy.disable_adapter():  # PEFT alone: the value adapter comes out frozen
        pass
    assert trainable() == {name for name in before if ".value." not in name}
