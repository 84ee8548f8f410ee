"""`alignkit online-dpo`: online (iterative) DPO, pairs sampled from the policy being trained, every round.

Offline DPO learns from pairs another policy wrote, and says less about the policy's own responses the further
it moves from that one (distribution shift). Online DPO samples fresh pairs from the current policy each round
and ranks them with a reward (Xu et al. 2023, "Some things are more CRINGE than others", pairwise iterative
training; Guo et al. 2024, "Direct Language Model Alignment from Online AI Feedback"; Xiong et al. 2024,
"Iterative Preference Learning from Human Feedback"). One round is one loop body in `run`, numbered:
sample -> score -> pair best vs worst -> reference log-probs -> DPO epochs -> log.

It reuses what the other stages use: the sampler (`models.generation`), the reward (`scoring`), build-prefs'
pairing rule (`data.pairing`), DPO's pair log-probs and loss (`training.preference`, `losses.preference`) and
PPO's seeded per-iteration bookkeeping (`training.online`).

Launched in several processes (torchrun, accelerate launch) it runs data parallel (DDP) with the numbers of one
process, as PPO does: each rank samples and scores its share of the round's generation batches and takes the
log-probs of its share of the samples, the shares are gathered (so every rank pairs the whole round alike), and
each rank trains on its share of every minibatch's pairs, its loss divided by the whole minibatch's pairs.
Under FSDP (full fine-tuning) policy and reference are sharded as well: generation runs on the policy's weights
gathered whole (``distributed.whole_weights``), and the log-prob passes on the shards, every rank running as many.
"""

from __future__ import annotations

import functools
import json
import math
import signal
import sys
import time
from dataclasses import dataclass
from typing import Literal

import numpy as np
import torch
from tqdm.auto import tqdm

from alignkit.config import (
    ConfigError,
    GenerationBackendConfig,
    TrainConfig,
    check_at_most,
    check_row_range,
    doc_field,
    not_used_doc,
    refuse_unused,
    required,
    validate_config,
)
from alignkit.data.pairing import make_pairs
from alignkit.data.tokenize import EncodedPair, encode_prompt
from alignkit.errors import TrainingInterrupted
from alignkit.evaluation.metrics import distinct_n, kl_per_token, length_stats, pearson
from alignkit.evaluation.monitors import MonitorSet, default_monitors
from alignkit.models.forward import response_token_logprobs
from alignkit.models.generation import (
    Generation,
    SamplingConfig,
    check_generation_backend,
    vllm_sampler,
)
from alignkit.models.loading import (
    apply_lora,
    count_parameters,
    enable_gradient_checkpointing,
    load_model,
    load_tokenizer,
    pick_device,
    save_final,
)
from alignkit.models.precision import in_training_precision, weights_dtype
from alignkit.scoring import check_scorer, load_scorer
from alignkit.training import distributed
from alignkit.training.checkpoint import (
    NonFiniteState,
    checkpoint_dir,
    load_checkpoint,
    resume_checkpoint,
    skipped_checkpoint,
    write_checkpoint,
)
from alignkit.training.loop import seed_and_threads
from alignkit.training.online import (
    derived_seed,
    iteration_prompts,
    note_idle_processes,
    optimizer_step,
    sample_share,
    training_prompts,
    truncate_jsonl,
)
from alignkit.training.preference import PairExample, collate_pair_examples, pair_outputs
from alignkit.training.run import RunDir, peak_rss_mb
from alignkit.training.schedule import build_optimizer, build_scheduler
from alignkit.training.signals import StopSignals, stopped_at_once

# TrainConfig fields that mean nothing in a round's loop, and what to set instead (a changed one is an error).
NOT_USED = {
    "batch_size": "prompts_per_round (samples) and minibatch_size (pairs per optimizer step)",
    "epochs": "rounds and dpo_epochs",
    "max_steps": "rounds",
    "max_length": "max_prompt_length and max_new_tokens",
    "eval_data": "`alignkit eval` on the final model",
    "eval_every": "`alignkit eval` on the final model",
}


def _not_used(name: str) -> str:
    return not_used_doc("online-dpo", NOT_USED[name])


@dataclass
class OnlineDPOConfig(GenerationBackendConfig, TrainConfig):
    """A round: samples_per_prompt responses to each of prompts_per_round prompts from the current policy,
    scored by `reward`, each prompt's best against its worst, dpo_epochs of DPO steps on those pairs against
    the starting model. Data: prompts (a `prompt` column, or `messages` ending with a user turn)."""

    train_data: str | None = doc_field(
        None,
        "Prompts to sample from; None uses the prompts shipped with alignkit (assets/prompts.jsonl).",
    )
    reward: str = required(
        "'module:function' with function(prompt: str, response: str) -> float (e.g. "
        "alignkit.evaluation.classifiers:sentiment), or a reward model directory written by `alignkit rm`."
    )
    reward_batch_size: int = doc_field(8, "Responses per forward pass of a reward model.", ge=1)
    # --- rounds ---
    rounds: int = doc_field(10, "Rounds; each samples, scores, pairs and updates once.", ge=1)
    prompts_per_round: int = doc_field(8, "Prompts per round; each makes at most one pair.", ge=1)
    samples_per_prompt: int = doc_field(
        4,
        "Responses sampled per prompt (at least 2); the best and the worst by the reward make its pair.",
        ge=2,
    )
    max_new_tokens: int = doc_field(48, "Longest response in tokens.", ge=1)
    # Greedy samples (0) of one prompt are all the same: no pair could ever be made.
    temperature: float = doc_field(
        1.0, "Sampling temperature (> 0: the samples of one prompt must differ to make a pair).", gt=0
    )
    top_p: float = doc_field(
        1.0, "Nucleus sampling: sample from the smallest token set with this mass.", gt=0, le=1
    )
    generation_batch_size: int = doc_field(
        16,
        "Sequences per batched generate() call (generation_backend=hf; vLLM batches by itself). In N processes "
        "each samples every N-th batch: at most prompts_per_round * samples_per_prompt / N keeps them all "
        "sampling.",
        ge=1,
    )
    max_prompt_length: int | None = doc_field(256, "Longest prompt in tokens (its end is kept).")
    forward_batch_size: int = doc_field(
        16,
        "Samples per no-grad forward pass (the reference's and the policy's log-probs of the samples).",
        ge=1,
    )
    # --- objective ---
    loss: Literal["dpo", "ipo"] = doc_field("dpo", "Which objective on the pairs: DPO or IPO.")
    # beta <= 0 flips or removes the preference (a negative beta trains towards the rejected samples).
    beta: float = doc_field(0.1, "DPO/IPO temperature on the log-ratios (KL strength).", gt=0)
    # At 0.5 the two labels weigh the same (no gradient); above it the preference is reversed.
    label_smoothing: float = doc_field(
        0.0, "DPO only: assumed label-flip rate (conservative DPO).", ge=0, lt=0.5
    )
    ipo_average_logps: bool = doc_field(
        True, "IPO on token-averaged log-ratios (as TRL's DPOTrainer); False uses sums as the IPO paper."
    )
    share_prompt: bool = doc_field(
        True, "Run each pair's prompt once, [prompt | chosen | rejected] in one masked row: same log-probs."
    )
    # --- update ---
    dpo_epochs: int = doc_field(1, "Passes of minibatch DPO updates over each round's pairs.", ge=1)
    minibatch_size: int = doc_field(8, "Pairs per optimizer step.", ge=1)
    micro_batch_size: int = doc_field(
        2,
        "Pairs per forward/backward pass (at most minibatch_size); a minibatch is accumulated from these "
        "exactly.",
        ge=1,
    )
    learning_rate: float = doc_field(1e-6, "Peak AdamW learning rate (LoRA usually wants ~1e-4).")
    lr_scheduler: Literal["constant", "linear", "cosine"] = doc_field(
        "constant",
        "Learning-rate schedule over all rounds; each round counts as dpo_epochs * ceil(prompts_per_round / "
        "minibatch_size) steps, whatever number of pairs it made, so the schedule is fixed in advance.",
    )
    log_every: int = doc_field(1, "Write metrics every N rounds.")
    save_every: int | None = doc_field(None, "Write a checkpoint every N rounds (and at the end).")
    # --- TrainConfig fields online-dpo does not use (same defaults) ---
    batch_size: int = doc_field(8, _not_used("batch_size"))
    epochs: int = doc_field(1, _not_used("epochs"))
    max_steps: int | None = doc_field(None, _not_used("max_steps"))
    max_length: int = doc_field(1024, _not_used("max_length"))
    eval_data: str | None = doc_field(None, _not_used("eval_data"))
    eval_every: int | None = doc_field(None, _not_used("eval_every"))

    def check(self) -> None:
        """The rules across fields (each field's own range is declared on it and checked before this)."""
        refuse_unused(self, NOT_USED, "online-dpo")
        check_at_most(self, "micro_batch_size", "minibatch_size")
        check_row_range(self, "train_rows")


CONFIG = OnlineDPOConfig


def check_config(cfg: OnlineDPOConfig) -> None:
    """The declared ranges and ``OnlineDPOConfig.check`` (for a config built in code too), and the backend."""
    validate_config(cfg)
    check_scorer(cfg.reward, "reward")
    check_generation_backend(cfg.generation_backend)


def check_launch(cfg: OnlineDPOConfig) -> None:
    """Refuse what online DPO cannot do in the processes it was launched in (after the process group is up)."""
    if distributed.engine() == "deepspeed":
        raise ConfigError(
            "online-dpo runs data parallel (DDP) or sharded under FSDP, not under DeepSpeed: launch it with "
            "configs/accelerate/multi_gpu.yaml, plain torchrun, or configs/accelerate/fsdp.yaml (full fine-tuning)"
        )
    world = distributed.world_size()
    if world > 1 and cfg.generation_backend == "vllm":
        raise ConfigError(
            f"generation_backend=vllm in {world} processes is not supported by online-dpo (one vLLM engine per "
            "process is not implemented); use generation_backend=hf, or run in one process"
        )


# ---------------------------------------------------------------------------------------------------------
# Steps 3-5 of a round


@dataclass
class RoundPairs:
    pairs: list[tuple[int, int]]  # (chosen, rejected) indices into the round's samples
    n_ties: int  # prompts whose best and worst usable responses scored the same: no pair
    n_left_out: int  # responses left out before pairing: empty or repeating another of the same prompt


def pair_samples(texts: list[str], scores: list[float], samples_per_prompt: int) -> RoundPairs:
    """Best vs worst of each prompt's ``samples_per_prompt`` consecutive samples, by build-prefs' rule
    (``data.pairing.make_pairs``: empty and repeated responses left out, a tie makes no pair)."""
    k = samples_per_prompt
    pairs, n_ties, n_left_out = [], 0, 0
    for first in range(0, len(texts), k):
        pairing = make_pairs(texts[first : first + k], scores[first : first + k], "best_vs_worst")
        pairs += [(first + c, first + r) for c, r in pairing.pairs]
        n_ties += pairing.n_ties
        n_left_out += pairing.n_empty + pairing.n_duplicate
    return RoundPairs(pairs, n_ties, n_left_out)


@in_training_precision
def sample_logprobs(
    cfg: OnlineDPOConfig, policy, reference, generations: list[Generation], rank: int = 0, world: int = 1
) -> tuple[list[torch.Tensor], list[torch.Tensor]]:
    """Log-probs of every sample's response tokens under the reference and under the policy: two lists of one
    (T_i,) tensor per sample. Each of ``world`` processes runs its contiguous share of the samples, and the
    shares are gathered (``distributed.shared_rows``) as rows (B, R) zero-padded to the longest response, then
    cut back to each response's length. The reference is a frozen copy, or (LoRA, ``reference`` None) the
    policy's base with the adapters off.

    Under FSDP every forward on the shards is a collective: a process with fewer forward batches than another
    runs stand-ins (one sample, its log-probs dropped) until they all ran as many; after, both models hold their
    shards alone again."""
    device = next(policy.parameters()).device
    lengths = [len(g.response_ids) for g in generations]
    width = max(1, *lengths)  # R
    sharded = distributed.is_sharded(policy)
    # sample_batches cuts a share into ceil(n / forward_batch_size) forward batches.
    n_stand_ins = distributed.stand_ins_needed(len(generations), cfg.forward_batch_size, rank, world)

    def logprobs(model, share: list[Generation]) -> torch.Tensor:
        rows = response_token_logprobs(model, share, cfg.forward_batch_size, cfg.logprob_chunk_size)
        for _ in range(n_stand_ins if sharded else 0):
            response_token_logprobs(model, generations[:1], 1, cfg.logprob_chunk_size)  # a stand-in
        padded = torch.zeros((len(share), width), device=device)  # (b, R) for gather_rows
        for i, row in enumerate(rows):
            padded[i, : len(row)] = row
        return padded

    def passes(rows: slice) -> dict[str, torch.Tensor]:
        share = generations[rows]
        if reference is not None:
            ref = logprobs(reference, share)
        else:
            with policy.disable_adapter():
                ref = logprobs(policy, share)
        return {"ref": ref, "policy": logprobs(policy, share)}

    gathered = distributed.shared_rows(passes, len(generations), rank, world)
    for model in (policy, reference):
        if model is not None and sharded:
            distributed.reshard(model)
    ref, logps = gathered["ref"].cpu(), gathered["policy"].cpu()  # (B, R)
    return [r[:n] for r, n in zip(ref, lengths)], [r[:n] for r, n in zip(logps, lengths)]


def pair_examples(
    generations: list[Generation], ref_logps: list[torch.Tensor], pairs: list[tuple[int, int]]
) -> list[PairExample]:
    """The round's pairs as DPO examples, each with its reference log-probs (sum and mean of the response
    tokens, taken from the per-sample ones): chosen and rejected are sampled token ids, never re-tokenized."""
    examples = []
    for c, r in pairs:
        encoded = EncodedPair(
            generations[c].prompt_ids, generations[c].response_ids, generations[r].response_ids, False
        )
        chosen, rejected = ref_logps[c], ref_logps[r]  # (T_c,), (T_r,)
        ref = torch.stack([chosen.sum(), rejected.sum(), chosen.mean(), rejected.mean()]).float()  # (4,)
        examples.append(PairExample(encoded, ref))
    return examples


@in_training_precision
def pair_losses(cfg: OnlineDPOConfig, policy, batch: dict) -> tuple[torch.Tensor, dict[str, float]]:
    """Per-pair losses (B,) and summed pair metrics of ``training.preference.pair_outputs`` on ``policy`` (the
    reference's log-probs ride in batch["ref"]): the forward of the module DDP wraps."""
    out = pair_outputs(cfg, policy, None, batch)
    return out.losses, out.metrics


def dpo_update(
    cfg: OnlineDPOConfig,
    loss_fn,
    minibatch: list[PairExample],
    optimizer,
    scheduler,
    params,
    pad_id: int,
    rank: int = 0,
    world: int = 1,
) -> dict:
    """One optimizer step on a minibatch of pairs, accumulated over micro-batches. ``loss_fn(batch) -> (losses,
    metrics)`` is ``pair_losses`` on the policy as a ``distributed.StepModule`` (in several processes wrapped in
    DDP).

    Each micro-batch's summed loss is divided by the minibatch's pairs, so the gradient is that of the mean loss
    over the minibatch. In several processes each rank runs its share of the minibatch's pairs
    (``rank_microbatches``), still divided by the whole minibatch's pairs (every rank holds the whole round), and
    the gradients summed over the ranks are one process's: a mean over the minibatch's pairs, not a mean of
    per-rank means. Returns the minibatch's mean loss and pair metrics, and the step's grad_norm, lr and
    nonfinite flag (a non-finite step is skipped)."""
    device = next(loss_fn.parameters()).device
    n_pairs = len(minibatch)
    shares = distributed.rank_microbatches(list(range(n_pairs)), cfg.micro_batch_size, rank, world)
    sums: dict[str, float] = {}
    for j, share in enumerate(shares):
        # An empty share (fewer pairs left in the minibatch than ranks) runs a stand-in that counts for nothing:
        # DDP needs every rank's backward to sync the gradients.
        batch = collate_pair_examples([minibatch[i] for i in share or [0]], pad_id)
        batch = {k: v.to(device) if torch.is_tensor(v) else v for k, v in batch.items()}
        scale = world if share else 0  # x world: DDP averages the gradients over the ranks, undo it
        with distributed.gradient_sync(loss_fn, last=j == len(shares) - 1):
            losses, metrics = loss_fn(batch)
            (losses.sum() / n_pairs * scale).backward()
        for key, value in {"loss": losses.sum().item(), **metrics}.items():
            sums[key] = sums.get(key, 0.0) + (value / n_pairs if share else 0.0)
    sums = dict(zip(sums, distributed.all_reduce(list(sums.values()))))  # each rank holds its pairs' part
    return {**sums, **optimizer_step(optimizer, scheduler, params, cfg.max_grad_norm, sums["loss"])}


# ---------------------------------------------------------------------------------------------------------
# The stage


def run(cfg: OnlineDPOConfig, monitors: MonitorSet | None = None) -> dict:
    """Train the policy with online DPO; ``monitors`` replaces the default failure monitors (for tests)."""
    started = time.time()
    check_config(cfg)
    check_launch(cfg)  # starts the process group
    # The folder is checked, locked for this run and released however it ends (RunDir.create).
    with RunDir.create(cfg.output_dir, "online-dpo", cfg.resume_from, cfg.tensorboard, cfg=cfg) as run_dir:
        return _run(cfg, run_dir, started, monitors)


def _run(cfg: OnlineDPOConfig, run_dir: RunDir, started: float, monitors: MonitorSet | None) -> dict:
    rank, world, main = distributed.accelerator().process_index, distributed.world_size(), run_dir.writes
    print(f"run folder: {run_dir.path}", file=sys.stderr)
    seed_and_threads(cfg)
    device = pick_device()

    # Prompts, tokenized with the chat template.
    tokenizer = load_tokenizer(cfg.model, cfg.trust_remote_code)
    prompts, n_skipped = training_prompts(cfg)
    prompt_ids = [encode_prompt(tokenizer, p, cfg.max_prompt_length) for p in prompts]
    k = cfg.samples_per_prompt
    note_idle_processes(cfg, cfg.prompts_per_round * k, "round", "prompts_per_round * samples_per_prompt")

    # The roles: the policy; the frozen reference it starts as (LoRA: the same base with the adapters off, as
    # DPO's reference=adapter; full fine-tuning: a frozen copy); the reward; the sampler (hf: generate on the
    # policy itself, each process its share of the batches; vLLM, one process: an engine on cfg.model that takes
    # the policy's weights, LoRA merged in, each round).
    scorer = load_scorer(
        cfg.reward,
        "reward",
        dtype=cfg.dtype,
        device=device,
        trust_remote_code=cfg.trust_remote_code,
        batch_size=cfg.reward_batch_size,
    )
    # Under FSDP (full fine-tuning) policy and reference are sharded as they are loaded (``distributed.shard``;
    # the main process alone reads the weights), and the reward is whole in every process.
    load = functools.partial(
        load_model, cfg.model, weights_dtype(cfg), cfg.trust_remote_code, device, distributed.load_on()
    )
    policy = load()
    distributed.shard(policy, cfg.lora)
    if cfg.lora:
        policy = apply_lora(policy, cfg)
        reference = None
    else:
        reference = load().eval()
        reference.requires_grad_(False)
        distributed.shard(reference)
    if cfg.gradient_checkpointing:  # the update's passes recompute each layer in the backward
        enable_gradient_checkpointing(policy)
    rank_share = distributed.largest_rank_share(policy)
    trainable, total = count_parameters(policy)
    params = [p for p in policy.parameters() if p.requires_grad]
    optimizer = build_optimizer(params, cfg)
    steps_per_round = cfg.dpo_epochs * math.ceil(cfg.prompts_per_round / cfg.minibatch_size)
    scheduler = build_scheduler(optimizer, cfg.lr_scheduler, cfg.warmup_steps, cfg.rounds * steps_per_round)
    # A vLLM engine on cfg.model, taking the policy's weights each round; None: transformers' generate.
    sampler = vllm_sampler(cfg, tokenizer, device) if cfg.generation_backend == "vllm" else None
    monitors = monitors if monitors is not None else default_monitors("online-dpo")

    # Resume: policy weights (LoRA: the adapters), optimizer, schedule, RNG and the round counter. Nothing in a
    # checkpoint depends on the number of processes; the main process picks it, every process reads it.
    start, n_nonfinite, elapsed_before = 0, 0, 0.0
    resume = resume_checkpoint(cfg.resume_from, run_dir.checkpoints_dir) or ""  # verified; corrupt: fall back
    if resume:
        state = load_checkpoint(resume, policy, optimizer, scheduler)
        if (state["n_prompts"], state["prompts_per_round"]) != (len(prompts), cfg.prompts_per_round):
            raise ConfigError(
                f"resume_from: {resume} was written for {state['n_prompts']} prompts, "
                f"{state['prompts_per_round']} per round; an exact resume needs the same"
            )
        start, n_nonfinite, elapsed_before = state["round"], state["n_nonfinite_skipped"], state["elapsed_s"]
    run_dir.truncate_metrics_after(start)
    if resume:
        monitors.replay(run_dir.logged_rows())  # their windows as the uninterrupted run had them
    samples_path = run_dir.path / "samples.jsonl"
    if main:
        truncate_jsonl(samples_path, start)
    # The update's forward pass: the policy and the DPO loss as one module, for DDP to sync (one process: the
    # module itself). Wrapping broadcasts rank 0's weights, which every rank already holds.
    stepper = distributed.data_parallel(distributed.StepModule(policy, functools.partial(pair_losses, cfg)))
    loop_started = time.monotonic()
    round_no, saved, last_checkpoint, last_row, stopped_by = start, start if resume else -1, resume, {}, None

    def save() -> str | None:  # the checkpoint written, or the last good one where the state is not finite
        for p in params:  # checkpoints hold what requires grad; make sure PEFT's switches left it so
            p.requires_grad_(True)
        state = {
            "round": round_no,
            "n_prompts": len(prompts),
            "prompts_per_round": cfg.prompts_per_round,
            "n_nonfinite_skipped": n_nonfinite,
            "elapsed_s": elapsed_before + time.monotonic() - loop_started,
        }
        path = checkpoint_dir(run_dir.checkpoints_dir, round_no)
        try:
            return write_checkpoint(path, policy, optimizer, scheduler, state, cfg.keep_checkpoints)
        except NonFiniteState as e:
            return skipped_checkpoint("round", round_no, e, last_checkpoint, run_dir.log_metrics)

    bar = tqdm(
        total=cfg.rounds, initial=start, disable=not cfg.progress or not main, desc="online-dpo", unit="round"
    )
    signals = StopSignals()
    try:
        with signals:
            while round_no < cfg.rounds:
                t0 = time.monotonic()
                # 1. Sample k responses to each of the round's prompts from the current policy, with a seed that
                #    depends only on (seed, round). Each process samples its share of the generation batches,
                #    each batch from its own seed, so the samples do not depend on the number of processes. A
                #    vLLM engine (one process) first takes the policy's weights (LoRA: the adapter merged in),
                #    unless it holds them already: a fresh run's first round, whose policy is the model the
                #    engine was built on (a new LoRA adapter has B = 0).
                idx = iteration_prompts(len(prompts), cfg.prompts_per_round, round_no, cfg.seed)
                # Prompt j's samples are j*k .. j*k+k-1.
                round_prompts = [prompts[i] for i in idx for _ in range(k)]
                round_prompt_ids = [prompt_ids[i] for i in idx for _ in range(k)]
                sampling = SamplingConfig(
                    cfg.max_new_tokens, cfg.temperature, cfg.top_p, derived_seed(cfg.seed, round_no, 0)
                )
                policy.eval()
                push = round_no > start or bool(resume)
                mine = sample_share(
                    cfg, policy, tokenizer, round_prompt_ids, sampling, rank, world, sampler, push
                )
                # 2. Score each response with the reward (each process its own samples), then gather every
                #    process's samples and scores: every process holds the whole round from here on.
                mine = dict(sorted(mine.items()))  # by position in the round's samples
                my_texts = [g.text for g in mine.values()]  # none where a process got no generation batch
                my_scores = scorer.score([round_prompts[i] for i in mine], my_texts) if mine else []
                gathered = distributed.gather_dicts(dict(zip(mine, zip(mine.values(), my_scores))))
                generations = [g for g, _ in gathered.values()]
                scores = [score for _, score in gathered.values()]
                texts = [g.text for g in generations]
                # 3. Pair each prompt's best response against its worst; a tie makes no pair. The same pairs in
                #    every process: each pairs the whole round.
                paired = pair_samples(texts, scores, k)
                # 4. Log-probs of every sample under the frozen reference and the current policy (each process
                #    its share of the samples, gathered): the reference's anchor the pairs' DPO loss, and both
                #    give the KL to the reference on the policy's own samples (k1 = log p - log q per token;
                #    Schulman 2020).
                ref_logps, policy_logps = sample_logprobs(cfg, policy, reference, generations, rank, world)
                kl = kl_per_token(policy_logps, ref_logps)
                examples = pair_examples(generations, ref_logps, paired.pairs)
                t1 = time.monotonic()
                # 5. dpo_epochs passes of minibatch DPO updates over the pairs, in a seeded order (the same in
                #    every process); each process trains on its share of every minibatch. The schedule advances
                #    steps_per_round steps a round whatever number of pairs the round made (none: no step).
                policy.train()
                lr = optimizer.param_groups[0]["lr"]
                generator = torch.Generator().manual_seed(derived_seed(cfg.seed, round_no, 1))
                step_stats = []
                for _ in range(cfg.dpo_epochs):
                    order = torch.randperm(len(examples), generator=generator).tolist()
                    for s in range(0, len(order), cfg.minibatch_size):
                        minibatch = [examples[i] for i in order[s : s + cfg.minibatch_size]]
                        step_stats.append(
                            dpo_update(
                                cfg,
                                stepper,
                                minibatch,
                                optimizer,
                                scheduler,
                                params,
                                tokenizer.pad_token_id,
                                rank,
                                world,
                            )
                        )
                for _ in range(steps_per_round - len(step_stats)):
                    scheduler.step()
                n_nonfinite += int(sum(s["nonfinite"] for s in step_stats))
                round_no += 1
                bar.update(1)

                # 6. Log the round's health and let the failure monitors see it.
                lengths = [len(g.response_ids) for g in generations]
                length = length_stats(lengths)
                margins = [scores[c] - scores[r] for c, r in paired.pairs]
                # loss, rewards/*, logps/*, grad_norm: means over the round's steps (none: no prompt made a pair)
                update_keys = [
                    key for key in (step_stats[0] if step_stats else {}) if key not in ("nonfinite", "lr")
                ]
                update_means = {key: float(np.mean([s[key] for s in step_stats])) for key in update_keys}
                row = {
                    "step": round_no,
                    "score/mean": float(np.mean(scores)),
                    "score/std": float(np.std(scores, ddof=1)),
                    "reward/mean": float(np.mean(scores)),  # the key RewardHackingMonitor reads
                    "reward_length_corr": pearson(scores, lengths),
                    "pairs": len(paired.pairs),
                    "ties": paired.n_ties,
                    "left_out": paired.n_left_out,
                    **({"pairs/score_margin": float(np.mean(margins))} if margins else {}),
                    **update_means,
                    "lr": lr,
                    "kl": float(kl.per_sequence.mean()),  # nats per response, as PPO's
                    "kl/per_token": kl.k1,
                    "len/mean": length.mean,
                    "len/std": length.std,
                    "eos_frac": float(np.mean([g.finished for g in generations])),
                    "distinct_2": distinct_n(texts, 2),
                    "nonfinite_skipped": n_nonfinite,
                    "rollout_s": t1 - t0,
                    "update_s": time.monotonic() - t1,
                    "elapsed_s": elapsed_before + time.monotonic() - loop_started,
                }
                roles = {c: "chosen" for c, _ in paired.pairs} | {r: "rejected" for _, r in paired.pairs}
                if main:
                    with open(samples_path, "a", encoding="utf-8") as f:
                        for i, (prompt, g, score) in enumerate(zip(round_prompts, generations, scores)):
                            sample = {"step": round_no, "prompt": prompt, "response": g.text, "score": score}
                            sample |= {"finished": g.finished, "pair": roles.get(i)}
                            f.write(json.dumps(sample) + "\n")
                if round_no % cfg.log_every == 0 or round_no == cfg.rounds:
                    last_row = row
                    run_dir.log_metrics(row)
                    bar.set_postfix(score=f"{row['score/mean']:.3f}", kl=f"{row['kl']:.2f}")
                    if monitors.on_log(round_no, row) == "stop":
                        stopped_by = ", ".join(e.monitor for e in monitors.last_events if e.action == "stop")
                    for event in monitors.last_events:
                        run_dir.log_metrics(event.to_row())

                # 7. Checkpoint every save_every rounds, and on SIGINT/SIGTERM before raising. The processes agree
                #    first: a signal or a stop seen by any of them stops them all.
                stop_flag, received = distributed.agree_to_stop(bool(stopped_by), signals.received)
                stopped_by = stopped_by or ("a monitor in another process" if stop_flag else None)
                if (cfg.save_every and round_no % cfg.save_every == 0) or received:
                    last_checkpoint, saved = save(), round_no
                if received:
                    name = signal.Signals(received).name
                    raise TrainingInterrupted(checkpoint=last_checkpoint, reason=f"interrupted by {name}")
                if stopped_by:
                    break
            if saved != round_no:
                last_checkpoint, saved = save(), round_no
    except KeyboardInterrupt:  # a second signal: stopped at once, maybe inside a checkpoint write
        raise stopped_at_once(signals, run_dir.checkpoints_dir, last_checkpoint or None) from None
    finally:
        bar.close()
        run_dir.close()

    # The final policy, written by the main process.
    distributed.save_from_main(
        policy,
        lambda state_dict: save_final(
            policy, tokenizer, run_dir.final_dir, merge_lora=cfg.merge_lora, state_dict=state_dict
        ),
    )
    rows = [json.loads(line) for line in run_dir.metrics_path.read_text().splitlines()] if main else []
    metric_rows = [r for r in rows if "event" not in r]
    summary = {
        "stage": "online-dpo",
        "model": cfg.model,
        "reward": cfg.reward,
        "loss": cfg.loss,
        "run_dir": str(run_dir.path),
        "final_model": str(run_dir.final_dir),
        "rounds": round_no,
        "stopped_by": stopped_by,
        "prompts": len(prompts),
        "skipped_rows": n_skipped,
        "reference": "policy base with adapters disabled" if cfg.lora else "frozen copy",
        "trainable_parameters": trainable,
        "total_parameters": total,
        "params_rank_share": rank_share,
        "pairs_by_round": [r["pairs"] for r in metric_rows],
        "score_by_round": [r["score/mean"] for r in metric_rows],
        "kl_by_round": [r["kl"] for r in metric_rows],
        "events": [r for r in rows if "event" in r],
        "final_metrics": last_row,
        "last_checkpoint": last_checkpoint,
        "train_seconds": elapsed_before + time.monotonic() - loop_started,
        "wall_seconds": time.time() - started,
        "peak_rss_mb": peak_rss_mb(),
    }
    run_dir.write_summary(summary)
    return summary
