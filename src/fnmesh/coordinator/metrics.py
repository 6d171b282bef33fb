"""The coordinator's Prometheus metrics, in a registry of its own."""

from __future__ import annotations

from prometheus_client import CollectorRegistry, Counter, Gauge, generate_latest


class CoordinatorMetrics:
    def __init__(self) -> None:
        self.registry = CollectorRegistry(auto_describe=True)
        self.requests = Counter(
            "fnmesh_coordinator_requests",
            "API requests by route and status.",
            ["route", "status"],
            registry=self.registry,
        )
        self.nodes = Gauge(
            "fnmesh_coordinator_nodes", "Nodes known, by state.", ["state"], registry=self.registry
        )
        self.reconciles = Counter(
            "fnmesh_coordinator_reconcile_passes", "Reconcile passes run.", registry=self.registry
        )

    def render(self) -> bytes:
        return generate_latest(self.registry)
