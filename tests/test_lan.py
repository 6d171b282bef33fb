"""Zero-config discovery and enrolment on a LAN of network namespaces (tests/netns.py).

One LAN for the whole module (building it and starting a mesh is most of the cost):

    c    Mosquitto (generated config, mutual TLS, ACL), a delay proxy in front of it,
         ``fnmesh coordinator --discover-interfaces`` and ``fnmesh router``
    a1   ``fnmesh agent --discover``: a certificate, no address configured (no fnmesh.toml)
    a2   the same; its broker connection runs through the delay proxy's delayed path
    a3   ``fnmesh agent --enrol --ca FILE``: no certificate at all, only the fleet CA file
    s    a spoofer and ``mdns-scan``

Hosts have IPv4 link-local addresses only (169.254/16, nothing configured by the agents
themselves). The test process talks to the coordinator, and runs the delay proxy, on
threads that joined namespace c (:class:`netns.NetnsLoop`).

Every agent reaches the broker through the proxy (the coordinator advertises the proxy's
address as the broker URL); the proxy delays only connections from a2's address when the
delay test asks, so a1 keeps its plain round trip.
"""

from __future__ import annotations

import json
import shutil
import subprocess
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pytest
from delay_proxy import DelayProxy
from mesh_support import FNMESH, build_bundle, clean_env
from netns import Lan, NetnsLoop, available

from fnmesh.agent.advertise import AGENT_SERVICE, ServiceAdvertiser, agent_txt
from fnmesh.certs.ca import init_home
from fnmesh.certs.home import Home
from fnmesh.certs.identity import Role, fingerprint, load_cert
from fnmesh.coordinator.acl import acl_for_home, write_acl
from fnmesh.coordinator.broker import free_port, settings_for_home, write_config
from fnmesh.coordinator.client import Client
from fnmesh.functions.examples.models import build_example
from fnmesh.functions.messages import Encoding, decode_reply, encode_request

pytestmark = pytest.mark.netns

HEARTBEAT = 1.0
DIGITS = "examples/digits"
HOSTS = ("c", "a1", "a2", "a3", "s")


@dataclass
class LanMesh:
    lan: Lan
    home: Home
    api: str
    coord_ip: str
    c: NetnsLoop
    proxy: DelayProxy
    procs: dict[str, subprocess.Popen[bytes]] = field(default_factory=dict)
    logs: Path = Path()

    def call(self, method: str, path: str, **kw: Any) -> Any:
        """One REST call to the coordinator as the operator, from inside namespace c."""
        client = Client(self.home, self.home.load_config())
        return self.c.run(client.async_call(method, path, timeout=30, **kw))

    def nodes(self) -> list[dict[str, Any]]:
        out: list[dict[str, Any]] = self.call("GET", "/v1/nodes")
        return out

    def node(self, name: str, source: str = "mqtt") -> dict[str, Any] | None:
        return next(
            (n for n in self.nodes() if n["name"] == name and n.get("source") == source), None
        )

    def tails(self) -> str:
        out = []
        for f in sorted(self.logs.glob("*.log")):
            out.append(f"--- {f.name} ---\n{f.read_text(errors='replace')[-2500:]}")
        return "\n".join(out)

    def wait(self, what: str, cond: Callable[[], Any], timeout: float = 45.0) -> Any:
        end = time.monotonic() + timeout
        last: Any = None
        while True:
            for name, p in self.procs.items():
                if p.poll() is not None:
                    raise AssertionError(f"{name} exited ({p.returncode})\n{self.tails()}")
            try:
                got = cond()
            except Exception as e:  # not yet: the coordinator may still be starting
                got, last = None, e
            else:
                last = got
            if got:
                return got
            if time.monotonic() > end:
                raise AssertionError(
                    f"{what}: not within {timeout:.0f} s ({last!r})\n{self.tails()}"
                )
            time.sleep(0.1)

    def start(self, name: str, host: str, *args: str, home: Path | None = None) -> None:
        log = open(self.logs / f"{name}.log", "ab")  # noqa: SIM115 - closed with the process
        self.procs[name] = self.lan.popen(
            host,
            [str(FNMESH), *args, "--home", str(home or self.home.root), "-v"],
            stdout=log,
            stderr=subprocess.STDOUT,
            stdin=subprocess.DEVNULL,
            env=clean_env(),
        )
        log.close()

    def rtts(self, node: str, count: int) -> list[float]:
        """The broker RTTs of ``node``'s next ``count`` heartbeats (as the coordinator lists them)."""
        seen: list[float] = []
        last_age: float | None = None
        end = time.monotonic() + count * HEARTBEAT * 4 + 10
        while len(seen) < count and time.monotonic() < end:
            n = self.node(node)
            assert n is not None
            age = n["last_heartbeat_s"]
            if n["rtt_ms"] is not None and age is not None and (last_age is None or age < last_age):
                seen.append(float(n["rtt_ms"]))
            last_age = age
            time.sleep(HEARTBEAT / 4)
        assert len(seen) >= count, f"only {len(seen)} heartbeats from {node}"
        return seen


def _copy_node_identity(home: Home, name: str, dest: Path) -> Path:
    """What a pre-provisioned box holds: the CA certificate and its own identity, no fnmesh.toml."""
    cn = f"node.{name}"
    (dest / "ca").mkdir(parents=True)
    shutil.copy(home.ca_cert, dest / "ca" / "ca.pem")
    shutil.copytree(home.identity_dir(cn), dest / "identities" / cn)
    return dest


@pytest.fixture(scope="module")
def mesh(tmp_path_factory: pytest.TempPathFactory) -> Iterator[LanMesh]:
    ok, why = available()
    if not ok:
        pytest.skip(f"no network namespaces here: {why}")
    if shutil.which("mosquitto") is None:
        pytest.skip("mosquitto is not installed (apt-get install mosquitto)")
    root = tmp_path_factory.mktemp("lan")
    with Lan(HOSTS, addressing="ipv4ll") as lan:
        coord_ip = lan["c"].ipv4
        assert coord_ip is not None
        home = Home(root / "coordinator")
        ca, _ = init_home(home, sans=[coord_ip])
        ca.issue(Role.PUBLISHER, "examples", namespace="examples")
        ca.issue(Role.ROUTER, "main")
        ca.issue(Role.DEVICE, "d1")
        for n in ("a1", "a2"):
            ca.issue(Role.NODE, n, sans=["localhost", "127.0.0.1"])
        broker_port, api_port = free_port(), free_port()
        api = f"https://{coord_ip}:{api_port}"
        cfg = home.load_config()
        home.save_config(cfg.override(broker=f"mqtts://127.0.0.1:{broker_port}", coordinator=api))
        bdir = home.root / "broker"
        bdir.mkdir()
        acl = write_acl(bdir / "acl", acl_for_home(home, {}, cfg.topic_root))
        conf = write_config(settings_for_home(home, bdir, tls_port=broker_port, acl_file=acl), bdir)
        logs = root / "logs"
        logs.mkdir()
        with NetnsLoop(lan["c"].netns) as c:
            proxy = DelayProxy("0.0.0.0", 0, "127.0.0.1", broker_port, 0.0)
            c.call(proxy.start)
            m = LanMesh(lan, home, api, coord_ip, c, proxy, logs=logs)
            try:
                with open(logs / "mosquitto.log", "ab") as out:
                    m.procs["mosquitto"] = lan.popen(
                        "c", ["mosquitto", "-c", str(conf)], stdout=out, stderr=subprocess.STDOUT
                    )
                (bdir / "mosquitto.pid").write_text(str(m.procs["mosquitto"].pid))
                m.start(
                    "coordinator",
                    "c",
                    "coordinator",
                    "--listen",
                    f"{coord_ip}:{api_port}",
                    "--heartbeat",
                    str(HEARTBEAT),
                    "--acl-file",
                    str(acl),
                    "--broker-pid-file",
                    str(bdir / "mosquitto.pid"),
                    "--discover-interfaces",
                    lan["c"].dev,
                    "--advertise-broker",
                    f"mqtts://{coord_ip}:{proxy.port}",
                )
                m.start("router", "c", "router", "--heartbeat", str(HEARTBEAT))
                for n in ("a1", "a2"):
                    agent_home = _copy_node_identity(home, n, root / n)
                    m.start(
                        f"agent-{n}",
                        n,
                        "agent",
                        "--name",
                        n,
                        "--discover",
                        "--interfaces",
                        lan[n].dev,
                        "--labels",
                        "tier=edge,site=lan",
                        "--heartbeat",
                        str(HEARTBEAT),
                        home=agent_home,
                    )
                # a3: a new box with nothing but the fleet CA certificate.
                (root / "a3").mkdir()
                shutil.copy(home.ca_cert, root / "fleet-ca.pem")
                m.start(
                    "agent-a3",
                    "a3",
                    "agent",
                    "--name",
                    "a3",
                    "--enrol",
                    "--ca",
                    str(root / "fleet-ca.pem"),
                    "--discover",
                    "--interfaces",
                    lan["a3"].dev,
                    "--labels",
                    "tier=edge,site=lan",
                    "--heartbeat",
                    str(HEARTBEAT),
                    home=root / "a3",
                )
                yield m
            finally:
                for p in reversed(list(m.procs.values())):
                    if p.poll() is None:
                        p.terminate()
                for p in m.procs.values():
                    try:
                        p.wait(10)
                    except subprocess.TimeoutExpired:
                        p.kill()
                        p.wait(5)
                c.call(proxy.stop)


def test_agents_find_the_coordinator_join_and_serve(mesh: LanMesh) -> None:
    def ready() -> Any:
        nodes = {n["name"]: n for n in mesh.nodes() if n.get("source") == "mqtt"}
        return all(nodes.get(a, {}).get("state") == "ready" for a in ("a1", "a2")) and nodes

    nodes = mesh.wait("a1 and a2 ready (found the coordinator over mDNS)", ready, 60)
    for a in ("a1", "a2"):
        assert nodes[a]["cn"] == f"node.{a}" and nodes[a]["labels"]["site"] == "lan"
        assert nodes[a]["fingerprint"] == fingerprint(
            load_cert(mesh.home.identity_dir(f"node.{a}") / "cert.pem")
        )
    bundle = build_bundle(mesh.home)
    mesh.call(
        "POST",
        "/v1/bundles",
        data=bundle,
        headers={"Content-Type": "application/octet-stream"},
    )
    mesh.call(
        "POST",
        "/v1/deployments",
        json_body={"function": DIGITS, "version": "1.0.0", "min": 2, "max": 2},
    )

    def serving() -> Any:
        got = {
            n["name"]
            for n in mesh.nodes()
            if n.get("source") == "mqtt"
            and n["functions"].get(DIGITS) == "1.0.0"
            and n["state"] == "ready"
        }
        return got if {"a1", "a2"} <= got else None

    mesh.wait("digits on a1 and a2", serving, 60)
    inputs = build_example("digits").sample_inputs(1)
    answered: set[str] = set()
    for i in range(20):
        status, raw, ct = mesh.call(
            "POST",
            f"/v1/functions/{DIGITS}/invoke",
            data=encode_request(inputs, Encoding.JSON, id=f"lan-{i}"),
            headers={"Content-Type": "application/json"},
            raw=True,
        )
        assert status == 200, raw
        reply = decode_reply(raw, ct)
        assert not hasattr(reply, "error"), reply
        answered.add(reply.node)  # type: ignore[union-attr]
        if answered >= {"a1", "a2"}:
            break
    assert answered and answered <= {"a1", "a2"}, answered


def _median(xs: list[float]) -> float:
    xs = sorted(xs)
    mid = len(xs) // 2
    return xs[mid] if len(xs) % 2 else (xs[mid - 1] + xs[mid]) / 2


def test_delay_shows_in_reported_rtt(mesh: LanMesh) -> None:
    """20 ms each way between a2 and the broker: a2's heartbeats report 40 ms more (+-25%)."""
    a2_ip = mesh.lan["a2"].ipv4
    assert a2_ip is not None
    mesh.wait("a2 ready", lambda: (mesh.node("a2") or {}).get("state") == "ready", 60)
    before = _median(mesh.rtts("a2", 5))
    mesh.proxy.set_delay(0.020, client=a2_ip)
    try:
        # A heartbeat reports the round trip its predecessor's PUBACK took: skip two.
        mesh.rtts("a2", 2)
        delayed = _median(mesh.rtts("a2", 5))
        other = mesh.node("a1")
    finally:
        mesh.proxy.set_delay(0.0, client=a2_ip)
    mesh.rtts("a2", 2)
    after = _median(mesh.rtts("a2", 5))
    # The machine is noisy: the lower of the undelayed figures is the link's own round trip.
    baseline = min(before, after)
    added = delayed - baseline
    print(
        f"RTT a2 to broker (ms, medians of 5 heartbeats): before {before:.2f}, "
        f"with 20 ms each way {delayed:.2f} (+{added:.2f}), after removing it {after:.2f}; "
        f"a1 meanwhile {other and other['rtt_ms']}"
    )
    assert 30.0 <= added <= 50.0, (before, delayed, after)
    assert after < delayed - 30.0, (before, delayed, after)
    # Only a2's path was delayed.
    assert other is not None and other["rtt_ms"] is not None and other["rtt_ms"] < 20.0


def test_new_agent_pending_until_approved_then_serves(mesh: LanMesh) -> None:
    pending = mesh.wait(
        "a3 pending",
        lambda: next(
            (n for n in mesh.nodes() if n["name"] == "a3" and n["state"] == "pending"), None
        ),
    )
    assert len(pending["key_fingerprint"]) == 64 and pending["hardware"].get("cores")
    enrolments = mesh.call("GET", "/v1/enrolments")
    assert [e["node"] for e in enrolments] == ["a3"]
    # Pending is not trusted: no placement, no assignment.
    assert all(p["node"] != "a3" for p in mesh.call("GET", "/v1/placements"))
    # Approve with the CLI, from the operator's home, inside the coordinator's namespace.
    out = mesh.lan.run(
        "c",
        [str(FNMESH), "nodes", "--home", str(mesh.home.root), "approve", "a3", "--json"],
        timeout=60,
        check=False,
    )
    assert out.returncode == 0, out.stderr + out.stdout
    approved = json.loads(out.stdout)
    assert (
        approved["state"] == "approved" and (mesh.home.root / "enrolled" / "node.a3.pem").exists()
    )
    mesh.wait("a3 ready", lambda: (mesh.node("a3") or {}).get("state") == "ready", 60)
    assert mesh.procs["agent-a3"].poll() is None  # joined without a restart
    a3_home = mesh.home.root.parent / "a3" / "identities" / "node.a3"
    for f, mode in (("key.pem", 0o600), ("enc.key", 0o600)):
        assert (a3_home / f).stat().st_mode & 0o777 == mode
    assert (a3_home / "cert.pem").exists() and (a3_home / "ca.pem").exists()
    mesh.call(
        "POST",
        "/v1/deployments",
        json_body={"function": DIGITS, "version": "1.0.0", "min": 3, "max": 3},
    )
    mesh.wait(
        "digits on a3",
        lambda: (mesh.node("a3") or {}).get("functions", {}).get(DIGITS) == "1.0.0",
        60,
    )
    assert any(p["node"] == "a3" for p in mesh.call("GET", "/v1/placements"))


def test_spoofed_advertisement_untrusted_never_assigned(mesh: LanMesh) -> None:
    mesh.wait("a1 ready", lambda: (mesh.node("a1") or {}).get("state") == "ready", 60)
    ca_fp = fingerprint(load_cert(mesh.home.ca_cert))
    evil = "e" * 64
    txt = agent_txt("a1", {"tier": "edge", "site": "lan"}, "none", evil, ca_fp, 8443, "ready")

    with NetnsLoop(mesh.lan["s"].netns) as s:
        spoof = ServiceAdvertiser(AGENT_SERVICE, "a1x", 8443, txt, [mesh.lan["s"].dev])
        s.run(spoof.async_start())
        try:
            flagged = mesh.wait(
                "the spoofed record flagged",
                lambda: next((n for n in mesh.nodes() if n["state"] == "untrusted"), None),
            )
            # Give the reconciler a few passes with the spoof in view.
            time.sleep(3 * HEARTBEAT)
            placements = mesh.call("GET", "/v1/placements")
            nodes = mesh.nodes()
        finally:
            s.run(spoof.async_stop())
    assert flagged["name"] == "a1" and flagged["fingerprint"] == evil
    # Only the spoof: a3's pending record (its key, before approval) is not a contradiction.
    assert [n["service"] for n in nodes if n["state"] == "untrusted"] == [f"a1x.{AGENT_SERVICE}"], (
        nodes
    )
    assert "known with certificate" in flagged["untrusted_reason"]
    assert {p["node"] for p in placements} <= {"a1", "a2", "a3"}
    real = next(n for n in nodes if n["name"] == "a1" and n.get("source") == "mqtt")
    assert real["state"] == "ready" and real["fingerprint"] != evil


def test_mdns_scan_lists_the_agents(mesh: LanMesh) -> None:
    scan = shutil.which("mdns-scan")
    if scan is None:
        pytest.skip("mdns-scan is not installed (apt-get install mdns-scan)")
    proc = mesh.lan.run("s", ["timeout", "5", scan], timeout=15, check=False)
    import re

    names = set()
    for line in re.split(r"[\r\n]+", proc.stdout + proc.stderr):
        m = re.match(r"^\s*\+\s+(\S+)", line)
        if m:
            names.add(m.group(1).rstrip("."))
    want = {f"a1.{AGENT_SERVICE}".rstrip("."), f"a2.{AGENT_SERVICE}".rstrip(".")}
    assert want <= names, names


def test_cut_link_offline_within_three_heartbeats_then_back(mesh: LanMesh) -> None:
    mesh.wait("a1 ready", lambda: (mesh.node("a1") or {}).get("state") == "ready", 60)
    pid = mesh.procs["agent-a1"].pid
    mesh.lan.cut("a1")
    cut_at = time.monotonic()
    try:
        mesh.wait("a1 offline", lambda: (mesh.node("a1") or {}).get("state") == "offline", 15)
        took = time.monotonic() - cut_at
    finally:
        mesh.lan.restore("a1")
    print(f"a1 offline {took:.2f} s after its link was cut (heartbeat {HEARTBEAT} s)")
    # 3 missed heartbeats, plus one registry sweep and one poll of ours.
    assert took <= 3 * HEARTBEAT + 1.5, took
    mesh.wait("a1 ready again", lambda: (mesh.node("a1") or {}).get("state") == "ready", 60)
    assert mesh.procs["agent-a1"].pid == pid and mesh.procs["agent-a1"].poll() is None
