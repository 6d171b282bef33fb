"""The node agent: wires cache, warm pool, invocation service, MQTT, HTTP and presence.

Start-up order: identity and trust, bundle cache, warm pool, service, MQTT
(with a Last Will that says offline), HTTP, then the functions it serves, then
the status that says ready. Shutdown runs the other way, within a time limit:
stop taking work, drain what was admitted, say offline, close transports,
unload models.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import signal
import ssl
import time
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

from fnmesh.agent.assignments import Assignments
from fnmesh.agent.cache import BundleCache
from fnmesh.agent.dedup import ReplyCache
from fnmesh.agent.executors import NodeLoader
from fnmesh.agent.executors.base import Executor
from fnmesh.agent.http import async_start_http, build_app
from fnmesh.agent.inbox import Inbox
from fnmesh.agent.metrics import AgentMetrics
from fnmesh.agent.mqtt import MqttClient
from fnmesh.agent.presence import Presence, offline_will
from fnmesh.agent.probe import Hardware, probe, utilisation
from fnmesh.agent.revocation import RevocationFollower
from fnmesh.agent.runner import Runner
from fnmesh.agent.service import INLINE_RUN_S, InvocationService
from fnmesh.agent.warm_pool import PoolKey, WarmPool, threaded
from fnmesh.certs import lookup
from fnmesh.certs.errors import IdentityError
from fnmesh.certs.home import DEFAULT_TOPIC_ROOT, Home
from fnmesh.certs.identity import Identity, Role
from fnmesh.certs.tls import client_context, server_context
from fnmesh.certs.trust import TrustStore
from fnmesh.errors import MeshError
from fnmesh.functions.bundle import Bundle

log = logging.getLogger("fnmesh.agent")


@dataclass(frozen=True, slots=True)
class AgentConfig:
    """Everything an agent needs, read once at start-up."""

    home: Path
    name: str
    broker: str
    topic_root: str = DEFAULT_TOPIC_ROOT
    labels: dict[str, str] = field(default_factory=dict)
    http_host: str = "127.0.0.1"
    http_port: int = 0
    #: Warm pool budget; 0 = half of the usable memory.
    memory_budget_mb: int = 0
    idle_ttl_s: float = 300.0
    max_queue: int = 1024
    threads: int = 0
    intra_op_threads: int = 1
    #: Batches measured to need at most this much CPU run on the loop thread (0: never).
    inline_run_us: float = INLINE_RUN_S * 1e6
    heartbeat_s: float = 2.0
    keepalive_s: int = 5
    cache_budget_mb: int = 2048
    #: How long an answer is kept for a retried request (0 = no duplicate suppression).
    dedup_window_s: float = 300.0
    serve: tuple[Path, ...] = ()
    state_dir: Path | None = None
    #: The coordinator's API URL ("" when unknown: found over mDNS with ``discover``).
    coordinator: str = ""
    #: Find the coordinator and broker over mDNS (``_fnmesh._tcp``) instead of configuration.
    discover: bool = False
    #: Where to advertise ``_fnmesh-agent._tcp`` and look for coordinators (names or
    #: addresses); None: loopback when discovering, else no advertisement at all.
    interfaces: tuple[str, ...] | None = None
    discover_timeout_s: float = 60.0
    #: Enrol (ask the coordinator for a certificate) when this node has none.
    enrol: bool = False
    #: The fleet CA certificate the operator copied here (pins the coordinator when enrolling).
    ca_file: Path | None = None
    enrol_poll_s: float = 1.0

    @property
    def state(self) -> Path:
        return self.state_dir or (self.home / "agent" / self.name)


def parse_labels(text: str | None) -> dict[str, str]:
    """``region=eu-west,site=lyon-1,tier=edge`` -> a dict."""
    out: dict[str, str] = {}
    for part in (text or "").split(","):
        part = part.strip()
        if not part:
            continue
        k, sep, v = part.partition("=")
        if not sep or not k.strip():
            raise IdentityError(f"label {part!r} must be key=value")
        out[k.strip()] = v.strip()
    return out


class Agent:
    """One node agent, owned by one event loop."""

    def __init__(self, cfg: AgentConfig, *, hardware: Hardware | None = None) -> None:
        self.cfg = cfg
        self.home = Home(cfg.home)
        self.identity: Identity = lookup.identity(self.home, Role.NODE, cfg.name)
        if self.identity.enc_key is None:
            raise IdentityError(f"{self.identity.cn} has no encryption key (enc.key)")
        self.trust = TrustStore.from_home(self.home)
        self.trust.verify(self.identity.cert, role=Role.NODE)
        self.hardware = hardware or probe()
        self._loader = NodeLoader(self.hardware, intra_op_threads=cfg.intra_op_threads)
        # For a request waiting on a cold start: weights packed after it is answered.
        self._quick_loader = replace(self._loader, prepack=False)
        self.metrics = AgentMetrics(cfg.name)
        self.cache = BundleCache(
            cfg.state / "cache",
            self.identity.cn,
            self.identity.enc_key,
            self.trust,
            budget_bytes=cfg.cache_budget_mb << 20,
        )
        budget = cfg.memory_budget_mb or max(256, self.hardware.memory_usable_mib // 2)
        # Loads get threads of their own: a cold start never waits behind other functions' runs.
        self._loads = Runner(2, name="fnmesh-load")
        self.pool = WarmPool(
            budget << 20,
            cfg.idle_ttl_s,
            threaded(self._load, self._loads, quick=self._load_quick),
        )
        cores = self.hardware.cores_logical or os.cpu_count() or 1
        self.service = InvocationService(
            cfg.name,
            self.pool,
            self.metrics,
            threads=cfg.threads or max(1, cores),
            max_queue=cfg.max_queue,
            dedup=ReplyCache(ttl_s=cfg.dedup_window_s) if cfg.dedup_window_s > 0 else None,
            spill_allowed=lambda fid: self.assignments.allow_spill.get(fid, False),
            inline_run_s=cfg.inline_run_us / 1e6,
        )
        self.mqtt = MqttClient(
            cfg.broker,
            f"node.{cfg.name}",
            ssl_context=client_context(self.identity, self.home.ca_cert),
            keepalive=cfg.keepalive_s,
            will=offline_will(cfg.topic_root, cfg.name, self.identity.cn),
        )
        self.inbox = Inbox(
            self.mqtt, self.service, self.metrics, root=cfg.topic_root, node=cfg.name
        )
        self.presence = Presence(
            self.mqtt,
            root=cfg.topic_root,
            node=cfg.name,
            describe=self.describe,
            load=self.load_report,
            period_s=cfg.heartbeat_s,
            probe_coordinator=self._async_probe_coordinator,
        )
        self._http_client: Any = None
        self._probe_ctx: tuple[Identity, ssl.SSLContext] | None = None
        self._local: set[str] = set()
        self._tasks: set[asyncio.Task[Any]] = set()
        self.revoked_functions: dict[str, str] = {}
        self.load_errors: dict[str, str] = {}
        self.assignments = Assignments(
            node_cn=self.identity.cn,
            node=cfg.name,
            cache=self.cache,
            service=self.service,
            pool=self.pool,
            ssl_context=client_context(self.identity, self.home.ca_cert),
            local=lambda: self._local,
            on_change=self._async_status_if_connected,
            switch=self.async_switch,
        )
        self.revocations = RevocationFollower(
            lambda: self.trust, self._set_trust, self._async_on_revocations
        )
        self.http_port = 0
        self._runner: Any = None
        self._stopped = asyncio.Event()

    # -- what this node says about itself -------------------------------------------

    def describe(self) -> dict[str, Any]:
        return {
            "node": self.cfg.name,
            "cn": self.identity.cn,
            "fingerprint": self.identity.info.fingerprint,
            "labels": self.cfg.labels,
            "hardware": {
                "cores": self.hardware.cores_logical,
                "memory_mib": self.hardware.memory_usable_mib,
                "arch": self.hardware.arch,
                "gpus": [g.name for g in self.hardware.gpus],
                "gpu_arch": self.hardware.gpu_arch,
                "providers": list(self.hardware.ort_providers),
                "tensorrt": self.hardware.tensorrt_version,
                "summary": self.hardware.summary(),
            },
            "http": f"https://{self.cfg.http_host}:{self.http_port}" if self.http_port else None,
            "functions": {fid: s.manifest.version for fid, s in self.service.slots().items()},
            "heartbeat_s": self.cfg.heartbeat_s,
            "assignment": self.assignments.status(),
            "revoked": dict(self.revoked_functions),
            "load_errors": dict(self.load_errors),
            "crl_stale": self.revocations.stale(),
        }

    async def _async_probe_coordinator(self) -> float | None:
        """Round trip of one HTTPS call to the coordinator (a kept-alive connection), in ms."""
        url = self.assignments.coordinator_url
        if not url:
            return None
        import aiohttp

        if self._http_client is None:
            self._http_client = aiohttp.ClientSession(
                timeout=aiohttp.ClientTimeout(total=max(1.0, 2 * self.cfg.heartbeat_s))
            )
        # One context for the agent's identity: a new one per probe would also defeat the
        # kept-alive connection (aiohttp pools connections per SSL context).
        if self._probe_ctx is None or self._probe_ctx[0] is not self.identity:
            self._probe_ctx = (self.identity, client_context(self.identity, self.home.ca_cert))
        ctx = self._probe_ctx[1]
        t0 = time.perf_counter()
        try:
            async with self._http_client.get(f"{url.rstrip('/')}/v1/health", ssl=ctx) as r:
                await r.read()
        except (aiohttp.ClientError, TimeoutError):
            return None
        return (time.perf_counter() - t0) * 1000

    def load_report(self) -> dict[str, Any]:
        stats = self.pool.stats()
        functions: dict[str, dict[str, float]] = self.service.load()
        # Cumulative counters: the coordinator's autoscaler turns them into rates.
        for metric in self.metrics.registry.collect():
            if metric.name not in ("fnmesh_agent_answers", "fnmesh_agent_spilled"):
                continue
            key = "answers" if metric.name == "fnmesh_agent_answers" else "spilled"
            for sample in metric.samples:
                fl = functions.get(sample.labels.get("function", ""))
                if fl is not None and sample.name.endswith("_total"):
                    fl[key] = fl.get(key, 0) + sample.value
        for fl in functions.values():
            fl.setdefault("answers", 0)
            fl.setdefault("spilled", 0)
        return {
            "functions": functions,
            "loaded": [f"{k[0]}@{k[1]}" for k in stats.loaded],
            "pool_bytes": stats.bytes,
            "utilisation": utilisation(),
        }

    async def _async_end_start_grace(self, grace_s: float = 10.0) -> None:
        """Unknown functions are "not found" once the first assignment is applied, or after
        ``grace_s`` for a node that is given none."""
        with contextlib.suppress(TimeoutError):
            async with asyncio.timeout(grace_s):
                await self.assignments.applied.wait()
        self.service.starting = False

    def _spawn(self, coro: Any) -> None:
        t = asyncio.get_running_loop().create_task(coro)
        self._tasks.add(t)
        t.add_done_callback(self._tasks.discard)

    def _set_trust(self, trust: TrustStore) -> None:
        self.trust = trust
        self.cache.trust = trust

    async def _async_on_revocations(self, trust: TrustStore) -> None:
        """Stop serving every function whose publisher is now revoked."""
        for fid, slot in self.service.slots().items():
            try:
                self.cache.manifest(slot.digest)
            except MeshError as e:
                log.warning("no longer serving %s@%s: %s", fid, slot.manifest.version, e)
                self.revoked_functions[fid] = str(e)
                await self.service.async_remove(fid, moved=False)
        await self._async_status_if_connected()

    async def _async_status_if_connected(self) -> None:
        if self.mqtt.connected:
            await self.presence.async_publish_status()

    # -- loading --------------------------------------------------------------------

    def _load(self, key: PoolKey, loader: NodeLoader | None = None) -> Executor:
        """Verify, decrypt (memory only) and load a function. Runs on a worker thread."""
        slot = self.service.slot_for_key(key)
        if slot is None:
            raise IdentityError(f"{key[0]}@{key[1]} is not assigned to this node")
        manifest, ex = self.cache.load(
            slot.digest, loader or self._loader, allow_rollback=slot.allow_rollback
        )
        self.cache.mark_run(manifest)
        return ex

    def _load_quick(self, key: PoolKey) -> Executor:
        """``_load`` for a request that waits: weights are packed once it is answered."""
        return self._load(key, self._quick_loader)

    async def async_serve_bundle(self, data: bytes, *, prewarm: bool = True) -> Bundle:
        """Store a bundle (it must carry a key for this node) and start serving it.

        With ``prewarm``, a version that cannot load here is taken back (the
        previous one, if any, keeps serving) and the error is raised.
        """
        loop = asyncio.get_running_loop()
        pinned = {s.digest for s in self.service.slots().values()}
        bundle = await loop.run_in_executor(None, lambda: self.cache.put(data, pinned=pinned))
        self.cache.check_version(bundle.manifest, allow_rollback=False)
        await self.async_switch(bundle, prewarm=prewarm)
        # A node given its functions directly is configured: no start-up grace.
        self.service.starting = False
        if self.mqtt.connected:
            await self.presence.async_publish_status()
        return bundle

    async def async_switch(
        self, bundle: Bundle, allow_rollback: bool = False, *, prewarm: bool = True
    ) -> None:
        """Serve ``bundle``'s version; with ``prewarm`` it is loaded before it takes requests.

        Requests keep going to the version being replaced until the new one is
        loaded (no cold start, no failed request during a rolling update); a
        version that cannot load here is dropped and the old one keeps serving.
        """
        m = bundle.manifest
        if not prewarm:
            self.service.serve(m, bundle.digest, allow_rollback=allow_rollback)
            return
        previous = self.service.slots().get(m.name)
        if previous is not None and previous.digest == bundle.digest:
            return
        self.service.stage(m, bundle.digest, allow_rollback=allow_rollback)
        try:
            await self.pool.async_prewarm((m.name, m.version))
        except MeshError:
            self.service.unstage(m, bundle.digest)
            raise
        self.service.serve(m, bundle.digest, allow_rollback=allow_rollback)

    # -- life cycle -----------------------------------------------------------------

    async def async_start(self) -> None:
        self.pool.start_sweeper(min(30.0, max(1.0, self.cfg.idle_ttl_s / 4)))
        self.inbox.start()
        self.mqtt.subscribe(
            f"{self.cfg.topic_root}/crl",
            lambda msg: self._spawn(self.revocations.async_on_message(bytes(msg.payload))),
            qos=1,
        )
        self.mqtt.add_connect_hook(self.presence.async_publish_status)
        app = build_app(self.service, self.metrics)
        tls = server_context(self.identity, self.home.ca_cert, self.home.crl)
        self._runner, self.http_port = await async_start_http(
            app, self.cfg.http_host, self.cfg.http_port, tls
        )
        for path in self.cfg.serve:
            try:
                b = await self.async_serve_bundle(path.read_bytes())
            except MeshError as e:
                # One bundle that cannot be served here must not keep the node down.
                log.error("not serving %s: %s", path, e)
                self.load_errors[str(path)] = str(e)
                continue
            self._local.add(b.manifest.name)
        self.assignments.start()
        self._spawn(self._async_end_start_grace())
        self.mqtt.subscribe(
            f"{self.cfg.topic_root}/nodes/{self.cfg.name}/assign",
            lambda msg: self.assignments.on_message(bytes(msg.payload)),
            qos=1,
        )
        await self.mqtt.async_start()
        self.presence.start()
        log.info("agent %s ready (http port %d)", self.cfg.name, self.http_port)

    async def async_stop(self, timeout: float = 10.0) -> None:
        """Ordered, time-limited shutdown."""
        loop = asyncio.get_running_loop()
        end = loop.time() + timeout
        self.service.stop_accepting()
        await self.presence.async_stop()
        await self.assignments.async_stop()
        for t in list(self._tasks):
            t.cancel()
        await self.service.async_close(max(0.5, end - loop.time()) * 0.6)
        if self.mqtt.connected:
            with contextlib.suppress(Exception):
                async with asyncio.timeout(2):
                    await self.presence.async_publish_status("offline")
        await self.mqtt.async_stop(timeout=max(0.5, end - loop.time()) / 2)
        if self._runner is not None:
            await self._runner.cleanup()
            self._runner = None
        if self._http_client is not None:
            await self._http_client.close()
            self._http_client = None
        await self.pool.async_close(max(0.5, end - loop.time()))
        await asyncio.to_thread(self._loads.shutdown, max(0.5, end - loop.time()))
        self._stopped.set()


def _ca_path(cfg: AgentConfig) -> Path:
    home = Home(cfg.home)
    if cfg.ca_file is not None:
        return cfg.ca_file
    if home.ca_cert.exists():
        return home.ca_cert
    raise IdentityError(
        f"no fleet CA certificate in {home.root}: pass --ca FILE (the CA certificate is the "
        "one file an operator copies to a new machine)"
    )


def _hardware_brief(hw: Hardware) -> dict[str, Any]:
    return {
        "cores": hw.cores_logical,
        "memory_mib": hw.memory_usable_mib,
        "arch": hw.arch,
        "gpus": [g.name for g in hw.gpus],
        "summary": hw.summary(),
    }


async def async_run(cfg: AgentConfig) -> None:
    """Run an agent until SIGINT or SIGTERM: discover, enrol, join, as configured."""
    from dataclasses import replace

    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGINT, signal.SIGTERM):
        loop.add_signal_handler(sig, stop.set)
    advertiser: Any = None
    agent: Agent | None = None
    try:
        home = Home(cfg.home)
        cn = f"{Role.NODE.value}.{cfg.name}"
        has_identity = (home.identity_dir(cn) / "cert.pem").exists()
        needs_ca = cfg.discover or cfg.enrol or not has_identity
        ca_path = _ca_path(cfg) if needs_ca else home.ca_cert
        if cfg.ca_file is not None and not home.ca_cert.exists():
            from fnmesh.certs.home import write_atomic

            write_atomic(home.ca_cert, cfg.ca_file.read_bytes())
        from fnmesh.certs.identity import fingerprint, load_cert

        ca_fp = fingerprint(load_cert(ca_path))
        interfaces = cfg.interfaces
        if interfaces is None and cfg.discover:
            interfaces = ("127.0.0.1",)
        if cfg.discover:
            from fnmesh.agent.advertise import find_coordinator

            found = await _until_stopped(
                stop, find_coordinator(ca_fp, cfg.discover_timeout_s, interfaces)
            )
            if found is None:
                return
            log.info("found coordinator %s, broker %s over mDNS", found.api_url, found.broker_url)
            cfg = replace(
                cfg,
                coordinator=cfg.coordinator or found.api_url,
                broker=cfg.broker or found.broker_url,
            )
        hardware = probe()
        if not has_identity:
            if not cfg.coordinator:
                raise IdentityError(
                    f"{cn} has no certificate and no coordinator is known to enrol with "
                    "(--discover or --coordinator URL)"
                )
            from fnmesh.agent.enrol import Enroller

            enroller = Enroller(home, cfg.name, ca_path, cfg.state)
            if interfaces is not None:
                advertiser = await _advertise(
                    cfg, interfaces, hardware, enroller.key_fingerprint, ca_fp, "pending", 9
                )
            got = await _until_stopped(
                stop,
                enroller.async_enrol(
                    cfg.coordinator,
                    _hardware_brief(hardware),
                    cfg.labels,
                    poll_s=cfg.enrol_poll_s,
                ),
            )
            if got is None:
                return
        agent = Agent(cfg, hardware=hardware)
        if cfg.coordinator and agent.assignments.coordinator_url is None:
            agent.assignments.coordinator_url = cfg.coordinator
        await agent.async_start()
        if interfaces is not None:
            fp = agent.identity.info.fingerprint
            if advertiser is None:
                advertiser = await _advertise(
                    cfg, interfaces, hardware, fp, ca_fp, "ready", agent.http_port
                )
            else:
                advertiser.port = agent.http_port
                await advertiser.async_update(fp=fp, api=str(agent.http_port), state="ready")
            adv = advertiser

            async def reannounce() -> None:
                # What this node announced while its link was down was lost: say it again.
                with contextlib.suppress(Exception):
                    await adv.async_update()

            agent.mqtt.add_connect_hook(reannounce)
        await stop.wait()
    finally:
        if agent is not None:
            await agent.async_stop()
        if advertiser is not None:
            await advertiser.async_stop()
        for sig in (signal.SIGINT, signal.SIGTERM):
            loop.remove_signal_handler(sig)


async def _until_stopped(stop: asyncio.Event, coro: Any) -> Any:
    """``await coro``, unless ``stop`` is set first (then None, the coroutine cancelled)."""
    task = asyncio.ensure_future(coro)
    waiter = asyncio.ensure_future(stop.wait())
    done, _ = await asyncio.wait({task, waiter}, return_when=asyncio.FIRST_COMPLETED)
    if task in done:
        waiter.cancel()
        return task.result()
    task.cancel()
    with contextlib.suppress(BaseException):
        await task
    return None


async def _advertise(
    cfg: AgentConfig,
    interfaces: tuple[str, ...],
    hardware: Hardware,
    fp: str,
    ca_fp: str,
    state: str,
    port: int,
) -> Any:
    from fnmesh.agent.advertise import AgentAdvertiser, agent_txt

    gpu = ", ".join(g.name for g in hardware.gpus) or "none"
    txt = agent_txt(cfg.name, cfg.labels, gpu, fp, ca_fp, port, state)
    adv = AgentAdvertiser(cfg.name, port, txt, list(interfaces))
    await adv.async_start()
    return adv
