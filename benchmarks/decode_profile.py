"""Where a GRPO rollout's decode time goes on this machine: 16 rows (4 arithmetic prompts x 4 samples) of the
embedded model, 64 new tokens, as grpo_vs_trl.py samples them.

Prints, in order: transformers' generate with and without the shared prompt prefill; a bare loop of forwards with
the same (dynamic) KV cache, per decode step; the shares of the top operators over a few decode steps (torch's
profiler); generate with a preallocated (static) cache against the dynamic one, twice each, alternated; one
decode step with the weights held in bf16 and with fp32 weights under bf16 autocast. See benchmarks/README.md.

    OMP_NUM_THREADS=1 .venv/bin/python benchmarks/decode_profile.py [--threads 1] [--model NAME_OR_DIR]
"""

from __future__ import annotations

import argparse
import copy
import sys
import time

import torch

PROMPTS = [
    "Tom has 12 apples and buys 7 more. How many apples does he have?",
    "What is 45 minus 19?",
    "A box holds 8 pens. How many pens are in 6 boxes?",
    "Sara reads 15 pages a day. How many pages does she read in 4 days?",
]
SAMPLES, NEW_TOKENS, STEPS_TIMED = 4, 64, 10


def left_padded(tokenizer, prompts: list[list[int]]) -> tuple[torch.Tensor, torch.Tensor]:
    width = max(map(len, prompts))
    ids = torch.full((len(prompts), width), tokenizer.pad_token_id)
    attn = torch.zeros((len(prompts), width), dtype=torch.long)
    for row, p in enumerate(prompts):
        ids[row, width - len(p) :] = torch.tensor(p)
        attn[row, width - len(p) :] = 1
    return ids, attn


@torch.no_grad()
def decode_step_ms(model, ids, attn, context=None) -> float:
    """Mean milliseconds of one decode step after a prefill of ``ids`` (the cache cropped back after each)."""
    context = context or torch.autocast("cpu", enabled=False)
    with context:
        out = model(input_ids=ids, attention_mask=attn, position_ids=(attn.cumsum(-1) - 1).clamp(min=0),
                    use_cache=True, logits_to_keep=1)  # fmt: skip
        cache, nxt = out.past_key_values, out.logits[:, -1].argmax(-1, keepdim=True)
        attn1 = torch.cat([attn, torch.ones_like(attn[:, :1])], 1)
        position = attn.sum(-1, keepdim=True)
        started = time.perf_counter()
        for _ in range(STEPS_TIMED):
            model(input_ids=nxt, attention_mask=attn1, position_ids=position, past_key_values=cache, use_cache=True)
            cache.crop(-1)
    return 1000 * (time.perf_counter() - started) / STEPS_TIMED


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--model", default="smollm2-135m-instruct")
    args = ap.parse_args(argv)
    from torch.profiler import ProfilerActivity, profile

    from alignkit.data.tokenize import encode_prompt
    from alignkit.models.generation import SamplingConfig, sample_batch
    from alignkit.models.loading import load_model, load_tokenizer, resolve_model
    from alignkit.models.precision import _cpu_flags

    torch.set_num_threads(args.threads)
    path = resolve_model(args.model)
    tokenizer = load_tokenizer(path)
    model = load_model(path, "float32", False, device=torch.device("cpu")).eval()
    prompts = [encode_prompt(tokenizer, q) for q in PROMPTS for _ in range(SAMPLES)]
    ids, attn = left_padded(tokenizer, prompts)
    amx = "amx_bf16" in _cpu_flags()
    print(f"{args.model}, {len(prompts)} rows, {NEW_TOKENS} new tokens, fp32, {args.threads} thread(s), "
          f"CPU {'with' if amx else 'without'} AMX", flush=True)  # fmt: skip

    sampling = SamplingConfig(max_new_tokens=NEW_TOKENS, temperature=1.0, seed=0)
    for share in (True, False):
        started = time.perf_counter()
        sample_batch(model, tokenizer, prompts, sampling, 1, share_prompts=share)
        print(f"generate, shared prompt prefill {share}: {time.perf_counter() - started:.2f} s", flush=True)

    print(f"bare decode loop: {decode_step_ms(model, ids, attn):.1f} ms/step", flush=True)
    with torch.no_grad():
        out = model(input_ids=ids, attention_mask=attn, use_cache=True, logits_to_keep=1)
        cache, nxt = out.past_key_values, out.logits[:, -1].argmax(-1, keepdim=True)
        attn1 = torch.cat([attn, torch.ones_like(attn[:, :1])], 1)
        with profile(activities=[ProfilerActivity.CPU]) as prof:
            for _ in range(5):
                model(input_ids=nxt, attention_mask=attn1, past_key_values=cache, use_cache=True)
                cache.crop(-1)
    events = sorted(prof.key_averages(), key=lambda e: -e.self_cpu_time_total)
    total = sum(e.self_cpu_time_total for e in events)
    shares = ", ".join(f"{e.key} {e.self_cpu_time_total / total:.0%}" for e in events[:4])
    print(f"profile of 5 decode steps ({total / 1000:.0f} ms): {shares}", flush=True)

    for impl in ("dynamic", "static", "dynamic", "static"):
        torch.manual_seed(0)
        started = time.perf_counter()
        model.generate(input_ids=ids, attention_mask=attn, max_new_tokens=NEW_TOKENS, min_new_tokens=NEW_TOKENS,
                       do_sample=True, top_k=0, pad_token_id=tokenizer.pad_token_id,
                       **({"cache_implementation": "static"} if impl == "static" else {}))  # fmt: skip
        print(f"generate, {impl} cache, all rows to {NEW_TOKENS} tokens: {time.perf_counter() - started:.2f} s",
              flush=True)  # fmt: skip

    bf16 = copy.deepcopy(model).to(torch.bfloat16)
    print(f"decode step, weights in bf16: {decode_step_ms(bf16, ids, attn):.1f} ms", flush=True)
    autocast = torch.autocast("cpu", dtype=torch.bfloat16)
    print(f"decode step, fp32 weights under bf16 autocast: {decode_step_ms(model, ids, attn, autocast):.1f} ms")
    return 0


if __name__ == "__main__":
    sys.exit(main())
