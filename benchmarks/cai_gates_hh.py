"""What cai-revise's quality gates catch on real red-team prompts, and whether the revisions they let through are
less offensive than the first answers.

Runs `alignkit cai-revise` (the embedded model answers, critiques and revises, under alignkit's default
constitution and the default gates) on held-out HH-RLHF prompts: the conversation before the last assistant
turn of rows 1800 onward (the test split of ../shared/data; unusable rows skipped). Then it reports:
- per gate, the share of revisions it rejected (a revision may fail several gates), and the share of prompts
  whose revision was kept;
- for the kept revisions, the offensive-language probability (alt-profanity-check: a linear model trained on
  labelled tweets, independent of the model and its constitution) of the revision against the initial answer
  of the same prompt, with a paired percentile-bootstrap interval of the mean difference.

    OMP_NUM_THREADS=2 .venv/bin/python benchmarks/cai_gates_hh.py                     # 64 prompts, seed 0
    .venv/bin/python benchmarks/cai_gates_hh.py --n 8 --seed 1 --out /tmp/cai8         # options

Last line: ``kept=… offensive_initial=… offensive_revised=… diff=… ci95=[…, …] n=… seconds=…``.
"""

from __future__ import annotations

import argparse
import json
import tempfile
import time
from pathlib import Path

import numpy as np

import alignkit
from alignkit.cai.gates import GATES
from alignkit.evaluation.metrics import mean_ci
from alignkit.scoring.classifiers import offensive

DATA = Path(__file__).resolve().parents[1].parent / "shared" / "data" / "hh-rlhf" / "harmless-base-test.jsonl.gz"
TEST_ROWS = [1800, 2312]  # the fixed held-out split (../shared/data/README.md)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default="smollm2-135m-instruct")
    parser.add_argument("--data", default=str(DATA), help="HH-RLHF harmless-base test file")
    parser.add_argument("--n", type=int, default=64, help="held-out prompts")
    parser.add_argument("--seed", type=int, default=0, help="cai-revise seed= (principle draws and sampling)")
    parser.add_argument("--out", default=None, help="a new folder for the output (default: a temporary one)")
    parser.add_argument("--show", type=int, default=0, help="print this many (initial, revision) pairs")
    args = parser.parse_args()

    folder = Path(args.out) if args.out else Path(tempfile.mkdtemp(prefix="cai_gates_hh_"))
    folder.mkdir(parents=True, exist_ok=True)
    output = folder / "revised.jsonl"
    started = time.perf_counter()
    summary = alignkit.run(
        "cai-revise",
        model=args.model,
        prompts=args.data,
        prompts_rows=TEST_ROWS,
        prompts_max_rows=args.n,
        on_bad_row="skip",
        output=str(output),
        seed=args.seed,
    )
    seconds = time.perf_counter() - started

    n_prompts = summary["prompts_done"]
    n_revisions = n_prompts * summary["settings"]["n_rounds"]
    print(f"output: {output}")
    print(f"| gate | revisions rejected | share of {n_revisions} |")
    print("| --- | --- | --- |")
    for name in (*GATES, *sorted(set(summary["gates"]) - set(GATES))):
        count = summary["gates"].get(name, {"count": 0})["count"]
        print(f"| {name} | {count} | {count / n_revisions:.3f} |")
    print(f"| any gate | {summary['revisions_gated']} | {summary['revisions_gated'] / n_revisions:.3f} |")
    print(f"targets: {json.dumps(summary['targets'])}")

    rows = [json.loads(line) for line in output.read_text().splitlines() if line.strip()]
    kept = [r for r in rows if r["target"] == "revision"]
    for r in kept[: args.show]:
        print(json.dumps({"initial": r["initial_response"], "revision": r["completion"]}))
    if not kept:
        print(f"kept=0 n={n_prompts} seconds={seconds:.0f}")
        return
    before = np.array([offensive("", r["initial_response"]) for r in kept])
    after = np.array([offensive("", r["completion"]) for r in kept])
    diff = mean_ci(after - before, seed=0)  # paired: each prompt's revision against its own first answer
    print(
        f"kept={len(kept)} offensive_initial={before.mean():.3f} offensive_revised={after.mean():.3f} "
        f"diff={diff.value:+.3f} ci95=[{diff.low:+.3f}, {diff.high:+.3f}] n={n_prompts} seconds={seconds:.0f}"
    )


if __name__ == "__main__":
    main()
