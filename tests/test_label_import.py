"""alignkit label import: Label Studio pairwise exports and Argilla ranking exports -> preference pairs."""

from __future__ import annotations

import json

import pytest

from alignkit.config import ConfigError
from alignkit.data.io import BadRowError
from alignkit.data.schemas import load_preferences
from alignkit.stages import load_stage

# Label Studio's JSON export of the pairwise template (<Pairwise name="pw" toName="text1,text2"/>), with the
# prompt in the task data beside the two texts.
LS_TASKS = [
    {"id": 11, "data": {"prompt": "Say hi", "text1": "hi", "text2": "go away"},
     "annotations": [
         {"id": 1, "completed_by": 1, "was_cancelled": False,
          "result": [{"from_name": "pw", "to_name": "text1,text2", "type": "pairwise", "value": {"selected": "left"}}]},
         {"id": 2, "completed_by": 2, "was_cancelled": False,
          "result": [{"from_name": "pw", "to_name": "text1,text2", "type": "pairwise", "value": {"selected": "left"}}]},
         {"id": 3, "completed_by": 3, "was_cancelled": False,
          "result": [{"from_name": "pw", "to_name": "text1,text2", "type": "pairwise",
                      "value": {"selected": "right"}}]}]},
    {"id": 12, "data": {"prompt": "Count", "text1": "one", "text2": "1 2 3"},
     "annotations": [
         {"id": 4, "completed_by": 1, "was_cancelled": False,
          "result": [{"from_name": "pw", "to_name": "text1,text2", "type": "pairwise",
                      "value": {"selected": "right"}}]},
         {"id": 5, "completed_by": 2, "was_cancelled": True, "result": []}]},
    {"id": 13, "data": {"prompt": "Nobody", "text1": "a", "text2": "b"}, "annotations": []},
]  # fmt: skip

# Argilla records with a RankingQuestion "preference" over the fields response1..3 (the record form), and the
# flat form a Hugging Face export writes.
ARGILLA_RECORDS = [
    {"fields": {"prompt": "Name a color", "response1": "red", "response2": "blue", "response3": "mud"},
     "responses": [
         {"user_id": "u1", "status": "submitted", "values": {"preference": {"value": [
             {"value": "response1", "rank": 1}, {"value": "response2", "rank": 2}, {"value": "response3", "rank": 3}]}}},
         {"user_id": "u2", "status": "submitted", "values": {"preference": {"value": [
             {"value": "response2", "rank": 1}, {"value": "response1", "rank": 1}, {"value": "response3", "rank": 2}]}}},
         {"user_id": "u3", "status": "discarded", "values": {}}]},
]  # fmt: skip
ARGILLA_FLAT = [
    {"prompt": "Pick", "response1": "yes", "response2": "no",
     "preference": [{"user_id": "u1", "status": "submitted",
                     "value": [{"value": "response2", "rank": 1}, {"value": "response1", "rank": 2}]}]},
]  # fmt: skip


def write(path, rows, jsonl=False):
    path.write_text("".join(json.dumps(r) + "\n" for r in rows) if jsonl else json.dumps(rows))
    return str(path)


def pairs_of(path):
    return [(r["prompt"], r["chosen"], r["rejected"]) for r in map(json.loads, path.read_text().splitlines())]


def test_label_studio_pairwise_export_majority_and_unanimous(tmp_path):
    src = write(tmp_path / "ls.json", LS_TASKS)
    summary = load_stage("label").run(action="import", input=src, format="label-studio")
    out = tmp_path / "ls.pairs.jsonl"
    # Task 11: left, left, right: majority left. Task 12: one right (the cancelled one counts for nothing).
    assert pairs_of(out) == [("Say hi", "hi", "go away"), ("Count", "1 2 3", "one")]
    assert (summary["items"], summary["items_unlabeled"], summary["labels"], summary["pairs"]) == (3, 1, 4, 2)
    assert [(p.chosen, p.rejected) for p in load_preferences(str(out)).examples] == [
        ("hi", "go away"), ("1 2 3", "one")]  # what alignkit dpo reads
    summary = load_stage("label").run(action="import", input=src, format="label-studio", agreement="unanimous",
                                      output=str(tmp_path / "u.jsonl"))  # fmt: skip
    assert pairs_of(tmp_path / "u.jsonl") == [("Count", "1 2 3", "one")] and summary["pairs_undecided"] == 1


def test_argilla_ranking_record_and_flat_forms(tmp_path):
    src = write(tmp_path / "ar.jsonl", ARGILLA_RECORDS, jsonl=True)
    summary = load_stage("label").run(action="import", input=src, format="argilla", question="preference",
                                      pairs="all")  # fmt: skip
    # u1: red > blue > mud; u2: red = blue > mud (u3 discarded). Majority (2 of 2): red > mud, blue > mud;
    # red vs blue: u1 red, u2 tie: undecided.
    assert pairs_of(tmp_path / "ar.pairs.jsonl") == [("Name a color", "red", "mud"), ("Name a color", "blue", "mud")]
    assert (summary["labels"], summary["pairs"], summary["pairs_undecided"]) == (2, 2, 1)
    flat = write(tmp_path / "flat.json", ARGILLA_FLAT)
    load_stage("label").run(action="import", input=flat, format="argilla", question="preference")
    assert pairs_of(tmp_path / "flat.pairs.jsonl") == [("Pick", "no", "yes")]


def bad_ls(selected="left", data=None):
    task = json.loads(json.dumps(LS_TASKS[0]))
    task["annotations"][1]["result"][0]["value"]["selected"] = selected
    if data is not None:
        task["data"] = data
    return [LS_TASKS[1], task]


@pytest.mark.parametrize(
    "fmt, rows, field",
    [
        ("label-studio", bad_ls(selected="up"), "annotations[1].result[0].value.selected"),
        ("label-studio", bad_ls(data={"prompt": "p", "text1": "a"}), "data.text2"),
        ("label-studio", bad_ls(data={"text1": "a", "text2": "b"}), "data.prompt"),
        ("argilla", [{"fields": {"prompt": "p", "response1": "a"}, "responses": [{"status": "submitted",
          "values": {"ranking": {"value": [{"value": "response1", "rank": 1}, {"value": "response2", "rank": 2}]}}}]}],
         "fields.response2"),
        ("argilla", [{"fields": {"prompt": "p", "response1": "a", "response2": "b"}, "responses": [
            {"status": "submitted", "values": {"ranking": {"value": [{"value": "response1", "rank": "first"}]}}}]}],
         "responses[0].values.ranking.value[0].rank"),
        ("argilla", [{"fields": {"prompt": "p", "response1": "a", "response2": "b"}, "responses": [
            {"status": "submitted", "values": {"ranking": {"value": [{"value": "response1", "rank": 1},
                                                                      {"value": "response2", "rank": 2}]}}},
            {"status": "submitted", "values": {"ranking": {"value": [{"value": "response1", "rank": 1}]}}}]}],
         "responses[1].values.ranking.value"),
    ],
)  # fmt: skip
def test_a_malformed_row_names_file_row_and_field_and_writes_nothing(tmp_path, fmt, rows, field):
    src = write(tmp_path / "bad.json", rows)
    with pytest.raises(BadRowError) as err:
        load_stage("label").run(action="import", input=src, format=fmt)
    row = len(rows) - 1
    assert (err.value.source, err.value.row, err.value.field) == (src, row, field)
    assert "bad.json" in str(err.value) and field in str(err.value)
    assert not (tmp_path / "bad.pairs.jsonl").exists()


def test_import_needs_a_format(tmp_path):
    with pytest.raises(ConfigError, match="format="):
        load_stage("label").run(action="import", input=write(tmp_path / "x.json", LS_TASKS))
