"""bf16 against fp32 per use on this machine: a mixed-precision training step, HF generate, a scoring forward.

    python benchmarks/dtype_per_use.py                     # the tiny model and SmolLM2-135M, 2 threads
    python benchmarks/dtype_per_use.py --models tiny --threads 1 --repeats 2

Prints one table row per (model, use, dtype) with its rate, and bf16's speed relative to fp32: the numbers
behind ``alignkit.models.precision.AUTO_WHERE_BF16_IS_FAST`` (what ``dtype=auto`` picks for each use). Run it on
a quiet machine: these are wall-clock rates.
"""

from __future__ import annotations

import argparse
import copy
import time

import torch

from alignkit.models import precision
from alignkit.models.loading import load_model, load_tokenizer

TINY = dict(hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2)


def tiny_model():
    """A 2-layer Llama built from a config (no download): the test suite's scale."""
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(0)
    return LlamaForCausalLM(LlamaConfig(vocab_size=512, max_position_embeddings=512, **TINY))


def timed(fn, repeats: int) -> float:
    """The best of ``repeats`` wall-clock seconds of ``fn()``, after one warm-up call."""
    fn()
    best = float("inf")
    for _ in range(repeats):
        started = time.perf_counter()
        fn()
        best = min(best, time.perf_counter() - started)
    return best


def train_rate(model, ids: torch.Tensor, compute: torch.dtype, repeats: int) -> float:
    """Tokens/s of one mixed-precision training step (fp32 weights, forward under autocast to ``compute``,
    backward, AdamW) on ``ids`` (B, T)."""
    prec = precision.TrainPrecision(torch.float32, compute, "cpu")
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-5)

    def step():
        with prec.autocast():
            loss = model(input_ids=ids, labels=ids).loss
        loss.backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)

    return ids.numel() / timed(step, repeats)


@torch.no_grad()
def generate_rate(model, ids: torch.Tensor, new_tokens: int, repeats: int) -> float:
    """Generated tokens/s of greedy HF generate from ``ids`` (B, T), the model in its own dtype."""
    return ids.shape[0] * new_tokens / timed(
        lambda: model.generate(
            input_ids=ids, attention_mask=torch.ones_like(ids), max_new_tokens=new_tokens, min_new_tokens=new_tokens,
            do_sample=False, pad_token_id=0,
        ),
        repeats,
    )


@torch.no_grad()
def score_rate(model, ids: torch.Tensor, repeats: int) -> float:
    """Tokens/s of a forward pass (scoring, reference log-probs), the model in its own dtype."""
    return ids.numel() / timed(lambda: model(input_ids=ids, use_cache=False), repeats)


def measure(name: str, repeats: int, rows: int) -> list[tuple[str, str, str, float]]:
    if name == "tiny":
        fp32 = tiny_model()
        vocab = fp32.config.vocab_size
    else:
        fp32 = load_model(name, torch.float32, device="cpu")
        vocab = len(load_tokenizer(name))
    torch.manual_seed(0)
    train_ids = torch.randint(3, vocab, (rows, 128))  # a micro-batch of `rows` rows of 128 tokens
    prompt_ids = torch.randint(3, vocab, (6, 32))  # the 6 x 64 generated tokens
    rows: list[tuple[str, str, str, float]] = []
    for dtype in (torch.float32, torch.bfloat16):
        label = str(dtype).removeprefix("torch.")
        rows.append((name, "train (mixed)", label, train_rate(fp32, train_ids, dtype, repeats)))
        # Inference holds its weights in the dtype itself (no master copy needed).
        model = fp32 if dtype == torch.float32 else copy.deepcopy(fp32).to(dtype)
        model.eval()
        rows.append((name, "generate", label, generate_rate(model, prompt_ids, 64, repeats)))
        rows.append((name, "score", label, score_rate(model, train_ids, repeats)))
        fp32.train()
    return rows


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--models", default="tiny,smollm2-135m-instruct", help="comma list: tiny, embedded names, dirs")
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--repeats", type=int, default=2, help="timed calls per measurement (after a warm-up)")
    ap.add_argument("--rows", type=int, default=2, help="rows of 128 tokens per training/scoring batch")
    args = ap.parse_args(argv)
    torch.set_num_threads(args.threads)
    flags = precision._cpu_flags()
    kind = "AMX" if "amx_bf16" in flags else "avx512_bf16, no AMX" if "avx512_bf16" in flags else "no bf16 units"
    print(f"CPU: {kind}; torch {torch.__version__}; {args.threads} threads; best of {args.repeats}")
    print("| model | use | dtype | tokens/s | vs fp32 |\n|---|---|---|---|---|")
    for name in args.models.split(","):
        table = measure(name, args.repeats, args.rows)
        base = {use: rate for _, use, dtype, rate in table if dtype == "float32"}
        for model, use, dtype, rate in table:
            print(f"| {model} | {use} | {dtype} | {rate:,.0f} | {rate / base[use]:.2f}x |", flush=True)
    fast = precision.bf16_is_fast(torch.device("cpu"))
    picks = {use: str(precision.pick_dtype("auto", "cpu", use)).removeprefix("torch.") for use in ("train", "generate", "score")}
    print(f"dtype=auto here (bf16 fast: {fast}): {picks}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
