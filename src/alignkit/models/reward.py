"""Reward models: a causal LM checkpoint turned into ``AutoModelForSequenceClassification(num_labels=1)``,
whose linear ``score`` head reads the final hidden state of the last real token of prompt + response + EOS.
Building one, pooling its reward, saving it, loading it again in a fresh process, and scoring text.

Why our own pooling rather than the model's forward: transformers' decoder sequence classifiers
(``GenericForSequenceClassification.forward``) pool "the rightmost token that is not ``pad_token_id``".
Where the pad token is the EOS token (SmolLM2: both are ``<|im_end|>``, id 2), that is the token *before*
the response's EOS, and it would never read the EOS that every alignkit completion ends with. We take the
last position where ``attention_mask`` is 1 instead, which is the EOS whatever the pad token is. A
model saved here still loads with plain transformers; its forward gives the same rewards only where pad
and EOS differ, so use ``sequence_rewards`` (or ``RewardModel.score``) to reproduce alignkit's numbers.
"""

from __future__ import annotations

import json
import os
from dataclasses import dataclass
from functools import partial
from pathlib import Path
from typing import Any

import torch
from torch import nn
from tqdm.auto import tqdm

from alignkit.data.collate import collate_sft
from alignkit.data.schemas import Prompt
from alignkit.data.tokenize import Encoded, encode, encode_pair
from alignkit.models.forward import sharded_outside_forward
from alignkit.models.loading import (
    ModelLoadError,
    load_pretrained,
    load_tokenizer,
    model_load_errors,
    pick_device,
    pick_dtype,
    resolve_model,
    save_final,
)
from alignkit.models.precision import without_autocast

REWARD_RECORD = "ALIGNKIT_REWARD.json"
POOLING = "last attended token (the EOS after the response)"


# ---------------------------------------------------------------------------------------------
# Building and pooling
# ---------------------------------------------------------------------------------------------


def build_reward_model(
    name: str,
    pad_token_id: int,
    dtype: str | torch.dtype = "auto",
    trust_remote_code: bool = False,
    device: torch.device | str | None = None,
    load_on: str | None = None,
):
    """A sequence classifier with one output on the backbone of ``name`` (a causal LM or a reward model), on
    ``device``, or first on ``load_on`` as ``alignkit.models.loading.load_model`` places it.

    From a causal LM, transformers keeps the backbone and initialises the ``score`` head (normal, std
    initializer_range) and reports it as newly initialised, as expected. From a reward model saved by
    alignkit, the trained head is loaded. ``pad_token_id`` goes into the config so transformers' own forward
    accepts batches; alignkit's pooling does not depend on it (see the module docstring).
    """
    from transformers import AutoModelForSequenceClassification

    model = load_pretrained(
        AutoModelForSequenceClassification, name, dtype, trust_remote_code, device, load_on, num_labels=1
    )
    model.config.pad_token_id = pad_token_id
    if not isinstance(getattr(_unwrap(model), "score", None), nn.Module):
        raise ModelLoadError(
            f"{type(model).__name__} has no 'score' head; alignkit reward models need a decoder model "
            "whose sequence classifier is transformers' generic one (Llama, Mistral, Qwen2, SmolLM2, ...)"
        )
    return model


def apply_reward_lora(model, cfg: Any):
    """LoRA adapters (TrainConfig fields lora_r/alpha/dropout/target_modules) plus a fully trained head.

    PEFT's SEQ_CLS task trains the ``score`` head in full next to the adapters (``modules_to_save``): the
    head starts random, so adapters alone could not learn a reward. (``loading.apply_lora`` uses the
    CAUSAL_LM task, which expects a generating model.)
    """
    from peft import LoraConfig, get_peft_model
    from transformers.pytorch_utils import Conv1D

    linear = {
        name.rsplit(".", 1)[-1] for name, m in model.named_modules() if isinstance(m, (nn.Linear, Conv1D))
    }
    targets = [t for t in cfg.lora_target_modules if t in linear and t != "score"]
    if not targets:
        raise ModelLoadError(
            f"none of lora_target_modules {list(cfg.lora_target_modules)} is a linear layer of this model; "
            f"its linear layers are: {', '.join(sorted(linear))}"
        )
    lora_config = LoraConfig(
        r=cfg.lora_r,
        lora_alpha=cfg.lora_alpha,
        lora_dropout=cfg.lora_dropout,
        target_modules=targets,
        task_type="SEQ_CLS",  # adds modules_to_save=["classifier", "score"]
    )
    return get_peft_model(model, lora_config)


def _unwrap(model):
    """The transformers model under a PEFT wrapper (LoRA layers stay active inside it)."""
    return model.get_base_model() if hasattr(model, "get_base_model") else model


def sequence_rewards(model, input_ids: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
    """Scalar reward of each row: the score head on the final hidden state of its last attended token.

    input_ids, attention_mask: (B, T), right-padded (as ``collate_sft``/``collate_pairs`` build them).
    Returns (B,) float32.
    """
    base = _unwrap(model)
    positions = torch.arange(input_ids.shape[1], device=input_ids.device)  # (T,)
    # The largest position with attention 1; with right padding that is the EOS closing the response.
    last = (positions * attention_mask).argmax(-1)  # (B,)
    rows = torch.arange(input_ids.shape[0], device=input_ids.device)  # (B,)
    if sharded_outside_forward(base.score.weight):
        # FSDP gathers the weights only in the model's own forward: run it whole and keep the score head's
        # output at every position (B, T, 1) from the way through; transformers' own pooling is not used.
        scores = []
        hook = base.score.register_forward_hook(lambda _module, _inputs, output: scores.append(output))
        try:
            base(input_ids=input_ids, attention_mask=attention_mask, use_cache=False)
        finally:
            hook.remove()
        return scores[0][rows, last].squeeze(-1).float()  # (B,)
    backbone = getattr(base, base.base_model_prefix)
    hidden = backbone(
        input_ids=input_ids, attention_mask=attention_mask, use_cache=False
    ).last_hidden_state  # (B, T, H)
    pooled = hidden[rows, last]  # (B, H)
    # The head in its weights' dtype, outside autocast: in mixed precision a bf16 reward (3 significant digits)
    # would round away the small differences the Bradley-Terry loss and the PPO advantages are made of.
    with without_autocast(pooled.device.type):
        return base.score(pooled.to(base.score.weight.dtype)).squeeze(-1).float()  # (B,)


# ---------------------------------------------------------------------------------------------
# Saving and loading
# ---------------------------------------------------------------------------------------------


def save_reward_model(
    model,
    tokenizer,
    path: str | os.PathLike,
    max_length: int,
    max_prompt_length: int | None,
    state_dict: dict | None = None,
    **extra: Any,
) -> Path:
    """Save a (LoRA-merged) reward model, its tokenizer and ``ALIGNKIT_REWARD.json`` (how its rewards are
    computed, the lengths it was trained with, and ``extra`` facts such as reward statistics). ``state_dict``:
    see ``save_final``."""
    path = save_final(model, tokenizer, path, merge_lora=True, state_dict=state_dict)
    record = {
        "format": "AutoModelForSequenceClassification, num_labels=1",
        "pooling": POOLING,
        "load": "alignkit.models.reward.load_reward_model(PATH)",
        "max_length": max_length,
        "max_prompt_length": max_prompt_length,
        **extra,
    }
    tmp = path / f".{REWARD_RECORD}.tmp"
    tmp.write_text(json.dumps(record, indent=2) + "\n")
    os.replace(tmp, path / REWARD_RECORD)
    return path


@dataclass
class RewardModel:
    """A loaded reward model with its tokenizer and the lengths it encodes text with."""

    model: Any  # AutoModelForSequenceClassification, eval mode, frozen
    tokenizer: Any
    max_length: int = 1024
    max_prompt_length: int | None = None
    path: str = ""

    @torch.no_grad()
    def score(
        self,
        prompts: list[Prompt],
        responses: list[str],
        batch_size: int = 16,
        progress: bool = False,
    ) -> list[float]:
        """Reward of each (prompt, response), encoded exactly as the policy sees it (chat template,
        response + EOS, truncated like training data)."""
        if len(prompts) != len(responses):
            raise ValueError(f"{len(prompts)} prompts but {len(responses)} responses")
        enc = partial(
            encode, self.tokenizer, max_length=self.max_length, max_prompt_length=self.max_prompt_length
        )
        return self._score_encoded([enc(p, r) for p, r in zip(prompts, responses)], batch_size, progress)

    @torch.no_grad()
    def score_pairs(
        self,
        prompts: list[Prompt],
        chosen: list[str],
        rejected: list[str],
        batch_size: int = 16,
        progress: bool = False,
    ) -> tuple[list[float], list[float]]:
        """Rewards of both sides of each pair, encoded as ``alignkit rm`` encodes its training pairs."""
        enc = partial(
            encode_pair, self.tokenizer, max_length=self.max_length, max_prompt_length=self.max_prompt_length
        )
        pairs = [enc(p, c, r) for p, c, r in zip(prompts, chosen, rejected, strict=True)]
        rows = [Encoded(e.prompt_ids, e.chosen_ids, e.truncated) for e in pairs]
        rows += [Encoded(e.prompt_ids, e.rejected_ids, e.truncated) for e in pairs]
        scores = self._score_encoded(rows, batch_size, progress)
        return scores[: len(pairs)], scores[len(pairs) :]

    def _score_encoded(self, encoded: list[Encoded], batch_size: int, progress: bool) -> list[float]:
        device = next(self.model.parameters()).device
        # Longest first, so batches need little padding and an out-of-memory error comes at once.
        order = sorted(
            range(len(encoded)), key=lambda i: -len(encoded[i].prompt_ids) - len(encoded[i].completion_ids)
        )
        scores: list[float] = [0.0] * len(encoded)
        pad_id = self.tokenizer.pad_token_id
        for start in tqdm(
            range(0, len(order), batch_size), desc="scoring", disable=not progress, unit="batch"
        ):
            idx = order[start : start + batch_size]
            batch = collate_sft([encoded[i] for i in idx], pad_id)
            rewards = sequence_rewards(
                self.model, batch["input_ids"].to(device), batch["attention_mask"].to(device)
            )
            for i, r in zip(idx, rewards.tolist()):
                scores[i] = r
        return scores


def load_reward_model(
    path: str | os.PathLike,
    dtype: str = "auto",
    device: torch.device | str | None = None,
    trust_remote_code: bool = False,
) -> RewardModel:
    """Load a reward model saved by ``alignkit rm`` (or any decoder ``*ForSequenceClassification`` with one
    label), frozen, in eval mode, with the tokenizer saved next to it."""
    from transformers import AutoConfig, AutoModelForSequenceClassification

    resolved = resolve_model(str(path))
    with model_load_errors(str(path), "config"):
        config = AutoConfig.from_pretrained(resolved, trust_remote_code=trust_remote_code)
    architectures = getattr(config, "architectures", None) or []
    if not any(a.endswith("ForSequenceClassification") for a in architectures) or config.num_labels != 1:
        raise ModelLoadError(
            f"{path} is not a reward model (architectures {architectures}, {config.num_labels} labels); "
            "train one with `alignkit rm` (its final/ folder is what to pass here)"
        )
    device = torch.device(device) if device is not None else pick_device()
    tokenizer = load_tokenizer(resolved, trust_remote_code)
    with model_load_errors(str(path), "model"):
        model = AutoModelForSequenceClassification.from_pretrained(
            resolved, dtype=pick_dtype(dtype, device, "score"), trust_remote_code=trust_remote_code, use_safetensors=True
        ).to(device)
    model.eval().requires_grad_(False)
    record_file = Path(resolved) / REWARD_RECORD
    record = json.loads(record_file.read_text()) if record_file.is_file() else {}
    return RewardModel(
        model=model,
        tokenizer=tokenizer,
        max_length=record.get("max_length") or 1024,
        max_prompt_length=record.get("max_prompt_length"),
        path=str(path),
    )
