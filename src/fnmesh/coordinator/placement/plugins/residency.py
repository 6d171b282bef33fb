"""Filter ``residency``: replicas only in regions the function's data may go to.

The allowed regions are the effective policy's (which include the manifest's
``data.regions``), intersected with the manifest's again, so a caller that
forgot the manifest cannot widen them. A node with no ``region`` label is
outside every restricted set.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

from fnmesh.coordinator.placement.framework import ColumnFilter, Cycle
from fnmesh.coordinator.placement.snapshot import Rows, Snapshot, SnapshotNode


class Residency(ColumnFilter):
    name = "residency"

    def allowed(self, cycle: Cycle) -> frozenset[str] | None:
        return cycle.regions

    def column(self, snapshot: Snapshot) -> tuple[tuple[str, ...], Any, Mapping[str, Rows]]:
        return snapshot.regions, snapshot.region_id, snapshot.by_region

    def value(self, node: SnapshotNode) -> str | None:
        return node.region

    def refusal(self, value: str | None, allowed: frozenset[str]) -> str:
        return (
            f"region {value or '(none)'} is outside the allowed regions "
            f"{', '.join(sorted(allowed)) or '(none)'}"
        )
