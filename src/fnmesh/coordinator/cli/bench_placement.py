"""``fnmesh bench placement``: placement decisions, the indexed engine vs the naive full scan."""

from __future__ import annotations

import click

from fnmesh.coordinator.cli.common import json_option, print_json, print_table


@click.command("placement")
@click.option("--functions", type=click.IntRange(min=1), default=1000, show_default=True)
@click.option("--nodes", type=click.IntRange(min=1), default=10000, show_default=True)
@click.option("--seed", type=int, default=0, show_default=True, help="Seed of the simulated fleet.")
@json_option
def placement_bench(functions: int, nodes: int, seed: int, as_json: bool) -> None:
    """Microseconds per placement decision over a simulated fleet, engine vs naive full scan."""
    from fnmesh.coordinator.bench import placement as b

    f = b.run(functions=functions, nodes=nodes, seed=seed, quiet=True)
    if as_json:
        print_json(f)
        return
    print_table(
        f"placement: {functions} functions over {nodes} nodes",
        ["per decision (us)", "engine", "naive full scan", "speed-up"],
        [
            (
                "median",
                f"{f['engine_median_us']:,.1f}",
                f"{f['naive_median_us']:,.1f}",
                f"{f['speedup_median']:.1f}x",
            ),
            (
                "p99",
                f"{f['engine_p99_us']:,.1f}",
                f"{f['naive_p99_us']:,.1f}",
                f"{f['speedup_p99']:.1f}x",
            ),
            ("snapshot build (ms, once)", f"{f['snapshot_ms']:,.1f}", "", ""),
            ("decisions that differ", f"{f['disagreements']}", "", ""),
        ],
    )


def add_to(bench_group: click.Group) -> None:
    """Register ``placement`` under the ``fnmesh bench`` group."""
    bench_group.add_command(placement_bench)
