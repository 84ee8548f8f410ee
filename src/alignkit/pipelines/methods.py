"""The alignment methods `alignkit compare` runs and `alignkit recommend` ranks: what each needs and holds.

Plain data and pure functions (no torch), shared by the two pipelines so the models a method holds in memory
are written once. "Models in memory" counts roles, as the seed article's comparison table does: the trained
models (which carry gradients and optimizer state) and the frozen ones (a reference; a reward model when the
reward is a model rather than a function).
"""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True)
class Method:
    stage: str  # the `alignkit <stage>` that trains it
    data: str  # what it trains on: demonstrations | pairs | binary | prompts+reward
    trained: int  # models updated by the optimizer (PPO: the policy and its value model)
    reference: bool  # a frozen reference policy (for the KL term or the log-ratio)
    online: bool  # samples the policy during training, scored by a reward
    preference_accuracy: bool  # reports held-out pair accuracy (chosen ranked above rejected)


METHODS: dict[str, Method] = {
    "sft": Method("sft", "demonstrations", 1, False, False, False),
    "dpo": Method("dpo", "pairs", 1, True, False, True),
    "ipo": Method("ipo", "pairs", 1, True, False, True),
    "kto": Method("kto", "binary", 1, True, False, True),
    "orpo": Method("orpo", "pairs", 1, False, False, True),  # odds ratio against itself: no reference
    "online_dpo": Method("online-dpo", "prompts+reward", 1, True, True, False),
    "ppo": Method("ppo", "prompts+reward", 2, True, True, False),
    # beta = 0 (alignkit's default, as DAPO and Dr. GRPO drop the KL term) loads no reference.
    "grpo": Method("grpo", "prompts+reward", 1, False, True, False),
}


def models_in_memory(name: str, reward_is_model: bool = False) -> int:
    """Models the method holds: trained ones, the reference, and the reward model when it is a model."""
    m = METHODS[name]
    return m.trained + int(m.reference) + int(m.online and reward_is_model)
