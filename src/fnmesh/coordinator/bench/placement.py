"""Placement decisions per second: the indexed engine against the naive full scan.

A simulated fleet (regions, sites, edge and cloud tiers, some GPUs, random
load, memory and RTT, a few offline, draining or untrusted nodes) and a set of
functions with random policies (residency, tiers, GPU rules, latency
objectives, replica counts, some already placed). Each function is placed
once with :meth:`Engine.place` and once with :meth:`Engine.place_naive`, over
the same snapshot; the figures are microseconds per decision, and every pair
of decisions must agree.

    python -c "from fnmesh.coordinator.bench.placement import run; run()"
"""

from __future__ import annotations

import gc
import random
import statistics
import time
from collections.abc import Callable
from datetime import UTC, datetime, timedelta
from typing import Any

from fnmesh.coordinator.placement import (
    Engine,
    Load,
    PlacementRequest,
    Snapshot,
    SnapshotNode,
)
from fnmesh.coordinator.policies import Policy, combine
from fnmesh.functions.manifest import Manifest

REGIONS = (
    "eu-west",
    "eu-central",
    "eu-north",
    "us-east",
    "us-west",
    "ap-south",
    "ap-northeast",
    "sa-east",
)
_NOW = datetime(2025, 1, 1, tzinfo=UTC)


def make_manifest(name: str, *, gpu: str = "none", regions: tuple[str, ...] = ()) -> Manifest:
    """A manifest that places like a real one (the digests are placeholders)."""
    return Manifest.model_validate(
        {
            "name": name,
            "version": "1.0.0",
            "inputs": [{"name": "x", "dtype": "float32", "shape": ["N", 8]}],
            "outputs": [{"name": "y", "dtype": "float32", "shape": ["N", 2]}],
            "requirements": {"gpu": gpu, "memory_mb": 0},
            "data": {"regions": list(regions)},
            "not_before": _NOW - timedelta(days=1),
            "not_after": _NOW + timedelta(days=3650),
            "digests": {
                "plaintext": "a" * 64,
                "ciphertext": "b" * 64,
                "plaintext_size": 40 << 20,
                "nonce": "c" * 24,
            },
            "publisher": "bench",
        }
    )


def make_fleet(n: int, functions: list[str], rng: random.Random) -> list[SnapshotNode]:
    """``n`` simulated nodes over the regions; about 40 edge nodes per site."""
    sites_per_region = max(1, n // len(REGIONS) // 40)
    out = []
    for i in range(n):
        region = rng.choice(REGIONS)
        edge = rng.random() < 0.7
        if edge:
            site = f"{region}-s{rng.randrange(sites_per_region)}"
            gpu = rng.random() < 0.1
            memory = rng.choice((2048, 4096, 8192, 16384))
            rtt = rng.uniform(1, 30)
            arch = "sm_87"
        else:
            site = f"{region}-dc{rng.randrange(2)}"
            gpu = rng.random() < 0.4
            memory = rng.choice((65536, 131072, 262144))
            rtt = rng.uniform(20, 200)
            arch = rng.choice(("sm_80", "sm_89"))
        hosted = rng.sample(functions, rng.randrange(0, 6))
        load = {
            f: Load(
                in_flight=rng.randrange(0, 4),
                queued=rng.randrange(0, 20),
                batch_ms=rng.uniform(1, 50),
                row_ms=rng.uniform(0.1, 5),
            )
            for f in hosted
        }
        roll = rng.random()
        state = "offline" if roll < 0.01 else "untrusted" if roll < 0.02 else "ready"
        out.append(
            SnapshotNode(
                name=f"n{i:05d}",
                state=state,
                labels={"region": region, "site": site, "tier": "edge" if edge else "cloud"},
                cores=rng.choice((4, 8)) if edge else 64,
                memory_mib=memory,
                gpus=("gpu0",) if gpu else (),
                gpu_arch=arch if gpu else None,
                functions=dict.fromkeys(hosted, "1.0.0"),
                load=load,
                draining=rng.random() < 0.01,
                trusted=state != "untrusted",
                rtt_ms=None if rng.random() < 0.05 else rtt,
                replicas=len(hosted),
                memory_used_mib=len(hosted) * 160,
            )
        )
    return out


def make_requests(
    functions: list[str], snapshot: Snapshot, rng: random.Random
) -> list[PlacementRequest]:
    """One request per function, under a random policy."""
    out = []
    for fid in functions:
        r = rng.random()
        gpu = "required" if r < 0.1 else "preferred" if r < 0.25 else "none"
        own_regions = tuple(rng.sample(REGIONS, rng.randint(1, 4))) if rng.random() < 0.3 else ()
        manifest = make_manifest(fid, gpu=gpu, regions=own_regions)
        rules: dict[str, Any] = {"latency_p95_ms": rng.choice((20, 50, 100, 250, 1000))}
        if rng.random() < 0.6:
            rules["regions"] = rng.sample(REGIONS, rng.randint(1, 3))
        t = rng.random()
        if t < 0.3:
            rules["tiers"] = ["edge"]
        elif t < 0.4:
            rules["tiers"] = ["cloud"]
        replicas: dict[str, int] = {}
        if rng.random() < 0.05:
            replicas["min_per_site"] = 1
        if rng.random() < 0.1:
            replicas["max"] = rng.randint(1, 4)
        rules["replicas"] = replicas
        policy = Policy.from_dict({"name": "p", "version": 1, "rules": rules})
        hosts = snapshot.by_function.get(fid)
        current: tuple[str, ...] = ()
        if hosts is not None and rng.random() < 0.5:
            current = tuple(snapshot.names[r] for r in hosts[:3])
        out.append(
            PlacementRequest(
                manifest,
                replicas_wanted=rng.randint(1, 5),
                current=current,
                effective=combine([policy], manifest),
            )
        )
    return out


def _time_each(
    place: Callable[[PlacementRequest, Snapshot], Any],
    requests: list[PlacementRequest],
    snapshot: Snapshot,
) -> tuple[list[float], list[Any]]:
    times, out = [], []
    gc.collect()
    for req in requests:
        t0 = time.perf_counter_ns()
        d = place(req, snapshot)
        times.append((time.perf_counter_ns() - t0) / 1000.0)
        out.append(d)
    return times, out


def _p99(xs: list[float]) -> float:
    s = sorted(xs)
    return s[min(len(s) - 1, round(0.99 * (len(s) - 1)))]


def run(
    functions: int = 1000, nodes: int = 10000, seed: int = 0, *, quiet: bool = False
) -> dict[str, Any]:
    """Place ``functions`` functions over ``nodes`` simulated nodes, engine vs naive."""
    rng = random.Random(seed)
    fids = [f"bench/fn-{i:04d}" for i in range(functions)]
    fleet = make_fleet(nodes, fids, rng)
    t0 = time.perf_counter()
    snapshot = Snapshot(fleet)
    snapshot_ms = (time.perf_counter() - t0) * 1000.0
    requests = make_requests(fids, snapshot, rng)
    engine = Engine()
    for req in requests[:20]:  # warm caches and lazy imports before timing
        engine.place(req, snapshot)
    fast, fast_d = _time_each(engine.place, requests, snapshot)
    naive, naive_d = _time_each(engine.place_naive, requests, snapshot)
    disagree = [a.function for a, b in zip(fast_d, naive_d, strict=True) if a.nodes != b.nodes]
    placed = sum(len(d.nodes) for d in fast_d)
    out = {
        "functions": functions,
        "nodes": nodes,
        "snapshot_ms": snapshot_ms,
        "engine_median_us": statistics.median(fast),
        "engine_p99_us": _p99(fast),
        "naive_median_us": statistics.median(naive),
        "naive_p99_us": _p99(naive),
        "speedup_median": statistics.median(naive) / statistics.median(fast),
        "speedup_p99": _p99(naive) / _p99(fast),
        "replicas_placed": placed,
        "short": sum(1 for d in fast_d if not d.satisfied),
        "disagreements": len(disagree),
    }
    if not quiet:
        print(
            f"placement: {functions} functions over {nodes} nodes "
            f"(snapshot built in {snapshot_ms:.1f} ms, {placed} replicas placed)\n"
            f"  engine  median {out['engine_median_us']:9.1f} us   p99 {out['engine_p99_us']:9.1f} us\n"
            f"  naive   median {out['naive_median_us']:9.1f} us   p99 {out['naive_p99_us']:9.1f} us\n"
            f"  speed-up x{out['speedup_median']:.1f} (median), x{out['speedup_p99']:.1f} (p99); "
            f"decisions that differ: {len(disagree)}"
        )
    return out
