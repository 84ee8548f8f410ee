"""The label database's schema migrations (Alembic): a database made before migrations keeps its rows and is
stamped; the revisions make exactly the schema the models describe; a revision from a newer alignkit is refused."""

from __future__ import annotations

import json
import sqlite3

import pytest

pytest.importorskip("alembic")
from alembic.autogenerate import compare_metadata  # noqa: E402
from alembic.migration import MigrationContext  # noqa: E402
from alembic.script import ScriptDirectory  # noqa: E402
from sqlalchemy import text  # noqa: E402

from alignkit.labeling import storage  # noqa: E402
from alignkit.stages import load_stage  # noqa: E402

# What `storage.open_db` wrote before migrations (create_all at 49a3035), as sqlite_master held it: frozen here
# so the test keeps checking that old layout whatever the models become.
PRE_MIGRATIONS_DDL = """
CREATE TABLE schema_version (version INTEGER NOT NULL, PRIMARY KEY (version));
CREATE TABLE items (id INTEGER NOT NULL, "key" INTEGER NOT NULL, prompt TEXT NOT NULL, responses TEXT NOT NULL,
    digest VARCHAR(64) NOT NULL, PRIMARY KEY (id), UNIQUE ("key"));
CREATE TABLE labelers (id INTEGER NOT NULL, name VARCHAR(100) NOT NULL, token_hash VARCHAR(64) NOT NULL,
    is_admin BOOLEAN NOT NULL, PRIMARY KEY (id), UNIQUE (name), UNIQUE (token_hash));
CREATE TABLE sessions (id_hash VARCHAR(64) NOT NULL, labeler_id INTEGER NOT NULL, csrf VARCHAR(64) NOT NULL,
    created_at DATETIME NOT NULL, PRIMARY KEY (id_hash), FOREIGN KEY(labeler_id) REFERENCES labelers (id));
CREATE TABLE labels (id INTEGER NOT NULL, item_id INTEGER NOT NULL, labeler_id INTEGER NOT NULL,
    kind VARCHAR(10) NOT NULL, ranking TEXT, created_at DATETIME NOT NULL, PRIMARY KEY (id),
    UNIQUE (item_id, labeler_id), FOREIGN KEY(item_id) REFERENCES items (id),
    FOREIGN KEY(labeler_id) REFERENCES labelers (id));
"""
ITEMS = [storage.InputItem(4, "Say hi", ["hi", "hello"]), storage.InputItem(9, "Count", ["1 2", "one", "two"])]


def head_revision() -> str:
    return ScriptDirectory(str(storage.MIGRATIONS)).get_current_head()


def make_pre_migrations_db(path) -> str:
    """A database as alignkit wrote it before migrations: two items, labeler ana, her session and one label."""
    con = sqlite3.connect(path)
    con.executescript(PRE_MIGRATIONS_DDL)
    con.execute("INSERT INTO schema_version VALUES (1)")
    con.executemany("INSERT INTO items VALUES (?, ?, ?, ?, ?)", [
        (k, it.key, json.dumps(it.prompt), json.dumps(it.responses), it.digest) for k, it in enumerate(ITEMS)])  # fmt: skip
    con.execute("INSERT INTO labelers VALUES (1, 'ana', ?, 0)", (storage.hash_secret("ana-token"),))
    con.execute("INSERT INTO sessions VALUES (?, 1, 'csrf', '2026-12-01 10:00:00')", (storage.hash_secret("sid"),))
    con.execute("INSERT INTO labels VALUES (1, 0, 1, 'ranked', '[[2], [1]]', '2026-12-01 10:01:00')")
    con.commit()
    con.close()
    return f"sqlite:///{path}"


def dump(path) -> dict[str, list]:
    con = sqlite3.connect(path)
    out = {t: con.execute(f"SELECT * FROM {t} ORDER BY 1").fetchall()
           for t in ("schema_version", "items", "labelers", "sessions", "labels")}  # fmt: skip
    con.close()
    return out


def test_a_database_made_before_migrations_is_stamped_keeps_its_rows_and_serves_on(tmp_path):
    db = tmp_path / "old.label.db"
    url = make_pre_migrations_db(db)
    before = dump(db)
    assert len(before["labels"]) == 1 and len(before["items"]) == 2

    engine = storage.open_db(url)
    assert dump(db) == before  # every row as it was
    with engine.connect() as conn:
        assert MigrationContext.configure(conn).get_current_revision() == head_revision() == "0001"
    # ana's old session still logs her in, and she goes on from item 1 (item 0 is labeled).
    assert storage.session_of(engine, "sid").name == "ana"
    assert storage.current_item(engine, 1).item_id == 1
    storage.submit(engine, 1, 1, "ranked", [[3], [1, 2]])
    assert len(dump(db)["labels"]) == 2
    storage.open_db(url)  # opening it again changes nothing
    assert len(dump(db)["labels"]) == 2


def test_the_cli_migrates_a_database_made_before_migrations(tmp_path, capsys):
    src = tmp_path / "prefs.export.jsonl"
    src.write_text("".join(json.dumps({"prompt_row": it.key, "prompt": it.prompt, "responses": it.responses}) + "\n"
                           for it in ITEMS))  # fmt: skip
    db = tmp_path / "prefs.export.label.db"
    make_pre_migrations_db(db)
    summary = load_stage("label").run(action="export", input=str(src))  # pairs from the old database's label
    assert (summary["pairs"], summary["labels"]) == (1, 1)
    con = sqlite3.connect(db)
    assert con.execute("SELECT version_num FROM alembic_version").fetchall() == [("0001",)]
    con.close()


def test_the_revisions_make_the_schema_the_models_describe(tmp_path, db_url):
    engine = storage.open_db(db_url or f"sqlite:///{tmp_path / 'new.label.db'}")
    with engine.connect() as conn:
        ctx = MigrationContext.configure(conn)
        assert ctx.get_current_revision() == head_revision()
        assert compare_metadata(ctx, storage.Base.metadata) == []  # a model changed without a revision fails here
        assert conn.execute(text("SELECT version FROM schema_version")).scalars().all() == [storage.SCHEMA_VERSION]


def test_an_unknown_revision_or_an_old_schema_version_is_refused(tmp_path):
    url = f"sqlite:///{tmp_path / 'new.label.db'}"
    engine = storage.open_db(url)
    with engine.begin() as conn:
        conn.execute(text("UPDATE alembic_version SET version_num = 'ffff'"))
    with pytest.raises(storage.DataSourceError, match="revision this alignkit does not know"):
        storage.open_db(url)

    old = tmp_path / "v2.label.db"
    make_pre_migrations_db(old)
    con = sqlite3.connect(old)
    con.execute("UPDATE schema_version SET version = 2")
    con.commit()
    con.close()
    with pytest.raises(storage.DataSourceError, match=r"schema version \[2\]"):
        storage.open_db(f"sqlite:///{old}")
    assert dump(old)["schema_version"] == [(2,)]  # nothing written to a database we refused


@pytest.mark.parametrize("url, message", [
    ("nonsense", "is not a database URL"),
    ("sqlite:////nonexistent-dir/x.db", "cannot open"),
])  # fmt: skip
def test_a_bad_database_url_is_a_one_line_error(url, message):
    with pytest.raises(storage.DataSourceError, match=message):
        storage.open_db(url)
