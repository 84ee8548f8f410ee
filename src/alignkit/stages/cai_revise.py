"""`alignkit cai-revise`: the supervised phase of Constitutional AI (Bai et al. 2022, sec. 3). The model
answers each prompt, then for principles drawn from the constitution (seeded, one per round) critiques its
own latest answer and rewrites it; the final revision becomes the SFT target.

Output: one line per prompt with `prompt` + `completion` (the final revision), which `alignkit sft` trains
on as it is, plus the initial answer and every critique and revision for inspection. The run appends one
prompt at a time with a progress ledger, so a killed run resumes without losing or repeating a prompt.
"""

from __future__ import annotations

import sys
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Literal

import numpy as np
from tqdm.auto import tqdm

from alignkit.cai.constitution import Constitution, Principle, load_constitution
from alignkit.config import (
    SEED_MAX,
    GenerationBackendConfig,
    PromptRowsFields,
    RuntimeConfig,
    config_to_dict,
    doc_field,
    renamed_keys,
    required,
    validate_config,
)
from alignkit.data import appendlog
from alignkit.data.schemas import Loaded, Prompt, PromptExample, load_prompts
from alignkit.data.tokenize import encode_prompt
from alignkit.models.generation import SamplingConfig, check_generation_backend, load_sampler
from alignkit.models.loading import load_tokenizer, pick_device
from alignkit.reporting import cards
from alignkit.stages import Stage
from alignkit.training.distributed import start_one_process


@dataclass
class CAIReviseConfig(PromptRowsFields, GenerationBackendConfig, RuntimeConfig):
    """Answer prompts, then critique and revise each answer under constitution principles; write SFT data."""

    prompts: str = required("Prompt file: a 'prompt' (text or messages) or 'messages' column.")
    output: str = required(
        "Output .jsonl (prompt, completion = final revision, critiques); resumed if it exists."
    )
    on_bad_row: Literal["error", "skip"] = doc_field(
        "error",
        "What to do with an invalid prompt row: stop with an error naming it, or skip it and count it.",
    )
    model: str = doc_field(
        "smollm2-135m-instruct",
        "Model that answers, critiques and revises (embedded default, Hugging Face id or local directory).",
    )
    constitution: str | None = doc_field(
        None, "Constitution YAML (principles with critique and revision requests); None: alignkit's default."
    )
    principles: list[str] | None = doc_field(
        None, "Use only these principle ids of the constitution; None: all of them."
    )
    n_rounds: int = doc_field(
        1,
        "Critique -> revision rounds per prompt, each under its own principle (drawn without repeats).",
        ge=1,
    )
    max_new_tokens: int = doc_field(128, "Longest answer, critique or revision, in tokens.", ge=1)
    temperature: float = doc_field(0.7, "Sampling temperature (0 is greedy).", ge=0)
    top_p: float = doc_field(
        1.0, "Nucleus sampling: keep the smallest set of tokens with this much probability.", gt=0, le=1
    )
    max_prompt_length: int | None = doc_field(
        768, "Longest conversation fed to the model, in tokens (its end is kept); None: no limit.", ge=1
    )
    seed: int = doc_field(
        0,
        "Seed of the principle draws (per prompt) and the sampling (per batch and step).",
        ge=0,
        le=SEED_MAX,
    )
    prompts_per_batch: int = doc_field(
        8,
        "Prompts answered, critiqued and revised together; a killed run redoes at most this batch.",
        ge=1,
    )
    overwrite: bool = doc_field(False, "Start the output afresh instead of resuming it.")


# The settings that decide what the output holds: resuming an output with other values would mix two runs.
CONTENT_SETTINGS = (
    "prompts",
    "prompts_split",
    "prompts_rows",
    "prompts_max_rows",
    "model",
    "constitution",
    "principles",
    "n_rounds",
    "max_new_tokens",
    "temperature",
    "top_p",
    "max_prompt_length",
    "seed",
    "prompts_per_batch",
)


def draw_rounds(constitution: Constitution, n_rounds: int, rng: np.random.Generator) -> list[Principle]:
    """The principle of each round: a random order of all principles, cycled when there are more rounds."""
    order = constitution.sample(len(constitution.principles), rng)
    return [order[r % len(order)] for r in range(n_rounds)]


def step_seed(seed: int, batch_index: int, step: int) -> int:
    """The sampling seed of one generation step (answer, critique 1, revision 1, ...) of one batch: fixed
    by (seed, batch, step), so a resumed run redoes a batch exactly as the interrupted run did."""
    return int(np.random.SeedSequence([seed, batch_index, step]).generate_state(1)[0])


def as_messages(prompt: Prompt) -> list[dict]:
    return [{"role": "user", "content": prompt}] if isinstance(prompt, str) else list(prompt)


# One prompt's sampler call: (conversations, batch index, step) -> one response per conversation.
Sample = Callable[[list[list[dict]], int, int], list[str]]


@dataclass
class Revised:
    """One prompt after its rounds of critique and revision."""

    initial: str  # the model's first answer
    final: str  # the last answer that is not empty: the SFT target ("" when every answer came out empty)
    rounds: list[dict]  # per round: its principle, critique request, critique, revision request, revision


def run(cfg: CAIReviseConfig) -> dict:
    start_one_process("cai-revise", cfg.num_threads)
    started = time.time()
    validate_config(cfg)  # a config built in Python too: every declared range and cross-field rule
    output = appendlog.jsonl_output(cfg.output, "prompt by prompt")
    check_generation_backend(cfg.generation_backend)
    constitution = load_constitution(cfg.constitution).select(cfg.principles)

    # 1. Resume: the prompts an earlier run of the same settings (and constitution text) finished.
    settings = appendlog.content_settings(cfg, CONTENT_SETTINGS, constitution_crc32=constitution.crc32())
    if cfg.overwrite:
        appendlog.remove_output(output)
    done = appendlog.resume(output, settings, renamed_keys(CAIReviseConfig))
    loaded = load_prompts(
        cfg.prompts, cfg.on_bad_row, split=cfg.prompts_split, rows=cfg.prompts_rows, limit=cfg.prompts_max_rows
    )
    examples = loaded.examples
    n_done = sum(ex.ref.row in done for ex in examples)
    print(f"cai-revise: prompts: {loaded.summary()}; {n_done} already done", file=sys.stderr)
    loaded.require_rows("prompts")

    sample = make_sample(cfg)
    writer = appendlog.Writer(output, settings, fresh=not appendlog.progress_path(output).exists())
    bar = tqdm(
        total=len(examples), initial=n_done, desc="cai-revise", unit="prompt", disable=not cfg.progress
    )
    try:
        # The batches are a fixed partition of the prompt list, so batch b has the same prompts and seeds on
        # every run; a batch whose prompts are all finished is not generated again.
        for b, start in enumerate(range(0, len(examples), cfg.prompts_per_batch)):
            batch = examples[start : start + cfg.prompts_per_batch]
            if all(ex.ref.row in done for ex in batch):
                continue
            # 2.-4. Answer, then critique and revise, round by round.
            revised = revise_batch(cfg, constitution, batch, b, sample)
            # 5. Append each prompt's line (none when every answer came out empty) and its ledger entry.
            for ex, one in zip(batch, revised):
                if ex.ref.row not in done:
                    writer.add_prompt(ex.ref.row, *output_line(cfg, ex, one))
                    bar.update(1)
    finally:
        bar.close()
        writer.close()

    # 6. Totals over every finished prompt (this run and earlier ones), and the summary.
    summary = summarize(cfg, output, constitution, loaded, len(done), settings)
    summary["wall_seconds"] = time.time() - started
    appendlog.write_summary(output, summary)
    card = cards.write_dataset_card(output, 'cai-revise', config_to_dict(cfg), summary)
    print(f"wrote {card}", file=sys.stderr)
    return summary


def make_sample(cfg: CAIReviseConfig) -> Sample:
    """The model's sampler (``cfg.generation_backend``), each call seeded by (seed, batch, step)."""
    device = pick_device()
    tokenizer = load_tokenizer(cfg.model, cfg.trust_remote_code)
    sampler = load_sampler(cfg, tokenizer, device)

    def sample(conversations: list[list[dict]], batch_index: int, step: int) -> list[str]:
        ids = [encode_prompt(tokenizer, c, cfg.max_prompt_length) for c in conversations]
        sampling = SamplingConfig(
            cfg.max_new_tokens, cfg.temperature, cfg.top_p, step_seed(cfg.seed, batch_index, step)
        )
        return [g.text for g in sampler(ids, sampling)]

    return sample


def revise_batch(
    cfg: CAIReviseConfig, constitution: Constitution, batch: list[PromptExample], b: int, sample: Sample
) -> list[Revised]:
    """Steps 2-4 on batch ``b`` of the prompts: the model answers each prompt, then in each of n_rounds
    critiques its latest answer under the round's principle (drawn per prompt, seeded by its row) and rewrites
    it in the light of that critique."""
    rounds = [
        draw_rounds(constitution, cfg.n_rounds, np.random.default_rng([cfg.seed, ex.ref.row])) for ex in batch
    ]
    conversations = [as_messages(ex.prompt) for ex in batch]
    # 2. The model answers each prompt.
    initial = sample(conversations, b, 0)
    current = list(initial)
    history: list[list[dict]] = [[] for _ in batch]
    for r in range(cfg.n_rounds):
        # 3. It critiques its latest answer under this round's principle ...
        asked = [
            [
                *conv,
                {"role": "assistant", "content": cur},
                {"role": "user", "content": prs[r].critique_request},
            ]
            for conv, cur, prs in zip(conversations, current, rounds)
        ]
        critiques = sample(asked, b, 1 + 2 * r)
        # 4. ... and rewrites it in the light of that critique.
        asked = [
            [
                *a,
                {"role": "assistant", "content": crit},
                {"role": "user", "content": prs[r].revision_request},
            ]
            for a, crit, prs in zip(asked, critiques, rounds)
        ]
        revisions = sample(asked, b, 2 + 2 * r)
        for k, prs in enumerate(rounds):
            history[k].append(
                {
                    "round": r + 1,
                    "principle": prs[r].id,
                    "critique_request": prs[r].critique_request,
                    "critique": critiques[k],
                    "revision_request": prs[r].revision_request,
                    "revision": revisions[k],
                }
            )
            # An empty revision is no answer: the next round (and the target) keep the last real one.
            if revisions[k].strip():
                current[k] = revisions[k]
    return [Revised(*one) for one in zip(initial, current, history)]


def output_line(cfg: CAIReviseConfig, ex: PromptExample, revised: Revised) -> tuple[list[dict], dict]:
    """Step 5 for one prompt: its output line (none when every answer came out empty), its ledger counts."""
    has_target = bool(revised.final.strip())
    line = {
        "prompt": ex.prompt,
        "completion": revised.final,
        "initial_response": revised.initial,
        "revisions": revised.rounds,
        "model": cfg.model,
        "prompt_row": ex.ref.row,
    }
    counts = {
        "n_rounds": cfg.n_rounds,
        "empty_initial": not revised.initial.strip(),
        "n_empty_revisions": sum(not h["revision"].strip() for h in revised.rounds),
        "n_empty_critiques": sum(not h["critique"].strip() for h in revised.rounds),
        "revised": has_target and revised.final != revised.initial,
        "principles": [h["principle"] for h in revised.rounds],
    }
    return [line] if has_target else [], counts


def summarize(
    cfg: CAIReviseConfig,
    output: Path,
    constitution: Constitution,
    loaded: Loaded,
    n_done_before: int,
    settings: dict,
) -> dict:
    """Step 6: totals over every finished prompt of the output (this run's and earlier runs')."""
    entries = appendlog.ledger_entries(output)
    uses: dict[str, int] = {}
    for e in entries:
        for pid in e["principles"]:
            uses[pid] = uses.get(pid, 0) + 1
    return {
        "stage": "cai-revise",
        "output": str(output),
        "model": cfg.model,
        "constitution": constitution.source,
        "rows_read": loaded.n_rows,
        "skipped_rows": len(loaded.skipped),
        "prompts_done": len(entries),
        "prompts_this_run": len(entries) - n_done_before,
        "examples_written": sum(e["n_lines"] for e in entries),
        "prompts_without_answer": sum(e["n_lines"] == 0 for e in entries),
        "prompts_revised": sum(e["revised"] for e in entries),
        "empty_initial_answers": sum(e["empty_initial"] for e in entries),
        "empty_critiques": sum(e["n_empty_critiques"] for e in entries),
        "empty_revisions": sum(e["n_empty_revisions"] for e in entries),
        "principle_uses": uses,
        "settings": settings,
        "next": f"alignkit sft train_data={output}",
    }


STAGE = Stage("cai-revise", CAIReviseConfig, run)
