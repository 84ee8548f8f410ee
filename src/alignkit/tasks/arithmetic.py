"""Arithmetic word problems with their answers, generated from a seed: a task with one right answer per prompt
for RL with verifiable rewards (``alignkit.scoring.verifiable:exact_answer``), needing no third-party data.

Each problem fills one of our own templates (shopping, sharing, time, distance, money, baking) with small whole
numbers; every intermediate and final answer is a whole number >= 1. Levels: 1 = one addition or subtraction
with numbers up to 30; 2 = one of + - x / (factors and divisors up to 10); 3 = two operations. Level 1 is tuned
so that SmolLM2-135M-Instruct, greedy, solves part of it (benchmarks/arithmetic_baseline.py: with numbers up
to 10 it solved ~60%, too many to leave RL room; up to 30, see benchmarks/README.md).
`alignkit make-task arithmetic n=500 seed=0 output=tasks.jsonl` writes the rows (``write_task``).
"""

from __future__ import annotations

import random
from dataclasses import dataclass

__all__ = [
    "INSTRUCTION",
    "LEVELS",
    "TEMPLATES",
    "Level",
    "Problem",
    "Template",
    "apply",
    "generate",
    "split",
]

# What every prompt asks for, so exact_answer and format_adherence can read the reply.
INSTRUCTION = 'Give the final answer on the last line as "Answer: <number>".'

NAMES = ("Mia", "Leo", "Ava", "Sam", "Zoe", "Ben", "Ivy", "Max", "Lea", "Tom", "Nia", "Eli")


@dataclass(frozen=True)
class Level:
    """How hard a level's problems are: which operation sequences, and the largest number drawn."""

    operations: tuple[tuple[str, ...], ...]  # each a sequence applied left to right: ("*", "+") is a * b + c
    max_number: int


LEVELS: dict[int, Level] = {
    1: Level(operations=(("+",), ("-",)), max_number=30),
    2: Level(operations=(("+",), ("-",), ("*",), ("/",)), max_number=30),
    3: Level(operations=(("+", "-"), ("*", "+"), ("*", "-"), ("+", "/"), ("-", "*")), max_number=30),
}


@dataclass(frozen=True)
class Template:
    """One story: its operation sequence and its text, with {name}, {a}, {b} and (two operations) {c}."""

    topic: str
    operations: tuple[str, ...]
    text: str


TEMPLATES: tuple[Template, ...] = (
    # --- one operation ---
    Template("shopping", ("+",), "{name} buys {a} apples and then {b} more apples. How many apples does {name} have?"),
    Template("time", ("+",), "A bus ride takes {a} minutes and the walk after it takes {b} minutes. How many minutes does the trip take?"),
    Template("distance", ("+",), "{name} walks {a} km in the morning and {b} km in the afternoon. How many km does {name} walk in all?"),
    Template("money", ("-",), "{name} has {a} dollars and spends {b} dollars on a book. How many dollars are left?"),
    Template("sharing", ("-",), "{name} has {a} stickers and gives {b} of them to a friend. How many stickers does {name} keep?"),
    Template("time", ("-",), "A film lasts {a} minutes. {name} has watched {b} minutes. How many minutes are left?"),
    Template("shopping", ("*",), "A pen costs {a} dollars. How many dollars do {b} pens cost?"),
    Template("distance", ("*",), "A cyclist rides {a} km every hour. How many km does she ride in {b} hours?"),
    Template("baking", ("*",), "{name} bakes {a} trays with {b} cookies on each tray. How many cookies are there?"),
    Template("sharing", ("/",), "{name} shares {a} sweets equally among {b} friends. How many sweets does each friend get?"),
    Template("time", ("/",), "{name} reads {a} pages in {b} days, the same number each day. How many pages a day is that?"),
    # --- two operations, applied left to right ---
    Template("shopping", ("+", "-"), "{name} has {a} marbles, wins {b} more, then loses {c}. How many marbles does {name} have now?"),
    Template("shopping", ("*", "+"), "{name} buys {a} packs of {b} cards and finds {c} loose cards. How many cards does {name} have?"),
    Template("distance", ("*", "+"), "A car drives {a} km each hour for {b} hours, then {c} km more. How many km does it drive?"),
    Template("baking", ("*", "-"), "{name} bakes {a} trays of {b} muffins and sells {c} muffins. How many muffins are left?"),
    Template("sharing", ("+", "/"), "{name} has {a} grapes and picks {b} more, then shares them equally among {c} friends. How many grapes does each friend get?"),
    Template("money", ("-", "*"), "A ticket costs {a} dollars, but members pay {b} dollars less. How many dollars do {c} members pay in all?"),
    Template("time", ("+", "-"), "{name} has {a} minutes of homework, gets {b} minutes more, then does {c} minutes of it. How many minutes of homework are left?"),
)  # fmt: skip


@dataclass(frozen=True)
class Problem:
    """One generated problem: its prompt, its answer, and what it was made from (so a test can recompute it)."""

    prompt: str
    answer: int
    level: int
    topic: str
    operations: tuple[str, ...]
    numbers: tuple[int, ...]  # a, b[, c]

    def row(self) -> dict:
        """The problem as a prompt-file row: 'prompt' and 'answer' (what exact_answer reads), and its makings."""
        return {
            "prompt": self.prompt,
            "answer": self.answer,
            "level": self.level,
            "topic": self.topic,
            "operations": list(self.operations),
            "numbers": list(self.numbers),
        }


def apply(operations: tuple[str, ...], numbers: tuple[int, ...]) -> int:
    """The numbers combined left to right: apply(("*", "+"), (3, 4, 5)) = 3 * 4 + 5 = 17. Division must be
    exact (the generator draws it so)."""
    value = numbers[0]
    for op, x in zip(operations, numbers[1:]):
        if op == "/":
            if x == 0 or value % x:
                raise ValueError(f"{value} / {x} is not a whole number")
            value //= x
        else:
            value = {"+": value + x, "-": value - x, "*": value * x}[op]
    return value


def _draw(rng: random.Random, op: str, left: int | None, top: int) -> tuple[int, int]:
    """(left operand, right operand) of ``op`` with numbers up to ``top``, the left one given where an earlier
    operation made it: subtraction never goes below 1, products keep both factors <= 10, division is exact."""
    if op == "+":
        return (left if left is not None else rng.randint(1, top)), rng.randint(1, top)
    if op == "-":
        a = left if left is not None else rng.randint(2, top)
        return a, rng.randint(1, a - 1)
    if op == "*":
        small = min(top, 10)
        return (left if left is not None else rng.randint(2, small)), rng.randint(2, small)
    if left is not None:
        raise ValueError("division is drawn with its dividend, never after another operation")
    divisor = rng.randint(2, min(top, 10))  # "/": the quotient and the divisor first, so it is exact
    return divisor * rng.randint(2, max(2, top // 2)), divisor


def make_problem(rng: random.Random, level: int) -> Problem:
    """One problem of ``level``: an operation sequence of the level, a template for it, numbers for it."""
    spec = LEVELS[level]
    operations = rng.choice(spec.operations)
    template = rng.choice([t for t in TEMPLATES if t.operations == operations])
    if operations == ("+", "/"):
        # (a + b) / c exact: c and the quotient first, then the dividend split into a + b.
        c = rng.randint(2, min(spec.max_number, 10))
        total = c * rng.randint(2, max(2, spec.max_number // 2))
        a = rng.randint(1, total - 1)
        numbers: tuple[int, ...] = (a, total - a, c)
    else:
        numbers = _draw(rng, operations[0], None, spec.max_number)
        if len(operations) == 2:
            numbers += _draw(rng, operations[1], apply(operations[:1], numbers), spec.max_number)[1:]
    values = dict(zip("abc", numbers))
    question = template.text.format(name=rng.choice(NAMES), **values)
    return Problem(
        f"{question}\n{INSTRUCTION}",
        apply(operations, numbers),
        level,
        template.topic,
        operations,
        numbers,
    )


def generate(n: int, seed: int, level: int = 1) -> list[Problem]:
    """``n`` distinct problems (no prompt twice) of ``level``, the same for the same seed on every machine
    (Python's own ``random.Random``, independent of the global RNG)."""
    if level not in LEVELS:
        raise ValueError(f"level must be one of {sorted(LEVELS)}, got {level}")
    rng = random.Random(seed)
    problems: dict[str, Problem] = {}
    for _ in range(n * 50):  # level 1 holds tens of thousands of distinct prompts; this bound is never near
        if len(problems) == n:
            break
        problem = make_problem(rng, level)
        problems.setdefault(problem.prompt, problem)
    if len(problems) < n:
        raise ValueError(f"level {level} gave only {len(problems)} distinct problems of the {n} asked for")
    return list(problems.values())


def split(problems: list[Problem], held_out: int) -> tuple[list[Problem], list[Problem]]:
    """(training problems, held-out problems): the first ``held_out`` of a generated list are held out. The
    problems are distinct, so no held-out prompt is trained on; the generation order is already seeded."""
    if not 0 <= held_out <= len(problems):
        raise ValueError(f"held_out must be between 0 and {len(problems)}, got {held_out}")
    return problems[held_out:], problems[:held_out]
