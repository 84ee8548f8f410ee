"""The policy's own samples while an offline stage trains (sft, dpo/ipo/orpo, kto), for the failure monitors
that need generations: mode collapse (distinct-2) and sample drift. Off by default (``sample_every=0``); on,
a few held-out prompts are answered at the first row a process logs and every ``sample_every`` steps, and
that row carries distinct_2, len/mean, eos_frac and sample_drift.
"""

from __future__ import annotations

import sys
from dataclasses import dataclass

import numpy as np
import torch

from alignkit.config import ConfigError, Fields, doc_field
from alignkit.evaluation.metrics import distinct_n
from alignkit.models import precision
from alignkit.models.forward import sequence_logprobs
from alignkit.models.generation import Generation, SamplingConfig, generate
from alignkit.training import distributed
from alignkit.training.rollout import collate_samples


@dataclass
class SampleWatchFields(Fields):
    """Sampling a few held-out prompts during training, for the mode-collapse and sample-drift monitors."""

    # --- monitoring ---
    sample_every: int = doc_field(
        0,
        "Answer sample_prompts held-out prompts at the first logged row and every N optimizer steps, logging "
        "distinct_2, len/mean, eos_frac and sample_drift (the mode-collapse and sample-drift monitors run only "
        "then); a multiple of log_every; 0: never.",
        ge=0,
    )
    sample_prompts: int = doc_field(
        8, "Prompts answered each time: the first N distinct ones of eval_data (else train_data).", ge=1
    )
    sample_max_new_tokens: int = doc_field(48, "Longest sampled response in tokens.", ge=1)

    def check(self) -> None:
        super().check()
        log_every = getattr(self, "log_every", 1)
        if self.sample_every and self.sample_every % log_every:
            raise ConfigError(
                f"config key 'sample_every' must be a multiple of log_every ({log_every}): the samples' metrics "
                f"ride in the logged rows; got {self.sample_every}",
                ("sample_every", "log_every"),
            )


def first_distinct(prompt_ids: list[list[int]], n: int) -> list[list[int]]:
    """The first ``n`` distinct prompts (pairs and KTO's halves repeat theirs), in order."""
    seen, out = set(), []
    for ids in prompt_ids:
        if tuple(ids) not in seen:
            seen.add(tuple(ids))
            out.append(list(ids))
        if len(out) == n:
            break
    return out


class SampleWatch:
    """``sample_fn`` of ``alignkit.training.loop.train``: called at every logged row, it returns the metrics of
    the policy's samples when they are due (the first row this process logs, so the monitors' key check and
    baselines have them after a resume too, then every ``sample_every`` steps), else nothing.

    Built before training, on the starting weights (a resumed run loads its checkpoint later, inside ``train``),
    it samples the starting model's responses once. ``sample_drift`` is then KL(start || policy) estimated on
    them: the mean over the prompts of log p_start(y) - log p_policy(y), nats per sequence. That direction needs
    the policy alone, so it works for every reference mode and for SFT and ORPO, which have no reference.
    Responses are drawn at temperature 1 (true samples, which the estimate needs) from one fixed seed each time
    (the same random numbers at every step, so a change is the policy's, not the draw's), on forked RNG: the
    training run is the same whether it samples or not.
    """

    def __init__(self, cfg, model, tokenizer, prompt_ids: list[list[int]]):
        if distributed.world_size() > 1:
            raise ConfigError(
                "sample_every > 0 runs in one process only (the samples are not yet shared among processes); "
                "set sample_every=0 when launching several",
                ("sample_every",),
            )
        self.every, self.chunk_size = cfg.sample_every, cfg.logprob_chunk_size
        self.tokenizer = tokenizer
        self.device = next(model.parameters()).device
        self.precision = precision.of_config(cfg, self.device)
        self.prompts = first_distinct(prompt_ids, cfg.sample_prompts)
        self.sampling = SamplingConfig(cfg.sample_max_new_tokens, temperature=1.0, top_p=1.0, seed=cfg.seed)
        self.sampled = False
        print(f"sampling {len(self.prompts)} prompts every {self.every} steps", file=sys.stderr)
        self.start, self.start_logps = self._in_eval(model, self._sample_and_score)

    @classmethod
    def of(cls, cfg, model, tokenizer, prompt_ids: list[list[int]]) -> SampleWatch | None:
        """The watch a config asks for; None with ``sample_every=0``."""
        return cls(cfg, model, tokenizer, prompt_ids) if cfg.sample_every else None

    def __call__(self, model, step: int) -> dict[str, float]:
        if self.sampled and step % self.every:
            return {}
        self.sampled = True
        return self._in_eval(model, self._metrics)

    def _in_eval(self, model, fn):
        """``fn(model)`` in eval mode, without gradients, in the run's precision, on forked RNG."""
        devices = [self.device] if self.device.type == "cuda" else []
        was_training = model.training
        try:
            with torch.random.fork_rng(devices=devices), torch.no_grad(), self.precision.autocast():
                model.eval()
                return fn(model)
        finally:
            model.train(was_training)

    def _sample_and_score(self, model) -> tuple[list[Generation], torch.Tensor]:
        generations = generate(model, self.tokenizer, self.prompts, self.sampling, progress=False)
        return generations, self._logps(model, generations)

    def _logps(self, model, generations: list[Generation]) -> torch.Tensor:
        """(N,) summed log-prob of each response given its prompt under ``model``, nats."""
        batch = collate_samples(generations, self.tokenizer.pad_token_id, self.device)
        lp = sequence_logprobs(
            model, batch["input_ids"], batch["attention_mask"], batch["loss_mask"], self.chunk_size
        )
        return lp.sum.float().cpu()

    def _metrics(self, model) -> dict[str, float]:
        generations = generate(model, self.tokenizer, self.prompts, self.sampling, progress=False)
        drift = (self.start_logps - self._logps(model, self.start)).mean().item()
        return {
            "distinct_2": distinct_n([g.text for g in generations], 2),
            "len/mean": float(np.mean([len(g.response_ids) for g in generations])),
            "eos_frac": float(np.mean([g.finished for g in generations])),
            "sample_drift": drift,
        }
