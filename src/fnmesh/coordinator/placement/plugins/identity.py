"""Filter ``identity``: only nodes whose certificate verified, and never an ``untrusted`` one."""

from __future__ import annotations

from fnmesh.coordinator.placement.framework import Cycle, FilterPlugin, Mask, NoArgs
from fnmesh.coordinator.placement.snapshot import UNTRUSTED, Rows, SnapshotNode
from fnmesh.coordinator.placement.status import FITS, Status


class Identity(FilterPlugin):
    name = "identity"

    def __init__(self, args: NoArgs) -> None:
        self.args = args

    def filter(self, cycle: Cycle, node: SnapshotNode) -> Status:
        if node.state == UNTRUSTED:
            return Status.unresolvable(
                self.name, "the node is untrusted (its certificate was refused or revoked)"
            )
        if not node.trusted:
            return Status.unresolvable(self.name, "the node has no verified certificate")
        return FITS

    def candidates(self, cycle: Cycle) -> Rows | None:
        return cycle.snapshot.trusted_rows

    def keep(self, cycle: Cycle, rows: Rows) -> Mask | None:
        return cycle.snapshot.trusted[rows]
