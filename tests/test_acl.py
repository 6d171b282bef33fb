"""The broker's ACL and TLS listener against real attacks, on a real Mosquitto.

Each broker is configured by ``fnmesh broker config`` (grants read from the
coordinator's SQLite store in the home), with an ACL file listing every live
identity. Mosquitto 2.0 answers a SUBSCRIBE outside the ACL with "granted" and
then withholds every message the subscriber may not read, so "refused" is
proven by delivery: an allowed client publishes the forbidden message, then a
control message the attacker may read; the control arrives, the forbidden one
does not (while a client allowed to read it does get it). A publish outside
the ACL gets PUBACK reason code 0x87 (Not authorized) and reaches nobody.
"""

from __future__ import annotations

import asyncio
import secrets
import ssl
import threading
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import paho.mqtt.client as mqtt
import pytest
from click.testing import CliRunner
from conftest import Fleet, make_fleet
from paho.mqtt.enums import CallbackAPIVersion

from fnmesh.certs import tls
from fnmesh.certs.ca import Issued
from fnmesh.certs.identity import Identity, Role
from fnmesh.coordinator.acl import (
    AclError,
    acl_for_home,
    live_identities,
    render_acl,
    rules_for,
)
from fnmesh.coordinator.broker import Mosquitto, free_port
from fnmesh.coordinator.cli.broker_cmd import broker as broker_cli
from fnmesh.coordinator.grants import Grants
from fnmesh.coordinator.store import Store, sqlite_url

WAIT = 10.0
#: How long a withheld message gets to show up after the control message has arrived.
GRACE = 0.3
NOT_AUTHORIZED = 0x87
#: PUBACK reason codes of an accepted publish: success, and success with no subscriber yet.
ACCEPTED = (0x00, 0x10)
SHARE = "$share/fnmesh-routers/"


# -- a broker configured by `fnmesh broker config` ------------------------------------------


@dataclass
class AclBroker:
    fleet: Fleet
    dir: Path
    port: int
    root: str
    router: Identity
    proc: Mosquitto | None = None

    @property
    def db_url(self) -> str:
        return sqlite_url(self.fleet.home.root / "coordinator" / "coordinator.db")

    def configure(self) -> None:
        """``fnmesh broker config``: mosquitto.conf and the ACL from identities and grants."""
        args = ["config", "--home", str(self.fleet.home.root), "-o", str(self.dir)]
        args += ["--port", str(self.port), "--root", self.root]
        result = CliRunner().invoke(broker_cli, args, catch_exceptions=False)
        assert result.exit_code == 0, result.output

    def start(self) -> AclBroker:
        self.configure()
        self.proc = Mosquitto(self.dir / "mosquitto.conf", self.port).start()
        return self

    def regenerate_and_reload(self) -> None:
        """Regenerate the ACL (the CRL is already current), then SIGHUP."""
        self.configure()
        assert self.proc is not None
        self.proc.reload()

    def grants(self, fn: Callable[[Grants], Any]) -> None:
        async def run() -> None:
            (self.fleet.home.root / "coordinator").mkdir(exist_ok=True)
            async with await Store.open(self.db_url) as store:
                await fn(Grants(store))

        asyncio.run(run())

    def t(self, suffix: str) -> str:
        return f"{self.root}/{suffix}"


@pytest.fixture
def mesh(fleet: Fleet, tmp_path: Path) -> Iterator[AclBroker]:
    root = f"acltest-{secrets.token_hex(3)}/v1"
    # The fleet's regulars: a router, a second node, devices; meter-1 may invoke ex/digits.
    router = fleet.ca.issue(Role.ROUTER, "main")
    b = AclBroker(fleet, tmp_path / "broker", free_port(), root, router)
    b.dir.mkdir(parents=True)
    fleet.node("paris-1")
    for d in ("meter-1", "meter-2", "meter-3"):
        fleet.device(d)
    b.grants(lambda g: g.grant("meter-1", "ex/digits"))
    b.start()
    try:
        yield b
    finally:
        if b.proc is not None:
            b.proc.stop()


# -- MQTT 5 clients with events instead of sleeps --------------------------------------------


class Peer:
    """A paho MQTT 5 client on the fleet's mutual TLS, its network loop in one owned thread."""

    def __init__(self, mesh: AclBroker, ident: Identity, client_id: str | None = None) -> None:
        self.cn = ident.cn
        self.client = mqtt.Client(
            CallbackAPIVersion.VERSION2,
            client_id=client_id or f"{ident.cn}-{secrets.token_hex(3)}",
            protocol=mqtt.MQTTv5,
        )
        self.client.tls_set_context(tls.client_context(ident, mesh.fleet.home.ca_cert))
        self.port = mesh.port
        self._cond = threading.Condition()
        self.messages: list[tuple[str, bytes, bool]] = []
        self._acks: dict[int, int] = {}
        self._subacks: dict[int, list[int]] = {}
        self.connected = threading.Event()
        self.disconnected = threading.Event()
        self.client.on_connect = self._on_connect
        self.client.on_disconnect = lambda *_a: self.disconnected.set()
        self.client.on_message = self._on_message
        self.client.on_publish = self._on_publish
        self.client.on_subscribe = self._on_subscribe

    def _on_connect(self, _c: Any, _u: Any, _f: Any, reason: Any, _p: Any) -> None:
        if not reason.is_failure:
            self.connected.set()

    def _on_message(self, _c: Any, _u: Any, msg: mqtt.MQTTMessage) -> None:
        with self._cond:
            self.messages.append((msg.topic, bytes(msg.payload), bool(msg.retain)))
            self._cond.notify_all()

    def _on_publish(self, _c: Any, _u: Any, mid: int, reason: Any, _p: Any) -> None:
        with self._cond:
            self._acks[mid] = reason.value
            self._cond.notify_all()

    def _on_subscribe(self, _c: Any, _u: Any, mid: int, reasons: Any, _p: Any) -> None:
        with self._cond:
            self._subacks[mid] = [r.value for r in reasons]
            self._cond.notify_all()

    def __enter__(self) -> Peer:
        self.client.connect("127.0.0.1", self.port, keepalive=30)
        self.client.loop_start()
        assert self.connected.wait(WAIT), f"{self.cn}: no CONNACK"
        return self

    def __exit__(self, *exc: object) -> None:
        self.client.disconnect()
        self.client.loop_stop()

    def subscribe(self, *topics: str) -> list[int]:
        """Subscribe at QoS 1; the SUBACK's reason codes."""
        _rc, mid = self.client.subscribe([(t, 1) for t in topics])
        assert mid is not None
        with self._cond:
            assert self._cond.wait_for(lambda: mid in self._subacks, WAIT), "no SUBACK"
            return self._subacks.pop(mid)

    def publish(self, topic: str, payload: bytes, *, retain: bool = False) -> int:
        """Publish at QoS 1; the PUBACK's reason code (0 success, 0x87 not authorized)."""
        info = self.client.publish(topic, payload, qos=1, retain=retain)
        with self._cond:
            assert self._cond.wait_for(lambda: info.mid in self._acks, WAIT), "no PUBACK"
            return self._acks.pop(info.mid)

    def wait_for(self, payload: bytes, timeout: float = WAIT) -> bool:
        with self._cond:
            return self._cond.wait_for(lambda: self.got(payload), timeout)

    def got(self, payload: bytes) -> bool:
        return any(p == payload for _t, p, _r in self.messages)


def assert_withheld(attacker: Peer, forbidden: bytes, control: bytes) -> None:
    """The control (published after the forbidden message) arrives; the forbidden one never."""
    assert attacker.wait_for(control), f"{attacker.cn}: the control message never arrived"
    assert not attacker.wait_for(forbidden, GRACE), f"{attacker.cn} read {forbidden!r}"


def connection_refused(port: int, ctx: ssl.SSLContext | None) -> bool:
    """True when the broker closes the connection instead of accepting the MQTT CONNECT."""
    client = mqtt.Client(CallbackAPIVersion.VERSION2, client_id=f"probe-{secrets.token_hex(3)}")
    if ctx is not None:
        client.tls_set_context(ctx)
    accepted, closed = threading.Event(), threading.Event()
    client.on_connect = lambda _c, _u, _f, reason, _p: (
        closed if reason.is_failure else accepted
    ).set()
    client.on_disconnect = lambda *_a: closed.set()
    try:
        client.connect("127.0.0.1", port, keepalive=30)
    except (ssl.SSLError, OSError):
        return True
    client.loop_start()
    try:
        deadline = time.monotonic() + WAIT
        while time.monotonic() < deadline:
            if accepted.is_set():
                return False
            if closed.wait(0.05):
                return not accepted.is_set()
        raise AssertionError("neither accepted nor refused")
    finally:
        client.disconnect()
        client.loop_stop()


# -- the ACL file itself --------------------------------------------------------------------


def _issued(cn: str, role: Role, *, revoked: bool = False, days: int = 30) -> Issued:
    not_after = (datetime.now(UTC) + timedelta(days=days)).isoformat()
    return Issued(cn, 1, role.value, not_after, "2024-01-01T00:00:00+00:00" if revoked else None)


def test_acl_lists_each_identity_with_its_role_topics() -> None:
    ids = live_identities(
        [
            _issued("node.lyon-1", Role.NODE),
            _issued("router.main", Role.ROUTER),
            _issued("coordinator.main", Role.COORDINATOR),
            _issued("device.meter-1", Role.DEVICE),
            _issued("operator.admin", Role.OPERATOR),
            _issued("publisher.examples", Role.PUBLISHER),
            _issued("device.gone", Role.DEVICE, revoked=True),
            _issued("device.old", Role.DEVICE, days=-1),
        ]
    )
    text = render_acl(ids, {"device.meter-1": {"ex/b", "ex/a"}, "device.gone": {"ex/a"}}, "r/v1")
    blocks = {b.splitlines()[0]: b.splitlines()[1:] for b in text.split("\n\n") if "user " in b}
    assert set(blocks) == {
        "user node.lyon-1",
        "user router.main",
        "user coordinator.main",
        "user device.meter-1",
    }
    assert blocks["user node.lyon-1"] == [
        "topic read r/v1/nodes/lyon-1/#",
        "topic read r/v1/crl",
        "topic write r/v1/nodes/lyon-1/status",
        "topic write r/v1/nodes/lyon-1/heartbeat",
        "topic write r/v1/spill/#",
        "topic write r/v1/replies/#",
    ]
    assert blocks["user device.meter-1"] == [
        "topic read r/v1/replies/meter-1/#",
        "topic write r/v1/fn/ex/a/invoke",
        "topic write r/v1/fn/ex/b/invoke",
    ]
    assert not any("%" in line or line.startswith("pattern") for line in text.splitlines())


@pytest.mark.parametrize(
    "issued, grants, root",
    [
        (_issued("device.x\nuser router.main", Role.DEVICE), {}, "r/v1"),
        (_issued("device.x\n", Role.DEVICE), {}, "r/v1"),
        (_issued("node.x", Role.DEVICE), {}, "r/v1"),
        (_issued("device.x", Role.DEVICE), {"device.x": {"ex/#"}}, "r/v1"),
        (_issued("device.x", Role.DEVICE), {"device.x": {"ex/a\ntopic write #"}}, "r/v1"),
        (_issued("device.x", Role.DEVICE), {}, "r/#"),
        (_issued("device.x", Role.DEVICE), {}, "r/v1\nuser x"),
    ],
)
def test_acl_injection_through_names_refused(
    issued: Issued, grants: dict[str, set[str]], root: str
) -> None:
    with pytest.raises(AclError):
        render_acl(live_identities([issued]), grants, root)


def test_acl_generation_for_10000_devices_in_100_groups(tmp_path: Path) -> None:
    devices = [f"device.d{i:05d}" for i in range(10_000)]

    async def fill() -> tuple[dict[str, set[str]], float]:
        async with await Store.open(sqlite_url(tmp_path / "c.db")) as store:
            g = Grants(store)
            for k in range(100):
                await g.add_members(f"group:g{k:02d}", devices[k::100])
                for f in range(3):
                    await g.grant(f"group:g{k:02d}", f"ns{k % 7}/fn{f}")
            for d in devices[:100]:
                await g.grant(d, "ex/direct")
            t0 = time.perf_counter()
            subjects = await g.acl_subjects()
            return subjects, time.perf_counter() - t0

    subjects, t_query = asyncio.run(fill())
    issued = [_issued(cn, Role.DEVICE) for cn in devices]
    t0 = time.perf_counter()
    text = render_acl(live_identities(issued), subjects, "fnmesh/v1")
    t_render = time.perf_counter() - t0
    assert text.count("\nuser device.") == 10_000
    assert text.count("/invoke") == 10_000 * 3 + 100
    print(
        f"\nACL for 10,000 devices in 100 groups: grants query {t_query * 1000:.0f} ms, "
        f"render {t_render * 1000:.0f} ms, {len(text) / 1e6:.1f} MB"
    )


# -- devices ---------------------------------------------------------------------------------


def test_device_cannot_subscribe_to_node_inbox(mesh: AclBroker) -> None:
    f = mesh.fleet
    with (
        Peer(mesh, f.device("meter-1")) as device,
        Peer(mesh, f.node("lyon-1")) as node,
        Peer(mesh, mesh.router) as router,
    ):
        codes = device.subscribe(
            mesh.t("nodes/lyon-1/#"), mesh.t("nodes/+/invoke/#"), mesh.t("replies/meter-1/#")
        )
        print(f"\nSUBACK for a device's subscription to a node's inbox: {[hex(c) for c in codes]}")
        node.subscribe(mesh.t("nodes/lyon-1/#"))
        assert router.publish(mesh.t("nodes/lyon-1/invoke/ex/digits"), b"secret-input") in ACCEPTED
        assert router.publish(mesh.t("replies/meter-1/x"), b"control") in ACCEPTED
        assert node.wait_for(b"secret-input")
        assert_withheld(device, b"secret-input", b"control")


def test_device_cannot_read_other_device_replies(mesh: AclBroker) -> None:
    f = mesh.fleet
    with (
        Peer(mesh, f.device("meter-1")) as attacker,
        Peer(mesh, f.device("meter-2")) as victim,
        Peer(mesh, f.node("lyon-1")) as node,
    ):
        attacker.subscribe(mesh.t("replies/meter-2/#"), mesh.t("replies/+/#"))
        attacker.subscribe(mesh.t("replies/meter-1/#"))
        victim.subscribe(mesh.t("replies/meter-2/#"))
        assert node.publish(mesh.t("replies/meter-2/r1"), b"victim-answer") in ACCEPTED
        assert node.publish(mesh.t("replies/meter-1/r1"), b"control") in ACCEPTED
        assert victim.wait_for(b"victim-answer")
        assert_withheld(attacker, b"victim-answer", b"control")


def test_device_cannot_invoke_ungranted_function(mesh: AclBroker) -> None:
    f = mesh.fleet
    with (
        Peer(mesh, mesh.router) as spy,
        Peer(mesh, f.device("meter-1")) as device,
    ):
        # The router's shared subscription: Mosquitto checks its ACL without `$share/G/`.
        spy.subscribe(SHARE + mesh.t("fn/+/+/invoke"))
        assert device.publish(mesh.t("fn/ex/secret/invoke"), b"ungranted") == NOT_AUTHORIZED
        assert device.publish(mesh.t("fn/ex/digits/invoke"), b"granted") in ACCEPTED
        assert_withheld(spy, b"ungranted", b"granted")


def test_router_shared_subscription_cannot_read_replies(mesh: AclBroker) -> None:
    f = mesh.fleet
    with (
        Peer(mesh, mesh.router) as router,
        Peer(mesh, f.node("lyon-1")) as node,
        Peer(mesh, f.device("meter-1")) as device,
    ):
        router.subscribe(SHARE + mesh.t("replies/#"), SHARE + mesh.t("spill/+/+"))
        device.subscribe(mesh.t("replies/meter-1/#"))
        assert node.publish(mesh.t("replies/meter-1/r"), b"answer") in ACCEPTED
        assert node.publish(mesh.t("spill/ex/digits"), b"control") in ACCEPTED
        assert device.wait_for(b"answer")
        assert_withheld(router, b"answer", b"control")


def test_device_cannot_publish_fake_node_status(mesh: AclBroker) -> None:
    f = mesh.fleet
    with (
        Peer(mesh, mesh.router) as router,
        Peer(mesh, f.device("meter-1")) as device,
    ):
        router.subscribe(mesh.t("nodes/+/status"), mesh.t("nodes/+/heartbeat"), mesh.t("fn/#"))
        fake = b'{"state": "ready", "functions": {"ex/digits": "9.9.9"}}'
        assert device.publish(mesh.t("nodes/lyon-1/status"), fake, retain=True) == NOT_AUTHORIZED
        assert device.publish(mesh.t("nodes/evil/status"), fake, retain=True) == NOT_AUTHORIZED
        assert device.publish(mesh.t("nodes/lyon-1/heartbeat"), fake) == NOT_AUTHORIZED
        assert device.publish(mesh.t("fn/ex/digits/invoke"), b"control") in ACCEPTED
        assert_withheld(router, fake, b"control")
    # Nothing was retained either: a router subscribing afresh finds no status at all.
    with (
        Peer(mesh, mesh.router) as late,
        Peer(mesh, f.node("lyon-1")) as node,
    ):
        late.subscribe(mesh.t("nodes/+/status"))
        assert node.publish(mesh.t("nodes/lyon-1/status"), b"real-status", retain=True) in ACCEPTED
        assert_withheld(late, fake, b"real-status")


# -- nodes ----------------------------------------------------------------------------------


def test_node_cannot_read_other_node_inbox(mesh: AclBroker) -> None:
    f = mesh.fleet
    with (
        Peer(mesh, f.node("lyon-1")) as attacker,
        Peer(mesh, f.node("paris-1")) as victim,
        Peer(mesh, mesh.router) as router,
    ):
        attacker.subscribe(
            mesh.t("nodes/paris-1/#"), mesh.t("nodes/+/invoke/#"), mesh.t("nodes/lyon-1/#")
        )
        victim.subscribe(mesh.t("nodes/paris-1/#"))
        assert router.publish(mesh.t("nodes/paris-1/invoke/ex/digits"), b"for-paris") in ACCEPTED
        assert (
            router.publish(mesh.t("nodes/paris-1/spill/ex/digits"), b"spill-for-paris") in ACCEPTED
        )
        assert router.publish(mesh.t("nodes/lyon-1/invoke/ex/digits"), b"control") in ACCEPTED
        assert victim.wait_for(b"for-paris") and victim.wait_for(b"spill-for-paris")
        assert_withheld(attacker, b"for-paris", b"control")
        assert not attacker.got(b"spill-for-paris")


def test_node_cannot_read_other_node_assignments(mesh: AclBroker) -> None:
    f = mesh.fleet
    with Peer(mesh, f.coordinator) as coordinator:
        # Retained, as the reconciler publishes them: they wait for whoever subscribes.
        theirs = b'{"node": "paris-1", "key": "wrapped-for-paris"}'
        assert coordinator.publish(mesh.t("nodes/paris-1/assign"), theirs, retain=True) in ACCEPTED
        assert coordinator.publish(mesh.t("nodes/lyon-1/assign"), b"mine", retain=True) in ACCEPTED
    with (
        Peer(mesh, f.node("lyon-1")) as attacker,
        Peer(mesh, f.node("paris-1")) as victim,
    ):
        attacker.subscribe(mesh.t("nodes/+/assign"))
        victim.subscribe(mesh.t("nodes/paris-1/assign"))
        assert victim.wait_for(theirs)
        assert_withheld(attacker, theirs, b"mine")


# -- grants, groups, revocation ---------------------------------------------------------------


def test_group_grant_allows_member_devices(mesh: AclBroker) -> None:
    f = mesh.fleet

    async def group(g: Grants) -> None:
        await g.grant("group:meters", "ex/cancer")
        await g.add_member("group:meters", "meter-2")
        await g.add_member("group:meters", "device.meter-3")

    mesh.grants(group)
    f.device("meter-4")  # not a member
    mesh.regenerate_and_reload()
    with (
        Peer(mesh, mesh.router) as spy,
        Peer(mesh, f.device("meter-2")) as m2,
        Peer(mesh, f.device("meter-3")) as m3,
        Peer(mesh, f.device("meter-4")) as outsider,
        Peer(mesh, f.device("meter-1")) as m1,
    ):
        spy.subscribe(SHARE + mesh.t("fn/+/+/invoke"))
        assert outsider.publish(mesh.t("fn/ex/cancer/invoke"), b"outsider") == NOT_AUTHORIZED
        assert m1.publish(mesh.t("fn/ex/cancer/invoke"), b"not-in-group") == NOT_AUTHORIZED
        assert m2.publish(mesh.t("fn/ex/cancer/invoke"), b"from-m2") in ACCEPTED
        assert m3.publish(mesh.t("fn/ex/cancer/invoke"), b"from-m3") in ACCEPTED
        assert spy.wait_for(b"from-m2")
        assert_withheld(spy, b"outsider", b"from-m3")
        assert not spy.got(b"not-in-group")
        # The group's grant does not extend the members to other functions.
        assert m2.publish(mesh.t("fn/ex/digits/invoke"), b"m2-digits") == NOT_AUTHORIZED


def test_revoked_identity_gets_no_acl(mesh: AclBroker) -> None:
    f = mesh.fleet
    victim = f.device("meter-1")
    text = acl_for_home(f.home, {"device.meter-1": {"ex/digits"}}, mesh.root)
    assert "user device.meter-1\n" in text
    with (
        Peer(mesh, mesh.router) as spy,
        Peer(mesh, f.node("lyon-1")) as node,
        Peer(mesh, victim) as stolen,
    ):
        spy.subscribe(SHARE + mesh.t("fn/+/+/invoke"))
        stolen.subscribe(mesh.t("replies/meter-1/#"))
        assert stolen.publish(mesh.t("fn/ex/digits/invoke"), b"before") in ACCEPTED
        assert spy.wait_for(b"before")

        f.ca.revoke(victim.cn)
        text = acl_for_home(f.home, {"device.meter-1": {"ex/digits"}}, mesh.root)
        assert "device.meter-1" not in text
        mesh.regenerate_and_reload()
        # The open connection survives the SIGHUP (Mosquitto does not re-check certificates
        # of live sessions) but its identity can no longer do anything.
        deadline = time.monotonic() + WAIT
        while stolen.publish(mesh.t("fn/ex/digits/invoke"), b"after") != NOT_AUTHORIZED:
            assert time.monotonic() < deadline, "the reloaded ACL never took effect"
        assert stolen.client.is_connected()
        # Its replies subscription is still in place but delivers nothing: the control goes
        # to a device still in the ACL, published after the answer by the same node.
        with Peer(mesh, f.device("meter-2")) as other:
            other.subscribe(mesh.t("replies/meter-2/#"))
            assert node.publish(mesh.t("replies/meter-1/r"), b"answer-after-revoke") in ACCEPTED
            assert node.publish(mesh.t("replies/meter-2/r"), b"control") in ACCEPTED
            assert other.wait_for(b"control")
        assert not stolen.wait_for(b"answer-after-revoke", GRACE)


def test_revoked_certificate_refused_by_broker(mesh: AclBroker) -> None:
    f = mesh.fleet
    victim, bystander = f.device("meter-2"), f.device("meter-3")
    ctx = tls.client_context(victim, f.home.ca_cert)
    assert not connection_refused(mesh.port, ctx)
    f.ca.revoke(victim.cn)  # writes the signed CRL the broker's config names
    before_reload = connection_refused(mesh.port, ctx)
    mesh.regenerate_and_reload()
    deadline = time.monotonic() + WAIT
    while not connection_refused(mesh.port, ctx):
        assert time.monotonic() < deadline, "the revoked certificate is still accepted"
    print(
        f"\nmosquitto: revoked certificate before SIGHUP "
        f"{'refused' if before_reload else 'accepted'}; after SIGHUP refused (CRL re-read)"
    )
    assert not connection_refused(mesh.port, tls.client_context(bystander, f.home.ca_cert))
    # A restart keeps it refused.
    assert mesh.proc is not None
    mesh.proc.stop()
    mesh.proc.start()
    assert connection_refused(mesh.port, ctx)


def test_acl_reload_takes_effect_without_restart(mesh: AclBroker) -> None:
    f = mesh.fleet
    assert mesh.proc is not None and mesh.proc.proc is not None
    pid = mesh.proc.proc.pid
    with (
        Peer(mesh, mesh.router) as spy,
        Peer(mesh, f.device("meter-2")) as device,
    ):
        spy.subscribe(SHARE + mesh.t("fn/+/+/invoke"))
        assert device.publish(mesh.t("fn/ex/digits/invoke"), b"not-yet") == NOT_AUTHORIZED
        mesh.grants(lambda g: g.grant("meter-2", "ex/digits"))
        t0 = time.perf_counter()
        mesh.regenerate_and_reload()
        t_signal = time.perf_counter()
        tries = 1
        while device.publish(mesh.t("fn/ex/digits/invoke"), b"granted-now") not in ACCEPTED:
            tries += 1
            assert time.perf_counter() - t0 < WAIT, "the new grant never took effect"
        t_done = time.perf_counter()
        assert spy.wait_for(b"granted-now")
        assert not spy.got(b"not-yet")
        assert device.client.is_connected() and not device.disconnected.is_set()
    assert mesh.proc.proc is not None and mesh.proc.proc.pid == pid
    print(
        f"\ngrant -> allowed without restart: regenerate {1000 * (t_signal - t0):.0f} ms, "
        f"SIGHUP -> first accepted publish {1000 * (t_done - t_signal):.1f} ms "
        f"({tries} publishes)"
    )


# -- the TLS listener --------------------------------------------------------------------------


def test_plaintext_connection_on_tls_port_refused(mesh: AclBroker) -> None:
    assert connection_refused(mesh.port, None)
    assert not connection_refused(
        mesh.port, tls.client_context(mesh.fleet.device("meter-1"), mesh.fleet.home.ca_cert)
    )


def test_foreign_ca_certificate_refused_by_broker(mesh: AclBroker, tmp_path: Path) -> None:
    foreign = make_fleet(tmp_path / "foreign")
    # Same CN as one of ours, signed by another CA; trusting our CA for the broker.
    impostor = foreign.device("meter-1")
    assert connection_refused(mesh.port, tls.client_context(impostor, mesh.fleet.home.ca_cert))
    ours = mesh.fleet.device("meter-1")
    assert not connection_refused(mesh.port, tls.client_context(ours, mesh.fleet.home.ca_cert))


def test_expired_certificate_refused_by_broker(mesh: AclBroker) -> None:
    f = mesh.fleet
    expired = f.ca.issue(
        Role.DEVICE, "meter-old", days=1, not_before=datetime.now(UTC) - timedelta(days=3)
    )
    mesh.grants(lambda g: g.grant("meter-old", "ex/digits"))
    mesh.regenerate_and_reload()
    assert "device.meter-old" not in (mesh.dir / "acl").read_text()
    assert connection_refused(mesh.port, tls.client_context(expired, f.home.ca_cert))
    assert not connection_refused(
        mesh.port, tls.client_context(f.device("meter-1"), f.home.ca_cert)
    )


# -- the generated config ----------------------------------------------------------------------


def test_broker_config_cli_without_a_coordinator_store(tmp_path: Path) -> None:
    fleet = make_fleet(tmp_path / "home")
    out = tmp_path / "out"
    args = ["config", "--home", str(fleet.home.root), "-o", str(out), "--json"]
    result = CliRunner().invoke(broker_cli, [*args, "--plain-port", "18830"])
    assert result.exit_code == 0, result.output
    assert '"devices_with_grants": 0' in result.output
    assert not (fleet.home.root / "coordinator").exists()
    acl = (out / "acl").read_text()
    assert "user node.lyon-1\ntopic read fnmesh/v1/nodes/lyon-1/#" in acl
    assert "listener 18830 127.0.0.1" in (out / "mosquitto.conf").read_text()
    bad = CliRunner().invoke(broker_cli, [*args, "--root", "fnmesh/#"])
    assert bad.exit_code == 1 and "topic root" in bad.output


def test_broker_config_cli_writes_config_and_acl(mesh: AclBroker) -> None:
    conf = (mesh.dir / "mosquitto.conf").read_text()
    assert f"acl_file {mesh.dir / 'acl'}" in conf
    assert f"crlfile {mesh.fleet.home.crl}" in conf
    assert f"listener {mesh.port} 127.0.0.1" in conf
    acl = (mesh.dir / "acl").read_text()
    assert f"topic write {mesh.root}/fn/ex/digits/invoke" in acl
    for absent in ("operator.admin", "publisher.examples"):
        assert absent not in acl
    assert rules_for(Role.OPERATOR, "admin") == rules_for(Role.PUBLISHER, "examples") == []
