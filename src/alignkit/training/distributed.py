"""Several processes training one model, on torch.distributed through Hugging Face Accelerate.

`torchrun` or `accelerate launch` starts one process (a rank) per device; `accelerator()` joins them and reads
the launcher's settings: data parallel (DDP) by default, DeepSpeed ZeRO or FSDP2 when the accelerate config names
it.
What the ranks must agree on lives here: which rank writes the run folder, sums and gathers across ranks, each
rank's share of a global batch, the engine's wrapping and the engine checks. In a plain single process every
function is the identity.
"""

from __future__ import annotations

import contextlib
import functools
import math
import os
from collections.abc import Callable

import torch

from alignkit.config import ConfigError


@functools.cache
def accelerator():
    """This process's Accelerator, made once (before any model is loaded): it starts the process group (gloo
    on CPU, NCCL on GPUs) when a launcher started several processes, and holds the engine its config names.
    A config alignkit cannot train under is refused here, before minutes of loading."""
    from accelerate import Accelerator
    from accelerate.utils import DistributedType

    # On a machine without GPUs Accelerate only forms a process group when told the devices are CPUs.
    made = Accelerator(cpu=not torch.cuda.is_available())
    if fsdp_requested():
        check_fsdp_settings(made.mixed_precision)
    if made.distributed_type == DistributedType.DEEPSPEED and made.state.deepspeed_plugin.zero3_init_flag:
        raise ConfigError(
            "the DeepSpeed config sets zero3_init_flag: true, which splits the weights while the model loads; "
            "alignkit runs its reference pass on the whole model before training, so set zero3_init_flag: "
            "false (configs/accelerate/zero3.yaml does)"
        )
    return made


def world_size() -> int:
    return accelerator().num_processes


def is_main_process() -> bool:
    """The one process that writes the run folder, checkpoints and final model (rank 0)."""
    return accelerator().is_main_process


def barrier() -> None:
    """Wait until every rank gets here (after the main process wrote something the others will read)."""
    accelerator().wait_for_everyone()


def all_reduce(values: list[float], op: str = "sum") -> list[float]:
    """``values`` summed (op="sum") or maximised (op="max") elementwise over the ranks; every rank must call
    with the same number of values. One process: ``values`` unchanged."""
    if world_size() == 1:
        return values
    import torch.distributed as dist

    # float64: counts and sums of a global batch stay exact far beyond any batch size.
    tensor = torch.tensor(values, dtype=torch.float64, device=accelerator().device)
    dist.all_reduce(tensor, op=dist.ReduceOp.SUM if op == "sum" else dist.ReduceOp.MAX)
    return tensor.tolist()


def broadcast_from_main(value):
    """The main process's ``value`` (any picklable object), on every rank."""
    if world_size() == 1:
        return value
    import torch.distributed as dist

    box = [value if is_main_process() else None]
    dist.broadcast_object_list(box, src=0)
    return box[0]


def all_gather_objects(value) -> list:
    """Every rank's ``value`` (any picklable object), in rank order, on every rank. One process: [value]."""
    if world_size() == 1:
        return [value]
    import torch.distributed as dist

    gathered = [None] * world_size()
    dist.all_gather_object(gathered, value)
    return gathered


def gather_dicts(share: dict) -> dict:
    """The union of every rank's ``share`` (their keys disjoint), sorted by key, on every rank."""
    return dict(
        sorted(((k, v) for one in all_gather_objects(share) for k, v in one.items()), key=lambda kv: kv[0])
    )


def gather_rows(rows: torch.Tensor, counts: list[int]) -> torch.Tensor:
    """Every rank's ``rows`` (n_r, ...) concatenated in rank order, on every rank; ``counts`` holds each rank's
    n_r (all ranks' rows have the same trailing shape). One process: ``rows``."""
    if world_size() == 1:
        return rows
    import torch.distributed as dist

    # all_gather moves equal shapes: pad every rank's rows to the longest share, then cut the padding off.
    padded = rows.new_zeros((max(counts), *rows.shape[1:]))
    padded[: rows.shape[0]] = rows
    gathered = [torch.empty_like(padded) for _ in counts]
    dist.all_gather(gathered, padded)
    return torch.cat([g[:n] for g, n in zip(gathered, counts)])


def rank_share(items: list, rank: int, world_size: int) -> list:
    """This rank's contiguous share of ``items``, as even as possible (the first len % world_size ranks take
    one more); the shares of ranks 0, 1, ... concatenate to ``items``."""
    base, extra = divmod(len(items), world_size)
    first = rank * base + min(rank, extra)
    return items[first : first + base + (rank < extra)]


def shared_rows(
    passes: Callable[[slice], dict[str, torch.Tensor]], n_rows: int, rank: int, world_size: int
) -> dict[str, torch.Tensor]:
    """``passes`` over rows 0 .. n_rows - 1 of a batch every rank holds, each rank running it on its contiguous
    share (``rank_share``) and gathering the others' (``gather_rows``): every rank gets every row, in order.

    ``passes(rows)`` takes a slice and returns tensors (on the device the ranks gather on) with one row per row
    of it, of the same keys and trailing shape on every rank, also for an empty share. The forward passes of the
    stages that train on their own samples (ppo, online-dpo, grpo). One process: ``passes(slice(0, n_rows))``."""
    counts = [len(rank_share(range(n_rows), r, world_size)) for r in range(world_size)]
    first = sum(counts[:rank])
    out = passes(slice(first, first + counts[rank]))
    return {key: gather_rows(value, counts) for key, value in out.items()}


def stand_ins_needed(n_rows: int, rows_per_call: int, rank: int, world_size: int) -> int:
    """How many stand-in calls ``rank`` adds after its own when each rank runs its ``rank_share`` of ``n_rows``
    rows in calls of ``rows_per_call``, so that every rank makes as many calls: on FSDP shards each forward is a
    collective. (A rank's share may be a row shorter than another's, and so a call shorter.)"""
    calls = [
        math.ceil(len(rank_share(range(n_rows), r, world_size)) / rows_per_call) for r in range(world_size)
    ]
    return max(calls) - calls[rank]


def agree_to_stop(stop: bool, received: int | None) -> tuple[bool, int]:
    """A stop request (a failure monitor) and a signal number (SIGINT/SIGTERM; 0 or None: none) seen by any
    rank, on every rank, so the ranks checkpoint and stop together. One process: the same values."""
    stop_flag, signal_number = all_reduce([float(stop), float(received or 0)], op="max")
    return bool(stop_flag), int(signal_number)


def rank_microbatches(
    indices: list[int], micro_batch_size: int, rank: int, world_size: int
) -> list[list[int]]:
    """This rank's micro-batches (example indices) of one global batch ``indices``.

    The batch is cut into micro-steps of micro_batch_size * world_size examples, and each micro-step into
    world_size contiguous shares, as even as possible, one per rank. Every rank thus runs the same number of
    micro-steps (the engine's collectives and KTO's z0 pair them up), and one process gets the plain
    micro-batches of micro_batch_size. A share is empty only when a micro-step holds fewer examples than there
    are ranks (the end of a batch); the loop runs a stand-in there (see ``alignkit.training.loop.train``).
    """
    span = micro_batch_size * world_size
    return [rank_share(indices[s : s + span], rank, world_size) for s in range(0, len(indices), span)]


class StepModule(torch.nn.Module):
    """A model and a training step over it as one module, for the engine to wrap: DDP and DeepSpeed act in the
    forward of the module they wrap (DDP arms its gradient sync there), while a step may call into the model
    below its forward (the chunked LM head, KTO's second pass, PPO's value model on the policy's base)."""

    def __init__(self, model: torch.nn.Module, step_fn: Callable):
        super().__init__()
        self.model = model
        self.step_fn = step_fn

    def forward(self, batch):
        return self.step_fn(self.model, batch)


def data_parallel(module: torch.nn.Module) -> torch.nn.Module:
    """``module`` wrapped in DDP when several processes run (its weights broadcast from rank 0 now, gradients
    averaged over the ranks in each backward outside ``gradient_sync(..., last=False)``); one process: ``module``.

    For a loop that is not ``alignkit.training.loop.train`` (PPO's), which refuses DeepSpeed. Unused parameters
    are looked for (``find_unused_parameters``): a trainable weight may get no gradient in a step (a full
    fine-tune's value model never runs its untied LM head), and DDP would otherwise wait for it forever. A module
    holding FSDP shards is returned as it is: FSDP reduce-scatters its gradients in every backward, averaged
    over the ranks as DDP's are."""
    if world_size() == 1 or is_sharded(module):  # FSDP reduces the shards' gradients itself
        return module
    from torch.nn.parallel import DistributedDataParallel

    return DistributedDataParallel(module, find_unused_parameters=True)


def gradient_sync(module: torch.nn.Module, last: bool):
    """The context of one micro-step of a ``data_parallel`` module: gradients are reduced across the ranks only
    in the last one of an optimizer step (DDP's ``no_sync`` before it). One process: nothing."""
    from torch.nn.parallel import DistributedDataParallel

    if last or not isinstance(module, DistributedDataParallel):
        return contextlib.nullcontext()
    return module.no_sync()


def engine() -> str:
    """The training engine the launcher chose: "none" (one process), "ddp", "deepspeed" or "fsdp"."""
    from accelerate.utils import DistributedType

    kind = accelerator().distributed_type
    if kind == DistributedType.DEEPSPEED:
        return "deepspeed"
    if kind == DistributedType.NO:
        return "none"
    return "fsdp" if fsdp_requested() else "ddp"


def fsdp_requested() -> bool:
    """Whether the launcher asked for FSDP: `accelerate launch` with an FSDP config sets ACCELERATE_USE_FSDP in
    every rank. Accelerate (1.15) builds its FSDP engine on GPUs only; on CPUs it quietly runs DDP instead, so
    alignkit reads the variable itself and shards the model with torch's FSDP2 on either (``shard``)."""
    return os.environ.get("ACCELERATE_USE_FSDP", "false").lower() == "true"


# Accelerate's FSDP settings (the environment variables `accelerate launch` sets from fsdp_config) that alignkit
# does not implement, with the value it needs and why.
_FSDP_UNSUPPORTED = {
    "fsdp_offload_params": ("FSDP_OFFLOAD_PARAMS", "false", "the shards stay on the device"),
    "fsdp_activation_checkpointing": (
        "FSDP_ACTIVATION_CHECKPOINTING",
        "false",
        "set gradient_checkpointing=true in the alignkit config instead, which works under every engine",
    ),
}


def check_fsdp_settings(mixed_precision: str) -> None:
    """Refuse FSDP settings alignkit does not run, naming the field of the accelerate config."""
    version = os.environ.get("FSDP_VERSION", "1")
    if version != "2":
        raise ConfigError(
            f"the accelerate config sets fsdp_version: {version}; alignkit shards with FSDP2 (torch's "
            "fully_shard): set fsdp_version: 2 (configs/accelerate/fsdp.yaml does)"
        )
    for field_name, (variable, needed, why) in _FSDP_UNSUPPORTED.items():
        if os.environ.get(variable, needed).lower() != needed:
            raise ConfigError(
                f"the accelerate config sets {field_name}: true; alignkit needs {needed} ({why})"
            )
    if mixed_precision != "no":
        raise ConfigError(
            f'the accelerate config sets mixed_precision: {mixed_precision} with FSDP; set it to "no": '
            "alignkit's own `dtype` setting decides the precision"
        )


def shard(model: torch.nn.Module, lora: bool = False) -> None:
    """Under FSDP, shard ``model`` in place with FSDP2 (torch's ``fully_shard``) over all ranks; elsewhere
    nothing. Stages with a reference pass call it right after loading, so the pass runs on the shards; ``train``
    calls it for the others, and for a model sharded already it registers the shards again (``reshard``).

    Each block transformers keeps whole (``_no_split_modules``: the decoder layers) is one group and the model
    itself, with the embeddings, final norm and head, the root group. Every rank keeps 1/N of each weight (and
    so of its gradient and AdamW state) as a DTensor, and gathers a group's full weights in that group's forward
    and again in the backward, freeing them after (FULL_SHARD; fsdp_reshard_after_forward: false keeps them to
    the backward). The model is the root, so any call of its forward (the training step, reference and
    evaluation passes) gathers what it needs, while code that reads a weight outside a forward sees a shard: the
    log-prob and reward passes take their plain path then (``alignkit.models.forward.sharded_outside_forward``).
    Every forward is a collective, so every rank must run as many."""
    if engine() != "fsdp":
        return
    from torch.distributed.fsdp import FSDPModule, fully_shard

    if isinstance(model, FSDPModule):
        reshard(model)
        return
    if lora:
        raise ConfigError(
            "lora=true under FSDP is not supported: LoRA trains few weights and runs data parallel "
            "(configs/accelerate/multi_gpu.yaml), while FSDP is for full fine-tuning"
        )
    import torch.distributed as dist
    from torch.distributed.checkpoint.state_dict import StateDictOptions, set_model_state_dict

    from alignkit.models.loading import pick_device

    # Every rank starts from the main process's weights, which the others need not hold (``load_on``): a head
    # initialised at random at load, the reward model's score, would otherwise differ, as DDP does on wrapping.
    whole = model.state_dict() if is_main_process() else {}
    after_forward = reshard_after_forward()
    # Found on any module inside (PPO's value model wraps a transformers model).
    blocks = {name for module in model.modules() for name in getattr(module, "_no_split_modules", None) or []}
    for module in model.modules():
        if type(module).__name__ in blocks:
            fully_shard(module, reshard_after_forward=after_forward)
    for module in odd_dtype_modules(model):
        fully_shard(module, reshard_after_forward=after_forward)
    # The root keeps its weights from the forward to the backward (torch's default for a root): the reward pass
    # reads the score head's output on the way through the forward, a path FSDP's backward hooks do not see.
    fully_shard(model)
    # A model built without weights gets memory for its shard (and buffers) alone; then each rank copies its
    # shard of every weight the main process sends, and every buffer (the rotary tables are in no state dict).
    if any(t.device.type == "meta" for t in [*model.parameters(), *model.buffers()]):
        model.to_empty(device=pick_device())
    whole_from_main = StateDictOptions(full_state_dict=True, broadcast_from_rank0=True)
    set_model_state_dict(model, whole, options=whole_from_main)
    with torch.no_grad():
        for buffer in model.buffers():
            dist.broadcast(buffer, src=0)


def reshard_after_forward() -> bool:
    """Whether ``shard`` has the groups inside a model (its blocks) free their gathered weights after the
    forward: accelerate's fsdp_reshard_after_forward (FSDP_RESHARD_AFTER_FORWARD), true unless set false."""
    return os.environ.get("FSDP_RESHARD_AFTER_FORWARD", "true").lower() != "false"


def odd_dtype_modules(model: torch.nn.Module) -> list[torch.nn.Module]:
    """The modules outside the decoder blocks whose own weights are in another dtype than most of ``model``'s:
    FSDP2 needs one dtype in each group, so each is a group of its own (PPO's fp32 value head on a backbone held
    in bf16 by precision=pure; in mixed precision every weight is fp32 and there are none)."""
    by_dtype: dict[torch.dtype, int] = {}
    for p in model.parameters():
        by_dtype[p.dtype] = by_dtype.get(p.dtype, 0) + p.numel()
    if len(by_dtype) < 2:
        return []
    common = max(by_dtype, key=by_dtype.__getitem__)
    blocks = {name for module in model.modules() for name in getattr(module, "_no_split_modules", None) or []}
    inside_blocks = {
        id(sub) for module in model.modules() if type(module).__name__ in blocks for sub in module.modules()
    }
    return [
        module
        for module in model.modules()
        if id(module) not in inside_blocks
        and any(p.dtype != common for p in module.parameters(recurse=False))
    ]


def load_on() -> str | None:
    """Where a stage loads a model that it will ``shard``: under FSDP, the main process reads the weights into
    CPU memory and every other rank builds the model on the meta device, without weights; ``shard`` then sends
    each rank its shard of the main process's weights. So one process reads the model, and no device ever
    holds all of it: models whose weights fit no single device train. Elsewhere None (the training device)."""
    if engine() != "fsdp":
        return None
    return "cpu" if is_main_process() else "meta"


def is_sharded(model: torch.nn.Module) -> bool:
    """Whether ``model``'s weights, or those of a module in it (PPO's policy and value model in one
    ModuleDict), are FSDP shards (``shard`` made them DTensors)."""
    if not torch.distributed.is_available():
        return False
    from torch.distributed.fsdp import FSDPModule

    return any(isinstance(module, FSDPModule) for module in model.modules())


@contextlib.contextmanager
def whole_weights(model: torch.nn.Module):
    """Inside, every rank holds all of a sharded ``model``'s weights, gathered once on entry and kept through
    any number of forwards, which then need no other rank: generation, where each rank runs as many forwards
    as its own samples take, cannot run on the shards (each forward there is a collective). Each device holds
    the whole model meanwhile (as TRL and OpenRLHF gather it to generate); on exit each rank keeps its shards
    again. A model that is not sharded: nothing (every rank must enter)."""
    if not is_sharded(model):
        yield
        return
    from torch.distributed.fsdp import FSDPModule

    groups = [module for module in model.modules() if isinstance(module, FSDPModule)]
    inner = {id(m) for group in groups for m in group.modules() if m is not group}
    for group in groups:
        group.set_reshard_after_forward(False, recurse=False)
        group.unshard()
    try:
        yield
    finally:
        for group in groups:
            group.reshard()
            # Back to what ``shard`` set (torch has no getter to save it, so it is set again, through the public
            # setter): a root keeps its weights from the forward to the backward, the groups inside reshard
            # after the forward unless fsdp_reshard_after_forward is false.
            root = id(group) not in inner
            group.set_reshard_after_forward(False if root else reshard_after_forward(), recurse=False)


def full_state_options():
    """torch.distributed.checkpoint's options for a sharded model's whole tensors, gathered onto the main
    process's CPU memory (the other ranks get empty dicts)."""
    from torch.distributed.checkpoint.state_dict import StateDictOptions

    return StateDictOptions(full_state_dict=True, cpu_offload=True)


def reshard(model: torch.nn.Module) -> None:
    """Free the gathered weights of every FSDP group of ``model`` and register its shards again. The root group
    keeps its gathered weights after a forward until the backward, and a forward without one (an evaluation or
    reference pass) leaves them registered in place of the shards, where the optimizer and the state-dict
    functions must see the shards. Nothing for a model that is not sharded."""
    from torch.distributed.fsdp import FSDPModule

    for module in model.modules():
        if isinstance(module, FSDPModule):
            module.reshard()


def as_float(value) -> float:
    """A scalar tensor as a float; a DTensor (FSDP's gradient norm) is made whole first (every rank must call)."""
    return float(value.full_tensor() if hasattr(value, "full_tensor") else value)


def local_fraction(model: torch.nn.Module) -> float:
    """The share of ``model``'s parameter elements this rank holds: 1 unsharded, about 1/N under FSDP."""
    params = list(model.parameters())
    local = sum(p.to_local().numel() if hasattr(p, "to_local") else p.numel() for p in params)
    return local / max(sum(p.numel() for p in params), 1)


def largest_rank_share(model: torch.nn.Module) -> float:
    """The largest ``local_fraction`` of ``model`` any rank holds (every rank must call): 1 unless sharded, about
    1/N under FSDP."""
    (share,) = all_reduce([local_fraction(model)], op="max")
    return share


def zero_stage() -> int:
    """DeepSpeed's ZeRO stage (3: every weight is split across the ranks); 0 without DeepSpeed."""
    plugin = accelerator().state.deepspeed_plugin
    return int(plugin.zero_stage) if engine() == "deepspeed" and plugin is not None else 0


def configure_deepspeed(micro_batch_size: int, max_grad_norm: float | None, lora: bool) -> None:
    """Fill the DeepSpeed config's "auto" values from the training config, and refuse values that would
    change alignkit's semantics: the loop marks the end of each global batch itself (so DeepSpeed's own
    gradient accumulation must be 1), and DeepSpeed clips where the loop would (so at max_grad_norm)."""
    ds = accelerator().state.deepspeed_plugin.deepspeed_config
    needed = {
        "gradient_accumulation_steps": (1, "the loop accumulates each global batch itself"),
        # DeepSpeed reads 0 as no clipping.
        "gradient_clipping": (max_grad_norm if max_grad_norm is not None else 0.0, "the run's max_grad_norm"),
    }
    for key, (value, why) in needed.items():
        if ds.get(key, "auto") == "auto":
            ds[key] = value
        elif float(ds[key]) != float(value):
            raise ConfigError(
                f"the DeepSpeed config sets {key}={ds[key]}, but alignkit needs {value} ({why}); "
                "leave it out of the DeepSpeed config or set it to 'auto'"
            )
    if ds.get("train_micro_batch_size_per_gpu", "auto") == "auto":
        ds["train_micro_batch_size_per_gpu"] = micro_batch_size  # DeepSpeed's bookkeeping; batches may vary
    if lora and zero_stage() == 3:
        raise ConfigError(
            "lora=true under DeepSpeed ZeRO-3 is not supported: LoRA trains few weights and runs data parallel "
            "(configs/accelerate/multi_gpu.yaml), while ZeRO-3 is for full fine-tuning"
        )


@contextlib.contextmanager
def full_weights(model: torch.nn.Module):
    """Inside, every rank holds all of ``model``'s weights: under ZeRO-3 each rank otherwise holds a slice of
    each (every rank must enter). Elsewhere a rank always holds them all (under FSDP, see ``save_from_main``)."""
    if zero_stage() == 3:
        import deepspeed

        with deepspeed.zero.GatheredParameters(list(model.parameters())):
            yield
    else:
        yield


def save_from_main(model: torch.nn.Module, save: Callable[[dict | None], object]) -> None:
    """``save(state_dict)`` (writing the final model) on the main process; the other ranks wait until it is
    written. Under FSDP ``state_dict`` holds the model's full weights, gathered onto the main process's CPU
    memory (the model's own state_dict would hold each rank's shards); elsewhere it is None, and the weights
    are read from the model, all in place (``full_weights``). One process: just ``save(None)``."""
    state_dict = None
    if engine() == "fsdp":
        from torch.distributed.checkpoint.state_dict import get_model_state_dict

        reshard(model)
        state_dict = get_model_state_dict(model, options=full_state_options())
        # Tied weights (lm_head = embed_tokens) come back as separate copies; one tensor again, so
        # transformers saves them once, as it does for a model in one process.
        first_name: dict[int, str] = {}
        for name, p in model.named_parameters(remove_duplicate=False):
            first = first_name.setdefault(id(p), name)
            if state_dict and first != name:
                state_dict[name] = state_dict[first]
    with full_weights(model):
        if is_main_process():
            save(state_dict)
    barrier()


def require_one_process(stage: str) -> None:
    """Refuse to run ``stage`` in several processes: it would write its outputs once per rank."""
    n = int(os.environ.get("WORLD_SIZE", "1"))
    if n > 1:
        raise ConfigError(
            f"{stage} runs in one process, but it was launched in {n} (WORLD_SIZE={n}); run it with plain "
            f"`alignkit {stage} ...`. The training stages sft, rm, dpo, ipo, orpo, kto, ppo, online-dpo "
            "and grpo run data parallel."
        )


def start_one_process(stage: str, num_threads: int | None) -> None:
    """The start of a stage that runs in one process (it appends to its output, or writes it once): refuse
    several processes (``require_one_process``), then use ``num_threads`` CPU threads (None: torch's
    default)."""
    require_one_process(stage)
    if num_threads:
        torch.set_num_threads(num_threads)


def close_process_group() -> None:
    """Destroy the process group of a multi-process run that finished normally, while the interpreter is whole.

    Left to interpreter shutdown, Gloo's worker threads can still hold work that references Python objects, and
    a rank whose run succeeded then dies with SIGABRT ("terminate called without an active exception"); seen
    here on a loaded 2-core machine. Not called on an error: ranks that failed at different points could wait
    on each other in the teardown.
    """
    import torch.distributed as dist

    if dist.is_available() and dist.is_initialized():
        dist.destroy_process_group()
