"""Operator placement policies: YAML documents that narrow where and how functions run.

A policy selects functions (namespace, a glob over the name, deployment
labels) and sets rules. Every policy matching a function applies at once,
together with the bundle manifest's own requirements, and :func:`combine`
folds them into one :class:`Effective` that is the most restrictive of all:
regions and tiers intersect, the smallest latency objective and replica cap
win, the strictest GPU rule and the largest per-site floor win, and spilling
is allowed only if every policy allows it. An empty intersection is not an
error: the result says ``unsatisfiable`` and why, so placement can report it.

A policy document::

    name: eu-edge-vision
    description: camera models stay in the EU, on edge boxes
    selector: {namespace: vision, name: "detect-*"}
    rules:
      regions: [eu-west, eu-central]
      tiers: [edge]
      latency_p95_ms: 80
      gpu: preferred
      replicas: {min_per_site: 1, max: 20}
      spill: false

Every field has a documented default (a policy of just ``name`` matches every
function and restricts nothing). Unknown fields are refused: a misspelt rule
must not pass silently as "no rule". :class:`PolicySet` keeps policies in
memory and bumps a policy's ``version`` on each apply; the store integration
comes later.
"""

from __future__ import annotations

import builtins
import fnmatch
from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from typing import Any

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator

from fnmesh.coordinator.errors import CoordinatorError
from fnmesh.functions.manifest import GpuRequirement, Manifest, Runtime

_GPU_RANK = {GpuRequirement.NONE: 0, GpuRequirement.PREFERRED: 1, GpuRequirement.REQUIRED: 2}


class PolicyError(CoordinatorError):
    """A policy document is malformed: bad YAML, an unknown field, a value out of range."""


class _Model(BaseModel):
    model_config = ConfigDict(frozen=True, extra="forbid")


def _names(v: tuple[str, ...] | None, what: str) -> tuple[str, ...] | None:
    if v is None:
        return None
    if not v:
        raise ValueError(f"an empty {what} list allows nothing; leave it out to allow any")
    if any(not s or s != s.strip() for s in v):
        raise ValueError(f"{what} must be non-empty names without surrounding spaces")
    return tuple(dict.fromkeys(v))


class Selector(_Model):
    """Which functions a policy applies to; every field given must match. The default matches all."""

    #: The function's namespace, exactly; null = any namespace.
    namespace: str | None = None
    #: A shell-style glob over the function's name inside its namespace ("detect-*"); "*" = any.
    name: str = "*"
    #: Labels the function's deployment must carry, every one of them; {} = none needed.
    labels: dict[str, str] = Field(default_factory=dict)

    def matches(self, function: str, labels: Mapping[str, str] | None = None) -> bool:
        ns, _, short = function.partition("/")
        if self.namespace is not None and ns != self.namespace:
            return False
        if not fnmatch.fnmatchcase(short, self.name):
            return False
        have = labels or {}
        return all(have.get(k) == v for k, v in self.labels.items())


class Replicas(_Model):
    """How many replicas a function may have."""

    #: Replicas wanted at every site where some node fits the function; 0 = no per-site floor.
    min_per_site: int = Field(default=0, ge=0, le=1000)
    #: Most replicas in total; null = no cap. 0 is allowed and means "place nowhere".
    max: int | None = Field(default=None, ge=0, le=100_000)


class Rules(_Model):
    """What a policy asks of the functions it selects. Each default restricts nothing."""

    #: Regions the function's replicas (and so its data) may be in; null = any region.
    regions: tuple[str, ...] | None = None
    #: Node tiers (``edge``, ``cloud``, ...) replicas may be on; null = any tier.
    tiers: tuple[str, ...] | None = None
    #: The latency objective, request to answer, 95th percentile, in ms; null = the
    #: function's own timeout.
    latency_p95_ms: float | None = Field(default=None, gt=0, le=3_600_000)
    #: ``required``: GPU nodes only; ``preferred``: a GPU node when one has room;
    #: ``none`` (default): no GPU rule. A policy cannot forbid GPUs.
    gpu: GpuRequirement = GpuRequirement.NONE
    replicas: Replicas = Replicas()
    #: Whether edge replicas may spill requests to cloud replicas; true = no objection.
    spill: bool = True

    @field_validator("regions")
    @classmethod
    def _regions_ok(cls, v: tuple[str, ...] | None) -> tuple[str, ...] | None:
        return _names(v, "regions")

    @field_validator("tiers")
    @classmethod
    def _tiers_ok(cls, v: tuple[str, ...] | None) -> tuple[str, ...] | None:
        return _names(v, "tiers")


class Policy(_Model):
    """One operator policy: a name, which functions it selects, and its rules."""

    name: str = Field(pattern=r"^[a-z0-9][a-z0-9_.-]{0,62}$")
    #: Bumped by each apply of the same name (0 = never applied).
    version: int = Field(default=0, ge=0)
    description: str = ""
    selector: Selector = Selector()
    rules: Rules = Rules()

    @property
    def ref(self) -> str:
        """``name@version``: how decisions name the policies that shaped them."""
        return f"{self.name}@{self.version}"

    def to_yaml(self) -> str:
        text: str = yaml.safe_dump(self.model_dump(mode="json"), sort_keys=False)
        return text

    @classmethod
    def from_dict(cls, obj: Any) -> Policy:
        try:
            return cls.model_validate(obj)
        except ValidationError as e:
            err = e.errors()[0]
            loc = ".".join(str(p) for p in err["loc"]) or "policy"
            raise PolicyError(f"policy is invalid: {loc}: {err['msg']}") from e


def load_policies(text: str | bytes) -> list[Policy]:
    """Parse one or more policy documents (YAML, ``---`` between documents)."""
    try:
        docs = [d for d in yaml.safe_load_all(text) if d is not None]
    except yaml.YAMLError as e:
        raise PolicyError(f"policy file is not valid YAML: {e}") from e
    out: list[Policy] = []
    for i, doc in enumerate(docs):
        if not isinstance(doc, dict):
            raise PolicyError(f"document {i + 1} must be a mapping, not {type(doc).__name__}")
        try:
            out.append(Policy.from_dict(doc))
        except PolicyError as e:
            raise PolicyError(f"document {i + 1}: {e}") from e.__cause__
    return out


# -- combining ---------------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class Effective:
    """The rules that apply to one function: the most restrictive of its policies and manifest."""

    #: Allowed regions; None = any.
    regions: frozenset[str] | None = None
    #: Allowed node tiers; None = any.
    tiers: frozenset[str] | None = None
    #: The latency objective in ms; None = the function's timeout.
    latency_p95_ms: float | None = None
    gpu: GpuRequirement = GpuRequirement.NONE
    min_per_site: int = 0
    #: Most replicas in total; None = no cap.
    max_replicas: int | None = None
    spill: bool = True
    #: What shaped it: ``manifest`` and ``name@version`` of each policy, in order.
    sources: tuple[str, ...] = ()
    #: Why no node can ever satisfy it; "" when some could.
    unsatisfiable: str = ""

    @property
    def satisfiable(self) -> bool:
        return not self.unsatisfiable

    def describe(self) -> dict[str, Any]:
        """JSON-able form for explanations and the API."""
        return {
            "regions": sorted(self.regions) if self.regions is not None else None,
            "tiers": sorted(self.tiers) if self.tiers is not None else None,
            "latency_p95_ms": self.latency_p95_ms,
            "gpu": self.gpu.value,
            "min_per_site": self.min_per_site,
            "max_replicas": self.max_replicas,
            "spill": self.spill,
            "sources": list(self.sources),
            "unsatisfiable": self.unsatisfiable or None,
        }


def _intersect(
    what: str, parts: list[tuple[str, frozenset[str]]]
) -> tuple[frozenset[str] | None, str]:
    """Intersect named sets; the result (None = no restriction) and, if empty, the reason."""
    if not parts:
        return None, ""
    acc = parts[0][1]
    for _, s in parts[1:]:
        acc = acc & s
    if acc:
        return acc, ""
    each = ", ".join(f"{src} allows {sorted(s)}" for src, s in parts)
    return acc, f"no {what} is allowed by all of: {each}"


def manifest_gpu(manifest: Manifest) -> GpuRequirement:
    """The manifest's GPU need; a TensorRT plan runs on a GPU only, whatever it says."""
    if manifest.runtime == Runtime.TENSORRT:
        return GpuRequirement.REQUIRED
    return manifest.requirements.gpu


def combine(policies: Iterable[Policy], manifest: Manifest | None = None) -> Effective:
    """The most restrictive combination of ``policies`` and the manifest's own requirements."""
    pols = list(policies)
    regions: list[tuple[str, frozenset[str]]] = []
    tiers: list[tuple[str, frozenset[str]]] = []
    gpu = GpuRequirement.NONE
    sources: list[str] = []
    if manifest is not None:
        sources.append("manifest")
        if manifest.data.regions:
            regions.append(("manifest", frozenset(manifest.data.regions)))
        gpu = manifest_gpu(manifest)
    latency: float | None = None
    max_replicas: int | None = None
    min_per_site = 0
    spill = True
    for p in pols:
        r = p.rules
        sources.append(p.ref)
        if r.regions is not None:
            regions.append((f"policy {p.ref}", frozenset(r.regions)))
        if r.tiers is not None:
            tiers.append((f"policy {p.ref}", frozenset(r.tiers)))
        if r.latency_p95_ms is not None:
            latency = r.latency_p95_ms if latency is None else min(latency, r.latency_p95_ms)
        if _GPU_RANK[r.gpu] > _GPU_RANK[gpu]:
            gpu = r.gpu
        if r.replicas.max is not None:
            max_replicas = (
                r.replicas.max if max_replicas is None else min(max_replicas, r.replicas.max)
            )
        min_per_site = max(min_per_site, r.replicas.min_per_site)
        spill = spill and r.spill
    reg, why_regions = _intersect("region", regions)
    tie, why_tiers = _intersect("tier", tiers)
    return Effective(
        regions=reg,
        tiers=tie,
        latency_p95_ms=latency,
        gpu=gpu,
        min_per_site=min_per_site,
        max_replicas=max_replicas,
        spill=spill,
        sources=tuple(sources),
        unsatisfiable="; ".join(w for w in (why_regions, why_tiers) if w),
    )


# -- the in-memory set -------------------------------------------------------------------


class PolicySet:
    """Policies by name, in memory. Versions only go up, across deletes too."""

    def __init__(self, policies: Iterable[Policy] = ()) -> None:
        self._policies: dict[str, Policy] = {}
        self._last_version: dict[str, int] = {}
        for p in policies:
            self.apply(p)

    def apply(self, policy: Policy) -> Policy:
        """Store ``policy`` under its name with the next version; returns what was stored."""
        version = self._last_version.get(policy.name, 0) + 1
        stored = policy.model_copy(update={"version": version})
        self._policies[policy.name] = stored
        self._last_version[policy.name] = version
        return stored

    def delete(self, name: str) -> Policy | None:
        """Remove a policy; returns it, or None when there was none by that name."""
        return self._policies.pop(name, None)

    def get(self, name: str) -> Policy | None:
        return self._policies.get(name)

    def list(self) -> builtins.list[Policy]:
        return [self._policies[n] for n in sorted(self._policies)]

    def matching(
        self, function: str, labels: Mapping[str, str] | None = None
    ) -> builtins.list[Policy]:
        """The policies selecting ``function`` (with its deployment ``labels``), by name."""
        return [p for p in self.list() if p.selector.matches(function, labels)]

    def effective(self, manifest: Manifest, labels: Mapping[str, str] | None = None) -> Effective:
        """The rules for the manifest's function: its matching policies combined with it."""
        return combine(self.matching(manifest.name, labels), manifest)

    def __len__(self) -> int:
        return len(self._policies)
