"""The router: picks a replica for each request and forwards it, untouched, to that node's inbox.

Several routers share one MQTT 5 shared subscription,
``$share/fnmesh-routers/{root}/fn/+/+/invoke``, so the broker hands each
request to exactly one of them. Every router reads every node's retained
status and assignment and its heartbeats into a :class:`ReplicaTable`.

For each request: the function is the topic's tail (never the payload); the
live edge replica expected to answer first (a cloud one when no edge replica
has room, or when the edge would break the function's latency objective)
gets the payload byte for byte at
``{root}/nodes/{node}/invoke/{ns}/{name}``, with the same QoS and the device's
MQTT 5 properties (the message expiry less the time spent here). When no
replica can take it, the router answers the device itself (``not_found`` or
``saturated``) on its reply topic, which must lie under ``{root}/replies/``.
The payload is only looked into (bounded, by :func:`peek_envelope`) on that
path.

A request is acknowledged to the broker only once what it became (the forward,
or the router's own answer) is acknowledged, so a router that dies holding
requests gets them again from its persistent session when it comes back.
Shutdown: leave the shared subscription (the broker otherwise keeps queueing a
share of the requests for the stopped router's session), wait for the
forwards in flight, close the metrics endpoint, disconnect.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import random
import signal
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import paho.mqtt.client as mqtt
from aiohttp import web
from paho.mqtt.packettypes import PacketTypes
from paho.mqtt.properties import Properties
from paho.mqtt.reasoncodes import ReasonCode
from prometheus_client import CONTENT_TYPE_LATEST, CollectorRegistry, Counter, generate_latest

from fnmesh.agent.http import async_start_http
from fnmesh.agent.mqtt import MqttClient, TransportError, properties
from fnmesh.certs import lookup
from fnmesh.certs.home import DEFAULT_TOPIC_ROOT, Home
from fnmesh.certs.identity import Identity, Role
from fnmesh.certs.tls import client_context
from fnmesh.certs.trust import TrustStore
from fnmesh.coordinator.replicas import (
    DEFAULT_QUEUE_LIMIT,
    ControlMessageError,
    NodeEntry,
    ReplicaTable,
)
from fnmesh.functions.errors import MessageError
from fnmesh.functions.messages import (
    Encoding,
    ErrorCode,
    ErrorReply,
    encode_error,
    peek_envelope,
)
from fnmesh.functions.tensors import detect_encoding

log = logging.getLogger("fnmesh.coordinator.router")

#: The shared-subscription group every router joins.
SHARE_GROUP = "fnmesh-routers"
#: PUBACK reason "No matching subscribers": the broker accepted the forward but no node
#: session holds a subscription for it, so it went nowhere.
NO_MATCHING_SUBSCRIBERS = 0x10
_INVOKE = "/invoke"


# -- metrics ----------------------------------------------------------------------------------


class RouterMetrics:
    """The router's Prometheus metrics, in a registry of its own."""

    def __init__(self) -> None:
        self.registry = CollectorRegistry(auto_describe=True)
        self._forwarded = Counter(
            "fnmesh_router_forwarded",
            "Requests forwarded to a node, by function and node.",
            ["function", "node"],
            registry=self.registry,
        )
        self._answered = Counter(
            "fnmesh_router_answered",
            "Requests the router answered itself, by error code.",
            ["code"],
            registry=self.registry,
        )
        self._refused = Counter(
            "fnmesh_router_refused_reply_topics",
            "Answers not sent because the reply topic was missing or outside replies/.",
            ["reason"],
            registry=self.registry,
        )
        self._undelivered = Counter(
            "fnmesh_router_undelivered",
            "Forwards or answers the broker refused or could route to no subscriber.",
            ["what"],
            registry=self.registry,
        )
        self._bad_control = Counter(
            "fnmesh_router_bad_control_messages",
            "Status, assign or heartbeat messages ignored because they did not parse.",
            ["kind"],
            registry=self.registry,
        )
        # Labelled children, cached: the fast path pays a dict lookup, not a label resolution.
        self._fwd: dict[tuple[str, str], Any] = {}
        self._spilled = Counter(
            "fnmesh_router_spilled",
            "Spilled requests placed on a cloud replica, by function.",
            ["function"],
            registry=self.registry,
        )

    def forwarded(self, function: str, node: str) -> None:
        c = self._fwd.get((function, node))
        if c is None:
            # Only hosted functions and known nodes get here, so the label set stays bounded.
            c = self._fwd[(function, node)] = self._forwarded.labels(function, node)
        c.inc()

    def spilled(self, function: str) -> None:
        self._spilled.labels(function).inc()

    def answered(self, code: ErrorCode) -> None:
        self._answered.labels(code.value).inc()

    def refused(self, reason: str) -> None:
        self._refused.labels(reason).inc()

    def undelivered(self, what: str) -> None:
        self._undelivered.labels(what).inc()

    def bad_control(self, kind: str) -> None:
        self._bad_control.labels(kind).inc()

    def value(self, sample: str, **labels: str) -> float:
        """One sample's value summed over the label sets matching ``labels`` (0 if none)."""
        total = 0.0
        for family in self.registry.collect():
            for s in family.samples:
                if s.name == sample and all(s.labels.get(k) == v for k, v in labels.items()):
                    total += s.value
        return total

    def render(self) -> bytes:
        return generate_latest(self.registry)


async def async_start_metrics(
    metrics: RouterMetrics, host: str, port: int
) -> tuple[web.AppRunner, int]:
    """Serve ``GET /metrics`` (plain HTTP); returns the runner (for cleanup) and the bound port."""

    async def handle(_request: web.Request) -> web.Response:
        return web.Response(body=metrics.render(), headers={"Content-Type": CONTENT_TYPE_LATEST})

    app = web.Application()
    app.router.add_get("/metrics", handle)
    app.freeze()
    return await async_start_http(app, host, port, None)


# -- the MQTT connection ------------------------------------------------------------------------


def _callback_filter(topic: str) -> str:
    """The filter paho matches incoming topics against: shared subscriptions lose their prefix.

    paho's callback matcher does not know ``$share/{group}/``: a callback added for the
    shared filter itself never fires.
    """
    if topic.startswith("$share/"):
        parts = topic.split("/", 2)
        if len(parts) == 3:
            return parts[2]
    return topic


class RouterClient(MqttClient):
    """An :class:`MqttClient` with what a router needs on top.

    - shared subscriptions (callbacks keyed on the filter without ``$share/{group}/``);
    - waiting for every SUBACK after (re)connecting, and refusals reported;
    - leaving a subscription and waiting for its UNSUBACK;
    - manual acknowledgement: :meth:`relay` publishes what a request became and
      acknowledges the request only when the broker acknowledges that publish.

    These would sit well in :class:`MqttClient` itself.
    """

    def __init__(
        self,
        url: str,
        client_id: str,
        *,
        on_subscribed: Callable[[], None] | None = None,
        on_undelivered: Callable[[mqtt.MQTTMessage, str, ReasonCode], None] | None = None,
        **kw: Any,
    ) -> None:
        super().__init__(url, client_id, **kw)
        self._wanted: dict[str, int] = {}
        self._subacks: dict[int, str] = {}
        self._subscribed = asyncio.Event()
        self._refused_subs: list[str] = []
        self._unsubacks: dict[int, asyncio.Future[None]] = {}
        #: out mid -> (the request it came from, the publish topic, is it a forward)
        self._relays: dict[int, tuple[mqtt.MQTTMessage, str, bool]] = {}
        self._idle = asyncio.Event()
        self._idle.set()
        self._on_subscribed_cb = on_subscribed
        self._on_undelivered_cb = on_undelivered
        self._c.manual_ack_set(True)
        self._c.on_subscribe = self._on_suback
        self._c.on_unsubscribe = self._on_unsuback

    # -- subscriptions ----------------------------------------------------------------

    @property
    def subscribed(self) -> bool:
        """Connected, and every subscription acknowledged since the connection came up."""
        return self._subscribed.is_set()

    @property
    def pending_relays(self) -> int:
        return len(self._relays)

    def subscribe(
        self, topic: str, handler: Callable[[mqtt.MQTTMessage], None], qos: int = 1
    ) -> None:
        """Route messages matching ``topic`` to ``handler``, which must acknowledge each one
        (:meth:`ack` or :meth:`relay`)."""

        def on_message(_c: mqtt.Client, _u: Any, msg: mqtt.MQTTMessage) -> None:
            try:
                handler(msg)
            except Exception:  # nothing a message carries may stop the connection
                log.exception("handler for %s failed", msg.topic)

        self._c.message_callback_add(_callback_filter(topic), on_message)
        self._wanted[topic] = qos
        if self.connected:
            self._request_subscription(topic, qos)

    async def async_wait_subscribed(self, timeout: float = 10.0) -> None:
        """Until every subscription is acknowledged; a refused one is a TransportError."""
        try:
            async with asyncio.timeout(timeout):
                await self._subscribed.wait()
        except TimeoutError as e:
            raise TransportError(f"no SUBACK from the broker in {timeout:.0f} s") from e
        if self._refused_subs:
            raise TransportError(
                "the broker refused subscriptions: " + "; ".join(self._refused_subs)
            )

    async def async_unsubscribe(self, topic: str, timeout: float = 5.0) -> None:
        """Leave ``topic``; returns once the broker acknowledges (or at once when offline)."""
        self._wanted.pop(topic, None)
        rc, mid = self._c.unsubscribe(topic)
        if rc != mqtt.MQTT_ERR_SUCCESS or mid is None:
            return
        fut: asyncio.Future[None] = asyncio.get_running_loop().create_future()
        self._unsubacks[mid] = fut
        try:
            async with asyncio.timeout(timeout):
                await fut
        finally:
            self._unsubacks.pop(mid, None)

    def _request_subscription(self, topic: str, qos: int) -> None:
        rc, mid = self._c.subscribe(topic, qos)
        if rc == mqtt.MQTT_ERR_SUCCESS and mid is not None:
            self._subacks[mid] = topic
            self._subscribed.clear()

    def _on_connect(
        self, client: mqtt.Client, userdata: Any, flags: Any, rc: ReasonCode, props: Any
    ) -> None:
        self._subscribed.clear()
        super()._on_connect(client, userdata, flags, rc, props)
        if rc.is_failure:
            return
        self._subacks.clear()
        self._refused_subs.clear()
        for topic, qos in self._wanted.items():
            self._request_subscription(topic, qos)
        if not self._subacks:
            self._all_subscribed()

    def _on_disconnect(
        self, client: mqtt.Client, userdata: Any, flags: Any, rc: ReasonCode, props: Any
    ) -> None:
        self._subscribed.clear()
        super()._on_disconnect(client, userdata, flags, rc, props)

    def _on_suback(
        self, client: mqtt.Client, userdata: Any, mid: int, codes: list[ReasonCode], props: Any
    ) -> None:
        topic = self._subacks.pop(mid, None)
        if topic is None:
            return
        for code in codes:
            if code.is_failure:
                log.error("the broker refused the subscription %s: %s", topic, code)
                self._refused_subs.append(f"{topic}: {code}")
        if not self._subacks:
            self._all_subscribed()

    def _all_subscribed(self) -> None:
        self._subscribed.set()
        if self._on_subscribed_cb is not None:
            self._on_subscribed_cb()

    def _on_unsuback(
        self, client: mqtt.Client, userdata: Any, mid: int, codes: Any, props: Any
    ) -> None:
        fut = self._unsubacks.pop(mid, None)
        if fut is not None and not fut.done():
            fut.set_result(None)

    # -- acknowledgement --------------------------------------------------------------

    def ack(self, msg: mqtt.MQTTMessage) -> None:
        """Acknowledge a received message now."""
        if msg.qos:
            self._c.ack(msg.mid, msg.qos)

    def relay(
        self,
        topic: str,
        payload: bytes | bytearray,
        qos: int,
        props: Properties | None,
        *,
        after: mqtt.MQTTMessage,
        forward: bool = True,
    ) -> None:
        """Publish, and acknowledge ``after`` once the broker has the publish."""
        info = self._c.publish(topic, payload, qos, False, props)
        if info.rc not in (mqtt.MQTT_ERR_SUCCESS, mqtt.MQTT_ERR_NO_CONN):
            self.ack(after)
            raise TransportError(f"publish to {topic[:200]} failed: {mqtt.error_string(info.rc)}")
        if qos == 0 or after.qos == 0:
            self.ack(after)
            return
        self._relays[info.mid] = (after, topic, forward)
        self._idle.clear()

    async def async_drain(self, timeout: float) -> None:
        """Until every relayed publish is acknowledged (and so every request it came from)."""
        async with asyncio.timeout(timeout):
            await self._idle.wait()

    def _on_publish(
        self, client: mqtt.Client, userdata: Any, mid: int, rc: ReasonCode, props: Any
    ) -> None:
        relay = self._relays.pop(mid, None)
        if relay is not None:
            msg, topic, forward = relay
            handled = False
            if rc.is_failure or rc.value == NO_MATCHING_SUBSCRIBERS:
                # An answer nobody listens for is the device's business; a lost forward is ours.
                log.log(
                    logging.WARNING if forward else logging.DEBUG,
                    "publish to %s: %s",
                    topic[:200],
                    rc,
                )
                if forward and self._on_undelivered_cb is not None:
                    # The callback answers the request and owns its acknowledgement.
                    try:
                        self._on_undelivered_cb(msg, topic, rc)
                        handled = True
                    except Exception:
                        log.exception("answering an undelivered request failed")
            if not handled:
                self.ack(msg)
            if not self._relays:
                self._idle.set()
        super()._on_publish(client, userdata, mid, rc, props)


# -- the router ---------------------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class RouterConfig:
    """Everything a router needs, read once at start-up."""

    home: Path
    broker: str
    name: str = "main"
    topic_root: str = DEFAULT_TOPIC_ROOT
    #: The nodes' heartbeat period, for nodes whose status does not state theirs.
    heartbeat_s: float = 2.0
    queue_limit: int = DEFAULT_QUEUE_LIMIT
    keepalive_s: int = 5
    #: Long enough to ride out a restart; short enough that a router gone for good stops
    #: holding (and receiving, see the module docstring) a share of the requests.
    session_expiry_s: int = 120
    #: ``(host, port)`` of the plain-HTTP ``/metrics`` endpoint; None: no endpoint.
    metrics: tuple[str, int] | None = None
    share_group: str = SHARE_GROUP
    #: Seed for the tie-breaking random choice (tests); None: from the OS.
    seed: int | None = None
    #: The site this router serves, behind a site broker bridged to the cloud; None: the
    #: cloud's (or a single broker's) router, which reaches every node directly.
    site: str | None = None


def relay_properties(props: Properties | None, elapsed: float) -> tuple[Properties | None, bool]:
    """The device's MQTT 5 properties for a forward, and whether its message expiry has passed.

    Copied as received (the broker already counted its own time off the expiry); the
    expiry loses the whole seconds spent in the router.
    """
    if props is None:
        return None, False
    out: Properties | None = None
    for name in (
        "ResponseTopic",
        "CorrelationData",
        "ContentType",
        "PayloadFormatIndicator",
        "UserProperty",
    ):
        value = getattr(props, name, None)
        if value is not None:
            if out is None:
                out = Properties(PacketTypes.PUBLISH)
            setattr(out, name, value)
    expiry = getattr(props, "MessageExpiryInterval", None)
    if expiry is not None:
        if elapsed >= expiry:
            return None, True
        if out is None:
            out = Properties(PacketTypes.PUBLISH)
        out.MessageExpiryInterval = expiry - int(elapsed)
    return out, False


def _not_cloud(entry: NodeEntry) -> str | None:
    return "a cloud node" if entry.labels.get("tier") == "cloud" else None


class Router:
    """One router, owned by one event loop."""

    def __init__(self, cfg: RouterConfig) -> None:
        self.cfg = cfg
        home = Home(cfg.home)
        self.identity: Identity = lookup.identity(home, Role.ROUTER, cfg.name)
        TrustStore.from_home(home).verify(self.identity.cert, role=Role.ROUTER)
        self.table = ReplicaTable(heartbeat_s=cfg.heartbeat_s, queue_limit=cfg.queue_limit)
        self.metrics = RouterMetrics()
        self.rng = random.Random(cfg.seed)
        root = cfg.topic_root
        self.replies = f"{root}/replies/"
        self.invoke_filter = f"$share/{cfg.share_group}/{root}/fn/+/+/invoke"
        self.spill_filter = f"$share/{cfg.share_group}/{root}/spill/+/+"
        self._spill_prefix = f"{root}/spill/"
        self._fn_prefix = f"{root}/fn/"
        self._nodes_prefix = f"{root}/nodes/"
        self._held: list[mqtt.MQTTMessage] = []
        self._changed = asyncio.Event()
        self._runner: web.AppRunner | None = None
        self._stopped = False
        self.metrics_port = 0
        self.client = RouterClient(
            cfg.broker,
            self.identity.cn,
            ssl_context=client_context(self.identity, home.ca_cert),
            keepalive=cfg.keepalive_s,
            session_expiry=cfg.session_expiry_s,
            on_subscribed=self._on_subscribed,
            on_undelivered=self._on_undelivered,
        )
        # The control topics first: their retained messages arrive before the SUBACK of the
        # request subscription, so the table is filled before the first request.
        self.client.subscribe(f"{root}/nodes/+/status", self._on_status, qos=1)
        self.client.subscribe(f"{root}/nodes/+/assign", self._on_assign, qos=1)
        self.client.subscribe(f"{root}/nodes/+/heartbeat", self._on_heartbeat, qos=0)
        # QoS 2 so a request keeps whatever QoS the device gave it.
        self.client.subscribe(self.invoke_filter, self._on_request, qos=2)
        self.client.subscribe(self.spill_filter, self._on_spill, qos=2)

    # -- life cycle -------------------------------------------------------------------

    async def async_start(self, timeout: float = 10.0) -> None:
        """Connect and subscribe; returns once requests can be routed."""
        try:
            if self.cfg.metrics is not None:
                host, port = self.cfg.metrics
                self._runner, self.metrics_port = await async_start_metrics(
                    self.metrics, host, port
                )
            await self.client.async_start(timeout)
            await self.client.async_wait_subscribed(timeout)
        except BaseException:
            await self._async_close(1.0)
            raise
        log.info(
            "router %s ready: %s%s",
            self.cfg.name,
            self.invoke_filter,
            f", metrics on port {self.metrics_port}" if self._runner else "",
        )

    async def async_stop(self, timeout: float = 10.0) -> None:
        """Ordered, time-limited shutdown: stop taking requests, flush, disconnect. Idempotent."""
        if self._stopped:
            return
        self._stopped = True
        loop = asyncio.get_running_loop()
        end = loop.time() + timeout
        if self.client.connected:
            for shared in (self.invoke_filter, self.spill_filter):
                try:
                    await self.client.async_unsubscribe(
                        shared, timeout=max(0.5, (end - loop.time()) / 4)
                    )
                except (TransportError, TimeoutError) as e:
                    log.warning("could not leave the shared subscription %s: %s", shared, e)
            try:
                await self.client.async_drain(max(0.5, (end - loop.time()) / 2))
            except TimeoutError:
                log.warning(
                    "%d forwards still unacknowledged at shutdown", self.client.pending_relays
                )
        if self._held:
            # Unacknowledged, so the broker gives them to this session again next time.
            log.warning("%d requests left to this router's session", len(self._held))
            self._held.clear()
        await self._async_close(max(0.5, end - loop.time()))

    async def _async_close(self, timeout: float) -> None:
        if self._runner is not None:
            await self._runner.cleanup()
            self._runner = None
        await self.client.async_stop(timeout)

    async def async_wait_until(self, pred: Callable[[], Any], timeout: float = 10.0) -> Any:
        """Until ``pred()`` is true, re-checked after each status, assign or heartbeat."""
        loop = asyncio.get_running_loop()
        end = loop.time() + timeout
        while True:
            got = pred()
            if got:
                return got
            left = end - loop.time()
            if left <= 0:
                raise TimeoutError("the replica table never satisfied the condition")
            self._changed.clear()
            with contextlib.suppress(TimeoutError):
                async with asyncio.timeout(left):
                    await self._changed.wait()

    # -- control topics ---------------------------------------------------------------

    def _node_of(self, topic: str, kind: str) -> str | None:
        node = topic[len(self._nodes_prefix) : -len(kind) - 1]
        return node if node and "/" not in node else None

    def _apply(self, msg: mqtt.MQTTMessage, kind: str, apply: Callable[[str, Any], None]) -> None:
        try:
            node = self._node_of(msg.topic, kind)
            if node is None:
                return
            payload = msg.payload
            body: Any = None
            if payload:
                try:
                    body = json.loads(payload)
                except (ValueError, UnicodeDecodeError) as e:
                    raise ControlMessageError(f"not JSON: {str(e)[:200]}") from e
                if not isinstance(body, dict):
                    raise ControlMessageError("not a JSON object")
            apply(node, body)
            self._changed.set()
        except ControlMessageError as e:
            self.metrics.bad_control(kind)
            log.warning("ignored %s on %s: %s", kind, msg.topic[:200], e)
        finally:
            self.client.ack(msg)

    def _on_status(self, msg: mqtt.MQTTMessage) -> None:
        self._apply(msg, "status", lambda n, b: self.table.apply_status(n, b, time.monotonic()))

    def _on_assign(self, msg: mqtt.MQTTMessage) -> None:
        self._apply(msg, "assign", self.table.apply_assign)

    def _on_heartbeat(self, msg: mqtt.MQTTMessage) -> None:
        def apply(node: str, body: Any) -> None:
            if body is not None:
                self.table.apply_heartbeat(node, body, time.monotonic())

        self._apply(msg, "heartbeat", apply)

    # -- requests ---------------------------------------------------------------------

    def _on_subscribed(self) -> None:
        # Requests a persistent session delivered before the control topics were back.
        held, self._held = self._held, []
        for msg in held:
            self._on_request(msg)

    def _on_request(self, msg: mqtt.MQTTMessage) -> None:
        if not self.client.subscribed:
            self._held.append(msg)
            return
        try:
            self._route(msg)
        except TransportError as e:  # relay() has acknowledged the request
            self.metrics.undelivered("publish_failed")
            log.warning("dropped a request on %s: %s", msg.topic[:200], e)
        except Exception:  # nothing a request carries may stop the router
            log.exception("unexpected failure routing a request on %s", msg.topic[:200])
            self.client.ack(msg)

    def _on_spill(self, msg: mqtt.MQTTMessage) -> None:
        """A request an edge node could not admit: place it on an allowed cloud replica."""
        if not self.client.subscribed:
            self._held.append(msg)
            return
        try:
            now = time.monotonic()
            fid = msg.topic[len(self._spill_prefix) :]
            ns, sep, name = fid.partition("/")
            if not (sep and ns and name and "/" not in name):
                self._answer(
                    msg, ErrorCode.NOT_FOUND, f"topic {msg.topic[:200]!r} names no function"
                )
                return
            choice = self.table.choose_spill(fid, now, self.rng)
            if choice.replica is None:
                self._answer(msg, ErrorCode.SATURATED, choice.reason)
                return
            props, expired = relay_properties(msg.properties, now - msg.timestamp)
            if expired:
                self._answer(msg, ErrorCode.TIMEOUT, "the request expired before it was spilled")
                return
            self.client.relay(
                f"{self._nodes_prefix}{choice.replica.node}/spill/{fid}",
                msg.payload,
                msg.qos,
                props,
                after=msg,
            )
            self.table.note_forward(choice.replica.node)
            self.metrics.forwarded(fid, choice.replica.node)
            self.metrics.spilled(fid)
        except TransportError as e:
            self.metrics.undelivered("publish_failed")
            log.warning("dropped a spilled request on %s: %s", msg.topic[:200], e)
        except Exception:  # nothing a request carries may stop the router
            log.exception("unexpected failure spilling a request on %s", msg.topic[:200])
            self.client.ack(msg)

    def _function_of(self, topic: str) -> str | None:
        fid = topic[len(self._fn_prefix) : -len(_INVOKE)]
        ns, sep, name = fid.partition("/")
        return fid if sep and ns and name and "/" not in name else None

    def _route(self, msg: mqtt.MQTTMessage) -> None:
        now = time.monotonic()
        topic = msg.topic
        fid = self._function_of(topic)
        if fid is None:
            self._answer(msg, ErrorCode.NOT_FOUND, f"topic {topic[:200]!r} names no function")
            return
        inbox = "invoke"
        if self.cfg.site is not None:
            # A site's router reaches only its own site's nodes directly; cloud replicas
            # are reached through their spill inbox, the one node topic the bridge carries.
            choice = self.table.choose(fid, now, self.rng, accept=self._at_this_site)
            if choice.replica is None:
                spill = self.table.choose_spill(fid, now, self.rng)
                if spill.replica is not None:
                    choice, inbox = spill, "spill"
                    self.metrics.spilled(fid)
        else:
            # Edge replicas first (close to the data, already paid for); cloud ones take
            # what the edge cannot (below), or everything when no edge replica has room.
            choice = self.table.choose(fid, now, self.rng, accept=_not_cloud)
            if choice.replica is None:
                choice = self.table.choose(fid, now, self.rng)
        replica = choice.replica
        if replica is None:
            assert choice.code is not None
            self._answer(msg, choice.code, choice.reason)
            return
        props, expired = relay_properties(msg.properties, now - msg.timestamp)
        if expired:
            self._answer(msg, ErrorCode.TIMEOUT, "the request expired before it was routed")
            return
        objective = self.table.objective(fid)
        if objective is not None and inbox == "invoke" and replica.labels.get("tier") != "cloud":
            edge_ms = self.table.estimate_ms(self.table.nodes[replica.node], fid)
            if edge_ms > objective:
                # The edge would break the objective: an allowed cloud replica, if faster.
                cloud = self.table.choose_spill(fid, now, self.rng).replica
                if cloud is not None and (
                    self.table.estimate_ms(self.table.nodes[cloud.node], fid) < edge_ms
                ):
                    replica, inbox = cloud, "spill"
                    self.metrics.spilled(fid)
        self.client.relay(
            f"{self._nodes_prefix}{replica.node}/{inbox}/{fid}",
            msg.payload,
            msg.qos,
            props,
            after=msg,
        )
        self.table.note_forward(replica.node)
        self.metrics.forwarded(fid, replica.node)

    def _at_this_site(self, entry: NodeEntry) -> str | None:
        site = entry.labels.get("site")
        return None if site == self.cfg.site else f"at site {site!r}, not {self.cfg.site!r}"

    def _on_undelivered(self, msg: mqtt.MQTTMessage, topic: str, rc: ReasonCode) -> None:
        """A forward went nowhere (no node session subscribed) or was refused: answer it."""
        node = topic[len(self._nodes_prefix) :].split("/", 1)[0]
        if rc.is_failure:
            self.metrics.undelivered("refused")
            self._answer(msg, ErrorCode.INTERNAL, f"the broker refused the forward to {node}: {rc}")
        else:
            self.metrics.undelivered("no_subscriber")
            self._answer(msg, ErrorCode.SATURATED, f"node {node} is not listening")

    def reply_allowed(self, topic: str) -> bool:
        return (
            topic.startswith(self.replies)
            and len(topic) > len(self.replies)
            and "+" not in topic
            and "#" not in topic
            and "\x00" not in topic
        )

    def _answer(self, msg: mqtt.MQTTMessage, code: ErrorCode, reason: str) -> None:
        """Answer a request the router cannot forward, on its reply topic if that is allowed.

        The request is acknowledged either way (once the answer is, when there is one).
        """
        props = msg.properties
        response_topic = getattr(props, "ResponseTopic", None) if props else None
        correlation = getattr(props, "CorrelationData", None) if props else None
        content_type = getattr(props, "ContentType", None) if props else None
        payload = bytes(msg.payload)
        rid, reply_to = peek_envelope(payload, content_type)
        topic = response_topic or reply_to
        if not topic or not self.reply_allowed(topic):
            reason_key = "missing" if not topic else "outside"
            self.metrics.refused(reason_key)
            log.warning(
                "not answering %s (%s) to a request on %s: %s",
                code.value,
                reason,
                msg.topic[:200],
                "it has no reply topic"
                if not topic
                else f"reply topic {topic[:200]!r} is outside {self.replies}",
            )
            self.client.ack(msg)
            return
        try:
            encoding = detect_encoding(payload, content_type)
        except MessageError:
            encoding = Encoding.JSON
        if rid is None:
            rid = correlation.hex() if correlation else ""
        body = encode_error(ErrorReply(rid, code, reason), encoding)
        self.client.relay(
            topic,
            body,
            msg.qos,
            properties(content_type=encoding.content_type, correlation=correlation),
            after=msg,
            forward=False,
        )
        self.metrics.answered(code)
        log.debug("answered %s on %s: %s", code.value, topic[:200], reason)


async def async_run(cfg: RouterConfig) -> None:
    """Run a router until SIGINT or SIGTERM, then shut down in order."""
    router = Router(cfg)
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGINT, signal.SIGTERM):
        loop.add_signal_handler(sig, stop.set)
    try:
        await router.async_start()
        await stop.wait()
        log.info("router %s stopping", cfg.name)
    finally:
        await router.async_stop()
        for sig in (signal.SIGINT, signal.SIGTERM):
            loop.remove_signal_handler(sig)
    log.info("router %s stopped", cfg.name)
