"""`alignkit rm`: train a scalar reward model on chosen/rejected pairs (stage 2 of the InstructGPT pipeline).

The model is the policy's backbone with a one-output linear head (``models.reward``: a transformers
sequence classifier, pooled at the response's EOS), trained with the Bradley-Terry loss
(``losses.reward``), optionally with a per-pair margin and reward centering. Chosen and rejected go
through the model in one forward pass. final/ loads with ``alignkit.models.reward.load_reward_model``.
Every held-out evaluation ends with the diagnostics of ``evaluation.reward_diagnostics`` (is it more than a
length rule?); length_balance, length_debias_coef and early_stopping_pairs train against that shortcut.
"""

from __future__ import annotations

import math
import sys
from collections.abc import Iterable, Iterator, Sequence
from dataclasses import dataclass
from functools import partial
from itertools import repeat

import numpy as np
import torch

from alignkit.config import ConfigError, PreparedDataFields, TrainConfig, doc_field
from alignkit.data.collate import collate_pairs, length_sorted_batches, pair_length
from alignkit.data.length_balance import length_balanced_indices
from alignkit.data.prepared import EncodedRows
from alignkit.data.schemas import Loaded
from alignkit.data.tokenize import EncodedPair
from alignkit.evaluation.monitors import default_monitors
from alignkit.evaluation.reward_eval import is_causal_lm, pair_diagnostics
from alignkit.losses.reward import bradley_terry_loss, length_correlation_penalty
from alignkit.models.loading import load_tokenizer, pick_device
from alignkit.models.precision import in_training_precision, weights_dtype
from alignkit.models.reward import apply_reward_lora, build_reward_model, save_reward_model, sequence_rewards
from alignkit.stages import Stage
from alignkit.training import distributed, offline
from alignkit.training.early_stopping import BestWeights
from alignkit.training.loop import StepOutput, train
from alignkit.training.run import RunDir


@dataclass
class RMConfig(PreparedDataFields, TrainConfig):
    """Reward-model training. Data: prompt/chosen/rejected, or HH-RLHF-style transcripts; optional margin."""

    margin_column: str | None = doc_field(
        None,
        "Column holding a per-pair margin m (a number >= 0, larger for clearer preferences); the loss becomes "
        "-log sigmoid(r_c - r_r - m) as in Llama 2 (eval_data needs the column too). None: no margin.",
    )
    center_coef: float = doc_field(
        0.0,
        "Weight of the reward-centering term coef * (r_c + r_r)^2 that keeps rewards near zero "
        "(Eisenstein et al. 2023 use 0.01); 0 disables it.",
        ge=0,
    )
    learning_rate: float = doc_field(1e-5, "Peak AdamW learning rate.")
    batch_size: int = doc_field(8, "Pairs per optimizer step.")
    micro_batch_size: int = doc_field(2, "Pairs per forward/backward pass (2x as many sequences).")
    max_length: int = doc_field(512, "Longest prompt+response in tokens; longer pairs are truncated.")
    eval_batch_size: int = doc_field(8, "Pairs per forward pass when evaluating.", ge=1)
    eval_before: bool = doc_field(
        True, "Also measure the held-out pairs before training (the untrained head's accuracy, near 0.5)."
    )
    train_eval_pairs: int = doc_field(
        256, "Held-in pairs (the first N training pairs) measured before and after training; 0 skips.", ge=0
    )
    # Options against the length shortcut (issue 18), measured in docs/reward-models.md.
    length_balance: bool = doc_field(
        False,
        "Train on a length-balanced subset: as many pairs whose chosen reply is longer as shorter "
        "(data.length_balance), so length alone predicts nothing.",
    )
    length_debias_coef: float = doc_field(
        0.0,
        "Weight of the penalty coef * corr(reward, reply length)^2 over each micro-batch's replies "
        "(losses.reward.length_correlation_penalty, after ODIN, Chen et al. 2024); 0 disables it.",
        ge=0,
    )
    early_stopping_pairs: int = doc_field(
        0,
        "Early stopping: hold out the last N training pairs as a validation set (never eval_data, which "
        "stays untouched), measure it every eval_every steps, and save the best step's weights as final/; "
        "0 disables it. A resumed run keeps the best of the measurements made after the resume.",
        ge=0,
    )
    early_stopping_patience: int = doc_field(
        3, "Stop after this many validation measurements without a better accuracy.", ge=1
    )
    logprob_baseline: bool = doc_field(
        True,
        "Also score the held-out pairs by the base model's mean log-prob of each reply (one forward pass per "
        "reply) as a baseline the reward model must beat.",
    )

    def check(self) -> None:
        super().check()
        if self.early_stopping_pairs and not self.eval_every:
            raise ConfigError(
                "early_stopping_pairs needs eval_every (how often to measure the validation pairs)",
                ("early_stopping_pairs", "eval_every"),
            )


@dataclass
class RMExample:
    encoded: EncodedPair
    margin: float = 0.0


class RMExamples(Sequence[RMExample]):
    """The pairs of ``encoded`` (``data.prepared.EncodedRows``, memory-mapped Arrow) read lazily as
    RMExamples, each with its margin (the rows' "margin" column where margin_column is set, else 0)."""

    def __init__(self, encoded: EncodedRows) -> None:
        self.encoded = encoded
        self.margins = encoded.column("margin") if "margin" in encoded.table.column_names else None

    def __len__(self) -> int:
        return len(self.encoded)

    def __getitem__(self, i: int) -> RMExample:  # type: ignore[override]
        return RMExample(self.encoded[i], 0.0 if self.margins is None else float(self.margins[i]))

    def __iter__(self) -> Iterator[RMExample]:
        margins = repeat(0.0) if self.margins is None else self.margins.tolist()
        return (RMExample(e, m) for e, m in zip(self.encoded, margins))

    def select(self, indices: Iterable[int]) -> RMExamples:
        """The pairs at ``indices``, a view (nothing copied)."""
        return RMExamples(self.encoded.select(indices))


def collate(examples: list[RMExample], pad_id: int) -> dict:
    batch = collate_pairs([ex.encoded for ex in examples], pad_id)  # 2B rows: chosen, then rejected
    batch["margin"] = torch.tensor([ex.margin for ex in examples], dtype=torch.float32)  # (B,)
    # (2B,) reply lengths in tokens, chosen then rejected as the rows are, for the length-debiasing term.
    batch["reply_lengths"] = torch.tensor(
        [len(ex.encoded.chosen_ids) for ex in examples] + [len(ex.encoded.rejected_ids) for ex in examples]
    )
    return batch


def pair_rewards(model, batch: dict) -> tuple[torch.Tensor, torch.Tensor]:
    """(chosen, rejected) rewards, each (B,), from one forward pass over the 2B rows."""
    rewards = sequence_rewards(model, batch["input_ids"], batch["attention_mask"])  # (2B,)
    B = rewards.shape[0] // 2
    return rewards[:B], rewards[B:]


def pair_losses(cfg: RMConfig, model, batch: dict):
    """The Bradley-Terry loss of a batch and its per-pair rewards."""
    chosen, rejected = pair_rewards(model, batch)
    margin = batch["margin"] if cfg.margin_column else None
    out = bradley_terry_loss(chosen, rejected, margin=margin, center_coef=cfg.center_coef)
    metrics = {
        "rewards/accuracy": out.accuracy.sum().item(),
        "rewards/margin": out.margin.sum().item(),
        "rewards/chosen": chosen.detach().sum().item(),
        "rewards/rejected": rejected.detach().sum().item(),
    }
    loss_sum = out.losses.sum()
    if cfg.length_debias_coef:
        penalty = length_correlation_penalty(torch.cat([chosen, rejected]), batch["reply_lengths"])  # ()
        # Counted once per pair, so that after the loop divides by the batch's pairs it weighs coef * rho^2.
        loss_sum = loss_sum + cfg.length_debias_coef * penalty * chosen.shape[0]
        metrics["rewards/length_corr_sq"] = penalty.item() * chosen.shape[0]
    return out, loss_sum, chosen.detach(), rejected.detach(), metrics


def rm_step(model, batch: dict, cfg: RMConfig) -> StepOutput:
    _, loss_sum, _, _, metrics = pair_losses(cfg, model, batch)
    return StepOutput(loss_sum=loss_sum, metrics=metrics)


@in_training_precision
@torch.no_grad()
def evaluate(
    cfg: RMConfig, model, examples: RMExamples, pad_id: int
) -> tuple[dict, list[float], list[float]]:
    """Mean loss/accuracy/margin over ``examples``, each pair's correctness (for the bootstrap interval),
    and every reward given (chosen and rejected, for the reward statistics)."""
    was_training = model.training
    model.eval()
    device = next(model.parameters()).device
    sums: dict[str, float] = {}
    correct = [0.0] * len(examples)
    chosen_rewards = [0.0] * len(examples)
    rejected_rewards = [0.0] * len(examples)
    lengths = [pair_length(e) for e in examples.encoded]
    for idx in length_sorted_batches(lengths, cfg.eval_batch_size):
        batch = collate([examples[i] for i in idx], pad_id)
        batch = {k: v.to(device) if torch.is_tensor(v) else v for k, v in batch.items()}
        out, loss_sum, chosen, rejected, metrics = pair_losses(cfg, model, batch)
        for k, v in {"loss": loss_sum.item(), **metrics}.items():
            sums[k] = sums.get(k, 0.0) + v
        for i, ok, c, r in zip(idx, out.accuracy.tolist(), chosen.tolist(), rejected.tolist()):
            correct[i], chosen_rewards[i], rejected_rewards[i] = ok, c, r
    rewards = chosen_rewards + rejected_rewards
    model.train(was_training)
    n = max(len(examples), 1)
    return {k: v / n for k, v in sums.items()}, correct, rewards


def load_pairs(
    cfg: RMConfig, tokenizer, source: str, split, rows, limit, name: str
) -> tuple[Loaded, RMExamples]:
    """Validated pairs of ``source`` with their margins, tokenized like the policy sees them: prepared once
    into Arrow files under the cache (``data.prepared``), read lazily; a pair without a usable margin is a
    bad row."""
    loaded = offline.prepare_data(
        cfg, tokenizer, "pairs", source, split, rows, limit, name, cfg.margin_column
    )
    print(f"{name} data: {loaded.summary()}", file=sys.stderr)
    return loaded, RMExamples(loaded.examples)


def split_validation(cfg: RMConfig, examples: RMExamples) -> tuple[RMExamples, RMExamples | list]:
    """(training pairs, validation pairs): early stopping holds out the last ``early_stopping_pairs``."""
    n = cfg.early_stopping_pairs
    if not n:
        return examples, []
    if n >= len(examples):
        raise ConfigError(
            f"early_stopping_pairs={n} leaves no training pairs (train_data has {len(examples)})",
            ("early_stopping_pairs",),
        )
    if distributed.world_size() > 1:
        raise ConfigError("early_stopping_pairs needs one process (the best weights are copied whole)")
    return examples.select(range(len(examples) - n)), examples.select(range(len(examples) - n, len(examples)))


def balance_lengths(cfg: RMConfig, examples: RMExamples) -> RMExamples:
    """With ``length_balance``, the length-balanced subset of ``examples`` (data.length_balance); else all."""
    if not cfg.length_balance:
        return examples
    chosen, rejected = zip(*((len(e.chosen_ids), len(e.rejected_ids)) for e in examples.encoded))  # one pass
    kept = length_balanced_indices(list(chosen), list(rejected), cfg.seed)
    print(f"length_balance: training on {len(kept)} of {len(examples)} pairs", file=sys.stderr)
    return examples.select(kept)


def measure_validation(cfg: RMConfig, model, validation: RMExamples, pad_id: int, best: BestWeights) -> dict:
    """The loop's evaluation under early stopping: the validation pairs' metrics, whose accuracy ``best``
    records (keeping the weights of the best one)."""
    metrics = evaluate(cfg, model, validation, pad_id)[0]
    best.update(model, metrics["rewards/accuracy"])
    return {f"validation/{k}": v for k, v in metrics.items()}


def restore_best(
    cfg: RMConfig, model, best: BestWeights, steps: int, n_train: int, n_validation: int
) -> dict:
    """Put the best measured weights back into ``model``; the summary's account of the early stopping."""
    # Periodic measurement k (0-based) ran after step (k + 1) * eval_every; the last one after the loop.
    planned_steps = cfg.max_steps or cfg.epochs * math.ceil(n_train / cfg.batch_size)
    measured_at = [(k + 1) * cfg.eval_every for k in range(len(best.scores) - 1)] + [steps]
    best.restore(model)
    early_stopping = {
        "validation_pairs": n_validation,
        "validation_accuracy": best.scores,
        "validation_steps": measured_at,
        "best_step": measured_at[best.best_index],
        "best_validation_accuracy": best.best_score,
        "stopped_early": steps < planned_steps,
        "final_model_is": f"the weights of step {measured_at[best.best_index]} (best validation accuracy)",
    }
    print(f"early stopping: final/ holds {early_stopping['final_model_is']}", file=sys.stderr)
    return early_stopping


def reward_statistics(name: str, rewards: list[float]) -> dict:
    """Mean and standard deviation of the rewards given (saved with the model: what PPO may normalise by)."""
    return {f"{name}_reward_mean": float(np.mean(rewards)), f"{name}_reward_std": float(np.std(rewards))}


def diagnostics(cfg: RMConfig, examples: list[RMExample], rewards: list[float], pad_id: int) -> dict:
    """Is it a preference model or a length model? Accuracy beside the length rules and the base model's
    log-prob, length buckets, length correlation, calibration (evaluation.reward_diagnostics) on the held-out
    pairs; ``rewards`` holds the chosen rewards, then the rejected ones."""
    n = len(examples)
    base = cfg.model if cfg.logprob_baseline and is_causal_lm(cfg.model, cfg.trust_remote_code) else None
    return pair_diagnostics(
        rewards[:n],
        rewards[n:],
        [ex.encoded for ex in examples],
        f"reward-model diagnostics on {n} held-out pairs",
        seed=cfg.seed,
        base_model=base,
        pad_id=pad_id,
        dtype=cfg.dtype,
        trust_remote_code=cfg.trust_remote_code,
        batch_size=cfg.eval_batch_size,
    )


def run(cfg: RMConfig) -> dict:
    if cfg.lora and not cfg.merge_lora:
        raise ConfigError(
            "merge_lora=false is not supported by rm: final/ is always a plain reward model (adapters merged), "
            "which is what score, build-prefs and PPO load"
        )
    return offline.run_in_folder(cfg, "rm", _run)


def _run(cfg: RMConfig, run_dir: RunDir, started: float) -> dict:
    # 1. Data: validated pairs, tokenized with the chat template; both responses share the prompt ids. Early
    #    stopping holds out validation pairs; length_balance keeps a length-balanced subset.
    tokenizer = load_tokenizer(cfg.model, cfg.trust_remote_code)
    (train_rows, train_examples), held_out = offline.load_data(cfg, partial(load_pairs, cfg, tokenizer))
    eval_examples: RMExamples | list = held_out[1] if held_out else []
    train_examples, validation = split_validation(cfg, train_examples)
    train_examples = balance_lengths(cfg, train_examples)
    held_in = train_examples.select(range(min(cfg.train_eval_pairs, len(train_examples))))

    # 2. Model: the backbone of cfg.model with a fresh one-output head (or a reward model to continue).
    pad_id = tokenizer.pad_token_id
    model = build_reward_model(
        cfg.model, pad_id, weights_dtype(cfg), cfg.trust_remote_code, pick_device(), distributed.load_on()
    )
    distributed.shard(model, cfg.lora)  # under FSDP: the accuracy measured before training runs on the shards
    model, sizes = offline.make_trainable(model, cfg, apply_reward_lora)
    fresh = not cfg.resume_from
    train_before = evaluate(cfg, model, held_in, pad_id)[0] if held_in and fresh else None
    evaluation = offline.LastEvaluation(lambda m: evaluate(cfg, m, eval_examples, pad_id))
    eval_before = evaluation.evaluate(model)[0] if eval_examples and fresh and cfg.eval_before else None

    # 3. Train with the shared loop, watched by the failure monitors. It evaluates every eval_every steps and
    #    at the end, and the last outcomes feed the summary. With early stopping it measures the validation
    #    pairs only, and eval_data once, on the best weights, after.
    monitors = default_monitors("rm")
    best = BestWeights(cfg.early_stopping_patience) if validation else None
    eval_fn = evaluation if eval_examples else None
    if best is not None:
        eval_fn = partial(measure_validation, cfg, validation=validation, pad_id=pad_id, best=best)
    result = train(
        cfg, model, train_examples, partial(collate, pad_id=pad_id), partial(rm_step, cfg=cfg), run_dir,
        eval_fn=eval_fn,
        on_log=(lambda _step, _row: "stop" if best.should_stop else None) if best is not None else None,
        monitors=monitors,
    )  # fmt: skip
    early_stopping: dict | None = None
    if best is not None:
        early_stopping = restore_best(cfg, model, best, result.steps, len(train_examples), len(validation))
        if eval_examples:
            evaluation(model)

    # 4. Held-in and held-out loss/accuracy/margin, accuracy with a bootstrap interval, reward statistics.
    summary = {
        **offline.summary_head("rm", cfg, run_dir, result),
        "train_pairs": len(train_examples),
        "skipped_rows": len(train_rows.skipped),
        "truncated_pairs": train_examples.encoded.n_truncated(),
        **sizes,
        **offline.loop_summary(result, monitors),
    }
    if early_stopping is not None:
        summary["early_stopping"] = early_stopping
    reward_stats: dict = {}
    if held_in:
        train_after, _, held_in_rewards = evaluate(cfg, model, held_in, pad_id)
        summary.update(train_eval_pairs=len(held_in), train_before=train_before, train_after=train_after)
        reward_stats = reward_statistics("train", held_in_rewards)
    if eval_examples:
        eval_after, correct, eval_rewards = evaluation.outcome
        summary.update(eval_pairs=len(eval_examples), eval_before=eval_before, eval_after=eval_after)
        summary.update(offline.accuracy_summary(correct, seed=cfg.seed))
        reward_stats.update(reward_statistics("eval", eval_rewards))
    summary.update(reward_stats)

    # 5. The final reward model: plain transformers weights + ALIGNKIT_REWARD.json (lengths, statistics).
    distributed.save_from_main(
        model,
        lambda state_dict: save_reward_model(
            model,
            tokenizer,
            run_dir.final_dir,
            cfg.max_length,
            cfg.max_prompt_length,
            state_dict=state_dict,
            base_model=cfg.model,
            **reward_stats,
        ),
    )
    # 6. Is it a preference model or a length model? (diagnostics)
    if eval_examples:
        summary["diagnostics"] = diagnostics(cfg, eval_examples, eval_rewards, pad_id)
        summary["warnings"] = summary["diagnostics"]["warnings"]
    return offline.write_summary(run_dir, summary, started)


STAGE = Stage("rm", RMConfig, run)
