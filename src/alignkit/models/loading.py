"""Loading models and tokenizers (embedded name, local dir or hub id), choosing device and dtype, adding
LoRA adapters, and saving/loading the final model of a run. Weights are read from safetensors only:
nothing here unpickles a file.
"""

from __future__ import annotations

import contextlib
import functools
import json
import os
import secrets
import shutil
import urllib.error
import urllib.request
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import torch
from torch import nn

from alignkit.errors import AlignkitError
from alignkit.models.embedded import EMBEDDED_MODELS, cache_dir, prepare_embedded

# The one place dtypes are decided (what dtype=auto means per use, mixed or pure training); re-exported here.
from alignkit.models.precision import Use, pick_dtype

ADAPTER_RECORD = "ALIGNKIT_ADAPTER.json"
ADAPTER_README = "ALIGNKIT_ADAPTER.md"

_PICKLE_SUFFIXES = (".bin", ".pt", ".pth", ".ckpt", ".pkl")


class ModelLoadError(AlignkitError, ValueError):
    """A model cannot be loaded as asked; the message says why and what to do."""


# Seconds to wait for the hub to answer before taking it as unreachable. Without this check, a hub id with no
# network spends about 50 s in the download retries of transformers before it fails.
HUB_PROBE_TIMEOUT_S = 3.0
_TRUE_ENV = ("1", "on", "yes", "true")


# ---------------------------------------------------------------------------------------------
# Where the model comes from, where it runs, in which dtype
# ---------------------------------------------------------------------------------------------


def resolve_model(name: str) -> str:
    """What to pass to ``from_pretrained``: the prepared dir of an embedded model, a local dir, or a hub id.

    A hub id is returned as is (``from_pretrained`` downloads it where there is internet). A name that can
    only be a path (absolute, ``./``, ``~``, or more than one ``/``) but does not exist is an error here,
    rather than a confusing hub error later.
    """
    if name in EMBEDDED_MODELS:
        return str(prepare_embedded(name))
    path = Path(name).expanduser()
    if path.is_dir():
        return str(path)
    if path.exists():
        raise ModelLoadError(f"model '{name}' is a file; expected a model directory or a hub id")
    if name.startswith(("/", "./", "../", "~")) or name.count("/") > 1 or "\\" in name:
        raise ModelLoadError(f"model directory '{name}' does not exist (resolved to {path.resolve()})")
    return _hub_or_cache(name)


def _hub_or_cache(repo_id: str) -> str:
    """A hub id as is when the hub answers; offline, its snapshot in the local Hugging Face cache, or an error
    that says the id is neither a local directory nor cached (instead of a minute of retries)."""
    reason = _hub_unavailable()
    if reason is None:
        return repo_id
    snapshot = _cached_snapshot(repo_id)
    if snapshot is not None:
        return snapshot
    from huggingface_hub import constants

    raise ModelLoadError(
        f"model '{repo_id}' is neither a local directory nor in the Hugging Face cache "
        f"({constants.HF_HUB_CACHE}), and {reason}; give the path of a model directory, or download it where there is a network "
        f"(e.g. `hf download {repo_id}`)"
    )


def _hub_unavailable() -> str | None:
    """Why the hub cannot be used now (offline mode set, or the endpoint does not answer), or None."""
    for var in ("HF_HUB_OFFLINE", "TRANSFORMERS_OFFLINE"):
        if os.environ.get(var, "").strip().lower() in _TRUE_ENV:
            return f"{var} is set (offline mode)"
    endpoint = os.environ.get("HF_ENDPOINT", "").strip() or "https://huggingface.co"
    if not _endpoint_answers(endpoint.rstrip("/")):
        return f"the hub ({endpoint}) is unreachable"
    return None


@functools.lru_cache(maxsize=8)
def _endpoint_answers(endpoint: str) -> bool:
    """Whether ``endpoint`` answers an HTTP request within HUB_PROBE_TIMEOUT_S (any status counts: the hub is
    there); asked once per process. urllib honours the same proxy variables as the hub client."""
    try:
        with urllib.request.urlopen(
            urllib.request.Request(endpoint, method="HEAD"), timeout=HUB_PROBE_TIMEOUT_S
        ):
            return True
    except urllib.error.HTTPError:
        return True
    except (OSError, ValueError):  # URLError, refused, timed out, DNS failure; ValueError: a malformed URL
        return False


def _cached_snapshot(repo_id: str) -> str | None:
    """The folder of ``repo_id``'s main revision in the Hugging Face cache, if its config.json is there."""
    from huggingface_hub import try_to_load_from_cache

    try:
        config = try_to_load_from_cache(repo_id, "config.json")
    except ValueError:  # not a valid repo id (huggingface_hub's HFValidationError): it cannot be cached
        return None
    return str(Path(config).parent) if isinstance(config, str) else None


@contextlib.contextmanager
def model_load_errors(name: str, what: str):
    """Turns a failure of transformers to load ``name`` (no such repo, no config.json or tokenizer files, an
    architecture it does not know) into a ModelLoadError that names it; the original stays chained."""
    try:
        yield
    except (OSError, ValueError) as err:
        if isinstance(err, AlignkitError):
            raise
        raise ModelLoadError(f"cannot load the {what} of '{name}': {err}") from err


def pick_device() -> torch.device:
    """CUDA when available, else CPU; in a process started by torchrun or accelerate launch, the GPU of its
    local rank (LOCAL_RANK), so each process trains on its own device."""
    if not torch.cuda.is_available():
        return torch.device("cpu")
    local_rank = os.environ.get("LOCAL_RANK")
    return torch.device(f"cuda:{int(local_rank)}" if local_rank is not None else "cuda")


# ---------------------------------------------------------------------------------------------
# Loading
# ---------------------------------------------------------------------------------------------


def load_tokenizer(name: str, trust_remote_code: bool = False):
    """AutoTokenizer for ``name`` with a pad token (eos when it has none) and right padding.

    Right padding is what training collates with; generation code switches to left padding itself.
    """
    from transformers import AutoTokenizer

    resolved = resolve_model(name)
    with model_load_errors(name, "tokenizer"):
        tokenizer = AutoTokenizer.from_pretrained(resolved, trust_remote_code=trust_remote_code)
    if tokenizer.pad_token is None:
        if tokenizer.eos_token is None:
            raise ModelLoadError(f"tokenizer of '{name}' has neither a pad nor an eos token to pad with")
        # Masks in alignkit are explicit (attention_mask, loss_mask), so pad == eos never hides a real eos.
        tokenizer.pad_token = tokenizer.eos_token
    tokenizer.padding_side = "right"
    return tokenizer


def _require_safetensors(directory: Path) -> None:
    files = [p.name for p in directory.iterdir() if p.is_file()]
    if any(f.endswith(".safetensors") or f.endswith(".safetensors.index.json") for f in files):
        return
    pickles = sorted(f for f in files if f.endswith(_PICKLE_SUFFIXES))
    if pickles:
        raise ModelLoadError(
            f"{directory} holds only pickled weights ({', '.join(pickles)}); alignkit loads safetensors only, "
            "because unpickling a file can run arbitrary code. If you trust the file, convert it once:\n"
            '    python -c "from transformers import AutoModelForCausalLM as M; '
            f"M.from_pretrained('{directory}', use_safetensors=False).save_pretrained('{directory}')\""
        )
    raise ModelLoadError(f"{directory} holds no model weights (*.safetensors)")


def load_model(
    name: str,
    dtype: str | torch.dtype = "auto",
    trust_remote_code: bool = False,
    device: torch.device | str | None = None,
    load_on: str | None = None,
    use: Use = "generate",
):
    """A causal LM from an embedded name, local dir or hub id, in ``pick_dtype(dtype, device, use)``, on
    ``device``; or first on ``load_on`` where that is given: "cpu", or "meta" for the modules without weights
    (``load_pretrained``). Sharded training loads this way (``alignkit.training.distributed.load_on``). A
    training stage passes the dtype its weights are held in (``precision.weights_dtype``: fp32 in mixed
    precision).

    Returned in eval mode (as ``from_pretrained`` leaves it); the training loop switches to train mode.
    """
    from transformers import AutoModelForCausalLM

    return load_pretrained(AutoModelForCausalLM, name, dtype, trust_remote_code, device, load_on, use=use)


def load_pretrained(
    auto_class,
    name: str,
    dtype: str | torch.dtype = "auto",
    trust_remote_code: bool = False,
    device: torch.device | str | None = None,
    load_on: str | None = None,
    use: Use = "generate",
    **config_kwargs,
):
    """``auto_class.from_pretrained`` (safetensors only) of an embedded name, local dir or hub id, in
    ``pick_dtype(dtype, device, use)``, placed on ``load_on`` or else ``device``. ``load_on="meta"`` builds the
    modules from the config with the shapes and dtypes of the weights and no weights (none read, no memory):
    under FSDP the ranks but the main process load this way, and ``distributed.shard`` gives each its shard of
    the main process's weights. ``config_kwargs`` go to the config (e.g. num_labels)."""
    from transformers import AutoConfig

    resolved = resolve_model(name)
    if Path(resolved).is_dir():
        _require_safetensors(Path(resolved))
    device = torch.device(device) if device is not None else pick_device()
    load_device = torch.device(load_on) if load_on is not None else device
    if load_device.type == "meta":
        with model_load_errors(name, "config"):
            config = AutoConfig.from_pretrained(
                resolved, trust_remote_code=trust_remote_code, **config_kwargs
            )
        with torch.device("meta"):
            model = auto_class.from_config(
                config, dtype=pick_dtype(dtype, device, use), trust_remote_code=trust_remote_code
            )
        return model.eval()
    with model_load_errors(name, "model"):
        model = auto_class.from_pretrained(
            resolved,
            dtype=pick_dtype(dtype, device, use),
            trust_remote_code=trust_remote_code,
            use_safetensors=True,  # for hub ids too: a repo with only pickles is refused by transformers
            **config_kwargs,
        )
    return model.to(load_device)


def enable_gradient_checkpointing(model: nn.Module, context_fn=None) -> int:
    """Recompute each decoder layer in the backward instead of keeping its activations (transformers' own
    checkpointing, non-reentrant: a LoRA model needs no input that requires grad, and FSDP's shards are
    gathered again for the recomputation). Only in training mode; generation and evaluation passes keep their
    usual cost. Applied to every outermost transformers model inside ``model`` (a PEFT model's base, PPO's
    value model's backbone). ``context_fn`` goes to torch's checkpoint (``value.recompute_with_active_adapter``).
    Returns how many; an error names the setting where there is none."""
    kwargs = {"use_reentrant": False, **({"context_fn": context_fn} if context_fn is not None else {})}
    n = _checkpoint_layers(model, kwargs)
    if n == 0:
        raise ModelLoadError(
            f"gradient_checkpointing=true, but {type(model).__name__} holds no transformers model whose layers "
            "alignkit can checkpoint; set gradient_checkpointing=false"
        )
    return n


def _checkpoint_layers(model: nn.Module, kwargs: dict) -> int:
    from transformers import PreTrainedModel

    if isinstance(model, PreTrainedModel):
        if hasattr(model, "activation_checkpointing_enable"):  # transformers 5 (the older name is deprecated)
            model.activation_checkpointing_enable(activation_checkpointing_kwargs=kwargs)
        else:
            model.gradient_checkpointing_enable(gradient_checkpointing_kwargs=kwargs)
        return 1
    return sum(_checkpoint_layers(child, kwargs) for child in model.children())


# ---------------------------------------------------------------------------------------------
# LoRA
# ---------------------------------------------------------------------------------------------


def _linear_module_names(model: nn.Module) -> set[str]:
    """Last name component of every linear layer (nn.Linear, and GPT-2's Conv1D), which PEFT can target."""
    from transformers.pytorch_utils import Conv1D

    return {
        name.rsplit(".", 1)[-1] for name, m in model.named_modules() if isinstance(m, (nn.Linear, Conv1D))
    }


def apply_lora(model: nn.Module, cfg: Any):
    """Wrap ``model`` in LoRA adapters from the TrainConfig fields ``lora_r/alpha/dropout/target_modules``.

    Only the adapters are trainable. Target names the model does not have are dropped (the defaults name
    Llama's projections); none matching is an error that lists the model's linear layers.
    """
    from peft import LoraConfig, get_peft_model

    # LoRA's A matrices are drawn at random: seed them so the same config gives the same adapters.
    torch.manual_seed(getattr(cfg, "seed", 0))
    linear = _linear_module_names(model)
    targets = [t for t in cfg.lora_target_modules if t in linear]
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
        task_type="CAUSAL_LM",
    )
    return get_peft_model(model, lora_config)


def plain_weights(model: nn.Module) -> Iterator[tuple[str, torch.Tensor]]:
    """``model``'s weights as a plain transformers model's state dict, one (name, tensor) at a time: what a
    vLLM engine on the base model's directory takes (``VLLMSampler.update_weights``).

    A PEFT model yields its base model's names (no ``base_model.model.``, ``base_layer`` or ``lora_*``), each
    LoRA layer's weight with the active adapter folded in as ``merge_and_unload`` folds it, W + PEFT's own
    ``get_delta_weight`` (its scaling and fan_in_fan_out), but into new tensors: the model is not touched
    (merging and unmerging in place would not give the weights back bit for bit). Other adapters, such as
    PPO's value adapter, are left out. Any other model yields its state dict as it is.
    """
    if not _is_peft(model):
        yield from model.state_dict().items()
        return
    from peft.tuners.lora import LoraLayer

    adapter = model.active_adapter
    for name, config in model.peft_config.items():
        if getattr(config, "modules_to_save", None) or getattr(config, "trainable_token_indices", None):
            raise ModelLoadError(
                f"adapter '{name}' trains whole modules or tokens; only LoRA layers are merged"
            )
    base = model.get_base_model()
    lora_layers = {name: m for name, m in base.named_modules() if isinstance(m, LoraLayer)}
    for key, tensor in base.state_dict().items():
        layer_name = _lora_layer_of(key, lora_layers)
        if layer_name is None:
            yield key, tensor
            continue
        rest = key[len(layer_name) + 1 :]
        if not rest.startswith("base_layer."):
            continue  # an adapter's own A, B (of any adapter)
        if rest == "base_layer.weight":
            tensor = _with_lora_delta(lora_layers[layer_name], adapter, tensor)
        yield f"{layer_name}.{rest.removeprefix('base_layer.')}", tensor


def _lora_layer_of(key: str, lora_layers: dict[str, nn.Module]) -> str | None:
    """The name of the LoRA layer that holds state-dict entry ``key``, or None."""
    parts = key.split(".")
    for end in range(len(parts) - 1, 0, -1):
        if ".".join(parts[:end]) in lora_layers:
            return ".".join(parts[:end])
    return None


@torch.no_grad()
def _with_lora_delta(layer, adapter: str, weight: torch.Tensor) -> torch.Tensor:
    """The LoRA ``layer``'s base ``weight`` with ``adapter``'s delta added (a new tensor), as the layer's
    forward applies it: unchanged where the layer lacks that adapter or its adapters are switched off."""
    if layer.merged:
        raise ModelLoadError("a LoRA adapter is merged into the base weights already; unmerge it first")
    if adapter not in layer.lora_A and adapter not in getattr(layer, "lora_embedding_A", {}):
        return weight
    if layer.disable_adapters:
        return weight
    if adapter in getattr(layer, "lora_variant", {}) or layer.lora_bias.get(adapter, False):
        raise ModelLoadError(
            f"adapter '{adapter}' is not plain LoRA (DoRA, a LoRA bias, ...); it cannot be merged here"
        )
    # Added as merge_and_unload adds it (in place, W += delta: in the wider of the two dtypes, rounded once to
    # W's; PEFT keeps a bf16 model's adapters in float32), so the engine holds the weights the final merged
    # model will have, bit for bit.
    return (weight + layer.get_delta_weight(adapter)).to(weight.dtype)


def count_parameters(model: nn.Module) -> tuple[int, int]:
    """(trainable, total) parameter counts; tied weights are counted once."""
    trainable = total = 0
    for p in model.parameters():  # parameters() yields a shared (tied) tensor once
        total += p.numel()
        if p.requires_grad:
            trainable += p.numel()
    return trainable, total


# ---------------------------------------------------------------------------------------------
# The final model of a run
# ---------------------------------------------------------------------------------------------


def _is_peft(model: nn.Module) -> bool:
    from peft import PeftModel

    return isinstance(model, PeftModel)


def _embedded_name_of(base: str) -> str | None:
    """The embedded model name when ``base`` is its prepared directory in the cache, else None."""
    for name in EMBEDDED_MODELS:
        if base == name or Path(base).expanduser() == cache_dir() / "models" / name:
            return name
    return None


def _adapter_readme(base_model: str) -> str:
    return (
        "# LoRA adapter saved by alignkit\n\n"
        f"Base model: `{base_model}`\n\n"
        "Load it with:\n\n"
        "```python\n"
        "from peft import PeftModel\n"
        "from transformers import AutoModelForCausalLM, AutoTokenizer\n\n"
        f"model = PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained({base_model!r}), PATH)\n"
        "tokenizer = AutoTokenizer.from_pretrained(PATH)\n"
        "```\n\n"
        "or `alignkit.models.loading.load_final(PATH)`. `model.merge_and_unload()` turns it into a plain model.\n"
    )


def save_final(
    model: nn.Module,
    tokenizer: Any,
    path: str | os.PathLike,
    merge_lora: bool = True,
    base_model: str | None = None,
    state_dict: dict | None = None,
) -> Path:
    """Save the final model and its tokenizer to ``path`` (safetensors), replacing what is there.

    A PEFT model is merged into a plain model when ``merge_lora`` (``merge_and_unload`` works in place: the
    wrapper afterwards computes the same function with the adapters folded in, so call this at the end);
    else only the adapter is saved, with ``ALIGNKIT_ADAPTER.json``/``.md`` recording the base model
    (``base_model``, default: the one PEFT recorded) and how to load it. Written into a temp dir that then
    replaces ``path``, so a crash never leaves a half-written final model. ``state_dict``, when given, holds
    the weights to write instead of the model's own (a sharded model's, gathered whole: see
    ``alignkit.training.distributed.save_from_main``).
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.parent / f".{path.name}.tmp-{os.getpid()}-{secrets.token_hex(4)}"
    try:
        if _is_peft(model) and not merge_lora:
            base = base_model or model.peft_config[model.active_adapter].base_model_name_or_path
            if not base:
                raise ModelLoadError(
                    "cannot save an adapter without knowing its base model; pass base_model="
                )
            # The active adapter alone: the policy's, not PPO's value adapter beside it (a snapshot mid-run).
            model.save_pretrained(tmp, safe_serialization=True, selected_adapters=[model.active_adapter])
            record = {
                "base_model": base,
                # The embedded model's name too, so load_final can re-prepare it if the cache was cleared.
                "alignkit_model": _embedded_name_of(base),
                "load": [
                    "from peft import PeftModel; from transformers import AutoModelForCausalLM",
                    f"model = PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained({base!r}), {str(path)!r})",
                ],
            }
            (tmp / ADAPTER_RECORD).write_text(json.dumps(record, indent=2) + "\n")
            (tmp / ADAPTER_README).write_text(_adapter_readme(base))
        else:
            plain = model.merge_and_unload() if _is_peft(model) else model
            plain.save_pretrained(tmp, state_dict=state_dict)  # transformers 5 writes safetensors only
        if tokenizer is not None:
            tokenizer.save_pretrained(tmp)
        _replace_dir(tmp, path)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return path


def _replace_dir(src: Path, dest: Path) -> None:
    """Move ``src`` to ``dest``; an existing ``dest`` is moved aside first and deleted after."""
    if not dest.exists():
        os.replace(src, dest)
        return
    old = dest.parent / f".{dest.name}.old-{os.getpid()}-{secrets.token_hex(4)}"
    os.replace(dest, old)
    os.replace(src, dest)
    shutil.rmtree(old, ignore_errors=True)


def load_final(
    path: str | os.PathLike,
    dtype: str | torch.dtype = "auto",
    device: torch.device | str | None = None,
    trust_remote_code: bool = False,
    use: Use = "generate",
):
    """Load what ``save_final`` wrote: a plain model dir, or an adapter dir on top of its recorded base.

    An adapter comes back as a ``PeftModel`` with frozen adapters (``merge_and_unload()`` makes it plain).
    The tokenizer is in the same directory: ``load_tokenizer(path)``.
    """
    path = Path(path)
    record_file = path / ADAPTER_RECORD
    if not record_file.is_file():
        return load_model(str(path), dtype=dtype, trust_remote_code=trust_remote_code, device=device, use=use)
    from peft import PeftModel

    record = json.loads(record_file.read_text())
    base_name = record["base_model"]
    if record.get("alignkit_model") and not Path(base_name).expanduser().is_dir():
        base_name = record["alignkit_model"]  # the embedded model's cache dir is gone: prepare it again
    base = load_model(base_name, dtype=dtype, trust_remote_code=trust_remote_code, device=device, use=use)
    return PeftModel.from_pretrained(base, str(path))
