"""Filter ``draining``: no new or kept replicas on a node an operator is draining."""

from __future__ import annotations

from fnmesh.coordinator.placement.framework import Cycle, FilterPlugin, Mask, NoArgs
from fnmesh.coordinator.placement.snapshot import Rows, SnapshotNode
from fnmesh.coordinator.placement.status import FITS, Status


class Draining(FilterPlugin):
    name = "draining"

    def __init__(self, args: NoArgs) -> None:
        self.args = args

    def filter(self, cycle: Cycle, node: SnapshotNode) -> Status:
        if node.draining:
            return Status.unresolvable(self.name, "the node is draining")
        return FITS

    def candidates(self, cycle: Cycle) -> Rows | None:
        return cycle.snapshot.undrained_rows

    def keep(self, cycle: Cycle, rows: Rows) -> Mask | None:
        return ~cycle.snapshot.draining[rows]
