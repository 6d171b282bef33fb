"""A site cut off from the cloud keeps serving its devices, and comes back without redeploying.

Real processes and real brokers, with network namespaces for the link (see site_support.py):
a cloud host (Mosquitto, ``fnmesh coordinator``, a cloud agent) and a site host (Mosquitto
bridged to the cloud's, ``fnmesh router``, two agents, a device) on one bridge. The
coordinator deploys ``examples/digits`` to the two site agents and ``examples/anomaly``
to the cloud agent only. Then the cloud's cable is unplugged (``ip link set DEV down``):

- the device at the site keeps getting correct digits answers for the whole outage
  (10 s x FNMESH_TEST_SCALE here; ``FNMESH_TEST_SCALE=6`` is the full 60 s run);
- a site agent stopped (SIGTERM) and started again during the outage serves again within
  5 s, from its bundle cache and the retained assignment the site broker holds;
- anomaly, only served in the cloud, gets an answer at the site (``saturated`` or
  ``timeout`` from the site router), never silence;
- once the cable is back the coordinator lists the site nodes ``ready`` again, their
  retained assignment generation is the one they had, and no bundle was fetched again.

Skipped where network namespaces cannot be built (not root, no iproute2, kernel refuses).
Everything (processes, namespaces) is torn down whatever happens.
"""

from __future__ import annotations

import shutil
import time
from collections import Counter
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import netns
import pytest
from conftest import SCALE
from site_support import CLOUD_FN, CLOUD_NODE, EDGE_FN, SITE_NODES, OfflineSite

#: The outage: 10 s in the suite, 60 s with FNMESH_TEST_SCALE=6 (the full run). Never under
#: 6 s: the coordinator's missed-heartbeat verdict (3 x 1 s) must fall inside it.
OUTAGE_S = max(6.0, 10.0 * SCALE)
#: A restarted agent must serve again within this long of being started.
RESTART_LIMIT_S = 5.0


def _skip_reason() -> str | None:
    ok, why = netns.available()
    if not ok:
        return why
    if shutil.which("mosquitto") is None and not Path("/usr/sbin/mosquitto").exists():
        return "mosquitto is not installed"
    return None


pytestmark = pytest.mark.skipif(_skip_reason() is not None, reason=str(_skip_reason()))


@pytest.fixture
def site(tmp_path: Path) -> Iterator[OfflineSite]:
    with netns.Lan(("cld", "site")) as lan:
        s = OfflineSite(lan, tmp_path)
        try:
            s.prepare()
            s.start_brokers()
            s.start_mesh()
            yield s
        finally:
            s.close()
    assert lan.leftovers() == []


def _summary(records: list[dict[str, Any]]) -> Counter[str]:
    return Counter(r["status"] for r in records)


def test_site_keeps_serving_while_cut_off_and_comes_back_unchanged(site: OfflineSite) -> None:
    t_setup = time.monotonic()
    out = site.helper("cld", "setup", str(site.home_dir), "90", timeout=120)
    assert '"nodes"' in out
    site.start_device()
    site.check_alive()
    print(f"\nmesh up and deployed in {time.monotonic() - t_setup:.1f} s")

    # Before the cut: the site answers digits from both site agents, correctly.
    site.ask(op="loop_start", function=EDGE_FN, period=0.02)
    time.sleep(2.0)
    warm = site.ask(op="loop_stop")["records"]
    assert warm and all(r["status"] == "ok" for r in warm), warm[-3:]
    assert {r["node"] for r in warm} == set(SITE_NODES), _summary(warm)
    # The function only the cloud serves, link up: whatever comes back, it is an answer.
    up_cloud = site.ask(op="once", function=CLOUD_FN)
    print(
        f"{CLOUD_FN} at the site, link up: {up_cloud['status']} {up_cloud.get('code', '')} "
        f"{up_cloud.get('message', '')[:120]}"
    )

    state = site.ask(op="state")
    gen_before = {n: state["assign"][n]["generation"] for n in SITE_NODES}
    cache_before = {n: site.cache_files(n) for n in SITE_NODES}
    assert all(cache_before[n] for n in SITE_NODES), cache_before

    # -- the outage ------------------------------------------------------------------------------
    site.ask(op="loop_start", function=EDGE_FN, period=0.02)
    t_cut = time.time()
    site.lan.cut("cld")
    time.sleep(min(2.0, OUTAGE_S / 5))
    # The restart: SIGTERM, wait for the exit, start again with the same arguments.
    victim = f"agent-{SITE_NODES[0]}"
    rc = site.stop_proc(victim)
    assert rc == 0, f"{victim} did not stop cleanly on SIGTERM ({rc})"
    respawned = site.spawn(site.procs[victim])
    t_spawn = respawned.started
    # The cloud-only function, cut off: the site router must answer it, early in the outage
    # and once the cloud node's heartbeats have been missing for long.
    down_cloud = [site.ask(op="once", function=CLOUD_FN, i=k) for k in range(2)]
    left = OUTAGE_S - (time.time() - t_cut)
    if left > 2:
        time.sleep(left - 2)
    down_cloud += [site.ask(op="once", function=CLOUD_FN, i=k) for k in range(2, 4)]
    during = site.nodes()  # the coordinator's view while the site is still cut off
    left = OUTAGE_S - (time.time() - t_cut)
    if left > 0:
        time.sleep(left)
    stopped = site.ask(op="loop_stop")
    records = stopped["records"]
    t_restore = time.time()
    site.lan.restore("cld")
    outage_s = t_restore - t_cut
    site.check_alive()

    counts = _summary(records)
    served_by = Counter(r.get("node") for r in records if r["status"] == "ok")
    back = [
        r
        for r in records
        if r["status"] == "ok" and r["node"] == SITE_NODES[0] and r["t0"] >= t_spawn
    ]
    restart_s = (min(r["t1"] for r in back) - t_spawn) if back else float("inf")
    print(
        f"outage {outage_s:.1f} s: {len(records)} requests, {dict(counts)}, served by "
        f"{dict(served_by)}; device client {stopped['stats']}; {victim} restarted and "
        f"serving again {restart_s:.2f} s after start"
    )
    for r in down_cloud:
        print(
            f"{CLOUD_FN} at the site, cut off: {r['status']} {r.get('code', '')} "
            f"{r.get('message', '')[:120]}"
        )
    print(
        "coordinator during the outage: "
        + ", ".join(f"{n}={v['state']}" for n, v in sorted(during.items()))
    )

    assert records, "the device sent nothing during the outage"
    assert counts == Counter(ok=len(records)), [r for r in records if r["status"] != "ok"][:5]
    assert records[-1]["t1"] >= t_cut + OUTAGE_S - 1.0, "answers did not last the outage"
    assert restart_s <= RESTART_LIMIT_S, f"{victim} took {restart_s:.2f} s to serve again"
    assert all(
        r["status"] == "error" and r["code"] in ("saturated", "timeout") for r in down_cloud
    ), down_cloud
    # The cut was real: the coordinator stopped hearing from the site.
    assert all(during[n]["state"] != "ready" for n in SITE_NODES), during
    assert during[CLOUD_NODE]["state"] == "ready", during

    # -- the link is back ------------------------------------------------------------------------
    end = time.monotonic() + 60 * max(1.0, SCALE)
    while True:
        nodes = site.nodes()
        if all(
            nodes[n]["state"] == "ready" and EDGE_FN in nodes[n]["functions"] for n in SITE_NODES
        ):
            break
        assert time.monotonic() < end, f"site nodes not ready after the link came back: {nodes}"
        site.check_alive()
        time.sleep(0.5)
    ready_after_s = time.time() - t_restore
    state = site.ask(op="state")
    gen_after = {n: state["assign"][n]["generation"] for n in SITE_NODES}
    status_gen = {n: state["status"][n]["assignment"]["generation"] for n in SITE_NODES}
    cache_after = {n: site.cache_files(n) for n in SITE_NODES}
    print(
        f"site nodes ready at the coordinator {ready_after_s:.1f} s after the link came back; "
        f"assignment generations {gen_before} -> {gen_after} (agents report {status_gen}); "
        f"cached bundles unchanged: {cache_after == cache_before}"
    )
    assert gen_after == gen_before, "the site's assignments were republished"
    assert status_gen == gen_before
    assert cache_after == cache_before, "a bundle was fetched (written to the cache) again"
    # And the site still answers, through the same mesh.
    site.ask(op="loop_start", function=EDGE_FN, period=0.02)
    time.sleep(1.0)
    tail = site.ask(op="loop_stop")["records"]
    assert tail and all(r["status"] == "ok" for r in tail), tail[-3:]
    site.check_alive()
