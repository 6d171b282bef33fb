"""Filter ``capacity``: room on the node for one more replica, in slots and in memory.

A node already holding the function (``request.current``) has it counted
already. This is the one filter that is only ``unfit`` (not unresolvable):
the node fits again once other replicas leave it.
"""

from __future__ import annotations

import numpy as np
from numpy.typing import NDArray
from pydantic import Field

from fnmesh.coordinator.placement.framework import Cycle, FilterPlugin, Mask, PluginArgs
from fnmesh.coordinator.placement.snapshot import Rows, SnapshotNode
from fnmesh.coordinator.placement.status import FITS, Status


class CapacityArgs(PluginArgs):
    #: Most replicas (all functions) one node holds.
    max_functions: int = Field(default=64, ge=1, le=100_000)
    #: Share of a node's memory never handed to replicas (the agent, the OS, spikes).
    memory_reserve: float = Field(default=0.1, ge=0, lt=1)


class Capacity(FilterPlugin):
    name = "capacity"

    def __init__(self, args: CapacityArgs) -> None:
        self.args = args
        self._usable = 1.0 - args.memory_reserve

    def filter(self, cycle: Cycle, node: SnapshotNode) -> Status:
        counted = node.name in cycle.current
        slots = node.replicas + (0 if counted else 1)
        if slots > self.args.max_functions:
            return Status.unfit(
                self.name,
                f"the node holds {node.replicas} replicas, at most {self.args.max_functions}",
            )
        need = node.memory_used_mib + (0 if counted else cycle.memory_mib)
        usable = node.memory_mib * self._usable
        if need > usable:
            return Status.unfit(
                self.name,
                f"needs {cycle.memory_mib} MiB, {max(0.0, usable - node.memory_used_mib):.0f} "
                f"of {node.memory_mib} MiB free ({self.args.memory_reserve:.0%} kept back)",
            )
        return FITS

    def keep(self, cycle: Cycle, rows: Rows) -> Mask | None:
        snap = cycle.snapshot
        add: NDArray[np.int64] | int = 1
        need: NDArray[np.int64] | int = cycle.memory_mib
        if len(cycle.current_rows):
            cur = cycle.is_current(rows)
            add = np.where(cur, 0, 1)
            need = np.where(cur, 0, need)
        ok: Mask = snap.replicas[rows] + add <= self.args.max_functions
        ok &= snap.memory_used_mib[rows] + need <= snap.memory_mib[rows] * self._usable
        return ok
