"""Publishing the fleet's revocation list, and reacting when it changes.

``fnmesh certs revoke`` (locally, or through the API) re-signs ``ca/crl.pem``;
the coordinator notices the new file, publishes it retained at ``{root}/crl``
for nodes and routers, and runs its hooks (regenerate the broker ACL, reload
the broker). The API already checks every caller against the newest list.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections.abc import Awaitable, Callable
from pathlib import Path

from fnmesh.agent.mqtt import MqttClient

log = logging.getLogger("fnmesh.coordinator.revocation")

Hook = Callable[[], Awaitable[None]]


class CrlPublisher:
    """Watches the CRL file and publishes each new version, retained."""

    def __init__(
        self,
        crl_path: Path,
        mqtt: MqttClient,
        root: str,
        *,
        period_s: float = 0.25,
        hooks: list[Hook] | None = None,
    ) -> None:
        self.crl_path = crl_path
        self.mqtt = mqtt
        self.topic = f"{root}/crl"
        self.period_s = period_s
        self.hooks = hooks or []
        self._mtime: float | None = None
        self._task: asyncio.Task[None] | None = None
        self.published = 0

    def start(self) -> None:
        self._task = asyncio.get_running_loop().create_task(self._run())

    async def async_stop(self) -> None:
        if self._task is not None:
            self._task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._task
            self._task = None

    async def async_check(self) -> bool:
        """Publish the list if it changed since the last look; True if it did."""
        try:
            mtime = self.crl_path.stat().st_mtime
        except FileNotFoundError:
            return False
        if mtime == self._mtime:
            return False
        data = self.crl_path.read_bytes()
        await self.mqtt.async_publish(self.topic, data, qos=1, retain=True)
        first = self._mtime is None
        self._mtime = mtime
        self.published += 1
        log.info("published the revocation list (%d bytes)", len(data))
        if first:
            # The list this process started with: nothing changed yet.
            return True
        for hook in self.hooks:
            try:
                await hook()
            except Exception:  # a failing hook must not stop publication
                log.exception("revocation hook failed")
        return True

    async def _run(self) -> None:
        while True:
            if self.mqtt.connected:
                await self.async_check()
            await asyncio.sleep(self.period_s)
