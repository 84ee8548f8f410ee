"""Programmatic scorers for the eval tests, loaded as reward=_scorers:<name> (tests/ is on sys.path)."""

from __future__ import annotations


def length_score(prompt: str, response: str) -> float:
    """Longer responses score higher: deterministic in the response alone."""
    return float(len(response))


def constant_score(prompt: str, response: str) -> float:
    """Every response scores the same: every comparison is a tie."""
    return 1.0


not_a_function = 3
