"""Quotas and usage shared by several services in one real PostgreSQL (tests/postgres.py starts
it): tokens, requests per minute and concurrent requests add up across "nodes" (each a
QuotaAccounting with its own connection pool, as each node's service has) with no lost update
under concurrent requests; a killed service's leases lapse; migrations run once when services
start at once. The same shared books also run on one SQLite file, locked by BEGIN IMMEDIATE."""

from __future__ import annotations

import asyncio
import os
import signal
import subprocess
import sys
import threading
import time
from collections.abc import Callable, Iterator
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import pytest
import sqlalchemy as sa

from jupyter_swapserve.service.accounting import QuotaAccounting, QuotaExceeded, QuotaUnavailable
from jupyter_swapserve.service.storage import SCHEMA_VERSION, QuotaStore, StorageError

from .postgres import Postgres, postgres_available, run_postgres
from .server import ROOT

pytestmark = pytest.mark.skipif(postgres_available() is not None, reason=str(postgres_available()))

THREADS_PER_NODE = 6


@pytest.fixture(scope="module")
def postgres() -> Iterator[Postgres]:
    with run_postgres() as pg:
        print(f"PostgreSQL {pg.bindir.parent.name} started in {pg.started_seconds:.2f} s")
        yield pg


@pytest.fixture(params=["postgresql", "sqlite"])
def db_url(request: pytest.FixtureRequest, tmp_path: Path) -> str:
    """A fresh shared database: a new PostgreSQL database, or one SQLite file for two services."""
    if request.param == "sqlite":
        return f"sqlite:///{tmp_path / 'shared.sqlite'}"
    return request.getfixturevalue("postgres").new_database()


def nodes(url: str, n: int = 2, **kwargs: object) -> list[QuotaAccounting]:
    """The quota accounting of ``n`` services sharing the database."""
    return [QuotaAccounting(QuotaStore(url), shared=True, **kwargs) for _ in range(n)]  # type: ignore[arg-type]


def at_once(calls: list[Callable[[], object]]) -> list[object]:
    """Run the calls in threads released together; their results (or exceptions), in order."""
    barrier = threading.Barrier(len(calls))

    def run(call: Callable[[], object]) -> object:
        barrier.wait()
        try:
            return call()
        except Exception as exc:
            return exc

    with ThreadPoolExecutor(len(calls)) as pool:
        return list(pool.map(run, calls))


def test_every_token_of_parallel_requests_on_two_services_counts_once(db_url: str) -> None:
    a, b = nodes(db_url)
    cycles = 20

    def requests(node: QuotaAccounting, worker: int) -> Callable[[], int]:
        def run() -> int:
            spent = 0
            for i in range(cycles):
                lease = node.admit("alice", f"m{i % 2}", None)
                prompt, completion = worker + 1, i + 1
                lease.record(prompt, completion)
                lease.release()
                spent += prompt + completion
            return spent
        return run

    results = at_once([requests(node, w) for node in (a, b) for w in range(THREADS_PER_NODE)])
    assert all(isinstance(r, int) for r in results), results
    expected = sum(results)  # type: ignore[arg-type]
    for node in (a, b):  # each service sees the other's tokens: one budget
        assert node.tokens_today("alice") == expected
        report = node.report("alice", who_asks_is_admin=False, everyone=False, days=1)
        assert sum(r["requests"] for r in report["usage"]) == 2 * THREADS_PER_NODE * cycles
        assert sum(r["total_tokens"] for r in report["usage"]) == expected
        assert report["used"]["concurrent"] == 0
    for node in (a, b):
        node.close()


def test_concurrency_and_the_minute_hold_across_services(db_url: str) -> None:
    a, b = nodes(db_url)
    a.put("*", {"max_concurrent": 3})
    outcome = at_once([lambda n=node: n.admit("bob", "m", None) for node in (a, b) for _ in range(THREADS_PER_NODE)])
    admitted = [o for o in outcome if not isinstance(o, Exception)]
    refused = [o for o in outcome if isinstance(o, QuotaExceeded)]
    assert len(admitted) == 3 and len(refused) == 2 * THREADS_PER_NODE - 3, outcome
    assert {r.refusal.code for r in refused} == {"rate_limit_exceeded"}
    assert b.report("bob", False, False, 1)["used"]["concurrent"] == 3
    admitted[0].release()  # type: ignore[union-attr]
    b.admit("bob", "m", None)  # one freed on one node: the other admits one
    with pytest.raises(QuotaExceeded):
        a.admit("bob", "m", None)
    a.admit("carol", "m", None)  # bob's limit is his own

    b.put("*", {"max_concurrent": None, "requests_per_minute": 5})  # set on b, applies on a at once
    outcome = at_once([lambda n=node: n.admit("dave", "m", None) for node in (a, b) for _ in range(THREADS_PER_NODE)])
    admitted = [o for o in outcome if not isinstance(o, Exception)]
    assert len(admitted) == 5, outcome
    refusal = next(o for o in outcome if isinstance(o, QuotaExceeded)).refusal
    assert "per minute" in refusal.message and refusal.retry_after is not None and refusal.retry_after > 0
    for node in (a, b):
        node.close()


def test_the_daily_budget_is_one_across_services(db_url: str) -> None:
    a, b = nodes(db_url)
    a.put("erin", {"tokens_per_day": 100})
    lease = a.admit("erin", "gemma", None)
    lease.record(20, 40)
    lease.release()
    lease = b.admit("erin", "smollm2", None)  # 60 used of 100: b admits
    lease.record(10, 35)
    lease.release()
    for node in (a, b):
        with pytest.raises(QuotaExceeded) as err:
            node.admit("erin", "gemma", None)
        assert err.value.refusal.code == "insufficient_quota" and "105 of 100" in err.value.refusal.message
    for node in (a, b):
        node.close()


def test_admins_changing_one_user_on_two_services_keep_both_changes(db_url: str) -> None:
    a, b = nodes(db_url)
    calls: list[Callable[[], object]] = []
    for i in range(THREADS_PER_NODE):
        calls.append(lambda i=i: a.put("frank", {"tokens_per_day": 1000 + i}))
        calls.append(lambda i=i: b.put("frank", {"models": {f"m{i}": {"priority": 2}}}))
    assert not [r for r in at_once(calls) if isinstance(r, Exception)]
    row = a.row("frank")
    assert 1000 <= row["tokens_per_day"] < 1000 + THREADS_PER_NODE
    # every model entry survived: each put merged into the row as stored, not into a stale copy
    assert len(row["models"]) >= 1 and b.row("frank") == row
    for node in (a, b):
        node.close()


def test_migrations_run_once_when_services_start_at_once(postgres: Postgres) -> None:
    url = postgres.new_database()
    stores = at_once([lambda: QuotaStore(url) for _ in range(8)])
    assert all(isinstance(s, QuotaStore) and s.version == SCHEMA_VERSION for s in stores), stores
    with stores[0].engine.connect() as conn:  # type: ignore[union-attr]
        versions = conn.exec_driver_sql("SELECT version FROM swapserve_schema_version").scalars().all()
        tables = set(conn.execute(sa.text("SELECT tablename FROM pg_tables WHERE tablename LIKE 'swapserve%'"))
                     .scalars())
    assert versions == [SCHEMA_VERSION]
    assert tables == {"swapserve_schema_version", "swapserve_quotas", "swapserve_usage", "swapserve_admissions",
                      "swapserve_leases"}
    for s in stores:
        s.close()  # type: ignore[union-attr]


KILLED_SERVICE = """
import sys, time
from jupyter_swapserve.service.accounting import QuotaAccounting
from jupyter_swapserve.service.storage import QuotaStore
acc = QuotaAccounting(QuotaStore(sys.argv[1]), shared=True, lease_seconds=float(sys.argv[2]))
acc.admit("gina", "m", None)
print("admitted", flush=True)
time.sleep(600)
"""


def test_a_killed_services_leases_lapse(postgres: Postgres) -> None:
    url = postgres.new_database()
    (survivor,) = nodes(url, 1)
    survivor.put("*", {"max_concurrent": 1})
    lease_seconds = 3.0
    proc = subprocess.Popen([sys.executable, "-c", KILLED_SERVICE, url, str(lease_seconds)], stdout=subprocess.PIPE,
                            text=True, cwd=ROOT)
    try:
        assert proc.stdout is not None and proc.stdout.readline().strip() == "admitted"
        killed_at = time.time()
        os.kill(proc.pid, signal.SIGKILL)  # no clean-up: its lease stays in the database
        proc.wait()
        with pytest.raises(QuotaExceeded):
            survivor.admit("gina", "m", None)  # the dead service's request still counts...
        deadline = time.monotonic() + 30
        while True:  # ...until its lease lapses
            try:
                survivor.admit("gina", "m", None)
                break
            except QuotaExceeded:
                assert time.monotonic() < deadline, "the killed service's lease never lapsed"
                time.sleep(0.2)
        assert time.time() - killed_at >= lease_seconds - 0.5
    finally:
        if proc.poll() is None:
            proc.kill()
        survivor.close()


async def test_a_long_request_keeps_its_lease(postgres: Postgres) -> None:
    url = postgres.new_database()
    a, b = nodes(url, lease_seconds=1.5)
    a.put("*", {"max_concurrent": 1})
    lease = a.admit("hana", "m", None)  # on a running loop: a renews it every 0.5 s
    await asyncio.sleep(4.0)  # well past the lease's first expiry
    with pytest.raises(QuotaExceeded):
        b.admit("hana", "m", None)
    lease.release()
    b.admit("hana", "m", None).release()
    a.close()  # a gives back what it holds
    b.close()


def test_a_database_that_goes_away_refuses_with_503_never_unlimited(postgres: Postgres) -> None:
    url = postgres.new_database()
    (node,) = nodes(url, 1)
    lease = node.admit("ivan", "m", None)
    engine = sa.create_engine(postgres.url(), isolation_level="AUTOCOMMIT")
    with engine.connect() as conn:
        conn.exec_driver_sql(f'DROP DATABASE "{sa.engine.make_url(url).database}" WITH (FORCE)')
    engine.dispose()
    with pytest.raises(QuotaUnavailable) as err:
        node.admit("ivan", "m", None)
    assert err.value.refusal.status == 503 and err.value.refusal.retry_after
    lease.record(1, 1)  # usage that cannot be stored is logged; the served response is not failed
    lease.release()
    with pytest.raises(StorageError):
        node.put("ivan", {"tokens_per_day": 1})
    node.close()


def test_strangers_cannot_use_the_database_and_logs_hide_the_password(postgres: Postgres) -> None:
    url = postgres.new_database()
    with pytest.raises(StorageError) as err:
        QuotaStore(url.replace(postgres.password, "not-the-password"))
    assert "password" in str(err.value) and postgres.password not in str(err.value)
    store = QuotaStore(url)
    assert postgres.password not in store.safe_url and "***" in store.safe_url
    store.close()
    with pytest.raises(StorageError, match="not supported") as err:
        QuotaStore("mysql+pymysql://u:secret-word@127.0.0.1/x")
    assert "secret-word" not in str(err.value)
