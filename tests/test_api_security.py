"""The coordinator's API, the broker and the audit log against real attacks, in a whole mesh.

One mesh per module (the code of ``fnmesh up``: Mosquitto with the role ACL, the coordinator
that regenerates the ACL and reloads the broker on grants and revocations, a router, two
agents, the examples deployed), plus a node of the tests' own (``node.victim``) that serves a
function nobody else holds, so revoking it cuts exactly one node off. Every test issues the
identities it acts as, so no test depends on what another did.

The revocation test prints the measured time from the revoke call until the node is cut off.
"""

from __future__ import annotations

import asyncio
import contextlib
import itertools
import json
import sqlite3
import subprocess
import time
import uuid
from collections import Counter
from collections.abc import Iterator
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import requests
import schemathesis
from conftest import SCALE
from hypothesis import HealthCheck, settings
from schemathesis.checks import (
    content_type_conformance,
    negative_data_rejection,
    not_a_server_error,
    response_headers_conformance,
    response_schema_conformance,
    status_code_conformance,
)
from security_support import (
    ACCEPTED,
    NOT_AUTHORIZED,
    WAIT,
    Answer,
    Caller,
    Msg,
    Peer,
    Refused,
    broker_refuses,
    cli,
    cli_ok,
    poll_until,
    spawn_agent,
    stop_process,
)

from fnmesh.certs.ca import FleetCA, init_home
from fnmesh.certs.home import Home
from fnmesh.certs.identity import Identity, Role, load_identity
from fnmesh.coordinator.api.openapi import OPENAPI
from fnmesh.coordinator.client import Client
from fnmesh.coordinator.up import Mesh, deploy_examples, start
from fnmesh.functions import bundle as fnb
from fnmesh.functions.examples.models import build_example
from fnmesh.functions.messages import Encoding, Response, decode_reply, encode_request

LOOPBACK = ["localhost", "127.0.0.1", "::1"]
VICTIM = "victim"
#: The victim's heartbeat period (s): short, so "its heartbeats stopped" is quick to see.
VICTIM_HEARTBEAT = 0.5
#: The function only the victim serves.
PROBE_FN = "examples/probe"
#: How long the revoked node must stay silent to count as cut off (s): several heartbeats.
SILENCE = max(1.5, 3 * VICTIM_HEARTBEAT)
#: What the revocation must achieve within (s).
CUT_OFF_LIMIT = 5.0


# -- the mesh --------------------------------------------------------------------------------


@dataclass
class SecMesh:
    mesh: Mesh
    home: Home
    ca: FleetCA
    victim: subprocess.Popen[bytes]

    @property
    def url(self) -> str:
        return self.mesh.api_url

    @property
    def broker_port(self) -> int:
        return int(self.mesh.broker_url.rsplit(":", 1)[1])

    @property
    def root(self) -> str:
        return self.home.load_config().topic_root

    def t(self, suffix: str) -> str:
        return f"{self.root}/{suffix}"

    def issue(self, role: Role, name: str, **kw: Any) -> Identity:
        return self.ca.issue(role, name, **kw)

    def caller(self, ident: Identity | str) -> Caller:
        return Caller.of(self.url, self.home, ident)

    @property
    def operator(self) -> Caller:
        return self.caller("operator.admin")

    def peer(self, ident: Identity | str, tag: str = "") -> Peer:
        return Peer(self.broker_port, self.home, ident, tag)

    def bundle(
        self,
        function: str,
        version: str = "1.0.0",
        *,
        publisher: Identity | str = "publisher.examples",
        example: str = "digits",
    ) -> bytes:
        """``example``'s model as ``function``@``version``, signed by ``publisher``, keyed for the
        coordinator."""
        if isinstance(publisher, str):
            publisher = load_identity(self.home.identity_dir(publisher))
        coord = load_identity(self.home.identity_dir("coordinator.main"))
        assert coord.info.x25519 is not None
        return fnb.build(
            build_example(example).onnx_bytes,
            name=function,
            version=version,
            publisher=publisher,
            recipients={coord.cn: coord.info.x25519},
            max_batch=64,
        ).to_bytes()

    def rest(self, method: str, path: str, **kw: Any) -> Any:
        """A call as the operator from synchronous code (fixtures, polls)."""
        return Client(self.home, self.home.load_config()).call(method, path, **kw)

    def node_ready(self, node: str) -> bool:
        return any(
            n["name"] == node and n["state"] == "ready"
            for n in self.rest("GET", "/v1/nodes", timeout=5)
        )

    def serving(self, node: str) -> dict[str, str]:
        for n in self.rest("GET", "/v1/nodes", timeout=5):
            if n["name"] == node and n["state"] == "ready":
                return dict(n["functions"])
        return {}


@pytest.fixture(scope="module")
def sec(tmp_path_factory: pytest.TempPathFactory) -> Iterator[SecMesh]:
    home = Home(tmp_path_factory.mktemp("security") / "home")
    ca, _ = init_home(home)
    # Issued before the broker starts, so its first ACL already lists the node.
    ca.issue(Role.NODE, VICTIM, sans=LOOPBACK)
    mesh = start(home, agents=2, progress=lambda _m: None)
    victim = None
    try:
        deploy_examples(mesh, progress=lambda _m: None)
        # Joins once every example has its two replicas, so it holds none of them.
        victim = spawn_agent(
            home, VICTIM, f"region=eu-west,site={VICTIM},tier={VICTIM}", VICTIM_HEARTBEAT
        )
        yield SecMesh(mesh, home, ca, victim)
    finally:
        if victim is not None:
            stop_process(victim)
        mesh.stop()


def digits_request(n: int = 2, seed: int = 3) -> tuple[dict[str, np.ndarray], np.ndarray]:
    ex = build_example("digits")
    inputs = ex.sample_inputs(n, seed=seed)
    return inputs, ex.reference(inputs)["label"]


def assert_refused(outcome: Answer | Refused, what: str) -> str:
    """A caller the fleet does not trust: the handshake fails, or the API answers 401."""
    if isinstance(outcome, Refused):
        return f"{what}: TLS refused ({outcome})"
    assert outcome.status == 401, f"{what}: expected 401 or a failed handshake, got {outcome}"
    return f"{what}: 401 {outcome.reason}"


async def outcome_of(caller: Caller, method: str, path: str) -> Answer | Refused:
    try:
        return await caller.call(method, path)
    except Refused as e:
        return e


async def assert_refused_where_trusted_succeeds(
    sec: SecMesh, caller: Caller, path: str, what: str
) -> None:
    """``caller`` is refused, and the fleet's own operator, on the same path, is not (so the
    refusal is about the certificate, not a coordinator that is down)."""
    print("\n" + assert_refused(await outcome_of(caller, "GET", path), what))
    control = await sec.operator.call("GET", path)
    assert control.status == 200, control


# -- 1. roles on the API -----------------------------------------------------------------------


async def test_publisher_outside_namespace(sec: SecMesh) -> None:
    pusher = sec.issue(Role.PUBLISHER, "ns-pusher", namespace="examples")
    other = sec.issue(Role.PUBLISHER, "ns-other", namespace="other")
    me = sec.caller(pusher)
    foreign = sec.bundle("other/stolen", publisher=other)
    a = await me.call("POST", "/v1/bundles", data=foreign)
    assert a.status == 403, a
    assert "namespace 'examples'" in a.reason and "'other'" in a.reason, a
    own = await me.call("POST", "/v1/bundles", data=sec.bundle("examples/ns-own", publisher=pusher))
    assert own.status == 201, own
    assert own.json["function"] == "examples/ns-own"
    listed = {f["function"] for f in (await me.call("GET", "/v1/functions")).json}
    assert "examples/ns-own" in listed and "other/stolen" not in listed


async def test_publisher_cannot_deploy_or_change_grants(sec: SecMesh) -> None:
    pub = sec.caller(sec.issue(Role.PUBLISHER, "no-ops", namespace="examples"))
    attempts = [
        ("POST", "/v1/deployments", {"function": "examples/digits", "version": "1.0.0"}),
        ("DELETE", "/v1/deployments/examples/digits", None),
        ("POST", "/v1/grants", {"subject": "device.demo", "function": "examples/mlp"}),
        ("DELETE", "/v1/grants", {"subject": "device.demo", "function": "examples/digits"}),
        ("GET", "/v1/grants", None),
        ("POST", "/v1/groups/meters/members", {"device": "device.demo"}),
        ("POST", "/v1/revocations", {"name_or_serial": "device.demo"}),
        ("GET", "/v1/audit", None),
    ]
    for method, path, body in attempts:
        a = await pub.call(method, path, json_body=body)
        assert a.status == 403, f"{method} {path}: {a}"
        assert "has role publisher" in a.reason and "operator" in a.reason, a
    # Nothing changed: digits is still deployed, demo still granted.
    deployed = {d["function"] for d in (await sec.operator.call("GET", "/v1/deployments")).json}
    assert "examples/digits" in deployed
    grants = (await sec.operator.call("GET", "/v1/grants")).json["grants"]
    assert {"subject": "device.demo", "function": "examples/digits"} in grants


async def test_operator_deploys_and_grants(sec: SecMesh) -> None:
    op = sec.caller(sec.issue(Role.OPERATOR, "deployer"))
    pushed = await op.call("POST", "/v1/bundles", data=sec.bundle("examples/op-fn"))
    assert pushed.status == 201, pushed
    d = await op.call(
        "POST",
        "/v1/deployments",
        json_body={
            "function": "examples/op-fn",
            "version": "1.0.0",
            "min": 1,
            "max": 1,
            "where": {"site": "lyon-1"},
        },
    )
    assert d.status == 201, d
    assert d.json["function"] == "examples/op-fn" and d.json["version"] == "1.0.0"
    g = await op.call(
        "POST", "/v1/grants", json_body={"subject": "device.op-dev", "function": "examples/op-fn"}
    )
    assert g.status == 201 and g.json["added"] is True, g
    m = await op.call("POST", "/v1/groups/op-group/members", json_body={"device": "op-dev"})
    assert m.status == 201, m
    listed = (await op.call("GET", "/v1/grants")).json
    assert {"subject": "device.op-dev", "function": "examples/op-fn"} in listed["grants"]
    assert {"group": "op-group", "device": "device.op-dev"} in listed["members"]
    ungrant = await op.call(
        "DELETE", "/v1/grants", json_body={"subject": "op-dev", "function": "examples/op-fn"}
    )
    assert ungrant.status == 200, ungrant
    undeploy = await op.call("DELETE", "/v1/deployments/examples/op-fn")
    assert undeploy.status == 200, undeploy


async def test_device_cannot_administer_or_invoke_ungranted_over_http(sec: SecMesh) -> None:
    dev = sec.issue(Role.DEVICE, "nosy")
    me = sec.caller(dev)
    attempts: list[tuple[str, str, dict[str, Any] | None, bytes | None]] = [
        ("POST", "/v1/bundles", None, sec.bundle("examples/nosy")),
        ("POST", "/v1/deployments", {"function": "examples/digits", "version": "1.0.0"}, None),
        ("POST", "/v1/grants", {"subject": "device.nosy", "function": "examples/mlp"}, None),
        ("GET", "/v1/audit", None, None),
        ("GET", "/v1/audit/verify", None, None),
        ("POST", "/v1/revocations", {"name_or_serial": "device.demo"}, None),
    ]
    for method, path, body, data in attempts:
        a = await me.call(method, path, json_body=body, data=data)
        assert a.status == 403, f"{method} {path}: {a}"
        assert "has role device" in a.reason, a
    inputs, want = digits_request()
    body = encode_request(inputs, Encoding.JSON, id="nosy-1")
    headers = {"Content-Type": "application/json"}
    path = "/v1/functions/examples/digits/invoke"
    # Without a grant the HTTP door is shut like the broker's.
    a = await me.call("POST", path, data=body, headers=headers)
    assert a.status == 403, a
    assert "examples/digits" in a.reason, a
    g = await sec.operator.call(
        "POST", "/v1/grants", json_body={"subject": "device.nosy", "function": "examples/digits"}
    )
    assert g.status == 201, g
    a = await me.call("POST", path, data=body, headers=headers)
    assert a.status == 200, a
    reply = decode_reply(a.body, "application/json")
    assert isinstance(reply, Response), reply
    assert reply.id == "nosy-1"
    np.testing.assert_array_equal(reply.outputs["label"], want)
    # A grant for digits is no grant for mlp.
    other = await me.call("POST", "/v1/functions/examples/mlp/invoke", data=body, headers=headers)
    assert other.status == 403, other


async def test_control_character_in_function_name_cannot_drop_coordinator_link(
    sec: SecMesh,
) -> None:
    """A function id becomes an MQTT topic; Mosquitto disconnects a client that publishes a topic
    with a control character, so the API must refuse such an id before it reaches the broker."""
    dev = sec.issue(Role.DEVICE, "ctl-char")
    me = sec.caller(dev)
    inputs, want = digits_request()
    body = encode_request(inputs, Encoding.JSON)
    headers = {"Content-Type": "application/json"}
    for path in ("/v1/functions/examples/digits%C2%84/invoke", "/v1/functions/0/%C2%84/invoke"):
        t = time.monotonic()
        a = await me.call("POST", path, data=body, headers=headers)
        assert a.status == 404 and "must be 'ns/name'" in a.reason, a
        assert time.monotonic() - t < WAIT / 2
    health = await me.call("GET", "/v1/health")
    assert health.json == {"ok": True, "broker": True}, health
    # The coordinator's link still carries requests.
    await sec.operator.call(
        "POST", "/v1/grants", json_body={"subject": dev.cn, "function": "examples/digits"}
    )
    a = await me.call("POST", "/v1/functions/examples/digits/invoke", data=body, headers=headers)
    assert a.status == 200, a
    reply = decode_reply(a.body, "application/json")
    assert isinstance(reply, Response)
    np.testing.assert_array_equal(reply.outputs["label"], want)


#: Bodies no handler may answer with a 500 (or act on).
MALFORMED_BODIES = {
    "truncated": b'{"subject": "device.demo", ',
    "not utf-8": b"\xff\xfe{}",
    "an array": b"[]",
    "null": b"null",
    "nested too deeply": b"[" * 100_000 + b"]" * 100_000,
    "wrong types": b'{"subject": 1, "function": [], "device": {}, "name_or_serial": null}',
}
JSON_ENDPOINTS = [
    ("POST", "/v1/deployments"),
    ("POST", "/v1/grants"),
    ("DELETE", "/v1/grants"),
    ("POST", "/v1/groups/meters/members"),
    ("POST", "/v1/revocations"),
]


async def test_malformed_json_bodies_answered_400(sec: SecMesh) -> None:
    op = sec.caller(sec.issue(Role.OPERATOR, "malformed"))
    before = (await op.call("GET", "/v1/grants")).json
    headers = {"Content-Type": "application/json"}
    for (method, path), (what, body) in itertools.product(JSON_ENDPOINTS, MALFORMED_BODIES.items()):
        a = await op.call(method, path, data=body, headers=headers)
        assert a.status == 400, f"{method} {path} with {what}: {a}"
        assert a.json["error"]["code"] == "bad_request", a
    assert (await op.call("GET", "/v1/grants")).json == before
    assert (await op.call("GET", "/v1/audit/verify")).json["ok"] is True


async def test_node_cannot_fetch_other_or_unassigned_bundles(sec: SecMesh) -> None:
    placements = (await sec.operator.call("GET", "/v1/placements")).json
    digests: dict[tuple[str, str], str] = {}
    for fid in {p["function"] for p in placements}:
        ns, name = fid.split("/")
        info = (await sec.operator.call("GET", f"/v1/functions/{ns}/{name}")).json
        for v in info["versions"]:
            digests[(fid, v["version"])] = v["digest"]
    held: dict[str, set[str]] = {}
    for p in placements:
        held.setdefault(p["node"], set()).add(digests[(p["function"], p["version"])])
    assert {"lyon-1", "cloud-1"} <= set(held), placements
    lyon = sec.caller("node.lyon-1")
    own = sorted(held["lyon-1"])[0]
    a = await lyon.call("GET", f"/v1/nodes/lyon-1/bundles/{own}")
    assert a.status == 200 and len(a.body) > 1000, a
    cloud_digest = sorted(held["cloud-1"])[0]
    a = await lyon.call("GET", f"/v1/nodes/cloud-1/bundles/{cloud_digest}")
    assert a.status == 403 and "only its own" in a.reason, a
    # A pushed bundle that is nobody's assignment.
    pushed = await sec.operator.call(
        "POST", "/v1/bundles", data=sec.bundle("examples/unassigned", example="mlp")
    )
    assert pushed.status == 201, pushed
    stray = pushed.json["digest"]
    a = await lyon.call("GET", f"/v1/nodes/lyon-1/bundles/{stray}")
    assert a.status == 403 and "not assigned" in a.reason, a
    # A node of the fleet that holds nothing, and another role, get nothing either.
    idle = sec.caller(sec.issue(Role.NODE, "idle-node", sans=LOOPBACK))
    a = await idle.call("GET", f"/v1/nodes/idle-node/bundles/{own}")
    assert a.status == 403 and "not assigned" in a.reason, a
    a = await sec.operator.call("GET", f"/v1/nodes/lyon-1/bundles/{own}")
    assert a.status == 403 and "has role operator" in a.reason, a


async def test_caller_without_certificate_refused(sec: SecMesh) -> None:
    anonymous = Caller(sec.url, sec.home.ca_cert)
    await assert_refused_where_trusted_succeeds(sec, anonymous, "/v1/functions", "no cert")


async def test_foreign_ca_certificate_refused(sec: SecMesh, tmp_path: Path) -> None:
    foreign_home = Home(tmp_path / "foreign")
    _, made = init_home(foreign_home)
    # The same CN as our own operator, signed by another fleet's CA.
    impostor = made["operator"]
    assert impostor.cn == "operator.admin"
    c = Caller(sec.url, sec.home.ca_cert, impostor.cert_path, impostor.key_path, "impostor")
    await assert_refused_where_trusted_succeeds(sec, c, "/v1/audit", "foreign CA")


async def test_expired_certificate_refused(sec: SecMesh) -> None:
    expired = sec.issue(
        Role.OPERATOR, "expired-op", days=1, not_before=datetime.now(UTC) - timedelta(days=3)
    )
    c = sec.caller(expired)
    await assert_refused_where_trusted_succeeds(sec, c, "/v1/audit", "expired")


async def test_revoked_certificate_refused(sec: SecMesh) -> None:
    gone = sec.caller(sec.issue(Role.OPERATOR, "soon-gone"))
    assert (await gone.call("GET", "/v1/audit")).status == 200
    out = await asyncio.to_thread(cli_ok, sec.home, "certs", "revoke", "operator.soon-gone")
    assert "revoked operator.soon-gone" in out
    # The coordinator re-reads the list when the file changes: the next call is refused.
    a = await outcome_of(gone, "GET", "/v1/audit")
    assert isinstance(a, Answer) and a.status == 401, a
    assert "revoked" in a.reason, a
    still = await sec.operator.call("GET", "/v1/audit?limit=1")
    assert still.status == 200, still


# -- 2. revocation cuts a node off -------------------------------------------------------------


async def test_revoked_node_cut_off_within_seconds(sec: SecMesh) -> None:
    home = sec.home
    victim_ident = load_identity(home.identity_dir(f"node.{VICTIM}"))
    await asyncio.to_thread(
        poll_until, lambda: sec.node_ready(VICTIM), "the victim node to join", WAIT * 3
    )
    op = sec.operator
    pushed = await op.call("POST", "/v1/bundles", data=sec.bundle(PROBE_FN))
    assert pushed.status == 201, pushed
    d = await op.call(
        "POST",
        "/v1/deployments",
        json_body={
            "function": PROBE_FN,
            "version": "1.0.0",
            "min": 1,
            "max": 1,
            "where": {"site": VICTIM},
        },
    )
    assert d.status == 201, d
    dev = sec.issue(Role.DEVICE, "cutoff-dev")
    g = await op.call("POST", "/v1/grants", json_body={"subject": dev.cn, "function": PROBE_FN})
    assert g.status == 201, g
    await asyncio.to_thread(
        poll_until,
        lambda: PROBE_FN in sec.serving(VICTIM),
        "the victim serving the probe",
        WAIT * 3,
    )
    inputs, want = digits_request(1)
    replies = sec.t("replies/cutoff-dev/")
    async with (
        sec.peer(dev, "cutoff") as device,
        sec.peer("coordinator.main", "watch") as watcher,
    ):
        await device.subscribe(replies + "#")
        await watcher.subscribe(sec.t(f"nodes/{VICTIM}/heartbeat"))
        sent: dict[bytes, float] = {}

        async def probe() -> bytes:
            corr = uuid.uuid4().bytes
            sent[corr] = time.monotonic()
            rc = await device.publish(
                sec.t(f"fn/{PROBE_FN}/invoke"),
                encode_request(inputs, Encoding.MSGPACK),
                response_topic=replies + "p",
                correlation=corr,
                content_type=Encoding.MSGPACK.content_type,
            )
            assert rc in ACCEPTED, f"PUBACK {rc:#x}"
            return corr

        def answered_by(m: Msg) -> str | None:
            r = decode_reply(m.payload, m.content_type)
            return r.node if isinstance(r, Response) else None

        # Before: the path works (the grant may take a reload to reach the broker).
        deadline = time.monotonic() + WAIT
        while True:
            corr = await probe()
            try:
                m = await device.wait_for(lambda m, c=corr: m.correlation == c, timeout=2.0)
                break
            except AssertionError:
                assert time.monotonic() < deadline, "the victim never answered before the revoke"
        assert answered_by(m) == VICTIM
        r = decode_reply(m.payload, m.content_type)
        assert isinstance(r, Response)
        np.testing.assert_array_equal(r.outputs["label"], want)
        await watcher.wait_for(lambda m: True, what="a heartbeat from the victim")

        # Revoke, and keep probing every 50 ms until the victim has been silent long enough.
        t0 = time.monotonic()
        revoke = asyncio.ensure_future(
            op.call("POST", "/v1/revocations", json_body={"name_or_serial": f"node.{VICTIM}"})
        )
        returned: list[float] = []
        revoke.add_done_callback(lambda _f: returned.append(time.monotonic()))

        def life_after(t: float) -> list[float]:
            hb = [m.at for m in watcher.messages if m.at > t]
            ans = [m.at for m in device.messages if m.at > t and answered_by(m) == VICTIM]
            return hb + ans

        while True:
            await probe()
            now = time.monotonic()
            seen = life_after(t0)
            last = max(seen, default=t0)
            if now - last >= SILENCE and now - t0 >= SILENCE:
                break
            assert now - t0 < CUT_OFF_LIMIT + SILENCE, (
                f"the revoked node still talks {now - t0:.1f} s after the revoke"
            )
            await asyncio.sleep(0.05)
        r_revoke = await revoke
        assert r_revoke.status == 201, r_revoke
        assert [x["cn"] for x in r_revoke.json["revoked"]] == [f"node.{VICTIM}"]
        # The first request the victim never answered, sent after its last word.
        first_dead = min(t for t in sent.values() if t >= last)
        heartbeats_after = sorted(m.at - t0 for m in watcher.messages if m.at > t0)
        answers_after = sorted(
            m.at - t0 for m in device.messages if m.at > t0 and answered_by(m) == VICTIM
        )
        cut_off = first_dead - t0
        print(
            f"\nrevocation cut-off: node.{VICTIM} last heard {last - t0:.3f} s after the revoke "
            f"call (heartbeats at {[round(x, 3) for x in heartbeats_after]}, answers at "
            f"{[round(x, 3) for x in answers_after]}); first request it never answered was sent "
            f"at {cut_off:.3f} s; the revoke call itself returned after {returned[0] - t0:.3f} s"
        )
        assert cut_off < CUT_OFF_LIMIT
        # What the device heard instead: nothing while the router still counted on the victim,
        # then the router's own answers once its heartbeats were overdue.
        instead = Counter(
            str(getattr(decode_reply(m.payload, m.content_type), "code", "answer"))
            for m in device.messages
            if m.at > last
        )
        unanswered = len(sent) - len({m.correlation for m in device.messages})
        print(f"after the cut-off: {dict(instead)} from the router, {unanswered} unanswered")
    # A new TLS handshake with the revoked node's certificate is refused by the broker.
    assert await asyncio.to_thread(broker_refuses, sec.broker_port, home, victim_ident)
    # And by the API.
    a = await outcome_of(sec.caller(victim_ident), "GET", f"/v1/nodes/{VICTIM}/bundles/x")
    assert isinstance(a, Refused) or (a.status == 401 and "revoked" in a.reason), a


# -- 3. devices on the broker ------------------------------------------------------------------


async def mqtt_invoke(
    device: Peer, topic: str, reply_prefix: str, inputs: dict[str, np.ndarray], timeout: float
) -> tuple[int, Response | None]:
    """Publish one request; the PUBACK code, and the answer when the publish was accepted."""
    corr = uuid.uuid4().bytes
    rc = await device.publish(
        topic,
        encode_request(inputs, Encoding.MSGPACK),
        response_topic=reply_prefix + corr.hex()[:8],
        correlation=corr,
        content_type=Encoding.MSGPACK.content_type,
    )
    if rc not in ACCEPTED:
        return rc, None
    m = await device.wait_for(lambda m: m.correlation == corr, timeout, "an answer")
    r = decode_reply(m.payload, m.content_type)
    assert isinstance(r, Response), r
    return rc, r


async def invoke_once_allowed(
    device: Peer, topic: str, reply_prefix: str, inputs: dict[str, np.ndarray]
) -> Response:
    """Retry a refused publish (refused ones reach nobody) until the broker's reload took the
    grant; the first accepted one must be answered."""
    deadline = time.monotonic() + WAIT
    while True:
        rc, r = await mqtt_invoke(device, topic, reply_prefix, inputs, WAIT)
        if r is not None:
            return r
        assert rc == NOT_AUTHORIZED, f"PUBACK {rc:#x}"
        assert time.monotonic() < deadline, f"{device.cn}: the grant never reached the broker"
        await asyncio.sleep(0.02)


async def test_ungranted_device_cannot_invoke_until_granted(sec: SecMesh) -> None:
    d2 = sec.issue(Role.DEVICE, "d2")
    inputs, want = digits_request()
    topic, replies = sec.t("fn/examples/digits/invoke"), sec.t("replies/d2/")
    async with sec.peer(d2) as device:
        await device.subscribe(replies + "#")
        rc, r = await mqtt_invoke(device, topic, replies, inputs, WAIT)
        assert rc == NOT_AUTHORIZED and r is None, f"PUBACK {rc:#x}"
        proc = await asyncio.to_thread(cli, sec.home, "grant", "device.d2", "examples/digits")
        assert proc.returncode == 0, proc.stderr
        assert "device.d2 may invoke examples/digits" in proc.stdout
        r = await invoke_once_allowed(device, topic, replies, inputs)
        assert r.node in ("lyon-1", "cloud-1")
        np.testing.assert_array_equal(r.outputs["label"], want)
        # The grant is for digits only.
        rc, _ = await mqtt_invoke(device, sec.t("fn/examples/cancer/invoke"), replies, inputs, WAIT)
        assert rc == NOT_AUTHORIZED, f"PUBACK {rc:#x}"


async def test_group_grant_lets_member_invoke(sec: SecMesh) -> None:
    d3 = sec.issue(Role.DEVICE, "d3")
    ex = build_example("cancer")
    inputs = ex.sample_inputs(3, seed=5)
    topic, replies = sec.t("fn/examples/cancer/invoke"), sec.t("replies/d3/")
    async with sec.peer(d3) as device:
        await device.subscribe(replies + "#")
        rc, _ = await mqtt_invoke(device, topic, replies, inputs, WAIT)
        assert rc == NOT_AUTHORIZED, f"PUBACK {rc:#x}"
        await asyncio.to_thread(cli_ok, sec.home, "grant", "group:meters", "examples/cancer")
        # The group may invoke cancer, but d3 is not in it yet.
        rc, _ = await mqtt_invoke(device, topic, replies, inputs, WAIT)
        assert rc == NOT_AUTHORIZED, f"PUBACK {rc:#x}"
        out = await asyncio.to_thread(
            cli_ok, sec.home, "grant", "--member", "device.d3", "group:meters"
        )
        assert "device.d3 is a member of group:meters" in out
        r = await invoke_once_allowed(device, topic, replies, inputs)
        np.testing.assert_array_equal(r.outputs["label"], ex.reference(inputs)["label"])


# -- 4. the audit log --------------------------------------------------------------------------


def audit_entries(home: Home) -> list[dict[str, Any]]:
    out: list[dict[str, Any]] = json.loads(cli_ok(home, "audit", "--json", "--limit", "1000"))
    return out


def audit_db(home: Home) -> sqlite3.Connection:
    return sqlite3.connect(home.root / "coordinator" / "coordinator.db", timeout=10)


def test_audit_lists_who_did_what(sec: SecMesh) -> None:
    pub = sec.issue(Role.PUBLISHER, "audited", namespace="examples")
    op = sec.issue(Role.OPERATOR, "auditor")
    doomed = sec.issue(Role.DEVICE, "audit-doomed")

    def call(ident: Identity, method: str, path: str, **kw: Any) -> Any:
        return Client(sec.home, sec.home.load_config().override(identity=ident.cn)).call(
            method, path, **kw
        )

    pushed = Client(sec.home, sec.home.load_config().override(identity=pub.cn)).push(
        sec.bundle("examples/audited", publisher=pub)
    )
    call(
        op,
        "POST",
        "/v1/deployments",
        json_body={
            "function": "examples/audited",
            "version": "1.0.0",
            "min": 0,
            "max": 1,
            "where": {"site": "nowhere"},
        },
    )
    call(op, "POST", "/v1/grants", json_body={"subject": doomed.cn, "function": "examples/audited"})
    call(op, "POST", "/v1/revocations", json_body={"name_or_serial": doomed.cn})
    entries = audit_entries(sec.home)

    def find(action: str, who: str, **detail: Any) -> dict[str, Any]:
        for e in entries:
            if (
                e["action"] == action
                and e["who"] == who
                and all(e["detail"].get(k) == v for k, v in detail.items())
            ):
                return e
        raise AssertionError(f"no {action} by {who} with {detail} in {entries[-8:]}")

    push = find("push", pub.cn, function="examples/audited", digest=pushed["digest"])
    deploy = find("deploy", op.cn, function="examples/audited", version="1.0.0")
    grant = find("grant", op.cn, subject=doomed.cn, function="examples/audited")
    revoke = find("revoke", op.cn)
    assert [r["cn"] for r in revoke["detail"]["revoked"]] == [doomed.cn]
    assert push["seq"] < deploy["seq"] < grant["seq"] < revoke["seq"]
    for e in (push, deploy, grant, revoke):
        assert len(e["hash"]) == 64 and e["ts"] > 0
    ok = cli(sec.home, "audit", "verify")
    assert ok.returncode == 0, ok.stderr
    assert "audit log intact" in ok.stdout


def test_audit_tampering_detected(sec: SecMesh) -> None:
    op = sec.issue(Role.OPERATOR, "tamper-check")
    client = Client(sec.home, sec.home.load_config().override(identity=op.cn))
    for i in range(3):
        client.call(
            "POST", "/v1/grants", json_body={"subject": f"tamper-{i}", "function": "examples/mlp"}
        )

    def verify() -> dict[str, Any]:
        out: dict[str, Any] = client.call("GET", "/v1/audit/verify")
        return out

    assert verify()["ok"] is True
    mine = [
        e
        for e in client.call("GET", "/v1/audit?limit=1000")
        if e["action"] == "grant" and e["who"] == op.cn
    ]
    assert len(mine) == 3
    edited, deleted = mine[1]["seq"], mine[0]["seq"]
    with contextlib.closing(audit_db(sec.home)) as db:
        (original,) = db.execute("SELECT detail FROM audit WHERE seq = ?", (edited,)).fetchone()
        # An insider rewrites who got the grant.
        forged = json.dumps({"subject": "device.someone-else", "function": "examples/mlp"})
        with db:
            db.execute("UPDATE audit SET detail = ? WHERE seq = ?", (forged, edited))
        bad = cli(sec.home, "audit", "verify")
        assert bad.returncode == 1, bad.stdout
        assert f"fails at entry {edited}:" in bad.stderr, bad.stderr
        assert verify()["first_bad_seq"] == edited

        # Put back byte for byte, the chain holds again.
        with db:
            db.execute("UPDATE audit SET detail = ? WHERE seq = ?", (original, edited))
        assert verify()["ok"] is True

        # Now take another entry out altogether.
        row = db.execute("SELECT * FROM audit WHERE seq = ?", (deleted,)).fetchone()
        with db:
            db.execute("DELETE FROM audit WHERE seq = ?", (deleted,))
        bad = cli(sec.home, "audit", "verify")
        assert bad.returncode == 1
        assert f"fails at entry {deleted}:" in bad.stderr and "missing" in bad.stderr, bad.stderr
        with db:
            db.execute(f"INSERT INTO audit VALUES ({', '.join('?' * len(row))})", row)
    assert verify()["ok"] is True


# -- 5. versions only go up --------------------------------------------------------------------


async def test_rollback_or_overwrite_push_refused(sec: SecMesh) -> None:
    pub = sec.issue(Role.PUBLISHER, "versions", namespace="examples")
    me = sec.caller(pub)
    fid = "examples/versioned"
    v1 = sec.bundle(fid, "1.0.0", publisher=pub)
    a = await me.call("POST", "/v1/bundles", data=v1)
    assert a.status == 201, a
    older = await me.call("POST", "/v1/bundles", data=sec.bundle(fid, "0.9.0", publisher=pub))
    assert older.status == 409 and "older than 1.0.0" in older.reason, older
    # The same version with other content (another model) cannot replace what was pushed.
    swapped = sec.bundle(fid, "1.0.0", publisher=pub, example="mlp")
    a2 = await me.call("POST", "/v1/bundles", data=swapped)
    assert a2.status == 409 and "different content" in a2.reason, a2
    # Not even an operator can.
    a3 = await sec.operator.call("POST", "/v1/bundles", data=swapped)
    assert a3.status == 409, a3
    # Pushing the very same bytes again is harmless; the store still holds the original.
    again = await me.call("POST", "/v1/bundles", data=v1)
    assert again.status in (200, 201) and again.json["digest"] == a.json["digest"], again
    info = (await me.call("GET", "/v1/functions/examples/versioned")).json
    assert [(v["version"], v["digest"]) for v in info["versions"]] == [("1.0.0", a.json["digest"])]


# -- 6. the documented API, fuzzed -------------------------------------------------------------

#: Operations that would change the fleet itself (revoking identities by a generated name).
UNFUZZED = {("POST", "/v1/revocations")}


#: Every check on what the API answers. Left out: "schema-valid data must be accepted", since
#: the document cannot say what makes a bundle verify or a deployment satisfiable (those get the
#: documented 400/404/409 answers).
CHECKS = [
    not_a_server_error,
    status_code_conformance,
    content_type_conformance,
    response_schema_conformance,
    response_headers_conformance,
    negative_data_rejection,
]


def _fuzzed(ctx: Any) -> bool:
    return (ctx.operation.method.upper(), ctx.operation.path) in UNFUZZED


# Invocations may be msgpack: send generated bytes as they are.
schemathesis.serializer.alias("application/msgpack", "application/octet-stream")

# Generated from the document the module imports; the test checks first that the coordinator
# serves exactly this document at /v1/openapi.json.
schema = schemathesis.openapi.from_dict(json.loads(json.dumps(OPENAPI))).exclude(func=_fuzzed)
schema.config.generation.update(max_examples=max(1, int(25 * SCALE)))


@pytest.fixture(scope="module")
def served_schema(sec: SecMesh) -> dict[str, Any]:
    op = load_identity(sec.home.identity_dir("operator.admin"))
    r = requests.get(
        f"{sec.url}/v1/openapi.json",
        verify=str(sec.home.ca_cert),
        cert=(str(op.cert_path), str(op.key_path)),
        timeout=WAIT,
    )
    assert r.status_code == 200, r.text
    doc: dict[str, Any] = r.json()
    return doc


@schema.parametrize()
@settings(
    deadline=None,
    suppress_health_check=list(HealthCheck),
    max_examples=max(1, int(25 * SCALE)),
)
def test_api_conforms_to_its_openapi_document(
    case: Any, sec: SecMesh, served_schema: dict[str, Any]
) -> None:
    assert served_schema == schema.raw_schema
    op = load_identity(sec.home.identity_dir("operator.admin"))
    response = case.call(
        base_url=sec.url,
        verify=str(sec.home.ca_cert),
        cert=(str(op.cert_path), str(op.key_path)),
        timeout=WAIT,
    )
    case.validate_response(response, checks=CHECKS)


# -- enrolment: the one route reachable without a certificate -----------------------------------


def _csr(name: str, *, with_enc: bool = True) -> str:
    from cryptography import x509
    from cryptography.hazmat.primitives import hashes, serialization
    from cryptography.hazmat.primitives.asymmetric import ec
    from cryptography.hazmat.primitives.asymmetric.x25519 import X25519PrivateKey
    from cryptography.x509.oid import NameOID

    from fnmesh.certs.enrolment import build_csr

    key = ec.generate_private_key(ec.SECP256R1())
    if with_enc:
        csr = build_csr(name, key, X25519PrivateKey.generate().public_key())
    else:
        csr = (
            x509.CertificateSigningRequestBuilder()
            .subject_name(x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, f"node.{name}")]))
            .sign(key, hashes.SHA256())
        )
    return csr.public_bytes(serialization.Encoding.PEM).decode()


async def test_only_enrolment_reachable_without_certificate(sec: SecMesh) -> None:
    anonymous = Caller(sec.url, sec.home.ca_cert)
    asked = await anonymous.call("POST", "/v1/enrol", json_body={"csr": _csr("newbox-1")})
    assert asked.status == 202, asked
    body = json.loads(asked.body)
    assert body["state"] == "pending" and len(body["key_fingerprint"]) == 64
    polled = await anonymous.call("GET", f"/v1/enrol/{body['id']}")
    assert polled.status == 200 and json.loads(polled.body)["state"] == "pending", polled
    assert "certificate" not in json.loads(polled.body)
    for method, path in (
        ("GET", "/v1/enrolments"),
        ("POST", "/v1/enrolments/newbox-1/approve"),
        ("GET", "/v1/nodes"),
        ("GET", "/v1/health"),
        ("GET", "/v1/enrol"),
    ):
        a = await anonymous.call(method, path)
        assert a.status in (401, 405), (method, path, a)
    # Listed as pending for the operator, with its key fingerprint; never placed.
    nodes = json.loads((await sec.operator.call("GET", "/v1/nodes")).body)
    mine = [n for n in nodes if n["name"] == "newbox-1"]
    assert mine and mine[0]["state"] == "pending"
    assert mine[0]["key_fingerprint"] == body["key_fingerprint"]


async def test_enrolment_approval_needs_an_operator(sec: SecMesh) -> None:
    anonymous = Caller(sec.url, sec.home.ca_cert)
    asked = await anonymous.call("POST", "/v1/enrol", json_body={"csr": _csr("newbox-2")})
    assert asked.status == 202, asked
    device = sec.caller(sec.issue(Role.DEVICE, "enrol-dev"))
    a = await device.call("POST", "/v1/enrolments/newbox-2/approve")
    assert a.status == 403, a
    ok = await sec.operator.call("POST", "/v1/enrolments/newbox-2/approve")
    assert ok.status == 200, ok
    got = json.loads(
        (await anonymous.call("GET", f"/v1/enrol/{json.loads(asked.body)['id']}")).body
    )
    assert got["state"] == "approved" and "BEGIN CERTIFICATE" in got["certificate"]
    assert (sec.home.root / "enrolled" / "node.newbox-2.pem").exists()


async def test_enrolment_for_an_enrolled_name_refused(sec: SecMesh) -> None:
    anonymous = Caller(sec.url, sec.home.ca_cert)
    a = await anonymous.call("POST", "/v1/enrol", json_body={"csr": _csr(VICTIM)})
    assert a.status == 409 and "already enrolled" in a.reason, a


async def test_malformed_or_oversized_enrolment_refused(sec: SecMesh) -> None:
    anonymous = Caller(sec.url, sec.home.ca_cert)
    for body, status, why in (
        ({"csr": "not a csr"}, 400, "not a PEM"),
        ({"csr": _csr("newbox-3", with_enc=False)}, 400, "encryption key"),
        ({"nothing": 1}, 400, "csr"),
    ):
        a = await anonymous.call("POST", "/v1/enrol", json_body=body)
        assert a.status == status and why in a.reason, (body, a)
    big = await anonymous.call(
        "POST",
        "/v1/enrol",
        data=b"{" + b" " * 40_000 + b"}",
        headers={"Content-Type": "application/json"},
    )
    assert big.status == 413, big


async def test_enrolment_flood_capped(sec: SecMesh) -> None:
    anonymous = Caller(sec.url, sec.home.ca_cert)
    statuses = []
    for i in range(40):
        a = await anonymous.call("POST", "/v1/enrol", json_body={"csr": _csr(f"flood-{i}")})
        statuses.append(a.status)
        if a.status == 429:
            break
    assert statuses[-1] == 429 and set(statuses[:-1]) == {202}, statuses
    assert len(statuses) <= 33


# -- tokens for browsers and scripts ------------------------------------------------------------


async def test_token_stands_for_its_certificate_and_nothing_more(sec: SecMesh) -> None:
    op = Caller.of(sec.url, sec.home, "operator.admin")
    minted = await op.call("POST", "/v1/tokens", json_body={"ttl_s": 60})
    assert minted.status == 201, minted
    token = minted.json["token"]
    bearer = Caller(sec.url, sec.home.ca_cert, name="browser")
    ok = await bearer.call("GET", "/v1/deployments", headers={"Authorization": f"Bearer {token}"})
    assert ok.status == 200, ok
    # A token cannot mint a longer-lived one for itself.
    again = await bearer.call(
        "POST", "/v1/tokens", json_body={"ttl_s": 60}, headers={"Authorization": f"Bearer {token}"}
    )
    assert again.status == 403, again


async def test_device_token_cannot_deploy(sec: SecMesh) -> None:
    dev = Caller.of(sec.url, sec.home, "device.demo")
    token = (await dev.call("POST", "/v1/tokens", json_body={"ttl_s": 60})).json["token"]
    bearer = Caller(sec.url, sec.home.ca_cert, name="device-token")
    r = await bearer.call(
        "POST",
        "/v1/deployments",
        json_body={"function": "examples/digits", "version": "1.0.0"},
        headers={"Authorization": f"Bearer {token}"},
    )
    assert r.status == 403 and "device" in r.reason, r


@pytest.mark.parametrize("mangle", ["tampered", "garbage", "expired"])
async def test_forged_or_stale_token_refused(sec: SecMesh, mangle: str) -> None:
    op = Caller.of(sec.url, sec.home, "operator.admin")
    ttl = 0.05 if mangle == "expired" else 60
    token = (await op.call("POST", "/v1/tokens", json_body={"ttl_s": ttl})).json["token"]
    if mangle == "tampered":
        body, sig = token.split(".")
        token = body[:-2] + ("A" if body[-2] != "A" else "B") + body[-1] + "." + sig
    elif mangle == "garbage":
        token = "not-a-token"
    else:
        end = time.monotonic() + 5
        while (
            time.monotonic() < end
            and (
                await Caller(sec.url, sec.home.ca_cert).call(
                    "GET", "/v1/deployments", headers={"Authorization": f"Bearer {token}"}
                )
            ).status
            == 200
        ):
            await asyncio.sleep(0.05)
    r = await Caller(sec.url, sec.home.ca_cert).call(
        "GET", "/v1/deployments", headers={"Authorization": f"Bearer {token}"}
    )
    assert r.status == 401, r
