"""The placement engine: filters, then scores, then picks, over one snapshot.

``Engine(profile).place(request, snapshot)`` is the indexed path: it starts
from the smallest candidate set an index gives (the allowed regions' nodes,
the GPU nodes, the live ones...), applies every filter to those rows only,
scores what is left with numpy, and picks. ``place_naive`` applies the same
plugins one node at a time over every node, the way the rules read; it is the
reference the benchmark and the property tests hold the engine to, and both
return the same choices.

Picking (both paths): current replicas that still fit go first (no churn),
then the best total; ties go to the name that sorts first. With a per-site
floor (``min_per_site``), each site where some node fits gets that many
before the rest are filled. Scores marked ``per_pick`` (spread) are
evaluated again after every pick. The target is ``replicas_wanted``, raised
to the per-site floor and capped by the policy's ``max``.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from types import MappingProxyType

import numpy as np
from numpy.typing import NDArray

from fnmesh.coordinator.placement.decision import Decision, Detail, Explanation, Placed
from fnmesh.coordinator.placement.framework import Cycle, Scores
from fnmesh.coordinator.placement.registry import Profile, build
from fnmesh.coordinator.placement.request import PlacementRequest
from fnmesh.coordinator.placement.snapshot import Rows, Snapshot, SnapshotNode
from fnmesh.coordinator.placement.status import Status

#: The pseudo-plugin that reports nodes whose data could not be read.
SNAPSHOT = "snapshot"


class Engine:
    """Places functions with one profile's plugins. Immutable; share it between decisions."""

    def __init__(self, profile: Profile | None = None) -> None:
        self.profile = profile or Profile()
        built = build(self.profile)
        self._filters = built.filters
        self._plugins = built.plugins
        self._static = tuple((p, w) for p, w in built.scores if not p.per_pick)
        self._dynamic = tuple((p, w) for p, w in built.scores if p.per_pick)
        self._score_names = tuple(p.name for p, _ in built.scores)

    # -- shared ----------------------------------------------------------------------

    def _cycle(self, request: PlacementRequest, snapshot: Snapshot) -> Cycle:
        cycle = Cycle(request, snapshot)
        for p in self._plugins:
            p.prepare(cycle)
        return cycle

    @staticmethod
    def _target(cycle: Cycle, sites: Callable[[], int]) -> int:
        eff = cycle.effective
        target = cycle.request.replicas_wanted
        if eff.min_per_site:
            target = max(target, eff.min_per_site * sites())
        if eff.max_replicas is not None:
            target = min(target, eff.max_replicas)
        return target

    def statuses(self, cycle: Cycle, node: SnapshotNode) -> tuple[Status, ...]:
        """Every failing filter's status for ``node`` (empty when it fits)."""
        if node.defect:
            return (Status.error(SNAPSHOT, node.defect),)
        out = []
        for f in self._filters:
            s = f.filter(cycle, node)
            if not s.ok:
                out.append(s)
        return tuple(out)

    def _decision(
        self,
        cycle: Cycle,
        placed: list[Placed],
        target: int,
        feasible: int,
        method: str,
        scores: Callable[[str], tuple[Mapping[str, float], float] | None],
    ) -> Decision:
        request = cycle.request
        nodes = tuple(p.node for p in placed)
        chosen = set(nodes)
        reason = ""
        if not cycle.effective.satisfiable:
            reason = f"unsatisfiable: {cycle.effective.unsatisfiable}"
        elif len(nodes) < target:
            reason = (
                f"{len(nodes)} of {target} replicas placed: "
                f"{feasible} node(s) pass every filter"
                + (
                    f" and the per-site floor is {cycle.effective.min_per_site}"
                    if cycle.effective.min_per_site
                    else ""
                )
            )

        def statuses(name: str) -> tuple[Status, ...]:
            st = self.statuses(cycle, cycle.snapshot.nodes[cycle.snapshot.row[name]])
            if not st:
                return (Status.error("engine", "excluded although every filter passes it (a bug)"),)
            return st

        return Decision(
            function=request.function,
            nodes=nodes,
            placed=tuple(placed),
            kept=tuple(p.node for p in placed if p.kept),
            added=tuple(p.node for p in placed if not p.kept),
            removed=tuple(n for n in request.current if n not in chosen),
            target=target,
            feasible=feasible,
            effective=cycle.effective,
            reason=reason,
            method=method,
            detail=Detail(cycle.snapshot, self._score_names, statuses, scores),
        )

    # -- the indexed path ------------------------------------------------------------

    def place(self, request: PlacementRequest, snapshot: Snapshot) -> Decision:
        """Decide where the function's replicas go, through the snapshot's indexes."""
        cycle = self._cycle(request, snapshot)
        rows = self._feasible_rows(cycle)
        static: dict[str, Scores] = {}
        total: Scores = np.zeros(len(rows))
        if len(rows):
            no_picks = np.zeros(len(snapshot.sites), dtype=np.int64)
            for p, w in self._static:
                s = p.score_rows(cycle, rows, no_picks)
                static[p.name] = s
                total = total + w * s
        target = self._target(cycle, lambda: len(np.unique(snapshot.site_id[rows])))
        placed, counts = self._pick_rows(cycle, rows, total, static, target)

        position: dict[str, int] = {}

        def scores(name: str) -> tuple[Mapping[str, float], float] | None:
            if not position and len(rows):
                position.update((snapshot.names[r], i) for i, r in enumerate(rows.tolist()))
            i = position.get(name)
            if i is None:
                return None
            one = rows[i : i + 1]
            out = {k: float(v[i]) for k, v in static.items()}
            t = float(total[i])
            for p, w in self._dynamic:
                s = float(p.score_rows(cycle, one, counts)[0])
                out[p.name] = s
                t = t + w * s
            return {k: out[k] for k in self._score_names}, t

        return self._decision(cycle, placed, target, len(rows), "indexed", scores)

    def _feasible_rows(self, cycle: Cycle) -> Rows:
        snap = cycle.snapshot
        rows: Rows | None = None
        for f in self._filters:
            c = f.candidates(cycle)
            if c is not None and (rows is None or len(c) < len(rows)):
                rows = c
        if rows is None:
            rows = snap.all_rows
        if not snap.all_sound:
            rows = rows[snap.sound[rows]]
        for f in self._filters:
            if not len(rows):
                break
            keep = f.keep(cycle, rows)
            if keep is not None:
                rows = rows[keep]
        return rows

    def _pick_rows(
        self,
        cycle: Cycle,
        rows: Rows,
        static_total: Scores,
        static: dict[str, Scores],
        target: int,
    ) -> tuple[list[Placed], NDArray[np.int64]]:
        """Pick up to ``target`` of ``rows`` (ascending, so the first maximum is the first name)."""
        snap = cycle.snapshot
        counts = np.zeros(len(snap.sites), dtype=np.int64)
        placed: list[Placed] = []
        if not len(rows) or target <= 0:
            return placed, counts
        site = snap.site_id[rows]
        current = cycle.is_current(rows)
        current_at = np.flatnonzero(current)
        floor = cycle.effective.min_per_site
        total = np.array(static_total)
        dynamic: dict[str, Scores] = {}
        for p, w in self._dynamic:
            dynamic[p.name] = np.array(p.score_rows(cycle, rows, counts))
            total = total + w * dynamic[p.name]
        scores = {**static, **dynamic}
        # The candidates of the current phase with their totals; -inf once out of the running.
        masked = np.array(total)
        free = np.ones(len(rows), dtype=np.bool_)
        in_floor = bool(floor)

        def pick() -> bool:
            i = -1
            if len(current_at):
                # Replicas that still fit are kept before any new one is added.
                cur = masked[current_at]
                j = int(np.argmax(cur))
                if cur[j] != -np.inf:
                    i = int(current_at[j])
            if i < 0:
                i = int(np.argmax(masked))
                if masked[i] == -np.inf:
                    return False
            placed.append(
                Placed(
                    node=snap.names[rows[i]],
                    total=float(total[i]),
                    scores=MappingProxyType({k: float(scores[k][i]) for k in self._score_names}),
                    kept=bool(current[i]),
                )
            )
            free[i] = False
            masked[i] = -np.inf
            s_i = site[i]
            counts[s_i] += 1
            if not (self._dynamic or in_floor):
                return True
            # A per-pick score depends on the picks at the node's own site only: rescore that site.
            at = np.flatnonzero(site == s_i)
            if self._dynamic:
                sub = rows[at]
                t = static_total[at]
                for p, w in self._dynamic:
                    s = p.score_rows(cycle, sub, counts)
                    dynamic[p.name][at] = s
                    t = t + w * s
                total[at] = t
                masked[at] = np.where(masked[at] == -np.inf, -np.inf, t)
            if in_floor and counts[s_i] >= floor:
                masked[at] = -np.inf
            return True

        if in_floor:
            while len(placed) < target and pick():
                pass
            in_floor = False
            masked = np.where(free, total, -np.inf)
        while len(placed) < target and pick():
            pass
        return placed, counts

    # -- the naive path --------------------------------------------------------------

    def place_naive(self, request: PlacementRequest, snapshot: Snapshot) -> Decision:
        """The same decision as :meth:`place`, by running every plugin on every node in turn."""
        cycle = self._cycle(request, snapshot)
        feasible: list[SnapshotNode] = []
        for node in snapshot.nodes:
            if node.defect:
                continue
            for f in self._filters:
                if not f.filter(cycle, node).ok:
                    break
            else:
                feasible.append(node)
        static: dict[str, tuple[dict[str, float], float]] = {}
        for node in feasible:
            out: dict[str, float] = {}
            t = 0.0
            for p, w in self._static:
                s = p.score(cycle, node, {})
                out[p.name] = s
                t = t + w * s
            static[node.name] = (out, t)
        target = self._target(cycle, lambda: len({n.site for n in feasible}))
        counts: dict[str, int] = {}
        chosen: set[str] = set()
        placed: list[Placed] = []

        def with_dynamic(node: SnapshotNode) -> tuple[dict[str, float], float]:
            out, t = static[node.name]
            out = dict(out)
            for p, w in self._dynamic:
                s = p.score(cycle, node, counts)
                out[p.name] = s
                t = t + w * s
            return {k: out[k] for k in self._score_names}, t

        def total_of(node: SnapshotNode) -> float:
            t = static[node.name][1]
            for p, w in self._dynamic:
                t = t + w * p.score(cycle, node, counts)
            return t

        def pick(eligible: Callable[[SnapshotNode], bool]) -> bool:
            pool = [n for n in feasible if n.name not in chosen and eligible(n)]
            if not pool:
                return False
            pool = [n for n in pool if n.name in cycle.current] or pool
            best: tuple[SnapshotNode, float] | None = None
            for n in pool:
                t = total_of(n)
                if best is None or t > best[1]:
                    best = (n, t)
            assert best is not None
            node = best[0]
            out, t = with_dynamic(node)
            placed.append(
                Placed(node.name, t, MappingProxyType(out), kept=node.name in cycle.current)
            )
            chosen.add(node.name)
            counts[node.site] = counts.get(node.site, 0) + 1
            return True

        floor = cycle.effective.min_per_site
        if floor and target > 0:
            while len(placed) < target and pick(lambda n: counts.get(n.site, 0) < floor):
                pass
        while len(placed) < target and pick(lambda n: True):
            pass

        def scores(name: str) -> tuple[Mapping[str, float], float] | None:
            node = snapshot.node(name)
            if node is None or name not in static:
                return None
            return with_dynamic(node)

        return self._decision(cycle, placed, target, len(feasible), "naive", scores)

    def explain(self, request: PlacementRequest, snapshot: Snapshot) -> Explanation:
        """Place, then account for every node: chosen, feasible, or excluded and why."""
        return self.place(request, snapshot).explain()
