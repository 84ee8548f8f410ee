"""`alignkit sft`: supervised fine-tuning on demonstrations (stage 1 of the InstructGPT pipeline).

The loss is the mean negative log-likelihood of the completion tokens of the global batch; prompt tokens
are never in the loss. Full fine-tuning or LoRA; the run folder holds config.yaml, metrics.jsonl,
summary.json and final/ (a model `AutoModelForCausalLM.from_pretrained` loads).
"""

from __future__ import annotations

import contextlib
import sys
import time
from collections.abc import Iterable
from dataclasses import dataclass
from functools import partial
from itertools import islice

import torch

from alignkit.config import PreparedDataFields, SnapshotFields, TrainConfig, doc_field
from alignkit.data.collate import collate_sft
from alignkit.data.tokenize import Encoded
from alignkit.evaluation.monitors import default_monitors
from alignkit.models.forward import sequence_logprobs
from alignkit.models.loading import load_tokenizer
from alignkit.models.precision import TrainPrecision, of_config
from alignkit.stages import Stage
from alignkit.training import distributed, offline, snapshots
from alignkit.training.loop import StepOutput, train
from alignkit.training.run import RunDir
from alignkit.training.sample_watch import SampleWatch, SampleWatchFields


@dataclass
class SFTConfig(PreparedDataFields, SampleWatchFields, SnapshotFields, TrainConfig):
    """Supervised fine-tuning. Data: prompt/completion columns, or a `messages` list."""

    learning_rate: float = doc_field(2e-5, "Peak AdamW learning rate.")
    eval_batch_size: int = doc_field(8, "Sequences per forward pass when measuring loss.", ge=1)
    measure_train_loss: bool = doc_field(
        True, "Measure the loss on the whole training set before and after training (held-in loss)."
    )


def sft_step(model, batch: dict, chunk_size: int) -> StepOutput:
    """Summed completion-token NLL of a micro-batch; the loop divides by the batch's completion tokens."""
    logps = sequence_logprobs(
        model, batch["input_ids"], batch["attention_mask"], batch["loss_mask"], chunk_size
    )
    nll_sum = -logps.sum.sum()
    return StepOutput(loss_sum=nll_sum, metrics={"nll": nll_sum.item()})


@torch.no_grad()
def mean_nll(
    model,
    encoded: Iterable[Encoded],
    pad_id: int,
    batch_size: int,
    chunk_size: int,
    prec: TrainPrecision | None = None,
) -> float:
    """Mean NLL per completion token over `encoded` (teacher forcing, read in order a batch at a time), in the
    run's precision ``prec``."""
    was_training = model.training
    model.eval()
    device = next(model.parameters()).device
    total, count = 0.0, 0
    with prec.autocast() if prec is not None else contextlib.nullcontext():
        rows = iter(encoded)
        while chunk := list(islice(rows, batch_size)):
            batch = collate_sft(chunk, pad_id)
            ids, attn, mask = (batch[k].to(device) for k in ("input_ids", "attention_mask", "loss_mask"))
            total -= sequence_logprobs(model, ids, attn, mask, chunk_size).sum.sum().item()
            count += batch["n_items"]
    model.train(was_training)
    return total / max(count, 1)


def load_demonstrations(cfg: SFTConfig, tokenizer, source: str, split, rows, limit, what: str):
    """(the loader's Loaded, its rows tokenized with the model's chat template, loss on completions only):
    prepared once into Arrow files under the cache (``data.prepared``), read lazily as ``EncodedRows``."""
    loaded = offline.prepare_data(cfg, tokenizer, "sft", source, split, rows, limit, what)
    print(f"{what} data: {loaded.summary()}", file=sys.stderr)
    return loaded, loaded.examples


def run(cfg: SFTConfig) -> dict:
    return offline.run_in_folder(cfg, "sft", _run)


def _run(cfg: SFTConfig, run_dir: RunDir, started: float) -> dict:
    # 1. Data: validate rows, then tokenize with the model's chat template (loss on completions only).
    tokenizer = load_tokenizer(cfg.model, cfg.trust_remote_code)
    load = partial(load_demonstrations, cfg, tokenizer)
    (train_rows, train_encoded), held_out = offline.load_data(cfg, load)
    eval_encoded = held_out[1] if held_out else []
    n_truncated = train_encoded.n_truncated()
    if n_truncated:
        print(
            f"truncated {n_truncated} of {len(train_encoded)} training rows to max_length={cfg.max_length}",
            file=sys.stderr,
        )

    # 2. Model: full weights or LoRA adapters on the same base.
    model = offline.load_policy(cfg)
    distributed.shard(model, cfg.lora)  # under FSDP: the loss measured before training runs on the shards
    model, sizes = offline.make_trainable(model, cfg)

    pad_id = tokenizer.pad_token_id
    measure = partial(
        mean_nll,
        pad_id=pad_id,
        batch_size=cfg.eval_batch_size,
        chunk_size=cfg.logprob_chunk_size,
        prec=of_config(cfg),
    )
    fresh = not cfg.resume_from
    train_loss_before = measure(model, train_encoded) if cfg.measure_train_loss and fresh else None
    eval_loss_before = measure(model, eval_encoded) if eval_encoded and fresh else None

    # 3. Train with the shared loop, watched by the failure monitors.
    prompt_ids = (e.prompt_ids for e in eval_encoded or train_encoded)  # read up to sample_prompts
    watch = SampleWatch.of(cfg, model, tokenizer, prompt_ids)
    monitors = default_monitors("sft", samples=watch is not None)
    result = train(
        cfg,
        model,
        train_encoded,
        collate_fn=partial(collate_sft, pad_id=pad_id),
        step_fn=partial(sft_step, chunk_size=cfg.logprob_chunk_size),
        run=run_dir,
        monitors=monitors,
        eval_fn=(lambda m: {"loss": measure(m, eval_encoded)}) if eval_encoded else None,
        sample_fn=watch,
        snapshot=snapshots.writer(cfg, model, tokenizer, run_dir.path),
    )

    # 4. Measure, save the final model, write the summary.
    train_loss_after = measure(model, train_encoded) if cfg.measure_train_loss else None
    offline.save_policy(model, tokenizer, run_dir, cfg)
    summary = {
        **offline.summary_head("sft", cfg, run_dir, result),
        "train_rows": train_rows.n_rows,
        "train_examples": len(train_encoded),
        "skipped_rows": len(train_rows.skipped),
        "truncated_rows": n_truncated,
        **sizes,
        "train_loss_before": train_loss_before,
        "train_loss_after": train_loss_after,
        "final_metrics": result.metrics,
        "train_seconds": result.elapsed_s,
        "wall_seconds": time.time() - started,
        "peak_rss_mb": result.peak_rss_mb,
        "model_state_bytes": result.model_state_bytes,
        "monitor_events": [e.to_row() for e in monitors.events],
    }
    if eval_encoded:
        summary["eval_loss_before"] = eval_loss_before
        summary["eval_loss"] = measure(model, eval_encoded)
    run_dir.write_summary(summary)
    return summary


STAGE = Stage("sft", SFTConfig, run)
