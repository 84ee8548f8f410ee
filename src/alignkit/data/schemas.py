"""Turn raw rows into validated, typed examples for each kind of training data: SFT, preference pairs,
unpaired (KTO) examples and prompts. Each loader accepts the common column layouts, and every row it
cannot use is either an error naming source, row and field, or a reported skip; never a silent drop.
"""

from __future__ import annotations

import math
import os
import re
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from functools import partial
from typing import Any, Literal, Union

from alignkit.data.io import BadRow, BadRowError, DataSourceError, Record, RowRef, read_rows

__all__ = [
    "BadRow",
    "BadRowError",
    "Loaded",
    "PreferencePair",
    "Prompt",
    "PromptExample",
    "RowRef",
    "SFTExample",
    "UnpairedExample",
    "feedback_format",
    "iter_examples",
    "load_preferences",
    "load_prompts",
    "load_sft",
    "load_unpaired",
    "no_usable_rows",
    "pairs_to_unpaired",
]

# A prompt is plain text, or chat messages [{"role": ..., "content": ...}] ending with a user turn.
Prompt = Union[str, list[dict[str, str]]]

ROLES = ("system", "user", "assistant")

# The prompt of a language-modeling row ({"text": ...}): nothing before the completion (tokenize adds only BOS).
NO_PROMPT = ""

# ---------------------------------------------------------------------------------------------
# Example types
# ---------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class SFTExample:
    prompt: Prompt
    completion: str
    ref: RowRef


@dataclass(frozen=True)
class PreferencePair:
    prompt: Prompt
    chosen: str
    rejected: str
    ref: RowRef


@dataclass(frozen=True)
class UnpairedExample:
    prompt: Prompt
    completion: str
    label: bool  # True: desirable, False: undesirable (KTO's two classes)
    ref: RowRef


@dataclass(frozen=True)
class PromptExample:
    prompt: Prompt
    ref: RowRef
    # The row's other columns (all but 'prompt' and 'messages'), e.g. a task's 'answer': reward functions that
    # declare a parameter of that name receive it (``scoring.scorers.FunctionScorer``).
    columns: dict[str, Any] = field(default_factory=dict, hash=False)


@dataclass
class Loaded:
    """What a loader returns: the usable examples, the rows it skipped, how many rows it read, and from where."""

    examples: list
    skipped: list[BadRow] = field(default_factory=list)
    n_rows: int = 0
    source: str = ""

    def require_rows(self, setting: str) -> Loaded:
        """``self``, or a ``DataSourceError`` naming ``setting`` when no example is left to use."""
        if not self.examples:
            raise no_usable_rows(setting, self.source, self.n_rows, self.skipped)
        return self

    def summary(self, max_listed: int = 5) -> str:
        """E.g. ``"1800 rows, 1796 used, 4 skipped (row 17: field 'chosen': empty completion; ...)"``."""
        # Rows used, not examples: a row gives two examples where KTO splits a pair (every row read is either
        # used or skipped).
        line = f"{self.n_rows} rows, {self.n_rows - len(self.skipped)} used, {len(self.skipped)} skipped"
        if not self.skipped:
            return line
        listed = [_format_skip(bad) for bad in self.skipped[:max_listed]]
        if len(self.skipped) > max_listed:
            listed.append(f"... and {len(self.skipped) - max_listed} more")
        return f"{line} ({'; '.join(listed)})"


def no_usable_rows(setting: str, source: str, n_read: int, skipped: list[BadRow], max_listed: int = 3):
    """The error for data that leaves nothing to use: empty, all rows skipped, or a row range past its end.

    E.g. ``train_data d.jsonl: no usable rows (2 read, 2 skipped: first reasons row 0: ...; row 1: ...)``.
    """
    counts = f"{n_read} read, {len(skipped)} skipped"
    if skipped:
        reasons = "; ".join(_format_skip(bad) for bad in skipped[:max_listed])
        counts += f": first reasons {reasons}"
    return DataSourceError(f"{setting} {source}: no usable rows ({counts})")


def _format_skip(bad: BadRow) -> str:
    where = f"row {bad.row}" + (f": field '{bad.field}'" if bad.field is not None else "")
    return f"{where}: {bad.problem}"


# ---------------------------------------------------------------------------------------------
# Loaders
# ---------------------------------------------------------------------------------------------

OnBadRow = Literal["error", "skip"]


def load_sft(
    source: str,
    on_bad_row: OnBadRow = "error",
    split: str | None = None,
    limit: int | None = None,
    rows: tuple[int, int] | None = None,
    columns: dict[str, str] | None = None,
) -> Loaded:
    """Prompt/completion examples. Accepted columns, per row:

    - ``prompt`` (text or messages) + ``completion`` (text, or an assistant turn as a message list);
    - ``messages``: a whole conversation whose last message is the assistant's reply (the completion)
      and whose earlier messages, ending with a user turn, are the prompt;
    - ``text`` (TRL's language-modeling rows): the whole text is the completion, with no prompt.

    An optional ``system`` text column becomes a system message at the start of the prompt.
    ``rows=(start, stop)`` keeps file rows start <= row < stop; ``limit`` keeps the first N of those.
    """
    return _load(source, _parse_sft, on_bad_row, split, limit, rows, columns)


def load_preferences(
    source: str,
    on_bad_row: OnBadRow = "error",
    split: str | None = None,
    limit: int | None = None,
    rows: tuple[int, int] | None = None,
    columns: dict[str, str] | None = None,
) -> Loaded:
    """Preference pairs. Accepted columns, per row:

    - ``prompt`` + ``chosen`` + ``rejected``, each completion text or a message list (TRL's conversational
      style: the assistant turn alone, or the whole conversation ending with it);
    - ``chosen`` + ``rejected`` as whole conversations (message lists) without ``prompt``: the prompt is
      everything before the final assistant turn and must be the same in both;
    - ``chosen`` + ``rejected`` as whole HH-RLHF transcripts ("\\n\\nHuman: ...\\n\\nAssistant: ...") without
      ``prompt``: the prompt is everything before the last "\n\nAssistant:" the two share, parsed into
      user/assistant messages; the completions are the stripped texts after it;
    - ``chosen`` + ``rejected`` as other plain texts without ``prompt`` (TRL's implicit prompt): the prompt is
      the beginning they share, split as TRL's ``extract_prompt`` does.
    """
    return _load(source, _parse_pair, on_bad_row, split, limit, rows, columns)


def load_unpaired(
    source: str,
    on_bad_row: OnBadRow = "error",
    split: str | None = None,
    limit: int | None = None,
    rows: tuple[int, int] | None = None,
    columns: dict[str, str] | None = None,
) -> Loaded:
    """KTO examples: ``prompt`` + ``completion`` + ``label`` (a bool, 0/1, or one of the strings
    "true"/"false", "1"/"0", "desirable"/"undesirable")."""
    return _load(source, _parse_unpaired, on_bad_row, split, limit, rows, columns)


def load_prompts(
    source: str,
    on_bad_row: OnBadRow = "error",
    split: str | None = None,
    limit: int | None = None,
    rows: tuple[int, int] | None = None,
    columns: dict[str, str] | None = None,
) -> Loaded:
    """Prompts for generation: a ``prompt`` column (text or messages), ``messages`` ending with a user turn, or
    HH-RLHF's ``chosen`` + ``rejected`` transcripts, whose prompt is the conversation before the reply they
    compare (as ``load_preferences`` splits them; a row it would refuse is refused here too)."""
    return _load(source, _parse_prompt_row, on_bad_row, split, limit, rows, columns)


def pairs_to_unpaired(pairs: list[PreferencePair]) -> list[UnpairedExample]:
    """Each pair becomes one desirable (chosen) and one undesirable (rejected) example, in that order."""
    unpaired = []
    for pair in pairs:
        unpaired.append(UnpairedExample(pair.prompt, pair.chosen, True, pair.ref))
        unpaired.append(UnpairedExample(pair.prompt, pair.rejected, False, pair.ref))
    return unpaired


def iter_examples(
    loaded: Loaded,
    kind: Literal["pairs", "unpaired", "sft"],
    on_bad_row: OnBadRow = "error",
    split: str | None = None,
    limit: int | None = None,
    rows: tuple[int, int] | None = None,
    columns: dict[str, str] | None = None,
    margin_column: str | None = None,
) -> Iterator[Any]:
    """``load_preferences`` (``kind`` "pairs"), ``load_unpaired`` ("unpaired") or ``load_sft`` ("sft") one
    example at a time, for data too large to hold as a list: ``loaded`` (its ``source`` set, ``examples``
    left empty) counts the rows read and the rows skipped as they go by. With ``margin_column`` each pair
    comes as (pair, its row's margin), a row without a usable margin being a bad row like any other."""
    parse = {"pairs": _parse_pair, "unpaired": _parse_unpaired, "sft": _parse_sft}[kind]
    if margin_column:
        parse = partial(_with_margin, parse, margin_column)
    return _stream(loaded, parse, on_bad_row, split, limit, rows, columns)


def feedback_format(source: str, split: str | None, columns: dict[str, str] | None = None) -> str:
    """KTO's data, told apart by the first readable row's columns (named as ``columns`` maps them): "unpaired"
    (a 'label' column) or "pairs" ('chosen'/'rejected'); "unpaired" when no row is readable (its loader then
    reports what is wrong)."""
    mapped = {theirs: ours for ours, theirs in (columns or {}).items()}
    for item in read_rows(source, split):
        if isinstance(item, BadRow):
            continue
        names = {mapped.get(name, name) for name in item.data}
        if "label" in names:
            return "unpaired"
        if "chosen" in names or "rejected" in names:
            return "pairs"
        raise DataSourceError(
            f"data_format=auto: {source} row {item.row} has neither a 'label' column (unpaired feedback) nor "
            f"'chosen'/'rejected' (pairs); it has {sorted(item.data)}. Set data_format=unpaired or pairs."
        )
    return "unpaired"


def _load(
    source: str,
    parse: Callable[[Record], Any],
    on_bad_row: OnBadRow,
    split: str | None,
    limit: int | None,
    rows: tuple[int, int] | None,
    columns: dict[str, str] | None = None,
) -> Loaded:
    """Every loader's rows, each renamed by ``columns`` ({alignkit's column: the source's}) then parsed."""
    loaded = Loaded(examples=[], source=source)
    loaded.examples = list(_stream(loaded, parse, on_bad_row, split, limit, rows, columns))
    return loaded


def _stream(
    loaded: Loaded,
    parse: Callable[[Record], Any],
    on_bad_row: OnBadRow,
    split: str | None,
    limit: int | None,
    rows: tuple[int, int] | None,
    columns: dict[str, str] | None,
) -> Iterator[Any]:
    """The parsed examples of ``loaded.source``, counting into ``loaded`` the rows read and skipped."""
    if on_bad_row not in ("error", "skip"):
        raise ValueError(f"on_bad_row must be 'error' or 'skip', got {on_bad_row!r}")
    for item in _rows_in_range(read_rows(loaded.source, split), rows, limit):
        loaded.n_rows += 1
        try:
            if isinstance(item, BadRow):
                raise BadRowError(item.source, item.row, item.field, item.problem)
            example = parse(rename_columns(item, columns) if columns else item)
        except BadRowError as err:
            if on_bad_row == "error":
                raise
            loaded.skipped.append(err.bad_row)
            continue
        yield example


def rename_columns(record: Record, columns: dict[str, str]) -> Record:
    """``record`` with each mapped column under alignkit's name (``columns``: {alignkit's name: the source's});
    a row without a mapped column is an error naming the mapping."""
    data = dict(record.data)
    for ours, theirs in columns.items():
        if theirs not in record.data:
            raise BadRowError(
                record.source,
                record.row,
                theirs,
                f"missing: columns.{ours}={theirs} reads '{ours}' from it, but the row has {sorted(record.data)}",
            )
        data.pop(theirs)
        data[ours] = record.data[theirs]
    return Record(record.source, record.row, data)


def _rows_in_range(
    items: Iterator[Record | BadRow], rows: tuple[int, int] | None, limit: int | None
) -> Iterator[Record | BadRow]:
    """File rows start <= row < stop, then at most ``limit`` of them; stops reading as soon as it can."""
    start, stop = rows if rows is not None else (0, None)
    if start < 0 or (stop is not None and stop < start):
        raise ValueError(f"rows must be (start, stop) with 0 <= start <= stop, got {rows}")
    if limit is not None and limit < 0:
        raise ValueError(f"limit must be >= 0, got {limit}")
    taken = 0
    for item in items:
        if (stop is not None and item.row >= stop) or (limit is not None and taken >= limit):
            return
        if item.row >= start:
            taken += 1
            yield item


# ---------------------------------------------------------------------------------------------
# Row parsers: one per example type. Each returns an example or raises BadRowError naming the field.
# ---------------------------------------------------------------------------------------------


def _parse_sft(record: Record) -> SFTExample:
    data, bad = record.data, _complainer(record)
    if "prompt" in data:
        prompt = _prompt(data["prompt"], "prompt", bad)
        prefix, completion = _reply(_require(data, "completion", bad), "completion", bad)
        prompt = _agree(prompt, "prompt", prefix, "completion", bad)
    elif "text" in data and "messages" not in data:
        # TRL's language-modeling rows: the whole text is the completion (all of it trained on), no prompt.
        return SFTExample(NO_PROMPT, _text(data["text"], "text", bad), _ref(record))
    elif "messages" in data:
        messages = _messages(data["messages"], "messages", bad)
        if messages[-1]["role"] != "assistant":
            raise bad("messages", "the last message must be the assistant's reply (the completion)")
        completion = _text(messages[-1]["content"], "messages", bad, what="final assistant reply")
        prompt = _prompt(messages[:-1], "messages", bad)
    else:
        raise bad(
            "prompt",
            f"missing: expected 'prompt' + 'completion', 'messages' or 'text'; the row has {sorted(data)}",
        )
    return SFTExample(_with_system(prompt, data, bad), completion, _ref(record))


def _parse_pair(record: Record) -> PreferencePair:
    data, bad = record.data, _complainer(record)
    chosen_raw, rejected_raw = _require(data, "chosen", bad), _require(data, "rejected", bad)

    if "prompt" not in data and isinstance(chosen_raw, str) and isinstance(rejected_raw, str):
        if ASSISTANT in chosen_raw or ASSISTANT in rejected_raw:
            prompt, chosen, rejected = _split_transcripts(chosen_raw, rejected_raw, bad)
        else:
            prompt, chosen, rejected = _split_shared_text(chosen_raw, rejected_raw, bad)
    else:
        chosen_prefix, chosen = _reply(chosen_raw, "chosen", bad)
        rejected_prefix, rejected = _reply(rejected_raw, "rejected", bad)
        prompt = _prompt(data["prompt"], "prompt", bad) if "prompt" in data else None
        prompt = _agree(prompt, "prompt", chosen_prefix, "chosen", bad)
        prompt = _agree(prompt, "prompt" if "prompt" in data else "chosen", rejected_prefix, "rejected", bad)
        if prompt is None:
            raise bad("prompt", "missing: no 'prompt' column, and 'chosen' holds only the assistant's reply")

    if chosen == rejected:
        raise bad("rejected", "identical to 'chosen' (a pair needs two different responses)")
    return PreferencePair(_with_system(prompt, data, bad), chosen, rejected, _ref(record))


def _with_margin(parse: Callable[[Record], PreferencePair], column: str, record: Record):
    """(the row's pair, its ``column`` value: a per-pair margin, a finite number >= 0)."""
    pair = parse(record)
    value = record.data.get(column)
    ok = (
        isinstance(value, (int, float))
        and not isinstance(value, bool)
        and math.isfinite(value)
        and value >= 0
    )
    if not ok:
        raise BadRowError(
            record.source, record.row, column, f"margin must be a finite number >= 0, got {value!r}"
        )
    return pair, float(value)


def _parse_unpaired(record: Record) -> UnpairedExample:
    data, bad = record.data, _complainer(record)
    prompt = _prompt(_require(data, "prompt", bad), "prompt", bad)
    prefix, completion = _reply(_require(data, "completion", bad), "completion", bad)
    prompt = _agree(prompt, "prompt", prefix, "completion", bad)
    label = _label(_require(data, "label", bad), bad)
    return UnpairedExample(_with_system(prompt, data, bad), completion, label, _ref(record))


def _parse_prompt_row(record: Record) -> PromptExample:
    data, bad = record.data, _complainer(record)
    if "prompt" in data:
        prompt = _prompt(data["prompt"], "prompt", bad)
    elif "messages" in data:
        prompt = _prompt(data["messages"], "messages", bad)
    elif isinstance(data.get("chosen"), str) and isinstance(data.get("rejected"), str):
        prompt, _, _ = _split_transcripts(data["chosen"], data["rejected"], bad)
    else:
        raise bad(
            "prompt",
            "missing: expected a 'prompt' or 'messages' column, or HH-RLHF 'chosen' + 'rejected' transcripts; "
            f"the row has {sorted(data)}",
        )
    columns = {name: value for name, value in data.items() if name not in PROMPT_SOURCE_COLUMNS}
    return PromptExample(_with_system(prompt, data, bad), _ref(record), columns)


# The columns a prompt row's prompt is read from; every other column travels with the prompt as its ``columns``.
PROMPT_SOURCE_COLUMNS = ("prompt", "messages")


# ---------------------------------------------------------------------------------------------
# HH-RLHF whole transcripts
# ---------------------------------------------------------------------------------------------

ASSISTANT = "\n\nAssistant:"
_TURN_MARKER = re.compile(r"\n\n(Human|Assistant):")


def _split_transcripts(
    chosen: str, rejected: str, bad: Callable[..., BadRowError]
) -> tuple[Prompt, str, str]:
    """Split two HH-RLHF transcripts into (prompt messages, chosen reply, rejected reply).

    The transcripts ("\\n\\nHuman: ...\\n\\nAssistant: ...") repeat the same conversation and differ in the
    final assistant reply, so we cut at the last "\\n\\nAssistant:" inside their longest common prefix:
    before it is the prompt, after it each reply (whitespace stripped). The prompt is parsed into
    user/assistant messages. Texts without "\\n\\nAssistant:" are split as TRL splits them
    (``_split_shared_text``).
    """
    shared = os.path.commonprefix([chosen, rejected])
    cut = shared.rfind(ASSISTANT)
    if cut < 0:
        raise bad(
            "chosen",
            "no shared prompt prefix: without a 'prompt' column, 'chosen' and 'rejected' must be whole "
            "Human/Assistant transcripts ('\\n\\nHuman: ...\\n\\nAssistant: ...') that agree up to the last "
            "'\\n\\nAssistant:'",
        )
    if chosen.rfind(ASSISTANT) != cut or rejected.rfind(ASSISTANT) != cut:
        # The transcripts part ways in an earlier assistant turn, so a "reply" would span several turns
        # (and teach the model to write the human's side too).
        raise bad(
            "chosen",
            "no shared prompt prefix: 'chosen' and 'rejected' differ before their last '\\n\\nAssistant:' "
            "turn, so the replies would span several turns",
        )
    prompt_text = chosen[:cut]
    if prompt_text.startswith("Human:"):  # some copies strip the leading blank line
        prompt_text = "\n\n" + prompt_text
    parts = _TURN_MARKER.split(prompt_text)  # [before, role, content, role, content, ...]
    if parts[0].strip():
        raise bad("chosen", f"the transcript must start with '\\n\\nHuman:', found {parts[0][:40]!r}")
    role_of = {"Human": "user", "Assistant": "assistant"}
    messages = [{"role": role_of[r], "content": c.strip()} for r, c in zip(parts[1::2], parts[2::2])]
    prompt = _prompt(messages, "chosen", bad)
    chosen_reply = _text(chosen[cut + len(ASSISTANT) :].strip(), "chosen", bad, what="completion")
    rejected_reply = _text(rejected[cut + len(ASSISTANT) :].strip(), "rejected", bad, what="completion")
    return prompt, chosen_reply, rejected_reply


def _split_shared_text(chosen: str, rejected: str, bad: Callable[..., BadRowError]) -> tuple[str, str, str]:
    """TRL's standard preference rows with an implicit prompt ({"chosen": "The sky is blue.", "rejected": "The
    sky is green."}) split as TRL's ``extract_prompt`` splits them: the prompt is the text the two share up to
    where they differ, less a space just before that point, which stays with the replies ("The sky is" /
    " blue." / " green.")."""
    cut = len(os.path.commonprefix([chosen, rejected]))
    if 0 < cut < min(len(chosen), len(rejected)) and chosen[cut - 1] == " ":
        cut -= 1
    if not chosen[:cut].strip():
        raise bad(
            "chosen",
            "no shared prompt prefix: without a 'prompt' column, 'chosen' and 'rejected' must share their "
            "prompt as a common beginning (TRL's implicit prompt) or be Human/Assistant transcripts",
        )
    chosen_reply = _text(chosen[cut:], "chosen", bad, what="completion")
    return chosen[:cut], chosen_reply, _text(rejected[cut:], "rejected", bad, what="completion")


# ---------------------------------------------------------------------------------------------
# Field validators. `bad(field, problem)` builds the BadRowError for the current row.
# ---------------------------------------------------------------------------------------------


def _complainer(record: Record) -> Callable[[str, str], BadRowError]:
    def bad(field_name: str, problem: str) -> BadRowError:
        return BadRowError(record.source, record.row, field_name, problem)

    return bad


def _ref(record: Record) -> RowRef:
    return RowRef(record.source, record.row)


def _require(data: dict, name: str, bad) -> Any:
    if name not in data or data[name] is None:
        raise bad(name, f"missing (the row has {sorted(data)})")
    return data[name]


def _text(value: Any, name: str, bad, what: str = "text") -> str:
    if not isinstance(value, str):
        raise bad(name, f"expected a string, got {type(value).__name__}")
    if not value.strip():
        raise bad(name, f"empty {what} (blank or whitespace only)")
    return value


def _messages(value: Any, name: str, bad) -> list[dict[str, str]]:
    """A non-empty list of {"role", "content"} dicts with known roles; other keys are dropped."""
    if not isinstance(value, list) or not value:
        raise bad(name, f"expected a non-empty list of chat messages, got {_describe(value)}")
    messages = []
    for i, message in enumerate(value):
        if not isinstance(message, dict) or "role" not in message or "content" not in message:
            raise bad(name, f"message {i} must be a dict with 'role' and 'content', got {_describe(message)}")
        if message["role"] not in ROLES:
            raise bad(name, f"message {i} has role {message['role']!r}; expected one of {ROLES}")
        if not isinstance(message["content"], str):
            raise bad(name, f"message {i} content must be a string, got {type(message['content']).__name__}")
        messages.append({"role": message["role"], "content": message["content"]})
    return messages


def _prompt(value: Any, name: str, bad) -> Prompt:
    """Text, or messages ending with a non-empty user turn."""
    if isinstance(value, str):
        return _text(value, name, bad, what="prompt")
    if not isinstance(value, list):
        raise bad(name, f"expected a string or a list of chat messages, got {type(value).__name__}")
    if not value:
        raise bad(name, "empty prompt (no messages before the reply)")
    messages = _messages(value, name, bad)
    if messages[-1]["role"] != "user":
        raise bad(name, f"the prompt must end with a user turn, but ends with {messages[-1]['role']!r}")
    _text(messages[-1]["content"], name, bad, what="final user turn")
    return messages


def _reply(value: Any, name: str, bad) -> tuple[list[dict[str, str]] | None, str]:
    """A completion given as text, or as messages ending with the assistant's reply.

    Returns (the messages before the reply, or None when there are none; the reply text).
    """
    if isinstance(value, str):
        return None, _text(value, name, bad, what="completion")
    if not isinstance(value, list):
        raise bad(name, f"expected a string or a list of chat messages, got {type(value).__name__}")
    messages = _messages(value, name, bad)
    if messages[-1]["role"] != "assistant":
        raise bad(name, f"must end with an assistant turn, but ends with {messages[-1]['role']!r}")
    reply = _text(messages[-1]["content"], name, bad, what="completion")
    prefix = _prompt(messages[:-1], name, bad) if len(messages) > 1 else None
    return prefix, reply


def _agree(
    prompt: Prompt | None, prompt_field: str, prefix: Prompt | None, prefix_field: str, bad
) -> Prompt | None:
    """Where a completion carries its own conversation, it must be the same prompt as the one we have."""
    if prefix is None:
        return prompt
    if prompt is None:
        return prefix
    as_messages = [{"role": "user", "content": prompt}] if isinstance(prompt, str) else prompt
    if as_messages != prefix:
        raise bad(
            prefix_field, f"the conversation before its final assistant turn differs from '{prompt_field}'"
        )
    return prompt


def _with_system(prompt: Prompt, data: dict, bad) -> Prompt:
    """An optional 'system' text column becomes a system message at the start of the prompt."""
    system = data.get("system")
    if system is None or system == "":
        return prompt
    _text(system, "system", bad, what="system message")
    messages = [{"role": "user", "content": prompt}] if isinstance(prompt, str) else prompt
    if messages[0]["role"] == "system":
        raise bad("system", "the prompt already starts with a system message")
    return [{"role": "system", "content": system}, *messages]


_TRUE_LABELS = {"true", "1", "desirable"}
_FALSE_LABELS = {"false", "0", "undesirable"}


def _label(value: Any, bad) -> bool:
    if isinstance(value, bool):
        return value
    if isinstance(value, int) and value in (0, 1):
        return bool(value)
    if isinstance(value, str) and value.strip().lower() in _TRUE_LABELS | _FALSE_LABELS:
        return value.strip().lower() in _TRUE_LABELS
    raise bad("label", f"unknown label {value!r}; expected true/false, 1/0 or 'desirable'/'undesirable'")


def _describe(value: Any) -> str:
    text = repr(value)
    return f"{type(value).__name__} {text[:60]}{'...' if len(text) > 60 else ''}"
