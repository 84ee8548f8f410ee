"""`alignkit compare CONFIG.yaml`: which method works best here, measured. Each method of the config trains on
the same base model, data and budget, once per seed, and is evaluated against the base by a gold scorer that
took no part in training:

    split data -> for each method x seed: train (its own run folder) -> eval vs base -> table + frontier page

A pipeline composes stages (it sits above them; no stage imports another): every run folder under
output_dir (``<method>-seed<k>/``) is an ordinary run folder of that stage, with its eval.json beside its
summary.json. A run is finished when its summary.json exists and evaluated when its eval.json does; a rerun
trains and evaluates only what is missing (an interrupted run resumes from its latest checkpoint).

Outputs in output_dir: compare.json (every run and the table), compare.md (the table), compare.html (the
reward-vs-KL frontier, the shape of the DPO paper's Figure 2, and the table).
"""

from __future__ import annotations

import json
import math
import statistics
import sys
import time
from dataclasses import dataclass, replace
from importlib.resources import files
from pathlib import Path
from typing import Literal

from alignkit.config import ConfigError, check_row_range, doc_field, load_config, required, save_config
from alignkit.pipelines.methods import METHODS, models_in_memory
from alignkit.stages import Stage

PROMPTS = str(files("alignkit") / "assets" / "prompts.jsonl")
# Invocations that stopped before the table (SIGTERM, Ctrl-C, an error), kept until one finishes it.
INTERRUPTED_INVOCATIONS = "invocations-interrupted.jsonl"


@dataclass
class CompareConfig:
    """Methods x seeds on one base model, one data set and one budget; `alignkit compare CONFIG.yaml`."""

    methods: list[str] = doc_field(
        ["sft", "dpo", "ipo", "kto", "orpo"], f"Methods to compare, from {list(METHODS)}."
    )
    model: str = doc_field("smollm2-135m-instruct", "Base model (embedded default, hub id or local dir).")
    output_dir: str = doc_field("runs/compare", "Folder of the runs and the table; rerunning resumes it.")
    pairs: str | None = doc_field(
        None, "Preference pairs (prompt/chosen/rejected) for sft (its chosen replies), dpo, ipo, kto, orpo."
    )
    build_pairs: int | None = doc_field(
        None,
        "Instead of a pairs file: sample this many responses per training prompt from the base and pair the "
        "best against the worst by the training reward (`reward`, else `gold`), i.e. the policy's own samples "
        "labelled by it, as in the DPO paper's sentiment experiment; written to output_dir/pairs.jsonl "
        "(resumed) and used as `pairs`.",
        ge=2,
    )
    build_temperature: float = doc_field(1.0, "Sampling temperature of build_pairs.", gt=0)
    demonstrations: str | None = doc_field(
        None, "SFT data (prompt/completion); unset: the chosen replies of the training pairs."
    )
    pairs_rows: tuple[int, int] | None = doc_field(
        None,
        "Use only file rows start <= row < stop of pairs, written [start, stop] (a fixed split's).",
        ge=0,
    )
    heldout_pairs: str | None = doc_field(
        None,
        "Held-out pairs for the preference accuracy (e.g. a fixed split); unset: every Nth pair of pairs.",
    )
    heldout_pairs_rows: tuple[int, int] | None = doc_field(
        None, "Use only these file rows of heldout_pairs.", ge=0
    )
    heldout_pairs_every: int = doc_field(
        5, "Without heldout_pairs: every Nth pair is held out of training for the preference accuracy.", ge=2
    )
    prompts: str | None = doc_field(
        None,
        "Prompts (local JSONL, or pairs whose prompts are taken, e.g. HH-RLHF transcripts) for the online "
        "methods and the evaluation; unset: alignkit's built-in set.",
    )
    prompts_rows: tuple[int, int] | None = doc_field(None, "Use only these file rows of prompts.", ge=0)
    heldout_prompts: str | None = doc_field(
        None,
        "Prompts of the evaluation (e.g. a fixed split's held-out rows); unset: every Nth prompt of prompts.",
    )
    heldout_prompts_rows: tuple[int, int] | None = doc_field(
        None, "Use only these file rows of heldout_prompts.", ge=0
    )
    heldout_prompts_every: int = doc_field(
        4, "Without heldout_prompts: every Nth prompt is held out of training for the evaluation.", ge=2
    )
    on_bad_row: Literal["error", "skip"] = doc_field(
        "error",
        "A pair or prompt row that cannot be read: stop naming it, or skip it (counted in compare.json).",
    )
    gold: str = required(
        "Gold scorer of the evaluation: 'module:function' (prompt, response) -> float, or a reward-model dir."
    )
    reward: str | None = doc_field(
        None,
        "Training reward of the online methods (a function or an `alignkit rm` dir); unset: the gold scorer "
        "itself, optimised directly as in the DPO paper's sentiment experiment.",
    )
    steps: int = doc_field(50, "Budget of the offline methods: optimizer steps.", ge=1)
    iterations: int = doc_field(10, "Budget of the online methods: iterations (online DPO: rounds).", ge=1)
    lora: bool = doc_field(True, "Train LoRA adapters (the reference is the base with adapters off).")
    lora_r: int = doc_field(16, "LoRA rank.", ge=1)
    learning_rate: float | None = doc_field(None, "Learning rate of every method; unset: each stage's own.", gt=0)
    batch_size: int = doc_field(8, "Offline methods' batch size (items per optimizer step).", ge=1)
    micro_batch_size: int = doc_field(2, "Items per forward/backward pass.", ge=1)
    max_new_tokens: int = doc_field(48, "Longest response, in training (online) and in the evaluation.", ge=1)
    max_prompt_length: int | None = doc_field(
        None,
        "Online methods and the evaluation: longest prompt in tokens (its end kept); unset: each stage's.",
        ge=1,
    )
    max_length: int | None = doc_field(
        None,
        "Offline methods: longest prompt + reply in tokens (longer rows cut); unset: each stage's own.",
        ge=2,
    )
    seeds: list[int] = doc_field([0, 1, 2], "Training seeds; each method runs once per seed.")
    frontier_points: int = doc_field(
        1,
        "Evaluations per run along its training: 1, its final model only; k > 1 also the snapshots every budget/k "
        "steps (online: iterations) before the end (snapshot_every), each a point of gold score against KL, "
        "joined on the frontier from the base to the final model. Runs trained before it was raised have none.",
        ge=1,
    )
    eval_samples: int = doc_field(4, "Responses per held-out prompt and model in the evaluation.", ge=1)
    eval_temperature: float = doc_field(0.7, "Sampling temperature of the evaluation.", ge=0)
    eval_prompts_max: int | None = doc_field(None, "Evaluate on the first N held-out prompts only.", ge=1)
    # One seed for every evaluation, so the methods are compared on the same sampling draws and the spread
    # over seeds is the training's alone.
    eval_seed: int = doc_field(0, "Seed of every evaluation's sampling.", ge=0)
    method_settings: list[str] = doc_field(
        [], "Per-method settings of its stage, 'method.key=value' (e.g. 'dpo.beta=0.2'); they win."
    )
    dtype: Literal["auto", "float32", "bfloat16"] = doc_field(
        "float32", "Dtype of every run; float32 gives the same figures on every CPU kind."
    )
    quick: bool = doc_field(
        False,
        "Run the whole machinery in seconds: 2 steps, 1 iteration (with frontier_points=k: k of each), 6 tokens, "
        "4 held-out prompts x 1.",
    )
    progress: bool = doc_field(True, "Show progress bars.")

    def check(self) -> None:
        unknown = [m for m in self.methods if m not in METHODS]
        if unknown or not self.methods:
            raise ConfigError(f"config key 'methods': unknown {unknown or 'none given'}; from {list(METHODS)}")
        if not self.seeds:
            raise ConfigError("config key 'seeds': give at least one seed")
        if self.pairs is not None and self.build_pairs is not None:
            raise ConfigError("config keys 'pairs' and 'build_pairs': give one (a file, or responses to sample)")
        for name in ("pairs_rows", "heldout_pairs_rows", "prompts_rows", "heldout_prompts_rows"):
            check_row_range(self, name)
        for rows, source in (("pairs_rows", "pairs"), ("heldout_pairs_rows", "heldout_pairs"),
                             ("heldout_prompts_rows", "heldout_prompts")):  # fmt: skip
            if getattr(self, rows) is not None and getattr(self, source) is None:
                raise ConfigError(f"config key '{rows}': rows of which file? set '{source}' too")
        if self.heldout_pairs is not None and self.pairs is None:
            raise ConfigError("config key 'heldout_pairs': give the training pairs too ('pairs')")
        for item in self.method_settings:
            method, _, key = item.partition("=")[0].partition(".")
            if method not in self.methods or not key or "=" not in item:
                raise ConfigError(
                    f"config key 'method_settings': '{item}' is not 'method.key=value' for a method of {self.methods}"
                )


def check_data(cfg: CompareConfig) -> None:
    """The methods' data and the scorers are given and load (checked when the run starts, before anything
    trains: the defaults name no data file, and a bad gold scorer would otherwise surface after training)."""
    from alignkit.scoring.scorers import check_scorer

    check_scorer(cfg.gold, "gold")
    if cfg.reward is not None:
        check_scorer(cfg.reward, "reward")
    offline = [m for m in cfg.methods if not METHODS[m].online and not (m == "sft" and cfg.demonstrations)]
    if offline and cfg.pairs is None and cfg.build_pairs is None:
        raise ConfigError(
            f"config key 'pairs': {offline} train on preference pairs; set pairs=FILE, or build_pairs=N to "
            "sample N responses per training prompt and pair them by the reward"
        )


def _say(msg: str) -> None:
    print(f"[compare] {msg}", file=sys.stderr, flush=True)


def quick_settings(cfg: CompareConfig) -> CompareConfig:
    """quick=true: the smallest budget that still runs every step of every method (with frontier_points=k, k
    steps and iterations: a snapshot to evaluate at each but the last)."""
    k = cfg.frontier_points
    return replace(
        cfg, steps=max(2, k), iterations=k, max_new_tokens=6, eval_samples=1, eval_prompts_max=4, batch_size=4,
        micro_batch_size=2, lora_r=4, build_pairs=2 if cfg.build_pairs else None,
    )  # fmt: skip


# ---------------------------------------------------------------------------------------------
# Data: the same split for every method
# ---------------------------------------------------------------------------------------------


def _write_jsonl(path: Path, rows: list[dict]) -> None:
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text("".join(json.dumps(r) + "\n" for r in rows))
    tmp.replace(path)


def _prompt_lines(
    cfg: CompareConfig, source: str, rows: tuple[int, int] | None, skipped: dict, role: str
) -> list[str]:
    """The prompts of ``source`` (rows ``rows``) as JSONL lines: read and checked here, so a bad row is named in
    its own file; an HH-RLHF pair row gives the conversation before its compared replies."""
    from alignkit.data.schemas import load_prompts

    loaded = load_prompts(source, on_bad_row=cfg.on_bad_row, rows=rows)
    skipped[role] = len(loaded.skipped)
    drop = {"chosen", "rejected"}  # a pair file's replies are not the prompt's columns
    return [
        json.dumps({"prompt": p.prompt, **{k: v for k, v in p.columns.items() if k not in drop}})
        for p in loaded.examples
    ]


def _pair_rows(
    cfg: CompareConfig, source: str, rows: tuple[int, int] | None, skipped: dict, role: str
) -> list[dict]:
    from alignkit.data.schemas import load_preferences

    loaded = load_preferences(str(source), on_bad_row=cfg.on_bad_row, rows=rows)
    skipped[role] = len(loaded.skipped)
    return [{"prompt": p.prompt, "chosen": p.chosen, "rejected": p.rejected} for p in loaded.examples]


def split_data(cfg: CompareConfig, root: Path, model: str) -> dict[str, Path | None]:
    """Training and held-out files in ``root``: the held-out files given, else every Nth prompt and every Nth
    pair held out. With build_pairs, the pairs are sampled on the training prompts first (so no evaluation
    prompt is trained on). Writes root/data.json: the rows of each file and the rows skipped (on_bad_row=skip)."""
    skipped: dict[str, int] = {}
    source = Path(cfg.prompts or PROMPTS)
    if not source.is_file():
        raise ConfigError(f"config key 'prompts': {source} is not a file (a local JSONL of prompts)")
    if cfg.prompts_rows is None and cfg.heldout_prompts is None:
        # Lines copied as they are: the stages that read them check each row and name a bad one.
        lines = [line for line in source.read_text().splitlines() if line.strip()]
    else:
        lines = _prompt_lines(cfg, str(source), cfg.prompts_rows, skipped, "prompts")
    n = cfg.heldout_prompts_every
    if cfg.heldout_prompts is None:
        train, heldout = (
            [x for i, x in enumerate(lines) if i % n != n - 1],
            [x for i, x in enumerate(lines) if i % n == n - 1],
        )
    else:
        train, heldout = (
            lines,
            _prompt_lines(cfg, cfg.heldout_prompts, cfg.heldout_prompts_rows, skipped, "heldout_prompts"),
        )
    out: dict[str, Path | None] = {"pairs": None, "heldout_pairs": None, "demonstrations": None}
    out["prompts"], out["heldout_prompts"] = root / "prompts-train.jsonl", root / "prompts-heldout.jsonl"
    out["prompts"].write_text("".join(x + "\n" for x in train))
    out["heldout_prompts"].write_text("".join(x + "\n" for x in heldout))
    pairs_file = build_pairs(cfg, model, out["prompts"], root) if cfg.build_pairs else cfg.pairs
    if pairs_file is not None:
        rows = _pair_rows(cfg, str(pairs_file), cfg.pairs_rows if cfg.pairs else None, skipped, "pairs")
        if cfg.heldout_pairs is None:
            n = cfg.heldout_pairs_every
            train_pairs = [r for i, r in enumerate(rows) if i % n != n - 1]
            heldout_pairs = [r for i, r in enumerate(rows) if i % n == n - 1]
        else:
            train_pairs, heldout_pairs = (
                rows,
                _pair_rows(cfg, cfg.heldout_pairs, cfg.heldout_pairs_rows, skipped, "heldout_pairs"),
            )
        out["pairs"], out["heldout_pairs"] = root / "pairs-train.jsonl", root / "pairs-heldout.jsonl"
        _write_jsonl(out["pairs"], train_pairs)
        _write_jsonl(out["heldout_pairs"], heldout_pairs)
        # SFT, the baseline, imitates the chosen replies of the same training pairs.
        out["demonstrations"] = root / "demonstrations.jsonl"
        _write_jsonl(
            out["demonstrations"], [{"prompt": r["prompt"], "completion": r["chosen"]} for r in train_pairs]
        )
    if cfg.demonstrations is not None:
        out["demonstrations"] = Path(cfg.demonstrations)
    counts = {k: _count_rows(v) for k, v in out.items() if v is not None}
    (root / "data.json").write_text(json.dumps({"rows": counts, "skipped_rows": skipped}, indent=2) + "\n")
    return out


def _count_rows(path: Path) -> int | None:
    return sum(1 for line in path.open() if line.strip()) if path.suffix == ".jsonl" else None


def build_pairs(cfg: CompareConfig, model: str, prompts: Path, root: Path) -> Path:
    """`build-prefs` on the training prompts: build_pairs samples of the base per prompt, scored by the training
    reward, best against worst, into root/pairs.jsonl. A finished file (its summary written) is reused as it is;
    a partly written one is resumed."""
    from alignkit.data import appendlog
    from alignkit.stages import build_prefs

    output = root / "pairs.jsonl"
    reward = cfg.reward or cfg.gold
    summary = appendlog.summary_path(output)
    if summary.is_file():
        done = json.loads(summary.read_text())
        wanted = {"n_samples": cfg.build_pairs, "temperature": cfg.build_temperature, "reward": reward}
        found = {k: done.get("settings", {}).get(k, done.get(k)) for k in wanted}
        if found != wanted:
            raise ConfigError(
                f"config keys 'build_pairs', 'build_temperature', 'reward': {output} was built with {found}, this "
                f"config asks for {wanted}; use another output_dir, or the settings it was built with"
            )
        return output
    _say(f"sampling {cfg.build_pairs} responses per training prompt and pairing them by {reward}")
    build_prefs.run(
        load_config(
            build_prefs.BuildPrefsConfig, None, [], model=model, prompts=str(prompts), output=str(output),
            n_samples=cfg.build_pairs, temperature=cfg.build_temperature, max_new_tokens=cfg.max_new_tokens,
            reward=reward, pairing="best_vs_worst", dtype=cfg.dtype, seed=0, progress=cfg.progress,
        )
    )  # fmt: skip
    return output


# ---------------------------------------------------------------------------------------------
# Train and evaluate one run
# ---------------------------------------------------------------------------------------------


def stage_settings(cfg: CompareConfig, method: str, seed: int, model: str, data: dict, run_dir: Path) -> dict:
    """The settings of ``method``'s stage for one run: the shared budget, then the method's own data."""
    m = METHODS[method]
    settings: dict = {
        "model": model, "output_dir": str(run_dir), "seed": seed, "dtype": cfg.dtype, "lora": cfg.lora,
        "lora_r": cfg.lora_r, "lora_alpha": 2 * cfg.lora_r, "micro_batch_size": cfg.micro_batch_size,
        "progress": cfg.progress, "report_to": ["none"],
        "resume_from": "latest" if (run_dir / "checkpoints").is_dir() else None,
    }  # fmt: skip
    if cfg.frontier_points > 1:  # loadable snapshots along the way, each evaluated as a point of the frontier
        budget = cfg.iterations if m.online else cfg.steps
        settings["snapshot_every"] = max(1, budget // cfg.frontier_points)
    if cfg.learning_rate is not None:
        settings["learning_rate"] = cfg.learning_rate
    if m.online:
        settings.update(train_data=str(data["prompts"]), reward=cfg.reward or cfg.gold)
        settings.update(max_new_tokens=cfg.max_new_tokens)
        if cfg.max_prompt_length is not None:
            settings["max_prompt_length"] = cfg.max_prompt_length
        settings["rounds" if method == "online_dpo" else "iterations"] = cfg.iterations
        if cfg.quick:  # the smallest batches each online stage accepts
            settings.update(
                {
                    "online_dpo": {"prompts_per_round": 4, "samples_per_prompt": 2, "minibatch_size": 4},
                    "ppo": {"prompts_per_iteration": 4, "minibatch_size": 2, "micro_batch_size": 1},
                    "grpo": {"prompts_per_iteration": 2, "num_generations": 2, "minibatch_size": 4},
                }[method]
            )
    else:
        train = data["demonstrations"] if method == "sft" else data["pairs"]
        settings.update(train_data=str(train), max_steps=cfg.steps, batch_size=cfg.batch_size)
        if cfg.max_length is not None:
            settings["max_length"] = cfg.max_length
        if m.preference_accuracy:
            settings["eval_data"] = str(data["heldout_pairs"])
        if method == "sft":  # the table reads no held-in loss; on 1,800 demonstrations its two passes cost more
            settings["measure_train_loss"] = False  # than the training (20 min against 3 on HH, 2 CPU cores)
    return settings


def method_overrides(cfg: CompareConfig, method: str) -> list[str]:
    """The 'key=value' items of method_settings for ``method``."""
    return [item.split(".", 1)[1] for item in cfg.method_settings if item.split(".", 1)[0] == method]


def train(cfg: CompareConfig, method: str, seed: int, model: str, data: dict, run_dir: Path) -> None:
    from alignkit.stages import load_stage

    stage = load_stage(METHODS[method].stage)
    overrides = method_overrides(cfg, method)
    given = {item.split("=", 1)[0] for item in overrides}
    settings = {k: v for k, v in stage_settings(cfg, method, seed, model, data, run_dir).items() if k not in given}
    stage.main(load_config(stage.config, None, overrides, **settings))


def evaluate(cfg: CompareConfig, model: str, heldout_prompts: Path, run_dir: Path, which: Path | None = None) -> None:
    """`eval`: the run's final model (or ``which``, one of its snapshots, into eval-step-NNNNNN.json) against the
    base on the held-out prompts, scored by the gold scorer. The base's side (its samples, scores, entropies) is
    the same for every evaluation: sampled once, then read from output_dir/reference-eval.json."""
    from alignkit.stages import eval as eval_stage

    eval_stage.run(
        load_config(
            eval_stage.EvalConfig, None, [], model=str(which or run_dir / "final"), reference=model, dtype=cfg.dtype,
            prompts=str(heldout_prompts), prompts_max_rows=cfg.eval_prompts_max, reward=cfg.gold,
            temperature=cfg.eval_temperature, samples_per_prompt=cfg.eval_samples,
            max_new_tokens=cfg.max_new_tokens, seed=cfg.eval_seed, output=str(eval_file(run_dir, which)),
            **({} if cfg.max_prompt_length is None else {"max_prompt_length": cfg.max_prompt_length}),
            progress=cfg.progress, reference_cache=str(run_dir.parent / "reference-eval.json"),
        )
    )  # fmt: skip


def eval_file(run_dir: Path, snapshot: Path | None = None) -> Path:
    """Where the evaluation of the run's final model (or of its snapshot ``snapshots/step-N``) is written."""
    return run_dir / ("eval.json" if snapshot is None else f"eval-{snapshot.name}.json")


def last_step(summary: dict) -> int | None:
    """The steps (iterations, rounds) a finished run trained, from its summary."""
    return next((summary[k] for k in ("steps", "iterations", "rounds") if k in summary), None)


def snapshots_to_evaluate(run_dir: Path) -> list[tuple[int, Path]]:
    """The run's snapshots before its last step (the last one is its final model, evaluated already)."""
    from alignkit.training.snapshots import list_snapshots

    last = last_step(json.loads((run_dir / "summary.json").read_text()))
    return [(step, path) for step, path in list_snapshots(run_dir) if last is None or step < last]


# ---------------------------------------------------------------------------------------------
# Measure: one row per run, one per method
# ---------------------------------------------------------------------------------------------


def _mean(values: list) -> float | None:
    values = [v for v in values if v is not None]
    return sum(values) / len(values) if values else None


def run_row(method: str, seed: int, run_dir: Path) -> dict:
    """What one finished and evaluated run measured, from its summary.json, metrics.jsonl and eval.json."""
    summary = json.loads((run_dir / "summary.json").read_text())
    ev = json.loads((run_dir / "eval.json").read_text())
    metrics = run_dir / "metrics.jsonl"
    rows = [json.loads(x) for x in metrics.read_text().splitlines() if x.strip()] if metrics.is_file() else []
    events = summary.get("monitor_events", []) + summary.get("events", [])
    k = ev["samples_per_prompt"]
    per_prompt = {
        side: [sum(s[f"{side}_score"] for s in ev["samples"][i : i + k]) / k for i in range(0, len(ev["samples"]), k)]
        for side in ("policy", "reference")
    }
    pol, ref = ev["policy"], ev["reference_stats"]
    # The run's way along the frontier: each evaluated snapshot, then the final model.
    path = []
    for step, snapshot in snapshots_to_evaluate(run_dir):
        if eval_file(run_dir, snapshot).is_file():
            e = json.loads(eval_file(run_dir, snapshot).read_text())
            path.append({"step": step, "kl": e["kl"]["k1_per_token"], "gold_mean": e["policy"]["score"]["mean"],
                         "win_rate": e["win_rate"]["value"]})  # fmt: skip
    path.append({"step": last_step(summary), "kl": ev["kl"]["k1_per_token"], "gold_mean": pol["score"]["mean"],
                 "win_rate": ev["win_rate"]["value"]})  # fmt: skip
    return {
        "method": method,
        "seed": seed,
        "run_dir": run_dir.name,  # inside output_dir, beside compare.json
        "peak_rss_mb": summary.get("peak_rss_mb"),
        # Weights, gradients and optimizer state (what recommend's estimate predicts), and the parameter counts.
        "model_state_bytes": summary.get("model_state_bytes"),
        "trainable_parameters": summary.get("trainable_parameters"),
        "total_parameters": summary.get("total_parameters"),
        "wall_seconds": summary.get("wall_seconds", summary.get("train_seconds")),
        "tokens_per_s": _mean([r.get("tokens_per_s") for r in rows]),
        "preference_accuracy": summary.get("eval_accuracy"),
        "win_rate": ev["win_rate"],
        "gold_mean": pol["score"]["mean"],
        "reference_gold_mean": ref["score"]["mean"],
        "kl": ev["kl"]["k1_per_token"],
        "length_change": pol["length_tokens"]["mean"] - ref["length_tokens"]["mean"],
        "distinct_2": pol["distinct_2"],
        "stopped": bool(summary.get("stopped_by")) or any(e.get("action") == "stop" for e in events),
        "path": path,
        "per_prompt": per_prompt,
    }


def method_rows(runs: list[dict], reward_is_model: bool) -> list[dict]:
    """One row per method over its seeds: means, the pooled win rate, and the stability columns.

    Win rate: prompts x seeds pooled, its interval a bootstrap over those (prompt, seed) units. Stability:
    the sample std over seeds of each seed's win rate (0 with one seed), and the share of runs a monitor
    stopped. Peak memory: the largest over seeds.
    """
    from alignkit.evaluation.metrics import win_rate

    out = []
    for method in dict.fromkeys(r["method"] for r in runs):
        rs = [r for r in runs if r["method"] == method]
        w = win_rate(
            [v for r in rs for v in r["per_prompt"]["policy"]], [v for r in rs for v in r["per_prompt"]["reference"]]
        )
        wins = [r["win_rate"]["value"] for r in rs]
        out.append(
            {
                "method": method,
                "seeds": len(rs),
                "models_in_memory": models_in_memory(method, reward_is_model),
                "peak_rss_mb": max((r["peak_rss_mb"] for r in rs if r["peak_rss_mb"] is not None), default=None),
                "wall_seconds": _mean([r["wall_seconds"] for r in rs]),
                "tokens_per_s": _mean([r["tokens_per_s"] for r in rs]),
                "preference_accuracy": _mean([r["preference_accuracy"] for r in rs]),
                "win_rate": w.value,
                "win_rate_ci95": [w.low, w.high],
                "gold_mean": _mean([r["gold_mean"] for r in rs]),
                "kl": _mean([r["kl"] for r in rs]),
                "length_change": _mean([r["length_change"] for r in rs]),
                "distinct_2": _mean([r["distinct_2"] for r in rs]),
                "win_rate_std_over_seeds": statistics.stdev(wins) if len(wins) > 1 else 0.0,
                "stopped_share": sum(r["stopped"] for r in rs) / len(rs),
            }
        )
    return out


COLUMNS = [  # (key, header) of the table
    ("method", "method"),
    ("models_in_memory", "models"),
    ("peak_rss_mb", "peak MB"),
    ("wall_seconds", "wall s"),
    ("tokens_per_s", "tok/s"),
    ("preference_accuracy", "pref. acc."),
    ("win_rate", "gold win rate [95% CI]"),
    ("gold_mean", "gold mean"),
    ("kl", "KL/token"),
    ("length_change", "Δ length"),
    ("distinct_2", "distinct-2"),
    ("win_rate_std_over_seeds", "win std (seeds)"),
    ("stopped_share", "stopped"),
]


def _cell(row: dict, key: str) -> str:
    v = row.get(key)
    if key == "win_rate":
        lo, hi = row["win_rate_ci95"]
        return f"{v:.3f} [{lo:.3f}, {hi:.3f}]"
    if v is None or (isinstance(v, float) and not math.isfinite(v)):
        return "–"
    if isinstance(v, float):
        return f"{v:.0f}" if abs(v) >= 100 else f"{v:.3g}" if key != "length_change" else f"{v:+.2f}"
    return str(v)


def markdown_table(rows: list[dict]) -> str:
    head = "| " + " | ".join(h for _, h in COLUMNS) + " |"
    rule = "|" + "|".join("---" if k == "method" else "---:" for k, _ in COLUMNS) + "|"
    return "\n".join([head, rule, *("| " + " | ".join(_cell(r, k) for k, _ in COLUMNS) + " |" for r in rows)])


TABLE_NOTES = (
    "models: models held in memory (trained + reference + reward model), as roles; with LoRA the reference "
    "is the base with adapters off. Win rate: per held-out prompt, the policy's mean gold score against the "
    "base's (ties half), pooled over seeds, bootstrap interval over (prompt, seed). KL: k1 estimate on the "
    "policy's samples, nats/token. Δ length: tokens, policy minus base. stopped: share of runs a monitor stopped."
)


def run(cfg: CompareConfig) -> dict:
    from alignkit.models.loading import resolve_model
    from alignkit.training.run import claim_folder, mark_folder

    started = time.time()
    check_data(cfg)
    if cfg.quick:
        cfg = quick_settings(cfg)
    model = resolve_model(cfg.model)
    root = Path(cfg.output_dir)
    # New, empty, or a compare's own folder (resumed); locked: two compares in one folder would train the same
    # runs twice.
    lock = claim_folder(root, "compare", CompareConfig.__name__)
    try:
        mark_folder(root, "compare", CompareConfig.__name__)
        save_config(cfg, str(root / "config.yaml"))
        return _run(cfg, root, model, started)
    finally:
        lock.release()


def _run(cfg: CompareConfig, root: Path, model: str, started: float) -> dict:
    data = split_data(cfg, root, model)
    trained, evaluated, runs = [], [], []
    try:
        for method in cfg.methods:
            for seed in cfg.seeds:
                runs.append(_train_and_evaluate(cfg, method, seed, model, data, root, trained, evaluated))
    except BaseException:
        # Interrupted (SIGTERM, Ctrl-C) or failed: the time it spent is part of what the comparison costs, so it
        # is kept for the invocation that finishes the table.
        with open(root / INTERRUPTED_INVOCATIONS, "a") as f:
            f.write(json.dumps(_invocation(started, trained, evaluated) | {"interrupted": True}) + "\n")
        raise
    reward_is_model = Path(cfg.reward or cfg.gold).is_dir()
    table = method_rows(runs, reward_is_model)
    result = {
        "model": cfg.model,
        "gold": cfg.gold,
        "pairs": "pairs.jsonl" if cfg.build_pairs else cfg.pairs,  # built: inside output_dir
        "data": json.loads((root / "data.json").read_text()),
        "methods": table,
        "runs": [{k: v for k, v in r.items() if k != "per_prompt"} for r in runs],
        "trained_now": trained,
        "evaluated_now": evaluated,
        # Every invocation on this folder (a rerun that reuses the runs adds a short one); wall_seconds, their sum,
        # is what the whole comparison cost.
        "invocations": [*_invocations(root), _invocation(started, trained, evaluated)],
    }
    result["wall_seconds"] = sum(i["seconds"] for i in result["invocations"])
    markdown = markdown_table(table)
    (root / "compare.json").write_text(json.dumps(result, indent=2) + "\n")
    (root / "compare.md").write_text(markdown + "\n\n" + TABLE_NOTES + "\n")
    from alignkit.reporting.frontier import compare_page

    (root / "compare.html").write_text(compare_page(cfg.model, cfg.gold, runs, markdown_rows(table)))
    (root / INTERRUPTED_INVOCATIONS).unlink(missing_ok=True)  # now in compare.json's invocations
    print(markdown)
    print(f"\n{TABLE_NOTES}\n\nruns trained now: {len(trained)}; page: {root / 'compare.html'}")
    return result


def _train_and_evaluate(
    cfg: CompareConfig, method: str, seed: int, model: str, data: dict[str, Path | None], root: Path,
    trained: list[str], evaluated: list[str],
) -> dict:
    """One run: train it and evaluate it (the final model, then its snapshots) where not done yet, appending what
    it did to ``trained`` and ``evaluated``; its table row."""
    run_dir = root / f"{method}-seed{seed}"
    if not (run_dir / "summary.json").is_file():
        _say(f"training {method} seed {seed} into {run_dir}")
        train(cfg, method, seed, model, data, run_dir)
        trained.append(run_dir.name)
    if not (run_dir / "eval.json").is_file():
        _say(f"evaluating {run_dir.name} against the base with {cfg.gold}")
        evaluate(cfg, model, data["heldout_prompts"], run_dir)
        evaluated.append(run_dir.name)
    for step, snapshot in snapshots_to_evaluate(run_dir):
        if not eval_file(run_dir, snapshot).is_file():
            _say(f"evaluating {run_dir.name} at step {step} against the base with {cfg.gold}")
            evaluate(cfg, model, data["heldout_prompts"], run_dir, snapshot)
            evaluated.append(f"{run_dir.name}/{snapshot.name}")
    return run_row(method, seed, run_dir)


def _invocation(started: float, trained: list[str], evaluated: list[str]) -> dict:
    """This invocation's record: its seconds so far and the runs it trained and evaluated."""
    return {"seconds": time.time() - started, "trained": trained, "evaluated": evaluated}


def _invocations(root: Path) -> list[dict]:
    """The earlier invocations: those recorded in root/compare.json (one, for a file written before they were
    kept), then the interrupted ones since."""
    path, interrupted = root / "compare.json", root / INTERRUPTED_INVOCATIONS
    earlier = []
    if path.is_file():
        old = json.loads(path.read_text())
        earlier = old.get("invocations") or [
            {"seconds": old["wall_seconds"], "trained": old["trained_now"], "evaluated": old["evaluated_now"]}
        ]
    if interrupted.is_file():
        earlier += [json.loads(line) for line in interrupted.read_text().splitlines() if line.strip()]
    return earlier


def markdown_rows(rows: list[dict]) -> tuple[list[str], list[list[str]]]:
    """The table's header and cells, as the HTML page shows them."""
    return [h for _, h in COLUMNS], [[_cell(r, k) for k, _ in COLUMNS] for r in rows]


STAGE = Stage("compare", CompareConfig, run, prints_results=True)
