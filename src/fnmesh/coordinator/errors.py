"""Errors of the control plane, grouped by origin."""

from __future__ import annotations

from fnmesh.errors import MeshError


class CoordinatorError(MeshError):
    """Base of the coordinator's errors."""


class StoreError(CoordinatorError):
    """The state store or the blob store failed, or holds something it cannot read."""


class ConflictError(CoordinatorError):
    """A write disagrees with what is stored: same version, other digest; an older generation."""


class NotFoundError(CoordinatorError):
    """The named function, version, deployment, node or blob does not exist."""


class InvalidRequestError(CoordinatorError):
    """An argument is malformed: a digest not 64 lowercase hex, a version not semver, a bad URL."""
