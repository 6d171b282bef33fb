"""Placement: which nodes hold a function's replicas.

A pipeline of small plugins (the Kubernetes scheduler framework) over an
immutable snapshot of the registry: filters (identity, liveness, draining,
residency, tier, labels, hardware, capacity) then scores (hardware, latency,
cost, spread, warmth, headroom)::

    snap = Snapshot.build(registry.snapshot(), trusted=verified, rtt_ms=rtts)
    decision = Engine().place(PlacementRequest(manifest, replicas_wanted=3,
                                               current=held, effective=eff), snap)
    decision.nodes, decision.added, decision.removed, decision.explain()

``fits``, ``choose``, ``Candidate`` and ``Fit`` are the first, minimal
placement, kept with the same behaviour for the reconciler and the API until
they move to the engine.
"""

from __future__ import annotations

from fnmesh.coordinator.placement.decision import Decision, ExplainRow, Explanation, Placed
from fnmesh.coordinator.placement.engine import Engine
from fnmesh.coordinator.placement.errors import PlacementError, ProfileError
from fnmesh.coordinator.placement.legacy import Candidate, Fit, choose, fits
from fnmesh.coordinator.placement.plugins.latency import estimate_latency_ms
from fnmesh.coordinator.placement.registry import REGISTRY, Profile, ScoreSpec
from fnmesh.coordinator.placement.request import PlacementRequest, request_memory_mib
from fnmesh.coordinator.placement.snapshot import Load, Snapshot, SnapshotNode
from fnmesh.coordinator.placement.status import Code, NodeResult, Status

__all__ = [
    "REGISTRY",
    "Candidate",
    "Code",
    "Decision",
    "Engine",
    "ExplainRow",
    "Explanation",
    "Fit",
    "Load",
    "NodeResult",
    "Placed",
    "PlacementError",
    "PlacementRequest",
    "Profile",
    "ProfileError",
    "ScoreSpec",
    "Snapshot",
    "SnapshotNode",
    "Status",
    "choose",
    "estimate_latency_ms",
    "fits",
    "request_memory_mib",
]
