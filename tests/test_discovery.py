"""Zero-config discovery: agents and coordinators on mDNS, on loopback and across a bridged test LAN.

Loopback tests bind python-zeroconf to 127.0.0.1 only. LAN tests build network
namespaces (tests/netns.py) and run each host's side as a child process of this file
(``python tests/test_discovery.py coordinator|agent ...``), speaking JSON lines on
stdout and taking commands on stdin; they skip when namespaces cannot be built.

What zeroconf does when a link is cut and restored (checked in
``test_cut_link_goes_offline_and_comes_back``): nothing at all on its own. The browser
keeps the PTR record (zeroconf raises a received PTR TTL to at least 1125 s) and fires no
event when the SRV/TXT/A records expire; the agent's zeroconf does not re-announce when
its link comes back, and what it announced while cut is lost. ``AgentBrowser.async_sweep``
(a TXT question per known agent) marks the silent ones offline and brings them back when
they answer again; ``AgentAdvertiser.async_update()`` re-announces (what an agent does
when its broker connection comes back).

The delay proxy the LAN tests put between agents and brokers (tests/delay_proxy.py) is
checked here too, at the end.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import hashlib
import json
import logging
import os
import re
import secrets
import shutil
import socket
import sys
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

from zeroconf import ServiceStateChange, Zeroconf
from zeroconf.asyncio import AsyncServiceBrowser, AsyncServiceInfo, AsyncZeroconf

from fnmesh.agent.advertise import (
    AGENT_SERVICE,
    AgentAdvertiser,
    DiscoveryError,
    agent_txt,
    decode_txt,
    find_coordinator,
    new_zeroconf,
    parse_agent_txt,
    with_host,
)
from fnmesh.coordinator.discovery import AgentBrowser, CoordinatorAdvertiser, DiscoveredNode

LO = ["127.0.0.1"]

# -- the test hosts' processes (this file run as a script) --------------------------------


def _emit(event: str, **fields: Any) -> None:
    print(json.dumps({"event": event, **fields}), flush=True)


def _node_event(node: DiscoveredNode) -> None:
    _emit(
        "node",
        name=node.name,
        service=node.service,
        state=node.state,
        addresses=list(node.addresses),
        port=node.port,
        txt=dict(node.txt),
        untrusted=node.untrusted_reason,
    )


async def _commands() -> asyncio.StreamReader:
    loop = asyncio.get_running_loop()
    reader = asyncio.StreamReader()
    await loop.connect_read_pipe(lambda: asyncio.StreamReaderProtocol(reader), sys.stdin)
    return reader


async def _child_coordinator(args: argparse.Namespace) -> None:
    zc = new_zeroconf([args.iface])
    server = None
    port = 8443
    if args.listen:
        # One dual-stack socket (asyncio would make "::" IPv6-only), for IPv4 and IPv6 peers.
        sock = socket.socket(socket.AF_INET6, socket.SOCK_STREAM)
        sock.setsockopt(socket.IPPROTO_IPV6, socket.IPV6_V6ONLY, 0)
        sock.bind(("::", 0))
        server = await asyncio.start_server(lambda r, w: w.close(), sock=sock)
        port = sock.getsockname()[1]

    def raw(
        zeroconf: Zeroconf, service_type: str, name: str, state_change: ServiceStateChange
    ) -> None:
        _emit("raw", change=state_change.name, service=name)

    raw_browser = AsyncServiceBrowser(zc.zeroconf, [AGENT_SERVICE], handlers=[raw])
    browser = AgentBrowser(args.ca, [args.iface], _node_event, zc=zc)
    advertiser = CoordinatorAdvertiser(
        f"https://0.0.0.0:{port}",
        f"mqtts://0.0.0.0:{port}",
        args.ca,
        [args.iface],
        name="coordinator",
        zc=zc,
    )
    await browser.async_start()
    await advertiser.async_start()
    _emit("advertised", port=port)
    commands = await _commands()
    try:
        while line := (await commands.readline()).decode().split():
            if line[0] == "sweep":
                silent = await browser.async_sweep(float(line[1]))
                _emit("sweep", silent=sorted(n.name for n in silent))
            elif line[0] == "quit":
                break
    finally:
        await advertiser.async_stop()
        await browser.async_stop()
        await raw_browser.async_cancel()
        await zc.async_close()
        if server is not None:
            server.close()


async def _child_agent(args: argparse.Namespace) -> None:
    port = 8443
    found = None
    if args.find:
        with contextlib.suppress(DiscoveryError):
            found = await find_coordinator(args.ca, 10, [args.iface])
    if found is not None:
        _emit("coordinator", api_url=found.api_url, broker_url=found.broker_url)
        host_port = re.fullmatch(r"https://\[?([^\]]+?)\]?:(\d+)", found.api_url)
        assert host_port is not None
        try:
            async with asyncio.timeout(3):
                _, w = await asyncio.open_connection(host_port[1], int(host_port[2]))
            w.close()
            _emit("connected")
        except (OSError, TimeoutError) as e:
            _emit("unreachable", error=str(e))
    txt = agent_txt(args.node, {"tier": "edge"}, "none", args.fp, args.ca, port)
    advertiser = AgentAdvertiser(args.node, port, txt, [args.iface])
    await advertiser.async_start()
    _emit("registered", addresses=advertiser.addresses)
    commands = await _commands()
    try:
        while line := (await commands.readline()).decode().split():
            if line[0] == "state":
                await advertiser.async_set_state(line[1])
                _emit("updated", state=line[1])
            elif line[0] == "announce":
                await advertiser.async_update()
                _emit("updated")
            elif line[0] == "quit":
                break
    finally:
        await advertiser.async_stop()


def _child_main(argv: list[str]) -> None:
    parser = argparse.ArgumentParser(prog="test_discovery.py")
    sub = parser.add_subparsers(dest="role", required=True)
    coord = sub.add_parser("coordinator")
    coord.add_argument("--iface", required=True)
    coord.add_argument("--ca", required=True)
    coord.add_argument("--listen", action="store_true")
    agent = sub.add_parser("agent")
    for opt in ("--node", "--iface", "--ca", "--fp"):
        agent.add_argument(opt, required=True)
    agent.add_argument("--find", action="store_true")
    args = parser.parse_args(argv)
    # Every packet zeroconf sends and drops, in the child's log file (shown on failure).
    level = logging.DEBUG if os.environ.get("FNMESH_TEST_MDNS_DEBUG") else logging.INFO
    logging.basicConfig(level=level, format="%(created).3f %(name)s %(message)s")
    logging.getLogger("zeroconf").setLevel(level)
    run = _child_coordinator if args.role == "coordinator" else _child_agent
    asyncio.run(run(args))


if __name__ == "__main__":
    _child_main(sys.argv[1:])
    sys.exit(0)

# Run as a test host's process, this file stops above: pytest, hypothesis and the
# fleet fixtures (cryptography) would triple each child's start-up time.
import pytest  # noqa: E402
from conftest import Fleet  # noqa: E402
from delay_proxy import DelayProxy  # noqa: E402
from hypothesis import given  # noqa: E402
from hypothesis import strategies as st  # noqa: E402
from netns import Addressing, Lan  # noqa: E402
from netns import available as netns_available  # noqa: E402

from fnmesh.certs.identity import fingerprint  # noqa: E402


def fp(seed: str) -> str:
    return hashlib.sha256(seed.encode()).hexdigest()


def unique(prefix: str) -> str:
    """A node name no other run on this machine's loopback uses."""
    return f"{prefix}-{secrets.token_hex(3)}"


class Changes:
    """Collects an AgentBrowser's on_change calls; ``until`` awaits one that matches."""

    def __init__(self) -> None:
        self.seen: list[DiscoveredNode] = []
        self._event = asyncio.Event()

    def __call__(self, node: DiscoveredNode) -> None:
        self.seen.append(node)
        self._event.set()

    async def until(
        self, pred: Callable[[DiscoveredNode], bool], timeout: float = 5.0, since: int = 0
    ) -> DiscoveredNode:
        loop = asyncio.get_running_loop()
        deadline = loop.time() + timeout
        while True:
            hit = next((n for n in self.seen[since:] if pred(n)), None)
            if hit is not None:
                return hit
            remaining = deadline - loop.time()
            if remaining <= 0:
                raise AssertionError(f"no matching change within {timeout} s; saw {self.seen}")
            self._event.clear()
            with contextlib.suppress(TimeoutError):
                async with asyncio.timeout(remaining):
                    await self._event.wait()


# -- TXT records: table and bytes from outside -------------------------------------------------


def test_agent_txt_carries_what_the_coordinator_lists() -> None:
    txt = agent_txt(
        "lyon-1",
        {"tier": "edge", "region": "eu-west", "site": "lyon", "other": "x"},
        "RTX 4000 16 GiB sm_89" * 20,
        fp("node"),
        fp("ca"),
        8443,
        "pending",
    )
    assert txt["node"] == "lyon-1"
    assert (txt["tier"], txt["region"], txt["site"]) == ("edge", "eu-west", "lyon")
    assert txt["fp"] == fp("node") and txt["ca"] == fp("ca")
    assert txt["api"] == "8443" and txt["state"] == "pending"
    assert len(txt["gpu"]) == 200 and txt["gpu"].endswith("…")
    assert "other" not in txt
    parsed = parse_agent_txt(txt)
    assert (parsed.node, parsed.api_port, parsed.tier) == ("lyon-1", 8443, "edge")


@pytest.mark.parametrize(
    ("change", "message"),
    [
        ({"node": "a.b"}, "instance label"),
        ({"node": ""}, "instance label"),
        ({"cert_fingerprint": "ABC"}, "64 lowercase hex"),
        ({"ca_fingerprint": fp("x").upper()}, "64 lowercase hex"),
        ({"api_port": 0}, "outside 1-65535"),
        ({"state": "offline"}, "not one of"),
        ({"labels": {"site": "s" * 300}}, "longer than 255"),
    ],
)
def test_agent_txt_refuses_what_does_not_fit(change: dict[str, Any], message: str) -> None:
    args: dict[str, Any] = {
        "node": "n1",
        "labels": {},
        "gpu_summary": "",
        "cert_fingerprint": fp("n"),
        "ca_fingerprint": fp("c"),
        "api_port": 1,
        "state": "ready",
    }
    args.update(change)
    with pytest.raises(DiscoveryError, match=message):
        agent_txt(**args)


@pytest.mark.parametrize(
    ("txt", "message"),
    [
        ({"node": "n", "fp": fp("a"), "ca": fp("b")}, "lacks 'api'"),
        ({"node": "n", "fp": fp("a"), "ca": fp("b"), "api": "x"}, "bad API port"),
        ({"node": "n", "fp": "short", "ca": fp("b"), "api": "1"}, "64 lowercase hex"),
        ({"fp": fp("a"), "ca": fp("b"), "api": "1"}, "lacks 'node'"),
    ],
)
def test_malformed_agent_record_refused(txt: dict[str, str], message: str) -> None:
    with pytest.raises(DiscoveryError, match=message):
        parse_agent_txt(txt)


@given(st.binary(max_size=600))
def test_txt_bytes_from_the_wire_decode_or_raise_discovery_error(raw: bytes) -> None:
    try:
        out = decode_txt(raw)
    except DiscoveryError:
        return
    assert all(isinstance(k, str) and isinstance(v, str) for k, v in out.items())


@pytest.mark.parametrize(
    ("url", "addresses", "expected"),
    [
        ("https://0.0.0.0:8443/", ["fe80::1%2", "10.0.0.5"], "https://10.0.0.5:8443/"),
        ("mqtts://[::]:8883", ["fe80::1%2"], "mqtts://[fe80::1%2]:8883"),
        ("https://coord.example:8443", ["10.0.0.5"], "https://coord.example:8443"),
        ("https://0.0.0.0:8443", [], "https://0.0.0.0:8443"),
    ],
)
def test_unspecified_host_takes_the_advertised_address(
    url: str, addresses: list[str], expected: str
) -> None:
    assert with_host(url, addresses) == expected


# -- loopback: the real zeroconf, bound to 127.0.0.1 --------------------------------------------


async def test_advertised_agent_seen_with_its_txt(fleet: Fleet) -> None:
    ca = fingerprint(fleet.ca.cert)
    node_fp = fleet.node("lyon-1").info.fingerprint
    name = unique("lyon")
    changes = Changes()
    txt = agent_txt(
        name, {"tier": "edge", "region": "eu-west", "site": "lyon"}, "none", node_fp, ca, 8443
    )
    async with AgentBrowser(ca, LO, changes) as browser:
        agent = AgentAdvertiser(name, 8443, txt, LO)
        await agent.async_start()
        try:
            seen = await changes.until(lambda n: n.name == name)
            assert seen.state == "discovered"
            assert seen.fingerprint == node_fp and not seen.untrusted
            assert seen.addresses == ("127.0.0.1",) and seen.port == 8443
            assert dict(seen.txt) == txt
            assert seen.labels == {"tier": "edge", "region": "eu-west", "site": "lyon"}
            assert seen.service == f"{name}.{AGENT_SERVICE}"

            mark = len(changes.seen)
            await agent.async_set_state("ready")
            ready = await changes.until(lambda n: n.state == "ready", since=mark)
            assert ready.first_seen == seen.first_seen and ready.last_seen >= seen.last_seen
            assert browser.get(name) == ready
        finally:
            await agent.async_stop()
        # A clean stop says goodbye: offline at once, still listed.
        gone = await changes.until(lambda n: n.name == name and n.state == "offline")
        assert browser.nodes()[0] == gone


async def test_other_fleet_agents_ignored() -> None:
    ca, other_ca = fp(secrets.token_hex()), fp(secrets.token_hex())
    ours, theirs = unique("ours"), unique("theirs")
    changes = Changes()
    async with AgentBrowser(ca, LO, changes) as browser:
        stranger = AgentAdvertiser(theirs, 1, agent_txt(theirs, {}, "", fp(theirs), other_ca, 1))
        mine = AgentAdvertiser(ours, 1, agent_txt(ours, {}, "", fp(ours), ca, 1))
        # The stranger announces first, so its record is in by the time ours is seen.
        async with stranger, mine:
            await changes.until(lambda n: n.name == ours)
            assert [n.name for n in browser.nodes()] == [ours]
            assert f"{theirs}.{AGENT_SERVICE}".lower() in browser.other_fleets
            assert all(n.name != theirs for n in changes.seen)


async def _spoofer(name: str, txt: dict[str, str]) -> AsyncZeroconf:
    """A responder that does not play by the rules: no probing, claims a name already taken."""
    zc = new_zeroconf(LO)
    info = AsyncServiceInfo(
        AGENT_SERVICE,
        f"{name}.{AGENT_SERVICE}",
        port=int(txt["api"]),
        properties=txt,
        server="spoofer.local.",
        parsed_addresses=["127.0.0.1"],
    )
    await zc.async_register_service(info, cooperating_responders=True)
    return zc


async def test_spoofed_node_name_flagged_untrusted() -> None:
    ca = fp(secrets.token_hex())
    name = unique("lyon")
    real_fp, evil_fp = fp(name), fp("evil" + name)
    changes = Changes()
    browser = AgentBrowser(ca, LO, changes)
    real = AgentAdvertiser(name, 8443, agent_txt(name, {}, "", real_fp, ca, 8443))
    async with browser, real:
        await changes.until(lambda n: n.name == name and not n.untrusted)
        spoofer = await _spoofer(name, agent_txt(name, {}, "", evil_fp, ca, 9999))
        try:
            flagged = await changes.until(lambda n: n.untrusted)
        finally:
            await spoofer.async_close()
    assert flagged.name == name and flagged.fingerprint == evil_fp
    assert flagged.untrusted_reason is not None
    assert real_fp[:16] in flagged.untrusted_reason and evil_fp[:16] in flagged.untrusted_reason
    # The name stays bound to the fingerprint seen first.
    assert browser.fingerprint_of(name) == real_fp


async def test_stolen_fingerprint_flagged_untrusted() -> None:
    ca = fp(secrets.token_hex())
    real, thief = unique("lyon"), unique("paris")
    changes = Changes()
    browser = AgentBrowser(ca, LO, changes)
    async with browser, AgentAdvertiser(real, 1, agent_txt(real, {}, "", fp(real), ca, 1)):
        await changes.until(lambda n: n.name == real)
        async with AgentAdvertiser(thief, 1, agent_txt(thief, {}, "", fp(real), ca, 1)):
            flagged = await changes.until(lambda n: n.name == thief)
        original = browser.get(real)
    assert flagged.untrusted_reason is not None
    assert f"belongs to node {real!r}" in flagged.untrusted_reason
    assert original is not None and not original.untrusted


async def test_enrolled_fingerprint_outranks_first_sighting() -> None:
    ca = fp(secrets.token_hex())
    name = unique("lyon")
    changes = Changes()
    async with AgentBrowser(ca, LO, changes) as browser:
        browser.trust(name, fp("enrolled" + name))
        async with AgentAdvertiser(name, 1, agent_txt(name, {}, "", fp("impostor"), ca, 1)):
            flagged = await changes.until(lambda n: n.name == name)
    assert flagged.untrusted and "is known with certificate" in (flagged.untrusted_reason or "")


async def test_find_coordinator_returns_its_urls_and_skips_other_fleets() -> None:
    ca, other_ca = fp(secrets.token_hex()), fp(secrets.token_hex())
    ours = CoordinatorAdvertiser(
        "https://0.0.0.0:8443", "mqtts://127.0.0.1:8883", ca, LO, name=unique("coord")
    )
    theirs = CoordinatorAdvertiser(
        "https://127.0.0.1:1", "mqtts://127.0.0.1:2", other_ca, LO, name=unique("coord")
    )
    async with theirs, ours:
        found = await find_coordinator(ca, timeout=5, interfaces=LO)
        with pytest.raises(DiscoveryError, match="other fleets ignored"):
            await find_coordinator(fp("nobody"), timeout=1.0, interfaces=LO)
    assert found.api_url == "https://127.0.0.1:8443"  # 0.0.0.0 -> the advertised address
    assert found.broker_url == "mqtts://127.0.0.1:8883"
    assert found.fingerprint == ca and found.service.startswith(ours.instance)


async def test_name_already_advertised_refused() -> None:
    ca = fp(secrets.token_hex())
    name = unique("dup")
    txt = agent_txt(name, {}, "", fp(name), ca, 1)
    async with AgentAdvertiser(name, 1, txt):
        with pytest.raises(DiscoveryError, match="already advertised"):
            async with AgentAdvertiser(name, 1, txt):
                pass


# -- the test LAN: namespaces, a bridge, one process per host --------------------------------


def _need_netns() -> None:
    ok, reason = netns_available()
    if not ok:
        pytest.skip(f"no test LAN: {reason}")


class Child:
    """A host's process: JSON events on stdout, commands on stdin, stderr kept in a file."""

    def __init__(self, proc: asyncio.subprocess.Process, stderr: Path) -> None:
        self.proc = proc
        self.stderr = stderr
        self.events: list[dict[str, Any]] = []

    @classmethod
    async def start(cls, lan: Lan, host: str, argv: list[str], where: Path) -> Child:
        stderr = where / f"{host}-{argv[0]}.log"
        with stderr.open("wb") as err:
            proc = await asyncio.create_subprocess_exec(
                *lan.argv(host, [sys.executable, __file__, *argv]),
                stdin=asyncio.subprocess.PIPE,
                stdout=asyncio.subprocess.PIPE,
                stderr=err,
            )
        return cls(proc, stderr)

    async def wait_for(
        self, pred: Callable[[dict[str, Any]], bool], timeout: float = 10.0, since: int = 0
    ) -> dict[str, Any]:
        """The first event from index ``since`` on that matches, reading more as needed."""
        assert self.proc.stdout is not None
        loop = asyncio.get_running_loop()
        deadline = loop.time() + timeout
        i = since
        while True:
            while i < len(self.events):
                if pred(self.events[i]):
                    return self.events[i]
                i += 1
            remaining = deadline - loop.time()
            try:
                async with asyncio.timeout(max(remaining, 0.001)):
                    line = await self.proc.stdout.readline()
            except TimeoutError:
                raise AssertionError(
                    f"no matching event in {timeout} s; events {self.events}; "
                    f"stderr: {self.stderr.read_text()[-2000:]}"
                ) from None
            if not line:
                raise AssertionError(
                    f"child exited ({await self.proc.wait()}); events {self.events}; "
                    f"stderr: {self.stderr.read_text()[-2000:]}"
                )
            self.events.append(json.loads(line))

    async def send(self, command: str) -> None:
        assert self.proc.stdin is not None
        self.proc.stdin.write(command.encode() + b"\n")
        await self.proc.stdin.drain()

    async def close(self) -> None:
        if self.proc.returncode is None:
            with contextlib.suppress(ConnectionError):
                await self.send("quit")
            try:
                async with asyncio.timeout(5):
                    await self.proc.wait()
            except TimeoutError:
                self.proc.kill()
                await self.proc.wait()


@contextlib.contextmanager
def _lan(hosts: tuple[str, ...], addressing: Addressing = "ipv4") -> Iterator[Lan]:
    _need_netns()
    net = Lan(hosts, addressing=addressing)
    with net:
        yield net
    assert net.leftovers() == [], "namespaces outlived the LAN"


def _node(event: dict[str, Any], name: str, **want: Any) -> bool:
    return (
        event.get("event") == "node"
        and event["name"] == name
        and all(event.get(k) == v for k, v in want.items())
    )


async def _agents(
    lan: Lan, hosts: list[str], ca: str, where: Path, *extra: str, iface: str | None = None
) -> list[Child]:
    children = []
    for h in hosts:
        argv = ["agent", "--node", h, "--iface", iface or lan[h].address, "--ca", ca, "--fp", fp(h)]
        children.append(await Child.start(lan, h, [*argv, *extra], where))
    return children


@pytest.mark.netns
async def test_agents_seen_across_the_bridge(tmp_path: Path) -> None:
    ca = fp("lan-fleet")
    scan = shutil.which("mdns-scan")
    with _lan(("a", "b", "c", "d")) as lan:
        coord = await Child.start(
            lan, "a", ["coordinator", "--iface", lan["a"].address, "--ca", ca], tmp_path
        )
        agents = await _agents(lan, ["b", "c"], ca, tmp_path)
        children = [coord, *agents]
        scanner = None
        try:
            for child in agents:
                await child.wait_for(lambda e: e["event"] == "registered")
            # mdns-scan browses (at most 5 s) in a namespace of its own while the coordinator looks.
            if scan is not None:
                scanner = await asyncio.create_subprocess_exec(
                    *lan.argv("d", ["timeout", "5", scan]),
                    stdout=asyncio.subprocess.DEVNULL,
                    stderr=asyncio.subprocess.PIPE,
                )
            b = await coord.wait_for(lambda e: _node(e, "b"))
            c = await coord.wait_for(lambda e: _node(e, "c"))
            assert b["addresses"] == [lan["b"].ipv4] and c["addresses"] == [lan["c"].ipv4]
            assert b["state"] == "discovered" and not b["untrusted"]
            assert b["txt"]["fp"] == fp("b") and b["txt"]["ca"] == ca
            if scanner is not None:
                want = {"b._fnmesh-agent._tcp.local", "c._fnmesh-agent._tcp.local"}
                found = await _mdns_scan_until(scanner, want)
                assert want <= found, found
        finally:
            if scanner is not None and scanner.returncode is None:
                scanner.kill()
                await scanner.wait()
            await _close(children)
    if scan is None:
        pytest.skip("mdns-scan is not installed (apt-get install mdns-scan): LAN part passed")


async def _mdns_scan_until(proc: asyncio.subprocess.Process, want: set[str]) -> set[str]:
    """What mdns-scan lists (on stderr, unbuffered), read until ``want`` is in or it exits."""
    assert proc.stderr is not None
    output = ""
    try:
        while not want <= _parse_mdns_scan(output):
            chunk = await proc.stderr.read(4096)
            if not chunk:
                break
            output += chunk.decode(errors="replace")
    finally:
        if proc.returncode is None:
            with contextlib.suppress(ProcessLookupError):
                proc.terminate()
        await proc.wait()
    return _parse_mdns_scan(output)


async def _close(children: list[Child]) -> None:
    await asyncio.gather(*(child.close() for child in children))


def _parse_mdns_scan(output: str) -> set[str]:
    """The service instances mdns-scan printed as ``+ name`` lines (among its spinner output)."""
    names = set()
    for line in re.split(r"[\r\n]+", output):
        m = re.match(r"^\s*\+\s+(\S+)", line)
        if m:
            names.add(m.group(1).rstrip("."))
    return names


@pytest.mark.netns
async def test_cut_link_goes_offline_and_comes_back(tmp_path: Path) -> None:
    ca = fp("lan-fleet")
    with _lan(("a", "b", "c")) as lan:
        coord = await Child.start(
            lan, "a", ["coordinator", "--iface", lan["a"].address, "--ca", ca], tmp_path
        )
        b, c = await _agents(lan, ["b", "c"], ca, tmp_path)
        try:
            await coord.wait_for(lambda e: _node(e, "b", state="discovered"))
            await coord.wait_for(lambda e: _node(e, "c", state="discovered"))

            lan.cut("b")
            mark = len(b.events)
            await b.send("state draining")  # announced while unplugged: lost
            await b.wait_for(lambda e: e["event"] == "updated", since=mark)
            mark = len(coord.events)
            await coord.send("sweep 2.5")
            sweep = await coord.wait_for(lambda e: e["event"] == "sweep", since=mark)
            assert sweep["silent"] == ["b"]
            await coord.wait_for(lambda e: _node(e, "b", state="offline"), since=mark)
            # zeroconf itself noticed nothing: no Removed, and the lost update never arrived.
            assert not any(e["event"] == "raw" and e["change"] == "Removed" for e in coord.events)
            assert not any(_node(e, "b", state="draining") for e in coord.events)

            lan.restore("b")
            mark = len(coord.events)
            await b.send("announce")  # what an agent does when its broker comes back
            back = await coord.wait_for(lambda e: _node(e, "b"), since=mark)
            assert back["state"] == "draining"  # the record refreshed with what changed offline
            mark = len(coord.events)
            await coord.send("sweep 2.5")
            sweep = await coord.wait_for(lambda e: e["event"] == "sweep", since=mark)
            assert sweep["silent"] == []
        finally:
            await _close([coord, b, c])


@pytest.mark.netns
@pytest.mark.parametrize("addressing", ["ipv6ll", "ipv4ll"])
async def test_link_local_hosts_find_each_other(tmp_path: Path, addressing: Addressing) -> None:
    """No address configured: interfaces given by name; the agent finds and reaches the coordinator."""
    ca = fp("ll-fleet")
    with _lan(("a", "b"), addressing=addressing) as lan:
        coord = await Child.start(
            lan, "a", ["coordinator", "--iface", lan["a"].dev, "--ca", ca, "--listen"], tmp_path
        )
        await coord.wait_for(lambda e: e["event"] == "advertised")
        (agent,) = await _agents(lan, ["b"], ca, tmp_path, "--find", iface=lan["b"].dev)
        try:
            found = await agent.wait_for(lambda e: e["event"] == "coordinator")
            connected = await agent.wait_for(lambda e: e["event"] in ("connected", "unreachable"))
            assert connected["event"] == "connected", connected
            seen = await coord.wait_for(lambda e: _node(e, "b"))
        finally:
            await _close([agent, coord])
    if addressing == "ipv6ll":
        a_ll, b_ll = lan["a"].ipv6_link_local, lan["b"].ipv6_link_local
        assert a_ll is not None and b_ll is not None
        assert re.fullmatch(rf"https://\[{re.escape(a_ll)}%\d+\]:\d+", found["api_url"]), found
        assert seen["addresses"][0].startswith(b_ll + "%")
    else:
        assert found["api_url"].startswith(f"https://{lan['a'].ipv4}:")
        assert seen["addresses"] == [lan["b"].ipv4]


# -- the delay proxy (tests/delay_proxy.py), which LAN tests put between agent and broker ------


async def _echo(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
    try:
        while data := await reader.read(65536):
            writer.write(data)
            await writer.drain()
    except ConnectionError:
        pass
    finally:
        writer.close()


async def _rtts(reader: asyncio.StreamReader, writer: asyncio.StreamWriter, n: int) -> list[float]:
    out = []
    for i in range(n):
        ping = f"ping {i:04d}".encode()
        started = time.perf_counter()
        writer.write(ping)
        await writer.drain()
        assert await reader.readexactly(len(ping)) == ping
        out.append(time.perf_counter() - started)
    return sorted(out)


async def test_delay_proxy_adds_its_delay_each_way_and_keeps_order() -> None:
    server = await asyncio.start_server(_echo, "127.0.0.1", 0)
    port = server.sockets[0].getsockname()[1]
    try:
        with DelayProxy("127.0.0.1", 0, "127.0.0.1", port, 0.020) as proxy:
            reader, writer = await asyncio.open_connection("127.0.0.1", proxy.port)
            writer.get_extra_info("socket").setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
            try:
                rtt = await _rtts(reader, writer, 5)
                assert 0.030 <= rtt[2] <= 0.050, f"median RTT {rtt[2] * 1000:.1f} ms, want 40 ms"

                proxy.set_delay(0.050)
                rtt = await _rtts(reader, writer, 3)
                assert 0.075 <= rtt[1] <= 0.125, f"median RTT {rtt[1] * 1000:.1f} ms, want 100 ms"

                # A delay lowered mid-stream never lets new bytes overtake older ones.
                sent = b"".join(f"{i:05d}|".encode() for i in range(400))
                for i in range(0, len(sent), 60):
                    writer.write(sent[i : i + 60])
                    await writer.drain()
                    if i == 1200:
                        proxy.set_delay(0.0)
                    await asyncio.sleep(0)
                async with asyncio.timeout(5):
                    echoed = await reader.readexactly(len(sent))
                assert echoed == sent
            finally:
                writer.close()
                await writer.wait_closed()
        assert proxy.connections == 1
    finally:
        server.close()
        await server.wait_closed()
