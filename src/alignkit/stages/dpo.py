"""`alignkit dpo | ipo | orpo`: offline preference optimisation on chosen/rejected pairs.

One loop for the three pairwise methods; the loss is picked by `loss` and each is its own pure
function in `alignkit.losses.preference`. Chosen and rejected go through the model in one forward
pass. The reference model (DPO, IPO) is a frozen copy, the same LoRA base with adapters disabled, or
log-probs precomputed once before training so no second model stays in memory; ORPO needs none.
"""

from __future__ import annotations

import sys
from dataclasses import dataclass
from functools import partial
from typing import Literal

import torch

from alignkit.config import (
    ConfigError,
    PairLossFields,
    PreparedDataFields,
    SnapshotFields,
    TrainConfig,
    doc_field,
)
from alignkit.data.collate import collate_pairs, length_sorted_batches, pair_length
from alignkit.data.prepared import EncodedRows
from alignkit.evaluation.monitors import default_monitors
from alignkit.models import reference_cache
from alignkit.models.forward import supports_chunked_head
from alignkit.models.loading import load_tokenizer, resolve_model
from alignkit.models.precision import in_training_precision, of_config
from alignkit.stages import Stage
from alignkit.training import distributed, offline, snapshots
from alignkit.training.loop import StepOutput, train, visited_indices
from alignkit.training.preference import PairExample, PairExamples, PairLogprobs, pair_logprobs, pair_outputs
from alignkit.training.preference import collate_pair_examples as collate
from alignkit.training.reference import (
    Reference,
    load_reference,
    precompute,
    precompute_tensors,
    reference_mode,
)
from alignkit.training.run import RunDir
from alignkit.training.sample_watch import SampleWatch, SampleWatchFields


@dataclass
class DPOConfig(PairLossFields, PreparedDataFields, SampleWatchFields, SnapshotFields, TrainConfig):
    """Pairwise preference optimisation. Data: prompt/chosen/rejected, or HH-RLHF-style transcripts."""

    loss: Literal["dpo", "ipo", "orpo"] = doc_field("dpo", "Which objective: DPO, IPO or ORPO.")
    orpo_lambda: float = doc_field(
        0.1, "ORPO weight of the odds-ratio term next to the chosen NLL (0: the NLL alone).", ge=0
    )
    reference: Literal["auto", "precomputed", "adapter", "copy"] = doc_field(
        "auto",
        "Reference log-probs: precomputed once before training; from the LoRA base with adapters disabled; "
        "or a frozen copy. auto = precomputed.",
    )
    learning_rate: float = doc_field(5e-7, "Peak AdamW learning rate.")
    batch_size: int = doc_field(8, "Pairs per optimizer step.")
    micro_batch_size: int = doc_field(2, "Pairs per forward/backward pass.")
    max_length: int = doc_field(512, "Longest prompt+completion in tokens; longer pairs are truncated.")
    eval_batch_size: int = doc_field(8, "Pairs per forward pass when evaluating or precomputing.", ge=1)

    def check(self) -> None:
        super().check()
        if self.reference == "adapter" and not self.lora and self.loss != "orpo":
            raise ConfigError(
                "config key 'reference' is 'adapter', which needs lora=true (the reference is the base with the "
                "adapters disabled); set lora=true or reference=precomputed",
                ("reference", "lora"),
            )
        if self.loss == "orpo" and self.rpo_alpha:
            raise ConfigError(
                "config key 'rpo_alpha' must be 0 with loss=orpo, got "
                f"{self.rpo_alpha}: ORPO's loss already holds the chosen reply's NLL (weight 1)",
                ("rpo_alpha", "loss"),
            )

@dataclass
class IPOConfig(DPOConfig):
    loss: Literal["dpo", "ipo", "orpo"] = doc_field("ipo", "Which objective: DPO, IPO or ORPO.")


@dataclass
class ORPOConfig(DPOConfig):
    loss: Literal["dpo", "ipo", "orpo"] = doc_field("orpo", "Which objective: DPO, IPO or ORPO.")
    learning_rate: float = doc_field(5e-6, "Peak AdamW learning rate.")


def dpo_step(model, batch: dict, cfg: DPOConfig, reference: Reference) -> StepOutput:
    out = pair_outputs(cfg, model, reference, batch)
    return StepOutput(loss_sum=out.losses.sum(), metrics=out.metrics)


@in_training_precision
@torch.no_grad()
def evaluate(
    cfg: DPOConfig, model, reference: Reference, examples: list[PairExample], pad_id: int
) -> tuple[dict, list]:
    """Mean metrics over held-out pairs, and each pair's correctness in input order (for the bootstrap)."""
    was_training = model.training
    model.eval()
    device = next(model.parameters()).device
    sums: dict[str, float] = {}
    correct = [0.0] * len(examples)
    for idx in length_sorted_batches([pair_length(ex.encoded) for ex in examples], cfg.eval_batch_size):
        batch = collate([examples[i] for i in idx], pad_id)
        batch = {k: v.to(device) if torch.is_tensor(v) else v for k, v in batch.items()}
        out = pair_outputs(cfg, model, reference, batch)
        for k, v in {"loss": out.losses.sum().item(), **out.metrics}.items():
            sums[k] = sums.get(k, 0.0) + v
        for i, ok in zip(idx, (out.chosen_rewards > out.rejected_rewards).tolist()):
            correct[i] = float(ok)
    model.train(was_training)
    n = max(len(examples), 1)
    return {k: v / n for k, v in sums.items()}, correct


def precompute_reference(cfg: DPOConfig, model, examples: list[PairExample], pad_id: int, desc: str) -> None:
    """Fill ex.ref with the (frozen, initial) model's pair log-probs, once, before any update."""
    precompute(
        cfg, model, examples, [pair_length(ex.encoded) for ex in examples],
        partial(_collate_encoded, pad_id=pad_id), partial(_reference_pass, cfg=cfg), desc,
    )  # fmt: skip


def _collate_encoded(chunk: list[PairExample], pad_id: int) -> dict:
    return collate_pairs([ex.encoded for ex in chunk], pad_id)


def _reference_pass(model, batch: dict, cfg: DPOConfig) -> PairLogprobs:
    return pair_logprobs(model, batch, cfg.logprob_chunk_size, cfg.share_prompt)


def attach_reference(cfg: DPOConfig, model, model_path: str, examples: PairExamples, needed, pad_id: int) -> None:
    """Set examples.ref for the `needed` examples from the on-disk cache, computing (and caching) what is
    missing (``training.reference.precompute_tensors``)."""
    # The head's path is in the key: chunked and full logits agree to ~1e-7, not bit for bit.
    how = f"{of_config(cfg).name}:{'chunked' if supports_chunked_head(model) else 'full-logits'}"
    if isinstance(examples.encoded, EncodedRows):  # prepared data: its fingerprint decides every id
        data = examples.encoded.fingerprint
    else:
        rows = ((e.prompt_ids, e.chosen_ids, e.rejected_ids) for e in examples.encoded)
        data = reference_cache.tokens_fingerprint(rows)
    key = reference_cache.cache_key(model_path, how, data)
    examples.ref = precompute_tensors(
        cfg, model, examples, needed, examples.encoded.lengths(), partial(_collate_encoded, pad_id=pad_id),
        partial(_reference_pass, cfg=cfg), PairLogprobs, "reference log-probs", key,
    )  # fmt: skip


def run(cfg: DPOConfig) -> dict:
    return offline.run_in_folder(cfg, cfg.loss, _run)


def load_pairs(cfg: DPOConfig, tokenizer, source: str, split, rows, limit, what: str):
    """(the loader's Loaded, its pairs tokenized with the chat template as lazily read PairExamples): prepared
    once into Arrow files under the cache (``data.prepared``), memory-mapped on later runs."""
    loaded = offline.prepare_data(cfg, tokenizer, "pairs", source, split, rows, limit, what)
    print(f"{what} data: {loaded.summary()}", file=sys.stderr)
    return loaded, PairExamples(loaded.examples)


def _run(cfg: DPOConfig, run_dir: RunDir, started: float) -> dict:
    # 1. Data: validated pairs, tokenized with the chat template; both completions share the prompt ids.
    tokenizer = load_tokenizer(cfg.model, cfg.trust_remote_code)
    (train_rows, train_examples), held_out = offline.load_data(cfg, partial(load_pairs, cfg, tokenizer))
    eval_examples: PairExamples | list = held_out[1] if held_out else []

    # 2. Policy and reference.
    model = offline.load_policy(cfg)
    distributed.shard(model, cfg.lora)  # under FSDP: the reference pass below runs on the shards
    pad_id = tokenizer.pad_token_id
    mode = reference_mode(cfg.reference, needs_reference=cfg.loss != "orpo")
    if mode == "precomputed":
        # Only the pairs this run will visit (max_steps may end it inside the first epoch); cached on disk.
        model_path = resolve_model(cfg.model)
        attach_reference(
            cfg, model, model_path, train_examples, visited_indices(cfg, len(train_examples)), pad_id
        )
        if eval_examples:
            attach_reference(cfg, model, model_path, eval_examples, range(len(eval_examples)), pad_id)
    reference = load_reference(mode, partial(offline.load_policy, cfg))
    model, sizes = offline.make_trainable(model, cfg)

    # Before any update a reference-based objective sees policy == reference: every implicit reward is 0
    # and the loss is known (DPO ln 2), so only ORPO's starting point is worth a pass over the eval set.
    evaluation = offline.LastEvaluation(lambda m: evaluate(cfg, m, reference, eval_examples, pad_id))
    eval_before = evaluation.evaluate(model)[0] if eval_examples and mode == "none" else {}

    # 3. Train with the shared loop, watched by the failure monitors (and by samples of held-out prompts where
    #    sample_every asks); it evaluates every eval_every steps and at the end, and the last per-pair
    #    outcomes feed the interval.
    prompt_ids = (ex.encoded.prompt_ids for ex in eval_examples or train_examples)  # read up to sample_prompts
    watch = SampleWatch.of(cfg, model, tokenizer, prompt_ids)
    monitors = default_monitors(cfg.loss, samples=watch is not None)
    step_fn = partial(dpo_step, cfg=cfg, reference=reference)
    collate_fn = partial(collate, pad_id=pad_id)
    eval_fn = evaluation if eval_examples else None
    result = train(
        cfg, model, train_examples, collate_fn, step_fn, run_dir, eval_fn, monitors=monitors, sample_fn=watch,
        snapshot=snapshots.writer(cfg, model, tokenizer, run_dir.path),
    )  # fmt: skip

    # 4. Held-out accuracy with a bootstrap interval, the final model, the summary.
    summary = {
        **offline.summary_head(cfg.loss, cfg, run_dir, result, reference=mode),
        "train_pairs": len(train_examples),
        "skipped_rows": len(train_rows.skipped),
        "truncated_pairs": train_examples.encoded.n_truncated(),
        **sizes,
        **offline.loop_summary(result, monitors),
    }
    if eval_examples:
        eval_after, correct = evaluation.outcome  # from the loop's final evaluation
        summary.update(eval_pairs=len(eval_examples), eval_before=eval_before, eval_after=eval_after)
        summary.update(offline.accuracy_summary(correct))
    offline.save_policy(model, tokenizer, run_dir, cfg)
    return offline.write_summary(run_dir, summary, started)


STAGE = Stage("dpo", DPOConfig, run)
IPO = Stage("ipo", IPOConfig, run)
ORPO = Stage("orpo", ORPOConfig, run)
