"""Score ``headroom``: room left on the node after this replica, the scarcer of memory and slots.

100 = the node would still be empty; 0 = it would be full. Spreads work away
from nodes close to their limits before the capacity filter has to refuse them.
"""

from __future__ import annotations

from collections.abc import Mapping

import numpy as np
from numpy.typing import NDArray
from pydantic import Field

from fnmesh.coordinator.placement.framework import Cycle, PluginArgs, ScorePlugin, Scores
from fnmesh.coordinator.placement.snapshot import Rows, SnapshotNode


class HeadroomArgs(PluginArgs):
    #: Replicas (all functions) that fill a node; match the capacity filter's.
    max_functions: int = Field(default=64, ge=1, le=100_000)


class Headroom(ScorePlugin):
    name = "headroom"

    def __init__(self, args: HeadroomArgs) -> None:
        self.args = args

    def score(self, cycle: Cycle, node: SnapshotNode, site_counts: Mapping[str, int]) -> float:
        counted = node.name in cycle.current
        total = node.memory_mib
        free = total - node.memory_used_mib - (0 if counted else cycle.memory_mib)
        mem = free / total if total > 0 else 0.0
        slots = (self.args.max_functions - node.replicas - (0 if counted else 1)) / (
            self.args.max_functions
        )
        # (The vector form computes ``free`` in floats: the same value, integers below 2**53.)
        return 100.0 * min(1.0, max(0.0, min(mem, slots)))

    def score_rows(self, cycle: Cycle, rows: Rows, site_counts: NDArray[np.int64]) -> Scores:
        snap = cycle.snapshot
        total = snap.memory_mib[rows]
        add: NDArray[np.int64] | int = 1
        need: NDArray[np.float64] | float = float(cycle.memory_mib)
        if len(cycle.current_rows):
            cur = cycle.is_current(rows)
            add = np.where(cur, 0, 1)
            need = np.where(cur, 0.0, need)
        free = snap.memory_free_mib[rows] - need
        mem = np.where(total > 0, free / np.maximum(total, 1), 0.0)
        slots = (self.args.max_functions - snap.replicas[rows] - add) / self.args.max_functions
        return 100.0 * np.minimum(1.0, np.maximum(0.0, np.minimum(mem, slots)))
