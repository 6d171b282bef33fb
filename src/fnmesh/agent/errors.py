"""Errors of the node agent: loading and running functions, and holding them warm."""

from __future__ import annotations

from fnmesh.errors import MeshError


class AgentError(MeshError):
    """Something the node agent was asked to do cannot be done here."""


class ExecutorError(AgentError):
    """A model cannot be loaded or run by any executor on this node."""


class UnsupportedHardwareError(ExecutorError):
    """The function needs hardware or a runtime this node lacks (GPU, GPU architecture, TensorRT)."""


class InferenceError(ExecutorError):
    """A loaded model refused its inputs or failed while running."""


class EngineCacheError(AgentError):
    """A cached engine cannot be read back: wrong key, tampered, truncated or not ours."""


class CapacityError(AgentError):
    """The warm pool cannot fit an executor without evicting one that is in use."""


class PoolClosedError(AgentError):
    """The warm pool is closed and hands out no more executors."""
