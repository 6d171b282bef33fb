"""The outcome of one placement decision, and its explanation.

A :class:`Decision` names the nodes that should hold the function (kept ones
first), what was added and removed, and each placed node's score per plugin.
:meth:`Decision.explain` accounts for every node of the snapshot: placed,
feasible but not chosen, or excluded with each failing filter's reason. It is
computed on demand, so a decision that is never explained costs nothing more.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from types import MappingProxyType
from typing import Any

from fnmesh.coordinator.placement.snapshot import Snapshot
from fnmesh.coordinator.placement.status import NodeResult, Status
from fnmesh.coordinator.policies import Effective

#: An explanation row's verdicts.
PLACED, KEPT, FEASIBLE, REMOVED, EXCLUDED = "placed", "kept", "feasible", "removed", "excluded"


@dataclass(frozen=True, slots=True)
class Placed:
    """One chosen node, with its score per plugin at the moment it was picked."""

    node: str
    total: float
    scores: Mapping[str, float]
    #: It held the function already (``request.current``).
    kept: bool


@dataclass(frozen=True, slots=True)
class ExplainRow:
    """One node's line in an explanation."""

    node: str
    region: str
    site: str
    tier: str
    verdict: str
    #: 1 for the first pick; None when not chosen.
    rank: int | None
    #: Weighted sum of ``scores``; None when excluded.
    total: float | None
    scores: Mapping[str, float]
    #: Failing filters, in profile order; empty when the node fits.
    statuses: tuple[Status, ...]

    @property
    def reason(self) -> str:
        return "; ".join(str(s) for s in self.statuses)

    def as_dict(self) -> dict[str, Any]:
        return {
            "node": self.node,
            "region": self.region,
            "site": self.site,
            "tier": self.tier,
            "verdict": self.verdict,
            "rank": self.rank,
            "total": self.total,
            "scores": dict(self.scores),
            "statuses": [
                {"plugin": s.plugin, "code": s.code.value, "reason": s.reason}
                for s in self.statuses
            ],
        }


@dataclass(frozen=True, slots=True)
class Explanation:
    """Every node's verdict for one decision: chosen (in pick order), feasible, then excluded."""

    function: str
    target: int
    reason: str
    effective: Mapping[str, Any]
    #: Score plugin names, in profile order (the table's score columns).
    score_plugins: tuple[str, ...]
    rows: tuple[ExplainRow, ...]

    def excluded(self) -> dict[str, str]:
        """Node -> why it was excluded (every failing filter), for the nodes that do not fit."""
        return {r.node: r.reason for r in self.rows if r.statuses}

    def columns(self) -> tuple[str, ...]:
        return ("node", "region", "site", "tier", "verdict", "total", *self.score_plugins, "reason")

    def table(self) -> list[tuple[str, ...]]:
        """Rows of strings matching :meth:`columns`, for a terminal table."""
        out = []
        for r in self.rows:
            scores = tuple(
                f"{r.scores[p]:.1f}" if p in r.scores else "" for p in self.score_plugins
            )
            total = "" if r.total is None else f"{r.total:.1f}"
            out.append((r.node, r.region, r.site, r.tier, r.verdict, total, *scores, r.reason))
        return out

    def as_dict(self) -> dict[str, Any]:
        return {
            "function": self.function,
            "target": self.target,
            "reason": self.reason or None,
            "effective": dict(self.effective),
            "nodes": [r.as_dict() for r in self.rows],
        }


@dataclass(frozen=True, slots=True)
class Detail:
    """What a decision needs to explain itself later (filled by the engine)."""

    snapshot: Snapshot
    score_plugins: tuple[str, ...]
    #: Every failing filter's status for a node the decision did not find feasible.
    statuses: Callable[[str], tuple[Status, ...]]
    #: Per-plugin scores and total of a feasible node, after the last pick; None if not feasible.
    scores: Callable[[str], tuple[Mapping[str, float], float] | None]


@dataclass(frozen=True, slots=True)
class Decision:
    """Where a function's replicas should be after this decision."""

    function: str
    #: The chosen nodes: current ones still fitting first, then new ones, best first.
    nodes: tuple[str, ...]
    placed: tuple[Placed, ...]
    kept: tuple[str, ...]
    added: tuple[str, ...]
    #: Current nodes not chosen (no longer fitting, or over the target).
    removed: tuple[str, ...]
    #: Replicas wanted after the policy's per-site floor and cap.
    target: int
    #: Nodes that passed every filter.
    feasible: int
    effective: Effective
    #: Why fewer than ``target`` were placed ("" when all were).
    reason: str
    #: ``indexed`` (the engine) or ``naive`` (the full scan).
    method: str
    detail: Detail = field(repr=False, compare=False)

    @property
    def satisfied(self) -> bool:
        return len(self.nodes) >= self.target

    def result(self, node: str) -> NodeResult:
        """What the plugins said about ``node``: failing statuses, or scores and total."""
        sc = self.detail.scores(node)
        if sc is not None:
            scores, total = sc
            for p in self.placed:
                if p.node == node:
                    scores, total = p.scores, p.total
            return NodeResult(node, (), MappingProxyType(dict(scores)), total)
        return NodeResult(node, self.detail.statuses(node))

    def explain(self) -> Explanation:
        """Every node of the snapshot, with its verdict, scores and reasons."""
        snap = self.detail.snapshot
        current = set(self.kept) | set(self.removed)
        rows: list[ExplainRow] = []

        def row(name: str, verdict: str, rank: int | None, res: NodeResult) -> ExplainRow:
            n = snap.nodes[snap.row[name]]
            return ExplainRow(
                n.name, n.region, n.site, n.tier, verdict, rank, res.total, res.scores, res.statuses
            )

        picked = {p.node for p in self.placed}
        for i, p in enumerate(self.placed):
            verdict = KEPT if p.kept else PLACED
            rows.append(row(p.node, verdict, i + 1, NodeResult(p.node, (), p.scores, p.total)))
        feasible: list[ExplainRow] = []
        excluded: list[ExplainRow] = []
        for name in snap.names:
            if name in picked:
                continue
            res = self.result(name)
            if res.fits:
                feasible.append(row(name, REMOVED if name in current else FEASIBLE, None, res))
            else:
                excluded.append(row(name, REMOVED if name in current else EXCLUDED, None, res))
        feasible.sort(key=lambda r: -(r.total or 0.0))
        return Explanation(
            function=self.function,
            target=self.target,
            reason=self.reason,
            effective=self.effective.describe(),
            score_plugins=self.detail.score_plugins,
            rows=(*rows, *feasible, *excluded),
        )
