"""Reward functions for the PPO and online-dpo tests, importable as ``_ppo_rewards:NAME`` (tests/ is on
sys.path, also in the processes tests/test_distributed.py launches)."""

from __future__ import annotations


def length(prompt: str, response: str) -> float:
    """Characters in the response / 10: a random tiny model's responses differ in length, so scores vary."""
    return len(response) / 10


def not_a_number(prompt: str, response: str) -> str:
    """A broken reward: returns text, which the stage must refuse with a message naming the reward."""
    return "high"


def length_of_hello(prompt: str, response: str) -> float:
    """``length`` for responses to the prompt "hello", 0 for every other prompt: only that prompt's samples can
    make an online-dpo pair (the others all tie), so a round without it makes none."""
    return len(response) / 10 if prompt == "hello" else 0.0


def wrong_signature(response: str) -> float:
    """Takes the response only: refused when the config is checked (it must take the prompt too)."""
    return float(len(response))


def shortness(prompt: str, response: str) -> float:
    """A gold judge that disagrees with ``length``: minus the characters, so what raises that proxy lowers it
    (ten times as fast: the proxy-vs-gold check then sees a fall far above its threshold)."""
    return -float(len(response))


def answer_distance(prompt: str, response: str, answer: int) -> float:
    """Minus the distance between the response's length in characters and the prompt row's ``answer`` column:
    a reward that reads the prompt file's columns (a test can recompute it from samples.jsonl)."""
    return -float(abs(len(response) - answer))
