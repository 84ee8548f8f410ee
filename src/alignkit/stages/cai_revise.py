"""`alignkit cai-revise`: the supervised phase of Constitutional AI (Bai et al. 2022, sec. 3). The model
answers each prompt, then for principles drawn from the constitution (seeded, one per round) critiques its
own latest answer and rewrites it; the final revision becomes the SFT target. The critic may be another model:
a local one, or any OpenAI-compatible chat-completions endpoint (``critic_base_url``).

Every revision passes quality gates (``alignkit.cai.gates``: echoed request, unchanged, empty, truncated,
looping, off the question; optionally an independent scorer that must rate it above the initial answer). A
gated revision is never the target: the prompt keeps its initial answer or is dropped (``on_gated``), and the
summary counts each gate with examples.

Output: one line per prompt with `prompt` + `completion` (the final revision), which `alignkit sft` trains
on as it is, plus the initial answer and every critique and revision for inspection. The run appends one
prompt at a time with a progress ledger, so a killed run resumes without losing or repeating a prompt.
"""

from __future__ import annotations

import sys
import time
from collections.abc import Callable
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Literal

import numpy as np
from tqdm.auto import tqdm

from alignkit.cai.constitution import Constitution, Principle, load_constitution
from alignkit.cai.gates import GATES, GateSettings, gate_answer, gate_revision
from alignkit.config import (
    SEED_MAX,
    ConfigError,
    EndpointFields,
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
from alignkit.models.endpoint import ChatEndpoint, EndpointSettings
from alignkit.models.generation import SamplingConfig, check_generation_backend, load_sampler
from alignkit.models.loading import load_tokenizer, pick_device
from alignkit.reporting import cards
from alignkit.scoring import Scorer, check_scorer, load_scorer, prompt_text
from alignkit.stages import Stage
from alignkit.training.distributed import start_one_process


@dataclass
class CAIReviseConfig(EndpointFields, PromptRowsFields, GenerationBackendConfig, RuntimeConfig):
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
    critic_model: str | None = doc_field(
        None,
        "Model that critiques and revises (the policy `model` still answers first): a Hugging Face id or "
        "local directory, or the served model's name when critic_base_url is set; None: `model` itself.",
    )
    critic_base_url: str | None = doc_field(
        None,
        "Base URL of an OpenAI-compatible chat-completions server for the critic (e.g. http://host:8000/v1); "
        "None: the critic runs locally.",
    )
    gates: list[str] | None = doc_field(
        None, f"Quality gates applied to each revision, of {list(GATES)}; None: all of them; []: none."
    )
    on_gated: Literal["keep_initial", "drop"] = doc_field(
        "keep_initial",
        "A prompt whose revisions all fail a gate: keep its initial answer as the target (if that answer is "
        "itself not empty, truncated or looping), or drop the prompt.",
    )
    echo_max_overlap: float = doc_field(
        0.5, "Gate 'echo': a revision with more than this share of its word 3-grams in the request.", ge=0, le=1
    )
    off_topic_min_overlap: float = doc_field(
        0.15,
        "Gate 'off_topic': a revision with fewer than this share of its content words in the prompt or "
        "initial answer.",
        ge=0,
        le=1,
    )
    keep_if_better: str | None = doc_field(
        None,
        "An independent scorer (module:function or a reward-model directory): keep the final revision only "
        "when it scores above the initial answer (else gate 'not_better'); None: no such check.",
    )

    def check(self) -> None:
        """The rules across fields (each field's own range is declared on it and checked before this)."""
        super().check()
        unknown = sorted(set(self.gates or ()) - set(GATES))
        if unknown:
            raise ConfigError(f"gates: {unknown} are not gates; choose from {list(GATES)}")
        if self.critic_base_url is not None and self.critic_model is None:
            raise ConfigError("critic_base_url needs critic_model: the model's name on that server")


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
    "critic_model",
    "critic_base_url",
    "gates",
    "on_gated",
    "echo_max_overlap",
    "off_topic_min_overlap",
    "keep_if_better",
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


@dataclass(frozen=True)
class Reply:
    """One generated response."""

    text: str
    finished: bool  # ended by the model (end of sequence), not by the token cap
    failure: str | None = None  # an endpoint failure's name (then text is "")


# One sampler call: (conversations, batch index, step) -> one reply per conversation.
Sample = Callable[[list[list[dict]], int, int], list[Reply]]


@dataclass
class Revised:
    """One prompt after its rounds of critique and revision."""

    initial: str  # the model's first answer
    initial_finished: bool
    final: str  # the last revision that passed every gate ("" when none did)
    rounds: list[dict]  # per round: principle, critique request, critique, revision request, revision, gates


def run(cfg: CAIReviseConfig) -> dict:
    start_one_process("cai-revise", cfg.num_threads)
    started = time.time()
    validate_config(cfg)  # a config built in Python too: every declared range and cross-field rule
    output = appendlog.jsonl_output(cfg.output, "prompt by prompt")
    check_generation_backend(cfg.generation_backend)
    constitution = load_constitution(cfg.constitution).select(cfg.principles)

    # 1. Resume: the prompts an earlier run of the same settings (and constitution text) finished.
    settings = appendlog.content_settings(cfg, CONTENT_SETTINGS, constitution_crc32=constitution.crc32())
    if cfg.keep_if_better is not None:
        check_scorer(cfg.keep_if_better, "keep_if_better")  # before any output is touched
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
    critic = make_critic(cfg, sample)
    scorer = (
        None
        if cfg.keep_if_better is None
        else load_scorer(
            cfg.keep_if_better,
            "keep_if_better",
            dtype=cfg.dtype,
            device=pick_device(),
            trust_remote_code=cfg.trust_remote_code,
            batch_size=cfg.prompts_per_batch,
        )
    )
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
            revised = revise_batch(cfg, constitution, batch, b, sample, critic, scorer)
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
    """``cfg.model``'s sampler (``cfg.generation_backend``), each call seeded by (seed, batch, step)."""
    device = pick_device()
    tokenizer = load_tokenizer(cfg.model, cfg.trust_remote_code)
    sampler = load_sampler(cfg, tokenizer, device)

    def sample(conversations: list[list[dict]], batch_index: int, step: int) -> list[Reply]:
        ids = [encode_prompt(tokenizer, c, cfg.max_prompt_length) for c in conversations]
        sampling = SamplingConfig(
            cfg.max_new_tokens, cfg.temperature, cfg.top_p, step_seed(cfg.seed, batch_index, step)
        )
        return [Reply(g.text, g.finished) for g in sampler(ids, sampling)]

    return sample


def make_critic(cfg: CAIReviseConfig, sample: Sample) -> Sample:
    """The critic's sampler: the policy's own (no critic_model), a local critic_model, or an endpoint."""
    if cfg.critic_model is None:
        return sample
    if cfg.critic_base_url is None:
        return make_sample(replace(cfg, model=cfg.critic_model))
    endpoint = ChatEndpoint(EndpointSettings.of(cfg, cfg.critic_base_url, cfg.critic_model))

    def critic(conversations: list[list[dict]], batch_index: int, step: int) -> list[Reply]:
        replies = endpoint.chat_many(
            conversations,
            max_tokens=cfg.max_new_tokens,
            temperature=cfg.temperature,
            top_p=cfg.top_p,
            seed=step_seed(cfg.seed, batch_index, step),
        )
        return [Reply(r.text, r.finished, r.failure) for r in replies]

    return critic


def revise_batch(
    cfg: CAIReviseConfig,
    constitution: Constitution,
    batch: list[PromptExample],
    b: int,
    sample: Sample,
    critic: Sample,
    scorer: Scorer | None = None,
) -> list[Revised]:
    """Steps 2-4 on batch ``b`` of the prompts: the model answers each prompt, then in each of n_rounds the
    critic critiques the latest answer under the round's principle (drawn per prompt, seeded by its row) and
    rewrites it in the light of that critique; a revision that fails a gate is not taken up."""
    rounds = [
        draw_rounds(constitution, cfg.n_rounds, np.random.default_rng([cfg.seed, ex.ref.row])) for ex in batch
    ]
    gate_settings = GateSettings(
        echo_max_overlap=cfg.echo_max_overlap,
        off_topic_min_overlap=cfg.off_topic_min_overlap,
        enabled=GATES if cfg.gates is None else tuple(cfg.gates),
    )
    conversations = [as_messages(ex.prompt) for ex in batch]
    # 2. The model answers each prompt.
    initial = sample(conversations, b, 0)
    current = [a.text for a in initial]
    final = ["" for _ in batch]  # the last revision that passed every gate
    history: list[list[dict]] = [[] for _ in batch]
    for r in range(cfg.n_rounds):
        # 3. The critic critiques the latest answer under this round's principle ...
        asked = [
            [
                *conv,
                {"role": "assistant", "content": cur},
                {"role": "user", "content": prs[r].critique_request},
            ]
            for conv, cur, prs in zip(conversations, current, rounds)
        ]
        critiques = critic(asked, b, 1 + 2 * r)
        # 4. ... and rewrites it in the light of that critique ...
        asked = [
            [
                *a,
                {"role": "assistant", "content": crit.text},
                {"role": "user", "content": prs[r].revision_request},
            ]
            for a, crit, prs in zip(asked, critiques, rounds)
        ]
        revisions = critic(asked, b, 2 + 2 * r)
        for k, prs in enumerate(rounds):
            crit, rev = critiques[k], revisions[k]
            # 5. ... which must pass the gates; a failed request (endpoint) is a gate of its own.
            failures = [f for f in (crit.failure, rev.failure) if f]
            gates = [f"endpoint_{failures[0]}"] if failures else []
            gates += gate_revision(
                prompt_text(batch[k].prompt),
                initial[k].text,
                rev.text,
                rev.finished,
                [prs[r].critique_request, crit.text, prs[r].revision_request],
                gate_settings,
            )
            history[k].append(
                {
                    "round": r + 1,
                    "principle": prs[r].id,
                    "critique_request": prs[r].critique_request,
                    "critique": crit.text,
                    "revision_request": prs[r].revision_request,
                    "revision": rev.text,
                    "gates": gates,
                }
            )
            # A gated revision is not taken up: the next round (and the target) keep the last one that passed.
            if not gates:
                current[k] = final[k] = rev.text
    if scorer is not None:
        # 6. The independent scorer must rate the final revision above the initial answer.
        kept = [k for k in range(len(batch)) if final[k]]
        if kept:
            prompts = [batch[k].prompt for k in kept]
            before = scorer.score(prompts, [initial[k].text for k in kept])
            after = scorer.score(prompts, [final[k] for k in kept])
            for k, s0, s1 in zip(kept, before, after):
                if not s1 > s0:
                    history[k][-1]["gates"].append("not_better")
                    final[k] = ""
    return [Revised(a.text, a.finished, f, h) for a, f, h in zip(initial, final, history)]


EXAMPLE_CHARS = 200  # how much of a gated revision the ledger keeps as an example


def output_line(cfg: CAIReviseConfig, ex: PromptExample, revised: Revised) -> tuple[list[dict], dict]:
    """Step 7 for one prompt: its output line (none when no target passed), its ledger counts.

    The target is the last revision that passed every gate; when none did, the initial answer (on_gated=
    keep_initial, and only if it is not itself empty, truncated or looping) or nothing (on_gated=drop)."""
    initial_gates = gate_answer(
        revised.initial, revised.initial_finished, GATES if cfg.gates is None else cfg.gates
    )
    if revised.final:
        target, source = revised.final, "revision"
    elif cfg.on_gated == "keep_initial" and not initial_gates:
        target, source = revised.initial, "initial"
    else:
        target, source = "", "none"
    line = {
        "prompt": ex.prompt,
        "completion": target,
        "target": source,  # "revision", or "initial" when every revision was gated
        "initial_response": revised.initial,
        "revisions": revised.rounds,
        "model": cfg.model,
        "critic_model": cfg.critic_model or cfg.model,
        "prompt_row": ex.ref.row,
    }
    counts = {
        "n_rounds": cfg.n_rounds,
        "empty_initial": not revised.initial.strip(),
        "n_empty_revisions": sum(not h["revision"].strip() for h in revised.rounds),
        "n_empty_critiques": sum(not h["critique"].strip() for h in revised.rounds),
        "revised": source == "revision" and revised.final != revised.initial,
        "target": source,
        "initial_gates": initial_gates,
        "gated": [
            {"round": h["round"], "gates": h["gates"], "revision": h["revision"][:EXAMPLE_CHARS]}
            for h in revised.rounds
            if h["gates"]
        ],
        "principles": [h["principle"] for h in revised.rounds],
    }
    return ([line] if target else []), counts


def gate_counts(entries: list[dict], n_examples: int = 3) -> dict[str, dict]:
    """Per gate: how many revisions failed it, and up to ``n_examples`` of them (prompt row, round, text)."""
    out: dict[str, dict] = {}
    for e in entries:
        for g in e.get("gated", []):
            for name in g["gates"]:
                one = out.setdefault(name, {"count": 0, "examples": []})
                one["count"] += 1
                if len(one["examples"]) < n_examples:
                    one["examples"].append(
                        {"prompt_row": e["prompt_row"], "round": g["round"], "revision": g["revision"]}
                    )
    return dict(sorted(out.items()))


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
        # The quality gates: revisions that failed each (a revision may fail several), with examples, and
        # what became of their prompts.
        "revisions_gated": sum(len(e.get("gated", [])) for e in entries),
        "gates": gate_counts(entries),
        # Initial answers that could not stand in for a gated revision (so on_gated=keep_initial dropped them).
        "initial_answers_gated": {
            name: sum(name in e.get("initial_gates", []) and e.get("target") == "none" for e in entries)
            for name in ("empty", "truncated", "loops")
        },
        "targets": {
            src: sum(e.get("target") == src for e in entries) for src in ("revision", "initial", "none")
        },
        "on_gated": cfg.on_gated,
        "empty_initial_answers": sum(e["empty_initial"] for e in entries),
        "empty_critiques": sum(e["n_empty_critiques"] for e in entries),
        "empty_revisions": sum(e["n_empty_revisions"] for e in entries),
        "principle_uses": uses,
        "settings": settings,
        "next": f"alignkit sft train_data={output}",
    }


STAGE = Stage("cai-revise", CAIReviseConfig, run)
