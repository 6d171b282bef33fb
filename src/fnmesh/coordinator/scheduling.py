"""Turning deployments, policies and the registry into placement requests for the engine.

Shared by the reconciler (every pass), the deploy endpoint (refuse what no
node can satisfy) and ``fnmesh placements --explain``.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from typing import Any

from fnmesh.coordinator.placement import Engine, PlacementRequest, Snapshot
from fnmesh.coordinator.policies import Effective, Policy, combine
from fnmesh.coordinator.registry import NodeView
from fnmesh.coordinator.store import Store
from fnmesh.functions.manifest import Manifest

ENGINE = Engine()


def trusted(view: NodeView) -> bool:
    """A node is used only once it has talked to us with its own certificate's name, and what
    it advertises on the LAN (if anything) names that same certificate."""
    if view.state == "untrusted" or view.untrusted_reason is not None:
        return False
    if view.advertised_fingerprint and view.advertised_fingerprint != view.fingerprint:
        return False
    return bool(view.cn) and view.cn == f"node.{view.name}"


def snapshot(nodes: Mapping[str, NodeView]) -> Snapshot:
    return Snapshot.build(
        nodes,
        trusted=trusted,
        rtt_ms={n: v.rtt_ms for n, v in nodes.items() if v.rtt_ms is not None},
    )


async def load_policies(store: Store) -> list[Policy]:
    return [
        Policy.from_dict({**body, "version": version})
        for _name, version, body in await store.list_policies()
    ]


def effective(policies: Iterable[Policy], function: str, manifest: Manifest) -> Effective:
    return combine([p for p in policies if p.selector.matches(function)], manifest)


def request(
    function: str,
    manifest: Manifest,
    eff: Effective,
    *,
    replicas: int,
    where: Mapping[str, str],
    current: Iterable[str] = (),
) -> PlacementRequest:
    return PlacementRequest(
        manifest,
        replicas_wanted=replicas,
        current=tuple(current),
        effective=eff,
        where=dict(where),
        function=function,
    )


def assignment_rules(eff: Effective, allow_spill: bool) -> dict[str, Any]:
    """What routers and agents need to know: spill, regions, latency objective."""
    return {
        "allow_spill": bool(allow_spill and eff.spill),
        "regions": sorted(eff.regions) if eff.regions is not None else [],
        "latency_ms": eff.latency_p95_ms,
    }
