"""The coordinator process: REST API over mutual TLS, registry, reconciler.

Resources live in aiohttp ``cleanup_ctx`` generators, started in order and
closed in reverse: the store, the MQTT connection (with the registry's
subscriptions and the HTTP invoker), then the reconciler.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import signal
import ssl
import time
from collections.abc import AsyncIterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from aiohttp import web

from fnmesh.agent.mqtt import MqttClient
from fnmesh.certs import lookup
from fnmesh.certs.home import DEFAULT_TOPIC_ROOT, Home
from fnmesh.certs.identity import Role
from fnmesh.certs.tls import client_context, server_context
from fnmesh.certs.trust import TrustStore
from fnmesh.coordinator import tokens
from fnmesh.coordinator.api.auth import TOKEN_KEY, TRUST_KEY, identity_middleware
from fnmesh.coordinator.api.enrol_routes import routes as enrol_routes
from fnmesh.coordinator.api.policy_routes import routes as policy_routes
from fnmesh.coordinator.api.routes import routes
from fnmesh.coordinator.api.state import CTX, Context
from fnmesh.coordinator.audit import AuditLog
from fnmesh.coordinator.broker_control import BrokerControl
from fnmesh.coordinator.discovery import AgentBrowser, CoordinatorAdvertiser, DiscoveredNode
from fnmesh.coordinator.enrolment import EnrolmentQueue
from fnmesh.coordinator.grants import Grants
from fnmesh.coordinator.invoker import MqttInvoker
from fnmesh.coordinator.metrics import CoordinatorMetrics
from fnmesh.coordinator.reconciler import Reconciler
from fnmesh.coordinator.registry import NodeView, Registry
from fnmesh.coordinator.revocation import CrlPublisher
from fnmesh.coordinator.store import BlobStore, Store

log = logging.getLogger("fnmesh.coordinator")


@dataclass(frozen=True, slots=True)
class CoordinatorConfig:
    home: Path
    broker: str
    host: str = "127.0.0.1"
    port: int = 8443
    topic_root: str = DEFAULT_TOPIC_ROOT
    db_url: str | None = None
    state_dir: Path | None = None
    #: How long an offline node keeps its assignment before it is cleared.
    offline_timeout_s: float = 300.0
    heartbeat_s: float = 2.0
    advertise_url: str | None = None
    #: The broker ACL file this coordinator keeps in step with grants and revocations.
    acl_path: Path | None = None
    #: File with the PID of the Mosquitto to reload after an ACL or CRL change.
    broker_pid_file: Path | None = None
    extra: dict[str, Any] = field(default_factory=dict)
    #: Advertise ``_fnmesh._tcp`` and browse for agents on these interfaces (names or
    #: addresses); None: no mDNS at all. ``("127.0.0.1",)`` keeps it on loopback.
    discover_interfaces: tuple[str, ...] | None = None
    #: The broker URL agents are told over mDNS (default: ``broker``).
    advertise_broker: str | None = None
    #: Requests from certificate-less nodes kept pending at once (0: no enrolment endpoint).
    max_pending_enrolments: int = 32

    @property
    def state(self) -> Path:
        return self.state_dir or (self.home / "coordinator")

    @property
    def url(self) -> str:
        return self.advertise_url or f"https://{self.host}:{self.port}"


def build_app(cfg: CoordinatorConfig) -> web.Application:
    home = Home(cfg.home)
    identity = lookup.identity(home, Role.COORDINATOR, "main")
    trust_holder = {"store": TrustStore.from_home(home), "mtime": 0.0}

    def trust() -> TrustStore:
        # The revocation list may be re-signed while we run: reload it when it changes.
        try:
            mtime = home.crl.stat().st_mtime
        except FileNotFoundError:
            mtime = 0.0
        if mtime != trust_holder["mtime"]:
            trust_holder["store"] = TrustStore.from_home(home)
            trust_holder["mtime"] = mtime
        store: TrustStore = trust_holder["store"]  # type: ignore[assignment]
        return store

    app = web.Application(middlewares=[identity_middleware], client_max_size=4 << 30)
    app[TRUST_KEY] = trust
    app[TOKEN_KEY] = lambda text: tokens.verify(text, identity, trust())
    app.router.add_routes(routes)
    app.router.add_routes(policy_routes)
    app.router.add_routes(enrol_routes)

    async def resources(app: web.Application) -> AsyncIterator[None]:
        cfg.state.mkdir(parents=True, exist_ok=True)
        db_url = cfg.db_url or f"sqlite+aiosqlite:///{cfg.state / 'coordinator.db'}"
        store = await Store.open(db_url)
        blobs = BlobStore(cfg.state / "blobs")
        metrics = CoordinatorMetrics()
        mqtt = MqttClient(
            cfg.broker,
            identity.cn,
            ssl_context=client_context(identity, home.ca_cert),
            keepalive=10,
        )
        reconciler_ref: list[Reconciler] = []

        def changed(name: str, old: NodeView | None, new: NodeView) -> None:
            if (
                old is not None
                and old.state == new.state
                and old.functions == new.functions
                and old.draining == new.draining
            ):
                return
            metrics.reconciles.inc()
            t = asyncio.get_running_loop().create_task(
                store.upsert_node(
                    new.name,
                    new.cn,
                    new.labels,
                    new.hardware,
                    new.state,
                    {"functions": new.functions, "http": new.http},
                    new.fingerprint,
                    new.last_heartbeat or time.time(),
                )
            )
            pending.add(t)
            t.add_done_callback(pending.discard)
            browser = app[CTX].browser if CTX in app else None
            # The certificate it showed over mutual TLS outranks anything heard on the LAN.
            if (
                browser is not None
                and new.fingerprint
                and new.cn == f"node.{name}"
                and browser.fingerprint_of(name) != new.fingerprint
            ):
                browser.trust(name, new.fingerprint)
            if reconciler_ref:
                reconciler_ref[0].kick()

        pending: set[asyncio.Task[Any]] = set()
        registry = Registry(heartbeat_period=cfg.heartbeat_s, on_change=changed)
        registry.load(
            [
                NodeView(
                    name=n.name,
                    cn=n.cn,
                    state="unknown",
                    labels=n.labels,
                    hardware=n.hardware,
                    fingerprint=n.fingerprint,
                    draining=n.draining,
                    functions=dict(n.status.get("functions", {})),
                )
                for n in await store.list_nodes()
            ]
        )
        prefix = f"{cfg.topic_root}/nodes/"
        mqtt.subscribe(
            prefix + "+/status",
            lambda m: registry.on_status(m.topic[len(prefix) :].split("/")[0], bytes(m.payload)),
        )
        mqtt.subscribe(
            prefix + "+/heartbeat",
            lambda m: registry.on_heartbeat(m.topic[len(prefix) :].split("/")[0], bytes(m.payload)),
            qos=0,
        )
        invoker = MqttInvoker(mqtt, cfg.topic_root)
        reconciler = Reconciler(
            store=store,
            blobs=blobs,
            registry=registry,
            mqtt=mqtt,
            home=home,
            trust=trust,
            identity=identity,
            root=cfg.topic_root,
            coordinator_url=cfg.url,
            offline_timeout_s=cfg.offline_timeout_s,
        )
        reconciler_ref.append(reconciler)
        audit = AuditLog(store)
        grants = Grants(store)
        broker = BrokerControl(home, grants, cfg.topic_root, cfg.acl_path, cfg.broker_pid_file)

        async def after_revocation() -> None:
            await broker.async_refresh()
            await audit.append("crl", identity.cn, {"revoked": len(trust().revoked)})

        crl = CrlPublisher(home.crl, mqtt, cfg.topic_root, hooks=[after_revocation])
        app[CTX] = Context(
            store=store,
            blobs=blobs,
            registry=registry,
            reconciler=reconciler,
            mqtt=mqtt,
            invoker=invoker,
            identity=identity,
            trust=trust,
            metrics=metrics,
            audit=audit,
            grants=grants,
            broker=broker,
            home=home,
            crl_publisher=crl,
            enrolments=EnrolmentQueue(home, cfg.max_pending_enrolments)
            if cfg.max_pending_enrolments > 0
            else None,
        )
        await mqtt.async_start()
        await broker.async_refresh()
        await crl.async_check()
        crl.start()
        reconciler.start()
        reconciler.kick()
        try:
            yield
        finally:
            await reconciler.async_stop()
            await crl.async_stop()
            for t in list(pending):
                with contextlib.suppress(Exception):
                    await t
            await mqtt.async_stop()
            await store.close()

    app.cleanup_ctx.append(resources)
    if cfg.discover_interfaces is not None:
        app.cleanup_ctx.append(lambda app: _lan_discovery(app, cfg, home))
    return app


async def _lan_discovery(
    app: web.Application, cfg: CoordinatorConfig, home: Home
) -> AsyncIterator[None]:
    """Advertise ``_fnmesh._tcp`` and browse ``_fnmesh-agent._tcp`` on the configured interfaces."""
    from fnmesh.agent.advertise import new_zeroconf
    from fnmesh.certs.identity import fingerprint as cert_fingerprint
    from fnmesh.certs.identity import load_cert

    c = app[CTX]
    interfaces = list(cfg.discover_interfaces or ())
    ca_fp = cert_fingerprint(load_cert(home.ca_cert))

    def on_change(node: DiscoveredNode) -> None:
        approved = c.enrolments.by_node(node.name) if c.enrolments is not None else None
        if (
            not node.untrusted
            and approved is not None
            and approved.state == "approved"
            and node.fingerprint == approved.claim.key_fingerprint
        ):
            return  # its pending record, until it re-announces with its new certificate
        c.registry.on_lan_record(
            node.name,
            node.service,
            node.fingerprint,
            labels=node.labels,
            untrusted_reason=node.untrusted_reason,
        )
        c.reconciler.kick()

    zc = new_zeroconf(interfaces)
    browser = AgentBrowser(ca_fp, interfaces, on_change, zc=zc)
    for view in c.registry.snapshot().values():
        if view.fingerprint:
            browser.trust(view.name, view.fingerprint)
    advertiser = CoordinatorAdvertiser(
        cfg.url, cfg.advertise_broker or cfg.broker, ca_fp, interfaces, zc=zc
    )
    c.browser = browser
    await browser.async_start()
    await advertiser.async_start()
    log.info("mDNS: advertising %s and browsing agents on %s", cfg.url, interfaces)
    try:
        yield
    finally:
        c.browser = None
        await advertiser.async_stop()
        await browser.async_stop()
        await zc.async_close()


async def async_run(cfg: CoordinatorConfig, ready: asyncio.Event | None = None) -> None:
    """Serve until SIGINT/SIGTERM."""
    home = Home(cfg.home)
    identity = lookup.identity(home, Role.COORDINATOR, "main")
    app = build_app(cfg)
    runner = web.AppRunner(app, access_log=None, shutdown_timeout=5)
    await runner.setup()
    tls = server_context(identity, home.ca_cert, home.crl)
    if cfg.max_pending_enrolments > 0:
        # A node with no certificate yet may reach POST /v1/enrol; every other route still
        # requires one (the identity middleware), and a certificate presented is verified.
        tls.verify_mode = ssl.CERT_OPTIONAL
    site = web.TCPSite(runner, cfg.host, cfg.port, ssl_context=tls)
    await site.start()
    log.info("coordinator listening on %s", cfg.url)
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGINT, signal.SIGTERM):
        loop.add_signal_handler(sig, stop.set)
    if ready is not None:
        ready.set()
    try:
        await stop.wait()
    finally:
        await runner.cleanup()
