"""LAN discovery on the coordinator: advertise ``_fnmesh._tcp``, and watch agents advertising themselves.

:class:`CoordinatorAdvertiser` lets agents started without an address find the API and
the broker. :class:`AgentBrowser` keeps one :class:`DiscoveredNode` per agent service seen
on the LAN, before and after it joins, so ``fnmesh nodes list`` can show machines that
are plugged in but not enrolled yet. Records of other fleets (another CA fingerprint)
are ignored. A record that claims a node name already seen with another certificate
fingerprint, or a fingerprint already bound to another name, is kept but flagged
``untrusted`` (with the reason), never merged into the node it claims to be.

What python-zeroconf does, and what this adds on top:

- a clean stop sends goodbye records: the browser reports the service removed at once
  and the node goes ``offline``;
- a node that vanishes without a goodbye (cable cut, power loss) stays listed: a received
  PTR record lives at least 1125 s in zeroconf's cache (it raises shorter TTLs to that),
  and the expiry of the SRV/TXT/A records (120 s) fires no browser event.
  :meth:`AgentBrowser.async_sweep` asks every agent to answer now and marks the silent
  ones ``offline``; any later record from them brings them back. MQTT presence (Last
  Will, heartbeats) stays the authority on liveness; this is the LAN's view only.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, replace
from urllib.parse import urlsplit

from zeroconf import (  # type: ignore[attr-defined]  # public names, missing from __all__
    DNSAddress,
    DNSOutgoing,
    DNSPointer,
    DNSQuestion,
    DNSQuestionType,
    DNSService,
    DNSText,
    RecordUpdate,
    RecordUpdateListener,
    ServiceStateChange,
    Zeroconf,
)
from zeroconf.asyncio import AsyncServiceBrowser, AsyncServiceInfo, AsyncZeroconf

from fnmesh.agent.advertise import (
    AGENT_SERVICE,
    COORDINATOR_SERVICE,
    LOOPBACK,
    DiscoveryError,
    ServiceAdvertiser,
    check_fingerprint,
    coordinator_txt,
    decode_txt,
    hostname_label,
    new_zeroconf,
    parse_agent_txt,
)

log = logging.getLogger("fnmesh.coordinator.discovery")

#: A discovered node's life as the coordinator sees it on the LAN.
NODE_STATES = ("discovered", "joined", "ready", "draining", "offline")
#: TXT ``state`` -> node state; "pending" means plugged in, not enrolled yet.
_STATE_FROM_TXT = {
    "pending": "discovered",
    "joined": "joined",
    "ready": "ready",
    "draining": "draining",
}

_TYPE_TXT = 16  # DNS wire constants (RFC 1035), not zeroconf internals
_CLASS_IN = 1
_FLAGS_QUERY = 0
_AGENT_SUFFIX = "." + AGENT_SERVICE.lower()


@dataclass(frozen=True, slots=True)
class DiscoveredNode:
    """One agent service seen on the LAN, as the coordinator lists it."""

    #: The node id the record claims (TXT ``node``).
    name: str
    addresses: tuple[str, ...]
    port: int
    txt: Mapping[str, str]
    #: The certificate fingerprint the record claims (TXT ``fp``).
    fingerprint: str
    state: str
    #: Wall-clock seconds (time.time) of the first and the latest record heard.
    first_seen: float
    last_seen: float
    #: Why this record must not be believed; None when nothing contradicts it.
    untrusted_reason: str | None = None
    #: The DNS-SD instance name, e.g. ``lyon-1._fnmesh-agent._tcp.local.``.
    service: str = ""

    @property
    def untrusted(self) -> bool:
        return self.untrusted_reason is not None

    @property
    def labels(self) -> dict[str, str]:
        return {k: self.txt[k] for k in ("tier", "region", "site") if self.txt.get(k)}


class CoordinatorAdvertiser(ServiceAdvertiser):
    """Advertises this coordinator's API and broker URLs as ``_fnmesh._tcp.local.``.

    A URL whose host is ``0.0.0.0`` or ``::`` is resolved by the finder to the address it
    heard the record from (see :func:`fnmesh.agent.advertise.find_coordinator`).
    """

    def __init__(
        self,
        api_url: str,
        broker_url: str,
        ca_fingerprint: str,
        interfaces: Sequence[str] | None = None,
        *,
        name: str | None = None,
        addresses: Sequence[str] | None = None,
        zc: AsyncZeroconf | None = None,
    ) -> None:
        txt = coordinator_txt(api_url, broker_url, ca_fingerprint)
        parts = urlsplit(api_url)
        try:
            port = parts.port or (443 if parts.scheme == "https" else 80)
        except ValueError as e:
            raise DiscoveryError(f"API URL {api_url!r}: {e}") from e
        instance = name or f"coordinator-{hostname_label()}-{ca_fingerprint[:8]}"
        super().__init__(
            COORDINATOR_SERVICE, instance, port, txt, interfaces, addresses=addresses, zc=zc
        )
        self.ca_fingerprint = ca_fingerprint

    async def async_set_urls(
        self, api_url: str | None = None, broker_url: str | None = None
    ) -> None:
        """Announce new URLs (after a restart on other ports, say)."""
        txt = coordinator_txt(
            api_url or self.txt["api"], broker_url or self.txt["broker"], self.ca_fingerprint
        )
        await self.async_update(txt)


class _RecordTap(RecordUpdateListener):
    """Hands every record about an agent service to the browser, refreshes included.

    zeroconf's browser reports only additions, removals and changed records; a sweep needs
    to know who answered at all, and a TXT record that flips between two responders must
    be checked each time it arrives.
    """

    def __init__(self, owner: AgentBrowser) -> None:
        super().__init__()
        self._owner = owner

    def async_update_records(self, zc: Zeroconf, now: float, records: list[RecordUpdate]) -> None:
        self._owner._on_records(now, records)

    def async_update_records_complete(self) -> None:
        self._owner._on_records_complete()


class AgentBrowser:
    """Watches ``_fnmesh-agent._tcp.local.`` for agents of one fleet and keeps what it heard.

    ``on_change`` is called on the event loop with the new :class:`DiscoveredNode` each
    time one appears, changes state, is flagged or goes offline (not for mere refreshes).
    """

    def __init__(
        self,
        ca_fingerprint: str,
        interfaces: Sequence[str] | None = None,
        on_change: Callable[[DiscoveredNode], None] | None = None,
        *,
        zc: AsyncZeroconf | None = None,
        resolve_timeout_s: float = 3.0,
    ) -> None:
        self.ca_fingerprint = check_fingerprint("CA fingerprint", ca_fingerprint)
        self.interfaces = list(interfaces) if interfaces is not None else list(LOOPBACK)
        self.on_change = on_change
        self.resolve_timeout_s = resolve_timeout_s
        self._zc = zc
        self._owns_zc = zc is None
        self._browser: AsyncServiceBrowser | None = None
        self._tap = _RecordTap(self)
        self._tasks: set[asyncio.Task[None]] = set()
        #: Keyed by the lower-cased DNS-SD instance name.
        self._nodes: dict[str, DiscoveredNode] = {}
        self._names: dict[str, str] = {}
        self._servers: dict[str, str] = {}
        self._txt_in: dict[str, bytes] = {}
        self._touched: set[str] = set()
        self._heard: dict[str, float] = {}
        #: node name -> fingerprint and back: the first consistent claim, or what trust() said.
        self._fp_of: dict[str, str] = {}
        self._name_of: dict[str, str] = {}
        #: node name -> the key fingerprint it advertised while pending, before its approval.
        self._enrolled_keys: dict[str, str] = {}
        self._sweep: tuple[float, set[str], asyncio.Event] | None = None
        #: Services heard from other fleets (ignored), and malformed ones.
        self.other_fleets: set[str] = set()
        self.malformed: set[str] = set()

    # -- lifecycle ------------------------------------------------------------------------

    async def async_start(self) -> None:
        if self._browser is not None:
            return
        if self._zc is None:
            self._zc = new_zeroconf(self.interfaces)
        zc = self._zc.zeroconf
        zc.async_add_listener(self._tap, None)
        # QM questions: answers come back multicast, so every listener on the host hears
        # them (a unicast answer to port 5353 reaches only one SO_REUSEPORT socket).
        self._browser = AsyncServiceBrowser(
            zc, [AGENT_SERVICE], handlers=[self._on_service], question_type=DNSQuestionType.QM
        )

    async def async_stop(self) -> None:
        browser, self._browser = self._browser, None
        if browser is not None:
            await browser.async_cancel()
        if self._zc is not None:
            self._zc.zeroconf.async_remove_listener(self._tap)
        for t in list(self._tasks):
            t.cancel()
        if self._tasks:
            await asyncio.gather(*self._tasks, return_exceptions=True)
        if self._owns_zc and self._zc is not None:
            zc, self._zc = self._zc, None
            await zc.async_close()

    async def __aenter__(self) -> AgentBrowser:
        await self.async_start()
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.async_stop()

    # -- what it knows ----------------------------------------------------------------------

    def nodes(self) -> list[DiscoveredNode]:
        """Every agent service heard (offline ones included), trusted first, by name."""
        return sorted(self._nodes.values(), key=lambda n: (n.untrusted, n.name, n.service))

    def get(self, name: str) -> DiscoveredNode | None:
        """The trusted record of node ``name``, else any record claiming it."""
        claims = [n for n in self._nodes.values() if n.name == name]
        claims.sort(key=lambda n: (n.untrusted, n.state == "offline"))
        return claims[0] if claims else None

    def fingerprint_of(self, name: str) -> str | None:
        """The certificate fingerprint node ``name`` is bound to (trusted or first seen)."""
        return self._fp_of.get(name)

    def trust(self, name: str, fingerprint: str, *, key_fingerprint: str | None = None) -> None:
        """Bind ``name`` to ``fingerprint`` (an enrolled node's certificate), before or after it is seen.

        A binding given here wins over one learned from the LAN: records already held that
        contradict it are flagged. ``key_fingerprint`` is the key an approved enrolment was
        pending under: the node's own ``pending`` record, still advertising it until the
        node re-announces, is not a contradiction.
        """
        check_fingerprint("certificate fingerprint", fingerprint)
        if key_fingerprint is not None:
            self._enrolled_keys[name] = check_fingerprint("key fingerprint", key_fingerprint)
        old_fp = self._fp_of.get(name)
        if old_fp is not None and old_fp != fingerprint:
            self._name_of.pop(old_fp, None)
        self._fp_of[name] = fingerprint
        self._name_of[fingerprint] = name
        for key, node in list(self._nodes.items()):
            if node.untrusted:
                continue
            reason = self._contradiction(key, node.name, node.fingerprint)
            if reason is not None:
                self._put(key, replace(node, untrusted_reason=reason))

    # -- sweeping -----------------------------------------------------------------------------

    async def async_sweep(self, timeout: float = 2.5) -> list[DiscoveredNode]:
        """Ask every agent on the LAN to answer now; those silent for ``timeout`` s go offline.

        Returns the nodes that did not answer. Nodes already offline are asked too: one that
        answers comes back (during the sweep or whenever it is heard again). Keep
        ``timeout`` above 1.7 s: a responder that multicast its records in the last second
        holds its answer back until a second has passed (RFC 6762 section 14), then
        aggregates for up to 0.5 s more.
        """
        if self._zc is None:
            raise DiscoveryError("the agent browser is not started")
        expected = {k for k, n in self._nodes.items() if n.state != "offline"}
        everyone = set(self._nodes)
        started = time.monotonic()
        done = asyncio.Event()
        waiting = set(expected)
        self._sweep = (started, waiting, done)
        # One TXT question per known service, not the PTR question: an answer byte-identical
        # to a packet received in the last 0.8 s is dropped by zeroconf's duplicate filter,
        # and a PTR answer is exactly what the agents' announcements and the browser's own
        # queries just produced. A TXT-only answer differs from those.
        out = DNSOutgoing(_FLAGS_QUERY, multicast=True)
        for key in sorted(everyone):
            out.add_question(DNSQuestion(self._names.get(key, key), _TYPE_TXT, _CLASS_IN))
        if everyone:
            self._zc.zeroconf.async_send(out)
        try:
            if waiting:
                with contextlib.suppress(TimeoutError):
                    async with asyncio.timeout(timeout):
                        await done.wait()
        finally:
            self._sweep = None
        silent = [k for k in everyone if self._heard.get(k, 0.0) < started]
        for k in silent:
            node = self._nodes.get(k)
            if node is not None and node.state != "offline":
                log.info("agent %s did not answer a sweep: offline", node.service)
                self._put(k, replace(node, state="offline"))
        return [self._nodes[k] for k in silent if k in self._nodes]

    # -- zeroconf callbacks (event loop) -----------------------------------------------------

    def _on_service(
        self, zeroconf: Zeroconf, service_type: str, name: str, state_change: ServiceStateChange
    ) -> None:
        key = name.lower()
        if state_change is ServiceStateChange.Removed:
            node = self._nodes.get(key)
            if node is not None and node.state != "offline":
                self._put(key, replace(node, state="offline"))
            return
        self._names.setdefault(key, name)
        if state_change is ServiceStateChange.Added:
            task = asyncio.get_running_loop().create_task(self._resolve(name))
            self._tasks.add(task)
            task.add_done_callback(self._tasks.discard)

    async def _resolve(self, name: str) -> None:
        """Ask for the SRV/TXT/A records of a service the browser just found, then read them."""
        if self._zc is None:
            return
        info = AsyncServiceInfo(AGENT_SERVICE, name)
        await info.async_request(
            self._zc.zeroconf,
            int(self.resolve_timeout_s * 1000),
            question_type=DNSQuestionType.QM,
        )
        self._refresh(name.lower())

    def _on_records(self, now: float, records: list[RecordUpdate]) -> None:
        for update in records:
            record = update.new
            if record.is_expired(now):
                continue  # goodbyes reach us through the browser's Removed
            key = record.key
            if isinstance(record, DNSPointer):
                if key == AGENT_SERVICE.lower():
                    self._names.setdefault(record.alias.lower(), record.alias)
                    self._touched.add(record.alias.lower())
            elif isinstance(record, DNSText):
                if key.endswith(_AGENT_SUFFIX):
                    self._names.setdefault(key, record.name)
                    self._txt_in[key] = record.text
                    self._touched.add(key)
            elif isinstance(record, DNSService):
                if key.endswith(_AGENT_SUFFIX):
                    self._names.setdefault(key, record.name)
                    self._servers[key] = record.server_key
                    self._touched.add(key)
            elif isinstance(record, DNSAddress):
                self._touched.update(s for s, server in self._servers.items() if server == key)

    def _on_records_complete(self) -> None:
        touched, self._touched = self._touched, set()
        heard_at = time.monotonic()
        for key in touched:
            self._heard[key] = heard_at
            self._refresh(key)
        sweep = self._sweep
        if sweep is not None:
            sweep[1].difference_update(touched)
            if not sweep[1]:
                sweep[2].set()

    def _refresh(self, key: str) -> None:
        """Rebuild one service's node from the TXT just received and the cache's SRV/A records."""
        if self._zc is None:
            return
        name = self._names.get(key, key)
        info = AsyncServiceInfo(AGENT_SERVICE, name)
        info.load_from_cache(self._zc.zeroconf)
        raw = self._txt_in.pop(key, None)
        if raw is None:
            raw = info.text
        if not raw:
            return  # PTR or SRV before the TXT: wait for it
        try:
            txt = decode_txt(raw)
            claim = parse_agent_txt(txt)
        except DiscoveryError as e:
            if key not in self.malformed:
                log.warning("ignoring malformed agent record %s: %s", name, e)
            self.malformed.add(key)
            return
        if claim.ca_fingerprint != self.ca_fingerprint:
            if key not in self.other_fleets:
                log.debug("ignoring %s of another fleet (CA %s…)", name, claim.ca_fingerprint[:12])
            self.other_fleets.add(key)
            return
        now = time.time()
        old = self._nodes.get(key)
        reason = old.untrusted_reason if old is not None else None
        if reason is None:
            reason = self._contradiction(key, claim.node, claim.fingerprint)
        if reason is None:
            self._fp_of.setdefault(claim.node, claim.fingerprint)
            self._name_of.setdefault(claim.fingerprint, claim.node)
        elif old is None or old.untrusted_reason is None:
            log.warning("untrusted agent record %s: %s", name, reason)
        addresses = tuple(info.parsed_scoped_addresses()) or (old.addresses if old else ())
        node = DiscoveredNode(
            name=claim.node,
            addresses=addresses,
            port=info.port or claim.api_port,
            txt=txt,
            fingerprint=claim.fingerprint,
            state=_STATE_FROM_TXT.get(claim.state, "discovered"),
            first_seen=old.first_seen if old is not None else now,
            last_seen=now,
            untrusted_reason=reason,
            service=name,
        )
        self._put(key, node)

    def _contradiction(self, key: str, node: str, fingerprint: str) -> str | None:
        """Why a claim of (node, fingerprint) by service ``key`` contradicts what is known."""
        bound_fp = self._fp_of.get(node)
        if (
            bound_fp is not None
            and bound_fp != fingerprint
            and self._enrolled_keys.get(node) != fingerprint
        ):
            return (
                f"node {node!r} is known with certificate {bound_fp[:16]}…; "
                f"this record claims {fingerprint[:16]}…"
            )
        owner = self._name_of.get(fingerprint)
        if owner is not None and owner != node:
            return f"certificate {fingerprint[:16]}… belongs to node {owner!r}, not {node!r}"
        label = key[: -len(_AGENT_SUFFIX)]
        if label != node.lower():
            return f"service {label!r} claims to be node {node!r}"
        return None

    def _put(self, key: str, node: DiscoveredNode) -> None:
        old = self._nodes.get(key)
        self._nodes[key] = node
        if old is not None and replace(old, last_seen=node.last_seen) == node:
            return  # a refresh: nothing the coordinator needs to act on
        if self.on_change is not None:
            try:
                self.on_change(node)
            except Exception:
                log.exception("on_change failed for %s", node.service)


__all__ = [
    "NODE_STATES",
    "AgentBrowser",
    "CoordinatorAdvertiser",
    "DiscoveredNode",
    "DiscoveryError",
]
