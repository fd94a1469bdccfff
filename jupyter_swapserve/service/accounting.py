"""Quota accounting: the state behind :func:`.quotas.decide` — requests queued or running per
user, admissions in the last minute, tokens used today — and the store that keeps quotas and
usage across restarts.

Admission happens before a request is queued and returns a :class:`QuotaLease`, held until the
response ends; the tokens of the response are recorded on the lease.

Where the live use is counted depends on who shares the database:

- :class:`LocalBooks` (the embedded SQLite default, one service): in the service's memory, as a
  single process counts best; only quotas and usage go to the database.
- :class:`SharedBooks` (PostgreSQL, the services of several GPU nodes): in the database, so that
  every service enforces one budget per user. One transaction per admission reads the user's
  limits and use and writes the request's lease and admission (:mod:`.storage` says why that is
  exact across nodes). While leases are held their expiry is pushed forward every
  ``lease_seconds / 3``; a service that dies stops doing so, and its leases stop counting after
  ``lease_seconds``.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import secrets
import socket
import time
from collections import defaultdict, deque
from collections.abc import Callable, Iterator, Mapping
from dataclasses import dataclass
from typing import Any, Protocol

import sqlalchemy as sa

from .quotas import (
    DEFAULT_USER,
    FIELDS,
    WINDOW_SECONDS,
    Limits,
    Refusal,
    UsageNow,
    counts_minutes,
    counts_tokens,
    decide,
    effective_limits,
    iso,
    model_refusal,
    next_utc_midnight,
    usage_of,
    utc_day,
    validate_row,
    window_reset,
)
from .storage import QuotaStore, StorageError

log = logging.getLogger(__name__)

#: how long a request's lease counts without its service renewing it (shared books)
LEASE_SECONDS = 60.0

Rows = Mapping[str, Mapping[str, Any]]
#: the admission's decision, given the quota rows and a reader of the use its limits need
Judge = Callable[[Rows, Callable[[Limits], UsageNow]], Limits]


class QuotaExceeded(RuntimeError):
    def __init__(self, refusal: Refusal) -> None:
        self.refusal = refusal
        super().__init__(refusal.message)


class QuotaUnavailable(QuotaExceeded, StorageError):
    """The quota database did not answer: the request is refused (503), not let through unlimited;
    an admin's change is not made."""

    def __init__(self, reason: str) -> None:
        super().__init__(Refusal(503, "quota_unavailable", f"The quota database is unavailable ({reason}); "
                                                           "try again shortly.", retry_after=5.0))


@dataclass(frozen=True)
class RefusalRecord:
    """A user's last refused request, kept so that they can see it (the usage report)."""

    at: float
    model: str
    refusal: Refusal

    def as_dict(self) -> dict[str, Any]:
        r = self.refusal
        return {"at": iso(self.at), "model": self.model, "status": r.status, "code": r.code, "message": r.message,
                "param": r.param,
                "retry_at": iso(self.at + r.retry_after) if r.retry_after is not None else None}


def node_name() -> str:
    """A service's name on its leases: host, process, and a nonce (a restarted process is new)."""
    return f"{socket.gethostname()}:{os.getpid()}:{secrets.token_hex(3)}"


@dataclass
class QuotaLease:
    """One admitted request: counted as concurrent until released; its tokens recorded once."""

    accounting: QuotaAccounting
    user: str
    model: str
    limits: Limits
    lease_id: str
    released: bool = False
    recorded: bool = False
    prompt_tokens: int = 0
    completion_tokens: int = 0

    @property
    def priority(self) -> float:
        return self.limits.priority

    def record(self, prompt_tokens: int, completion_tokens: int) -> None:
        if self.recorded:
            return
        self.recorded = True
        self.prompt_tokens, self.completion_tokens = max(0, prompt_tokens), max(0, completion_tokens)
        self.accounting.lease_recorded(self)

    def release(self) -> None:
        if self.released:
            return
        self.released = True
        if not self.recorded:
            self.record(0, 0)  # the request counts even when it produced nothing (refused upstream, cut off)
        self.accounting.lease_released(self)


class Books(Protocol):
    """Where quota rows are read and the live use (concurrency, the minute, today's tokens) is counted."""

    shared: bool

    def quota_rows(self, users: list[str]) -> Rows: ...
    def all_quota_rows(self) -> dict[str, dict[str, Any]]: ...
    def row_changed(self, user: str, row: dict[str, Any] | None) -> None: ...
    def admit(self, user: str, model: str, now: float, judge: Judge) -> tuple[str, Limits]: ...
    def release(self, lease: QuotaLease) -> None: ...
    def recorded(self, lease: QuotaLease, day: str) -> None: ...
    def usage_now(self, user: str, model: str, now: float) -> UsageNow: ...
    def close(self) -> None: ...


class LocalBooks:
    """One service's live use in its memory; quota rows cached (only this service changes them)."""

    shared = False

    def __init__(self, store: QuotaStore, clock: Callable[[], float]) -> None:
        self.store = store
        self._rows = store.quotas()
        self._leases: dict[str, dict[str, int]] = defaultdict(lambda: defaultdict(int))  # user → model → n
        self._recent: dict[str, deque[tuple[str, float]]] = defaultdict(deque)
        self._tokens_day = utc_day(clock())
        self._tokens: dict[str, dict[str, int]] = self._load_tokens(self._tokens_day)

    def _load_tokens(self, day: str) -> dict[str, dict[str, int]]:
        tokens: dict[str, dict[str, int]] = defaultdict(dict)
        for r in self.store.usage(day):
            if r.day == day:
                tokens[r.user][r.model] = r.prompt_tokens + r.completion_tokens
        return tokens

    def _roll_day(self, now: float) -> None:
        day = utc_day(now)
        if day != self._tokens_day:
            self._tokens_day, self._tokens = day, defaultdict(dict)

    def quota_rows(self, users: list[str]) -> Rows:
        return {u: self._rows[u] for u in users if u in self._rows}

    def all_quota_rows(self) -> dict[str, dict[str, Any]]:
        return {user: dict(row) for user, row in self._rows.items()}

    def row_changed(self, user: str, row: dict[str, Any] | None) -> None:
        if row is None:
            self._rows.pop(user, None)
        else:
            self._rows[user] = row

    def usage_now(self, user: str, model: str, now: float) -> UsageNow:
        self._roll_day(now)
        recent = self._recent[user]
        while recent and recent[0][1] <= now - WINDOW_SECONDS:
            recent.popleft()
        return usage_of(model, self._leases.get(user, {}), tuple(recent), self._tokens.get(user, {}), now)

    def admit(self, user: str, model: str, now: float, judge: Judge) -> tuple[str, Limits]:
        limits = judge(self.quota_rows([user, DEFAULT_USER]), lambda _limits: self.usage_now(user, model, now))
        self._leases[user][model] += 1
        self._recent[user].append((model, now))
        return secrets.token_hex(8), limits

    def release(self, lease: QuotaLease) -> None:
        self._leases[lease.user][lease.model] -= 1

    def recorded(self, lease: QuotaLease, day: str) -> None:
        if day != self._tokens_day:
            self._tokens_day, self._tokens = day, defaultdict(dict)
        mine = self._tokens[lease.user]
        mine[lease.model] = mine.get(lease.model, 0) + lease.prompt_tokens + lease.completion_tokens

    def close(self) -> None:
        pass


class SharedBooks:
    """The live use of every service sharing the database, counted in it (see the module's doc)."""

    shared = True

    def __init__(self, store: QuotaStore, clock: Callable[[], float], node: str | None = None,
                 lease_seconds: float = LEASE_SECONDS) -> None:
        self.store = store
        self.clock = clock
        self.node = node or node_name()
        self.lease_seconds = lease_seconds
        self._held: dict[str, QuotaLease | None] = {}
        self._renewal: asyncio.TimerHandle | None = None
        self._prune()

    def quota_rows(self, users: list[str]) -> Rows:
        return self.store.quota_rows_of(users)

    def all_quota_rows(self) -> dict[str, dict[str, Any]]:
        return self.store.quotas()

    def row_changed(self, user: str, row: dict[str, Any] | None) -> None:
        pass  # read from the database at each admission: a change on any node applies at once

    def usage_now(self, user: str, model: str, now: float) -> UsageNow:
        return usage_of(model, self.store.live_leases(user, now),
                        self.store.admissions_since(user, now - WINDOW_SECONDS),
                        self.store.tokens_on(user, utc_day(now)), now)

    def admit(self, user: str, model: str, now: float, judge: Judge) -> tuple[str, Limits]:
        lease_id = secrets.token_hex(16)
        with self.store.user_transaction(user) as tx:
            def use(limits: Limits) -> UsageNow:
                # only what the limits need: a user without a per-minute or daily limit costs no reads of them
                return usage_of(model, tx.live_leases(now),
                                tx.admissions_since(now - WINDOW_SECONDS) if counts_minutes(limits) else (),
                                tx.tokens_on(utc_day(now)) if counts_tokens(limits) else {}, now)

            limits = judge(tx.quota_rows(), use)  # a refusal leaves the transaction: nothing written
            tx.add_lease(lease_id, model, self.node, now + self.lease_seconds)
            tx.add_admission(model, now)
        self._held[lease_id] = None
        self._schedule_renewal()
        return lease_id, limits

    def _schedule_renewal(self) -> None:
        """Renew this service's leases on the running loop while it holds any (none without a loop:
        no request outlives the caller there)."""
        if self._renewal is not None:
            return
        try:
            loop = asyncio.get_running_loop()
        except RuntimeError:
            return
        self._renewal = loop.call_later(self.lease_seconds / 3, self.renew)

    def renew(self) -> None:
        """Push the expiry of every lease this service holds forward; forget what lapsed anywhere."""
        self._renewal = None
        if not self._held:
            return
        try:
            kept = self.store.renew_leases(list(self._held), self.clock() + self.lease_seconds)
            if kept < len(self._held):
                log.warning("quota database: %d of %d leases of this service had lapsed (not renewed in time); "
                            "those requests no longer count as concurrent", len(self._held) - kept, len(self._held))
            self._prune()
        except sa.exc.SQLAlchemyError as exc:
            log.warning("quota database: renewing %d leases failed: %s", len(self._held), str(exc).splitlines()[0])
        self._schedule_renewal()

    def _prune(self) -> None:
        now = self.clock()
        self.store.prune(admitted_before=now - WINDOW_SECONDS, expired_before=now)

    def release(self, lease: QuotaLease) -> None:
        self._held.pop(lease.lease_id, None)
        self.store.release_lease(lease.lease_id)

    def recorded(self, lease: QuotaLease, day: str) -> None:
        pass  # the usage row is the count

    def close(self) -> None:
        if self._renewal is not None:
            self._renewal.cancel()
            self._renewal = None
        if self._held:
            with contextlib.suppress(sa.exc.SQLAlchemyError):
                self.store.drop_leases_of(self.node)  # they would lapse anyway; now is sooner
            self._held.clear()


class QuotaAccounting:
    def __init__(self, store: QuotaStore, clock: Callable[[], float] = time.time, shared: bool | None = None,
                 node: str | None = None, lease_seconds: float = LEASE_SECONDS) -> None:
        """``shared``: count live use in the database (default: when it is PostgreSQL, which
        several services can share)."""
        self.store = store
        self.clock = clock
        if shared is None:
            shared = store.dialect == "postgresql"
        self.books: Books = SharedBooks(store, clock, node, lease_seconds) if shared else LocalBooks(store, clock)
        #: each user's last refused request on this service, in memory: a restart forgets it
        self._last_refusal: dict[str, RefusalRecord] = {}

    @property
    def shared(self) -> bool:
        return self.books.shared

    def close(self) -> None:
        self.books.close()
        self.store.close()

    @contextlib.contextmanager
    def _database(self, what: str) -> Iterator[None]:
        """A database failure: a 503 naming it (QuotaUnavailable), never a 500."""
        try:
            yield
        except sa.exc.SQLAlchemyError as exc:
            log.warning("quota database: %s failed: %s", what, str(exc).splitlines()[0])
            raise QuotaUnavailable(exc.__class__.__name__) from None

    # ---- quotas (admin) --------------------------------------------------------------------
    def rows(self) -> dict[str, dict[str, Any]]:
        with self._database("reading quotas"):
            return self.books.all_quota_rows()

    @staticmethod
    def _shown(user: str, stored: Mapping[str, Any]) -> dict[str, Any]:
        return {"user": user, **{f: stored.get(f) for f in FIELDS}, "models": stored.get("models", {})}

    def row(self, user: str) -> dict[str, Any]:
        with self._database("reading quotas"):
            stored = self.books.quota_rows([user]).get(user, {})
        return self._shown(user, stored)

    def listing(self) -> list[dict[str, Any]]:
        rows = self.rows()
        users = sorted(u for u in rows if u != DEFAULT_USER)
        return [self._shown(DEFAULT_USER, rows.get(DEFAULT_USER, {}))] + [self._shown(u, rows[u]) for u in users]

    def put(self, user: str, body: Any) -> dict[str, Any]:
        """Replace the fields given in ``body`` (others keep their values); validated first. The
        merge is made on the row as stored, locked meanwhile: two admins changing different fields
        at once on two nodes both keep their change."""
        changes = validate_row(body)

        def merged(stored: dict[str, Any]) -> dict[str, Any]:
            row = {**stored, **changes}
            return {k: v for k, v in row.items() if v is not None and v != {}}

        with self._database("changing a quota"):
            row = self.store.update_quota(user, merged, self.clock())
        self.books.row_changed(user, row)
        log.info("quota of %s set: %s", user, row)
        return self._shown(user, row)

    def delete(self, user: str) -> bool:
        with self._database("deleting a quota"):
            deleted = self.store.delete_quota(user)
        self.books.row_changed(user, None)
        return deleted

    def limits(self, user: str, model: str | None = None) -> Limits:
        with self._database("reading quotas"):
            rows = self.books.quota_rows([user, DEFAULT_USER])
        return effective_limits(rows, user, model)

    # ---- admission -------------------------------------------------------------------------
    def check_model(self, user: str, model: str) -> None:
        """Raise :class:`QuotaExceeded` (403 ``model_not_allowed``) when the user's quota excludes
        the model: the admission's first check, for what asks for a model without calling it."""
        refusal = model_refusal(self.limits(user, model), model)
        if refusal is not None:
            raise QuotaExceeded(refusal)

    def tokens_today(self, user: str, model: str | None = None) -> int:
        usage = self.usage_now(user, model or "", self.clock())
        return usage.tokens_today_model if model is not None else usage.tokens_today

    def usage_now(self, user: str, model: str, now: float) -> UsageNow:
        with self._database("reading usage"):
            return self.books.usage_now(user, model, now)

    def admit(self, user: str, model: str, max_tokens: int | None) -> QuotaLease:
        """Count the request in, or raise :class:`QuotaExceeded` (nothing counted)."""
        now = self.clock()

        def judge(rows: Rows, use: Callable[[Limits], UsageNow]) -> Limits:
            limits = effective_limits(rows, user, model)
            refusal = decide(limits, use(limits), model, max_tokens, now)
            if refusal is not None:
                self._last_refusal[user] = RefusalRecord(now, model, refusal)
                raise QuotaExceeded(refusal)
            return limits

        with self._database("admission"):
            lease_id, limits = self.books.admit(user, model, now, judge)
        return QuotaLease(self, user, model, limits, lease_id)

    def lease_released(self, lease: QuotaLease) -> None:
        """Called by the lease itself, once, when its request is over."""
        try:
            self.books.release(lease)
        except sa.exc.SQLAlchemyError:  # a shared lease lapses by itself; the response was already served
            log.exception("could not give back the lease of %s on %s", lease.user, lease.model)

    def lease_recorded(self, lease: QuotaLease) -> None:
        """Called by the lease itself, once, with the tokens its request used."""
        day = utc_day(self.clock())
        self.books.recorded(lease, day)
        try:
            self.store.add_usage(lease.user, lease.model, day, 1, lease.prompt_tokens, lease.completion_tokens)
        except Exception:  # usage must never fail a response that was already served
            log.exception("could not store the usage of %s on %s", lease.user, lease.model)

    # ---- reports ---------------------------------------------------------------------------
    def report(self, user: str, who_asks_is_admin: bool, everyone: bool, days: int) -> dict[str, Any]:
        now = self.clock()
        since = utc_day(now - 86400 * max(0, days - 1))
        with self._database("reading usage"):
            rows = self.store.usage(since, None if everyone else user)
        limits = self.limits(user)
        usage = self.usage_now(user, "", now)
        used_today, recent, concurrent = usage.tokens_today, usage.recent, usage.concurrent
        return {
            "user": user,
            "admin": who_asks_is_admin,
            "day": utc_day(now),
            "usage": [r.as_dict() for r in rows],
            "limits": limits.as_dict(),
            "used": {"tokens_today": used_today, "requests_this_minute": len(recent), "concurrent": concurrent},
            "remaining": {
                "tokens_today": None if limits.tokens_per_day is None else max(0, limits.tokens_per_day - used_today),
                "requests_this_minute": None if limits.requests_per_minute is None
                else max(0, limits.requests_per_minute - len(recent)),
                "concurrent": None if limits.max_concurrent is None
                else max(0, limits.max_concurrent - concurrent),
            },
            "resets": {
                "tokens": iso(next_utc_midnight(now)),
                "requests": iso(window_reset(recent, limits.requests_per_minute or 0, now) if recent else now),
            },
            "day_starts": "00:00 UTC",
            "now": iso(now),  # clients time their refresh against this, not their own clock
            "last_refusal": refusal.as_dict() if (refusal := self._last_refusal.get(user)) else None,
        }
