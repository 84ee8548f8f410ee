"""Everything that scores a response: the scorers a stage builds from its ``reward=`` field (``scorers``), the
per-prompt rankers of `alignkit build-prefs` (``rankers``), and the rewards shipped with alignkit: toy
functions for demos and tests (``rewards``) and independent classifiers (``classifiers``).

A reward is named in one config field, ``reward=``: ``module:function`` (e.g. ``alignkit.scoring.rewards:
politeness``), a reward-model directory written by `alignkit rm` (loaded through ``alignkit.models.reward``,
only when used), a list of these summed with ``reward_weights`` (ppo, online-dpo, eval, score), or, in
build-prefs, ``judge`` / ``checks``. A function may take prompt-file columns by name (``answer``); the
verifiable rewards of math-style tasks are in ``verifiable``. The scorer API is importable from here.
"""

from alignkit.scoring.scorers import (
    FunctionScorer,
    PartScores,
    RewardFunctionError,
    RewardModelScorer,
    Scorer,
    WeightedScorer,
    check_columns,
    check_scorer,
    is_function_spec,
    load_scorer,
    prompt_text,
    reward_scorer,
    score_parts,
)

__all__ = [
    "FunctionScorer",
    "PartScores",
    "RewardFunctionError",
    "RewardModelScorer",
    "Scorer",
    "WeightedScorer",
    "check_columns",
    "check_scorer",
    "is_function_spec",
    "load_scorer",
    "prompt_text",
    "reward_scorer",
    "score_parts",
]
