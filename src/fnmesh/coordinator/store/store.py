"""The coordinator's durable state over an async SQLAlchemy engine (SQLite or PostgreSQL).

Every write is one transaction, so a coordinator killed mid-write leaves the
old state or the new one, never a mix. On SQLite the file runs in WAL mode
with ``synchronous=FULL`` and write transactions start with ``BEGIN
IMMEDIATE`` (they take the write lock up front instead of failing to upgrade
a read lock); on PostgreSQL counters advance with ``UPDATE … RETURNING`` and
rows that decide a write are locked, so several coordinators can share one
database.
"""

from __future__ import annotations

import time
from collections.abc import AsyncIterator, Callable, Sequence
from contextlib import asynccontextmanager
from dataclasses import asdict
from pathlib import Path
from types import TracebackType
from typing import Any, Self

from sqlalchemy import Table, delete, event, func, literal, select, text, update
from sqlalchemy.dialects import postgresql as pg_dialect
from sqlalchemy.dialects import sqlite as sqlite_dialect
from sqlalchemy.engine import Connection, make_url
from sqlalchemy.exc import ArgumentError, DBAPIError, IntegrityError
from sqlalchemy.ext.asyncio import AsyncConnection, AsyncEngine, create_async_engine
from sqlalchemy.sql.dml import Insert

from fnmesh.coordinator.errors import (
    ConflictError,
    InvalidRequestError,
    NotFoundError,
    StoreError,
)
from fnmesh.coordinator.store import schema as s
from fnmesh.coordinator.store.blobs import BlobStore, check_digest
from fnmesh.coordinator.store.records import (
    AuditEntry,
    DeploymentRecord,
    FunctionRecord,
    NodeRecord,
    PlacementRecord,
    VersionRecord,
)
from fnmesh.functions.errors import ManifestError
from fnmesh.functions.manifest import semver_key, split_function_id

#: Execution option that makes SQLite open the transaction with BEGIN IMMEDIATE.
_WRITE = "fnmesh_write"
#: Key of the PostgreSQL advisory lock that serialises schema creation between coordinators.
_SCHEMA_LOCK = 0x666E6D657368  # "fnmesh"
#: How long a SQLite connection waits for another writer's lock, in seconds.
_SQLITE_BUSY_TIMEOUT = 30.0


def sqlite_url(path: Path | str) -> str:
    """The store URL for a SQLite file at ``path``."""
    return f"sqlite+aiosqlite:///{Path(path)}"


def _sqlite_connect(dbapi_connection: Any, _record: Any) -> None:
    # We emit BEGIN ourselves (see _sqlite_begin); the driver's implicit BEGIN
    # would skip SELECTs and DDL and could not take the write lock up front.
    dbapi_connection.isolation_level = None
    cursor = dbapi_connection.cursor()
    try:
        cursor.execute("PRAGMA journal_mode=WAL")
        cursor.execute("PRAGMA synchronous=FULL")
        cursor.execute("PRAGMA foreign_keys=ON")
        cursor.execute(f"PRAGMA busy_timeout={int(_SQLITE_BUSY_TIMEOUT * 1000)}")
    finally:
        cursor.close()


def _sqlite_begin(conn: Connection) -> None:
    write = conn.get_execution_options().get(_WRITE, False)
    conn.exec_driver_sql("BEGIN IMMEDIATE" if write else "BEGIN")


def _make_engine(url: str) -> AsyncEngine:
    try:
        sa_url = make_url(url)
    except ArgumentError as e:
        raise InvalidRequestError(f"store URL {url!r} does not parse: {e}") from e
    backend = sa_url.get_backend_name()
    if backend == "sqlite":
        engine = create_async_engine(sa_url, connect_args={"timeout": _SQLITE_BUSY_TIMEOUT})
        event.listen(engine.sync_engine, "connect", _sqlite_connect)
        event.listen(engine.sync_engine, "begin", _sqlite_begin)
        return engine
    if backend == "postgresql":
        return create_async_engine(sa_url, pool_pre_ping=True)
    raise InvalidRequestError(f"store URL {url!r}: only sqlite and postgresql are supported")


def _check_function(function: str) -> None:
    try:
        split_function_id(function)
    except ManifestError as e:
        raise InvalidRequestError(str(e)) from e


def _check_version(version: str) -> None:
    try:
        semver_key(version)
    except ManifestError as e:
        raise InvalidRequestError(str(e)) from e


def _version(row: Any) -> VersionRecord:
    return VersionRecord(
        function=row.function,
        version=row.version,
        digest=row.digest,
        manifest=dict(row.manifest),
        publisher=row.publisher,
        size=int(row.size),
        pushed_by=row.pushed_by,
        pushed_at=float(row.pushed_at),
    )


def _deployment(row: Any) -> DeploymentRecord:
    return DeploymentRecord(
        function=row.function,
        version=row.version,
        min_replicas=int(row.min_replicas),
        max_replicas=int(row.max_replicas),
        where=dict(row.where),
        allow_spill=bool(row.allow_spill),
        previous_version=row.previous_version,
        generation=int(row.generation),
        updated_at=float(row.updated_at),
        rollback=row.rollback,
    )


def _node(row: Any) -> NodeRecord:
    return NodeRecord(
        name=row.name,
        cn=row.cn,
        labels=dict(row.labels),
        hardware=dict(row.hardware),
        state=row.state,
        status=dict(row.status),
        fingerprint=row.fingerprint,
        last_seen=float(row.last_seen),
        draining=bool(row.draining),
    )


def _audit(row: Any) -> AuditEntry:
    return AuditEntry(
        seq=int(row.seq),
        ts=float(row.ts),
        who=row.who,
        action=row.action,
        detail=dict(row.detail),
        prev_hash=row.prev_hash,
        hash=row.hash,
    )


def _placement(row: Any) -> PlacementRecord:
    return PlacementRecord(
        function=row.function, version=row.version, node=row.node, since=float(row.since)
    )


class Store:
    """The coordinator's state: functions and versions, deployments, nodes, placements,
    the generations of node assignments, grants and groups, and the audit log.
    Open with :meth:`Store.open`."""

    def __init__(self, engine: AsyncEngine) -> None:
        self._engine = engine
        self._dialect = engine.dialect.name

    # -- life cycle ---------------------------------------------------------

    @classmethod
    async def open(cls, url: str) -> Store:
        """Connect to ``url`` and create the tables that are missing."""
        engine = _make_engine(url)
        store = cls(engine)
        try:
            await store._create()
        except BaseException:
            await engine.dispose()
            raise
        return store

    async def close(self) -> None:
        """Close every pooled connection."""
        await self._engine.dispose()

    async def __aenter__(self) -> Self:
        return self

    async def __aexit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        await self.close()

    @property
    def url(self) -> str:
        """The store's URL, password hidden."""
        return self._engine.url.render_as_string(hide_password=True)

    @property
    def dialect(self) -> str:
        """``sqlite`` or ``postgresql``."""
        return self._dialect

    async def _create(self) -> None:
        async with self._tx(write=True) as conn:
            if self._dialect == "postgresql":
                await conn.execute(text("SELECT pg_advisory_xact_lock(:k)"), {"k": _SCHEMA_LOCK})
            await conn.run_sync(s.metadata.create_all)
            await conn.execute(
                self._insert_ignore(s.schema_version, {"id": 1, "version": s.SCHEMA_VERSION})
            )
            for name in s.COUNTERS:
                await conn.execute(self._insert_ignore(s.counters, {"name": name, "value": 0}))
            await conn.execute(
                self._insert_ignore(s.audit_head, {"id": 1, "seq": 0, "hash": s.AUDIT_GENESIS})
            )
            found = (await conn.execute(select(s.schema_version.c.version))).scalar_one()
        if found != s.SCHEMA_VERSION:
            raise StoreError(
                f"store {self.url} has schema version {found}; this fnmesh knows {s.SCHEMA_VERSION}"
            )

    # -- plumbing -------------------------------------------------------------

    @asynccontextmanager
    async def _tx(self, *, write: bool) -> AsyncIterator[AsyncConnection]:
        """One transaction; commits on success, rolls back on any exception."""
        try:
            async with self._engine.connect() as conn:
                if write:
                    await conn.execution_options(**{_WRITE: True})
                async with conn.begin():
                    yield conn
        except IntegrityError as e:
            raise ConflictError(f"store refused a write: {e.orig}") from e
        except DBAPIError as e:
            raise StoreError(f"store {self.url}: {e.orig}") from e
        except OSError as e:
            raise StoreError(f"store {self.url}: {e}") from e

    def _insert(self, table: Table, values: dict[str, Any]) -> Any:
        if self._dialect == "postgresql":
            return pg_dialect.insert(table).values(values)
        return sqlite_dialect.insert(table).values(values)

    def _insert_ignore(self, table: Table, values: dict[str, Any]) -> Insert:
        stmt: Insert = self._insert(table, values).on_conflict_do_nothing()
        return stmt

    async def _bump(self, conn: AsyncConnection, counter: str) -> int:
        result = await conn.execute(
            update(s.counters)
            .where(s.counters.c.name == counter)
            .values(value=s.counters.c.value + 1)
            .returning(s.counters.c.value)
        )
        return int(result.scalar_one())

    async def _counter(self, conn: AsyncConnection, counter: str) -> int:
        result = await conn.execute(select(s.counters.c.value).where(s.counters.c.name == counter))
        return int(result.scalar_one())

    # -- functions and versions ---------------------------------------------

    async def add_version(
        self,
        function: str,
        version: str,
        digest: str,
        manifest: dict[str, Any],
        publisher: str,
        size: int,
        pushed_by: str,
    ) -> VersionRecord:
        """Record a pushed version; pushing the same digest again returns the stored record.

        Raises ConflictError if the version exists with a different digest.
        """
        _check_function(function)
        _check_version(version)
        check_digest(digest)
        now = time.time()
        key = (s.versions.c.function == function) & (s.versions.c.version == version)
        async with self._tx(write=True) as conn:
            await conn.execute(
                self._insert_ignore(s.functions, {"function": function, "created_at": now})
            )
            await conn.execute(
                self._insert_ignore(
                    s.versions,
                    {
                        "function": function,
                        "version": version,
                        "digest": digest,
                        "manifest": manifest,
                        "publisher": publisher,
                        "size": size,
                        "pushed_by": pushed_by,
                        "pushed_at": now,
                    },
                )
            )
            record = _version((await conn.execute(select(s.versions).where(key))).one())
            if record.digest != digest:
                raise ConflictError(
                    f"{function}@{version} was already pushed with digest {record.digest}, "
                    f"not {digest}; push a new version"
                )
        return record

    async def get_version(self, function: str, version: str) -> VersionRecord:
        """One version; NotFoundError if it was never pushed."""
        key = (s.versions.c.function == function) & (s.versions.c.version == version)
        async with self._tx(write=False) as conn:
            row = (await conn.execute(select(s.versions).where(key))).first()
        if row is None:
            raise NotFoundError(f"no version {function}@{version}")
        return _version(row)

    async def versions(self, function: str) -> list[VersionRecord]:
        """Every version of ``function``, oldest to newest; empty for an unknown function."""
        async with self._tx(write=False) as conn:
            rows = (
                await conn.execute(select(s.versions).where(s.versions.c.function == function))
            ).all()
        return sorted((_version(r) for r in rows), key=lambda v: semver_key(v.version))

    async def version_by_digest(self, digest: str) -> VersionRecord:
        """The version whose bundle has ``digest``; NotFoundError if none."""
        check_digest(digest)
        async with self._tx(write=False) as conn:
            row = (
                await conn.execute(
                    select(s.versions)
                    .where(s.versions.c.digest == digest)
                    .order_by(s.versions.c.function, s.versions.c.version)
                    .limit(1)
                )
            ).first()
        if row is None:
            raise NotFoundError(f"no version has digest {digest}")
        return _version(row)

    async def list_functions(self) -> list[FunctionRecord]:
        """Every function with its versions sorted by semver, by name."""
        async with self._tx(write=False) as conn:
            rows = (
                await conn.execute(
                    select(s.functions.c.function, s.versions.c.version).select_from(
                        s.functions.outerjoin(
                            s.versions, s.versions.c.function == s.functions.c.function
                        )
                    )
                )
            ).all()
        by_name: dict[str, list[str]] = {}
        for name, version in rows:
            found = by_name.setdefault(name, [])
            if version is not None:
                found.append(version)
        out = []
        for name in sorted(by_name):
            ordered = sorted(by_name[name], key=semver_key)
            out.append(FunctionRecord(name, ordered, ordered[-1] if ordered else None))
        return out

    # -- deployments ----------------------------------------------------------

    async def set_deployment(
        self,
        function: str,
        version: str,
        min_replicas: int,
        max_replicas: int,
        where: dict[str, str],
        allow_spill: bool = False,
        rollback: dict[str, Any] | None = None,
    ) -> DeploymentRecord:
        """Create or change a function's deployment and bump the deployment generation.

        ``previous_version`` is filled from the old row: the old version if the
        version changes, else the old row's own ``previous_version``.
        NotFoundError if the version was never pushed.
        """
        if min_replicas < 0 or max_replicas < min_replicas:
            raise InvalidRequestError(
                f"replicas must satisfy 0 <= min <= max (got {min_replicas}..{max_replicas})"
            )
        if not all(isinstance(k, str) and isinstance(v, str) for k, v in where.items()):
            raise InvalidRequestError("where must map label names to label values (strings)")
        key = (s.versions.c.function == function) & (s.versions.c.version == version)
        async with self._tx(write=True) as conn:
            # Serialises changes to this function's deployment between coordinators.
            await conn.execute(
                select(s.functions.c.function)
                .where(s.functions.c.function == function)
                .with_for_update(key_share=True)
            )
            if (await conn.execute(select(s.versions.c.version).where(key))).first() is None:
                raise NotFoundError(f"cannot deploy {function}@{version}: no such version")
            old = (
                await conn.execute(
                    select(s.deployments).where(s.deployments.c.function == function)
                )
            ).first()
            if old is None:
                previous = None
            elif old.version == version:
                previous = old.previous_version
            else:
                previous = old.version
            generation = await self._bump(conn, s.DEPLOYMENT_COUNTER)
            record = DeploymentRecord(
                function=function,
                version=version,
                min_replicas=min_replicas,
                max_replicas=max_replicas,
                where=dict(where),
                allow_spill=allow_spill,
                previous_version=previous,
                generation=generation,
                updated_at=time.time(),
                rollback=rollback,
            )
            values = asdict(record)
            if old is None:
                await conn.execute(s.deployments.insert().values(values))
            else:
                await conn.execute(
                    update(s.deployments).where(s.deployments.c.function == function).values(values)
                )
        return record

    async def get_deployment(self, function: str) -> DeploymentRecord | None:
        """The function's deployment, or None if it is not deployed."""
        async with self._tx(write=False) as conn:
            row = (
                await conn.execute(
                    select(s.deployments).where(s.deployments.c.function == function)
                )
            ).first()
        return None if row is None else _deployment(row)

    async def list_deployments(self) -> list[DeploymentRecord]:
        """Every deployment, by function name."""
        async with self._tx(write=False) as conn:
            rows = (
                await conn.execute(select(s.deployments).order_by(s.deployments.c.function))
            ).all()
        return [_deployment(r) for r in rows]

    async def delete_deployment(self, function: str) -> bool:
        """Remove the function's deployment (bumping the generation); False if there was none."""
        async with self._tx(write=True) as conn:
            result = await conn.execute(
                delete(s.deployments).where(s.deployments.c.function == function)
            )
            if result.rowcount == 0:
                return False
            await self._bump(conn, s.DEPLOYMENT_COUNTER)
        return True

    async def deployment_generation(self) -> int:
        """The deployment generation now (0 before the first change)."""
        async with self._tx(write=False) as conn:
            return await self._counter(conn, s.DEPLOYMENT_COUNTER)

    # -- nodes ----------------------------------------------------------------

    async def upsert_node(
        self,
        name: str,
        cn: str,
        labels: dict[str, str],
        hardware: dict[str, Any],
        state: str,
        status: dict[str, Any],
        fingerprint: str,
        last_seen: float,
    ) -> NodeRecord:
        """Create or refresh a node; its draining flag (an operator's choice) is kept."""
        values: dict[str, Any] = {
            "name": name,
            "cn": cn,
            "labels": dict(labels),
            "hardware": dict(hardware),
            "state": state,
            "status": dict(status),
            "fingerprint": fingerprint,
            "last_seen": float(last_seen),
        }
        stmt = self._insert(s.nodes, {**values, "draining": False})
        stmt = stmt.on_conflict_do_update(
            index_elements=[s.nodes.c.name],
            set_={k: stmt.excluded[k] for k in values if k != "name"},
        )
        async with self._tx(write=True) as conn:
            await conn.execute(stmt)
            row = (await conn.execute(select(s.nodes).where(s.nodes.c.name == name))).one()
        return _node(row)

    async def _update_node(self, name: str, values: dict[str, Any]) -> NodeRecord:
        async with self._tx(write=True) as conn:
            result = await conn.execute(
                update(s.nodes).where(s.nodes.c.name == name).values(values)
            )
            if result.rowcount == 0:
                raise NotFoundError(f"no node {name}")
            row = (await conn.execute(select(s.nodes).where(s.nodes.c.name == name))).one()
        return _node(row)

    async def set_node_state(
        self, name: str, state: str, last_seen: float | None = None
    ) -> NodeRecord:
        """Change a node's state (and last-seen time if given); NotFoundError if unknown."""
        values: dict[str, Any] = {"state": state}
        if last_seen is not None:
            values["last_seen"] = float(last_seen)
        return await self._update_node(name, values)

    async def set_draining(self, name: str, draining: bool) -> NodeRecord:
        """Mark a node draining (no new work) or not; NotFoundError if unknown."""
        return await self._update_node(name, {"draining": draining})

    async def get_node(self, name: str) -> NodeRecord:
        """One node; NotFoundError if unknown."""
        async with self._tx(write=False) as conn:
            row = (await conn.execute(select(s.nodes).where(s.nodes.c.name == name))).first()
        if row is None:
            raise NotFoundError(f"no node {name}")
        return _node(row)

    async def list_nodes(self) -> list[NodeRecord]:
        """Every node, by name."""
        async with self._tx(write=False) as conn:
            rows = (await conn.execute(select(s.nodes).order_by(s.nodes.c.name))).all()
        return [_node(r) for r in rows]

    # -- placements -----------------------------------------------------------

    async def set_placements(
        self, function: str, version: str, nodes: Sequence[str]
    ) -> list[PlacementRecord]:
        """Replace the function's placements with ``version`` on ``nodes``, in one transaction.

        A node that keeps the same version keeps its ``since``; an empty list
        removes them all. NotFoundError if the version was never pushed.
        """
        wanted = list(dict.fromkeys(nodes))
        key = (s.versions.c.function == function) & (s.versions.c.version == version)
        now = time.time()
        async with self._tx(write=True) as conn:
            if (await conn.execute(select(s.versions.c.version).where(key))).first() is None:
                raise NotFoundError(f"cannot place {function}@{version}: no such version")
            old = {
                r.node: r
                for r in await conn.execute(
                    select(s.placements).where(s.placements.c.function == function)
                )
            }
            await conn.execute(delete(s.placements).where(s.placements.c.function == function))
            rows = []
            for node in wanted:
                prior = old.get(node)
                since = (
                    float(prior.since) if prior is not None and prior.version == version else now
                )
                rows.append(
                    {"function": function, "node": node, "version": version, "since": since}
                )
            if rows:
                await conn.execute(s.placements.insert(), rows)
        return sorted((_placement_from(r) for r in rows), key=lambda p: p.node)

    async def placements(self, function: str | None = None) -> list[PlacementRecord]:
        """Every placement, or one function's, by function then node."""
        stmt = select(s.placements).order_by(s.placements.c.function, s.placements.c.node)
        if function is not None:
            stmt = stmt.where(s.placements.c.function == function)
        async with self._tx(write=False) as conn:
            rows = (await conn.execute(stmt)).all()
        return [_placement(r) for r in rows]

    async def placements_for_node(self, node: str) -> list[PlacementRecord]:
        """What is placed on ``node``, by function."""
        stmt = (
            select(s.placements)
            .where(s.placements.c.node == node)
            .order_by(s.placements.c.function)
        )
        async with self._tx(write=False) as conn:
            rows = (await conn.execute(stmt)).all()
        return [_placement(r) for r in rows]

    async def delete_placements(self, function: str) -> int:
        """Remove every placement of ``function``; returns how many there were."""
        async with self._tx(write=True) as conn:
            result = await conn.execute(
                delete(s.placements).where(s.placements.c.function == function)
            )
        return int(result.rowcount)

    # -- node assignments -----------------------------------------------------

    async def next_generation(self) -> int:
        """A new assignment generation, larger than every one handed out before."""
        async with self._tx(write=True) as conn:
            return await self._bump(conn, s.ASSIGNMENT_COUNTER)

    async def record_assignment(self, node: str, generation: int, body_hash: str) -> None:
        """Remember the assignment last published to ``node``.

        Recording the same generation and hash again is a no-op; an older
        generation, or the same one with another body, is a ConflictError
        (generations only grow).
        """
        stmt = self._insert(
            s.assignments,
            {
                "node": node,
                "generation": generation,
                "body_hash": body_hash,
                "recorded_at": time.time(),
            },
        )
        stmt = stmt.on_conflict_do_update(
            index_elements=[s.assignments.c.node],
            set_={
                "generation": stmt.excluded.generation,
                "body_hash": stmt.excluded.body_hash,
                "recorded_at": stmt.excluded.recorded_at,
            },
            where=s.assignments.c.generation < stmt.excluded.generation,
        ).returning(s.assignments.c.node)
        async with self._tx(write=True) as conn:
            # RETURNING, not rowcount: drivers disagree on rowcount after an upsert.
            if (await conn.execute(stmt)).first() is not None:
                return
            row = (
                await conn.execute(
                    select(s.assignments.c.generation, s.assignments.c.body_hash).where(
                        s.assignments.c.node == node
                    )
                )
            ).one()
            if row.generation != generation or row.body_hash != body_hash:
                raise ConflictError(
                    f"node {node} already has assignment generation {row.generation}; "
                    f"refusing generation {generation}"
                )

    async def last_assignment(self, node: str) -> tuple[int, str] | None:
        """The (generation, body hash) last recorded for ``node``, or None."""
        async with self._tx(write=False) as conn:
            row = (
                await conn.execute(
                    select(s.assignments.c.generation, s.assignments.c.body_hash).where(
                        s.assignments.c.node == node
                    )
                )
            ).first()
        return None if row is None else (int(row.generation), str(row.body_hash))

    # -- grants and groups ------------------------------------------------------

    async def add_grant(self, subject: str, function: str) -> bool:
        """Let ``subject`` (a device CN or ``group:NAME``) invoke ``function``.

        False if it already could (granting twice is a no-op).
        """
        _check_function(function)
        stmt = self._insert_ignore(
            s.grants, {"subject": subject, "function": function, "granted_at": time.time()}
        ).returning(s.grants.c.subject)
        async with self._tx(write=True) as conn:
            return (await conn.execute(stmt)).first() is not None

    async def remove_grant(self, subject: str, function: str) -> bool:
        """Withdraw one grant; False if there was none."""
        key = (s.grants.c.subject == subject) & (s.grants.c.function == function)
        async with self._tx(write=True) as conn:
            result = await conn.execute(delete(s.grants).where(key))
        return bool(result.rowcount)

    async def add_member(self, group: str, device: str) -> bool:
        """Put a device (CN) in a group; False if it already was."""
        stmt = self._insert_ignore(
            s.members, {"group": group, "device": device, "added_at": time.time()}
        ).returning(s.members.c.device)
        async with self._tx(write=True) as conn:
            return (await conn.execute(stmt)).first() is not None

    async def add_members(self, group: str, devices: Sequence[str]) -> int:
        """Put many devices in a group in one transaction; returns how many were new."""
        now = time.time()
        rows = [{"group": group, "device": d, "added_at": now} for d in dict.fromkeys(devices)]
        if not rows:
            return 0
        count = select(func.count()).select_from(s.members).where(s.members.c.group == group)
        dialect = pg_dialect if self._dialect == "postgresql" else sqlite_dialect
        async with self._tx(write=True) as conn:
            before = (await conn.execute(count)).scalar_one()
            await conn.execute(dialect.insert(s.members).on_conflict_do_nothing(), rows)
            after = (await conn.execute(count)).scalar_one()
        return int(after) - int(before)

    async def remove_member(self, group: str, device: str) -> bool:
        """Take a device out of a group; False if it was not in it."""
        key = (s.members.c.group == group) & (s.members.c.device == device)
        async with self._tx(write=True) as conn:
            result = await conn.execute(delete(s.members).where(key))
        return bool(result.rowcount)

    async def put_policy(self, name: str, body: dict[str, Any]) -> int:
        """Create or replace a policy; returns its new version (versions only go up)."""
        async with self._tx(write=True) as conn:
            row = (
                await conn.execute(
                    select(s.policy_versions.c.version)
                    .where(s.policy_versions.c.name == name)
                    .with_for_update()
                )
            ).first()
            version = (int(row.version) if row else 0) + 1
            if row is None:
                await conn.execute(s.policy_versions.insert().values(name=name, version=version))
            else:
                await conn.execute(
                    update(s.policy_versions)
                    .where(s.policy_versions.c.name == name)
                    .values(version=version)
                )
            values = {"name": name, "version": version, "body": body, "updated_at": time.time()}
            if (
                await conn.execute(select(s.policies.c.name).where(s.policies.c.name == name))
            ).first():
                await conn.execute(
                    update(s.policies).where(s.policies.c.name == name).values(values)
                )
            else:
                await conn.execute(s.policies.insert().values(values))
        return version

    async def delete_policy(self, name: str) -> bool:
        async with self._tx(write=True) as conn:
            result = await conn.execute(delete(s.policies).where(s.policies.c.name == name))
        return bool(result.rowcount)

    async def list_policies(self) -> list[tuple[str, int, dict[str, Any]]]:
        """Every policy as (name, version, body), by name."""
        async with self._tx(write=False) as conn:
            rows = await conn.execute(select(s.policies).order_by(s.policies.c.name))
            return [(r.name, int(r.version), dict(r.body)) for r in rows]

    async def list_grants(self) -> list[tuple[str, str]]:
        """Every (subject, function), sorted."""
        stmt = select(s.grants.c.subject, s.grants.c.function).order_by(
            s.grants.c.subject, s.grants.c.function
        )
        async with self._tx(write=False) as conn:
            return [(r.subject, r.function) for r in await conn.execute(stmt)]

    async def list_members(self, group: str | None = None) -> list[tuple[str, str]]:
        """Every (group, device), or one group's, sorted."""
        stmt = select(s.members.c.group, s.members.c.device).order_by(
            s.members.c.group, s.members.c.device
        )
        if group is not None:
            stmt = stmt.where(s.members.c.group == group)
        async with self._tx(write=False) as conn:
            return [(r.group, r.device) for r in await conn.execute(stmt)]

    async def grant_map(self, group_prefix: str) -> dict[str, set[str]]:
        """Device subject -> the functions it may invoke, directly or through its groups.

        Group subjects are ``group_prefix + group``; one read transaction, two queries.
        """
        g, m = s.grants, s.members
        direct = select(g.c.subject, g.c.function).where(~g.c.subject.startswith(group_prefix))
        via_groups = select(m.c.device, g.c.function).select_from(
            m.join(g, g.c.subject == literal(group_prefix) + m.c.group)
        )
        out: dict[str, set[str]] = {}
        async with self._tx(write=False) as conn:
            for device, function in await conn.execute(direct):
                out.setdefault(device, set()).add(function)
            for device, function in await conn.execute(via_groups):
                out.setdefault(device, set()).add(function)
        return out

    async def may_invoke(self, device: str, function: str, group_prefix: str) -> bool:
        """Whether ``device`` holds a grant for ``function``, directly or through a group."""
        g, m = s.grants, s.members
        direct = select(g.c.subject).where((g.c.subject == device) & (g.c.function == function))
        via_group = (
            select(m.c.device)
            .select_from(m.join(g, g.c.subject == literal(group_prefix) + m.c.group))
            .where((m.c.device == device) & (g.c.function == function))
        )
        async with self._tx(write=False) as conn:
            for stmt in (direct, via_group):
                if (await conn.execute(stmt.limit(1))).first() is not None:
                    return True
        return False

    # -- audit log --------------------------------------------------------------

    async def append_audit(
        self,
        who: str,
        action: str,
        detail: dict[str, Any],
        seal: Callable[[int, float, str], str],
    ) -> AuditEntry:
        """Append one audit entry after the head, in one transaction.

        ``seal(seq, ts, prev_hash)`` returns the entry's hash. Appends serialise
        on the head row (``FOR UPDATE`` on PostgreSQL, ``BEGIN IMMEDIATE`` on
        SQLite), so the chain never forks.
        """
        head = select(s.audit_head.c.seq, s.audit_head.c.hash).where(s.audit_head.c.id == 1)
        async with self._tx(write=True) as conn:
            row = (await conn.execute(head.with_for_update())).one()
            seq, prev_hash, ts = int(row.seq) + 1, str(row.hash), time.time()
            entry = AuditEntry(seq, ts, who, action, detail, prev_hash, seal(seq, ts, prev_hash))
            await conn.execute(s.audit.insert(), [asdict(entry)])
            await conn.execute(
                update(s.audit_head)
                .where(s.audit_head.c.id == 1)
                .values(seq=entry.seq, hash=entry.hash)
            )
        return entry

    async def audit_head(self) -> tuple[int, str]:
        """The (seq, hash) of the last entry appended; ``(0, genesis)`` while empty."""
        async with self._tx(write=False) as conn:
            row = (
                await conn.execute(
                    select(s.audit_head.c.seq, s.audit_head.c.hash).where(s.audit_head.c.id == 1)
                )
            ).one()
        return int(row.seq), str(row.hash)

    async def audit_extent(self) -> tuple[int, int]:
        """(highest seq stored, the head's seq), read in one statement, so one snapshot."""
        top = select(func.coalesce(func.max(s.audit.c.seq), 0)).scalar_subquery()
        head = select(s.audit_head.c.seq).where(s.audit_head.c.id == 1).scalar_subquery()
        async with self._tx(write=False) as conn:
            row = (await conn.execute(select(top, head))).one()
        return int(row[0]), int(row[1])

    async def audit_entries(
        self, *, since: int = 0, limit: int = 100, upto: int | None = None
    ) -> list[AuditEntry]:
        """Entries with ``since < seq`` (and ``seq <= upto``), oldest first, at most ``limit``."""
        stmt = select(s.audit).where(s.audit.c.seq > since).order_by(s.audit.c.seq).limit(limit)
        if upto is not None:
            stmt = stmt.where(s.audit.c.seq <= upto)
        async with self._tx(write=False) as conn:
            rows = (await conn.execute(stmt)).all()
        return [_audit(r) for r in rows]

    # -- integrity --------------------------------------------------------------

    async def check(self, blobs: BlobStore | None = None) -> list[str]:
        """Problems found in the stored state (empty when healthy).

        Checks that every version's bundle is in ``blobs`` (when given) and that
        deployments and placements name versions that exist.
        """
        problems: list[str] = []
        v = s.versions
        async with self._tx(write=False) as conn:
            if self._dialect == "sqlite":
                result = (await conn.exec_driver_sql("PRAGMA quick_check")).scalars().all()
                if list(result) != ["ok"]:
                    problems.extend(f"sqlite: {line}" for line in result)
            found = (await conn.execute(select(s.schema_version.c.version))).scalars().all()
            if list(found) != [s.SCHEMA_VERSION]:
                problems.append(
                    f"schema_version holds {list(found)}, expected [{s.SCHEMA_VERSION}]"
                )
            counter_rows = await conn.execute(select(s.counters.c.name, s.counters.c.value))
            counters = {name: int(value) for name, value in counter_rows}
            for name in s.COUNTERS:
                if name not in counters:
                    problems.append(f"counter {name!r} is missing")
            version_rows = (await conn.execute(select(v.c.function, v.c.version, v.c.digest))).all()
            dep = s.deployments
            bad_deployments = (
                await conn.execute(
                    select(dep.c.function, dep.c.version)
                    .select_from(
                        dep.outerjoin(
                            v, (v.c.function == dep.c.function) & (v.c.version == dep.c.version)
                        )
                    )
                    .where(v.c.version.is_(None))
                )
            ).all()
            prev = v.alias("prev")
            bad_previous = (
                await conn.execute(
                    select(dep.c.function, dep.c.previous_version)
                    .select_from(
                        dep.outerjoin(
                            prev,
                            (prev.c.function == dep.c.function)
                            & (prev.c.version == dep.c.previous_version),
                        )
                    )
                    .where(dep.c.previous_version.is_not(None) & prev.c.version.is_(None))
                )
            ).all()
            bad_replicas = (
                await conn.execute(
                    select(dep.c.function).where(
                        (dep.c.min_replicas < 0) | (dep.c.max_replicas < dep.c.min_replicas)
                    )
                )
            ).all()
            top_generation = (await conn.execute(select(func.max(dep.c.generation)))).scalar()
            pl = s.placements
            bad_placements = (
                await conn.execute(
                    select(pl.c.function, pl.c.version, pl.c.node)
                    .select_from(
                        pl.outerjoin(
                            v, (v.c.function == pl.c.function) & (v.c.version == pl.c.version)
                        )
                    )
                    .where(v.c.version.is_(None))
                )
            ).all()
        for function, version, digest in version_rows:
            try:
                check_digest(digest)
            except InvalidRequestError:
                problems.append(f"version {function}@{version}: malformed digest {digest!r}")
                continue
            if blobs is not None and not blobs.has(digest):
                problems.append(f"version {function}@{version}: blob {digest} is missing")
        for function, version in bad_deployments:
            problems.append(f"deployment {function}: version {version} does not exist")
        for function, version in bad_previous:
            problems.append(f"deployment {function}: previous version {version} does not exist")
        for (function,) in bad_replicas:
            problems.append(f"deployment {function}: replica bounds are inverted")
        dep_counter = counters.get(s.DEPLOYMENT_COUNTER)
        if top_generation is not None and dep_counter is not None and top_generation > dep_counter:
            problems.append(
                f"deployment generation {top_generation} is above the counter {dep_counter}"
            )
        for function, version, node in bad_placements:
            problems.append(f"placement {function}@{version} on {node}: version does not exist")
        return problems


def _placement_from(values: dict[str, Any]) -> PlacementRecord:
    return PlacementRecord(
        function=values["function"],
        version=values["version"],
        node=values["node"],
        since=float(values["since"]),
    )
