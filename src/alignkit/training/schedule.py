"""The optimizer every stage trains with (AdamW from the config's fields) and its learning-rate schedules: linear
warmup, then constant, linear or cosine decay, expressed as a multiplier of the peak learning rate for
``torch.optim.lr_scheduler.LambdaLR``.
"""

from __future__ import annotations

import math
from collections.abc import Callable

import torch


def lr_multiplier(kind: str, warmup_steps: int, total_steps: int) -> Callable[[int], float]:
    """The factor of the peak LR used by optimizer step ``s`` (0-based), for ``LambdaLR``.

    Warmup: step s < W uses (s + 1) / (W + 1), so the first step is not wasted at LR 0 and the peak is
    reached at the first step after warmup. After warmup, with progress p = (s - W) / (T - W) in [0, 1):
    constant 1; linear 1 - p; cosine (1 + cos(pi p)) / 2 (Loshchilov & Hutter 2017, SGDR, without restarts).
    Both decays would reach 0 one step after the last, so the last step still learns something.
    """
    if kind not in ("constant", "linear", "cosine"):
        raise ValueError(f"unknown lr_scheduler {kind!r}; expected constant, linear or cosine")
    decay_steps = max(1, total_steps - warmup_steps)

    def multiplier(step: int) -> float:
        if step < warmup_steps:
            return (step + 1) / (warmup_steps + 1)
        progress = min(1.0, (step - warmup_steps) / decay_steps)
        if kind == "linear":
            return 1.0 - progress
        if kind == "cosine":
            return 0.5 * (1.0 + math.cos(math.pi * progress))
        return 1.0

    return multiplier


def build_scheduler(
    optimizer: torch.optim.Optimizer, kind: str, warmup_steps: int, total_steps: int
) -> torch.optim.lr_scheduler.LambdaLR:
    # A plain closure (not a callable object) so LambdaLR.state_dict() holds only numbers and the
    # checkpoint loads with torch.load(weights_only=True).
    return torch.optim.lr_scheduler.LambdaLR(optimizer, lr_multiplier(kind, warmup_steps, total_steps))


def build_optimizer(params: list[torch.nn.Parameter], cfg) -> torch.optim.AdamW:
    """AdamW over ``params`` with the learning_rate, adam_beta1/2, adam_eps and weight_decay of ``cfg`` (a
    TrainConfig). Fused where torch allows it: the same update in one pass over each tensor, ~1 s less per step
    for a 135M model on 2 CPU cores than the multi-pass implementation (TRL's and transformers' default)."""
    devices = {p.device.type for p in params}
    fused = len(devices) == 1 and devices <= {"cpu", "cuda"} and all(p.is_floating_point() for p in params)
    return torch.optim.AdamW(
        params,
        lr=cfg.learning_rate,
        betas=(cfg.adam_beta1, cfg.adam_beta2),
        eps=cfg.adam_eps,
        weight_decay=cfg.weight_decay,
        fused=fused,
    )
