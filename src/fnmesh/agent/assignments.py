"""Following the coordinator's retained assignment: the node's full desired set.

For each assigned function the agent makes sure the bundle is in its cache
(fetching it from the coordinator over mutual TLS, with its own certificate,
when missing), checks that the data key in the bundle is the one the
assignment carries, starts serving it and pre-warms it. Functions no longer
assigned are drained and unloaded. Bundles given with ``--serve`` are the
node's own and are left alone.

Assignments are applied one at a time; a newer one that arrives meanwhile is
applied next, an older generation is ignored.
"""

from __future__ import annotations

import asyncio
import base64
import binascii
import contextlib
import json
import logging
import ssl
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from typing import Any

import aiohttp

from fnmesh.agent.cache import BundleCache
from fnmesh.agent.service import InvocationService
from fnmesh.agent.warm_pool import WarmPool
from fnmesh.errors import MeshError
from fnmesh.functions.bundle import Bundle
from fnmesh.functions.rollback import verify_order

log = logging.getLogger("fnmesh.agent.assign")

#: Largest bundle the agent will download.
MAX_BUNDLE = 4 << 30


class AssignmentError(MeshError):
    """An assignment could not be parsed or carried out."""


@dataclass(frozen=True, slots=True)
class Entry:
    function: str
    version: str
    digest: str
    key: bytes
    allow_spill: bool
    rollback: dict[str, str] | None = None


@dataclass(frozen=True, slots=True)
class Assignment:
    generation: int
    coordinator: str | None
    entries: tuple[Entry, ...]

    @classmethod
    def parse(cls, raw: bytes) -> Assignment:
        try:
            obj = json.loads(raw)
            gen = obj["generation"]
            if not isinstance(gen, int):
                raise TypeError("generation must be an integer")
            entries = []
            for e in obj.get("functions", []):
                entries.append(
                    Entry(
                        function=str(e["function"]),
                        version=str(e["version"]),
                        digest=str(e["digest"]),
                        key=base64.b64decode(e["key"], validate=True),
                        allow_spill=bool(e.get("allow_spill", False)),
                        rollback=e.get("rollback") if isinstance(e.get("rollback"), dict) else None,
                    )
                )
            coord = obj.get("coordinator")
            return cls(gen, str(coord) if coord else None, tuple(entries))
        except (ValueError, KeyError, TypeError, binascii.Error) as e:
            raise AssignmentError(f"assignment is malformed: {e}") from e


class Assignments:
    """Applies assignments to the cache, the invocation service and the warm pool."""

    def __init__(
        self,
        *,
        node_cn: str,
        node: str,
        cache: BundleCache,
        service: InvocationService,
        pool: WarmPool,
        ssl_context: ssl.SSLContext,
        local: Callable[[], set[str]],
        on_change: Callable[[], Awaitable[None]],
        switch: Callable[[Bundle, bool], Awaitable[None]],
    ) -> None:
        self.node_cn = node_cn
        self.node = node
        self.cache = cache
        self.service = service
        self.pool = pool
        self._ssl = ssl_context
        self._local = local
        self._on_change = on_change
        self._switch = switch
        self.generation = -1
        self.coordinator_url: str | None = None
        self.current: dict[str, Entry] = {}
        self.allow_spill: dict[str, bool] = {}
        self._pending: Assignment | None = None
        self._wake = asyncio.Event()
        self._task: asyncio.Task[None] | None = None
        self.applied = asyncio.Event()
        self.errors: dict[str, str] = {}

    def start(self) -> None:
        self._task = asyncio.get_running_loop().create_task(self._run())

    async def async_stop(self) -> None:
        if self._task is not None:
            self._task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._task
            self._task = None

    def on_message(self, payload: bytes) -> None:
        if not payload:
            # A cleared retained assignment: serve nothing assigned.
            assignment = Assignment(self.generation + 1, None, ())
        else:
            try:
                assignment = Assignment.parse(payload)
            except AssignmentError as e:
                log.warning("ignored an assignment: %s", e)
                return
        if assignment.generation <= self.generation and payload:
            log.info(
                "ignored assignment generation %d (have %d)", assignment.generation, self.generation
            )
            return
        self._pending = assignment
        self._wake.set()

    async def _run(self) -> None:
        while True:
            await self._wake.wait()
            self._wake.clear()
            a, self._pending = self._pending, None
            if a is None:
                continue
            try:
                await self.async_apply(a)
            except Exception:  # one bad assignment must not stop the follower
                log.exception("failed to apply assignment %d", a.generation)

    async def async_apply(self, a: Assignment) -> None:
        self.generation = a.generation
        if a.coordinator:
            self.coordinator_url = a.coordinator
        wanted = {e.function: e for e in a.entries}
        errors: dict[str, str] = {}
        for fid, e in wanted.items():
            self.allow_spill[fid] = e.allow_spill
            if fid in self._local():
                continue
            try:
                await self._ensure(e, a.coordinator)
                self.current[fid] = e
                self.allow_spill[fid] = e.allow_spill
            except MeshError as err:
                errors[fid] = str(err)
                log.warning("cannot serve %s@%s: %s", fid, e.version, err)
        for fid in list(self.current):
            if fid not in wanted:
                del self.current[fid]
                self.allow_spill.pop(fid, None)
                if fid not in self._local():
                    await self.service.async_remove(fid)
        self.errors = errors
        await self._on_change()
        self.applied.set()

    async def _ensure(self, e: Entry, coordinator: str | None) -> None:
        slot = self.service.slots().get(e.function)
        if slot is not None and slot.digest == e.digest:
            return
        if not self.cache.has(e.digest):
            if not coordinator:
                raise AssignmentError(
                    f"bundle {e.digest[:12]} is not cached and no coordinator URL was given"
                )
            data = await self._fetch(coordinator, e.digest)
            bundle = await asyncio.get_running_loop().run_in_executor(None, self.cache.put, data)
        else:
            bundle = self.cache.bundle(e.digest)
        self.cache.check_assigned_key(bundle, e.key)
        if bundle.manifest.name != e.function or bundle.manifest.version != e.version:
            raise AssignmentError(
                f"bundle {e.digest[:12]} is {bundle.manifest.name}@{bundle.manifest.version}, "
                f"the assignment says {e.function}@{e.version}"
            )
        allow_rollback = False
        if e.rollback is not None:
            # Only an operator's signed order lets a node go back to an older version.
            verify_order(e.rollback, self.cache.trust, function=e.function, version=e.version)
            allow_rollback = True
        self.cache.check_version(bundle.manifest, allow_rollback=allow_rollback)
        await self._switch(bundle, allow_rollback)

    async def _fetch(self, coordinator: str, digest: str) -> bytes:
        url = f"{coordinator.rstrip('/')}/v1/nodes/{self.node}/bundles/{digest}"
        timeout = aiohttp.ClientTimeout(total=600, sock_connect=10)
        try:
            async with aiohttp.ClientSession(timeout=timeout) as s, s.get(url, ssl=self._ssl) as r:
                if r.status != 200:
                    text = (await r.text())[:300]
                    raise AssignmentError(
                        f"coordinator refused bundle {digest[:12]}: {r.status} {text}"
                    )
                size = r.content_length or 0
                if size > MAX_BUNDLE:
                    raise AssignmentError(
                        f"bundle {digest[:12]} is {size} bytes, over {MAX_BUNDLE}"
                    )
                chunks: list[bytes] = []
                got = 0
                next_report = 8 << 20
                async for chunk in r.content.iter_chunked(1 << 20):
                    chunks.append(chunk)
                    got += len(chunk)
                    if got > MAX_BUNDLE:
                        raise AssignmentError(f"bundle {digest[:12]} is over {MAX_BUNDLE} bytes")
                    if size and got >= next_report:
                        log.info(
                            "fetching %s: %d%% of %d bytes", digest[:12], got * 100 // size, size
                        )
                        next_report += 8 << 20
                return b"".join(chunks)
        except aiohttp.ClientError as err:
            raise AssignmentError(
                f"cannot fetch bundle {digest[:12]} from {coordinator}: {err}"
            ) from err

    def status(self) -> dict[str, Any]:
        return {"generation": self.generation, "errors": dict(self.errors)}
