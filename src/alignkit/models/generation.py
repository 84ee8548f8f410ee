"""Batched sampling from a causal LM: left padding, the KV cache, seeded, with a progress bar.

Shared by every stage that generates (quickstart, build-prefs, PPO, online DPO, CAI, eval). PPO, online DPO,
build-prefs, cai-revise and eval can sample with vLLM instead (``generation_backend=vllm``,
``alignkit.models.vllm_engine``); both backends are a ``Sampler``.
"""

from __future__ import annotations

import importlib.util
import math
from collections.abc import Callable
from dataclasses import dataclass

import torch
from tqdm.auto import tqdm

from alignkit.config import ConfigError
from alignkit.models.loading import load_model, pick_dtype, resolve_model


@dataclass
class SamplingConfig:
    """How responses are sampled; recorded next to every generated sample."""

    max_new_tokens: int = 128
    temperature: float = 1.0  # 0 means greedy decoding
    top_p: float = 1.0
    seed: int = 0


@dataclass
class Generation:
    prompt_ids: list[int]
    response_ids: list[int]  # generated tokens, up to and including EOS when it was produced
    text: str  # decoded response without special tokens
    finished: bool  # True when the model emitted EOS before max_new_tokens
    # The sampler's own log-prob of each response token, where it returns them (vLLM); None: not returned.
    sampling_logps: list[float] | None = None


# One response per prompt (token ids), in input order.
Sampler = Callable[[list[list[int]], SamplingConfig], list[Generation]]


def hf_sampler(
    model, tokenizer, batch_size: int | None = None, progress: bool = False, desc: str = "generating"
) -> Sampler:
    """``generate`` on a transformers model: batch_size prompts per batch (None: all of a call's prompts)."""
    return lambda prompt_ids, sampling: generate(
        model, tokenizer, prompt_ids, sampling, batch_size or len(prompt_ids), progress, desc
    )


def load_sampler(
    cfg,
    tokenizer,
    device: torch.device,
    model=None,
    batch_size: int | None = None,
    progress: bool = False,
    desc: str = "generating",
) -> Sampler:
    """The sampler of ``cfg.generation_backend`` for ``cfg.model`` (a stage config with the generation
    fields of ``config.GenerationBackendConfig``): transformers' generate, on ``model`` when one is given (a
    policy being trained, a model the stage also scores with) or else on ``cfg.model`` loaded onto ``device``,
    ``batch_size`` prompts per batch; or a vLLM engine on ``cfg.model``'s directory
    (``vllm_gpu_memory_utilization`` and ``seed`` are vLLM's; it batches by itself). ``progress`` and
    ``desc``: a progress bar (hf only)."""
    if cfg.generation_backend == "vllm":
        return vllm_sampler(cfg, tokenizer, device)
    if model is None:
        model = load_model(cfg.model, cfg.dtype, cfg.trust_remote_code, device=device)
    return hf_sampler(model, tokenizer, batch_size, progress, desc)


def vllm_sampler(cfg, tokenizer, device: torch.device):
    """A vLLM engine on ``cfg.model``'s directory (imported only when asked for)."""
    from alignkit.models.vllm_engine import VLLMSampler

    return VLLMSampler(
        resolve_model(cfg.model),
        tokenizer,
        pick_dtype(cfg.dtype, device, "generate"),
        cfg.vllm_gpu_memory_utilization,
        cfg.seed,
        cfg.trust_remote_code,
    )


def check_generation_backend(backend: str) -> None:
    """Refuse generation_backend=vllm where it cannot run, before any model is loaded."""
    if backend != "vllm":
        return
    if importlib.util.find_spec("vllm") is None:
        raise ConfigError(
            "generation_backend=vllm needs the vllm package, an optional extra: pip install 'alignkit[vllm]' "
            "(on a machine with a CUDA GPU); or set generation_backend=hf"
        )
    if not torch.cuda.is_available():
        raise ConfigError(
            "generation_backend=vllm needs a CUDA GPU and none is visible; set generation_backend=hf"
        )


@dataclass
class GenerationBatch:
    indices: list[int]  # positions in the call's prompt list, sampled together in one generate() batch
    seed: int  # the torch seed this batch samples from


def generation_batches(prompt_ids: list[list[int]], batch_size: int, seed: int) -> list[GenerationBatch]:
    """How ``generate`` cuts a call: prompts sorted by length (so batches need little padding), batch_size at a
    time, each batch with a seed drawn from ``seed``. They depend on nothing else, so several processes can
    each sample some of the batches and get the responses one process would (PPO's data parallel rollouts)."""
    generator = torch.Generator().manual_seed(seed)
    order = sorted(range(len(prompt_ids)), key=lambda i: len(prompt_ids[i]))
    return [
        GenerationBatch(
            order[s : s + batch_size], int(torch.randint(0, 2**31 - 1, (1,), generator=generator))
        )
        for s in range(0, len(order), batch_size)
    ]


@torch.no_grad()
def generate(
    model,
    tokenizer,
    prompt_ids: list[list[int]],
    sampling: SamplingConfig,
    batch_size: int = 8,
    progress: bool = True,
    desc: str = "generating",
) -> list[Generation]:
    """Sample one response per prompt (prompts given as token ids, e.g. from `encode_prompt`)."""
    results: dict[int, Generation] = {}
    bar = tqdm(total=len(prompt_ids), desc=desc, disable=not progress, unit="prompt")
    for batch in generation_batches(prompt_ids, batch_size, sampling.seed):
        prompts = [prompt_ids[i] for i in batch.indices]
        results.update(zip(batch.indices, sample_batch(model, tokenizer, prompts, sampling, batch.seed)))
        bar.update(len(batch.indices))
    bar.close()
    return [results[i] for i in range(len(prompt_ids))]


def generate_share(
    model,
    tokenizer,
    prompt_ids: list[list[int]],
    sampling: SamplingConfig,
    batch_size: int,
    rank: int,
    world: int,
    synced: bool = False,
    share_prompts: bool = True,
) -> dict[int, Generation]:
    """Process ``rank``'s part of ``generate(model, tokenizer, prompt_ids, sampling, batch_size)`` among
    ``world``: every world-th of its batches, from the rank-th, each with its own seed. The responses, by
    position in ``prompt_ids``, are the ones one process samples (up to the float rounding of the model).

    ``synced``: the model is sharded (FSDP) and every forward is a collective, so the processes step together
    (transformers' ``synced_gpus``: one that is done keeps running forwards until all are), and a process with
    fewer batches than another samples a stand-in batch (the first, its responses dropped) as often.
    ``share_prompts``: see ``sample_batch``."""
    share: dict[int, Generation] = {}
    batches = generation_batches(prompt_ids, batch_size, sampling.seed)
    mine = batches[rank::world]
    for batch in mine:
        prompts = [prompt_ids[i] for i in batch.indices]
        share.update(
            zip(batch.indices, sample_batch(model, tokenizer, prompts, sampling, batch.seed, synced, share_prompts))
        )
    for _ in range(math.ceil(len(batches) / world) - len(mine) if synced else 0):
        stand_in = [prompt_ids[i] for i in batches[0].indices]
        sample_batch(model, tokenizer, stand_in, sampling, batches[0].seed, synced)
    return share


@torch.no_grad()
def sample_batch(
    model,
    tokenizer,
    prompt_ids: list[list[int]],
    sampling: SamplingConfig,
    seed: int,
    synced: bool = False,
    share_prompts: bool = True,
) -> list[Generation]:
    """One left-padded batch through ``model.generate``, sampling from torch seed ``seed``; in input order.
    ``synced``: step in lockstep with the other processes (a sharded model; see ``generate_share``).
    ``share_prompts``: rows with the same prompt share its prefill (``shared_prompt_cache``; not when synced)."""
    was_training = model.training
    model.eval()
    device = next(model.parameters()).device
    eos_ids = eos_token_ids(getattr(model, "generation_config", None), tokenizer)
    pad_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else eos_ids[0]
    width = max(len(p) for p in prompt_ids)
    ids = torch.full((len(prompt_ids), width), pad_id, dtype=torch.long)  # (b, T) left-padded
    attn = torch.zeros((len(prompt_ids), width), dtype=torch.long)
    for row, p in enumerate(prompt_ids):
        ids[row, width - len(p) :] = torch.tensor(p)
        attn[row, width - len(p) :] = 1
    # Rows that repeat a prompt (a group's k samples) share one prefill of it: see shared_prompt_cache.
    cache = None
    if share_prompts and not synced:
        cache = shared_prompt_cache(model, ids.to(device), attn.to(device), prompt_ids)
    # Each batch draws from a seed derived from the run seed, so results do not depend on timing.
    torch.manual_seed(seed)
    greedy = sampling.temperature <= 0
    seqs = model.generate(
        input_ids=ids.to(device),
        attention_mask=attn.to(device),
        max_new_tokens=sampling.max_new_tokens,
        do_sample=not greedy,
        temperature=None if greedy else sampling.temperature,
        top_p=None if greedy else sampling.top_p,
        top_k=None if greedy else 0,
        eos_token_id=eos_ids,
        pad_token_id=pad_id,
        use_cache=True,
        **({_cache_kwarg(): cache} if cache is not None else {}),
        # Set, not left to transformers (which steps every process of a sharded model in lockstep): a policy
        # gathered whole (training.distributed.whole_weights) samples at each process's own pace.
        synced_gpus=synced,
    )
    model.train(was_training)
    return [
        to_generation(p, seqs[row, width:].tolist(), eos_ids, tokenizer) for row, p in enumerate(prompt_ids)
    ]


@torch.no_grad()
def shared_prompt_cache(model, ids: torch.Tensor, attn: torch.Tensor, prompt_ids: list[list[int]]):
    """The KV cache of every row's prompt but its last token, computed once per distinct prompt and copied to
    the rows that repeat it (a GRPO group's k samples, build-prefs' n responses): the prefill costs the distinct
    prompts, not the rows. ``generate`` given this cache runs only the last prompt token of each row and then
    decodes as usual, so the samples are the ones without it up to float rounding. None (generate prefills
    every row itself) where no prompt repeats, the prompts are a token long, or the model's cache cannot be
    copied across rows.

    ``ids``/``attn``: the (b, T) left-padded batch of ``prompt_ids``; the distinct prompts keep that padding,
    and their positions are counted from each row's first real token, as ``generate`` counts them."""
    first: dict[tuple[int, ...], int] = {}
    rows = [first.setdefault(tuple(p), len(first)) for p in prompt_ids]  # row -> its distinct prompt
    if len(first) == len(prompt_ids) or ids.shape[1] < 2:
        return None
    distinct = torch.tensor([rows.index(u) for u in range(len(first))], device=ids.device)  # a row of each
    mask = attn[distinct, :-1]
    positions = (mask.cumsum(-1) - 1).clamp(min=0)
    inputs = dict(input_ids=ids[distinct, :-1], attention_mask=mask, position_ids=positions, use_cache=True)
    from alignkit.training import distributed

    if distributed.is_sharded(model):  # FSDP runs a forward from its root only: the whole model, logits of one position
        out = model(**inputs, logits_to_keep=1)
    else:  # the decoder alone where the model exposes it (no LM head); LoRA layers sit inside
        base = model.get_base_model() if hasattr(model, "get_base_model") else model
        body = base.get_decoder() if hasattr(base, "get_decoder") else model
        out = body(**inputs)
    cache = next((getattr(out, k) for k in ("cache", "past_key_values") if getattr(out, k, None) is not None), None)
    if not hasattr(cache, "reorder_cache"):  # a legacy tuple cache, or none: let generate prefill every row
        return None
    cache.reorder_cache(torch.tensor(rows, device=ids.device))  # (distinct, ...) -> (b, ...)
    return cache


def _cache_kwarg() -> str:
    """``generate``'s keyword for a cache given to it: ``cache`` since transformers renamed ``past_key_values``."""
    from transformers.generation import utils

    return "cache" if "cache" in getattr(utils, "ALL_CACHE_NAMES", ()) else "past_key_values"


def to_generation(
    prompt_ids: list[int], tokens: list[int], eos_ids: list[int], tokenizer, logps: list[float] | None = None
) -> Generation:
    """The Generation of sampled ``tokens`` (and the sampler's ``logps`` of them, if any): cut after the first
    EOS (finished), else kept whole."""
    cut = next((k for k, t in enumerate(tokens) if t in eos_ids), None)
    response = tokens[: cut + 1] if cut is not None else tokens
    text = tokenizer.decode(response, skip_special_tokens=True).strip()
    kept = list(logps[: len(response)]) if logps is not None else None
    return Generation(list(prompt_ids), response, text, cut is not None, kept)


def eos_token_ids(generation_config, tokenizer) -> list[int]:
    """The tokens that end a response: the model's generation config's EOS ids and the tokenizer's."""
    ids = set()
    eos = getattr(generation_config, "eos_token_id", None) if generation_config is not None else None
    for value in (eos, tokenizer.eos_token_id):
        if isinstance(value, int):
            ids.add(value)
        elif isinstance(value, (list, tuple)):
            ids.update(value)
    if not ids:
        raise ValueError("the tokenizer defines no EOS token; generation would never stop")
    return sorted(ids)
