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

# Argilla 2.x, a RankingQuestion "order" over the fields answer_a..c beside a TextQuestion "note". Record.to_dict
# (records.to_list(flatten=False), to_json): responses per question, each value the options best first; some 2.x
# versions write no status (the last record).
ARGILLA2_RECORDS = [
    {"id": "r1", "_server_id": "9f1c", "metadata": {}, "suggestions": {}, "vectors": {},
     "fields": {"prompt": "Best pet?", "answer_a": "a cat", "answer_b": "a rock", "answer_c": "a dog"},
     "responses": {
         "order": [
             {"value": ["answer_c", "answer_a", "answer_b"], "user_id": "u-1", "status": "submitted"},
             {"value": ["answer_a", "answer_c", "answer_b"], "user_id": "u-2", "status": "submitted"},
             {"value": ["answer_b", "answer_a", "answer_c"], "user_id": "u-3", "status": "draft"}],
         "note": [{"value": "rocks are quiet", "user_id": "u-3", "status": "draft"}]}},
    {"id": "r2", "fields": {"prompt": "Colder?", "answer_a": "ice", "answer_b": "steam"},
     "responses": {"order": [{"value": ["answer_b", "answer_a"], "user_id": "u-1", "status": "discarded"}]}},
    {"id": "r3", "fields": {"prompt": "Unseen", "answer_a": "x", "answer_b": "y"}, "responses": {}},
    {"id": "r4", "fields": {"prompt": "2+2?", "answer_a": "4", "answer_b": "5"},
     "responses": {"order": [{"value": ["answer_a", "answer_b"], "user_id": "u-2"}]}},
]  # fmt: skip
# What both forms must give (best-worst, majority): r1 (drafts left out): u-1 dog > cat > rock, u-2 cat > dog >
# rock: dog > rock and cat > rock; r2 only discarded, r3 nobody: unlabeled; r4: 4 > 5.
ARGILLA2_PAIRS = [("Best pet?", "a dog", "a rock"), ("Best pet?", "a cat", "a rock"), ("2+2?", "4", "5")]


def argilla2_flat(record):
    """The same record as to_list(flatten=True) / to_datasets() / to_hub() write it: fields as columns, and per
    question `<q>.responses`, `.responses.users`, `.responses.status` (None where nobody answered)."""
    row = {"id": record["id"], **record["fields"]}
    for q in ("order", "note"):
        answers = record["responses"].get(q)
        row[f"{q}.responses"] = [a["value"] for a in answers] if answers else None
        row[f"{q}.responses.users"] = [a["user_id"] for a in answers] if answers else None
        row[f"{q}.responses.status"] = [a.get("status") for a in answers] if answers else None
    return row



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


def test_argilla2_record_export_submitted_only_and_counted(tmp_path, capsys):
    src = write(tmp_path / "v2.json", ARGILLA2_RECORDS)  # to_json writes one JSON list
    summary = load_stage("label").run(action="import", input=src, format="argilla", question="order")
    out = tmp_path / "v2.pairs.jsonl"
    assert pairs_of(out) == ARGILLA2_PAIRS
    assert [(p.chosen, p.rejected) for p in load_preferences(str(out)).examples] == [
        (c, r) for _, c, r in ARGILLA2_PAIRS]  # what alignkit dpo reads
    assert (summary["items"], summary["items_unlabeled"], summary["labels"], summary["pairs"]) == (4, 2, 3, 3)
    assert (summary["labels_draft"], summary["labels_discarded"]) == (1, 1)
    assert "1 draft and 1 discarded responses" in capsys.readouterr().out


@pytest.mark.parametrize("shape", ["to_list_flat_jsonl", "to_hub_parquet", "to_datasets_saved"])
def test_argilla2_flattened_export_gives_the_same_pairs(tmp_path, shape):
    rows = [argilla2_flat(r) for r in ARGILLA2_RECORDS]
    if shape == "to_list_flat_jsonl":
        src = write(tmp_path / "flat.jsonl", rows, jsonl=True)
    elif shape == "to_hub_parquet":  # the Hub holds a to_datasets() dataset as Parquet
        import pyarrow as pa
        import pyarrow.parquet as pq

        src = str(tmp_path / "flat.parquet")
        pq.write_table(pa.Table.from_pylist(rows), src)
    else:
        datasets = pytest.importorskip("datasets")
        src = str(tmp_path / "flat")
        datasets.Dataset.from_list(rows).save_to_disk(src)
    out = tmp_path / "out.jsonl"
    summary = load_stage("label").run(action="import", input=src, format="argilla", question="order", output=str(out))
    assert pairs_of(out) == ARGILLA2_PAIRS
    assert (summary["labels"], summary["labels_draft"], summary["labels_discarded"]) == (3, 1, 1)


def test_argilla2_wrong_question_names_the_questions_there(tmp_path):
    src = write(tmp_path / "v2.json", ARGILLA2_RECORDS)
    with pytest.raises(ConfigError, match=r"question: .*'ranking'.*\['note', 'order'\]"):
        load_stage("label").run(action="import", input=src, format="argilla")
    flat = write(tmp_path / "flat.jsonl", [argilla2_flat(r) for r in ARGILLA2_RECORDS], jsonl=True)
    with pytest.raises(BadRowError, match=r"ranking\.responses.*\['note', 'order'\]: pass question=NAME"):
        load_stage("label").run(action="import", input=flat, format="argilla")


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
        # Argilla 2.x shapes
        ("argilla", [{"prompt": "p", "a": "x", "b": "y"}], "ranking.responses"),  # no shape we know
        ("argilla", [{"prompt": "p", "a": "x", "b": "y", "ranking.responses": [["a", "b"], ["b", "a"]],
                      "ranking.responses.status": ["submitted"]}], "ranking.responses.status"),
        ("argilla", [{"prompt": "p", "a": "x", "ranking.responses": "a"}], "ranking.responses"),
        ("argilla", [{"fields": {"prompt": "p", "a": "x", "b": "y"},
                      "responses": {"ranking": [{"value": ["a", "a"], "user_id": "u", "status": "submitted"}]}}],
         "responses.ranking[0].value[1]"),
        ("argilla", [{"fields": {"prompt": "p", "a": "x", "b": "y"},
                      "responses": {"ranking": [{"value": ["a", "b"], "user_id": "u", "status": "maybe"}]}}],
         "responses.ranking[0].status"),
        ("argilla", [{"fields": {"prompt": "p", "a": "x", "b": "y"},
                      "responses": {"ranking": [{"value": ["a", "b"], "user_id": "u", "status": "submitted"},
                                                {"value": ["b"], "user_id": "v", "status": "submitted"}]}}],
         "responses.ranking[1].value"),
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
