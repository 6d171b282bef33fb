"""The first, minimal placement, kept while the reconciler and the API move to the engine.

A node fits when it is live, matches the deployment's label constraints, lies
in a region the function's data may go to, and has a GPU when the function
requires one. Among fitting nodes the least loaded are picked, spreading over
sites. The engine (:mod:`.engine`) applies the same rules and more.
"""

from __future__ import annotations

from collections import Counter
from dataclasses import dataclass

from fnmesh.coordinator.registry import NodeView
from fnmesh.functions.manifest import GpuRequirement, Manifest


@dataclass(frozen=True, slots=True)
class Fit:
    ok: bool
    reason: str = ""


@dataclass(frozen=True, slots=True)
class Candidate:
    node: NodeView
    load: int


def fits(node: NodeView, manifest: Manifest, where: dict[str, str]) -> Fit:
    """Whether ``node`` may run ``manifest`` under the label constraints ``where``."""
    for k, v in where.items():
        if node.labels.get(k) != v:
            return Fit(False, f"label {k}={node.labels.get(k)!r}, the deployment needs {v!r}")
    regions = manifest.data.regions
    if regions and node.labels.get("region") not in regions:
        return Fit(
            False,
            f"region {node.labels.get('region')!r} is outside the function's regions {list(regions)}",
        )
    if manifest.requirements.gpu == GpuRequirement.REQUIRED and not node.has_gpu:
        return Fit(False, "the function requires a GPU and the node has none")
    return Fit(True)


def choose(
    candidates: list[Candidate], n: int, already: list[str], nodes: dict[str, NodeView]
) -> list[Candidate]:
    """Pick ``n`` candidates: fewest functions first, then sites not yet used."""
    if n <= 0:
        return []
    sites = Counter(nodes[a].labels.get("site", a) for a in already if a in nodes)
    picked: list[Candidate] = []
    pool = list(candidates)
    while pool and len(picked) < n:
        pool.sort(
            key=lambda c: (sites[c.node.labels.get("site", c.node.name)], c.load, c.node.name)
        )
        c = pool.pop(0)
        picked.append(c)
        sites[c.node.labels.get("site", c.node.name)] += 1
    return picked
