"""Verifiable rewards: functions that check a response against a known answer, for tasks with one right answer
(``alignkit.tasks.arithmetic``), as RL on math-style tasks rewards them (DeepSeekMath's GRPO, Tülu 3's RLVR,
DAPO): ``reward=alignkit.scoring.verifiable:exact_answer`` on a prompt file with an ``answer`` column.

Several combine with weights, e.g. ``reward=[alignkit.scoring.verifiable:exact_answer,
alignkit.scoring.verifiable:format_adherence] reward_weights=[1.0,0.2]``. Each is a plain function of
(prompt, response, [columns]) -> float, pure and deterministic.
"""

from __future__ import annotations

import math
import re

from alignkit.scoring.scorers import RewardFunctionError

__all__ = [
    "ANSWER_TOLERANCE",
    "LENGTH_TARGET_WORDS",
    "exact_answer",
    "extract_answer",
    "format_adherence",
    "length",
    "parse_number",
]

ANSWER_TOLERANCE = 1e-6  # relative to max(1, |answer|): 0.1 + 0.2 matches 0.3, 1000.001 does not match 1000
LENGTH_TARGET_WORDS = 100  # `length`: no penalty up to 100 words, -1 from 200 on

# A number as people write it: an optional sign (not a hyphen inside a word or range: "3-4" is 3 and 4),
# thousands separated by commas ("1,234"), decimals ("2.50"), or a fraction of whole numbers ("3/4").
_NUMBER = r"(?<![\w.])-?(?:\d{1,3}(?:,\d{3})+(?!\d)|\d+)(?:\.\d+)?(?:/\d+(?!\.\d))?"
NUMBER = re.compile(_NUMBER)
# "\frac{3}{4}" (or \dfrac, \tfrac) inside a box.
_FRAC = re.compile(r"^(-?)\\[dt]?frac\{\s*(-?\d+)\s*\}\{\s*(\d+)\s*\}$")
# "Answer: 42" on a line of its own, markdown emphasis around the word allowed ("**Answer:** 42"), a currency
# sign, a percent sign or a full stop after the number allowed.
_ANSWER_LINE = re.compile(
    rf"^[ \t*_#>]*answer[ \t*_]*:[ \t*_]*\$?[ \t]*({_NUMBER})[ \t]*%?[ \t*_]*\.?[ \t]*$",
    re.IGNORECASE | re.MULTILINE,
)


def parse_number(text: str) -> float | None:
    """The value of one number as written: "1,234" -> 1234.0, "-2.50" -> -2.5, "3/4" -> 0.75,
    "\\frac{3}{4}" -> 0.75, "$12" -> 12.0; None for text that is not one number (or a fraction over 0)."""
    text = text.strip().strip("$").strip()
    frac = _FRAC.match(text)
    if frac:
        sign, numerator, denominator = frac.groups()
        text = f"{sign}{numerator}/{denominator}".replace("--", "")
    match = NUMBER.fullmatch(text)
    if not match:
        return None
    whole, _, denominator = match.group().replace(",", "").partition("/")
    if denominator:
        return float(whole) / float(denominator) if float(denominator) else None
    return float(whole)


def _boxed_contents(text: str) -> list[str]:
    """What each \\boxed{...} holds, braces balanced ("\\boxed{\\frac{1}{2}}" -> "\\frac{1}{2}"); an unclosed
    box is left out."""
    contents = []
    for start in (m.end() for m in re.finditer(r"\\boxed\s*\{", text)):
        depth = 1
        for i in range(start, len(text)):
            depth += {"{": 1, "}": -1}.get(text[i], 0)
            if depth == 0:
                contents.append(text[start:i])
                break
    return contents


def extract_answer(response: str) -> float | None:
    """The response's final answer, by the first rule that applies:

    1. a ``\\boxed{...}``: the last box (a response that boxes several answers commits to the last), its
       content read as one number or, failing that, its last number; a box with no number gives None;
    2. a line "Answer: <number>" (what the arithmetic task asks for): the last such line;
    3. otherwise the last number anywhere in the response (GSM8K-style extraction).

    None when there is no number at all."""
    boxes = _boxed_contents(response)
    if boxes:
        box = boxes[-1]
        value = parse_number(box)
        if value is not None:
            return value
        numbers = NUMBER.findall(box)
        return parse_number(numbers[-1]) if numbers else None
    lines = _ANSWER_LINE.findall(response)
    if lines:
        return parse_number(lines[-1])
    numbers = NUMBER.findall(response)
    return parse_number(numbers[-1]) if numbers else None


def exact_answer(prompt: str, response: str, answer, tolerance: float = ANSWER_TOLERANCE) -> float:
    """1.0 when the response's final answer (``extract_answer``) equals the prompt row's ``answer`` within
    ``tolerance`` x max(1, |answer|), else 0.0 (no number in the response: 0.0).

    ``answer`` is the prompt file's column: a number, or text such as "1,234", "-3" or "3/4". A row's own
    ``tolerance`` column, where the file has one, replaces the default."""
    expected = _expected(answer)
    predicted = extract_answer(response)
    if predicted is None:
        return 0.0
    return 1.0 if abs(predicted - expected) <= tolerance * max(1.0, abs(expected)) else 0.0


def _expected(answer) -> float:
    """The row's answer as a number; an answer that is not one is the data's error, named."""
    if isinstance(answer, (int, float)) and not isinstance(answer, bool):
        value = float(answer)
    else:
        value = parse_number(answer) if isinstance(answer, str) else None
    if value is None or not math.isfinite(value):
        raise RewardFunctionError(
            f"exact_answer: the prompt row's answer {answer!r} is not a number (e.g. 42, -3.5, '1,234', '3/4')"
        )
    return value


def format_adherence(prompt: str, response: str) -> float:
    """1.0 when the response gives its final answer in the form the prompt asks for, else 0.0: a
    ``\\boxed{<number>}`` where the prompt mentions \\boxed, otherwise a line of its own "Answer: <number>"
    (case-insensitive; "**Answer:** 42", "Answer: $12", "Answer: 7." count; "Answer: about 7" does not). It
    checks the form, not the value: pair it with ``exact_answer``."""
    if "\\boxed" in prompt:
        boxes = _boxed_contents(response)
        return 1.0 if boxes and parse_number(boxes[-1]) is not None else 0.0
    return 1.0 if _ANSWER_LINE.search(response) else 0.0


def length(prompt: str, response: str, target_words: int = LENGTH_TARGET_WORDS) -> float:
    """A length penalty past a target, DAPO's soft overlong punishment (Yu et al. 2025, eq. 13, with
    L_max - L_cache = T and L_cache = T), for n words (whitespace-separated) and T = ``target_words``:

        0               for n <= T
        (T - n) / T     for T < n <= 2T   (falls linearly from 0 to -1)
        -1              for n > 2T

    It only subtracts: add it to a task reward (reward_weights) so that rambling costs and a short right answer
    does not. A row's own ``target_words`` column, where the file has one, replaces the default. DAPO counts
    tokens; words keep the function tokenizer-free."""
    if target_words < 1:
        raise RewardFunctionError(f"length: target_words must be at least 1, got {target_words!r}")
    n = len(response.split())
    if n <= target_words:
        return 0.0
    return max(-1.0, (target_words - n) / target_words)
