"""Errors of the identity layer."""

from __future__ import annotations

from fnmesh.errors import MeshError


class IdentityError(MeshError):
    """A certificate, key or identity is missing, malformed or not acceptable."""


class TrustError(IdentityError):
    """A certificate does not chain to the fleet CA, is out of date, revoked or of the wrong role."""


class RevokedError(TrustError):
    """The certificate is on the fleet's revocation list."""


class HomeError(MeshError):
    """The home folder or its fnmesh.toml is missing or malformed."""


class KeyWrapError(MeshError):
    """A data key could not be wrapped or unwrapped (wrong recipient, tampered, unknown suite)."""
