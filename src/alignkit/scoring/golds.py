"""Programmatic gold judges for over-optimisation experiments (Gao, Schulman & Hilton 2022, in miniature).

A gold judge stands for the preference a proxy reward model is trained to imitate; the policy optimises the proxy
and the gold, which training never sees, says whether the policy got better. Optimising a proxy trained on VADER
labels taught the embedded model effusive replies that drift off the question ("I'd be delighted to assist you
with your inquiries ..."), which VADER alone still scores high. A reader wants a reply that is positive *and*
about what was asked; these judges say so, as plain functions of (prompt, response):
- `on_topic`: the share of the prompt's content words (not stopwords) that the response uses, 0..1;
- `positive_on_topic`: the mean of VADER's compound sentiment (-1..1) and `on_topic` (0..1).
Usable wherever a scorer is taken: ``gold_reward=alignkit.scoring.golds:positive_on_topic``.
"""

from __future__ import annotations

import re

from alignkit.cai.gates import STOPWORDS, words
from alignkit.scoring.classifiers import sentiment

__all__ = ["on_topic", "positive_on_topic"]


_TURN = re.compile(r"^(system|user|assistant): ", flags=re.MULTILINE)


def _asked(prompt: str) -> str:
    """The words a reply should address: the prompt, or the user turns of a chat prompt (which scorers pass as
    "role: content" lines), so that a system turn's words and the role names do not count."""
    parts = _TURN.split(prompt)
    if len(parts) < 3:
        return prompt
    return " ".join(content for role, content in zip(parts[1::2], parts[2::2]) if role == "user")


def on_topic(prompt: str, response: str) -> float:
    """The share of the prompt's distinct content words that occur in the response; 0.0 when the prompt has none.

    "How do I bake bread?" has the content words {bake, bread}: "Bake the bread at 220 C." scores 1.0,
    "I'd be delighted to help!" 0.0. Words are matched whole and lower-cased, without stemming.
    """
    asked = {w for w in words(_asked(prompt)) if w not in STOPWORDS}
    if not asked:
        return 0.0
    said = set(words(response))
    return len(asked & said) / len(asked)


def positive_on_topic(prompt: str, response: str) -> float:
    """(VADER compound + on_topic) / 2, in [-0.5, 1]: positive in tone and about what was asked."""
    return 0.5 * sentiment(prompt, response) + 0.5 * on_topic(prompt, response)
