"""`alignkit quickstart`: the main job, a complete alignment on the embedded default with nothing but what
alignkit ships (its prompt set and its constitution).

    sample -> label (constitution) -> DPO (LoRA) -> evaluate against the reference -> HTML report

A pipeline composes stages (it sits above them; no stage imports another). Each step writes into the run
folder and is skipped when its output is complete, so rerunning the same command after an interruption
resumes where it stopped.

Labels. A 135M judge compares responses at chance (0.45 agreement with human labels on 120 HH-RLHF test
pairs, see README), so training on its labels would learn noise. By default the labels come from the
constitution's checkable principles, judged by program (`alignkit.cai.checks`, priority order deciding);
`labeller=judge` uses the AI judge instead. The evaluation measures the result with evaluators that had
no part in the labels: VADER sentiment (win rate and mean) and alt-profanity-check's offensive-language
model, next to the label-maker's own checks, length, distinct-2 and KL.
"""

from __future__ import annotations

import json
import shutil
import sys
import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from importlib.resources import files
from pathlib import Path
from typing import TYPE_CHECKING, Literal

from alignkit.cai.checks import CHECKS
from alignkit.config import SEED_MAX, ConfigError, doc_field, load_config, save_config
from alignkit.stages import Stage

if TYPE_CHECKING:
    from alignkit.training.run import RunFolderLock

PROMPTS = str(files("alignkit") / "assets" / "prompts.jsonl")
STEPS = ("sample", "dpo", "eval", "report")


@dataclass
class QuickstartConfig:
    """The main job. Every field has a default; override any with key=value."""

    model: str = doc_field("smollm2-135m-instruct", "Model to align (embedded default, hub id or local dir).")
    output_dir: str = doc_field(
        "runs/quickstart", "Run folder. Rerunning with the same folder resumes; fresh=true starts over."
    )
    fresh: bool = doc_field(
        False,
        "Empty the run folder first instead of resuming it (only a folder quickstart made, with its marker).",
    )
    skip: list[str] = doc_field(
        [], f"Steps to skip, from {list(STEPS)} (their outputs must exist if needed)."
    )
    labeller: Literal["checks", "judge"] = doc_field(
        "checks",
        "Who labels the sampled pairs: the constitution's checkable principles by program, or the AI judge.",
    )
    n_samples: int = doc_field(
        6,
        "Responses sampled per training prompt (best vs worst become a pair); more samples make it likelier "
        "that one of them shows a principle the others break.",
        ge=2,
    )
    max_new_tokens: int = doc_field(
        64, "Longest response in tokens, when sampling candidates and evaluating.", ge=1
    )
    # Greedy candidates (0) are all the same response: no pair to learn from.
    temperature: float = doc_field(1.0, "Sampling temperature for the candidate responses.", gt=0)
    # 6 passes at 3e-4 fit the ~95 pairs (train loss near 0, KL about 0.4 nats/token on held-out prompts); the
    # 3 passes at 2e-4 of earlier versions moved the independent evaluators in one seed of two (see README).
    dpo_epochs: int = doc_field(6, "Passes over the pairs.", ge=1)
    dpo_learning_rate: float = doc_field(3e-4, "Peak learning rate of the LoRA adapters.", gt=0)
    dpo_beta: float = doc_field(0.1, "DPO beta (KL strength).", gt=0)
    lora_r: int = doc_field(16, "LoRA rank.", ge=1)
    eval_temperature: float = doc_field(
        0.7, "Sampling temperature when comparing policy and reference (0 = greedy).", ge=0
    )
    eval_samples: int = doc_field(4, "Responses per held-out prompt and model in the evaluation.", ge=1)
    seed: int = doc_field(0, "Seed for sampling, data order and evaluation.", ge=0, le=SEED_MAX)
    # Pinned, not auto: with auto an AMX CPU samples and trains in bf16 and a CPU without AMX in fp32, and the
    # job's samples, pairs and figures would depend on the machine it ran on.
    dtype: Literal["auto", "float32", "bfloat16"] = doc_field(
        "float32",
        "Dtype of every step (sampling, DPO, evaluation). float32 so the job gives the same figures on every CPU "
        "kind; auto picks bf16 where it is fast (AMX CPUs, GPUs: DPO then trains in mixed precision).",
    )
    progress: bool = doc_field(True, "Show progress bars.")


def _say(msg: str) -> None:
    print(f"[quickstart] {msg}", file=sys.stderr, flush=True)


def split_prompts(root: Path) -> tuple[Path, Path]:
    """Every fourth built-in prompt is held out for evaluation; both halves mix everyday and harmful ones."""
    rows = [line for line in Path(PROMPTS).read_text().splitlines() if line.strip()]
    train, held_out = root / "prompts-train.jsonl", root / "prompts-eval.jsonl"
    train.write_text("".join(r + "\n" for i, r in enumerate(rows) if i % 4 != 3))
    held_out.write_text("".join(r + "\n" for i, r in enumerate(rows) if i % 4 == 3))
    return train, held_out


def sentiment_without_label_words(prompt: str, response: str) -> float:
    """VADER on the response with every word the label-maker's checks count removed (`LABEL_WORDS`): a gain
    here is a change of tone beyond the words the labels rewarded."""
    import re

    from alignkit.cai.checks import LABEL_WORDS
    from alignkit.scoring.classifiers import sentiment

    kept = re.sub(r"[A-Za-z']+", lambda m: "" if m.group(0).lower() in LABEL_WORDS else m.group(0), response)
    return sentiment(prompt, kept)


def independent_scores(eval_json: Path) -> dict:
    """Each scorer's mean over the policy's and the reference's samples, and the policy-minus-reference
    difference of per-prompt means with a bootstrap 95% interval over prompts (the prompts are the
    independent units; policy and reference draw with the same seeds, so the difference is paired).

    Scorers: evaluators independent of the labels (VADER sentiment, alt-profanity-check's offensive
    probability) and the label-maker's own checks, applied to fresh samples on held-out prompts.
    """
    from alignkit.evaluation.metrics import mean_ci
    from alignkit.scoring import prompt_text
    from alignkit.scoring.classifiers import offensive, sentiment
    from alignkit.stages.eval import per_prompt_means

    evaluation = json.loads(eval_json.read_text())
    samples, k = evaluation["samples"], evaluation["samples_per_prompt"]  # k consecutive samples per prompt
    scorers = {
        "sentiment (VADER)": sentiment,
        "sentiment, label words removed (VADER)": sentiment_without_label_words,
        "offensive prob.": offensive,
        **CHECKS,
    }
    out: dict[str, dict] = {}
    for name, f in scorers.items():
        means = {
            side: per_prompt_means([f(prompt_text(s["prompt"]), s[side]) for s in samples], k)
            for side in ("policy", "reference")
        }
        diff = mean_ci([p - r for p, r in zip(means["policy"], means["reference"])])
        out[name] = {
            "policy": sum(means["policy"]) / len(means["policy"]),
            "reference": sum(means["reference"]) / len(means["reference"]),
            "diff": diff.value,
            "diff_ci95": [diff.low, diff.high],
            "prompts": len(means["policy"]),
        }
    return out


def check_config(cfg: QuickstartConfig) -> None:
    unknown = [step for step in cfg.skip if step not in STEPS]
    if unknown:
        raise ConfigError(f"config key 'skip': unknown steps {unknown}; the steps are {list(STEPS)}")


def open_folder(root: Path, fresh: bool) -> RunFolderLock:
    """Check, lock and (``fresh``) empty the run folder; returns its lock, held for the run.

    The folder must be new, empty, or one this pipeline made (its marker says "quickstart"; one from before
    markers is recognised by its config.yaml, for resuming only). ``fresh`` removes the contents of a marked
    folder alone, saying what it removes, and refuses any other non-empty folder, naming what is in it.
    """
    # Imported here, as the stages are: `alignkit quickstart --help` does not load torch.
    from alignkit.training.run import (
        MARKER_NAME,
        claim_folder,
        folder_entries,
        folder_problem,
        mark_folder,
        read_marker,
        show_entries,
    )

    marker = read_marker(root) if root.is_dir() else None
    unmarked = fresh and marker is None and root.is_dir() and folder_entries(root)
    if unmarked and folder_problem(root, "quickstart", QuickstartConfig.__name__) is None:
        raise ConfigError(
            f"fresh=true removes only a folder alignkit quickstart made (marked by its {MARKER_NAME}), and "
            f"{root} has no marker; it holds {show_entries(folder_entries(root))}. Nothing was removed; "
            "remove it yourself or choose another output_dir"
        )
    # Locked: a live quickstart in this folder is never emptied under it.
    lock = claim_folder(root, "quickstart", QuickstartConfig.__name__)
    try:
        entries = folder_entries(root)
        if fresh and entries:
            made = marker.get("created") if marker else None
            _say(f"fresh=true: removing from {root} (made by quickstart {made}): {show_entries(entries, 20)}")
            for name in entries:
                path = root / name.rstrip("/")
                if path.is_dir() and not path.is_symlink():
                    shutil.rmtree(path)
                else:
                    path.unlink()
        mark_folder(root, "quickstart", QuickstartConfig.__name__)
    except OSError as e:
        lock.release()
        raise ConfigError(f"output_dir: cannot write in {root}: {e.strerror or e}") from None
    return lock


def run(cfg: QuickstartConfig) -> dict:
    from alignkit.models.loading import resolve_model
    from alignkit.training.distributed import require_one_process

    require_one_process("quickstart")
    started = time.time()
    check_config(cfg)
    # 0. The model, before the folder is touched (a wrong model name must not cost a run folder): the
    #    embedded default is dequantised once into the cache.
    _say(f"preparing {cfg.model}")
    model_path = resolve_model(cfg.model)
    root = Path(cfg.output_dir)
    lock = open_folder(root, cfg.fresh)
    try:
        save_config(cfg, str(root / "config.yaml"))
        return _run(cfg, root, model_path, started)
    finally:
        lock.release()


def _run(cfg: QuickstartConfig, root: Path, model_path: str, started: float) -> dict:
    _say(f"run folder: {root} (rerun the same command to resume)")
    timings: dict[str, float] = {}  # seconds of each step this call ran (none for a skipped step)
    train_prompts, eval_prompts = split_prompts(root)

    # 1. Sample candidates and label them: best vs worst under the constitution (resumes by itself).
    pairs = root / "pairs.jsonl"
    if "sample" not in cfg.skip:
        with _timed(timings, "sample + label"):
            sample_and_label(cfg, model_path, train_prompts, pairs)
    prefs = json.loads(pairs.with_suffix(".summary.json").read_text())

    # 2. DPO with LoRA on those pairs; the reference is the same base with adapters disabled.
    dpo_dir = root / "dpo"
    if "dpo" not in cfg.skip and not (dpo_dir / "summary.json").exists():
        with _timed(timings, "dpo"):
            train_dpo(cfg, model_path, pairs, prefs.get("pairs"), dpo_dir)
    dpo_summary = json.loads((dpo_dir / "summary.json").read_text())

    # 3. Evaluate against the reference on held-out prompts; the win rate is by VADER sentiment, an
    #    evaluator that had no part in the labels.
    eval_json = dpo_dir / "eval.json"
    if "eval" not in cfg.skip and not eval_json.exists():
        with _timed(timings, "eval"):
            evaluate(cfg, model_path, dpo_dir / "final", eval_prompts, eval_json)
    evaluation = json.loads(eval_json.read_text())
    scores = independent_scores(eval_json)

    # 4. The HTML report of the DPO run, with the evaluation in it.
    report_path = dpo_dir / "report.html"
    if "report" not in cfg.skip:
        write_report(dpo_dir, eval_json)

    summary = {
        "model": cfg.model,
        "run_dir": str(root),
        "labeller": cfg.labeller,
        "dtype": cfg.dtype,
        # Which kind of CPU the figures came from (auto's bf16 choice; ALIGNKIT_FAST_BF16 overrides it).
        "cpu_bf16_fast": _cpu_bf16_fast(),
        "pairs": prefs.get("pairs"),
        "label_stats": {k: v for k, v in prefs.items() if isinstance(v, (int, float))},
        "dpo": {k: dpo_summary.get(k) for k in ("steps", "final_metrics", "train_seconds", "peak_rss_mb")},
        "eval": {k: evaluation.get(k) for k in ("policy", "reference_stats", "win_rate", "kl")},
        "independent_scores": scores,
        "report": str(report_path),
        "eval_samples": cfg.eval_samples,
        "timings_s": timings,
        "wall_seconds": time.time() - started,
    }
    (root / "summary.json").write_text(json.dumps(summary, indent=2, default=str) + "\n")
    print_table(summary)
    return summary


@contextmanager
def _timed(timings: dict[str, float], step: str) -> Iterator[None]:
    """Record the seconds the block takes as ``timings[step]``; a step that fails records nothing."""
    t = time.time()
    yield
    timings[step] = time.time() - t


def sample_and_label(cfg: QuickstartConfig, model_path: str, train_prompts: Path, pairs: Path) -> None:
    """Step 1: `build-prefs` samples cfg.n_samples responses per training prompt and writes the best and
    the worst, by the labeller, as a pair to ``pairs`` (resuming a partly written file)."""
    from alignkit.stages import build_prefs

    _say(f"1/4 sampling {cfg.n_samples} responses per training prompt and labelling them ({cfg.labeller})")
    build_prefs.run(
        load_config(
            build_prefs.BuildPrefsConfig,
            None,
            [],
            model=model_path,
            prompts=str(train_prompts),
            dtype=cfg.dtype,
            output=str(pairs),
            n_samples=cfg.n_samples,
            max_new_tokens=cfg.max_new_tokens,
            temperature=cfg.temperature,
            seed=cfg.seed,
            reward=cfg.labeller,
            judge_model=model_path,
            pairing="best_vs_worst",
        )
    )


def train_dpo(
    cfg: QuickstartConfig, model_path: str, pairs: Path, n_pairs: int | None, dpo_dir: Path
) -> None:
    """Step 2: `dpo` with LoRA adapters on ``pairs`` into the run folder ``dpo_dir`` (resuming from its
    latest checkpoint); the reference is the base model with the adapters disabled."""
    from alignkit.stages import dpo

    _say(f"2/4 DPO (LoRA r={cfg.lora_r}) on {n_pairs} pairs")
    dpo.run(
        load_config(
            dpo.DPOConfig,
            None,
            [],
            model=model_path,
            train_data=str(pairs),
            dtype=cfg.dtype,
            lora=True,
            lora_r=cfg.lora_r,
            lora_alpha=2 * cfg.lora_r,
            reference="auto",  # reference log-probs precomputed once (and cached), not each epoch
            beta=cfg.dpo_beta,
            learning_rate=cfg.dpo_learning_rate,
            epochs=cfg.dpo_epochs,
            batch_size=8,
            micro_batch_size=4,
            warmup_steps=2,
            seed=cfg.seed,
            output_dir=str(dpo_dir),
            save_every=5,
            resume_from="latest" if (dpo_dir / "checkpoints").exists() else None,
            progress=cfg.progress,
        )
    )


def evaluate(
    cfg: QuickstartConfig, model_path: str, policy: Path, eval_prompts: Path, eval_json: Path
) -> None:
    """Step 3: `eval` samples ``policy`` and the reference ``model_path`` on the held-out prompts, scored by
    VADER sentiment, into ``eval_json``."""
    from alignkit.stages import eval as eval_stage

    n_held_out = sum(1 for line in eval_prompts.read_text().splitlines() if line.strip())
    _say(
        f"3/4 evaluating against the reference: {cfg.eval_samples} samples on each of {n_held_out} "
        "held-out prompts"
    )
    eval_stage.run(
        load_config(
            eval_stage.EvalConfig,
            None,
            [],
            model=str(policy),
            reference=model_path,
            dtype=cfg.dtype,
            prompts=str(eval_prompts),
            reward="alignkit.scoring.classifiers:sentiment",
            temperature=cfg.eval_temperature,
            samples_per_prompt=cfg.eval_samples,
            max_new_tokens=cfg.max_new_tokens,
            seed=cfg.seed,
            output=str(eval_json),
            progress=cfg.progress,
        )
    )


def write_report(dpo_dir: Path, eval_json: Path) -> None:
    """Step 4: `report` writes the DPO run's HTML report, with the evaluation in it (dpo_dir/report.html)."""
    from alignkit.stages import report

    _say("4/4 writing the HTML report")
    report.run(load_config(report.ReportConfig, None, [], run_dir=str(dpo_dir), eval_json=str(eval_json)))


def _cpu_bf16_fast() -> bool:
    import torch

    from alignkit.models.precision import bf16_is_fast

    return bf16_is_fast(torch.device("cpu"))


def print_table(summary: dict) -> None:
    ev, sc = summary["eval"], summary["independent_scores"]
    pol, ref = ev["policy"], ev["reference_stats"]
    w, kl = ev["win_rate"], ev["kl"]

    def num(v) -> str:
        return f"{v:10.3f}" if isinstance(v, (int, float)) else f"{v:>10}"

    def row(name: str, p, r, diff: str, who: str) -> str:
        return f"  {name:<30}{num(p)}{num(r)}  {diff:<26}{who}"

    def scored(name: str, key: str, who: str) -> str:
        s = sc[key]
        lo, hi = s["diff_ci95"]
        return row(name, s["policy"], s["reference"], f"{s['diff']:+.3f} [{lo:+.3f}, {hi:+.3f}]", who)

    n_prompts = sc["sentiment (VADER)"]["prompts"]
    print(
        f"\nalignkit quickstart: DPO (LoRA) on {summary['pairs']} constitution-labelled pairs; "
        f"{n_prompts} held-out prompts x {summary['eval_samples']} samples"
    )
    print(f"  {'':<30}{'policy':>10}{'reference':>10}  {'policy - ref. [95% CI]':<26}measured by")
    print(
        row(
            "win rate vs reference", w["value"], "", f"[{w['low']:.3f}, {w['high']:.3f}]",
            "VADER sentiment (independent)",
        )
    )  # fmt: skip
    print(scored("sentiment, mean", "sentiment (VADER)", "VADER (independent)"))
    if "sentiment, label words removed (VADER)" in sc:  # summaries written before this row existed lack it
        print(
            scored(
                "  ... label words removed", "sentiment, label words removed (VADER)", "VADER (independent)"
            )
        )
    print(scored("offensive, mean prob.", "offensive prob.", "alt-profanity-check (independent)"))
    for check in CHECKS:
        if check in sc:
            print(scored(f"check: {check}", check, "the label-maker's own check"))
    print(
        row(
            "length, tokens (mean)",
            pol["length_tokens"]["mean"],
            ref["length_tokens"]["mean"],
            "",
            "tokenizer",
        )
    )
    print(row("distinct-2", pol["distinct_2"], ref["distinct_2"], "", "n-gram count"))
    print(row("KL(policy || ref.), nats/token", kl["k1_per_token"], "", "", "k1 on the policy's samples"))
    print(
        "  Intervals: bootstrap over held-out prompts. VADER and alt-profanity-check had no part in the labels.\n"
        "  VADER's lexicon shares words with the politeness and warmth checks ('glad', 'great', 'sad'), so the\n"
        "  row '... label words removed' scores the text without any word a check counts."
    )
    print(f"\n  pairs trained on: {summary['pairs']}    DPO steps: {summary['dpo']['steps']}")
    print(f"  report: {summary['report']}")
    times = ", ".join(f"{k} {v:.0f} s" for k, v in summary["timings_s"].items())
    print(f"  wall time: {summary['wall_seconds']:.0f} s ({times})")


STAGE = Stage("quickstart", QuickstartConfig, run, prints_results=True)  # its own results table, not the JSON
