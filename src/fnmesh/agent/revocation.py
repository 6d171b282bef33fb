"""The node's view of the revocation list: newer lists replace older ones, revoked work stops.

The coordinator publishes the fleet's signed list retained at ``{root}/crl``.
A node accepts a list only if the fleet CA signed it and it is not older than
the one it holds; it then stops serving every function whose publisher is on
it. The node keeps its last list while cut off from the coordinator: the list
stays valid until its ``next_update`` (``certs.ca.CRL_DAYS``), the documented
grace period; after that the node keeps serving what it has but says so in
its status, since it can no longer learn of new revocations.
"""

from __future__ import annotations

import logging
from collections.abc import Awaitable, Callable
from datetime import UTC, datetime

from fnmesh.certs.errors import TrustError
from fnmesh.certs.trust import TrustStore, load_crl

log = logging.getLogger("fnmesh.agent.revocation")


class RevocationFollower:
    def __init__(
        self,
        get_trust: Callable[[], TrustStore],
        set_trust: Callable[[TrustStore], None],
        on_change: Callable[[TrustStore], Awaitable[None]],
    ) -> None:
        self._get = get_trust
        self._set = set_trust
        self._on_change = on_change
        self.rejected = 0

    async def async_on_message(self, payload: bytes) -> bool:
        """Adopt a newer list; returns True if it was adopted."""
        current = self._get()
        try:
            crl = load_crl(payload, current.ca)
            new = current.with_crl(crl)
        except TrustError as e:
            self.rejected += 1
            log.warning("refused a revocation list: %s", e)
            return False
        if current.crl is not None and new.revoked == current.revoked:
            self._set(new)
            return False
        self._set(new)
        log.info("revocation list now has %d serial(s)", len(new.revoked))
        await self._on_change(new)
        return True

    def stale(self) -> bool:
        """True once the held list is past its next update (the grace period is over)."""
        crl = self._get().crl
        if crl is None or crl.next_update_utc is None:
            return False
        return datetime.now(UTC) > crl.next_update_utc
