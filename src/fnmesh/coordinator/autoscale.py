"""Autoscaling: how many replicas each deployment should have, from the load its nodes report.

Agents put cumulative counters in each heartbeat's per-function load
(``answers``: requests answered there, any code; ``spilled``: requests handed
back to the routers for the cloud) next to the run-time averages
(``row_ms``). The autoscaler turns successive heartbeats into rates per
function and sizes the deployment so that each replica runs at the target
utilisation::

    replicas = ceil(rate x run time / target utilisation)   within [min, max]

Growing is immediate; shrinking waits until demand has stayed below the
current size for the whole cool-down, so a short lull never costs a replica.
Cloud replicas follow the spill rate the same way (the spilled work is what
the edge could not take). A function whose demand was never measured keeps
the deployment's ``max`` (the behaviour before autoscaling). Idle functions
also scale to zero on the agents themselves (the warm pool's idle TTL); the
next request is a cold start.

:func:`decide` is the pure decision (table-tested); :class:`Autoscaler` keeps
the counters and the cool-down clocks between reconcile passes.
"""

from __future__ import annotations

import math
import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from typing import Any

#: Fraction of a replica's capacity the autoscaler aims to use.
TARGET_UTILISATION = 0.7
#: Seconds demand must stay low before a replica is taken away.
COOLDOWN_S = 30.0
#: Rates are measured over at least this many seconds of heartbeats.
MIN_WINDOW_S = 0.5
#: Rates are measured over at most this many seconds by default (older samples are dropped).
MAX_WINDOW_S = 10.0


@dataclass(frozen=True, slots=True)
class Demand:
    """One function's load across the fleet, as measured from heartbeats."""

    #: Requests answered per second, on every node.
    rate: float
    #: Requests the edge handed back for the cloud, per second.
    spill_rate: float = 0.0
    #: Run time of one request (ms): the slowest node's per-row average.
    service_ms: float = 0.0


@dataclass(frozen=True, slots=True)
class Step:
    """One decision: the size to aim for, and when demand first fell below the current size."""

    desired: int
    low_since: float | None = None


def needed(rate: float, service_ms: float, target: float = TARGET_UTILISATION) -> int:
    """Replicas that keep each one at ``target`` utilisation under ``rate`` requests per second."""
    if rate <= 0 or service_ms <= 0:
        return 0
    return math.ceil(rate * service_ms / 1000.0 / target - 1e-9)


def decide(
    wanted: int,
    current: int,
    lo: int,
    hi: int,
    *,
    low_since: float | None,
    now: float,
    cooldown_s: float,
) -> Step:
    """The size for this pass: up at once, down only after ``cooldown_s`` of lower demand.

    ``wanted`` is what demand needs (unbounded), ``current`` what the deployment
    has now, ``[lo, hi]`` its bounds; ``low_since`` is carried between passes.
    """
    hi = max(hi, lo)
    target = min(max(wanted, lo), hi)
    if target >= current:
        return Step(target, None)
    since = now if low_since is None else low_since
    if now - since >= cooldown_s:
        return Step(target, None)
    return Step(current, since)


@dataclass(slots=True)
class _Sample:
    at: float
    answers: float
    spilled: float


@dataclass(slots=True)
class _Function:
    #: node -> heartbeat samples, oldest first.
    samples: dict[str, list[_Sample]] = field(default_factory=dict)
    desired: int | None = None
    low_since: float | None = None
    cloud: int = 0
    cloud_low_since: float | None = None
    #: Demand was measured at least once (until then the deployment keeps its max).
    measured: bool = False


@dataclass(frozen=True, slots=True)
class Target:
    """What the reconciler should aim for: replicas in total, and at least this many in the cloud."""

    replicas: int
    cloud: int = 0
    demand: Demand | None = None


class Autoscaler:
    """Rates from heartbeat counters, and the per-function state the cool-down needs."""

    def __init__(
        self,
        *,
        target_utilisation: float = TARGET_UTILISATION,
        cooldown_s: float = COOLDOWN_S,
        window_s: float = MAX_WINDOW_S,
        clock: Callable[[], float] = time.time,
    ) -> None:
        if not 0 < target_utilisation <= 1 or cooldown_s < 0 or window_s < MIN_WINDOW_S:
            raise ValueError(
                f"target_utilisation must be in (0, 1], cooldown_s >= 0, window_s >= {MIN_WINDOW_S}"
            )
        self.target_utilisation = target_utilisation
        self.cooldown_s = cooldown_s
        self.window_s = window_s
        self._clock = clock
        self._functions: dict[str, _Function] = {}
        self._seen: dict[str, float] = {}

    def observe(self, loads: Mapping[str, tuple[float, Mapping[str, Any]]]) -> None:
        """Take each node's latest heartbeat: node -> (when it arrived, its per-function load).

        A heartbeat already taken (same arrival time) is ignored, so this may be
        called on every pass with the whole registry.
        """
        for node, (at, functions) in loads.items():
            if not at or self._seen.get(node) == at:
                continue
            self._seen[node] = at
            for fid, figures in functions.items():
                if not isinstance(figures, Mapping) or "answers" not in figures:
                    continue
                answers, spilled = _num(figures.get("answers")), _num(figures.get("spilled"))
                samples = self._functions.setdefault(fid, _Function()).samples.setdefault(node, [])
                if samples and (answers < samples[-1].answers or spilled < samples[-1].spilled):
                    samples.clear()  # the agent restarted: its counters began again
                samples.append(_Sample(at, answers, spilled))
                while len(samples) > 2 and at - samples[1].at >= self.window_s:
                    samples.pop(0)

    def demand(
        self, function: str, service_ms: Mapping[str, float], now: float | None = None
    ) -> Demand | None:
        """Fleet-wide demand for ``function`` (None until some node measured a rate).

        ``service_ms`` maps nodes to their per-request run time for the function.
        A node silent for a whole window counts no more.
        """
        state = self._functions.get(function)
        if state is None:
            return None
        now = self._clock() if now is None else now
        rate = spill = 0.0
        measured = False
        for samples in state.samples.values():
            if len(samples) < 2 or now - samples[-1].at > self.window_s:
                continue
            first, last = samples[0], samples[-1]
            span = last.at - first.at
            if span < MIN_WINDOW_S:
                continue
            measured = True
            rate += (last.answers - first.answers) / span
            spill += (last.spilled - first.spilled) / span
        if not measured:
            return None
        run = max((ms for ms in service_ms.values() if ms > 0), default=0.0)
        return Demand(rate=rate, spill_rate=spill, service_ms=run)

    def target(
        self,
        function: str,
        *,
        current: int,
        lo: int,
        hi: int,
        service_ms: Mapping[str, float],
        spill: bool,
    ) -> Target:
        """The replicas to aim for this pass (``hi`` until demand was measured)."""
        now = self._clock()
        state = self._functions.setdefault(function, _Function())
        d = self.demand(function, service_ms, now)
        if d is not None and d.rate > 0:
            state.measured = True
        if d is None or not state.measured:
            state.desired = None
            return Target(max(hi, lo), 0, d)
        if state.desired is None:
            # First measurement: shrinking starts from the size the deployment has.
            state.desired = max(current, lo)
        step = decide(
            needed(d.rate, d.service_ms, self.target_utilisation),
            state.desired,
            lo,
            hi,
            low_since=state.low_since,
            now=now,
            cooldown_s=self.cooldown_s,
        )
        state.desired, state.low_since = step.desired, step.low_since
        cloud = 0
        if spill:
            cstep = decide(
                needed(d.spill_rate, d.service_ms, self.target_utilisation),
                max(state.cloud, 0),
                0,
                hi,
                low_since=state.cloud_low_since,
                now=now,
                cooldown_s=self.cooldown_s,
            )
            state.cloud, state.cloud_low_since = cstep.desired, cstep.low_since
            cloud = state.cloud
        return Target(step.desired, cloud, d)

    def forget(self, function: str) -> None:
        self._functions.pop(function, None)


def _num(v: object) -> float:
    if isinstance(v, bool) or not isinstance(v, int | float) or not math.isfinite(v) or v < 0:
        return 0.0
    return float(v)
