"""Overload: five times the edge's capacity, offered open loop; every request is answered."""

from __future__ import annotations

from agent_support import new_root
from conftest import SCALE, Broker, Fleet

from fnmesh.coordinator.bench.overload import (
    async_offer,
    ensure_identities,
    heavy_bundles,
    overload_mesh,
)

#: Seconds of offered load (the bench runs 30 x FNMESH_TEST_SCALE).
DURATION = 4.0 * SCALE


async def test_five_times_capacity_with_spill_loses_nothing(fleet: Fleet, broker: Broker) -> None:
    ensure_identities(fleet.home, fleet.ca, "overload")
    bundles = heavy_bundles(fleet.home, fleet.ca)
    async with overload_mesh(
        fleet.home, broker.tls_url, new_root(), bundles, allow_spill=True
    ) as mesh:
        capacity, o = await async_offer(mesh, factor=5.0, duration_s=DURATION, drain_s=40.0)
    print(f"edge capacity {capacity:.1f}/s; {o.figures()}")
    assert o.sent >= 5 * capacity * DURATION - 1
    assert o.lost == 0, f"{o.lost} of {o.sent} requests got no answer"
    assert o.duplicates == 0
    assert o.codes == {"ok": o.sent}, o.codes
    assert o.spilled > 0, "five times the edge's capacity must spill"
    assert set(o.nodes) <= {"edge-1", "cloud-1"}


async def test_five_times_capacity_without_spill_answers_saturated(
    fleet: Fleet, broker: Broker
) -> None:
    ensure_identities(fleet.home, fleet.ca, "overload")
    bundles = heavy_bundles(fleet.home, fleet.ca)
    async with overload_mesh(
        fleet.home, broker.tls_url, new_root(), bundles, allow_spill=False
    ) as mesh:
        capacity, o = await async_offer(mesh, factor=5.0, duration_s=DURATION, drain_s=40.0)
    print(f"edge capacity {capacity:.1f}/s; {o.figures()}")
    assert o.lost == 0, f"{o.lost} of {o.sent} requests got no answer"
    assert o.duplicates == 0
    assert set(o.codes) <= {"ok", "saturated"}, o.codes
    assert sum(o.codes.values()) == o.sent
    assert o.spilled == 0
