"""Zero-config discovery on the LAN (mDNS / DNS-SD): the agent's advertisement, and the coordinator's.

An agent advertises ``{node}._fnmesh-agent._tcp.local.`` with a TXT record saying who it
is (node id, tier, region, site, GPU summary, certificate fingerprint, fleet CA
fingerprint, API port, state). An agent started without a coordinator or broker address
calls :func:`find_coordinator`, which browses ``_fnmesh._tcp.local.`` and returns the first
coordinator of its own fleet (same CA fingerprint); other fleets' coordinators are skipped.

The CA fingerprint in a TXT record is a claim anyone can copy: it keeps fleets sharing a
LAN apart, it does not make a record trustworthy. Trust comes from TLS against the fleet
CA once the agent connects to what it found.

Interfaces: by default everything here binds to the loopback address only
(``127.0.0.1``), so nothing is multicast on a real network unless a caller names the
interfaces: IPv4 or IPv6 addresses, or interface names (see :func:`resolve_interfaces`).

What python-zeroconf's ``interfaces=`` does and does not promise on Linux:

- it picks where we *send* (one socket per interface, ``IP_MULTICAST_IF``) and where we
  join 224.0.0.251 / ff02::fb; the *listening* socket is bound to ``0.0.0.0:5353`` and
  Linux hands it every mDNS packet of a group that any socket on the host joined, on any
  interface (``IP_MULTICAST_ALL`` is on by default). On a host running avahi, a
  loopback-bound instance therefore also hears the LAN; other fleets' records are
  filtered out by CA fingerprint. Turning ``IP_MULTICAST_ALL`` off is no cure: with the
  ``SO_REUSEPORT`` zeroconf sets, the kernel then steers each LAN packet to one socket of
  the port's group chosen by source hash, often one that never joined that interface;
- several instances in one network namespace each get every multicast packet, but a
  unicast answer to port 5353 reaches only one of them: browsing here asks QM questions
  (answers come back multicast), never zeroconf's default QU first question.
"""

from __future__ import annotations

import asyncio
import ipaddress
import logging
import re
import socket
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from types import TracebackType
from typing import Any
from urllib.parse import urlsplit, urlunsplit

import ifaddr
from zeroconf import (
    BadTypeInNameException,
    DNSQuestionType,
    IPVersion,
    NonUniqueNameException,
    ServiceStateChange,
    Zeroconf,
)
from zeroconf.asyncio import AsyncServiceBrowser, AsyncServiceInfo, AsyncZeroconf

from fnmesh.agent.errors import AgentError

log = logging.getLogger("fnmesh.agent.advertise")

AGENT_SERVICE = "_fnmesh-agent._tcp.local."
COORDINATOR_SERVICE = "_fnmesh._tcp.local."
#: Version of the TXT layout; readers ignore keys they do not know.
TXT_VERSION = "1"
#: What an agent says about itself in its TXT ``state``.
AGENT_STATES = ("pending", "joined", "ready", "draining")
#: The default: loopback only, so nothing reaches a real network unless asked for.
LOOPBACK: tuple[str, ...] = ("127.0.0.1",)

_FINGERPRINT = re.compile(r"[0-9a-f]{64}")
#: A DNS label carries at most 63 bytes: the node id is the service instance's label.
_MAX_LABEL = 63
#: One TXT string is at most 255 bytes, "key=value" included.
_MAX_TXT_ITEM = 255
_GPU_SUMMARY_MAX = 200


class DiscoveryError(AgentError):
    """mDNS discovery failed: nothing of this fleet answered, a record is malformed, a name is taken."""


# -- TXT records ---------------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class AgentTxt:
    """An agent's TXT record, parsed (``raw`` keeps every key, known or not)."""

    node: str
    fingerprint: str
    ca_fingerprint: str
    api_port: int
    state: str
    tier: str = ""
    region: str = ""
    site: str = ""
    gpu: str = ""
    raw: Mapping[str, str] = field(default_factory=dict)


@dataclass(frozen=True, slots=True)
class CoordinatorRecord:
    """A coordinator found on the LAN: where its API and broker are, and its fleet's CA fingerprint."""

    api_url: str
    broker_url: str
    fingerprint: str
    #: The DNS-SD instance name it answered as, and the addresses it advertised.
    service: str = ""
    addresses: tuple[str, ...] = ()


def _check_item(key: str, value: str) -> None:
    if len(f"{key}={value}".encode()) > _MAX_TXT_ITEM:
        raise DiscoveryError(f"TXT entry {key!r} is longer than {_MAX_TXT_ITEM} bytes")
    if "=" in key or not key:
        raise DiscoveryError(f"TXT key {key!r} is empty or contains '='")


def check_fingerprint(what: str, fp: str) -> str:
    """``fp`` when it is a SHA-256 fingerprint as fnmesh writes them (64 lowercase hex)."""
    if not _FINGERPRINT.fullmatch(fp):
        raise DiscoveryError(f"{what} must be 64 lowercase hex digits (SHA-256), got {fp!r}")
    return fp


def check_node_name(node: str) -> str:
    """A node id usable as a DNS-SD instance label (1-63 bytes, no dots or control characters)."""
    raw = node.encode()
    if not 0 < len(raw) <= _MAX_LABEL or "." in node or any(ord(c) < 32 for c in node):
        raise DiscoveryError(f"node name {node!r} is not a usable DNS-SD instance label")
    return node


def agent_txt(
    node: str,
    labels: Mapping[str, str],
    gpu_summary: str,
    cert_fingerprint: str,
    ca_fingerprint: str,
    api_port: int,
    state: str = "pending",
) -> dict[str, str]:
    """The TXT record an agent advertises; tier, region and site come from its labels.

    A long GPU summary is cut to fit one TXT string; anything else that does not fit is a
    :class:`DiscoveryError`.
    """
    check_node_name(node)
    if state not in AGENT_STATES:
        raise DiscoveryError(f"agent state {state!r} is not one of {AGENT_STATES}")
    if not 0 < api_port < 65536:
        raise DiscoveryError(f"API port {api_port} is outside 1-65535")
    gpu = gpu_summary.strip()
    if len(gpu) > _GPU_SUMMARY_MAX:
        gpu = gpu[: _GPU_SUMMARY_MAX - 1] + "…"
    txt = {
        "txtvers": TXT_VERSION,
        "node": node,
        "tier": labels.get("tier", ""),
        "region": labels.get("region", ""),
        "site": labels.get("site", ""),
        "gpu": gpu,
        "fp": check_fingerprint("certificate fingerprint", cert_fingerprint),
        "ca": check_fingerprint("CA fingerprint", ca_fingerprint),
        "api": str(api_port),
        "state": state,
    }
    for k, v in txt.items():
        _check_item(k, v)
    return txt


def decode_txt(raw: bytes) -> dict[str, str]:
    """DNS TXT wire bytes (length-prefixed strings) -> ``{key: value}``; first key wins (RFC 6763 6.4)."""
    out: dict[str, str] = {}
    i = 0
    try:
        while i < len(raw):
            n = raw[i]
            item = raw[i + 1 : i + 1 + n]
            if len(item) != n:
                raise DiscoveryError("TXT record truncated")
            i += 1 + n
            if not item:
                continue
            key, _, value = item.partition(b"=")
            k = key.decode("ascii").lower()
            if k and k not in out:
                out[k] = value.decode("utf-8")
    except UnicodeDecodeError as e:
        raise DiscoveryError(f"TXT record is not text: {e}") from e
    return out


def parse_agent_txt(txt: Mapping[str, str]) -> AgentTxt:
    """Read an agent's TXT record (already decoded); a missing or malformed key is a DiscoveryError."""
    try:
        node = check_node_name(txt["node"])
        api_port = int(txt["api"])
        if not 0 < api_port < 65536:
            raise ValueError(f"port {api_port}")
        return AgentTxt(
            node=node,
            fingerprint=check_fingerprint("fp", txt["fp"]),
            ca_fingerprint=check_fingerprint("ca", txt["ca"]),
            api_port=api_port,
            state=txt.get("state", "pending"),
            tier=txt.get("tier", ""),
            region=txt.get("region", ""),
            site=txt.get("site", ""),
            gpu=txt.get("gpu", ""),
            raw=dict(txt),
        )
    except KeyError as e:
        raise DiscoveryError(f"agent TXT record lacks {e.args[0]!r}") from e
    except ValueError as e:
        raise DiscoveryError(f"agent TXT record has a bad API port: {e}") from e


def coordinator_txt(api_url: str, broker_url: str, ca_fingerprint: str) -> dict[str, str]:
    """The TXT record a coordinator advertises."""
    txt = {
        "txtvers": TXT_VERSION,
        "api": api_url,
        "broker": broker_url,
        "ca": check_fingerprint("CA fingerprint", ca_fingerprint),
    }
    for k, v in txt.items():
        _check_item(k, v)
    return txt


# -- interfaces and addresses ----------------------------------------------------------------


def resolve_interfaces(interfaces: Sequence[str] | None) -> list[str | int]:
    """What python-zeroconf's ``interfaces=`` wants, from what an operator writes.

    - ``None``: loopback only (:data:`LOOPBACK`);
    - an IPv4 address: itself; an IPv6 address (``fe80::1`` or ``fe80::1%eth0``): itself,
      without the scope (zeroconf maps it to its interface index);
    - an interface name: its IPv4 addresses, or, when it has none, its IPv6 interface
      index (a link-local-only host).
    """
    if interfaces is None:
        return list(LOOPBACK)
    out: list[str | int] = []
    adapters: list[Any] | None = None
    for item in interfaces:
        text = item.split("%", 1)[0]
        try:
            ipaddress.ip_address(text)
        except ValueError:
            pass
        else:
            out.append(text)
            continue
        if adapters is None:
            adapters = list(ifaddr.get_adapters())
        adapter = next((a for a in adapters if a.name == item), None)
        if adapter is None:
            raise DiscoveryError(f"no interface or address {item!r} on this host")
        v4 = [ip.ip for ip in adapter.ips if ip.is_IPv4]
        if v4:
            out.extend(v4)
        elif any(ip.is_IPv6 for ip in adapter.ips):
            out.append(int(adapter.index))
        else:
            raise DiscoveryError(f"interface {item!r} has no IPv4 or IPv6 address")
    if not out:
        raise DiscoveryError("no interfaces to advertise on")
    return out


def interface_addresses(resolved: Sequence[str | int]) -> list[str]:
    """The addresses to put in A/AAAA records for ``resolved`` interfaces (no IPv6 scope)."""
    out: list[str] = []
    adapters: list[Any] | None = None
    for item in resolved:
        if isinstance(item, str):
            out.append(item)
            continue
        if adapters is None:
            adapters = list(ifaddr.get_adapters())
        for a in adapters:
            if a.index == item:
                out.extend(ip.ip[0] for ip in a.ips if ip.is_IPv6)
    return list(dict.fromkeys(out))


def new_zeroconf(interfaces: Sequence[str] | None) -> AsyncZeroconf:
    """An AsyncZeroconf bound to ``interfaces`` (loopback when None); IPv4/IPv6 chosen from them."""
    resolved = resolve_interfaces(interfaces)
    has6 = any(isinstance(i, int) or ":" in i for i in resolved)
    has4 = any(isinstance(i, str) and ":" not in i for i in resolved)
    version = IPVersion.All if has4 and has6 else IPVersion.V6Only if has6 else IPVersion.V4Only
    try:
        azc = AsyncZeroconf(interfaces=resolved, ip_version=version)
    except (OSError, RuntimeError, ValueError) as e:
        raise DiscoveryError(f"cannot open mDNS sockets on {resolved}: {e}") from e
    return azc


def with_host(url: str, addresses: Sequence[str]) -> str:
    """``url`` with an unspecified host (``0.0.0.0``, ``::``, empty) replaced by an advertised address.

    IPv4 is preferred; a scoped IPv6 address is written ``[fe80::1%2]``, which both
    ``urllib.parse`` and yarl hand unchanged to the socket layer.
    """
    parts = urlsplit(url)
    if parts.hostname not in (None, "", "0.0.0.0", "::") or not addresses:
        return url
    ordered = sorted(addresses, key=lambda a: ":" in a)
    host = ordered[0]
    netloc_host = f"[{host}]" if ":" in host else host
    netloc = f"{netloc_host}:{parts.port}" if parts.port else netloc_host
    return urlunsplit((parts.scheme, netloc, parts.path, parts.query, parts.fragment))


# -- advertising ----------------------------------------------------------------------------


class ServiceAdvertiser:
    """One DNS-SD service registered on chosen interfaces; the common part of agent and coordinator."""

    def __init__(
        self,
        service_type: str,
        instance: str,
        port: int,
        txt: Mapping[str, str],
        interfaces: Sequence[str] | None,
        *,
        addresses: Sequence[str] | None = None,
        host: str | None = None,
        zc: AsyncZeroconf | None = None,
    ) -> None:
        check_node_name(instance)
        self.service_type = service_type
        self.instance = instance
        self.name = f"{instance}.{service_type}"
        self.port = port
        self.txt: dict[str, str] = dict(txt)
        self.interfaces = list(interfaces) if interfaces is not None else list(LOOPBACK)
        self._addresses = list(addresses) if addresses is not None else None
        # Not "{node}.local.": the machine's own mDNS host name may already be that.
        self.host = host or f"fnmesh-{re.sub(r'[^A-Za-z0-9-]', '-', instance)}.local."
        self._zc = zc
        self._owns_zc = zc is None
        self._info: AsyncServiceInfo | None = None

    @property
    def addresses(self) -> list[str]:
        if self._addresses is None:
            self._addresses = interface_addresses(resolve_interfaces(self.interfaces))
        return self._addresses

    @property
    def registered(self) -> bool:
        return self._info is not None

    def _make_info(self) -> AsyncServiceInfo:
        try:
            return AsyncServiceInfo(
                self.service_type,
                self.name,
                port=self.port,
                properties=self.txt,
                server=self.host,
                parsed_addresses=[a.split("%", 1)[0] for a in self.addresses],
            )
        except (BadTypeInNameException, ValueError, OSError) as e:
            raise DiscoveryError(f"cannot describe {self.name}: {e}") from e

    async def async_start(self) -> None:
        """Probe for the name, then announce; a name another responder holds is a DiscoveryError."""
        if self._info is not None:
            return
        if self._zc is None:
            self._zc = new_zeroconf(self.interfaces)
        info = self._make_info()
        try:
            await self._zc.async_register_service(info)
        except NonUniqueNameException as e:
            await self._close_zc()
            raise DiscoveryError(f"{self.name} is already advertised by another responder") from e
        except BaseException:
            await self._close_zc()
            raise
        self._info = info
        log.info("advertising %s on %s (%s)", self.name, self.interfaces, self.addresses)

    async def async_update(self, txt: Mapping[str, str] | None = None, **changes: str) -> None:
        """Replace the TXT record (or change some keys) and announce it again.

        Called with no change it simply re-announces, e.g. after a link came back.
        """
        new = dict(txt) if txt is not None else dict(self.txt)
        new.update(changes)
        for k, v in new.items():
            _check_item(k, v)
        self.txt = new
        if self._zc is None or self._info is None:
            return
        info = self._make_info()
        await self._zc.async_update_service(info)
        self._info = info

    async def async_stop(self) -> None:
        """Say goodbye (TTL 0 records) and close the sockets this advertiser opened."""
        info, self._info = self._info, None
        if self._zc is not None and info is not None:
            try:
                await (await self._zc.async_unregister_service(info))
            except Exception as e:  # a goodbye that cannot be sent must not block shutdown
                log.warning("goodbye for %s not sent: %s", self.name, e)
        await self._close_zc()

    async def _close_zc(self) -> None:
        """Close the AsyncZeroconf if this advertiser opened it; a shared one stays open."""
        if self._owns_zc and self._zc is not None:
            zc, self._zc = self._zc, None
            await zc.async_close()

    async def __aenter__(self) -> ServiceAdvertiser:
        await self.async_start()
        return self

    async def __aexit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        await self.async_stop()


class AgentAdvertiser(ServiceAdvertiser):
    """Advertises one node agent as ``{node}._fnmesh-agent._tcp.local.`` (see :func:`agent_txt`)."""

    def __init__(
        self,
        node: str,
        port: int,
        txt: Mapping[str, str],
        interfaces: Sequence[str] | None = None,
        *,
        addresses: Sequence[str] | None = None,
        zc: AsyncZeroconf | None = None,
    ) -> None:
        if txt.get("node", node) != node:
            raise DiscoveryError(f"TXT record names node {txt['node']!r}, not {node!r}")
        super().__init__(AGENT_SERVICE, node, port, txt, interfaces, addresses=addresses, zc=zc)
        self.node = node

    async def async_set_state(self, state: str) -> None:
        """Announce a new lifecycle state (pending, joined, ready, draining)."""
        if state not in AGENT_STATES:
            raise DiscoveryError(f"agent state {state!r} is not one of {AGENT_STATES}")
        await self.async_update(state=state)


# -- finding the coordinator ----------------------------------------------------------------


async def find_coordinator(
    ca_fingerprint: str,
    timeout: float = 5.0,
    interfaces: Sequence[str] | None = None,
    *,
    zc: AsyncZeroconf | None = None,
) -> CoordinatorRecord:
    """The first coordinator of this fleet (same CA fingerprint) that answers on ``interfaces``.

    Coordinators of other fleets are skipped. An API or broker URL advertised with an
    unspecified host (``0.0.0.0``) gets the address the coordinator advertised. Raises
    :class:`DiscoveryError` when none of this fleet answers within ``timeout`` seconds.
    """
    check_fingerprint("CA fingerprint", ca_fingerprint)
    own = zc is None
    azc = new_zeroconf(interfaces) if zc is None else zc
    loop = asyncio.get_running_loop()
    found: asyncio.Future[CoordinatorRecord] = loop.create_future()
    others: set[str] = set()
    tasks: set[asyncio.Task[None]] = set()

    async def resolve(name: str) -> None:
        info = AsyncServiceInfo(COORDINATOR_SERVICE, name)
        if not await info.async_request(azc.zeroconf, 3000, question_type=DNSQuestionType.QM):
            return
        try:
            txt = decode_txt(info.text or b"")
            ca = txt.get("ca", "")
            if ca != ca_fingerprint:
                if name not in others:
                    log.debug("ignoring coordinator %s of another fleet (CA %s)", name, ca[:12])
                others.add(name)
                return
            addresses = tuple(info.parsed_scoped_addresses())
            record = CoordinatorRecord(
                api_url=with_host(txt["api"], addresses),
                broker_url=with_host(txt["broker"], addresses),
                fingerprint=ca,
                service=name,
                addresses=addresses,
            )
        except (KeyError, DiscoveryError) as e:
            log.warning("ignoring malformed coordinator record %s: %s", name, e)
            return
        if not found.done():
            found.set_result(record)

    def on_change(
        zeroconf: Zeroconf, service_type: str, name: str, state_change: ServiceStateChange
    ) -> None:
        if state_change is ServiceStateChange.Removed:
            return
        task = loop.create_task(resolve(name))
        tasks.add(task)
        task.add_done_callback(tasks.discard)

    # QM questions: answers come back multicast, so every listener on the host hears
    # them (a unicast answer to port 5353 reaches only one of the SO_REUSEPORT sockets).
    browser = AsyncServiceBrowser(
        azc.zeroconf, [COORDINATOR_SERVICE], handlers=[on_change], question_type=DNSQuestionType.QM
    )
    try:
        async with asyncio.timeout(timeout):
            return await asyncio.shield(found)
    except TimeoutError:
        extra = f" ({len(others)} of other fleets ignored)" if others else ""
        raise DiscoveryError(
            f"no coordinator of fleet {ca_fingerprint[:12]}… answered on "
            f"{list(interfaces or LOOPBACK)} within {timeout:g} s{extra}"
        ) from None
    finally:
        await browser.async_cancel()
        for t in list(tasks):
            t.cancel()
        if tasks:
            await asyncio.gather(*tasks, return_exceptions=True)
        if own:
            await azc.async_close()


def hostname_label() -> str:
    """This machine's short host name as a DNS-SD label (for default instance names)."""
    label = re.sub(r"[^A-Za-z0-9-]", "-", socket.gethostname().split(".", 1)[0])[:40]
    return label or "fnmesh"
