"""Turning desired state (deployments) into each node's retained assignment.

Each pass: for every deployment, keep the replicas that still fit and are
live, add replicas on other eligible nodes until the live count reaches the
target (the autoscaler's, from the load in heartbeats, within the deployment's
min and max: the max until demand was measured; see :mod:`.autoscale`), and keep an offline node's placement until ``offline_timeout_s``
(a site that was only cut off comes back to what it had, with nothing
redeployed needlessly). Then every node whose desired set changed gets a new
retained assignment with the data keys wrapped for it alone.
"""

from __future__ import annotations

import asyncio
import base64
import contextlib
import hashlib
import json
import logging
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from cryptography.hazmat.primitives.asymmetric.x25519 import X25519PublicKey

from fnmesh.agent.mqtt import MqttClient
from fnmesh.certs import keywrap
from fnmesh.certs.errors import IdentityError
from fnmesh.certs.home import Home
from fnmesh.certs.identity import Identity, Role, load_cert
from fnmesh.certs.trust import TrustStore
from fnmesh.coordinator import scheduling
from fnmesh.coordinator.autoscale import Autoscaler
from fnmesh.coordinator.registry import NodeView, Registry
from fnmesh.coordinator.store import BlobStore, Store
from fnmesh.functions.bundle import Bundle
from fnmesh.functions.manifest import Manifest

log = logging.getLogger("fnmesh.coordinator.reconciler")


@dataclass(frozen=True, slots=True)
class Assigned:
    function: str
    version: str
    digest: str


class Reconciler:
    def __init__(
        self,
        *,
        store: Store,
        blobs: BlobStore,
        registry: Registry,
        mqtt: MqttClient,
        home: Home,
        trust: Callable[[], TrustStore],
        identity: Identity,
        root: str,
        coordinator_url: str,
        offline_timeout_s: float = 300.0,
        clock: Callable[[], float] = time.time,
        autoscaler: Autoscaler | None = None,
    ) -> None:
        self.store = store
        self.blobs = blobs
        self.registry = registry
        self.mqtt = mqtt
        self.home = home
        self._trust = trust
        self.identity = identity
        self.root = root
        self.coordinator_url = coordinator_url
        self.offline_timeout_s = offline_timeout_s
        self._clock = clock
        #: Replica targets from the load heartbeats report (same clock as the registry's).
        self.autoscaler = autoscaler or Autoscaler(clock=clock)
        self._kick = asyncio.Event()
        self._task: asyncio.Task[None] | None = None
        self._data_keys: dict[str, bytes] = {}
        self._node_keys: dict[str, X25519PublicKey] = {}
        self._manifests: dict[tuple[str, str], Manifest] = {}
        self._lock = asyncio.Lock()
        self.passes = 0
        #: function -> spill, regions and latency objective for its assignments.
        self.rules: dict[str, dict[str, Any]] = {}
        self.idle = asyncio.Event()

    # -- running ----------------------------------------------------------------------

    def kick(self) -> None:
        self.idle.clear()
        self._kick.set()

    def start(self, tick_s: float = 1.0) -> None:
        self._task = asyncio.get_running_loop().create_task(self._run(tick_s))

    async def async_stop(self) -> None:
        if self._task is not None:
            self._task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._task
            self._task = None

    async def _run(self, tick_s: float) -> None:
        while True:
            # asyncio.timeout, not wait_for: on 3.11 wait_for swallows a cancellation that
            # arrives as the kick is set, and async_stop() then waits for this task forever.
            with contextlib.suppress(TimeoutError):
                async with asyncio.timeout(tick_s):
                    await self._kick.wait()
            self._kick.clear()
            if self.registry.sweep():
                self._kick.clear()
            try:
                await self.reconcile()
            except Exception:  # keep reconciling: the next pass may succeed
                log.exception("reconcile pass failed")
            if not self._kick.is_set():
                self.idle.set()

    # -- one pass ---------------------------------------------------------------------

    async def reconcile(self) -> None:
        async with self._lock:
            self.passes += 1
            nodes = self.registry.snapshot()
            now = self._clock()
            policies = await scheduling.load_policies(self.store)
            snap = scheduling.snapshot(nodes)
            self.autoscaler.observe({n: (v.last_heartbeat, v.load) for n, v in nodes.items()})
            for d in await self.store.list_deployments():
                manifest = await self._manifest(d.function, d.version)
                eff = scheduling.effective(policies, d.function, manifest)
                self.rules[d.function] = scheduling.assignment_rules(eff, d.allow_spill)
                current = await self.store.placements(d.function)
                chosen = self.place(d, manifest, eff, snap, nodes, current, now)
                before = sorted((p.node, p.version) for p in current)
                after = sorted((n, d.version) for n in chosen)
                if before != after:
                    log.info(
                        "placing %s@%s on %s", d.function, d.version, ", ".join(chosen) or "nothing"
                    )
                    await self.store.set_placements(d.function, d.version, chosen)
            await self.publish_assignments(nodes)

    def place(
        self,
        d: Any,
        manifest: Manifest,
        eff: Any,
        snap: Any,
        nodes: dict[str, NodeView],
        current: list[Any],
        now: float,
    ) -> list[str]:
        """The nodes that should hold this deployment after this pass.

        The engine picks among live nodes (keeping current replicas that still
        fit); a node that went offline keeps its placement until the offline
        timeout, so a site that was only cut off comes back to what it had.
        """
        live_current = [p.node for p in current if p.node in nodes and nodes[p.node].live]
        target = self.autoscaler.target(
            d.function,
            current=len(live_current),
            lo=d.min_replicas,
            hi=d.max_replicas,
            service_ms=_service_ms(nodes, d.function),
            spill=bool(self.rules.get(d.function, {}).get("allow_spill")),
        )
        decision = scheduling.ENGINE.place(
            scheduling.request(
                d.function,
                manifest,
                eff,
                replicas=target.replicas,
                where=d.where or {},
                current=live_current,
            ),
            snap,
        )
        chosen = list(decision.nodes)
        in_cloud = [n for n in chosen if nodes[n].labels.get("tier") == "cloud"]
        if target.cloud > len(in_cloud) and len(chosen) < d.max_replicas:
            # Spilled work needs cloud replicas: as many as the spill rate asks, within max.
            cloud = scheduling.ENGINE.place(
                scheduling.request(
                    d.function,
                    manifest,
                    eff,
                    replicas=target.cloud,
                    where={**(d.where or {}), "tier": "cloud"},
                    current=[n for n in live_current if nodes[n].labels.get("tier") == "cloud"],
                ),
                snap,
            )
            for n in cloud.nodes:
                if n not in chosen and len(chosen) < d.max_replicas:
                    chosen.append(n)
        if len(chosen) < d.min_replicas:
            log.warning(
                "%s@%s: %d of at least %d replicas placed: %s",
                d.function,
                d.version,
                len(chosen),
                d.min_replicas,
                decision.reason,
            )
        for p in current:
            v = nodes.get(p.node)
            if (
                v is not None
                and p.node not in chosen
                and not v.live
                and not v.draining
                and v.offline_since is not None
                and now - v.offline_since < self.offline_timeout_s
            ):
                chosen.append(p.node)
        return chosen

    async def _manifest(self, function: str, version: str) -> Manifest:
        key = (function, version)
        m = self._manifests.get(key)
        if m is None:
            rec = await self.store.get_version(function, version)
            m = Manifest.model_validate(rec.manifest)
            self._manifests[key] = m
        return m

    # -- assignments ------------------------------------------------------------------

    async def publish_assignments(self, nodes: dict[str, NodeView]) -> None:
        by_node: dict[str, list[Assigned]] = {n: [] for n in nodes}
        deployments = {d.function: d for d in await self.store.list_deployments()}
        for p in await self.store.placements():
            rec = await self.store.get_version(p.function, p.version)
            by_node.setdefault(p.node, []).append(Assigned(p.function, p.version, rec.digest))
        for node, items in sorted(by_node.items()):
            items.sort(key=lambda a: a.function)
            body_hash = hashlib.sha256(
                json.dumps([(a.function, a.version, a.digest) for a in items]).encode()
            ).hexdigest()
            last = await self.store.last_assignment(node)
            if last is not None and last[1] == body_hash:
                continue
            if last is None and not items:
                continue
            view = nodes.get(node)
            try:
                functions = [
                    {
                        "function": a.function,
                        "version": a.version,
                        "digest": a.digest,
                        "key": base64.b64encode(self._wrap_for(view, node, a.digest)).decode(),
                        **self.rules.get(a.function, {"allow_spill": False, "regions": []}),
                        "rollback": getattr(deployments.get(a.function), "rollback", None)
                        if getattr(deployments.get(a.function), "version", None) == a.version
                        else None,
                    }
                    for a in items
                ]
            except IdentityError as e:
                log.warning("cannot assign work to %s: %s", node, e)
                continue
            gen = await self.store.next_generation()
            body = {
                "node": node,
                "generation": gen,
                "coordinator": self.coordinator_url,
                "functions": functions,
            }
            await self.mqtt.async_publish(
                f"{self.root}/nodes/{node}/assign", json.dumps(body).encode(), qos=1, retain=True
            )
            await self.store.record_assignment(node, gen, body_hash)
            log.info("assignment %d for %s: %s", gen, node, [a.function for a in items])

    def data_key(self, digest: str) -> bytes:
        dk = self._data_keys.get(digest)
        if dk is None:
            assert self.identity.enc_key is not None
            bundle = Bundle.parse(self.blobs.get(digest))
            dk = bundle.data_key(self.identity.cn, self.identity.enc_key)
            self._data_keys[digest] = dk
        return dk

    def node_key(self, node: str, cn: str | None = None) -> X25519PublicKey:
        cn = cn or f"{Role.NODE.value}.{node}"
        pub = self._node_keys.get(cn)
        if pub is None:
            cert_path = self.home.identity_dir(cn) / "cert.pem"
            if not cert_path.exists():
                cert_path = self.home.root / "enrolled" / f"{cn}.pem"
            info = self._trust().verify(load_cert(cert_path), role=Role.NODE)
            if info.x25519 is None:
                raise IdentityError(f"{cn} has no encryption key")
            pub = info.x25519
            self._node_keys[cn] = pub
        return pub

    def forget_node_key(self, cn: str) -> None:
        self._node_keys.pop(cn, None)

    def _wrap_for(self, view: NodeView | None, node: str, digest: str) -> bytes:
        pub = self.node_key(node, view.cn if view and view.cn else None)
        return keywrap.wrap(self.data_key(digest), pub, bytes.fromhex(digest))

    def bundle_for_node(self, node: str, digest: str) -> bytes:
        """The bundle with its data key wrapped for ``node`` only."""
        bundle = Bundle.parse(self.blobs.get(digest))
        cn = f"{Role.NODE.value}.{node}"
        return bundle.only_for(self.data_key(digest), cn, self.node_key(node)).to_bytes()


def _service_ms(nodes: dict[str, NodeView], function: str) -> dict[str, float]:
    """Per node, the run time of one request of ``function`` its heartbeat reports (ms)."""
    out = {}
    for name, v in nodes.items():
        figures = v.load.get(function)
        if isinstance(figures, dict):
            ms = figures.get("row_ms") or figures.get("batch_ms")
            if isinstance(ms, int | float) and ms > 0:
                out[name] = float(ms)
    return out
