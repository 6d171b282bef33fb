"""The hash-chained audit log, on real SQLite and real PostgreSQL.

Tampering goes around fnmesh, the way an intruder with the database's
password would: raw SQL over a connection of its own.
"""

from __future__ import annotations

import asyncio
import itertools
import json
from collections.abc import AsyncIterator
from typing import Any

import pytest
from sqlalchemy import create_engine, text

# The per-backend store URL fixture (SQLite, and PostgreSQL when one answers).
from test_store import store_url  # noqa: F401

from fnmesh.coordinator.audit import GENESIS, AuditLog, entry_hash
from fnmesh.coordinator.errors import InvalidRequestError
from fnmesh.coordinator.store import Store

ENTRIES = 5


@pytest.fixture
async def store(store_url: str) -> AsyncIterator[Store]:  # noqa: F811
    s = await Store.open(store_url)
    try:
        yield s
    finally:
        await s.close()


@pytest.fixture
async def log(store: Store) -> AuditLog:
    log = AuditLog(store)
    for i in range(1, ENTRIES + 1):
        await log.append(
            "deploy", f"operator.op-{i}", {"function": f"ex/f{i}", "version": f"1.{i}.0"}
        )
    return log


def tamper(store_url: str, *statements: str) -> None:  # noqa: F811
    """Run raw SQL in one transaction on a connection that is not fnmesh's."""
    engine = create_engine(store_url.replace("+aiosqlite", ""))
    try:
        with engine.begin() as conn:
            for sql in statements:
                conn.execute(text(sql))
    finally:
        engine.dispose()


# -- the chain as written -----------------------------------------------------------------


async def test_append_then_verify_ok(store: Store) -> None:
    log = AuditLog(store)
    details: list[dict[str, Any]] = [
        {"function": "ex/digits", "version": "1.0.0"},
        {"nested": {"b": [1, 2.5, None, True], "a": "é — ü"}, "n": 2**62},
        {"tuple_becomes_list": (1, 2), "keys": {3: "int keys become strings"}},
        {},
    ]
    made = [await log.append(f"act-{i}", "operator.admin", d) for i, d in enumerate(details)]
    assert [e.seq for e in made] == [1, 2, 3, 4]
    assert made[0].prev_hash == GENESIS
    assert all(b.prev_hash == a.hash for a, b in itertools.pairwise(made))
    assert made[2].detail == {
        "tuple_becomes_list": [1, 2],
        "keys": {"3": "int keys become strings"},
    }

    stored = await log.entries(limit=10)
    assert stored == made
    for e in stored:
        assert e.hash == entry_hash(e.seq, e.ts, e.who, e.action, e.detail, e.prev_hash)
    assert [e.seq for e in await log.entries(limit=2, since=1)] == [2, 3]
    assert await log.entries(limit=0) == []
    assert await log.head() == (4, made[-1].hash)

    result = await log.verify()
    assert result.ok, result
    assert (result.first_bad_seq, result.checked) == (None, 4)


async def test_empty_log_verifies(store: Store) -> None:
    result = await AuditLog(store).verify()
    assert result.ok and result.checked == 0


async def test_detail_that_is_not_plain_json_refused(store: Store) -> None:
    log = AuditLog(store)
    with pytest.raises(InvalidRequestError):
        await log.append("push", "publisher.ex", {"blob": b"bytes"})
    with pytest.raises(InvalidRequestError):
        await log.append("push", "publisher.ex", {"x": float("nan")})
    with pytest.raises(InvalidRequestError):
        await log.append("push", "publisher.ex", ["not", "an", "object"])  # type: ignore[arg-type]
    assert (await log.verify()).checked == 0


# -- tampering ------------------------------------------------------------------------------


EDITS = {
    "who": "UPDATE audit SET who = 'operator.someone-else' WHERE seq = 3",
    "action": "UPDATE audit SET action = 'undeploy' WHERE seq = 3",
    "detail": "UPDATE audit SET detail = '{}' WHERE seq = 3".format(
        json.dumps({"function": "ex/f3", "version": "6.6.6"})
    ),
    "ts": "UPDATE audit SET ts = ts - 86400 WHERE seq = 3",
    "prev_hash": f"UPDATE audit SET prev_hash = '{'e' * 64}' WHERE seq = 3",
    "hash": f"UPDATE audit SET hash = '{'f' * 64}' WHERE seq = 3",
    "seq": "UPDATE audit SET seq = 1003 WHERE seq = 3",
}


@pytest.mark.parametrize("field", sorted(EDITS))
async def test_edited_entry_detected(log: AuditLog, store_url: str, field: str) -> None:  # noqa: F811
    assert (await log.verify()).ok
    tamper(store_url, EDITS[field])
    result = await log.verify()
    assert not result.ok
    assert result.first_bad_seq == 3, result
    assert result.checked == 2


async def test_rehashed_entry_detected_at_the_next_link(log: AuditLog, store_url: str) -> None:  # noqa: F811
    # The intruder edits entry 3 and gives it a valid hash of its own: entry 4 no longer follows.
    e = (await log.entries(limit=1, since=2))[0]
    forged = entry_hash(e.seq, e.ts, "operator.intruder", e.action, e.detail, e.prev_hash)
    tamper(
        store_url, f"UPDATE audit SET who = 'operator.intruder', hash = '{forged}' WHERE seq = 3"
    )
    result = await log.verify()
    assert (result.ok, result.first_bad_seq) == (False, 4), result


async def test_deleted_middle_entry_detected(log: AuditLog, store_url: str) -> None:  # noqa: F811
    tamper(store_url, "DELETE FROM audit WHERE seq = 3")
    result = await log.verify()
    assert (result.ok, result.first_bad_seq) == (False, 3), result
    assert "missing" in result.reason


async def test_deleted_last_entry_detected(log: AuditLog, store_url: str) -> None:  # noqa: F811
    tamper(store_url, f"DELETE FROM audit WHERE seq = {ENTRIES}")
    result = await log.verify()
    assert (result.ok, result.first_bad_seq) == (False, ENTRIES), result
    assert "head" in result.reason


async def test_deleted_last_entry_with_head_count_rewound_detected(
    log: AuditLog,
    store_url: str,  # noqa: F811
) -> None:
    # The head keeps the last hash as well as the count: rewinding the count alone shows.
    tamper(
        store_url,
        f"DELETE FROM audit WHERE seq = {ENTRIES}",
        f"UPDATE audit_head SET seq = {ENTRIES - 1}",
    )
    result = await log.verify()
    assert (result.ok, result.first_bad_seq) == (False, ENTRIES - 1), result


async def test_head_rewound_over_kept_entries_detected(log: AuditLog, store_url: str) -> None:  # noqa: F811
    # Hiding the last entry by moving the head back (count and hash) instead of deleting it.
    kept = (await log.entries(limit=1, since=ENTRIES - 2))[0]
    tamper(store_url, f"UPDATE audit_head SET seq = {kept.seq}, hash = '{kept.hash}'")
    result = await log.verify()
    assert (result.ok, result.first_bad_seq) == (False, ENTRIES), result


# -- concurrency ----------------------------------------------------------------------------


async def test_concurrent_appends_keep_one_chain(store: Store, store_url: str) -> None:  # noqa: F811
    log = AuditLog(store)
    made = await asyncio.gather(
        *(log.append("grant", f"operator.op-{i}", {"i": i}) for i in range(50))
    )
    assert sorted(e.seq for e in made) == list(range(1, 51))
    # A second coordinator on the same database appends while the first does.
    async with await Store.open(store_url) as other:
        log2 = AuditLog(other)
        await asyncio.gather(
            *(log.append("a", "operator.one", {"i": i}) for i in range(25)),
            *(log2.append("b", "operator.two", {"i": i}) for i in range(25)),
        )
    result = await log.verify()
    assert result.ok, result
    assert result.checked == 100
    assert len({e.prev_hash for e in await log.entries(limit=200)}) == 100
