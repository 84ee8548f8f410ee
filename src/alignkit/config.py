"""Typed, documented configuration for every stage.

One dataclass per stage; each field carries a one-line doc. Configs load from YAML plus
``key=value`` overrides; unknown keys and missing required fields are errors that name them.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from typing import Any, Literal

MISSING_DOC = "required"


class ConfigError(ValueError):
    """A configuration problem, with a message that names the field."""


def doc_field(default: Any, doc: str) -> Any:
    """A dataclass field with a default and a one-line doc (shown by ``alignkit <stage> --help``)."""
    if isinstance(default, (list, dict, set)):
        return field(default_factory=lambda d=default: type(d)(d), metadata={"doc": doc})
    return field(default=default, metadata={"doc": doc})


def required(doc: str) -> Any:
    """A field with no sensible default: leaving it unset is an error that names it."""
    return field(default=None, metadata={"doc": doc, "required": True})


@dataclass
class TrainConfig:
    """Fields shared by every training stage."""

    # --- model ---
    model: str = doc_field(
        "smollm2-135m-instruct",
        "Model to train: the embedded default 'smollm2-135m-instruct', a Hugging Face id, or a local directory.",
    )
    trust_remote_code: bool = doc_field(False, "Allow code shipped with the model to run (off by default).")
    dtype: Literal["auto", "float32", "bfloat16", "float16"] = doc_field(
        "auto", "Weights/compute dtype; 'auto' picks bf16 only where the hardware runs it fast, else fp32."
    )
    # --- data ---
    train_data: str = required("Training data: a .jsonl/.json/.parquet/.csv file, a saved dataset dir or a hub id.")
    eval_data: str | None = doc_field(None, "Held-out data in the same schema, evaluated every eval_every steps.")
    train_split: str | None = doc_field(None, "Split name when train_data is a hub id or a DatasetDict.")
    eval_split: str | None = doc_field(None, "Split name when eval_data is a hub id or a DatasetDict.")
    max_train_rows: int | None = doc_field(None, "Use only the first N rows of train_data (file order).")
    max_eval_rows: int | None = doc_field(None, "Use only the first N rows of eval_data (file order).")
    on_bad_row: Literal["error", "skip"] = doc_field(
        "error", "What to do with an invalid row: stop with an error naming it, or skip it and count it."
    )
    max_length: int = doc_field(1024, "Longest prompt+completion in tokens; longer rows are truncated.")
    max_prompt_length: int | None = doc_field(
        None, "Longest prompt in tokens (its end is kept); None lets the prompt use what the completion leaves."
    )
    # --- optimisation ---
    learning_rate: float = doc_field(1e-5, "Peak AdamW learning rate.")
    weight_decay: float = doc_field(0.0, "AdamW weight decay.")
    adam_beta1: float = doc_field(0.9, "AdamW beta1.")
    adam_beta2: float = doc_field(0.999, "AdamW beta2.")
    adam_eps: float = doc_field(1e-8, "AdamW epsilon.")
    lr_scheduler: Literal["constant", "linear", "cosine"] = doc_field(
        "cosine", "Learning-rate schedule after warmup."
    )
    warmup_steps: int = doc_field(0, "Optimizer steps of linear warmup from 0 to learning_rate.")
    batch_size: int = doc_field(8, "Examples per optimizer step (the global batch).")
    micro_batch_size: int = doc_field(
        2, "Examples per forward/backward pass; batch_size/micro_batch_size passes are accumulated."
    )
    epochs: int = doc_field(1, "Passes over the training data (ignored when max_steps is set).")
    max_steps: int | None = doc_field(None, "Stop after this many optimizer steps.")
    max_grad_norm: float | None = doc_field(1.0, "Clip the global gradient norm to this value; None disables.")
    seed: int = doc_field(0, "Seed for data order, initialisation and sampling.")
    num_threads: int | None = doc_field(None, "CPU threads for torch; None uses every core.")
    logprob_chunk_size: int = doc_field(
        1024, "Tokens per chunk when computing log-probs, so no (batch, time, vocab) tensor is held."
    )
    # --- LoRA ---
    lora: bool = doc_field(False, "Train LoRA adapters (PEFT) instead of all weights.")
    lora_r: int = doc_field(16, "LoRA rank.")
    lora_alpha: int = doc_field(32, "LoRA alpha (scaling = alpha / r).")
    lora_dropout: float = doc_field(0.0, "Dropout on the LoRA path.")
    lora_target_modules: list[str] = doc_field(
        ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"],
        "Module names that get adapters.",
    )
    merge_lora: bool = doc_field(
        True, "Merge LoRA adapters into final/ (a plain model); False saves the adapter only."
    )
    # --- run folder, logging, checkpoints ---
    output_dir: str = doc_field("runs/{stage}-{time}", "Run folder; {stage} and {time} are filled in.")
    log_every: int = doc_field(1, "Write metrics every N optimizer steps.")
    eval_every: int | None = doc_field(None, "Evaluate on eval_data every N optimizer steps (and at the end).")
    save_every: int | None = doc_field(None, "Write a checkpoint every N optimizer steps (and at the end).")
    keep_checkpoints: int = doc_field(2, "Keep only the newest N checkpoints.")
    resume_from: str | None = doc_field(
        None, "Checkpoint directory to continue from exactly, or 'latest' for the newest in output_dir."
    )
    tensorboard: bool = doc_field(True, "Also write TensorBoard logs under <run>/tensorboard.")
    progress: bool = doc_field(True, "Show a progress bar with ETA.")


# ---------------------------------------------------------------------------------------------
# Machinery (load / override / validate / help / save)
# ---------------------------------------------------------------------------------------------


def config_fields(cls: type) -> list[dataclasses.Field]:
    return [f for f in dataclasses.fields(cls) if f.init]


def load_config(cls: type, yaml_path: str | None = None, overrides: list[str] | None = None, **kwargs: Any):
    """Build ``cls`` from a YAML file, then ``key=value`` overrides, then keyword arguments."""
    raise NotImplementedError


def config_help(cls: type) -> str:
    raise NotImplementedError


def config_to_dict(cfg: Any) -> dict:
    return dataclasses.asdict(cfg)


def save_config(cfg: Any, path: str) -> None:
    raise NotImplementedError
