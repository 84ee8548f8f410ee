"""`alignkit eval`: sample a policy and a reference on the same prompts and compare them.

Reward score and win rate (with a scorer), response lengths, distinct-n, the KL from the reference
estimated on the policy's own samples, and the policy's token entropy; a console table and a JSON file
with every sample, which `alignkit report` shows next to the training curves.
"""

from __future__ import annotations

import hashlib
import importlib.resources
import json
import math
import re
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import ClassVar, Literal

import torch

from alignkit.config import (
    SEED_MAX,
    ConfigError,
    GenerationBackendConfig,
    check_reward_list,
    doc_field,
    required,
)
from alignkit.data.schemas import Loaded, load_prompts
from alignkit.data.tokenize import encode_prompt
from alignkit.evaluation.metrics import (
    distinct_n,
    entropy_from_logits,
    kl_per_token,
    length_stats,
    mean_entropy,
    win_rate,
)
from alignkit.models.forward import response_token_logprobs, sample_batches, supports_chunked_head
from alignkit.models.generation import Generation, SamplingConfig, check_generation_backend, load_sampler
from alignkit.models.loading import ADAPTER_RECORD, load_final, load_model, load_tokenizer, pick_device
from alignkit.reporting import cards, trackers
from alignkit.scoring import Scorer, check_columns, reward_scorer
from alignkit.stages import Stage
from alignkit.training.distributed import require_one_process

DEFAULT_REFERENCE = "smollm2-135m-instruct"
NO_REFERENCE = ("none", "null", "")


@dataclass
class EvalConfig(GenerationBackendConfig):
    """Sample the model and a reference on the same prompts; score, compare and write eval.json."""

    # Old spellings, read for one release (alignkit.config.load_config renames them, with a message).
    ALIASES: ClassVar[dict[str, str]] = {
        "max_prompts": "prompts_max_rows",
        "reward_model": "reward",
        "reward_fn": "reward",
    }

    # --- models ---
    model: str = required(
        "Model to evaluate: a run's final/ folder (a plain model or a LoRA adapter), a local model "
        "directory, the embedded 'smollm2-135m-instruct', or a Hugging Face id."
    )
    reference: str | None = doc_field(
        DEFAULT_REFERENCE,
        "Model to compare against (the policy's starting point, usually); 'none' skips the win rate and KL.",
    )
    dtype: Literal["auto", "float32", "bfloat16", "float16"] = doc_field(
        "auto", "Weights/compute dtype; 'auto' picks bf16 only where the hardware runs it fast, else fp32."
    )
    trust_remote_code: bool = doc_field(False, "Allow code shipped with the models to run (off by default).")
    # --- prompts ---
    prompts: str | None = doc_field(
        None, "Prompt file/dataset (a 'prompt' or 'messages' column); None uses the 128 built-in prompts."
    )
    prompts_split: str | None = doc_field(None, "Split name when prompts is a hub id or a DatasetDict.")
    prompts_max_rows: int | None = doc_field(None, "Use only the first N prompts.", ge=1)
    on_bad_row: Literal["error", "skip"] = doc_field(
        "error", "What to do with an invalid prompt row: stop with an error naming it, or skip it."
    )
    max_prompt_length: int | None = doc_field(
        None, "Longest prompt in tokens (its end is kept); None keeps whole prompts.", ge=1
    )
    # --- sampling ---
    samples_per_prompt: int = doc_field(
        1,
        "Responses sampled per prompt from each model; the win rate compares per-prompt mean scores.",
        ge=1,
    )
    temperature: float = doc_field(
        0.7,
        "Sampling temperature (0 = greedy); the KL is exact on samples drawn at 1.0 with top_p=1.0.",
        ge=0,
    )
    top_p: float = doc_field(
        1.0, "Nucleus sampling: sample from the smallest token set with this mass.", gt=0, le=1
    )
    max_new_tokens: int = doc_field(96, "Longest response in tokens.", ge=1)
    seed: int = doc_field(
        0, "Sampling seed; the policy and the reference draw with the same one.", ge=0, le=SEED_MAX
    )
    batch_size: int = doc_field(8, "Sequences per generation batch and per scoring forward pass.", ge=1)
    logprob_chunk_size: int = doc_field(
        1024,
        "Tokens per chunk when computing log-probs and entropies, so no (B, T, V) tensor is held.",
        ge=1,
    )
    # --- scoring ---
    reward: str | list[str] | None = doc_field(
        None,
        "Reward to score responses with: 'module:function', a function (prompt: str, response: str, [prompt "
        "columns]) -> float (e.g. alignkit.scoring.verifiable:exact_answer, which takes the prompts' 'answer'), "
        "a reward model directory written by `alignkit rm`, or a list [a, b] of these summed with "
        "reward_weights; None: no scores, no win rate.",
    )
    reward_weights: list[float] | None = doc_field(
        None, "One weight per reward of a list reward=[...] (the score is their weighted sum); None: all 1."
    )
    reference_cache: str | None = doc_field(
        None,
        "JSON file holding the reference's side of an evaluation (its samples, scores and token entropies): "
        "read instead of sampling the reference again when it was written for the same reference weights, "
        "prompts, sampling, seed and reward, else (re)written. `compare` gives every run's evaluation one, as "
        "each samples the same base on the same prompts; None: the reference is always sampled.",
    )
    # --- output ---
    output: str | None = doc_field(
        None,
        "JSON file to write; default <run>/eval.json for a run's final/ folder, <model dir>/eval.json "
        "for another local model, else ./eval-<model name>.json.",
    )
    progress: bool = doc_field(True, "Show progress bars.")

    def check(self) -> None:
        super().check()
        if self.reward is not None:
            check_reward_list(self)


def make_scorer(cfg: EvalConfig) -> Scorer | None:
    """The scorer of ``cfg.reward`` (alignkit.scoring), or None (no scores, no win rate)."""
    return reward_scorer(cfg, pick_device(), cfg.batch_size, cfg.progress) if cfg.reward else None


# ---------------------------------------------------------------------------------------------
# Scoring samples under a model
# ---------------------------------------------------------------------------------------------


@torch.no_grad()
def response_token_entropies(
    model, samples: list[Generation], batch_size: int, chunk: int
) -> list[torch.Tensor]:
    """Entropy of the model's next-token distribution at each response position: one (T_i,) per sample.

    The LM head is applied only at response positions, ``chunk`` of them at a time, so one (chunk, V)
    block of logits is alive; models with scaled/capped logits take a plain forward instead.
    """
    device = next(model.parameters()).device
    base = model.get_base_model() if hasattr(model, "get_base_model") else model
    out: list[torch.Tensor] = [torch.zeros(0)] * len(samples)
    for idx, batch in sample_batches(samples, batch_size):
        ids, attn, mask = (batch[k].to(device) for k in ("input_ids", "attention_mask", "loss_mask"))
        # The token at t was sampled from the distribution computed at t - 1.
        rows, cols = mask[:, 1:].bool().nonzero(as_tuple=True)  # (N,), (N,)
        if supports_chunked_head(model):
            hidden = base.get_decoder()(input_ids=ids, attention_mask=attn, use_cache=False).last_hidden_state
            h = hidden[rows, cols]  # (N, H)
            head = base.get_output_embeddings()
            entropies = torch.cat(
                [entropy_from_logits(head(h[s : s + chunk])) for s in range(0, h.shape[0], chunk)]
            )  # (N,)
        else:
            logits = model(input_ids=ids, attention_mask=attn, use_cache=False).logits  # (B, T, V)
            entropies = entropy_from_logits(logits[rows, cols])  # (N,)
        rows, entropies = rows.cpu(), entropies.float().cpu()
        for row, i in enumerate(idx):
            out[i] = entropies[rows == row]
    return out


# ---------------------------------------------------------------------------------------------
# Summaries of one model's samples
# ---------------------------------------------------------------------------------------------


def response_tokens(sample: Generation) -> int:
    """Generated tokens, not counting the EOS that ended the response."""
    return len(sample.response_ids) - int(sample.finished)


def side_summary(
    samples: list[Generation], scores: list[float] | None, entropies: list[torch.Tensor] | None
) -> dict:
    """Length, diversity, score and entropy statistics of one model's responses."""
    texts = [s.text for s in samples]
    tokens = length_stats([response_tokens(s) for s in samples])
    words = length_stats([len(t.split()) for t in texts])
    out = {
        "length_tokens": {"mean": tokens.mean, "std": tokens.std},
        "length_words": {"mean": words.mean, "std": words.std},
        "distinct_1": distinct_n(texts, 1),
        "distinct_2": distinct_n(texts, 2),
        "finished_fraction": sum(s.finished for s in samples) / max(len(samples), 1),
    }
    if scores is not None:
        stats = length_stats(scores)
        out["score"] = {"mean": stats.mean, "std": stats.std}
    if entropies is not None:
        out["entropy"] = mean_entropy(entropies)
    return out


def _model_fingerprint(name: str) -> str:
    """A model's name and, for a local directory, its files' names, sizes and times: weights rewritten in place
    are another model."""
    from alignkit.models.loading import resolve_model

    path = Path(resolve_model(name))
    if not path.is_dir():
        return name
    stats = (f"{p.relative_to(path)}:{p.stat().st_size}:{p.stat().st_mtime_ns}" for p in sorted(path.rglob("*")))
    return f"{name}|{hashlib.sha256(';'.join(stats).encode()).hexdigest()}"


def reference_cache_key(cfg: EvalConfig, reference_name: str, reference, prompt_ids: list[list[int]]) -> dict:
    """What decides the reference's side of an evaluation: its weights (files and the dtype they were loaded
    in: dtype=auto differs between CPU kinds), the prompts as tokens, the sampling and the reward. A cache
    written under another key is not read."""
    rewards = [] if cfg.reward is None else [cfg.reward] if isinstance(cfg.reward, str) else list(cfg.reward)
    return {
        "reference": _model_fingerprint(reference_name),
        "prompt_ids": hashlib.sha256(json.dumps(prompt_ids).encode()).hexdigest(),
        "sampling": [cfg.temperature, cfg.top_p, cfg.max_new_tokens, cfg.seed, cfg.generation_backend],
        "dtype": str(next(reference.parameters()).dtype),
        # a reward model directory by its files too: one retrained in place scores otherwise
        "reward": [[_model_fingerprint(r) if Path(r).expanduser().is_dir() else r for r in rewards], cfg.reward_weights],
    }


def read_reference_cache(path: Path, key: dict, prompt_ids: list[list[int]]):
    """(samples, scores, entropies) of the reference from ``path`` when it holds ``key``, else None."""
    try:
        data = json.loads(path.read_text())
    except (OSError, ValueError):
        return None
    if not isinstance(data, dict) or data.get("key") != key:
        return None
    samples = [
        Generation(list(p), s["response_ids"], s["text"], s["finished"]) for p, s in zip(prompt_ids, data["samples"])
    ]
    entropies = [torch.tensor(e) for e in data["entropies"]]
    return samples, data["scores"], entropies


def write_reference_cache(
    path: Path, key: dict, samples: list[Generation], scores: list[float] | None, entropies: list[torch.Tensor]
) -> None:
    """The reference's side for ``key``, written whole then renamed into place."""
    rows = [{"response_ids": s.response_ids, "text": s.text, "finished": s.finished} for s in samples]
    data = {"key": key, "samples": rows, "scores": scores, "entropies": [e.tolist() for e in entropies]}
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(json.dumps(data) + "\n")
    tmp.replace(path)


def per_prompt_means(scores: list[float], k: int) -> list[float]:
    """Mean score of each prompt's k consecutive samples."""
    return [sum(scores[i : i + k]) / k for i in range(0, len(scores), k)]


# ---------------------------------------------------------------------------------------------
# Output
# ---------------------------------------------------------------------------------------------


def default_output(model: str) -> Path:
    """Where eval.json goes when `output` is unset (see the field's doc)."""
    path = Path(model).expanduser()
    if path.is_dir():
        run_dir = path.parent
        if path.name == "final" and (run_dir / "config.yaml").is_file():
            return run_dir / "eval.json"  # next to the run's metrics, where `alignkit report` finds it
        return path / "eval.json"
    return Path(f"eval-{re.sub(r'[^A-Za-z0-9._-]+', '_', model)}.json")


def _fmt(value) -> str:
    if value is None:
        return "-"
    if isinstance(value, float):
        return "nan" if math.isnan(value) else f"{value:.4g}"
    return str(value)


def format_table(result: dict) -> str:
    """Policy vs reference, one metric a line, as printed on the console."""
    pol, ref = result["policy"], result.get("reference_stats") or {}
    lines: list[tuple[str, str, str]] = []

    def mean_std(d: dict | None) -> str:
        return "-" if not d else f"{_fmt(d['mean'])} ± {_fmt(d['std'])}"

    if "score" in pol:
        lines.append(("score (mean ± std)", mean_std(pol["score"]), mean_std(ref.get("score"))))
    if result.get("win_rate"):
        w = result["win_rate"]
        lines.append(
            ("win rate vs reference [95% CI]", f"{w['value']:.3f} [{w['low']:.3f}, {w['high']:.3f}]", "")
        )
    lines.append(("length, tokens", mean_std(pol["length_tokens"]), mean_std(ref.get("length_tokens"))))
    lines.append(("length, words", mean_std(pol["length_words"]), mean_std(ref.get("length_words"))))
    lines.append(("distinct-1", _fmt(pol["distinct_1"]), _fmt(ref.get("distinct_1"))))
    lines.append(("distinct-2", _fmt(pol["distinct_2"]), _fmt(ref.get("distinct_2"))))
    lines.append(
        ("finished (EOS) fraction", _fmt(pol["finished_fraction"]), _fmt(ref.get("finished_fraction")))
    )
    lines.append(("entropy, nats/token", _fmt(pol.get("entropy")), _fmt(ref.get("entropy"))))
    if result.get("kl"):
        kl = result["kl"]
        lines.append(("KL k1, nats/token", _fmt(kl["k1_per_token"]), ""))
        lines.append(("KL k3, nats/token", _fmt(kl["k3_per_token"]), ""))
        lines.append(("KL k1, nats/sequence", _fmt(kl["k1_per_sequence"]), ""))
    if not ref:  # reference=none: one column
        lines = [(name, pol_cell, "") for name, pol_cell, _ in lines]
    head = ("", "policy", "reference" if ref else "")
    widths = [max(len(row[c]) for row in [head, *lines]) for c in range(3)]
    out = [f"{head[0]:<{widths[0]}}  {head[1]:>{widths[1]}}  {head[2]:>{widths[2]}}".rstrip()]
    out.append("-" * (sum(widths) + 4))
    out += [f"{a:<{widths[0]}}  {b:>{widths[1]}}  {c:>{widths[2]}}".rstrip() for a, b, c in lines]
    return "\n".join(out)


# ---------------------------------------------------------------------------------------------
# The stage
# ---------------------------------------------------------------------------------------------


def _load(name: str, cfg: EvalConfig, device):
    # A run's final/ folder may hold a LoRA adapter only; load_final puts it on its recorded base.
    if Path(name).expanduser().is_dir():
        return load_final(Path(name).expanduser(), cfg.dtype, device, cfg.trust_remote_code).eval()
    return load_model(name, cfg.dtype, cfg.trust_remote_code, device=device).eval()


def check_vllm_models(cfg: EvalConfig) -> None:
    """generation_backend=vllm: refuse, before loading anything, what one engine cannot sample. The engine
    loads the policy's directory and then the reference's weights, so both must be plain models (a LoRA
    adapter saved alone is not; a reference of another architecture is refused once it is loaded)."""
    check_generation_backend(cfg.generation_backend)
    if cfg.generation_backend != "vllm":
        return
    for field_name in ("model", "reference"):
        name = getattr(cfg, field_name)
        if name and (Path(name).expanduser() / ADAPTER_RECORD).is_file():
            raise ConfigError(
                f"generation_backend=vllm needs plain models, but {field_name}={name} is a LoRA adapter; save it "
                "merged (merge_lora=true) or use generation_backend=hf"
            )


def _shapes(model) -> dict:
    return {name: tuple(t.shape) for name, t in model.state_dict().items()}


def _same_vocabulary(tok_a, tok_b) -> bool:
    return tok_a.get_vocab() == tok_b.get_vocab()


def load_eval_prompts(cfg: EvalConfig) -> tuple[Loaded, str]:
    """(the prompts of ``cfg.prompts``, or the built-in set when it is None; where they came from)."""
    if cfg.prompts:
        loaded = load_prompts(
            cfg.prompts, cfg.on_bad_row, split=cfg.prompts_split, limit=cfg.prompts_max_rows
        )
        source = cfg.prompts
    else:
        with importlib.resources.as_file(
            importlib.resources.files("alignkit") / "assets" / "prompts.jsonl"
        ) as p:
            loaded = load_prompts(str(p), cfg.on_bad_row, limit=cfg.prompts_max_rows)
        source = "built-in (alignkit/assets/prompts.jsonl)"
    print(f"prompts: {loaded.summary()}", file=sys.stderr)
    loaded.require_rows("prompts")
    return loaded, source


def load_reference_model(cfg: EvalConfig, reference_name: str, tokenizer, policy, device):
    """The reference model to compare with, refused where its vocabulary is not the policy's (per-token KL
    scores the same tokens under both). The same name is the same weights: the loaded policy is reused
    rather than held twice."""
    if not _same_vocabulary(tokenizer, load_tokenizer(reference_name, cfg.trust_remote_code)):
        raise ConfigError(
            f"reference '{reference_name}' has another vocabulary than '{cfg.model}'; per-token KL needs "
            "both models to score the same tokens (pass reference=none to skip the comparison)"
        )
    return policy if reference_name == cfg.model else _load(reference_name, cfg, device)


def reference_sampler(cfg: EvalConfig, sample, tokenizer, device, policy, reference, reference_name: str):
    """The sampler of the reference: with vLLM, the policy's engine given the reference's weights (a model
    of the same architecture and size); with hf, generation on the reference model."""
    if cfg.generation_backend != "vllm":
        return load_sampler(cfg, tokenizer, device, reference, cfg.batch_size, cfg.progress, "reference")
    if reference is not policy:
        if _shapes(reference) != _shapes(policy):
            raise ConfigError(
                f"generation_backend=vllm samples the reference with the policy's engine, but "
                f"reference={reference_name} is not a model of the same architecture and size; use "
                "generation_backend=hf"
            )
        sample.update_weights(reference)
    return sample


def kl_summary(cfg: EvalConfig, policy, reference, policy_samples: list[Generation]) -> dict:
    """KL(policy || reference) on the policy's own samples: each response token scored under both models;
    k1 = log p - log q and k3 = (r - 1) - log r with r = q / p (Schulman 2020)."""
    chunk = cfg.logprob_chunk_size
    policy_logps = response_token_logprobs(policy, policy_samples, cfg.batch_size, chunk)
    reference_logps = response_token_logprobs(reference, policy_samples, cfg.batch_size, chunk)
    est = kl_per_token(policy_logps, reference_logps)
    kl = {
        "k1_per_token": est.k1,
        "k3_per_token": est.k3,
        "k1_per_sequence": float(est.per_sequence.mean()),
        "n_tokens": est.n_tokens,
    }
    if cfg.temperature != 1.0 or cfg.top_p != 1.0:
        kl["note"] = (
            "KL of the models at temperature 1, estimated on samples drawn at "
            f"temperature={cfg.temperature}, top_p={cfg.top_p}: approximate (exact in expectation at 1.0/1.0)"
        )
    return kl


def sample_rows(
    prompts: list, policy_samples: list[Generation], policy_scores: list[float] | None,
    reference_samples: list[Generation] | None, reference_scores: list[float] | None,
) -> list[dict]:  # fmt: skip
    """eval.json's "samples": each prompt with the policy's response and the reference's, tokens, scores."""
    samples = []
    for i, (prompt, pol) in enumerate(zip(prompts, policy_samples)):
        row = {"prompt": prompt, "policy": pol.text, "policy_tokens": response_tokens(pol)}
        if policy_scores is not None:
            row["policy_score"] = policy_scores[i]
        if reference_samples is not None:
            row["reference"] = reference_samples[i].text
            row["reference_tokens"] = response_tokens(reference_samples[i])
            if reference_scores is not None:
                row["reference_score"] = reference_scores[i]
        samples.append(row)
    return samples


def write_eval_json(output: Path, result: dict) -> None:
    """``result`` as plain JSON at ``output``, written whole then renamed into place."""
    output.parent.mkdir(parents=True, exist_ok=True)
    tmp = output.with_name(output.name + ".tmp")
    tmp.write_text(json.dumps(_json_ready(result), indent=2) + "\n")
    tmp.replace(output)


def run(cfg: EvalConfig) -> dict:
    require_one_process("eval")
    started = time.time()
    check_vllm_models(cfg)
    reference_name = (
        None if cfg.reference is None or cfg.reference.strip().lower() in NO_REFERENCE else cfg.reference
    )
    scorer = make_scorer(cfg)

    # 1. Prompts, rendered with the policy's chat template; each repeated samples_per_prompt times.
    tokenizer = load_tokenizer(cfg.model, cfg.trust_remote_code)
    loaded, prompts_source = load_eval_prompts(cfg)
    if cfg.reward is not None:  # a reward function's columns (e.g. 'answer'), before any model samples
        check_columns(cfg.reward, loaded.examples, "reward", "prompts")
    k = cfg.samples_per_prompt
    prompts = [ex.prompt for ex in loaded.examples for _ in range(k)]
    columns = [ex.columns for ex in loaded.examples for _ in range(k)]  # what reward functions may take
    prompt_ids = [encode_prompt(tokenizer, p, cfg.max_prompt_length) for p in prompts]
    sampling = SamplingConfig(cfg.max_new_tokens, cfg.temperature, cfg.top_p, cfg.seed)

    # 2. Policy samples (seeded), then the reference's with the same seed and settings. hf: generate on the
    #    loaded models. vLLM: one engine on the policy's directory, which then takes the reference's weights.
    device = pick_device()
    policy = _load(cfg.model, cfg, device)
    sample = load_sampler(cfg, tokenizer, device, policy, cfg.batch_size, cfg.progress, "policy")
    policy_samples = sample(prompt_ids, sampling)
    reference = reference_samples = cached = cache_key = None
    if reference_name is not None:
        reference = load_reference_model(cfg, reference_name, tokenizer, policy, device)
        if cfg.reference_cache is not None:  # the reference's side of an earlier evaluation of the same setup
            cache_key = reference_cache_key(cfg, reference_name, reference, prompt_ids)
            cached = read_reference_cache(Path(cfg.reference_cache), cache_key, prompt_ids)
        if cached is not None:
            reference_samples = cached[0]
        else:
            sample = reference_sampler(cfg, sample, tokenizer, device, policy, reference, reference_name)
            reference_samples = sample(prompt_ids, sampling)

    # 3. KL(policy || reference) on the policy's own samples (kl_summary).
    kl = kl_summary(cfg, policy, reference, policy_samples) if reference is not None else None

    # 4. Token entropy of each model on its own samples.
    chunk = cfg.logprob_chunk_size
    policy_entropies = response_token_entropies(policy, policy_samples, cfg.batch_size, chunk)
    reference_entropies = None
    if cached is not None:
        reference_entropies = cached[2]
    elif reference is not None:
        reference_entropies = response_token_entropies(reference, reference_samples, cfg.batch_size, chunk)

    # 5. Scores and the win rate: per prompt, the policy's mean score against the reference's; ties half.
    policy_scores = reference_scores = None
    win = None
    if scorer is not None:
        policy_scores = scorer.score(prompts, [s.text for s in policy_samples], columns)
        if reference_samples is not None:
            if cached is not None:
                reference_scores = cached[1]
            else:
                reference_scores = scorer.score(prompts, [s.text for s in reference_samples], columns)
            w = win_rate(
                per_prompt_means(policy_scores, k), per_prompt_means(reference_scores, k), seed=cfg.seed
            )
            win = {"value": w.value, "low": w.low, "high": w.high, "n_prompts": w.n}

    if cache_key is not None and cached is None:
        write_reference_cache(
            Path(cfg.reference_cache), cache_key, reference_samples, reference_scores, reference_entropies
        )

    # 6. Write eval.json (summary + every sample) and print the table.
    result = {
        "model": cfg.model,
        "reference": reference_name,
        "prompts": prompts_source,
        "n_prompts": len(loaded.examples),
        "skipped_prompts": len(loaded.skipped),
        "samples_per_prompt": k,
        "sampling": {
            "temperature": cfg.temperature,
            "top_p": cfg.top_p,
            "max_new_tokens": cfg.max_new_tokens,
            "seed": cfg.seed,
            "generation_backend": cfg.generation_backend,
        },
        "scorer": scorer.name if scorer else None,
        "policy": side_summary(policy_samples, policy_scores, policy_entropies),
        "reference_stats": (
            side_summary(reference_samples, reference_scores, reference_entropies)
            if reference_samples
            else None
        ),
        "win_rate": win,
        "kl": kl,
        "reference_from_cache": cached is not None,
    }
    samples = sample_rows(prompts, policy_samples, policy_scores, reference_samples, reference_scores)
    result["seconds"] = time.time() - started
    output = Path(cfg.output).expanduser() if cfg.output else default_output(cfg.model)
    write_eval_json(output, {**result, "samples": samples})
    run_dir = output.parent
    if output.name == "eval.json" and (run_dir / "final").is_dir() and (run_dir / "summary.json").is_file():
        cards.write_model_card(run_dir)  # the run's model card gains the eval table
        trackers.log_eval_table(run_dir, result)  # and so do the runs of the trackers it reported to
    print(format_table(result), file=sys.stderr)
    print(f"wrote {output}", file=sys.stderr)
    return _json_ready({**result, "output": str(output)})


def _json_ready(value):
    """Plain JSON: tensors as lists, NaN/inf (an empty bucket's statistics) as null."""
    if isinstance(value, dict):
        return {k: _json_ready(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_json_ready(v) for v in value]
    if isinstance(value, torch.Tensor):
        return _json_ready(value.tolist())
    if isinstance(value, float) and not math.isfinite(value):
        return None
    return value


STAGE = Stage("eval", EvalConfig, run, positional="model")  # `alignkit eval <model>`
