"""Score ``warmth``: a node that already has the function ready starts no bundle fetch or load.

100 when its status lists the same version, ``other_version`` when another
version (the bundle store and cache are warm, the session is not), else 0.
"""

from __future__ import annotations

from collections.abc import Mapping

import numpy as np
from numpy.typing import NDArray
from pydantic import Field

from fnmesh.coordinator.placement.framework import Cycle, PluginArgs, ScorePlugin, Scores
from fnmesh.coordinator.placement.snapshot import Rows, SnapshotNode


class WarmthArgs(PluginArgs):
    #: Score of a node that has another version of the function.
    other_version: float = Field(default=50.0, ge=0, le=100)


class Warmth(ScorePlugin):
    name = "warmth"

    def __init__(self, args: WarmthArgs) -> None:
        self.args = args

    def score(self, cycle: Cycle, node: SnapshotNode, site_counts: Mapping[str, int]) -> float:
        have = node.functions.get(cycle.function)
        if have is None:
            return 0.0
        return 100.0 if have == cycle.version else self.args.other_version

    def score_rows(self, cycle: Cycle, rows: Rows, site_counts: NDArray[np.int64]) -> Scores:
        snap = cycle.snapshot
        warm = snap.by_function.get(cycle.function)
        if warm is None:
            return np.zeros(len(rows))
        full = np.zeros(len(snap))
        full[warm] = self.args.other_version
        same = snap.by_version.get((cycle.function, cycle.version))
        if same is not None:
            full[same] = 100.0
        return full[rows]
