"""Which dtype a model runs in, decided here and nowhere else: what ``dtype=auto`` means for each use
(training, generation, scoring) on this hardware, and how training holds its weights (mixed precision: fp32
master weights and AdamW state, bf16 compute under autocast; or, asked for explicitly, pure bf16).

``ALIGNKIT_FAST_BF16=1`` makes ``auto`` act as on a CPU with AMX (bf16 where the table below says so),
``ALIGNKIT_FAST_BF16=0`` as on one without (fp32 everywhere); unset, the hardware decides. The test suite runs
both ways with it.
"""

from __future__ import annotations

import contextlib
import functools
import os
import warnings
from dataclasses import dataclass
from pathlib import Path
from typing import Literal

import torch

FAST_BF16_ENV = "ALIGNKIT_FAST_BF16"

Use = Literal["train", "generate", "score"]
Precision = Literal["mixed", "pure"]

DTYPES = {
    "float32": torch.float32,
    "fp32": torch.float32,
    "bfloat16": torch.bfloat16,
    "bf16": torch.bfloat16,
    "float16": torch.float16,
    "fp16": torch.float16,
}

# What ``auto`` picks for each use where bf16 is fast (CUDA GPUs with bf16, CPUs with AMX); everywhere else
# fp32. Measured with benchmarks/dtype_per_use.py. With AMX (issue 16, 2 cores): HF generate of SmolLM2 106 tok/s
# in bf16 against 81 in fp32. Without AMX the picture depends on the CPU and the size: on an AVX-512 Xeon with
# avx512_bf16 (torch 2.13, 1 thread, a loaded machine) SmolLM2 trained 1.5x, generated 1.5x and scored 2.2x
# faster in bf16, while the tests' tiny model ran 0.7x; an older measurement on the same kind of Xeon had a
# bf16 matmul 5x slower. Until a quiet machine settles it, auto keeps fp32 there (exact, never much slower).
AUTO_WHERE_BF16_IS_FAST: dict[str, torch.dtype] = {
    "train": torch.bfloat16,  # as the compute dtype of mixed precision: the weights stay fp32
    "generate": torch.bfloat16,
    "score": torch.bfloat16,
}


@functools.cache
def _cpu_flags() -> frozenset[str]:
    """The CPU feature flags from /proc/cpuinfo (empty where there is no such file)."""
    try:
        text = Path("/proc/cpuinfo").read_text()
    except OSError:
        return frozenset()
    for line in text.splitlines():
        if line.startswith("flags"):
            return frozenset(line.split(":", 1)[1].split())
    return frozenset()


def bf16_is_fast(device: torch.device) -> bool:
    """Whether bf16 runs faster than fp32 on ``device``, as auto assumes: CUDA GPUs that support bf16, CPUs with
    AMX (``amx_bf16``; ``avx512_bf16`` alone is not counted: see ``AUTO_WHERE_BF16_IS_FAST``).
    ``ALIGNKIT_FAST_BF16`` (1 or 0) overrides the hardware."""
    forced = os.environ.get(FAST_BF16_ENV, "").strip()
    if forced:
        if forced not in ("0", "1"):
            from alignkit.config import ConfigError

            raise ConfigError(f"{FAST_BF16_ENV}={forced!r}: set it to 1 (bf16 is fast), 0 (it is not) or unset it")
        return forced == "1"
    if device.type == "cuda":
        return torch.cuda.is_bf16_supported()
    if device.type == "cpu":
        return "amx_bf16" in _cpu_flags()
    return False


def pick_dtype(
    pref: str | torch.dtype = "auto", device: torch.device | str | None = None, use: Use = "train"
) -> torch.dtype:
    """The dtype ``use`` computes in: an explicit name (or a torch dtype) maps directly; ``"auto"`` is
    ``AUTO_WHERE_BF16_IS_FAST[use]`` where ``bf16_is_fast(device)``, else fp32. (For training this is the
    compute dtype; ``train_precision`` says what the weights are held in.)"""
    if isinstance(pref, torch.dtype):
        return pref
    if pref != "auto":
        if pref not in DTYPES:
            from alignkit.models.loading import ModelLoadError

            raise ModelLoadError(f"unknown dtype '{pref}'; use one of auto, {', '.join(DTYPES)}")
        return DTYPES[pref]
    if device is None:
        from alignkit.models.loading import pick_device

        device = pick_device()
    return AUTO_WHERE_BF16_IS_FAST[use] if bf16_is_fast(torch.device(device)) else torch.float32


@dataclass(frozen=True)
class TrainPrecision:
    """How a training run holds and computes: ``weights`` is the dtype of the parameters (and so of the
    gradients and AdamW's state), ``compute`` the dtype the matmuls run in; where they differ (mixed
    precision) every forward pass runs under ``autocast()``."""

    weights: torch.dtype
    compute: torch.dtype
    device_type: str

    @property
    def mixed(self) -> bool:
        return self.weights != self.compute

    @property
    def name(self) -> str:
        """"float32", "bfloat16-mixed", "bfloat16-pure" (part of the reference cache's key, logged)."""
        dtype = str(self.compute).removeprefix("torch.")
        if self.compute == torch.float32:
            return dtype
        return f"{dtype}-{'mixed' if self.mixed else 'pure'}"

    def autocast(self):
        """The context every forward pass of the run goes in: torch's autocast to ``compute`` in mixed
        precision (matmuls in bf16, reductions, softmax and norms as autocast keeps them); else nothing."""
        if not self.mixed:
            return contextlib.nullcontext()
        return torch.autocast(self.device_type, dtype=self.compute)


def train_precision(dtype: str | torch.dtype, precision: Precision, device: torch.device | str) -> TrainPrecision:
    """The precision of a training run from its config's ``dtype`` and ``precision`` on ``device``.

    "mixed" (the default) in bf16/fp16: fp32 weights and AdamW state (master weights), compute under autocast.
    "pure": the weights themselves in bf16/fp16, no master copy (half the memory; small updates are lost).
    fp32: both fp32, no autocast."""
    device = torch.device(device)
    compute = pick_dtype(dtype, device, "train")
    if precision not in ("mixed", "pure"):
        from alignkit.config import ConfigError

        raise ConfigError(f"precision must be 'mixed' or 'pure', got {precision!r}")
    weights = compute if precision == "pure" else torch.float32
    return TrainPrecision(weights=weights, compute=compute, device_type=device.type)


def of_config(cfg, device: torch.device | str | None = None) -> TrainPrecision:
    """``train_precision`` of a training config (its ``dtype`` and ``precision`` fields) on ``device``
    (default: where alignkit trains)."""
    if device is None:
        from alignkit.models.loading import pick_device

        device = pick_device()
    return train_precision(cfg.dtype, getattr(cfg, "precision", "mixed"), device)


def autocast_for(cfg, model: torch.nn.Module):
    """The autocast context of the training run ``cfg`` for passes of ``model`` outside the shared loop's step
    (reference log-probs, evaluation, PPO's rollouts and sampling): the same as the step's."""
    return of_config(cfg, next(model.parameters()).device).autocast()


def in_training_precision(fn):
    """Decorate ``fn(cfg, model, ...)``, a pass of a training stage outside the shared loop's step (reference
    log-probs, evaluation, PPO's rollouts and sampling, a custom update's loss), to run under
    ``autocast_for(cfg, model)``: every forward of a run computes alike."""

    @functools.wraps(fn)
    def run_in_precision(cfg, model, *args, **kwargs):
        with autocast_for(cfg, model):
            return fn(cfg, model, *args, **kwargs)

    return run_in_precision


def weights_dtype(cfg) -> torch.dtype:
    """The dtype a training stage loads the models it trains (and their frozen references) in; under
    precision=pure a warning says what that loses."""
    prec = of_config(cfg)
    warn_if_pure(prec)
    return prec.weights


def warn_if_pure(prec: TrainPrecision) -> None:
    """Say, once per run, what pure bf16/fp16 training loses."""
    if prec.compute != torch.float32 and not prec.mixed:
        warnings.warn(
            f"precision=pure: the weights are held in {str(prec.compute).removeprefix('torch.')} with no fp32 "
            "master copy; an AdamW update "
            "smaller than about 1/256 of a weight (bf16) is rounded away, so at learning rates of 1e-6 to 1e-5 "
            "most weights never change. precision=mixed (the default) keeps fp32 master weights.",
            stacklevel=3,
        )


def without_autocast(device_type: str):
    """A block where autocast is off (fp32 stays fp32): small heads whose precision matters, PPO's value."""
    return torch.autocast(device_type, enabled=False)
