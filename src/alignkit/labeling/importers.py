"""Labels made in other tools -> the preference pairs ``alignkit label export`` writes (``export.item_pairs``,
so majority/unanimous, ties and pairs modes mean the same).

- **Label Studio, pairwise template** (JSON export: a list of tasks). The template is
  ``<Pairwise name="pw" toName="text1,text2"/>`` over ``<Text name="text1" value="$text1"/>`` and ``text2``:
  a task's ``data`` holds the two texts (and, for us, the prompt), and each entry of ``annotations`` holds
  ``result: [{"type": "pairwise", "value": {"selected": "left" | "right"}, ...}]``; left is the first name in
  ``toName``. Cancelled annotations (``was_cancelled``) and annotations without a pairwise result count
  for nothing.
- **Argilla, RankingQuestion** (a dataset's records as JSON or JSONL). Either the record form
  ``{"fields": {...}, "responses": [{"status": "submitted", "values": {QUESTION: {"value": [{"value":
  OPTION, "rank": 1}, ...]}}}]}`` or the flat form a Hugging Face export writes
  ``{FIELD: text, ..., QUESTION: [{"status": "submitted", "value": [{"value": OPTION, "rank": 1}, ...]}]}``.
  Each OPTION names the field holding that response's text (as in Argilla's own examples, where the ranking
  question's values are the response fields); rank 1 is best and equal ranks are ties. Only submitted
  responses count.

A malformed row is a ``BadRowError`` naming the file, the row and the field.
"""

from __future__ import annotations

from typing import Any, Literal

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
    """OPTION -> rank of one response's ranking value."""
    if not isinstance(value, list) or not value:
        raise _bad(record, where, f"expected a list of {{'value', 'rank'}} objects, got {value!r}")
    out: dict[str, int] = {}
    for k, entry in enumerate(value):
        if not isinstance(entry, dict) or not isinstance(entry.get("value"), str):
            raise _bad(record, f"{where}[{k}].value", "expected the option's name (text)")
        rank = entry.get("rank")
        if isinstance(rank, bool) or not isinstance(rank, int) or rank < 1:
            raise _bad(record, f"{where}[{k}].rank", f"expected a rank 1, 2, ..., got {rank!r}")
        if entry["value"] in out:
            raise _bad(record, f"{where}[{k}].value", f"option {entry['value']!r} appears twice")
        out[entry["value"]] = rank
    return out


def argilla_item(record: Record, prompt_field: str, question: str) -> tuple[Any, list[str], list]:
    """(prompt, the options' texts, one ranking per submitted response) of one Argilla record."""
    data = record.data
    if "fields" in data:  # the record form
        fields, where = data["fields"], "fields."
        responses = data.get("responses", [])
        if not isinstance(responses, list):
            raise _bad(record, "responses", f"expected a list, got {type(responses).__name__}")
        answers = []
        for k, resp in enumerate(responses):
            if not isinstance(resp, dict):
                raise _bad(record, f"responses[{k}]", "expected an object")
            if resp.get("status", "submitted") != "submitted":
                continue
            values = resp.get("values")
            if not isinstance(values, dict) or not isinstance(values.get(question), dict):
                raise _bad(record, f"responses[{k}].values.{question}", "missing; is question= the ranking question?")
            answers.append((f"responses[{k}].values.{question}.value", values[question].get("value")))
    else:  # the flat form
        fields, where = data, ""
        responses = _text(record, data, "", question)
        if not isinstance(responses, list):
            raise _bad(record, question, f"expected a list of responses, got {type(responses).__name__}")
        answers = [(f"{question}[{k}].value", r.get("value")) for k, r in enumerate(responses)
                   if isinstance(r, dict) and r.get("status", "submitted") == "submitted"]  # fmt: skip
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
    rows: list[dict] = []
    for record in read_rows(path):
        if isinstance(record, BadRow):
            raise BadRowError(record.source, record.row, record.field, record.problem)
        if fmt == "label-studio":
            prompt, texts, rankings = label_studio_item(record, prompt_field, left, right)
        else:
            prompt, texts, rankings = argilla_item(record, prompt_field, question)
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
    return rows, dict(counts)
