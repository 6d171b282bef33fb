"""``fnmesh bench soak`` and ``fnmesh bench fuzz``: the mesh under faults and under bad input.

soak: mixed load (every example, 1 to 4 rows a request) from the Python client
through a mesh of real processes (``fnmesh up``: Mosquitto, the coordinator, a
router, N agents; or, with ``--no-coordinator``, agents serving bundle files;
see :mod:`fnmesh.coordinator.bench.mesh`), while one agent is killed with
SIGKILL and restarted in the middle of every period (a minute by default), the
next one only once the last is back. The client retries on timeout with the
same id, so no request may be lost; every answer is checked against the
example's reference. Prints p50/p99 per period, the requests lost (must be 0)
and the late duplicates the client dropped.

fuzz: :mod:`fnmesh.coordinator.bench.fuzz` at full size (10,000 requests by
default), printing what came back and the growth of the agents' and the
router's resident memory. It runs without a coordinator: half of the flood
goes straight to the agents' inboxes, which a device may not write to under
``fnmesh up``'s ACL.
"""

from __future__ import annotations

import asyncio
import contextlib
import itertools
import json
import math
import random
import tempfile
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

import click

from fnmesh.coordinator.cli.common import MeshCommand, err_console, print_json, print_table

if TYPE_CHECKING:
    from fnmesh.coordinator.bench.mesh import ProcessMesh

# The rest (numpy, paho, ONNX examples, psutil) is imported when a verb runs: every
# ``fnmesh`` command loads this module to list the bench verbs.

#: Resident memory an agent or the router may gain over a fuzz run.
FUZZ_RSS_LIMIT_MB = 50.0


def pct(xs: list[float], p: float) -> float:
    """The ``p``-th percentile (nearest rank) of ``xs``."""
    s = sorted(xs)
    return s[min(len(s) - 1, round(p / 100 * (len(s) - 1)))]


@dataclass
class Period:
    """What happened to the requests started in one period."""

    index: int
    latencies_ms: list[float] = field(default_factory=list)
    lost: int = 0
    wrong: int = 0
    killed: str | None = None

    @property
    def answered(self) -> int:
        return len(self.latencies_ms)

    def row(self) -> dict[str, Any]:
        lat = self.latencies_ms
        return {
            "period": self.index,
            "answered": self.answered,
            "lost": self.lost,
            "wrong": self.wrong,
            "p50_ms": round(pct(lat, 50), 3) if lat else None,
            "p99_ms": round(pct(lat, 99), 3) if lat else None,
            "killed": self.killed,
        }


@dataclass
class SoakReport:
    seconds: float
    period_s: float
    periods: list[Period]
    sent: int = 0
    retries: int = 0
    duplicates: int = 0
    strays: int = 0
    kills: int = 0
    #: Seconds from each kill until the restarted agent said ready again.
    back_ready_s: list[float] = field(default_factory=list)
    lost_detail: list[str] = field(default_factory=list)

    @property
    def answered(self) -> int:
        return sum(p.answered for p in self.periods)

    @property
    def lost(self) -> int:
        return sum(p.lost for p in self.periods)

    @property
    def wrong(self) -> int:
        return sum(p.wrong for p in self.periods)

    def summary(self) -> dict[str, Any]:
        return {
            "seconds": round(self.seconds, 1),
            "period_s": self.period_s,
            "invokes": self.answered + self.lost,
            "answered": self.answered,
            "lost": self.lost,
            "wrong": self.wrong,
            "published": self.sent,
            "retries": self.retries,
            "late_duplicates_dropped": self.duplicates,
            "strays": self.strays,
            "kills": self.kills,
            "back_ready_s": [round(s, 2) for s in self.back_ready_s],
            "periods": [p.row() for p in self.periods],
            # Why each lost request failed (the client's last error), the first 50.
            "lost_detail": self.lost_detail[:50],
        }


async def async_soak(
    mesh: ProcessMesh,
    *,
    seconds: float,
    period_s: float = 60.0,
    concurrency: int = 8,
    timeout_s: float = 1.0,
    retries: int = 10,
    seed: int = 0,
    progress: Callable[[str], None] = lambda _s: None,
) -> SoakReport:
    """Load ``mesh`` for ``seconds``, killing one agent (in turn) mid-way through every period."""
    from fnmesh.coordinator.bench.fuzz import InputPool, compare_rows
    from fnmesh.functions.client import Backoff, InvokeError
    from fnmesh.functions.examples.models import build_example

    examples = list(mesh.examples)
    pools = InputPool(examples)
    nperiods = max(1, math.ceil(seconds / period_s))
    report = SoakReport(seconds, period_s, [Period(i) for i in range(nperiods)])
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    t0 = loop.time()
    backoff = Backoff(base_s=0.05, max_s=min(1.0, timeout_s))
    client = mesh.device_client(timeout_s=timeout_s, retries=retries, backoff=backoff)

    def period_of(t: float) -> Period:
        return report.periods[min(nperiods - 1, int((t - t0) / period_s))]

    async def worker(w: int) -> None:
        rng = random.Random(seed * 1000 + w)
        for i in itertools.count():
            if stop.is_set():
                return
            name = examples[(w + i) % len(examples)]
            k = rng.randint(1, 4)
            first = rng.randrange(len(pools.want[name]["label"]) - k)
            started = loop.time()
            period = period_of(started)
            try:
                r = await client.invoke(
                    build_example(name).function_id, pools.rows(name, first, k), id=f"s{w}-{i}"
                )
            except InvokeError as e:
                period.lost += 1
                report.lost_detail.append(f"s{w}-{i} ({name}): {e}")
                continue
            period.latencies_ms.append((loop.time() - started) * 1000)
            if compare_rows(r.outputs, pools.want[name], first, k) is not None:
                period.wrong += 1

    async def killer() -> None:
        victims = itertools.cycle(list(mesh.nodes))
        back: asyncio.Future[float] | None = None
        for p in range(nperiods):
            at = t0 + (p + 0.5) * period_s
            if at >= t0 + seconds:
                break
            await asyncio.sleep(max(0.0, at - loop.time()))  # a schedule, not a wait for an event
            if back is not None:
                # One agent down at a time: the previous one is ready again first.
                report.back_ready_s.append(await back)
            if stop.is_set():
                return
            name = next(victims)
            killed_at = loop.time()
            mesh.kill_agent(name)
            mesh.start_agent(name)
            report.kills += 1
            report.periods[p].killed = name
            progress(f"period {p}: killed {name} (SIGKILL) and restarted it")
            back = asyncio.ensure_future(_ready_after(mesh, name, killed_at))
        if back is not None:
            report.back_ready_s.append(await back)

    await client.connect()
    try:
        workers = [asyncio.ensure_future(worker(w)) for w in range(concurrency)]
        kill_task = asyncio.ensure_future(killer())
        try:
            await asyncio.sleep(seconds)  # the length of the run
            stop.set()
            # In-flight invokes finish (or fail) within their retry budget.
            await asyncio.gather(*workers)
            await kill_task
        finally:
            for t in (*workers, kill_task):
                t.cancel()
            for t in (*workers, kill_task):
                with contextlib.suppress(asyncio.CancelledError):
                    await t
        mesh.check_alive()
    finally:
        await client.close()
    report.sent = client.stats.sent
    report.retries = client.stats.retries
    report.duplicates = client.stats.duplicates
    report.strays = client.stats.strays
    return report


async def _ready_after(mesh: ProcessMesh, name: str, since: float) -> float:
    await mesh.async_wait_ready([name])
    return asyncio.get_running_loop().time() - since


# -- the verbs ----------------------------------------------------------------------------------


def _progress(s: str) -> None:
    err_console.print(f"[dim]bench: {s}[/dim]")


def run_soak(
    minutes: float,
    agents: int,
    *,
    period_s: float = 60.0,
    concurrency: int = 8,
    coordinator: bool = True,
) -> SoakReport:
    from fnmesh.coordinator.bench.mesh import ProcessMesh

    with tempfile.TemporaryDirectory() as tmp:
        mesh = ProcessMesh(
            Path(tmp) / "home", agents=agents, progress=_progress, coordinator=coordinator
        ).start()
        try:

            async def go() -> SoakReport:
                await mesh.async_wait_ready()
                return await async_soak(
                    mesh,
                    seconds=minutes * 60,
                    period_s=period_s,
                    concurrency=concurrency,
                    progress=_progress,
                )

            return asyncio.run(go())
        finally:
            mesh.stop()


@click.command("soak", cls=MeshCommand)
@click.option("--minutes", type=float, default=10.0, show_default=True)
@click.option("--agents", type=int, default=2, show_default=True)
@click.option(
    "--period",
    "period_s",
    type=float,
    default=60.0,
    show_default=True,
    help="Seconds between kills (one agent, SIGKILL, mid-period), and per row of figures.",
)
@click.option("--concurrency", type=int, default=8, show_default=True)
@click.option(
    "--coordinator/--no-coordinator",
    default=True,
    show_default=True,
    help="Start the mesh with fnmesh up (coordinator, deployments), or agents serving "
    "bundle files (the data path alone).",
)
@click.option("--json", "as_json", is_flag=True, help="Print JSON for scripts.")
def soak_command(
    minutes: float,
    agents: int,
    period_s: float,
    concurrency: int,
    coordinator: bool,
    as_json: bool,
) -> None:
    """Mixed load through a mesh while agents are killed: requests lost (must be 0), p50/p99."""
    if agents < 2:
        raise click.BadParameter("a soak needs at least 2 agents (one is always being killed)")
    r = run_soak(
        minutes, agents, period_s=period_s, concurrency=concurrency, coordinator=coordinator
    )
    if as_json:
        print_json(r.summary())
    else:
        print_table(
            f"soak: {agents} agents, one killed (SIGKILL) and restarted every {period_s:g} s",
            ["period", "answered", "lost", "wrong", "p50 ms", "p99 ms", "killed"],
            [
                (
                    row["period"],
                    row["answered"],
                    row["lost"],
                    row["wrong"],
                    row["p50_ms"],
                    row["p99_ms"],
                    row["killed"] or "",
                )
                for row in (p.row() for p in r.periods)
            ],
        )
        s = r.summary()
        print(
            f"invokes {s['invokes']}, answered {s['answered']}, lost {s['lost']}, "
            f"wrong {s['wrong']}; published {s['published']} (retries {s['retries']}), "
            f"late duplicates dropped {s['late_duplicates_dropped']}; agents back ready after "
            f"{s['back_ready_s']} s"
        )
        for line in s["lost_detail"]:
            print(f"lost: {line}")
    if r.lost or r.wrong:
        raise SystemExit(1)


@click.command("fuzz", cls=MeshCommand)
@click.option("--n", "n", type=int, default=10_000, show_default=True, help="Requests sent.")
@click.option("--agents", type=int, default=2, show_default=True)
@click.option("--seed", type=int, default=0, show_default=True)
@click.option("--json", "as_json", is_flag=True, help="Print JSON for scripts.")
def fuzz_command(n: int, agents: int, seed: int, as_json: bool) -> None:
    """A flood of malformed invocations mixed with valid ones: no crash, every answer, memory."""
    from fnmesh.coordinator.bench.fuzz import async_flood
    from fnmesh.coordinator.bench.mesh import ProcessMesh

    with tempfile.TemporaryDirectory() as tmp:
        mesh = ProcessMesh(Path(tmp) / "home", agents=agents, progress=_progress).start()
        try:

            async def go() -> Any:
                await mesh.async_wait_ready()
                return await async_flood(mesh, n, seed=seed, progress=_progress)

            r = asyncio.run(go())
        finally:
            mesh.stop()
    s = r.summary()
    growth = r.growth_mb
    too_much = {k: v for k, v in growth.items() if v >= FUZZ_RSS_LIMIT_MB}
    if as_json:
        print_json({**s, "rss_limit_mb": FUZZ_RSS_LIMIT_MB})
    else:
        print_table(
            f"fuzz: {n} requests in {s['seconds']} s ({s['valid']} valid)",
            ["measure", "value"],
            [
                ("valid answered correctly", f"{s['valid_ok']} / {s['valid']}"),
                ("answers due / received", f"{s['must_answer']} / {s['answered']}"),
                ("error codes", json.dumps(s["codes"])),
                ("malformed accepted", s["accepted_malformed"]),
                ("duplicates / unexpected", f"{s['duplicates']} / {s['unexpected']}"),
                ("processes died", ", ".join(s["died"]) or "none"),
                *(
                    (
                        f"RSS growth, {k} (MB)",
                        f"{v:+.1f} ({r.rss_before[k] / 2**20:.0f} -> {r.rss_after[k] / 2**20:.0f})",
                    )
                    for k, v in growth.items()
                ),
            ],
        )
    if not r.ok() or too_much:
        raise SystemExit(1)


def add_to(bench_group: click.Group) -> None:
    """Register ``soak`` and ``fuzz`` under ``fnmesh bench``."""
    bench_group.add_command(soak_command)
    bench_group.add_command(fuzz_command)
