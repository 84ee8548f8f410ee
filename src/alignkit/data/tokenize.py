"""Turn prompts and completions into token ids for training and generation.

The prompt is rendered (chat template with its generation prompt) and tokenized on its own; each
completion is tokenized on its own and ends with EOS. Concatenating the two id lists, rather than
tokenizing joined text, means no token ever straddles the boundary: the prompt ids are exactly what the
model sees before it generates, and the loss mask covers exactly the completion's tokens.
"""

from __future__ import annotations

from dataclasses import dataclass

from alignkit.data.schemas import Prompt


@dataclass(frozen=True)
class Encoded:
    prompt_ids: list[int]
    completion_ids: list[int]  # the completion's tokens + EOS (EOS is lost if the completion was cut)
    truncated: bool


@dataclass(frozen=True)
class EncodedPair:
    prompt_ids: list[int]  # shared by both completions
    chosen_ids: list[int]
    rejected_ids: list[int]
    truncated: bool


@dataclass(frozen=True)
class EncodedUnpaired:
    prompt_ids: list[int]
    completion_ids: list[int]
    label: bool  # True: desirable
    truncated: bool


# ---------------------------------------------------------------------------------------------
# Rendering
# ---------------------------------------------------------------------------------------------


def has_chat_template(tokenizer) -> bool:
    return bool(getattr(tokenizer, "chat_template", None))


def render_prompt(tokenizer, prompt: Prompt) -> str:
    """The text the model sees before its reply.

    With a chat template: the template applied to the messages (a text prompt is one user message) with
    the generation prompt, so the text ends where the assistant's reply begins.
    Without one: a text prompt as it is; messages as "User: ...", "System: ...", "Assistant: ..." lines,
    followed by a final "Assistant:" line for the reply (no trailing space: BPE vocabularies attach the
    space to the next word, so the completion's own leading space, if any, tokenizes naturally).
    """
    if has_chat_template(tokenizer):
        messages = [{"role": "user", "content": prompt}] if isinstance(prompt, str) else prompt
        return tokenizer.apply_chat_template(messages, add_generation_prompt=True, tokenize=False)
    if isinstance(prompt, str):
        return prompt
    lines = [f"{message['role'].capitalize()}: {message['content']}" for message in prompt]
    return "\n".join([*lines, "Assistant:"])


# ---------------------------------------------------------------------------------------------
# Token ids
# ---------------------------------------------------------------------------------------------


def encode_prompt(tokenizer, prompt: Prompt, max_prompt_length: int | None = None) -> list[int]:
    """Prompt ids for generation (and the shared first part of every training sequence); the END is kept
    when it is longer than ``max_prompt_length``."""
    ids = _prompt_ids(tokenizer, prompt)
    if max_prompt_length is not None and len(ids) > max_prompt_length:
        ids = ids[-max_prompt_length:]
    return ids


def encode(
    tokenizer, prompt: Prompt, completion: str, max_length: int, max_prompt_length: int | None = None
) -> Encoded:
    """One prompt + completion, truncated to ``max_length`` tokens in all (see ``_truncate``)."""
    return encode_batch(tokenizer, [prompt], [completion], max_length, max_prompt_length)[0]


def encode_batch(
    tokenizer,
    prompts: list[Prompt],
    completions: list[str],
    max_length: int,
    max_prompt_length: int | None = None,
) -> list[Encoded]:
    """``encode`` of many rows, one batched tokenizer call per column (as ``encode_pairs``)."""
    rows = _encode_batch(tokenizer, prompts, [completions], max_length, max_prompt_length)
    return [Encoded(p_ids, c_ids, truncated) for p_ids, (c_ids,), truncated in rows]


def encode_pair(
    tokenizer,
    prompt: Prompt,
    chosen: str,
    rejected: str,
    max_length: int,
    max_prompt_length: int | None = None,
) -> EncodedPair:
    """A preference pair: both completions follow the same prompt ids, each within ``max_length`` in all."""
    return encode_pairs(tokenizer, [prompt], [chosen], [rejected], max_length, max_prompt_length)[0]


def encode_pairs(
    tokenizer,
    prompts: list[Prompt],
    chosen: list[str],
    rejected: list[str],
    max_length: int,
    max_prompt_length: int | None = None,
) -> list[EncodedPair]:
    """``encode_pair`` of many pairs, with one batched tokenizer call per column (a fast tokenizer encodes a
    batch in parallel in Rust): the same ids as one pair at a time."""
    rows = _encode_batch(tokenizer, prompts, [chosen, rejected], max_length, max_prompt_length)
    return [EncodedPair(p_ids, c_ids, r_ids, truncated) for p_ids, (c_ids, r_ids), truncated in rows]


def encode_unpaired(
    tokenizer,
    prompt: Prompt,
    completion: str,
    label: bool,
    max_length: int,
    max_prompt_length: int | None = None,
) -> EncodedUnpaired:
    """An unpaired (KTO) example: ``encode`` plus its desirable/undesirable label."""
    encoded = encode(tokenizer, prompt, completion, max_length, max_prompt_length)
    return EncodedUnpaired(encoded.prompt_ids, encoded.completion_ids, label, encoded.truncated)


def encode_unpaired_batch(
    tokenizer,
    prompts: list[Prompt],
    completions: list[str],
    labels: list[bool],
    max_length: int,
    max_prompt_length: int | None = None,
) -> list[EncodedUnpaired]:
    """``encode_unpaired`` of many examples: ``encode_batch`` plus their labels."""
    rows = encode_batch(tokenizer, prompts, completions, max_length, max_prompt_length)
    return [EncodedUnpaired(e.prompt_ids, e.completion_ids, y, e.truncated) for e, y in zip(rows, labels)]


def _encode_batch(
    tokenizer,
    prompts: list[Prompt],
    completion_columns: list[list[str]],
    max_length: int,
    max_prompt_length: int | None,
) -> list[tuple[list[int], list[list[int]], bool]]:
    """(prompt ids, [ids of each completion column], truncated) per row, each row fitted by ``_truncate``."""
    prompt_ids = _prompt_ids_batch(tokenizer, prompts)
    columns = [_completion_ids_batch(tokenizer, column) for column in completion_columns]
    return [
        _truncate(p_ids, list(completions), max_length, max_prompt_length)
        for p_ids, *completions in zip(prompt_ids, *columns)
    ]


def _prompt_ids(tokenizer, prompt: Prompt) -> list[int]:
    return _prompt_ids_batch(tokenizer, [prompt])[0]


def _prompt_ids_batch(tokenizer, prompts: list[Prompt]) -> list[list[int]]:
    bos = tokenizer.bos_token_id
    # A language-modeling row (schemas.NO_PROMPT) has no prompt: its text starts the sequence, after BOS.
    texts = [render_prompt(tokenizer, prompt) for prompt in prompts if prompt != ""]
    # A chat template writes its own special tokens (BOS included, where the model uses one), so the text
    # is tokenized without adding any.
    encoded = iter(tokenizer(texts, add_special_tokens=False)["input_ids"] if texts else [])
    add_bos = not has_chat_template(tokenizer) and _adds_bos(tokenizer)
    out = []
    for prompt in prompts:
        if prompt == "":
            out.append([bos] if bos is not None else [])
            continue
        ids = next(encoded)
        out.append([bos, *ids] if add_bos and ids[:1] != [bos] else ids)
    return out


def _adds_bos(tokenizer) -> bool:
    """Whether the tokenizer puts BOS in front of text by default (Llama-style); many (GPT-2-style) don't."""
    bos = tokenizer.bos_token_id
    return bos is not None and tokenizer("a", add_special_tokens=True)["input_ids"][:1] == [bos]


def _completion_ids_batch(tokenizer, completions: list[str]) -> list[list[int]]:
    eos = tokenizer.eos_token_id
    if eos is None:
        raise ValueError(
            "the tokenizer has no eos_token; completions must end with one so the model learns to stop"
        )
    return [[*ids, eos] for ids in tokenizer(completions, add_special_tokens=False)["input_ids"]]


def _truncate(
    prompt_ids: list[int], completions: list[list[int]], max_length: int, max_prompt_length: int | None
) -> tuple[list[int], list[list[int]], bool]:
    """Fit prompt + each completion into ``max_length``, keeping the END of the prompt (the question being
    answered sits at its end) and the START of each completion:

    1. with ``max_prompt_length``, cut the prompt to its last ``max_prompt_length`` tokens;
    2. if prompt + the longest completion is over ``max_length``, cut the prompt further, to its last
       max(max_length - longest, max_length // 2) tokens, so a long completion cannot squeeze the prompt
       below half the budget;
    3. cut each completion to its first max_length - len(prompt) tokens.
    """
    if max_length < 2:
        raise ValueError(
            f"max_length must be at least 2 (a prompt token and a completion token), got {max_length}"
        )
    if max_prompt_length is not None and max_prompt_length < 1:
        raise ValueError(f"max_prompt_length must be at least 1, got {max_prompt_length}")
    n_prompt = len(prompt_ids)
    longest = max(len(ids) for ids in completions)
    # 1.
    if max_prompt_length is not None and len(prompt_ids) > max_prompt_length:
        prompt_ids = prompt_ids[-max_prompt_length:]
    # 2.
    if len(prompt_ids) + longest > max_length:
        keep = max(max_length - longest, max_length // 2)
        if len(prompt_ids) > keep:
            prompt_ids = prompt_ids[-keep:]
    # 3.
    room = max_length - len(prompt_ids)
    cut = [ids[:room] for ids in completions]
    truncated = len(prompt_ids) < n_prompt or any(len(a) < len(b) for a, b in zip(cut, completions))
    return prompt_ids, cut, truncated
