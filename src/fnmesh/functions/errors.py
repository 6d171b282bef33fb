"""Errors of the function contract (bundles and messages)."""

from __future__ import annotations

from fnmesh.errors import MeshError


class BundleError(MeshError):
    """A bundle is malformed, tampered with, or not acceptable."""


class BundleFormatError(BundleError):
    """The bundle's bytes do not parse (truncated, bad magic, unknown major version)."""


class SignatureError(BundleError):
    """The manifest's signature, or the publisher's certificate behind it, does not check out."""


class IntegrityError(BundleError):
    """A digest or authentication tag does not match: the bundle was changed."""


class ManifestError(BundleError):
    """The manifest is invalid or disagrees with the model it describes."""


class GraphError(BundleError):
    """The model graph is not acceptable (external data, custom operator domains, unreadable)."""


class ExpiredError(BundleError):
    """The bundle is outside its validity dates."""


class MessageError(MeshError):
    """An invocation message is malformed or does not match the function's inputs."""
