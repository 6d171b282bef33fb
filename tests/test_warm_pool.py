"""The warm pool: one load per key, LRU under a budget, leases pin, TTL by an injected clock."""

from __future__ import annotations

import asyncio
import threading
from collections.abc import Mapping
from datetime import UTC, datetime, timedelta

import numpy as np
import pytest
from onnx import TensorProto, helper, numpy_helper

from fnmesh.agent.errors import CapacityError, ExecutorError, PoolClosedError
from fnmesh.agent.executors import Executor, load_executor
from fnmesh.agent.probe import probe
from fnmesh.agent.runner import Runner
from fnmesh.agent.warm_pool import PoolKey, UnloadReason, WarmPool, threaded
from fnmesh.functions.manifest import Manifest

WAIT = 5.0  # seconds: an upper bound for events that should happen at once

A: PoolKey = ("ns/a", "1.0.0")
B: PoolKey = ("ns/b", "1.0.0")
C: PoolKey = ("ns/c", "1.0.0")
D: PoolKey = ("ns/d", "1.0.0")
E: PoolKey = ("ns/e", "1.0.0")


class StubExecutor:
    """Stands in for a model: the pool only sizes, hands out and closes executors."""

    provider = "stub"

    def __init__(self, key: PoolKey, size: int) -> None:
        self.key = key
        self._size = size
        self.closed = False

    @property
    def memory_bytes(self) -> int:
        return self._size

    def run(self, inputs: Mapping[str, np.ndarray]) -> dict[str, np.ndarray]:
        assert not self.closed
        return dict(inputs)

    def close(self) -> None:
        self.closed = True


class Loader:
    """Counts loads; a key with a gate blocks until the test opens it."""

    def __init__(self, size: int = 100) -> None:
        self.size = size
        self.sizes: dict[PoolKey, int] = {}
        self.calls: list[PoolKey] = []
        self.gates: dict[PoolKey, asyncio.Event] = {}
        self.started: dict[PoolKey, asyncio.Event] = {}
        self.fail: set[PoolKey] = set()
        self.made: list[StubExecutor] = []
        self.on_call: list[object] = []

    def gate(self, key: PoolKey) -> asyncio.Event:
        self.gates[key] = asyncio.Event()
        self.started[key] = asyncio.Event()
        return self.gates[key]

    async def __call__(self, key: PoolKey) -> Executor:
        self.calls.append(key)
        if key in self.started:
            self.started[key].set()
        if key in self.gates:
            await self.gates[key].wait()
        if key in self.fail:
            raise ExecutorError(f"cannot load {key}")
        ex = StubExecutor(key, self.sizes.get(key, self.size))
        self.made.append(ex)
        return ex


class Clock:
    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now


def make_pool(
    budget: int = 1000, ttl: float = 60.0, loader: Loader | None = None
) -> tuple[WarmPool, Loader, Clock, list[tuple[PoolKey, UnloadReason]]]:
    loader = loader or Loader()
    clock = Clock()
    unloaded: list[tuple[PoolKey, UnloadReason]] = []
    pool = WarmPool(
        budget, ttl, loader, clock=clock, on_unload=lambda k, r: unloaded.append((k, r))
    )
    return pool, loader, clock, unloaded


async def test_cold_then_warm() -> None:
    pool, loader, _, _ = make_pool()
    async with pool.lease(A) as (first, cold):
        assert cold
    async with pool.lease(A) as (second, cold):
        assert not cold
        assert second is first
    stats = pool.stats()
    assert (stats.hits, stats.misses, stats.loads) == (1, 1, 1)
    assert stats.loaded == (A,)
    assert stats.bytes == 100
    assert stats.in_use == 0
    assert loader.calls == [A]
    await pool.async_close()


async def test_concurrent_acquires_share_one_load() -> None:
    pool, loader, _, _ = make_pool()
    gate = loader.gate(A)
    tasks = [asyncio.create_task(pool.async_acquire(A)) for _ in range(5)]
    async with asyncio.timeout(WAIT):
        await loader.started[A].wait()
    assert not any(t.done() for t in tasks)
    gate.set()
    async with asyncio.timeout(WAIT):
        results = await asyncio.gather(*tasks)
    assert loader.calls == [A]
    assert len({id(ex) for ex, _ in results}) == 1
    assert all(cold for _, cold in results)
    assert pool.stats().in_use == 5
    assert pool.stats().misses == 5
    for ex, _ in results:
        pool.release(ex)
    assert pool.stats().in_use == 0
    await pool.async_close()


async def test_giving_up_does_not_cancel_the_shared_load() -> None:
    pool, loader, _, _ = make_pool()
    gate = loader.gate(A)
    quitter = asyncio.create_task(pool.async_acquire(A))
    stayer = asyncio.create_task(pool.async_acquire(A))
    async with asyncio.timeout(WAIT):
        await loader.started[A].wait()
    quitter.cancel()
    gate.set()
    async with asyncio.timeout(WAIT):
        ex, cold = await stayer
    assert cold
    assert quitter.cancelled()
    assert loader.calls == [A]
    pool.release(ex)
    await pool.async_close()


async def test_lru_eviction_order_under_budget() -> None:
    pool, loader, _, unloaded = make_pool(budget=300)
    for key in (A, B, C):
        async with pool.lease(key):
            pass
    async with pool.lease(A):  # A is now the most recently used
        pass
    async with pool.lease(D):
        pass
    async with pool.lease(E):
        pass
    assert unloaded == [(B, "evicted"), (C, "evicted")]
    assert pool.stats().loaded == (A, D, E)
    assert pool.stats().evictions == 2
    assert pool.stats().bytes == 300
    assert [ex.closed for ex in loader.made] == [False, True, True, False, False]
    await pool.async_close()


async def test_in_use_executors_are_not_evicted() -> None:
    pool, _, _, unloaded = make_pool(budget=200)
    held_a, _ = await pool.async_acquire(A)  # oldest, but leased
    async with pool.lease(B):
        pass
    async with pool.lease(C) as (held_c, _):
        assert unloaded == [(B, "evicted")]
        assert pool.stats().loaded == (A, C)
        # Both remaining executors are leased: no room without evicting one in use.
        with pytest.raises(CapacityError, match="in use"):
            await pool.async_acquire(D)
        assert not held_a.closed  # type: ignore[attr-defined]
        assert not held_c.closed  # type: ignore[attr-defined]
        assert pool.is_warm(A) and pool.is_warm(C)
    pool.release(held_a)
    async with pool.lease(D) as (_, cold):
        assert cold
    assert unloaded[-1] == (A, "evicted")  # released, and least recently used
    await pool.async_close()


async def test_executor_larger_than_budget_is_refused_and_closed() -> None:
    loader = Loader()
    loader.sizes[A] = 2000
    pool, _, _, _ = make_pool(budget=1000, loader=loader)
    with pytest.raises(CapacityError, match="whole budget"):
        await pool.async_acquire(A)
    assert loader.made[0].closed
    assert pool.stats().bytes == 0
    await pool.async_close()


async def test_size_hint_makes_room_before_loading() -> None:
    pool, loader, _, unloaded = make_pool(budget=200)
    for key in (A, B):
        async with pool.lease(key):
            pass
    gate = loader.gate(C)
    task = asyncio.create_task(pool.async_acquire(C, size_hint=100))
    async with asyncio.timeout(WAIT):
        await loader.started[C].wait()
    assert unloaded == [(A, "evicted")]  # already gone while C is still loading
    gate.set()
    async with asyncio.timeout(WAIT):
        ex, _ = await task
    pool.release(ex)
    with pytest.raises(CapacityError):
        await pool.async_acquire(D, size_hint=5000)
    assert D not in loader.calls
    await pool.async_close()


async def test_idle_executors_expire_after_ttl() -> None:
    pool, _, clock, unloaded = make_pool(ttl=10.0)
    async with pool.lease(A):
        pass
    clock.now += 5
    assert await pool.async_sweep() == []
    async with pool.lease(B):
        pass
    clock.now += 5
    assert await pool.async_sweep() == [A]
    clock.now += 5
    assert await pool.async_sweep() == [B]
    assert unloaded == [(A, "expired"), (B, "expired")]
    assert pool.stats().expirations == 2
    assert pool.stats().loaded == ()
    await pool.async_close()


async def test_warm_hands_out_a_loaded_executor_and_counts_it_as_a_use() -> None:
    pool, _, clock, unloaded = make_pool(budget=200, ttl=10.0)
    assert pool.warm(A) is None, "warm never loads"
    for key in (A, B):
        async with pool.lease(key):
            pass
    clock.now += 8
    ex = pool.warm(A)  # A is now the most recently used, and its idle time starts again
    assert ex is not None and ex.run({"x": np.ones(1)})["x"][0] == 1
    assert pool.stats().loaded == (B, A)
    async with pool.lease(C):  # over budget: the least recently used (B) goes
        pass
    assert unloaded == [(B, "evicted")]
    clock.now += 9
    assert await pool.async_sweep() == [], "A was used 9 s ago (TTL 10 s)"
    clock.now += 1
    assert A in await pool.async_sweep()
    await pool.async_close()
    assert pool.warm(C) is None, "a closed pool hands out nothing"


async def test_leased_executor_never_expires() -> None:
    pool, _, clock, _ = make_pool(ttl=10.0)
    async with pool.lease(A) as (ex, _):
        clock.now += 100
        assert await pool.async_sweep() == []
    # Last use is the release, so the TTL counts from there.
    clock.now += 9
    assert await pool.async_sweep() == []
    clock.now += 1
    assert await pool.async_sweep() == [A]
    assert ex.closed  # type: ignore[attr-defined]
    await pool.async_close()


async def test_sweeper_task_unloads_and_stops_on_close() -> None:
    clock = Clock()
    expired = asyncio.Event()
    pool = WarmPool(1000, 10.0, Loader(), clock=clock, on_unload=lambda k, r: expired.set())
    async with pool.lease(A):
        pass
    clock.now += 11
    sweeper = pool.start_sweeper(0.01)
    async with asyncio.timeout(WAIT):
        await expired.wait()
    assert not pool.is_warm(A)
    await pool.async_close()
    assert sweeper.done()


async def test_prewarm_makes_the_next_acquire_warm() -> None:
    pool, loader, _, _ = make_pool()
    assert await pool.async_prewarm(A)
    assert not await pool.async_prewarm(A)
    async with pool.lease(A) as (_, cold):
        assert not cold
    assert loader.calls == [A]
    assert pool.stats().hits == 1
    await pool.async_close()


async def test_unload_idle_now_and_leased_on_release() -> None:
    pool, _, _, unloaded = make_pool()
    async with pool.lease(A):
        pass
    assert await pool.async_unload(A)
    assert unloaded == [(A, "unloaded")]
    assert not await pool.async_unload(A)

    old, _ = await pool.async_acquire(B)
    assert await pool.async_unload(B)
    assert not old.closed  # type: ignore[attr-defined]
    async with pool.lease(B) as (new, cold):  # a retiring executor is not handed out again
        assert cold
        assert new is not old
    pool.release(old)
    assert old.closed  # type: ignore[attr-defined]
    assert unloaded[-1] == (B, "unloaded")
    assert pool.stats().bytes == 100
    await pool.async_close()


async def test_failed_load_reaches_every_waiter_and_is_retried() -> None:
    pool, loader, _, _ = make_pool()
    loader.fail.add(A)
    gate = loader.gate(A)
    tasks = [asyncio.create_task(pool.async_acquire(A)) for _ in range(3)]
    async with asyncio.timeout(WAIT):
        await loader.started[A].wait()
    gate.set()
    results = await asyncio.gather(*tasks, return_exceptions=True)
    assert all(isinstance(r, ExecutorError) for r in results)
    assert pool.stats().load_failures == 1
    loader.fail.clear()
    async with pool.lease(A) as (_, cold):
        assert cold
    assert loader.calls == [A, A]
    await pool.async_close()


async def test_double_release_is_a_bug() -> None:
    pool, _, _, _ = make_pool()
    ex, _ = await pool.async_acquire(A)
    pool.release(ex)
    with pytest.raises(RuntimeError, match="not leased"):
        pool.release(ex)
    await pool.async_close()


async def test_close_drains_leases_then_unloads() -> None:
    pool, loader, _, unloaded = make_pool()
    async with pool.lease(A):
        pass
    held, _ = await pool.async_acquire(B)
    closing = asyncio.create_task(pool.async_close(timeout_s=WAIT))
    await asyncio.sleep(0)  # one loop turn: close sets its flag before its first await
    with pytest.raises(PoolClosedError):
        await pool.async_acquire(C)
    assert not closing.done()
    pool.release(held)
    async with asyncio.timeout(WAIT):
        await closing
    assert all(ex.closed for ex in loader.made)
    assert sorted(unloaded) == [(A, "closed"), (B, "closed")]
    assert pool.stats().bytes == 0


async def test_close_timeout_leaves_a_running_executor_until_its_release() -> None:
    pool, _, _, _ = make_pool()
    held, _ = await pool.async_acquire(A)
    await pool.async_close(timeout_s=0.05)
    assert not held.closed  # type: ignore[attr-defined]
    pool.release(held)
    assert held.closed  # type: ignore[attr-defined]


async def test_close_waits_for_loads_in_flight() -> None:
    pool, loader, _, _ = make_pool()
    gate = loader.gate(A)
    waiter = asyncio.create_task(pool.async_acquire(A))
    async with asyncio.timeout(WAIT):
        await loader.started[A].wait()
    closing = asyncio.create_task(pool.async_close(timeout_s=WAIT))
    gate.set()
    async with asyncio.timeout(WAIT):
        await closing
    with pytest.raises(PoolClosedError):
        await waiter
    assert loader.made[0].closed
    assert pool.stats().loaded == ()


# --- with real ONNX Runtime behind the loader -----------------------------------------------


def _model() -> bytes:
    w = np.arange(6, dtype=np.float32).reshape(3, 2)
    graph = helper.make_graph(
        [helper.make_node("MatMul", ["X", "W"], ["Y"])],
        "mm",
        [helper.make_tensor_value_info("X", TensorProto.FLOAT, ["N", 3])],
        [helper.make_tensor_value_info("Y", TensorProto.FLOAT, ["N", 2])],
        initializer=[numpy_helper.from_array(w, "W")],
    )
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    model.ir_version = 9
    return bytes(model.SerializeToString())


def _manifest(name: str) -> Manifest:
    now = datetime.now(UTC)
    return Manifest.model_validate(
        {
            "name": name,
            "version": "1.0.0",
            "inputs": [{"name": "X", "dtype": "float32", "shape": ["N", 3]}],
            "outputs": [{"name": "Y", "dtype": "float32", "shape": ["N", 2]}],
            "not_before": now - timedelta(days=1),
            "not_after": now + timedelta(days=1),
            "digests": {
                "plaintext": "a" * 64,
                "ciphertext": "b" * 64,
                "plaintext_size": 1,
                "nonce": "c" * 24,
            },
            "publisher": "test",
        }
    )


async def test_real_onnx_runtime_behind_the_pool() -> None:
    model, hw = _model(), probe()
    pool = WarmPool(
        64 << 20, 60.0, threaded(lambda key: load_executor(model, _manifest(key[0]), hw))
    )
    x = np.ones((4, 3), np.float32)
    async with pool.lease(("ns/mm", "1.0.0")) as (ex, cold):
        assert cold
        out = await asyncio.to_thread(ex.run, {"X": x})
        np.testing.assert_allclose(out["Y"], x @ np.arange(6, dtype=np.float32).reshape(3, 2))
    async with pool.lease(("ns/mm", "1.0.0")) as (again, cold):
        assert not cold
        assert again is ex
    assert pool.stats().bytes == ex.memory_bytes
    await pool.async_close()


class WarmedStub(StubExecutor):
    """A stub that counts warm-up runs and the threads that ran it."""

    def __init__(self, key: PoolKey, size: int) -> None:
        super().__init__(key, size)
        self.warm_ups = 0
        self.run_threads: list[str] = []

    def warm_up(self) -> None:
        self.warm_ups += 1

    def run(self, inputs: Mapping[str, np.ndarray]) -> dict[str, np.ndarray]:
        self.run_threads.append(threading.current_thread().name)
        return super().run(inputs)


class BlockingLoad:
    """A blocking loader (as ``load_executor`` is) held at a gate until the test opens it."""

    def __init__(self) -> None:
        self.entered = threading.Event()
        self.gate = threading.Event()
        self.fail = False
        self.made: list[WarmedStub] = []

    def __call__(self, key: PoolKey) -> Executor:
        self.entered.set()
        assert self.gate.wait(WAIT), "the test never opened the gate"
        if self.fail:
            raise ExecutorError(f"cannot load {key}")
        ex = WarmedStub(key, 100)
        self.made.append(ex)
        return ex


async def _entered(load: BlockingLoad) -> None:
    assert await asyncio.to_thread(load.entered.wait, WAIT), "the load never started"


async def test_a_rider_runs_on_the_loading_thread_instead_of_the_warm_up() -> None:
    load, runner = BlockingLoad(), Runner(1, name="test-load")
    pool = WarmPool(1000, 60.0, threaded(load, runner))
    try:
        x = {"x": np.arange(3, dtype=np.float32)}
        first = pool.ride(A, lambda ex: ex.run(x))
        second = pool.ride(A, lambda ex: ex.run({"x": x["x"] * 2}))
        assert first is not None and second is not None
        await _entered(load)
        load.gate.set()
        async with asyncio.timeout(WAIT):
            got = await asyncio.gather(first, second)
        np.testing.assert_array_equal(got[0]["x"], x["x"])
        np.testing.assert_array_equal(got[1]["x"], x["x"] * 2)
        (ex,) = load.made
        assert ex.run_threads == ["test-load-0", "test-load-0"]
        assert ex.warm_ups == 0, "a load with riders needs no warm-up run"
        # The answers come back before the pool takes the executor in; a lease waits for it.
        async with pool.lease(A) as (leased, _):
            assert leased is ex
        assert pool.stats().loads == 1
        # Loaded now: nothing rides, the caller leases.
        assert pool.ride(A, lambda ex: None) is None
    finally:
        await pool.async_close()
        runner.shutdown()


async def test_a_load_without_riders_warms_up() -> None:
    load, runner = BlockingLoad(), Runner(1)
    load.gate.set()
    pool = WarmPool(1000, 60.0, threaded(load, runner))
    try:
        assert await pool.async_prewarm(A)
        assert load.made[0].warm_ups == 1
    finally:
        await pool.async_close()
        runner.shutdown()


async def test_a_failed_load_fails_its_riders_and_a_failing_rider_only_itself() -> None:
    load, runner = BlockingLoad(), Runner(1)
    pool = WarmPool(1000, 60.0, threaded(load, runner))
    try:
        load.fail = True
        rider = pool.ride(A, lambda ex: "never")
        assert rider is not None
        await _entered(load)
        load.gate.set()
        with pytest.raises(ExecutorError, match="cannot load"):
            async with asyncio.timeout(WAIT):
                await rider
        assert not pool.is_warm(A) and pool.stats().load_failures == 1

        load.fail = False

        def broken(ex: Executor) -> None:
            raise ValueError("the rider's own bug")

        bad = pool.ride(A, broken)
        good = pool.ride(A, lambda ex: "fine")
        assert bad is not None and good is not None
        with pytest.raises(ValueError, match="own bug"):
            async with asyncio.timeout(WAIT):
                await bad
        async with asyncio.timeout(WAIT):
            assert await good == "fine"
        async with pool.lease(A) as (leased, _):
            assert leased is load.made[-1]
    finally:
        await pool.async_close()
        runner.shutdown()


async def test_an_async_loader_takes_no_riders() -> None:
    pool, loader, _, _ = make_pool()
    assert pool.ride(A, lambda ex: None) is None
    assert loader.calls == []
    await pool.async_close()


class DeferredStub(WarmedStub):
    """A stub loaded the quick way: it finishes loading later, on a loading thread."""

    def __init__(self, key: PoolKey, size: int) -> None:
        super().__init__(key, size)
        self.deferred = True
        self.finished = threading.Event()
        self.finish_thread = ""

    def finish_load(self) -> None:
        self.finish_thread = threading.current_thread().name
        self.deferred = False
        self.finished.set()


async def test_a_load_with_work_waiting_loads_quick_and_finishes_after() -> None:
    load, runner = BlockingLoad(), Runner(1, name="test-load")
    quick_made: list[DeferredStub] = []

    def quick(key: PoolKey) -> Executor:
        ex = DeferredStub(key, 100)
        quick_made.append(ex)
        return ex

    pool = WarmPool(1000, 60.0, threaded(load, runner, quick=quick))
    try:
        # Nothing waiting: the full load, warmed up.
        load.gate.set()
        assert await pool.async_prewarm(A)
        assert len(load.made) == 1 and load.made[0].warm_ups == 1 and not quick_made
        # A request waiting as the load starts: the quick load, answered, then finished.
        load.gate.clear()
        rider = pool.ride(B, lambda ex: ex.run({"x": np.ones(2)}))
        assert rider is not None
        async with asyncio.timeout(WAIT):
            got = await rider
        np.testing.assert_array_equal(got["x"], np.ones(2))
        (ex,) = quick_made
        assert await asyncio.to_thread(ex.finished.wait, WAIT), "the load was never finished"
        assert ex.finish_thread == "test-load-0"
        assert ex.run_threads == ["test-load-0"] and ex.warm_ups == 0
        async with pool.lease(B) as (leased, _):
            assert leased is ex and not leased.deferred
    finally:
        await pool.async_close()
        runner.shutdown()
