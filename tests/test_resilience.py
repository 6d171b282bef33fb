"""The mesh under faults and bad input, as real processes (Mosquitto, ``fnmesh router``, two
``fnmesh agent``s serving the examples; see ``fnmesh.coordinator.bench.mesh``), with the Python
client as the device:

- a flood of malformed invocations mixed with valid ones kills nothing, answers every request
  that can be answered (valid ones correctly), and grows no process by 50 MB;
- the broker killed and restarted (same port, same persistence folder) under a steady QoS 1 load
  loses no request: every invoke gets exactly one answer;
- a short soak with agents killed (SIGKILL) and restarted loses nothing.

One mesh serves the module (starting it is most of the cost); each test leaves it whole.
Sizes scale with FNMESH_TEST_SCALE; ``fnmesh bench fuzz`` and ``fnmesh bench soak`` run the full
sizes.
"""

from __future__ import annotations

import asyncio
import itertools
import time
from collections import Counter
from collections.abc import Iterator
from pathlib import Path

import psutil
import pytest
from conftest import SCALE

from fnmesh.coordinator.bench.fuzz import InputPool, async_flood, compare_rows
from fnmesh.coordinator.bench.mesh import ProcessMesh
from fnmesh.coordinator.bench.soak import FUZZ_RSS_LIMIT_MB, async_soak
from fnmesh.functions.client import AsyncMeshClient, Backoff
from fnmesh.functions.examples.models import build_example

WAIT = 30.0 * max(1.0, SCALE)


@pytest.fixture(scope="module")
def pmesh(tmp_path_factory: pytest.TempPathFactory) -> Iterator[ProcessMesh]:
    home: Path = tmp_path_factory.mktemp("resilience") / "home"
    mesh = ProcessMesh(home, agents=2).start()
    try:
        asyncio.run(mesh.async_wait_ready(timeout=60 * max(1.0, SCALE)))
        yield mesh
    finally:
        mesh.stop()


def assert_all_running(mesh: ProcessMesh) -> None:
    for c in mesh.children():
        assert c.pid is not None
        p = psutil.Process(c.pid)
        assert p.is_running() and p.status() != psutil.STATUS_ZOMBIE, f"{c.name}:\n{c.tail()}"
    mesh.check_alive()


async def test_flood_of_bad_input_kills_nothing_and_answers_everything(
    pmesh: ProcessMesh,
) -> None:
    n = int(1000 * SCALE)
    r = await async_flood(pmesh, n, seed=1, warmup=200)
    s = r.summary()
    print(f"\nfuzz: {s}")
    growth = r.growth_mb
    print("RSS growth (MB): " + ", ".join(f"{k} {v:+.1f}" for k, v in growth.items()))
    assert r.died == []
    assert_all_running(pmesh)
    assert r.valid > 0 and r.valid_ok == r.valid, r.valid_wrong[:5]
    assert r.missing == [], f"{len(r.missing)} unanswered, first: {r.missing[:5]}"
    assert (
        r.answered
        == r.must_answer
        == n - r.by_kind["no_reply_topic"] - r.by_kind["reply_outside_replies"]
    )
    assert r.accepted_malformed == []
    assert (r.duplicates, r.unexpected, r.undecodable) == (0, 0, 0)
    assert set(r.codes) <= {"ok", "bad_request", "not_found"}, r.codes
    assert set(growth) == {c.name for c in pmesh.children()}
    assert all(v < FUZZ_RSS_LIMIT_MB for v in growth.values()), growth


async def test_broker_restart_under_load_loses_no_request(pmesh: ProcessMesh) -> None:
    examples = ["digits", "cancer"]
    pool = InputPool(examples)
    answers: Counter[str] = Counter()
    sent: list[str] = []
    wrong: list[str] = []
    reached = asyncio.Event()
    target = [100]
    stop = asyncio.Event()

    async def worker(c: AsyncMeshClient, w: int) -> None:
        for i in itertools.count():
            if stop.is_set():
                return
            name = examples[(w + i) % 2]
            rid = f"b{w}-{i}"
            sent.append(rid)
            r = await c.invoke(build_example(name).function_id, pool.rows(name, i % 60, 2), id=rid)
            answers[r.id] += 1
            if compare_rows(r.outputs, pool.want[name], i % 60, 2):
                wrong.append(rid)
            if sum(answers.values()) >= target[0]:
                reached.set()

    client = pmesh.device_client(
        timeout_s=1.0, retries=30, backoff=Backoff(base_s=0.05, max_s=0.5), persistent=True
    )
    async with client as c:
        workers = [asyncio.ensure_future(worker(c, w)) for w in range(8)]
        try:
            async with asyncio.timeout(WAIT):
                await reached.wait()
            before = sum(answers.values())
            t_kill = time.monotonic()
            pmesh.kill_broker()
            await asyncio.sleep(1.0)  # the outage itself, not a wait for an event
            await asyncio.to_thread(pmesh.start_broker)
            down_s = time.monotonic() - t_kill
            t_back = time.monotonic()
            # Steady load goes on until well after the broker is back.
            target[0] = sum(answers.values()) + 300
            reached.clear()
            async with asyncio.timeout(WAIT):
                await reached.wait()
            recovered_s = time.monotonic() - t_back
            stop.set()
            async with asyncio.timeout(WAIT):
                await asyncio.gather(*workers)
        finally:
            for t in workers:
                t.cancel()
            await asyncio.gather(*workers, return_exceptions=True)
        stats = c.stats
    print(
        f"\nbroker restart: down {down_s:.2f} s, {before} answered before the kill; "
        f"requests sent {len(sent)}, answered {sum(answers.values())}, "
        f"distinct ids answered {len(answers)}; publishes {stats.sent} (retries "
        f"{stats.retries}), late duplicates dropped {stats.duplicates}, strays {stats.strays}, "
        f"connections {stats.connects}; 300 more answers {recovered_s:.2f} s after restart"
    )
    assert stats.connects >= 2, "the client never saw the broker go"
    assert len(sent) == len(set(sent))
    assert set(answers) == set(sent), f"lost: {sorted(set(sent) - set(answers))[:10]}"
    assert all(v == 1 for v in answers.values())
    assert wrong == []
    assert_all_running(pmesh)


async def test_soak_smoke_agents_killed_and_restarted(pmesh: ProcessMesh) -> None:
    seconds = 0.3 * 60 * SCALE
    r = await async_soak(pmesh, seconds=seconds, period_s=seconds / 3, concurrency=6)
    s = r.summary()
    print(f"\nsoak {seconds:.0f} s: " + {k: v for k, v in s.items() if k != "periods"}.__repr__())
    for row in s["periods"]:
        print(f"  {row}")
    assert r.kills >= 2 and len(r.back_ready_s) == r.kills
    assert r.lost == 0, r.lost_detail[:5]
    assert r.wrong == 0
    assert all(p.answered > 0 for p in r.periods)
    assert_all_running(pmesh)
