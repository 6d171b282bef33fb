"""Plugin names to factories, and the profile that says which run, in what order, how heavily.

A profile (k8s ``KubeSchedulerProfile``) lists filters in the order they run,
score plugins with integer weights (0 = off), and arguments per plugin name.
Each factory validates its arguments against the plugin's typed model, so a
misspelt argument fails when the profile is built, not mid-decision::

    filters: [identity, liveness, draining, residency, tier, labels, hardware, capacity]
    scores:
      - {name: hardware, weight: 12}
      - {name: latency, weight: 3}
    args:
      capacity: {max_functions: 32}
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import Any

from pydantic import BaseModel, ConfigDict, Field, ValidationError

from fnmesh.coordinator.placement.errors import ProfileError
from fnmesh.coordinator.placement.framework import (
    FilterPlugin,
    NoArgs,
    Plugin,
    PluginArgs,
    ScorePlugin,
)
from fnmesh.coordinator.placement.plugins.capacity import Capacity, CapacityArgs
from fnmesh.coordinator.placement.plugins.cost import Cost, CostArgs
from fnmesh.coordinator.placement.plugins.draining import Draining
from fnmesh.coordinator.placement.plugins.hardware import Hardware, HardwareArgs
from fnmesh.coordinator.placement.plugins.headroom import Headroom, HeadroomArgs
from fnmesh.coordinator.placement.plugins.identity import Identity
from fnmesh.coordinator.placement.plugins.labels import Labels
from fnmesh.coordinator.placement.plugins.latency import Latency, LatencyArgs
from fnmesh.coordinator.placement.plugins.liveness import Liveness
from fnmesh.coordinator.placement.plugins.residency import Residency
from fnmesh.coordinator.placement.plugins.spread import Spread
from fnmesh.coordinator.placement.plugins.tier import Tier
from fnmesh.coordinator.placement.plugins.warmth import Warmth, WarmthArgs


@dataclass(frozen=True, slots=True)
class Entry:
    """How to make one plugin: its typed arguments and the factory that takes them."""

    args: type[PluginArgs]
    factory: Callable[[Any], Plugin]


REGISTRY: Mapping[str, Entry] = {
    "identity": Entry(NoArgs, Identity),
    "liveness": Entry(NoArgs, Liveness),
    "draining": Entry(NoArgs, Draining),
    "residency": Entry(NoArgs, Residency),
    "tier": Entry(NoArgs, Tier),
    "labels": Entry(NoArgs, Labels),
    "hardware": Entry(HardwareArgs, Hardware),
    "capacity": Entry(CapacityArgs, Capacity),
    "latency": Entry(LatencyArgs, Latency),
    "headroom": Entry(HeadroomArgs, Headroom),
    "warmth": Entry(WarmthArgs, Warmth),
    "cost": Entry(CostArgs, Cost),
    "spread": Entry(NoArgs, Spread),
}


def make_plugin(name: str, args: Mapping[str, Any] | None = None) -> Plugin:
    """Build the plugin ``name`` from its validated ``args``."""
    entry = REGISTRY.get(name)
    if entry is None:
        raise ProfileError(f"no placement plugin {name!r}; known: {', '.join(sorted(REGISTRY))}")
    try:
        typed = entry.args.model_validate(dict(args or {}))
    except ValidationError as e:
        err = e.errors()[0]
        loc = ".".join(str(p) for p in err["loc"]) or "args"
        raise ProfileError(f"plugin {name}: {loc}: {err['msg']}") from e
    return entry.factory(typed)


class ScoreSpec(BaseModel):
    """One score plugin and its weight."""

    model_config = ConfigDict(frozen=True, extra="forbid")

    name: str
    #: Multiplies the plugin's 0-100 score; 0 turns it off.
    weight: int = Field(default=1, ge=0, le=100)


DEFAULT_FILTERS = (
    "identity",
    "liveness",
    "draining",
    "residency",
    "tier",
    "labels",
    "hardware",
    "capacity",
)
DEFAULT_SCORES = (
    # Outweighs the rest together (12 x 100 > 1000): a preferred GPU wins when one fits.
    ScoreSpec(name="hardware", weight=12),
    ScoreSpec(name="latency", weight=3),
    ScoreSpec(name="cost", weight=2),
    ScoreSpec(name="spread", weight=2),
    ScoreSpec(name="warmth", weight=2),
    ScoreSpec(name="headroom", weight=1),
)


class Profile(BaseModel):
    """Which plugins a placement engine runs. Every field defaults to the standard pipeline."""

    model_config = ConfigDict(frozen=True, extra="forbid")

    name: str = "default"
    #: Filters, in the order they run (an explanation lists reasons in this order).
    filters: tuple[str, ...] = DEFAULT_FILTERS
    #: Score plugins with their weights.
    scores: tuple[ScoreSpec, ...] = DEFAULT_SCORES
    #: Arguments per plugin name (see each plugin's ``*Args``).
    args: dict[str, dict[str, Any]] = Field(default_factory=dict)

    @classmethod
    def from_dict(cls, obj: Any) -> Profile:
        try:
            return cls.model_validate(obj)
        except ValidationError as e:
            err = e.errors()[0]
            loc = ".".join(str(p) for p in err["loc"]) or "profile"
            raise ProfileError(f"placement profile is invalid: {loc}: {err['msg']}") from e


@dataclass(frozen=True, slots=True)
class Built:
    """A profile's plugins, made once: filters in order, weighted score plugins."""

    filters: tuple[FilterPlugin, ...]
    scores: tuple[tuple[ScorePlugin, int], ...]
    plugins: tuple[Plugin, ...]


def build(profile: Profile) -> Built:
    """Make each named plugin once (a plugin may be a filter and a score) and check its roles."""
    for name in profile.args:
        if name not in REGISTRY:
            raise ProfileError(f"arguments for unknown placement plugin {name!r}")
    made: dict[str, Plugin] = {}

    def get(name: str) -> Plugin:
        if name not in made:
            made[name] = make_plugin(name, profile.args.get(name))
        return made[name]

    if len(set(profile.filters)) != len(profile.filters):
        raise ProfileError("a filter is listed twice")
    if len({s.name for s in profile.scores}) != len(profile.scores):
        raise ProfileError("a score plugin is listed twice")
    filters: list[FilterPlugin] = []
    for name in profile.filters:
        p = get(name)
        if not isinstance(p, FilterPlugin):
            raise ProfileError(f"plugin {name} is not a filter")
        filters.append(p)
    scores: list[tuple[ScorePlugin, int]] = []
    for spec in profile.scores:
        p = get(spec.name)
        if not isinstance(p, ScorePlugin):
            raise ProfileError(f"plugin {spec.name} does not score")
        if spec.weight:
            scores.append((p, spec.weight))
    return Built(tuple(filters), tuple(scores), tuple(made.values()))
