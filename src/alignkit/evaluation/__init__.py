"""Evaluation: pure metrics over samples and scores (``metrics``) and the failure monitors a training
run plugs into its logging hook (``monitors``)."""

from __future__ import annotations

from alignkit.evaluation.metrics import (
    Estimate,
    KLEstimates,
    Stats,
    bootstrap_ci,
    distinct_n,
    distinct_n_ids,
    entropy_from_logits,
    kl_per_token,
    length_stats,
    mean_ci,
    mean_entropy,
    pearson,
    win_rate,
    win_rate_from_outcomes,
)
from alignkit.evaluation.monitors import (
    BlindMonitorError,
    Event,
    KLExplosionMonitor,
    KTOLikelihoodDisplacementMonitor,
    LikelihoodDisplacementMonitor,
    ModeCollapseMonitor,
    Monitor,
    MonitorSet,
    NonFiniteMonitor,
    RewardHackingMonitor,
    SampleDriftMonitor,
    default_monitors,
)

__all__ = [
    "BlindMonitorError",
    "Estimate",
    "Event",
    "KLEstimates",
    "KLExplosionMonitor",
    "KTOLikelihoodDisplacementMonitor",
    "LikelihoodDisplacementMonitor",
    "ModeCollapseMonitor",
    "Monitor",
    "MonitorSet",
    "NonFiniteMonitor",
    "RewardHackingMonitor",
    "SampleDriftMonitor",
    "Stats",
    "bootstrap_ci",
    "default_monitors",
    "distinct_n",
    "distinct_n_ids",
    "entropy_from_logits",
    "kl_per_token",
    "length_stats",
    "mean_ci",
    "mean_entropy",
    "pearson",
    "win_rate",
    "win_rate_from_outcomes",
]
