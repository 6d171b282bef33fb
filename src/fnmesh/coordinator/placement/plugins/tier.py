"""Filter ``tier``: replicas only on the node tiers (``edge``, ``cloud``) the policy allows."""

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


class Tier(FilterPlugin):
    name = "tier"

    def __init__(self, args: NoArgs) -> None:
        self.args = args

    def prepare(self, cycle: Cycle) -> None:
        if cycle.tiers is not None:
            cycle.state[self.name] = vocab_mask(cycle.snapshot.tiers, cycle.tiers)

    def filter(self, cycle: Cycle, node: SnapshotNode) -> Status:
        if cycle.tiers is None or node.tier in cycle.tiers:
            return FITS
        return Status.unresolvable(
            self.name,
            f"tier {node.tier or '(none)'} is not one of {', '.join(sorted(cycle.tiers))}",
        )

    def candidates(self, cycle: Cycle) -> Rows | None:
        if cycle.tiers is None:
            return None
        return union_rows(cycle.snapshot.by_tier, cycle.tiers)

    def keep(self, cycle: Cycle, rows: Rows) -> Mask | None:
        if cycle.tiers is None:
            return None
        allowed: Mask = cycle.state[self.name]
        return allowed[cycle.snapshot.tier_id[rows]]
