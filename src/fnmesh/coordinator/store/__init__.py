"""The coordinator's durable state (SQLite or PostgreSQL) and its bundle blobs."""

from __future__ import annotations

from fnmesh.coordinator.store.blobs import BlobStore, check_digest
from fnmesh.coordinator.store.records import (
    AuditEntry,
    DeploymentRecord,
    FunctionRecord,
    NodeRecord,
    PlacementRecord,
    VersionRecord,
)
from fnmesh.coordinator.store.store import Store, sqlite_url

__all__ = [
    "AuditEntry",
    "BlobStore",
    "DeploymentRecord",
    "FunctionRecord",
    "NodeRecord",
    "PlacementRecord",
    "Store",
    "VersionRecord",
    "check_digest",
    "sqlite_url",
]
