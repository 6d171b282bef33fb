"""What the store hands back: frozen snapshots of rows, never live ORM objects."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any


@dataclass(frozen=True, slots=True)
class VersionRecord:
    """One pushed version of a function and the bundle behind it."""

    function: str
    version: str
    digest: str
    manifest: dict[str, Any]
    publisher: str
    size: int
    pushed_by: str
    pushed_at: float


@dataclass(frozen=True, slots=True)
class FunctionRecord:
    """A function and its versions, oldest to newest by semver; ``latest`` is the last."""

    function: str
    versions: list[str]
    latest: str | None


@dataclass(frozen=True, slots=True)
class DeploymentRecord:
    """The desired state of one function: which version, how many replicas, where.

    ``previous_version`` is the version deployed before the last version change
    (what a rollback goes back to); ``generation`` is the store-wide deployment
    counter at this change.
    """

    function: str
    version: str
    min_replicas: int
    max_replicas: int
    where: dict[str, str]
    allow_spill: bool
    previous_version: str | None
    generation: int
    updated_at: float
    #: The operator-signed order that allowed going back to an older version.
    rollback: dict[str, Any] | None = None


@dataclass(frozen=True, slots=True)
class NodeRecord:
    """The durable copy of a node as the registry last saw it."""

    name: str
    cn: str
    labels: dict[str, str]
    hardware: dict[str, Any]
    state: str
    status: dict[str, Any]
    fingerprint: str
    last_seen: float
    draining: bool


@dataclass(frozen=True, slots=True)
class PlacementRecord:
    """One function version assigned to one node, since ``since`` (epoch seconds)."""

    function: str
    version: str
    node: str
    since: float


@dataclass(frozen=True, slots=True)
class AuditEntry:
    """One entry of the hash-chained audit log.

    ``hash`` is SHA-256 over the canonical JSON of every other field (see
    :mod:`fnmesh.coordinator.audit`); ``prev_hash`` is the previous entry's
    ``hash``, so changing or removing any entry breaks the chain after it.
    """

    seq: int
    ts: float
    who: str
    action: str
    detail: dict[str, Any]
    prev_hash: str
    hash: str
