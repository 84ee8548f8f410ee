"""The labeling storage, export and migration tests again, on PostgreSQL: a server this module starts on loopback
(initdb + pg_ctl from Debian's ``postgresql`` package, in a temporary data folder, as a non-root user) and stops
after; each test gets a fresh database. Skipped, with the reason, where the server cannot be started
(scripts/setup-env.sh test installs the package where apt-get can)."""

from __future__ import annotations

import glob
import os
import pwd
import shutil
import subprocess
import tempfile
import uuid

import pytest

pytest.importorskip("starlette")
psycopg = pytest.importorskip("psycopg", reason="psycopg is not installed (pip install 'alignkit[postgres]')")

# The same tests, collected here too; their `db_url` is this module's fixture below. `setup` is their fixture.
from test_label import (  # noqa: E402,F401
    setup,
    test_a_bad_ranking_is_a_400_and_nothing_is_stored,
    test_build_prefs_ranker_human_reads_the_label_database,
    test_rank_skip_flag_and_export_equals_what_was_submitted,
    test_wrong_token_csrf_replay_and_out_of_order_are_refused_and_nothing_is_stored,
)
from test_label_load import label_load  # noqa: E402  (its free_port)
from test_label_migrations import test_the_revisions_make_the_schema_the_models_describe  # noqa: E402,F401


def postgres_bin() -> str | None:
    """The folder of initdb and pg_ctl: on PATH, else Debian's /usr/lib/postgresql/<version>/bin (newest)."""
    if shutil.which("initdb") and shutil.which("pg_ctl"):
        return os.path.dirname(shutil.which("initdb"))
    found = sorted(glob.glob("/usr/lib/postgresql/*/bin/initdb"), key=lambda p: int(p.split("/")[4]))
    return os.path.dirname(found[-1]) if found else None


def run_as() -> dict:
    """subprocess arguments that run the server as a non-root user: PostgreSQL refuses to run as root."""
    if os.geteuid() != 0:
        return {}
    for name in ("postgres", "nobody"):
        try:
            entry = pwd.getpwnam(name)
        except KeyError:
            continue
        return {"user": entry.pw_uid, "group": entry.pw_gid}
    pytest.skip("PostgreSQL tests skipped: running as root and there is no postgres or nobody user to run as")


@pytest.fixture(scope="module")
def postgres_server():
    """``postgresql://alignkit@127.0.0.1:<port>``: a throwaway server (trust auth, loopback only, no fsync)."""
    bindir = postgres_bin()
    if bindir is None:
        reason = ("PostgreSQL tests skipped: no initdb (Debian's postgresql package is not installed; "
                  "scripts/setup-env.sh test installs it where apt-get works)")  # fmt: skip
        print(reason)
        pytest.skip(reason)
    user = run_as()
    data = tempfile.mkdtemp(prefix="alignkit-pg-")  # not under pytest's 0700 tmp: the server's user must reach it
    if user:
        os.chown(data, user["user"], user["group"])
    port = label_load.free_port()
    try:
        subprocess.run([f"{bindir}/initdb", "-D", data, "-U", "alignkit", "-A", "trust", "-E", "UTF8", "--no-sync"],
                       check=True, capture_output=True, text=True, timeout=120, **user)  # fmt: skip
        subprocess.run([f"{bindir}/pg_ctl", "-D", data, "-l", f"{data}/server.log", "-w", "-t", "60", "-o",
                        f"-p {port} -k {data} -c listen_addresses=127.0.0.1 -c fsync=off", "start"],
                       check=True, capture_output=True, text=True, timeout=90, **user)  # fmt: skip
    except (subprocess.CalledProcessError, subprocess.TimeoutExpired, OSError) as e:
        detail = getattr(e, "stderr", None) or str(e)
        shutil.rmtree(data, ignore_errors=True)
        reason = f"PostgreSQL tests skipped: the server did not start: {detail.strip().splitlines()[-1]}"
        print(reason)
        pytest.skip(reason)
    try:
        yield f"postgresql://alignkit@127.0.0.1:{port}"
    finally:
        subprocess.run([f"{bindir}/pg_ctl", "-D", data, "-m", "fast", "-w", "stop"], capture_output=True,
                       timeout=60, **user)  # fmt: skip
        shutil.rmtree(data, ignore_errors=True)


@pytest.fixture
def db_url(postgres_server) -> str:
    """A fresh, empty database on the server for each test."""
    name = f"t_{uuid.uuid4().hex[:12]}"
    with psycopg.connect(f"{postgres_server}/postgres", autocommit=True) as conn:
        conn.execute(f"CREATE DATABASE {name}")
    return f"{postgres_server}/{name}"


def test_a_server_that_is_not_there_is_a_one_line_error():
    from alignkit.labeling import storage

    url = f"postgresql://alignkit:secret@127.0.0.1:{label_load.free_port()}/nowhere"
    with pytest.raises(storage.DataSourceError, match="cannot open postgresql") as caught:
        storage.open_db(url)
    assert "secret" not in str(caught.value) and "\n" not in str(caught.value)
