"""The online methods' rollouts: the policy's samples laid out for the models and for the losses, and the
forward passes over them, in several processes shared among them: PPO's and GRPO's (policy and reference
log-probs, entropies, values, in length-sorted micro-batches: ``shared_rollout_passes``, into their rollouts
``Rollout`` and ``GroupRollout``) and online DPO's (the samples' log-probs under policy and reference:
``sample_logprobs``). The reference is a ``training.reference.Reference``: a frozen copy, or (LoRA) the
policy's base with the adapters off.

Samples come in two layouts. "Sequence" tensors (B, T) hold prompt + response right-padded, the way the models
read them; "response" tensors (B, R) hold each row's response tokens from column 0, the way the PPO losses read
them. `loss_mask` (B, T) marks the response tokens in the first, `mask` (B, R) in the second. The functions that
take ``cfg`` read its micro_batch_size, logprob_chunk_size and temperature (a ``PPOConfig``).
"""

from __future__ import annotations

import dataclasses
import functools
from collections.abc import Callable
from dataclasses import dataclass

import torch

from alignkit.losses import grpo as grpo_losses
from alignkit.losses.logprobs import completion_logprobs
from alignkit.losses.ppo import entropy_from_logits
from alignkit.models.forward import response_token_logprobs, supports_chunked_head
from alignkit.models.generation import Generation
from alignkit.models.precision import in_training_precision
from alignkit.models.value import (
    ValueModel,
    add_value_adapter,
    recompute_with_active_adapter,
    remove_value_adapter,
)
from alignkit.training import distributed
from alignkit.training.online import accumulated_step
from alignkit.training.reference import Reference


@dataclass
class SampleRows:
    """The samples in both layouts (see above): what every rollout holds before its method's own tensors."""

    input_ids: torch.Tensor  # (B, T) prompt then response, right-padded
    attention_mask: torch.Tensor  # (B, T)
    loss_mask: torch.Tensor  # (B, T) 1 on response tokens
    mask: torch.Tensor  # (B, R) 1 on response tokens

    def rows(self, index, **extra):
        """The rows ``index`` of the tensors, without the padding columns they all share (see
        ``trim_padding``); the other fields kept, or set from ``extra``."""
        tensors = {f.name: getattr(self, f.name) for f in dataclasses.fields(self)}
        rows = {name: value[index] for name, value in tensors.items() if torch.is_tensor(value)}
        return dataclasses.replace(self, **trim_padding(rows), **extra)

    def model_inputs(self) -> dict[str, torch.Tensor]:
        """The sequences and the response mask, as ``policy_outputs`` and ``response_values`` read them."""
        return {k: getattr(self, k) for k in ("input_ids", "attention_mask", "loss_mask", "mask")}


@dataclass
class Rollout(SampleRows):
    """PPO's rollout."""

    logps: torch.Tensor  # (B, R) log-probs of the sampled tokens under the policy that sampled them
    values: torch.Tensor  # (B, R) V(s_t) of the value model before the update
    advantages: torch.Tensor  # (B, R) GAE advantages, whitened
    returns: torch.Tensor  # (B, R) advantages + values (unwhitened): the value target


@dataclass
class GroupRollout(SampleRows):
    """GRPO's rollout: no values and no per-token rewards, one advantage per response."""

    old_logps: torch.Tensor  # (B, R) under the policy that sampled (no grad); zeros when only on policy
    ref_logps: torch.Tensor  # (B, R) under the reference; zeros without one
    advantages: torch.Tensor  # (B, 1): one per response, 2-D so that trim_padding keeps it
    n_sequences: float = 0.0  # responses of the minibatch this micro-batch is of (the loss's normalisers)
    n_tokens: float = 0.0  # response tokens of that minibatch
    on_policy: bool = False  # the iteration's first step: the policy is the sampler, old_logps = this pass's
    # No no-grad policy pass was made (GRPO's ``trains_on_policy_only``): the on-policy step logs entropy and KL.
    signals_from_update: bool = False

    def minibatch(self, index: list[int], on_policy: bool) -> GroupRollout:
        """The rows ``index`` as one optimizer step's minibatch: the micro-batches cut from it carry its totals,
        the loss's normalisers."""
        rows = self.rows(index)
        totals = {"n_sequences": float(len(index)), "n_tokens": float(rows.mask.sum()), "on_policy": on_policy}
        return dataclasses.replace(rows, **totals)


def length_order(attention_mask: torch.Tensor) -> list[int]:
    """Row indices from the shortest sequence to the longest (a stable sort): micro-batches cut in this order
    hold rows of similar length, so each is cut to little padding (``trim_padding``)."""
    lengths = attention_mask.sum(1).tolist()
    return sorted(range(len(lengths)), key=lambda i: lengths[i])


def rollout_step(
    cfg, loss_fn, minibatch: SampleRows, parts: tuple, rank: int = 0, world: int = 1, token_weighted: bool = False
) -> dict:
    """One optimizer step on ``minibatch`` (``online.accumulated_step``; ``parts`` = (optimizer, scheduler,
    params)), its micro-batches cut from rows of similar length, so each is cut to little padding.
    ``loss_fn(micro) -> (loss, metrics)`` is the method's loss (in several processes, wrapped in DDP).
    token_weighted (PPO): the loss is a token mean over its micro-batch, and loss and metrics are weighted by the
    micro-batch's share of the minibatch's response tokens (every rank holds the whole rollout, so it counts them
    itself), so the accumulated gradient is that of one pass over the minibatch. Otherwise (GRPO) the loss is
    already divided by the minibatch's totals, and no further weight applies."""
    n_tokens = minibatch.mask.sum()

    def micro_loss(share: list[int]) -> tuple[torch.Tensor, dict]:
        micro = minibatch.rows(share)
        loss, stats = loss_fn(micro)
        weight = micro.mask.sum() / n_tokens if token_weighted else 1.0
        return loss * weight, {key: value * weight for key, value in stats.items()}

    order = length_order(minibatch.attention_mask)
    return accumulated_step(cfg, loss_fn, order, micro_loss, *parts, rank, world)


def trim_padding(batch: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """``batch`` cut to its longest row: sequence-layout tensors (B, T) to the longest prompt + response,
    response-layout tensors (B, R) to the longest response. The rows are right-padded, and a causal model's
    outputs at a position do not depend on later ones, so the cut changes no number, only the cost: a
    micro-batch of short responses no longer pays for the longest response of the whole rollout."""
    t = int(batch["attention_mask"].sum(1).max())
    r = int(batch["mask"].sum(1).max())
    sequence_keys = ("input_ids", "attention_mask", "loss_mask")
    return {k: v[:, :t] if k in sequence_keys else v[:, :r] for k, v in batch.items()}


def collate_samples(generations: list[Generation], pad_id: int, device: torch.device) -> dict:
    """Sequence and response layouts of the samples (see above): input_ids, attention_mask, loss_mask, mask."""
    B = len(generations)
    T = max(len(g.prompt_ids) + len(g.response_ids) for g in generations)
    R = max(len(g.response_ids) for g in generations)
    input_ids = torch.full((B, T), pad_id, dtype=torch.long)  # (B, T)
    attention_mask = torch.zeros((B, T), dtype=torch.long)
    loss_mask = torch.zeros((B, T), dtype=torch.long)
    mask = torch.zeros((B, R), dtype=torch.long)  # (B, R)
    for i, g in enumerate(generations):
        p, r = len(g.prompt_ids), len(g.response_ids)
        input_ids[i, : p + r] = torch.tensor(g.prompt_ids + g.response_ids)
        attention_mask[i, : p + r] = 1
        loss_mask[i, p : p + r] = 1
        mask[i, :r] = 1
    batch = {"input_ids": input_ids, "attention_mask": attention_mask, "loss_mask": loss_mask, "mask": mask}
    return {k: v.to(device) for k, v in batch.items()}


def to_response_layout(flat: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """(N,) per-token values in (row, position) order -> (B, R) response layout, 0 where mask is 0."""
    return torch.zeros(mask.shape, dtype=flat.dtype, device=flat.device).masked_scatter(mask.bool(), flat)


def _transformer(model):
    return model.get_base_model() if hasattr(model, "get_base_model") else model


def policy_outputs(model, batch: dict, chunk_size: int, temperature: float = 1.0, with_entropy: bool = False):
    """Log-probs (B, R) of the response tokens at ``temperature``, and their entropies (B, R) if asked.

    Through the chunked LM head where the model allows it (no (B, T, V) tensor); the entropy needs each
    response position's logits, computed chunk by chunk from the same hidden states. The entropy is a health
    signal, never trained on: computed without a graph, so a training pass that logs it keeps no (N, V) logits.
    """
    input_ids, attention_mask, loss_mask = batch["input_ids"], batch["attention_mask"], batch["loss_mask"]
    scored = loss_mask[:, 1:].bool()  # (B, T-1): positions whose next token is a response token
    entropy = None
    if supports_chunked_head(model):
        base = _transformer(model)
        hidden = base.get_decoder()(
            input_ids=input_ids, attention_mask=attention_mask, use_cache=False
        ).last_hidden_state  # (B, T, H)
        head = base.get_output_embeddings()
        # logits / tau = (h / tau) W^T + b / tau: the temperature is folded into the inputs of the chunked head.
        bias = head.bias / temperature if head.bias is not None else None
        hidden = hidden / temperature if temperature != 1.0 else hidden
        flat = completion_logprobs(hidden, head.weight, input_ids, loss_mask, chunk_size, bias).token_logps
        if with_entropy:
            h = hidden.detach()[:, :-1][scored]  # (N, H)
            chunks = [
                entropy_from_logits(torch.nn.functional.linear(h[s : s + chunk_size], head.weight, bias))
                for s in range(0, h.shape[0], chunk_size)
            ]
            entropy = to_response_layout(torch.cat(chunks), batch["mask"])
    else:
        logits = model(input_ids=input_ids, attention_mask=attention_mask, use_cache=False).logits
        logits = logits[:, :-1][scored].float() / temperature  # (N, V)
        flat = torch.log_softmax(logits, -1).gather(1, input_ids[:, 1:][scored][:, None]).squeeze(1)
        if with_entropy:
            entropy = to_response_layout(entropy_from_logits(logits.detach()), batch["mask"])
    return to_response_layout(flat, batch["mask"]), entropy


@dataclass
class Critic:
    """PPO's value model beside the policy, and what the online engine needs of the pair."""

    model: ValueModel
    trained: torch.nn.ModuleDict  # {"policy", "value"}: what the optimizer trains and a checkpoint holds
    # LoRA: gradient checkpointing recomputes the value model's layers with its adapter, as they ran.
    recompute_context: Callable | None
    final_policy: Callable[[], torch.nn.Module]  # the policy alone: the value adapter is not part of it
    describe: dict  # the summary's line on the value model


def critic_for(policy, lora: bool, load) -> Critic:
    """PPO's value model. LoRA: adapter "value" + head on the policy's frozen base (which, every adapter off,
    is the reference too); full fine-tuning: its own trained copy ``load()`` (separate policy and value
    networks, as Stiennon et al. 2020 and Huang et al. 2024, so value gradients never move the policy's
    features), sharded under FSDP as it is loaded."""
    if lora:
        value_model = add_value_adapter(policy)
    else:
        value_model = ValueModel(load())
        distributed.shard(value_model)

    def final_policy() -> torch.nn.Module:
        if lora:
            remove_value_adapter(policy)
        return policy

    return Critic(
        value_model,
        torch.nn.ModuleDict({"policy": policy, "value": value_model}),
        functools.partial(recompute_with_active_adapter, policy) if lora else None,
        final_policy,
        {"value_model": "second LoRA adapter on the policy's base + head" if lora else "separate copy + head"},
    )


def response_values(value_model: ValueModel, batch: dict) -> torch.Tensor:
    """V(s_t) for each response token t: the value at the position that predicts it. (B, R)"""
    values = value_model(batch["input_ids"], batch["attention_mask"])  # (B, T)
    return to_response_layout(values[:, :-1][batch["loss_mask"][:, 1:].bool()], batch["mask"])


def rollout_inputs(
    cfg, setup, samples, value_model=None, policy_pass: bool = True
) -> tuple[dict, dict, torch.Tensor]:
    """What PPO's and GRPO's step 3 starts from, in every process: the unit's samples
    (``online_engine.Samples``) in both layouts (``collate_samples``), the rollout's forward passes over them
    on the engine's policy and reference (``online_engine.OnlineSetup``) and ``value_model``
    (``shared_rollout_passes``; ``policy_pass=False``: none of the policy), and their scores (B,) on the setup's
    device."""
    batch = collate_samples(samples.generations, setup.tokenizer.pad_token_id, setup.device)
    policy, reference, rank, world = setup.policy, setup.reference, setup.rank, setup.world
    passes = shared_rollout_passes(cfg, policy, reference, value_model, batch, rank, world, policy_pass)
    return batch, passes, torch.tensor(samples.scores, dtype=torch.float32).to(setup.device)


def sampler_mismatch(generations: list[Generation], trainer_logps: torch.Tensor, mask: torch.Tensor) -> dict:
    """The sampler-trainer log-prob mismatch (``losses.grpo.sampler_mismatch``) where the sampler returned its
    own log-probs (generation_backend=vllm); none otherwise (transformers' generate is the trainer's own model)."""
    if any(g.sampling_logps is None for g in generations):
        return {}
    rows = [torch.tensor(g.sampling_logps, dtype=torch.float32) for g in generations]
    sampled = torch.nn.utils.rnn.pad_sequence(rows, batch_first=True).to(trainer_logps.device)  # (B, R)
    return grpo_losses.sampler_mismatch(trainer_logps, sampled, mask)


@torch.no_grad()
def rollout_passes(
    cfg, policy, reference: Reference, value_model, batch: dict, policy_pass: bool = True
) -> dict[str, torch.Tensor]:
    """The forward passes of a rollout: "logps", "ref_logps", "entropy" and "values", each (B, R);
    ``policy_pass=False``: no "logps" and "entropy" (GRPO trained once, on policy: its update's pass has them).

    micro_batch_size rows at a time, rows of similar length together and each micro-batch cut to its longest
    row (``trim_padding``): replies of a few tokens do not pay for the longest one, and memory stays that of
    one micro-batch."""
    B, R = batch["mask"].shape
    order = length_order(batch["attention_mask"])
    passes: dict[str, torch.Tensor] = {}
    for start in range(0, B, cfg.micro_batch_size):
        rows = torch.tensor(order[start : start + cfg.micro_batch_size], device=batch["mask"].device)
        micro = trim_padding({k: v[rows] for k, v in batch.items()})
        for key, value in _rollout_passes(cfg, policy, reference, value_model, micro, policy_pass).items():
            if key not in passes:
                passes[key] = value.new_zeros((B, R))
            passes[key][rows, : value.shape[1]] = value
    return passes


def _rollout_passes(
    cfg, policy, reference: Reference, value_model, batch: dict, policy_pass: bool = True
) -> dict[str, torch.Tensor]:
    """One micro-batch's passes; without a reference (mode "none") no "ref_logps", without a value model (GRPO)
    no "values"."""
    out = {}
    if policy_pass:
        logps, entropy = policy_outputs(policy, batch, cfg.logprob_chunk_size, cfg.temperature, with_entropy=True)
        out = {"logps": logps, "entropy": entropy}
    if reference.mode != "none":
        with reference.model(policy) as model:  # LoRA: the value adapter stays trainable (Reference.model)
            out["ref_logps"], _ = policy_outputs(model, batch, cfg.logprob_chunk_size, cfg.temperature)
    if value_model is not None:
        out["values"] = response_values(value_model, batch)  # (B, R)
    return out


@in_training_precision
def shared_rollout_passes(
    cfg, policy, reference: Reference, value_model, batch: dict, rank: int, world: int, policy_pass: bool = True
):
    """``rollout_passes`` over the whole ``batch``, each of ``world`` processes running a contiguous share of
    its rows and gathering the others' (one process: all of them). Every share holds a row (check_launch).

    Under FSDP every forward on the shards is a collective, so a rank with fewer micro-batches than another
    runs stand-ins (a row of the batch, its outputs dropped) until they all ran as many; after, each network
    holds its shards alone again (``distributed.reshard``)."""
    n_rows = len(batch["mask"])

    def passes(rows: slice) -> dict[str, torch.Tensor]:
        share = {k: v[rows] for k, v in batch.items()}
        out = rollout_passes(cfg, policy, reference, value_model, share, policy_pass)
        if distributed.is_sharded(policy):
            stand_in = trim_padding({k: v[:1] for k, v in batch.items()})
            for _ in range(distributed.stand_ins_needed(n_rows, cfg.micro_batch_size, rank, world)):
                _rollout_passes(cfg, policy, reference, value_model, stand_in, policy_pass)
        return out

    out = distributed.shared_rows(passes, n_rows, rank, world)
    _reshard(policy, reference.copy, value_model)
    return out


@in_training_precision
def sample_logprobs(
    cfg,
    policy,
    reference: Reference,
    generations: list[Generation],
    rank: int = 0,
    world: int = 1,
    batch_size: int | None = None,
) -> tuple[list[torch.Tensor], list[torch.Tensor]]:
    """Log-probs of every sample's response tokens under the reference and under the policy: two lists of one
    (T_i,) tensor per sample (online DPO, and the gold evaluation of ``training.gold``; ``cfg`` gives
    logprob_chunk_size, and forward_batch_size unless ``batch_size`` names the samples per pass). Each of
    ``world`` processes runs its contiguous share of the samples, and the shares are gathered
    (``distributed.shared_rows``) as rows (B, R) zero-padded to the longest response, then cut back to each
    response's length.

    Under FSDP every forward on the shards is a collective: a process with fewer forward batches than another
    runs stand-ins (one sample, its log-probs dropped) until they all ran as many; after, both models hold
    their shards alone again."""
    device = next(policy.parameters()).device
    lengths = [len(g.response_ids) for g in generations]
    width = max(1, *lengths)  # R
    sharded = distributed.is_sharded(policy)
    batch_size = batch_size or cfg.forward_batch_size
    # sample_batches cuts a share into ceil(n / batch_size) forward batches.
    n_stand_ins = distributed.stand_ins_needed(len(generations), batch_size, rank, world)

    def logprobs(model, share: list[Generation]) -> torch.Tensor:
        rows = response_token_logprobs(model, share, batch_size, cfg.logprob_chunk_size)
        for _ in range(n_stand_ins if sharded else 0):
            response_token_logprobs(model, generations[:1], 1, cfg.logprob_chunk_size)  # a stand-in
        padded = torch.zeros((len(share), width), device=device)  # (b, R) for gather_rows
        for i, row in enumerate(rows):
            padded[i, : len(row)] = row
        return padded

    def passes(rows: slice) -> dict[str, torch.Tensor]:
        share = generations[rows]
        with reference.model(policy) as model:
            ref = logprobs(model, share)
        return {"ref": ref, "policy": logprobs(policy, share)}

    gathered = distributed.shared_rows(passes, len(generations), rank, world)
    _reshard(policy, reference.copy)
    ref, logps = gathered["ref"].cpu(), gathered["policy"].cpu()  # (B, R)
    return [r[:n] for r, n in zip(ref, lengths)], [r[:n] for r, n in zip(logps, lengths)]


def _reshard(*networks: torch.nn.Module | None) -> None:
    """After passes on FSDP shards, each network holds its shards alone again (``distributed.reshard``)."""
    for network in networks:
        if network is not None and distributed.is_sharded(network):
            distributed.reshard(network)
