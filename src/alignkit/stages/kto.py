"""`alignkit kto`: Kahneman-Tversky Optimization (Ethayarajh et al. 2024) on unpaired feedback.

Each example is a prompt, a completion and a desirable/undesirable label; preference pairs are split into
one desirable and one undesirable example. The loss is `alignkit.losses.kto.kto_loss`; its reference
point z0 is estimated from mismatched prompt/completion pairs fixed once, before training (see
`kl_partners`). The reference is held as in DPO: precomputed, the LoRA base, or a frozen copy.

Logged per step (the loop divides every sum by the step's examples): loss; kl (z0, averaged over
examples); count/desirable and count/undesirable (class fractions); rewards/desirable_sum,
rewards/undesirable_sum, logps/desirable_sum, logps/undesirable_sum (each class's values summed, over
all examples). A class mean is the ratio: rewards/desirable_sum / count/desirable (TRL logs sums and
counts the same way), because a step's class mix varies and a per-step class mean cannot be made to
survive the loop's division by the step's size. Evaluation reports true class means.
"""

from __future__ import annotations

import sys
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from functools import partial
from typing import Literal

import numpy as np
import torch

from alignkit.config import (
    ConfigError,
    PreparedDataFields,
    SnapshotFields,
    TrainConfig,
    doc_field,
    validate_config,
)
from alignkit.data.collate import collate_unpaired, length_sorted_batches
from alignkit.data.tokenize import EncodedUnpaired
from alignkit.evaluation.monitors import default_monitors
from alignkit.losses.kto import kto_loss, kto_reference_point, kto_weight_warning, mismatched_indices
from alignkit.models.forward import sequence_logprobs
from alignkit.models.loading import load_tokenizer
from alignkit.models.precision import in_training_precision
from alignkit.stages import Stage
from alignkit.training import distributed, offline, snapshots
from alignkit.training.loop import StepOutput, train, visited_indices
from alignkit.training.reference import (
    Reference,
    apply,
    load_reference,
    precompute_tensors,
    reference_mode,
    stack,
)
from alignkit.training.run import RunDir
from alignkit.training.sample_watch import SampleWatch, SampleWatchFields


@dataclass
class KTOConfig(PreparedDataFields, SampleWatchFields, SnapshotFields, TrainConfig):
    """KTO. Data: prompt/completion/label rows (unpaired feedback), or prompt/chosen/rejected pairs."""

    beta: float = doc_field(0.1, "Temperature on the log-ratios (KL strength), as in DPO.", gt=0)
    desirable_weight: float = doc_field(
        1.0, "lambda_D, weight of desirable examples; keep lambda_D*n_D / (lambda_U*n_U) in [1, 4/3].", gt=0
    )
    undesirable_weight: float = doc_field(1.0, "lambda_U, weight of undesirable examples.", gt=0)
    data_format: Literal["auto", "unpaired", "pairs"] = doc_field(
        "auto",
        "unpaired: prompt/completion/label rows; pairs: chosen/rejected pairs, each split into one desirable "
        "and one undesirable example; auto: per file, 'label' column -> unpaired, 'chosen' -> pairs.",
    )
    reference: Literal["auto", "precomputed", "adapter", "copy"] = doc_field(
        "auto",
        "Reference log-probs: precomputed once before training; from the LoRA base with adapters disabled; "
        "or a frozen copy. auto = precomputed.",
    )
    # Same default as DPO: both move the policy by beta-scaled log-ratios from the same reference, and one
    # learning rate lets the two be compared on the same data (TRL's KTOConfig uses 1e-6).
    learning_rate: float = doc_field(5e-7, "Peak AdamW learning rate.")
    # z0 is a batch estimate over each micro-batch; from a single example it is one clamped sample, noisy
    # and biased upward by the clamp at 0 (TRL refuses a per-device batch of 1 for the same estimate). The
    # fixed partners keep the rare single-example micro-batch at an epoch's end well defined.
    batch_size: int = doc_field(8, "Examples per optimizer step, at least 2.", ge=2)
    micro_batch_size: int = doc_field(
        2,
        "Examples per forward/backward pass (per process), at least 2: z0 is estimated over each micro-step "
        "(the micro-batches of all processes at that step).",
        ge=2,
    )
    max_length: int = doc_field(512, "Longest prompt+completion in tokens; longer examples are truncated.")
    eval_batch_size: int = doc_field(8, "Examples per forward pass when evaluating or precomputing.", ge=1)


@dataclass
class KTOLogprobs:
    """Summed log-probs under one model of each example's own completion and of its KL (mismatched) sequence's
    completion: what KTO's loss reads, and what a precomputed reference stores (per example 0-dim)."""

    completion: torch.Tensor  # (B,) the example's completion given its prompt
    kl: torch.Tensor  # (B,) the partner's completion given this example's prompt (z0's estimate)


@dataclass
class KTOExample:
    """A tokenized example, its mismatched KL sequence, and its reference log-probs when precomputed."""

    encoded: EncodedUnpaired
    kl: EncodedUnpaired  # this example's prompt + its partner's completion (see kl_partners); label unused
    pair: int | None  # the preference pair it came from (held-out accuracy); None for unpaired data
    ref: KTOLogprobs | None = None  # the reference's, when precomputed (0-dim tensors)


def kl_partners(n: int, seed: int) -> list[int]:
    """partner[i]: the example whose completion follows prompt i in i's KL (mismatched) sequence.

    Fixed once, at data preparation: a seeded shuffle of the n examples, then the rotation of
    `mismatched_indices` along it, so no example is its own partner and every completion is used exactly
    once. Fixing the pairs (rather than rotating each micro-batch as TRL did) is what lets a precomputed
    reference score the KL sequences before training, so every reference mode computes the same z0; both
    schemes give a batch estimate of the same KL. A partner may share the prompt by chance (e.g. the other
    half of a preference pair); that only adds one matched sample to z0's estimate, as in TRL.
    """
    order = torch.randperm(n, generator=torch.Generator().manual_seed(seed))  # (n,)
    partner = [0] * n
    for position, source in zip(order.tolist(), order[mismatched_indices(n)].tolist()):
        partner[position] = source
    return partner


def kl_sequence(own: EncodedUnpaired, other: EncodedUnpaired, max_length: int) -> EncodedUnpaired:
    """Prompt ``own``'s ids + ``other``'s completion ids, cut to max_length. The prompt was already fitted
    with its own completion, so it leaves at least one token of room; the partner's completion keeps its
    start, as ``encode`` would cut it."""
    completion = other.completion_ids[: max_length - len(own.prompt_ids)]
    return EncodedUnpaired(own.prompt_ids, completion, own.label, len(completion) < len(other.completion_ids))


class KTOExamples(torch.utils.data.Dataset):
    """KTOExamples read lazily from ``encoded`` (``data.prepared.EncodedRows`` of memory-mapped Arrow, or any
    sequence of EncodedUnpaired), each with its KL sequence (``kl_partners``, fixed by ``seed``); ``paired``:
    the rows are pairs split in two (rows 2k and 2k+1 are pair k). The reference log-probs, once precomputed,
    are one KTOLogprobs of (N,) tensors (``ref``), not one object per example."""

    def __init__(self, encoded: Sequence[EncodedUnpaired], paired: bool, max_length: int, seed: int) -> None:
        if len(encoded) < 2:
            raise ValueError(
                f"KTO needs at least 2 examples (to mismatch prompts and completions), got {len(encoded)}"
            )
        self.encoded = encoded
        self.paired = paired
        self.max_length = max_length
        self.partner = kl_partners(len(encoded), seed)
        self.ref: KTOLogprobs | None = None  # (N,) per field

    def __len__(self) -> int:
        return len(self.encoded)

    def __getitem__(self, i: int) -> KTOExample:
        own, other = self.encoded[i], self.encoded[self.partner[i]]
        ref = None if self.ref is None else apply(self.ref, lambda t: t[i])
        return KTOExample(own, kl_sequence(own, other, self.max_length), i // 2 if self.paired else None, ref)

    def __iter__(self) -> Iterator[KTOExample]:
        return (self[i] for i in range(len(self)))

    def lengths(self) -> list[int]:
        """Padded width each example asks of a batch: its longer row (own sequence or KL sequence), from one
        pass over the rows."""
        prompt, completion = np.zeros((2, len(self)), dtype=np.int64)  # (N,) each
        for i, e in enumerate(self.encoded):
            prompt[i], completion[i] = len(e.prompt_ids), len(e.completion_ids)
        kl = prompt + np.minimum(completion[self.partner], self.max_length - prompt)
        return np.maximum(prompt + completion, kl).tolist()


def collate(examples: list[KTOExample], pad_id: int) -> dict:
    """collate_unpaired's keys for the completions (B, T), the same as kl_* for the KL sequences (B, T'),
    and ref (a KTOLogprobs of (B,)) when precomputed. n_items = B: the loss is per example."""
    batch = collate_unpaired([ex.encoded for ex in examples], pad_id)
    kl = collate_unpaired([ex.kl for ex in examples], pad_id)
    batch.update(
        kl_input_ids=kl["input_ids"], kl_attention_mask=kl["attention_mask"], kl_loss_mask=kl["loss_mask"]
    )
    batch["n_tokens"] += kl["n_tokens"]  # both are forwarded
    if examples[0].ref is not None:
        batch["ref"] = stack([ex.ref for ex in examples])
    return batch


def completion_logps(model, batch: dict, chunk_size: int) -> torch.Tensor:
    """(B,) summed log-probs of each example's own completion."""
    return sequence_logprobs(
        model, batch["input_ids"], batch["attention_mask"], batch["loss_mask"], chunk_size
    ).sum


def kl_logps(model, batch: dict, chunk_size: int) -> torch.Tensor:
    """(B,) summed log-probs of the KL sequences' (mismatched) completions."""
    lp = sequence_logprobs(
        model, batch["kl_input_ids"], batch["kl_attention_mask"], batch["kl_loss_mask"], chunk_size
    )
    return lp.sum


def both_logprobs(model, batch: dict, chunk_size: int) -> KTOLogprobs:
    """Summed log-probs (B,) of the completions and of the KL sequences."""
    return KTOLogprobs(completion_logps(model, batch, chunk_size), kl_logps(model, batch, chunk_size))


def reference_logprobs(cfg: KTOConfig, model, reference: Reference, batch: dict) -> KTOLogprobs:
    """The reference's log-probs (B,) of [completion, KL sequence], however the reference is held."""
    return reference.logprobs(model, batch, lambda m, b: both_logprobs(m, b, cfg.logprob_chunk_size))


@dataclass
class KTOOutputs:
    losses: torch.Tensor  # (B,) per-example loss
    rewards: torch.Tensor  # (B,) beta * (policy - reference) log-prob, detached
    labels: torch.Tensor  # (B,) bool, True: desirable
    kl: float  # z0 of this batch
    metrics: dict[str, float]  # sums over the examples (see the module docstring)


def kto_outputs(
    cfg: KTOConfig, model, reference: Reference, batch: dict, across_ranks: bool = False
) -> KTOOutputs:
    """Losses, rewards, z0 and metric sums of one batch. ``across_ranks`` (training): z0 is estimated over
    this micro-step's KL pairs on every rank, as one process would over their union."""
    policy = completion_logps(model, batch, cfg.logprob_chunk_size)  # (B,) with grad
    # z0 is detached in the loss, so the policy's KL sequences need no graph: a separate no-grad forward
    # saves their activations (and in train mode draws its own dropout, as a second model call would).
    with torch.no_grad():
        policy_kl = kl_logps(model, batch, cfg.logprob_chunk_size)  # (B,)
    ref = reference_logprobs(cfg, model, reference, batch)
    labels = batch["labels"]
    kl_sum, kl_count = (policy_kl - ref.kl).sum(), float(len(labels))  # over the mismatched pairs
    if across_ranks and distributed.world_size() > 1:
        # Sums and counts of all ranks, not a mean of their means; a stand-in micro-batch (n_items 0, see
        # alignkit.training.loop.train) counts nothing.
        own = [kl_sum.item(), kl_count] if batch["n_items"] else [0.0, 0.0]
        total, kl_count = distributed.all_reduce(own)
        kl_sum = torch.tensor(total, dtype=kl_sum.dtype, device=kl_sum.device)
    out = kto_loss(
        policy, ref.completion, labels, kto_reference_point(kl_sum, kl_count),
        beta=cfg.beta, desirable_weight=cfg.desirable_weight, undesirable_weight=cfg.undesirable_weight,
    )  # fmt: skip
    desirable, undesirable = labels, ~labels
    kl = out.kl.item()
    metrics = {
        "kl": kl * len(labels),  # z0 is one number per micro-batch; weighting it by its examples averages it
        "count/desirable": desirable.sum().item(),
        "count/undesirable": undesirable.sum().item(),
        "rewards/desirable_sum": out.rewards[desirable].sum().item(),
        "rewards/undesirable_sum": out.rewards[undesirable].sum().item(),
        "logps/desirable_sum": policy.detach()[desirable].sum().item(),
        "logps/undesirable_sum": policy.detach()[undesirable].sum().item(),
    }
    return KTOOutputs(out.losses, out.rewards, labels, kl, metrics)


def kto_step(model, batch: dict, cfg: KTOConfig, reference: Reference) -> StepOutput:
    out = kto_outputs(cfg, model, reference, batch, across_ranks=True)
    return StepOutput(loss_sum=out.losses.sum(), metrics=out.metrics)


def _to_device(batch: dict, device) -> dict:
    return {k: v.to(device) if torch.is_tensor(v) else v for k, v in batch.items()}


@in_training_precision
@torch.no_grad()
def evaluate(
    cfg: KTOConfig, model, reference: Reference, examples: KTOExamples, pad_id: int
) -> tuple[dict, list]:
    """Held-out metrics and, for paired data, each pair's correctness (for the bootstrap interval).

    loss and kl (z0 per eval batch) are means over examples; rewards/desirable and rewards/undesirable are
    class means and rewards/gap their difference; accuracy (pairs only) is the fraction of pairs whose
    chosen completion gets the higher implicit reward.
    """
    was_training = model.training
    model.eval()
    device = next(model.parameters()).device
    loss_sum = kl_sum = 0.0
    rewards = [0.0] * len(examples)
    labels = [e.label for e in examples.encoded]
    for idx in length_sorted_batches(examples.lengths(), cfg.eval_batch_size):
        batch = _to_device(collate([examples[i] for i in idx], pad_id), device)
        out = kto_outputs(cfg, model, reference, batch)
        loss_sum += out.losses.sum().item()
        kl_sum += out.metrics["kl"]
        for i, r in zip(idx, out.rewards.float().tolist()):
            rewards[i] = r
    model.train(was_training)
    n = max(len(examples), 1)
    desirable = [r for r, y in zip(rewards, labels) if y]
    undesirable = [r for r, y in zip(rewards, labels) if not y]
    metrics = {"loss": loss_sum / n, "kl": kl_sum / n}
    if desirable:
        metrics["rewards/desirable"] = sum(desirable) / len(desirable)
    if undesirable:
        metrics["rewards/undesirable"] = sum(undesirable) / len(undesirable)
    if desirable and undesirable:
        metrics["rewards/gap"] = metrics["rewards/desirable"] - metrics["rewards/undesirable"]
    correct = pair_correctness(examples, rewards)
    if correct:
        metrics["accuracy"] = sum(correct) / len(correct)
    return metrics, correct


def pair_correctness(examples: KTOExamples, rewards: list[float]) -> list[float]:
    """1.0 for each held-out pair whose chosen (desirable) half (row 2k) has the higher reward than its
    rejected half (row 2k+1), else 0.0 (ties too); none for unpaired data."""
    if not examples.paired:
        return []
    return [float(rewards[k] > rewards[k + 1]) for k in range(0, len(rewards) - 1, 2)]


def precompute_reference(
    cfg: KTOConfig, model, examples: KTOExamples, pad_id: int, desc: str, needed
) -> None:
    """Set examples.ref to the (frozen, initial) model's [completion, KL sequence] log-probs of the examples
    at ``needed``, once (``training.reference.precompute_tensors``)."""
    examples.ref = precompute_tensors(
        cfg, model, examples, needed, examples.lengths(), partial(collate, pad_id=pad_id),
        lambda m, batch: both_logprobs(m, batch, cfg.logprob_chunk_size), KTOLogprobs, desc,
    )  # fmt: skip


# data_format -> the rows data.prepared makes of the file
_ROW_KINDS = {"auto": "auto_unpaired", "unpaired": "unpaired", "pairs": "pairs_as_unpaired"}


def load_examples(cfg: KTOConfig, tokenizer, source, split, rows, limit, what: str):
    """(KTOExamples read lazily from the prepared rows, the loader's Loaded, the resolved format), with the
    class counts printed."""
    loaded = offline.prepare_data(
        cfg, tokenizer, _ROW_KINDS[cfg.data_format], source, split, rows, limit, what
    )
    encoded = loaded.examples  # chosen (desirable), rejected (undesirable), ... for pairs
    fmt = "pairs" if encoded.kind == "pairs_as_unpaired" else "unpaired"
    if len(encoded) < 2:  # reported as a config problem, not a traceback
        raise ConfigError(
            f"{what}_data: KTO needs at least 2 examples to mismatch prompts and completions, {source} "
            f"gave {len(encoded)}"
        )
    n_desirable = int(encoded.column("label").sum())
    print(
        f"{what} data ({fmt}): {loaded.summary()} -> {len(encoded)} examples, "
        f"{n_desirable} desirable : {len(encoded) - n_desirable} undesirable",
        file=sys.stderr,
    )
    return KTOExamples(encoded, fmt == "pairs", cfg.max_length, cfg.seed), loaded, fmt


def check_config(cfg: KTOConfig) -> None:
    """The declared ranges (batches of at least 2) and rules, for a config built in code too."""
    validate_config(cfg)
    if cfg.reference == "adapter" and not cfg.lora:
        raise ConfigError(
            "reference=adapter needs lora=true (the reference is the base with adapters disabled)"
        )


def run(cfg: KTOConfig) -> dict:
    check_config(cfg)
    return offline.run_in_folder(cfg, "kto", _run)


def _run(cfg: KTOConfig, run_dir: RunDir, started: float) -> dict:
    # 1. Data: unpaired examples (pairs split in two), each with its fixed mismatched KL sequence.
    tokenizer = load_tokenizer(cfg.model, cfg.trust_remote_code)
    (train_examples, train_rows, train_format), held_out = offline.load_data(
        cfg, partial(load_examples, cfg, tokenizer)
    )
    eval_examples, _, eval_format = held_out or ([], None, None)
    n_desirable = int(train_examples.encoded.column("label").sum())
    n_undesirable = len(train_examples) - n_desirable
    weight_warning = kto_weight_warning(
        cfg.desirable_weight, cfg.undesirable_weight, n_desirable, n_undesirable
    )
    if weight_warning:
        print(f"warning: {weight_warning}", file=sys.stderr)

    # 2. Policy and reference.
    model = offline.load_policy(cfg)
    distributed.shard(model, cfg.lora)  # under FSDP: the reference pass below runs on the shards
    pad_id = tokenizer.pad_token_id
    mode = reference_mode(cfg.reference)
    if mode == "precomputed":
        # Only the examples this run will visit (max_steps may end it inside the first epoch).
        needed = visited_indices(cfg, len(train_examples))
        precompute_reference(cfg, model, train_examples, pad_id, "reference log-probs (train)", needed)
        if eval_examples:
            precompute_reference(
                cfg, model, eval_examples, pad_id, "reference log-probs (eval)", range(len(eval_examples))
            )
    reference = load_reference(mode, partial(offline.load_policy, cfg))
    model, sizes = offline.make_trainable(model, cfg)

    # No pass over the eval set before training: policy == reference, so every implicit reward and z0 are
    # 0 and each example's loss is its weight times 1 - sigmoid(0) = 0.5.
    eval_before: dict = {}

    # 3. Train with the shared loop, watched by the failure monitors (and by samples of held-out prompts where
    #    sample_every asks); each micro-step estimates z0 over the KL sequences of all ranks (kto_step). The
    #    loop evaluates every eval_every steps and at the end.
    evaluation = offline.LastEvaluation(lambda m: evaluate(cfg, m, reference, eval_examples, pad_id))
    eval_fn = evaluation if eval_examples else None
    prompt_ids = (
        e.prompt_ids for e in (eval_examples or train_examples).encoded
    )  # read up to sample_prompts
    watch = SampleWatch.of(cfg, model, tokenizer, prompt_ids)
    monitors = default_monitors("kto", samples=watch is not None)
    step_fn = partial(kto_step, cfg=cfg, reference=reference)
    collate_fn = partial(collate, pad_id=pad_id)
    result = train(
        cfg, model, train_examples, collate_fn, step_fn, run_dir, eval_fn, monitors=monitors, sample_fn=watch,
        snapshot=snapshots.writer(cfg, model, tokenizer, run_dir.path),
    )  # fmt: skip

    # 4. Held-out metrics (pair accuracy with a bootstrap interval), the final model, the summary.
    summary = {
        **offline.summary_head("kto", cfg, run_dir, result, reference=mode, data_format=train_format),
        "train_examples": len(train_examples),
        "train_desirable": n_desirable,
        "train_undesirable": n_undesirable,
        "weight_warning": weight_warning,
        "skipped_rows": len(train_rows.skipped),
        "truncated_examples": train_examples.encoded.n_truncated(),
        **sizes,
        **offline.loop_summary(result, monitors),
    }
    if eval_examples:
        eval_after, correct = evaluation.outcome  # from the loop's final evaluation
        summary.update(
            eval_format=eval_format,
            eval_examples=len(eval_examples),
            eval_before=eval_before,
            eval_after=eval_after,
        )
        if correct:  # paired held-out data: how often the chosen half out-scores the rejected one
            summary.update(eval_pairs=len(correct), **offline.accuracy_summary(correct))
        if "rewards/gap" in eval_after:
            summary["eval_reward_gap"] = eval_after["rewards/gap"]
    offline.save_policy(model, tokenizer, run_dir, cfg)
    return offline.write_summary(run_dir, summary, started)


STAGE = Stage("kto", KTOConfig, run)
