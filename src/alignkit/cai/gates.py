"""Quality gates on cai-revise's revisions: cheap text checks that catch the ways a weak critic fails (it
echoes the request back, changes nothing, stops mid-sentence, loops, or wanders off the question), so that
such a revision never becomes an SFT target unnoticed. Pure functions over strings; the stage counts them.
"""

from __future__ import annotations

import re
from collections.abc import Sequence
from dataclasses import dataclass

_WORD = re.compile(r"[a-z0-9']+")
# Sentence-final punctuation, optionally followed by closing quotes or brackets; also a closing code fence.
_SENTENCE_END = re.compile(r"""([.!?:;…]["'”’)\]]*|```)$""")
# Function words carry no topic: drift is measured on the other words only.
STOPWORDS = frozenset(
    """a an the and or but if then so of to in on at by for with from as is are was were be been being am
    it its this that these those i you he she we they me him her us them my your his our their what which
    who whom how when where why not no do does did can could will would should may might must shall have
    has had there here than too very just also about into over under out up down more most some any all
    each other such own same only both few s t don i'm it's you're""".split()
)

# Gate names, in the order they are tested (the summary counts every gate that fires, not just the first).
GATES = ("empty", "echo", "unchanged", "truncated", "loops", "off_topic")


def words(text: str) -> list[str]:
    return _WORD.findall(text.lower())


def ngrams(tokens: Sequence[str], n: int) -> list[tuple[str, ...]]:
    return [tuple(tokens[i : i + n]) for i in range(len(tokens) - n + 1)]


def echo_overlap(revision: str, requests: Sequence[str], n: int = 3) -> float:
    """The share of the revision's word n-grams that occur in any of ``requests`` (the critique request, the
    critique, the revision request): 1.0 when the revision only repeats them. A revision shorter than n
    words is compared word by word (n = its length)."""
    rev = words(revision)
    if not rev:
        return 0.0
    n = min(n, len(rev))
    source = {g for r in requests for g in ngrams(words(r), n)}
    grams = ngrams(rev, n)
    return sum(g in source for g in grams) / len(grams)


def is_unchanged(initial: str, revision: str) -> bool:
    """Same words as the initial answer (case, spacing and punctuation aside)."""
    return words(initial) == words(revision)


def is_truncated(text: str, finished: bool) -> bool:
    """Cut off by the token cap (``finished`` False: no end-of-sequence) without ending a sentence."""
    return not finished and not _SENTENCE_END.search(text.rstrip())


def longest_repeat(tokens: Sequence[str], max_period: int = 8) -> tuple[int, int]:
    """(repeats, period) of the longest run in which one block of 1..max_period words repeats back to back,
    the most covered words winning: "a b a b a b c" -> (3, 2). (1, 0) when nothing repeats."""
    best = (1, 0)
    for period in range(1, max_period + 1):
        i = 0
        while i + 2 * period <= len(tokens):
            reps = 1
            while tokens[i + reps * period : i + (reps + 1) * period] == tokens[i : i + period]:
                reps += 1
            if reps > 1 and reps * period > best[0] * best[1]:
                best = (reps, period)
            i += max(1, (reps - 1) * period) if reps > 1 else 1
    return best


def loops(text: str, min_repeats: int = 3, min_words: int = 6) -> bool:
    """A block of words repeated at least ``min_repeats`` times back to back, covering ``min_words`` words
    or more ("no no no" is emphasis; "I am sorry. I am sorry. I am sorry." is a loop)."""
    reps, period = longest_repeat(words(text))
    return reps >= min_repeats and reps * period >= min_words


def topic_overlap(revision: str, context: Sequence[str]) -> float | None:
    """The share of the revision's content words (not stopwords) found in ``context`` (the prompt and the
    initial answer); None when the revision has no content word to judge."""
    rev = [w for w in words(revision) if w not in STOPWORDS]
    if not rev:
        return None
    seen = {w for c in context for w in words(c)}
    return sum(w in seen for w in rev) / len(rev)


@dataclass(frozen=True)
class GateSettings:
    """Thresholds of the gates (the stage's config fields of the same names)."""

    echo_max_overlap: float = 0.5  # gate a revision when more than this share of its 3-grams are the request's
    off_topic_min_overlap: float = 0.15  # gate when fewer than this share of its content words are on topic
    off_topic_min_words: int = 5  # ... judged only from this many content words on (short replies vary)
    enabled: tuple[str, ...] = GATES


def gate_revision(
    prompt: str,
    initial: str,
    revision: str,
    finished: bool,
    requests: Sequence[str],
    settings: GateSettings = GateSettings(),
) -> list[str]:
    """The names of the gates one revision fails (empty list: it may be a training target)."""
    if not revision.strip():
        return ["empty"] if "empty" in settings.enabled else []
    failed = []
    if echo_overlap(revision, requests) > settings.echo_max_overlap:
        failed.append("echo")
    if is_unchanged(initial, revision):
        failed.append("unchanged")
    if is_truncated(revision, finished):
        failed.append("truncated")
    if loops(revision):
        failed.append("loops")
    content = [w for w in words(revision) if w not in STOPWORDS]
    overlap = topic_overlap(revision, [prompt, initial])
    if (
        overlap is not None
        and len(content) >= settings.off_topic_min_words
        and overlap < settings.off_topic_min_overlap
    ):
        failed.append("off_topic")
    return [g for g in failed if g in settings.enabled]


def gate_answer(answer: str, finished: bool, enabled: Sequence[str] = GATES) -> list[str]:
    """The gates an initial answer can fail when it stands in for a gated revision: empty (always), and of
    ``enabled`` truncated and loops (echo, unchanged and off-topic compare a revision with what it revises)."""
    if not answer.strip():
        return ["empty"]
    failed = (("truncated", is_truncated(answer, finished)), ("loops", loops(answer)))
    return [g for g, bad in failed if bad and g in enabled]
