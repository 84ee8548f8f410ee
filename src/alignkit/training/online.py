"""Bookkeeping of the stages that train on their own samples, iteration by iteration (ppo, online-dpo): seeds
and prompts that depend only on (seed, iteration), so a resumed run redoes exactly what the interrupted one did;
the samples file; and one optimizer step accumulated over micro-batches and ranks (clip, skip a non-finite step,
advance the schedule). The loop that uses them is ``training.online_engine``.
"""

from __future__ import annotations

import contextlib
import json
import math
import sys
from collections.abc import Callable
from pathlib import Path

import numpy as np
import torch

from alignkit.data.schemas import PromptExample, load_prompts
from alignkit.models.generation import Generation, generate_share
from alignkit.models.precision import in_training_precision
from alignkit.training import distributed

DEFAULT_PROMPTS = Path(__file__).resolve().parents[1] / "assets" / "prompts.jsonl"


def training_prompts(cfg) -> tuple[list[PromptExample], int]:
    """The prompt rows of ``cfg.train_data`` (the built-in set when None; each its prompt and its other
    columns), with the row selection and bad-row policy of the config, and how many rows were skipped; an error
    when no prompt is left."""
    loaded = load_prompts(
        cfg.train_data or str(DEFAULT_PROMPTS),
        cfg.on_bad_row,
        split=cfg.train_split,
        rows=cfg.train_rows,
        limit=cfg.train_max_rows,
        columns=cfg.columns,
    )
    print(f"prompts: {loaded.summary()}", file=sys.stderr)
    loaded.require_rows("train_data")
    return loaded.examples, len(loaded.skipped)


def note_idle_processes(cfg, n_samples: int, per: str, samples_doc: str) -> None:
    """Tell the user (the main process, once) when ``n_samples`` samples per ``per`` cut into generation
    batches of ``cfg.generation_batch_size`` leave some of the processes nothing to sample (hf backend)."""
    world = distributed.world_size()
    n_batches = math.ceil(n_samples / cfg.generation_batch_size)
    if distributed.is_main_process() and cfg.generation_backend == "hf" and n_batches < world:
        print(
            f"note: {world} processes share {n_batches} generation batch(es) per {per}, so {world - n_batches} "
            f"sample nothing; generation_batch_size <= {samples_doc} / {world} lets every process sample",
            file=sys.stderr,
        )


@in_training_precision
def sample_share(
    cfg,
    policy,
    tokenizer,
    prompt_ids: list[list[int]],
    sampling,
    rank: int,
    world: int,
    engine=None,
    push=False,
) -> dict[int, Generation]:
    """This process's samples of an iteration, one per prompt of ``prompt_ids``, keyed by position there.

    With a vLLM ``engine`` (one process) all of them, the engine first taking the policy's weights when ``push``.
    Otherwise transformers' generate on this rank's share of the generation batches (``generate_share``): under
    FSDP on the policy's weights gathered whole (``distributed.whole_weights``), so each process samples at its
    own pace, or with fsdp_generation=shards on the shards, every process stepping together."""
    if engine is not None:
        if push:
            engine.update_weights(policy)
        return dict(enumerate(engine(prompt_ids, sampling)))
    on_shards = cfg.fsdp_generation == "shards" and distributed.is_sharded(policy)
    with contextlib.nullcontext() if on_shards else distributed.whole_weights(policy):
        return generate_share(
            policy,
            tokenizer,
            prompt_ids,
            sampling,
            cfg.generation_batch_size,
            rank,
            world,
            synced=on_shards,
            share_prompts=cfg.share_prompt_cache,
        )


def derived_seed(*parts: int) -> int:
    """A 31-bit seed from (run seed, iteration, purpose): numpy's SeedSequence mixes them, so neighbouring
    iterations draw unrelated streams and a resumed run draws exactly what the uninterrupted one did."""
    return int(np.random.SeedSequence([int(p) for p in parts]).generate_state(1)[0]) & 0x7FFFFFFF


def iteration_prompts(n_prompts: int, per_iteration: int, iteration: int, seed: int) -> list[int]:
    """Prompt indices of an iteration: the next slice of a stream of seeded permutations (one per pass over
    the prompts), so every prompt is used once per pass and the order depends only on (seed, iteration)."""
    order: dict[int, list[int]] = {}
    indices = []
    for k in range(iteration * per_iteration, (iteration + 1) * per_iteration):
        epoch, position = divmod(k, n_prompts)
        if epoch not in order:
            generator = torch.Generator().manual_seed(derived_seed(seed, epoch, 2))
            order[epoch] = torch.randperm(n_prompts, generator=generator).tolist()
        indices.append(order[epoch][position])
    return indices


def truncate_jsonl(path: Path, step: int) -> None:
    """Drop rows with "step" > ``step`` from a JSONL file (on resume, so each iteration's samples appear once)."""
    if path.exists():
        lines = path.read_text(encoding="utf-8").splitlines(keepends=True)
        kept = [line for line in lines if line.endswith("\n") and json.loads(line)["step"] <= step]
        path.write_text("".join(kept), encoding="utf-8")


def accumulated_step(
    cfg,
    stepper: torch.nn.Module,
    rows: list[int],
    micro_loss: Callable[[list[int]], tuple[torch.Tensor, dict]],
    optimizer,
    scheduler,
    params,
    rank: int = 0,
    world: int = 1,
) -> dict:
    """One optimizer step on a minibatch of ``rows`` (in the order micro-batches are cut from it), accumulated
    over this rank's micro-batches of cfg.micro_batch_size (``distributed.rank_microbatches``), the gradients
    synced across the ranks in the last one only; clipped to cfg.max_grad_norm. ``micro_loss(share) -> (loss,
    metrics)`` runs the forward of the micro-batch ``share`` (positions in the minibatch) through ``stepper``
    (the module DDP wraps), its loss and metrics already weighted by its share of the whole minibatch (the
    method's own normalisation: PPO's tokens, online DPO's pairs); "loss" among the metrics. The loss is
    multiplied here by the number of ranks (DDP averages the gradients over them), so that the gradients
    summed over micro-batches and ranks are those of one pass over the minibatch in one process, not a mean of
    per-rank means. An empty share (fewer rows left than ranks) runs a stand-in (the minibatch's first row)
    weighted 0 that counts for nothing: DDP needs every rank's backward to sync the gradients. Returns the
    minibatch's metrics and ``optimizer_step``'s."""
    shares = distributed.rank_microbatches(rows, cfg.micro_batch_size, rank, world)
    sums: dict[str, float] = {}
    for j, share in enumerate(shares):
        with distributed.gradient_sync(stepper, last=j == len(shares) - 1):
            loss, part = micro_loss(share or [0])
            (loss * (world if share else 0)).backward()
        for key, value in part.items():
            sums[key] = sums.get(key, 0.0) + (float(value) if share else 0.0)
    sums = dict(zip(sums, distributed.all_reduce(list(sums.values()))))  # each rank holds its rows' part
    return {**sums, **optimizer_step(optimizer, scheduler, params, cfg.max_grad_norm, sums["loss"])}


def optimizer_step(optimizer, scheduler, params, max_grad_norm: float | None, loss: float) -> dict:
    """Clip the accumulated gradients (``max_grad_norm``; None: no clipping) and step, unless the loss or the
    gradient norm is not finite: that update is skipped, and the schedule advances anyway (as in the shared
    loop). Returns {"grad_norm", "lr" (the rate this step used), "nonfinite" (1.0 when skipped)}."""
    max_norm = max_grad_norm if max_grad_norm is not None else math.inf
    grad_norm = distributed.as_float(torch.nn.utils.clip_grad_norm_(params, max_norm))  # whole under FSDP
    finite = math.isfinite(loss) and math.isfinite(grad_norm)
    lr = optimizer.param_groups[0]["lr"]
    if finite:
        optimizer.step()
    scheduler.step()
    optimizer.zero_grad(set_to_none=True)
    return {"grad_norm": grad_norm, "lr": lr, "nonfinite": float(not finite)}
