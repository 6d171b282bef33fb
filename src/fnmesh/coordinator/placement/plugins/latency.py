"""Score ``latency``, and the latency estimate the router shares.

A request's latency on a node is estimated as the round trip to the node,
plus the time it waits there (the node's other work per core, the rest of
the running batch, the batches queued ahead), plus its own batch's run time:
the agent's admission control makes the same estimate from the same moving
averages (:mod:`fnmesh.agent.admission`). A node that does not run the
function yet is estimated with its idle queue and the function's run time
measured elsewhere in the fleet.

The score compares the estimate with the latency objective (the policy's
``latency_p95_ms``, else the function's timeout): 100 at zero, 0 at or past
the objective, linear between. Differences far inside the objective matter
little, by design: placement should not chase a millisecond.
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from typing import Protocol, TypeVar

import numpy as np
from numpy.typing import NDArray
from pydantic import Field

from fnmesh.coordinator.placement.framework import Cycle, PluginArgs, ScorePlugin, Scores
from fnmesh.coordinator.placement.snapshot import Load, LoadColumns, Rows, SnapshotNode

T = TypeVar("T", float, NDArray[np.float64])


class LoadLike(Protocol):
    """A function's load on a node: the heartbeat's figures (the router's ``FunctionLoad`` too)."""

    @property
    def in_flight(self) -> float: ...
    @property
    def queued(self) -> float: ...
    @property
    def batch_ms(self) -> float: ...
    @property
    def row_ms(self) -> float: ...


def estimate_latency_ms(
    rtt_ms: T, load: LoadLike, *, max_batch: int, rows: int = 1, backlog_ms: T | float = 0.0
) -> T:
    """Estimated ms from sending a request of ``rows`` rows to the node until its answer is back.

    RTT + waiting (``backlog_ms`` of other work, the rest of the running batch,
    the full batches queued ahead) + the run time of the request's own batch.
    ``rtt_ms`` and ``backlog_ms`` may be numpy arrays (one value per node).
    """
    ahead = load.queued + rows
    batches = math.ceil(ahead / max(max_batch, 1))
    per_batch = max(load.batch_ms, load.row_ms * min(ahead, max_batch))
    running = load.batch_ms / 2 if load.in_flight else 0.0
    wait = backlog_ms + running + (batches - 1) * per_batch
    return rtt_ms + wait + per_batch


def _estimate_columns(
    rtt_ms: NDArray[np.float64], load: LoadColumns, max_batch: int, rows: int = 1
) -> NDArray[np.float64]:
    """:func:`estimate_latency_ms` for many nodes' own loads at once, step for step."""
    ahead = load.queued + rows
    batches = np.ceil(ahead / max(max_batch, 1))
    per_batch = np.maximum(load.batch_ms, load.row_ms * np.minimum(ahead, max_batch))
    running = np.where(load.in_flight != 0, load.batch_ms / 2, 0.0)
    wait = load.others_ms + running + (batches - 1) * per_batch
    out: NDArray[np.float64] = rtt_ms + wait + per_batch
    return out


def latency_score(estimate_ms: T, objective_ms: float) -> T:
    """100 at no latency, 0 at or past the objective, linear between."""
    if isinstance(estimate_ms, np.ndarray):
        return 100.0 * np.minimum(1.0, np.maximum(0.0, 1.0 - estimate_ms / objective_ms))
    return 100.0 * min(1.0, max(0.0, 1.0 - estimate_ms / objective_ms))


class LatencyArgs(PluginArgs):
    #: RTT assumed for a node never measured, ms.
    unknown_rtt_ms: float = Field(default=50.0, ge=0)


class Latency(ScorePlugin):
    name = "latency"

    def __init__(self, args: LatencyArgs) -> None:
        self.args = args

    def prepare(self, cycle: Cycle) -> None:
        cycle.state[self.name] = cycle.snapshot.service(cycle.function)

    def estimate(self, cycle: Cycle, node: SnapshotNode) -> float:
        """The estimated latency on ``node`` for this decision's function, ms."""
        rtt = self.args.unknown_rtt_ms if node.rtt_ms is None else node.rtt_ms
        own = node.load.get(cycle.function)
        if own is not None:
            return estimate_latency_ms(
                rtt,
                own,
                max_batch=cycle.max_batch,
                backlog_ms=node.others_backlog_ms(cycle.function),
            )
        idle: Load = cycle.state[self.name]
        return estimate_latency_ms(rtt, idle, max_batch=cycle.max_batch, backlog_ms=node.backlog_ms)

    def score(self, cycle: Cycle, node: SnapshotNode, site_counts: Mapping[str, int]) -> float:
        return latency_score(self.estimate(cycle, node), cycle.objective_ms)

    def estimate_rows(self, cycle: Cycle, rows: Rows) -> NDArray[np.float64]:
        snap = cycle.snapshot
        rtt = snap.rtt_ms[rows]
        rtt = np.where(np.isnan(rtt), self.args.unknown_rtt_ms, rtt)
        idle: Load = cycle.state[self.name]
        est = estimate_latency_ms(
            rtt, idle, max_batch=cycle.max_batch, backlog_ms=snap.backlog_ms[rows]
        )
        hosting = snap.by_load.get(cycle.function)
        if hosting is not None:
            # Nodes that run the function already: from their own queue and the others' backlog.
            h = hosting.rows
            hrtt = snap.rtt_ms[h]
            hrtt = np.where(np.isnan(hrtt), self.args.unknown_rtt_ms, hrtt)
            own = np.full(len(snap), np.nan)
            own[h] = _estimate_columns(hrtt, hosting, cycle.max_batch)
            mine = own[rows]
            est = np.where(np.isnan(mine), est, mine)
        return est

    def score_rows(self, cycle: Cycle, rows: Rows, site_counts: NDArray[np.int64]) -> Scores:
        return latency_score(self.estimate_rows(cycle, rows), cycle.objective_ms)
