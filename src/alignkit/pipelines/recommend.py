"""`alignkit recommend`: which method to use, ranked, with the reasons and a memory estimate per method.

The rules are the seed article's selection guide, by data format, model size, compute and team expertise:

- data: demonstrations -> SFT; preference pairs -> DPO (IPO, ORPO, KTO next; PPO through an `alignkit rm`
  reward model); binary good/bad feedback -> KTO; prompts and a reward function or model -> online RL.
- model size: "7B and below, DPO"; 70B and up, "consider RLHF" (PPO), when the team can afford its tuning.
- tuning budget (team expertise): PPO has the most knobs (KL coefficient, value model, GAE, clipping) and
  is ranked first only with a high budget; with a low one the critic-free and offline methods come first.
- compute: a method whose estimate (LoRA included) exceeds the accelerator's memory goes to the end.

Memory estimate (a floor: activations, the KV cache and framework overhead are not counted), in GB = 1e9 B:

    full:  P x [ trained x (b + b + 8) + frozen x b ]
    LoRA:  P x b x (1 + frozen) + P x 1% x trained x (4 + 4 + 8)

P = parameters; b = bytes per parameter of the weights (2 in bf16/fp16, 4 in fp32); a trained model carries
its weights (b), gradients (b) and Adam's two moments in fp32 (8). frozen = the frozen models held during
training apart from the trained ones (``frozen_models``): a reward model (online methods whose reward is a
model), and a reference only where one is held as a separate model. Online DPO and PPO hold a frozen copy in
full fine-tuning; DPO, IPO and KTO by default (their `reference=auto`) precompute the reference's log-probs
with the policy before its first update and hold no second model, and hold a copy only with
`reference=copy`. With LoRA the base is held once and shared by the policy, the reference (adapters off:
online methods, and the offline ones' `reference=adapter`) and PPO's value model (an adapter on the same base,
alignkit's ppo); the adapters are taken as 1% of P, and are fp32 whatever b is (PEFT's get_peft_model upcasts
them), so their weights and gradients are 4 bytes each. Checked against the model state the quick
comparison's runs measure (summary.json's model_state_bytes; tests/test_recommend.py).

The evidence behind the rules comes from papers on 7B-70B models; alignkit's own comparisons (`alignkit
compare`) run on small models, whose ranking may not carry over to large ones.
"""

from __future__ import annotations

import json
import sys
from dataclasses import dataclass
from importlib.resources import files
from pathlib import Path
from typing import Literal, get_args

from alignkit.config import ConfigError, doc_field, load_config
from alignkit.pipelines.methods import METHODS, models_in_memory
from alignkit.stages import Stage

DataFormat = Literal["demonstrations", "pairs", "binary", "prompts+reward"]
BYTES = {"bf16": 2, "fp32": 4}  # bytes per parameter of the weights
ADAM_BYTES = 8  # Adam's first and second moments, fp32, per trained parameter
ADAPTER_BYTES = 4 + 4 + ADAM_BYTES  # per LoRA parameter: fp32 weight and gradient (PEFT upcasts), Adam
LORA_SHARE = 0.01  # adapters' parameters as a share of the base (rank 16 on the attention and MLP projections)

# Candidates for each data format, in the guide's order before the size, budget and memory rules.
CANDIDATES: dict[str, list[str]] = {
    "demonstrations": ["sft"],
    "pairs": ["dpo", "ipo", "orpo", "kto", "ppo", "sft"],
    "binary": ["kto"],
    "prompts+reward": ["grpo", "online_dpo", "ppo"],
}
REASONS: dict[str, str] = {
    "sft": "imitates demonstrations; the baseline every preference method starts from",
    "dpo": "pairs, no reward model and no sampling; one reference; few settings (beta)",
    "ipo": "as DPO with a squared loss that does not push the margin to infinity: safer on noisy or "
    "deterministic preferences",
    "orpo": "no reference model (one model in memory): SFT and preference in one step",
    "kto": "learns from unpaired good/bad feedback; accepts pairs split into good and bad",
    "ppo": "RLHF: optimises a reward (a function, or an `alignkit rm` model trained on the pairs) online; "
    "the most settings to tune (KL, value model, GAE, clipping)",
    "grpo": "online RL without a value model: group-relative advantages; fewer settings than PPO",
    "online_dpo": "samples the policy each round and trains DPO on best-vs-worst under the reward",
}


# The shipped comparisons (issue #21) whose measured tables recommend cites, by file: (name, its compare.json
# as shipped in the package, the config that produces it). Both are measured; one missing from an install is
# named as the file it would cite, and recommend never shows a figure it did not read from one.
ASSETS = files("alignkit") / "assets"
SHIPPED_COMPARISONS = [
    ("controlled sentiment", "compare-sentiment.json", "configs/compare_sentiment.yaml"),
    ("HH-RLHF harmlessness", "compare-hh-harmless.json", "configs/compare_hh_harmless.yaml"),
]


def evidence_lines(methods: list[str], assets: Path | None = None) -> list[str]:
    """What the shipped comparisons measured for ``methods``, each line citing its file; for a comparison not
    measured yet, the file it would cite."""
    assets = Path(str(ASSETS)) if assets is None else assets
    lines = []
    for name, filename, config in SHIPPED_COMPARISONS:
        cite = f"alignkit/assets/{filename}"
        path = assets / filename
        if not path.is_file():
            lines.append(f"{name}: none measured yet (would cite {cite}, made by `alignkit compare {config}`)")
            continue
        measured = json.loads(path.read_text())
        rows = {row["method"]: row for row in measured["methods"]}
        lines.append(f"{name}, measured on {measured['model']} (a small model: may not carry over), {cite}:")
        for method in (m for m in methods if m in rows):
            row = rows[method]
            lo, hi = row["win_rate_ci95"]
            lines.append(
                f"  {method}: gold win rate {row['win_rate']:.3f} [{lo:.3f}, {hi:.3f}] over {row['seeds']} seeds "
                f"(std {row['win_rate_std_over_seeds']:.3f}), KL/token {row['kl']:.3g}"
            )
    return lines


@dataclass
class RecommendConfig:
    """What you have; `alignkit recommend data=pairs model_size=7 memory_gb=24 tuning=low`."""

    data: DataFormat = doc_field(
        "pairs",
        "Your data: demonstrations (prompt + good reply), pairs (chosen/rejected), binary (good/bad labels), "
        "or prompts+reward (prompts and a reward function or model).",
    )
    model_size: float = doc_field(7.0, "Model size in billions of parameters.", gt=0)
    memory_gb: float = doc_field(24.0, "Memory of one accelerator, GB (all of them with sharding).", gt=0)
    tuning: Literal["low", "high"] = doc_field(
        "low", "How much hyperparameter tuning the team can afford (its RL experience)."
    )
    precision: Literal["bf16", "fp32"] = doc_field(
        "bf16", "Weights' precision: bf16 (or fp16) is 2 bytes per parameter, fp32 is 4."
    )
    reward_is_model: bool = doc_field(
        True, "The reward is a model held in memory (an `alignkit rm` model), not a function."
    )
    reference: Literal["precomputed", "copy"] = doc_field(
        "precomputed",
        "How DPO, IPO and KTO hold their reference (their stages' `reference` key): precomputed (their default, "
        "auto: log-probs computed before training, no model held; LoRA's `adapter` costs the same) or copy.",
    )


def frozen_models(method: str, lora: bool, reward_is_model: bool, reference: str = "precomputed") -> int:
    """Frozen models ``method`` holds during training as separate copies (the module docstring's "frozen"): a
    reward model, and a reference only where it is neither precomputed nor the shared LoRA base."""
    m = METHODS[method]
    if not m.reference:
        held_reference = False
    elif m.online:  # the online engine: the LoRA base with adapters off, else a frozen copy
        held_reference = not lora
    else:  # DPO, IPO, KTO: log-probs precomputed before training unless reference=copy
        held_reference = reference == "copy"
    return int(m.online and reward_is_model) + int(held_reference)


def memory_gb(
    method: str, params_b: float, bytes_per_param: int, lora: bool, reward_is_model: bool,
    adapter_share: float = LORA_SHARE, reference: str = "precomputed",
) -> float:
    """The module docstring's estimate, in GB, for ``params_b`` billion parameters (``adapter_share``: LoRA's
    parameters as a share of the base's; ``reference``: how DPO, IPO and KTO hold theirs)."""
    m = METHODS[method]
    frozen = frozen_models(method, lora, reward_is_model, reference)
    if lora:
        return params_b * (bytes_per_param * (1 + frozen) + adapter_share * m.trained * ADAPTER_BYTES)
    return params_b * (m.trained * (bytes_per_param * 2 + ADAM_BYTES) + frozen * bytes_per_param)


@dataclass(frozen=True)
class Choice:
    method: str
    fits: str  # "full" | "lora" | "no"
    memory_full_gb: float
    memory_lora_gb: float
    reasons: list[str]


def recommend(cfg: RecommendConfig) -> list[Choice]:
    """The candidates for ``cfg.data``, best first, each with its reasons (pure: the rules of the docstring)."""
    order = list(CANDIDATES[cfg.data])
    extra: dict[str, list[str]] = {name: [] for name in order}
    # Size rule, for pairs: "7B and below, DPO ... 70B+, consider RLHF".
    if cfg.data == "pairs":
        if cfg.model_size <= 7:
            extra["dpo"].append("7B and below: DPO (the guide's first choice at this size)")
        elif cfg.model_size >= 70 and cfg.tuning == "high":
            order.remove("ppo")
            order.insert(0, "ppo")
            extra["ppo"].append("70B and up with a tuning budget: consider RLHF (the guide)")
        elif cfg.model_size >= 70:
            extra["dpo"].append("70B and up the guide suggests RLHF, but PPO needs the tuning budget you lack")
    # Budget rule, for prompts+reward: PPO first only when its tuning is affordable.
    if cfg.data == "prompts+reward" and cfg.tuning == "high":
        order.remove("ppo")
        order.insert(0, "ppo")
        extra["ppo"].append("high tuning budget: PPO's value model gives lower-variance advantages")
    if cfg.data == "prompts+reward" and cfg.tuning == "low":
        extra["grpo"].append("low tuning budget: no value model to tune")
    choices = []
    for name in order:
        b = BYTES[cfg.precision]
        full = memory_gb(name, cfg.model_size, b, False, cfg.reward_is_model, reference=cfg.reference)
        lora = memory_gb(name, cfg.model_size, b, True, cfg.reward_is_model, reference=cfg.reference)
        fits = "full" if full <= cfg.memory_gb else "lora" if lora <= cfg.memory_gb else "no"
        reasons = [REASONS[name], *extra[name]]
        if fits == "lora":
            reasons.append(f"full fine-tuning needs ~{full:.0f} GB; LoRA (~{lora:.0f} GB) fits {cfg.memory_gb:g} GB")
        if fits == "no":
            reasons.append(f"does not fit {cfg.memory_gb:g} GB even with LoRA (~{lora:.0f} GB): shard or quantise")
        choices.append(Choice(name, fits, full, lora, reasons))
    # Compute rule: what does not fit goes last (a stable sort keeps the guide's order otherwise).
    return sorted(choices, key=lambda c: c.fits == "no")


def format_choices(cfg: RecommendConfig, choices: list[Choice]) -> str:
    lines = [
        f"alignkit recommend: data={cfg.data}, {cfg.model_size:g}B parameters, {cfg.memory_gb:g} GB, "
        f"tuning budget {cfg.tuning}",
        f"  {'#':<3}{'method':<12}{'models':>7}{'full GB':>9}{'LoRA GB':>9}  fits  why",
    ]
    for i, c in enumerate(choices, 1):
        n = models_in_memory(c.method, cfg.reward_is_model)
        lines.append(
            f"  {i:<3}{c.method:<12}{n:>7}{c.memory_full_gb:>9.1f}{c.memory_lora_gb:>9.1f}  {c.fits:<4}  {c.reasons[0]}"
        )
        lines += [f"  {'':<52}{r}" for r in c.reasons[1:]]
    lines.append(
        "  Memory: full = P x [trained x (2b + 8) + frozen x b]; LoRA = P x b x (1 + frozen) + adapters "
        "(1% of P, fp32, 16 B each); a floor without activations.\n  frozen: a reward model; a reference copy "
        f"(online methods' full fine-tuning; DPO/IPO/KTO only with reference=copy, now {cfg.reference})."
        "\n  The guide's evidence is from 7B-70B models; alignkit's own "
        "comparisons (`alignkit compare`) use small models, whose ranking may not carry over."
    )
    lines.append("  Measured evidence (the shipped comparisons):")
    lines += [f"    {line}" for line in evidence_lines([c.method for c in choices])]
    return "\n".join(lines)


# The questions `alignkit recommend` asks on a terminal, in order: (config key, question, allowed answers).
QUESTIONS = [
    ("data", "What data do you have?", " | ".join(get_args(DataFormat))),
    ("model_size", "Model size, in billions of parameters?", "a number > 0"),
    ("memory_gb", "Memory of one accelerator, in GB?", "a number > 0"),
    ("tuning", "How much hyperparameter tuning can the team afford?", "low | high"),
]


def ask(cfg: RecommendConfig, stdin=None, out=None) -> RecommendConfig:
    """``cfg`` with QUESTIONS answered on ``stdin`` one by one (an empty answer keeps the default shown); an
    answer the config refuses is asked again with the refusal. Questions go to stderr, so stdout stays the
    answer."""
    stdin, out = stdin or sys.stdin, out or sys.stderr
    answers: list[str] = []
    for key, question, allowed in QUESTIONS:
        while True:
            print(f"{question} ({allowed}) [{getattr(cfg, key)}]: ", end="", file=out, flush=True)
            line = stdin.readline()
            if not line:  # end of input: no answer will come
                raise ConfigError(f"recommend: no answer to '{question}' (input ended); give {key}=... instead")
            answer = line.strip()
            if not answer:
                break
            try:
                # Named as typed at the prompt: the refusal would otherwise say "(from the command line)".
                load_config(RecommendConfig, None, [*answers, f"{key}={answer}"], overrides_from="your answer")
            except ConfigError as e:
                print(f"  {e}", file=out)
                continue
            answers.append(f"{key}={answer}")
            break
    return load_config(RecommendConfig, None, answers)


def run(cfg: RecommendConfig) -> dict:
    # Nothing set (every key at its default) on a terminal: ask. Piped, or with any key given: answer as is.
    if cfg == RecommendConfig() and sys.stdin.isatty():
        cfg = ask(cfg)
    choices = recommend(cfg)
    print(format_choices(cfg, choices))
    return {
        "ranking": [
            {"method": c.method, "fits": c.fits, "memory_full_gb": c.memory_full_gb,
             "memory_lora_gb": c.memory_lora_gb, "reasons": c.reasons}
            for c in choices
        ],
        "evidence": evidence_lines([c.method for c in choices]),
    }  # fmt: skip


STAGE = Stage("recommend", RecommendConfig, run, prints_results=True)
