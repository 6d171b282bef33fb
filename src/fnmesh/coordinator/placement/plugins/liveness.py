"""Filter ``liveness``: only nodes that are up and talking (state ``ready`` or ``joined``)."""

from __future__ import annotations

from fnmesh.coordinator.placement.framework import Cycle, FilterPlugin, Mask, NoArgs
from fnmesh.coordinator.placement.snapshot import Rows, SnapshotNode
from fnmesh.coordinator.placement.status import FITS, Status


class Liveness(FilterPlugin):
    name = "liveness"

    def __init__(self, args: NoArgs) -> None:
        self.args = args

    def filter(self, cycle: Cycle, node: SnapshotNode) -> Status:
        if node.live:
            return FITS
        return Status.unresolvable(self.name, f"the node is {node.state}, not ready")

    def candidates(self, cycle: Cycle) -> Rows | None:
        return cycle.snapshot.live_rows

    def keep(self, cycle: Cycle, rows: Rows) -> Mask | None:
        return cycle.snapshot.live[rows]
