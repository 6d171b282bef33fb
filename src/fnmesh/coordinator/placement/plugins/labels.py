"""Filter ``labels``: the node carries every label the deployment's ``where`` names."""

from __future__ import annotations

from functools import reduce

import numpy as np

from fnmesh.coordinator.placement.framework import Cycle, FilterPlugin, Mask, NoArgs
from fnmesh.coordinator.placement.snapshot import Rows, SnapshotNode
from fnmesh.coordinator.placement.status import FITS, Status


class Labels(FilterPlugin):
    name = "labels"

    def __init__(self, args: NoArgs) -> None:
        self.args = args

    def filter(self, cycle: Cycle, node: SnapshotNode) -> Status:
        for k, v in cycle.where.items():
            have = node.labels.get(k)
            if have != v:
                return Status.unresolvable(
                    self.name,
                    f"label {k}={have if have is not None else '(unset)'}, the deployment needs {v}",
                )
        return FITS

    def _rows(self, cycle: Cycle) -> Rows:
        empty = np.empty(0, dtype=np.intp)
        index = cycle.snapshot.by_label
        parts = [index.get((k, v), empty) for k, v in cycle.where.items()]
        return reduce(lambda a, b: np.intersect1d(a, b, assume_unique=True), parts)

    def candidates(self, cycle: Cycle) -> Rows | None:
        if not cycle.where:
            return None
        return self._rows(cycle)

    def keep(self, cycle: Cycle, rows: Rows) -> Mask | None:
        if not cycle.where:
            return None
        return np.isin(rows, self._rows(cycle))
