"""One SmolLM2 DPO run on a GPU in alignkit's default precision there (bf16 mixed: fp32 master weights, bf16
autocast), printing its training tokens/s and model FLOPs utilisation (MFU). Part of benchmarks/gpu_check.sh.

    python benchmarks/gpu_dpo_mfu.py --steps 30 --data ../shared/data/hh-rlhf/harmless-base-test.jsonl.gz

MFU = tokens/s x 6 N / peak, with N the model's parameters (6 N FLOPs per token: forward 2 N, backward 4 N; the
reference's log-probs are precomputed before the steps, so none are spent in them; attention's FLOPs are left
out, as in PaLM's definition) and peak the GPU's dense bf16 rate from the table below (unknown GPU: --peak-tflops).
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import tempfile
from pathlib import Path

# Dense bf16 TFLOP/s (no sparsity) from the vendors' data sheets, by a substring of torch's device name.
PEAK_BF16_TFLOPS = {
    "H200": 989.0,
    "H100 SXM": 989.0,
    "H100 80GB HBM3": 989.0,  # how torch names the SXM card
    "H100 NVL": 835.0,
    "H100 PCIe": 756.0,
    "H100": 756.0,  # a name without the form factor: the lower one, so MFU is not understated
    "A100": 312.0,
    "L40S": 362.0,
    "L4": 121.0,
    "A10G": 70.0,
    "A10": 125.0,
    "RTX 4090": 165.0,
}


def peak_tflops(device_name: str) -> float | None:
    """The dense bf16 peak of a GPU by its name, the most specific entry first; None when not in the table."""
    for key in sorted(PEAK_BF16_TFLOPS, key=len, reverse=True):
        if key in device_name:
            return PEAK_BF16_TFLOPS[key]
    return None


def mfu(tokens_per_s: float, n_params: int, peak: float) -> float:
    """Model FLOPs utilisation of a training step: 6 N FLOPs per token over ``peak`` TFLOP/s."""
    return tokens_per_s * 6 * n_params / (peak * 1e12)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--steps", type=int, default=30)
    ap.add_argument("--data", default=str(Path(__file__).resolve().parents[1].parent / "shared" / "data" / "hh-rlhf"
                                          / "harmless-base-test.jsonl.gz"))
    ap.add_argument("--model", default="smollm2-135m-instruct")
    ap.add_argument("--peak-tflops", type=float, default=None, help="the GPU's dense bf16 peak, if not in the table")
    args = ap.parse_args(argv)

    import torch

    from alignkit.cli import main as alignkit
    from alignkit.models.loading import count_parameters, load_model
    from alignkit.models.precision import pick_dtype

    if not torch.cuda.is_available():
        print("no CUDA GPU: nothing to measure", file=sys.stderr)
        return 1
    name = torch.cuda.get_device_name()
    peak = args.peak_tflops or peak_tflops(name)
    dtype = pick_dtype("auto", "cuda", "train")
    with tempfile.TemporaryDirectory(prefix="gpu-dpo-") as out:
        code = alignkit(
            [
                "dpo",
                f"model={args.model}",
                f"train_data={args.data}",
                "on_bad_row=skip",
                f"max_steps={args.steps}",
                "batch_size=8",
                "micro_batch_size=4",
                "max_length=512",
                "learning_rate=1e-5",
                "dtype=auto",  # bf16 mixed precision on a GPU with bf16
                f"output_dir={out}/run",
                "progress=false",
                "tensorboard=false",
            ]
        )
        if code != 0:
            return code
        rows = [json.loads(line) for line in (Path(out) / "run" / "metrics.jsonl").read_text().splitlines()]
        rates = [r["tokens_per_s"] for r in rows if "tokens_per_s" in r][1:]  # step 1 is the warm-up
        final = load_model(str(Path(out) / "run" / "final"), "float32", device="cpu")
        _, n_params = count_parameters(final)
        first, last = rows[0]["loss"], [r for r in rows if "loss" in r][-1]["loss"]
    tokens_per_s = statistics.median(rates)
    line = f"gpu={name!r} dtype={str(dtype).removeprefix('torch.')}-mixed tokens_per_s={tokens_per_s:,.0f}"
    line += f" params={n_params / 1e6:.0f}M loss {first:.4f} -> {last:.4f}"
    line += f" mfu={mfu(tokens_per_s, n_params, peak):.3f}" if peak else " mfu=? (pass --peak-tflops)"
    print(line)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
