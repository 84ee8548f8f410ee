"""The labeling database, through SQLAlchemy: SQLite beside the input by default (WAL mode, so readers never
block the writer and a submit acknowledged is on disk), or any SQLAlchemy URL for a team.

Tables: ``items`` (the input's prompts and responses, copied in once), ``labelers`` (token stored as a sha256
hash), ``sessions`` (a login: its id hashed, its CSRF token), ``labels`` (one per labeler and item: a ranking,
a skip or an unsafe flag) and ``schema_version``. The schema is made and upgraded by the Alembic revisions in
``alignkit/labeling/migrations`` (``migrate``), run by every command that opens the database.
"""

from __future__ import annotations

import hashlib
import json
import secrets
from dataclasses import dataclass
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

from alembic import command as alembic_command
from alembic.config import Config as AlembicConfig
from alembic.util import CommandError as AlembicCommandError
from sqlalchemy import (
    Boolean,
    DateTime,
    ForeignKey,
    Integer,
    String,
    Text,
    UniqueConstraint,
    create_engine,
    event,
    func,
    inspect,
    select,
)
from sqlalchemy.engine import URL, Engine, make_url
from sqlalchemy.exc import ArgumentError, IntegrityError, OperationalError
from sqlalchemy.orm import DeclarativeBase, Mapped, Session, mapped_column

from alignkit.data.io import BadRow, BadRowError, DataSourceError, Record, read_rows
from alignkit.errors import AlignkitError

SCHEMA_VERSION = 1  # what ``schema_version`` holds; a revision that changes the schema raises it (see migrations)
MIGRATIONS = Path(__file__).with_name("migrations")
FIRST_REVISION = "0001"  # the schema of databases made before migrations
KINDS = ("ranked", "skip", "flag")  # what a label is: a ranking, a skip, or "unsafe" (no ranking)


class LabelError(AlignkitError):
    """A request the app refuses: ``status`` is the HTTP code it answers with; nothing was stored."""

    def __init__(self, status: int, message: str):
        super().__init__(message)
        self.status = status


class Base(DeclarativeBase):
    pass


class SchemaVersion(Base):
    __tablename__ = "schema_version"
    version: Mapped[int] = mapped_column(Integer, primary_key=True)


class Item(Base):
    __tablename__ = "items"
    id: Mapped[int] = mapped_column(Integer, primary_key=True)  # 0-based position in the input: the order shown
    key: Mapped[int] = mapped_column(Integer, unique=True)  # the input's prompt_row (or its row number)
    prompt: Mapped[str] = mapped_column(Text)  # JSON: text or chat messages
    responses: Mapped[str] = mapped_column(Text)  # JSON: list of texts, response k is number k + 1
    digest: Mapped[str] = mapped_column(String(64))  # sha256 of prompt + responses: the same input next time


class Labeler(Base):
    __tablename__ = "labelers"
    id: Mapped[int] = mapped_column(Integer, primary_key=True)
    name: Mapped[str] = mapped_column(String(100), unique=True)
    token_hash: Mapped[str] = mapped_column(String(64), unique=True)
    is_admin: Mapped[bool] = mapped_column(Boolean, default=False)


class LoginSession(Base):
    __tablename__ = "sessions"
    id_hash: Mapped[str] = mapped_column(String(64), primary_key=True)  # the cookie holds the id, we its hash
    labeler_id: Mapped[int] = mapped_column(ForeignKey("labelers.id"))
    csrf: Mapped[str] = mapped_column(String(64))
    created_at: Mapped[datetime] = mapped_column(DateTime)


class Label(Base):
    __tablename__ = "labels"
    __table_args__ = (UniqueConstraint("item_id", "labeler_id"),)  # one label per labeler and item, ever
    id: Mapped[int] = mapped_column(Integer, primary_key=True)
    item_id: Mapped[int] = mapped_column(ForeignKey("items.id"))
    labeler_id: Mapped[int] = mapped_column(ForeignKey("labelers.id"))
    kind: Mapped[str] = mapped_column(String(10))
    ranking: Mapped[str | None] = mapped_column(Text, nullable=True)  # JSON best-first groups, for "ranked"
    created_at: Mapped[datetime] = mapped_column(DateTime)


def default_url(input_path: str) -> str:
    """SQLite beside the input: ``prefs.export.jsonl`` -> ``prefs.export.label.db``."""
    path = Path(input_path).expanduser().resolve()
    return f"sqlite:///{path.with_name(path.name.removesuffix('.jsonl') + '.label.db')}"


def engine_url(url: str) -> URL:
    """``url`` parsed; a PostgreSQL URL without a driver (``postgresql://``, ``postgres://``) gets psycopg 3, the
    driver the ``postgres`` extra installs (SQLAlchemy's default for it would be psycopg2)."""
    try:
        parsed = make_url(url)
    except ArgumentError as e:
        raise DataSourceError(f"db: {url!r} is not a database URL ({e})") from None
    if parsed.drivername in ("postgresql", "postgres"):
        parsed = parsed.set(drivername="postgresql+psycopg")
    return parsed


def open_db(url: str) -> Engine:
    """The engine of ``url`` with the schema made or migrated to the newest revision (``migrate``)."""
    parsed = engine_url(url)
    is_sqlite = parsed.drivername.startswith("sqlite")
    try:
        engine = create_engine(parsed, connect_args={"check_same_thread": False} if is_sqlite else {})
    except ModuleNotFoundError as e:  # the driver of a URL whose extra is not installed
        raise DataSourceError(f"db: {parsed.drivername} needs {e.name} (pip install 'alignkit[postgres]')") from None
    if is_sqlite:
        @event.listens_for(engine, "connect")
        def _pragmas(conn, _record):
            # WAL: readers never block the writer. synchronous=FULL fsyncs the WAL on every commit, so an
            # acknowledged submit survives power loss too (NORMAL would survive a process kill only).
            cur = conn.cursor()
            cur.execute("PRAGMA journal_mode=WAL")
            cur.execute("PRAGMA synchronous=FULL")
            cur.execute("PRAGMA foreign_keys=ON")
            cur.close()
    try:
        migrate(engine)
    except OperationalError as e:  # the server is not there, the password is wrong, the file is not SQLite
        where = parsed.render_as_string(hide_password=True)
        raise DataSourceError(f"db: cannot open {where}: {str(e.orig).strip().splitlines()[0]}") from None
    return engine


def migrate(engine: Engine) -> None:
    """Make the schema (a new database) or upgrade it to the newest revision, in one transaction. A database
    made before migrations existed (``schema_version`` 1, no ``alembic_version``) holds revision 0001's schema
    and is stamped with it first; a revision this alignkit does not know (a newer one's) is refused."""
    cfg = AlembicConfig()
    cfg.set_main_option("script_location", str(MIGRATIONS))
    with engine.begin() as conn:
        cfg.attributes["connection"] = conn  # migrations/env.py runs on this connection
        tables = set(inspect(conn).get_table_names())
        try:
            if "schema_version" in tables and "alembic_version" not in tables:
                versions = conn.execute(select(SchemaVersion.version)).scalars().all()
                if versions != [1]:
                    raise DataSourceError(f"{engine.url}: label database schema version {versions}, before "
                                          "migrations only version 1 was written; not a database alignkit made")  # fmt: skip
                alembic_command.stamp(cfg, FIRST_REVISION)
            alembic_command.upgrade(cfg, "head")
        except AlembicCommandError as e:  # "Can't locate revision ...": written by a newer alignkit
            raise DataSourceError(f"{engine.url}: label database at a schema revision this alignkit does not "
                                  f"know ({e}); upgrade alignkit") from None  # fmt: skip


def now() -> datetime:
    return datetime.now(timezone.utc).replace(tzinfo=None)


def hash_secret(secret: str) -> str:
    return hashlib.sha256(secret.encode("utf-8")).hexdigest()


# ---------------------------------------------------------------------------------------------
# Items: the input file
# ---------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class InputItem:
    key: int
    prompt: Any  # text or chat messages
    responses: list[str]

    @property
    def digest(self) -> str:
        return hash_secret(json.dumps([self.prompt, self.responses], sort_keys=True))


def parse_item(record: Record) -> InputItem:
    """A ``build-prefs ranker=export`` line ({prompt_row, prompt, responses: [{number, text}]}) or any row with
    ``prompt`` and ``responses`` (a list of texts); at least two responses."""
    data = record.data

    def bad(field: str, problem: str) -> BadRowError:
        return BadRowError(record.source, record.row, field, problem)

    for key in ("prompt", "responses"):
        if key not in data:
            raise bad(key, f"missing (the row has {sorted(data)}); expected prompt + responses")
    prompt = data["prompt"]
    if not (isinstance(prompt, str) or (isinstance(prompt, list) and all(isinstance(m, dict) for m in prompt))):
        raise bad("prompt", "expected text or a list of chat messages")
    items = data["responses"]
    if not isinstance(items, list):
        raise bad("responses", f"expected a list, got {type(items).__name__}")
    texts = [it.get("text") if isinstance(it, dict) else it for it in items]
    if not all(isinstance(t, str) for t in texts):
        raise bad("responses", "expected texts or {'number', 'text'} objects")
    numbers = [it.get("number") for it in items if isinstance(it, dict)]
    if numbers and numbers != list(range(1, len(items) + 1)):
        raise bad("responses", "responses must be numbered 1, 2, ... in order")
    if len(texts) < 2:
        raise bad("responses", f"{len(texts)} response(s); ranking needs at least 2")
    key = data.get("prompt_row", record.row)
    if isinstance(key, bool) or not isinstance(key, int):
        raise bad("prompt_row", f"expected an int, got {key!r}")
    return InputItem(key, prompt, texts)


def read_input(path: str) -> list[InputItem]:
    """Every line of the input; a malformed one is an error naming its row (nothing is loaded)."""
    if not Path(path).expanduser().is_file():
        raise DataSourceError(f"input: {path} is not a file")
    items: list[InputItem] = []
    seen: set[int] = set()
    for rec in read_rows(path):
        if isinstance(rec, BadRow):
            raise BadRowError(rec.ref.source, rec.ref.row, None, rec.reason)
        item = parse_item(rec)
        if item.key in seen:
            raise BadRowError(rec.source, rec.row, "prompt_row", f"prompt row {item.key} appears twice")
        seen.add(item.key)
        items.append(item)
    if not items:
        raise DataSourceError(f"input: {path} holds no rows")
    return items


def load_items(engine: Engine, items: list[InputItem]) -> None:
    """Copy the input into ``items`` the first time; later, check the database holds this same input."""
    with Session(engine) as s, s.begin():
        stored = {it.key: it.digest for it in s.scalars(select(Item))}
        if not stored:
            s.add_all(
                Item(id=k, key=it.key, prompt=json.dumps(it.prompt), responses=json.dumps(it.responses),
                     digest=it.digest)
                for k, it in enumerate(items)
            )  # fmt: skip
            return
        if stored != {it.key: it.digest for it in items}:
            raise DataSourceError(
                "input: the label database holds a different input (other prompts or responses); "
                "give db=<another database> for this file"
            )


# ---------------------------------------------------------------------------------------------
# Labelers and sessions
# ---------------------------------------------------------------------------------------------


def add_labeler(engine: Engine, name: str, admin: bool = False) -> str:
    """Create labeler ``name`` (or give an existing one a fresh token, ending its sessions); returns the token,
    which is stored only as its hash."""
    token = secrets.token_urlsafe(24)
    with Session(engine) as s, s.begin():
        labeler = s.scalars(select(Labeler).where(Labeler.name == name)).first()
        if labeler is None:
            s.add(Labeler(name=name, token_hash=hash_secret(token), is_admin=admin))
        else:
            labeler.token_hash, labeler.is_admin = hash_secret(token), admin
            for old in s.scalars(select(LoginSession).where(LoginSession.labeler_id == labeler.id)):
                s.delete(old)
    return token


def login(engine: Engine, token: str) -> tuple[str, str]:
    """A new session for the labeler of ``token``: (session id for the cookie, CSRF token)."""
    digest = hash_secret(token)
    with Session(engine) as s, s.begin():
        labeler = s.scalars(select(Labeler).where(Labeler.token_hash == digest)).first()
        # The lookup is by hash; compare_digest makes the final comparison constant-time all the same.
        if labeler is None or not secrets.compare_digest(labeler.token_hash, digest):
            raise LabelError(401, "unknown token")
        sid, csrf = secrets.token_urlsafe(32), secrets.token_urlsafe(32)
        s.add(LoginSession(id_hash=hash_secret(sid), labeler_id=labeler.id, csrf=csrf, created_at=now()))
    return sid, csrf


@dataclass(frozen=True)
class Who:
    labeler_id: int
    name: str
    is_admin: bool
    csrf: str


def session_of(engine: Engine, sid: str | None) -> Who | None:
    if not sid:
        return None
    with Session(engine) as s:
        row = s.execute(
            select(LoginSession, Labeler).join(Labeler).where(LoginSession.id_hash == hash_secret(sid))
        ).first()
        if row is None:
            return None
        sess, labeler = row
        return Who(labeler.id, labeler.name, labeler.is_admin, sess.csrf)


def logout(engine: Engine, sid: str) -> None:
    with Session(engine) as s, s.begin():
        sess = s.get(LoginSession, hash_secret(sid))
        if sess is not None:
            s.delete(sess)


# ---------------------------------------------------------------------------------------------
# Labels
# ---------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class Shown:
    """The item a labeler is on: its position, prompt and responses, and how many items there are."""

    item_id: int
    prompt: Any
    responses: list[str]
    done: int
    total: int


def _current(s: Session, labeler_id: int) -> Item | None:
    labeled = select(Label.item_id).where(Label.labeler_id == labeler_id)
    return s.scalars(select(Item).where(Item.id.not_in(labeled)).order_by(Item.id).limit(1)).first()


def _count_items(s: Session) -> int:
    return s.scalar(select(func.count()).select_from(Item)) or 0


def count_items(engine: Engine) -> int:
    """How many items there are to label (the admin page's progress)."""
    with Session(engine) as s:
        return _count_items(s)


def current_item(engine: Engine, labeler_id: int) -> Shown | None:
    """The first item this labeler has not labeled (ranked, skipped or flagged); None when all are."""
    with Session(engine) as s:
        total = _count_items(s)
        done = len(s.scalars(select(Label.id).where(Label.labeler_id == labeler_id)).all())
        item = _current(s, labeler_id)
        if item is None:
            return None
        return Shown(item.id, json.loads(item.prompt), json.loads(item.responses), done, total)


def check_ranking(ranking: Any, n: int) -> list[list[int]]:
    """A best-first ranking of responses 1..n as groups of ties, naming every response exactly once."""
    if not isinstance(ranking, list) or not ranking:
        raise LabelError(400, f"ranking: expected a non-empty list of groups, got {ranking!r}")
    groups: list[list[int]] = []
    seen: set[int] = set()
    for k, group in enumerate(ranking):
        members = group if isinstance(group, list) else [group]
        if not members:
            raise LabelError(400, f"ranking: group {k + 1} is empty")
        for number in members:
            if isinstance(number, bool) or not isinstance(number, int) or not 1 <= number <= n:
                raise LabelError(400, f"ranking: {number!r} is not a response number (1 to {n})")
            if number in seen:
                raise LabelError(400, f"ranking: response {number} appears twice")
            seen.add(number)
        groups.append(list(members))
    missing = sorted(set(range(1, n + 1)) - seen)
    if missing:
        raise LabelError(400, f"ranking: response(s) {missing} not ranked; rank every response")
    return groups


def submit(engine: Engine, labeler_id: int, item_id: int, kind: str, ranking: Any = None) -> None:
    """Store one label in its own transaction. Only the labeler's current item is accepted: an earlier one
    (a replayed submit) or a later one (out of order) is a 409, and a bad ranking a 400; nothing is stored."""
    if kind not in KINDS:
        raise LabelError(400, f"action: expected one of {list(KINDS)}, got {kind!r}")
    try:
        with Session(engine) as s, s.begin():
            item = _current(s, labeler_id)
            if item is None or item.id != item_id:
                where = "all items are labeled" if item is None else f"the current item is {item.id}"
                raise LabelError(409, f"item {item_id} is not your current item ({where}); reload")
            groups = check_ranking(ranking, len(json.loads(item.responses))) if kind == "ranked" else None
            s.add(Label(item_id=item.id, labeler_id=labeler_id, kind=kind,
                        ranking=json.dumps(groups) if groups else None, created_at=now()))  # fmt: skip
    except IntegrityError:  # the unique (item, labeler) constraint: a concurrent duplicate raced the check
        raise LabelError(409, f"item {item_id} is already labeled by this labeler") from None


def labeler_counts(engine: Engine) -> list[dict]:
    """Per labeler: how many items ranked, skipped and flagged (the admin page)."""
    with Session(engine) as s:
        out = []
        for labeler in s.scalars(select(Labeler).order_by(Labeler.name)):
            kinds = s.scalars(select(Label.kind).where(Label.labeler_id == labeler.id)).all()
            out.append({"name": labeler.name, "admin": labeler.is_admin,
                        **{k: kinds.count(k) for k in KINDS}})  # fmt: skip
        return out
