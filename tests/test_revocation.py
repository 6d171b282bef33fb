"""Revocation reaches the nodes: a revoked publisher's functions stop being served."""

from __future__ import annotations

import asyncio
import time
from pathlib import Path

import pytest
from agent_support import Device, build_bundle, fid, new_root, running_agent
from conftest import Broker, Fleet, make_fleet

from fnmesh.agent.mqtt import MqttClient
from fnmesh.certs.identity import Role
from fnmesh.certs.tls import client_context
from fnmesh.coordinator.revocation import CrlPublisher
from fnmesh.functions.examples.models import build_example
from fnmesh.functions.messages import ErrorCode


async def _coordinator_client(fleet: Fleet, broker: Broker) -> MqttClient:
    c = MqttClient(
        broker.tls_url,
        fleet.coordinator.cn,
        ssl_context=client_context(fleet.coordinator, fleet.home.ca_cert),
        persistent=False,
    )
    await c.async_start()
    return c


async def _until(pred, timeout: float = 10.0) -> None:  # type: ignore[no-untyped-def]
    end = time.monotonic() + timeout
    while not pred():
        assert time.monotonic() < end, "condition not reached in time"
        await asyncio.sleep(0.02)


async def test_revoked_publisher_stops_being_served(fleet: Fleet, broker: Broker) -> None:
    root = new_root()
    digits = build_bundle(fleet, "digits")
    coord = await _coordinator_client(fleet, broker)
    crl = CrlPublisher(fleet.home.crl, coord, root)
    try:
        await crl.async_check()
        async with (
            running_agent(fleet, broker, root, [digits]) as agent,
            Device(fleet, broker, root) as dev,
        ):
            inputs = build_example("digits").sample_inputs(1)
            assert (await dev.call("digits", inputs)).ok().version == "1.0.0"
            t0 = time.monotonic()
            fleet.ca.revoke(fleet.publisher.cn)
            assert await crl.async_check()
            await _until(lambda: fid("digits") not in agent.service.slots())
            elapsed = time.monotonic() - t0
            print(f"revoked publisher's function unloaded {elapsed * 1000:.0f} ms after revoke")
            err = (await dev.call("digits", inputs)).error()
            assert err.code == ErrorCode.NOT_FOUND
            assert "revoked" in agent.revoked_functions[fid("digits")]
            assert agent.describe()["revoked"]
    finally:
        await coord.async_stop()


async def test_older_revocation_list_refused(fleet: Fleet, broker: Broker) -> None:
    root = new_root()
    old = fleet.home.crl.read_bytes()
    fleet.ca.issue(Role.DEVICE, "victim")
    fleet.ca.revoke("device.victim")
    coord = await _coordinator_client(fleet, broker)
    crl = CrlPublisher(fleet.home.crl, coord, root)
    try:
        await crl.async_check()
        async with running_agent(fleet, broker, root) as agent:
            await _until(lambda: len(agent.trust.revoked) == 1)
            before = agent.revocations.rejected
            await coord.async_publish(f"{root}/crl", old, qos=1, retain=True)
            await _until(lambda: agent.revocations.rejected > before)
            assert len(agent.trust.revoked) == 1, "an older list must not un-revoke anything"
    finally:
        await coord.async_stop()


async def test_foreign_revocation_list_refused(
    fleet: Fleet, broker: Broker, tmp_path: Path
) -> None:
    root = new_root()
    other = make_fleet(tmp_path / "other")
    coord = await _coordinator_client(fleet, broker)
    try:
        async with running_agent(fleet, broker, root) as agent:
            before = agent.revocations.rejected
            await coord.async_publish(
                f"{root}/crl", other.home.crl.read_bytes(), qos=1, retain=True
            )
            await _until(lambda: agent.revocations.rejected > before)
            assert agent.trust.crl is None or agent.trust.ca == fleet.ca.cert
    finally:
        await coord.async_stop()


@pytest.mark.parametrize(
    "payload", [b"", b"garbage", b"-----BEGIN X509 CRL-----\nAAAA\n-----END X509 CRL-----\n"]
)
async def test_malformed_revocation_list_refused(
    fleet: Fleet, broker: Broker, payload: bytes
) -> None:
    root = new_root()
    coord = await _coordinator_client(fleet, broker)
    try:
        async with running_agent(fleet, broker, root) as agent:
            before = agent.revocations.rejected
            await coord.async_publish(f"{root}/crl", payload, qos=1, retain=False)
            await _until(lambda: agent.revocations.rejected > before)
            assert agent.mqtt.connected
    finally:
        await coord.async_stop()
