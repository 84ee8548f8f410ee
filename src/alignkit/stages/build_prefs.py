"""`alignkit build-prefs`: build preference pairs from a prompt file. Sample N responses per prompt from a
model, rank them (``reward=``: a reward model, a ``module:function``, an AI judge or the constitution's checks;
or people, via an exported file: ``ranker=export``/``human``), and write chosen/rejected
pairs that `alignkit dpo` (and rm) train on as they are.

Each pair records its prompt row, scores, ranker and sampling settings. The run appends one prompt at a
time and logs each finished prompt in ``<output>.progress.jsonl``, so a killed run resumes where it stopped
and neither loses nor repeats a finished prompt.
"""

from __future__ import annotations

import json
import sys
import time
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import ClassVar, Literal

import numpy as np
from tqdm.auto import tqdm

from alignkit.cai.constitution import load_constitution
from alignkit.cai.guidelines import GuidedChecksRanker
from alignkit.config import (
    SEED_MAX,
    ConfigError,
    GenerationBackendConfig,
    PromptRowsFields,
    RuntimeConfig,
    config_to_dict,
    doc_field,
    renamed_keys,
    required,
)
from alignkit.data import appendlog
from alignkit.data.io import BadRow, BadRowError, read_rows
from alignkit.data.pairing import Pairing, PairingRule, make_pairs, usable_responses
from alignkit.data.schemas import load_prompts, no_usable_rows
from alignkit.data.tokenize import encode_prompt
from alignkit.models.generation import SamplingConfig, check_generation_backend, load_sampler
from alignkit.models.loading import load_tokenizer, pick_device
from alignkit.reporting import cards
from alignkit.scoring import FunctionScorer, check_columns, check_scorer, is_function_spec
from alignkit.scoring.rankers import (
    RANKING_HOWTO,
    Ranker,
    RewardModelRanker,
    ScorerRanker,
    export_row,
    judge_ranker,
    read_ranked_row,
)
from alignkit.stages import Stage
from alignkit.training.distributed import start_one_process
from alignkit.training.remedies import length_penalised


@dataclass
class BuildPrefsConfig(PromptRowsFields, GenerationBackendConfig, RuntimeConfig):
    """Sample responses to prompts, rank them, and write chosen/rejected pairs (or a file for people to rank)."""

    # Old spellings, read for one release (alignkit.config.load_config renames them, with a message); the
    # prompt-row ones come with PromptRowsFields.
    ALIASES: ClassVar[dict[str, str]] = {
        "reward_model": "reward",
        "ranker=reward_model": "ranker=reward",
        "ranker=judge": "reward=judge",
        "ranker=checks": "reward=checks",
    }

    output: str = required(
        "Output .jsonl: the pairs (or, with ranker=export, the file to rank); an existing one is resumed."
    )
    model: str = doc_field(
        "smollm2-135m-instruct", "Model that samples the responses (embedded default, hub id or local dir)."
    )
    prompts: str | None = doc_field(
        None, "Prompt file (a 'prompt' or 'messages' column); required unless ranker=human."
    )
    # One response per prompt cannot make a pair, nor give people two to rank.
    n_samples: int = doc_field(4, "Responses sampled per prompt (at least 2).", ge=2)
    temperature: float = doc_field(
        1.0, "Sampling temperature (0 is greedy, which makes every sample the same).", ge=0
    )
    top_p: float = doc_field(
        1.0, "Nucleus sampling: keep the smallest set of tokens with this much probability.", gt=0, le=1
    )
    max_new_tokens: int = doc_field(128, "Longest response in tokens.", ge=1)
    max_prompt_length: int | None = doc_field(
        512, "Longest prompt in tokens (its end is kept); None: no limit.", ge=1
    )
    seed: int = doc_field(
        0,
        "Seed for sampling and for best_vs_random; a batch's seed comes from it and the batch.",
        ge=0,
        le=SEED_MAX,
    )
    prompts_per_batch: int = doc_field(
        8,
        "Prompts sampled together (prompts_per_batch * n_samples sequences per generation batch); "
        "a killed run redoes at most this batch.",
        ge=1,
    )
    ranker: Literal["reward", "human", "export"] = doc_field(
        "reward",
        "Who ranks the responses: reward (by `reward`); export (write a file for people to rank, no pairs); "
        "human (read that file back, ranked).",
    )
    reward: str | None = doc_field(
        None,
        "What ranks the responses, for ranker=reward: a reward model directory (an rm run's final/), "
        "'module:function' (function(prompt: str, response: str) -> float), 'judge' (an AI judge, from the "
        "Constitutional AI stage; the judge_* fields) or 'checks' (the constitution's checkable principles).",
    )
    human_rankings: str | None = doc_field(
        None,
        "For ranker=human: the exported file with its 'ranking' fields filled in, or the label database of "
        "`alignkit label` (a .label.db file or a SQLAlchemy URL).",
    )
    pairing: PairingRule = doc_field(
        "best_vs_worst",
        "Which pairs to emit per prompt: best_vs_worst (one), best_vs_random (one, the rejected drawn at "
        "random from the rest), all_pairs (every pair with different scores).",
    )
    score_batch_size: int = doc_field(16, "Responses per reward-model forward pass.", ge=1)
    length_penalty: float = doc_field(
        0.0,
        "ranker=reward: rank by score - length_penalty x response tokens (as sampled), so a longer reply wins "
        "only where the reward pays more than this per token; 0: by the score. The pairs' scores are these.",
        ge=0,
    )
    judge_model: str = doc_field(
        "smollm2-135m-instruct", "The AI judge for reward=judge (embedded default, hub id or local dir)."
    )
    judge_constitution: str | None = doc_field(
        None, "Constitution YAML the judge compares under, for reward=judge; None: alignkit's default."
    )
    judge_principles: list[str] | None = doc_field(
        None, "reward=judge: use only these principle ids of the constitution; None: all of them."
    )
    judge_principles_per_comparison: int = doc_field(
        2,
        "reward=judge: principles drawn per comparison of two responses, combined by their priorities.",
        ge=1,
    )
    judge_batch_size: int = doc_field(8, "reward=judge: judge questions per forward pass.", ge=1)
    judge_max_context_tokens: int | None = doc_field(
        384, "reward=judge: longest conversation shown to the judge, in tokens (its end is kept).", ge=1
    )
    judge_max_response_tokens: int | None = doc_field(
        192, "reward=judge: longest response shown to the judge, in tokens (its start is kept).", ge=1
    )
    save_dataset: str | None = doc_field(
        None, "Also save the pairs as a Hugging Face Dataset (save_to_disk) in this directory."
    )
    on_bad_row: Literal["error", "skip"] = doc_field(
        "error", "What to do with an invalid prompt or ranked row: stop with an error naming it, or skip it."
    )
    overwrite: bool = doc_field(False, "Start the output afresh instead of resuming it.")


# The settings that decide what the output holds: resuming an output with other values would mix two runs.
CONTENT_SETTINGS = (
    "model",
    "prompts",
    "prompts_split",
    "prompts_rows",
    "prompts_max_rows",
    "n_samples",
    "temperature",
    "top_p",
    "max_new_tokens",
    "max_prompt_length",
    "seed",
    "prompts_per_batch",
    "ranker",
    "reward",
    "human_rankings",
    "pairing",
    "judge_model",
    "judge_constitution",
    "judge_principles",
    "judge_principles_per_comparison",
    "judge_max_context_tokens",
    "judge_max_response_tokens",
)


# ---------------------------------------------------------------------------------------------
# Output rows of a prompt's pairs (the pairing rules are alignkit.data.pairing)
# ---------------------------------------------------------------------------------------------


def pair_rows(
    prompt_row: int,
    prompt,
    responses: Sequence[str],
    scores: Sequence[float | None],
    pairing: Pairing,
    ranker: str,
    pairing_rule: str,
    sampling: dict,
) -> list[dict]:
    """Output lines of one prompt: the pair columns dpo/rm read, plus what traces the pair to its origin."""
    return [
        {
            "prompt": prompt,
            "chosen": responses[c],
            "rejected": responses[r],
            "chosen_score": scores[c],
            "rejected_score": scores[r],
            "ranker": ranker,
            "pairing": pairing_rule,
            "prompt_row": prompt_row,
            "chosen_index": c,
            "rejected_index": r,
            "sampling": sampling,
        }
        for c, r in pairing.pairs
    ]


def counts_of(pairing: Pairing, n_responses: int) -> dict:
    return {
        "n_responses": n_responses,
        "n_pairs": len(pairing.pairs),
        "n_empty": pairing.n_empty,
        "n_duplicate": pairing.n_duplicate,
        "n_unscored": pairing.n_unscored,
        "n_ties": pairing.n_ties,
    }


# ---------------------------------------------------------------------------------------------
# The stage
# ---------------------------------------------------------------------------------------------


def batch_seed(seed: int, batch_index: int) -> int:
    """The sampling seed of one batch of prompts: fixed by (seed, batch), so a resumed run samples the
    batch it redoes exactly as the interrupted run did."""
    return int(np.random.SeedSequence([seed, batch_index]).generate_state(1)[0])


REWARD_KINDS = ("judge", "checks")  # the values of `reward` that name no directory or function


def check_reward(cfg: BuildPrefsConfig) -> None:
    """Refuse a missing or unusable ``reward`` for ranker=reward, loading no model."""
    if not cfg.reward:
        raise ConfigError(
            "ranker=reward needs reward=<a reward model dir, module:function, judge or checks> "
            "(or ranker=export to write a file for people to rank)"
        )
    if cfg.reward not in REWARD_KINDS:
        check_scorer(cfg.reward, "reward")


def make_ranker(cfg: BuildPrefsConfig, device) -> Ranker | None:
    """The ranker of ``cfg.reward``; None for ranker=export (people rank later)."""
    if cfg.ranker == "export":
        return None
    check_reward(cfg)
    if cfg.reward == "judge":
        return judge_ranker(cfg)
    if cfg.reward == "checks":  # the constitution's checkable principles, judged by program, priority first
        # with the program checks of the constitution's guidelines for edge cases, where it has any
        return GuidedChecksRanker.from_guidelines(load_constitution(cfg.judge_constitution))
    if is_function_spec(cfg.reward):
        return ScorerRanker(FunctionScorer(cfg.reward, "reward"))
    from alignkit.models.reward import load_reward_model  # only when a reward model ranks

    rm = load_reward_model(cfg.reward, cfg.dtype, device, cfg.trust_remote_code)
    return RewardModelRanker(rm, cfg.score_batch_size)


def as_recorded(output: Path, settings: dict) -> dict:
    """``settings`` as the output's progress file spells them. An output begun before ``reward=`` recorded
    ranker=reward_model/judge/checks and reward_model=<dir>; it resumes under that spelling, so an upgrade
    mid-run neither refuses it nor writes a second spelling into it."""
    lines = appendlog.complete_lines(appendlog.progress_path(output))
    if not lines or "reward_model" not in json.loads(lines[0]).get("settings", {}):
        return settings
    old = {k: v for k, v in settings.items() if k != "reward"}
    reward = settings["reward"] if settings["ranker"] == "reward" else None
    old["ranker"] = reward if reward in REWARD_KINDS else "reward_model" if reward else settings["ranker"]
    old["reward_model"] = reward if old["ranker"] == "reward_model" else None
    return old


def sample_and_rank(
    cfg: BuildPrefsConfig, writer: appendlog.Writer, done: dict[int, dict]
) -> tuple[int, list[BadRow]]:
    """Steps 2-5 for ranker=reward/export; returns (prompt rows read, prompt rows skipped)."""
    if not cfg.prompts:
        raise ConfigError(f"ranker={cfg.ranker} needs prompts=<file> to sample responses for")
    device = pick_device()
    # 2. The ranker first (an unavailable judge fails before minutes of loading), then the policy.
    ranker = make_ranker(cfg, device)
    loaded = load_prompts(
        cfg.prompts, cfg.on_bad_row, split=cfg.prompts_split, rows=cfg.prompts_rows, limit=cfg.prompts_max_rows
    )
    print(f"prompts: {loaded.summary()}", file=sys.stderr)
    loaded.require_rows("prompts")
    if ranker is not None:  # a reward function's column without a default, missing from a row: before the policy
        check_columns(cfg.reward, loaded.examples, "reward", "prompts")
    tokenizer = load_tokenizer(cfg.model, cfg.trust_remote_code)
    sample = load_sampler(cfg, tokenizer, device)
    sampling = {
        "model": cfg.model,
        "n_samples": cfg.n_samples,
        "temperature": cfg.temperature,
        "top_p": cfg.top_p,
        "max_new_tokens": cfg.max_new_tokens,
        "max_prompt_length": cfg.max_prompt_length,
        "seed": cfg.seed,
        "prompts_per_batch": cfg.prompts_per_batch,
    }
    examples, n = loaded.examples, cfg.n_samples
    bar = tqdm(
        total=len(examples),
        initial=sum(ex.ref.row in done for ex in examples),
        desc="build-prefs",
        unit="prompt",
        disable=not cfg.progress,
    )
    # The batches are a fixed partition of the prompt list, so batch b has the same prompts and seed on
    # every run; a batch whose prompts are all finished is not sampled again.
    for b, start in enumerate(range(0, len(examples), cfg.prompts_per_batch)):
        batch = examples[start : start + cfg.prompts_per_batch]
        if all(ex.ref.row in done for ex in batch):
            continue
        # 3. Sample n responses per prompt, all in one batch (hf: with the KV cache; vllm: prompts cached).
        prompt_ids = [
            encode_prompt(tokenizer, ex.prompt, cfg.max_prompt_length) for ex in batch for _ in range(n)
        ]
        generations = sample(
            prompt_ids,
            SamplingConfig(cfg.max_new_tokens, cfg.temperature, cfg.top_p, batch_seed(cfg.seed, b)),
        )
        for k, ex in enumerate(batch):
            if ex.ref.row in done:
                continue
            texts = [g.text for g in generations[k * n : (k + 1) * n]]
            if ranker is None:  # export: one line per prompt for people to rank
                writer.add_prompt(
                    ex.ref.row, [export_row(ex.ref.row, ex.prompt, texts, sampling)], {"n_responses": n}
                )
                bar.update(1)
                continue
            # 4. Rank the usable responses (empty and repeated ones are never sent to the ranker).
            kept, _, _ = usable_responses(texts)
            scores: list[float | None] = [None] * n
            # The prompt row's other columns (a task's 'answer') go to a reward function, as grpo passes them.
            ranked = ranker.score(ex.prompt, [texts[i] for i in kept], ex.columns) if kept else []
            lengths = [len(generations[k * n + i].response_ids) for i in kept]
            for i, s in zip(kept, length_penalised(ranked, lengths, cfg.length_penalty)):
                scores[i] = s
            # 5. Pair by the rule, and append the prompt's pairs and its progress entry.
            pairing = make_pairs(texts, scores, cfg.pairing, np.random.default_rng([cfg.seed, ex.ref.row]))
            lines = pair_rows(
                ex.ref.row, ex.prompt, texts, scores, pairing, ranker.name, cfg.pairing, sampling
            )
            counts = counts_of(pairing, n)
            if isinstance(ranker, GuidedChecksRanker):  # responses whose verdict a guideline changed
                counts["n_guideline_resolved"] = ranker.take_resolved()
            writer.add_prompt(ex.ref.row, lines, counts)
            bar.update(1)
    bar.close()
    return loaded.n_rows, loaded.skipped


def import_rankings(
    cfg: BuildPrefsConfig, writer: appendlog.Writer, done: dict[int, dict]
) -> tuple[int, list[BadRow]]:
    """Steps 2-5 for ranker=human: pairs from a ranked export or a label database (``alignkit label``);
    returns (rows read, rows skipped)."""
    if not cfg.human_rankings:
        raise ConfigError("ranker=human needs human_rankings=<file> (the ranker=export output, ranked)")
    from alignkit.labeling.export import is_label_db, ranked_prompts  # only SQLAlchemy needs it

    if is_label_db(cfg.human_rankings):
        from_db, n_items = ranked_prompts(cfg.human_rankings)
        for ranked in from_db:
            if ranked.prompt_row not in done:
                write_ranked(cfg, writer, ranked)
        if not from_db:
            raise no_usable_rows("human_rankings", cfg.human_rankings, n_items, [])
        return n_items, []
    skipped: list[BadRow] = []
    seen: set[int] = set()
    n_rows = 0
    for item in read_rows(cfg.human_rankings):
        n_rows += 1
        try:
            if isinstance(item, BadRow):
                raise BadRowError(item.source, item.row, item.field, item.problem)
            ranked = read_ranked_row(item)
            if ranked.prompt_row in seen:
                raise BadRowError(
                    item.source, item.row, "prompt_row", f"prompt row {ranked.prompt_row} appears twice"
                )
        except BadRowError as err:
            if cfg.on_bad_row == "error":
                raise
            skipped.append(err.bad_row)
            continue
        seen.add(ranked.prompt_row)
        if ranked.prompt_row in done:
            continue
        write_ranked(cfg, writer, ranked)
    if not seen:
        raise no_usable_rows("human_rankings", cfg.human_rankings, n_rows, skipped)
    return n_rows, skipped


def write_ranked(cfg: BuildPrefsConfig, writer: appendlog.Writer, ranked) -> None:
    """Pair one people-ranked prompt by the rule and append its lines and progress entry."""
    rng = np.random.default_rng([cfg.seed, ranked.prompt_row])
    pairing = make_pairs(ranked.responses, ranked.scores, cfg.pairing, rng)
    lines = pair_rows(
        ranked.prompt_row,
        ranked.prompt,
        ranked.responses,
        ranked.scores,
        pairing,
        "human",
        cfg.pairing,
        ranked.sampling,
    )
    writer.add_prompt(ranked.prompt_row, lines, counts_of(pairing, len(ranked.responses)))


def run(cfg: BuildPrefsConfig) -> dict:
    start_one_process("build-prefs", cfg.num_threads)
    started = time.time()
    output = appendlog.jsonl_output(cfg.output, "prompt by prompt")
    if cfg.n_samples < 2 and cfg.ranker != "human":
        raise ConfigError(f"n_samples must be at least 2 to make a pair, got {cfg.n_samples}")
    if cfg.prompts_per_batch < 1:
        raise ConfigError(f"prompts_per_batch must be at least 1, got {cfg.prompts_per_batch}")
    if cfg.ranker != "human":
        check_generation_backend(cfg.generation_backend)

    # 1. Resume: the prompts an earlier run of the same settings finished are kept and skipped.
    settings = appendlog.content_settings(cfg, CONTENT_SETTINGS)
    if cfg.length_penalty:  # recorded only when set, so outputs begun before the option resume as they were
        settings["length_penalty"] = cfg.length_penalty
    if cfg.overwrite:
        appendlog.remove_output(output)
    settings = as_recorded(output, settings)
    done = appendlog.resume(output, settings, renamed_keys(BuildPrefsConfig))
    if done:
        print(f"build-prefs: resuming {output}: {len(done)} prompts already done", file=sys.stderr)

    # 2.-5. Rank and pair each prompt's responses (sampled here, or ranked by people), appending as we go.
    writer = appendlog.Writer(output, settings, fresh=not appendlog.progress_path(output).exists())
    try:
        if cfg.ranker == "human":
            n_rows, skipped = import_rankings(cfg, writer, done)
        else:
            n_rows, skipped = sample_and_rank(cfg, writer, done)
    finally:
        writer.close()

    # 6. Totals over every finished prompt (this run and earlier ones), the dataset copy, the summary.
    entries = appendlog.ledger_entries(output)
    total = {
        key: sum(e.get(key, 0) for e in entries)
        for key in (
            "n_responses", "n_pairs", "n_empty", "n_duplicate", "n_unscored", "n_ties", "n_guideline_resolved"
        )
    }
    summary = {
        "stage": "build-prefs",
        "output": str(output),
        "ranker": cfg.ranker,
        "reward": cfg.reward if cfg.ranker == "reward" else None,
        "pairing": cfg.pairing,
        "rows_read": n_rows,
        "skipped_rows": len(skipped),
        "prompts_done": len(entries),
        "prompts_this_run": len(entries) - len(done),
        "responses": total["n_responses"],
        "pairs": total["n_pairs"],
        "skipped_empty_responses": total["n_empty"],
        "skipped_duplicate_responses": total["n_duplicate"],
        "skipped_unscored_responses": total["n_unscored"],
        "skipped_tied_pairs": total["n_ties"],
        # reward=checks with guidelines: responses whose principle check a guideline overruled: conflicts resolved
        "guideline_resolved_conflicts": total["n_guideline_resolved"],
        "prompts_without_pairs": sum(e.get("n_pairs", 0) == 0 for e in entries)
        if cfg.ranker != "export"
        else None,
        "settings": settings,
    }
    if cfg.ranker == "export":
        summary["next"] = RANKING_HOWTO
        print(RANKING_HOWTO, file=sys.stderr)
    if cfg.save_dataset:
        from datasets import Dataset

        rows = [json.loads(line) for line in appendlog.complete_lines(output)]
        Dataset.from_list(rows).save_to_disk(cfg.save_dataset)
        summary["dataset"] = cfg.save_dataset
    summary["wall_seconds"] = time.time() - started
    appendlog.write_summary(output, summary)
    card = cards.write_dataset_card(output, 'build-prefs', config_to_dict(cfg), summary)
    print(f"wrote {card}", file=sys.stderr)
    return summary


STAGE = Stage("build-prefs", BuildPrefsConfig, run)
