"""``fnmesh bench overload``: five times an edge node's capacity, open loop; nothing lost."""

from __future__ import annotations

import os

import click

from fnmesh.coordinator.cli.common import json_option, print_json, print_table


def _default_duration() -> float:
    return 30.0 * float(os.environ.get("FNMESH_TEST_SCALE", "1") or 1)


@click.command("overload")
@click.option(
    "--duration",
    type=click.FloatRange(min=0.5),
    default=None,
    help="Seconds of offered load (default 30 x FNMESH_TEST_SCALE).",
)
@click.option(
    "--factor",
    type=click.FloatRange(min=1.0),
    default=5.0,
    show_default=True,
    help="Offered load as a multiple of the edge node's measured capacity.",
)
@json_option
def overload_bench(duration: float | None, factor: float, as_json: bool) -> None:
    """Spill allowed: every request answered; forbidden: answered or saturated. Counts by id."""
    from fnmesh.coordinator.bench import overload as b

    f = b.run(duration if duration is not None else _default_duration(), factor, quiet=True)
    if as_json:
        print_json(f)
        return
    runs = [("spill allowed", f["spill_allowed"]), ("spill forbidden", f["spill_forbidden"])]
    print_table(
        f"overload: {factor:g} x the edge's capacity, open loop, {f['function']}",
        ["", *[name for name, _ in runs]],
        [
            ("edge capacity (req/s)", *[f"{r['edge_capacity_rps']:.1f}" for _, r in runs]),
            ("offered (req/s)", *[f"{r['offered_rps']:.1f}" for _, r in runs]),
            ("duration (s)", *[f"{r['duration_s']:g}" for _, r in runs]),
            ("sent", *[str(r["sent"]) for _, r in runs]),
            ("answered", *[str(r["answered"]) for _, r in runs]),
            ("lost", *[str(r["lost"]) for _, r in runs]),
            ("duplicates", *[str(r["duplicates"]) for _, r in runs]),
            ("ok", *[str(r["codes"].get("ok", 0)) for _, r in runs]),
            ("saturated", *[str(r["codes"].get("saturated", 0)) for _, r in runs]),
            ("spilled", *[str(r["spilled"]) for _, r in runs]),
            (
                "answers by node",
                *[", ".join(f"{n} {c}" for n, c in sorted(r["by_node"].items())) for _, r in runs],
            ),
            ("p50 ok (ms)", *[f"{r['p50_ms']:,.1f}" for _, r in runs]),
            ("p99 ok (ms)", *[f"{r['p99_ms']:,.1f}" for _, r in runs]),
            ("until the last answer (s)", *[f"{r['wall_s']:.1f}" for _, r in runs]),
        ],
    )


def add_to(bench_group: click.Group) -> None:
    """Register ``overload`` under the ``fnmesh bench`` group."""
    bench_group.add_command(overload_bench)
