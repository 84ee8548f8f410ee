"""The reference model of a preference objective (DPO, IPO, KTO, online DPO), however it is held, and the small
named-tensor records its log-probs travel in.

Three ways to hold it, one interface (``Reference``): log-probs precomputed once before training (they ride in
each batch as ``batch["ref"]``, so no second model stays in memory); the policy's LoRA base with the adapters
disabled; or a frozen copy. Each objective names its log-probs in a dataclass of (B,) tensors
(``training.preference.PairLogprobs``, ``stages.kto.KTOLogprobs``): ``stack``/``unstack`` turn a list of
per-example records into a batch's and back, ``apply`` maps every tensor.
"""

from __future__ import annotations

import contextlib
import dataclasses
import sys
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from typing import Any, Literal, TypeVar

import torch

from alignkit.data.collate import length_sorted_batches
from alignkit.models import reference_cache
from alignkit.models.precision import autocast_for
from alignkit.models.value import keep_trainable
from alignkit.training import distributed

T = TypeVar("T")  # a dataclass whose every field is a tensor

ReferenceMode = Literal["precomputed", "adapter", "copy", "none"]


def apply(record: T, fn: Callable[[torch.Tensor], torch.Tensor]) -> T:
    """``record`` with ``fn`` applied to each of its tensors (``.to(device)``, ``.float()``, a slice)."""
    return type(record)(**{f.name: fn(getattr(record, f.name)) for f in dataclasses.fields(record)})


def stack(records: list[T]) -> T:
    """Per-example records of 0-dim tensors -> one record of (B,) tensors."""
    names = [f.name for f in dataclasses.fields(records[0])]
    return type(records[0])(**{n: torch.stack([getattr(r, n) for r in records]) for n in names})


def unstack(record: T) -> list[T]:
    """A record of (B,) tensors -> B per-example records of 0-dim tensors (``stack``'s inverse)."""
    n = len(getattr(record, dataclasses.fields(record)[0].name))
    return [apply(record, lambda t, i=i: t[i]) for i in range(n)]


@dataclass(frozen=True)
class Reference:
    """The frozen model the policy is measured against. ``mode``: "precomputed" (the batches carry the log-probs
    as ``batch["ref"]``), "adapter" (the policy with its LoRA adapters disabled), "copy" (``copy``, a frozen
    model) or "none" (an objective without one: ORPO)."""

    mode: ReferenceMode
    copy: torch.nn.Module | None = None  # the frozen copy, mode "copy" only

    @contextlib.contextmanager
    def model(self, policy: torch.nn.Module) -> Iterator[torch.nn.Module]:
        """Inside: the reference as a model, under no_grad. The LoRA base is the policy's own weights, so the
        adapters are disabled only inside; what was trainable is trainable again after (PEFT re-freezes every
        adapter but the active one: PPO's value adapter would stop training)."""
        if self.mode not in ("adapter", "copy"):
            raise RuntimeError(f"a '{self.mode}' reference has no model to run (a batch without batch['ref']?)")
        with torch.no_grad():
            if self.copy is not None:
                yield self.copy
            else:
                with keep_trainable(policy), policy.disable_adapter():
                    yield policy

    def logprobs(self, policy: torch.nn.Module, batch: dict, compute: Callable[[Any, dict], T]) -> T:
        """The reference's ``compute(model, batch)``: the batch's precomputed ``batch["ref"]`` (moved to the
        batch's device) when it carries them, else computed on the reference model."""
        if "ref" in batch:
            return apply(batch["ref"], lambda t: t.to(batch["input_ids"].device))
        with self.model(policy) as model:
            return compute(model, batch)


PRECOMPUTED = Reference("precomputed")


def load_reference(mode: ReferenceMode, load: Callable[[], torch.nn.Module]) -> Reference:
    """The Reference for ``mode``; for "copy", ``load()``'s model frozen (eval, no grad) and, under FSDP,
    sharded like the policy."""
    if mode != "copy":
        return Reference(mode)
    copy = load().eval()
    copy.requires_grad_(False)
    distributed.shard(copy)
    return Reference("copy", copy)


def reference_mode(setting: str, needs_reference: bool = True) -> ReferenceMode:
    """A config's ``reference`` setting resolved: "auto" is "precomputed"; "none" for an objective without one."""
    if not needs_reference:
        return "none"
    return "precomputed" if setting == "auto" else setting  # type: ignore[return-value]


def precompute(cfg, model, examples: list, lengths: list[int], collate, compute, desc: str, indices=None) -> None:
    """Set ``ex.ref`` to the (frozen, initial) ``model``'s ``compute(model, batch)`` for the ``examples`` at
    ``indices`` (default all), once, before any update (``precomputed_rows``)."""
    for i, row in precomputed_rows(cfg, model, examples, lengths, collate, compute, desc, indices):
        examples[i].ref = row


def precompute_tensors(
    cfg,
    model,
    examples,
    needed,
    lengths: list[int],
    collate,
    compute,
    record: type[T],
    desc: str,
    key: str | None = None,
) -> T:
    """A ``record`` of (N,) float32 tensors, N = len(examples), holding the (frozen, initial) ``model``'s
    ``compute`` rows for the examples at ``needed`` (NaN on the others): the rows stay N-long tensors, never
    one object per example. With ``key``, the rows the on-disk cache (``models.reference_cache``) holds are
    read from it, and those computed are saved there."""
    values = (
        reference_cache.load(key, record, len(examples))
        if key
        else reference_cache.empty(record, len(examples))
    )
    unknown = torch.stack([t.isnan() for t in vars(values).values()]).any(0)  # (N,)
    missing = [i for i in needed if unknown[i]]
    if not missing:
        print(f"{desc}: {len(list(needed))} rows from the cache", file=sys.stderr)
        return values
    rows = precomputed_rows(
        cfg, model, examples, lengths, collate, compute, f"{desc} ({len(missing)} rows)", missing
    )
    for i, row in rows:
        for name, value in vars(row).items():
            getattr(values, name)[i] = value
    if key:
        reference_cache.save(key, values)
    return values


def precomputed_rows(cfg, model, examples, lengths: list[int], collate, compute, desc: str, indices=None):
    """(index, row) for each of the ``examples`` at ``indices`` (default all): its row of the (frozen, initial)
    ``model``'s ``compute(model, batch)``, on the CPU in float32; length-sorted batches of
    ``cfg.eval_batch_size``, ``collate(list of examples) -> batch``. A generator, so examples read lazily (an
    Arrow-backed dataset) need no object kept to carry their rows."""
    from tqdm.auto import tqdm

    was_training = model.training
    model.eval()
    device = next(model.parameters()).device
    batches = length_sorted_batches(lengths, cfg.eval_batch_size, indices)
    try:
        for idx in tqdm(batches, desc=desc, disable=not cfg.progress):
            chunk = [examples[i] for i in idx]
            # The contexts close before each yield: a decorator would leave them open, or closed, while the
            # caller's code runs between two batches.
            with autocast_for(cfg, model), torch.no_grad():
                batch = {k: v.to(device) if torch.is_tensor(v) else v for k, v in collate(chunk).items()}
                rows = unstack(apply(compute(model, batch), lambda t: t.float().cpu()))
            yield from zip(idx, rows)
    finally:
        model.train(was_training)
