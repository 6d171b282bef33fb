"""An immutable view of the fleet, taken once for a set of placement decisions.

Plugins read nodes from here, never from the live registry, so every decision
in a set sees the same fleet. Besides the nodes (sorted by name: a row number
is also the tie-break order) the snapshot holds columns (one numpy array per
attribute, row-aligned and read-only) and indexes (rows by region, tier, site,
label, GPU, function...) that let the engine look candidates up instead of
scanning every node.

A node whose status cannot be read (memory that is not a number, a load entry
that is not a mapping) keeps a ``defect``: it is never placed, and explaining
a decision says why.
"""

from __future__ import annotations

from collections.abc import Callable, Collection, Iterable, Mapping
from dataclasses import dataclass, field
from types import MappingProxyType
from typing import Any

import numpy as np
from numpy.typing import NDArray

from fnmesh.coordinator.placement.errors import PlacementError
from fnmesh.coordinator.registry import NodeView

Rows = NDArray[np.intp]

#: Node states that take work (the registry's ``live``).
LIVE_STATES = frozenset({"ready", "joined"})
#: The state of a node whose identity was refused or revoked: never placed on.
UNTRUSTED = "untrusted"


@dataclass(frozen=True, slots=True)
class Load:
    """One function's load on one node, as its last heartbeat reported it."""

    in_flight: float = 0.0
    queued: float = 0.0
    #: Moving average of a batch's run time, ms.
    batch_ms: float = 0.0
    #: Moving average of run time per row, ms.
    row_ms: float = 0.0

    @property
    def backlog_ms(self) -> float:
        """Work this function holds on the node: its queue, plus half the running batch."""
        running = self.batch_ms / 2 if self.in_flight else 0.0
        return self.queued * self.row_ms + running

    @classmethod
    def parse(cls, raw: Any) -> Load:
        if not isinstance(raw, Mapping):
            raise ValueError(f"a load entry must be a mapping, not {type(raw).__name__}")
        vals = {k: float(raw.get(k) or 0.0) for k in ("in_flight", "queued", "batch_ms", "row_ms")}
        if any(v < 0 or v != v for v in vals.values()):
            raise ValueError("load figures must be numbers >= 0")
        return cls(**vals)


@dataclass(frozen=True, slots=True)
class SnapshotNode:
    """What placement knows of one node. ``region``, ``site`` and ``tier`` come from ``labels``."""

    name: str
    state: str = "ready"
    labels: Mapping[str, str] = field(default_factory=dict)
    cores: int = 1
    memory_mib: int = 0
    gpus: tuple[str, ...] = ()
    gpu_arch: str | None = None
    #: Functions ready on the node, with their versions (its status).
    functions: Mapping[str, str] = field(default_factory=dict)
    #: Per-function load from its last heartbeat.
    load: Mapping[str, Load] = field(default_factory=dict)
    draining: bool = False
    #: Its certificate verified against the fleet CA and is not revoked.
    trusted: bool = False
    #: Measured round trip to the node, ms; None when never measured.
    rtt_ms: float | None = None
    #: Replicas placed on the node (all functions).
    replicas: int = 0
    #: Memory those replicas need, MiB.
    memory_used_mib: int = 0
    #: Why the node's data could not be read; "" when it could.
    defect: str = ""
    region: str = field(init=False)
    #: The ``site`` label, else the node's own name (a node alone is its own site).
    site: str = field(init=False)
    tier: str = field(init=False)
    #: The work queued on the node, all functions, per core, ms.
    backlog_ms: float = field(init=False)
    _backlogs: tuple[tuple[str, float], ...] = field(init=False, repr=False, compare=False)

    def __post_init__(self) -> None:
        labels = MappingProxyType(dict(self.labels))
        object.__setattr__(self, "labels", labels)
        object.__setattr__(self, "functions", MappingProxyType(dict(self.functions)))
        object.__setattr__(self, "load", MappingProxyType(dict(self.load)))
        object.__setattr__(self, "region", labels.get("region", ""))
        object.__setattr__(self, "site", labels.get("site") or self.name)
        object.__setattr__(self, "tier", labels.get("tier", ""))
        backlogs = tuple((fid, self.load[fid].backlog_ms) for fid in sorted(self.load))
        object.__setattr__(self, "_backlogs", backlogs)
        object.__setattr__(self, "backlog_ms", self.others_backlog_ms(None))

    @property
    def live(self) -> bool:
        return self.state in LIVE_STATES

    @property
    def has_gpu(self) -> bool:
        return bool(self.gpus)

    def others_backlog_ms(self, function: str | None) -> float:
        """The queued work of every function but ``function``, per core, ms."""
        total = 0.0
        for fid, ms in self._backlogs:
            if fid != function:
                total += ms
        return total / max(self.cores, 1)

    @classmethod
    def from_view(
        cls,
        view: NodeView,
        *,
        trusted: bool,
        rtt_ms: float | None = None,
        replicas: int | None = None,
        memory_used_mib: int = 0,
    ) -> SnapshotNode:
        """Read a registry view; malformed hardware or load leaves a ``defect``, not an error."""
        hw = view.hardware or {}
        common: dict[str, Any] = {
            "name": view.name,
            "state": view.state,
            "labels": {str(k): str(v) for k, v in view.labels.items()},
            "functions": dict(view.functions),
            "draining": view.draining,
            "trusted": trusted,
            "rtt_ms": None if rtt_ms is None else float(rtt_ms),
            "replicas": len(view.functions) if replicas is None else int(replicas),
            "memory_used_mib": int(memory_used_mib),
        }
        try:
            gpus = hw.get("gpus") or []
            if not isinstance(gpus, list | tuple):
                raise ValueError(f"hardware.gpus is {gpus!r}, not a list")
            arch = hw.get("gpu_arch")
            load_raw = view.load or {}
            if not isinstance(load_raw, Mapping):
                raise ValueError("load is not a mapping")
            return cls(
                cores=max(1, _number(hw, "cores", 1)),
                memory_mib=max(0, _number(hw, "memory_mib", 0)),
                gpus=tuple(str(g) for g in gpus),
                gpu_arch=None if arch is None else str(arch),
                load={str(f): _load(f, v) for f, v in load_raw.items()},
                **common,
            )
        except (TypeError, ValueError) as e:
            return cls(defect=f"unreadable status or heartbeat: {e}", **common)


@dataclass(frozen=True, slots=True)
class LoadColumns:
    """One function's load on the nodes that report it, row-aligned (for estimating at once)."""

    rows: Rows
    in_flight: NDArray[np.float64]
    queued: NDArray[np.float64]
    batch_ms: NDArray[np.float64]
    row_ms: NDArray[np.float64]
    #: Every other function's backlog on the node, per core (:meth:`SnapshotNode.others_backlog_ms`).
    others_ms: NDArray[np.float64]

    @classmethod
    def of(cls, entries: list[tuple[int, float, float, float, float, float]]) -> LoadColumns:
        cols = list(zip(*entries, strict=True))
        return cls(
            _frozen(np.array(cols[0], dtype=np.intp)),
            *(_frozen(np.array(c, dtype=np.float64)) for c in cols[1:]),
        )


def _number(hw: Mapping[str, Any], key: str, default: int) -> int:
    raw = hw.get(key)
    if raw is None:
        return default
    try:
        return int(raw)
    except (TypeError, ValueError) as e:
        raise ValueError(f"hardware.{key} is {raw!r}, not a whole number") from e


def _load(function: str, raw: Any) -> Load:
    try:
        return Load.parse(raw)
    except (TypeError, ValueError) as e:
        raise ValueError(f"load of {function}: {e}") from e


def _frozen(a: NDArray[Any]) -> NDArray[Any]:
    a.flags.writeable = False
    return a


def _index(keys: list[str]) -> tuple[tuple[str, ...], Rows, Mapping[str, Rows]]:
    """Vocabulary, the row -> id column, and key -> rows (ascending)."""
    ids: dict[str, int] = {}
    col = np.empty(len(keys), dtype=np.intp)
    groups: dict[str, list[int]] = {}
    for row, k in enumerate(keys):
        col[row] = ids.setdefault(k, len(ids))
        groups.setdefault(k, []).append(row)
    rows = {k: _frozen(np.array(v, dtype=np.intp)) for k, v in groups.items()}
    return tuple(ids), _frozen(col), MappingProxyType(rows)


def _rows_where(flags: NDArray[np.bool_]) -> Rows:
    return _frozen(np.flatnonzero(flags).astype(np.intp))


class Snapshot:
    """The fleet for one set of decisions: nodes by row, columns, and indexes. Never changes."""

    def __init__(self, nodes: Iterable[SnapshotNode]) -> None:
        ordered = sorted(nodes, key=lambda n: n.name)
        self.nodes: tuple[SnapshotNode, ...] = tuple(ordered)
        self.names: tuple[str, ...] = tuple(n.name for n in ordered)
        self.row: Mapping[str, int] = MappingProxyType({n: i for i, n in enumerate(self.names)})
        if len(self.row) != len(self.names):
            raise PlacementError("a snapshot cannot hold two nodes of the same name")
        ns = self.nodes

        def col(values: list[Any], dtype: Any) -> NDArray[Any]:
            return _frozen(np.array(values, dtype=dtype))

        self.regions, self.region_id, self.by_region = _index([n.region for n in ns])
        self.tiers, self.tier_id, self.by_tier = _index([n.tier for n in ns])
        self.sites, self.site_id, self.by_site = _index([n.site for n in ns])
        self.gpu_archs, self.gpu_arch_id, self.by_gpu_arch = _index([n.gpu_arch or "" for n in ns])
        self.has_gpu = col([n.has_gpu for n in ns], np.bool_)
        self.live = col([n.live for n in ns], np.bool_)
        self.draining = col([n.draining for n in ns], np.bool_)
        #: Trusted and not in the ``untrusted`` state.
        self.trusted = col([n.trusted and n.state != UNTRUSTED for n in ns], np.bool_)
        #: No defect.
        self.sound = col([not n.defect for n in ns], np.bool_)
        self.memory_mib = col([n.memory_mib for n in ns], np.int64)
        self.memory_used_mib = col([n.memory_used_mib for n in ns], np.int64)
        self.replicas = col([n.replicas for n in ns], np.int64)
        #: Memory not yet promised to replicas, MiB, as floats (exact below 2**53).
        self.memory_free_mib = col([n.memory_mib - n.memory_used_mib for n in ns], np.float64)
        self.rtt_ms = col([np.nan if n.rtt_ms is None else n.rtt_ms for n in ns], np.float64)
        self.backlog_ms = col([n.backlog_ms for n in ns], np.float64)
        self.all_rows: Rows = _frozen(np.arange(len(ns), dtype=np.intp))
        self.gpu_rows = _rows_where(self.has_gpu)
        self.live_rows = _rows_where(self.live)
        self.undrained_rows = _rows_where(~self.draining)
        self.trusted_rows = _rows_where(self.trusted)
        self.sound_rows = _rows_where(self.sound)
        self.all_sound = bool(self.sound.all())

        labels: dict[tuple[str, str], list[int]] = {}
        functions: dict[str, list[int]] = {}
        versions: dict[tuple[str, str], list[int]] = {}
        loaded: dict[str, list[tuple[int, float, float, float, float, float]]] = {}
        service: dict[str, list[Load]] = {}
        for row, n in enumerate(ns):
            for kv in n.labels.items():
                labels.setdefault(kv, []).append(row)
            for fv in n.functions.items():
                functions.setdefault(fv[0], []).append(row)
                versions.setdefault(fv, []).append(row)
            for fid, ld in n.load.items():
                loaded.setdefault(fid, []).append(
                    (
                        row,
                        ld.in_flight,
                        ld.queued,
                        ld.batch_ms,
                        ld.row_ms,
                        n.others_backlog_ms(fid),
                    )
                )
                if ld.batch_ms > 0 or ld.row_ms > 0:
                    service.setdefault(fid, []).append(ld)

        def rows(groups: Mapping[Any, list[int]]) -> Mapping[Any, Rows]:
            return MappingProxyType(
                {k: _frozen(np.array(v, dtype=np.intp)) for k, v in groups.items()}
            )

        self.by_label: Mapping[tuple[str, str], Rows] = rows(labels)
        #: Rows whose status lists the function (any version).
        self.by_function: Mapping[str, Rows] = rows(functions)
        #: Rows whose status lists the function at that version.
        self.by_version: Mapping[tuple[str, str], Rows] = rows(versions)
        #: Per function, the rows whose heartbeat reports its load, and that load as columns.
        self.by_load: Mapping[str, LoadColumns] = MappingProxyType(
            {fid: LoadColumns.of(entries) for fid, entries in loaded.items()}
        )
        self._service: Mapping[str, Load] = MappingProxyType(
            {
                fid: Load(
                    batch_ms=sum(x.batch_ms for x in xs) / len(xs),
                    row_ms=sum(x.row_ms for x in xs) / len(xs),
                )
                for fid, xs in service.items()
            }
        )

    @classmethod
    def build(
        cls,
        views: Iterable[NodeView] | Mapping[str, NodeView],
        *,
        trusted: Collection[str] | Callable[[NodeView], bool],
        rtt_ms: Mapping[str, float] | None = None,
        replicas: Mapping[str, int] | None = None,
        memory_used_mib: Mapping[str, int] | None = None,
    ) -> Snapshot:
        """Snapshot registry views.

        ``trusted`` names the nodes whose certificates verified (or decides per
        view); ``rtt_ms`` is the measured round trip per node; ``replicas`` and
        ``memory_used_mib`` count what is placed on each node (default: the
        functions its status lists, and no memory).
        """
        items = views.values() if isinstance(views, Mapping) else views
        if callable(trusted):
            is_trusted = trusted
        else:
            names = trusted

            def is_trusted(v: NodeView) -> bool:
                return v.name in names

        rtt = rtt_ms or {}
        reps = replicas or {}
        mem = memory_used_mib or {}
        return cls(
            SnapshotNode.from_view(
                v,
                trusted=bool(is_trusted(v)),
                rtt_ms=rtt.get(v.name),
                replicas=reps.get(v.name),
                memory_used_mib=mem.get(v.name, 0),
            )
            for v in items
        )

    def __len__(self) -> int:
        return len(self.nodes)

    def node(self, name: str) -> SnapshotNode | None:
        row = self.row.get(name)
        return None if row is None else self.nodes[row]

    def service(self, function: str) -> Load:
        """The function's run time across the fleet (mean of reporting nodes), idle queues."""
        return self._service.get(function) or Load()

    def rows_of(self, names: Iterable[str]) -> Rows:
        """Rows of the named nodes present in the snapshot, ascending."""
        return np.array(sorted({self.row[n] for n in names if n in self.row}), dtype=np.intp)
