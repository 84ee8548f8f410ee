"""Rankers score the responses sampled for one prompt, so `alignkit build-prefs` can turn them into
preference pairs: a reward model or a ``module:function`` (build-prefs' ``reward=``), an AI judge
(``reward=judge``; the Constitutional AI work supplies it through ``judge_ranker``), or people
(``ranker=export``/``human``), who rank an exported file whose rankings are then read back.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Protocol

from alignkit.data.io import BadRowError, Record
from alignkit.data.schemas import Prompt
from alignkit.errors import AlignkitError
from alignkit.scoring.scorers import Scorer

__all__ = [
    "RANKING_HOWTO",
    "RankedPrompt",
    "Ranker",
    "RewardModelRanker",
    "ScorerRanker",
    "export_row",
    "judge_ranker",
    "read_ranked_row",
    "scores_from_ranking",
]


class Ranker(Protocol):
    """Scores the responses to one prompt; higher is better. Only the order (and ties) matters to pairing.

    ``score`` returns one float per response, in order; NaN means "no opinion on this one" and leaves the
    response out of every pair. ``columns``: the prompt row's other columns (``PromptExample.columns``), which a
    reward function may take as grpo's do; rankers that read only the prompt and responses ignore them.
    ``name`` is written into each pair, so a pair can be traced to its ranker.
    """

    name: str

    def score(self, prompt: Prompt, responses: list[str], columns: dict | None = None) -> list[float]: ...


class RewardModelRanker:
    """Ranks by the scalar reward of a model trained with `alignkit rm`."""

    def __init__(self, reward_model: Any, batch_size: int = 16):
        self.reward_model = reward_model  # alignkit.models.reward.RewardModel
        self.batch_size = batch_size
        self.name = f"reward_model:{reward_model.path}"

    def score(self, prompt: Prompt, responses: list[str], columns: dict | None = None) -> list[float]:
        return self.reward_model.score([prompt] * len(responses), responses, batch_size=self.batch_size)


class ScorerRanker:
    """Ranks by a ``module:function`` reward (a ``FunctionScorer``), each response scored on its own."""

    def __init__(self, scorer: Scorer):
        self.scorer = scorer
        self.name = f"function:{scorer.name}"

    def score(self, prompt: Prompt, responses: list[str], columns: dict | None = None) -> list[float]:
        rows = None if columns is None else [columns] * len(responses)
        return self.scorer.score([prompt] * len(responses), responses, rows)


def judge_ranker(cfg: Any) -> Ranker:
    """The AI judge (RLAIF, Bai et al. 2022): a model comparing responses against principles.

    Built from the ``judge_*`` fields of ``BuildPrefsConfig`` (``cfg``): the judge model and constitution
    of `alignkit.cai`. Each response scores the mean, over every other response to the same prompt, of
    the judge's probability that it is the better of the two (both orders asked, principles drawn per
    comparison from ``cfg.seed`` and the prompt); see ``alignkit.cai.judge.JudgeRanker``.
    """
    from alignkit.cai.constitution import load_constitution
    from alignkit.cai.judge import JudgeRanker, PairwiseJudge
    from alignkit.models.loading import load_model, load_tokenizer, pick_device

    if cfg.judge_principles_per_comparison < 1:
        raise AlignkitError(
            f"reward=judge: judge_principles_per_comparison must be at least 1, got "
            f"{cfg.judge_principles_per_comparison}"
        )
    constitution = load_constitution(cfg.judge_constitution).select(cfg.judge_principles)
    tokenizer = load_tokenizer(cfg.judge_model, cfg.trust_remote_code)
    model = load_model(cfg.judge_model, cfg.dtype, cfg.trust_remote_code, device=pick_device(), use="score")
    judge = PairwiseJudge(
        model,
        tokenizer,
        constitution,
        cfg.judge_principles_per_comparison,
        cfg.judge_batch_size,
        cfg.judge_max_context_tokens,
        cfg.judge_max_response_tokens,
    )
    subset = f"[{','.join(cfg.judge_principles)}]" if cfg.judge_principles else ""
    name = f"judge:{cfg.judge_model}:{constitution.name}{subset}:k={cfg.judge_principles_per_comparison}"
    return JudgeRanker(judge, cfg.seed, name)


# ---------------------------------------------------------------------------------------------
# People: the file exported for ranking, and reading the rankings back
# ---------------------------------------------------------------------------------------------

RANKING_HOWTO = (
    "Fill each line's 'ranking' with response numbers, best first, e.g. [3, 1, 4, 2]. Numbers that tie go "
    "together in a list, e.g. [3, [1, 4], 2]. Leave out responses that should not be used; leave [] to "
    "skip the prompt. Then run build-prefs with ranker=human human_rankings=<this file>."
)


def export_row(prompt_row: int, prompt: Prompt, responses: list[str], sampling: dict) -> dict:
    """One line of the file people rank: the prompt, its numbered responses and an empty ranking."""
    return {
        "prompt_row": prompt_row,
        "prompt": prompt,
        "responses": [{"number": k + 1, "text": text} for k, text in enumerate(responses)],
        "ranking": [],
        "sampling": sampling,
    }


@dataclass(frozen=True)
class RankedPrompt:
    """A line of the ranked file, read back: scores[k] is None for a response left out of the ranking."""

    prompt_row: int
    prompt: Prompt
    responses: list[str]
    scores: list[float | None]
    sampling: dict


def read_ranked_row(record: Record) -> RankedPrompt:
    """Parse one line of a ranked export; a malformed line raises ``BadRowError`` naming the field."""
    data = record.data

    def bad(field: str, problem: str) -> BadRowError:
        return BadRowError(record.source, record.row, field, problem)

    for key in ("prompt_row", "prompt", "responses", "ranking"):
        if key not in data:
            raise bad(key, f"missing (the row has {sorted(data)}); was this file written by ranker=export?")
    if not isinstance(data["prompt_row"], int):
        raise bad("prompt_row", f"expected an int, got {data['prompt_row']!r}")
    prompt = data["prompt"]
    if not (
        isinstance(prompt, str) or (isinstance(prompt, list) and all(isinstance(m, dict) for m in prompt))
    ):
        raise bad("prompt", "expected text or a list of chat messages")
    items = data["responses"]
    if not isinstance(items, list) or not all(
        isinstance(it, dict) and isinstance(it.get("text"), str) for it in items
    ):
        raise bad("responses", "expected a list of {'number', 'text'} objects")
    if [it.get("number") for it in items] != list(range(1, len(items) + 1)):
        raise bad("responses", "responses must be numbered 1, 2, ... in order")
    try:
        scores = scores_from_ranking(data["ranking"], len(items))
    except ValueError as e:
        raise bad("ranking", str(e)) from None
    sampling = data.get("sampling") if isinstance(data.get("sampling"), dict) else {}
    return RankedPrompt(data["prompt_row"], prompt, [it["text"] for it in items], scores, sampling)


def scores_from_ranking(ranking: Any, n_responses: int) -> list[float | None]:
    """Scores from a best-first ranking of response numbers 1..n; a nested list is a group of ties.

    With G groups the k-th group (0-based) scores G - k, so the best group gets G and the worst 1, tied
    responses score the same, and a response left out gets None. ``[]`` (not ranked) gives all None.
    """
    if not isinstance(ranking, list):
        raise ValueError(f"expected a list of response numbers, got {ranking!r}")
    scores: list[float | None] = [None] * n_responses
    for k, group in enumerate(ranking):
        members = group if isinstance(group, list) else [group]
        if not members:
            raise ValueError(f"group {k + 1} of the ranking is empty")
        for number in members:
            if isinstance(number, bool) or not isinstance(number, int) or not 1 <= number <= n_responses:
                raise ValueError(f"{number!r} is not a response number (1 to {n_responses})")
            if scores[number - 1] is not None:
                raise ValueError(f"response {number} appears twice in the ranking")
            scores[number - 1] = float(len(ranking) - k)
    return scores
