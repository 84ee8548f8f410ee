"""Typed, documented configuration for every stage.

One dataclass per stage; each field carries a one-line doc and, when it is a number, its valid range. Configs
load from YAML plus ``key=value`` overrides; unknown keys, duplicate YAML keys, missing or null required fields,
values of the wrong type or out of range, and settings that contradict each other (a class's ``check()``) are
errors that name them.
"""

from __future__ import annotations

import collections.abc
import dataclasses
import difflib
import inspect
import math
import os
import re
import sys
import textwrap
import types
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

import yaml

from alignkit.errors import AlignkitError

MISSING_DOC = "required"
# numpy's legacy seeding (np.random.seed, called with every stage's seed) takes 0 <= seed < 2**32.
SEED_MAX = 2**32 - 1


class ConfigError(AlignkitError, ValueError):
    """A configuration problem, with a message that names the field.

    ``keys``: the fields a cross-field rule names, first the one it blames (``load_config`` adds where their
    values came from)."""

    def __init__(self, message: str, keys: tuple[str, ...] = ()) -> None:
        super().__init__(message)
        self.keys = keys


@dataclass(frozen=True)
class Range:
    """The valid values of a numeric field: each bound optional, ``gt``/``lt`` strict, ``ge``/``le`` inclusive.

    Applied to the value after coercion (to every item of a tuple field); None (an unset optional field) is
    never checked. A float must also be finite unless ``finite`` is False."""

    gt: float | None = None
    ge: float | None = None
    lt: float | None = None
    le: float | None = None
    finite: bool = True
    zero_with: str | None = None  # a bool field that, set true, lets 0 through (learning_rate=0 on purpose)

    def holds(self, x: float, cfg: Any = None) -> bool:
        if self.zero_with and x == 0 and cfg is not None and getattr(cfg, self.zero_with, False) is True:
            return True
        if isinstance(x, float) and math.isnan(x):
            return not self.finite
        if isinstance(x, float) and math.isinf(x) and self.finite:
            return False
        return (
            (self.gt is None or x > self.gt)
            and (self.ge is None or x >= self.ge)
            and (self.lt is None or x < self.lt)
            and (self.le is None or x <= self.le)
        )

    def __str__(self) -> str:
        lower = self.gt if self.gt is not None else self.ge
        upper = self.lt if self.lt is not None else self.le
        if lower is not None and upper is not None:  # an interval, e.g. in (0, 1]
            opening, closing = "(" if self.gt is not None else "[", ")" if self.lt is not None else "]"
            text = f"in {opening}{_num(lower)}, {_num(upper)}{closing}"
        elif lower is not None:
            text = f"{'>' if self.gt is not None else '>='} {_num(lower)}"
        elif upper is not None:
            text = f"{'<' if self.lt is not None else '<='} {_num(upper)}"
        else:
            text = "any finite number" if self.finite else "any number"
        if self.zero_with:
            text += f" (or 0 with {self.zero_with}=true)"
        return text + ("" if self.finite else " (nan and inf allowed)")


def _num(x: float) -> str:
    """A bound as written in the declaration: 1 not 1.0, 4294967295 not 4.29e9."""
    return str(int(x)) if float(x).is_integer() else repr(x)


# The range of a float field declared without one: any finite number.
FINITE = Range()


def doc_field(
    default: Any,
    doc: str,
    *,
    gt: float | None = None,
    ge: float | None = None,
    lt: float | None = None,
    le: float | None = None,
    finite: bool = True,
    zero_with: str | None = None,
) -> Any:
    """A dataclass field with a default, a one-line doc and, for a number, its valid range (all shown by
    ``alignkit <stage> --help``, the range checked by ``load_config``).

    A subclass that redeclares a field to change its default or doc keeps the range of the class it came
    from unless it declares its own (``field_range``)."""
    metadata: dict[str, Any] = {"doc": doc}
    if (gt, ge, lt, le, zero_with) != (None,) * 5 or not finite:
        metadata["range"] = Range(gt, ge, lt, le, finite, zero_with)
    if isinstance(default, (list, dict, set)):
        return field(default_factory=lambda d=default: type(d)(d), metadata=metadata)
    return field(default=default, metadata=metadata)


def required(doc: str) -> Any:
    """A field with no sensible default: leaving it unset (or null) is an error that names it."""
    return field(default=None, metadata={"doc": doc, "required": True})


@dataclass(frozen=True)
class Retired:
    """An ``ALIASES`` entry for a key the class no longer has (an older run's config.yaml may still hold it).

    At ``default``, its old default, the key is read and ignored for one release, with a message; any other
    value is an error. ``why`` says what replaced it: "is not used by ppo; set iterations instead"."""

    default: Any
    why: str


class Fields:
    """The root of every config class: the end of the ``check()`` chain, and the old spellings of its keys.

    The rule that runs each field group's cross-field rules exactly once, however the groups are combined: every
    ``check()`` starts with ``super().check()`` (Python's MRO then visits each class once, this one last).

    ``ALIASES`` maps each old spelling of a setting to what replaced it; ``load_config`` alone reads it
    (``config_aliases`` merges the tables of a class and its field groups along the MRO). An entry is one of
      ``"old_key": "new_key"``                a renamed key (``max_train_rows`` -> ``train_max_rows``);
      ``"key=old": "new_key=new"``            an old value of a key, written another way (``ranker=judge``), or
                                              of a gone key (``tensorboard=false``: ``report_to=none``);
      ``"old_key": Retired(default, why)``    a key that is gone (see ``Retired``).
    An old spelling is taken for one release, with a deprecation message naming the new one."""

    ALIASES: typing.ClassVar[dict[str, str | Retired]] = {}

    def check(self) -> None:
        """The rules across fields (each field's own range is declared on it and checked before this)."""


@dataclass
class RuntimeConfig(Fields):
    """How a model runs, for the stages that load one without training it (score, build-prefs, CAI)."""

    dtype: Literal["auto", "float32", "bfloat16", "float16"] = doc_field(
        "auto", "Model dtype; 'auto' picks bf16 only where the hardware runs it fast, else fp32."
    )
    trust_remote_code: bool = doc_field(False, "Allow code shipped with the model to run (off by default).")
    num_threads: int | None = doc_field(None, "CPU threads for torch; None uses every core.", ge=1)
    progress: bool = doc_field(True, "Show a progress bar.")


@dataclass
class GenerationBackendConfig(Fields):
    """Which engine samples responses, for the stages that generate (ppo, online-dpo, grpo, build-prefs,
    cai-revise, eval)."""

    # fsdp_generation (the online stages ppo, online-dpo and grpo only) is declared on OnlineTrainConfig; an older
    # config of the other stages may still hold it at its default.
    ALIASES = {
        "fsdp_generation": Retired("gather", "is used only by ppo, online-dpo and grpo (sampling under FSDP)")
    }

    # --- generation backend ---
    generation_backend: Literal["hf", "vllm"] = doc_field(
        "hf",
        "Sampling engine: hf (transformers generate, left-padded batches with the KV cache) or vllm (an optional "
        "extra, pip install 'alignkit[vllm]', on a CUDA GPU; ppo, online-dpo and grpo push the policy's weights "
        "into it each iteration, with lora=true the adapter merged in).",
    )
    vllm_gpu_memory_utilization: float = doc_field(
        0.5,
        "generation_backend=vllm: share of the GPU's memory vLLM takes (its weights and KV cache); the rest is "
        "left to the models alignkit runs beside it.",
        gt=0,
        le=1,
    )


# --- field groups: each stage's config is composed of the groups it reads -------------------------------------
# A dataclass collects fields from the end of the MRO, so a class lists its groups last-shown first.


@dataclass
class ModelFields(Fields):
    """The model a training stage trains, and how its weights are held."""

    # --- model ---
    model: str = doc_field(
        "smollm2-135m-instruct",
        "Model to train: the embedded default 'smollm2-135m-instruct', a Hugging Face id, or a local directory.",
    )
    trust_remote_code: bool = doc_field(False, "Allow code shipped with the model to run (off by default).")
    dtype: Literal["auto", "float32", "bfloat16", "float16"] = doc_field(
        "auto",
        "Compute dtype; 'auto' picks bf16 only where the hardware runs it fast (CUDA, AMX CPUs; "
        "ALIGNKIT_FAST_BF16=1/0 overrides), else fp32. How bf16/fp16 weights are held: see precision.",
    )
    precision: Literal["mixed", "pure"] = doc_field(
        "mixed",
        "With a bf16/fp16 dtype: 'mixed' keeps fp32 weights and AdamW state and computes in dtype under "
        "autocast; 'pure' holds the weights in dtype (half the memory, but updates below ~1/256 of a weight "
        "are lost: at lr 1e-5 most bf16 weights never change). No effect in fp32.",
    )


@dataclass
class TrainDataFields(Fields):
    """The training data and which of its rows are used."""

    ALIASES = {"max_train_rows": "train_max_rows"}

    # --- data ---
    train_data: str = required(
        "Training data: a .jsonl/.json/.parquet/.csv file, a saved dataset dir or a hub id."
    )
    train_split: str | None = doc_field(None, "Split name when train_data is a hub id or a DatasetDict.")
    train_max_rows: int | None = doc_field(
        None, "Use only the first N rows of train_data (after train_rows).", ge=1
    )
    train_rows: tuple[int, int] | None = doc_field(
        None, "Use only file rows start <= row < stop of train_data, written [start, stop] (0-based).", ge=0
    )
    on_bad_row: Literal["error", "skip"] = doc_field(
        "error", "What to do with an invalid row: stop with an error naming it, or skip it and count it."
    )
    columns: dict[str, str] | None = doc_field(
        None,
        "Other column names to read as alignkit's, {prompt: question, chosen: good, ...} (on the command line "
        "columns.prompt=question); for train_data and eval_data.",
    )

    def check(self) -> None:
        super().check()
        check_row_range(self, "train_rows")
        for name in self.columns or {}:
            if name not in DATA_COLUMNS:
                close = difflib.get_close_matches(name, DATA_COLUMNS, n=1)
                known = f"the columns are {', '.join(DATA_COLUMNS)}"
                hint = f"did you mean 'columns.{close[0]}'?" if close else known
                raise ConfigError(f"columns.{name}: alignkit reads no column '{name}'; {hint}", ("columns",))


# The columns alignkit's data loaders read (alignkit.data.schemas), which ``columns`` may map other names to.
DATA_COLUMNS = ("prompt", "completion", "chosen", "rejected", "label", "messages", "text", "system")


@dataclass
class EvalDataFields(Fields):
    """Held-out data evaluated during training (the offline stages)."""

    ALIASES = {"max_eval_rows": "eval_max_rows"}

    # --- data ---
    eval_data: str | None = doc_field(
        None, "Held-out data in the same schema, evaluated every eval_every steps."
    )
    eval_split: str | None = doc_field(None, "Split name when eval_data is a hub id or a DatasetDict.")
    eval_max_rows: int | None = doc_field(
        None, "Use only the first N rows of eval_data (after eval_rows).", ge=1
    )
    eval_rows: tuple[int, int] | None = doc_field(
        None, "Use only file rows start <= row < stop of eval_data, written [start, stop] (0-based).", ge=0
    )
    eval_every: int | None = doc_field(
        None, "Evaluate on eval_data every N optimizer steps (and at the end).", ge=1
    )

    def check(self) -> None:
        super().check()
        check_row_range(self, "eval_rows")


@dataclass
class PromptRowsFields(Fields):
    """Which rows of a prompt file a sampling stage reads (build-prefs, cai-revise). The file itself,
    ``prompts``, stays each stage's own field: build-prefs may go without one (ranker=human), cai-revise not."""

    ALIASES = {"prompt_rows": "prompts_rows", "max_prompts": "prompts_max_rows"}

    # --- prompts ---
    prompts_split: str | None = doc_field(None, "Split name when prompts is a hub id or a DatasetDict.")
    prompts_rows: tuple[int, int] | None = doc_field(
        None, "Use only prompt rows start <= row < stop, written [start, stop] (0-based).", ge=0
    )
    prompts_max_rows: int | None = doc_field(None, "Use only the first N prompts (after prompts_rows).", ge=1)

    def check(self) -> None:
        super().check()
        check_row_range(self, "prompts_rows")


@dataclass
class EndpointFields(Fields):
    """How a stage talks to an OpenAI-compatible chat-completions endpoint (cai-revise's critic,
    cai-label's judge: ``models.endpoint.EndpointSettings``). The server's URL and model name stay each
    stage's own fields, named for the role the served model plays (critic_base_url, judge_model, ...)."""

    # --- endpoint ---
    api_key_env: str | None = doc_field(
        None, "Environment variable holding the endpoint's API key (never written anywhere); None: no key."
    )
    request_timeout: float = doc_field(60.0, "Seconds to wait for one endpoint response.", gt=0)
    max_retries: int = doc_field(4, "Retries of an endpoint request on 429, 5xx or a timeout.", ge=0)
    max_concurrency: int = doc_field(4, "Endpoint requests in flight at once.", ge=1)


@dataclass
class PairLossFields(Fields):
    """The pairwise objective's settings that ``training.preference.pair_outputs`` reads (dpo, ipo, orpo,
    online-dpo). Which objective, ``loss``, stays each stage's own field: online-dpo has no ORPO."""

    # --- pair objective ---
    # beta <= 0 flips or removes the preference: a negative beta trains towards the rejected replies.
    beta: float = doc_field(0.1, "DPO/IPO temperature on the log-ratios (KL strength).", gt=0)
    # At 0.5 the two labels weigh the same (no gradient); above it the preference is reversed.
    label_smoothing: float = doc_field(
        0.0, "DPO only: assumed label-flip rate for noisy labels (conservative DPO).", ge=0, lt=0.5
    )
    ipo_average_logps: bool = doc_field(
        True,
        "IPO on token-averaged log-ratios (as TRL's DPOTrainer); False uses sums as the IPO paper states.",
    )
    rpo_alpha: float = doc_field(
        0.0,
        "DPO/IPO: add rpo_alpha x the chosen reply's length-normalised NLL (RPO, Pang et al. 2024), against "
        "DPO lowering the chosen replies' likelihood (likelihood displacement); 0: none.",
        ge=0,
    )
    share_prompt: bool = doc_field(
        True,
        "Run each pair's prompt once, [prompt | chosen | rejected] in one masked row: same log-probs, "
        "faster.",
    )


@dataclass
class PreparedDataFields(Fields):
    """How the stages that prepare their rows once into the cache (``data.prepared``: rm, dpo/ipo/orpo, kto)
    tokenize them."""

    # --- data ---
    dataset_num_proc: int = doc_field(
        0,
        "Processes that tokenize the data the first time (later runs read the cached tokens); 0: 1 below "
        "10,000 rows, else half the CPUs (at most 8).",
        ge=0,
    )


@dataclass
class SequenceFields(Fields):
    """How long a training row may be (the offline stages; the online ones cap prompt and response apart)."""

    # --- data ---
    # At least one prompt token and one completion token (data.tokenize._truncate needs both).
    max_length: int = doc_field(1024, "Longest prompt+completion in tokens; longer rows are truncated.", ge=2)
    max_prompt_length: int | None = doc_field(
        None,
        "Longest prompt in tokens (its end is kept), below max_length; None lets the prompt use what the "
        "completion leaves.",
        ge=1,
    )

    def check(self) -> None:
        super().check()
        # A prompt of max_length tokens would leave no room for the completion: the limit could never bind.
        check_below(self, "max_prompt_length", "max_length")


@dataclass
class OptimizerFields(Fields):
    """AdamW, its learning-rate schedule and gradient clipping."""

    # --- optimisation ---
    learning_rate: float = doc_field(
        1e-5, "Peak AdamW learning rate.", gt=0, zero_with="allow_zero_learning_rate"
    )
    allow_zero_learning_rate: bool = doc_field(
        False,
        "Accept learning_rate=0: the weights never change (a dry run of the loop, e.g. to measure the starting "
        "model); otherwise 0 is refused as a mistake.",
    )
    weight_decay: float = doc_field(0.0, "AdamW weight decay.", ge=0)
    # torch's AdamW refuses betas outside [0, 1); eps = 0 divides by zero where a gradient is 0.
    adam_beta1: float = doc_field(0.9, "AdamW beta1.", ge=0, lt=1)
    adam_beta2: float = doc_field(0.999, "AdamW beta2.", ge=0, lt=1)
    adam_eps: float = doc_field(1e-8, "AdamW epsilon.", gt=0)
    lr_scheduler: Literal["constant", "linear", "cosine"] = doc_field(
        "cosine", "Learning-rate schedule after warmup."
    )
    warmup_steps: int = doc_field(0, "Optimizer steps of linear warmup from 0 to learning_rate.", ge=0)
    # 0 would scale every gradient to 0 (no update); None is the way to switch clipping off.
    max_grad_norm: float | None = doc_field(
        1.0, "Clip the global gradient norm to this value; None disables.", gt=0
    )


@dataclass
class OfflineBatchFields(Fields):
    """Batches over a fixed dataset, and how long training runs (the offline stages)."""

    # --- optimisation ---
    batch_size: int = doc_field(8, "Examples per optimizer step (the global batch).", ge=1)
    micro_batch_size: int = doc_field(
        2,
        "Examples per forward/backward pass (at most batch_size); batch_size/micro_batch_size passes are "
        "accumulated.",
        ge=1,
    )
    epochs: int = doc_field(1, "Passes over the training data (ignored when max_steps is set).", ge=1)
    max_steps: int | None = doc_field(None, "Stop after this many optimizer steps.", ge=1)

    def check(self) -> None:
        super().check()
        check_at_most(self, "micro_batch_size", "batch_size")


@dataclass
class ComputeFields(Fields):
    """Seed, threads and the memory/compute trade-offs of a training step."""

    # --- optimisation ---
    seed: int = doc_field(0, "Seed for data order, initialisation and sampling.", ge=0, le=SEED_MAX)
    num_threads: int | None = doc_field(None, "CPU threads for torch; None uses every core.", ge=1)
    logprob_chunk_size: int = doc_field(
        1024, "Tokens per chunk when computing log-probs, so no (batch, time, vocab) tensor is held.", ge=1
    )
    gradient_checkpointing: bool = doc_field(
        False,
        "Keep only each decoder layer's input in the forward and recompute the layer in the backward: less "
        "activation memory for one more forward of compute (the same gradients).",
    )


@dataclass
class LoRAFields(Fields):
    """Training LoRA adapters instead of all weights."""

    # --- LoRA ---
    lora: bool = doc_field(False, "Train LoRA adapters (PEFT) instead of all weights.")
    lora_r: int = doc_field(16, "LoRA rank.", ge=1)
    lora_alpha: int = doc_field(32, "LoRA alpha (scaling = alpha / r).", ge=1)
    lora_dropout: float = doc_field(0.0, "Dropout on the LoRA path.", ge=0, lt=1)
    lora_target_modules: list[str] = doc_field(
        ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"],
        "Module names that get adapters.",
    )
    merge_lora: bool = doc_field(
        True, "Merge LoRA adapters into final/ (a plain model); False saves the adapter only."
    )


@dataclass
class SnapshotFields(Fields):
    """Loadable copies of the policy along the way (``training.snapshots``)."""

    # --- snapshots ---
    snapshot_every: int | None = doc_field(
        None,
        "Every N optimizer steps (ppo, grpo: iterations; online-dpo: rounds) also write the policy as a loadable "
        "model to snapshots/step-NNNNNN/, every one kept: with LoRA its adapter alone (on its recorded base), "
        "else the whole model; `alignkit eval model=<run>/snapshots/step-...` judges it. None: none.",
        ge=1,
    )


@dataclass
class RunFolderFields(Fields):
    """The run folder: logs, checkpoints, resuming."""

    # TensorBoard was the only tracker; its switch is now a value of report_to.
    ALIASES = {"tensorboard=true": "report_to=tensorboard", "tensorboard=false": "report_to=none"}

    # --- run folder, logging, checkpoints ---
    output_dir: str = doc_field("runs/{stage}-{time}", "Run folder; {stage} and {time} are filled in.")
    log_every: int = doc_field(1, "Write metrics every N optimizer steps.", ge=1)
    save_every: int | None = doc_field(
        None, "Write a checkpoint every N optimizer steps (and at the end).", ge=1
    )
    keep_checkpoints: int = doc_field(2, "Keep only the newest N checkpoints.", ge=1)
    resume_from: str | None = doc_field(
        None, "Checkpoint directory to continue from exactly, or 'latest' for the newest in output_dir."
    )
    report_to: list[Literal["tensorboard", "wandb", "mlflow", "trackio", "none"]] = doc_field(
        ["tensorboard"],
        "Trackers that get the config, every step's metrics, monitor events and the held-out table: any of "
        "tensorboard (<run>/tensorboard), wandb, mlflow, trackio (extras: pip install 'alignkit[wandb]'), or "
        "none; a list or a comma string (report_to=wandb,mlflow).",
    )
    tracker_project: str = doc_field(
        "alignkit", "The W&B and Trackio project, and the MLflow experiment, the run is logged to."
    )
    progress: bool = doc_field(True, "Show a progress bar with ETA.")
    push_to_hub: bool = doc_field(
        False, "Upload final/ with its README.md model card to hub_model_id (the hub is checked before training)."
    )
    hub_model_id: str | None = doc_field(None, "Hub model repo for push_to_hub, 'owner/name'.")
    hub_private: bool = doc_field(False, "With push_to_hub: create the repo private.")

    def check(self) -> None:
        super().check()
        if self.push_to_hub and not self.hub_model_id:
            raise ConfigError("push_to_hub=true needs hub_model_id=owner/name", ("hub_model_id",))
        if "none" in self.report_to and len(set(self.report_to)) > 1:
            raise ConfigError(
                f"report_to: 'none' reports nowhere, but {self.report_to} also names trackers; keep one",
                ("report_to",),
            )


@dataclass
class TrainConfig(
    RunFolderFields,
    LoRAFields,
    ComputeFields,
    OfflineBatchFields,
    OptimizerFields,
    SequenceFields,
    EvalDataFields,
    TrainDataFields,
    ModelFields,
):
    """Fields shared by the offline training stages (sft, rm, dpo/ipo/orpo, kto): every group."""


@dataclass
class RewardFields(Fields):
    """The reward an online stage trains on."""

    # --- reward ---
    reward: str | list[str] = required(
        "'module:function' with function(prompt: str, response: str, [prompt-file columns]) -> float (e.g. "
        "alignkit.scoring.rewards:politeness), a reward model directory written by `alignkit rm`, or a list "
        "[a, b, ...] of these, summed with reward_weights."
    )
    reward_weights: list[float] | None = doc_field(
        None, "One weight per reward of a list reward=[...] (the reward is their weighted sum); None: all 1."
    )
    reward_batch_size: int = doc_field(8, "Responses per forward pass of a reward model.", ge=1)

    def check(self) -> None:
        super().check()
        check_reward_list(self)


@dataclass
class OnlineSamplingFields(Fields):
    """How an online stage samples the policy's responses to its prompts."""

    # --- sampling ---
    max_new_tokens: int = doc_field(
        48, "Longest response in tokens; a response cut here counts as unfinished.", ge=1
    )
    # The methods learn from the policy's own samples; greedy decoding (0) is not a sample of it (and online
    # DPO's samples of one prompt would all be the same: no pair could ever be made).
    temperature: float = doc_field(
        1.0,
        "Sampling temperature (> 0); ppo and grpo take the log-probs of policy and reference at the same "
        "temperature; online-dpo needs the samples of one prompt to differ to make a pair.",
        gt=0,
    )
    generation_batch_size: int = doc_field(
        16,
        "Sequences per batched generate() call (generation_backend=hf; vLLM batches by itself). In N "
        "processes each samples every N-th batch: at most the samples of an iteration or round / N keeps "
        "them all sampling.",
        ge=1,
    )
    share_prompt_cache: bool = doc_field(
        True,
        "generation_backend=hf: the samples of one prompt in a generate() batch share one prefill of it, its KV "
        "cache copied to each (models.generation.shared_prompt_cache); the same samples up to float rounding. "
        "false: every sample prefills its own copy of the prompt, as transformers' generate does.",
    )
    max_prompt_length: int | None = doc_field(256, "Longest prompt in tokens (its end is kept).", ge=1)


@dataclass
class OnlineBatchFields(Fields):
    """An online stage's optimizer batches over the batch it made of an iteration's (round's) samples."""

    # --- update ---
    minibatch_size: int = doc_field(8, "Rows per optimizer step (ppo, grpo: responses; online-dpo: pairs).", ge=1)
    micro_batch_size: int = doc_field(
        8,
        "Rows per forward/backward pass (at most minibatch_size); a minibatch is accumulated from these "
        "exactly.",
        ge=1,
    )

    def check(self) -> None:
        super().check()
        check_at_most(self, "micro_batch_size", "minibatch_size")


@dataclass
class OnlineRemedyFields(Fields):
    """What an online stage does against reward hacking, mode collapse and over-optimisation: a length
    penalty on the reward, and the actions of its failure monitors (``evaluation.monitors``)."""

    length_penalty: float = doc_field(
        0.0,
        "Reward actually trained on: score - length_penalty x response tokens (as sampled, EOS included); "
        "0: the score as is. Against a reward that pays for length (Singhal et al. 2023).",
        ge=0,
    )
    reward_hacking_action: Literal["warn", "stop", "adjust"] = doc_field(
        "warn",
        "When reward rises with response length: warn, stop, or adjust (raise the KL coefficient by "
        "kl_adjust_factor; the event row holds its old and new values).",
    )
    mode_collapse_action: Literal["warn", "stop", "adjust", "raise_entropy"] = doc_field(
        "warn",
        "When the samples' distinct-2 (or entropy) falls below half its start: warn, stop, adjust, or "
        "raise_entropy (ppo only: add ent_adjust_step to ent_coef; the event row holds its old and new values).",
    )
    gold_divergence_action: Literal["warn", "stop"] = doc_field(
        "warn",
        "When a logged gold_reward/mean falls while the reward rises: warn, or stop with final/ = the weights "
        "of the best gold score seen, the starting policy's included (said in the summary).",
    )
    kl_explosion_action: Literal["warn", "stop"] = doc_field(
        "stop",
        "When the KL to the reference passes kl_limit, or grows faster than a nat per unit: stop (final/ = the "
        "weights then) or warn and go on (e.g. GRPO at beta 0, where no term holds the policy near the "
        "reference and a gold scorer or held-out task judges it).",
    )
    kl_limit: float = doc_field(
        10.0,
        "The KL-explosion monitor's limit, nats per response (PPO: at least twice an adaptive kl_target).",
        gt=0,
    )
    kl_adjust_factor: float = doc_field(
        2.0,
        "The adjust action multiplies the KL coefficient by this (PPO: beta, and divides an adaptive "
        "kl_target by it; online DPO: beta; GRPO: beta, so only with beta > 0).",
        gt=1,
    )


@dataclass
class GoldFields(Fields):
    """A held-out gold scorer an online stage never trains on, judging the policy every gold_every units
    (the synthetic-gold setup of Gao, Schulman & Hilton 2022; ``training.gold``)."""

    # --- gold evaluation ---
    gold_reward: str | None = doc_field(
        None,
        "Gold judge, never trained on: 'module:function' or a reward model directory, as `reward`. Every "
        "gold_every units the policy answers gold_prompts (sampled at temperature 1, the same seed each time) "
        "and the rows log gold_reward/mean, gold_proxy/mean (the reward on the same samples) and gold_kl; "
        "None: no gold evaluation.",
    )
    gold_prompts: str | None = doc_field(
        None, "Held-out prompts the gold judge scores (the formats of train_data); required with gold_reward."
    )
    gold_rows: tuple[int, int] | None = doc_field(
        None, "Use only file rows start <= row < stop of gold_prompts, written [start, stop] (0-based).", ge=0
    )
    gold_max_prompts: int = doc_field(32, "Use the first N prompts of gold_prompts (after gold_rows).", ge=1)
    gold_every: int = doc_field(
        5,
        "Evaluate the starting policy (a step-0 row), then the first logged unit, every N units and the last; "
        "a multiple of log_every (the gold keys ride in the logged rows).",
        ge=1,
    )

    def check(self) -> None:
        super().check()
        check_row_range(self, "gold_rows")
        if self.gold_reward is not None and self.gold_prompts is None:
            raise ConfigError(
                "config key 'gold_prompts' is required with gold_reward: the held-out prompts the gold judge "
                "scores (prompts the run trains on would not show over-optimisation)",
                ("gold_prompts", "gold_reward"),
            )
        log_every = getattr(self, "log_every", 1)
        if self.gold_reward is not None and self.gold_every % log_every:
            raise ConfigError(
                f"config key 'gold_every' must be a multiple of log_every ({log_every}): the gold keys ride in "
                f"the logged rows; got {self.gold_every}",
                ("gold_every", "log_every"),
            )


@dataclass
class OnlineTrainConfig(
    SnapshotFields,
    OnlineBatchFields,
    OnlineRemedyFields,
    GoldFields,
    GenerationBackendConfig,
    RunFolderFields,
    LoRAFields,
    ComputeFields,
    OptimizerFields,
    OnlineSamplingFields,
    RewardFields,
    TrainDataFields,
    ModelFields,
):
    """Fields shared by the stages that train on their own samples (ppo, online-dpo, grpo): no eval data, no
    offline batching (each declares its own iterations and minibatches), prompts from ``train_data``."""

    log_every: int = doc_field(1, "Write metrics every N iterations (ppo, grpo) or rounds (online-dpo).")
    save_every: int | None = doc_field(
        None, "Write a checkpoint every N iterations (ppo, grpo) or rounds (online-dpo), and at the end."
    )

    train_data: str | None = doc_field(
        None,
        "Prompts to sample from; None uses the 128 prompts shipped with alignkit (assets/prompts.jsonl).",
    )
    # --- generation backend ---
    fsdp_generation: Literal["gather", "shards"] = doc_field(
        "gather",
        "Under FSDP, generation_backend=hf: 'gather' samples on the policy's weights gathered whole in each "
        "process (fast; the whole policy must fit one device while it samples), 'shards' on the shards, the "
        "processes stepping together (no device holds the whole policy; every generated token gathers each "
        "layer's weights again).",
    )


# --- cross-field rules, for the ``check()`` methods of the config classes ----------------------------------


def check_at_most(cfg: Any, name: str, limit: str) -> None:
    """``cfg.<name>`` <= ``cfg.<limit>`` where both are set."""
    value, bound = getattr(cfg, name), getattr(cfg, limit)
    if value is not None and bound is not None and not value <= bound:
        raise ConfigError(f"config key '{name}' must be <= {limit} ({bound}), got {value}", (name, limit))


def check_below(cfg: Any, name: str, limit: str) -> None:
    """``cfg.<name>`` < ``cfg.<limit>`` where both are set."""
    value, bound = getattr(cfg, name), getattr(cfg, limit)
    if value is not None and bound is not None and not value < bound:
        raise ConfigError(f"config key '{name}' must be < {limit} ({bound}), got {value}", (name, limit))


def check_reward_list(cfg: Any) -> None:
    """A list ``reward=[...]`` names at least one reward, and ``reward_weights``, where given, holds one finite
    weight per reward."""
    weights, reward = cfg.reward_weights, cfg.reward
    if isinstance(reward, list) and not reward:
        raise ConfigError("config key 'reward' is an empty list; name at least one reward", ("reward",))
    if weights is None:
        return
    n_rewards = len(reward) if isinstance(reward, list) else 1
    if len(weights) != n_rewards:
        raise ConfigError(
            f"config key 'reward_weights' has {len(weights)} weight(s) for {n_rewards} reward(s); give one per "
            "reward of reward=[...]",
            ("reward_weights", "reward"),
        )
    if not all(math.isfinite(w) for w in weights):
        raise ConfigError(f"config key 'reward_weights' must be finite numbers, got {weights}", ("reward_weights",))


def check_row_range(cfg: Any, name: str) -> None:
    """A ``[start, stop]`` row range (its items' range declared on the field) selects at least one row."""
    rows = getattr(cfg, name)
    if rows is not None and not rows[0] < rows[1]:
        raise ConfigError(
            f"config key '{name}' must be [start, stop] with start < stop, got {_shown(rows)}", (name,)
        )


def config_aliases(cls: type) -> dict[str, str | Retired]:
    """Every old spelling ``cls`` still reads: the ``ALIASES`` tables of ``cls`` and its field groups, a class's
    own entry winning over its bases'."""
    aliases: dict[str, str | Retired] = {}
    for klass in reversed(cls.__mro__):
        aliases.update(klass.__dict__.get("ALIASES", {}))
    return aliases


def renamed_keys(cls: type) -> dict[str, str]:
    """Old name -> new name of every renamed key of ``cls`` (its key-to-key ``ALIASES``), for comparing the
    settings an older alignkit recorded (a run's config.yaml, a progress file) with today's."""
    return {
        old: new
        for old, new in config_aliases(cls).items()
        if isinstance(new, str) and "=" not in old and "=" not in new
    }


# The eval data keys of an older alignkit's ppo and online-dpo config.yaml (inert there, now gone).
EVAL_KEYS = ("eval_data", "eval_split", "max_eval_rows", "eval_rows", "eval_every")


def retired_train_fields(stage: str, instead: dict[str, str]) -> dict[str, str | Retired]:
    """``ALIASES`` for ``stage``, whose config no longer has the TrainConfig fields ``instead`` names (name, old
    name or new -> what to set instead); each keeps TrainConfig's default as its old default."""
    defaults = {f.name: f.default for f in dataclasses.fields(TrainConfig)}
    renamed = renamed_keys(TrainConfig)
    return {
        name: Retired(defaults[renamed.get(name, name)], f"is not used by {stage}; set {what} instead")
        for name, what in instead.items()
    }


def retired_online_fields(
    stage: str, batch_size: str, epochs: str, max_steps: str
) -> dict[str, str | Retired]:
    """The ``ALIASES`` table of an online stage (ppo, online-dpo): TrainConfig's offline batching, max_length
    and eval keys an older config.yaml of ``stage`` holds, each naming what to set instead."""
    instead = {"batch_size": batch_size, "epochs": epochs, "max_steps": max_steps}
    instead["max_length"] = "max_prompt_length and max_new_tokens"
    instead |= dict.fromkeys(EVAL_KEYS, "`alignkit eval` on the final model")
    return retired_train_fields(stage, instead)


def with_current_names(cls: type, saved: dict) -> dict:
    """``saved`` settings (a config.yaml an older alignkit wrote) with renamed keys under their new names, so
    they compare with a ``cls`` config field by field; a key written under both names keeps the new one."""
    renamed = renamed_keys(cls)
    out = {k: v for k, v in saved.items() if k not in renamed}
    for old, value in saved.items():
        if old in renamed:
            out.setdefault(renamed[old], value)
    return out


# ---------------------------------------------------------------------------------------------
# Machinery (load / override / validate / help / save)
# ---------------------------------------------------------------------------------------------

# Written on the command line for "no value"; YAML itself already reads null, ~ and an empty value as None.
_NONE_WORDS = {"none", "null", "~", ""}
_TRUE_WORDS = {"true", "yes", "on", "1"}
_FALSE_WORDS = {"false", "no", "off", "0"}


def config_fields(cls: type) -> list[dataclasses.Field]:
    return [f for f in dataclasses.fields(cls) if f.init]


def load_config(
    cls: type,
    yaml_path: str | os.PathLike | None = None,
    overrides: list[str] | None = None,
    *,
    overrides_from: str = "the command line",
    **kwargs: Any,
):
    """Build ``cls`` from its defaults, then a YAML file, then ``key=value`` overrides, then keyword arguments.
    ``overrides_from`` names where the overrides were written, in error messages ("... (from the command line)").

    Each later source wins. Keys are checked against the dataclass fields (a key written twice in the YAML file
    is an error), values are checked and coerced against the field annotations, required fields left unset or
    null are reported together, then ``validate_config`` checks each number against its declared range and
    runs the class's cross-field ``check()``. Every problem is a ``ConfigError`` whose message names the key,
    the value and where it came from.
    """
    if not (isinstance(cls, type) and dataclasses.is_dataclass(cls)):
        raise TypeError(f"load_config needs a dataclass type, got {cls!r}")
    fields = {f.name: f for f in config_fields(cls)}
    hints = typing.get_type_hints(cls)
    # name -> (value, raw command-line text or None, where it came from); a later source wins
    given: dict[str, tuple[Any, str | None, str]] = {}
    notices: dict[str, str] = {}  # old spelling -> its deprecation message, printed once every key is read
    aliases = config_aliases(cls)
    # Each source as (key, value, raw command-line text or None) items; the overrides are parsed one by one as
    # they are read, so the first bad one is the one reported.
    sources: list[tuple[str, collections.abc.Iterable[tuple[Any, Any, str | None]]]] = []
    if yaml_path is not None:
        sources.append((str(yaml_path), ((k, v, None) for k, v in _read_yaml_mapping(yaml_path).items())))
    sources.append((overrides_from, ((k, v, raw) for k, raw, v in map(_parse_override, overrides or []))))
    sources.append(("keyword arguments", ((k, v, None) for k, v in kwargs.items())))
    for source, items in sources:
        for name, item in _read_source(cls, fields, aliases, items, source, notices).items():
            if item[1] is _MERGE:  # entries of a mapping (columns.prompt=...) add to the mapping given earlier
                earlier = given[name][0] if name in given and isinstance(given[name][0], dict) else {}
                item = ({**earlier, **item[0]}, None, item[2])
            given[name] = item
    for old, message in notices.items():
        _warn_once(old, message)

    values = {}
    for name, (value, raw, source) in given.items():
        if _is_required(fields[name]) and _is_none(value):
            values[name] = None  # explicitly unset: reported as null below, not as a type error
            continue
        try:
            values[name] = _coerce(hints.get(name, Any), value, raw)
        except _Mismatch:
            raise ConfigError(
                f"config key '{name}' for {cls.__name__} {_expectation(hints[name], value)}, "
                f"got {value!r} (from {source})"
            ) from None

    missing = [f for f in fields.values() if _is_required(f) and values.get(f.name) is None]
    if missing:
        lines = []
        for f in missing:
            doc = f": {f.metadata['doc']}" if f.metadata.get("doc") else ""
            if f.name in given:  # written as null (or none, ~, an empty value): say so, it is not missing
                lines.append(f"config key '{f.name}' is null (from {given[f.name][2]}); it is required{doc}")
            else:
                lines.append(f"missing required config field '{f.name}' for {cls.__name__}{doc}")
        example = " ".join(f"{f.name}=..." for f in missing)
        lines.append(f"set it in the YAML file or on the command line, e.g. {example}")
        raise ConfigError("\n".join(lines))
    cfg = cls(**values)
    validate_config(cfg, {name: source for name, (_, _, source) in given.items()})
    return cfg


def field_range(cls: type, name: str) -> Range | None:
    """The declared range of field ``name`` of ``cls``: its own declaration's, else that of the nearest base
    class declaring the field (a subclass that only changes a default keeps the rule)."""
    for klass in cls.__mro__:
        f = getattr(klass, "__dataclass_fields__", {}).get(name)
        if f is not None and "range" in f.metadata:
            return f.metadata["range"]
    return None


def numeric_fields(cls: type) -> list[str]:
    """The init fields of ``cls`` that hold numbers (int, float, optional or in a tuple): those with a range."""
    hints = typing.get_type_hints(cls)
    return [f.name for f in config_fields(cls) if _is_numeric(hints.get(f.name, Any))]


def validate_config(cfg: Any, sources: dict[str, str] | None = None) -> None:
    """Check every number of ``cfg`` against its field's declared range (floats finite unless the range says
    otherwise), then the class's ``check()`` (the rules across fields), if it has one.

    ``sources``: where each given field came from ("the command line", a file), added to the message; a field
    not in it was left at its default. ``load_config`` calls this; a stage can call it on a config built in code.
    """
    sources = sources or {}

    def where(keys: tuple[str, ...]) -> str:
        given = [k for k in keys if k in sources]
        if not given:
            return ""
        if given[0] == keys[0] and len({sources[k] for k in given}) == 1:
            return f" (from {sources[keys[0]]})"
        return " (" + ", ".join(f"{k} from {sources[k]}" for k in given) + ")"

    cls = type(cfg)
    for name in numeric_fields(cls):
        value = getattr(cfg, name)
        rng = field_range(cls, name) or FINITE
        items = value if isinstance(value, tuple) else (value,)
        numbers = [x for x in items if isinstance(x, (int, float)) and not isinstance(x, bool)]
        if all(rng.holds(x, cfg) for x in numbers):
            continue
        nonfinite = rng.finite and any(isinstance(x, float) and not math.isfinite(x) for x in numbers)
        bounds = "" if rng is FINITE else f" {rng}"
        must = f"must be a finite number{bounds}" if nonfinite else f"must be{bounds}"
        if isinstance(value, tuple):
            must = f"must hold numbers{bounds}"
        raise ConfigError(f"config key '{name}' {must}, got {_shown(value)}{where((name,))}")
    check = getattr(cfg, "check", None)
    if callable(check):
        try:
            check()
        except ConfigError as e:
            if not e.keys:
                raise
            raise ConfigError(f"{e}{where(e.keys)}", e.keys) from None


def config_help(cls: type) -> str:
    """Every field of ``cls`` with its type, default (or "required") and doc, grouped as declared."""
    hints = typing.get_type_hints(cls)
    sections = _field_sections(cls)
    numeric = set(numeric_fields(cls))
    rows = []
    for f in config_fields(cls):
        if _is_required(f):
            default = "required"
        elif f.default_factory is not dataclasses.MISSING:
            default = _show(f.default_factory())
        else:
            default = _show(f.default)
        rows.append(
            (sections.get(f.name, cls.__name__), f.name, _type_name(hints.get(f.name, Any)), default, f)
        )

    name_w = max(len("key"), *(len(r[1]) for r in rows))
    type_w = min(max(len("type"), *(len(r[2]) for r in rows)), 36)
    lines = [f"  {'key':<{name_w}}  {'type':<{type_w}}  default"]
    section = None
    for sec, name, type_name, default, f in rows:
        if sec != section:
            lines += ["", f"{sec}:"]
            section = sec
        lines.append(f"  {name:<{name_w}}  {type_name:<{type_w}}  {default}".rstrip())
        doc = f.metadata.get("doc", "")
        if name in numeric:  # the declared range, checked at load time
            doc = f"{doc} Valid: {field_range(cls, name) or FINITE}.".strip()
        if doc:
            lines += textwrap.wrap(doc, width=104, initial_indent=" " * 6, subsequent_indent=" " * 6)
    return "\n".join(lines) + "\n"


def config_to_dict(cfg: Any) -> dict:
    """The init fields of ``cfg`` as plain YAML-able values (what ``save_config`` writes)."""
    return {f.name: _plain(getattr(cfg, f.name)) for f in config_fields(type(cfg))}


def save_config(cfg: Any, path: str | os.PathLike) -> None:
    """Write ``cfg`` as YAML that ``load_config(type(cfg), path)`` reads back to an equal config."""
    cls = type(cfg)
    header = (
        f"# {cls.__name__} ({cls.__module__}), written by alignkit.\n"
        f"# Reload with load_config({cls.__name__}, this_file); run again with: alignkit <stage> this_file\n"
    )
    body = yaml.safe_dump(config_to_dict(cfg), sort_keys=False, default_flow_style=False, allow_unicode=True)
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    # Write then rename, so an interrupted run never leaves a half-written config next to its checkpoints.
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(header + body, encoding="utf-8")
    os.replace(tmp, path)


# --- helpers ---------------------------------------------------------------------------------


def _is_required(f: dataclasses.Field) -> bool:
    """Declared with ``required(...)``, or a plain dataclass field without any default."""
    no_default = f.default is dataclasses.MISSING and f.default_factory is dataclasses.MISSING
    return bool(f.metadata.get("required")) or no_default


class _Mismatch(Exception):
    """A value does not fit an annotation (turned into a ConfigError naming the field by the caller)."""


class _DuplicateKey(Exception):
    """A mapping in YAML text names a key twice (``line``: where it is first written, ``again``: the repeat;
    both 1-based)."""

    def __init__(self, key: Any, line: int, again: int) -> None:
        super().__init__(f"key '{key}' appears twice, on line {line} and on line {again}")
        self.key, self.line, self.again = key, line, again


class _UniqueKeyLoader(yaml.SafeLoader):
    """PyYAML's safe loader (plain data only, no Python objects) that refuses a key written twice in one
    mapping, where the safe loader keeps the last one silently. Keys a merge (``<<: *base``) brings in may be
    overridden, as YAML intends: only the keys written in the mapping itself are compared."""

    def construct_mapping(self, node: yaml.MappingNode, deep: bool = False) -> dict:
        seen: dict[Any, int] = {}
        for key_node, _ in node.value if isinstance(node, yaml.MappingNode) else []:  # else: PyYAML's error
            if not isinstance(key_node, yaml.ScalarNode) or key_node.tag == "tag:yaml.org,2002:merge":
                continue  # a collection as a key is refused by the safe loader itself (unhashable)
            key = self.construct_object(key_node)
            if not isinstance(key, collections.abc.Hashable):  # `? !!set x`: refused by PyYAML itself below
                continue
            line = key_node.start_mark.line + 1
            if key in seen:
                raise _DuplicateKey(key, seen[key], line)
            seen[key] = line
        return super().construct_mapping(node, deep=deep)

    def construct_object(self, node: yaml.Node, deep: bool = False) -> Any:
        # PyYAML's safe constructors let Python's own errors out on a scalar they cannot build: `!!int` with no
        # digits (IndexError), `!!bool x` (KeyError), `!!timestamp x` (AttributeError), a date of month 13 or
        # an integer of more than 4300 digits (ValueError). Each is a malformed document: say so, with its line.
        try:
            return super().construct_object(node, deep=deep)
        except (ValueError, IndexError, KeyError, AttributeError, TypeError, OverflowError) as e:
            raise yaml.constructor.ConstructorError(
                None, None, f"cannot read {node.value!r} as {node.tag} ({e})", node.start_mark
            ) from None


def _parse_yaml(text: str) -> Any:
    """``text`` read as YAML with ``_UniqueKeyLoader``: raises yaml.YAMLError, _DuplicateKey, or RecursionError
    (nesting deeper than Python's stack)."""
    return yaml.load(text, Loader=_UniqueKeyLoader)  # a SafeLoader subclass: plain data only


def _read_yaml_mapping(path: str | os.PathLike) -> dict:
    try:
        text = Path(path).read_text(encoding="utf-8")
    except FileNotFoundError:
        raise ConfigError(f"config file not found: {path}") from None
    except (OSError, UnicodeDecodeError) as e:  # a directory, no permission, not UTF-8 text
        raise ConfigError(f"cannot read config file {path}: {e}") from None
    try:
        data = _parse_yaml(text)
    except _DuplicateKey as e:
        raise ConfigError(f"config file {path}: {e}; keep one") from None
    except (yaml.YAMLError, RecursionError) as e:
        raise ConfigError(f"config file {path} is not valid YAML: {e}") from None
    if data is None:  # an empty file (or only comments) sets nothing
        return {}
    if not isinstance(data, dict):
        raise ConfigError(
            f"config file {path} must be a mapping of 'key: value' lines, but it holds a {type(data).__name__}"
        )
    return data


def _parse_override(text: str) -> tuple[str, str, Any]:
    """``"key=value"`` -> (key, raw value text, value parsed as YAML)."""
    key, sep, raw = text.partition("=")
    key, raw = key.strip(), raw.strip()
    if key.startswith("-"):
        fixed = text.lstrip("-") if sep else f"{text.lstrip('-')}=..."
        raise ConfigError(
            f"unknown option '{text}': settings are written key=value without dashes, e.g. '{fixed}'"
        )
    if not sep or not key:
        raise ConfigError(
            f"expected an override of the form key=value (e.g. learning_rate=1e-5), got '{text}'"
        )
    try:
        value = _parse_yaml(raw)
    except _DuplicateKey as e:
        raise ConfigError(f"override '{text}': key '{e.key}' appears twice; keep one") from None
    except (yaml.YAMLError, RecursionError):
        # Not YAML (e.g. an unbalanced bracket): keep the text; the type check reports it if it does not fit.
        value = raw
    return key, raw, value


# The old spellings (ALIASES) already warned about in this process: each message is printed once per spelling.
_WARNED_RENAMES: set[str] = set()


def _warn_once(key: str, message: str) -> None:
    """Print ``message`` on stderr the first time this process meets ``key`` (an old spelling)."""
    if key not in _WARNED_RENAMES:
        _WARNED_RENAMES.add(key)
        print(f"warning: {message}", file=sys.stderr)


def _read_source(
    cls: type,
    fields: dict,
    aliases: dict[str, str | Retired],
    items: collections.abc.Iterable[tuple[Any, Any, str | None]],
    source: str,
    notices: dict[str, str],
) -> dict[str, tuple[Any, str | None, str]]:
    """The fields one source (a YAML file, the command line, keyword arguments) sets, as name -> (value, raw,
    source), each old spelling (``ALIASES``) taken under its new one with its message added to ``notices``.

    Two spellings of one setting in one source (an old and the new, or two old ones) are an error: which one
    was meant is not ours to guess. An old key given null yields to another spelling (an older config.yaml
    wrote every old key, most of them null). Across sources the later wins, as for any key: an older run's
    config.yaml with a new name on the command line."""
    out: dict[str, tuple[Any, str | None, str]] = {}
    spelled: dict[str, str | None] = {}  # field -> the old spelling that set it (None: its own name)
    for key, value, raw in items:
        head, dot, sub = key.partition(".") if isinstance(key, str) else ("", "", "")
        if dot and sub and typing.get_origin(_unoptional(typing.get_type_hints(cls).get(head))) is dict:
            # columns.prompt=question: one entry of a mapping field, merged into what is already given
            mapping = out[head][0] if head in out and isinstance(out[head][0], dict) else {}
            out[head], spelled[head] = ({**mapping, sub: raw if raw is not None else value}, _MERGE, source), None
            continue
        old, alias = _alias(aliases, fields, key, value)
        if isinstance(alias, Retired):
            if not (value == alias.default or (alias.default is None and _is_none(value))):
                raise ConfigError(f"config key '{key}' {alias.why} (from {source})")
            notices[key] = (
                f"config key '{key}' {alias.why}; ignored at its old default {_show(alias.default)} for one "
                f"release (from {source})"
            )
            continue
        if alias is None:
            name = _check_key(cls, fields, key, source)
        else:
            name, sets_value, new_value = alias.partition("=")
            if sets_value:
                value, raw = new_value, None
            what = "value" if "=" in old else "key"
            notices[old] = (
                f"config {what} '{old}' (from {source}) is deprecated; write '{alias}' instead (the old spelling "
                "works until the next release)"
            )
        if name in spelled and spelled[name] != old:  # one spelling written twice: the later wins, as for any key
            if _yields(old, value):
                continue
            if not _yields(spelled[name], out[name][0]):
                blamed, other = (old, spelled[name] or name) if old is not None else (spelled[name], name)
                raise ConfigError(
                    f"config {'value' if '=' in blamed else 'key'} '{blamed}' (from {source}) is the old "
                    f"spelling of '{aliases[blamed]}', and '{other}' is also given; keep only '{name}'",
                    (name,),
                )
        out[name], spelled[name] = (value, raw, source), old
    return out


_MERGE = "<entries of a mapping>"  # the raw text _read_source gives for key.sub=value entries


def _unoptional(hint: Any) -> Any:
    """``X`` for ``X | None``; any other hint as it is."""
    args = [a for a in typing.get_args(hint) if a is not type(None)]
    is_union = typing.get_origin(hint) in (typing.Union, types.UnionType)
    return args[0] if is_union and len(args) == 1 else hint


def _alias(aliases: dict[str, str | Retired], fields: dict, key: Any, value: Any) -> tuple[Any, Any]:
    """(the old spelling ``key=value`` is, what replaced it), or (None, None) where it is no old spelling."""
    if not isinstance(key, str):
        return None, None
    if key not in fields and key in aliases:
        return key, aliases[key]
    if isinstance(value, bool):  # an old boolean key (tensorboard: false), spelled as on the command line
        value = "true" if value else "false"
    elif isinstance(value, str) and value.strip().lower() in _TRUE_WORDS | _FALSE_WORDS:  # tensorboard=no
        value = "true" if value.strip().lower() in _TRUE_WORDS else "false"
    spelling = f"{key}={value.strip()}" if isinstance(value, str) else None
    if spelling in aliases:
        return spelling, aliases[spelling]
    return None, None


def _yields(old: str | None, value: Any) -> bool:
    """An old key (not an old value) given null: it selected nothing, so another spelling of its setting wins."""
    return old is not None and "=" not in old and _is_none(value)


def _check_key(cls: type, fields: dict, key: Any, source: str) -> str:
    if isinstance(key, str) and key in fields:
        return key
    close = difflib.get_close_matches(str(key), list(fields), n=1)
    if close:
        hint = f"did you mean '{close[0]}'?"
    else:
        hint = f"valid keys are: {', '.join(fields)} (`--help` describes each)"
    raise ConfigError(f"unknown config key '{key}' for {cls.__name__}; {hint} (from {source})")


def _is_none(value: Any) -> bool:
    return value is None or (isinstance(value, str) and value.strip().lower() in _NONE_WORDS)


def _is_quoted(raw: str) -> bool:
    return len(raw) >= 2 and raw[0] == raw[-1] and raw[0] in "'\""


def _coerce(hint: Any, value: Any, raw: str | None) -> Any:
    """``value`` checked against ``hint`` and converted where the conversion loses nothing.

    ``raw`` is the command-line text when the value came from an override: a ``str`` field takes that text
    as written (``train_split=2024`` is the string '2024', not the int YAML would read) unless it is quoted.
    """
    origin = typing.get_origin(hint)
    args = typing.get_args(hint)
    if hint is Any:
        return value
    if origin in (typing.Union, types.UnionType):
        if type(None) in args and _is_none(value):
            return None
        arms = [arm for arm in args if arm is not type(None)]
        if isinstance(value, (list, tuple)):  # reward=[a, b]: a list arm first, where a str arm would keep the text
            arms.sort(key=lambda arm: arm is str)
        for arm in arms:
            try:
                return _coerce(arm, value, raw)
            except _Mismatch:
                continue
        raise _Mismatch
    if origin is Literal:
        for allowed in args:
            if value == allowed and type(value) is type(allowed):
                return allowed
            if raw is not None and raw == str(allowed):
                return allowed
        raise _Mismatch
    if origin is tuple:
        if not isinstance(value, (list, tuple)):
            raise _Mismatch
        if len(args) == 2 and args[1] is Ellipsis:  # tuple[int, ...]
            args = (args[0],) * len(value)
        if len(value) != len(args):
            raise _Mismatch
        return tuple(_coerce(item_hint, item, None) for item_hint, item in zip(args, value))
    if origin is dict:
        key_hint, value_hint = args or (Any, Any)
        if not isinstance(value, dict):
            raise _Mismatch
        return {_coerce(key_hint, k, None): _coerce(value_hint, v, None) for k, v in value.items()}
    if origin is list or hint is list:
        item_hint = args[0] if args else Any
        if isinstance(value, str):  # lora_target_modules=q_proj,v_proj
            items = [part.strip() for part in value.split(",") if part.strip()]
        elif isinstance(value, (list, tuple)):
            items = list(value)
        else:
            raise _Mismatch
        return [_coerce(item_hint, item, None) for item in items]
    if hint is bool:
        if isinstance(value, bool):
            return value
        if isinstance(value, int) and value in (0, 1):
            return bool(value)
        if isinstance(value, str) and value.strip().lower() in _TRUE_WORDS | _FALSE_WORDS:
            return value.strip().lower() in _TRUE_WORDS
        raise _Mismatch
    if hint is int:
        if isinstance(value, bool):
            raise _Mismatch
        if isinstance(value, int):
            return value
        if isinstance(value, str):
            try:
                return int(value)
            except ValueError:
                value = _float_or_mismatch(value)  # "1e3" -> 1000.0, accepted below as a whole number
        if isinstance(value, float) and value.is_integer():
            return int(value)
        raise _Mismatch
    if hint is float:
        if isinstance(value, bool):
            raise _Mismatch
        if isinstance(value, float):
            return value
        if isinstance(value, int):
            try:
                return float(value)
            except OverflowError:  # past float's range: infinite, as float("1e400") is (the range refuses it)
                return math.inf if value > 0 else -math.inf
        if isinstance(value, str):  # PyYAML reads 1e-5 (no dot) as a string
            return _float_or_mismatch(value)
        raise _Mismatch
    if hint is str:
        if raw is not None and value is not None and not _is_quoted(raw):
            return raw
        if isinstance(value, str):
            return value
        raise _Mismatch
    if isinstance(hint, type):
        if isinstance(value, hint):
            return value
        raise _Mismatch
    return value


def _is_numeric(hint: Any) -> bool:
    """int or float, alone, optional, or the items of a tuple (bool is not a number here)."""
    if hint in (int, float):
        return True
    if typing.get_origin(hint) in (typing.Union, types.UnionType, tuple):
        return any(_is_numeric(a) for a in typing.get_args(hint) if a is not Ellipsis)
    return False


def _shown(value: Any) -> str:
    """A value in an error message as the user wrote it: a row range as a list, a float as Python spells it."""
    if isinstance(value, tuple):
        return "[" + ", ".join(_shown(v) for v in value) + "]"
    return repr(value)


def _float_or_mismatch(text: str) -> float:
    try:
        return float(text)
    except ValueError:
        raise _Mismatch from None


def _expectation(hint: Any, value: Any) -> str:
    """The phrase after the key in a type error: 'expects float' or 'must be one of ...'."""
    args = [a for a in typing.get_args(hint) if a is not type(None)]
    optional = len(args) < len(typing.get_args(hint))
    literals = [hint] if typing.get_origin(hint) is Literal else args
    if literals and all(typing.get_origin(a) is Literal for a in literals):
        allowed = [repr(v) for lit in literals for v in typing.get_args(lit)] + (["None"] if optional else [])
        return f"must be one of {', '.join(allowed)}"
    number = isinstance(value, (int, float)) and not isinstance(value, bool)
    takes_text = hint is str or (typing.get_origin(hint) in (typing.Union, types.UnionType) and str in args)
    extra = " (quote numbers meant as text in YAML)" if number and takes_text else ""
    return f"expects {_type_name(hint)}{extra}"


def _type_name(hint: Any) -> str:
    origin = typing.get_origin(hint)
    args = typing.get_args(hint)
    if hint is type(None):
        return "None"
    if origin in (typing.Union, types.UnionType):
        return " | ".join(_type_name(a) for a in args)
    if origin is Literal:
        return "{" + ",".join(str(a) for a in args) + "}"
    if origin is not None:
        return f"{origin.__name__}[{', '.join(_type_name(a) for a in args)}]"
    if isinstance(hint, type):
        return hint.__name__
    return str(hint).replace("typing.", "")


def _show(value: Any) -> str:
    """A default as a user would write it in YAML or on the command line."""
    if value is None:
        return "None"
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, str):
        return value if value else "''"
    if isinstance(value, (list, tuple)):
        return "[" + ", ".join(_show(v) for v in value) + "]"
    return repr(value)


def _plain(value: Any) -> Any:
    if isinstance(value, (list, tuple)):
        return [_plain(v) for v in value]
    if isinstance(value, dict):
        return {k: _plain(v) for k, v in value.items()}
    if isinstance(value, os.PathLike):
        return os.fspath(value)
    return value


_SECTION = re.compile(r"#\s*-+\s*(.+?)\s*-+\s*$")
_FIELD = re.compile(r"(\w+)\s*:")


def _field_sections(cls: type) -> dict[str, str]:
    """Field name -> the '# --- section ---' comment above it in the class that first declares it.

    Read from the source so ``--help`` groups fields as the code does; fields of a class without section
    comments (or whose source is unavailable) are grouped under the class name.
    """
    sections: dict[str, str] = {}
    for klass in reversed(cls.__mro__):
        if not dataclasses.is_dataclass(klass):
            continue
        own = set(getattr(klass, "__annotations__", {}))
        try:
            lines = inspect.getsource(klass).splitlines()
        except (OSError, TypeError):
            lines = []
        # The class body: what follows the `class ...:` line (decorators come before it).
        start = next((i + 1 for i, ln in enumerate(lines) if ln.lstrip().startswith("class ")), len(lines))
        body = lines[start:]
        indent = next((len(ln) - len(ln.lstrip()) for ln in body if ln.strip()), 4)
        current = klass.__name__
        for line in body:
            if len(line) - len(line.lstrip()) != indent:
                continue
            text = line.strip()
            if m := _SECTION.match(text):
                current = m.group(1)
            elif (m := _FIELD.match(text)) and m.group(1) in own:
                sections.setdefault(m.group(1), current)
        for name in own:  # source unavailable: still group the class's fields together
            sections.setdefault(name, klass.__name__)
    return sections
