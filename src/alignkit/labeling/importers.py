"""Labels made in other tools -> the preference pairs ``alignkit label export`` writes (``export.item_pairs``,
so majority/unanimous, ties and pairs modes mean the same).

- **Label Studio, pairwise template** (JSON export: a list of tasks). The template is
  ``<Pairwise name="pw" toName="text1,text2"/>`` over ``<Text name="text1" value="$text1"/>`` and ``text2``:
  a task's ``data`` holds the two texts (and, for us, the prompt), and each entry of ``annotations`` holds
  ``result: [{"type": "pairwise", "value": {"selected": "left" | "right"}, ...}]``; left is the first name in
  ``toName``. Cancelled annotations (``was_cancelled``) and annotations without a pairwise result count
  for nothing.
- **Argilla, RankingQuestion** (a dataset's records as JSON, JSONL, Parquet or a saved/Hub dataset). Argilla
  1.x: the record form ``{"fields": {...}, "responses": [{"status": "submitted", "values": {QUESTION:
  {"value": [{"value": OPTION, "rank": 1}, ...]}}}]}`` or the flat form its Hugging Face export writes
  ``{FIELD: text, ..., QUESTION: [{"status": "submitted", "value": [{"value": OPTION, "rank": 1}, ...]}]}``.
  Argilla 2.x: ``Record.to_dict`` (``records.to_list(flatten=False)``, ``to_json``) writes ``{"fields": {...},
  "responses": {QUESTION: [{"value": [OPTION, ...], "user_id": ..., "status": ...}]}}`` (``status`` only in
  some 2.x versions), and ``to_list(flatten=True)`` / ``to_datasets()`` / ``to_hub()`` write the fields as
  columns beside ``QUESTION.responses`` (one value per response), ``QUESTION.responses.users`` and
  ``QUESTION.responses.status``. A 2.x ranking value is the options best first: the SDK drops Argilla's ranks
  when it reads them, so ties made in Argilla's UI do not survive into a 2.x file.
  Each OPTION names the field holding that response's text (as in Argilla's own examples, where the ranking
  question's values are the response fields); rank 1 is best and equal ranks are ties. Only submitted
  responses count; draft and discarded ones are counted (``labels_draft``, ``labels_discarded``) and left out.
  A response without a status (2.x versions whose ``Record.to_dict`` writes none) counts as submitted.

A malformed row is a ``BadRowError`` naming the file, the row and the field.
"""

from __future__ import annotations

from collections import Counter
from typing import Any, Literal

from alignkit.config import ConfigError
from alignkit.data.io import BadRow, BadRowError, Record, read_rows
from alignkit.labeling.export import Agreement, PairsMode, item_pairs, new_counts

ImportFormat = Literal["label-studio", "argilla"]


def _bad(record: Record, field: str, problem: str) -> BadRowError:
    return BadRowError(record.source, record.row, field, problem)


def _text(record: Record, data: Any, where: str, name: str) -> Any:
    if not isinstance(data, dict) or name not in data:
        have = sorted(data) if isinstance(data, dict) else type(data).__name__
        raise _bad(record, f"{where}{name}", f"missing (the row has {have})")
    return data[name]


def _prompt(record: Record, data: Any, where: str, name: str) -> Any:
    prompt = _text(record, data, where, name)
    if not (isinstance(prompt, str) or (isinstance(prompt, list) and all(isinstance(m, dict) for m in prompt))):
        raise _bad(record, f"{where}{name}", "expected text or a list of chat messages")
    return prompt


def label_studio_item(record: Record, prompt_field: str, left: str, right: str) -> tuple[Any, list[str], list]:
    """(prompt, [left text, right text], one ranking per annotation) of one Label Studio task."""
    data = _text(record, record.data, "", "data")
    prompt = _prompt(record, data, "data.", prompt_field)
    texts = [_text(record, data, "data.", name) for name in (left, right)]
    for name, text in zip((left, right), texts):
        if not isinstance(text, str):
            raise _bad(record, f"data.{name}", f"expected text, got {type(text).__name__}")
    annotations = record.data.get("annotations", [])
    if not isinstance(annotations, list):
        raise _bad(record, "annotations", f"expected a list, got {type(annotations).__name__}")
    rankings = []
    for k, ann in enumerate(annotations):
        if not isinstance(ann, dict) or not isinstance(ann.get("result", []), list):
            raise _bad(record, f"annotations[{k}].result", "expected an object with a result list")
        if ann.get("was_cancelled"):
            continue
        for j, res in enumerate(ann.get("result", [])):
            if not isinstance(res, dict) or res.get("type") != "pairwise":
                continue  # other controls of the same template (a comment box, a rating) are not ours
            selected = res.get("value", {}).get("selected") if isinstance(res.get("value"), dict) else None
            if selected not in ("left", "right"):
                raise _bad(record, f"annotations[{k}].result[{j}].value.selected",
                           f"expected 'left' or 'right', got {selected!r}")  # fmt: skip
            rankings.append([[1], [2]] if selected == "left" else [[2], [1]])
    return prompt, texts, rankings


def _argilla_ranking(record: Record, value: Any, where: str) -> dict[str, int]:
    """OPTION -> rank of one response's ranking value: Argilla 1.x's ``[{"value": OPTION, "rank": 1}, ...]``
    or 2.x's ``[OPTION, ...]``, best first (rank = place)."""
    if not isinstance(value, list) or not value:
        raise _bad(record, where, f"expected a list of options (best first) or of {{'value', 'rank'}} objects, "
                                  f"got {value!r}")  # fmt: skip
    out: dict[str, int] = {}
    for k, entry in enumerate(value):
        if isinstance(entry, str):
            option, rank = entry, k + 1
        elif isinstance(entry, dict) and isinstance(entry.get("value"), str):
            option, rank = entry["value"], entry.get("rank")
            if isinstance(rank, bool) or not isinstance(rank, int) or rank < 1:
                raise _bad(record, f"{where}[{k}].rank", f"expected a rank 1, 2, ..., got {rank!r}")
        else:
            raise _bad(record, f"{where}[{k}]", f"expected the option's name (text), got {entry!r}")
        if option in out:
            raise _bad(record, f"{where}[{k}]", f"option {option!r} appears twice")
        out[option] = rank
    return out


RESPONSE_STATUSES = ("submitted", "draft", "discarded")  # Argilla's ResponseStatus, 1.x and 2.x


def _submitted(record: Record, status: Any, where: str, counts: Counter) -> bool:
    """Whether one response counts; a draft or discarded one is counted in ``counts`` and left out. No status
    counts as submitted: some 2.x versions' ``Record.to_dict`` write none."""
    if status is None or status == "submitted":
        return True
    if status not in RESPONSE_STATUSES:
        raise _bad(record, where, f"expected one of {', '.join(RESPONSE_STATUSES)}, got {status!r}")
    counts[f"labels_{status}"] += 1
    return False


def _list(record: Record, value: Any, where: str) -> list:
    """``value`` as a list; None (a record nobody answered: Argilla writes None for its missing columns) is []."""
    if value is None:
        return []
    if not isinstance(value, list):
        raise _bad(record, where, f"expected a list, got {type(value).__name__}")
    return value


def argilla_answers(record: Record, question: str, counts: Counter) -> tuple[Any, str, list[tuple[str, Any]]]:
    """(the record's fields, their path prefix, [(path, ranking value)] of its submitted responses to
    ``question``) in whichever of the four shapes the module's docstring lists the record has."""
    data = record.data
    flat = f"{question}.responses"
    if "fields" in data and isinstance(data.get("responses"), dict):  # 2.x Record.to_dict
        where = f"responses.{question}"
        answers = []
        for k, resp in enumerate(_list(record, data["responses"].get(question), where)):
            if not isinstance(resp, dict):
                raise _bad(record, f"{where}[{k}]", "expected an object with value, user_id, status")
            if _submitted(record, resp.get("status"), f"{where}[{k}].status", counts):
                answers.append((f"{where}[{k}].value", resp.get("value")))
        return data["fields"], "fields.", answers
    if "fields" in data:  # 1.x record form
        answers = []
        for k, resp in enumerate(_list(record, data.get("responses"), "responses")):
            if not isinstance(resp, dict):
                raise _bad(record, f"responses[{k}]", "expected an object")
            if not _submitted(record, resp.get("status"), f"responses[{k}].status", counts):
                continue
            values = resp.get("values")
            if not isinstance(values, dict) or not isinstance(values.get(question), dict):
                raise _bad(record, f"responses[{k}].values.{question}", "missing; is question= the ranking question?")
            answers.append((f"responses[{k}].values.{question}.value", values[question].get("value")))
        return data["fields"], "fields.", answers
    if flat in data:  # 2.x flattened: to_list(flatten=True), to_datasets(), to_hub()
        values = _list(record, data[flat], flat)
        statuses = _list(record, data.get(f"{flat}.status"), f"{flat}.status") or [None] * len(values)
        if len(statuses) != len(values):
            raise _bad(record, f"{flat}.status", f"{len(statuses)} statuses for {len(values)} responses")
        answers = [(f"{flat}[{k}]", value) for k, (value, status) in enumerate(zip(values, statuses))
                   if _submitted(record, status, f"{flat}.status[{k}]", counts)]  # fmt: skip
        return data, "", answers
    if question in data:  # 1.x flat form
        answers = []
        for k, resp in enumerate(_list(record, data[question], question)):
            if not isinstance(resp, dict):
                raise _bad(record, f"{question}[{k}]", "expected an object with status and value")
            if _submitted(record, resp.get("status"), f"{question}[{k}].status", counts):
                answers.append((f"{question}[{k}].value", resp.get("value")))
        return data, "", answers
    others = sorted(key.removesuffix(".responses") for key in data if str(key).endswith(".responses"))
    hint = f"; the row has responses to {others}: pass question=NAME" if others else ""
    raise _bad(record, flat, "not an Argilla record: no 'fields' (to_list/to_json), no "
                             f"'{flat}' column (to_datasets/to_hub) and no '{question}' (1.x){hint}")  # fmt: skip


def argilla_item(record: Record, prompt_field: str, question: str, counts: Counter) -> tuple[Any, list[str], list]:
    """(prompt, the options' texts, one ranking per submitted response) of one Argilla record."""
    fields, where, answers = argilla_answers(record, question, counts)
    prompt = _prompt(record, fields, where, prompt_field)
    ranked = [(at, _argilla_ranking(record, value, at)) for at, value in answers]
    options: list[str] = []
    for _, ranks in ranked:
        options += [o for o in ranks if o not in options]
    texts = []
    for option in options:
        text = _text(record, fields, where, option)
        if not isinstance(text, str):
            raise _bad(record, f"{where}{option}", f"expected text, got {type(text).__name__}")
        texts.append(text)
    rankings = []
    for at, ranks in ranked:
        missing = [o for o in options if o not in ranks]
        if missing:
            raise _bad(record, at, f"option(s) {missing} not ranked")
        places = sorted(set(ranks.values()))
        rankings.append([[options.index(o) + 1 for o in options if ranks[o] == p] for p in places])
    return prompt, texts, rankings


def import_pairs(
    path: str,
    fmt: ImportFormat,
    mode: PairsMode,
    agreement: Agreement,
    prompt_field: str = "prompt",
    left: str = "text1",
    right: str = "text2",
    question: str = "ranking",
) -> tuple[list[dict], dict]:
    """The pair rows of every task/record of ``path`` and the counts (as ``export.export_pairs``)."""
    counts = new_counts()
    if fmt == "argilla":
        counts["labels_draft"] = counts["labels_discarded"] = 0
    answered: set[str] = set()  # questions with responses in Argilla 2.x records, to name a wrong question=
    rows: list[dict] = []
    for record in read_rows(path):
        if isinstance(record, BadRow):
            raise BadRowError(record.source, record.row, record.field, record.problem)
        if fmt == "label-studio":
            prompt, texts, rankings = label_studio_item(record, prompt_field, left, right)
        else:
            prompt, texts, rankings = argilla_item(record, prompt_field, question, counts)
            if isinstance(record.data.get("responses"), dict):
                answered |= set(record.data["responses"])
        counts["items"] += 1
        counts["labels"] += len(rankings)
        if not rankings:
            counts["items_unlabeled"] += 1
            continue
        if len(texts) < 2:
            raise _bad(record, question, f"{len(texts)} option(s) ranked; a pair needs 2")
        rows += item_pairs(record.row, prompt, texts, rankings, mode, agreement, counts)
    if counts["items"] == 0:
        raise BadRowError(path, 0, None, "no tasks or records in the file")
    if answered and question not in answered:
        raise ConfigError(f"question: no record of {path} has responses to {question!r}; its questions with "
                          f"responses: {sorted(answered)}", ("question",))  # fmt: skip
    return rows, dict(counts)
