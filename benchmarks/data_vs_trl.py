"""Preference data preparation at scale: alignkit's dpo stage against TRL 1.16's DPOTrainer, same file.

Generates a seeded synthetic preference JSONL (conversational rows: a user prompt, chosen and rejected
assistant replies; 1,000,000 pairs by default) in a temporary folder, then runs in a fresh subprocess each,
alternating which side goes first:

- alignkit: ``alignkit.stages.dpo.load_pairs`` (what ``alignkit dpo`` calls: validate every row, tokenize, write
  the memory-mapped Arrow cache), into an empty cache folder; then again on that folder (the second run);
- TRL: ``datasets.load_dataset("json", ...)`` and ``DPOTrainer._prepare_dataset`` (prompt extraction is not
  needed, chat template, tokenizing, the max_length filter), into an empty datasets cache; then again on it.

Both use the same tokenizer (the embedded SmolLM2-135M-Instruct's), max_length and num_proc. Reported: wall
time and peak RSS (ru_maxrss of the child and of its worker processes) of each run. The last line is
``speedup=<trl_s/alignkit_s> memory_ratio=<alignkit_rss/trl_rss>`` on the first (uncached) runs, medians over
the rounds.

    .venv/bin/python benchmarks/data_vs_trl.py --quick            # 20,000 pairs
    nice -n 10 .venv/bin/python benchmarks/data_vs_trl.py --num-proc 1
"""

from __future__ import annotations

import argparse
import json
import os
import random
import resource
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

MODEL = "smollm2-135m-instruct"
MAX_LENGTH = 512
SEED = 0


def generate(path: Path, n_rows: int, seed: int = SEED) -> None:
    """``n_rows`` conversational pairs of made-up words: prompts of 20-80 words, replies of 10-60."""
    rng = random.Random(seed)
    letters = "abcdefghijklmnopqrstuvwxyz"
    words = ["".join(rng.choice(letters) for _ in range(rng.randint(2, 9))) for _ in range(5000)]

    def text(lo: int, hi: int) -> str:
        return " ".join(rng.choices(words, k=rng.randint(lo, hi))).capitalize() + "."

    with path.open("w", encoding="utf-8") as f:
        for _ in range(n_rows):
            row = {
                "prompt": [{"role": "user", "content": text(20, 80)}],
                "chosen": [{"role": "assistant", "content": text(10, 60)}],
                "rejected": [{"role": "assistant", "content": text(10, 60)}],
            }
            f.write(json.dumps(row) + "\n")


def _peak_rss_mb() -> float:
    """The larger of this process's peak RSS and its largest finished worker's (ru_maxrss is in KiB on Linux)."""
    own = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    workers = resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss
    return max(own, workers) / 1024


def child_alignkit(spec: dict) -> dict:
    os.environ["ALIGNKIT_CACHE"] = spec["cache"]  # load_pairs caches under $ALIGNKIT_CACHE/prepared
    from alignkit.config import load_config
    from alignkit.models.loading import load_tokenizer
    from alignkit.stages.dpo import DPOConfig, load_pairs

    cfg = load_config(
        DPOConfig,
        None,
        [
            f"model={spec['model_dir']}",
            f"train_data={spec['data']}",
            f"output_dir={spec['cache']}/unused",
            f"max_length={MAX_LENGTH}",
            f"dataset_num_proc={spec['num_proc']}",
        ],
    )
    tokenizer = load_tokenizer(cfg.model)
    import datasets  # noqa: F401  (imported before the clock starts, as on TRL's side)

    t0 = time.perf_counter()
    loaded, examples = load_pairs(cfg, tokenizer, cfg.train_data, None, None, None, "train")
    seconds = time.perf_counter() - t0
    last = examples[len(examples) - 1].encoded  # read through the lazy dataset, as training does
    return {"seconds": seconds, "pairs": len(examples), "last_pair_tokens": len(last.prompt_ids)}


def child_trl(spec: dict) -> dict:
    import datasets
    from transformers import AutoTokenizer
    from trl import DPOConfig, DPOTrainer

    tokenizer = AutoTokenizer.from_pretrained(spec["model_dir"])
    args = DPOConfig(
        output_dir=f"{spec['cache']}/unused",
        max_length=MAX_LENGTH,
        dataset_num_proc=spec["num_proc"] if spec["num_proc"] > 1 else None,
        report_to=[],
        use_cpu=True,
        bf16=False,
    )
    t0 = time.perf_counter()
    dataset = datasets.load_dataset("json", data_files=spec["data"], split="train", cache_dir=spec["cache"])
    # The preparation DPOTrainer.__init__ runs on its train_dataset, without building a trainer around a
    # model: conversational rows never reach the one attribute it reads (the tokenizer, for EOS on text rows).
    bare = DPOTrainer.__new__(DPOTrainer)
    bare._tokenizer = tokenizer
    prepared = DPOTrainer._prepare_dataset(bare, dataset, tokenizer, args, "train")
    seconds = time.perf_counter() - t0
    last = prepared[len(prepared) - 1]
    return {"seconds": seconds, "pairs": len(prepared), "last_pair_tokens": len(last["prompt_ids"])}


def run_child(side: str, spec: dict, workdir: Path, tag: str) -> dict:
    spec_path, result_path = workdir / f"spec-{tag}.json", workdir / f"result-{tag}.json"
    spec_path.write_text(json.dumps(spec))
    cmd = [sys.executable, __file__, "--child", side, "--spec", str(spec_path), "--result", str(result_path)]
    env = {**os.environ, "OMP_NUM_THREADS": os.environ.get("OMP_NUM_THREADS", "1")}
    with (workdir / f"log-{tag}.txt").open("w") as log:
        done = subprocess.run(cmd, stdout=log, stderr=subprocess.STDOUT, env=env)
    if done.returncode != 0:
        tail = (workdir / f"log-{tag}.txt").read_text()[-3000:]
        raise SystemExit(f"{side} child failed (exit {done.returncode}):\n{tail}")
    return json.loads(result_path.read_text())


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--rows", type=int, default=1_000_000, help="pairs in the generated file")
    ap.add_argument("--quick", action="store_true", help="20,000 pairs")
    ap.add_argument("--rounds", type=int, default=2, help="alternating rounds (each side runs first once)")
    ap.add_argument("--num-proc", type=int, default=1, help="tokenizing processes, both sides")
    ap.add_argument("--model", default=MODEL, help="embedded name or local model dir (its tokenizer)")
    ap.add_argument("--keep", type=Path, default=None, help="keep the data, caches and child logs here")
    ap.add_argument("--child", help=argparse.SUPPRESS)
    ap.add_argument("--spec", type=Path, help=argparse.SUPPRESS)
    ap.add_argument("--result", type=Path, help=argparse.SUPPRESS)
    args = ap.parse_args(argv)

    if args.child:
        spec = json.loads(args.spec.read_text())
        out = {"alignkit": child_alignkit, "trl": child_trl}[args.child](spec)
        out["peak_rss_mb"] = _peak_rss_mb()
        args.result.write_text(json.dumps(out))
        return 0

    from alignkit.models.loading import resolve_model

    n_rows = 20_000 if args.quick else args.rows
    model_dir = resolve_model(args.model)
    with tempfile.TemporaryDirectory(prefix="alignkit-data-bench-") as tmp:
        workdir = args.keep or Path(tmp)
        workdir.mkdir(parents=True, exist_ok=True)
        data = workdir / "pairs.jsonl"
        t0 = time.perf_counter()
        generate(data, n_rows)
        size_mb = data.stat().st_size / 2**20
        print(f"data: {n_rows} pairs, {size_mb:.0f} MiB, generated in {time.perf_counter() - t0:.0f}s")

        results: dict[str, list[dict]] = {"alignkit": [], "trl": [], "alignkit_cached": [], "trl_cached": []}
        for round_ in range(args.rounds):
            order = ["alignkit", "trl"] if round_ % 2 == 0 else ["trl", "alignkit"]
            for side in order:
                spec = {
                    "model_dir": str(model_dir),
                    "data": str(data),
                    "num_proc": args.num_proc,
                    "cache": str(workdir / f"cache-{side}-{round_}"),  # empty: a first run
                }
                first = run_child(side, spec, workdir, f"{side}-{round_}")
                again = run_child(side, spec, workdir, f"{side}-{round_}-cached")
                results[side].append(first)
                results[f"{side}_cached"].append(again)
                print(
                    f"round {round_} {side}: {first['seconds']:.1f}s, peak RSS {first['peak_rss_mb']:.0f} MiB, "
                    f"{first['pairs']} pairs; second run {again['seconds']:.2f}s, "
                    f"peak RSS {again['peak_rss_mb']:.0f} MiB",
                    flush=True,
                )

    def median(side: str, key: str) -> float:
        return statistics.median(r[key] for r in results[side])

    fields = {
        "rows": n_rows,
        "num_proc": args.num_proc,
        "alignkit_s": median("alignkit", "seconds"),
        "trl_s": median("trl", "seconds"),
        "alignkit_rss_mb": median("alignkit", "peak_rss_mb"),
        "trl_rss_mb": median("trl", "peak_rss_mb"),
        "alignkit_cached_s": median("alignkit_cached", "seconds"),
        "trl_cached_s": median("trl_cached", "seconds"),
    }
    print(" ".join(f"{k}={v:.2f}" if isinstance(v, float) else f"{k}={v}" for k, v in fields.items()))
    speedup = fields["trl_s"] / fields["alignkit_s"]
    memory_ratio = fields["alignkit_rss_mb"] / fields["trl_rss_mb"]
    print(f"speedup={speedup:.2f} memory_ratio={memory_ratio:.2f}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
