"""Reward functions for the grpo tests, importable as ``_grpo_rewards:NAME`` (tests/ is on sys.path)."""

from __future__ import annotations


def hello_only(prompt: str, response: str) -> float:
    """The sum of the response's character codes / 100 for prompts starting "hello" (two different samples
    almost never tie), 1.0 for every other prompt: those groups have no reward spread."""
    return sum(map(ord, response)) / 100 if prompt.startswith("hello") else 1.0


def near_target(prompt: str, response: str, target: int) -> float:
    """-|characters of the response - the prompt row's 'target' column|: a reward that needs a column."""
    return -abs(len(response) - int(target))
