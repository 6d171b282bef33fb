"""Presence: the retained ``nodes/{node}/status`` (Last Will: offline) and periodic heartbeats."""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import time
from collections.abc import Awaitable, Callable
from typing import Any

from fnmesh.agent.mqtt import MqttClient, TransportError, Will

log = logging.getLogger("fnmesh.agent.presence")


def status_topic(root: str, node: str) -> str:
    return f"{root}/nodes/{node}/status"


def heartbeat_topic(root: str, node: str) -> str:
    return f"{root}/nodes/{node}/heartbeat"


def offline_will(root: str, node: str, cn: str) -> Will:
    payload = json.dumps({"node": node, "cn": cn, "state": "offline"}).encode()
    return Will(status_topic(root, node), payload, qos=1, retain=True)


class Presence:
    """Publishes what this node is and what it serves, and how loaded it is."""

    def __init__(
        self,
        client: MqttClient,
        *,
        root: str,
        node: str,
        describe: Callable[[], dict[str, Any]],
        load: Callable[[], dict[str, Any]],
        period_s: float = 2.0,
        probe_coordinator: Callable[[], Awaitable[float | None]] | None = None,
    ) -> None:
        self.client = client
        self.root = root
        self.node = node
        self._describe = describe
        self._load = load
        self.period_s = period_s
        self._task: asyncio.Task[None] | None = None
        self.state = "ready"
        self.rtt_ms: dict[str, float] = {}
        self._probe_coordinator = probe_coordinator
        self.seq = 0

    async def async_publish_status(self, state: str | None = None) -> None:
        if state is not None:
            self.state = state
        body = {**self._describe(), "state": self.state, "ts": time.time()}
        await self.client.async_publish(
            status_topic(self.root, self.node), json.dumps(body).encode(), qos=1, retain=True
        )

    def start(self) -> None:
        self._task = asyncio.get_running_loop().create_task(self._beat())

    async def _beat(self) -> None:
        while True:
            await asyncio.sleep(self.period_s)
            if not self.client.connected:
                continue
            self.seq += 1
            body = {
                "node": self.node,
                "seq": self.seq,
                "ts": time.time(),
                "rtt_ms": dict(self.rtt_ms),
                **self._load(),
            }
            # The heartbeat is published at QoS 1 and its PUBACK timed: that round
            # trip is the node's RTT to the broker, reported in the next heartbeat.
            t0 = time.perf_counter()
            try:
                await self.client.async_publish(
                    heartbeat_topic(self.root, self.node),
                    json.dumps(body).encode(),
                    qos=1,
                    timeout=max(1.0, 3 * self.period_s),
                )
                self.rtt_ms["broker"] = round((time.perf_counter() - t0) * 1000, 3)
            except (TransportError, TimeoutError) as e:
                log.debug("heartbeat not acknowledged: %s", e)
            if self._probe_coordinator is not None:
                rtt = await self._probe_coordinator()
                if rtt is not None:
                    self.rtt_ms["coordinator"] = round(rtt, 3)

    async def async_stop(self) -> None:
        if self._task is not None:
            self._task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._task
            self._task = None
