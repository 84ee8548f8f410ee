"""`alignkit score`: score a file of (prompt, response) rows, or of preference pairs, with a reward (a reward
model or a ``module:function``) and write every row back with its reward in new columns.

The output is JSONL written append-only, one batch at a time, flushed to disk: a run killed half-way
resumes by reading back which input rows are already in the output (each output row records its
``input_row``) and scoring only the rest, so no row is scored twice and none is lost.
"""

from __future__ import annotations

import json
import os
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import ClassVar, Literal

import numpy as np
from tqdm.auto import tqdm

from alignkit.config import (
    ConfigError,
    RuntimeConfig,
    check_below,
    check_reward_list,
    check_row_range,
    doc_field,
    required,
)
from alignkit.data.appendlog import jsonl_output
from alignkit.data.io import BadRow, BadRowError, Record, RowRef, read_rows
from alignkit.data.schemas import PromptExample, load_preferences, load_prompts, no_usable_rows
from alignkit.data.tokenize import encode_pair
from alignkit.evaluation.reward_eval import pair_diagnostics
from alignkit.models.loading import pick_device
from alignkit.scoring import RewardModelScorer, Scorer, check_columns, is_function_spec, reward_scorer
from alignkit.stages import Stage
from alignkit.training.distributed import start_one_process

INPUT_ROW = "input_row"


@dataclass
class ScoreConfig(RuntimeConfig):
    """Score rows with a reward. Input: prompt + response rows, or pairs (prompt/chosen/rejected)."""

    # Old spellings, read for one release (alignkit.config.load_config renames them, with a message).
    ALIASES: ClassVar[dict[str, str]] = {
        "split": "input_split",
        "rows": "input_rows",
        "max_rows": "input_max_rows",
        "reward_model": "reward",
    }

    reward: str | list[str] = required(
        "Reward model directory (the final/ folder of an `alignkit rm` run), 'module:function' with "
        "function(prompt: str, response: str, [input columns]) -> float (e.g. "
        "alignkit.scoring.classifiers:sentiment), or a list [a, b] of these summed with reward_weights."
    )
    reward_weights: list[float] | None = doc_field(
        None, "One weight per reward of a list reward=[...] (the score is their weighted sum); None: all 1."
    )
    input: str = required("Rows to score: .jsonl/.json/.parquet/.csv, a saved dataset dir or a hub id.")
    output: str = required(
        "Output .jsonl: every input row with its reward column(s) and input_row; an existing file is resumed."
    )
    input_split: str | None = doc_field(None, "Split name when input is a hub id or a DatasetDict.")
    input_rows: tuple[int, int] | None = doc_field(
        None, "Score only input rows start <= row < stop, written [start, stop] (0-based).", ge=0
    )
    input_max_rows: int | None = doc_field(None, "Score only the first N rows (after input_rows).", ge=1)
    response_column: str = doc_field(
        "response",
        "Column of the response in (prompt, response) rows; 'completion' is read when this one is absent.",
    )
    score_column: str = doc_field(
        "reward",
        "Name of the new column: single rows get <score_column>, pairs chosen_<score_column> and "
        "rejected_<score_column>.",
    )
    batch_size: int = doc_field(
        16, "Rows per batch (a pair counts as one row of two sequences); written per batch.", ge=1
    )
    # At least one prompt token and one response token (data.tokenize._truncate needs both).
    max_length: int | None = doc_field(
        None,
        "Longest prompt+response in tokens; None uses the max_length the reward model was trained with.",
        ge=2,
    )
    max_prompt_length: int | None = doc_field(
        None,
        "Longest prompt in tokens (its end is kept), below max_length; None uses the reward model's setting.",
        ge=1,
    )
    on_bad_row: Literal["error", "skip"] = doc_field(
        "error", "What to do with an invalid row: stop with an error naming it, or skip it and count it."
    )
    overwrite: bool = doc_field(False, "Start the output afresh instead of resuming it.")
    base_model: str | None = doc_field(
        None,
        "Pairs only: a causal LM whose mean log-prob of each reply is added to the diagnostics as a baseline "
        "(one forward pass per reply); None leaves that baseline out.",
    )

    def check(self) -> None:
        """The rules across fields (each field's own range is declared on it and checked before this)."""
        super().check()
        check_row_range(self, "input_rows")
        check_below(self, "max_prompt_length", "max_length")  # where both are given
        check_reward_list(self)
        lengths = [name for name in ("max_length", "max_prompt_length") if getattr(self, name) is not None]
        if lengths and isinstance(self.reward, list):
            raise ConfigError(
                f"config key '{lengths[0]}' applies to one reward model; reward is a list {self.reward}",
                (lengths[0], "reward"),
            )
        if lengths and is_function_spec(self.reward):
            raise ConfigError(
                f"config key '{lengths[0]}' applies to a reward model; reward={self.reward} is a function",
                (lengths[0],),
            )


@dataclass
class Row:
    """One input row to score: its raw columns, and the parsed prompt with one response or a pair."""

    record: Record
    prompt: object
    responses: tuple[str, ...]  # (response,) or (chosen, rejected)
    columns: dict  # the row's other columns, for reward functions that take them by name (e.g. 'answer')


def score_batch(scorer: Scorer, batch: list[Row]) -> list[list[float]]:
    """One list of scores per output column: [response] for rows, [chosen, rejected] for pairs. A reward model
    scores a batch in one forward pass (both sides of the pairs together)."""
    prompts, columns = [row.prompt for row in batch], [row.columns for row in batch]
    sides = [[row.responses[k] for row in batch] for k in range(len(batch[0].responses))]
    if not isinstance(scorer, RewardModelScorer):
        return [scorer.score(prompts, side, columns) for side in sides]
    reward_model = scorer.reward_model
    if len(sides) == 1:
        return [reward_model.score(prompts, sides[0], len(batch))]
    return list(reward_model.score_pairs(prompts, sides[0], sides[1], 2 * len(batch)))


def read_input(cfg: ScoreConfig) -> tuple[str, list[Row], list[BadRow], int]:
    """(kind "rows" or "pairs", the rows to score, the rows skipped, rows read) of cfg.input."""
    records: dict[int, Record] = {}
    skipped: list[BadRow] = []
    first = None
    for item in read_rows(cfg.input, cfg.input_split):
        if isinstance(item, Record):
            records[item.row] = item
            first = first or item
    if first is None:  # raises: the first unreadable row (on_bad_row=error), else "no usable rows"
        load_prompts(cfg.input, cfg.on_bad_row, split=cfg.input_split).require_rows("input")
    kind = "pairs" if {"chosen", "rejected"} <= set(first.data) else "rows"
    if kind == "pairs":
        loaded = load_preferences(
            cfg.input, cfg.on_bad_row, split=cfg.input_split, rows=cfg.input_rows, limit=cfg.input_max_rows
        )
        loaded.require_rows("input")
        rows = [
            Row(records[p.ref.row], p.prompt, (p.chosen, p.rejected), _other_columns(records[p.ref.row]))
            for p in loaded.examples
        ]
        return kind, rows, loaded.skipped, loaded.n_rows

    # (prompt, response) rows: the prompt parsed as generation prompts are (text or messages, optional
    # system column), the response read from its column.
    loaded = load_prompts(cfg.input, cfg.on_bad_row, split=cfg.input_split, rows=cfg.input_rows, limit=cfg.input_max_rows)
    skipped = list(loaded.skipped)
    rows = []
    for example in loaded.examples:
        record = records[example.ref.row]
        column = cfg.response_column if cfg.response_column in record.data else "completion"
        response = record.data.get(column)
        if not isinstance(response, str):
            err = BadRowError(
                cfg.input,
                record.row,
                cfg.response_column,
                f"expected the response as a string, got {response!r}",
            )
            if cfg.on_bad_row == "error":
                raise err
            skipped.append(err.bad_row)
            continue
        rows.append(Row(record, example.prompt, (response,), example.columns))
    if not rows:
        raise no_usable_rows("input", cfg.input, loaded.n_rows, skipped)
    return kind, rows, skipped, loaded.n_rows


def _other_columns(record: Record) -> dict:
    """A pair row's columns other than its prompt and replies."""
    return {k: v for k, v in record.data.items() if k not in ("prompt", "messages", "chosen", "rejected")}


def check_input_columns(cfg: ScoreConfig, rows: list[Row]) -> None:
    """Refuses, before the reward loads, input rows lacking a column a reward function takes (``check_columns``
    on the rows as prompt examples)."""
    examples = [PromptExample(row.prompt, RowRef(cfg.input, row.record.row), row.columns) for row in rows]
    check_columns(cfg.reward, examples, "reward", "input")


def resume_output(path: Path, rows: list[Row], added: set[str]) -> set[int]:
    """Input rows already scored in ``path``; a torn last line (a kill mid-write) is cut off first.

    Each kept output row must match the input row it names, so an output written from another input
    is refused rather than silently mixed.
    """
    data = path.read_bytes()
    complete = data[: data.rfind(b"\n") + 1]
    if len(complete) != len(data):
        with open(path, "r+b") as f:
            f.truncate(len(complete))
    by_row = {row.record.row: row for row in rows}
    done: set[int] = set()
    for n, line in enumerate(complete.decode("utf-8").splitlines()):
        scored = json.loads(line)
        row = by_row.get(scored.get(INPUT_ROW))
        original = {k: v for k, v in scored.items() if k not in added}
        if row is None or original != _jsonable(row.record.data) or scored[INPUT_ROW] in done:
            raise ConfigError(
                f"output: line {n + 1} of {path} (input_row {scored.get(INPUT_ROW)!r}) is not a row of this "
                f"input to score (or appears twice); was it written from another input? Use another output, "
                "or overwrite=true to start it afresh"
            )
        done.add(scored[INPUT_ROW])
    return done


def _jsonable(data: dict) -> dict:
    """``data`` as it reads back from JSON (tuples become lists, numpy scalars plain numbers)."""
    return json.loads(json.dumps(data, default=_to_json))


def _to_json(value):
    if isinstance(value, np.generic):
        return value.item()
    if isinstance(value, np.ndarray):
        return value.tolist()
    raise TypeError(f"cannot write a {type(value).__name__} value to JSON")


def score_columns(cfg: ScoreConfig, kind: str) -> list[str]:
    """The new output columns: <score_column> for rows, chosen_<score_column> and rejected_<...> for pairs."""
    if kind == "rows":
        return [cfg.score_column]
    return [f"chosen_{cfg.score_column}", f"rejected_{cfg.score_column}"]


def append_scores(
    cfg: ScoreConfig, scorer: Scorer, output: Path, todo: list[Row], columns: list[str], n_rows: int,
    n_done: int,
) -> None:  # fmt: skip
    """Score ``todo`` batch by batch; each batch is appended to ``output`` and flushed to disk before the next
    one starts, so a killed run loses at most the batch it was scoring."""
    output.parent.mkdir(parents=True, exist_ok=True)
    with (
        open(output, "a", encoding="utf-8") as f,
        tqdm(total=n_rows, initial=n_done, desc="scoring", unit="row", disable=not cfg.progress) as bar,
    ):
        for start in range(0, len(todo), cfg.batch_size):
            batch = todo[start : start + cfg.batch_size]
            scores = score_batch(scorer, batch)
            lines = []
            for k, row in enumerate(batch):
                out = {**_jsonable(row.record.data), **{c: s[k] for c, s in zip(columns, scores)}}
                out[INPUT_ROW] = row.record.row
                lines.append(json.dumps(out, ensure_ascii=False) + "\n")
            f.write("".join(lines))
            f.flush()
            os.fsync(f.fileno())
            bar.update(len(batch))


def column_statistics(scored: list[dict], columns: list[str], kind: str) -> dict:
    """Mean and std of each score column over the scored rows; for pairs, how often chosen scores higher."""
    stats: dict = {}
    for column in columns:
        values = np.array([row[column] for row in scored], dtype=float)
        stats[f"{column}_mean"] = float(values.mean()) if len(values) else None
        stats[f"{column}_std"] = float(values.std()) if len(values) else None
    if kind == "pairs" and scored:
        stats["accuracy"] = float(np.mean([row[columns[0]] > row[columns[1]] for row in scored]))
    return stats


def scored_pair_diagnostics(
    cfg: ScoreConfig, scorer: RewardModelScorer, rows: list[Row], scored: list[dict], columns: list[str]
) -> dict:
    """Accuracy beside the length rules, length buckets and correlation, calibration (issue 18), over every
    scored pair; reply lengths in the reward model's tokens, as it read them."""
    reward_model = scorer.reward_model
    by_row = {row.record.row: row for row in rows}
    pairs = [by_row[s[INPUT_ROW]] for s in scored]
    encoded = [
        encode_pair(
            reward_model.tokenizer, row.prompt, *row.responses, reward_model.max_length,
            reward_model.max_prompt_length,
        )
        for row in pairs
    ]  # fmt: skip
    return pair_diagnostics(
        [s[columns[0]] for s in scored],
        [s[columns[1]] for s in scored],
        encoded,
        f"reward-model diagnostics on {len(scored)} scored pairs",
        base_model=cfg.base_model,
        pad_id=reward_model.tokenizer.pad_token_id,
        dtype=cfg.dtype,
        trust_remote_code=cfg.trust_remote_code,
        batch_size=cfg.batch_size,
    )


def run(cfg: ScoreConfig) -> dict:
    start_one_process("score", cfg.num_threads)
    started = time.time()
    output = jsonl_output(cfg.output, "as rows are scored")
    if cfg.batch_size < 1:
        raise ConfigError(f"batch_size must be at least 1, got {cfg.batch_size}")

    # 1. Input rows, and which of them an earlier (interrupted) run already scored.
    kind, rows, skipped, n_read = read_input(cfg)
    check_input_columns(cfg, rows)
    columns = score_columns(cfg, kind)
    if cfg.overwrite and output.exists():
        output.unlink()
    done = resume_output(output, rows, {*columns, INPUT_ROW}) if output.exists() else set()
    todo = [row for row in rows if row.record.row not in done]
    print(
        f"score: {n_read} rows read ({kind}), {len(skipped)} skipped, {len(done)} already in {output}, "
        f"{len(todo)} to score",
        file=sys.stderr,
    )

    # 2. The reward; a reward model keeps the lengths it was trained with unless overridden.
    scorer = reward_scorer(cfg, pick_device(), cfg.batch_size)
    if cfg.max_length is not None:  # check() refused lengths for a function
        scorer.reward_model.max_length = cfg.max_length
    if cfg.max_prompt_length is not None:
        scorer.reward_model.max_prompt_length = cfg.max_prompt_length

    # 3. Score batch by batch; each batch is appended and flushed to disk before the next one starts.
    append_scores(cfg, scorer, output, todo, columns, len(rows), len(done))

    # 4. Statistics over the whole output (this run and any earlier one).
    scored = [json.loads(line) for line in output.read_text(encoding="utf-8").splitlines()]
    summary = {
        "stage": "score",
        "reward": cfg.reward,
        "input": cfg.input,
        "output": str(output),
        "kind": kind,
        "rows_read": n_read,
        "rows_scored": len(scored),
        "scored_this_run": len(todo),
        "already_scored": len(done),
        "skipped_rows": len(skipped),
        "skipped": [str(bad) for bad in skipped[:20]],
        **column_statistics(scored, columns, kind),
    }
    if kind == "pairs" and scored and isinstance(scorer, RewardModelScorer):
        # A reward function has no tokens of its own: no diagnostics.
        summary["diagnostics"] = scored_pair_diagnostics(cfg, scorer, rows, scored, columns)
        summary["warnings"] = summary["diagnostics"]["warnings"]
    summary["wall_seconds"] = time.time() - started
    return summary


STAGE = Stage("score", ScoreConfig, run)
