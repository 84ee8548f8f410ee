"""`alignkit quickstart`: the main job on the embedded default model.

Composes stages (a pipeline sits above them, so no stage imports another): prepare the embedded
model, fine-tune it on alignkit's own demonstrations, and report held-in and held-out loss before
and after plus sample answers. Later stages of the pipeline are added here as they land.
"""

from __future__ import annotations

import json
import sys
import time
from dataclasses import dataclass
from importlib.resources import files

from alignkit.config import doc_field
from alignkit.stages import sft

DEMO_SFT = str(files("alignkit") / "assets" / "demo_sft.jsonl")
N_DEMO_TRAIN, N_DEMO = 40, 48  # rows 0-39 train, rows 40-47 are held out


@dataclass
class QuickstartConfig:
    """The main job. Every field has a default; override any with key=value."""

    model: str = doc_field("smollm2-135m-instruct", "Model to align (embedded default, hub id or local dir).")
    output_dir: str = doc_field("runs/quickstart-{time}", "Folder for this run and its stages.")
    sft_epochs: int = doc_field(3, "Passes over the 40 training demonstrations.")
    sft_learning_rate: float = doc_field(3e-5, "SFT peak learning rate.")
    sft_batch_size: int = doc_field(8, "Demonstrations per optimizer step.")
    lora: bool = doc_field(False, "LoRA adapters instead of full fine-tuning.")
    seed: int = doc_field(0, "Seed for data order and sampling.")
    sample_prompts: int = doc_field(
        3, "Held-out prompts answered by the model before and after, shown at the end."
    )
    progress: bool = doc_field(True, "Show progress bars.")


CONFIG = QuickstartConfig
PRINTS_RESULTS = True  # the CLI shows our table instead of the raw JSON summary


def _say(msg: str) -> None:
    print(f"[quickstart] {msg}", file=sys.stderr, flush=True)


def _answers(model_dir: str, prompts: list, n: int) -> list[str]:
    from alignkit.data.tokenize import encode_prompt
    from alignkit.models.generation import SamplingConfig, generate
    from alignkit.models.loading import load_model, load_tokenizer

    tokenizer = load_tokenizer(model_dir)
    model = load_model(model_dir)
    ids = [encode_prompt(tokenizer, p) for p in prompts[:n]]
    outs = generate(model, tokenizer, ids, SamplingConfig(max_new_tokens=64, temperature=0.0), progress=False)
    return [o.text for o in outs]


def run(cfg: QuickstartConfig) -> dict:
    from alignkit.config import load_config, save_config
    from alignkit.data.schemas import load_sft
    from alignkit.models.loading import resolve_model
    from alignkit.training.run import RunDir

    started = time.time()
    root = RunDir.create(cfg.output_dir, "quickstart", None)
    save_config(cfg, root.config_path)
    _say(f"run folder: {root.path}")

    # 1. The model (the embedded default is dequantised once into the cache).
    _say(f"preparing model {cfg.model}")
    model_path = resolve_model(cfg.model)

    # 2. Supervised fine-tuning on our own demonstrations; 8 of them held out.
    _say(f"SFT on {N_DEMO_TRAIN} demonstrations, {cfg.sft_epochs} epochs")
    sft_cfg = load_config(
        sft.SFTConfig,
        None,
        [],
        model=model_path,
        train_data=DEMO_SFT,
        train_rows=[0, N_DEMO_TRAIN],
        eval_data=DEMO_SFT,
        eval_rows=[N_DEMO_TRAIN, N_DEMO],
        epochs=cfg.sft_epochs,
        learning_rate=cfg.sft_learning_rate,
        batch_size=cfg.sft_batch_size,
        micro_batch_size=cfg.sft_batch_size,
        warmup_steps=2,
        lora=cfg.lora,
        seed=cfg.seed,
        output_dir=str(root.path / "sft"),
        progress=cfg.progress,
        save_every=None,
    )
    sft_summary = sft.run(sft_cfg)

    # 3. What the model answers on held-out prompts, before and after.
    held_out = load_sft(DEMO_SFT, rows=(N_DEMO_TRAIN, N_DEMO)).examples
    prompts = [ex.prompt for ex in held_out]
    _say("sampling answers to held-out prompts (greedy) before and after")
    before = _answers(model_path, prompts, cfg.sample_prompts)
    after = _answers(sft_summary["final_model"], prompts, cfg.sample_prompts)

    summary = {
        "model": cfg.model,
        "run_dir": str(root.path),
        "sft": {
            "final_model": sft_summary["final_model"],
            "steps": sft_summary["steps"],
            "held_in_loss_before": sft_summary["train_loss_before"],
            "held_in_loss_after": sft_summary["train_loss_after"],
            "held_out_loss_before": sft_summary.get("eval_loss_before"),
            "held_out_loss_after": sft_summary.get("eval_loss"),
            "train_seconds": sft_summary["train_seconds"],
            "peak_rss_mb": sft_summary["peak_rss_mb"],
        },
        "samples": [{"prompt": p, "before": b, "after": a} for p, b, a in zip(prompts, before, after)],
        "wall_seconds": time.time() - started,
    }
    root.write_summary(summary)
    _print_table(summary)
    return summary


def _print_table(summary: dict) -> None:
    s = summary["sft"]
    rows = [
        ("held-in loss (40 demos)", s["held_in_loss_before"], s["held_in_loss_after"]),
        ("held-out loss (8 demos)", s["held_out_loss_before"], s["held_out_loss_after"]),
    ]
    print("\nalignkit quickstart: results")
    print(f"{'metric':<28}{'before':>10}{'after':>10}")
    for name, before, after in rows:
        fmt = lambda v: f"{v:10.3f}" if isinstance(v, float) else f"{'-':>10}"  # noqa: E731
        print(f"{name:<28}{fmt(before)}{fmt(after)}")
    print(f"SFT: {s['steps']} steps in {s['train_seconds']:.0f} s, peak RSS {s['peak_rss_mb']:.0f} MB")
    for sample in summary["samples"]:
        print(
            f"\nQ: {sample['prompt'] if isinstance(sample['prompt'], str) else json.dumps(sample['prompt'])}"
        )
        print(f"  before: {sample['before']}")
        print(f"  after:  {sample['after']}")
    print(f"\nrun folder: {summary['run_dir']} (summary.json, sft/metrics.jsonl, sft/final/)")
    print(f"wall time: {summary['wall_seconds']:.0f} s")
