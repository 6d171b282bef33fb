"""Filter and score ``hardware``: GPU, GPU architecture and memory.

Filter: a function that requires a GPU (or is a TensorRT plan) goes to GPU
nodes only, a TensorRT plan to its own GPU architecture only, and no function
to a node with less memory than it needs. None of these change when other
work leaves, so they are unresolvable.

Score: ``preferred`` gives a GPU node 100 and a CPU node 0; with the default
weight (12) that outweighs every other default score together (1000), so a
preferred GPU wins whenever one passes the filters (has room), and a CPU node
is chosen otherwise. A function with no GPU need scores CPU nodes 100 and GPU
nodes ``gpu_for_cpu_work``, keeping GPUs for work that wants them.
"""

from __future__ import annotations

from collections.abc import Mapping

import numpy as np
from numpy.typing import NDArray
from pydantic import Field

from fnmesh.coordinator.placement.framework import (
    Cycle,
    FilterPlugin,
    Mask,
    PluginArgs,
    ScorePlugin,
    Scores,
)
from fnmesh.coordinator.placement.snapshot import Rows, SnapshotNode
from fnmesh.coordinator.placement.status import FITS, Status
from fnmesh.functions.manifest import GpuRequirement


class HardwareArgs(PluginArgs):
    #: Score of a GPU node for a function that needs no GPU (CPU nodes score 100).
    gpu_for_cpu_work: float = Field(default=75.0, ge=0, le=100)


class Hardware(FilterPlugin, ScorePlugin):
    name = "hardware"

    def __init__(self, args: HardwareArgs) -> None:
        self.args = args

    def filter(self, cycle: Cycle, node: SnapshotNode) -> Status:
        if cycle.gpu == GpuRequirement.REQUIRED and not node.has_gpu:
            return Status.unresolvable(
                self.name, "the function requires a GPU and the node has none"
            )
        if cycle.gpu_arch is not None and node.gpu_arch != cycle.gpu_arch:
            return Status.unresolvable(
                self.name,
                f"the TensorRT plan is built for {cycle.gpu_arch}, "
                f"the node's GPU is {node.gpu_arch or '(none)'}",
            )
        if node.memory_mib < cycle.memory_mib:
            return Status.unresolvable(
                self.name,
                f"the function needs {cycle.memory_mib} MiB, the node has {node.memory_mib} MiB",
            )
        return FITS

    def candidates(self, cycle: Cycle) -> Rows | None:
        snap = cycle.snapshot
        if cycle.gpu_arch is not None:
            return snap.by_gpu_arch.get(cycle.gpu_arch, np.empty(0, dtype=np.intp))
        if cycle.gpu == GpuRequirement.REQUIRED:
            return snap.gpu_rows
        return None

    def keep(self, cycle: Cycle, rows: Rows) -> Mask | None:
        snap = cycle.snapshot
        ok: Mask = snap.memory_mib[rows] >= cycle.memory_mib
        if cycle.gpu == GpuRequirement.REQUIRED:
            ok &= snap.has_gpu[rows]
        if cycle.gpu_arch is not None:
            if cycle.gpu_arch in snap.by_gpu_arch:
                ok &= snap.gpu_arch_id[rows] == snap.gpu_archs.index(cycle.gpu_arch)
            else:
                ok[:] = False
        return ok

    def _levels(self, cycle: Cycle) -> tuple[float, float]:
        """(score of a GPU node, score of a CPU node) for this function."""
        if cycle.gpu == GpuRequirement.PREFERRED:
            return 100.0, 0.0
        if cycle.gpu == GpuRequirement.REQUIRED:
            return 100.0, 100.0
        return self.args.gpu_for_cpu_work, 100.0

    def score(self, cycle: Cycle, node: SnapshotNode, site_counts: Mapping[str, int]) -> float:
        gpu, cpu = self._levels(cycle)
        return gpu if node.has_gpu else cpu

    def score_rows(self, cycle: Cycle, rows: Rows, site_counts: NDArray[np.int64]) -> Scores:
        gpu, cpu = self._levels(cycle)
        return np.where(cycle.snapshot.has_gpu[rows], gpu, cpu)
