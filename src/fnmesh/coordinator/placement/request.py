"""What the reconciler asks placement: where should this function's replicas be?"""

from __future__ import annotations

import math
from collections.abc import Mapping
from dataclasses import dataclass, field
from types import MappingProxyType

from fnmesh.coordinator.policies import Effective
from fnmesh.functions.manifest import Manifest

_MIB = 1 << 20


def request_memory_mib(manifest: Manifest) -> int:
    """Memory the loaded function needs: the manifest's ``memory_mb``, else twice the model size.

    A loaded ONNX session holds the weights plus about as much again in
    arenas and graph copies, hence the factor of two when the publisher did
    not say.
    """
    stated = manifest.requirements.memory_mb
    if stated > 0:
        return stated
    return math.ceil(2 * manifest.digests.plaintext_size / _MIB)


@dataclass(frozen=True, slots=True)
class PlacementRequest:
    """Place ``replicas_wanted`` replicas of a function, keeping ``current`` ones that still fit.

    ``effective`` is the combined policy (see :func:`fnmesh.coordinator.policies.combine`);
    None means the manifest's own requirements only. ``where`` are node label
    constraints from the deployment (``{"site": "lyon-1"}``).
    """

    manifest: Manifest
    replicas_wanted: int = 1
    current: tuple[str, ...] = ()
    effective: Effective | None = None
    where: Mapping[str, str] = field(default_factory=lambda: MappingProxyType({}))
    #: The function id; defaults to the manifest's name.
    function: str = ""

    def __post_init__(self) -> None:
        if self.replicas_wanted < 0:
            raise ValueError(f"replicas_wanted must be >= 0, not {self.replicas_wanted}")
        if not self.function:
            object.__setattr__(self, "function", self.manifest.name)
        if not isinstance(self.current, tuple):
            object.__setattr__(self, "current", tuple(self.current))
        if not isinstance(self.where, MappingProxyType):
            object.__setattr__(self, "where", MappingProxyType(dict(self.where)))
