"""`alignkit sft`: supervised fine-tuning on demonstrations (stage 1 of the InstructGPT pipeline).

The loss is the mean negative log-likelihood of the completion tokens of the global batch; prompt tokens
are never in the loss. Full fine-tuning or LoRA; the run folder holds config.yaml, metrics.jsonl,
summary.json and final/ (a model `AutoModelForCausalLM.from_pretrained` loads).
"""

from __future__ import annotations

import contextlib
import sys
import time
from dataclasses import dataclass
from functools import partial

import torch

from alignkit.config import TrainConfig, doc_field
from alignkit.data.collate import collate_sft
from alignkit.data.schemas import load_sft
from alignkit.data.tokenize import encode
from alignkit.evaluation.monitors import default_monitors
from alignkit.models.forward import sequence_logprobs
from alignkit.models.loading import (
    apply_lora,
    count_parameters,
    load_model,
    load_tokenizer,
    pick_device,
    save_final,
)
from alignkit.models.precision import TrainPrecision, of_config, weights_dtype
from alignkit.stages import Stage
from alignkit.training import distributed
from alignkit.training.loop import StepOutput, train
from alignkit.training.run import RunDir
from alignkit.training.sample_watch import SampleWatch, SampleWatchFields


@dataclass
class SFTConfig(SampleWatchFields, TrainConfig):
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
    model, encoded: list, pad_id: int, batch_size: int, chunk_size: int, prec: TrainPrecision | None = None
) -> float:
    """Mean NLL per completion token over `encoded` (teacher forcing), in the run's precision ``prec``."""
    was_training = model.training
    model.eval()
    device = next(model.parameters()).device
    total, count = 0.0, 0
    with prec.autocast() if prec is not None else contextlib.nullcontext():
        for start in range(0, len(encoded), batch_size):
            batch = collate_sft(encoded[start : start + batch_size], pad_id)
            ids, attn, mask = (batch[k].to(device) for k in ("input_ids", "attention_mask", "loss_mask"))
            total -= sequence_logprobs(model, ids, attn, mask, chunk_size).sum.sum().item()
            count += batch["n_items"]
    model.train(was_training)
    return total / max(count, 1)


def run(cfg: SFTConfig) -> dict:
    started = time.time()
    # The folder is checked, locked for this run and released however it ends (RunDir.create).
    with RunDir.create(cfg.output_dir, "sft", cfg.resume_from, cfg=cfg) as run_dir:
        return _run(cfg, run_dir, started)


def _run(cfg: SFTConfig, run_dir: RunDir, started: float) -> dict:
    print(f"run folder: {run_dir.path}", file=sys.stderr)

    # 1. Data: validate rows, then tokenize with the model's chat template (loss on completions only).
    tokenizer = load_tokenizer(cfg.model, cfg.trust_remote_code)
    train_rows = load_sft(
        cfg.train_data, cfg.on_bad_row, split=cfg.train_split, rows=cfg.train_rows, limit=cfg.train_max_rows
    ).require_rows("train_data")
    print(f"train data: {train_rows.summary()}", file=sys.stderr)
    enc = partial(encode, tokenizer, max_length=cfg.max_length, max_prompt_length=cfg.max_prompt_length)
    train_encoded = [enc(ex.prompt, ex.completion) for ex in train_rows.examples]
    eval_encoded = []
    if cfg.eval_data:
        eval_rows = load_sft(
            cfg.eval_data, cfg.on_bad_row, split=cfg.eval_split, rows=cfg.eval_rows, limit=cfg.eval_max_rows
        ).require_rows("eval_data")
        print(f"eval data: {eval_rows.summary()}", file=sys.stderr)
        eval_encoded = [enc(ex.prompt, ex.completion) for ex in eval_rows.examples]
    n_truncated = sum(e.truncated for e in train_encoded)
    if n_truncated:
        print(
            f"truncated {n_truncated} of {len(train_encoded)} training rows to max_length={cfg.max_length}",
            file=sys.stderr,
        )

    # 2. Model: full weights or LoRA adapters on the same base.
    model = load_model(cfg.model, weights_dtype(cfg), cfg.trust_remote_code, pick_device(), distributed.load_on())
    distributed.shard(model, cfg.lora)  # under FSDP: the loss measured before training runs on the shards
    if cfg.lora:
        model = apply_lora(model, cfg)
    trainable, total = count_parameters(model)
    model.train()

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
    watch = SampleWatch.of(cfg, model, tokenizer, [e.prompt_ids for e in eval_encoded or train_encoded])
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
    )

    # 4. Measure, save the final model, write the summary.
    train_loss_after = measure(model, train_encoded) if cfg.measure_train_loss else None
    distributed.save_from_main(
        model,
        lambda state_dict: save_final(
            model, tokenizer, run_dir.final_dir, merge_lora=cfg.merge_lora, state_dict=state_dict
        ),
    )
    summary = {
        "stage": "sft",
        "model": cfg.model,
        "run_dir": str(run_dir.path),
        "final_model": str(run_dir.final_dir),
        "steps": result.steps,
        "train_rows": train_rows.n_rows,
        "train_examples": len(train_encoded),
        "skipped_rows": len(train_rows.skipped),
        "truncated_rows": n_truncated,
        "trainable_parameters": trainable,
        "total_parameters": total,
        "train_loss_before": train_loss_before,
        "train_loss_after": train_loss_after,
        "final_metrics": result.metrics,
        "train_seconds": result.elapsed_s,
        "wall_seconds": time.time() - started,
        "peak_rss_mb": result.peak_rss_mb,
        "monitor_events": [e.to_row() for e in monitors.events],
    }
    if eval_encoded:
        summary["eval_loss_before"] = eval_loss_before
        summary["eval_loss"] = measure(model, eval_encoded)
    run_dir.write_summary(summary)
    return summary


STAGE = Stage("sft", SFTConfig, run)
