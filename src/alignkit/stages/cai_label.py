"""`alignkit cai-label`: RLAIF preference labels (Bai et al. 2022, "Constitutional AI", sec. 4). A judge
model compares the two responses of each input pair under principles drawn from the constitution, reading
its answer from the log-probabilities of "(A)"/"(B)" in both orders; the output is chosen/rejected pairs
with their probabilities, which `alignkit rm` and `alignkit dpo` train on as they are.

Input: prompt + response_a + response_b, or prompt/chosen/rejected (incl. HH-RLHF transcripts) whose
labels are ignored and re-labelled; with human_agreement=true the judge's agreement with those human
labels is reported with a bootstrap interval. The output is appended pair by pair (a killed run resumes).

The judge may be served by any OpenAI-compatible chat-completions endpoint (``judge_base_url``). A pair
whose judging failed there (a named failure: timeout, rate_limited, malformed_json, unparseable, ...) is not
written nor marked done: it is counted in the summary and asked again by the next run of the same command.
"""

from __future__ import annotations

import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Literal

import numpy as np
from tqdm.auto import tqdm

from alignkit.cai.constitution import Constitution, load_constitution
from alignkit.cai.endpoint_judge import endpoint_judge_pairs
from alignkit.cai.judge import Comparison, PairwiseJudge, hard_preference
from alignkit.config import (
    SEED_MAX,
    ConfigError,
    EndpointFields,
    RuntimeConfig,
    check_row_range,
    config_to_dict,
    doc_field,
    renamed_keys,
    required,
    validate_config,
)
from alignkit.data import appendlog
from alignkit.data.io import BadRow, BadRowError, Record, read_rows
from alignkit.data.schemas import Prompt, load_preferences, load_prompts, no_usable_rows
from alignkit.evaluation.metrics import mean_ci
from alignkit.models.embedded import DEFAULT_EMBEDDED
from alignkit.models.endpoint import ChatEndpoint, EndpointSettings
from alignkit.models.loading import load_model, load_tokenizer, pick_device
from alignkit.reporting import cards
from alignkit.stages import Stage
from alignkit.training.distributed import start_one_process


@dataclass
class CAILabelConfig(EndpointFields, RuntimeConfig):
    """Label response pairs with an AI judge under a constitution (RLAIF); write chosen/rejected pairs."""

    ALIASES = {"max_pairs": "input_max_rows"}

    input: str = required(
        "Pairs to label: prompt + response_a + response_b, or prompt/chosen/rejected (labels ignored)."
    )
    output: str = required("Output .jsonl of labelled pairs; an existing one is resumed.")
    input_split: str | None = doc_field(None, "Split name when input is a hub id or a DatasetDict.")
    input_rows: tuple[int, int] | None = doc_field(
        None, "Use only input rows start <= row < stop, written [start, stop] (0-based).", ge=0
    )
    input_max_rows: int | None = doc_field(None, "Use only the first N pairs (after input_rows).", ge=1)
    on_bad_row: Literal["error", "skip"] = doc_field(
        "error",
        "What to do with an invalid input row: stop with an error naming it, or skip it and count it.",
    )
    judge_model: str = doc_field(
        "smollm2-135m-instruct",
        "The judge: the embedded default, a Hugging Face id or a local directory; or the served model's name "
        "when judge_base_url is set.",
    )
    judge_base_url: str | None = doc_field(
        None,
        "Base URL of an OpenAI-compatible chat-completions server for the judge (e.g. http://host:8000/v1); "
        "None: the judge runs locally. judge_model must then name the served model.",
    )
    constitution: str | None = doc_field(
        None, "Constitution YAML (principles with comparison and priority); None: alignkit's default."
    )
    principles: list[str] | None = doc_field(
        None, "Use only these principle ids of the constitution; None: all of them."
    )
    principles_per_comparison: int = doc_field(
        2,
        "Principles drawn (seeded, per pair) and combined by the conflict rule for each comparison.",
        ge=1,
    )
    seed: int = doc_field(0, "Seed of the per-pair principle draws.", ge=0, le=SEED_MAX)
    human_agreement: bool = doc_field(
        False,
        "Report the judge's agreement with the input's human labels (chosen/rejected) with a 95% bootstrap "
        "interval; needs chosen/rejected input.",
    )
    max_context_tokens: int | None = doc_field(
        384,
        "Longest conversation shown to the judge, in tokens (its end is kept; an endpoint judge counts 4 "
        "characters a token); None: no limit.",
        ge=1,
    )
    max_response_tokens: int | None = doc_field(
        192,
        "Longest response shown to the judge, in tokens (its start is kept; an endpoint judge counts 4 "
        "characters a token); None: no limit.",
        ge=1,
    )
    batch_size: int = doc_field(8, "Judge questions per forward pass (each pair asks 2 x principles).", ge=1)
    pairs_per_chunk: int = doc_field(
        16, "Pairs judged together before they are appended; a killed run redoes at most this many.", ge=1
    )
    overwrite: bool = doc_field(False, "Start the output afresh instead of resuming it.")

    def check(self) -> None:
        """The rules across fields (each field's own range is declared on it and checked before this)."""
        super().check()
        check_row_range(self, "input_rows")
        if self.judge_base_url is not None and self.judge_model == DEFAULT_EMBEDDED:
            # Left at the local default, the request would name a model the server does not serve, and every
            # question would fail as http_error: say so once, before anything is asked.
            raise ConfigError(
                f"judge_base_url needs judge_model: the model's name on that server (judge_model is the local "
                f"default {DEFAULT_EMBEDDED!r})"
            )


# The settings that decide what the output holds: resuming an output with other values would mix two runs.
CONTENT_SETTINGS = (
    "input",
    "input_split",
    "input_rows",
    "input_max_rows",
    "judge_model",
    "judge_base_url",
    "constitution",
    "principles",
    "principles_per_comparison",
    "seed",
    "human_agreement",
    "max_context_tokens",
    "max_response_tokens",
)


@dataclass(frozen=True)
class InputPair:
    row: int  # the input file row (0-based); written as prompt_row
    prompt: Prompt
    response_1: str  # response_a, or the human-chosen response
    response_2: str  # response_b, or the human-rejected response
    human_labelled: bool  # True: the input said response_1 is better (chosen/rejected columns)


def read_input(cfg: CAILabelConfig) -> tuple[list[InputPair], list[BadRow], int]:
    """(the pairs to label, the rows skipped, rows read) of cfg.input."""
    first = next((r for r in read_rows(cfg.input, cfg.input_split) if isinstance(r, Record)), None)
    if first is None:  # raises: the first unreadable row (on_bad_row=error), else "no usable rows"
        load_prompts(cfg.input, cfg.on_bad_row, split=cfg.input_split).require_rows("input")
    if {"chosen", "rejected"} <= set(first.data):
        loaded = load_preferences(
            cfg.input, cfg.on_bad_row, split=cfg.input_split, rows=cfg.input_rows, limit=cfg.input_max_rows
        )
        loaded.require_rows("input")
        pairs = [InputPair(p.ref.row, p.prompt, p.chosen, p.rejected, True) for p in loaded.examples]
        return pairs, loaded.skipped, loaded.n_rows
    if not {"response_a", "response_b"} <= set(first.data):
        raise ConfigError(
            f"input: {cfg.input} needs prompt + response_a + response_b, or chosen + rejected columns; "
            f"its first row has {sorted(first.data)}"
        )
    if cfg.human_agreement:
        raise ConfigError(
            "human_agreement=true needs human labels: an input with chosen/rejected columns, but "
            f"{cfg.input} has response_a/response_b"
        )
    # The prompt is parsed as generation prompts are (text or messages, optional system column); the
    # two responses are read from their columns.
    loaded = load_prompts(
        cfg.input, cfg.on_bad_row, split=cfg.input_split, rows=cfg.input_rows, limit=cfg.input_max_rows
    )
    wanted = {ex.ref.row for ex in loaded.examples}
    data = {
        r.row: r.data
        for r in read_rows(cfg.input, cfg.input_split)
        if isinstance(r, Record) and r.row in wanted
    }
    pairs, skipped = [], list(loaded.skipped)
    for ex in loaded.examples:
        try:
            a, b = (
                _response(data[ex.ref.row], col, cfg.input, ex.ref.row)
                for col in ("response_a", "response_b")
            )
            if a == b:
                raise BadRowError(cfg.input, ex.ref.row, "response_b", "identical to 'response_a'")
        except BadRowError as err:
            if cfg.on_bad_row == "error":
                raise
            skipped.append(err.bad_row)
            continue
        pairs.append(InputPair(ex.ref.row, ex.prompt, a, b, False))
    if not pairs:
        raise no_usable_rows("input", cfg.input, loaded.n_rows, skipped)
    return pairs, skipped, loaded.n_rows


def _response(data: dict, column: str, source: str, row: int) -> str:
    value = data.get(column)
    if not isinstance(value, str) or not value.strip():
        raise BadRowError(source, row, column, f"expected a non-empty string, got {value!r}")
    return value


def label_row(pair: InputPair, comparison: Comparison, cfg: CAILabelConfig) -> tuple[list[dict], dict]:
    """The output line(s) of one judged pair (none on a tie) and its ledger counts."""
    p = comparison.p  # P(response_1 is better)
    pref = hard_preference(p)
    # Per judge question: P(the response shown first is picked), and whether both orders agree.
    first_option = [(r.p_a_order1 + 1.0 - r.p_a_order2) / 2 for r in comparison.results]
    orders_agree = [
        hard_preference(r.p_a_order1) == hard_preference(r.p_a_order2) for r in comparison.results
    ]
    counts = {
        "n_pairs": int(pref != 0),
        "tie": pref == 0,
        "conflict": comparison.conflict,
        "guided": bool(comparison.guided),  # a constitution guideline was shown to the judge
        "n_questions": 2 * len(comparison.results),
        "p_first_option_sum": float(sum(first_option)),
        "orders_agree_sum": int(sum(orders_agree)),
        "option_mass_sum": float(sum(r.option_mass for r in comparison.results)),
    }
    if cfg.human_agreement:
        # 1 when the judge prefers the human-chosen response, 0 when the other, 1/2 on a tie.
        counts["human_agreement"] = {1: 1.0, 0: 0.5, -1: 0.0}[pref]
    if pref == 0:
        return [], counts
    first_wins = pref == 1
    line = {
        "prompt": pair.prompt,
        "chosen": pair.response_1 if first_wins else pair.response_2,
        "rejected": pair.response_2 if first_wins else pair.response_1,
        "p_chosen": p if first_wins else 1.0 - p,
        "principles": comparison.per_principle(flip=not first_wins),
        "conflict": comparison.conflict,
        "decided_by": list(comparison.deciding),
        "chosen_input_column": ("chosen" if first_wins else "rejected")
        if pair.human_labelled
        else ("response_a" if first_wins else "response_b"),
        "judge": cfg.judge_model,
        "prompt_row": pair.row,
    }
    if cfg.human_agreement:
        line["human_agrees"] = first_wins
    return [line], counts


def run(cfg: CAILabelConfig) -> dict:
    start_one_process("cai-label", cfg.num_threads)
    started = time.time()
    validate_config(cfg)  # a config built in Python too: every declared range and cross-field rule
    output = appendlog.jsonl_output(cfg.output, "pair by pair")
    constitution = load_constitution(cfg.constitution).select(cfg.principles)

    # 1. Resume: the pairs an earlier run of the same settings (and the same constitution text) finished.
    settings = appendlog.content_settings(cfg, CONTENT_SETTINGS, constitution_crc32=constitution.crc32())
    if cfg.overwrite:
        appendlog.remove_output(output)
    done = appendlog.resume(output, settings, renamed_keys(CAILabelConfig))
    pairs, skipped, n_read = read_input(cfg)
    todo = [p for p in pairs if p.row not in done]
    print(
        f"cai-label: {n_read} rows read, {len(skipped)} skipped, {len(pairs) - len(todo)} already labelled "
        f"in {output}, {len(todo)} to label",
        file=sys.stderr,
    )

    # 2. The judge.
    judge = make_judge(cfg, constitution)

    # 3. Judge a chunk of pairs (each under its own seeded principles, both orders), 4. append each pair's
    # line and ledger entry.
    writer = appendlog.Writer(output, settings, fresh=not appendlog.progress_path(output).exists())
    failed: dict[str, int] = {}  # endpoint judge: failed questions (one order each) by failure name
    failed_pairs = 0
    bar = tqdm(total=len(todo), desc="cai-label", unit="pair", disable=not cfg.progress)
    try:
        for start in range(0, len(todo), cfg.pairs_per_chunk):
            chunk = todo[start : start + cfg.pairs_per_chunk]
            drawn = [judge.draw(np.random.default_rng([cfg.seed, p.row])) for p in chunk]
            comparisons = judge.compare([(p.prompt, p.response_1, p.response_2) for p in chunk], drawn)
            for pair, comparison in zip(chunk, comparisons):
                failures = [f for r in comparison.results for f in r.failures]
                if failures:  # not marked done: the next run asks again (no pair is paid for twice)
                    failed_pairs += 1
                    for f in failures:
                        failed[f] = failed.get(f, 0) + 1
                    continue
                lines, counts = label_row(pair, comparison, cfg)
                writer.add_prompt(pair.row, lines, counts)
            bar.update(len(chunk))
    finally:
        bar.close()
        writer.close()

    # 5. Totals over every labelled pair (this run and earlier ones), and the summary.
    summary = summarize(cfg, output, constitution, n_read, len(skipped), len(done), settings)
    # Pairs whose judging failed at the endpoint: neither written nor done, so a rerun asks them again.
    summary["pairs_failed_this_run"] = failed_pairs
    summary["judge_failures_this_run"] = dict(sorted(failed.items()))
    summary["wall_seconds"] = time.time() - started
    appendlog.write_summary(output, summary)
    card = cards.write_dataset_card(output, 'cai-label', config_to_dict(cfg), summary)
    print(f"wrote {card}", file=sys.stderr)
    return summary


def make_judge(cfg: CAILabelConfig, constitution: Constitution) -> PairwiseJudge:
    """The judge model, asking under ``constitution``'s principles: local, or over an endpoint."""
    if cfg.judge_base_url is not None:
        endpoint = ChatEndpoint(EndpointSettings.of(cfg, cfg.judge_base_url, cfg.judge_model))
        return PairwiseJudge(
            None,
            None,
            constitution,
            cfg.principles_per_comparison,
            ask=lambda questions: endpoint_judge_pairs(
                endpoint, questions, cfg.max_context_tokens, cfg.max_response_tokens
            ),
        )
    device = pick_device()
    tokenizer = load_tokenizer(cfg.judge_model, cfg.trust_remote_code)
    model = load_model(cfg.judge_model, cfg.dtype, cfg.trust_remote_code, device=device, use="score")
    return PairwiseJudge(
        model,
        tokenizer,
        constitution,
        cfg.principles_per_comparison,
        cfg.batch_size,
        cfg.max_context_tokens,
        cfg.max_response_tokens,
    )


def summarize(
    cfg: CAILabelConfig,
    output: Path,
    constitution: Constitution,
    n_read: int,
    n_skipped: int,
    n_done_before: int,
    settings: dict,
) -> dict:
    """Step 5: totals over every labelled pair of the output (this run's and earlier runs')."""
    entries = appendlog.ledger_entries(output)
    n_questions = sum(e["n_questions"] for e in entries)
    n_conflicts = sum(e["conflict"] for e in entries)

    def per_question(key: str) -> float | None:  # a ledger sum over the judge's questions, one per order
        return sum(e[key] for e in entries) / (n_questions / 2) if n_questions else None

    summary = {
        "stage": "cai-label",
        "output": str(output),
        "judge": cfg.judge_model,
        "judge_base_url": cfg.judge_base_url,  # None: a local judge (the API key is never written)
        "constitution": constitution.source,
        "principles": constitution.ids(),
        "principles_per_comparison": cfg.principles_per_comparison,
        "conflict_rule": constitution.conflict_rule or "see alignkit.cai.judge.combine_principles",
        "rows_read": n_read,
        "skipped_rows": n_skipped,
        "pairs_judged": len(entries),
        "pairs_this_run": len(entries) - n_done_before,
        "pairs_written": sum(e["n_pairs"] for e in entries),
        "ties": sum(e["tie"] for e in entries),
        "conflicts": n_conflicts,
        "conflict_rate": n_conflicts / len(entries) if entries else None,
        # Comparisons whose judge questions carried a guideline of the constitution (a judge's verdict cannot
        # be traced to the guideline; the program checks count the conflicts theirs resolved: build-prefs).
        "guided_comparisons": sum(e.get("guided", False) for e in entries),
        "guided_conflicts": sum(e.get("guided", False) and e["conflict"] for e in entries),
        # Position bias before averaging: 0.5 when the judge has no preference for the first slot.
        "mean_p_first_option": per_question("p_first_option_sum"),
        "orders_agree_rate": per_question("orders_agree_sum"),
        # Probability the judge puts on "A" or "B" at all; low values mean the question is not understood.
        "mean_option_mass": per_question("option_mass_sum"),
        "settings": settings,
    }
    if cfg.human_agreement and entries:
        agreement = mean_ci([e["human_agreement"] for e in entries], seed=cfg.seed)
        summary["human_agreement"] = agreement.value
        summary["human_agreement_ci95"] = [agreement.low, agreement.high]
        summary["human_agreement_n"] = agreement.n
    return summary


STAGE = Stage("cai-label", CAILabelConfig, run)
