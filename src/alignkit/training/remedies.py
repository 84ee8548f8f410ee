"""What the online stages do when a failure monitor fires, beyond a warning: the seed's remedies. A length
penalty on the reward (against paying for length), raising the KL coefficient (the "adjust" action, against
reward hacking and mode collapse) or PPO's entropy bonus (mode collapse's "raise_entropy"), and keeping the weights of the best gold score when the proxy-vs-gold
check stops a run (over-optimisation, Gao et al. 2022). The monitors are ``evaluation.monitors``; the engine
(``training.online_engine``) wires these to them.
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import torch

GOLD_KEY = "gold_reward/mean"  # the logged held-out gold score RewardHackingMonitor's check (b) reads


def length_penalised(scores: Sequence[float], lengths: Sequence[int], coef: float) -> list[float]:
    """score_i - coef * n_i, n_i the response's token count: the reward with a price on every token, so a policy
    gains from a longer reply only where the reward pays more than coef per token (Singhal et al. 2023, "A Long
    Way to Go", find much of RLHF's reward gain is length). coef = 0 returns the scores unchanged."""
    if len(scores) != len(lengths):
        raise ValueError(f"{len(scores)} scores for {len(lengths)} lengths")
    return [float(s) - coef * n for s, n in zip(scores, lengths)]


def monitor_actions(cfg) -> dict[str, str]:
    """The monitor actions an online stage's config chose (``config.OnlineRemedyFields``), by monitor name.
    Mode collapse's "raise_entropy" is an "adjust" to the monitors (apply the run's remedy and go on); the run
    picks the remedy by the event's monitor (``online_engine.OnlineRun.wire_remedies``)."""
    mode_collapse = cfg.mode_collapse_action
    return {
        "reward_hacking": cfg.reward_hacking_action,
        "mode_collapse": "adjust" if mode_collapse == "raise_entropy" else mode_collapse,
        "gold_divergence": cfg.gold_divergence_action,
        "kl_explosion": cfg.kl_explosion_action,
    }


def raise_kl_coef(controller, factor: float) -> dict[str, float]:
    """PPO's remedy: beta *= factor; an adaptive controller's target KL is also divided by factor, or it would
    walk beta back down toward the old target's level. Returns the old and new values (the event's)."""
    changed = {"beta_old": controller.beta, "beta_new": controller.beta * factor}
    controller.beta *= factor
    if hasattr(controller, "target"):  # AdaptiveKLController
        changed |= {"kl_target_old": controller.target, "kl_target_new": controller.target / factor}
        controller.target /= factor
    return changed


class AdjustableCoef:
    """A loss coefficient the monitors' remedies change as the run goes, held by ``holder`` (the copy of the
    config its loss reads) under ``name``: online DPO's and GRPO's ``beta`` (they have no KL controller; the
    "adjust" action multiplies it), PPO's ``ent_coef`` (mode collapse's "raise_entropy" action adds to it). The
    method's checkpoints keep it (``state_dict``)."""

    def __init__(self, holder, name: str = "beta") -> None:
        self.holder, self.name = holder, name

    @property
    def value(self) -> float:
        return getattr(self.holder, self.name)

    def set(self, value: float) -> dict[str, float]:
        """The coefficient becomes ``value``; returns the old and new values (the event's)."""
        old = self.value
        setattr(self.holder, self.name, value)
        return {f"{self.name}_old": old, f"{self.name}_new": value}

    def adjust(self, factor: float) -> dict[str, float]:
        """coefficient *= factor (the "adjust" action on a beta); returns the old and new values."""
        return self.set(self.value * factor)

    def state_dict(self) -> dict[str, float]:
        return {self.name: self.value}

    def load_state_dict(self, state: dict) -> None:
        # A checkpoint written before the remedy existed holds no value: the config's stands.
        setattr(self.holder, self.name, state.get(self.name, self.value))


class BestGold:
    """The trained parameters at the unit with the highest logged gold score so far, copied to the CPU, to be
    put back when the proxy-vs-gold check stops the run (final/ is then that unit's policy). In memory only: a
    resumed run keeps the best from its resume on (the metrics before it say where the earlier best was)."""

    def __init__(self) -> None:
        self.unit: int | None = None
        self.gold = -math.inf
        self._saved: list[torch.Tensor] = []

    def observe(self, unit: int, row: dict, params: list[torch.nn.Parameter]) -> None:
        """Keep a copy of ``params`` when ``row``'s gold score is finite and higher than every earlier one."""
        gold = row.get(GOLD_KEY)
        if isinstance(gold, (int, float)) and math.isfinite(gold) and gold > self.gold:
            self.unit, self.gold = unit, float(gold)
            self._saved = [p.detach().to("cpu", copy=True) for p in params]

    def restore(self, params: list[torch.nn.Parameter]) -> bool:
        """Put the kept copy back into ``params`` (the same list observed); False when none was kept."""
        if self.unit is None:
            return False
        with torch.no_grad():
            for p, saved in zip(params, self._saved, strict=True):
                p.copy_(saved.to(p.device))
        return True
