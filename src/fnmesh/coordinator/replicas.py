"""The router's replica table: which nodes can answer a function right now, and how busy they are.

Built only from what nodes and the coordinator publish on MQTT (the retained
``nodes/{node}/status`` and ``nodes/{node}/assign``, and heartbeats), never
from the coordinator's REST API, so routing survives a coordinator restart.
Every method is pure over its arguments (time comes in as ``now``, chance as
``rng``), so the decisions are table-testable.

A node *hosts* a function when its assignment names it (or, with no assignment
seen, when its status lists it). A hosting node is a *live replica* when its
status says ``ready``, its status lists the function, its assignment (if any)
names it, and it was heard from (heartbeat, or status when given a time)
within ``MISSED_HEARTBEATS`` heartbeat periods. No node hosts it: ``not_found``.
Hosts but no live replica, or every live replica reports a full queue:
``saturated``.

Load is an estimate: the last heartbeat's ``in_flight + queued`` summed over
the node's functions (executor threads are shared by all of them), plus the
requests this router forwarded to the node since that heartbeat.
"""

from __future__ import annotations

import logging
import math
import random
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from typing import Any

from fnmesh.coordinator.errors import CoordinatorError
from fnmesh.functions.messages import ErrorCode

log = logging.getLogger("fnmesh.coordinator.replicas")

#: Heartbeat periods a node may stay silent before it stops being a live replica.
MISSED_HEARTBEATS = 3
#: A node's queue for one function counts as full at this many queued requests
#: (the agent's default ``--max-queue``; heartbeats do not carry the limit).
DEFAULT_QUEUE_LIMIT = 1024

READY = "ready"
OFFLINE = "offline"


class ControlMessageError(CoordinatorError):
    """A status, assign or heartbeat body does not have the documented shape."""


@dataclass(frozen=True, slots=True)
class FunctionLoad:
    """One function's load on one node, as its last heartbeat reported it."""

    in_flight: float = 0.0
    queued: float = 0.0
    batch_ms: float = 0.0
    row_ms: float = 0.0


@dataclass(frozen=True, slots=True)
class Replica:
    """A snapshot of one live replica of one function."""

    node: str
    function: str
    version: str
    labels: Mapping[str, str]
    #: Estimated requests outstanding on the node (see the module docstring).
    load: float
    #: Queued requests for this function at the last heartbeat.
    queued: float
    #: The last heartbeat showed this function's queue at its limit.
    full: bool


@dataclass(frozen=True, slots=True)
class Choice:
    """The outcome of routing one request: a replica, or the error code to answer with."""

    replica: Replica | None
    code: ErrorCode | None = None
    reason: str = ""


@dataclass(slots=True)
class NodeEntry:
    """Everything the table knows of one node."""

    name: str
    state: str = "unknown"
    labels: dict[str, str] = field(default_factory=dict)
    #: function -> version, from the status (ready to answer).
    ready: dict[str, str] = field(default_factory=dict)
    #: function -> version, from the assignment; None when no assignment was seen.
    assigned: dict[str, str] | None = None
    has_status: bool = False
    #: The node's own heartbeat period (status ``heartbeat_s``), if it says.
    period: float | None = None
    status_at: float | None = None
    heartbeat_at: float | None = None
    #: The later of ``status_at`` and ``heartbeat_at``.
    seen_at: float | None = None
    load: dict[str, FunctionLoad] = field(default_factory=dict)
    #: Sum of in_flight + queued over all functions at the last heartbeat.
    reported: float = 0.0
    #: Requests this router forwarded here since the last heartbeat.
    forwards: int = 0
    #: function -> (allow_spill, allowed regions) from the assignment.
    rules: dict[str, tuple[bool, tuple[str, ...]]] = field(default_factory=dict)
    #: function -> latency objective (ms) from the assignment.
    objectives: dict[str, float] = field(default_factory=dict)
    #: The node's round trip to the broker, from its heartbeats (ms).
    rtt_ms: float = 0.0

    def hosts(self, function: str) -> bool:
        if self.assigned is not None:
            return function in self.assigned
        return function in self.ready

    def seen(self, now: float) -> None:
        self.seen_at = now if self.seen_at is None else max(self.seen_at, now)


class ReplicaTable:
    """Nodes and the functions they can answer, fed by MQTT callbacks on one loop."""

    def __init__(
        self,
        *,
        heartbeat_s: float = 2.0,
        missed: int = MISSED_HEARTBEATS,
        queue_limit: int = DEFAULT_QUEUE_LIMIT,
    ) -> None:
        if heartbeat_s <= 0 or missed < 1 or queue_limit < 1:
            raise ValueError("heartbeat_s, missed and queue_limit must be positive")
        self.heartbeat_s = heartbeat_s
        self.missed = missed
        self.queue_limit = queue_limit
        self.nodes: dict[str, NodeEntry] = {}
        #: function -> nodes hosting it (kept in step with statuses and assignments).
        self._hosts: dict[str, set[str]] = {}

    # -- input ----------------------------------------------------------------------

    def apply_status(
        self, node: str, body: Mapping[str, Any] | None, now: float | None = None
    ) -> None:
        """A node's retained status (``None``: the retained message was cleared).

        ``now``, when given, is when it arrived: a status is a sign of life, so
        staleness counts from the later of it and the last heartbeat. A status
        without ``functions`` (the Last Will) keeps what the node last listed, so
        that a crashed node's functions stay known (``saturated``, not ``not_found``).
        """
        if body is None:
            entry = self.nodes.get(node)
            if entry is not None:
                entry.has_status = False
                entry.state = "unknown"
                entry.ready = {}
                entry.status_at = None
                entry.seen_at = entry.heartbeat_at
                self._reindex(entry)
            return
        state = body.get("state")
        if not isinstance(state, str):
            raise ControlMessageError("status needs 'state', a string")
        labels = body.get("labels", None)
        functions = body.get("functions", None)
        period = body.get("heartbeat_s", None)
        if labels is not None and not _str_map(labels):
            raise ControlMessageError("status 'labels' must map strings to strings")
        if functions is not None and not _str_map(functions):
            raise ControlMessageError("status 'functions' must map function ids to versions")
        entry = self._entry(node)
        entry.has_status = True
        entry.state = state
        if labels is not None:
            entry.labels = dict(labels)
        if functions is not None:
            entry.ready = dict(functions)
        if _positive(period):
            entry.period = float(period)
        if now is not None:
            entry.status_at = now
            entry.seen(now)
        self._reindex(entry)

    def apply_assign(self, node: str, body: Mapping[str, Any] | None) -> None:
        """A node's retained assignment (``None``: cleared, the status alone counts again)."""
        if body is None:
            entry = self.nodes.get(node)
            if entry is not None:
                entry.assigned = None
                self._reindex(entry)
            return
        items = body.get("functions")
        if not isinstance(items, list):
            raise ControlMessageError("assign needs 'functions', a list")
        assigned: dict[str, str] = {}
        rules: dict[str, tuple[bool, tuple[str, ...]]] = {}
        objectives: dict[str, float] = {}
        for item in items:
            if not isinstance(item, Mapping):
                raise ControlMessageError("assign 'functions' entries must be maps")
            fid, version = item.get("function"), item.get("version", "")
            if not isinstance(fid, str) or not isinstance(version, str):
                raise ControlMessageError("assign entries need 'function' and 'version' strings")
            regions = item.get("regions", [])
            if not isinstance(regions, list) or not all(isinstance(r, str) for r in regions):
                raise ControlMessageError("assign 'regions' must be a list of strings")
            assigned[fid] = version
            rules[fid] = (bool(item.get("allow_spill", False)), tuple(regions))
            if _positive(item.get("latency_ms")):
                objectives[fid] = float(item["latency_ms"])
        entry = self._entry(node)
        entry.assigned = assigned
        entry.rules = rules
        entry.objectives = objectives
        self._reindex(entry)

    def apply_heartbeat(self, node: str, body: Mapping[str, Any], now: float) -> None:
        """A heartbeat arrived at ``now``: fresh load figures, and the router's own count restarts."""
        functions = body.get("functions", {})
        if not isinstance(functions, Mapping):
            raise ControlMessageError("heartbeat 'functions' must be a map")
        load: dict[str, FunctionLoad] = {}
        for fid, figures in functions.items():
            if not isinstance(fid, str) or not isinstance(figures, Mapping):
                raise ControlMessageError("heartbeat 'functions' must map function ids to maps")
            load[fid] = FunctionLoad(
                in_flight=_number(figures, "in_flight"),
                queued=_number(figures, "queued"),
                batch_ms=_number(figures, "batch_ms"),
                row_ms=_number(figures, "row_ms"),
            )
        rtt = body.get("rtt_ms", {})
        entry = self._entry(node)
        if isinstance(rtt, Mapping) and _positive(rtt.get("broker")):
            entry.rtt_ms = float(rtt["broker"])
        entry.load = load
        entry.reported = sum(f.in_flight + f.queued for f in load.values())
        entry.forwards = 0
        entry.heartbeat_at = now
        entry.seen(now)

    def note_forward(self, node: str) -> None:
        """This router sent a request to ``node`` (counts until the node's next heartbeat)."""
        entry = self.nodes.get(node)
        if entry is not None:
            entry.forwards += 1

    # -- decisions ------------------------------------------------------------------

    def stale_after(self, entry: NodeEntry) -> float:
        """Seconds of silence after which ``entry`` is no longer live."""
        return self.missed * (entry.period or self.heartbeat_s)

    def why_not_live(self, entry: NodeEntry, function: str, now: float) -> str | None:
        """None when ``entry`` is a live replica of ``function``, else the reason it is not."""
        if not entry.has_status:
            return "no status"
        if entry.state != READY:
            return entry.state
        if function not in entry.ready:
            return "not ready for it"
        if entry.assigned is not None and function not in entry.assigned:
            return "not assigned it"
        seen = entry.seen_at
        if seen is not None and now - seen > self.stale_after(entry):
            return f"silent for {now - seen:.1f} s"
        return None

    def live_replicas(self, function: str, now: float) -> list[Replica]:
        """Every live replica of ``function`` (full ones included, marked ``full``)."""
        out = []
        for name in self._hosts.get(function, ()):
            entry = self.nodes[name]
            if self.why_not_live(entry, function, now) is None:
                out.append(self._replica(entry, function))
        return out

    def estimate_ms(self, entry: NodeEntry, function: str) -> float:
        """Expected latency of one more request on ``entry``: RTT + queue wait + run time.

        The wait is node-wide (functions share the node's executor threads): every
        reported in-flight or queued row at its function's per-row time, plus this
        router's forwards since the last heartbeat; the request itself costs one batch.
        """
        fl = entry.load.get(function, FunctionLoad())
        wait = sum((f.in_flight + f.queued) * f.row_ms for f in entry.load.values())
        return entry.rtt_ms + wait + entry.forwards * fl.row_ms + fl.batch_ms

    def objective(self, function: str) -> float | None:
        for entry in self.nodes.values():
            ms = entry.objectives.get(function)
            if ms is not None:
                return ms
        return None

    def spill_rules(self, function: str) -> tuple[bool, tuple[str, ...]]:
        """Whether ``function`` may spill, and the regions its data may go to (any assignment says)."""
        for entry in self.nodes.values():
            rule = entry.rules.get(function)
            if rule is not None:
                return rule
        return (False, ())

    def choose_spill(self, function: str, now: float, rng: random.Random) -> Choice:
        """A live ``tier=cloud`` replica inside the function's allowed regions, or ``saturated``.

        Residency is checked here again, whatever the edge node that spilled believed.
        """
        allowed, regions = self.spill_rules(function)
        if not allowed:
            return Choice(None, ErrorCode.SATURATED, f"{function} may not spill to the cloud")

        def cloud_in_region(entry: NodeEntry) -> str | None:
            if entry.labels.get("tier") != "cloud":
                return "not a cloud node"
            if regions and entry.labels.get("region") not in regions:
                return f"region {entry.labels.get('region')!r} is outside {list(regions)}"
            return None

        choice = self.choose(function, now, rng, accept=cloud_in_region)
        if choice.replica is None:
            return Choice(
                None,
                ErrorCode.SATURATED,
                f"no allowed cloud capacity for {function}: {choice.reason}",
            )
        return choice

    def choose(
        self,
        function: str,
        now: float,
        rng: random.Random,
        accept: Callable[[NodeEntry], str | None] | None = None,
    ) -> Choice:
        """The live replica with room expected to answer first, or why there is none.

        ``accept`` narrows the candidates (None = any), saying why it refuses one.
        """
        hosts = self._hosts.get(function)
        if not hosts:
            return Choice(None, ErrorCode.NOT_FOUND, f"no node serves {function}")
        candidates: list[NodeEntry] = []
        full = 0
        down: list[str] = []
        limit = self.queue_limit
        for name in hosts:
            entry = self.nodes[name]
            why = self.why_not_live(entry, function, now)
            if why is None and accept is not None:
                why = accept(entry)
            if why is not None:
                if len(down) < 5:
                    down.append(f"{name}: {why}")
                continue
            fl = entry.load.get(function)
            if fl is not None and fl.queued >= limit:
                full += 1
                continue
            candidates.append(entry)
        if candidates:
            # Lowest estimated latency (load breaks ties); over many replicas, the
            # better of two drawn at random (power of two choices) keeps this O(1).
            pair = candidates if len(candidates) <= 8 else rng.sample(candidates, 2)
            entry = min(
                pair,
                key=lambda e: (
                    self.estimate_ms(e, function),
                    e.reported + e.forwards,
                    rng.random(),
                ),
            )
            return Choice(self._replica(entry, function))
        if full:
            return Choice(
                None,
                ErrorCode.SATURATED,
                f"every live replica of {function} ({full}) has a full queue",
            )
        return Choice(
            None,
            ErrorCode.SATURATED,
            f"{function} has {len(hosts)} replica(s), none live ({'; '.join(sorted(down))})",
        )

    def pick(self, function: str, now: float, rng: random.Random) -> Replica | None:
        """The least loaded live replica with room, or None (see :meth:`choose` for why)."""
        return self.choose(function, now, rng).replica

    # -- internals ------------------------------------------------------------------

    def _entry(self, node: str) -> NodeEntry:
        entry = self.nodes.get(node)
        if entry is None:
            entry = self.nodes[node] = NodeEntry(node)
        return entry

    def _reindex(self, entry: NodeEntry) -> None:
        for fid, nodes in list(self._hosts.items()):
            if entry.name in nodes and not entry.hosts(fid):
                nodes.discard(entry.name)
                if not nodes:
                    del self._hosts[fid]
        hosted = entry.assigned if entry.assigned is not None else entry.ready
        for fid in hosted:
            self._hosts.setdefault(fid, set()).add(entry.name)
        if not entry.has_status and entry.assigned is None:
            del self.nodes[entry.name]

    def _replica(self, entry: NodeEntry, function: str) -> Replica:
        fl = entry.load.get(function, FunctionLoad())
        return Replica(
            node=entry.name,
            function=function,
            version=entry.ready.get(function, ""),
            labels=entry.labels,  # replaced, never changed in place, by a new status
            load=entry.reported + entry.forwards,
            queued=fl.queued,
            full=fl.queued >= self.queue_limit,
        )


def _str_map(v: object) -> bool:
    return isinstance(v, Mapping) and all(
        isinstance(k, str) and isinstance(x, str) for k, x in v.items()
    )


def _positive(v: object) -> bool:
    return isinstance(v, int | float) and not isinstance(v, bool) and math.isfinite(v) and v > 0


def _number(m: Mapping[str, Any], key: str) -> float:
    v = m.get(key, 0)
    if isinstance(v, bool) or not isinstance(v, int | float) or not math.isfinite(v) or v < 0:
        raise ControlMessageError(f"heartbeat '{key}' must be a non-negative number")
    return float(v)
