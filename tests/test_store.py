"""The coordinator's state store and blob store, on real SQLite and real PostgreSQL.

Every store test runs once per backend. PostgreSQL tests each get a schema of
their own (through ``search_path``) that is dropped afterwards, so runs never
see each other; they skip, saying why, when no server answers at
127.0.0.1:5432.
"""

from __future__ import annotations

import asyncio
import hashlib
import os
import random
import secrets
import signal
import sqlite3
import subprocess
import sys
import textwrap
from collections.abc import AsyncIterator, Iterator
from pathlib import Path
from typing import Any

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from fnmesh.coordinator.errors import ConflictError, InvalidRequestError, NotFoundError
from fnmesh.coordinator.store import BlobStore, Store, sqlite_url

SCALE = float(os.environ.get("FNMESH_TEST_SCALE", "1"))
PG_HOST = os.environ.get("FNMESH_TEST_PG_HOST", "127.0.0.1")
PG_PORT = int(os.environ.get("FNMESH_TEST_PG_PORT", "5432"))
PG_DB = os.environ.get("FNMESH_TEST_PG_DB", "test")


def digest_of(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


def fake_digest(n: int) -> str:
    return digest_of(str(n).encode())


# -- backends -------------------------------------------------------------------


def _pg_admin() -> tuple[Any, str]:
    """A sync autocommit connection to the test PostgreSQL and the user it logged in as."""
    try:
        import psycopg
    except ImportError:
        pytest.skip("psycopg is not installed (pip install 'fnmesh[postgres]')")
    errors = []
    for user in ("postgres", "root"):
        try:
            conn = psycopg.connect(
                host=PG_HOST,
                port=PG_PORT,
                dbname=PG_DB,
                user=user,
                autocommit=True,
                connect_timeout=3,
            )
        except psycopg.Error as e:
            errors.append(f"{user}: {' '.join(str(e).split())}")
            continue
        return conn, user
    pytest.skip(f"PostgreSQL unreachable at {PG_HOST}:{PG_PORT}/{PG_DB}: {'; '.join(errors)}")


@pytest.fixture(params=["sqlite", "postgresql"])
def store_url(request: pytest.FixtureRequest, tmp_path: Path) -> Iterator[str]:
    """A URL to an empty store of its own, on each backend."""
    if request.param == "sqlite":
        yield sqlite_url(tmp_path / "state.db")
        return
    admin, user = _pg_admin()
    schema = f"fnmesh_test_{secrets.token_hex(6)}"
    try:
        admin.execute(f'CREATE SCHEMA "{schema}"')
        yield (
            f"postgresql+psycopg://{user}@{PG_HOST}:{PG_PORT}/{PG_DB}"
            f"?options=-csearch_path%3D{schema}"
        )
    finally:
        admin.execute(f'DROP SCHEMA IF EXISTS "{schema}" CASCADE')
        admin.close()


@pytest.fixture
async def store(store_url: str) -> AsyncIterator[Store]:
    s = await Store.open(store_url)
    try:
        yield s
    finally:
        await s.close()


@pytest.fixture
def blobs(tmp_path: Path) -> BlobStore:
    return BlobStore(tmp_path / "blobs")


async def push(store: Store, function: str, version: str, blobs: BlobStore | None = None) -> str:
    """Push a small fake bundle; returns its digest."""
    data = f"{function}@{version}".encode()
    digest = digest_of(data)
    if blobs is not None:
        blobs.put(digest, data)
    await store.add_version(
        function, version, digest, {"name": function, "version": version}, "pub.ns", len(data), "op"
    )
    return digest


# -- schema -----------------------------------------------------------------------


async def test_open_twice_keeps_one_schema_row(store_url: str) -> None:
    first = await Store.open(store_url)
    await push(first, "ns/f", "1.0.0")
    await first.close()
    async with await Store.open(store_url) as again:
        assert [f.function for f in await again.list_functions()] == ["ns/f"]
        assert await again.check() == []


async def test_unsupported_url_refused() -> None:
    with pytest.raises(InvalidRequestError):
        await Store.open("mysql+aiomysql://u@h/db")


# -- functions and versions ---------------------------------------------------------


async def test_version_round_trip(store: Store) -> None:
    manifest = {"name": "ns/f", "version": "1.0.0", "inputs": [{"name": "x", "shape": [-1, 4]}]}
    digest = fake_digest(1)
    rec = await store.add_version("ns/f", "1.0.0", digest, manifest, "pub.ns", 1234, "op.alice")
    assert (rec.function, rec.version, rec.digest) == ("ns/f", "1.0.0", digest)
    assert (rec.manifest, rec.publisher, rec.size, rec.pushed_by) == (
        manifest,
        "pub.ns",
        1234,
        "op.alice",
    )
    assert await store.get_version("ns/f", "1.0.0") == rec
    assert await store.version_by_digest(digest) == rec
    assert await store.versions("ns/f") == [rec]


async def test_versions_sorted_by_semver(store: Store) -> None:
    for v in ["1.10.0", "1.2.0", "1.0.0", "1.0.0-rc.1", "0.9.9", "1.0.0-alpha"]:
        await push(store, "ns/f", v)
    await push(store, "ns/a", "2.0.0")
    expected = ["0.9.9", "1.0.0-alpha", "1.0.0-rc.1", "1.0.0", "1.2.0", "1.10.0"]
    functions = await store.list_functions()
    assert [(f.function, f.versions, f.latest) for f in functions] == [
        ("ns/a", ["2.0.0"], "2.0.0"),
        ("ns/f", expected, "1.10.0"),
    ]
    assert [r.version for r in await store.versions("ns/f")] == expected


async def test_version_overwrite_with_other_digest_refused(store: Store) -> None:
    first = await store.add_version("ns/f", "1.0.0", fake_digest(1), {"a": 1}, "p", 1, "op")
    with pytest.raises(ConflictError, match="already pushed"):
        await store.add_version("ns/f", "1.0.0", fake_digest(2), {"a": 1}, "p", 1, "op")
    assert await store.get_version("ns/f", "1.0.0") == first


async def test_same_push_twice_is_idempotent(store: Store) -> None:
    first = await store.add_version("ns/f", "1.0.0", fake_digest(1), {"a": 1}, "p", 1, "op")
    again = await store.add_version("ns/f", "1.0.0", fake_digest(1), {"a": 1}, "p", 1, "bob")
    assert again == first
    assert len(await store.versions("ns/f")) == 1


async def test_concurrent_identical_pushes_agree(store: Store) -> None:
    records = await asyncio.gather(
        *[store.add_version("ns/f", "1.0.0", fake_digest(1), {}, "p", 1, "op") for _ in range(8)]
    )
    assert all(r == records[0] for r in records)


async def test_lookups_of_unknown_things_raise_not_found(store: Store) -> None:
    await push(store, "ns/f", "1.0.0")
    with pytest.raises(NotFoundError):
        await store.get_version("ns/f", "9.9.9")
    with pytest.raises(NotFoundError):
        await store.get_version("ns/nope", "1.0.0")
    assert await store.versions("ns/nope") == []
    with pytest.raises(NotFoundError):
        await store.version_by_digest(fake_digest(99))
    assert await store.get_deployment("ns/f") is None
    with pytest.raises(NotFoundError):
        await store.set_deployment("ns/f", "2.0.0", 1, 1, {})
    with pytest.raises(NotFoundError):
        await store.set_deployment("ns/nope", "1.0.0", 1, 1, {})
    with pytest.raises(NotFoundError):
        await store.set_placements("ns/f", "2.0.0", ["a"])
    with pytest.raises(NotFoundError):
        await store.get_node("ghost")
    with pytest.raises(NotFoundError):
        await store.set_node_state("ghost", "ready")
    with pytest.raises(NotFoundError):
        await store.set_draining("ghost", True)
    assert await store.delete_deployment("ns/f") is False
    assert await store.last_assignment("ghost") is None


@pytest.mark.parametrize(
    ("function", "version", "digest"),
    [
        ("nonamespace", "1.0.0", fake_digest(1)),
        ("ns/f", "1.0", fake_digest(1)),
        ("ns/f", "latest", fake_digest(1)),
        ("ns/f", "1.0.0", "AB" * 32),
        ("ns/f", "1.0.0", "ab" * 31),
        ("ns/f", "1.0.0", "../" * 21 + "a"),
    ],
)
async def test_malformed_push_refused(
    store: Store, function: str, version: str, digest: str
) -> None:
    with pytest.raises(InvalidRequestError):
        await store.add_version(function, version, digest, {}, "p", 1, "op")
    assert await store.list_functions() == []


# -- deployments ----------------------------------------------------------------------


async def test_deployment_round_trip(store: Store) -> None:
    await push(store, "ns/f", "1.0.0")
    dep = await store.set_deployment("ns/f", "1.0.0", 1, 3, {"region": "eu-west"}, allow_spill=True)
    assert (dep.function, dep.version, dep.min_replicas, dep.max_replicas) == (
        "ns/f",
        "1.0.0",
        1,
        3,
    )
    assert (dep.where, dep.allow_spill, dep.previous_version) == ({"region": "eu-west"}, True, None)
    assert await store.get_deployment("ns/f") == dep
    assert await store.list_deployments() == [dep]
    assert await store.deployment_generation() == dep.generation


async def test_previous_version_tracks_version_changes(store: Store) -> None:
    for v in ["1.0.0", "1.1.0", "2.0.0"]:
        await push(store, "ns/f", v)
    steps = [
        ("1.0.0", 1, None),
        ("1.1.0", 1, "1.0.0"),
        ("1.1.0", 4, "1.0.0"),  # a scale change keeps what a rollback goes back to
        ("2.0.0", 4, "1.1.0"),
        ("1.1.0", 4, "2.0.0"),  # a rollback is a version change like any other
    ]
    for version, replicas, previous in steps:
        dep = await store.set_deployment("ns/f", version, 1, replicas, {})
        assert (dep.version, dep.max_replicas, dep.previous_version) == (
            version,
            replicas,
            previous,
        )
        assert await store.get_deployment("ns/f") == dep


async def test_deployment_generation_strictly_increases(store: Store) -> None:
    await push(store, "ns/f", "1.0.0")
    await push(store, "ns/g", "1.0.0")
    seen = [await store.deployment_generation()]
    for i in range(3):
        seen.append((await store.set_deployment("ns/f", "1.0.0", 0, i + 1, {})).generation)
        seen.append((await store.set_deployment("ns/g", "1.0.0", 0, i + 1, {})).generation)
    assert await store.delete_deployment("ns/g") is True
    seen.append(await store.deployment_generation())
    assert seen == sorted(set(seen)), seen
    assert [d.function for d in await store.list_deployments()] == ["ns/f"]


async def test_concurrent_deploys_get_distinct_generations(store: Store) -> None:
    await push(store, "ns/f", "1.0.0")
    deps = await asyncio.gather(
        *[store.set_deployment("ns/f", "1.0.0", 0, i + 1, {}) for i in range(10)]
    )
    assert len({d.generation for d in deps}) == 10
    final = await store.get_deployment("ns/f")
    assert final is not None and final.generation == max(d.generation for d in deps)


@pytest.mark.parametrize(("lo", "hi"), [(-1, 2), (3, 2)])
async def test_inverted_replicas_refused(store: Store, lo: int, hi: int) -> None:
    await push(store, "ns/f", "1.0.0")
    with pytest.raises(InvalidRequestError):
        await store.set_deployment("ns/f", "1.0.0", lo, hi, {})


# -- nodes ------------------------------------------------------------------------------


async def test_node_round_trip(store: Store) -> None:
    hw = {"cores": 2, "memory_mib": 24000, "gpus": [], "providers": ["CPUExecutionProvider"]}
    status = {"http": "https://127.0.0.1:4000", "functions": {"ns/f": "1.0.0"}}
    node = await store.upsert_node(
        "lyon-1", "node.lyon-1", {"site": "lyon-1"}, hw, "ready", status, "ab" * 32, 100.5
    )
    assert (node.name, node.cn, node.labels, node.hardware) == (
        "lyon-1",
        "node.lyon-1",
        {"site": "lyon-1"},
        hw,
    )
    assert (node.state, node.status, node.fingerprint, node.last_seen, node.draining) == (
        "ready",
        status,
        "ab" * 32,
        100.5,
        False,
    )
    assert await store.get_node("lyon-1") == node

    offline = await store.set_node_state("lyon-1", "offline")
    assert (offline.state, offline.last_seen) == ("offline", 100.5)
    seen = await store.set_node_state("lyon-1", "ready", last_seen=200.0)
    assert (seen.state, seen.last_seen) == ("ready", 200.0)

    assert (await store.set_draining("lyon-1", True)).draining is True
    # A fresh status from the node does not undo the operator's drain.
    again = await store.upsert_node("lyon-1", "node.lyon-1", {}, hw, "ready", {}, "cd" * 32, 300.0)
    assert (again.draining, again.labels, again.fingerprint) == (True, {}, "cd" * 32)
    assert (await store.set_draining("lyon-1", False)).draining is False

    await store.upsert_node("aix-1", "node.aix-1", {}, {}, "ready", {}, "ef" * 32, 1.0)
    assert [n.name for n in await store.list_nodes()] == ["aix-1", "lyon-1"]


# -- placements ---------------------------------------------------------------------------


async def test_placements_round_trip(store: Store) -> None:
    await push(store, "ns/f", "1.0.0")
    await push(store, "ns/g", "2.0.0")
    placed = await store.set_placements("ns/f", "1.0.0", ["b", "a", "b"])
    assert [(p.function, p.version, p.node) for p in placed] == [
        ("ns/f", "1.0.0", "a"),
        ("ns/f", "1.0.0", "b"),
    ]
    await store.set_placements("ns/g", "2.0.0", ["a"])
    assert await store.placements("ns/f") == placed
    assert [(p.function, p.node) for p in await store.placements()] == [
        ("ns/f", "a"),
        ("ns/f", "b"),
        ("ns/g", "a"),
    ]
    assert [(p.function, p.version) for p in await store.placements_for_node("a")] == [
        ("ns/f", "1.0.0"),
        ("ns/g", "2.0.0"),
    ]
    assert await store.delete_placements("ns/f") == 2
    assert await store.placements("ns/f") == []
    assert await store.placements_for_node("b") == []


async def test_set_placements_replaces_and_keeps_since(store: Store) -> None:
    await push(store, "ns/f", "1.0.0")
    await push(store, "ns/f", "1.1.0")
    first = {p.node: p for p in await store.set_placements("ns/f", "1.0.0", ["a", "b"])}
    second = {p.node: p for p in await store.set_placements("ns/f", "1.0.0", ["b", "c"])}
    assert sorted(second) == ["b", "c"]
    assert second["b"].since == first["b"].since
    third = {p.node: p for p in await store.set_placements("ns/f", "1.1.0", ["b", "c"])}
    assert {p.version for p in third.values()} == {"1.1.0"}
    assert third["b"].since >= second["b"].since
    assert await store.set_placements("ns/f", "1.1.0", []) == []
    assert await store.placements("ns/f") == []


async def test_failed_set_placements_leaves_old_rows(store: Store) -> None:
    await push(store, "ns/f", "1.0.0")
    before = await store.set_placements("ns/f", "1.0.0", ["a", "b"])
    with pytest.raises(NotFoundError):
        await store.set_placements("ns/f", "9.0.0", ["c"])
    assert await store.placements("ns/f") == before


async def test_readers_never_see_half_a_placement_swap(store: Store) -> None:
    await push(store, "ns/f", "1.0.0")
    sets = [{"a", "b", "c"}, {"d", "e"}]
    await store.set_placements("ns/f", "1.0.0", sorted(sets[0]))
    done = asyncio.Event()

    async def writer() -> None:
        for i in range(30):
            await store.set_placements("ns/f", "1.0.0", sorted(sets[i % 2]))
        done.set()

    async def reader() -> int:
        reads = 0
        while not done.is_set():
            nodes = {p.node for p in await store.placements("ns/f")}
            assert nodes in sets, nodes
            reads += 1
        return reads

    results = await asyncio.gather(writer(), reader(), reader())
    assert sum(r for r in results if r) > 0


# -- assignment generations -------------------------------------------------------------------


async def test_next_generation_strictly_increases(store: Store) -> None:
    gens = [await store.next_generation() for _ in range(5)]
    assert gens == sorted(set(gens))
    assert gens[0] >= 1


async def test_concurrent_next_generation_has_no_duplicates(store: Store) -> None:
    before = await store.next_generation()
    gens = await asyncio.gather(*[store.next_generation() for _ in range(20)])
    assert len(set(gens)) == 20
    assert min(gens) > before
    assert await store.next_generation() > max(gens)


async def test_two_coordinators_share_the_generation_counter(store: Store, store_url: str) -> None:
    async with await Store.open(store_url) as other:
        gens = await asyncio.gather(
            *[s.next_generation() for _ in range(10) for s in (store, other)]
        )
    assert len(set(gens)) == 20


async def test_record_assignment(store: Store) -> None:
    assert await store.last_assignment("lyon-1") is None
    await store.record_assignment("lyon-1", 3, "hash3")
    assert await store.last_assignment("lyon-1") == (3, "hash3")
    await store.record_assignment("lyon-1", 3, "hash3")  # a retry after a lost reply
    await store.record_assignment("lyon-1", 7, "hash7")
    assert await store.last_assignment("lyon-1") == (7, "hash7")
    await store.record_assignment("aix-1", 1, "other")
    assert await store.last_assignment("lyon-1") == (7, "hash7")


async def test_assignment_rollback_refused(store: Store) -> None:
    await store.record_assignment("lyon-1", 7, "hash7")
    with pytest.raises(ConflictError):
        await store.record_assignment("lyon-1", 6, "hash6")
    with pytest.raises(ConflictError):
        await store.record_assignment("lyon-1", 7, "another body")
    assert await store.last_assignment("lyon-1") == (7, "hash7")


# -- integrity check ----------------------------------------------------------------------------


async def test_check_healthy_store(store: Store, blobs: BlobStore) -> None:
    await push(store, "ns/f", "1.0.0", blobs)
    await store.set_deployment("ns/f", "1.0.0", 1, 1, {})
    await store.set_placements("ns/f", "1.0.0", ["a"])
    assert await store.check(blobs) == []


async def test_check_reports_missing_blob(store: Store, blobs: BlobStore) -> None:
    digest = await push(store, "ns/f", "1.0.0", blobs)
    blobs.delete(digest)
    problems = await store.check(blobs)
    assert len(problems) == 1 and digest in problems[0] and "missing" in problems[0]


async def test_check_reports_dangling_rows(tmp_path: Path, blobs: BlobStore) -> None:
    path = tmp_path / "state.db"
    async with await Store.open(sqlite_url(path)) as store:
        await push(store, "ns/f", "1.0.0", blobs)
    # Rows the foreign keys would refuse, written behind the store's back.
    raw = sqlite3.connect(path)
    raw.execute("PRAGMA foreign_keys=OFF")
    raw.execute(
        "INSERT INTO deployments VALUES ('ns/f', '3.0.0', 1, 1, '{}', 0, '2.0.0', 1, 0.0, NULL)"
    )
    raw.execute("INSERT INTO placements VALUES ('ns/g', 'n1', '1.0.0', 0.0)")
    raw.commit()
    raw.close()
    async with await Store.open(sqlite_url(path)) as store:
        problems = await store.check(blobs)
    assert any("deployment ns/f: version 3.0.0" in p for p in problems), problems
    assert any("previous version 2.0.0" in p for p in problems), problems
    assert any("placement ns/g@1.0.0 on n1" in p for p in problems), problems
    assert any("above the counter" in p for p in problems), problems


# -- crash safety -------------------------------------------------------------------------------

_WRITER = textwrap.dedent(
    """
    import asyncio, hashlib, os, sys
    from pathlib import Path
    from fnmesh.coordinator.store import BlobStore, Store

    async def main(url, root, run):
        store = await Store.open(url)
        blobs = BlobStore(Path(root))
        i = 0
        while True:
            i += 1
            version = f"{run}.{i}.0"
            data = os.urandom(256)
            digest = hashlib.sha256(data).hexdigest()
            blobs.put(digest, data)
            await store.add_version("crash/fn", version, digest, {"v": version}, "p", 256, "op")
            await store.set_deployment("crash/fn", version, 1, 1 + i % 3, {"region": "eu"})
            await store.set_placements("crash/fn", version, [f"n{i % 5}", f"n{(i + 1) % 5}"])
            node = f"n{i % 5}"
            await store.record_assignment(node, await store.next_generation(), digest)
            print(i, flush=True)

    asyncio.run(main(*sys.argv[1:]))
    """
)


async def test_killed_writer_leaves_a_consistent_store(
    store_url: str, tmp_path: Path, blobs: BlobStore
) -> None:
    kills = max(1, round(3 * SCALE))
    rng = random.Random()
    for run in range(1, kills + 1):
        # The first progress lines come early; read a random number of them so
        # the kill lands at a different point of the write loop each time.
        wanted = rng.randint(1, 8)
        stderr = tmp_path / f"writer{run}.err"
        with stderr.open("wb") as err:
            proc = subprocess.Popen(
                [sys.executable, "-c", _WRITER, store_url, str(blobs.root), str(run)],
                stdout=subprocess.PIPE,
                stderr=err,
            )
        assert proc.stdout is not None
        try:
            last = 0
            while last < wanted:
                line = proc.stdout.readline()
                assert line, f"writer died early: {stderr.read_text()[-2000:]}"
                last = int(line)
            os.kill(proc.pid, signal.SIGKILL)
        finally:
            if proc.poll() is None:
                proc.kill()
            proc.wait()
            proc.stdout.close()
        assert proc.returncode == -signal.SIGKILL

        blobs.sweep_temp()
        async with await Store.open(store_url) as store:
            assert await store.check(blobs) == []
            done = [v for v in await store.versions("crash/fn") if v.version.startswith(f"{run}.")]
            # Every reported iteration is durable; at most one more got in before the kill.
            assert last <= len(done) <= last + 1
            dep = await store.get_deployment("crash/fn")
            assert dep is not None and dep.version in {v.version for v in done}
            for p in await store.placements("crash/fn"):
                assert p.version in {v.version for v in done}
            gen = await store.next_generation()
            for n in range(5):
                recorded = await store.last_assignment(f"n{n}")
                assert recorded is None or recorded[0] < gen
            await push(store, "crash/fn", f"{run}.999.0", blobs)
        if store_url.startswith("sqlite"):
            raw = sqlite3.connect(store_url.split("///", 1)[1])
            try:
                assert raw.execute("PRAGMA integrity_check").fetchall() == [("ok",)]
                assert raw.execute("PRAGMA journal_mode").fetchone() == ("wal",)
            finally:
                raw.close()


# -- blobs ------------------------------------------------------------------------------------


def test_blob_round_trip(blobs: BlobStore) -> None:
    data = b"bundle bytes" * 1000
    digest = digest_of(data)
    assert not blobs.has(digest)
    path = blobs.put(digest, data)
    assert path == blobs.root / digest[:2] / f"{digest}.fnb"
    assert blobs.has(digest) and blobs.get(digest) == data
    assert list(blobs.digests()) == [digest]
    assert blobs.delete(digest) is True
    assert blobs.delete(digest) is False
    with pytest.raises(NotFoundError):
        blobs.get(digest)


def test_blob_put_of_existing_digest_is_a_no_op(blobs: BlobStore) -> None:
    digest = digest_of(b"first")
    blobs.put(digest, b"first")
    before = blobs.path(digest).stat()
    blobs.put(digest, b"second")
    assert blobs.get(digest) == b"first"
    assert blobs.path(digest).stat().st_mtime_ns == before.st_mtime_ns


def test_killed_blob_writer_leaves_no_partial_file(blobs: BlobStore) -> None:
    data = os.urandom(4096)
    digest = digest_of(data)
    folder = blobs.root / digest[:2]
    folder.mkdir(parents=True)
    # What a put killed between write and rename leaves behind.
    temp = folder / f".{digest}.{secrets.token_hex(8)}.tmp"
    temp.write_bytes(data[:1000])
    assert not blobs.has(digest)
    with pytest.raises(NotFoundError):
        blobs.get(digest)
    assert list(blobs.digests()) == []
    blobs.put(digest, data)
    assert blobs.get(digest) == data
    assert blobs.sweep_temp() == 1
    assert not temp.exists()
    assert blobs.get(digest) == data
    assert sorted(p.name for p in folder.iterdir()) == [f"{digest}.fnb"]


def test_sweep_temp_spares_recent_writes(blobs: BlobStore) -> None:
    folder = blobs.root / "ab"
    folder.mkdir(parents=True)
    temp = folder / f".{'ab' * 32}.0000.tmp"
    temp.write_bytes(b"in progress")
    assert blobs.sweep_temp(min_age=3600) == 0
    assert temp.exists()
    assert blobs.sweep_temp() == 1


@pytest.mark.parametrize(
    "digest",
    [
        "",
        "ab" * 31,
        "AB" * 32,
        "ab" * 33,
        "g" * 64,
        "../" * 21 + "a",
        "/" + "a" * 63,
        "a" * 63 + "\n",
    ],
)
def test_bad_digest_refused(blobs: BlobStore, digest: str) -> None:
    for call in (blobs.path, blobs.has, blobs.get, blobs.delete):
        with pytest.raises(InvalidRequestError):
            call(digest)
    with pytest.raises(InvalidRequestError):
        blobs.put(digest, b"x")
    assert list(blobs.root.rglob("*")) == []


@settings(max_examples=200, deadline=None)
@given(st.text(max_size=80))
def test_path_outside_the_store_refused(
    tmp_path_factory: pytest.TempPathFactory, digest: str
) -> None:
    root = tmp_path_factory.getbasetemp() / "blob-fuzz"
    blobs = BlobStore(root)
    is_hex = len(digest) == 64 and all(c in "0123456789abcdef" for c in digest)
    if is_hex:
        assert blobs.path(digest).parent.parent == root
    else:
        with pytest.raises(InvalidRequestError):
            blobs.path(digest)
