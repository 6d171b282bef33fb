"""The plugin interface and the state of one placement decision (the scheduling cycle).

Each plugin is one rule, written twice over the same arguments: once for one
node (``filter``/``score``, what the naive path and explanations use) and
once for many rows at a time (``keep``/``score_rows``, numpy over the
snapshot's columns, what the engine uses). A filter may also look its passing
rows up in an index (``candidates``). The engine's property tests hold the
two forms to the same answers.

Scores are 0-100 per plugin, each plugin mapping its own measure onto that
range with a fixed function of the node and the request (never of the other
candidates), so a score means the same thing in every decision and can be
shown as is. The engine weights and sums them.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any, ClassVar

import numpy as np
from numpy.typing import NDArray
from pydantic import BaseModel, ConfigDict

from fnmesh.coordinator.placement.request import PlacementRequest, request_memory_mib
from fnmesh.coordinator.placement.snapshot import Rows, Snapshot, SnapshotNode
from fnmesh.coordinator.placement.status import FITS, Status
from fnmesh.coordinator.policies import Effective, combine, manifest_gpu
from fnmesh.functions.manifest import GpuRequirement, Runtime

Scores = NDArray[np.float64]
Mask = NDArray[np.bool_]

#: Where :meth:`Cycle.is_current` keeps its lookup table (not a plugin name).
_CURRENT = "/current"

_GPU_RANK = {GpuRequirement.NONE: 0, GpuRequirement.PREFERRED: 1, GpuRequirement.REQUIRED: 2}


class Cycle:
    """One decision: the request read once, and what plugins prepared for it.

    Plugins keep per-decision data in ``state[their name]`` (k8s CycleState),
    never on themselves: an engine's plugins are shared by every decision.
    """

    __slots__ = (
        "current",
        "current_rows",
        "effective",
        "function",
        "gpu",
        "gpu_arch",
        "manifest",
        "max_batch",
        "memory_mib",
        "objective_ms",
        "regions",
        "request",
        "snapshot",
        "state",
        "tiers",
        "version",
        "where",
    )

    def __init__(self, request: PlacementRequest, snapshot: Snapshot) -> None:
        m = request.manifest
        eff = request.effective if request.effective is not None else combine((), m)
        self.request = request
        self.snapshot = snapshot
        self.manifest = m
        self.function = request.function
        self.version = m.version
        self.effective: Effective = eff
        regions = eff.regions
        if m.data.regions:
            # The manifest's data rules hold even if the caller's Effective forgot them.
            own = frozenset(m.data.regions)
            regions = own if regions is None else regions & own
        self.regions: frozenset[str] | None = regions
        self.tiers: frozenset[str] | None = eff.tiers
        own_gpu = manifest_gpu(m)
        self.gpu = eff.gpu if _GPU_RANK[eff.gpu] >= _GPU_RANK[own_gpu] else own_gpu
        # Only a TensorRT plan is tied to the GPU architecture it was built for.
        self.gpu_arch = m.requirements.gpu_arch if m.runtime == Runtime.TENSORRT else None
        self.memory_mib = request_memory_mib(m)
        self.objective_ms = float(eff.latency_p95_ms or m.limits.timeout_ms)
        self.max_batch = m.limits.max_batch
        self.where: Mapping[str, str] = request.where
        self.current: frozenset[str] = frozenset(request.current)
        self.current_rows: Rows = snapshot.rows_of(request.current)
        self.state: dict[str, Any] = {}

    def is_current(self, rows: Rows) -> Mask:
        """Which of ``rows`` hold the function now (``request.current``)."""
        if not len(self.current_rows):
            return np.zeros(len(rows), dtype=np.bool_)
        flags: Mask | None = self.state.get(_CURRENT)
        if flags is None:
            flags = np.zeros(len(self.snapshot), dtype=np.bool_)
            flags[self.current_rows] = True
            self.state[_CURRENT] = flags
        return flags[rows]


class PluginArgs(BaseModel):
    """A plugin's typed arguments, from the profile; unknown names are refused."""

    model_config = ConfigDict(frozen=True, extra="forbid")


class NoArgs(PluginArgs):
    """For plugins that take no arguments."""


class Plugin:
    """A named rule. Subclasses implement one or both of the filter and score extension points."""

    name: ClassVar[str] = ""

    def prepare(self, cycle: Cycle) -> None:
        """Compute what the rule needs for this decision (k8s PreFilter/PreScore)."""


class FilterPlugin(Plugin):
    """A rule that excludes nodes."""

    def filter(self, cycle: Cycle, node: SnapshotNode) -> Status:
        """The verdict on one node."""
        raise NotImplementedError

    def candidates(self, cycle: Cycle) -> Rows | None:
        """Rows that may pass, ascending, from an index (every passing row is among them).

        None when the filter has no index for this request. The engine starts
        from the smallest such set and still applies every :meth:`keep`.
        """
        return None

    def keep(self, cycle: Cycle, rows: Rows) -> Mask | None:
        """Which of ``rows`` pass, as :meth:`filter` would say; None when all of them do."""
        raise NotImplementedError


class ScorePlugin(Plugin):
    """A rule that ranks the nodes every filter passed, 0-100 (higher is better)."""

    #: The score depends on the replicas already picked in this decision, so it is
    #: evaluated again after each pick (spread).
    per_pick: ClassVar[bool] = False

    def score(self, cycle: Cycle, node: SnapshotNode, site_counts: Mapping[str, int]) -> float:
        """The score of one node; ``site_counts`` counts this decision's picks per site."""
        raise NotImplementedError

    def score_rows(self, cycle: Cycle, rows: Rows, site_counts: NDArray[np.int64]) -> Scores:
        """The scores of many rows; ``site_counts`` is indexed by site id."""
        raise NotImplementedError


def vocab_mask(vocab: tuple[str, ...], allowed: frozenset[str]) -> Mask:
    """A lookup table over a column's vocabulary: True for the allowed values."""
    return np.array([v in allowed for v in vocab], dtype=np.bool_)


def union_rows(index: Mapping[str, Rows], keys: frozenset[str]) -> Rows:
    """The rows of every key in ``keys`` (disjoint groups, so no duplicates), ascending."""
    parts = [index[k] for k in sorted(keys) if k in index]
    if not parts:
        return np.empty(0, dtype=np.intp)
    if len(parts) == 1:
        return parts[0]
    # A stable sort of sorted runs is a merge: cheap.
    return np.sort(np.concatenate(parts), kind="stable")


class ColumnFilter(FilterPlugin):
    """A filter keeping nodes whose value in one snapshot column lies in an allowed set.

    Subclasses say which column (its vocabulary, ids and index in the snapshot),
    where the allowed set comes from, and how a refusal reads; ``None`` allowed
    means any value.
    """

    def __init__(self, args: NoArgs) -> None:
        self.args = args

    def allowed(self, cycle: Cycle) -> frozenset[str] | None:
        raise NotImplementedError

    def column(self, snapshot: Snapshot) -> tuple[tuple[str, ...], Any, Mapping[str, Rows]]:
        """(vocabulary, value id per row, rows per value) of the column."""
        raise NotImplementedError

    def value(self, node: SnapshotNode) -> str | None:
        raise NotImplementedError

    def refusal(self, value: str | None, allowed: frozenset[str]) -> str:
        raise NotImplementedError

    def prepare(self, cycle: Cycle) -> None:
        allowed = self.allowed(cycle)
        if allowed is not None:
            cycle.state[self.name] = vocab_mask(self.column(cycle.snapshot)[0], allowed)

    def filter(self, cycle: Cycle, node: SnapshotNode) -> Status:
        allowed = self.allowed(cycle)
        if allowed is None or self.value(node) in allowed:
            return FITS
        return Status.unresolvable(self.name, self.refusal(self.value(node), allowed))

    def candidates(self, cycle: Cycle) -> Rows | None:
        allowed = self.allowed(cycle)
        if allowed is None:
            return None
        return union_rows(self.column(cycle.snapshot)[2], allowed)

    def keep(self, cycle: Cycle, rows: Rows) -> Mask | None:
        if self.allowed(cycle) is None:
            return None
        mask: Mask = cycle.state[self.name]
        kept: Mask = mask[self.column(cycle.snapshot)[1][rows]]
        return kept
