"""Quota accounting: the state behind :func:`.quotas.decide` — requests queued or running per
user, admissions in the last minute, tokens used today — and the store that keeps quotas and
usage across restarts.

Admission happens before a request is queued and returns a :class:`QuotaLease`, held until the
response ends; the tokens of the response are recorded on the lease.
"""

from __future__ import annotations

import logging
import time
from collections import defaultdict, deque
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from .quotas import (
    DEFAULT_USER,
    FIELDS,
    WINDOW_SECONDS,
    Limits,
    Refusal,
    UsageNow,
    decide,
    effective_limits,
    iso,
    next_utc_midnight,
    utc_day,
    validate_row,
    window_reset,
)
from .storage import QuotaStore

log = logging.getLogger(__name__)


class QuotaExceeded(RuntimeError):
    def __init__(self, refusal: Refusal) -> None:
        self.refusal = refusal
        super().__init__(refusal.message)


@dataclass
class QuotaLease:
    """One admitted request: counted as concurrent until released; its tokens recorded once."""

    accounting: QuotaAccounting
    user: str
    model: str
    limits: Limits
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
        self.accounting._record(self)

    def release(self) -> None:
        if self.released:
            return
        self.released = True
        if not self.recorded:
            self.record(0, 0)  # the request counts even when it produced nothing (refused upstream, cut off)
        self.accounting._release(self)


class QuotaAccounting:
    def __init__(self, store: QuotaStore, clock: Callable[[], float] = time.time) -> None:
        self.store = store
        self.clock = clock
        self._rows = store.quotas()
        self._concurrent: dict[str, int] = defaultdict(int)
        self._concurrent_model: dict[tuple[str, str], int] = defaultdict(int)
        self._recent: dict[str, deque[float]] = defaultdict(deque)
        self._recent_model: dict[tuple[str, str], deque[float]] = defaultdict(deque)
        self._tokens_day = utc_day(clock())
        self._tokens: dict[tuple[str, str], int] = self._load_tokens(self._tokens_day)

    def _load_tokens(self, day: str) -> dict[tuple[str, str], int]:
        return {(r.user, r.model): r.prompt_tokens + r.completion_tokens
                for r in self.store.usage(day) if r.day == day}

    # ---- quotas (admin) --------------------------------------------------------------------
    def rows(self) -> dict[str, dict[str, Any]]:
        return {user: dict(row) for user, row in self._rows.items()}

    def row(self, user: str) -> dict[str, Any]:
        stored = self._rows.get(user, {})
        return {"user": user, **{f: stored.get(f) for f in FIELDS}, "models": stored.get("models", {})}

    def listing(self) -> list[dict[str, Any]]:
        users = sorted(u for u in self._rows if u != DEFAULT_USER)
        return [self.row(DEFAULT_USER)] + [self.row(u) for u in users]

    def put(self, user: str, body: Any) -> dict[str, Any]:
        """Replace the fields given in ``body`` (others keep their values); validated first."""
        changes = validate_row(body)
        row = {**self._rows.get(user, {}), **changes}
        row = {k: v for k, v in row.items() if v is not None and v != {}}
        self.store.put_quota(user, row, self.clock())
        self._rows[user] = row
        log.info("quota of %s set: %s", user, row)
        return self.row(user)

    def delete(self, user: str) -> bool:
        deleted = self.store.delete_quota(user)
        self._rows.pop(user, None)
        return deleted

    def limits(self, user: str, model: str | None = None) -> Limits:
        return effective_limits(self._rows, user, model)

    # ---- admission -------------------------------------------------------------------------
    def _roll_day(self, now: float) -> None:
        day = utc_day(now)
        if day != self._tokens_day:
            self._tokens_day, self._tokens = day, {}

    def _window(self, recent: deque[float], now: float) -> tuple[float, ...]:
        while recent and recent[0] <= now - WINDOW_SECONDS:
            recent.popleft()
        return tuple(recent)

    def tokens_today(self, user: str, model: str | None = None) -> int:
        self._roll_day(self.clock())
        return sum(n for (u, m), n in self._tokens.items() if u == user and (model is None or m == model))

    def usage_now(self, user: str, model: str, now: float) -> UsageNow:
        self._roll_day(now)
        return UsageNow(
            concurrent=self._concurrent[user],
            concurrent_model=self._concurrent_model[(user, model)],
            recent=self._window(self._recent[user], now),
            recent_model=self._window(self._recent_model[(user, model)], now),
            tokens_today=self.tokens_today(user),
            tokens_today_model=self._tokens.get((user, model), 0),
        )

    def admit(self, user: str, model: str, max_tokens: int | None) -> QuotaLease:
        """Count the request in, or raise :class:`QuotaExceeded` (nothing counted)."""
        now = self.clock()
        limits = self.limits(user, model)
        refusal = decide(limits, self.usage_now(user, model, now), model, max_tokens, now)
        if refusal is not None:
            raise QuotaExceeded(refusal)
        self._concurrent[user] += 1
        self._concurrent_model[(user, model)] += 1
        self._recent[user].append(now)
        self._recent_model[(user, model)].append(now)
        return QuotaLease(self, user, model, limits)

    def _release(self, lease: QuotaLease) -> None:
        self._concurrent[lease.user] -= 1
        self._concurrent_model[(lease.user, lease.model)] -= 1

    def _record(self, lease: QuotaLease) -> None:
        now = self.clock()
        self._roll_day(now)
        tokens = lease.prompt_tokens + lease.completion_tokens
        key = (lease.user, lease.model)
        self._tokens[key] = self._tokens.get(key, 0) + tokens
        try:
            self.store.add_usage(lease.user, lease.model, self._tokens_day, 1, lease.prompt_tokens,
                                 lease.completion_tokens)
        except Exception:  # usage must never fail a response that was already served
            log.exception("could not store the usage of %s on %s", lease.user, lease.model)

    # ---- reports ---------------------------------------------------------------------------
    def report(self, user: str, who_asks_is_admin: bool, everyone: bool, days: int) -> dict[str, Any]:
        now = self.clock()
        self._roll_day(now)
        since = utc_day(now - 86400 * max(0, days - 1))
        rows = self.store.usage(since, None if everyone else user)
        limits = self.limits(user)
        used_today = self.tokens_today(user)
        recent = self._window(self._recent[user], now)
        return {
            "user": user,
            "admin": who_asks_is_admin,
            "day": self._tokens_day,
            "usage": [r.as_dict() for r in rows],
            "limits": limits.as_dict(),
            "used": {"tokens_today": used_today, "requests_this_minute": len(recent),
                     "concurrent": self._concurrent[user]},
            "remaining": {
                "tokens_today": None if limits.tokens_per_day is None else max(0, limits.tokens_per_day - used_today),
                "requests_this_minute": None if limits.requests_per_minute is None
                else max(0, limits.requests_per_minute - len(recent)),
                "concurrent": None if limits.max_concurrent is None
                else max(0, limits.max_concurrent - self._concurrent[user]),
            },
            "resets": {
                "tokens": iso(next_utc_midnight(now)),
                "requests": iso(window_reset(recent, limits.requests_per_minute or 0, now) if recent else now),
            },
        }
