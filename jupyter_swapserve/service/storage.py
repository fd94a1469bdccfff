"""Where quotas and usage live: SQLAlchemy Core over any database URL (SQLite in WAL mode by
default; a Postgres URL on a multi-node deployment). The schema is versioned and migrated in
order at start-up; each migration runs in one transaction.

The rest of the service sees only :class:`QuotaStore`'s few methods.
"""

from __future__ import annotations

import json
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import sqlalchemy as sa
from sqlalchemy.engine import Connection, Engine

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


def _v1(conn: Connection) -> None:
    for table in (schema_version, quota_rows, usage_rows):
        table.create(conn, checkfirst=True)


def _v2(conn: Connection) -> None:
    # usage is read per day ("today, everyone") far more often than per user
    conn.exec_driver_sql("CREATE INDEX IF NOT EXISTS ix_swapserve_usage_day ON swapserve_usage (day)")


#: migration N brings the schema from version N-1 to N
MIGRATIONS: list[Callable[[Connection], None]] = [_v1, _v2]
SCHEMA_VERSION = len(MIGRATIONS)


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


def _sqlite_pragmas(dbapi_connection: Any, _record: Any) -> None:
    cursor = dbapi_connection.cursor()
    cursor.execute("PRAGMA journal_mode=WAL")  # readers never block the writer
    cursor.execute("PRAGMA synchronous=NORMAL")  # durable at checkpoints; a crash loses no committed row in WAL
    cursor.execute("PRAGMA busy_timeout=5000")
    cursor.close()


class QuotaStore:
    def __init__(self, url: str) -> None:
        self.url = url
        try:
            self.engine: Engine = sa.create_engine(url, future=True)
        except (sa.exc.ArgumentError, ImportError) as exc:
            raise StorageError(f"quota database URL {url!r} cannot be used: {exc}") from None
        if self.engine.dialect.name == "sqlite":
            sa.event.listen(self.engine, "connect", _sqlite_pragmas)
        try:
            self.version = self.migrate()
        except sa.exc.SQLAlchemyError as exc:
            raise StorageError(f"quota database {url!r}: {str(exc).splitlines()[0]}") from None

    def migrate(self) -> int:
        """Bring the schema to :data:`SCHEMA_VERSION`; refuse a database newer than this code."""
        with self.engine.begin() as conn:
            schema_version.create(conn, checkfirst=True)
            current = conn.execute(sa.select(schema_version.c.version)).scalar()
            if current is None:
                conn.execute(schema_version.insert().values(version=0))
                current = 0
        if current > SCHEMA_VERSION:
            raise StorageError(f"the quota database is at schema version {current}, newer than this "
                               f"jupyter-swapserve knows ({SCHEMA_VERSION}); upgrade jupyter-swapserve")
        for version in range(current + 1, SCHEMA_VERSION + 1):
            with self.engine.begin() as conn:
                MIGRATIONS[version - 1](conn)
                conn.execute(schema_version.update().values(version=version))
        return SCHEMA_VERSION

    def close(self) -> None:
        self.engine.dispose()

    # ---- quotas ----------------------------------------------------------------------------
    def quotas(self) -> dict[str, dict[str, Any]]:
        with self.engine.connect() as conn:
            rows = conn.execute(sa.select(quota_rows.c.user_name, quota_rows.c.data)).all()
        return {user: json.loads(data) for user, data in rows}

    def put_quota(self, user: str, row: dict[str, Any], now: float) -> None:
        data = json.dumps(row, sort_keys=True)
        with self.engine.begin() as conn:
            updated = conn.execute(quota_rows.update().where(quota_rows.c.user_name == user)
                                   .values(data=data, updated_at=now)).rowcount
            if not updated:
                conn.execute(quota_rows.insert().values(user_name=user, data=data, updated_at=now))

    def delete_quota(self, user: str) -> bool:
        with self.engine.begin() as conn:
            return bool(conn.execute(quota_rows.delete().where(quota_rows.c.user_name == user)).rowcount)

    # ---- usage -----------------------------------------------------------------------------
    def add_usage(self, user: str, model: str, day: str, requests: int, prompt: int, completion: int) -> None:
        key = (usage_rows.c.user_name == user) & (usage_rows.c.model == model) & (usage_rows.c.day == day)
        with self.engine.begin() as conn:
            updated = conn.execute(usage_rows.update().where(key).values(
                requests=usage_rows.c.requests + requests,
                prompt_tokens=usage_rows.c.prompt_tokens + prompt,
                completion_tokens=usage_rows.c.completion_tokens + completion)).rowcount
            if not updated:
                conn.execute(usage_rows.insert().values(user_name=user, model=model, day=day, requests=requests,
                                                        prompt_tokens=prompt, completion_tokens=completion))

    def usage(self, since_day: str, user: str | None = None) -> list[UsageRow]:
        query = sa.select(usage_rows).where(usage_rows.c.day >= since_day)
        if user is not None:
            query = query.where(usage_rows.c.user_name == user)
        query = query.order_by(usage_rows.c.day.desc(), usage_rows.c.user_name, usage_rows.c.model)
        with self.engine.connect() as conn:
            return [UsageRow(r.user_name, r.model, r.day, r.requests, r.prompt_tokens, r.completion_tokens)
                    for r in conn.execute(query)]
