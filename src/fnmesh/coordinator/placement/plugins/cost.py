"""Score ``cost``: edge before cloud. A score per tier (edge 100, cloud 0 by default).

Edge nodes are already paid for and close to the data; cloud capacity is
rented by the hour. Spill-over reaches cloud replicas when the edge is full.
"""

from __future__ import annotations

from collections.abc import Mapping

import numpy as np
from numpy.typing import NDArray
from pydantic import Field, field_validator

from fnmesh.coordinator.placement.framework import Cycle, PluginArgs, ScorePlugin, Scores
from fnmesh.coordinator.placement.snapshot import Rows, SnapshotNode


class CostArgs(PluginArgs):
    #: Score per tier label; higher is cheaper.
    tiers: dict[str, float] = Field(default_factory=lambda: {"edge": 100.0, "cloud": 0.0})
    #: Score of a node whose tier is not listed (or unset).
    unknown: float = Field(default=50.0, ge=0, le=100)

    @field_validator("tiers")
    @classmethod
    def _bounded(cls, v: dict[str, float]) -> dict[str, float]:
        for tier, score in v.items():
            if not 0 <= score <= 100:
                raise ValueError(f"the score of tier {tier!r} must be within 0-100, not {score}")
        return {k: float(s) for k, s in v.items()}


class Cost(ScorePlugin):
    name = "cost"

    def __init__(self, args: CostArgs) -> None:
        self.args = args

    def prepare(self, cycle: Cycle) -> None:
        table = [self.args.tiers.get(t, self.args.unknown) for t in cycle.snapshot.tiers]
        cycle.state[self.name] = np.array(table, dtype=np.float64)

    def score(self, cycle: Cycle, node: SnapshotNode, site_counts: Mapping[str, int]) -> float:
        return self.args.tiers.get(node.tier, self.args.unknown)

    def score_rows(self, cycle: Cycle, rows: Rows, site_counts: NDArray[np.int64]) -> Scores:
        table: Scores = cycle.state[self.name]
        return table[cycle.snapshot.tier_id[rows]]
