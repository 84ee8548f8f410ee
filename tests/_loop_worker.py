"""A toy training run for tests/test_loop.py, in its own process so the tests can SIGKILL/SIGTERM it.

Also the toy pieces the tests share: examples of uneven completion lengths, their collate, and a step_fn
computing the summed next-token NLL over the completion mask.
Usage: python tests/_loop_worker.py RUN_DIR OUT.pt --max-steps 8 [--save-every 2] [--sleep 0.3] [--resume]
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

import torch
import torch.nn.functional as F

from alignkit.config import TrainConfig
from alignkit.errors import TrainingInterrupted
from alignkit.training.loop import StepOutput, train
from alignkit.training.run import RunDir

# conftest.py sits next to this file; its folder is on sys.path when run as a script or under pytest, and
# is put there anyway so importing this module from elsewhere works too.
sys.path.insert(0, str(Path(__file__).resolve().parent))
from conftest import build_tiny_model  # noqa: E402

VOCAB = 64
SEQ_LEN = 8
# Completion tokens per example (scored positions 1..7): uneven, so how the loss is normalised matters.
COMPLETION_LENGTHS = [1, 7, 2, 5, 3, 6, 1, 4]
EXIT_INTERRUPTED = 3


def make_examples() -> list[dict]:
    generator = torch.Generator().manual_seed(1234)
    ids = torch.randint(3, VOCAB, (len(COMPLETION_LENGTHS), SEQ_LEN), generator=generator)
    return [{"ids": ids[i].tolist(), "n_completion": n} for i, n in enumerate(COMPLETION_LENGTHS)]


def make_model(attention_dropout: float = 0.0):
    model = build_tiny_model(VOCAB, seed=0)
    # Dropout draws from the torch RNG, so an exact resume needs the RNG state restored.
    model.config.attention_dropout = attention_dropout
    for layer in model.model.layers:
        layer.self_attn.attention_dropout = attention_dropout
    return model


def toy_collate(examples: list[dict]) -> dict:
    input_ids = torch.tensor([e["ids"] for e in examples])  # (B, T)
    loss_mask = torch.zeros_like(input_ids)  # (B, T), 1 on the completion (the last n tokens)
    for row, e in enumerate(examples):
        loss_mask[row, SEQ_LEN - e["n_completion"] :] = 1
    return {
        "input_ids": input_ids,
        "loss_mask": loss_mask,
        "n_items": int(loss_mask.sum()),
        "n_tokens": input_ids.numel(),
    }


def toy_step(model, batch: dict) -> StepOutput:
    """Next-token NLL summed over completion tokens."""
    logits = model(input_ids=batch["input_ids"]).logits[:, :-1]  # (B, T-1, V)
    targets = batch["input_ids"][:, 1:]  # (B, T-1)
    nll = F.cross_entropy(logits.transpose(1, 2), targets, reduction="none")  # (B, T-1)
    nll_sum = (nll * batch["loss_mask"][:, 1:]).sum()
    return StepOutput(loss_sum=nll_sum, metrics={"nll": nll_sum.item()})


def toy_config(output_dir: str, **overrides) -> TrainConfig:
    defaults = dict(
        train_data="(in memory)",
        output_dir=output_dir,
        batch_size=4,
        micro_batch_size=2,
        learning_rate=1e-2,
        lr_scheduler="cosine",
        warmup_steps=2,
        max_grad_norm=1.0,
        seed=7,
        progress=False,
        report_to=["none"],
        keep_checkpoints=2,
        dtype="float32",  # the loop's invariances are checked at fp32 resolution, on any CPU
    )
    return TrainConfig(**{**defaults, **overrides})


def main() -> int:
    parser = argparse.ArgumentParser()
    parser.add_argument("run_dir")
    parser.add_argument("out")
    parser.add_argument("--max-steps", type=int, required=True)
    parser.add_argument("--save-every", type=int, default=0)
    parser.add_argument("--sleep", type=float, default=0.0, help="seconds to wait after each step")
    parser.add_argument("--resume", action="store_true")
    args = parser.parse_args()

    cfg = toy_config(
        args.run_dir,
        max_steps=args.max_steps,
        save_every=args.save_every or None,
        resume_from="latest" if args.resume else None,
        num_threads=1,
    )
    model = make_model(attention_dropout=0.1)
    run = RunDir.create(cfg.output_dir, "toy", cfg.resume_from)
    try:
        train(
            cfg,
            model,
            make_examples(),
            toy_collate,
            toy_step,
            run,
            on_log=lambda step, row: time.sleep(args.sleep),
        )
    except TrainingInterrupted as err:
        print(f"INTERRUPTED {err.checkpoint}", flush=True)
        return EXIT_INTERRUPTED
    torch.save({name: p.detach() for name, p in model.named_parameters()}, args.out)
    return 0


if __name__ == "__main__":
    sys.exit(main())
