"""Programmatic rewards shipped with alignkit, for demos and tests of `alignkit ppo` (``reward=alignkit.scoring.rewards:NAME``).

Each is a plain function ``(prompt: str, response: str) -> float`` that a 135M model can move in a few PPO
iterations on CPU. They measure surface features only: they show the machinery working (and, with
``length``, failing), not alignment to human preferences.
"""

from __future__ import annotations

import math
import re

__all__ = [
    "BREVITY_TARGET_WORDS",
    "LENGTH_WORDS_PER_POINT",
    "POLITENESS_CAP",
    "POLITE_MARKERS",
    "brevity",
    "length",
    "politeness",
]

POLITE_MARKERS = (
    "please",
    "thank",  # thank you, thanks, thankful
    "sorry",
    "appreciate",
    "kindly",
    "glad",
    "happy to help",
    "you're welcome",
    "my pleasure",
)
POLITENESS_CAP = 3  # markers beyond the third earn nothing, so stuffing the reply with "please" stops paying
BREVITY_TARGET_WORDS = 20  # a one- or two-sentence answer
LENGTH_WORDS_PER_POINT = 50  # `length` pays 1.0 per 50 words


def _words(text: str) -> list[str]:
    return text.split()


def politeness(prompt: str, response: str) -> float:
    """Polite markers in the response (case-insensitive, each occurrence counted, word-prefix match so
    "thanks" and "Thank" count), capped at 3 and scaled to [0, 1]: 0, 1/3, 2/3 or 1.

    Repeating one marker counts, up to the cap: a small, visible loophole of the kind real rewards have.
    """
    text = response.lower()
    count = sum(len(re.findall(rf"\b{re.escape(marker)}", text)) for marker in POLITE_MARKERS)
    return min(count, POLITENESS_CAP) / POLITENESS_CAP


def brevity(prompt: str, response: str, target_words: int = BREVITY_TARGET_WORDS) -> float:
    """exp(-|n - N| / N) for a response of n words (whitespace-separated) and N = ``target_words``:
    1.0 at exactly N words, 1/e at 0 or 2N words, still above 0 (and still rising toward N) far beyond,
    so responses cut at max_new_tokens get a signal too. An empty response scores exp(-1)."""
    n = len(_words(response))
    return math.exp(-abs(n - target_words) / target_words)


def length(prompt: str, response: str) -> float:
    """Words in the response / 50, without limit: a reward that pays for length alone.

    Use it to provoke reward hacking: the policy learns to ramble and never stop, and the
    reward-hacking monitor (reward rising with response length) should notice.
    """
    return len(_words(response)) / LENGTH_WORDS_PER_POINT
