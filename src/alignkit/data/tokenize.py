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
    prompt_ids, (completion_ids,), truncated = _truncate(
        _prompt_ids(tokenizer, prompt),
        [_completion_ids(tokenizer, completion)],
        max_length,
        max_prompt_length,
    )
    return Encoded(prompt_ids, completion_ids, truncated)


def encode_pair(
    tokenizer,
    prompt: Prompt,
    chosen: str,
    rejected: str,
    max_length: int,
    max_prompt_length: int | None = None,
) -> EncodedPair:
    """A preference pair: both completions follow the same prompt ids, each within ``max_length`` in all."""
    prompt_ids, (chosen_ids, rejected_ids), truncated = _truncate(
        _prompt_ids(tokenizer, prompt),
        [_completion_ids(tokenizer, chosen), _completion_ids(tokenizer, rejected)],
        max_length,
        max_prompt_length,
    )
    return EncodedPair(prompt_ids, chosen_ids, rejected_ids, truncated)


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


def _prompt_ids(tokenizer, prompt: Prompt) -> list[int]:
    if prompt == "":  # a language-modeling row (schemas.NO_PROMPT): the text starts the sequence, after BOS
        return [tokenizer.bos_token_id] if tokenizer.bos_token_id is not None else []
    # A chat template writes its own special tokens (BOS included, where the model uses one), so the text
    # is tokenized without adding any.
    ids = tokenizer(render_prompt(tokenizer, prompt), add_special_tokens=False)["input_ids"]
    if not has_chat_template(tokenizer) and _adds_bos(tokenizer) and ids[:1] != [tokenizer.bos_token_id]:
        ids = [tokenizer.bos_token_id, *ids]
    return ids


def _adds_bos(tokenizer) -> bool:
    """Whether the tokenizer puts BOS in front of text by default (Llama-style); many (GPT-2-style) don't."""
    bos = tokenizer.bos_token_id
    return bos is not None and tokenizer("a", add_special_tokens=True)["input_ids"][:1] == [bos]


def _completion_ids(tokenizer, completion: str) -> list[int]:
    eos = tokenizer.eos_token_id
    if eos is None:
        raise ValueError(
            "the tokenizer has no eos_token; completions must end with one so the model learns to stop"
        )
    return [*tokenizer(completion, add_special_tokens=False)["input_ids"], eos]


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
