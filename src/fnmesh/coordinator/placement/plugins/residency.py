"""Filter ``residency``: replicas only in regions the function's data may go to.

The allowed regions are the effective policy's (which include the manifest's
``data.regions``), intersected with the manifest's again, so a caller that
forgot the manifest cannot widen them. A node with no ``region`` label is
outside every restricted set.
"""

from __future__ import annotations

from fnmesh.coordinator.placement.framework import (
    Cycle,
    FilterPlugin,
    Mask,
    NoArgs,
    union_rows,
    vocab_mask,
)
from fnmesh.coordinator.placement.snapshot import Rows, SnapshotNode
from fnmesh.coordinator.placement.status import FITS, Status


class Residency(FilterPlugin):
    name = "residency"

    def __init__(self, args: NoArgs) -> None:
        self.args = args

    def prepare(self, cycle: Cycle) -> None:
        if cycle.regions is not None:
            cycle.state[self.name] = vocab_mask(cycle.snapshot.regions, cycle.regions)

    def filter(self, cycle: Cycle, node: SnapshotNode) -> Status:
        if cycle.regions is None or node.region in cycle.regions:
            return FITS
        return Status.unresolvable(
            self.name,
            f"region {node.region or '(none)'} is outside the allowed regions "
            f"{', '.join(sorted(cycle.regions)) or '(none)'}",
        )

    def candidates(self, cycle: Cycle) -> Rows | None:
        if cycle.regions is None:
            return None
        return union_rows(cycle.snapshot.by_region, cycle.regions)

    def keep(self, cycle: Cycle, rows: Rows) -> Mask | None:
        if cycle.regions is None:
            return None
        allowed: Mask = cycle.state[self.name]
        return allowed[cycle.snapshot.region_id[rows]]
