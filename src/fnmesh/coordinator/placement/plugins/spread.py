"""Score ``spread``: replicas on sites this function does not use yet, so one site's outage
leaves the others answering. 100 / (1 + replicas already picked at the node's site).

Evaluated again after every pick within a decision (``per_pick``).
"""

from __future__ import annotations

from collections.abc import Mapping

import numpy as np
from numpy.typing import NDArray

from fnmesh.coordinator.placement.framework import Cycle, NoArgs, ScorePlugin, Scores
from fnmesh.coordinator.placement.snapshot import Rows, SnapshotNode


class Spread(ScorePlugin):
    name = "spread"
    per_pick = True

    def __init__(self, args: NoArgs) -> None:
        self.args = args

    def score(self, cycle: Cycle, node: SnapshotNode, site_counts: Mapping[str, int]) -> float:
        return 100.0 / (1 + site_counts.get(node.site, 0))

    def score_rows(self, cycle: Cycle, rows: Rows, site_counts: NDArray[np.int64]) -> Scores:
        return 100.0 / (1 + site_counts[cycle.snapshot.site_id[rows]])
