"""The root of every error fnmesh raises on purpose."""

from __future__ import annotations


class MeshError(Exception):
    """Base of all fnmesh errors: something outside the code was wrong, said plainly."""
