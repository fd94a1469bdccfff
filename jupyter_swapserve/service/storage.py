"""Where quotas and usage live: SQLAlchemy Core over SQLite (WAL, the embedded default) or
PostgreSQL (one database shared by the services of several GPU nodes). The schema is versioned
and migrated in order at start-up, each migration in one transaction under a lock, so services
starting at once migrate it once.

What several services share, and how it stays exact when they write at the same time:

- **tokens and requests per day** (``swapserve_usage``): added with one upsert per response
  (``INSERT … ON CONFLICT DO UPDATE SET n = n + excluded.n``), never read-modify-write.
- **requests per minute** (``swapserve_admissions``, one row per admission, pruned after the
  window) and **concurrent requests** (``swapserve_leases``, one row per request being served,
  with an expiry its service keeps pushing forward while the request runs: a killed service's
  leases lapse by themselves).
- **admission** reads those and writes its own rows in one transaction, serialized per user: a
  transaction-scoped advisory lock on the user's key in PostgreSQL, ``BEGIN IMMEDIATE`` (the
  database's write lock) in SQLite. Two services admitting the same user at once see each other.
- **quota rows** are changed under a row lock (``SELECT … FOR UPDATE``), so two admins changing
  different fields of one user on two nodes both keep their change.

The rest of the service sees only :class:`QuotaStore`'s methods and :class:`UserTransaction`.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass
from typing import Any

import sqlalchemy as sa
from sqlalchemy.dialects import postgresql, sqlite
from sqlalchemy.engine import Connection, Engine

from .quotas import DEFAULT_USER

metadata = sa.MetaData()

schema_version = sa.Table("swapserve_schema_version", metadata, sa.Column("version", sa.Integer, nullable=False))

quota_rows = sa.Table(
    "swapserve_quotas", metadata,
    sa.Column("user_name", sa.String(255), primary_key=True),
    sa.Column("data", sa.Text, nullable=False),  # the validated row as JSON: fields change without migrations
    sa.Column("updated_at", sa.Float, nullable=False, server_default="0"),
)

usage_rows = sa.Table(
    "swapserve_usage", metadata,
    sa.Column("user_name", sa.String(255), primary_key=True),
    sa.Column("model", sa.String(255), primary_key=True),
    sa.Column("day", sa.String(10), primary_key=True),  # UTC, YYYY-MM-DD
    sa.Column("requests", sa.Integer, nullable=False, default=0),
    sa.Column("prompt_tokens", sa.Integer, nullable=False, default=0),
    sa.Column("completion_tokens", sa.Integer, nullable=False, default=0),
)

admission_rows = sa.Table(
    "swapserve_admissions", metadata,
    sa.Column("id", sa.Integer, primary_key=True, autoincrement=True),
    sa.Column("user_name", sa.String(255), nullable=False),
    sa.Column("model", sa.String(255), nullable=False),
    sa.Column("at", sa.Float, nullable=False),  # epoch seconds
    sa.Index("ix_swapserve_admissions_user_at", "user_name", "at"),
)

lease_rows = sa.Table(
    "swapserve_leases", metadata,
    sa.Column("id", sa.String(64), primary_key=True),
    sa.Column("user_name", sa.String(255), nullable=False),
    sa.Column("model", sa.String(255), nullable=False),
    sa.Column("node", sa.String(255), nullable=False),  # the service holding it
    sa.Column("expires_at", sa.Float, nullable=False),
    sa.Index("ix_swapserve_leases_user", "user_name"),
    sa.Index("ix_swapserve_leases_node", "node"),
)


def _v1(conn: Connection) -> None:
    for table in (schema_version, quota_rows, usage_rows):
        table.create(conn, checkfirst=True)


def _v2(conn: Connection) -> None:
    # usage is read per day ("today, everyone") far more often than per user
    conn.exec_driver_sql("CREATE INDEX IF NOT EXISTS ix_swapserve_usage_day ON swapserve_usage (day)")


def _v3(conn: Connection) -> None:
    # the per-minute window and the concurrent requests move from one service's memory to the
    # database, where every node's service counts them
    for table in (admission_rows, lease_rows):
        table.create(conn, checkfirst=True)


#: migration N brings the schema from version N-1 to N
MIGRATIONS: list[Callable[[Connection], None]] = [_v1, _v2, _v3]
SCHEMA_VERSION = len(MIGRATIONS)
#: the databases whose upserts and locks this module speaks
DIALECTS = ("sqlite", "postgresql")
#: the advisory lock held by the one service that migrates (PostgreSQL); any fixed 64-bit key
MIGRATION_LOCK_KEY = 0x5357415053525600


class StorageError(RuntimeError):
    pass


@dataclass(frozen=True)
class UsageRow:
    user: str
    model: str
    day: str
    requests: int
    prompt_tokens: int
    completion_tokens: int

    def as_dict(self) -> dict[str, Any]:
        return {"user": self.user, "model": self.model, "day": self.day, "requests": self.requests,
                "prompt_tokens": self.prompt_tokens, "completion_tokens": self.completion_tokens,
                "total_tokens": self.prompt_tokens + self.completion_tokens}


def user_lock_key(user: str) -> int:
    """A signed 64-bit key per user for PostgreSQL's advisory locks (a collision only makes two
    users' admissions wait for each other, never lets one through)."""
    return int.from_bytes(hashlib.blake2b(f"swapserve-user:{user}".encode(), digest_size=8).digest(), "big",
                          signed=True)


def _sqlite_connect(dbapi_connection: Any, _record: Any) -> None:
    # the driver must not open transactions on its own: _sqlite_begin says how each one begins
    dbapi_connection.isolation_level = None
    cursor = dbapi_connection.cursor()
    cursor.execute("PRAGMA journal_mode=WAL")  # readers never block the writer
    cursor.execute("PRAGMA synchronous=NORMAL")  # durable at checkpoints; a crash loses no committed row in WAL
    cursor.execute("PRAGMA busy_timeout=5000")
    cursor.close()


def _sqlite_begin(conn: Connection) -> None:
    # a writing transaction takes the database's write lock at its start, so what it reads cannot
    # change before it writes (two processes on one file admit one after the other)
    conn.exec_driver_sql("BEGIN IMMEDIATE" if conn.get_execution_options().get("swapserve_write") else "BEGIN")


# the statements of the admission path, built once (bound per call)
_USER, _NOW, _SINCE, _DAY = (sa.bindparam(n) for n in ("user", "now", "since", "day"))
_LIVE_LEASES = (sa.select(lease_rows.c.model, sa.func.count()).where((lease_rows.c.user_name == _USER)
                & (lease_rows.c.expires_at > _NOW)).group_by(lease_rows.c.model))
_ADMISSIONS = (sa.select(admission_rows.c.model, admission_rows.c.at).where(
    (admission_rows.c.user_name == _USER) & (admission_rows.c.at > _SINCE)).order_by(admission_rows.c.at))
_QUOTA_ROWS = sa.select(quota_rows.c.user_name, quota_rows.c.data).where(
    quota_rows.c.user_name.in_(sa.bindparam("users", expanding=True)))
_ADD_LEASE = lease_rows.insert()
_ADD_ADMISSION = admission_rows.insert()
_LOCK = sa.select(sa.func.pg_advisory_xact_lock(sa.bindparam("key", type_=sa.BigInteger)))
_TOKENS = (sa.select(usage_rows.c.model, sa.func.sum(usage_rows.c.prompt_tokens + usage_rows.c.completion_tokens))
           .where((usage_rows.c.user_name == _USER) & (usage_rows.c.day == _DAY)).group_by(usage_rows.c.model))


class UserTransaction:
    """One user's admission, atomic: every read sees the other services' admissions committed
    before it began, and no admission of the same user commits in between."""

    def __init__(self, conn: Connection, user: str) -> None:
        self.conn = conn
        self.user = user

    def quota_rows(self) -> dict[str, dict[str, Any]]:
        """The user's row and the default row ``*`` (what their limits are made of)."""
        return _quota_rows(self.conn, {self.user, DEFAULT_USER})

    def live_leases(self, now: float) -> dict[str, int]:
        """The user's requests being served now, on any node, per model (lapsed leases do not count)."""
        return _live_leases(self.conn, self.user, now)

    def admissions_since(self, since: float) -> list[tuple[str, float]]:
        """(model, time) of the user's admissions after ``since``, oldest first."""
        return _admissions_since(self.conn, self.user, since)

    def tokens_on(self, day: str) -> dict[str, int]:
        return _tokens_on(self.conn, self.user, day)

    def add_lease(self, lease_id: str, model: str, node: str, expires_at: float) -> None:
        self.conn.execute(_ADD_LEASE, {"id": lease_id, "user_name": self.user, "model": model, "node": node,
                                                "expires_at": expires_at})

    def add_admission(self, model: str, at: float) -> None:
        self.conn.execute(_ADD_ADMISSION, {"user_name": self.user, "model": model, "at": at})


def _quota_rows(conn: Connection, users: Iterable[str]) -> dict[str, dict[str, Any]]:
    return {user: json.loads(data) for user, data in conn.execute(_QUOTA_ROWS, {"users": sorted(set(users))})}


def _live_leases(conn: Connection, user: str, now: float) -> dict[str, int]:
    return {model: int(n) for model, n in conn.execute(_LIVE_LEASES, {"user": user, "now": now})}


def _admissions_since(conn: Connection, user: str, since: float) -> list[tuple[str, float]]:
    return [(model, at) for model, at in conn.execute(_ADMISSIONS, {"user": user, "since": since})]


def _tokens_on(conn: Connection, user: str, day: str) -> dict[str, int]:
    return {model: int(n or 0) for model, n in conn.execute(_TOKENS, {"user": user, "day": day})}


class QuotaStore:
    def __init__(self, url: str) -> None:
        self.url = url
        try:
            parsed = sa.engine.make_url(url)
        except sa.exc.ArgumentError:
            raise StorageError(f"quota database URL {url.split('@')[-1]!r} is not an SQLAlchemy URL "
                               "(e.g. postgresql+psycopg://user:password@host/db)") from None
        shown = parsed.render_as_string(hide_password=True)
        if parsed.get_backend_name() not in DIALECTS:
            raise StorageError(f"quota database URL {shown!r}: {parsed.get_backend_name()} is not supported "
                               f"(supported: {', '.join(DIALECTS)}; e.g. postgresql+psycopg://user:password@host/db)")
        try:
            # a server's connections can drop (restart, failover): test each one as it is taken
            self.engine: Engine = sa.create_engine(parsed, pool_pre_ping=parsed.get_backend_name() != "sqlite")
        except (sa.exc.ArgumentError, ImportError) as exc:
            raise StorageError(f"quota database URL {shown!r} cannot be used: {exc} (for PostgreSQL: "
                               "pip install 'jupyter-swapserve[postgres]')") from None
        self.dialect = self.engine.dialect.name
        if self.dialect == "sqlite":
            sa.event.listen(self.engine, "connect", _sqlite_connect)
            sa.event.listen(self.engine, "begin", _sqlite_begin)
        self._writer = self.engine.execution_options(swapserve_write=True)
        insert = self._insert()(usage_rows)
        self._add_usage = insert.on_conflict_do_update(
            index_elements=[usage_rows.c.user_name, usage_rows.c.model, usage_rows.c.day],
            set_={"requests": usage_rows.c.requests + insert.excluded.requests,
                  "prompt_tokens": usage_rows.c.prompt_tokens + insert.excluded.prompt_tokens,
                  "completion_tokens": usage_rows.c.completion_tokens + insert.excluded.completion_tokens})
        try:
            self.version = self.migrate()
        except sa.exc.SQLAlchemyError as exc:
            self.engine.dispose()
            raise StorageError(f"quota database {self.safe_url}: {str(exc).splitlines()[0]}") from None

    @property
    def safe_url(self) -> str:
        """The URL with its password hidden (for logs and errors)."""
        return self.engine.url.render_as_string(hide_password=True)

    @contextlib.contextmanager
    def _write(self) -> Iterator[Connection]:
        with self._writer.begin() as conn:
            yield conn

    def _lock(self, conn: Connection, key: int) -> None:
        """Hold ``key`` until the transaction ends (SQLite: its BEGIN IMMEDIATE already locks)."""
        if self.dialect == "postgresql":
            conn.execute(_LOCK, {"key": key})

    def _insert(self) -> Callable[..., Any]:
        return postgresql.insert if self.dialect == "postgresql" else sqlite.insert

    def migrate(self) -> int:
        """Bring the schema to :data:`SCHEMA_VERSION`, one migration per transaction, under a lock
        that services starting at once take in turn; refuse a database newer than this code."""
        while True:
            with self._write() as conn:
                self._lock(conn, MIGRATION_LOCK_KEY)
                schema_version.create(conn, checkfirst=True)
                current = conn.execute(sa.select(schema_version.c.version)).scalar()
                if current is None:
                    conn.execute(schema_version.insert().values(version=0))
                    current = 0
                if current > SCHEMA_VERSION:
                    raise StorageError(f"the quota database is at schema version {current}, newer than this "
                                       f"jupyter-swapserve knows ({SCHEMA_VERSION}); upgrade jupyter-swapserve")
                if current == SCHEMA_VERSION:
                    return current
                MIGRATIONS[current](conn)
                conn.execute(schema_version.update().values(version=current + 1))

    def close(self) -> None:
        self.engine.dispose()

    # ---- quotas ----------------------------------------------------------------------------
    def quotas(self) -> dict[str, dict[str, Any]]:
        with self.engine.connect() as conn:
            rows = conn.execute(sa.select(quota_rows.c.user_name, quota_rows.c.data)).all()
        return {user: json.loads(data) for user, data in rows}

    def quota_rows_of(self, users: Iterable[str]) -> dict[str, dict[str, Any]]:
        with self.engine.connect() as conn:
            return _quota_rows(conn, users)

    def update_quota(self, user: str, change: Callable[[dict[str, Any]], dict[str, Any]], now: float,
                     ) -> dict[str, Any]:
        """Replace the user's row by ``change(stored row)``, the row locked meanwhile; returns it."""
        with self._write() as conn:
            conn.execute(self._insert()(quota_rows).values(user_name=user, data="{}", updated_at=now)
                         .on_conflict_do_nothing(index_elements=[quota_rows.c.user_name]))
            query = sa.select(quota_rows.c.data).where(quota_rows.c.user_name == user)
            if self.dialect == "postgresql":
                query = query.with_for_update()
            row = change(json.loads(conn.execute(query).scalar_one()))
            conn.execute(quota_rows.update().where(quota_rows.c.user_name == user)
                         .values(data=json.dumps(row, sort_keys=True), updated_at=now))
        return row

    def put_quota(self, user: str, row: dict[str, Any], now: float) -> None:
        self.update_quota(user, lambda _stored: row, now)

    def delete_quota(self, user: str) -> bool:
        with self._write() as conn:
            return bool(conn.execute(quota_rows.delete().where(quota_rows.c.user_name == user)).rowcount)

    # ---- admission ---------------------------------------------------------------------------
    @contextlib.contextmanager
    def user_transaction(self, user: str) -> Iterator[UserTransaction]:
        """A transaction in which no other admission of ``user`` (on any service) commits."""
        with self._write() as conn:
            self._lock(conn, user_lock_key(user))
            yield UserTransaction(conn, user)

    def release_lease(self, lease_id: str) -> None:
        with self._write() as conn:
            conn.execute(lease_rows.delete().where(lease_rows.c.id == lease_id))

    def renew_leases(self, lease_ids: Iterable[str], expires_at: float) -> int:
        """Push the expiry of these leases forward; how many were still there."""
        ids = list(lease_ids)
        if not ids:
            return 0
        with self._write() as conn:
            return int(conn.execute(lease_rows.update().where(lease_rows.c.id.in_(ids))
                                    .values(expires_at=expires_at)).rowcount)

    def drop_leases_of(self, node: str) -> int:
        with self._write() as conn:
            return int(conn.execute(lease_rows.delete().where(lease_rows.c.node == node)).rowcount)

    def live_leases(self, user: str, now: float) -> dict[str, int]:
        with self.engine.connect() as conn:
            return _live_leases(conn, user, now)

    def admissions_since(self, user: str, since: float) -> list[tuple[str, float]]:
        with self.engine.connect() as conn:
            return _admissions_since(conn, user, since)

    def prune(self, admitted_before: float, expired_before: float) -> None:
        """Forget admissions older than the window and leases that lapsed (nobody counts them)."""
        with self._write() as conn:
            conn.execute(admission_rows.delete().where(admission_rows.c.at <= admitted_before))
            conn.execute(lease_rows.delete().where(lease_rows.c.expires_at <= expired_before))

    # ---- usage -----------------------------------------------------------------------------
    def add_usage(self, user: str, model: str, day: str, requests: int, prompt: int, completion: int) -> None:
        """Add to the day's counters in one statement: concurrent writers on any node all count."""
        with self._write() as conn:
            conn.execute(self._add_usage, {"user_name": user, "model": model, "day": day, "requests": requests,
                                           "prompt_tokens": prompt, "completion_tokens": completion})

    def tokens_on(self, user: str, day: str) -> dict[str, int]:
        """The user's tokens per model on ``day``, counted on every node."""
        with self.engine.connect() as conn:
            return _tokens_on(conn, user, day)

    def usage(self, since_day: str, user: str | None = None) -> list[UsageRow]:
        query = sa.select(usage_rows).where(usage_rows.c.day >= since_day)
        if user is not None:
            query = query.where(usage_rows.c.user_name == user)
        query = query.order_by(usage_rows.c.day.desc(), usage_rows.c.user_name, usage_rows.c.model)
        with self.engine.connect() as conn:
            return [UsageRow(r.user_name, r.model, r.day, r.requests, r.prompt_tokens, r.completion_tokens)
                    for r in conn.execute(query)]
