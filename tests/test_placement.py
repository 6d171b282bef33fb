"""Placement: table-driven decisions (fleet, function, policy -> nodes and reasons), both paths.

Every table case runs through the indexed engine and the naive full scan, which
must agree; a property test holds them to each other, and to the residency
rule, over random fleets, policies, manifests and load.
"""

from __future__ import annotations

import json
import os
from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta
from typing import Any

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from fnmesh.agent.admission import ServiceTime
from fnmesh.coordinator.placement import (
    Candidate,
    Code,
    Decision,
    Engine,
    Load,
    PlacementRequest,
    Profile,
    ProfileError,
    Snapshot,
    SnapshotNode,
    choose,
    estimate_latency_ms,
    fits,
)
from fnmesh.coordinator.placement.registry import ScoreSpec, make_plugin
from fnmesh.coordinator.policies import Policy, combine
from fnmesh.coordinator.registry import NodeView
from fnmesh.functions.manifest import Manifest

SCALE = float(os.environ.get("FNMESH_TEST_SCALE", "1"))
NOW = datetime(2025, 1, 1, tzinfo=UTC)
FN = "vision/detect"
ENGINE = Engine()


def manifest(
    *,
    gpu: str = "none",
    regions: tuple[str, ...] = (),
    memory_mb: int = 256,
    runtime: str = "onnx",
    gpu_arch: str | None = None,
    name: str = FN,
    version: str = "1.0.0",
    timeout_ms: int = 1000,
) -> Manifest:
    return Manifest.model_validate(
        {
            "name": name,
            "version": version,
            "runtime": runtime,
            "inputs": [{"name": "x", "dtype": "float32", "shape": ["N", 4]}],
            "outputs": [{"name": "y", "dtype": "float32", "shape": ["N", 2]}],
            "requirements": {"gpu": gpu, "memory_mb": memory_mb, "gpu_arch": gpu_arch},
            "limits": {"timeout_ms": timeout_ms, "max_batch": 8},
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


def node(
    name: str,
    *,
    region: str = "eu-west",
    site: str | None = None,
    tier: str = "edge",
    gpu: str | None = None,
    memory: int = 8192,
    used: int = 0,
    replicas: int = 0,
    state: str = "ready",
    trusted: bool = True,
    draining: bool = False,
    rtt: float | None = 5.0,
    functions: dict[str, str] | None = None,
    load: dict[str, Load] | None = None,
) -> SnapshotNode:
    return SnapshotNode(
        name=name,
        state=state,
        labels={"region": region, "site": site or f"site-{name}", "tier": tier},
        memory_mib=memory,
        gpus=(gpu,) if gpu else (),
        gpu_arch=gpu,
        functions=functions or {},
        load=load or {},
        draining=draining,
        trusted=trusted,
        rtt_ms=rtt,
        replicas=replicas,
        memory_used_mib=used,
    )


def decide(request: PlacementRequest, snap: Snapshot, engine: Engine = ENGINE) -> Decision:
    """Place through both paths; they must agree on the nodes, totals and feasible count."""
    fast = engine.place(request, snap)
    naive = engine.place_naive(request, snap)
    assert fast.nodes == naive.nodes
    assert [p.total for p in fast.placed] == [p.total for p in naive.placed]
    assert [dict(p.scores) for p in fast.placed] == [dict(p.scores) for p in naive.placed]
    assert fast.feasible == naive.feasible
    assert fast.target == naive.target
    assert fast.explain().excluded() == naive.explain().excluded()
    return fast


# -- the table ---------------------------------------------------------------------------


@dataclass
class Case:
    id: str
    fleet: list[SnapshotNode]
    #: Chosen nodes, in pick order.
    expect: list[str]
    manifest: dict[str, Any] = field(default_factory=dict)
    #: Rules of one operator policy (None: none).
    policy: dict[str, Any] | None = None
    replicas: int = 1
    current: tuple[str, ...] = ()
    where: dict[str, str] = field(default_factory=dict)
    #: node -> (plugin, code, a fragment of the reason) for excluded nodes.
    reasons: dict[str, tuple[str, Code, str]] = field(default_factory=dict)
    removed: tuple[str, ...] = ()


CASES = [
    Case(
        "gpu required lands only on GPU nodes",
        [
            node("cpu-a", rtt=1),
            node("gpu-b", gpu="sm_87"),
            node("gpu-c", gpu="sm_89", tier="cloud"),
        ],
        ["gpu-b", "gpu-c"],
        manifest={"gpu": "required"},
        replicas=3,
        reasons={"cpu-a": ("hardware", Code.UNRESOLVABLE, "requires a GPU")},
    ),
    Case(
        "gpu preferred lands on a GPU node with room, even a far cloud one",
        [node("cpu-a", rtt=1), node("gpu-b", gpu="sm_89", tier="cloud", rtt=80)],
        ["gpu-b"],
        manifest={"gpu": "preferred"},
    ),
    Case(
        "gpu preferred falls back to CPU when the GPU node is full",
        [node("cpu-a"), node("gpu-b", gpu="sm_89", memory=4096, used=4000)],
        ["cpu-a"],
        manifest={"gpu": "preferred"},
        reasons={"gpu-b": ("capacity", Code.UNFIT, "needs 256 MiB")},
    ),
    Case(
        "gpu preferred falls back to CPU when the GPU node holds its maximum of replicas",
        [node("cpu-a"), node("gpu-b", gpu="sm_89", replicas=64)],
        ["cpu-a"],
        manifest={"gpu": "preferred"},
        reasons={"gpu-b": ("capacity", Code.UNFIT, "at most 64")},
    ),
    Case(
        "a function with no GPU need leaves GPU nodes for GPU work",
        [node("gpu-a", gpu="sm_87", rtt=1), node("cpu-b", rtt=1)],
        ["cpu-b"],
    ),
    Case(
        "draining, untrusted, uncertified and offline nodes are excluded with their reasons",
        [
            node("ok"),
            node("drain", draining=True),
            node("rogue", state="untrusted", trusted=False),
            node("nocert", trusted=False),
            node("down", state="offline"),
            node("new", state="unknown"),
        ],
        ["ok"],
        replicas=6,
        reasons={
            "drain": ("draining", Code.UNRESOLVABLE, "draining"),
            "rogue": ("identity", Code.UNRESOLVABLE, "untrusted"),
            "nocert": ("identity", Code.UNRESOLVABLE, "no verified certificate"),
            "down": ("liveness", Code.UNRESOLVABLE, "offline"),
            "new": ("liveness", Code.UNRESOLVABLE, "unknown"),
        },
    ),
    Case(
        "cost puts edge before cloud",
        [node("cloud-a", tier="cloud"), node("edge-b", tier="edge")],
        ["edge-b", "cloud-a"],
        replicas=2,
    ),
    Case(
        "spread prefers a site not used yet over a better node at a used one",
        [
            node("s1-a", site="s1", rtt=1),
            node("s1-b", site="s1", rtt=1),
            node("s2-a", site="s2", rtt=20),
        ],
        ["s1-a", "s2-a"],
        replicas=2,
    ),
    Case(
        "residency: manifest and policy regions intersect",
        [
            node("eu-w", region="eu-west"),
            node("eu-c", region="eu-central"),
            node("us", region="us-east"),
        ],
        ["eu-w"],
        manifest={"regions": ("eu-west", "us-east")},
        policy={"regions": ["eu-west", "eu-central"]},
        replicas=3,
        reasons={
            "eu-c": ("residency", Code.UNRESOLVABLE, "region eu-central is outside"),
            "us": ("residency", Code.UNRESOLVABLE, "region us-east is outside"),
        },
    ),
    Case(
        "unsatisfiable policy places nothing and says why for every node",
        [node("eu", region="eu-west"), node("us", region="us-east")],
        [],
        manifest={"regions": ("us-east",)},
        policy={"regions": ["eu-west"]},
        reasons={
            "eu": ("residency", Code.UNRESOLVABLE, "outside the allowed regions (none)"),
            "us": ("residency", Code.UNRESOLVABLE, "outside the allowed regions (none)"),
        },
    ),
    Case(
        "tier rule",
        [node("edge-a", tier="edge"), node("cloud-b", tier="cloud")],
        ["cloud-b"],
        policy={"tiers": ["cloud"]},
        replicas=2,
        reasons={"edge-a": ("tier", Code.UNRESOLVABLE, "tier edge is not one of cloud")},
    ),
    Case(
        "a current replica that still fits is kept before a better newcomer",
        [node("old", tier="cloud", rtt=90), node("better", rtt=1)],
        ["old"],
        current=("old",),
    ),
    Case(
        "a current replica that no longer fits is removed and replaced",
        [node("old", state="offline"), node("new")],
        ["new"],
        current=("old",),
        removed=("old",),
        reasons={"old": ("liveness", Code.UNRESOLVABLE, "offline")},
    ),
    Case(
        "over the target: the best current replicas stay",
        [node("a", tier="cloud"), node("b"), node("c", tier="cloud")],
        ["b"],
        current=("a", "b", "c"),
        removed=("a", "c"),
    ),
    Case(
        "min_per_site puts a replica at every site where the function fits",
        [
            node("s1-a", site="s1"),
            node("s1-b", site="s1"),
            node("s2-a", site="s2"),
            node("s3-a", site="s3", rtt=50),
        ],
        ["s1-a", "s2-a", "s3-a"],
        policy={"replicas": {"min_per_site": 1}},
    ),
    Case(
        "max caps min_per_site",
        [node("s1-a", site="s1"), node("s2-a", site="s2"), node("s3-a", site="s3")],
        ["s1-a", "s2-a"],
        policy={"replicas": {"min_per_site": 1, "max": 2}},
        replicas=3,
    ),
    Case(
        "max 0 places nowhere and removes what there was",
        [node("a"), node("b")],
        [],
        policy={"replicas": {"max": 0}},
        current=("a",),
        removed=("a",),
    ),
    Case(
        "the deployment's labels",
        [node("a", site="s1"), node("b", site="s2")],
        ["b"],
        where={"site": "s2"},
        replicas=2,
        reasons={"a": ("labels", Code.UNRESOLVABLE, "label site=s1, the deployment needs s2")},
    ),
    Case(
        "memory: too small is unresolvable, too full is unfit",
        [
            node("small", memory=2048),
            node("full", memory=16384, used=12000),
            node("roomy", memory=16384),
        ],
        ["roomy"],
        manifest={"memory_mb": 4096},
        replicas=3,
        reasons={
            "small": ("hardware", Code.UNRESOLVABLE, "needs 4096 MiB, the node has 2048"),
            "full": ("capacity", Code.UNFIT, "needs 4096 MiB"),
        },
    ),
    Case(
        "latency: the nearer node wins",
        [node("far", rtt=40), node("near", rtt=2)],
        ["near"],
        policy={"latency_p95_ms": 50},
    ),
    Case(
        "latency: an idle node beats a warm one with a long queue",
        [
            node(
                "busy",
                functions={FN: "1.0.0"},
                load={FN: Load(in_flight=8, queued=400, batch_ms=8.0, row_ms=1.0)},
            ),
            node("idle"),
        ],
        ["idle"],
        policy={"latency_p95_ms": 100},
    ),
    Case(
        "warmth: a node with the function ready wins a tie",
        [node("cold"), node("warm", functions={FN: "1.0.0"})],
        ["warm"],
    ),
    Case(
        "warmth: same version over another version",
        [node("other", functions={FN: "0.9.0"}), node("same", functions={FN: "1.0.0"})],
        ["same"],
    ),
    Case(
        "a TensorRT plan goes to its own GPU architecture only",
        [node("sm87", gpu="sm_87"), node("sm89", gpu="sm_89"), node("cpu")],
        ["sm89"],
        manifest={"runtime": "tensorrt", "gpu_arch": "sm_89"},
        replicas=3,
        reasons={
            "sm87": ("hardware", Code.UNRESOLVABLE, "built for sm_89, the node's GPU is sm_87"),
            "cpu": ("hardware", Code.UNRESOLVABLE, "requires a GPU"),
        },
    ),
    Case(
        "ties go to the first name",
        [node("b", site="s"), node("a", site="s"), node("c", site="s")],
        ["a", "b", "c"],
        replicas=3,
    ),
]


@pytest.mark.parametrize("case", CASES, ids=[c.id for c in CASES])
def test_placement_table(case: Case) -> None:
    m = manifest(**case.manifest)
    pols = (
        [Policy.from_dict({"name": "p", "rules": case.policy})] if case.policy is not None else []
    )
    request = PlacementRequest(
        m,
        replicas_wanted=case.replicas,
        current=case.current,
        effective=combine(pols, m),
        where=case.where,
    )
    d = decide(request, Snapshot(case.fleet))
    assert list(d.nodes) == case.expect
    assert d.removed == case.removed
    assert set(d.kept) == set(case.current) & set(d.nodes)
    excluded = d.explain().excluded()
    for name, (plugin, code, fragment) in case.reasons.items():
        statuses = d.result(name).statuses
        assert any(
            s.plugin == plugin and s.code is code and fragment in s.reason for s in statuses
        ), (name, statuses)
        assert fragment in excluded[name]


def test_explain_accounts_for_every_node() -> None:
    fleet = [
        node("a", site="s1"),
        node("b", site="s1"),
        node("c", site="s2", tier="cloud"),
        node("d", region="us-east"),
        node("e", draining=True, state="offline"),
    ]
    m = manifest(regions=("eu-west",))
    d = decide(PlacementRequest(m, replicas_wanted=2, current=("e",)), Snapshot(fleet))
    ex = d.explain()
    by_node = {r.node: r for r in ex.rows}
    assert [r.node for r in ex.rows[:2]] == list(d.nodes) == ["a", "b"]
    assert set(by_node) == {"a", "b", "c", "d", "e"}
    assert [by_node[n].verdict for n in "abcde"] == [
        "placed",
        "placed",
        "feasible",
        "excluded",
        "removed",
    ]
    assert by_node["a"].rank == 1 and by_node["c"].rank is None
    # Every excluded node is named with every failing filter's reason.
    assert set(ex.excluded()) == {"d", "e"}
    assert "residency: region us-east is outside" in ex.excluded()["d"]
    assert "liveness: the node is offline" in ex.excluded()["e"]
    assert "draining: the node is draining" in ex.excluded()["e"]
    # Scores are kept per plugin, for placed and feasible nodes alike.
    assert set(by_node["c"].scores) == {
        "hardware",
        "latency",
        "cost",
        "spread",
        "warmth",
        "headroom",
    }
    assert by_node["c"].scores["cost"] == 0.0 and by_node["a"].scores["cost"] == 100.0
    assert all(0.0 <= v <= 100.0 for r in ex.rows for v in r.scores.values())
    # Table- and JSON-friendly.
    assert all(len(row) == len(ex.columns()) for row in ex.table())
    json.dumps(ex.as_dict())
    assert (
        ENGINE.explain(PlacementRequest(m, replicas_wanted=2), Snapshot(fleet)).rows[0].node == "a"
    )


def test_spread_score_falls_with_each_pick_at_a_site() -> None:
    fleet = [node("a", site="s"), node("b", site="s"), node("c", site="s")]
    d = decide(PlacementRequest(manifest(), replicas_wanted=3), Snapshot(fleet))
    assert [p.scores["spread"] for p in d.placed] == [100.0, 50.0, 100.0 / 3]


def test_short_of_target_says_why() -> None:
    d = decide(PlacementRequest(manifest(gpu="required"), replicas_wanted=2), Snapshot([node("a")]))
    assert d.nodes == () and not d.satisfied
    assert "0 of 2 replicas placed: 0 node(s) pass every filter" in d.reason


def test_unreadable_node_is_an_error_status_never_placed() -> None:
    views = [
        NodeView(
            name="good", state="ready", labels={"region": "eu-west"}, hardware={"memory_mib": 4096}
        ),
        NodeView(
            name="bad", state="ready", labels={"region": "eu-west"}, hardware={"memory_mib": "lots"}
        ),
    ]
    snap = Snapshot.build(views, trusted={"good", "bad"})
    d = decide(PlacementRequest(manifest(), replicas_wanted=2), snap)
    assert d.nodes == ("good",)
    (status,) = d.result("bad").statuses
    assert status.code is Code.ERROR and status.plugin == "snapshot"
    assert "memory_mib" in status.reason


def test_snapshot_from_registry_views() -> None:
    views = {
        "lyon-1": NodeView(
            name="lyon-1",
            state="ready",
            labels={"region": "eu-west", "site": "lyon", "tier": "edge"},
            hardware={"cores": 2, "memory_mib": 4096, "gpus": ["Orin"], "gpu_arch": "sm_87"},
            functions={FN: "1.0.0", "x/y": "2.0.0"},
            load={FN: {"in_flight": 1, "queued": 4, "batch_ms": 2.0, "row_ms": 0.5}},
            draining=True,
        ),
        "paris-1": NodeView(name="paris-1", state="offline", labels={"region": "eu-west"}),
    }
    snap = Snapshot.build(views, trusted=lambda v: v.name == "lyon-1", rtt_ms={"lyon-1": 3.5})
    lyon = snap.node("lyon-1")
    paris = snap.node("paris-1")
    assert lyon is not None and paris is not None
    assert (lyon.region, lyon.site, lyon.tier, lyon.has_gpu, lyon.gpu_arch) == (
        "eu-west",
        "lyon",
        "edge",
        True,
        "sm_87",
    )
    assert lyon.trusted and lyon.draining and lyon.rtt_ms == 3.5 and lyon.replicas == 2
    # Its backlog: 4 queued x 0.5 ms + half a 2 ms batch, over 2 cores.
    assert lyon.backlog_ms == pytest.approx((4 * 0.5 + 1.0) / 2)
    assert not paris.trusted and paris.site == "paris-1" and paris.rtt_ms is None
    assert list(snap.by_region["eu-west"]) == [0, 1]
    with pytest.raises(AttributeError):
        lyon.name = "other"  # type: ignore[misc]
    assert not snap.live.flags.writeable


# -- the latency estimate the router shares ----------------------------------------------


@pytest.mark.parametrize(
    ("load", "rows", "max_batch"),
    [
        (Load(), 1, 8),
        (Load(batch_ms=4.0, row_ms=1.0), 1, 8),
        (Load(in_flight=3, queued=0, batch_ms=4.0, row_ms=1.0), 1, 8),
        (Load(in_flight=8, queued=20, batch_ms=6.0, row_ms=0.75), 2, 8),
        (Load(in_flight=1, queued=100, batch_ms=10.0, row_ms=0.1), 1, 32),
    ],
)
def test_latency_estimate_is_rtt_plus_admission_estimate(
    load: Load, rows: int, max_batch: int
) -> None:
    st_ = ServiceTime(batch_ms=load.batch_ms, row_ms=load.row_ms, samples=1)
    agent = st_.expected_ms(
        running_rows=int(load.in_flight),
        queued_rows=int(load.queued),
        rows=rows,
        max_batch=max_batch,
    )
    got = estimate_latency_ms(7.0, load, max_batch=max_batch, rows=rows)
    assert got == pytest.approx(7.0 + agent)
    assert estimate_latency_ms(7.0, load, max_batch=max_batch, rows=rows, backlog_ms=3.0) == (
        pytest.approx(got + 3.0)
    )


# -- profiles and the registry -----------------------------------------------------------


@pytest.mark.parametrize(
    ("profile", "complaint"),
    [
        ({"filters": ["residency", "nosuch"]}, "no placement plugin 'nosuch'"),
        ({"filters": ["latency"]}, "latency is not a filter"),
        ({"scores": [{"name": "residency", "weight": 1}]}, "residency does not score"),
        ({"args": {"capacity": {"max_functions": 0}}}, "capacity: max_functions"),
        ({"args": {"capacity": {"max_fns": 3}}}, "capacity: max_fns"),
        ({"args": {"cost": {"tiers": {"edge": 200}}}}, "within 0-100"),
        ({"args": {"nosuch": {}}}, "unknown placement plugin 'nosuch'"),
        ({"filters": ["tier", "tier"]}, "listed twice"),
        ({"scores": [{"name": "cost", "weight": 101}]}, "weight"),
    ],
)
def test_bad_profile_refused(profile: dict[str, Any], complaint: str) -> None:
    with pytest.raises(ProfileError, match=complaint):
        Engine(Profile.from_dict(profile))


def test_weights_come_from_the_profile() -> None:
    fleet = [node("cloud-near", tier="cloud", rtt=1), node("edge-far", tier="edge", rtt=400)]
    request = PlacementRequest(manifest(), effective=combine([], manifest()))
    assert decide(request, Snapshot(fleet)).nodes == ("edge-far",)
    latency_first = Engine(
        Profile(scores=(ScoreSpec(name="latency", weight=10), ScoreSpec(name="cost", weight=1)))
    )
    d = decide(request, Snapshot(fleet), latency_first)
    assert d.nodes == ("cloud-near",)
    assert set(d.placed[0].scores) == {"latency", "cost"}
    # Weight 0 turns a plugin off.
    off = Engine(
        Profile(scores=(ScoreSpec(name="cost", weight=0), ScoreSpec(name="latency", weight=1)))
    )
    assert set(decide(request, Snapshot(fleet), off).placed[0].scores) == {"latency"}
    assert make_plugin("capacity", {"max_functions": 3}).args.max_functions == 3  # type: ignore[attr-defined]


# -- the first placement, still exported -------------------------------------------------


def test_legacy_fits_and_choose_still_work() -> None:
    v = NodeView(name="a", state="ready", labels={"region": "eu-west", "site": "s1"})
    w = NodeView(name="b", state="ready", labels={"region": "us-east", "site": "s2"})
    m = manifest(regions=("eu-west",))
    assert fits(v, m, {}).ok
    assert not fits(w, m, {}).ok and "outside" in fits(w, m, {}).reason
    assert not fits(v, m, {"site": "s2"}).ok
    picked = choose([Candidate(v, 0), Candidate(w, 0)], 1, ["a"], {"a": v, "b": w})
    assert [c.node.name for c in picked] == ["b"]


# -- engine and naive on a realistic fleet -----------------------------------------------


def test_engine_and_naive_agree_on_a_simulated_fleet() -> None:
    import random

    from fnmesh.coordinator.bench.placement import make_fleet, make_requests

    rng = random.Random(7)
    fids = [f"bench/fn-{i:04d}" for i in range(int(20 * SCALE))]
    snap = Snapshot(make_fleet(1000, fids, rng))
    for request in make_requests(fids, snap, rng):
        d = decide(request, snap)
        assert request.effective is not None
        regions = request.effective.regions
        assert all(regions is None or snap.node(n).region in regions for n in d.nodes)  # type: ignore[union-attr]


# -- property: random fleets, policies, manifests and load -------------------------------

REGIONS = ("r0", "r1", "r2", "r3")
SITES = ("s0", "s1", "s2", "s3", "s4")
#: Mostly healthy nodes, so that most examples place something.
STATES = ("ready",) * 6 + ("joined", "offline", "untrusted", "unknown")
GPU = ("none", "none", "none", "preferred", "required")
FNS = (FN, "x/other")


@st.composite
def fleets(draw: st.DrawFn) -> list[SnapshotNode]:
    n = draw(st.integers(0, 24))
    out = []
    for i in range(n):
        gpu = draw(st.sampled_from((None, None, "sm_87", "sm_89")))
        fns = draw(st.lists(st.sampled_from(FNS), unique=True, max_size=2))
        load = {
            f: Load(
                in_flight=draw(st.integers(0, 4)),
                queued=draw(st.integers(0, 50)),
                batch_ms=draw(st.floats(0, 50, allow_subnormal=False)),
                row_ms=draw(st.floats(0, 5, allow_subnormal=False)),
            )
            for f in fns
            if draw(st.booleans())
        }
        out.append(
            SnapshotNode(
                name=f"n{i:02d}",
                state=draw(st.sampled_from(STATES)),
                labels={
                    k: v
                    for k, v in (
                        ("region", draw(st.sampled_from((*REGIONS, "")))),
                        ("site", draw(st.sampled_from((*SITES, "")))),
                        ("tier", draw(st.sampled_from(("edge", "cloud", "")))),
                    )
                    if v
                },
                cores=draw(st.integers(1, 8)),
                memory_mib=draw(st.sampled_from((0, 1024, 4096, 16384, 16384, 16384))),
                gpus=(gpu,) if gpu else (),
                gpu_arch=gpu,
                functions={f: draw(st.sampled_from(("1.0.0", "0.9.0"))) for f in fns},
                load=load,
                draining=draw(st.integers(0, 7)) == 0,
                trusted=draw(st.integers(0, 7)) != 0,
                rtt_ms=draw(st.none() | st.floats(0, 300, allow_subnormal=False)),
                replicas=draw(st.sampled_from((0, 1, 2, 5, 10, 63, 64))),
                memory_used_mib=draw(st.sampled_from((0, 0, 0, 500, 3000, 15000))),
            )
        )
    return out


def region_sets() -> st.SearchStrategy[list[str]]:
    return st.lists(st.sampled_from((*REGIONS, "r9")), min_size=1, max_size=3, unique=True)


@st.composite
def policies(draw: st.DrawFn) -> list[Policy]:
    out = []
    for i in range(draw(st.integers(0, 3))):
        rules: dict[str, Any] = {}
        if draw(st.booleans()):
            rules["regions"] = draw(region_sets())
        if draw(st.booleans()):
            rules["tiers"] = draw(
                st.lists(st.sampled_from(("edge", "cloud")), min_size=1, unique=True)
            )
        if draw(st.booleans()):
            rules["latency_p95_ms"] = draw(st.floats(1, 1000))
        rules["gpu"] = draw(st.sampled_from(GPU))
        rules["replicas"] = {
            "min_per_site": draw(st.integers(0, 2)),
            "max": draw(st.none() | st.none() | st.integers(0, 6)),
        }
        rules["spill"] = draw(st.booleans())
        out.append(Policy.from_dict({"name": f"p{i}", "version": 1, "rules": rules}))
    return out


@st.composite
def manifests(draw: st.DrawFn) -> Manifest:
    tensorrt = draw(st.integers(0, 5)) == 0
    return manifest(
        gpu=draw(st.sampled_from(GPU)),
        regions=tuple(draw(st.just([]) | region_sets())),
        memory_mb=draw(st.sampled_from((0, 100, 100, 2000, 8000))),
        runtime="tensorrt" if tensorrt else "onnx",
        gpu_arch=draw(st.sampled_from(("sm_87", "sm_89"))) if tensorrt else None,
        name=draw(st.sampled_from(FNS)),
        timeout_ms=draw(st.integers(1, 5000)),
    )


@settings(
    max_examples=int(200 * SCALE),
    deadline=None,
    suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large],
)
@given(
    fleet=fleets(),
    pols=policies(),
    m=manifests(),
    wanted=st.integers(0, 6),
    data=st.data(),
)
def test_choices_stay_inside_the_rules_and_paths_agree(
    fleet: list[SnapshotNode], pols: list[Policy], m: Manifest, wanted: int, data: st.DataObject
) -> None:
    names = [n.name for n in fleet]
    current = tuple(data.draw(st.lists(st.sampled_from([*names, "gone"]), unique=True, max_size=4)))
    where = data.draw(st.just({}) | st.builds(lambda s: {"site": s}, st.sampled_from(SITES)))
    eff = combine(pols, m)
    # Sometimes the caller passes no policy at all: the manifest's rules still hold.
    effective = eff if data.draw(st.booleans()) or pols else None
    request = PlacementRequest(
        m, replicas_wanted=wanted, current=current, effective=effective, where=where
    )
    snap = Snapshot(fleet)
    d = decide(request, snap)
    assert len(d.nodes) == len(set(d.nodes)) <= d.target
    if effective is None:
        assert d.target == wanted
    for name in d.nodes:
        n = snap.node(name)
        assert n is not None
        if eff.regions is not None:
            assert n.region in eff.regions
        if m.data.regions:
            assert n.region in m.data.regions
        if eff.tiers is not None:
            assert n.tier in eff.tiers
        if eff.gpu.value == "required":
            assert n.has_gpu
        assert n.live and n.trusted and n.state != "untrusted" and not n.draining
        assert all(n.labels.get(k) == v for k, v in where.items())
        assert d.result(name).fits
    if not eff.satisfiable:
        assert d.nodes == () and d.reason.startswith("unsatisfiable")
    # Current replicas that still fit are kept first.
    kept_first = [p.kept for p in d.placed]
    assert kept_first == sorted(kept_first, reverse=True)
    ex = d.explain()
    assert sorted(r.node for r in ex.rows) == sorted(names)
    assert all(r.reason for r in ex.rows if r.verdict == "excluded")
