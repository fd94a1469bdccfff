"""What quota accounting costs per request: admit → record the tokens → release, on the embedded
SQLite (one service, counts in memory) and on a real PostgreSQL shared by several services (counts
in the database, one transaction per admission). Also the throughput of two "nodes" admitting at
once, each with its own connection pool, and that every token was counted once.

    python bench/quota_admission.py [--cycles 400] [--out bench/results/DATE-cpu-quota_admission.md]

PostgreSQL is started as tests/postgres.py does (Debian's binaries, a temporary directory).
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
import tempfile
import threading
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from jupyter_swapserve.service.accounting import QuotaAccounting
from jupyter_swapserve.service.storage import QuotaStore
from tests.postgres import run_postgres

LIMITS = {"max_concurrent": 1000, "requests_per_minute": 10**6, "tokens_per_day": 10**12}


def cycles(acc: QuotaAccounting, n: int, user: str) -> list[float]:
    """Milliseconds of each admit + record + release."""
    times = []
    for i in range(n):
        t = time.perf_counter()
        lease = acc.admit(user, f"m{i % 3}", None)
        lease.record(10, 20)
        lease.release()
        times.append((time.perf_counter() - t) * 1e3)
    return times


def p(values: list[float], q: float) -> float:
    return statistics.quantiles(values, n=100)[int(q) - 1] if len(values) > 1 else values[0]


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--cycles", type=int, default=400)
    parser.add_argument("--threads", type=int, default=4, help="per node, in the two-node run")
    parser.add_argument("--out", type=Path)
    args = parser.parse_args()
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        local = QuotaAccounting(QuotaStore(f"sqlite:///{tmp}/q.sqlite"))
        local.put("*", LIMITS)
        cycles(local, 20, "warm")
        t = cycles(local, args.cycles, "u")
        rows.append(("SQLite, one service (counts in memory)", p(t, 50), p(t, 99)))
        local.close()
    with run_postgres() as pg:
        started = pg.started_seconds
        url = pg.new_database()
        nodes = [QuotaAccounting(QuotaStore(url), shared=True) for _ in range(2)]
        nodes[0].put("*", LIMITS)
        cycles(nodes[0], 20, "warm")
        trip = []
        for _ in range(args.cycles):  # for scale: one round trip through the same pool, at the same time
            t0 = time.perf_counter()
            with nodes[0].store.engine.connect() as conn:
                conn.exec_driver_sql("SELECT 1").scalar()
            trip.append((time.perf_counter() - t0) * 1e3)
        rows.append(("PostgreSQL, one round trip (SELECT 1), for scale", p(trip, 50), p(trip, 99)))
        t = cycles(nodes[0], args.cycles, "u")
        rows.append(("PostgreSQL, shared (counts in the database), one at a time", p(t, 50), p(t, 99)))
        # two nodes at once, the same user: every admission of one waits for the other's lock
        per_thread = args.cycles // (2 * args.threads)
        results: list[list[float]] = []
        barrier = threading.Barrier(2 * args.threads)

        def run(node: QuotaAccounting) -> None:
            barrier.wait()
            results.append(cycles(node, per_thread, "shared-user"))

        threads = [threading.Thread(target=run, args=(node,)) for node in nodes for _ in range(args.threads)]
        t0 = time.perf_counter()
        for th in threads:
            th.start()
        for th in threads:
            th.join()
        wall = time.perf_counter() - t0
        flat = [x for r in results for x in r]
        total = per_thread * 2 * args.threads
        rows.append((f"PostgreSQL, 2 nodes x {args.threads} threads, one user", p(flat, 50), p(flat, 99)))
        counted = nodes[1].tokens_today("shared-user")
        for node in nodes:
            node.close()
    lines = [
        "# Quota accounting per request (admit, record tokens, release)",
        "",
        f"{time.strftime('%Y-%m-%d')}, `python bench/quota_admission.py --cycles {args.cycles}`, on the 2-core "
        f"CI-class machine shared with other work (load average {os.getloadavg()[0]:.1f} at the end of the run: "
        "the spread between p50 and p99 is mostly that).",
        "",
        "| books | p50 ms | p99 ms |",
        "|---|---|---|",
        *[f"| {name} | {p50:.2f} | {p99:.2f} |" for name, p50, p99 in rows],
        "",
        f"Two nodes at once: {total} requests of one user in {wall:.2f} s ({total / wall:.0f}/s), "
        f"tokens counted {counted} of {total * 30} sent (every one once: {counted == total * 30}).",
        f"PostgreSQL start (initdb + pg_ctl start, as the tests do): {started:.2f} s.",
    ]
    text = "\n".join(lines) + "\n"
    print(text)
    if args.out:
        args.out.write_text(text)


if __name__ == "__main__":
    main()
