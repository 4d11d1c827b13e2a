"""Connecting to a store: the URL, the engine's settings per database, and the schema brought up to date.

* **URL.** A path (`results.db`) or `sqlite:///…` is an embedded SQLite file; `postgresql://…` (or
  `postgres://`) is a PostgreSQL server, reached through psycopg 3 (`postgresql+psycopg://`). Anything else,
  a server that does not answer, a file that is not a database: one `UserInputError` line naming the store
  (its password hidden), before anything is written.
* **SQLite** runs in WAL mode with `synchronous=FULL` (a committed record survives a kill -9 and a power
  cut) and a busy timeout, so several processes (`serve` and `predict`, two workers) write the same file.
  Python's sqlite3 module would start transactions lazily and run DDL outside them; here every
  transaction is `BEGIN IMMEDIATE`, so two processes migrating a new file at once take turns.
* **Schema.** Alembic migrations shipped in `migrations/versions/` run on open. A store whose version this
  code does not know (a newer anomalyvfm migrated it) is refused in one line and left as it is; so is a
  database holding other tables and no store.
"""
from __future__ import annotations

from pathlib import Path

import sqlalchemy as sa
from alembic import command
from alembic.config import Config
from alembic.runtime.migration import MigrationContext
from alembic.script import ScriptDirectory
from sqlalchemy.engine import Engine, make_url

from anomalyvfm.errors import UserInputError
from anomalyvfm.store.schema import SCHEMA_VERSION

MIGRATIONS = Path(__file__).resolve().parent / "migrations"
BUSY_TIMEOUT_MS = 10_000  # a writer waits this long for another process's transaction before failing (then spills)
CONNECT_TIMEOUT_S = 5  # PostgreSQL: an unreachable server is reported (or spilled to) after this long
SCHEMES = {"postgresql": "postgresql+psycopg", "postgres": "postgresql+psycopg", "postgresql+psycopg": "postgresql+psycopg",
           "sqlite": "sqlite"}


def shown(url: str) -> str:
    """The URL as messages name it: the password hidden."""
    try:
        return make_url(url).render_as_string(hide_password=True) if "://" in url else url
    except Exception:  # noqa: BLE001 — not a URL at all: shown as given
        return url


def engine_url(url: str) -> sa.URL:
    """The SQLAlchemy URL of a store URL or path; `UserInputError` for a scheme that is not supported."""
    if "://" not in url:
        return sa.URL.create("sqlite", database=str(Path(url).expanduser()))
    try:
        parsed = make_url(url)
    except Exception as exc:  # noqa: BLE001 — SQLAlchemy's ArgumentError and friends
        raise UserInputError(f"--store {shown(url)}: not a database URL ({exc})") from None
    driver = SCHEMES.get(parsed.drivername)
    if driver is None:
        raise UserInputError(f"--store {shown(url)}: unsupported database '{parsed.drivername}' "
                             "(use a SQLite file path or a postgresql:// URL)")
    if driver == "sqlite" and not parsed.database:
        raise UserInputError(f"--store {shown(url)}: name the SQLite file (sqlite:///path/to/results.db)")
    return parsed.set(drivername=driver)


def create_engine(url: str) -> Engine:
    """An engine for the store at `url`, with the per-database settings of the module doc."""
    target = engine_url(url)
    if target.drivername == "sqlite":
        path = Path(target.database or "")
        if not path.parent.is_dir():
            raise UserInputError(f"--store {url}: folder {path.parent} does not exist")
        engine = sa.create_engine(target, connect_args={"timeout": BUSY_TIMEOUT_MS / 1000})
        sa.event.listen(engine, "connect", _sqlite_settings)
        sa.event.listen(engine, "begin", lambda connection: connection.exec_driver_sql("BEGIN IMMEDIATE"))
        return engine
    return sa.create_engine(target, pool_pre_ping=True, pool_size=4,
                            connect_args={"connect_timeout": CONNECT_TIMEOUT_S, "application_name": "anomalyvfm"})


def _sqlite_settings(connection, _record) -> None:
    connection.isolation_level = None  # sqlite3 begins no transactions of its own: the "begin" event does
    cursor = connection.cursor()
    for pragma in ("journal_mode=WAL", "synchronous=FULL", f"busy_timeout={BUSY_TIMEOUT_MS}"):
        cursor.execute(f"PRAGMA {pragma}")
    cursor.close()


def migrate(engine: Engine, url: str, create: bool = True) -> str:
    """Bring the store's schema up to `SCHEMA_VERSION` (creating it on a new store unless not `create`);
    return the version. Refuses, changing nothing, a store of a version this code does not know and a
    database with other tables (or none, when not `create`: a command that only reads a store)."""
    script = ScriptDirectory(str(MIGRATIONS))
    with engine.begin() as connection:
        if connection.dialect.name == "postgresql":  # one migrating process at a time (SQLite: BEGIN IMMEDIATE)
            connection.exec_driver_sql("SELECT pg_advisory_xact_lock(7202305)")
        current = MigrationContext.configure(connection).get_current_revision()
        if current is None:
            tables = sorted(sa.inspect(connection).get_table_names())
            if tables:
                raise UserInputError(f"--store {shown(url)}: a database that is not an inspection store "
                                     f"(it has tables {', '.join(tables[:5])}); use a new file or database")
            if not create:
                raise UserInputError(f"--store {shown(url)}: no inspection store there yet (serve or predict "
                                     "with --store creates one)")
        elif current not in {rev.revision for rev in script.walk_revisions()}:
            raise UserInputError(f"--store {shown(url)}: schema version {current} is newer than this anomalyvfm "
                                 f"knows (up to {SCHEMA_VERSION}); upgrade: pip install -U anomalyvfm")
        if current != SCHEMA_VERSION:
            _upgrade(connection)
    return SCHEMA_VERSION


def _upgrade(connection: sa.Connection) -> None:
    config = Config()
    config.set_main_option("script_location", str(MIGRATIONS))
    config.attributes["connection"] = connection  # migrations/env.py runs on it
    command.upgrade(config, SCHEMA_VERSION)


def connect(url: str, create: bool = True) -> Engine:
    """A migrated store's engine; every connection problem is one `UserInputError` line naming the store."""
    target = engine_url(url)
    if not create and target.drivername == "sqlite" and not Path(target.database or "").is_file():
        raise UserInputError(f"--store {url}: no such file")
    engine = create_engine(url)
    try:
        migrate(engine, url, create)
    except UserInputError:
        engine.dispose()
        raise
    except sa.exc.SQLAlchemyError as exc:
        engine.dispose()
        raise UserInputError(f"--store {shown(url)}: cannot open the store ({reason(exc)})") from None
    return engine


def reason(exc: BaseException) -> str:
    """The first line of a database error's own message, without SQLAlchemy's wrapping and links."""
    inner = getattr(exc, "orig", None) or exc
    text = str(inner).strip().splitlines()
    return text[0][:200] if text else type(inner).__name__
