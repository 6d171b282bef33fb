"""A site broker bridged to the cloud broker carries exactly what DESIGN.md lists."""

from __future__ import annotations

import asyncio
from collections.abc import Iterator
from pathlib import Path

import pytest
from conftest import Fleet

from fnmesh.agent.mqtt import MqttClient
from fnmesh.certs.identity import Identity, Role, load_identity
from fnmesh.certs.tls import client_context
from fnmesh.coordinator.acl import acl_for_home, write_acl
from fnmesh.coordinator.broker import Mosquitto, free_port, render, settings_for_home, write_config

ROOT = "fnmesh/v1"


class Pair:
    def __init__(self, cloud: Mosquitto, site: Mosquitto) -> None:
        self.cloud = cloud
        self.site = site

    def url(self, which: Mosquitto) -> str:
        return f"mqtts://127.0.0.1:{which.port}"


@pytest.fixture
def brokers(fleet: Fleet, tmp_path: Path) -> Iterator[Pair]:
    fleet.ca.issue(Role.BROKER, "site-a", sans=["localhost", "127.0.0.1"])
    fleet.node("cloud-1")
    fleet.device("meter-1")
    for role, name in ((Role.ROUTER, "cloud"), (Role.ROUTER, "site")):
        fleet.ca.issue(role, name)
    acl = write_acl(tmp_path / "acl", acl_for_home(fleet.home, {}, ROOT))
    cdir, sdir = tmp_path / "cloud", tmp_path / "site"
    cdir.mkdir()
    sdir.mkdir()
    cport, sport = free_port(), free_port()
    cloud = Mosquitto(
        write_config(settings_for_home(fleet.home, cdir, tls_port=cport, acl_file=acl), cdir), cport
    ).start()
    site_settings = settings_for_home(
        fleet.home,
        sdir,
        tls_port=sport,
        broker_name="broker.site-a",
        acl_file=acl,
        bridge_to=f"mqtts://127.0.0.1:{cport}",
        root=ROOT,
    )
    assert "connection broker-site-a" in render(site_settings)
    site = Mosquitto(write_config(site_settings, sdir), sport).start()
    try:
        yield Pair(cloud, site)
    finally:
        site.stop()
        cloud.stop()


class Spy:
    def __init__(self, url: str, ident: Identity, fleet: Fleet, topics: list[str]) -> None:
        self.client = MqttClient(
            url,
            f"{ident.cn}-spy",
            ssl_context=client_context(ident, fleet.home.ca_cert),
            persistent=False,
        )
        self.got: asyncio.Queue[tuple[str, bytes]] = asyncio.Queue()
        for t in topics:
            self.client.subscribe(t, lambda m: self.got.put_nowait((m.topic, m.payload)))

    async def expect(self, topic: str, timeout: float = 10.0) -> bytes:
        end = asyncio.get_running_loop().time() + timeout
        while True:
            async with asyncio.timeout(max(0.05, end - asyncio.get_running_loop().time())):
                t, p = await self.got.get()
            if t == topic:
                return p


async def test_bridge_carries_what_it_must_and_nothing_else(fleet: Fleet, brokers: Pair) -> None:
    lyon = fleet.node("lyon-1")
    cloud_node = fleet.node("cloud-1")
    coord = fleet.coordinator
    dev = fleet.device("meter-1")

    def ident(cn: str) -> Identity:
        return load_identity(fleet.home.identity_dir(cn))

    at_cloud = Spy(
        brokers.url(brokers.cloud),
        ident("router.cloud"),
        fleet,
        [f"{ROOT}/nodes/+/status", f"{ROOT}/spill/#", f"{ROOT}/fn/#", f"{ROOT}/nodes/+/spill/#"],
    )
    at_site = Spy(
        brokers.url(brokers.site),
        ident("router.site"),
        fleet,
        [
            f"{ROOT}/nodes/+/assign",
            f"{ROOT}/crl",
            f"{ROOT}/nodes/+/status",
            f"{ROOT}/fn/#",
            f"{ROOT}/spill/#",
        ],
    )
    node_site = MqttClient(
        brokers.url(brokers.site),
        lyon.cn,
        ssl_context=client_context(lyon, fleet.home.ca_cert),
        persistent=False,
    )
    node_cloud = MqttClient(
        brokers.url(brokers.cloud),
        cloud_node.cn,
        ssl_context=client_context(cloud_node, fleet.home.ca_cert),
        persistent=False,
    )
    coordinator = MqttClient(
        brokers.url(brokers.cloud),
        coord.cn,
        ssl_context=client_context(coord, fleet.home.ca_cert),
        persistent=False,
    )
    device = MqttClient(
        brokers.url(brokers.site),
        dev.cn,
        ssl_context=client_context(dev, fleet.home.ca_cert),
        persistent=False,
    )
    replies: asyncio.Queue[bytes] = asyncio.Queue()
    inbox: asyncio.Queue[bytes] = asyncio.Queue()
    node_cloud.subscribe(f"{ROOT}/nodes/cloud-1/spill/#", lambda m: inbox.put_nowait(m.payload))
    device.subscribe(f"{ROOT}/replies/meter-1/#", lambda m: replies.put_nowait(m.payload))
    started = [at_cloud.client, at_site.client, node_site, node_cloud, coordinator, device]
    for c in started:
        await c.async_start()
    try:
        # out: a site node's status reaches the cloud.
        await node_site.async_publish(
            f"{ROOT}/nodes/lyon-1/status", b'{"state":"ready"}', retain=True
        )
        assert await at_cloud.expect(f"{ROOT}/nodes/lyon-1/status") == b'{"state":"ready"}'
        # in: an assignment and the revocation list reach the site.
        await coordinator.async_publish(
            f"{ROOT}/nodes/lyon-1/assign", b'{"generation":1}', retain=True
        )
        assert await at_site.expect(f"{ROOT}/nodes/lyon-1/assign") == b'{"generation":1}'
        await coordinator.async_publish(f"{ROOT}/crl", b"crl", retain=True)
        assert await at_site.expect(f"{ROOT}/crl") == b"crl"
        # in: a cloud node's status reaches the site.
        await node_cloud.async_publish(
            f"{ROOT}/nodes/cloud-1/status", b'{"state":"ready","c":1}', retain=True
        )
        assert await at_site.expect(f"{ROOT}/nodes/cloud-1/status") == b'{"state":"ready","c":1}'
        # out: a spill addressed to a cloud node crosses.
        router_site = at_site.client
        await router_site.async_publish(f"{ROOT}/nodes/cloud-1/spill/examples/digits", b"spilled")
        async with asyncio.timeout(10):
            assert await inbox.get() == b"spilled"
        # both: replies from the cloud reach a device at the site.
        await node_cloud.async_publish(f"{ROOT}/replies/meter-1/r1", b"answer")
        async with asyncio.timeout(10):
            assert await replies.get() == b"answer"
        # never: the site router's spill topic and device requests stay at the site.
        await node_site.async_publish(f"{ROOT}/spill/examples/digits", b"site-spill")
        assert await at_site.expect(f"{ROOT}/spill/examples/digits") == b"site-spill"
        await node_site.async_publish(f"{ROOT}/nodes/lyon-1/status", b'{"state":"ready","fence":1}')
        # The fence went site -> cloud after the spill: had the spill crossed, it came first.
        while True:
            async with asyncio.timeout(10):
                topic, payload = await at_cloud.got.get()
            assert topic != f"{ROOT}/spill/examples/digits", "spill/# must never cross the bridge"
            if payload == b'{"state":"ready","fence":1}':
                break
    finally:
        for c in reversed(started):
            await c.async_stop()
