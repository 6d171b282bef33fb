"""Operator policies: the YAML schema, selectors, the most-restrictive combination, versions."""

from __future__ import annotations

from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta
from typing import Any

import pytest

from fnmesh.coordinator.policies import (
    Effective,
    Policy,
    PolicyError,
    PolicySet,
    Selector,
    combine,
    load_policies,
)
from fnmesh.functions.manifest import GpuRequirement, Manifest

NOW = datetime(2025, 1, 1, tzinfo=UTC)


def manifest(
    name: str = "vision/detect-cars",
    *,
    gpu: str = "none",
    regions: tuple[str, ...] = (),
    runtime: str = "onnx",
) -> Manifest:
    return Manifest.model_validate(
        {
            "name": name,
            "version": "1.0.0",
            "runtime": runtime,
            "inputs": [{"name": "x", "dtype": "float32", "shape": ["N", 4]}],
            "outputs": [{"name": "y", "dtype": "float32", "shape": ["N", 2]}],
            "requirements": {"gpu": gpu, "gpu_arch": "sm_89" if runtime == "tensorrt" else None},
            "data": {"regions": list(regions)},
            "not_before": NOW - timedelta(days=1),
            "not_after": NOW + timedelta(days=365),
            "digests": {
                "plaintext": "a" * 64,
                "ciphertext": "b" * 64,
                "plaintext_size": 1 << 20,
                "nonce": "c" * 24,
            },
            "publisher": "test",
        }
    )


def policy(name: str, version: int = 1, **rules: Any) -> Policy:
    return Policy.from_dict({"name": name, "version": version, "rules": rules})


# -- the document ------------------------------------------------------------------------

EXAMPLE = """
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
---
name: everything
"""


def test_yaml_documents_parse_with_defaults() -> None:
    eu, everything = load_policies(EXAMPLE)
    assert eu.selector == Selector(namespace="vision", name="detect-*")
    assert eu.rules.regions == ("eu-west", "eu-central")
    assert eu.rules.gpu is GpuRequirement.PREFERRED
    assert (eu.rules.replicas.min_per_site, eu.rules.replicas.max) == (1, 20)
    assert eu.rules.spill is False
    # A policy of only a name selects everything and restricts nothing.
    assert everything.selector.matches("any/thing")
    assert combine([everything]) == Effective(sources=("everything@0",))


def test_yaml_round_trip() -> None:
    (eu, _) = load_policies(EXAMPLE)
    assert load_policies(eu.to_yaml()) == [eu]


@pytest.mark.parametrize(
    ("text", "complaint"),
    [
        ("name: p\nrules: {region: [eu-west]}", "region"),  # misspelt rule: refused, not ignored
        ("name: p\nrules: {regions: []}", "empty regions"),
        ("name: p\nrules: {tiers: []}", "empty tiers"),
        ("name: p\nrules: {gpu: sometimes}", "gpu"),
        ("name: p\nrules: {latency_p95_ms: 0}", "latency_p95_ms"),
        ("name: p\nrules: {replicas: {min_per_site: -1}}", "min_per_site"),
        ("name: Bad Name", "name"),
        ("name: p\nselector: {names: x}", "names"),
        ("- name: p", "mapping"),
        ("name: [unclosed", "not valid YAML"),
    ],
)
def test_malformed_policy_refused(text: str, complaint: str) -> None:
    with pytest.raises(PolicyError, match=complaint):
        load_policies(text)


# -- selectors ---------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("selector", "function", "labels", "matches"),
    [
        (Selector(), "any/thing", {}, True),
        (Selector(namespace="vision"), "vision/detect", {}, True),
        (Selector(namespace="vision"), "audio/detect", {}, False),
        (Selector(name="detect-*"), "vision/detect-cars", {}, True),
        (Selector(name="detect-*"), "vision/classify", {}, False),
        (Selector(name="detect-*"), "detect-x/other", {}, False),  # the glob is over the name only
        (Selector(labels={"team": "a"}), "x/y", {"team": "a", "env": "prod"}, True),
        (Selector(labels={"team": "a"}), "x/y", {"team": "b"}, False),
        (Selector(labels={"team": "a"}), "x/y", {}, False),
    ],
)
def test_selector(selector: Selector, function: str, labels: dict[str, str], matches: bool) -> None:
    assert selector.matches(function, labels) is matches


# -- combining ---------------------------------------------------------------------------


@dataclass
class Combo:
    id: str
    policies: list[Policy]
    manifest: Manifest | None
    expect: dict[str, Any]
    unsatisfiable: str = ""
    extra: dict[str, Any] = field(default_factory=dict)


COMBOS = [
    Combo("nothing", [], None, {"regions": None, "tiers": None, "gpu": GpuRequirement.NONE}),
    Combo(
        "regions intersect, manifest included",
        [
            policy("a", regions=["eu-west", "eu-central", "us-east"]),
            policy("b", regions=["eu-west", "eu-central"]),
        ],
        manifest(regions=("eu-west", "ap-south")),
        {"regions": frozenset({"eu-west"})},
    ),
    Combo(
        "manifest regions alone",
        [],
        manifest(regions=("eu-west",)),
        {"regions": frozenset({"eu-west"}), "sources": ("manifest",)},
    ),
    Combo(
        "empty region intersection is unsatisfiable, naming who allowed what",
        [policy("eu", regions=["eu-west"])],
        manifest(regions=("us-east",)),
        {"regions": frozenset()},
        unsatisfiable="no region is allowed by all of: manifest allows ['us-east'], policy eu@1 allows ['eu-west']",
    ),
    Combo(
        "tiers intersect",
        [policy("a", tiers=["edge", "cloud"]), policy("b", tiers=["edge"])],
        None,
        {"tiers": frozenset({"edge"})},
    ),
    Combo(
        "empty tier intersection is unsatisfiable",
        [policy("a", tiers=["edge"]), policy("b", tiers=["cloud"])],
        None,
        {"tiers": frozenset()},
        unsatisfiable="no tier is allowed",
    ),
    Combo(
        "smallest latency objective",
        [policy("a", latency_p95_ms=200), policy("b", latency_p95_ms=50), policy("c")],
        None,
        {"latency_p95_ms": 50},
    ),
    Combo(
        "strictest gpu: policy over manifest",
        [policy("a", gpu="preferred")],
        manifest(gpu="none"),
        {"gpu": GpuRequirement.PREFERRED},
    ),
    Combo(
        "strictest gpu: manifest over policy",
        [policy("a", gpu="preferred"), policy("b", gpu="none")],
        manifest(gpu="required"),
        {"gpu": GpuRequirement.REQUIRED},
    ),
    Combo(
        "a TensorRT plan needs a GPU whatever it says",
        [],
        manifest(runtime="tensorrt"),
        {"gpu": GpuRequirement.REQUIRED},
    ),
    Combo(
        "spill only if every policy allows it",
        [policy("a", spill=True), policy("b", spill=False)],
        None,
        {"spill": False},
    ),
    Combo("spill by default", [policy("a"), policy("b")], None, {"spill": True}),
    Combo(
        "smallest max, largest per-site floor",
        [
            policy("a", replicas={"max": 10, "min_per_site": 1}),
            policy("b", replicas={"max": 4}),
            policy("c", replicas={"min_per_site": 2}),
        ],
        None,
        {"max_replicas": 4, "min_per_site": 2},
    ),
    Combo("max 0 is allowed", [policy("off", replicas={"max": 0})], None, {"max_replicas": 0}),
    Combo(
        "sources in order",
        [policy("a", 3), policy("b", 7)],
        manifest(),
        {"sources": ("manifest", "a@3", "b@7")},
    ),
]


@pytest.mark.parametrize("case", COMBOS, ids=[c.id for c in COMBOS])
def test_combine_is_most_restrictive(case: Combo) -> None:
    eff = combine(case.policies, case.manifest)
    for k, v in case.expect.items():
        assert getattr(eff, k) == v, k
    if case.unsatisfiable:
        assert not eff.satisfiable
        assert case.unsatisfiable in eff.unsatisfiable
    else:
        assert eff.satisfiable, eff.unsatisfiable


def test_combine_order_does_not_matter() -> None:
    ps = [
        policy(
            "a", regions=["r1", "r2", "r3"], latency_p95_ms=90, gpu="preferred", replicas={"max": 5}
        ),
        policy(
            "b", regions=["r2", "r3"], tiers=["edge"], spill=False, replicas={"min_per_site": 1}
        ),
        policy("c", regions=["r3", "r2", "r9"], latency_p95_ms=30, replicas={"max": 3}),
    ]
    m = manifest(regions=("r2", "r3", "r4"))
    a, b = combine(ps, m), combine(list(reversed(ps)), m)
    assert (
        a.regions,
        a.tiers,
        a.latency_p95_ms,
        a.gpu,
        a.max_replicas,
        a.min_per_site,
        a.spill,
    ) == (
        b.regions,
        b.tiers,
        b.latency_p95_ms,
        b.gpu,
        b.max_replicas,
        b.min_per_site,
        b.spill,
    )
    assert a.regions == frozenset({"r2", "r3"})
    assert a.describe()["regions"] == ["r2", "r3"]


# -- the set -----------------------------------------------------------------------------


def test_apply_bumps_version_each_time() -> None:
    ps = PolicySet()
    assert ps.apply(policy("eu", regions=["eu-west"])).version == 1
    assert ps.apply(policy("eu", regions=["eu-west"])).version == 2
    assert ps.apply(policy("us", regions=["us-east"])).version == 1
    assert ps.get("eu") is not None and ps.get("eu").version == 2  # type: ignore[union-attr]
    assert [p.ref for p in ps.list()] == ["eu@2", "us@1"]


def test_versions_keep_going_up_across_a_delete() -> None:
    ps = PolicySet([policy("eu")])
    assert ps.delete("eu") is not None
    assert ps.delete("eu") is None
    assert ps.get("eu") is None and len(ps) == 0
    # A cache keyed by name@version must never see an old version number again.
    assert ps.apply(policy("eu")).version == 2


def test_matching_and_effective() -> None:
    ps = PolicySet(
        [
            Policy.from_dict(
                {
                    "name": "vision-eu",
                    "selector": {"namespace": "vision"},
                    "rules": {"regions": ["eu-west", "eu-central"]},
                }
            ),
            Policy.from_dict(
                {
                    "name": "detectors",
                    "selector": {"name": "detect-*"},
                    "rules": {"gpu": "preferred"},
                }
            ),
            Policy.from_dict(
                {"name": "prod", "selector": {"labels": {"env": "prod"}}, "rules": {"spill": False}}
            ),
            Policy.from_dict({"name": "audio", "selector": {"namespace": "audio"}}),
        ]
    )
    assert [p.name for p in ps.matching("vision/detect-cars")] == ["detectors", "vision-eu"]
    assert [p.name for p in ps.matching("vision/detect-cars", {"env": "prod"})] == [
        "detectors",
        "prod",
        "vision-eu",
    ]
    eff = ps.effective(manifest("vision/detect-cars", regions=("eu-west",)), {"env": "prod"})
    assert eff.regions == frozenset({"eu-west"})
    assert eff.gpu is GpuRequirement.PREFERRED
    assert eff.spill is False
    assert eff.sources == ("manifest", "detectors@1", "prod@1", "vision-eu@1")
