"""The registry of nodes, built from their retained status and their heartbeats.

A node is ``offline`` when its Last Will (or a clean shutdown) says so, or
when no heartbeat arrived for ``3 x heartbeat period``, whichever comes
first. The registry keeps an in-memory view for placement and writes state
changes through to the store, so a restarted coordinator knows its nodes.
"""

from __future__ import annotations

import json
import logging
import time
from collections.abc import Callable
from dataclasses import dataclass, field, replace
from typing import Any

log = logging.getLogger("fnmesh.coordinator.registry")

#: Heartbeats that may be missed before a node counts as offline.
MISSED_HEARTBEATS = 3


@dataclass(frozen=True, slots=True)
class NodeView:
    """What the coordinator knows of one node right now."""

    name: str
    cn: str = ""
    state: str = "unknown"
    labels: dict[str, str] = field(default_factory=dict)
    hardware: dict[str, Any] = field(default_factory=dict)
    functions: dict[str, str] = field(default_factory=dict)
    fingerprint: str = ""
    http: str | None = None
    last_status: float = 0.0
    last_heartbeat: float = 0.0
    load: dict[str, Any] = field(default_factory=dict)
    heartbeat_period: float = 2.0
    draining: bool = False
    offline_since: float | None = None
    #: The node's measured round trip to the broker (ms), from its heartbeats.
    rtt_ms: float | None = None
    #: Its round trip to the coordinator's API (ms), from its heartbeats.
    rtt_coordinator_ms: float | None = None
    #: The certificate fingerprint its mDNS record advertises ("" when not seen on the LAN).
    advertised_fingerprint: str = ""
    #: Why this view must not be given work (state ``untrusted``).
    untrusted_reason: str | None = None

    @property
    def live(self) -> bool:
        return self.state in ("ready", "joined")

    @property
    def has_gpu(self) -> bool:
        return bool(self.hardware.get("gpus"))


class Registry:
    """Node views, updated from MQTT callbacks on the loop."""

    def __init__(
        self,
        *,
        heartbeat_period: float = 2.0,
        on_change: Callable[[str, NodeView | None, NodeView], None] | None = None,
        clock: Callable[[], float] = time.time,
    ) -> None:
        self.heartbeat_period = heartbeat_period
        self._nodes: dict[str, NodeView] = {}
        self._on_change = on_change
        self._clock = clock
        #: LAN records (mDNS) that contradict what is known, by DNS-SD service name; never
        #: in :meth:`snapshot`, so placement cannot see them.
        self.untrusted: dict[str, NodeView] = {}

    def snapshot(self) -> dict[str, NodeView]:
        return dict(self._nodes)

    def get(self, name: str) -> NodeView | None:
        return self._nodes.get(name)

    def load(self, views: list[NodeView]) -> None:
        """Seed from the store at start-up (states are refreshed by retained status)."""
        for v in views:
            self._nodes[v.name] = v

    def _set(self, name: str, new: NodeView) -> None:
        old = self._nodes.get(name)
        if new.live and (old is None or not old.live):
            new = replace(new, offline_since=None)
        elif not new.live and (old is None or old.live):
            new = replace(new, offline_since=self._clock())
        self._nodes[name] = new
        if self._on_change is not None:
            self._on_change(name, old, new)

    def on_status(self, name: str, payload: bytes) -> None:
        now = self._clock()
        old = self._nodes.get(name) or NodeView(name=name, heartbeat_period=self.heartbeat_period)
        if not payload:
            self._set(name, replace(old, state="offline", last_status=now))
            return
        try:
            body = json.loads(payload)
            if not isinstance(body, dict):
                raise ValueError("status must be an object")
        except ValueError as e:
            log.warning("ignored a malformed status from %s: %s", name, e)
            return
        state = str(body.get("state", "unknown"))
        new = replace(
            old,
            cn=str(body.get("cn", old.cn)),
            state=state,
            labels={str(k): str(v) for k, v in (body.get("labels") or old.labels).items()},
            hardware=dict(body.get("hardware") or old.hardware),
            functions={str(k): str(v) for k, v in (body.get("functions") or {}).items()}
            if state != "offline"
            else old.functions,
            fingerprint=str(body.get("fingerprint", old.fingerprint)),
            http=body.get("http", old.http),
            last_status=now,
            heartbeat_period=float(body.get("heartbeat_s") or old.heartbeat_period),
            # A fresh "ready" counts as a heartbeat: the node is talking.
            last_heartbeat=now if state == "ready" else old.last_heartbeat,
        )
        self._set(name, new)

    def on_heartbeat(self, name: str, payload: bytes) -> None:
        now = self._clock()
        old = self._nodes.get(name)
        if old is None:
            return
        try:
            body = json.loads(payload)
            load = body.get("functions", {}) if isinstance(body, dict) else {}
            rtts = body.get("rtt_ms", {}) if isinstance(body, dict) else {}
            rtt = rtts.get("broker")
            rtt_c = rtts.get("coordinator")
        except (ValueError, AttributeError):
            return
        new = replace(
            old,
            last_heartbeat=now,
            load=load if isinstance(load, dict) else {},
            rtt_ms=float(rtt) if isinstance(rtt, int | float) and rtt >= 0 else old.rtt_ms,
            rtt_coordinator_ms=float(rtt_c)
            if isinstance(rtt_c, int | float) and rtt_c >= 0
            else old.rtt_coordinator_ms,
        )
        if old.state == "offline" and old.last_status < now and old.cn:
            # Heartbeats resumed after a missed-heartbeat verdict: the node is back.
            new = replace(new, state="ready")
        if new.state != old.state:
            self._set(name, new)
        else:
            self._nodes[name] = new

    def sweep(self) -> list[str]:
        """Mark nodes with missed heartbeats offline; returns their names."""
        now = self._clock()
        gone = []
        for name, v in list(self._nodes.items()):
            limit = MISSED_HEARTBEATS * v.heartbeat_period
            if v.live and v.last_heartbeat and now - v.last_heartbeat > limit:
                log.warning("node %s missed %d heartbeats: offline", name, MISSED_HEARTBEATS)
                self._set(name, replace(v, state="offline"))
                gone.append(name)
        return gone

    def on_lan_record(
        self,
        name: str,
        service: str,
        fingerprint: str,
        *,
        labels: dict[str, str],
        untrusted_reason: str | None,
    ) -> None:
        """What the LAN (mDNS) says about node ``name``; a contradicting record is kept apart.

        A record is untrusted when discovery flagged it, or when it advertises a fingerprint
        other than the one the node's own certificate showed over mutual TLS.
        """
        view = self._nodes.get(name)
        if (
            untrusted_reason is None
            and view is not None
            and view.fingerprint
            and view.fingerprint != fingerprint
        ):
            untrusted_reason = (
                f"advertises certificate {fingerprint[:16]}…; node {name!r} showed "
                f"{view.fingerprint[:16]}… over mutual TLS"
            )
        if untrusted_reason is not None:
            if service not in self.untrusted:
                log.warning(
                    "untrusted LAN record %s for node %s: %s", service, name, untrusted_reason
                )
            self.untrusted[service] = NodeView(
                name=name,
                state="untrusted",
                labels=labels,
                fingerprint=fingerprint,
                untrusted_reason=untrusted_reason,
            )
            return
        self.untrusted.pop(service, None)
        if view is not None and view.advertised_fingerprint != fingerprint:
            self._set(name, replace(view, advertised_fingerprint=fingerprint))

    def set_draining(self, name: str, draining: bool) -> None:
        v = self._nodes.get(name)
        if v is not None:
            self._set(name, replace(v, draining=draining))
