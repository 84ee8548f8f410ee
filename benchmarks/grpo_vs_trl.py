"""GRPO on CPU, alignkit against TRL 1.16's GRPOTrainer side by side: seconds per iteration, peak RSS, and the
first step's loss on identical samples.

Same model (the embedded SmolLM2-135M-Instruct; fp32 on both sides, or bf16 with --precision bf16), the same
prompts in the same order (the shipped arithmetic task, as `alignkit make-task arithmetic` writes it), group size,
max new tokens, loss (DAPO token aggregation, epsilon 0.2), beta, rewards (``exact_answer`` + ``format_adherence``)
and optimiser (AdamW, constant lr, clip 1.0); each side runs `iterations` steps in a fresh subprocess, alternating
over rounds. How to run it and what each number means: benchmarks/README.md. The last line printed is the summary.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from dpo_vs_trl import (  # noqa: E402
    _peak_rss_mb,
    add_child_arguments,
    matmul_params,
    run_as_child,
    run_child,
    trl_run_args,
)

MODEL = "smollm2-135m-instruct"
PROMPTS_PER_STEP = 4
NUM_GENERATIONS = 4
MAX_NEW_TOKENS = 64
BETA = 0.04
EPSILON = 0.2
SEED = 0
# The task's reward, and its format reward (so that groups have a spread, and the first loss is not 0), summed.
REWARDS = ("exact_answer", "format_adherence")


# ---------------------------------------------------------------------------------------------
# Shared setup: the prompts, in alignkit's visiting order
# ---------------------------------------------------------------------------------------------


def prepare(args, workdir: Path) -> dict:
    """Write the task's training problems (one per prompt slot of the run) and the spec both children read."""
    from alignkit.data.tokenize import encode_prompt
    from alignkit.models.loading import load_tokenizer, resolve_model
    from alignkit.stages import make_task
    from alignkit.training.online import iteration_prompts

    data_path = workdir / "arithmetic.jsonl"
    n = args.steps * PROMPTS_PER_STEP
    make_task.run(make_task.MakeTaskConfig(output=str(data_path), n=n, held_out=0, seed=SEED, overwrite=True))
    rows = [json.loads(line) for line in data_path.read_text().splitlines()]
    # alignkit draws iteration_prompts(n, 4, unit, seed) at each unit; TRL reads the rows in that order, unshuffled,
    # so step k samples the same four prompts on both sides.
    order = [i for unit in range(args.steps) for i in iteration_prompts(n, PROMPTS_PER_STEP, unit, SEED)]
    model_dir = resolve_model(args.model)
    tokenizer = load_tokenizer(model_dir)
    spec = {
        "model_dir": model_dir,
        "data_path": str(data_path),
        "workdir": str(workdir),
        "steps": args.steps,
        "learning_rate": args.learning_rate,
        "micro_batch_size": args.micro_batch_size,
        "trl_micro_batch_size": args.trl_micro_batch_size,
        "precision": args.precision,
        "trl_rows": [{"prompt": [{"role": "user", "content": rows[i]["prompt"]}], "answer": rows[i]["answer"]}
                     for i in order],  # fmt: skip
        "prompt_ids": {rows[i]["prompt"]: encode_prompt(tokenizer, rows[i]["prompt"]) for i in order},
    }
    (workdir / "spec.json").write_text(json.dumps(spec))
    return spec


def alignkit_overrides(spec: dict, out: str, share_prompt_cache: bool = True) -> list[str]:
    """The GRPO config of the comparison, as `alignkit grpo` key=value overrides; ``share_prompt_cache=False``:
    the alignkit-plain side, every sample prefilling its own copy of the prompt as TRL's generate does."""
    rows = PROMPTS_PER_STEP * NUM_GENERATIONS
    return [
        f"model={spec['model_dir']}", f"train_data={spec['data_path']}", f"output_dir={out}/run",
        "reward=[" + ", ".join(f"alignkit.scoring.verifiable:{name}" for name in REWARDS) + "]",
        f"iterations={spec['steps']}", f"prompts_per_iteration={PROMPTS_PER_STEP}",
        f"num_generations={NUM_GENERATIONS}", f"max_new_tokens={MAX_NEW_TOKENS}", "temperature=1.0", "top_p=1.0",
        "advantage=grpo", "loss_aggregation=token", "importance_sampling=token", f"epsilon_low={EPSILON}",
        f"epsilon_high={EPSILON}", f"beta={BETA}", "num_iterations=1",
        f"minibatch_size={rows}",  # one optimizer step per iteration, as TRL's (one generation per step)
        f"micro_batch_size={spec['micro_batch_size']}", f"generation_batch_size={rows}",
        f"learning_rate={spec['learning_rate']}", "lr_scheduler=constant", "warmup_steps=0", "weight_decay=0.0",
        "max_grad_norm=1.0", "gradient_checkpointing=false",
        # fp32; or bf16 as alignkit runs by default where bf16 is fast: mixed precision (fp32 master weights and
        # AdamW state, every forward, sampling included, under bf16 autocast), against TRL's bf16=True (the same).
        "dtype=float32" if spec["precision"] == "fp32" else "dtype=bfloat16", f"seed={SEED}", "log_every=1",
        "progress=false", "tensorboard=false", f"share_prompt_cache={str(share_prompt_cache).lower()}",
    ]  # fmt: skip


# ---------------------------------------------------------------------------------------------
# Children: one side each, in a fresh process
# ---------------------------------------------------------------------------------------------


def child_alignkit(spec: dict, share_prompt_cache: bool = True) -> dict:
    """`alignkit grpo` itself (stages.grpo.run), its per-iteration times read from the run's metrics."""
    import torch

    from alignkit.config import load_config
    from alignkit.stages import grpo

    with tempfile.TemporaryDirectory(prefix="alignkit-bench-") as out:
        cfg = load_config(grpo.GRPOConfig, None, alignkit_overrides(spec, out, share_prompt_cache))
        summary = grpo.run(cfg)
        lines = (Path(summary["run_dir"]) / "metrics.jsonl").read_text().splitlines()
        rows = [r for r in map(json.loads, lines) if "event" not in r and "loss" in r]
    return {
        "elapsed_s": [r["elapsed_s"] for r in rows],  # at the end of each iteration, from the loop's start
        "rollout_s": [r["rollout_s"] for r in rows],  # generate, score, no-grad passes, advantages
        "update_s": [r["update_s"] for r in rows],
        "losses": [r["loss"] for r in rows],
        "peak_rss_mb": summary["peak_rss_mb"],
        "threads": torch.get_num_threads(),
    }


def child_trl(spec: dict) -> dict:
    """TRL's GRPOTrainer as its docs show it, with only what the comparison needs set (see the README); its
    first step's batch and loss are recorded through the public ``compute_loss`` and the reward function."""
    import torch
    from datasets import Dataset
    from transformers import AutoTokenizer, TrainerCallback
    from trl import GRPOConfig, GRPOTrainer

    from alignkit.scoring import verifiable

    first: dict = {}
    rewards: list[list[float]] = []  # every call's scores, the reward functions in turn

    def exact_answer(prompts, completions, answer, completion_ids, **kwargs) -> list[float]:
        if not first:  # the first generation batch in its order (groups consecutive), as alignkit lays it out
            first["prompts"] = [p[-1]["content"] for p in prompts]
            first["completion_ids"] = [list(ids) for ids in completion_ids]
        rewards.append([verifiable.exact_answer("", c[0]["content"], a) for c, a in zip(completions, answer)])
        return rewards[-1]

    def format_adherence(prompts, completions, **kwargs) -> list[float]:
        rewards.append([verifiable.format_adherence(p[-1]["content"], c[0]["content"])
                        for p, c in zip(prompts, completions)])  # fmt: skip
        return rewards[-1]

    rows = PROMPTS_PER_STEP * NUM_GENERATIONS  # completions per step
    accumulation = rows // spec["trl_micro_batch_size"]
    micro: list[float] = []  # the first optimizer step's micro-batch losses

    class FirstStep(GRPOTrainer):
        def compute_loss(self, model, inputs, *args, **kwargs):
            loss = super().compute_loss(model, inputs, *args, **kwargs)
            if len(micro) < accumulation:  # TRL's first step, and its rows (shuffled by TRL), unpadded
                pm, cm = inputs["prompt_mask"].bool(), inputs["completion_mask"].bool()
                first.setdefault("trained_prompt_ids", []).extend(
                    row[m].tolist() for row, m in zip(inputs["prompt_ids"], pm)
                )
                first.setdefault("trained_completion_ids", []).extend(
                    row[m].tolist() for row, m in zip(inputs["completion_ids"], cm)
                )
                # DAPO divides each micro-batch's token sum by the whole step's token count (TRL's
                # num_items_in_batch), so the step's loss is the sum of its micro-batches'.
                micro.append(float(loss.detach()))
                if len(micro) == accumulation:
                    first["loss"] = sum(micro)
            return loss

    class Timer(TrainerCallback):
        def __init__(self):
            self.stamps, self.rss = [], 0.0

        def on_step_end(self, args, state, control, **kwargs):
            self.stamps.append(time.perf_counter())
            self.rss = _peak_rss_mb()

    with tempfile.TemporaryDirectory(prefix="trl-bench-") as out:
        args = GRPOConfig(
            output_dir=out,
            # One optimizer step over the 16 completions: in one forward (TRL's layout, the default), or in
            # micro-batches of --trl-micro-batch-size, accumulated.
            per_device_train_batch_size=spec["trl_micro_batch_size"],
            **(trl_run_args(spec) | {"gradient_accumulation_steps": accumulation}),
            num_generations=NUM_GENERATIONS,
            max_completion_length=MAX_NEW_TOKENS,
            temperature=1.0,
            top_p=1.0,
            loss_type="dapo",
            epsilon=EPSILON,
            beta=BETA,
            num_iterations=1,
            bf16=spec["precision"] == "bf16",  # TRL's default is bf16 autocast; --precision picks both sides
            use_cpu=not torch.cuda.is_available(),
            gradient_checkpointing=False,  # TRL's default is on; alignkit's off: both off
            shuffle_dataset=False,  # the prompts come in alignkit's visiting order
        )
        timer = Timer()
        trainer = FirstStep(
            model=spec["model_dir"],
            reward_funcs=[exact_answer, format_adherence],
            args=args,
            train_dataset=Dataset.from_list(spec["trl_rows"]),
            processing_class=AutoTokenizer.from_pretrained(spec["model_dir"]),
            callbacks=[timer],
        )
        trainer.train()
    first["rewards"] = [sum(parts) for parts in zip(*rewards[: len(REWARDS)])]  # TRL's sum, weights 1
    return {"step_end_times": timer.stamps, "peak_rss_mb": timer.rss, "threads": torch.get_num_threads(),
            "first": first}  # fmt: skip


def child_loss(spec: dict) -> dict:
    """alignkit's loss on TRL's first batch (its prompts, completions and rewards, in generation order), with the
    stage's own functions: collate -> no-grad policy and reference passes -> advantages -> the on-policy update's
    loss. TRL trains on the batch's rows shuffled; the loss, a sum over tokens, does not depend on their order."""
    import torch

    from alignkit.config import load_config
    from alignkit.models.generation import Generation
    from alignkit.models.loading import load_model, load_tokenizer
    from alignkit.models.precision import of_config, weights_dtype
    from alignkit.stages import grpo
    from alignkit.training.reference import load_reference
    from alignkit.training.rollout import collate_samples, shared_rollout_passes

    first = json.loads((Path(spec["workdir"]) / "trl-0.json").read_text())["first"]
    cfg = load_config(grpo.GRPOConfig, None, alignkit_overrides(spec, spec["workdir"]))
    tokenizer = load_tokenizer(cfg.model)

    def load():
        return load_model(cfg.model, weights_dtype(cfg), device="cpu")

    policy, reference = load(), load_reference("copy", load)
    prompt_ids = [spec["prompt_ids"][p] for p in first["prompts"]]  # alignkit's encoding of each prompt
    samples = [
        Generation(p, c, "", c[-1:] == [tokenizer.eos_token_id]) for p, c in zip(prompt_ids, first["completion_ids"])
    ]
    batch = collate_samples(samples, tokenizer.pad_token_id, torch.device("cpu"))
    passes = shared_rollout_passes(cfg, policy, reference, None, batch, 0, 1)
    rollout, _ = grpo.make_rollout(cfg, batch, passes, torch.tensor(first["rewards"]))
    everything = list(range(len(samples)))
    totals = {"n_sequences": float(len(samples)), "n_tokens": float(rollout.mask.sum()), "on_policy": True}
    with torch.no_grad(), of_config(cfg, "cpu").autocast():  # as the update's step computes it
        loss, _ = grpo.grpo_loss(cfg, policy, rollout.rows(everything, **totals), cfg.beta)
    # The same rows as TRL trained on: its prompt ids (its chat template) and completions, as multisets.
    same = sorted(zip(prompt_ids, first["completion_ids"])) == sorted(
        zip(first["trained_prompt_ids"], first["trained_completion_ids"])
    )
    return {"loss": float(loss), "trl_loss": first["loss"], "rewards": first["rewards"], "same_rows": same}


# ---------------------------------------------------------------------------------------------
# The levers: matmul FLOPs of one iteration on the first batch, each way of computing it
# ---------------------------------------------------------------------------------------------


def lever_flops(model_dir: str, first: dict, micro_batch_size: int) -> dict:
    """Matmul FLOPs of one iteration on TRL's first batch (a forward per token 2 N_dec, plus 2 N_head where the
    head is applied; backward twice the forward), as TRL computes it and as alignkit does, and what each lever
    changes. Both generate with transformers' generate on one left-padded batch of B rows (alignkit: the 16
    samples are one generation batch), every row stepping until the longest is done; alignkit prefills each
    group's prompt once."""
    n_dec, n_head = matmul_params(model_dir)
    prompts = [len(p) for p in first["trained_prompt_ids"]]
    replies = [len(c) for c in first["trained_completion_ids"]]
    B, G = len(prompts), len(prompts) // NUM_GENERATIONS
    P, C = max(prompts), max(replies)
    fwd = lambda dec, head: 2 * n_dec * dec + 2 * n_head * head  # noqa: E731
    prefill, decode = fwd(B * P, B), fwd(B * C, B * C)
    # alignkit (models.generation.shared_prompt_cache): each group's prompt but its last token through the decoder
    # once, no head; the cache copied to the group's rows; generate then runs each row's last prompt token.
    shared_prefill = fwd(G * (P - 1), 0) + fwd(B, B)
    # TRL: B rows padded to P + C, the head at the completion positions only (logits_to_keep); the update's
    # forward and backward (3 forwards) and the reference's forward; no old-log-prob pass when on policy.
    trl_pass = fwd(B * (P + C), B * C)
    # alignkit: rows right-padded, cut per micro-batch of similar length to its longest; head at response tokens.
    lengths = sorted(p + r for p, r in zip(prompts, replies))
    cut = sum(max(lengths[s : s + micro_batch_size]) * len(lengths[s : s + micro_batch_size])
              for s in range(0, B, micro_batch_size))  # fmt: skip
    ak_pass = fwd(cut, sum(replies))
    ref = BETA > 0
    out = {
        "generation": prefill + decode,
        "prefill": prefill,
        "shared_prefill_saves": prefill - shared_prefill,
        "trl_training": (3 + ref) * trl_pass,
        # On policy (num_iterations=1, one minibatch) neither side makes a no-grad policy pass for the old
        # log-probs: the update's pass is the sampler's (alignkit: grpo.trains_on_policy_only).
        "alignkit_training": (3 + ref) * ak_pass,
        "padding_saves": (3 + ref) * (trl_pass - ak_pass),
        "old_logp_pass": ak_pass,
        "reference_pass": ak_pass if ref else 0,
        "tokens": {"prefill_padded": B * P, "prefill_shared": G * P, "decode": B * C, "trl_pass": B * (P + C),
                   "alignkit_pass": cut, "scored": sum(replies)},  # fmt: skip
    }
    out["trl"] = out["generation"] + out["trl_training"]
    out["alignkit"] = out["generation"] - out["shared_prefill_saves"] + out["alignkit_training"]
    return out


# ---------------------------------------------------------------------------------------------
# Parent: rounds, timing, the table and the summary line
# ---------------------------------------------------------------------------------------------


def summarise(side: str, out: dict) -> dict:
    """Seconds per iteration over iterations 2..N (the first is the warm-up)."""
    if side.startswith("alignkit"):
        stamps = out["elapsed_s"]
    else:
        stamps = out["step_end_times"]
    row = {"side": side, "s_per_step": (stamps[-1] - stamps[0]) / (len(stamps) - 1), "peak_rss_mb": out["peak_rss_mb"]}
    if side.startswith("alignkit"):
        row["rollout_s"] = statistics.fmean(out["rollout_s"][1:])
        row["update_s"] = statistics.fmean(out["update_s"][1:])
    return row | {"threads": out["threads"]}


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--quick", action="store_true", help="1 round of 2 iterations (the second timed)")
    ap.add_argument("--rounds", type=int, default=None, help="alternating rounds (default 3; quick: 1)")
    ap.add_argument("--steps", type=int, default=None, help="iterations per side (default 5; quick: 2)")
    ap.add_argument("--learning-rate", type=float, default=1e-6)
    ap.add_argument("--micro-batch-size", type=int, default=8, help="alignkit rows per forward/backward")
    ap.add_argument("--trl-micro-batch-size", type=int, default=16,
                    help="TRL rows per forward/backward (per_device_train_batch_size, accumulated to 16)")  # fmt: skip
    ap.add_argument("--threads", type=int, default=None, help="torch threads, both sides (default: all cores)")
    ap.add_argument("--model", default=MODEL, help="embedded name or local model dir (both sides)")
    ap.add_argument("--precision", choices=["fp32", "bf16"], default="fp32",
                    help="fp32 on both sides, or bf16: alignkit's mixed precision against TRL's bf16=True")  # fmt: skip
    ap.add_argument("--sides", default="trl,alignkit",
                    help="trl,alignkit and optionally alignkit-plain (share_prompt_cache=false)")  # fmt: skip
    add_child_arguments(ap)
    args = ap.parse_args(argv)

    if args.child:  # one side, in this fresh process
        children = {
            "alignkit": child_alignkit,
            "alignkit-plain": lambda spec: child_alignkit(spec, share_prompt_cache=False),
            "trl": child_trl,
            "loss": child_loss,
        }
        return run_as_child(args, children)

    args.rounds = args.rounds or (1 if args.quick else 3)
    args.steps = args.steps or (2 if args.quick else 5)
    if args.steps < 2:
        raise SystemExit("--steps must be at least 2 (iteration 1 is the warm-up)")
    rows = PROMPTS_PER_STEP * NUM_GENERATIONS
    for name in ("micro_batch_size", "trl_micro_batch_size"):
        if getattr(args, name) < 1 or rows % getattr(args, name):
            raise SystemExit(f"--{name.replace('_', '-')} must divide the {rows} completions of a step")
    sides = args.sides.split(",")
    if not {"trl", "alignkit"} <= set(sides) <= {"trl", "alignkit", "alignkit-plain"}:
        raise SystemExit(f"--sides {args.sides}: trl, alignkit and optionally alignkit-plain, comma-separated")
    sides = ["trl"] + [s for s in sides if s != "trl"]  # TRL first: the loss child reads its first batch
    with tempfile.TemporaryDirectory(prefix="grpo-vs-trl-") as tmp:
        workdir = args.keep or Path(tmp)
        workdir.mkdir(parents=True, exist_ok=True)
        spec = prepare(args, workdir)
        print(
            f"arithmetic task, {args.steps} iterations x {PROMPTS_PER_STEP} prompts x {NUM_GENERATIONS} samples, "
            f"max_new_tokens {MAX_NEW_TOKENS}, beta {BETA}, loss dapo/token, lr {args.learning_rate}, "
            f"{args.rounds} round(s), {args.precision}, micro-batches alignkit {args.micro_batch_size} / TRL "
            f"{args.trl_micro_batch_size}, {os.cpu_count()} CPUs, OMP_NUM_THREADS="
            f"{os.environ.get('OMP_NUM_THREADS', 'unset')}",
            flush=True,
        )
        rows: list[dict] = []
        for r in range(args.rounds):
            for side in sides if r % 2 == 0 else sides[::-1]:  # alternate who runs first
                out = run_child(side, workdir, r, args.threads, __file__)
                row = summarise(side, out) | {"round": r}
                rows.append(row)
                print(f"round {r} {side:14s} {row['s_per_step']:7.2f} s/iteration  peak {row['peak_rss_mb']:7.0f} MB"
                      f"  (child wall {out['wall_s']:.0f} s)", flush=True)  # fmt: skip
        loss = run_child("loss", workdir, 0, args.threads, __file__)
        first = json.loads((workdir / "trl-0.json").read_text())["first"]
        flops = lever_flops(spec["model_dir"], first, args.micro_batch_size)
    return report(rows, loss, flops, args.precision)


def report(rows: list[dict], loss: dict, flops: dict, precision: str = "fp32") -> int:
    def med(side: str, key: str) -> float:
        return statistics.median(r[key] for r in rows if r["side"] == side)

    print("\nper side (median over rounds, iterations 2..N)")
    print(f"{'side':14s} {'s/iteration':>11s} {'peak RSS MB':>12s}")
    sides = [s for s in ("alignkit", "alignkit-plain", "trl") if any(r["side"] == s for r in rows)]
    for side in sides:
        print(f"{side:14s} {med(side, 's_per_step'):11.2f} {med(side, 'peak_rss_mb'):12.0f}")
    for side in sides[:-1]:
        print(f"{side} per iteration: rollout (generate, score, no-grad passes) {med(side, 'rollout_s'):.2f} s, "
              f"update {med(side, 'update_s'):.2f} s")  # fmt: skip
    if "alignkit-plain" in sides:
        print(f"shared prompt prefill, measured: rollout {med('alignkit-plain', 'rollout_s'):.2f} -> "
              f"{med('alignkit', 'rollout_s'):.2f} s, iteration x{med('alignkit-plain', 's_per_step') / med('alignkit', 's_per_step'):.2f}")  # fmt: skip

    t, trl = flops["tokens"], flops["trl"]
    print(
        f"\nlevers: matmul FLOPs of one iteration on the first batch (tokens: prefill {t['prefill_padded']} padded, "
        f"{t['prefill_shared']} shared; decode {t['decode']}; a training pass TRL {t['trl_pass']}, alignkit "
        f"{t['alignkit_pass']}; scored {t['scored']})"
    )
    lines = [
        ("TRL (generate + reference pass + update, padded)", trl),
        ("  of which generation", flops["generation"]),
        ("  of which the prompt's prefill", flops["prefill"]),
        ("shared prompt (encode once, expand the KV cache): taken", -flops["shared_prefill_saves"]),
        ("no padding waste (micro-batches cut to their longest): taken", -flops["padding_saves"]),
        ("old log-probs from the update's pass on policy: taken (TRL too; saves)", -flops["old_logp_pass"]),
        ("no reference pass at beta=0: n/a at beta 0.04 (both would save)", -flops["reference_pass"]),
        ("alignkit", flops["alignkit"]),
    ]
    for name, value in lines:
        print(f"  {name:72s} {value / 1e12:+7.3f} TFLOP  ({value / trl:+.3f} of TRL)")

    print(f"\nfirst step's loss on TRL's samples (rewards {loss['rewards']}): TRL {loss['trl_loss']:.8f}, "
          f"alignkit {loss['loss']:.8f}; the same token ids as TRL trained on: {loss['same_rows']}")  # fmt: skip
    speedup = med("trl", "s_per_step") / med("alignkit", "s_per_step")
    memory_ratio = med("alignkit", "peak_rss_mb") / med("trl", "peak_rss_mb")
    print(f"speedup={speedup:.2f} memory_ratio={memory_ratio:.2f} max_loss_diff={abs(loss['loss'] - loss['trl_loss']):.1e}"
          + ("" if precision == "fp32" else f" precision={precision}"))
    return 0


if __name__ == "__main__":
    sys.exit(main())
