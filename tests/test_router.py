"""The router: its replica table (decision tables), and end to end through real Mosquitto, real
in-process agents and real devices: payloads reach the node byte for byte, answers equal ONNX
Runtime's, load is spread, the router answers ``not_found``/``saturated`` itself, and two
routers on the shared subscription handle every request exactly once."""

from __future__ import annotations

import asyncio
import contextlib
import json
import os
import random
import signal
import sys
import time
import uuid
from collections import Counter
from collections.abc import AsyncIterator, Iterable
from typing import Any

import aiohttp
import numpy as np
import paho.mqtt.client as paho
import pytest
from agent_support import (
    NODE,
    WAIT,
    Device,
    Device311,
    assert_same_outputs,
    build_bundle,
    fid,
    new_root,
    ort_run,
    running_agent,
)
from conftest import SCALE, Broker, Fleet

from fnmesh.agent.mqtt import MqttClient, properties
from fnmesh.certs.identity import Role
from fnmesh.certs.tls import client_context
from fnmesh.coordinator.broker import free_port
from fnmesh.coordinator.cli.router_cmd import default_name, parse_host_port
from fnmesh.coordinator.replicas import ControlMessageError, ReplicaTable
from fnmesh.coordinator.router import Router, RouterConfig, relay_properties
from fnmesh.functions.examples.models import build_example
from fnmesh.functions.messages import Encoding, ErrorCode, encode_request

CANCER = fid("cancer")
DIGITS = fid("digits")

# == the replica table =====================================================================

P = 2.0  # heartbeat period of the table under test


def ready(*functions: str, **extra: Any) -> dict[str, Any]:
    return {"state": "ready", "functions": {f: "1.0.0" for f in functions}, **extra}


def beat(**load: tuple[float, float]) -> dict[str, Any]:
    """``beat(**{F: (in_flight, queued)})``: a heartbeat body."""
    return {
        "functions": {
            f.replace("__", "/"): {"in_flight": a, "queued": q, "batch_ms": 1.0, "row_ms": 0.1}
            for f, (a, q) in load.items()
        }
    }


def assign(*functions: str) -> dict[str, Any]:
    return {"functions": [{"function": f, "version": "1.0.0"} for f in functions]}


F = "examples__f"  # keyword-friendly spelling of examples/f in beat()
FN = "examples/f"

# Each row: events applied in order, then at time `now`: the live nodes for FN and the answer
# when none can take it. Events: ("status", node, body, t) | ("assign", node, body) |
# ("hb", node, body, t).
LIVENESS = [
    (
        "ready and heartbeating",
        [("status", "a", ready(FN), 0), ("hb", "a", beat(), 1)],
        2,
        {"a"},
        None,
    ),
    ("never deployed anywhere", [("status", "a", ready("examples/g"), 0)], 1, set(), "not_found"),
    ("no node at all", [], 1, set(), "not_found"),
    (
        "clean stop: offline status still listing it",
        [("status", "a", ready(FN), 0), ("status", "a", {**ready(FN), "state": "offline"}, 1)],
        1.5,
        set(),
        "saturated",
    ),
    (
        "Last Will: offline without functions, which stay known",
        [("status", "a", ready(FN), 0), ("status", "a", {"node": "a", "state": "offline"}, 1)],
        1.5,
        set(),
        "saturated",
    ),
    (
        "heartbeat just inside 3 periods",
        [("status", "a", ready(FN), 0), ("hb", "a", beat(), 1)],
        1 + 3 * P - 0.01,
        {"a"},
        None,
    ),
    (
        "heartbeat older than 3 periods",
        [("status", "a", ready(FN), 0), ("hb", "a", beat(), 1)],
        1 + 3 * P + 0.01,
        set(),
        "saturated",
    ),
    (
        "status only, never a heartbeat, gone quiet",
        [("status", "a", ready(FN), 0)],
        3 * P + 0.01,
        set(),
        "saturated",
    ),
    (
        "the node's own heartbeat_s wins over the table's",
        [("status", "a", ready(FN, heartbeat_s=0.5), 0), ("hb", "a", beat(), 1)],
        1 + 1.6,
        set(),
        "saturated",
    ),
    (
        "assigned and ready",
        [("assign", "a", assign(FN)), ("status", "a", ready(FN), 0)],
        1,
        {"a"},
        None,
    ),
    (
        "ready but missing from its assignment (being removed)",
        [("assign", "a", assign("examples/g")), ("status", "a", ready(FN), 0)],
        1,
        set(),
        "not_found",
    ),
    (
        "assigned but not ready yet (loading)",
        [("assign", "a", assign(FN)), ("status", "a", ready(), 0)],
        1,
        set(),
        "saturated",
    ),
    ("assigned, no status at all", [("assign", "a", assign(FN))], 1, set(), "saturated"),
    (
        "assignment cleared: the status alone counts again",
        [("assign", "a", assign()), ("status", "a", ready(FN), 0), ("assign", "a", None)],
        1,
        {"a"},
        None,
    ),
    (
        "status cleared and no assignment: the node is forgotten",
        [("status", "a", ready(FN), 0), ("status", "a", None, 1)],
        1,
        set(),
        "not_found",
    ),
    (
        "heartbeats alone never make a node live",
        [("hb", "a", beat(), 0)],
        0.5,
        set(),
        "not_found",
    ),
    (
        "one live among dead",
        [
            ("status", "a", ready(FN), 0),
            ("status", "b", ready(FN), 0),
            ("status", "b", {"state": "offline"}, 1),
            ("status", "c", ready(FN), 0),
            ("hb", "a", beat(), 5),
        ],
        7,
        {"a"},
        None,
    ),
]


def apply(table: ReplicaTable, events: Iterable[tuple[Any, ...]]) -> None:
    for ev in events:
        kind, node, body = ev[:3]
        if kind == "status":
            table.apply_status(node, body, ev[3])
        elif kind == "assign":
            table.apply_assign(node, body)
        else:
            table.apply_heartbeat(node, body, ev[3])


@pytest.mark.parametrize(
    ("events", "now", "live", "code"),
    [row[1:] for row in LIVENESS],
    ids=[row[0] for row in LIVENESS],
)
def test_liveness(
    events: list[tuple[Any, ...]], now: float, live: set[str], code: str | None
) -> None:
    table = ReplicaTable(heartbeat_s=P)
    apply(table, events)
    assert {r.node for r in table.live_replicas(FN, now)} == live
    choice = table.choose(FN, now, random.Random(0))
    if code is None:
        assert choice.replica is not None and choice.replica.node in live
        assert table.pick(FN, now, random.Random(0)) is not None
    else:
        assert choice.replica is None
        assert choice.code == ErrorCode(code), choice.reason
        assert table.pick(FN, now, random.Random(0)) is None


# Each row: {node: heartbeat load of FN and of another function G} + router forwards since
# the heartbeat -> the node(s) a pick may return.
G = "examples__g"
LOAD = [
    ("least in flight + queued", {"a": beat(**{F: (3, 2)}), "b": beat(**{F: (1, 0)})}, {}, {"b"}),
    (
        "load is node-wide: other functions count",
        {"a": beat(**{F: (0, 0), G: (4, 4)}), "b": beat(**{F: (2, 0)})},
        {},
        {"b"},
    ),
    (
        "forwards since the heartbeat count",
        {"a": beat(**{F: (0, 0)}), "b": beat(**{F: (1, 0)})},
        {"a": 2},
        {"b"},
    ),
    (
        "a tie is broken at random",
        {"a": beat(**{F: (1, 1)}), "b": beat(**{F: (2, 0)})},
        {},
        {"a", "b"},
    ),
    (
        "a full queue takes a node out",
        {"a": beat(**{F: (0, 8)}), "b": beat(**{F: (9, 7)})},
        {},
        {"b"},
    ),
]


@pytest.mark.parametrize(
    ("beats", "forwards", "expected"), [row[1:] for row in LOAD], ids=[row[0] for row in LOAD]
)
def test_least_loaded_pick(
    beats: dict[str, dict[str, Any]], forwards: dict[str, int], expected: set[str]
) -> None:
    table = ReplicaTable(heartbeat_s=P, queue_limit=8)
    for node, body in beats.items():
        table.apply_status(node, ready(FN, "examples/g"), 0)
        table.apply_heartbeat(node, body, 1)
    for node, n in forwards.items():
        for _ in range(n):
            table.note_forward(node)
    rng = random.Random(7)
    picked = {table.pick(FN, 2, rng).node for _ in range(64)}  # type: ignore[union-attr]
    assert picked == expected


def test_forwards_raise_the_estimate_until_the_next_heartbeat() -> None:
    table = ReplicaTable(heartbeat_s=P)
    for node in ("a", "b"):
        table.apply_status(node, ready(FN), 0)
        table.apply_heartbeat(node, beat(**{F: (0, 0)}), 0)
    rng = random.Random(1)
    seen = []
    for _ in range(10):
        r = table.pick(FN, 1, rng)
        assert r is not None
        seen.append(r.node)
        table.note_forward(r.node)
    # Each forward makes its node the busier one: a tie, then the other node, and again.
    assert all({seen[i], seen[i + 1]} == {"a", "b"} for i in range(0, 10, 2)), seen
    table.apply_heartbeat("a", beat(**{F: (0, 0)}), 1.5)  # a drained; b still holds 5 forwards
    assert table.pick(FN, 2, rng).node == "a"  # type: ignore[union-attr]
    assert {r.node: r.load for r in table.live_replicas(FN, 2)} == {"a": 0, "b": 5}


def test_all_queues_full_is_saturated() -> None:
    table = ReplicaTable(heartbeat_s=P, queue_limit=4)
    for node in ("a", "b"):
        table.apply_status(node, ready(FN), 0)
        table.apply_heartbeat(node, beat(**{F: (1, 4)}), 0)
    choice = table.choose(FN, 1, random.Random(0))
    assert choice.replica is None and choice.code is ErrorCode.SATURATED
    assert "full queue" in choice.reason
    assert all(r.full for r in table.live_replicas(FN, 1))


@pytest.mark.parametrize(
    ("kind", "body"),
    [
        ("status", {"functions": {}}),
        ("status", {"state": "ready", "functions": ["examples/f"]}),
        ("status", {"state": "ready", "labels": {"tier": 1}}),
        ("assign", {"functions": {"examples/f": "1.0.0"}}),
        ("assign", {"functions": [{"version": "1.0.0"}]}),
        ("hb", {"functions": {"examples/f": {"in_flight": -1}}}),
        ("hb", {"functions": {"examples/f": {"queued": "many"}}}),
        ("hb", {"functions": [1, 2]}),
    ],
)
def test_malformed_control_messages_are_refused(kind: str, body: dict[str, Any]) -> None:
    table = ReplicaTable()
    with pytest.raises(ControlMessageError):
        apply(table, [(kind, "a", body, 0)])


def test_relay_properties_copies_and_counts_down_the_expiry() -> None:
    p = properties(content_type="application/json", correlation=b"c", response_topic="r", expiry=30)
    assert p is not None
    p.UserProperty = [("trace", "1"), ("trace", "2")]
    out, expired = relay_properties(p, 2.7)
    assert not expired and out is not None
    assert out.ResponseTopic == "r" and out.CorrelationData == b"c"
    assert out.ContentType == "application/json"
    assert out.UserProperty == [("trace", "1"), ("trace", "2")]
    assert out.MessageExpiryInterval == 28
    assert relay_properties(p, 30.0) == (None, True)
    assert relay_properties(None, 5) == (None, False)


def test_cli_helpers() -> None:
    assert parse_host_port("127.0.0.1:9100") == ("127.0.0.1", 9100)
    assert parse_host_port("[::1]:0") == ("::1", 0)
    assert default_name("router.edge-2") == "edge-2"
    assert default_name("operator.admin") == "main"


# == end to end ============================================================================


def fn_topic(root: str, function: str) -> str:
    return f"{root}/fn/{fid(function)}/invoke"


def router_identity(fleet: Fleet, name: str) -> None:
    if not fleet.home.identity_dir(f"router.{name}").exists():
        fleet.ca.issue(Role.ROUTER, name)


@contextlib.asynccontextmanager
async def running_router(
    fleet: Fleet, broker: Broker, root: str, name: str = "r1", **cfg: Any
) -> AsyncIterator[Router]:
    """A router on this loop; always stopped on the way out."""
    router_identity(fleet, name)
    router = Router(
        RouterConfig(home=fleet.home.root, broker=broker.tls_url, name=name, topic_root=root, **cfg)
    )
    try:
        await router.async_start()
        yield router
    finally:
        await router.async_stop()


async def wait_live(router: Router, function: str, nodes: Iterable[str]) -> None:
    want = set(nodes)
    await router.async_wait_until(
        lambda: want <= {r.node for r in router.table.live_replicas(function, time.monotonic())},
        WAIT,
    )


class Spy:
    """Every message on the nodes' inboxes, as received (bytes and properties)."""

    def __init__(self, fleet: Fleet, broker: Broker, root: str) -> None:
        ident = fleet.device("spy")
        self.root = root
        self.got: asyncio.Queue[paho.MQTTMessage] = asyncio.Queue()
        self.client = MqttClient(
            broker.tls_url,
            f"{ident.cn}-{uuid.uuid4().hex[:6]}",
            ssl_context=client_context(ident, fleet.home.ca_cert),
            persistent=False,
        )
        self.client.subscribe(f"{root}/nodes/+/invoke/#", self.got.put_nowait)

    async def __aenter__(self) -> Spy:
        await self.client.async_start()
        # Acknowledged after the SUBSCRIBE sent before it on this connection.
        await self.client.async_publish(f"{self.root}/replies/spy/probe", b"", qos=1)
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.client.async_stop()

    async def next(self) -> paho.MQTTMessage:
        async with asyncio.timeout(WAIT):
            return await self.got.get()


async def fence(dev: Device, root: str, *earlier: str) -> None:
    """Send one more request through the router and wait for its answer; by then an earlier
    request on the same path would have had a second answer too, if it were going to get one."""
    topic, _ = await dev.send("nothing-here", {}, topic=fn_topic(root, "nothing-here"))
    assert topic is not None
    assert (await dev.mail.get(topic)).error().code is ErrorCode.NOT_FOUND
    for t in earlier:
        assert dev.mail.pending(t) == 0, f"a second answer on {t}"


@pytest.mark.parametrize("encoding", [Encoding.MSGPACK, Encoding.JSON], ids=str)
async def test_mqtt5_request_reaches_the_node_byte_for_byte(
    fleet: Fleet, broker: Broker, encoding: Encoding
) -> None:
    root = new_root()
    inputs = build_example("cancer").sample_inputs(3, 4)
    async with (
        running_agent(fleet, broker, root, [build_bundle(fleet, "cancer")]),
        running_router(fleet, broker, root) as router,
        Device(fleet, broker, root) as dev,
        Spy(fleet, broker, root) as spy,
    ):
        await wait_live(router, CANCER, [NODE])
        payload = encode_request(inputs, encoding, id="r-1")
        rt, corr = dev.reply_topic(), uuid.uuid4().bytes
        props = properties(
            content_type=encoding.content_type, correlation=corr, response_topic=rt, expiry=60
        )
        assert props is not None
        props.UserProperty = [("trace", "t-1"), ("tenant", "acme")]
        await dev.client.async_publish(fn_topic(root, "cancer"), payload, qos=1, props=props)

        seen = await spy.next()
        assert seen.topic == f"{root}/nodes/{NODE}/invoke/{CANCER}"
        assert bytes(seen.payload) == payload
        assert seen.qos == 1
        sp = seen.properties
        assert sp.ResponseTopic == rt and sp.CorrelationData == corr
        assert sp.ContentType == encoding.content_type
        assert sp.UserProperty == [("trace", "t-1"), ("tenant", "acme")]
        assert 55 <= sp.MessageExpiryInterval <= 60

        r = await dev.mail.get(rt)
        assert r.correlation == corr and r.content_type == encoding.content_type
        ans = r.ok()
        assert ans.id == "r-1" and ans.node == NODE and ans.version == "1.0.0"
        assert_same_outputs(ans.outputs, ort_run("cancer", inputs), str(encoding))

        # Malformed: forwarded untouched all the same, and the agent names what was wrong.
        junk = b"{not json" if encoding is Encoding.JSON else b"\x93\x01\x02"
        rt2, corr2 = await dev.send("cancer", payload=junk, topic=fn_topic(root, "cancer"))
        assert rt2 is not None and corr2 is not None
        assert bytes((await spy.next()).payload) == junk
        err = (await dev.mail.get(rt2)).error()
        assert err.code is ErrorCode.BAD_REQUEST and err.id == corr2.hex()

        assert (
            router.metrics.value("fnmesh_router_forwarded_total", function=CANCER, node=NODE) == 2
        )
        assert router.metrics.value("fnmesh_router_answered_total") == 0


@pytest.mark.parametrize("encoding", [Encoding.MSGPACK, Encoding.JSON], ids=str)
async def test_mqtt311_reply_to_in_the_payload_travels_untouched(
    fleet: Fleet, broker: Broker, encoding: Encoding
) -> None:
    root = new_root()
    inputs = build_example("digits").sample_inputs(2, 8)
    async with (
        running_agent(fleet, broker, root, [build_bundle(fleet, "digits")]),
        running_router(fleet, broker, root) as router,
        Device311(fleet, broker, root) as dev,
        Spy(fleet, broker, root) as spy,
    ):
        await wait_live(router, DIGITS, [NODE])
        reply_to = dev.replies + uuid.uuid4().hex[:8]
        payload = encode_request(inputs, encoding, id="old-1", reply_to=reply_to)
        info = dev.client.publish(fn_topic(root, "digits"), payload, qos=1)
        await asyncio.to_thread(info.wait_for_publish, WAIT)

        seen = await spy.next()
        assert bytes(seen.payload) == payload
        assert not getattr(seen.properties, "ResponseTopic", None)
        r = await dev.mail.get(reply_to)
        assert r.ok().id == "old-1"
        assert_same_outputs(r.ok().outputs, ort_run("digits", inputs), str(encoding))


async def test_two_agents_share_the_load(fleet: Fleet, broker: Broker) -> None:
    root = new_root()
    nodes = [NODE, "lyon-2"]
    bundle = build_bundle(fleet, "cancer", nodes=nodes)
    inputs = build_example("cancer").sample_inputs(1, 2)
    want = ort_run("cancer", inputs)
    async with contextlib.AsyncExitStack() as stack:
        for n in nodes:
            await stack.enter_async_context(running_agent(fleet, broker, root, [bundle], node=n))
        router = await stack.enter_async_context(running_router(fleet, broker, root))
        dev = await stack.enter_async_context(Device(fleet, broker, root))
        await wait_live(router, CANCER, nodes)
        n = int(80 * SCALE)
        answers = await asyncio.gather(
            *(dev.call("cancer", inputs, topic=fn_topic(root, "cancer")) for _ in range(n))
        )
        by_node = Counter(a.ok().node for a in answers)
        for a in answers:
            assert_same_outputs(a.ok().outputs, want)
        assert set(by_node) == set(nodes), by_node
        for node in nodes:
            assert router.metrics.value("fnmesh_router_forwarded_total", node=node) == by_node[node]


async def test_router_answers_not_found_and_saturated_once(fleet: Fleet, broker: Broker) -> None:
    root = new_root()
    inputs = build_example("cancer").sample_inputs(1, 5)
    async with (
        running_router(fleet, broker, root, metrics=("127.0.0.1", 0)) as router,
        Device(fleet, broker, root) as dev,
    ):
        # Never deployed: not_found, in the request's encoding, CorrelationData as the id.
        rt, corr = await dev.send("nope", inputs, topic=fn_topic(root, "nope"))
        assert rt is not None and corr is not None
        r = await dev.mail.get(rt)
        assert r.correlation == corr and r.content_type == "application/msgpack"
        err = r.error()
        assert err.code is ErrorCode.NOT_FOUND and err.id == corr.hex()
        assert "examples/nope" in err.message
        # The request's own id wins; JSON in, JSON out (sniffed: no content type given).
        rt_json, _ = await dev.send(
            "nope",
            inputs,
            encoding=Encoding.JSON,
            content_type=None,
            id="mine",
            topic=fn_topic(root, "nope"),
        )
        assert rt_json is not None
        r = await dev.mail.get(rt_json)
        assert r.payload.startswith(b"{") and r.content_type == "application/json"
        assert r.error().id == "mine" and r.error().code is ErrorCode.NOT_FOUND

        async with running_agent(fleet, broker, root, [build_bundle(fleet, "cancer")]):
            await wait_live(router, CANCER, [NODE])
            r = await dev.call("cancer", inputs, topic=fn_topic(root, "cancer"))
            assert r.ok().node == NODE
        # The agent stopped cleanly: its offline status still lists the function.
        await router.async_wait_until(
            lambda: (
                not router.table.live_replicas(CANCER, time.monotonic())
                and router.table.nodes[NODE].state == "offline"
            )
        )
        rt_sat, corr = await dev.send("cancer", inputs, topic=fn_topic(root, "cancer"))
        assert rt_sat is not None and corr is not None
        r = await dev.mail.get(rt_sat)
        assert r.correlation == corr
        err = r.error()
        assert err.code is ErrorCode.SATURATED and err.id == corr.hex()
        assert NODE in err.message and "offline" in err.message
        await fence(dev, root, rt, rt_json, rt_sat)

        assert router.metrics.value("fnmesh_router_answered_total", code="not_found") == 3
        assert router.metrics.value("fnmesh_router_answered_total", code="saturated") == 1
        async with (
            aiohttp.ClientSession() as s,
            s.get(f"http://127.0.0.1:{router.metrics_port}/metrics") as resp,
        ):
            assert resp.status == 200
            text = await resp.text()
        assert 'fnmesh_router_answered_total{code="saturated"} 1.0' in text
        assert f'fnmesh_router_forwarded_total{{function="{CANCER}",node="{NODE}"}} 1.0' in text


async def test_reply_topic_outside_replies_is_refused(fleet: Fleet, broker: Broker) -> None:
    root = new_root()
    inputs = build_example("cancer").sample_inputs(1, 6)
    bad = [f"{root}/elsewhere/x", f"{root}/nodes/{NODE}/invoke/{CANCER}", "other/replies/y"]
    async with (
        running_router(fleet, broker, root) as router,
        Device(fleet, broker, root) as dev,
    ):
        await dev.watch_everything()
        for topic in bad:  # MQTT 5 ResponseTopic
            await dev.send("nope", inputs, response_topic=topic, topic=fn_topic(root, "nope"))
        # MQTT 3.1.1 style: reply_to in the payload, no properties at all.
        await dev.client.async_publish(
            fn_topic(root, "nope"),
            encode_request(inputs, Encoding.JSON, id="x", reply_to=f"{root}/elsewhere/z"),
            qos=1,
        )
        # No reply topic anywhere.
        await dev.send("nope", inputs, response_topic=None, topic=fn_topic(root, "nope"))
        await fence(dev, root)
        assert (
            router.metrics.value("fnmesh_router_refused_reply_topics_total", reason="outside") == 4
        )
        assert (
            router.metrics.value("fnmesh_router_refused_reply_topics_total", reason="missing") == 1
        )
        assert router.metrics.value("fnmesh_router_answered_total") == 1  # the fence
        published = {m.topic for m in dev.mail.all}
        assert not published & {*bad, f"{root}/elsewhere/z"}, published


async def test_a_node_that_does_not_listen_gets_no_request_lost(
    fleet: Fleet, broker: Broker
) -> None:
    """A retained "ready" from a node whose session is gone: the broker routes the forward to
    no one (PUBACK "no matching subscribers"), so the router answers instead."""
    root = new_root()
    inputs = build_example("cancer").sample_inputs(1, 7)
    async with (
        running_router(fleet, broker, root) as router,
        Device(fleet, broker, root) as dev,
    ):
        await dev.client.async_publish(
            f"{root}/nodes/ghost/status", json.dumps(ready(CANCER)).encode(), qos=1, retain=True
        )
        await wait_live(router, CANCER, ["ghost"])
        r = await dev.call("cancer", inputs, topic=fn_topic(root, "cancer"))
        err = r.error()
        assert err.code is ErrorCode.SATURATED and "ghost" in err.message
        assert router.metrics.value("fnmesh_router_undelivered_total", what="no_subscriber") == 1


async def test_two_routers_handle_each_request_exactly_once(fleet: Fleet, broker: Broker) -> None:
    root = new_root()
    nodes = [NODE, "lyon-2"]
    bundle = build_bundle(fleet, "cancer", nodes=nodes)
    payload = encode_request(build_example("cancer").sample_inputs(1, 1), Encoding.MSGPACK)
    n = int(1000 * SCALE)
    async with contextlib.AsyncExitStack() as stack:
        for node in nodes:
            await stack.enter_async_context(
                running_agent(fleet, broker, root, [bundle], node=node, max_queue=100_000)
            )
        routers = [
            await stack.enter_async_context(running_router(fleet, broker, root, name))
            for name in ("r1", "r2")
        ]
        dev = await stack.enter_async_context(Device(fleet, broker, root))
        for router in routers:
            await wait_live(router, CANCER, nodes)
        rt = dev.reply_topic()

        async def burst(ids: range, window: int = 100) -> list[bytes]:
            # In windows: everything here shares one event loop, and a backlog of a thousand
            # requests would delay the agents' heartbeats past the router's staleness limit.
            out = []
            for start in range(0, len(ids), window):
                chunk = ids[start : start + window]
                await asyncio.gather(
                    *(
                        dev.client.async_publish(
                            fn_topic(root, "cancer"),
                            payload,
                            qos=1,
                            props=properties(
                                content_type="application/msgpack",
                                correlation=i.to_bytes(4, "big"),
                                response_topic=rt,
                            ),
                        )
                        for i in chunk
                    )
                )
                for _ in chunk:
                    r = await dev.mail.get(rt)
                    assert r.correlation is not None
                    assert r.ok().id == r.correlation.hex()
                    out.append(r.correlation)
            return out

        def forwarded(router: Router) -> float:
            return router.metrics.value("fnmesh_router_forwarded_total")

        got = await burst(range(n))
        assert sorted(got) == [i.to_bytes(4, "big") for i in range(n)]  # none missing, no dups
        handled = [forwarded(r) for r in routers]
        assert all(h > 0 for h in handled), handled
        assert sum(handled) == n
        await fence(dev, root, rt)

        # Ordered shutdown: r1 leaves the shared subscription, so nothing is queued for its
        # (persistent) session: r2 takes every request from now on.
        await routers[0].async_stop()
        more = int(40 * SCALE)
        got = await burst(range(n, n + more))
        assert sorted(got) == [i.to_bytes(4, "big") for i in range(n, n + more)]
        assert forwarded(routers[1]) == handled[1] + more
        await fence(dev, root, rt)


async def test_a_router_that_comes_back_routes_what_its_session_kept(
    fleet: Fleet, broker: Broker
) -> None:
    """A router that vanished without leaving the shared subscription (as in a crash) keeps
    its share of the requests in its persistent session; when it comes back they are routed,
    not answered from a table that is still empty."""
    root = new_root()
    payload = encode_request(build_example("cancer").sample_inputs(1, 3), Encoding.MSGPACK)
    n = int(20 * SCALE)
    async with contextlib.AsyncExitStack() as stack:
        await stack.enter_async_context(
            running_agent(fleet, broker, root, [build_bundle(fleet, "cancer")])
        )
        gone = await stack.enter_async_context(running_router(fleet, broker, root, "r1"))
        other = await stack.enter_async_context(running_router(fleet, broker, root, "r2"))
        dev = await stack.enter_async_context(Device(fleet, broker, root))
        for router in (gone, other):
            await wait_live(router, CANCER, [NODE])
        await gone.client.async_stop()  # gone, its session (and subscription) kept
        rt = dev.reply_topic()
        for i in range(n):
            await dev.client.async_publish(
                fn_topic(root, "cancer"),
                payload,
                qos=1,
                props=properties(correlation=i.to_bytes(4, "big"), response_topic=rt),
            )
        back = await stack.enter_async_context(running_router(fleet, broker, root, "r1"))
        got = []
        for _ in range(n):
            r = await dev.mail.get(rt)
            assert r.ok().node == NODE
            got.append(r.correlation)
        assert sorted(got) == [i.to_bytes(4, "big") for i in range(n)]
        kept = back.metrics.value("fnmesh_router_forwarded_total")
        assert kept > 0
        assert kept + other.metrics.value("fnmesh_router_forwarded_total") == n
        await fence(dev, root, rt)


async def test_router_command_runs_and_shuts_down_in_order(fleet: Fleet, broker: Broker) -> None:
    root = new_root()
    router_identity(fleet, "cli")
    home = fleet.home
    home.save_config(home.load_config().override(topic_root=root, broker=broker.tls_url))
    port = free_port()
    cmd = [
        sys.executable,
        "-c",
        "from fnmesh.coordinator.cli.router_cmd import router; router()",
        *("--home", str(home.root), "--name", "cli", "--metrics", f"127.0.0.1:{port}", "-v"),
    ]
    proc = await asyncio.create_subprocess_exec(
        *cmd,
        stdin=asyncio.subprocess.DEVNULL,
        stdout=asyncio.subprocess.DEVNULL,
        stderr=asyncio.subprocess.PIPE,
        env={**os.environ, "PYTHONUNBUFFERED": "1"},
    )
    lines: list[bytes] = []
    try:
        assert proc.stderr is not None
        while not any(b"router cli ready" in line for line in lines):
            async with asyncio.timeout(WAIT * 2):
                line = await proc.stderr.readline()
            assert line, f"router exited: {b''.join(lines).decode(errors='replace')}"
            lines.append(line)
        async with (
            running_router(fleet, broker, root, "r1") as other,
            Device(fleet, broker, root) as dev,
        ):
            inputs = {"x": np.zeros((1, 1), np.float32)}
            tops = []
            for _ in range(8):  # the shared subscription splits these between the two
                t, _ = await dev.send("nope", inputs, topic=fn_topic(root, "nope"))
                tops.append(t)
            for t in tops:
                assert (await dev.mail.get(t)).error().code is ErrorCode.NOT_FOUND
            async with (
                aiohttp.ClientSession() as s,
                s.get(f"http://127.0.0.1:{port}/metrics") as resp,
            ):
                text = await resp.text()
            by_cli = 8 - other.metrics.value("fnmesh_router_answered_total")
            assert f'fnmesh_router_answered_total{{code="not_found"}} {by_cli:.1f}' in text

            proc.send_signal(signal.SIGTERM)
            async with asyncio.timeout(WAIT):
                rest = await proc.stderr.read()
                code = await proc.wait()
            assert code == 0, rest.decode(errors="replace")
            assert b"router cli stopped" in rest

            # Every request now reaches the router that is left.
            tops = []
            for _ in range(8):
                t, _ = await dev.send("nope", inputs, topic=fn_topic(root, "nope"))
                tops.append(t)
            for t in tops:
                assert (await dev.mail.get(t)).error().code is ErrorCode.NOT_FOUND
    finally:
        if proc.returncode is None:
            proc.kill()
            await proc.wait()
