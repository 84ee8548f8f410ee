"""The held-out gold evaluation of the online stages (ppo, online-dpo, grpo), as in the synthetic-gold setup of Gao,
Schulman & Hilton 2022 ("Scaling Laws for Reward Model Overoptimization"): a gold scorer (``gold_reward=``) that
training never sees judges the policy's answers to held-out prompts (``gold_prompts=``); the proxy (the reward
trained on) scores the same answers, and their KL to the reference is estimated, so gold and proxy can be drawn
against the KL (the report's over-optimisation plot) and the proxy-vs-gold monitor has its signal. The fields are
``config.GoldFields``; the engine (``training.online_engine``) calls ``GoldEval`` on the rows it logs.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np
import torch

from alignkit.data.schemas import PromptExample, load_prompts
from alignkit.data.tokenize import encode_prompt
from alignkit.evaluation.metrics import kl_per_token
from alignkit.models.generation import SamplingConfig
from alignkit.scoring import Scorer, check_columns, load_scorer
from alignkit.training import distributed
from alignkit.training.online import derived_seed, sample_share
from alignkit.training.reference import Reference
from alignkit.training.rollout import sample_logprobs

if TYPE_CHECKING:  # the engine imports this module
    from alignkit.training.online_engine import OnlineSetup

GOLD_KEYS = ("gold_reward/mean", "gold_proxy/mean", "gold_kl", "gold_kl/per_response")


def gold_prompts(cfg) -> list[PromptExample]:
    """The held-out prompt rows of ``cfg.gold_prompts`` (gold_rows, then the first gold_max_prompts), with the
    bad-row policy of the config; an error when none is left. Each row's other columns go to both rewards, which
    must find the columns they take (``scoring.check_columns``)."""
    loaded = load_prompts(cfg.gold_prompts, cfg.on_bad_row, rows=cfg.gold_rows, limit=cfg.gold_max_prompts)
    print(f"gold prompts: {loaded.summary()}", file=sys.stderr)
    loaded.require_rows("gold_prompts")
    check_columns(cfg.gold_reward, loaded.examples, "gold_reward", "gold_prompts")
    check_columns(cfg.reward, loaded.examples, "reward", "gold_prompts")
    return loaded.examples


class GoldEval:
    """The policy's samples of the gold prompts, scored by the gold scorer and the proxy, with their KL to the
    reference. ``__call__`` returns the row's keys (``GOLD_KEYS``):

    - gold_reward/mean, gold_proxy/mean: the mean gold and proxy score of the samples (the proxy's own score,
      before any length_penalty);
    - gold_kl: KL(policy || reference) per response token, k1 = log p - log q averaged over the samples' tokens
      (Schulman 2020); gold_kl/per_response: its sum over each response, averaged (nats; Gao et al.'s KL).

    The samples are true samples of the policy (temperature 1, top_p 1: the KL estimate needs them, and a greedy
    reply is not what the trained policy says), drawn from the same seed at every evaluation (so a change between
    two is the policy's, not the draw's) on forked RNG (the training run is the same with or without it). In
    several processes each samples and scores its share of the generation batches, as the engine's rollouts.
    Each evaluation's samples go to gold_samples.jsonl (main process) for a per-prompt comparison after the run.
    """

    def __init__(self, cfg, setup: OnlineSetup, samples_path: Path | None):
        self.cfg, self.tokenizer, self.device = cfg, setup.tokenizer, setup.device
        self.proxy: Scorer = setup.scorer
        self.reference: Reference = setup.reference
        self.rank, self.world, self.samples_path = setup.rank, setup.world, samples_path
        examples = gold_prompts(cfg)
        self.prompts, self.columns = [ex.prompt for ex in examples], [ex.columns for ex in examples]
        self.prompt_ids = [encode_prompt(self.tokenizer, p, cfg.max_prompt_length) for p in self.prompts]
        self.gold = load_scorer(
            cfg.gold_reward,
            "gold_reward",
            dtype=cfg.dtype,
            device=self.device,
            trust_remote_code=cfg.trust_remote_code,
            batch_size=cfg.reward_batch_size,
        )
        self.sampling = SamplingConfig(cfg.max_new_tokens, 1.0, 1.0, derived_seed(cfg.seed, 0, 3))

    @classmethod
    def of(cls, cfg, setup: OnlineSetup, samples_path: Path | None) -> GoldEval | None:
        """The evaluation a config asks for; None without gold_reward. ``samples_path``: None outside the main
        process."""
        return cls(cfg, setup, samples_path) if cfg.gold_reward is not None else None

    def due(self, unit: int, last: int, first_logged: bool) -> bool:
        """Whether the logged row of ``unit`` carries the gold keys: the first row a process logs
        (``first_logged``: the monitors check their keys there, after a resume too), every gold_every units,
        and the ``last``."""
        return first_logged or unit % self.cfg.gold_every == 0 or unit == last

    def __call__(self, policy: torch.nn.Module, step: int) -> dict[str, float]:
        """Evaluate ``policy`` (in eval mode, without gradients) and write its samples under ``step``."""
        devices = [self.device] if self.device.type == "cuda" else []
        was_training = policy.training
        try:
            with torch.random.fork_rng(devices=devices), torch.no_grad():
                policy.eval()
                return self._evaluate(policy, step)
        finally:
            policy.train(was_training)

    def _evaluate(self, policy: torch.nn.Module, step: int) -> dict[str, float]:
        cfg, rank, world = self.cfg, self.rank, self.world
        # 1. This process's samples (transformers' generate on the policy, whatever the training backend).
        mine = sample_share(cfg, policy, self.tokenizer, self.prompt_ids, self.sampling, rank, world)
        prompts, texts = [self.prompts[i] for i in mine], [g.text for g in mine.values()]
        columns = [self.columns[i] for i in mine]
        # 2. Gold and proxy scores of them, then every process's samples and scores in every process.
        gold = self.gold.score(prompts, texts, columns) if mine else []
        proxy = self.proxy.score(prompts, texts, columns) if mine else []
        gathered = distributed.gather_dicts(dict(zip(mine, zip(mine.values(), gold, proxy))))
        generations = [g for g, _, _ in gathered.values()]
        gold, proxy = [s for _, s, _ in gathered.values()], [s for _, _, s in gathered.values()]
        # 3. KL to the reference on the policy's own samples (each process its share of the forward passes).
        ref_logps, logps = sample_logprobs(
            cfg, policy, self.reference, generations, rank, world, batch_size=cfg.generation_batch_size
        )
        kl = kl_per_token(logps, ref_logps)
        self._write(step, generations, gold, proxy)
        return {
            "gold_reward/mean": float(np.mean(gold)),
            "gold_proxy/mean": float(np.mean(proxy)),
            "gold_kl": kl.k1,
            "gold_kl/per_response": float(kl.per_sequence.mean()),
        }

    def _write(self, step: int, generations, gold: list[float], proxy: list[float]) -> None:
        if self.samples_path is None:
            return
        with open(self.samples_path, "a", encoding="utf-8") as f:
            for prompt, g, gold_score, proxy_score in zip(self.prompts, generations, gold, proxy):
                row = {"step": step, "prompt": prompt, "response": g.text, "gold": gold_score}
                f.write(json.dumps(row | {"proxy": proxy_score, "finished": g.finished}) + "\n")
