"""Latency objectives: placement and routing use measured round trips; overflow goes to the cloud,
never to an edge node too far away to meet the objective."""

from __future__ import annotations

import asyncio
import contextlib
import json
import time
from collections import Counter
from collections.abc import AsyncIterator, Iterable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from agent_support import WAIT, Device, build_bundle, new_root
from conftest import Broker, Fleet
from delay_proxy import DelayProxy
from test_router import running_router, wait_live

from fnmesh.agent.main import Agent, AgentConfig
from fnmesh.agent.mqtt import MqttClient
from fnmesh.certs.tls import client_context
from fnmesh.coordinator.autoscale import Autoscaler
from fnmesh.coordinator.reconciler import Reconciler
from fnmesh.coordinator.registry import Registry
from fnmesh.coordinator.store import BlobStore, Store
from fnmesh.functions.bundle import Bundle
from fnmesh.functions.examples.models import build_example
from fnmesh.functions.messages import Response

FID = "examples/mlp"
NEAR, FAR, CLOUD = "near-1", "far-1", "cloud-1"


@contextlib.asynccontextmanager
async def agent_via(
    fleet: Fleet, broker_url: str, root: str, bundle: bytes, node: str, **cfg: Any
) -> AsyncIterator[Agent]:
    """An agent on this loop that reaches the broker at ``broker_url`` (a delay proxy, say)."""
    fleet.node(node)
    cfg.setdefault("heartbeat_s", 0.5)
    agent = Agent(
        AgentConfig(home=fleet.home.root, name=node, broker=broker_url, topic_root=root, **cfg)
    )
    try:
        await agent.async_start()
        await agent.async_serve_bundle(bundle)
        await agent.presence.async_publish_status()
        yield agent
    finally:
        await agent.async_stop()


@dataclass
class Coordinator:
    """The coordinator's control loop on this loop: store, registry, reconciler (no REST API)."""

    store: Store
    registry: Registry
    reconciler: Reconciler

    async def placed(self, function: str) -> set[str]:
        return {p.node for p in await self.store.placements(function)}

    async def wait_for(self, pred: Any, what: str, timeout: float = WAIT) -> Any:
        end = time.monotonic() + timeout
        while True:
            got = pred()
            if asyncio.iscoroutine(got):
                got = await got
            if got:
                return got
            if time.monotonic() > end:
                raise AssertionError(f"{what}: not within {timeout:.0f} s")
            await asyncio.sleep(0.1)


@contextlib.asynccontextmanager
async def coordinator(
    fleet: Fleet,
    broker: Broker,
    root: str,
    state: Path,
    *,
    autoscaler: Autoscaler | None = None,
    tick_s: float = 0.25,
) -> AsyncIterator[Coordinator]:
    """Registry fed from MQTT and a reconciler publishing retained assignments, every tick."""
    state.mkdir(parents=True, exist_ok=True)
    store = await Store.open(f"sqlite+aiosqlite:///{state / 'coordinator.db'}")
    registry = Registry(heartbeat_period=0.5)
    mqtt = MqttClient(
        broker.tls_url,
        fleet.coordinator.cn,
        ssl_context=client_context(fleet.coordinator, fleet.home.ca_cert),
        persistent=False,
    )
    prefix = f"{root}/nodes/"
    mqtt.subscribe(
        prefix + "+/status",
        lambda m: registry.on_status(m.topic[len(prefix) :].split("/")[0], bytes(m.payload)),
    )
    mqtt.subscribe(
        prefix + "+/heartbeat",
        lambda m: registry.on_heartbeat(m.topic[len(prefix) :].split("/")[0], bytes(m.payload)),
        qos=0,
    )
    reconciler = Reconciler(
        store=store,
        blobs=BlobStore(state / "blobs"),
        registry=registry,
        mqtt=mqtt,
        home=fleet.home,
        trust=lambda: fleet.trust,
        identity=fleet.coordinator,
        root=root,
        coordinator_url="https://127.0.0.1:9",  # agents serve their own copy: never fetched
        autoscaler=autoscaler,
    )
    try:
        await mqtt.async_start()
        reconciler.start(tick_s)
        yield Coordinator(store, registry, reconciler)
    finally:
        await reconciler.async_stop()
        await mqtt.async_stop()
        await store.close()


async def push(c: Coordinator, bundle: bytes) -> str:
    b = Bundle.parse(bundle)
    c.reconciler.blobs.put(b.digest, bundle)
    m = json.loads(b.manifest_bytes)
    await c.store.add_version(
        b.manifest.name, b.manifest.version, b.digest, m, b.manifest.publisher, len(bundle), "op"
    )
    return b.manifest.version


async def burst(dev: Device, n: int, seed: int = 5) -> list[Any]:
    inputs = build_example("mlp").sample_inputs(n, seed=seed)
    calls = [
        dev.call(FID, {"image": inputs["image"][i : i + 1]}, topic=f"{dev.root}/fn/{FID}/invoke")
        for i in range(n)
    ]
    return [r.body for r in await asyncio.gather(*calls)]


def by_node(replies: Iterable[Any]) -> Counter[str]:
    return Counter(r.node for r in replies if isinstance(r, Response))


async def test_objective_places_near_and_overflow_skips_the_far_edge(
    fleet: Fleet, broker: Broker, tmp_path: Path
) -> None:
    root = new_root()
    mlp = build_bundle(fleet, "mlp", nodes=(NEAR, FAR, CLOUD), max_batch=1)
    edge = {"tier": "edge", "region": "eu-west"}
    # 2.5 ms and 30 ms each way: 5 ms and 60 ms added to each edge node's round trip.
    with (
        DelayProxy("127.0.0.1", 0, "127.0.0.1", broker.tls_port, 0.0025) as near_px,
        DelayProxy("127.0.0.1", 0, "127.0.0.1", broker.tls_port, 0.030) as far_px,
    ):
        async with (
            agent_via(
                fleet,
                f"mqtts://127.0.0.1:{near_px.port}",
                root,
                mlp,
                NEAR,
                labels={**edge, "site": "near"},
                threads=1,
                max_queue=1,
            ),
            agent_via(
                fleet,
                f"mqtts://127.0.0.1:{far_px.port}",
                root,
                mlp,
                FAR,
                labels={**edge, "site": "far"},
            ),
            agent_via(
                fleet,
                broker.tls_url,
                root,
                mlp,
                CLOUD,
                labels={"tier": "cloud", "region": "eu-west", "site": "cloud-eu"},
            ),
            coordinator(fleet, broker, root, tmp_path / "coord") as c,
            running_router(fleet, broker, root) as router,
            Device(fleet, broker, root) as dev,
        ):
            # Placement needs measured round trips: wait for the heartbeats to bring them.
            def rtts() -> dict[str, float] | None:
                got = {n: c.registry.get(n) for n in (NEAR, FAR, CLOUD)}
                out = {n: v.rtt_ms for n, v in got.items() if v is not None and v.rtt_ms}
                return out if len(out) == 3 and out[FAR] >= 60 else None

            measured = await c.wait_for(rtts, "round trips from heartbeats")
            print(f"measured RTTs (ms): {measured}")
            assert measured[NEAR] >= 5 and measured[NEAR] < measured[FAR]
            await c.store.put_policy(
                "fast-mlp",
                {
                    "name": "fast-mlp",
                    "selector": {"namespace": "examples", "name": "mlp"},
                    "rules": {"latency_p95_ms": 30},
                },
            )
            version = await push(c, mlp)
            await c.store.set_deployment(FID, version, 1, 2, {}, allow_spill=True)
            c.reconciler.kick()

            async def placed() -> set[str] | None:
                got = await c.placed(FID)
                return got if len(got) == 2 else None

            nodes = await c.wait_for(placed, "two replicas placed")
            assert nodes == {NEAR, CLOUD}, "the objective rules the far edge node out"
            # The router follows the retained assignments (objective and spill rules too).
            await wait_live(router, FID, [NEAR, CLOUD])
            await router.async_wait_until(lambda: router.table.objective(FID) == 30.0, WAIT)
            # One at a time: every request goes to the near node.
            steady = []
            for i in range(8):
                steady += await burst(dev, 1, seed=i)
            assert by_node(steady) == {NEAR: 8}, steady
            # A burst the near node cannot queue (one thread, a queue of one): the overflow
            # goes to the allowed cloud node, never to the far edge node.
            replies = await burst(dev, 48)
            assert all(isinstance(r, Response) for r in replies), [
                r for r in replies if not isinstance(r, Response)
            ][:3]
            counts = by_node(replies)
            print(f"answers per node: {dict(counts)}")
            assert counts[FAR] == 0, counts
            assert counts[NEAR] > 0 and counts[CLOUD] > 0, counts
            assert all(r.timing.spilled for r in replies if r.node == CLOUD)
            assert not any(r.timing.spilled for r in replies if r.node == NEAR)
