"""Errors of placement. A node that does not fit is a :class:`~.status.Status`, never one of these."""

from __future__ import annotations

from fnmesh.coordinator.errors import CoordinatorError


class PlacementError(CoordinatorError):
    """Placement itself is misused or broken (a bug, not a node that does not fit)."""


class ProfileError(PlacementError):
    """A placement profile names an unknown plugin, misuses one, or gives it bad arguments."""
