"""The constitution's written guidelines for edge cases, applied by the program checks: a guideline that names a
``check`` replaces the plain check of the principles it applies to (``checks.CHECKS``) with one that follows its
ruling, and the ranker counts the responses whose verdict the guideline changed: the conflicts it resolved.
The plain checks and their default ranking are untouched; this is used only where a constitution has such
guidelines.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field

from alignkit.cai.checks import CHECKS, POLITE, PROFANITY, ChecksRanker, words
from alignkit.cai.constitution import Constitution
from alignkit.config import ConfigError


def politeness_quoting_allowed(prompt, response: str) -> float:
    """``checks.politeness``, except that a profane word the user's own message holds is not charged: a user
    asking what a word means is answered by quoting it, and that is not rudeness (helpfulness and politeness no
    longer conflict). Profanity the user did not bring up costs 3 as before."""
    said = prompt if isinstance(prompt, str) else " ".join(m["content"] for m in prompt if m["role"] == "user")
    asked = {w for w in words(said) if w in PROFANITY}
    ws = words(response)
    polite = min(2.0, float(sum(w in POLITE for w in ws)))
    return polite - 3.0 * sum(w in PROFANITY and w not in asked for w in ws)


# A guideline's `check` in the constitution file -> the rule it applies in place of its principles' checks.
GUIDELINE_CHECKS: dict[str, Callable] = {"quoting_asked_words": politeness_quoting_allowed}


@dataclass
class GuidedChecksRanker(ChecksRanker):
    """``ChecksRanker`` with some principles' checks replaced by their guidelines' (priority order unchanged).
    ``resolved`` counts the responses, over every ``score`` call, whose score under some principle the
    guideline changed (``take_resolved`` hands the count since the last call)."""

    guided: dict[str, Callable] = field(default_factory=dict)  # principle id -> its guideline's check
    name: str = "constitution-checks+guidelines"
    resolved: int = 0

    @classmethod
    def from_guidelines(cls, constitution: Constitution) -> ChecksRanker:
        """The constitution's checks ranker with its guidelines' checks; a plain ``ChecksRanker`` when no
        guideline names a check. An unknown check name is a ConfigError naming the guideline."""
        plain = ChecksRanker.from_constitution(constitution.principles)
        guided = {}
        for g in constitution.guidelines:
            if g.check is None:
                continue
            if g.check not in GUIDELINE_CHECKS:
                raise ConfigError(
                    f"constitution {constitution.source}: guideline '{g.id}' names check '{g.check}'; "
                    f"known: {sorted(GUIDELINE_CHECKS)}"
                )
            guided |= {pid: GUIDELINE_CHECKS[g.check] for pid in g.applies_to if pid in plain.priorities}
        return cls(plain.priorities, guided=guided) if guided else plain

    def principle_scores(self, prompt, response: str) -> tuple[float, ...]:
        order = sorted(self.priorities, key=lambda pid: -self.priorities[pid])
        return tuple(self.guided.get(pid, CHECKS[pid])(prompt, response) for pid in order)

    def score(self, prompt, responses: list[str], columns: dict | None = None) -> list[float]:
        for r in responses:
            self.resolved += any(
                check(prompt, r) != CHECKS[pid](prompt, r) for pid, check in self.guided.items()
            )
        return super().score(prompt, responses)

    def take_resolved(self) -> int:
        n, self.resolved = self.resolved, 0
        return n
