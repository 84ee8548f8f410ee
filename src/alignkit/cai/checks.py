"""Program checks for the constitution's checkable principles, and a ranker built on them.

A 135M judge compares responses at chance (see the judge-agreement figure in the README), so labels that
a small model can learn from must come from principles a program can check. Each check maps a response
to a score (higher is better); the priority rule of the constitution turns the per-principle scores of
several responses into one ranking: the highest-priority principle that tells two responses apart
decides, lower ones only break its ties. The word lists are ours and deliberately short: they flag the
obvious cases, which is what these principles ask for.
"""

from __future__ import annotations

import re
from collections.abc import Callable
from dataclasses import dataclass

_WORD = re.compile(r"[a-z']+")

# Words that insult a person when aimed at them; the list is ours and covers the obvious cases only.
INSULTS = frozenset(
    """idiot idiots stupid moron morons dumb loser losers pathetic worthless ugly fat lazy useless jerk
    jerks fool fools foolish clown imbecile dimwit ignorant disgusting hideous freak creep scum trash
    garbage coward cowards incompetent brainless clueless""".split()
)
# Profanity and slurs, reduced to stems that do not occur inside ordinary words.
PROFANITY = frozenset(
    """damn damned hell crap shit shitty fuck fucking fucked bitch bastard ass asshole piss""".split()
)
# Markers of a courteous register.
POLITE = frozenset("""please thank thanks sorry glad happy kindly appreciate welcome respectfully""".split())

# The warmth principle: words that make a reply sound warm and encouraging, and words that make it sound cold,
# gloomy or discouraging. Ours and short, like the lists above. Words a careful refusal needs ("harm",
# "illegal", "dangerous", "risk") are deliberately on neither list: naming a danger is not a cold tone.
WARM = frozenset(
    """good great glad happy enjoy enjoyable fun love lovely wonderful helpful hope hopeful best nice kind
    warm friendly welcome excellent delicious beautiful easy safe healthy support care encourage success
    successful perfect amazing awesome fantastic delightful pleasant calm comfortable fresh favorite
    favourite bright cheerful creative exciting grateful proud positive patient gentle respect""".split()
)
COLD = frozenset(
    """bad terrible awful hate horrible sad angry worst wrong fail failure kill die death dead pain hurt
    boring annoying miserable lonely fear afraid scared worry worried upset disappointing disappointed
    cruel nasty sick broken problem problems difficult hard""".split()
)

MAX_WORDS = 60  # the concision principle: at most about 60 words ...
MAX_SENTENCES = 3  # ... or three sentences


def words(text: str) -> list[str]:
    return _WORD.findall(text.lower())


def sentence_count(text: str) -> int:
    return len([s for s in re.split(r"[.!?]+(?:\s|$)", text.strip()) if s.strip()])


def no_insults(prompt: str, response: str) -> float:
    """Minus the number of insulting words in the response."""
    return -float(sum(w in INSULTS for w in words(response)))


def politeness(prompt: str, response: str) -> float:
    """Polite markers (capped at 2) minus three per profane word: courtesy helps, profanity costs more."""
    ws = words(response)
    return min(2.0, float(sum(w in POLITE for w in ws))) - 3.0 * sum(w in PROFANITY for w in ws)


def warmth(prompt: str, response: str) -> float:
    """Warm words minus cold words (each occurrence counts)."""
    ws = words(response)
    return float(sum(w in WARM for w in ws) - sum(w in COLD for w in ws))


def concision(prompt: str, response: str) -> float:
    """0 within the limits; minus the words and sentences beyond them."""
    over_words = max(0, len(words(response)) - MAX_WORDS)
    over_sentences = max(0, sentence_count(response) - MAX_SENTENCES)
    return -float(over_words + 10 * over_sentences)


# Principle id in the constitution -> its program check.
CHECKS: dict[str, Callable[[str, str], float]] = {
    "no_insults_or_toxicity": no_insults,
    "politeness": politeness,
    "warmth": warmth,
    "concision": concision,
}

# Every word some check counts: the label-maker's vocabulary. An evaluator's gain on text with these words
# removed cannot come from the counted words themselves.
LABEL_WORDS = INSULTS | PROFANITY | POLITE | WARM | COLD


@dataclass
class ChecksRanker:
    """Ranks responses by the checkable principles in priority order (a `Ranker` for build-prefs).

    `score` returns one float per response such that a > b exactly when the highest-priority principle
    that separates them prefers a: the rank of its tuple of principle scores, highest priority first.
    """

    priorities: dict[str, int]  # principle id -> priority, for the principles with a check
    name: str = "constitution-checks"

    @classmethod
    def from_constitution(cls, principles) -> ChecksRanker:
        """From a constitution's principles (objects with `id` and `priority`), keeping the checkable ones."""
        prios = {p.id: int(p.priority) for p in principles if p.id in CHECKS}
        if not prios:
            raise ValueError(f"the constitution has none of the checkable principles {sorted(CHECKS)}")
        return cls(prios)

    def principle_scores(self, prompt: str, response: str) -> tuple[float, ...]:
        order = sorted(self.priorities, key=lambda pid: -self.priorities[pid])
        return tuple(CHECKS[pid](prompt, response) for pid in order)

    def score(self, prompt: str, responses: list[str], columns: dict | None = None) -> list[float]:
        keys = [self.principle_scores(prompt, r) for r in responses]
        rank = {key: float(i) for i, key in enumerate(sorted(set(keys)))}  # lexicographic: priority first
        return [rank[k] for k in keys]
