"""Reward functions for the PPO stage tests, importable as ``_ppo_rewards:NAME`` (tests/ is on sys.path)."""

from __future__ import annotations


def length(prompt: str, response: str) -> float:
    """Characters in the response / 10: a random tiny model's responses differ in length, so scores vary."""
    return len(response) / 10


def not_a_number(prompt: str, response: str) -> str:
    """A broken reward: returns text, which the stage must refuse with a message naming the reward."""
    return "high"
