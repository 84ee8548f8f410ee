"""The AI-feedback judge of RLAIF (Bai et al. 2022, "Constitutional AI", sec. 4): a model asked which of
two responses better meets a principle, answered as a multiple choice read from the log-probabilities of
the option tokens "(A)" / "(B)", asked in both orders to cancel position bias, over several principles
whose disagreements the principles' priorities settle.
"""

from __future__ import annotations

import json
import zlib
from collections.abc import Callable, Sequence
from dataclasses import dataclass

import numpy as np
import torch

from alignkit.cai.constitution import Constitution, Guideline, Principle
from alignkit.data.schemas import Prompt
from alignkit.data.tokenize import encode_prompt, has_chat_template
from alignkit.errors import AlignkitError
from alignkit.models.forward import sequence_logprobs, supports_chunked_head

OPTION_LABELS = ("A", "B")
# A preference within this distance of 0.5 is no preference: the two orders of an "always (A)" judge
# average to 0.5 only up to float rounding, and that must read as a tie, not as a weak preference.
TIE_EPS = 1e-6

# Our wording (the published CAI prompts are reference material only). The comparison instruction of the
# principle ("Which response ...?") is the question; the answer is read from the token after "(".
JUDGE_TEMPLATE = (
    "Here is a conversation between a user and an AI assistant, followed by two candidate replies for "
    "the assistant's next turn.\n\n"
    "Conversation:\n{conversation}\n\n"
    "Reply (A):\n{response_a}\n\n"
    "Reply (B):\n{response_b}\n\n"
    "{instruction} Answer with (A) or (B)."
)


def guided_instruction(comparison: str, guidelines: Sequence[Guideline]) -> str:
    """A principle's comparison question with the constitution's guidelines for it appended, so the judge reads
    the ruling on the edge case next to the question it bears on; no guidelines: the question as it is."""
    if not guidelines:
        return comparison
    rulings = " ".join(g.text.rstrip(".") + "." for g in guidelines)
    return f"{comparison.strip()} Guidelines for edge cases: {rulings}"


class JudgeError(AlignkitError, ValueError):
    """The judge cannot be asked as configured (e.g. the tokenizer merges the option into its prefix)."""


# ---------------------------------------------------------------------------------------------
# The question, as token ids
# ---------------------------------------------------------------------------------------------


def answer_prefix(tokenizer) -> str:
    """Text the judge's reply starts with, so its next tokens are the option letter: "(" after a chat
    template's assistant header; " (" after the "Assistant:" line of a template-less model."""
    return "(" if has_chat_template(tokenizer) else " ("


def clip_text(tokenizer, text: str, max_tokens: int | None, keep: str = "start") -> str:
    """``text`` cut to ``max_tokens`` tokens, keeping its start (a response) or its end (a conversation,
    whose last turn is what the replies answer); the cut is marked with "...". None: no limit."""
    if max_tokens is None:
        return text
    ids = tokenizer(text, add_special_tokens=False)["input_ids"]
    if len(ids) <= max_tokens:
        return text
    if keep == "start":
        return tokenizer.decode(ids[:max_tokens]).rstrip() + " ..."
    return "... " + tokenizer.decode(ids[-max_tokens:]).lstrip()


def render_conversation(prompt: Prompt) -> str:
    """The conversation so far as "User: ..." / "Assistant: ..." paragraphs (a text prompt is one user turn)."""
    messages = [{"role": "user", "content": prompt}] if isinstance(prompt, str) else prompt
    return "\n\n".join(f"{m['role'].capitalize()}: {m['content'].strip()}" for m in messages)


def build_judge_prompt(
    tokenizer,
    prompt: Prompt,
    response_a: str,
    response_b: str,
    instruction: str,
    max_context_tokens: int | None = None,
    max_response_tokens: int | None = None,
) -> list[int]:
    """Token ids of the question "which reply is better under ``instruction``", ending with the judge's
    answer prefix "(" so that the next token is the option letter.

    The question is one user turn rendered with the judge's chat template (`encode_prompt`); the answer
    prefix is tokenized on its own and appended, the same boundary rule as prompt/completion everywhere in
    alignkit. ``option_token_ids`` checks that the letters then follow as their own tokens.
    """
    question = JUDGE_TEMPLATE.format(
        conversation=clip_text(tokenizer, render_conversation(prompt), max_context_tokens, keep="end"),
        response_a=clip_text(tokenizer, response_a.strip(), max_response_tokens),
        response_b=clip_text(tokenizer, response_b.strip(), max_response_tokens),
        instruction=instruction.strip(),
    )
    prefix_ids = tokenizer(answer_prefix(tokenizer), add_special_tokens=False)["input_ids"]
    return encode_prompt(tokenizer, [{"role": "user", "content": question}]) + prefix_ids


def option_token_ids(tokenizer) -> list[list[int]]:
    """The token ids of each option letter as it follows the answer prefix: [[ids of A], [ids of B]].

    Exact only if the tokenizer writes "(A" as "(" then "A" (no merged "(A" token); that is checked by
    comparing tokenize(prefix + letter) with tokenize(prefix) + tokenize(letter), and a tokenizer that
    merges is refused. SmolLM2 and our tiny test tokenizer both split "(A)" into "(", "A", ")", so each
    option is one token; a tokenizer that spells a letter in several tokens is scored on their sum.
    """
    prefix = answer_prefix(tokenizer)
    base = tokenizer(prefix, add_special_tokens=False)["input_ids"]
    options = []
    for label in OPTION_LABELS:
        full = tokenizer(prefix + label, add_special_tokens=False)["input_ids"]
        if full[: len(base)] != base or len(full) == len(base):
            raise JudgeError(
                f"the judge's tokenizer merges {prefix + label!r} into one token, so the option letter cannot "
                "be read on its own; use another judge model"
            )
        options.append(full[len(base) :])
    if options[0] == options[1]:
        raise JudgeError("the judge's tokenizer gives both option letters the same ids")
    return options


# ---------------------------------------------------------------------------------------------
# Reading the answer
# ---------------------------------------------------------------------------------------------


def _right_padded(rows: Sequence[Sequence[int]], device) -> tuple[torch.Tensor, torch.Tensor]:
    width = max(len(r) for r in rows)
    ids = torch.zeros((len(rows), width), dtype=torch.long)  # (B, T); pad value is never attended to
    attn = torch.zeros((len(rows), width), dtype=torch.long)
    for i, r in enumerate(rows):
        ids[i, : len(r)] = torch.tensor(r, dtype=torch.long)
        attn[i, : len(r)] = 1
    return ids.to(device), attn.to(device)


@torch.no_grad()
def option_logprobs(
    model, ids_batch: Sequence[Sequence[int]], option_ids: Sequence[Sequence[int]]
) -> torch.Tensor:
    """log p(option | question) for each question and each option: (B, 2), over the judge's full vocabulary.

    Right padding: the real tokens of every row sit at positions 0..len-1, so their positions and causal
    attention are those of the row alone, and the next-token distribution is read at the last real
    position of each row. Single-token options need one pass (log-softmax at that position, gathered at
    the option ids); multi-token options are teacher-forced, one pass per option, and summed.
    """
    device = next(model.parameters()).device
    lengths = torch.tensor([len(r) for r in ids_batch], device=device)  # (B,)
    rows = torch.arange(len(ids_batch), device=device)
    if all(len(o) == 1 for o in option_ids):
        ids, attn = _right_padded(ids_batch, device)
        if supports_chunked_head(model):
            # The head on the B last positions only, not on all B*T.
            base = model.get_base_model() if hasattr(model, "get_base_model") else model
            hidden = base.get_decoder()(input_ids=ids, attention_mask=attn, use_cache=False).last_hidden_state
            logits = base.get_output_embeddings()(hidden[rows, lengths - 1])  # (B, V)
        else:
            logits = model(input_ids=ids, attention_mask=attn, use_cache=False).logits[rows, lengths - 1]
        logp = torch.log_softmax(logits.float(), dim=-1)  # (B, V)
        return logp[:, [o[0] for o in option_ids]]  # (B, 2)
    columns = []
    for option in option_ids:
        seqs = [[*r, *option] for r in ids_batch]
        ids, attn = _right_padded(seqs, device)
        loss_mask = torch.zeros_like(ids)  # (B, T) 1 on the option's tokens
        for i, r in enumerate(ids_batch):
            loss_mask[i, len(r) : len(r) + len(option)] = 1
        columns.append(sequence_logprobs(model, ids, attn, loss_mask).sum.float())  # (B,)
    return torch.stack(columns, dim=1)  # (B, 2)


@dataclass(frozen=True)
class JudgeResult:
    """One comparison under one instruction, asked in both orders."""

    p_a: float  # P(response_a is better), the mean of the two orders below
    p_a_order1: float  # shown as (A): softmax over the two options, at A
    p_a_order2: float  # shown as (B), response_b as (A): the softmax at B
    option_mass: float  # mean p(A) + p(B) over the two orders: how much the judge answers the question at all
    failures: tuple[str, ...] = ()  # an endpoint judge's failed orders, by name (each counted as p = 1/2)


@dataclass(frozen=True)
class PairQuestion:
    prompt: Prompt
    response_a: str
    response_b: str
    instruction: str


def judge_pairs(
    model,
    tokenizer,
    questions: Sequence[PairQuestion],
    batch_size: int = 8,
    max_context_tokens: int | None = None,
    max_response_tokens: int | None = None,
) -> list[JudgeResult]:
    """Ask every question in both orders, batched (length-sorted) and de-biased by averaging the orders.

    In order 1 response_a is option (A); in order 2 the responses swap, so response_a is (B). Each order's
    probability is the softmax over the two option log-probs alone (what the judge would pick if it had
    to pick one); averaging P(response_a) over the orders cancels a constant preference for a position:
    a judge that always says (A) with probability q gives (q + (1 - q)) / 2 = 1/2.
    """
    options = option_token_ids(tokenizer)
    prompts = []  # 2 per question: order 1, order 2
    for q in questions:
        for a, b in ((q.response_a, q.response_b), (q.response_b, q.response_a)):
            prompts.append(
                build_judge_prompt(
                    tokenizer, q.prompt, a, b, q.instruction, max_context_tokens, max_response_tokens
                )
            )
    logps = torch.empty((len(prompts), 2), dtype=torch.float64)  # (2Q, 2)
    order = sorted(range(len(prompts)), key=lambda i: len(prompts[i]))
    for start in range(0, len(order), batch_size):
        idx = order[start : start + batch_size]
        logps[idx] = option_logprobs(model, [prompts[i] for i in idx], options).double().cpu()
    p_first = torch.softmax(logps, dim=1)[:, 0]  # (2Q,) P(option A) among the two options
    mass = logps.exp().sum(dim=1)  # (2Q,)
    results = []
    for k in range(len(questions)):
        p1 = float(p_first[2 * k])  # response_a shown as (A)
        p2 = 1.0 - float(p_first[2 * k + 1])  # response_a shown as (B)
        results.append(JudgeResult((p1 + p2) / 2, p1, p2, float(mass[2 * k : 2 * k + 2].mean())))
    return results


def judge_pair(
    model, tokenizer, prompt: Prompt, response_a: str, response_b: str, instruction: str, **kwargs
) -> JudgeResult:
    """One question, both orders; see ``judge_pairs``."""
    return judge_pairs(
        model, tokenizer, [PairQuestion(prompt, response_a, response_b, instruction)], **kwargs
    )[0]


# ---------------------------------------------------------------------------------------------
# Several principles on one comparison
# ---------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class Combined:
    p: float  # P(response 1 is better) after the conflict rule
    conflict: bool  # the principles' hard preferences disagreed
    deciding: tuple[int, ...]  # indices of the principles whose probabilities were averaged into p


def hard_preference(p: float) -> int:
    """+1 prefers response 1, -1 prefers response 2, 0 no preference (within TIE_EPS of 1/2)."""
    return 0 if abs(p - 0.5) <= TIE_EPS else (1 if p > 0.5 else -1)


def combine_principles(p_values: Sequence[float], priorities: Sequence[int]) -> Combined:
    """One probability from the per-principle probabilities of one comparison (the conflict rule).

    - No conflict (no two principles prefer different responses; an undecided principle, p = 1/2, never
      conflicts): p is the mean over all principles, as CAI averages its sampled principles.
    - Conflict (one prefers response 1 and another response 2): only the principles with the highest
      priority among those applied decide; p is the mean of their probabilities (several at that
      priority are averaged, so they may still land on either side, or on 1/2). A harm principle thus
      overrides a helpfulness one, which is the order the constitution states.
    """
    if len(p_values) != len(priorities) or not p_values:
        raise ValueError(f"need one priority per probability, got {len(p_values)} and {len(priorities)}")
    prefs = [hard_preference(p) for p in p_values]
    conflict = 1 in prefs and -1 in prefs
    if conflict:
        top = max(priorities)
        deciding = tuple(i for i, pr in enumerate(priorities) if pr == top)
    else:
        deciding = tuple(range(len(p_values)))
    return Combined(float(np.mean([p_values[i] for i in deciding])), conflict, deciding)


@dataclass(frozen=True)
class Comparison:
    """Response 1 against response 2 under several principles."""

    p: float  # P(response 1 is better), after combining the principles
    conflict: bool
    principles: tuple[Principle, ...]
    results: tuple[JudgeResult, ...]  # one per principle, P(response 1) in each
    deciding: tuple[str, ...]  # ids of the principles that set p
    guided: tuple[str, ...] = ()  # ids of the constitution's guidelines shown to the judge in this comparison

    def per_principle(self, flip: bool = False) -> list[dict]:
        """Per-principle probabilities as output columns; ``flip`` gives them for response 2."""

        def f(x: float) -> float:
            return 1.0 - x if flip else x

        return [
            {
                "id": pr.id,
                "priority": pr.priority,
                "p": f(r.p_a),
                "p_order1": f(r.p_a_order1),
                "p_order2": f(r.p_a_order2),
                "option_mass": r.option_mass,
            }
            for pr, r in zip(self.principles, self.results)
        ]


@dataclass
class PairwiseJudge:
    """A judge model with its constitution: compares two responses under k principles drawn per comparison."""

    model: object
    tokenizer: object
    constitution: Constitution
    principles_per_comparison: int = 2
    batch_size: int = 8
    max_context_tokens: int | None = 384
    max_response_tokens: int | None = 192
    # Answers the questions instead of the local model (an endpoint judge: ``endpoint_judge.py``); None: local.
    ask: Callable[[list[PairQuestion]], list[JudgeResult]] | None = None

    def compare(
        self, items: Sequence[tuple[Prompt, str, str]], principles: Sequence[Sequence[Principle]]
    ) -> list[Comparison]:
        """Compare (prompt, response 1, response 2) items, item i under ``principles[i]``, in one batch."""
        questions, owner = [], []
        for k, ((prompt, r1, r2), prs) in enumerate(zip(items, principles, strict=True)):
            for pr in prs:
                guidelines = self.constitution.guidelines_for(pr.id)
                questions.append(PairQuestion(prompt, r1, r2, guided_instruction(pr.comparison, guidelines)))
                owner.append(k)
        if self.ask is not None:
            results = self.ask(questions)
        else:
            results = judge_pairs(
                self.model,
                self.tokenizer,
                questions,
                self.batch_size,
                self.max_context_tokens,
                self.max_response_tokens,
            )
        comparisons = []
        for k, prs in enumerate(principles):
            mine = tuple(r for r, o in zip(results, owner) if o == k)
            combined = combine_principles([r.p_a for r in mine], [pr.priority for pr in prs])
            comparisons.append(
                Comparison(
                    combined.p,
                    combined.conflict,
                    tuple(prs),
                    mine,
                    tuple(prs[i].id for i in combined.deciding),
                    tuple(g.id for pr in prs for g in self.constitution.guidelines_for(pr.id)),
                )
            )
        return comparisons

    def draw(self, rng: np.random.Generator) -> list[Principle]:
        return self.constitution.sample(self.principles_per_comparison, rng)


def prompt_key(prompt: Prompt) -> int:
    """A stable 32-bit key of a prompt (crc32 of its JSON), to seed per-prompt draws reproducibly."""
    return zlib.crc32(json.dumps(prompt, sort_keys=True, ensure_ascii=False).encode("utf-8"))


class JudgeRanker:
    """Ranks N responses by round-robin judge comparisons: response i scores the mean, over the other
    N - 1 responses j, of P(i is better than j) (P(j beats i) = 1 - P(i beats j)), so scores lie in
    [0, 1] and sum to N/2 — a Borda-style count with soft wins. Each of the N(N-1)/2 comparisons draws
    its principles from (seed, the prompt, i, j), so a resumed build-prefs run judges exactly as before.
    """

    def __init__(self, judge: PairwiseJudge, seed: int, name: str):
        self.judge = judge
        self.seed = seed
        self.name = name

    def score(self, prompt: Prompt, responses: list[str], columns: dict | None = None) -> list[float]:
        n = len(responses)
        if n < 2:
            return [float("nan")] * n
        pairs = [(i, j) for i in range(n) for j in range(i + 1, n)]
        key = prompt_key(prompt)
        drawn = [self.judge.draw(np.random.default_rng([self.seed, key, i, j])) for i, j in pairs]
        comparisons = self.judge.compare([(prompt, responses[i], responses[j]) for i, j in pairs], drawn)
        wins = np.zeros(n)
        for (i, j), c in zip(pairs, comparisons):
            wins[i] += c.p
            wins[j] += 1.0 - c.p
        return (wins / (n - 1)).tolist()
