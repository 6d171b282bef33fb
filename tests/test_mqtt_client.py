"""The agent's MQTT client against a real Mosquitto: bursts, partial reads, reconnects."""

from __future__ import annotations

import asyncio

from agent_support import NODE
from conftest import Broker, Fleet

from fnmesh.agent.mqtt import MqttClient
from fnmesh.certs.home import DEFAULT_TOPIC_ROOT
from fnmesh.certs.tls import client_context

WAIT = 10.0


async def test_messages_that_arrive_together_are_all_delivered_in_order(
    fleet: Fleet, broker: Broker
) -> None:
    """Many packets in one TLS read: none is lost or held back (TLS holds bytes the selector
    does not report), in order, and again after the broker restarts."""
    ident = fleet.node(NODE)
    topic = f"{DEFAULT_TOPIC_ROOT}/nodes/{NODE}/status"
    n = 500
    got: list[int] = []
    done = asyncio.Event()
    client = MqttClient(
        broker.tls_url,
        f"{ident.cn}-burst",
        ssl_context=client_context(ident, fleet.home.ca_cert),
        persistent=False,
    )

    def on_message(msg: object) -> None:
        got.append(int(getattr(msg, "payload", b"-1")))
        if len(got) == n:
            done.set()

    connects = 0
    reconnected = asyncio.Event()

    async def on_connect() -> None:
        nonlocal connects
        connects += 1
        if connects == 2:
            reconnected.set()

    client.subscribe(topic, on_message, qos=1)
    client.add_connect_hook(on_connect)
    await client.async_start()
    try:
        # Sizes from 1 byte to past one TLS record, so packets straddle reads.
        for i in range(n):
            client.publish(topic, str(i).encode().ljust(1 + (i * 37) % 20000), 1, False)
        async with asyncio.timeout(WAIT):
            await done.wait()
        assert got == list(range(n))
        # After a reconnect the client starts clean and still receives.
        broker.restart()
        async with asyncio.timeout(WAIT):
            await reconnected.wait()
        got.clear()
        done.clear()
        n = 20
        for i in range(n):
            client.publish(topic, str(i).encode(), 1, False)
        async with asyncio.timeout(WAIT):
            await done.wait()
        assert got == list(range(n))
    finally:
        await client.async_stop()
