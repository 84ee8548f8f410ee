"""Independent evaluators that ship inside PyPI packages, as `(prompt, response) -> float` scorers.

They share nothing with the labels alignkit trains on (the constitution's own checks or an AI judge),
so a change they measure is not the labeller grading itself:
- `sentiment`: VADER's compound score in [-1, 1] (Hutto & Gilbert 2014; the `vaderSentiment` lexicon);
- `offensive`: the probability that the text is offensive, from alt-profanity-check's linear model trained
  on labelled tweets (`profanity_check.predict_prob`).
Usable wherever a scorer is taken, e.g. `alignkit eval reward=alignkit.scoring.classifiers:sentiment`.
"""

from __future__ import annotations

from functools import lru_cache

__all__ = ["not_offensive", "offensive", "sentiment"]


@lru_cache(maxsize=1)
def _vader():
    from vaderSentiment.vaderSentiment import SentimentIntensityAnalyzer

    return SentimentIntensityAnalyzer()


def sentiment(prompt: str, response: str) -> float:
    """VADER compound sentiment of the response, -1 (negative) .. 1 (positive)."""
    return float(_vader().polarity_scores(response)["compound"])


def offensive(prompt: str, response: str) -> float:
    """Probability (0..1) that the response is offensive language, per alt-profanity-check."""
    from profanity_check import predict_prob

    return float(predict_prob([response])[0])


def not_offensive(prompt: str, response: str) -> float:
    """1 - offensive(...): higher is better, for win rates."""
    return 1.0 - offensive(prompt, response)
