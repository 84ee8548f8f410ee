"""alignkit label: the labeling app (Starlette TestClient), its database and the pairs it exports."""

from __future__ import annotations

import json
import re
import sqlite3

import pytest

pytest.importorskip("starlette")
from starlette.testclient import TestClient  # noqa: E402

from alignkit.config import ConfigError  # noqa: E402
from alignkit.data.io import BadRowError  # noqa: E402
from alignkit.data.schemas import load_preferences  # noqa: E402
from alignkit.labeling import storage  # noqa: E402
from alignkit.labeling.app import create_app  # noqa: E402
from alignkit.stages import load_stage  # noqa: E402

ROWS = [  # as build-prefs ranker=export writes them; response 3 of row 7 is markup a browser must not run
    {"prompt_row": 4, "prompt": "Say hi", "ranking": [], "sampling": {},
     "responses": [{"number": 1, "text": "hi"}, {"number": 2, "text": "hello there"}, {"number": 3, "text": "go"}]},
    {"prompt_row": 7, "prompt": [{"role": "user", "content": "Name a color"}], "ranking": [], "sampling": {},
     "responses": [{"number": 1, "text": "red"}, {"number": 2, "text": "blue"},
                   {"number": 3, "text": "<script>alert(1)</script>"}]},
    {"prompt_row": 9, "prompt": "Count", "ranking": [], "sampling": {},
     "responses": [{"number": 1, "text": "1 2 3"}, {"number": 2, "text": "one"}]},
]  # fmt: skip


@pytest.fixture
def setup(tmp_path, db_url):
    path = tmp_path / "prefs.export.jsonl"
    path.write_text("".join(json.dumps(r) + "\n" for r in ROWS))
    label = load_stage("label")
    out = {"url": db_url or storage.default_url(str(path))}
    for name in ("ana", "ben"):
        label.run(action="tokens", input=str(path), add_labeler=name, db=out["url"])
    engine = storage.open_db(out["url"])
    out["tokens"] = {name: storage.add_labeler(engine, name) for name in ("ana", "ben")}
    out["admin"] = storage.add_labeler(engine, "boss", admin=True)
    return path, engine, out


def client_for(engine, token=None) -> TestClient:
    client = TestClient(create_app(engine))
    if token is not None:
        r = client.post("/login", data={"token": token, "csrf": login_csrf(client)}, follow_redirects=False)
        assert r.status_code == 303, r.text
    return client


def login_csrf(client) -> str:
    return re.search(r'name="csrf" value="([^"]+)"', client.get("/login").text).group(1)


def page(client) -> tuple[str, int, str]:
    """(page text, the item id shown, the csrf token)."""
    text = client.get("/").text
    item = re.search(r'name="item_id" value="(\d+)"', text)
    return text, int(item.group(1)) if item else -1, re.search(r'name="csrf" value="([^"]+)"', text).group(1)


def post(client, item_id, csrf, action="ranked", ranking=None):
    data = {"csrf": csrf, "item_id": str(item_id), "action": action}
    if ranking is not None:
        data["ranking"] = json.dumps(ranking)
    return client.post("/submit", data=data, follow_redirects=False)


def n_labels(engine) -> int:
    return len(storage.labeler_counts(engine)) and sum(
        c["ranked"] + c["skip"] + c["flag"] for c in storage.labeler_counts(engine)
    )


def test_rank_skip_flag_and_export_equals_what_was_submitted(setup, tmp_path):
    path, engine, tok = setup
    ana = client_for(engine, tok["tokens"]["ana"])
    text, item, csrf = page(ana)
    assert item == 0 and "hello there" in text and "item 1 of 3" in text
    assert post(ana, 0, csrf, ranking=[[2], [1], [3]]).status_code == 303  # 2 best, 3 worst
    text, item, _ = page(ana)
    assert item == 1
    assert "&lt;script&gt;alert(1)&lt;/script&gt;" in text and "<script>alert" not in text  # escaped
    assert post(ana, 1, csrf, action="flag").status_code == 303
    assert post(ana, 2, csrf, action="skip").status_code == 303
    assert "All done" in ana.get("/").text
    ben = client_for(engine, tok["tokens"]["ben"])
    _, item, bcsrf = page(ben)
    assert item == 0  # each labeler has their own progress
    assert post(ben, 0, bcsrf, ranking=[[2, 1], [3]]).status_code == 303  # 1 and 2 tie, 3 worst
    assert post(ben, 1, bcsrf, ranking=[[1], [2, 3]]).status_code == 303
    assert post(ben, 2, bcsrf, ranking=[[1], [2]]).status_code == 303

    summary = load_stage("label").run(action="export", input=str(path), db=tok["url"])
    rows = [json.loads(line) for line in (tmp_path / "prefs.export.pairs.jsonl").read_text().splitlines()]
    # Item 0: candidates 2-3 (ana), 1-3 and 2-3 (ben). 2>3 both: written; 1 vs 3: ana 1>3, ben 1>3: written.
    # Item 1: ana flagged it, so it is left out. Item 2: ben alone ranked 1 over 2.
    assert [(r["prompt_row"], r["chosen"], r["rejected"]) for r in rows] == [
        (4, "hi", "go"), (4, "hello there", "go"), (9, "1 2 3", "one")]
    assert (summary["pairs"], summary["items_flagged"], summary["items_with_pairs"]) == (3, 1, 2)
    # Agreement: only item 0 has two rankings. Pairs 1-3 and 2-3 agree, 1-2 (ana 2>1, ben tie) not: 2/3.
    # Fractional ranks ana (2, 1, 3), ben (1.5, 1.5, 3) for responses 1..3: D_o = (0.5 + 0.5 + 0)/6,
    # D_e = 2 (6 * 27.5 - 12^2) / 30 = 1.4, alpha = 1 - (1/6)/1.4 = 0.881.
    ag = summary["agreement"]
    assert ag["items_multi"] == 1 and ag["pairwise_agreement"] == pytest.approx(2 / 3)
    assert ag["alpha"] == pytest.approx(1 - (1 / 6) / 1.4)
    assert ag["labelers"]["ana"] == {"agreement": pytest.approx(2 / 3), "comparisons": 3}
    admin = client_for(engine, tok["admin"]).get("/admin").text
    assert '<span id="pairwise">0.667</span>' in admin and '<span id="alpha">0.881</span>' in admin
    assert '<span id="low">none</span>' in admin  # 3 comparisons: too few to call anyone low
    # Progress: every labeler's labels of the 3 items; item 1 (id 0), the one item ranked twice, listed with
    # its own agreement (the overall figures, as it is the only one).
    assert '<span id="items">3</span>' in admin
    assert re.search(r"ana</td>\s*<td>3 of 3</td><td>1</td>\s*<td>1</td><td>1</td>", admin)
    assert re.search(r"boss \(admin\)</td>\s*<td>0 of 3</td>", admin)
    assert re.search(r'id="items-agreement">.*?<tr><td>1</td><td>2</td><td>0.667</td>\s*<td>0.881</td></tr>'
                     r"\s*</table>", admin, re.S)  # fmt: skip
    pairs = load_preferences(str(tmp_path / "prefs.export.pairs.jsonl")).examples  # what alignkit dpo reads
    assert [(p.prompt, p.chosen, p.rejected) for p in pairs] == [
        ("Say hi", "hi", "go"), ("Say hi", "hello there", "go"), ("Count", "1 2 3", "one")]

    # all pairs, unanimous: item 0's 1 vs 2 (ana 2>1, ben tie) is undecided and counted.
    out = tmp_path / "all.jsonl"
    summary = load_stage("label").run(action="export", input=str(path), db=tok["url"], output=str(out),
                                      pairs="all", agreement="unanimous")  # fmt: skip
    assert [(r["chosen_number"], r["rejected_number"]) for r in map(json.loads, out.read_text().splitlines())] == [
        (1, 3), (2, 3), (1, 2)]
    assert summary["pairs_undecided"] == 1
    with pytest.raises(ConfigError, match="already exists"):
        load_stage("label").run(action="export", input=str(path), db=tok["url"], output=str(out))


@pytest.mark.parametrize(
    "ranking, message",
    [([[1], [1, 2]], "appears twice"), ([[1], [2]], "not ranked"), ([[1], [2], [4]], "not a response number"),
     ([], "non-empty")],
)  # fmt: skip
def test_a_bad_ranking_is_a_400_and_nothing_is_stored(setup, ranking, message):
    _, engine, tok = setup
    ana = client_for(engine, tok["tokens"]["ana"])
    _, item, csrf = page(ana)
    r = post(ana, item, csrf, ranking=ranking)
    assert r.status_code == 400 and message in r.text
    assert n_labels(engine) == 0


def test_wrong_token_csrf_replay_and_out_of_order_are_refused_and_nothing_is_stored(setup):
    _, engine, tok = setup
    anon = TestClient(create_app(engine))
    r = anon.post("/login", data={"token": "nope", "csrf": login_csrf(anon)})
    assert r.status_code == 401 and "unknown token" in r.text
    r = anon.post("/login", data={"token": tok["tokens"]["ana"], "csrf": "forged"})
    assert r.status_code == 403  # a login form not from this browser
    assert post(anon, 0, "x", action="skip").status_code == 401  # not logged in

    ana = client_for(engine, tok["tokens"]["ana"])
    _, item, csrf = page(ana)
    assert post(ana, item, "wrong", action="skip").status_code == 403
    assert post(ana, 2, csrf, action="skip").status_code == 409  # out of order: item 0 is current
    assert post(ana, item, csrf, action="dance").status_code == 400
    assert n_labels(engine) == 0
    assert post(ana, item, csrf, action="skip").status_code == 303
    r = post(ana, item, csrf, ranking=[[1], [2], [3]])  # the same item again: a replay
    assert r.status_code == 409 and "not your current item" in r.text
    assert n_labels(engine) == 1
    assert ana.get("/admin").status_code == 403
    boss = client_for(engine, tok["admin"])
    admin = boss.get("/admin").text
    assert re.search(r"ana</td>\s*<td>1 of 3</td><td>0</td>\s*<td>1</td><td>0</td>", admin)


@pytest.mark.parametrize(
    "fields, status, message",
    [({"item_id": "first", "action": "skip"}, 400, "item_id: expected an integer"),
     ({"item_id": "0", "action": "ranked", "ranking": "[[1], [2"}, 400, "ranking: not JSON"),
     ({"item_id": "0", "action": "ranked"}, 400, "ranking: missing"),  # the page's script did not run
     ({"item_id": "0", "action": "ranked", "ranking": '[[1], "2", [3]]'}, 400, "not a response number")],
)  # fmt: skip
def test_a_malformed_submit_is_a_400_and_nothing_is_stored(setup, fields, status, message):
    _, engine, tok = setup
    ana = client_for(engine, tok["tokens"]["ana"])
    _, _, csrf = page(ana)
    r = ana.post("/submit", data={"csrf": csrf, **fields}, follow_redirects=False)
    assert r.status_code == status and message in r.text
    assert n_labels(engine) == 0


def test_logout_checks_csrf_too(setup):
    _, engine, tok = setup
    ana = client_for(engine, tok["tokens"]["ana"])
    _, item, csrf = page(ana)
    r = ana.post("/logout", data={"csrf": "forged"}, follow_redirects=False)
    assert r.status_code == 403
    assert page(ana)[1] == item  # still logged in: a forged form cannot end the session
    assert ana.post("/logout", data={}, follow_redirects=False).status_code == 403


@pytest.mark.parametrize(
    "host, warned",
    [("127.0.0.1", False), ("127.0.0.2", False), ("::1", False), ("localhost", False), ("0.0.0.0", True),
     ("192.168.1.20", True), ("::", True), ("labels.example.org", True)],
)  # fmt: skip
def test_serving_beyond_loopback_warns_of_tls(host, warned):
    from alignkit.stages.label import LabelConfig, bind_warning

    warning = bind_warning(host)
    assert (warning is not None) == warned
    if warned:
        assert host in warning and "TLS" in warning
    assert LabelConfig.__dataclass_fields__["host"].default == "127.0.0.1"  # bound to loopback unless told


def test_sqlite_wal_beside_the_input_tokens_hashed_and_logout(setup, tmp_path):
    path, engine, tok = setup
    db = tmp_path / "prefs.export.label.db"
    assert db.is_file()
    con = sqlite3.connect(db)
    assert con.execute("PRAGMA journal_mode").fetchone()[0] == "wal"
    hashes = dict(con.execute("SELECT name, token_hash FROM labelers").fetchall())
    token = tok["tokens"]["ana"]
    assert token not in json.dumps(hashes) and hashes["ana"] == storage.hash_secret(token)
    assert con.execute("SELECT version FROM schema_version").fetchall() == [(storage.SCHEMA_VERSION,)]
    con.close()
    # A fresh token ends the old one.
    fresh = storage.add_labeler(engine, "ana")
    with pytest.raises(storage.LabelError):
        storage.login(engine, token)
    ana = client_for(engine, fresh)
    _, _, csrf = page(ana)
    assert ana.post("/logout", data={"csrf": csrf}, follow_redirects=False).status_code == 303
    assert ana.get("/", follow_redirects=False).headers["location"] == "/login"


def test_input_checks(tmp_path):
    plain = tmp_path / "plain.jsonl"  # any prompt + responses file: its row number is the key
    plain.write_text(json.dumps({"prompt": "p", "responses": ["a", "b"]}) + "\n")
    assert storage.read_input(str(plain)) == [storage.InputItem(0, "p", ["a", "b"])]
    bad = tmp_path / "bad.jsonl"
    bad.write_text(json.dumps({"prompt": "p", "responses": ["only one"]}) + "\n")
    with pytest.raises(BadRowError, match="at least 2"):
        load_stage("label").run(action="tokens", input=str(bad), add_labeler="x")
    assert not (tmp_path / "bad.label.db").exists()  # nothing made for a bad input
    with pytest.raises(ConfigError, match="add_labeler"):
        load_stage("label").run(action="tokens", input=str(plain))
    other = tmp_path / "other.jsonl"
    other.write_text(json.dumps({"prompt": "q", "responses": ["a", "b"]}) + "\n")
    with pytest.raises(storage.DataSourceError, match="different input"):
        load_stage("label").run(action="tokens", input=str(other), db=storage.default_url(str(plain)),
                                add_labeler="x")  # fmt: skip


def test_build_prefs_ranker_human_reads_the_label_database(setup, tmp_path):
    from alignkit.config import load_config
    from alignkit.stages import build_prefs
    from alignkit.stages.build_prefs import BuildPrefsConfig

    path, engine, tok = setup
    storage.submit(engine, 1, 0, "ranked", [[2], [1], [3]])  # ana (id 1): 2 > 1 > 3
    storage.submit(engine, 1, 1, "flag")  # ana flags item 1: it is left out whatever ben says
    storage.submit(engine, 2, 0, "ranked", [[2, 1], [3]])  # ben (id 2): 1 = 2 > 3
    storage.submit(engine, 2, 1, "ranked", [[1], [2, 3]])
    storage.submit(engine, 2, 2, "ranked", [[1], [2]])
    db = tmp_path / "prefs.export.label.db" if tok["url"].startswith("sqlite") else tok["url"]

    def run(spec, out):
        args = [f"output={out}", "ranker=human", f"human_rankings={spec}", "pairing=all_pairs", "progress=false"]
        return build_prefs.run(load_config(BuildPrefsConfig, None, args))

    summary = run(db, tmp_path / "h.jsonl")
    # Item 0 (prompt row 4): mean fractional ranks 1.75, 1.25, 3 -> scores -1.75, -1.25, -3: 2 > 1 > 3.
    # Item 2 (prompt row 9): ben alone, 1 > 2. Item 1 flagged: no pairs.
    got = [(r["prompt_row"], r["chosen_index"], r["rejected_index"], r["chosen_score"])
           for r in map(json.loads, (tmp_path / "h.jsonl").read_text().splitlines())]  # fmt: skip
    assert got == [(4, 1, 0, -1.25), (4, 0, 2, -1.75), (4, 1, 2, -1.25), (9, 0, 1, -1.0)]
    assert (summary["pairs"], summary["rows_read"], summary["prompts_done"]) == (4, 3, 2)
    again = run(tok["url"], tmp_path / "u.jsonl")  # the same database by its URL
    assert (tmp_path / "u.jsonl").read_text() == (tmp_path / "h.jsonl").read_text() and again["pairs"] == 4
    with pytest.raises(storage.DataSourceError, match="not found"):
        run(tmp_path / "missing.label.db", tmp_path / "m.jsonl")
