"""DPO on CPU, alignkit against TRL 1.16 side by side: pairs/s, peak RSS, achieved FLOP/s and per-step losses.

Same model (the embedded SmolLM2-135M-Instruct, fp32), same HH-RLHF pairs in the same order, the same token ids
(checked), the same optimiser; each side runs in its own fresh subprocess, alternating over rounds.
How to run it and what each number means: benchmarks/README.md. The last line printed is the summary.
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

HH_RLHF = (
    Path(__file__).resolve().parents[1].parent / "shared" / "data" / "hh-rlhf" / "harmless-base-test.jsonl.gz"
)
MODEL = "smollm2-135m-instruct"
PAIRS_PER_STEP = 4
MAX_LENGTH = 512
BETA = 0.1
SEED = 0


# ---------------------------------------------------------------------------------------------
# Shared setup: the pairs, their token ids, the visiting order, the FLOP counts
# ---------------------------------------------------------------------------------------------


def prepare(args, workdir: Path) -> dict:
    """Select the pairs, tokenize them the alignkit way and write the spec both children read."""
    from alignkit.data.schemas import load_preferences
    from alignkit.data.tokenize import encode_pair, render_prompt
    from alignkit.models.loading import load_tokenizer, resolve_model
    from alignkit.training.loop import epoch_permutation

    model_dir = resolve_model(args.model)
    tokenizer = load_tokenizer(model_dir)
    n_pairs = args.steps * PAIRS_PER_STEP
    loaded = load_preferences(str(args.data), on_bad_row="skip", limit=2 * n_pairs + 16)
    pairs = loaded.examples[:n_pairs]
    if len(pairs) < n_pairs:
        raise SystemExit(f"{args.data}: only {len(pairs)} valid pairs, {n_pairs} needed")
    encoded = [encode_pair(tokenizer, p.prompt, p.chosen, p.rejected, max_length=MAX_LENGTH) for p in pairs]

    # alignkit's loop visits epoch_permutation(seed, 0, n) in batches of 4; TRL gets the pairs in that order and a
    # sequential sampler, so step k sees the same four pairs on both sides.
    order = epoch_permutation(SEED, 0, n_pairs)
    data_path = workdir / "pairs.jsonl"
    with data_path.open("w") as f:
        for p in pairs:
            f.write(json.dumps({"prompt": p.prompt, "chosen": p.chosen, "rejected": p.rejected}) + "\n")

    # TRL input: pre-rendered prompt text (the same chat template, applied by alignkit's render_prompt) and the
    # completions as text; TRL appends EOS itself. A pair alignkit truncated is given as the decoded text of its
    # truncated ids (a completion cut by max_length has lost its EOS; TRL's keep_start cut removes the one it adds).
    trl_rows = []
    for i in order:
        p, e = pairs[i], encoded[i]
        if not e.truncated:
            trl_rows.append(
                {"prompt": render_prompt(tokenizer, p.prompt), "chosen": p.chosen, "rejected": p.rejected}
            )
        else:
            strip = lambda ids: ids[:-1] if ids and ids[-1] == tokenizer.eos_token_id else ids  # noqa: E731
            trl_rows.append(
                {
                    "prompt": tokenizer.decode(e.prompt_ids),
                    "chosen": tokenizer.decode(strip(e.chosen_ids)),
                    "rejected": tokenizer.decode(strip(e.rejected_ids)),
                }
            )
    spec = {
        "model_dir": model_dir,
        "data_path": str(data_path),
        "steps": args.steps,
        "learning_rate": args.learning_rate,
        "micro_batch_size": args.micro_batch_size,
        "precision": args.precision,
        "trl_rows": trl_rows,
        "alignkit_ids": [
            {
                "prompt_ids": encoded[i].prompt_ids,
                "chosen_ids": encoded[i].chosen_ids,
                "rejected_ids": encoded[i].rejected_ids,
            }
            for i in order
        ],
        "n_truncated": sum(e.truncated for e in encoded),
    }
    (workdir / "spec.json").write_text(json.dumps(spec))
    return spec


def matmul_params(model_dir: str) -> tuple[int, int]:
    """(N_dec, N_head): the weights of the decoder's linear layers and of the LM head (a token's forward costs
    2 * N_dec, plus 2 * N_head where the head is applied)."""
    from transformers import AutoConfig

    cfg = AutoConfig.from_pretrained(model_dir)
    h, hd = cfg.hidden_size, getattr(cfg, "head_dim", None) or cfg.hidden_size // cfg.num_attention_heads
    q, kv = cfg.num_attention_heads * hd, cfg.num_key_value_heads * hd
    n_dec = cfg.num_hidden_layers * (h * q + 2 * h * kv + q * h + 3 * h * cfg.intermediate_size)
    return n_dec, cfg.vocab_size * h


def flop_counts(spec: dict) -> dict:
    """Matmul FLOPs per optimiser step (mean over the run's steps) for each way of computing a DPO step.

    Per token, a forward pass costs 2 * N_dec (the decoder's linear layers) plus 2 * N_head where the LM head is
    applied; backward costs twice the forward. Attention scores and the head's recompute are not counted (the
    usual MFU convention), embeddings are a lookup.
    """
    n_dec, n_head = matmul_params(spec["model_dir"])
    ids = spec["alignkit_ids"]
    steps = [ids[k : k + PAIRS_PER_STEP] for k in range(0, len(ids), PAIRS_PER_STEP)]
    mb = spec["micro_batch_size"]

    def per_step(fn) -> float:
        return statistics.fmean(fn(step) for step in steps)

    def padded_rows(pairs) -> int:  # 2B right-padded rows, as both plain paths build them
        return (
            2
            * len(pairs)
            * max(len(p["prompt_ids"]) + max(len(p["chosen_ids"]), len(p["rejected_ids"])) for p in pairs)
        )

    def completions(pairs) -> int:
        return sum(len(p["chosen_ids"]) + len(p["rejected_ids"]) for p in pairs)

    def packed(pairs) -> int:
        return sum(len(p["prompt_ids"]) + len(p["chosen_ids"]) + len(p["rejected_ids"]) for p in pairs)

    def unpadded(pairs) -> int:
        return sum(2 * len(p["prompt_ids"]) + len(p["chosen_ids"]) + len(p["rejected_ids"]) for p in pairs)

    def micro(fn):
        return lambda step: sum(fn(step[i : i + mb]) for i in range(0, len(step), mb))

    fwd = lambda dec, head: 2 * n_dec * dec + 2 * n_head * head  # noqa: E731
    # TRL 1.16 on CPU: its fused head scores every position of the padded batch (Triton-only compaction).
    trl = per_step(
        lambda s: 4 * fwd(padded_rows(s), padded_rows(s))
    )  # policy fwd+bwd (3x) + reference fwd (1x)
    no_pad = per_step(lambda s: 4 * fwd(unpadded(s), unpadded(s)))
    head_at_completions = per_step(lambda s: 4 * fwd(unpadded(s), completions(s)))
    shared = per_step(lambda s: 4 * fwd(packed(s), completions(s)))
    alignkit_plain = per_step(micro(lambda s: 4 * fwd(padded_rows(s), completions(s))))
    return {
        "n_dec": n_dec,
        "n_head": n_head,
        "trl": trl,
        "no_padding": no_pad,
        "head_at_completions": head_at_completions,
        "shared_prompt": shared,
        "alignkit_plain": alignkit_plain,
        # alignkit splits the same total into the training step (3 forward-equivalents) and the precompute (1)
        "alignkit_step": shared * 3 / 4,
        "alignkit_precompute_per_step": shared / 4,
        "alignkit_plain_step": alignkit_plain * 3 / 4,
        "tokens": {
            "trl_padded": per_step(padded_rows),
            "unpadded": per_step(unpadded),
            "shared": per_step(packed),
            "completion": per_step(completions),
        },
    }


def matmul_rate(seconds: float = 3.0, n: int = 2048) -> float:
    """Best fp32 GFLOP/s of an n x n matmul over ~`seconds`, all torch threads."""
    import torch

    a, b = torch.randn(n, n), torch.randn(n, n)
    for _ in range(2):
        a @ b
    best, start = 0.0, time.perf_counter()
    while time.perf_counter() - start < seconds:
        t = time.perf_counter()
        for _ in range(3):
            a @ b
        best = max(best, 3 * 2 * n**3 / (time.perf_counter() - t) / 1e9)
    return best


# ---------------------------------------------------------------------------------------------
# Children: one side each, in a fresh process
# ---------------------------------------------------------------------------------------------


def _peak_rss_mb() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # Linux: KiB


def child_alignkit(spec: dict, share_prompt: bool) -> dict:
    """alignkit.stages.dpo.run, steps 1-3 (data, model, precomputed reference, the shared loop) with the stage's
    own functions, timed; the run-folder extras (final model, evaluation) are left out."""
    import torch

    from alignkit.config import load_config
    from alignkit.data.schemas import load_preferences
    from alignkit.data.tokenize import encode_pair
    from alignkit.evaluation.monitors import default_monitors
    from alignkit.models.loading import load_model, load_tokenizer
    from alignkit.models.precision import weights_dtype
    from alignkit.stages.dpo import DPOConfig, PairExample, collate, dpo_step, precompute_reference
    from alignkit.training.loop import train, visited_indices
    from alignkit.training.reference import PRECOMPUTED
    from alignkit.training.run import RunDir

    with tempfile.TemporaryDirectory(prefix="alignkit-bench-") as out:
        cfg = load_config(
            DPOConfig,
            None,
            [
                f"model={spec['model_dir']}",
                f"train_data={spec['data_path']}",
                f"output_dir={out}/run",
                "loss=dpo",
                f"beta={BETA}",
                f"batch_size={PAIRS_PER_STEP}",
                f"micro_batch_size={spec['micro_batch_size']}",
                f"max_steps={spec['steps']}",
                f"learning_rate={spec['learning_rate']}",
                "lr_scheduler=constant",
                "warmup_steps=0",
                "weight_decay=0.0",
                "max_grad_norm=1.0",
                f"max_length={MAX_LENGTH}",
                # fp32; or bf16 as alignkit trains by default where bf16 is fast: mixed precision (fp32 master
                # weights and AdamW state, the forward under bf16 autocast), against TRL's bf16=True (the same).
                "dtype=float32" if spec["precision"] == "fp32" else "dtype=bfloat16",
                "reference=precomputed",
                f"share_prompt={str(share_prompt).lower()}",
                f"seed={SEED}",
                "log_every=1",
                "progress=false",
                "tensorboard=false",
            ],
        )
        tokenizer = load_tokenizer(cfg.model)
        rows = load_preferences(cfg.train_data, "error")
        examples = [
            PairExample(encode_pair(tokenizer, p.prompt, p.chosen, p.rejected, cfg.max_length))
            for p in rows.examples
        ]
        model = load_model(cfg.model, weights_dtype(cfg), device="cpu")
        pad_id = tokenizer.pad_token_id

        t0 = time.perf_counter()
        visited = [examples[i] for i in visited_indices(cfg, len(examples))]
        precompute_reference(cfg, model, visited, pad_id, "reference")
        precompute_s = time.perf_counter() - t0

        stamps: list[float] = []
        losses: list[float] = []
        grad_norms: list[float] = []
        rss_at_last_step: list[float] = []

        def on_log(step: int, row: dict) -> None:
            stamps.append(time.perf_counter())
            losses.append(row["loss"])
            grad_norms.append(row["grad_norm"])
            rss_at_last_step[:] = [_peak_rss_mb()]

        model.train()
        run_dir = RunDir.create(cfg.output_dir, "dpo", None)
        train(
            cfg,
            model,
            examples,
            collate_fn=lambda b: collate(b, pad_id),
            step_fn=lambda m, b: dpo_step(m, b, cfg, PRECOMPUTED),
            run=run_dir,
            on_log=on_log,
            monitors=default_monitors(cfg.loss),
        )
    return {
        "losses": losses,
        "grad_norms": grad_norms,
        "step_end_times": stamps,
        "precompute_s": precompute_s,
        "precomputed_pairs": len(visited),
        "peak_rss_mb": rss_at_last_step[0],
        "threads": torch.get_num_threads(),
    }


def child_trl(spec: dict) -> dict:
    """TRL's DPOTrainer as its docs show it, with only what the comparison needs set (see the README)."""
    import torch
    from datasets import Dataset
    from transformers import AutoTokenizer, TrainerCallback
    from trl import DPOConfig, DPOTrainer

    class Timer(TrainerCallback):
        def __init__(self):
            self.stamps, self.losses, self.grad_norms, self.rss = [], [], [], 0.0

        def on_step_end(self, args, state, control, **kwargs):
            self.stamps.append(time.perf_counter())
            self.rss = _peak_rss_mb()

        def on_log(self, args, state, control, logs=None, **kwargs):
            if logs and "loss" in logs:
                self.losses.append(float(logs["loss"]))
                self.grad_norms.append(float(logs["grad_norm"]))

    with tempfile.TemporaryDirectory(prefix="trl-bench-") as out:
        args = DPOConfig(
            output_dir=out,
            per_device_train_batch_size=PAIRS_PER_STEP,
            **trl_run_args(spec),
            beta=BETA,
            max_length=MAX_LENGTH,
            bf16=spec["precision"] == "bf16",  # TRL's default is bf16 autocast; --precision picks both sides
            # transformers refuses bf16 on a machine without a GPU unless told it trains on the CPU.
            **({"use_cpu": True} if spec["precision"] == "bf16" and not torch.cuda.is_available() else {}),
            gradient_checkpointing=False,  # TRL's default is on; the issue measures without it
            train_sampling_strategy="sequential",  # the pairs come in alignkit's visiting order
        )
        tokenizer = AutoTokenizer.from_pretrained(spec["model_dir"])
        timer = Timer()
        trainer = DPOTrainer(
            model=spec["model_dir"],
            args=args,
            train_dataset=Dataset.from_list(spec["trl_rows"]),
            processing_class=tokenizer,
            callbacks=[timer],
        )
        ids_check = _check_ids(trainer, spec)
        trainer.train()
    return {
        "losses": timer.losses,
        "grad_norms": timer.grad_norms,
        "step_end_times": timer.stamps,
        "peak_rss_mb": timer.rss,
        "threads": torch.get_num_threads(),
        "ids_check": ids_check,
    }


def trl_run_args(spec: dict) -> dict:
    """The TRL trainer arguments every side-by-side benchmark sets alike: one optimiser step per batch (no
    accumulation), spec's steps and learning rate, AdamW at a constant rate without warmup or weight decay,
    gradients clipped at 1.0, the seed, a log line per step, no checkpoints or reports."""
    return {
        "gradient_accumulation_steps": 1,
        "max_steps": spec["steps"],
        "learning_rate": spec["learning_rate"],
        "lr_scheduler_type": "constant",
        "warmup_steps": 0,
        "weight_decay": 0.0,
        "max_grad_norm": 1.0,
        "seed": SEED,
        "logging_steps": 1,
        "save_strategy": "no",
        "report_to": "none",
        "disable_tqdm": True,
    }


def _check_ids(trainer, spec: dict) -> dict:
    """TRL's token ids against alignkit's: every pair after TRL's tokenization and keep_start cut, and the first
    collated batch (input ids, attention and completion masks) against alignkit's collate_pairs."""
    from alignkit.data.collate import collate_pairs
    from alignkit.data.tokenize import EncodedPair

    ds = trainer.train_dataset
    mismatched = []
    for k, ours in enumerate(spec["alignkit_ids"]):
        p = ds[k]["prompt_ids"]
        same = p == ours["prompt_ids"] and all(
            (p + ds[k][side])[:MAX_LENGTH] == ours["prompt_ids"] + ours[side]
            for side in ("chosen_ids", "rejected_ids")
        )
        if not same:
            mismatched.append(k)
    batch = next(iter(trainer.get_train_dataloader()))
    first = [EncodedPair(**ids, truncated=False) for ids in spec["alignkit_ids"][:PAIRS_PER_STEP]]
    ours = collate_pairs(first, trainer.processing_class.pad_token_id)
    first_batch_same = (
        batch["input_ids"].shape == ours["input_ids"].shape
        and bool((batch["input_ids"].cpu() == ours["input_ids"]).all())
        and bool((batch["attention_mask"].cpu() == ours["attention_mask"]).all())
        and bool((batch["completion_mask"].cpu().bool() == ours["loss_mask"]).all())
    )
    return {
        "pairs": len(spec["alignkit_ids"]),
        "mismatched_pairs": mismatched,
        "first_batch_identical": first_batch_same,
    }


# ---------------------------------------------------------------------------------------------
# Parent: rounds, timing, the table and the summary line
# ---------------------------------------------------------------------------------------------


def add_child_arguments(ap: argparse.ArgumentParser) -> None:
    """--keep, and the hidden arguments with which ``run_child`` starts a side (``run_as_child``)."""
    ap.add_argument("--keep", type=Path, default=None, help="keep the spec, logs and child results here")
    ap.add_argument("--child", help=argparse.SUPPRESS)
    ap.add_argument("--spec", type=Path, help=argparse.SUPPRESS)
    ap.add_argument("--result", type=Path, help=argparse.SUPPRESS)


def run_as_child(args, children: dict) -> int:
    """One side, in this fresh process: ``children[args.child](spec)`` with torch on OMP_NUM_THREADS threads,
    its result written where the parent reads it."""
    spec = json.loads(args.spec.read_text())
    if os.environ.get("OMP_NUM_THREADS"):
        import torch

        torch.set_num_threads(int(os.environ["OMP_NUM_THREADS"]))
    args.result.write_text(json.dumps(children[args.child](spec)))
    return 0


def run_child(side: str, workdir: Path, round_: int, threads: int | None, script: str = __file__) -> dict:
    """``script --child side`` in a fresh process on workdir/spec.json; its result, with its wall time."""
    result = workdir / f"{side}-{round_}.json"
    log = workdir / f"{side}-{round_}.log"
    cmd = [
        sys.executable,
        script,
        "--child",
        side,
        "--spec",
        str(workdir / "spec.json"),
        "--result",
        str(result),
    ]
    env = {**os.environ, "TOKENIZERS_PARALLELISM": "false"}
    if threads:
        env["OMP_NUM_THREADS"] = env["MKL_NUM_THREADS"] = str(threads)
    started = time.perf_counter()
    with log.open("w") as f:
        code = subprocess.run(cmd, stdout=f, stderr=subprocess.STDOUT, env=env).returncode
    if code != 0:
        tail = log.read_text()[-3000:]
        raise SystemExit(f"{side} (round {round_}) failed with exit code {code}; end of {log}:\n{tail}")
    out = json.loads(result.read_text())
    out["wall_s"] = time.perf_counter() - started
    return out


def summarise(side: str, out: dict, flops: dict, rate_gflops: float) -> dict:
    """pairs/s over steps 2..N (step 1 is the warm-up); for alignkit also with the precompute amortised per pair."""
    stamps = out["step_end_times"]
    steps_s = stamps[-1] - stamps[0]
    n_timed = len(stamps) - 1
    pairs_per_s = n_timed * PAIRS_PER_STEP / steps_s
    row = {
        "side": side,
        "s_per_step": steps_s / n_timed,
        "pairs_per_s_steps": pairs_per_s,
        "peak_rss_mb": out["peak_rss_mb"],
        "losses": out["losses"],
        "grad_norms": out["grad_norms"],
        "threads": out["threads"],
        "matmul_gflops": rate_gflops,
    }
    if side.startswith("alignkit"):
        step_flops = flops["alignkit_step"] if side == "alignkit" else flops["alignkit_plain_step"]
        pre_flops = (
            flops["alignkit_precompute_per_step"] if side == "alignkit" else flops["alignkit_plain"] / 4
        )
        per_pair_s = steps_s / (n_timed * PAIRS_PER_STEP) + out["precompute_s"] / out["precomputed_pairs"]
        row["precompute_s"] = out["precompute_s"]
        row["pairs_per_s"] = 1 / per_pair_s  # what the speedup uses: the reference's forward is counted
        row["gflops_steps"] = step_flops / 1e9 / row["s_per_step"]
        row["gflops"] = (step_flops + pre_flops) / PAIRS_PER_STEP / 1e9 / per_pair_s
    else:
        row["pairs_per_s"] = pairs_per_s  # the reference forward runs inside each step
        row["gflops"] = flops["trl"] / 1e9 / row["s_per_step"]
        row["ids_check"] = out["ids_check"]
    row["utilization"] = row["gflops"] / rate_gflops
    return row


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--quick", action="store_true", help="1 round of 3 steps (a few minutes)")
    ap.add_argument("--rounds", type=int, default=None, help="alternating rounds (default 3; quick: 1)")
    ap.add_argument("--steps", type=int, default=None, help="optimiser steps per side (default 6; quick: 3)")
    ap.add_argument("--learning-rate", type=float, default=5e-6)
    ap.add_argument("--micro-batch-size", type=int, default=2, help="alignkit pairs per forward/backward")
    ap.add_argument(
        "--threads", type=int, default=None, help="torch threads, both sides (default: all cores)"
    )
    ap.add_argument(
        "--precision",
        choices=["fp32", "bf16"],
        default="fp32",
        help="fp32 on both sides, or bf16: alignkit's mixed precision against TRL's bf16=True",
    )
    ap.add_argument("--sides", default="alignkit,trl", help="comma list of alignkit, alignkit-plain, trl")
    ap.add_argument("--data", type=Path, default=HH_RLHF)
    ap.add_argument("--model", default=MODEL, help="embedded name or local model dir (both sides)")
    add_child_arguments(ap)
    args = ap.parse_args(argv)

    if args.child:
        children = {
            "trl": child_trl,
            "alignkit": lambda spec: child_alignkit(spec, share_prompt=True),
            "alignkit-plain": lambda spec: child_alignkit(spec, share_prompt=False),
        }
        return run_as_child(args, children)

    args.rounds = args.rounds or (1 if args.quick else 3)
    args.steps = args.steps or (3 if args.quick else 6)
    sides = args.sides.split(",")
    if args.threads:
        import torch

        torch.set_num_threads(args.threads)  # the matmul rate is measured with the children's thread count
    if args.steps < 2:
        raise SystemExit("--steps must be at least 2 (step 1 is the warm-up)")
    with tempfile.TemporaryDirectory(prefix="dpo-vs-trl-") as tmp:
        workdir = args.keep or Path(tmp)
        workdir.mkdir(parents=True, exist_ok=True)
        spec = prepare(args, workdir)
        flops = flop_counts(spec)
        print(
            f"{len(spec['alignkit_ids'])} HH-RLHF pairs ({spec['n_truncated']} truncated), {args.steps} steps x "
            f"{PAIRS_PER_STEP} pairs, max_length {MAX_LENGTH}, lr {args.learning_rate}, {args.rounds} round(s), "
            f"sides {sides}, {args.precision}, {os.cpu_count()} CPUs",
            flush=True,
        )
        rows: list[dict] = []
        for r in range(args.rounds):
            order = sides if r % 2 == 0 else sides[::-1]  # alternate who runs first
            for side in order:
                rate = matmul_rate()
                out = run_child(side, workdir, r, args.threads)
                row = summarise(side, out, flops, rate)
                row["round"] = r
                rows.append(row)
                print(
                    f"round {r} {side:15s} {row['s_per_step']:7.2f} s/step  {row['pairs_per_s']:6.3f} pairs/s  "
                    f"peak {row['peak_rss_mb']:7.0f} MB  util {row['utilization']:.2f}  (child wall "
                    f"{out['wall_s']:.0f} s, matmul {rate:.0f} GFLOP/s)",
                    flush=True,
                )
        if args.keep:
            (workdir / "rows.json").write_text(json.dumps({"rows": rows, "flops": flops}, indent=1))
    return report(rows, flops, sides, args.precision)


def report(rows: list[dict], flops: dict, sides: list[str], precision: str = "fp32") -> int:
    def med(side: str, key: str) -> float:
        return statistics.median(r[key] for r in rows if r["side"] == side)

    print("\nper side (median over rounds; pairs/s for alignkit includes the reference precompute per pair)")
    print(
        f"{'side':15s} {'s/step':>8s} {'pairs/s':>8s} {'pairs/s steps':>13s} {'peak RSS MB':>12s} "
        f"{'GFLOP/s':>8s} {'util':>5s} {'matmul':>7s}"
    )
    for side in sides:
        print(
            f"{side:15s} {med(side, 's_per_step'):8.2f} {med(side, 'pairs_per_s'):8.3f} "
            f"{med(side, 'pairs_per_s_steps'):13.3f} {med(side, 'peak_rss_mb'):12.0f} {med(side, 'gflops'):8.1f} "
            f"{med(side, 'utilization'):5.2f} {med(side, 'matmul_gflops'):7.0f}"
        )
    for r in rows:
        extra = f"  precompute {r['precompute_s']:.1f}s" if "precompute_s" in r else ""
        print(f"  round {r['round']} {r['side']:15s} losses {[round(x, 6) for x in r['losses']]}{extra}")
        print(f"  {'':7s} {'':15s} grad norms {[round(x, 4) for x in r['grad_norms']]}")

    t = flops["tokens"]
    print(
        f"\nFLOPs per step (matmuls only; N_dec={flops['n_dec'] / 1e6:.1f}M decoder, N_head={flops['n_head'] / 1e6:.1f}M"
        f" LM head; tokens/step: TRL padded {t['trl_padded']:.0f}, unpadded {t['unpadded']:.0f}, shared-prompt "
        f"{t['shared']:.0f}, scored {t['completion']:.0f}):"
    )
    steps = [
        ("TRL (padded 2B rows, head at every position, reference in the step)", flops["trl"]),
        ("  - padding", flops["no_padding"]),
        ("  - head only at completion tokens", flops["head_at_completions"]),
        ("  - prompt run once per pair (= alignkit, reference precomputed)", flops["shared_prompt"]),
    ]
    for name, value in steps:
        print(f"  {name:70s} {value / 1e12:7.3f} TFLOP  ({value / flops['trl']:.2f} of TRL)")

    summary = {}
    ids = [r["ids_check"] for r in rows if "ids_check" in r]
    if ids:
        bad = sorted({k for c in ids for k in c["mismatched_pairs"]})
        print(
            f"\ntoken ids: first batch identical: {all(c['first_batch_identical'] for c in ids)}; pairs whose ids "
            f"differ: {bad or 'none'} of {ids[0]['pairs']}"
        )
    if "alignkit" in sides and "trl" in sides:
        trl_losses = [r["losses"] for r in rows if r["side"] == "trl"]
        ak_losses = [r["losses"] for r in rows if r["side"] == "alignkit"]
        diff = max(abs(a - b) for x in ak_losses for y in trl_losses for a, b in zip(x, y, strict=True))
        summary = {
            "speedup": med("alignkit", "pairs_per_s") / med("trl", "pairs_per_s"),
            "memory_ratio": med("alignkit", "peak_rss_mb") / med("trl", "peak_rss_mb"),
            "utilization": med("alignkit", "utilization"),
            "max_loss_diff": diff,
        }
        print(
            f"speedup {summary['speedup']:.2f} (train steps only: "
            f"{med('alignkit', 'pairs_per_s_steps') / med('trl', 'pairs_per_s_steps'):.2f}), FLOP ratio TRL/alignkit "
            f"{flops['trl'] / flops['shared_prompt']:.2f}"
        )
        print(
            f"speedup={summary['speedup']:.2f} memory_ratio={summary['memory_ratio']:.2f} "
            f"utilization={summary['utilization']:.2f} max_loss_diff={summary['max_loss_diff']:.1e} "
            f"precision={precision}"
        )
    return 0


if __name__ == "__main__":
    sys.exit(main())
