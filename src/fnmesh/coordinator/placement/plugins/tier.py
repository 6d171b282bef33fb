"""Filter ``tier``: replicas only on the node tiers (``edge``, ``cloud``) the policy allows."""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

from fnmesh.coordinator.placement.framework import ColumnFilter, Cycle
from fnmesh.coordinator.placement.snapshot import Rows, Snapshot, SnapshotNode


class Tier(ColumnFilter):
    name = "tier"

    def allowed(self, cycle: Cycle) -> frozenset[str] | None:
        return cycle.tiers

    def column(self, snapshot: Snapshot) -> tuple[tuple[str, ...], Any, Mapping[str, Rows]]:
        return snapshot.tiers, snapshot.tier_id, snapshot.by_tier

    def value(self, node: SnapshotNode) -> str | None:
        return node.tier

    def refusal(self, value: str | None, allowed: frozenset[str]) -> str:
        return f"tier {value or '(none)'} is not one of {', '.join(sorted(allowed))}"
