"""`alignkit rm-eval`: how good is a reward model, and is it more than a length rule? Any preference file(s)
alignkit reads and any reward model (an `alignkit rm` final/ folder, or a Hugging Face decoder
``AutoModelForSequenceClassification`` with one output) -> one table of diagnostics per file, like
RewardBench's per-subset tables: accuracy beside prefer-shorter, prefer-longer and the base model's zero-shot
log-prob, accuracy in length buckets, length correlation, agreement with the length rule, calibration.

Writes <output_dir>/rm_eval.json and rm_eval.md; prints the tables. The arithmetic is in
``alignkit.evaluation.reward_diagnostics``.
"""

from __future__ import annotations

import json
import sys
import time
from dataclasses import dataclass
from functools import partial
from pathlib import Path
from typing import Literal

from alignkit.config import ConfigError, RuntimeConfig, check_below, check_row_range, doc_field, required
from alignkit.data.schemas import load_preferences
from alignkit.data.tokenize import encode_pair
from alignkit.evaluation.reward_diagnostics import (
    LENGTH_MATCH_TOLERANCE,
    diagnose,
    format_markdown,
    format_text,
)
from alignkit.evaluation.reward_eval import is_causal_lm, reply_mean_logprobs
from alignkit.models.loading import load_tokenizer, pick_device
from alignkit.models.reward import load_reward_model
from alignkit.stages import Stage
from alignkit.training.distributed import start_one_process
from alignkit.training.run import claim_folder, folder_problem, json_safe, mark_folder


@dataclass
class RMEvalConfig(RuntimeConfig):
    """Diagnose a reward model on preference files (prompt/chosen/rejected, or HH-RLHF-style transcripts)."""

    reward: str = required(
        "Reward model directory: an `alignkit rm` final/ folder, or a Hugging Face decoder sequence "
        "classifier with one output (num_labels=1)."
    )
    data: list[str] = required(
        "Preference file(s), each evaluated on its own: .jsonl/.json/.parquet/.csv, a saved dataset dir or a "
        "hub id; several as data=[a.jsonl,b.jsonl]."
    )
    output_dir: str = required(
        "Folder for rm_eval.json and rm_eval.md: new, empty, or an earlier rm-eval's (its files are replaced)."
    )
    data_split: str | None = doc_field(None, "Split name when a data entry is a hub id or a DatasetDict.")
    data_rows: tuple[int, int] | None = doc_field(
        None, "Use only rows start <= row < stop of each file, written [start, stop] (0-based).", ge=0
    )
    data_max_rows: int | None = doc_field(None, "Use only the first N pairs of each file (after rows).", ge=1)
    max_length: int | None = doc_field(
        None, "Longest prompt+reply in tokens; None uses the reward model's training setting.", ge=2
    )
    max_prompt_length: int | None = doc_field(
        None, "Longest prompt in tokens, below max_length; None uses the reward model's setting.", ge=1
    )
    logprob_baseline: bool = doc_field(
        True,
        "Also score each pair by the base model's mean log-prob of the reply (one forward pass per reply).",
    )
    base_model: str | None = doc_field(
        None,
        "Causal LM for the log-prob baseline; None uses the base_model an `alignkit rm` reward model records "
        "(no baseline for a reward model that records none).",
    )
    batch_size: int = doc_field(16, "Sequences per forward pass.", ge=1)
    on_bad_row: Literal["error", "skip"] = doc_field(
        "skip", "What to do with an unusable pair: skip it and count it, or stop with an error naming it."
    )
    seed: int = doc_field(0, "Seed of the bootstrap intervals.", ge=0)

    def check(self) -> None:
        check_row_range(self, "data_rows")
        check_below(self, "max_prompt_length", "max_length")
        if not self.data:
            raise ConfigError("data must name at least one preference file", ("data",))




def run(cfg: RMEvalConfig) -> dict:
    start_one_process("rm-eval", cfg.num_threads)
    started = time.time()
    data = [cfg.data] if isinstance(cfg.data, str) else list(cfg.data)
    out = Path(cfg.output_dir)
    problem = folder_problem(out, "rm-eval", RMEvalConfig.__name__)  # before the work, not after it
    if problem:
        raise ConfigError(problem)

    # 1. The reward model, with the lengths it was trained with unless overridden.
    reward_model = load_reward_model(cfg.reward, cfg.dtype, pick_device(), cfg.trust_remote_code)
    if not hasattr(reward_model.model, "score"):
        raise ConfigError(
            f"reward {cfg.reward} is a {type(reward_model.model).__name__}: rm-eval scores "
            "decoder sequence classifiers (a 'score' head read at the reply's last token), as alignkit trains them"
        )
    if cfg.max_length is not None:
        reward_model.max_length = cfg.max_length
    if cfg.max_prompt_length is not None:
        reward_model.max_prompt_length = cfg.max_prompt_length
    record_file = Path(cfg.reward) / "ALIGNKIT_REWARD.json"
    recorded = json.loads(record_file.read_text()).get("base_model") if record_file.is_file() else None
    base_model = (cfg.base_model or recorded) if cfg.logprob_baseline else None
    if base_model is not None and not is_causal_lm(base_model, cfg.trust_remote_code):
        raise ConfigError(f"base_model {base_model} is not a causal LM; name one, or logprob_baseline=false")
    base_tokenizer = load_tokenizer(base_model, cfg.trust_remote_code) if base_model else None

    # 2. Each file: its pairs, their rewards and reply lengths (in the reward model's tokens), the baselines.
    results: dict[str, dict] = {}
    tables, markdown = [], [f"## Reward model diagnostics: `{cfg.reward}`\n"]
    for source in data:
        loaded = load_preferences(source, cfg.on_bad_row, split=cfg.data_split, rows=cfg.data_rows, limit=cfg.data_max_rows)
        loaded.require_rows("data")
        print(f"{source}: {loaded.summary()}", file=sys.stderr)
        pairs = loaded.examples
        enc = partial(
            encode_pair,
            reward_model.tokenizer,
            max_length=reward_model.max_length,
            max_prompt_length=reward_model.max_prompt_length,
        )
        encoded = [enc(p.prompt, p.chosen, p.rejected) for p in pairs]
        chosen, rejected = reward_model.score_pairs(
            [p.prompt for p in pairs], [p.chosen for p in pairs], [p.rejected for p in pairs],
            cfg.batch_size,
            cfg.progress,
        )
        logprobs: tuple = (None, None)
        if base_model is not None:
            base_enc = partial(
                encode_pair,
                base_tokenizer,
                max_length=reward_model.max_length,
                max_prompt_length=reward_model.max_prompt_length,
            )
            base_pairs = [base_enc(p.prompt, p.chosen, p.rejected) for p in pairs]
            logprobs = reply_mean_logprobs(
                base_model, base_pairs, base_tokenizer.pad_token_id, cfg.dtype, cfg.trust_remote_code,
                max(cfg.batch_size // 2, 1),
            )
        found = diagnose(
            chosen,
            rejected,
            [len(e.chosen_ids) for e in encoded],
            [len(e.rejected_ids) for e in encoded],
            *logprobs,
            seed=cfg.seed,
        ).to_dict()
        found.update(source=source, rows_read=loaded.n_rows, skipped_rows=len(loaded.skipped))
        results[source] = found
        tables.append(format_text(found, f"{source} ({len(pairs)} pairs)"))
        markdown.append(format_markdown(found, f"{source} ({len(pairs)} pairs)"))
        print(tables[-1], file=sys.stderr)

    # 3. One JSON and one markdown file with every table.
    notes = (
        f"Lengths are reply tokens of the reward model's tokenizer; length-matched: |len_c - len_r| <= "
        f"{LENGTH_MATCH_TOLERANCE:g} * the longer; ties count half; intervals are 95% bootstrap over pairs."
    )
    report = {"reward_model": cfg.reward, "base_model": base_model, "notes": notes, "files": results}
    lock = claim_folder(out, "rm-eval", RMEvalConfig.__name__)  # new, empty, or an rm-eval's own
    try:
        mark_folder(out, "rm-eval", RMEvalConfig.__name__)
        (out / "rm_eval.json").write_text(json.dumps(json_safe(report), indent=2) + "\n")
        (out / "rm_eval.md").write_text("\n".join(markdown) + f"\n{notes}\n")
    finally:
        lock.release()
    return {
        "stage": "rm-eval",
        "reward_model": cfg.reward,
        "base_model": base_model,
        "output": [str(out / "rm_eval.json"), str(out / "rm_eval.md")],
        "accuracy": {s: r["accuracy"]["value"] for s, r in results.items()},
        "warnings": {s: r["warnings"] for s, r in results.items() if r["warnings"]},
        "wall_seconds": time.time() - started,
    }


STAGE = Stage("rm-eval", RMEvalConfig, run)
