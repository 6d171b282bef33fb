"""``fnmesh bench overload``: five times an edge node's capacity, offered open loop, nothing lost.

One edge agent (one executor thread, a queue of two, one request per batch)
and one cloud agent (batching) serve a compute-heavy function; a router
places requests by estimated latency, the edge hands back what it cannot
admit (``spill/{ns}/{name}``) and the router places that on the cloud node.
The edge's capacity X is measured first (requests per second its single
thread can run, from its own service-time average); then a device offers
``factor x X`` requests per second at a fixed rate for ``duration_s``
(open loop: sending never waits for answers) and counts every answer by id.

With spill allowed every request must get a successful answer; with spill
forbidden every request must get an answer or ``saturated``. Lost requests
(no answer) and duplicates (two answers for one id) are counted either way.
Everything runs in this process against a real Mosquitto, with real TLS and
ONNX Runtime; the cloud node is only "bigger" by batching, on the same cores.
"""

from __future__ import annotations

import asyncio
import base64
import contextlib
import json
import tempfile
import time
import uuid
from collections import Counter
from collections.abc import AsyncIterator, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import paho.mqtt.client as paho

from fnmesh.agent.main import Agent, AgentConfig
from fnmesh.agent.mqtt import MqttClient, properties
from fnmesh.certs.ca import FleetCA, init_home
from fnmesh.certs.home import Home
from fnmesh.certs.identity import Role
from fnmesh.certs.tls import client_context
from fnmesh.coordinator.broker import Mosquitto, free_port, settings_for_home, write_config
from fnmesh.coordinator.router import Router, RouterConfig
from fnmesh.functions import bundle as fnb
from fnmesh.functions.messages import (
    Encoding,
    Response,
    decode_reply,
    encode_request,
)

#: The benchmark's function (the ``examples`` publisher signs it).
FUNCTION = "examples/heavy"
EDGE, CLOUD = "edge-1", "cloud-1"
REGION = "eu-west"
#: The cloud node queues whatever the edge spills (no deadline: nothing is refused).
CLOUD_QUEUE = 1 << 16


def heavy_model(layers: int = 2000, width: int = 512, seed: int = 0) -> bytes:
    """A deliberately compute-heavy ONNX graph: ``layers`` x (MatMul ``width``^2 + Tanh).

    In ``image`` float32 [N, 64], out ``scores`` float32 [N, 10]. One weight
    matrix is shared by every layer, so the bundle stays about 1 MB while one
    request costs tens of milliseconds on one core; batching rows makes each
    row several times cheaper (the cloud node's advantage here).
    """
    from onnx import TensorProto, helper, numpy_helper

    rng = np.random.default_rng(seed)
    w0 = (rng.standard_normal((64, width)) / 8).astype(np.float32)
    w = (rng.standard_normal((width, width)) / np.sqrt(width)).astype(np.float32)
    wo = (rng.standard_normal((width, 10)) / np.sqrt(width)).astype(np.float32)
    nodes = [helper.make_node("MatMul", ["image", "w0"], ["h0"])]
    for i in range(layers):
        nodes.append(helper.make_node("MatMul", [f"h{i}", "w"], [f"m{i}"]))
        nodes.append(helper.make_node("Tanh", [f"m{i}"], [f"h{i + 1}"]))
    nodes.append(helper.make_node("MatMul", [f"h{layers}", "wo"], ["scores"]))
    graph = helper.make_graph(
        nodes,
        "heavy",
        [helper.make_tensor_value_info("image", TensorProto.FLOAT, ["N", 64])],
        [helper.make_tensor_value_info("scores", TensorProto.FLOAT, ["N", 10])],
        [numpy_helper.from_array(a, n) for a, n in ((w0, "w0"), (w, "w"), (wo, "wo"))],
    )
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    model.ir_version = 8
    return bytes(model.SerializeToString())


def heavy_bundles(home: Home, ca: FleetCA, *, layers: int = 2000) -> tuple[bytes, bytes]:
    """(edge bundle, cloud bundle): the same function and version; the edge runs one
    request per batch, the cloud batches up to 32 rows."""
    from fnmesh.certs.identity import load_identity

    publisher = load_identity(home.identity_dir("publisher.examples"))
    recipients = {}
    for cn in ("coordinator.main", f"node.{EDGE}", f"node.{CLOUD}"):
        ident = load_identity(home.identity_dir(cn))
        assert ident.info.x25519 is not None
        recipients[cn] = ident.info.x25519
    model = heavy_model(layers)
    out = []
    for max_batch in (1, 32):
        b = fnb.build(
            model,
            name=FUNCTION,
            version="1.0.0",
            publisher=publisher,
            recipients=recipients,
            regions=(REGION,),
            max_batch=max_batch,
            max_delay_ms=2.0,
        )
        out.append(b.to_bytes())
    return out[0], out[1]


def ensure_identities(home: Home, ca: FleetCA, device: str) -> None:
    wanted = [
        (Role.PUBLISHER, "examples", "examples"),
        (Role.NODE, EDGE, None),
        (Role.NODE, CLOUD, None),
        (Role.ROUTER, "bench", None),
        (Role.DEVICE, device, None),
    ]
    for role, name, ns in wanted:
        if not home.identity_dir(f"{role.value}.{name}").exists():
            ca.issue(role, name, namespace=ns)


def assign_body(node: str, bundle: bytes, *, allow_spill: bool) -> bytes:
    b = fnb.Bundle.parse(bundle)
    return json.dumps(
        {
            "node": node,
            "generation": 1,
            "functions": [
                {
                    "function": FUNCTION,
                    "version": b.manifest.version,
                    "digest": b.digest,
                    # The agents serve their bundles locally: the key here is never used.
                    "key": base64.b64encode(b"\x00" * 32).decode(),
                    "allow_spill": allow_spill,
                    "regions": [REGION],
                }
            ],
        }
    ).encode()


async def async_assign(home: Home, broker_url: str, root: str, bodies: dict[str, bytes]) -> None:
    """Publish retained assignments as the coordinator would."""
    from fnmesh.certs.identity import load_identity

    coord = load_identity(home.identity_dir("coordinator.main"))
    pub = MqttClient(
        broker_url,
        f"{coord.cn}-bench-{uuid.uuid4().hex[:6]}",
        ssl_context=client_context(coord, home.ca_cert),
        persistent=False,
    )
    await pub.async_start()
    try:
        for node, body in bodies.items():
            await pub.async_publish(f"{root}/nodes/{node}/assign", body, qos=1, retain=True)
    finally:
        await pub.async_stop()


# -- the load --------------------------------------------------------------------------------


@dataclass
class Outcome:
    """What came back for one offered load."""

    offered_rate: float
    duration_s: float
    sent: int
    answers: Counter[str] = field(default_factory=Counter)
    codes: Counter[str] = field(default_factory=Counter)
    nodes: Counter[str] = field(default_factory=Counter)
    spilled: int = 0
    latencies_ms: list[float] = field(default_factory=list)
    #: Seconds from the first send until the last answer.
    wall_s: float = 0.0

    @property
    def lost(self) -> int:
        return self.sent - len(self.answers)

    @property
    def duplicates(self) -> int:
        return sum(1 for n in self.answers.values() if n > 1)

    def percentile(self, q: float) -> float:
        return float(np.percentile(self.latencies_ms, q)) if self.latencies_ms else 0.0

    def figures(self) -> dict[str, Any]:
        return {
            "offered_rps": round(self.offered_rate, 1),
            "duration_s": self.duration_s,
            "sent": self.sent,
            "answered": len(self.answers),
            "lost": self.lost,
            "duplicates": self.duplicates,
            "codes": dict(self.codes),
            "by_node": dict(self.nodes),
            "spilled": self.spilled,
            "p50_ms": round(self.percentile(50), 1),
            "p99_ms": round(self.percentile(99), 1),
            "wall_s": round(self.wall_s, 2),
        }


class OpenLoad:
    """A device that offers requests at a fixed rate (never waiting for answers) and counts
    every answer by request id."""

    def __init__(self, client: MqttClient, root: str, device: str, function: str) -> None:
        self.client = client
        self.root = root
        self.topic = f"{root}/fn/{function}/invoke"
        self.reply = f"{root}/replies/{device}/overload-{uuid.uuid4().hex[:8]}"
        self._sent_at: dict[str, float] = {}
        self._outcome: Outcome | None = None
        self._all_in = asyncio.Event()
        self._sending_done = False
        client.subscribe(self.reply, self._on_answer)

    def _on_answer(self, msg: paho.MQTTMessage) -> None:
        out = self._outcome
        if out is None:
            return
        now = time.perf_counter()
        props = getattr(msg, "properties", None)
        body = decode_reply(bytes(msg.payload), getattr(props, "ContentType", None))
        out.answers[body.id] += 1
        if out.answers[body.id] > 1:
            return
        if isinstance(body, Response):
            out.codes["ok"] += 1
            out.nodes[body.node] += 1
            out.spilled += int(body.timing.spilled)
            sent = self._sent_at.get(body.id)
            if sent is not None:
                out.latencies_ms.append((now - sent) * 1000.0)
        else:
            out.codes[body.code.value] += 1
        if len(out.answers) >= out.sent and self._sending_done:
            self._all_in.set()

    async def async_run(
        self, rate: float, duration_s: float, inputs: Mapping[str, np.ndarray], *, drain_s: float
    ) -> Outcome:
        """Offer ``rate`` requests/s for ``duration_s``; wait up to ``drain_s`` for the answers."""
        n = max(1, int(rate * duration_s))
        out = Outcome(offered_rate=rate, duration_s=duration_s, sent=0)
        self._outcome, self._sending_done = out, False
        self._all_in.clear()
        rows = next(iter(inputs.values())).shape[0]
        # Ids of their own per run: agents replay a stored answer to a repeated (topic, id).
        run = uuid.uuid4().hex[:6]
        acks: list[asyncio.Task[None]] = []
        loop = asyncio.get_running_loop()
        t0 = time.perf_counter()
        for i in range(n):
            due = t0 + i / rate
            wait = due - time.perf_counter()
            if wait > 0:
                await asyncio.sleep(wait)
            rid = f"{run}-{i}"
            payload = encode_request(
                {k: v[i % rows : i % rows + 1] for k, v in inputs.items()},
                Encoding.MSGPACK,
                id=rid,
            )
            self._sent_at[rid] = time.perf_counter()
            out.sent += 1
            acks.append(
                loop.create_task(
                    self.client.async_publish(
                        self.topic,
                        payload,
                        qos=1,
                        props=properties(
                            content_type=Encoding.MSGPACK.content_type, response_topic=self.reply
                        ),
                        timeout=max(10.0, drain_s),
                    )
                )
            )
        await asyncio.gather(*acks)
        self._sending_done = True
        if len(out.answers) >= out.sent:
            self._all_in.set()
        with contextlib.suppress(TimeoutError):
            async with asyncio.timeout(drain_s):
                await self._all_in.wait()
        out.wall_s = time.perf_counter() - t0
        self._outcome = None
        return out


# -- a mesh for it, in this process ------------------------------------------------------------


@dataclass
class OverloadMesh:
    edge: Agent
    cloud: Agent
    router: Router
    device: MqttClient
    root: str

    def capacity_rps(self) -> float:
        """The edge's capacity: requests/s its one executor thread runs (one per batch)."""
        slot = self.edge.service.slots()[FUNCTION]
        return 1000.0 / max(slot.stats.batch_ms, 1e-3)


@contextlib.asynccontextmanager
async def overload_mesh(
    home: Home,
    broker_url: str,
    root: str,
    bundles: tuple[bytes, bytes],
    *,
    allow_spill: bool,
    device: str = "overload",
    heartbeat_s: float = 0.5,
    edge_queue: int = 2,
) -> AsyncIterator[OverloadMesh]:
    """Edge and cloud agents, a router and a device on this loop; all stopped on the way out."""
    from fnmesh.certs.identity import load_identity

    edge_b, cloud_b = bundles
    common: dict[str, Any] = {
        "home": home.root,
        "broker": broker_url,
        "topic_root": root,
        "heartbeat_s": heartbeat_s,
        "intra_op_threads": 1,
    }
    edge = Agent(
        AgentConfig(
            name=EDGE,
            labels={"tier": "edge", "region": REGION},
            threads=1,
            max_queue=edge_queue,
            **common,
        )
    )
    cloud = Agent(
        AgentConfig(
            name=CLOUD,
            labels={"tier": "cloud", "region": REGION},
            threads=2,
            max_queue=CLOUD_QUEUE,
            **common,
        )
    )
    router = Router(
        RouterConfig(
            home=home.root,
            broker=broker_url,
            name="bench",
            topic_root=root,
            heartbeat_s=0.5,
            # The agents' queue limits (heartbeats do not carry them): the cloud's is large.
            queue_limit=CLOUD_QUEUE,
        )
    )
    ident = load_identity(home.identity_dir(f"device.{device}"))
    client = MqttClient(
        broker_url,
        f"{ident.cn}-{uuid.uuid4().hex[:6]}",
        ssl_context=client_context(ident, home.ca_cert),
        persistent=False,
    )
    started: list[Any] = []
    try:
        for agent, b in ((edge, edge_b), (cloud, cloud_b)):
            started.append(agent)
            await agent.async_start()
            await agent.async_serve_bundle(b)
            await agent.presence.async_publish_status()
        # Assigned once served locally, so the agents never try to fetch the bundles.
        for agent in (edge, cloud):
            agent.assignments.applied.clear()
        await async_assign(
            home,
            broker_url,
            root,
            {
                n: assign_body(n, b, allow_spill=allow_spill)
                for n, b in ((EDGE, edge_b), (CLOUD, cloud_b))
            },
        )
        for agent in (edge, cloud):
            async with asyncio.timeout(30.0):
                await agent.assignments.applied.wait()
        started.append(router)
        await router.async_start()
        started.append(client)
        await client.async_start()

        def live() -> bool:
            now = time.monotonic()
            return {r.node for r in router.table.live_replicas(FUNCTION, now)} == {EDGE, CLOUD}

        await router.async_wait_until(live, 30.0)
        yield OverloadMesh(edge, cloud, router, client, root)
    finally:
        for part in reversed(started):
            await part.async_stop()


async def async_warm(mesh: OverloadMesh, inputs: Mapping[str, np.ndarray], n: int = 10) -> float:
    """A few requests straight to the edge, one at a time; returns its capacity (requests/s)."""
    reply = f"{mesh.root}/replies/overload/warm"
    got: asyncio.Queue[bytes] = asyncio.Queue()
    mesh.device.subscribe(reply, lambda m: got.put_nowait(bytes(m.payload)))
    await mesh.device.async_publish(f"{mesh.root}/replies/overload/fence", b"", qos=1)
    for i in range(n):
        payload = encode_request({k: v[i : i + 1] for k, v in inputs.items()}, Encoding.MSGPACK)
        await mesh.device.async_publish(
            f"{mesh.root}/nodes/{EDGE}/invoke/{FUNCTION}",
            payload,
            qos=1,
            props=properties(content_type=Encoding.MSGPACK.content_type, response_topic=reply),
        )
        async with asyncio.timeout(30.0):
            msg = await got.get()
        body = decode_reply(msg, Encoding.MSGPACK.content_type)
        if not isinstance(body, Response):
            raise RuntimeError(f"warm-up request failed: {body}")
    return mesh.capacity_rps()


def sample_inputs(n: int = 256, seed: int = 0) -> dict[str, np.ndarray]:
    rng = np.random.default_rng(seed)
    return {"image": rng.random((n, 64), dtype=np.float32)}


async def async_offer(
    mesh: OverloadMesh, *, factor: float, duration_s: float, drain_s: float
) -> tuple[float, Outcome]:
    """Measure the edge's capacity X, then offer ``factor x X`` for ``duration_s``."""
    inputs = sample_inputs()
    capacity = await async_warm(mesh, inputs)
    load = OpenLoad(mesh.device, mesh.root, "overload", FUNCTION)
    await mesh.device.async_publish(f"{mesh.root}/replies/overload/fence", b"", qos=1)
    outcome = await load.async_run(factor * capacity, duration_s, inputs, drain_s=drain_s)
    return capacity, outcome


# -- the verb ------------------------------------------------------------------------------------


async def async_run(
    duration_s: float, factor: float = 5.0, *, layers: int = 2000, quiet: bool = False
) -> dict[str, Any]:
    """Both runs (spill allowed, spill forbidden) in a fresh fleet with its own broker."""
    with tempfile.TemporaryDirectory(prefix="fnmesh-overload-") as tmp:
        home = Home(Path(tmp) / "home")
        ca, _ = init_home(home)
        ensure_identities(home, ca, "overload")
        bundles = heavy_bundles(home, ca, layers=layers)
        where = Path(tmp) / "broker"
        where.mkdir()
        port = free_port()
        conf = write_config(settings_for_home(home, where, tls_port=port), where)
        broker = Mosquitto(conf, port).start()
        try:
            url = f"mqtts://127.0.0.1:{port}"
            out: dict[str, Any] = {"function": FUNCTION, "factor": factor}
            for allow in (True, False):
                root = f"bench{uuid.uuid4().hex[:8]}"
                async with overload_mesh(home, url, root, bundles, allow_spill=allow) as mesh:
                    cap, o = await async_offer(
                        mesh, factor=factor, duration_s=duration_s, drain_s=60.0 + 10 * duration_s
                    )
                key = "spill_allowed" if allow else "spill_forbidden"
                out[key] = {"edge_capacity_rps": round(cap, 1), **o.figures()}
                if not quiet:
                    print(f"{key}: {out[key]}", flush=True)
            return out
        finally:
            broker.stop()


def run(duration_s: float, factor: float = 5.0, *, quiet: bool = False) -> dict[str, Any]:
    return asyncio.run(async_run(duration_s, factor, quiet=quiet))
