"""How well a model solves the shipped arithmetic task before any training: greedy replies to held-out
problems (``alignkit.tasks.arithmetic``), scored by ``exact_answer`` and ``format_adherence``; accuracy with
its percentile-bootstrap interval. The issue asks for a task the embedded model partly solves (neither 0% nor
~100%): this is the number to check that against, and the "before" of a GRPO run.

    OMP_NUM_THREADS=2 .venv/bin/python benchmarks/arithmetic_baseline.py            # 100 problems, level 1
    .venv/bin/python benchmarks/arithmetic_baseline.py --n 20 --level 2 --show 5   # options

Last line: ``accuracy=… ci95=[…, …] format=… n=… level=… seconds=…``.
"""

from __future__ import annotations

import argparse
import json
import time

import numpy as np
import torch

from alignkit.data.tokenize import encode_prompt
from alignkit.evaluation.metrics import mean_ci
from alignkit.models.generation import SamplingConfig, generate
from alignkit.models.loading import load_model, load_tokenizer
from alignkit.scoring.verifiable import exact_answer, extract_answer, format_adherence
from alignkit.tasks.arithmetic import generate as generate_problems
from alignkit.tasks.arithmetic import split


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default="smollm2-135m-instruct")
    parser.add_argument("--n", type=int, default=100, help="held-out problems to solve")
    parser.add_argument("--level", type=int, default=1)
    parser.add_argument("--seed", type=int, default=0, help="the task's seed (make-task seed=)")
    parser.add_argument("--train", type=int, default=500, help="training problems generated beside them")
    parser.add_argument("--max-new-tokens", type=int, default=48)
    parser.add_argument("--batch-size", type=int, default=16)
    parser.add_argument("--show", type=int, default=0, help="print this many replies")
    args = parser.parse_args()

    # The held-out problems exactly as `alignkit make-task arithmetic n=<train> held_out=<n>` writes them.
    _, held_out = split(generate_problems(args.train + args.n, args.seed, args.level), args.n)
    tokenizer = load_tokenizer(args.model)
    model = load_model(args.model, "float32")
    prompt_ids = [encode_prompt(tokenizer, p.prompt, None) for p in held_out]
    started = time.perf_counter()
    with torch.no_grad():
        replies = generate(model, tokenizer, prompt_ids, SamplingConfig(args.max_new_tokens, 0.0), args.batch_size)
    seconds = time.perf_counter() - started
    correct = [exact_answer(p.prompt, r.text, p.answer) for p, r in zip(held_out, replies)]
    formatted = [format_adherence(p.prompt, r.text) for p, r in zip(held_out, replies)]
    for p, r, c in list(zip(held_out, replies, correct))[: args.show]:
        shown = {"answer": p.answer, "extracted": extract_answer(r.text), "correct": c, "reply": r.text}
        print(json.dumps(shown))
    accuracy = mean_ci(correct, seed=0)
    print(
        f"accuracy={accuracy.value:.3f} ci95=[{accuracy.low:.3f}, {accuracy.high:.3f}] "
        f"format={float(np.mean(formatted)):.3f} n={len(held_out)} level={args.level} seconds={seconds:.0f}"
    )


if __name__ == "__main__":
    main()
