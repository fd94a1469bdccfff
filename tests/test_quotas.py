"""Quota rows, effective limits and the admission decision (pure), and the accounting behind them
on a real SQLite database."""

from __future__ import annotations

from pathlib import Path

import pytest

from jupyter_swapserve.service.accounting import QuotaAccounting, QuotaExceeded
from jupyter_swapserve.service.quotas import (
    FIELD_INFO,
    FIELDS,
    QuotaInputError,
    UsageNow,
    check_model_names,
    decide,
    effective_limits,
    iso,
    model_refusal,
    next_utc_midnight,
    usage_of,
    validate_row,
)
from jupyter_swapserve.service.storage import SCHEMA_VERSION, QuotaStore, StorageError

NOW = 1_800_000_000.0  # 2027-01-15 08:00:00 UTC


class Clock:
    def __init__(self, t: float = NOW) -> None:
        self.t = t

    def __call__(self) -> float:
        return self.t


# ---- rows and limits -----------------------------------------------------------------------
def test_validate_row_accepts_fields_and_names_the_bad_one() -> None:
    row = validate_row({"tokens_per_day": 1000, "allowed_models": ["b", "a", "a"], "priority": 2,
                        "models": {"gemma": {"requests_per_minute": 3}}})
    assert row == {"tokens_per_day": 1000, "allowed_models": ["a", "b"], "priority": 2.0,
                   "models": {"gemma": {"requests_per_minute": 3}}}
    for body, param in [({"tokens_per_dya": 1}, "tokens_per_dya"), ({"max_concurrent": -1}, "max_concurrent"),
                        ({"max_concurrent": 1.5}, "max_concurrent"), ({"requests_per_minute": "3"},
                                                                       "requests_per_minute"),
                        ({"priority": 0}, "priority"), ({"allowed_models": "gemma"}, "allowed_models"),
                        ({"max_concurrent": True}, "max_concurrent"),
                        ({"models": {"gemma": {"allowed_models": []}}}, "models.gemma.allowed_models"),
                        ({"models": []}, "models")]:
        with pytest.raises(QuotaInputError) as err:
            validate_row(body)
        assert err.value.param == param, body
    with pytest.raises(QuotaInputError):
        validate_row(["not", "an", "object"])


def test_user_row_overrides_default_and_model_entries_add_limits() -> None:
    rows = {
        "*": {"tokens_per_day": 100, "requests_per_minute": 10, "models": {"big": {"tokens_per_day": 10,
                                                                                  "priority": 0.5}}},
        "alice": {"tokens_per_day": 1000, "max_tokens_per_request": 50,
                  "models": {"big": {"max_tokens_per_request": 20}}},
    }
    bob = effective_limits(rows, "bob", "big")
    assert (bob.tokens_per_day, bob.requests_per_minute, bob.model_tokens_per_day, bob.priority) == (100, 10, 10, 0.5)
    alice = effective_limits(rows, "alice", "big")
    assert alice.tokens_per_day == 1000 and alice.requests_per_minute == 10
    assert alice.model_tokens_per_day == 10  # the default row's model entry still applies to her
    assert alice.max_tokens_per_request == 20  # the smaller of her overall and per-model limits
    assert effective_limits(rows, "alice", "small").max_tokens_per_request == 50
    assert effective_limits({}, "carol", "big").priority == 1.0


def test_decide_checks_each_limit_with_code_and_reset() -> None:
    limits = effective_limits({"*": {"allowed_models": ["gemma"], "max_concurrent": 2, "requests_per_minute": 2,
                                     "tokens_per_day": 100, "max_tokens_per_request": 64}}, "u", "gemma")
    assert decide(limits, UsageNow(), "gemma", 10, NOW) is None
    r = decide(limits, UsageNow(), "smollm2", 10, NOW)
    assert r and (r.status, r.code, r.param) == (403, "model_not_allowed", "model")
    assert model_refusal(limits, "smollm2") == r and model_refusal(limits, "gemma") is None  # the prefetch hint's check
    r = decide(limits, UsageNow(), "gemma", 65, NOW)
    assert r and (r.status, r.code, r.param) == (400, "max_tokens_exceeded", "max_tokens") and "64" in r.message
    r = decide(limits, UsageNow(concurrent=2), "gemma", None, NOW)
    assert r and (r.status, r.code) == (429, "rate_limit_exceeded") and "2 of 2" in r.message
    r = decide(limits, UsageNow(recent=(NOW - 50, NOW - 10)), "gemma", None, NOW)
    assert r and r.code == "rate_limit_exceeded" and r.retry_after == pytest.approx(10.0)  # oldest leaves in 10 s
    assert "per minute" in r.message
    r = decide(limits, UsageNow(tokens_today=100), "gemma", None, NOW)
    assert r and (r.status, r.code) == (429, "insufficient_quota")
    assert r.retry_after == pytest.approx(next_utc_midnight(NOW) - NOW) and "midnight UTC" in r.message


def test_usage_of_counts_what_every_node_recorded() -> None:
    usage = usage_of("gemma", {"gemma": 2, "qwen": 1},
                     [("gemma", NOW - 70), ("qwen", NOW - 30), ("gemma", NOW - 5), ("gemma", NOW + 0.2)],
                     {"gemma": 40, "qwen": 2}, NOW)
    assert (usage.concurrent, usage.concurrent_model) == (3, 2)
    # older than the minute: out; later than now (another node's, made while this one waited): in
    assert usage.recent == (NOW - 30, NOW - 5, NOW + 0.2) and usage.recent_model == (NOW - 5, NOW + 0.2)
    assert (usage.tokens_today, usage.tokens_today_model) == (42, 40)
    assert usage_of("x", {}, [], {}, NOW) == UsageNow()


# ---- accounting on a real SQLite database ----------------------------------------------------
def test_accounting_enforces_and_resets_windows(tmp_path: Path) -> None:
    clock = Clock()
    acc = QuotaAccounting(QuotaStore(f"sqlite:///{tmp_path / 'q.sqlite'}"), clock=clock)
    acc.put("*", {"requests_per_minute": 2, "max_concurrent": 1, "tokens_per_day": 50})
    first = acc.admit("alice", "gemma", None)
    with pytest.raises(QuotaExceeded) as err:
        acc.admit("alice", "gemma", None)  # one at a time
    assert err.value.refusal.code == "rate_limit_exceeded"
    acc.admit("bob", "gemma", None).release()  # bob's quota is his own
    first.record(10, 20)
    first.release()
    second = acc.admit("alice", "gemma", None)
    second.record(5, 15)
    second.release()
    with pytest.raises(QuotaExceeded) as err:
        acc.admit("alice", "gemma", None)  # 2 per minute, then 50 tokens: the minute comes first
    assert "per minute" in err.value.refusal.message
    clock.t += 61  # the minute has passed; tokens have not reset
    with pytest.raises(QuotaExceeded) as err:
        acc.admit("alice", "gemma", None)
    assert err.value.refusal.code == "insufficient_quota"
    clock.t = next_utc_midnight(clock.t) + 1  # a new UTC day
    acc.admit("alice", "gemma", None).release()


def test_quotas_and_usage_survive_a_restart(tmp_path: Path) -> None:
    url = f"sqlite:///{tmp_path / 'q.sqlite'}"
    clock = Clock()
    acc = QuotaAccounting(QuotaStore(url), clock=clock)
    acc.put("alice", {"tokens_per_day": 30, "models": {"gemma": {"priority": 3}}})
    lease = acc.admit("alice", "gemma", None)
    lease.record(10, 25)
    lease.release()
    acc.store.close()

    again = QuotaAccounting(QuotaStore(url), clock=clock)
    assert again.row("alice")["tokens_per_day"] == 30
    assert again.limits("alice", "gemma").priority == 3.0
    assert again.tokens_today("alice") == 35
    with pytest.raises(QuotaExceeded):
        again.admit("alice", "gemma", None)
    report = again.report("alice", who_asks_is_admin=False, everyone=False, days=1)
    assert report["usage"] == [{"user": "alice", "model": "gemma", "day": "2027-01-15", "requests": 1,
                                "prompt_tokens": 10, "completion_tokens": 25, "total_tokens": 35}]
    assert report["remaining"]["tokens_today"] == 0
    assert again.delete("alice") and not again.delete("alice")
    again.admit("alice", "gemma", None).release()  # back on the default: no limit


def test_schema_is_versioned_and_a_newer_database_is_refused(tmp_path: Path) -> None:
    url = f"sqlite:///{tmp_path / 'q.sqlite'}"
    store = QuotaStore(url)
    assert store.version == SCHEMA_VERSION
    with store.engine.begin() as conn:
        mode = conn.exec_driver_sql("PRAGMA journal_mode").scalar()
        conn.exec_driver_sql("UPDATE swapserve_schema_version SET version = 99")
    assert mode == "wal"
    store.close()
    with pytest.raises(StorageError, match="newer"):
        QuotaStore(url)
    with pytest.raises(StorageError):
        QuotaStore("notadialect://x")


def test_migrations_bring_an_old_database_up(tmp_path: Path) -> None:
    import sqlalchemy as sa

    from jupyter_swapserve.service import storage

    url = f"sqlite:///{tmp_path / 'q.sqlite'}"
    engine = sa.create_engine(url)
    with engine.begin() as conn:  # a version-1 database, as the first release wrote it
        storage._v1(conn)
        conn.execute(storage.schema_version.insert().values(version=1))
        conn.execute(storage.quota_rows.insert().values(user_name="*", data='{"tokens_per_day": 7}', updated_at=0))
    engine.dispose()
    store = QuotaStore(url)
    assert store.version == SCHEMA_VERSION
    assert store.quotas() == {"*": {"tokens_per_day": 7}}
    with store.engine.connect() as conn:
        indexes = {row[1] for row in conn.exec_driver_sql("PRAGMA index_list('swapserve_usage')")}
    assert "ix_swapserve_usage_day" in indexes


def test_model_names_are_checked_against_the_service() -> None:
    check_model_names(validate_row({"allowed_models": ["gemma"], "models": {"smollm2": {"priority": 2}}}),
                      ["gemma", "smollm2"])
    for body, param in [({"allowed_models": ["gemma", "nosuchmodel"]}, "allowed_models"),
                        ({"models": {"nosuchmodel": {"tokens_per_day": 5}}}, "models.nosuchmodel")]:
        with pytest.raises(QuotaInputError) as err:
            check_model_names(validate_row(body), ["gemma", "smollm2"])
        assert err.value.param == param and "nosuchmodel" in str(err.value) and "gemma, smollm2" in str(err.value)


def test_every_field_explains_itself() -> None:
    assert set(FIELD_INFO) == set(FIELDS)
    for name, info in FIELD_INFO.items():
        assert info.label and info.unit and info.help and info.unset, name
    assert "UTC" in FIELD_INFO["tokens_per_day"].unit and FIELD_INFO["priority"].unset == "1"


def test_refusals_count_in_the_singular_and_the_last_one_is_reported(tmp_path: Path) -> None:
    limits = effective_limits({"*": {"requests_per_minute": 1, "max_concurrent": 1, "tokens_per_day": 1}}, "u", "m")
    assert "1 request per minute;" in decide(limits, UsageNow(recent=(NOW - 5,)), "m", None, NOW).message
    assert "1 of 1 request over all models is queued" in decide(limits, UsageNow(concurrent=1), "m", None, NOW).message
    assert "3 of 1 token per day" in decide(limits, UsageNow(tokens_today=3), "m", None, NOW).message
    clock = Clock()
    acc = QuotaAccounting(QuotaStore(f"sqlite:///{tmp_path / 'q.sqlite'}"), clock=clock)
    acc.put("*", {"requests_per_minute": 1})
    assert acc.report("alice", False, everyone=False, days=1)["last_refusal"] is None
    acc.admit("alice", "gemma", None).release()
    clock.t += 20
    with pytest.raises(QuotaExceeded):
        acc.admit("alice", "gemma", None)
    report = acc.report("alice", False, everyone=False, days=1)
    refusal = report["last_refusal"]
    assert (refusal["model"], refusal["status"], refusal["code"]) == ("gemma", 429, "rate_limit_exceeded")
    assert refusal["at"] == iso(NOW + 20) and refusal["retry_at"] == iso(NOW + 60) == report["resets"]["requests"]
    assert report["now"] == iso(NOW + 20) and report["remaining"]["requests_this_minute"] == 0
    assert acc.report("bob", False, everyone=False, days=1)["last_refusal"] is None  # each user their own
