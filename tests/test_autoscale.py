"""Autoscaling: replicas follow demand within [min, max]; shrinking waits out the cool-down."""

from __future__ import annotations

import asyncio
import contextlib
import time
from pathlib import Path
from typing import Any

import pytest
from agent_support import build_bundle, new_root
from conftest import Broker, Fleet
from test_latency_routing import agent_via, coordinator, push
from test_router import running_router, wait_live

from fnmesh.agent.mqtt import MqttClient
from fnmesh.certs.tls import client_context
from fnmesh.coordinator.autoscale import Autoscaler, Step, decide, needed
from fnmesh.coordinator.bench.overload import OpenLoad, heavy_model, sample_inputs

HEAVY = "examples/heavy"

# -- the decision, as a table ------------------------------------------------------------------

# (rate /s, run ms, target utilisation) -> replicas needed
NEEDED = [
    (0.0, 10.0, 0.7, 0),
    (10.0, 0.0, 0.7, 0),
    (70.0, 10.0, 0.7, 1),  # 0.7 of one replica exactly
    (71.0, 10.0, 0.7, 2),
    (140.0, 10.0, 0.7, 2),
    (500.0, 10.0, 0.5, 10),
    (1.0, 2000.0, 0.7, 3),  # slow functions need replicas at low rates
]


@pytest.mark.parametrize(("rate", "ms", "target", "want"), NEEDED)
def test_replicas_needed_for_demand(rate: float, ms: float, target: float, want: int) -> None:
    assert needed(rate, ms, target) == want


# (wanted, current, min, max, low_since, now, cool-down) -> (desired, low_since)
DECIDE: list[tuple[str, tuple[Any, ...], Step]] = [
    ("grows at once", (3, 1, 1, 3, None, 100.0, 30.0), Step(3, None)),
    ("grows no further than max", (9, 1, 1, 3, None, 100.0, 30.0), Step(3, None)),
    ("never below min, even idle and cooled", (0, 2, 2, 5, 0.0, 100.0, 30.0), Step(2, None)),
    ("min above max: min wins", (0, 0, 2, 1, None, 0.0, 30.0), Step(2, None)),
    ("steady", (2, 2, 1, 3, None, 100.0, 30.0), Step(2, None)),
    ("growth cancels a pending shrink", (3, 2, 1, 3, 90.0, 100.0, 30.0), Step(3, None)),
    ("demand falls: the cool-down starts", (1, 3, 1, 3, None, 100.0, 30.0), Step(3, 100.0)),
    ("still cooling down", (1, 3, 1, 3, 100.0, 129.9, 30.0), Step(3, 100.0)),
    ("cooled down: shrinks", (1, 3, 1, 3, 100.0, 130.0, 30.0), Step(1, None)),
    ("cooled down, idle: back to min", (0, 3, 1, 3, 100.0, 200.0, 30.0), Step(1, None)),
    ("no cool-down: shrinks at once", (1, 3, 1, 3, None, 5.0, 0.0), Step(1, None)),
    ("scale to zero when min is zero", (0, 1, 0, 3, 0.0, 31.0, 30.0), Step(0, None)),
]


@pytest.mark.parametrize(("args", "want"), [c[1:] for c in DECIDE], ids=[c[0] for c in DECIDE])
def test_decide(args: tuple[Any, ...], want: Step) -> None:
    wanted, current, lo, hi, low_since, now, cooldown = args
    got = decide(wanted, current, lo, hi, low_since=low_since, now=now, cooldown_s=cooldown)
    assert got == want


# -- the autoscaler over heartbeats, with an injected clock -----------------------------------


class Clock:
    def __init__(self) -> None:
        self.t = 1000.0

    def __call__(self) -> float:
        return self.t


def beat(
    a: Autoscaler, clock: Clock, answers: dict[str, float], spilled: dict[str, float] | None = None
) -> None:
    a.observe(
        {
            node: (
                clock.t,
                {"examples/mlp": {"answers": n, "spilled": (spilled or {}).get(node, 0)}},
            )
            for node, n in answers.items()
        }
    )


def target(a: Autoscaler, current: int, *, spill: bool = False) -> Any:
    return a.target(
        "examples/mlp",
        current=current,
        lo=1,
        hi=3,
        service_ms={"e1": 10.0, "e2": 10.0},
        spill=spill,
    )


def test_no_demand_data_keeps_max() -> None:
    clock = Clock()
    a = Autoscaler(cooldown_s=30.0, clock=clock)
    assert target(a, 3).replicas == 3
    beat(a, clock, {"e1": 0})
    assert target(a, 3).replicas == 3, "one heartbeat is no rate yet"
    clock.t += 1
    beat(a, clock, {"e1": 0})
    clock.t += 60
    beat(a, clock, {"e1": 0})
    assert target(a, 3).replicas == 3, "a function never invoked keeps its max"


def test_grows_with_load_and_shrinks_after_cooldown() -> None:
    clock = Clock()
    a = Autoscaler(target_utilisation=0.7, cooldown_s=30.0, clock=clock)
    total = {"e1": 0.0, "e2": 0.0}
    # 100 req/s on each of two nodes at 10 ms each: 2 busy replicas / 0.7 -> 3.
    for _ in range(5):
        beat(a, clock, total)
        clock.t += 1
        total = {n: v + 100 for n, v in total.items()}
    beat(a, clock, total)
    t = target(a, 1)
    assert t.demand is not None and t.demand.rate == pytest.approx(200.0)
    assert t.replicas == 3
    # Load drops to 10 req/s: needs 1, but only after 30 s of it.
    for _ in range(29):
        clock.t += 1
        total = {n: v + 5 for n, v in total.items()}
        beat(a, clock, total)
        assert target(a, 3).replicas == 3
    for _ in range(12):
        clock.t += 1
        total = {n: v + 5 for n, v in total.items()}
        beat(a, clock, total)
        last = target(a, 3).replicas
    assert last == 1


def test_cloud_replicas_follow_the_spill_rate() -> None:
    clock = Clock()
    a = Autoscaler(target_utilisation=0.5, cooldown_s=5.0, clock=clock)
    answers, spilled = 0.0, 0.0
    for _ in range(4):
        beat(a, clock, {"e1": answers}, {"e1": spilled})
        clock.t += 1
        answers += 100
        spilled += 60  # 60 spilled /s x 10 ms / 0.5 -> 2 cloud replicas
    beat(a, clock, {"e1": answers}, {"e1": spilled})
    assert target(a, 1, spill=True).cloud == 2
    assert target(a, 1, spill=False).cloud == 0
    for _ in range(15):
        clock.t += 1
        answers += 100
        beat(a, clock, {"e1": answers}, {"e1": spilled})
        got = target(a, 3, spill=True).cloud
    assert got == 0, "no more spills: the cloud replicas go after the cool-down"


def test_restarted_agent_counters_do_not_count_as_negative_demand() -> None:
    clock = Clock()
    a = Autoscaler(clock=clock)
    beat(a, clock, {"e1": 1000})
    clock.t += 1
    beat(a, clock, {"e1": 0})
    clock.t += 1
    beat(a, clock, {"e1": 50})
    d = a.demand("examples/mlp", {"e1": 10.0})
    assert d is not None and d.rate == pytest.approx(50.0)


# -- with real agents, a router and the reconciler ------------------------------------------


async def test_deployment_grows_under_load_and_shrinks_after_cooldown(
    fleet: Fleet, broker: Broker, tmp_path: Path
) -> None:
    root = new_root()
    nodes = ("edge-a", "edge-b", "edge-c")
    for n in nodes:
        fleet.node(n)
    heavy = build_bundle(fleet, heavy_model(), nodes=nodes, name=HEAVY, max_batch=1)
    scaler = Autoscaler(target_utilisation=0.7, cooldown_s=2.0, window_s=2.0)
    async with contextlib.AsyncExitStack() as stack:
        agents = [
            await stack.enter_async_context(
                agent_via(
                    fleet,
                    broker.tls_url,
                    root,
                    heavy,
                    n,
                    labels={"tier": "edge", "region": "eu-west", "site": n},
                    threads=1,
                    max_queue=2,
                )
            )
            for n in nodes
        ]
        c = await stack.enter_async_context(
            coordinator(fleet, broker, root, tmp_path / "coord", autoscaler=scaler)
        )
        router = await stack.enter_async_context(running_router(fleet, broker, root))
        ident = fleet.device("load")
        client = MqttClient(
            broker.tls_url,
            ident.cn,
            ssl_context=client_context(ident, fleet.home.ca_cert),
            persistent=False,
        )
        stack.push_async_callback(client.async_stop)
        await client.async_start()
        version = await push(c, heavy)
        await c.store.set_deployment(HEAVY, version, 1, 3, {}, allow_spill=False)
        c.reconciler.kick()

        async def count(want: int) -> bool:
            return len(await c.placed(HEAVY)) == want

        # No demand measured yet: the deployment's max, as before autoscaling.
        await c.wait_for(lambda: count(3), "max replicas before any demand")
        await wait_live(router, HEAVY, nodes)
        load = OpenLoad(client, root, "load", HEAVY)
        inputs = sample_inputs()
        # A trickle: one replica is plenty; after the cool-down the deployment shrinks to min.
        trickle = asyncio.ensure_future(load.async_run(4.0, 6.0, inputs, drain_s=20.0))
        await c.wait_for(lambda: count(1), "shrunk to min under a trickle", timeout=20.0)
        await trickle
        # (Nodes that lost their replica have unloaded it.)
        run_ms = max(
            s.stats.batch_ms for a in agents if (s := a.service.slots().get(HEAVY)) is not None
        )
        # Twice what one replica can run: demand x run time / 0.7 asks for all three.
        rate = 2.0 * 1000.0 / run_ms
        heavy_load = asyncio.ensure_future(load.async_run(rate, 6.0, inputs, drain_s=20.0))
        try:
            await c.wait_for(lambda: count(3), f"grown to max under {rate:.0f}/s", timeout=20.0)
        finally:
            outcome = await heavy_load
        print(f"run {run_ms:.1f} ms, offered {rate:.0f}/s: {outcome.figures()}")
        assert outcome.lost == 0 and outcome.duplicates == 0
        # Idle: back to min once the cool-down has passed, not before.
        t0 = time.monotonic()
        await c.wait_for(lambda: count(1), "shrunk to min when idle", timeout=20.0)
        assert time.monotonic() - t0 >= scaler.cooldown_s
