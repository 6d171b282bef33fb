"""Keeping a broker's ACL in step with the fleet: regenerate it, then have Mosquitto reload it.

Called when grants change and when the revocation list changes. Mosquitto
re-reads its ACL and CRL on SIGHUP (measured with 2.0.11: a new grant takes
effect within milliseconds, a revoked certificate's new handshakes are refused);
a client already connected with a revoked certificate keeps its connection,
but with no ACL block it can neither publish nor receive.
"""

from __future__ import annotations

import asyncio
import logging
import os
import signal
from dataclasses import dataclass
from pathlib import Path

from fnmesh.certs.home import Home
from fnmesh.coordinator.acl import acl_for_home, write_acl
from fnmesh.coordinator.grants import Grants

log = logging.getLogger("fnmesh.coordinator.broker")


@dataclass
class BrokerControl:
    home: Home
    grants: Grants
    root: str
    acl_path: Path | None = None
    #: A file holding the PID of the Mosquitto to signal (``fnmesh up`` writes it).
    pid_file: Path | None = None
    reloads: int = 0

    async def async_refresh(self) -> bool:
        """Regenerate the ACL and reload the broker; False when this coordinator manages none."""
        if self.acl_path is None:
            return False
        subjects = await self.grants.acl_subjects()
        text = await asyncio.get_running_loop().run_in_executor(
            None, lambda: acl_for_home(self.home, subjects, self.root)
        )
        write_acl(self.acl_path, text)
        self._reload()
        return True

    def _reload(self) -> None:
        if self.pid_file is None:
            return
        try:
            pid = int(self.pid_file.read_text().strip())
            os.kill(pid, signal.SIGHUP)
            self.reloads += 1
            log.info("broker %d reloads its ACL and revocation list", pid)
        except (OSError, ValueError) as e:
            log.warning("could not reload the broker (%s): %s", self.pid_file, e)
