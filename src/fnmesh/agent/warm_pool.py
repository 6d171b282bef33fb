"""Loaded executors kept warm under a memory budget, keyed by (function id, version).

The pool promises:

- one load per key at a time: concurrent acquires of a key that is loading
  wait for that same load;
- least-recently-used eviction when a load would exceed the budget, and never
  of an executor that is leased (in use); when only leased executors could
  make room, the acquire fails with ``CapacityError`` instead of overcommitting;
- idle executors are unloaded ``idle_ttl_s`` after their last use, by
  ``async_sweep`` (call it periodically, or ``start_sweeper``);
- with a ``threaded`` loader, the work that was waiting for a load can ride
  on it (``ride``): it runs on the loading thread as soon as the model is
  loaded, instead of the model's warm-up run, and its outcome comes back to
  the loop at once, ahead of the load's. A cold start then pays one thread
  hand-off each way, not three.

All methods run on the event loop (they are not thread-safe); loading happens
off it, in the ``loader`` the agent supplies. The pool knows nothing of MQTT:
it reports unloads through ``on_unload`` and counters through ``stats()``.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import threading
import time
from collections import OrderedDict
from collections.abc import AsyncIterator, Awaitable, Callable
from dataclasses import dataclass
from functools import partial
from typing import Any, Literal, TypeVar

from fnmesh.agent.errors import CapacityError, PoolClosedError
from fnmesh.agent.executors.base import Executor
from fnmesh.agent.runner import Runner

_log = logging.getLogger(__name__)

#: (function id, version)
PoolKey = tuple[str, str]
#: Loads the executor for a key. Must do its blocking work off the event loop (see ``threaded``).
Loader = Callable[[PoolKey], Awaitable[Executor]]
UnloadReason = Literal["evicted", "expired", "unloaded", "closed"]
T = TypeVar("T")


class Riders:
    """Work waiting for one load, run on the loading thread once the executor is loaded.

    The loop adds riders (``add``) until the loading thread takes them
    (``take``), which closes the list: a rider that comes later is refused
    and must lease the executor instead. Outcomes go back to the loop as
    soon as the riders have run, ahead of the load's own hand-back (which
    then ``deliver``s whatever did not run).
    """

    __slots__ = ("_done", "_jobs", "_lock", "_open")

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._jobs: list[tuple[Callable[[Executor], Any], asyncio.Future[Any]]] = []
        self._done: list[tuple[asyncio.Future[Any], Any, BaseException | None]] = []
        self._open = True

    def add(self, fn: Callable[[Executor], T]) -> asyncio.Future[T] | None:
        """Queue ``fn(executor)``; None if the loading thread has already taken the riders."""
        fut: asyncio.Future[T] = asyncio.get_running_loop().create_future()
        with self._lock:
            if not self._open:
                return None
            self._jobs.append((fn, fut))
        return fut

    def waiting(self) -> bool:
        """Is work waiting for this load (on the loading thread, before it loads)?"""
        with self._lock:
            return bool(self._jobs)

    def take(self) -> list[tuple[Callable[[Executor], Any], asyncio.Future[Any]]]:
        """Close the list and return what was queued (on the loading thread)."""
        with self._lock:
            self._open = False
            jobs, self._jobs = self._jobs, []
        return jobs

    def run(self, executor: Executor) -> bool:
        """Run the riders on ``executor`` (on the loading thread); False if there were none."""
        jobs = self.take()
        for fn, fut in jobs:
            try:
                self._done.append((fut, fn(executor), None))
            except Exception as e:  # the rider's own failure, handed to it on the loop
                self._done.append((fut, None, e))
        if jobs:
            # The answers need not wait for the pool to take the executor in.
            with contextlib.suppress(RuntimeError):  # the loop has closed: nobody waits
                jobs[0][1].get_loop().call_soon_threadsafe(self._settle)
        return bool(jobs)

    def _settle(self) -> None:
        for fut, fn_result, fn_error in self._done:
            if not fut.done():
                if fn_error is not None:
                    fut.set_exception(fn_error)
                else:
                    fut.set_result(fn_result)

    def deliver(self, error: BaseException | None = None) -> None:
        """On the loop: hand each rider its outcome; riders that never ran get ``error``."""
        self._settle()
        self._done = []
        for _fn, fut in self.take():
            if not fut.done():
                # Never a cancellation: the rider's caller must answer its requests.
                fut.set_exception(
                    error
                    if isinstance(error, Exception)
                    else PoolClosedError("the load was stopped before it could run this")
                )


class ThreadedLoader:
    """A blocking loader (such as ``load_executor``) run on a worker thread: one of
    ``runner``'s, or else the loop's default executor.

    The load is followed, on the same thread, by its riders' work if it has
    any, or else by the executor's warm-up run (``warm_up()``, if it has one).
    When work is already waiting as the load starts, ``quick`` loads instead
    of ``load`` if given: an executor that answers sooner and finishes loading
    later (``deferred`` and ``finish_load()``, which the pool calls once the
    riders are answered).
    """

    def __init__(
        self,
        load: Callable[[PoolKey], Executor],
        runner: Runner | None = None,
        *,
        quick: Callable[[PoolKey], Executor] | None = None,
    ) -> None:
        self._load = load
        self._quick = quick
        self._runner = runner

    def _job(self, key: PoolKey, riders: Riders | None) -> Executor:
        load = self._load
        if self._quick is not None and riders is not None and riders.waiting():
            load = self._quick
        executor = load(key)
        if riders is None or not riders.run(executor):
            warm_up = getattr(executor, "warm_up", None)
            if warm_up is not None:
                warm_up()
        return executor

    async def __call__(self, key: PoolKey, riders: Riders | None = None) -> Executor:
        return await self._off_loop(self._job, key, riders)

    async def finish(self, executor: Executor) -> None:
        """Finish a deferred load (``executor.finish_load()``) on a loading thread."""
        finish = getattr(executor, "finish_load", None)
        if finish is not None and getattr(executor, "deferred", False):
            await self._off_loop(finish)

    async def _off_loop(self, fn: Callable[..., T], *args: Any) -> T:
        if self._runner is not None:
            return await self._runner.run(fn, *args)
        return await asyncio.to_thread(fn, *args)


def threaded(
    load: Callable[[PoolKey], Executor],
    runner: Runner | None = None,
    *,
    quick: Callable[[PoolKey], Executor] | None = None,
) -> ThreadedLoader:
    """Wrap a blocking loader to run in a worker thread (see :class:`ThreadedLoader`)."""
    return ThreadedLoader(load, runner, quick=quick)


@dataclass(frozen=True, slots=True)
class PoolStats:
    """Counters and gauges for metrics and heartbeats; counters only go up."""

    #: Loaded keys, least recently used first.
    loaded: tuple[PoolKey, ...]
    bytes: int
    budget_bytes: int
    #: Leases currently held.
    in_use: int
    hits: int
    misses: int
    loads: int
    load_failures: int
    evictions: int
    expirations: int

    def to_dict(self) -> dict[str, Any]:
        return {
            "loaded": [f"{fid}@{version}" for fid, version in self.loaded],
            "bytes": self.bytes,
            "budget_bytes": self.budget_bytes,
            "in_use": self.in_use,
            "hits": self.hits,
            "misses": self.misses,
            "loads": self.loads,
            "load_failures": self.load_failures,
            "evictions": self.evictions,
            "expirations": self.expirations,
        }


class _Entry:
    __slots__ = ("executor", "key", "last_used", "refs", "retiring", "size")

    def __init__(self, key: PoolKey, executor: Executor, size: int, now: float) -> None:
        self.key = key
        self.executor = executor
        self.size = size
        self.refs = 0
        self.last_used = now
        #: Unloaded while leased: closed when the last lease ends, never leased again.
        self.retiring = False


class WarmPool:
    """Keeps executors loaded between requests, within a memory budget. Loop-only."""

    def __init__(
        self,
        memory_budget_bytes: int,
        idle_ttl_s: float,
        loader: Loader,
        *,
        clock: Callable[[], float] = time.monotonic,
        on_unload: Callable[[PoolKey, UnloadReason], None] | None = None,
    ) -> None:
        if memory_budget_bytes <= 0:
            raise ValueError("memory_budget_bytes must be > 0")
        if idle_ttl_s < 0:
            raise ValueError("idle_ttl_s must be >= 0 (math.inf keeps executors until evicted)")
        self._budget = memory_budget_bytes
        self._ttl = idle_ttl_s
        self._loader = loader
        self._clock = clock
        self._on_unload = on_unload
        #: Loaded, leasable entries in LRU order (least recently used first).
        self._entries: OrderedDict[PoolKey, _Entry] = OrderedDict()
        #: Every live entry by executor identity, retiring ones included (for release).
        self._by_executor: dict[int, _Entry] = {}
        self._loading: dict[PoolKey, asyncio.Task[None]] = {}
        #: Riders of the loads in flight (threaded loaders only).
        self._riders: dict[PoolKey, Riders] = {}
        #: Deferred loads being finished in the background (see ``ThreadedLoader``).
        self._finishing: set[asyncio.Task[None]] = set()
        self._bytes = 0
        #: Size hints of loads in flight, held against the budget until they finish.
        self._reserved = 0
        self._in_use = 0
        self._idle = asyncio.Event()
        self._idle.set()
        self._closed = False
        self._sweeper: asyncio.Task[None] | None = None
        self._hits = self._misses = self._loads = self._load_failures = 0
        self._evictions = self._expirations = 0

    # --- leasing ------------------------------------------------------------------------

    @contextlib.asynccontextmanager
    async def lease(
        self, key: PoolKey, *, size_hint: int = 0
    ) -> AsyncIterator[tuple[Executor, bool]]:
        """``async with pool.lease(key) as (executor, cold):`` the executor stays loaded inside.

        ``size_hint`` (bytes, e.g. from the manifest) lets the pool make room
        *before* loading, so memory peaks stay within the budget.
        """
        executor, cold = await self.async_acquire(key, size_hint=size_hint)
        try:
            yield executor, cold
        finally:
            self.release(executor)

    async def async_acquire(self, key: PoolKey, *, size_hint: int = 0) -> tuple[Executor, bool]:
        """Lease the executor for ``key``, loading it on a miss; ``cold`` says a load was awaited.

        Every acquire must be paired with ``release`` (``lease`` does it for you).
        Raises ``CapacityError`` if it cannot fit, ``PoolClosedError`` after close,
        and whatever the loader raised if the load failed.
        """
        cold = False
        while True:
            self._check_open()
            entry = self._entries.get(key)
            if entry is not None:
                return self._lease(entry, cold), cold
            cold = True
            # Shielded: one waiter giving up must not cancel the load others share.
            await asyncio.shield(self._load_task(key, size_hint))
            # Loop: the entry is normally there now; if it was evicted in between, load again.

    def prefetch(self, key: PoolKey, *, size_hint: int = 0) -> None:
        """Start loading ``key`` unless it is loaded or loading (a lease for it is coming)."""
        if not self._closed and key not in self._entries:
            self._load_task(key, size_hint)

    def ride(
        self, key: PoolKey, fn: Callable[[Executor], T], *, size_hint: int = 0
    ) -> asyncio.Future[T] | None:
        """Run ``fn(executor)`` on the loading thread as soon as ``key`` is loaded.

        Starts the load if none is under way. Returns None when ``fn`` cannot
        ride (the key is loaded, the load is already handing its executor
        back, or the loader is not threaded): lease the executor instead. The
        future fails with the load's error if the load fails.
        """
        if self._closed or key in self._entries or not isinstance(self._loader, ThreadedLoader):
            return None
        self._load_task(key, size_hint)
        riders = self._riders.get(key)
        return riders.add(fn) if riders is not None else None

    def warm(self, key: PoolKey) -> Executor | None:
        """The loaded executor for ``key`` (never waits), or None, for a caller on the
        loop thread that is done with it before the loop runs anything else.

        Counts as a use (for least-recently-used eviction and the idle TTL), not
        as a lease: nothing on the loop can unload it meanwhile, so none is needed.
        """
        entry = self._entries.get(key)
        if entry is None or self._closed:
            return None
        return self._use(entry, False)

    def _lease(self, entry: _Entry, cold: bool) -> Executor:
        entry.refs += 1
        self._in_use += 1
        self._idle.clear()
        return self._use(entry, cold)

    def _use(self, entry: _Entry, cold: bool) -> Executor:
        """Mark ``entry`` as just used (LRU order, idle time, hit or miss)."""
        entry.last_used = self._clock()
        self._entries.move_to_end(entry.key)
        if cold:
            self._misses += 1
        else:
            self._hits += 1
        return entry.executor

    def release(self, executor: Executor) -> None:
        """End one lease. The executor stays warm unless it was unloaded meanwhile."""
        entry = self._by_executor.get(id(executor))
        if entry is None or entry.refs <= 0:
            raise RuntimeError(f"release of an executor that is not leased: {executor!r}")
        entry.refs -= 1
        self._in_use -= 1
        entry.last_used = self._clock()
        if entry.refs == 0 and entry.retiring:
            self._close_entry(entry, "unloaded" if not self._closed else "closed")
        if self._in_use == 0:
            self._idle.set()

    async def async_prewarm(self, key: PoolKey, *, size_hint: int = 0) -> bool:
        """Load ``key`` without leasing it; True if this call loaded it, False if it was warm."""
        self._check_open()
        if key in self._entries:
            return False
        await asyncio.shield(self._load_task(key, size_hint))
        return True

    # --- unloading ----------------------------------------------------------------------

    async def async_unload(self, key: PoolKey) -> bool:
        """Unload ``key`` now, or when its last lease ends if leased; False if it was not loaded."""
        entry = self._entries.pop(key, None)
        if entry is None:
            return False
        if entry.refs == 0:
            self._close_entry(entry, "unloaded")
        else:
            entry.retiring = True
        return True

    async def async_sweep(self) -> list[PoolKey]:
        """Unload idle executors unused for ``idle_ttl_s``; returns the keys unloaded."""
        now = self._clock()
        expired = [
            e for e in self._entries.values() if e.refs == 0 and now - e.last_used >= self._ttl
        ]
        for entry in expired:
            del self._entries[entry.key]
            self._expirations += 1
            self._close_entry(entry, "expired")
        return [e.key for e in expired]

    def start_sweeper(self, interval_s: float) -> asyncio.Task[None]:
        """Run ``async_sweep`` every ``interval_s`` seconds until ``async_close``."""
        self._check_open()
        if self._sweeper is not None and not self._sweeper.done():
            raise RuntimeError("the sweeper is already running")
        self._sweeper = asyncio.get_running_loop().create_task(
            self._async_sweep_forever(interval_s), name="warm-pool-sweeper"
        )
        return self._sweeper

    async def _async_sweep_forever(self, interval_s: float) -> None:
        while True:
            await asyncio.sleep(interval_s)
            try:
                await self.async_sweep()
            except Exception:  # one executor failing to close must not stop the sweeping
                _log.exception("warm pool sweep failed")

    async def async_close(self, timeout_s: float = 10.0) -> None:
        """Stop leasing, let loads and leases finish (up to ``timeout_s``), unload everything.

        Executors still leased at the timeout are closed when their lease ends, not
        under a running inference.
        """
        if self._closed:
            return
        self._closed = True
        deadline = asyncio.get_running_loop().time() + timeout_s
        if self._sweeper is not None:
            self._sweeper.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._sweeper
        # A finish still running ends on its thread; its executor is closed below.
        for task in list(self._finishing):
            task.cancel()
        loads = list(self._loading.values())
        if loads:
            _done, pending = await asyncio.wait(loads, timeout=max(0.0, timeout_s))
            for task in pending:
                task.cancel()
            await asyncio.gather(*pending, return_exceptions=True)
        remaining = deadline - asyncio.get_running_loop().time()
        if not self._idle.is_set():
            try:
                async with asyncio.timeout(max(0.0, remaining)):
                    await self._idle.wait()
            except TimeoutError:
                busy = sorted({e.key for e in self._by_executor.values() if e.refs > 0})
                _log.warning("warm pool closing with leases still held on %s", busy)
        for entry in list(self._entries.values()):
            if entry.refs == 0:
                self._close_entry(entry, "closed")
            else:
                entry.retiring = True
        self._entries.clear()

    # --- reading ------------------------------------------------------------------------

    def is_warm(self, key: PoolKey) -> bool:
        return key in self._entries

    def stats(self) -> PoolStats:
        return PoolStats(
            loaded=tuple(self._entries),
            bytes=self._bytes,
            budget_bytes=self._budget,
            in_use=self._in_use,
            hits=self._hits,
            misses=self._misses,
            loads=self._loads,
            load_failures=self._load_failures,
            evictions=self._evictions,
            expirations=self._expirations,
        )

    # --- internals ----------------------------------------------------------------------

    def _check_open(self) -> None:
        if self._closed:
            raise PoolClosedError("the warm pool is closed")

    def _load_task(self, key: PoolKey, size_hint: int) -> asyncio.Task[None]:
        task = self._loading.get(key)
        if task is None:
            riders = Riders() if isinstance(self._loader, ThreadedLoader) else None
            task = asyncio.get_running_loop().create_task(
                self._async_load(key, size_hint, riders), name=f"warm-pool-load {key[0]}@{key[1]}"
            )
            self._loading[key] = task
            if riders is not None:
                self._riders[key] = riders
            task.add_done_callback(partial(self._load_done, key, riders))
        return task

    def _load_done(self, key: PoolKey, riders: Riders | None, task: asyncio.Task[None]) -> None:
        if self._loading.get(key) is task:
            del self._loading[key]
        if riders is not None:
            # Riders that never ran hear once the load is over: one that then retries
            # finds no load in flight and starts a new one.
            if self._riders.get(key) is riders:
                del self._riders[key]
            riders.deliver(None if task.cancelled() else task.exception())
        # Retrieve the outcome so a failure nobody awaited (all waiters gone) is not logged
        # as "exception never retrieved"; the waiters that remain get it themselves.
        if not task.cancelled():
            task.exception()

    async def _async_load(self, key: PoolKey, size_hint: int, riders: Riders | None) -> None:
        hint = max(0, size_hint)
        self._make_room(key, hint)
        self._reserved += hint
        try:
            if riders is not None and isinstance(self._loader, ThreadedLoader):
                executor = await self._loader(key, riders)
            else:
                executor = await self._loader(key)
        except Exception:
            self._load_failures += 1
            raise
        finally:
            self._reserved -= hint
        self._loads += 1
        try:
            size = max(0, int(executor.memory_bytes))
            self._check_open()
            self._make_room(key, size)
        except BaseException:
            executor.close()
            raise
        entry = _Entry(key, executor, size, self._clock())
        self._entries[key] = entry
        self._by_executor[id(executor)] = entry
        self._bytes += size
        if getattr(executor, "deferred", False) and isinstance(self._loader, ThreadedLoader):
            # Its riders are answered: finish the load beside the requests that use it.
            task = asyncio.get_running_loop().create_task(
                self._loader.finish(executor), name=f"warm-pool-finish {key[0]}@{key[1]}"
            )
            self._finishing.add(task)
            task.add_done_callback(self._finished)

    def _finished(self, task: asyncio.Task[None]) -> None:
        self._finishing.discard(task)
        if not task.cancelled() and task.exception() is not None:
            _log.error("finishing a load failed", exc_info=task.exception())

    def _make_room(self, key: PoolKey, needed: int) -> None:
        """Evict idle executors, least recently used first, until ``needed`` more bytes fit."""
        if needed > self._budget:
            raise CapacityError(
                f"{key[0]}@{key[1]} needs {needed} bytes, more than the pool's whole budget "
                f"of {self._budget}"
            )
        while self._bytes + self._reserved + needed > self._budget:
            victim = next((e for e in self._entries.values() if e.refs == 0), None)
            if victim is None:
                raise CapacityError(
                    f"{key[0]}@{key[1]} needs {needed} bytes; {self._bytes} of {self._budget} "
                    f"are held by executors in use and {self._reserved} by loads in flight"
                )
            del self._entries[victim.key]
            self._evictions += 1
            self._close_entry(victim, "evicted")

    def _close_entry(self, entry: _Entry, reason: UnloadReason) -> None:
        """Close an entry already removed from ``_entries``; frees its share of the budget."""
        self._by_executor.pop(id(entry.executor), None)
        self._bytes -= entry.size
        try:
            entry.executor.close()
        except Exception:  # a failing close must not wedge the pool's accounting
            _log.exception("closing %s@%s failed", *entry.key)
        _log.debug("unloaded %s@%s (%s)", entry.key[0], entry.key[1], reason)
        if self._on_unload is not None:
            try:
                self._on_unload(entry.key, reason)
            except Exception:
                _log.exception("on_unload callback failed")
