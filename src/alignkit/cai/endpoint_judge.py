"""The pairwise judge over an OpenAI-compatible endpoint: the same question as the local judge (both orders,
averaged), answered from the log-probabilities of the option letters when the server returns them, else
from a single letter parsed out of the reply. A reply that gives neither is a counted failure
("unparseable"), never a guess.
"""

from __future__ import annotations

import math
import re
from collections.abc import Sequence

from alignkit.cai.judge import JUDGE_TEMPLATE, OPTION_LABELS, JudgeResult, PairQuestion, render_conversation
from alignkit.models.endpoint import ChatEndpoint, EndpointReply

# A served model reads the whole question; no answer prefix can be forced on it, so it is asked for the bare
# letter, which is then its first token.
_ASK_LETTER = "Answer with a single letter: A or B."
_BRACKETED = re.compile(r"\(([AB])\)")
_LEADING = re.compile(r"\s*(?:answer\s*[:\-]?\s*)?\(?([AB])\)?(?![A-Za-z0-9])", re.I)
# About 4 characters per token for English under the common BPE vocabularies (GPT, Llama, SmolLM2): an
# approximation, so a token limit reads as a character limit of 4x its value.
CHARS_PER_TOKEN = 4


def clip_chars(text: str, max_tokens: int | None, keep: str = "start") -> str:
    """``text`` cut to ``max_tokens * CHARS_PER_TOKEN`` characters, keeping its start (a response) or its end
    (a conversation), the cut marked with "..." as ``judge.clip_text`` marks it; None: no limit."""
    if max_tokens is None or len(text) <= max_tokens * CHARS_PER_TOKEN:
        return text
    n = max_tokens * CHARS_PER_TOKEN
    if keep == "start":
        return text[:n].rstrip() + " ..."
    return "... " + text[-n:].lstrip()


def endpoint_question(
    q: PairQuestion,
    response_a: str,
    response_b: str,
    max_context_tokens: int | None = None,
    max_response_tokens: int | None = None,
) -> str:
    """The judge question of ``judge.build_judge_prompt`` as text, clipped by characters (``clip_chars``)."""
    text = JUDGE_TEMPLATE.format(
        conversation=clip_chars(render_conversation(q.prompt), max_context_tokens, keep="end"),
        response_a=clip_chars(response_a.strip(), max_response_tokens),
        response_b=clip_chars(response_b.strip(), max_response_tokens),
        instruction=q.instruction.strip(),
    )
    return text.replace("Answer with (A) or (B).", _ASK_LETTER)


def p_first_from_logprobs(top: dict[str, float]) -> tuple[float, float] | None:
    """(P(A) among the two options, p(A) + p(B)) from the first token's top log-probs; None when neither letter
    is among them. Tokens are matched after stripping spaces and brackets (" A", "(A" count as A). A letter
    missing from the list gets the list's lowest log-prob: an upper bound on its true value."""
    mass = {label: [] for label in OPTION_LABELS}
    for token, logprob in top.items():
        key = token.strip().strip("()").strip()
        if key in mass:
            mass[key].append(logprob)
    if not any(mass.values()):
        return None
    floor = min(top.values())
    lp = [math.log(sum(math.exp(x) for x in mass[k])) if mass[k] else floor for k in OPTION_LABELS]
    top_lp = max(lp)
    p_a = math.exp(lp[0] - top_lp) / (math.exp(lp[0] - top_lp) + math.exp(lp[1] - top_lp))
    return p_a, sum(math.exp(x) for k in OPTION_LABELS for x in mass[k])


def parse_letter(text: str) -> str | None:
    """The option a reply names: one bracketed letter "(A)" anywhere, else a leading "A" / "Answer: B";
    None when it names neither or both."""
    bracketed = set(_BRACKETED.findall(text))
    if len(bracketed) == 1:
        return bracketed.pop()
    if bracketed:
        return None
    m = _LEADING.match(text)
    return m.group(1).upper() if m else None


def read_answer(reply: EndpointReply) -> tuple[float, float, str | None]:
    """(P(the first-shown reply is better), option mass, failure name or None) of one endpoint reply."""
    if reply.failure:
        return 0.5, 0.0, reply.failure
    if reply.top_logprobs:
        from_logprobs = p_first_from_logprobs(reply.top_logprobs)
        if from_logprobs is not None:
            return from_logprobs[0], from_logprobs[1], None
    letter = parse_letter(reply.text)
    if letter is None:
        return 0.5, 0.0, "unparseable"
    return (1.0 if letter == "A" else 0.0), 1.0, None


def endpoint_judge_pairs(
    endpoint: ChatEndpoint,
    questions: Sequence[PairQuestion],
    max_context_tokens: int | None = None,
    max_response_tokens: int | None = None,
) -> list[JudgeResult]:
    """Ask every question in both orders over ``endpoint`` (as ``judge.judge_pairs`` does locally): greedy,
    a few tokens, with the top log-probs of the first token requested."""
    conversations = []
    for q in questions:
        for a, b in ((q.response_a, q.response_b), (q.response_b, q.response_a)):
            question = endpoint_question(q, a, b, max_context_tokens, max_response_tokens)
            conversations.append([{"role": "user", "content": question}])
    replies = endpoint.chat_many(conversations, max_tokens=4, temperature=0.0, logprobs=True, top_logprobs=20)
    results = []
    for k in range(len(questions)):
        p1, mass1, fail1 = read_answer(replies[2 * k])  # response_a shown as (A)
        p_b_first, mass2, fail2 = read_answer(replies[2 * k + 1])  # response_b shown as (A)
        p2 = 1.0 - p_b_first
        failures = tuple(f for f in (fail1, fail2) if f)
        results.append(JudgeResult((p1 + p2) / 2, p1, p2, (mass1 + mass2) / 2, failures))
    return results
