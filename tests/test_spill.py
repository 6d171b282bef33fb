"""Spill-over: what the edge cannot admit goes to an allowed cloud node, never outside its regions."""

from __future__ import annotations

import asyncio
import base64
import json
from typing import Any

from agent_support import Device, build_bundle, new_root, running_agent
from conftest import Broker, Fleet
from test_router import running_router, wait_live

from fnmesh.agent.mqtt import MqttClient
from fnmesh.certs.tls import client_context
from fnmesh.functions.bundle import Bundle
from fnmesh.functions.examples.models import build_example
from fnmesh.functions.messages import ErrorCode, Response

FID = "examples/mlp"


def assign_body(node: str, bundle: bytes, *, allow_spill: bool, regions: list[str]) -> bytes:
    b = Bundle.parse(bundle)
    return json.dumps(
        {
            "node": node,
            "generation": 1,
            "functions": [
                {
                    "function": FID,
                    "version": b.manifest.version,
                    "digest": b.digest,
                    "key": base64.b64encode(b"\x00" * 32).decode(),
                    "allow_spill": allow_spill,
                    "regions": regions,
                }
            ],
        }
    ).encode()


async def publish_assignments(
    fleet: Fleet, broker: Broker, root: str, bodies: dict[str, bytes]
) -> None:
    coord = MqttClient(
        broker.tls_url,
        fleet.coordinator.cn,
        ssl_context=client_context(fleet.coordinator, fleet.home.ca_cert),
        persistent=False,
    )
    await coord.async_start()
    try:
        for node, body in bodies.items():
            await coord.async_publish(f"{root}/nodes/{node}/assign", body, qos=1, retain=True)
    finally:
        await coord.async_stop()


async def flood(dev: Device, n: int) -> list[Any]:
    inputs = build_example("mlp").sample_inputs(n, seed=5)
    calls = [
        dev.call(FID, {"image": inputs["image"][i : i + 1]}, topic=f"{dev.root}/fn/{FID}/invoke")
        for i in range(n)
    ]
    return list(await asyncio.gather(*calls))


async def test_saturated_edge_spills_to_allowed_cloud(fleet: Fleet, broker: Broker) -> None:
    root = new_root()
    mlp = build_bundle(
        fleet, "mlp", nodes=("edge-1", "cloud-eu", "cloud-us"), regions=("eu-west",), max_batch=1
    )
    await publish_assignments(
        fleet,
        broker,
        root,
        {
            n: assign_body(n, mlp, allow_spill=True, regions=["eu-west"])
            for n in ("edge-1", "cloud-eu", "cloud-us")
        },
    )
    async with (
        running_agent(
            fleet,
            broker,
            root,
            [mlp],
            node="edge-1",
            max_queue=1,
            labels={"tier": "edge", "region": "eu-west"},
        ) as edge,
        running_agent(
            fleet,
            broker,
            root,
            [mlp],
            node="cloud-eu",
            labels={"tier": "cloud", "region": "eu-west"},
        ) as cloud,
        running_agent(
            fleet,
            broker,
            root,
            [mlp],
            node="cloud-us",
            labels={"tier": "cloud", "region": "us-east"},
        ) as outside,
        running_router(fleet, broker, root) as router,
        Device(fleet, broker, root) as dev,
    ):
        await wait_live(router, FID, ["edge-1", "cloud-eu", "cloud-us"])
        # Route every request to the edge node: the cloud ones serve spills only.
        router.table.nodes["cloud-eu"].forwards = 10**6
        router.table.nodes["cloud-us"].forwards = 10**6
        replies = await flood(dev, 48)
        ok = [r.body for r in replies]
        assert all(isinstance(r, Response) for r in ok), [
            r for r in ok if not isinstance(r, Response)
        ][:3]
        spilled = [r for r in ok if isinstance(r, Response) and r.timing.spilled]
        assert spilled, "a queue of one must have spilled some of 48 concurrent requests"
        assert {r.node for r in spilled} == {"cloud-eu"}, "spills stay inside the allowed regions"
        assert all(
            not r.timing.spilled for r in ok if isinstance(r, Response) and r.node == "edge-1"
        )
        print(f"{len(spilled)} of 48 spilled to cloud-eu")
        assert edge.metrics.spills.labels(FID)._value.get() == len(spilled)
        assert outside.describe()["functions"]
        assert cloud.describe()["functions"]


async def test_no_allowed_cloud_means_saturated_not_silence(fleet: Fleet, broker: Broker) -> None:
    root = new_root()
    mlp = build_bundle(
        fleet, "mlp", nodes=("edge-1", "cloud-us"), regions=("eu-west",), max_batch=1
    )
    await publish_assignments(
        fleet,
        broker,
        root,
        {
            n: assign_body(n, mlp, allow_spill=True, regions=["eu-west"])
            for n in ("edge-1", "cloud-us")
        },
    )
    async with (
        running_agent(
            fleet,
            broker,
            root,
            [mlp],
            node="edge-1",
            max_queue=1,
            labels={"tier": "edge", "region": "eu-west"},
        ),
        running_agent(
            fleet,
            broker,
            root,
            [mlp],
            node="cloud-us",
            labels={"tier": "cloud", "region": "us-east"},
        ) as outside,
        running_router(fleet, broker, root) as router,
        Device(fleet, broker, root) as dev,
    ):
        await wait_live(router, FID, ["edge-1", "cloud-us"])
        router.table.nodes["cloud-us"].forwards = 10**6
        replies = [r.body for r in await flood(dev, 32)]
        codes = {r.code for r in replies if not isinstance(r, Response)}
        assert codes == {ErrorCode.SATURATED}, codes
        assert all(r.node == "edge-1" for r in replies if isinstance(r, Response))
        assert outside.metrics.render().count(b'fnmesh_agent_answers_total{code="ok"') == 0


async def test_spill_forbidden_answers_saturated(fleet: Fleet, broker: Broker) -> None:
    root = new_root()
    mlp = build_bundle(fleet, "mlp", nodes=("edge-1", "cloud-eu"), max_batch=1)
    await publish_assignments(
        fleet,
        broker,
        root,
        {n: assign_body(n, mlp, allow_spill=False, regions=[]) for n in ("edge-1", "cloud-eu")},
    )
    async with (
        running_agent(
            fleet,
            broker,
            root,
            [mlp],
            node="edge-1",
            max_queue=1,
            labels={"tier": "edge", "region": "eu-west"},
        ) as edge,
        running_agent(
            fleet,
            broker,
            root,
            [mlp],
            node="cloud-eu",
            labels={"tier": "cloud", "region": "eu-west"},
        ),
        running_router(fleet, broker, root) as router,
        Device(fleet, broker, root) as dev,
    ):
        await wait_live(router, FID, ["edge-1", "cloud-eu"])
        router.table.nodes["cloud-eu"].forwards = 10**6
        replies = [r.body for r in await flood(dev, 32)]
        assert len(replies) == 32
        assert any(not isinstance(r, Response) and r.code == ErrorCode.SATURATED for r in replies)
        assert not any(isinstance(r, Response) and r.timing.spilled for r in replies)
        assert edge.metrics.spills.labels(FID)._value.get() == 0


async def test_site_router_reaches_cloud_replicas_through_their_spill_inbox(
    fleet: Fleet, broker: Broker
) -> None:
    """Behind a site broker only spill inboxes cross to the cloud: a site's router uses them."""
    root = new_root()
    mlp = build_bundle(fleet, "mlp", nodes=("cloud-eu",), regions=("eu-west",))
    await publish_assignments(
        fleet,
        broker,
        root,
        {"cloud-eu": assign_body("cloud-eu", mlp, allow_spill=True, regions=["eu-west"])},
    )
    async with (
        running_agent(
            fleet,
            broker,
            root,
            [mlp],
            node="cloud-eu",
            labels={"tier": "cloud", "region": "eu-west", "site": "cloud"},
        ),
        running_router(fleet, broker, root, site="lyon") as router,
        Device(fleet, broker, root) as dev,
    ):
        await wait_live(router, FID, ["cloud-eu"])
        replies = [r.body for r in await flood(dev, 4)]
        assert all(isinstance(r, Response) and r.timing.spilled for r in replies), replies
        assert router.metrics.render().count(b"fnmesh_router_spilled_total") >= 1
