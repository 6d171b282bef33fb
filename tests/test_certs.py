"""The fleet CA, its certificates per role, trust decisions, TLS with real peers, the home folder.

Certificates are checked by the real ``openssl`` CLI, and used against a real
Mosquitto (``mosquitto_pub`` and paho-mqtt) and a real aiohttp server.
"""

from __future__ import annotations

import asyncio
import logging
import os
import queue
import shutil
import ssl
import stat
import subprocess
import threading
from collections.abc import AsyncIterator, Iterator
from contextlib import asynccontextmanager
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import aiohttp
import paho.mqtt.client as mqtt
import pytest
from aiohttp import web
from conftest import Broker, Fleet, make_fleet
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec

from fnmesh.certs import ca as ca_module
from fnmesh.certs import tls
from fnmesh.certs.ca import FleetCA
from fnmesh.certs.errors import HomeError, IdentityError, RevokedError, TrustError
from fnmesh.certs.home import Config, Home, open_home, resolve_home
from fnmesh.certs.identity import (
    NAMESPACE_URI,
    X25519_URI,
    CertInfo,
    Identity,
    Role,
    common_name,
    load_identity,
)
from fnmesh.certs.trust import CLIENT_AUTH, CODE_SIGNING, SERVER_AUTH, TrustStore, load_crl

OPENSSL = shutil.which("openssl")
needs_openssl = pytest.mark.skipif(OPENSSL is None, reason="the openssl CLI is not installed")
needs_mosquitto_pub = pytest.mark.skipif(
    shutil.which("mosquitto_pub") is None, reason="mosquitto_pub is not installed"
)
WAIT = 10.0

SERVER = "TLS Web Server Authentication"
CLIENT = "TLS Web Client Authentication"
CODE = "Code Signing"

#: DESIGN.md's identity table: extended key usages and whether the key usage includes Key Agreement.
EXPECTED: dict[Role, tuple[set[str], bool]] = {
    Role.COORDINATOR: ({SERVER, CLIENT}, True),
    Role.BROKER: ({SERVER, CLIENT}, False),
    Role.NODE: ({CLIENT, SERVER}, True),
    Role.ROUTER: ({CLIENT}, False),
    Role.PUBLISHER: ({CODE, CLIENT}, False),
    Role.OPERATOR: ({CLIENT}, False),
    Role.DEVICE: ({CLIENT}, False),
}


@pytest.fixture(scope="module")
def roles(tmp_path_factory: pytest.TempPathFactory) -> tuple[Fleet, dict[Role, Identity]]:
    """One identity per role, in a fleet only read by the tests that use it."""
    fleet = make_fleet(tmp_path_factory.mktemp("roles") / "home")
    ids = {
        Role.COORDINATOR: fleet.coordinator,
        Role.BROKER: fleet.broker,
        Role.NODE: fleet.nodes["lyon-1"],
        Role.ROUTER: fleet.ca.issue(Role.ROUTER, "r1"),
        Role.PUBLISHER: fleet.publisher,
        Role.OPERATOR: fleet.operator,
        Role.DEVICE: fleet.device("meter-1"),
    }
    return fleet, ids


def openssl(*args: str | Path) -> subprocess.CompletedProcess[str]:
    assert OPENSSL is not None
    return subprocess.run(
        [OPENSSL, *map(str, args)], capture_output=True, text=True, timeout=30, check=False
    )


def x509_text_field(text: str, header: str) -> str:
    """The line after ``header`` in ``openssl x509 -text`` output."""
    lines = text.splitlines()
    for i, line in enumerate(lines):
        if line.strip().startswith(header):
            return lines[i + 1].strip()
    raise AssertionError(f"{header!r} not in openssl output:\n{text}")


# -- certificates per role, as OpenSSL sees them ----------------------------------------


@needs_openssl
@pytest.mark.parametrize("role", list(Role))
def test_openssl_accepts_certificate_of_every_role(
    roles: tuple[Fleet, dict[Role, Identity]], role: Role
) -> None:
    fleet, ids = roles
    ident = ids[role]
    assert ident.info.role == role and ident.cn.startswith(f"{role.value}.")
    r = openssl("verify", "-CAfile", fleet.home.ca_cert, ident.cert_path)
    assert r.returncode == 0, r.stdout + r.stderr
    assert r.stdout.strip().endswith("OK")

    text = openssl("x509", "-in", ident.cert_path, "-text", "-noout")
    assert text.returncode == 0, text.stderr
    eku, key_agreement = EXPECTED[role]
    got_eku = {
        u.strip() for u in x509_text_field(text.stdout, "X509v3 Extended Key Usage").split(",")
    }
    assert got_eku == eku
    ku = x509_text_field(text.stdout, "X509v3 Key Usage")
    assert "Digital Signature" in ku
    assert ("Key Agreement" in ku) == key_agreement
    assert "Certificate Sign" not in ku
    assert f"CN = {ident.cn}" in text.stdout and f"OU = {role.value}" in text.stdout
    if role == Role.PUBLISHER:
        assert f"URI:{NAMESPACE_URI}examples" in text.stdout
    else:
        assert NAMESPACE_URI not in text.stdout
    assert (X25519_URI in text.stdout) == key_agreement
    if role in (Role.OPERATOR, Role.DEVICE, Role.ROUTER):
        assert CODE not in text.stdout and SERVER not in text.stdout
    if role in (Role.COORDINATOR, Role.BROKER):
        sans = x509_text_field(text.stdout, "X509v3 Subject Alternative Name")
        assert "DNS:localhost" in sans and "IP Address:127.0.0.1" in sans

    # OpenSSL's own purpose checks agree with the table.
    client = openssl(
        "verify", "-purpose", "sslclient", "-CAfile", fleet.home.ca_cert, ident.cert_path
    )
    assert client.returncode == 0, client.stdout + client.stderr
    server = openssl(
        "verify", "-purpose", "sslserver", "-CAfile", fleet.home.ca_cert, ident.cert_path
    )
    assert (server.returncode == 0) == (SERVER in eku), server.stdout + server.stderr


@needs_openssl
def test_openssl_refuses_certificate_of_foreign_ca(
    roles: tuple[Fleet, dict[Role, Identity]], tmp_path: Path
) -> None:
    fleet, _ids = roles
    foreign = make_fleet(tmp_path / "foreign")
    r = openssl("verify", "-CAfile", fleet.home.ca_cert, foreign.publisher.cert_path)
    assert r.returncode != 0


def test_certinfo_reads_role_namespace_and_encryption_key(
    roles: tuple[Fleet, dict[Role, Identity]],
) -> None:
    _fleet, ids = roles
    pub = ids[Role.PUBLISHER].info
    assert (pub.role, pub.namespace, pub.x25519) == (Role.PUBLISHER, "examples", None)
    node = ids[Role.NODE]
    assert node.info.name == "lyon-1" and node.info.x25519 is not None and node.enc_key is not None
    # The X25519 key in the certificate is the one in enc.key.
    raw = serialization.Encoding.Raw, serialization.PublicFormat.Raw
    assert node.info.x25519.public_bytes(*raw) == node.enc_key.public_key().public_bytes(*raw)
    assert ids[Role.DEVICE].enc_key is None and ids[Role.DEVICE].info.x25519 is None
    assert CertInfo.of(node.cert) == node.info


def test_private_keys_are_mode_0600(roles: tuple[Fleet, dict[Role, Identity]]) -> None:
    fleet, ids = roles
    keys = [fleet.home.ca_key]
    for ident in ids.values():
        keys.append(ident.key_path)
        enc = ident.key_path.parent / "enc.key"
        if ident.info.x25519 is not None:
            assert enc.exists()
            keys.append(enc)
    for k in keys:
        assert stat.S_IMODE(os.stat(k).st_mode) == 0o600, k
    # Certificates are public.
    assert stat.S_IMODE(os.stat(ids[Role.NODE].cert_path).st_mode) == 0o644


# -- issuing --------------------------------------------------------------------------


def test_common_name_accepts_bare_or_prefixed_name() -> None:
    assert common_name(Role.NODE, "x") == "node.x"
    assert common_name(Role.NODE, "node.x") == "node.x"
    assert common_name(Role.DEVICE, "meter-17") == "device.meter-17"
    with pytest.raises(IdentityError):
        common_name(Role.NODE, "device.x")
    for bad in ("", "X", "-x", "a b", "a/b", "x" * 64):
        with pytest.raises(IdentityError):
            common_name(Role.NODE, bad)


def test_second_live_certificate_for_a_cn_refused(fleet: Fleet) -> None:
    with pytest.raises(IdentityError, match="already has a live certificate"):
        fleet.ca.issue(Role.NODE, "lyon-1")
    with pytest.raises(IdentityError, match="already has a live certificate"):
        fleet.ca.issue(Role.NODE, "node.lyon-1")
    made = fleet.ca.issue(Role.NODE, "node.x")
    assert made.cn == "node.x"
    with pytest.raises(IdentityError):
        fleet.ca.issue(Role.NODE, "x")
    # The role is part of the CN, so the same bare name in another role is another CN.
    assert fleet.ca.issue(Role.DEVICE, "lyon-1").cn == "device.lyon-1"
    # Once revoked, the name can be issued again.
    fleet.ca.revoke("node.x")
    assert fleet.ca.issue(Role.NODE, "x").info.serial != made.info.serial


def test_every_issued_cn_is_unique(roles: tuple[Fleet, dict[Role, Identity]]) -> None:
    fleet, _ids = roles
    live = [r.cn for r in fleet.ca.issued() if not r.revoked_at]
    assert len(live) == len(set(live))


def test_namespace_only_for_publishers(fleet: Fleet) -> None:
    with pytest.raises(IdentityError, match="needs --namespace"):
        fleet.ca.issue(Role.PUBLISHER, "nons")
    with pytest.raises(IdentityError, match="takes no namespace"):
        fleet.ca.issue(Role.NODE, "n2", namespace="examples")
    with pytest.raises(IdentityError, match="namespace"):
        fleet.ca.issue(Role.PUBLISHER, "badns", namespace="Bad NS")
    with pytest.raises(IdentityError, match="days"):
        fleet.ca.issue(Role.DEVICE, "d0", days=0)


def test_second_ca_in_same_home_refused(fleet: Fleet) -> None:
    with pytest.raises(IdentityError, match="already has a fleet CA"):
        FleetCA.create(fleet.home)


def test_loading_ca_without_its_key_refused(fleet: Fleet, tmp_path: Path) -> None:
    node_home = Home(tmp_path / "node-home")
    node_home.ca_dir.mkdir(parents=True)
    shutil.copy(fleet.home.ca_cert, node_home.ca_cert)
    with pytest.raises(IdentityError, match="no fleet CA key"):
        FleetCA.load(node_home)


# -- trust decisions --------------------------------------------------------------------


def test_trust_store_accepts_fleet_certificates(fleet: Fleet) -> None:
    trust = fleet.trust
    assert (
        trust.verify(fleet.publisher.cert, role=Role.PUBLISHER, purpose=CODE_SIGNING).namespace
        == "examples"
    )
    assert trust.verify(fleet.coordinator.cert, purpose=SERVER_AUTH).role == Role.COORDINATOR
    assert trust.verify(fleet.device("d1").cert, purpose=CLIENT_AUTH).cn == "device.d1"


def test_revoked_certificate_refused(fleet: Fleet) -> None:
    node = fleet.nodes["lyon-1"]
    assert fleet.trust.verify(node.cert).cn == node.cn
    done = fleet.ca.revoke("node.lyon-1")
    assert [r.cn for r in done] == ["node.lyon-1"]
    with pytest.raises(RevokedError, match="revoked"):
        fleet.trust.verify(node.cert)
    # By serial as well.
    dev = fleet.device("d2")
    fleet.ca.revoke(hex(dev.info.serial))
    with pytest.raises(RevokedError):
        fleet.trust.verify(dev.cert)
    assert fleet.trust.verify(fleet.operator.cert)


@needs_openssl
def test_openssl_refuses_revoked_certificate(fleet: Fleet) -> None:
    node = fleet.nodes["lyon-1"]
    other = fleet.node("paris-1")
    crl_args = ("verify", "-crl_check", "-CRLfile", fleet.home.crl, "-CAfile", fleet.home.ca_cert)
    before = openssl(*crl_args, node.cert_path)
    assert before.returncode == 0, before.stdout + before.stderr
    fleet.ca.revoke("node.lyon-1")
    after = openssl(*crl_args, node.cert_path)
    assert after.returncode != 0
    assert "revoked" in (after.stdout + after.stderr)
    ok = openssl(*crl_args, other.cert_path)
    assert ok.returncode == 0, ok.stdout + ok.stderr


def test_revoke_ambiguous_or_unknown_name_refused(fleet: Fleet) -> None:
    fleet.device("lyon-1")  # now node.lyon-1 and device.lyon-1 are both live
    with pytest.raises(IdentityError, match="several identities"):
        fleet.ca.revoke("lyon-1")
    with pytest.raises(IdentityError, match="no live certificate"):
        fleet.ca.revoke("nobody")
    fleet.ca.revoke("node.lyon-1")
    with pytest.raises(IdentityError, match="no live certificate"):
        fleet.ca.revoke("node.lyon-1")


def test_certificate_of_foreign_ca_refused(fleet: Fleet, tmp_path: Path) -> None:
    foreign = make_fleet(tmp_path / "foreign")
    # Same subject names as ours, so only the signature tells them apart.
    assert foreign.ca.cert.subject == fleet.ca.cert.subject
    with pytest.raises(TrustError, match="not signed by the fleet CA"):
        fleet.trust.verify(foreign.publisher.cert)
    renamed = FleetCA.create(Home(tmp_path / "renamed"), fleet="acme")
    stranger = renamed.issue(Role.DEVICE, "d")
    with pytest.raises(TrustError, match="not the fleet CA"):
        fleet.trust.verify(stranger.cert)


def test_expired_certificate_refused(fleet: Fleet) -> None:
    old = fleet.ca.issue(
        Role.DEVICE, "old", days=1, not_before=datetime.now(UTC) - timedelta(days=3)
    )
    with pytest.raises(TrustError, match="expired"):
        fleet.trust.verify(old.cert)
    assert fleet.trust.verify(old.cert, at=datetime.now(UTC) - timedelta(days=2, hours=12))


def test_not_yet_valid_certificate_refused(fleet: Fleet) -> None:
    early = fleet.ca.issue(Role.DEVICE, "early", not_before=datetime.now(UTC) + timedelta(days=3))
    with pytest.raises(TrustError, match="not valid before"):
        fleet.trust.verify(early.cert)


def test_certificate_of_wrong_role_or_purpose_refused(fleet: Fleet) -> None:
    trust = fleet.trust
    with pytest.raises(TrustError, match="role node, not publisher"):
        trust.verify(fleet.nodes["lyon-1"].cert, role=Role.PUBLISHER)
    with pytest.raises(TrustError, match="not allowed"):
        trust.verify(fleet.device("d").cert, purpose=CODE_SIGNING)
    with pytest.raises(TrustError, match="not allowed"):
        trust.verify(fleet.publisher.cert, purpose=SERVER_AUTH)


def test_certificate_signed_by_ca_but_without_fnmesh_role_refused(fleet: Fleet) -> None:
    key = ec.generate_private_key(ec.SECP256R1())
    now = datetime.now(UTC)
    cert = (
        x509.CertificateBuilder()
        .subject_name(x509.Name([x509.NameAttribute(x509.NameOID.COMMON_NAME, "node.sneaky")]))
        .issuer_name(fleet.ca.cert.subject)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - timedelta(minutes=1))
        .not_valid_after(now + timedelta(days=1))
        .sign(fleet.ca.key, hashes.SHA256())
    )
    with pytest.raises(TrustError, match="role"):
        fleet.trust.verify(cert)


def test_changed_outer_signature_algorithm_refused_after_a_good_check(fleet: Fleet) -> None:
    """The outer AlgorithmIdentifier is not signed: a store that checked the
    original must not accept a changed copy from its cache."""
    trust = fleet.trust
    der = fleet.publisher.cert.public_bytes(serialization.Encoding.DER)
    assert trust.verify(fleet.publisher.cert)
    ecdsa_sha256 = bytes.fromhex("06082a8648ce3d040302")
    at = der.rindex(ecdsa_sha256)  # the outer one comes after the tbs
    changed = bytearray(der)
    changed[at + 4] ^= 0x01  # 1.2.840... -> another OID
    forged = x509.load_der_x509_certificate(bytes(changed))
    assert forged.tbs_certificate_bytes == fleet.publisher.cert.tbs_certificate_bytes
    assert forged.signature == fleet.publisher.cert.signature
    with pytest.raises(TrustError):
        trust.verify(forged)


def test_crl_of_another_ca_or_older_crl_refused(
    fleet: Fleet, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    foreign = make_fleet(tmp_path / "foreign")
    with pytest.raises(TrustError, match="not signed by the fleet CA"):
        load_crl(foreign.home.crl.read_bytes(), fleet.ca.cert)
    with pytest.raises(TrustError, match="not signed by the fleet CA"):
        fleet.trust.with_crl(foreign.ca.build_crl())
    with monkeypatch.context() as mp:
        an_hour_ago = datetime.now(UTC) - timedelta(hours=1)
        mp.setattr(ca_module, "_now", lambda: an_hour_ago)
        old = fleet.ca.build_crl()
    fleet.ca.revoke("node.lyon-1")
    newer = TrustStore.from_home(fleet.home)
    assert newer.crl is not None and newer.crl.last_update_utc > old.last_update_utc
    with pytest.raises(TrustError, match="older"):
        newer.with_crl(old)  # replaying an old list cannot un-revoke anyone
    # A store that learns the new list refuses the revoked node.
    stale = TrustStore.build(fleet.ca.cert, old)
    assert stale.verify(fleet.nodes["lyon-1"].cert)
    assert newer.crl is not None
    with pytest.raises(RevokedError):
        stale.with_crl(newer.crl).verify(fleet.nodes["lyon-1"].cert)
    # DER works as well as PEM.
    der = newer.crl.public_bytes(serialization.Encoding.DER)
    assert load_crl(der, fleet.ca.cert).last_update_utc == newer.crl.last_update_utc
    with pytest.raises(TrustError, match="does not parse"):
        load_crl(b"garbage", fleet.ca.cert)


def test_damaged_identity_files_refused(fleet: Fleet) -> None:
    d = fleet.home.identity_dir("device.broken")
    shutil.copytree(fleet.home.identity_dir(fleet.operator.cn), d)
    (d / "key.pem").write_text("not a key")
    with pytest.raises(IdentityError, match="not a PEM private key"):
        load_identity(d)
    (d / "cert.pem").unlink()
    with pytest.raises(IdentityError, match="no certificate"):
        load_identity(d)


# -- TLS with real peers: Mosquitto ------------------------------------------------------


def pub_args(broker: Broker, ident_dir: Path | None, *extra: str) -> list[str]:
    args = ["mosquitto_pub", "-h", "127.0.0.1", "-p", str(broker.tls_port), "-q", "1"]
    args += ["-V", "mqttv5", "-t", "fnmesh-test/pub", "-m", "hello", *extra]
    if ident_dir is not None:
        args += ["--cafile", str(ident_dir / "ca.pem")]
        args += ["--cert", str(ident_dir / "cert.pem"), "--key", str(ident_dir / "key.pem")]
    return args


def run_pub(args: list[str]) -> subprocess.CompletedProcess[str]:
    return subprocess.run(args, capture_output=True, text=True, timeout=30, check=False)


class MqttClient:
    """A paho MQTT v5 client on the fleet's mutual TLS, with events instead of sleeps."""

    def __init__(self, fleet: Fleet, ident: Identity, broker: Broker):
        self.client = mqtt.Client(
            mqtt.CallbackAPIVersion.VERSION2, client_id=f"test-{ident.cn}", protocol=mqtt.MQTTv5
        )
        self.client.tls_set_context(tls.client_context(ident, fleet.home.ca_cert))
        self.connected = threading.Event()
        self.subscribed = threading.Event()
        self.messages: queue.Queue[mqtt.MQTTMessage] = queue.Queue()
        self.reason: Any = None
        self.client.on_connect = self._on_connect
        self.client.on_subscribe = lambda *_a: self.subscribed.set()
        self.client.on_message = lambda _c, _u, msg: self.messages.put(msg)
        self.broker = broker

    def _on_connect(self, _c: Any, _u: Any, _flags: Any, reason: Any, _props: Any) -> None:
        self.reason = reason
        self.connected.set()

    def __enter__(self) -> MqttClient:
        self.client.connect("127.0.0.1", self.broker.tls_port, keepalive=30)
        self.client.loop_start()
        return self

    def __exit__(self, *exc: object) -> None:
        self.client.disconnect()
        self.client.loop_stop()

    def subscribe(self, topic: str) -> None:
        self.client.subscribe(topic, qos=1)
        assert self.subscribed.wait(WAIT), "no SUBACK"


@pytest.fixture
def device_sub(fleet: Fleet, broker: Broker) -> Iterator[MqttClient]:
    with MqttClient(fleet, fleet.device("listener"), broker) as c:
        assert c.connected.wait(WAIT) and not c.reason.is_failure, c.reason
        c.subscribe("fnmesh-test/#")
        yield c


@needs_mosquitto_pub
def test_mosquitto_accepts_device_certificate_from_mosquitto_pub(
    fleet: Fleet, broker: Broker, device_sub: MqttClient
) -> None:
    dev = fleet.device("meter-17")
    r = run_pub(pub_args(broker, fleet.home.identity_dir(dev.cn)))
    assert r.returncode == 0, r.stderr
    msg = device_sub.messages.get(timeout=WAIT)
    assert (msg.topic, msg.payload) == ("fnmesh-test/pub", b"hello")


def test_mosquitto_accepts_paho_with_fleet_client_context(fleet: Fleet, broker: Broker) -> None:
    with MqttClient(fleet, fleet.device("meter-18"), broker) as c:
        assert c.connected.wait(WAIT), "no CONNACK"
        assert not c.reason.is_failure, c.reason
        c.subscribe("fnmesh-test/echo")
        info = c.client.publish("fnmesh-test/echo", b"ping", qos=1)
        info.wait_for_publish(WAIT)
        assert info.is_published()
        msg = c.messages.get(timeout=WAIT)
        assert (msg.topic, msg.payload) == ("fnmesh-test/echo", b"ping")


@needs_mosquitto_pub
def test_plaintext_on_tls_port_refused(fleet: Fleet, broker: Broker) -> None:
    r = run_pub(pub_args(broker, None))
    assert r.returncode != 0


@needs_mosquitto_pub
def test_client_without_certificate_refused_by_broker(fleet: Fleet, broker: Broker) -> None:
    d = fleet.home.identity_dir(fleet.device("meter-19").cn)
    args = [
        "mosquitto_pub",
        "-h",
        "127.0.0.1",
        "-p",
        str(broker.tls_port),
        "--cafile",
        str(d / "ca.pem"),
    ]
    r = run_pub([*args, "-t", "fnmesh-test/pub", "-m", "x", "-q", "1"])
    assert r.returncode != 0


@needs_mosquitto_pub
def test_foreign_ca_client_certificate_refused_by_broker(
    fleet: Fleet, broker: Broker, tmp_path: Path, device_sub: MqttClient
) -> None:
    foreign = make_fleet(tmp_path / "foreign")
    fdev = foreign.device("meter-17")
    d = foreign.home.identity_dir(fdev.cn)
    # Trust our broker (our CA), present the foreign device's certificate.
    args = pub_args(broker, d)
    args[args.index("--cafile") + 1] = str(fleet.home.ca_cert)
    r = run_pub(args)
    assert r.returncode != 0
    # Control: the same command with one of our devices goes through.
    ours = run_pub(pub_args(broker, fleet.home.identity_dir(fleet.device("meter-17").cn)))
    assert ours.returncode == 0, ours.stderr
    assert device_sub.messages.get(timeout=WAIT).payload == b"hello"
    assert device_sub.messages.empty()


@needs_mosquitto_pub
def test_revoked_client_certificate_refused_by_broker(fleet: Fleet, broker: Broker) -> None:
    dev = fleet.device("meter-20")
    args = pub_args(broker, fleet.home.identity_dir(dev.cn))
    assert run_pub(args).returncode == 0
    fleet.ca.revoke(dev.cn)
    broker.restart()  # Mosquitto reads the CRL file at start
    assert run_pub(args).returncode != 0
    ok = run_pub(pub_args(broker, fleet.home.identity_dir(fleet.device("meter-21").cn)))
    assert ok.returncode == 0, ok.stderr


# -- TLS with real peers: aiohttp --------------------------------------------------------


@asynccontextmanager
async def https_server(ctx: ssl.SSLContext) -> AsyncIterator[str]:
    """An aiohttp server on 127.0.0.1 that answers with the client certificate's CN."""

    async def whoami(request: web.Request) -> web.Response:
        peer = request.transport.get_extra_info("peercert") if request.transport else None
        cn = next(v for rdn in peer["subject"] for k, v in rdn if k == "commonName") if peer else ""
        return web.Response(text=cn)

    app = web.Application()
    app.router.add_get("/whoami", whoami)
    runner = web.AppRunner(app)
    await runner.setup()
    site = web.TCPSite(runner, "127.0.0.1", 0, ssl_context=ctx)
    await site.start()
    port = runner.addresses[0][1]
    try:
        yield f"https://127.0.0.1:{port}/whoami"
    finally:
        await runner.cleanup()


async def fetch(url: str, ctx: ssl.SSLContext) -> str:
    timeout = aiohttp.ClientTimeout(total=WAIT)
    async with aiohttp.ClientSession(timeout=timeout) as s, s.get(url, ssl=ctx) as r:
        assert r.status == 200
        return await r.text()


async def refused(
    url: str, ctx: ssl.SSLContext, caplog: pytest.LogCaptureFixture, why: str
) -> None:
    """The client sees a connection/SSL error, and the server's handshake failed for ``why``."""
    # In debug mode asyncio logs why a server-side TLS handshake failed.
    asyncio.get_running_loop().set_debug(True)
    with caplog.at_level(logging.DEBUG, logger="asyncio"):
        with pytest.raises((aiohttp.ClientConnectionError, ssl.SSLError, ConnectionError)) as e:
            await fetch(url, ctx)
        assert not isinstance(e.value, TimeoutError), "timed out instead of being refused"
        reasons = [
            str(r.exc_info[1])
            for r in caplog.records
            if r.exc_info and isinstance(r.exc_info[1], ssl.SSLError)
        ]
    assert any(why in r for r in reasons), reasons


def server_ctx(fleet: Fleet) -> ssl.SSLContext:
    return tls.server_context(fleet.coordinator, fleet.home.ca_cert, fleet.home.crl)


async def test_aiohttp_server_accepts_fleet_client_certificate(fleet: Fleet) -> None:
    dev = fleet.device("meter-1")
    async with https_server(server_ctx(fleet)) as url:
        assert await fetch(url, tls.client_context(dev, fleet.home.ca_cert)) == dev.cn
        assert (
            await fetch(url, tls.home_client_context(fleet.home, fleet.operator))
            == "operator.admin"
        )


async def test_aiohttp_server_refuses_client_without_certificate(
    fleet: Fleet, caplog: pytest.LogCaptureFixture
) -> None:
    async with https_server(server_ctx(fleet)) as url:
        await refused(
            url,
            tls.client_context(None, fleet.home.ca_cert),
            caplog,
            "PEER_DID_NOT_RETURN_A_CERTIFICATE",
        )


async def test_aiohttp_server_refuses_foreign_ca_client(
    fleet: Fleet, tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    foreign = make_fleet(tmp_path / "foreign")
    dev = foreign.device("meter-1")
    async with https_server(server_ctx(fleet)) as url:
        await refused(
            url,
            tls.client_context(dev, fleet.home.ca_cert),
            caplog,
            "unable to get local issuer certificate",
        )


async def test_aiohttp_client_refuses_server_of_foreign_ca(fleet: Fleet, tmp_path: Path) -> None:
    foreign = make_fleet(tmp_path / "foreign")
    ctx = tls.server_context(foreign.coordinator, foreign.home.ca_cert)
    async with https_server(ctx) as url:
        with pytest.raises(aiohttp.ClientSSLError) as e:
            await fetch(url, tls.client_context(foreign.device("m"), fleet.home.ca_cert))
        assert "CERTIFICATE_VERIFY_FAILED" in str(e.value)


async def test_aiohttp_server_refuses_revoked_client(
    fleet: Fleet, caplog: pytest.LogCaptureFixture
) -> None:
    dev = fleet.device("meter-2")
    fleet.ca.revoke(dev.cn)
    async with https_server(server_ctx(fleet)) as url:
        await refused(
            url, tls.client_context(dev, fleet.home.ca_cert), caplog, "certificate revoked"
        )
        other = fleet.device("meter-3")
        assert await fetch(url, tls.client_context(other, fleet.home.ca_cert)) == other.cn


# -- the home folder ---------------------------------------------------------------------


def test_home_default_is_env_then_dot_fnmesh(
    monkeypatch: pytest.MonkeyPatch, tmp_path: Path
) -> None:
    monkeypatch.setenv("HOME", str(tmp_path / "user"))
    monkeypatch.delenv("FNMESH_HOME", raising=False)
    assert resolve_home() == (tmp_path / "user" / ".fnmesh").resolve()
    monkeypatch.setenv("FNMESH_HOME", str(tmp_path / "env-home"))
    assert resolve_home() == (tmp_path / "env-home").resolve()
    assert open_home().root == (tmp_path / "env-home").resolve()
    assert resolve_home(tmp_path / "flag") == (tmp_path / "flag").resolve()
    monkeypatch.setenv("FNMESH_HOME", "~/elsewhere")
    assert resolve_home() == (tmp_path / "user" / "elsewhere").resolve()


def test_config_round_trip(tmp_path: Path) -> None:
    home = Home(tmp_path)
    assert home.load_config() == Config()  # missing file: defaults
    cfg = Config(
        coordinator="https://10.0.0.1:9443",
        broker="mqtts://10.0.0.1:8884",
        identity="device.meter-1",
        topic_root="test/root",
    )
    home.save_config(cfg)
    assert home.load_config() == cfg
    assert 'topic_root = "test/root"' in home.config_path.read_text()


def test_init_writes_default_config(fleet: Fleet) -> None:
    assert fleet.home.load_config() == Config()
    assert Config().topic_root == "fnmesh/v1"


def test_unknown_setting_refused(tmp_path: Path) -> None:
    home = Home(tmp_path)
    home.config_path.write_text('broker = "mqtts://x:8883"\nbrokr = "typo"\n')
    with pytest.raises(HomeError, match="brokr"):
        home.load_config()


@pytest.mark.parametrize(
    ("text", "match"),
    [("broker = 8883\n", "'broker' must be a string"), ("broker = \n", "cannot read")],
)
def test_malformed_config_refused(tmp_path: Path, text: str, match: str) -> None:
    home = Home(tmp_path)
    home.config_path.write_text(text)
    with pytest.raises(HomeError, match=match):
        home.load_config()


def test_config_override_replaces_only_given_values() -> None:
    base = Config(broker="mqtts://a:1")
    changed = base.override(broker="mqtts://b:2", coordinator=None, identity="device.x")
    assert changed.broker == "mqtts://b:2" and changed.identity == "device.x"
    assert changed.coordinator == base.coordinator and changed.topic_root == base.topic_root
    assert base.broker == "mqtts://a:1"  # frozen: the original is untouched
    assert base.override() == base
    with pytest.raises(TypeError):
        base.override(nonsense="x")


def test_revoke_by_hex_serial_as_listed(fleet) -> None:  # type: ignore[no-untyped-def]
    from fnmesh.certs.errors import RevokedError
    from fnmesh.certs.identity import Role
    from fnmesh.certs.trust import TrustStore

    ident = fleet.ca.issue(Role.DEVICE, "meter-17")
    listed = next(r for r in fleet.ca.issued() if r.cn == "device.meter-17")
    fleet.ca.revoke(f"{listed.serial:x}")
    with pytest.raises(RevokedError):
        TrustStore.from_home(fleet.home).verify(ident.cert)
