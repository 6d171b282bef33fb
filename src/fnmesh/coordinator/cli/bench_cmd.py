"""``fnmesh bench``: benchmarks, each next to its baseline measured in the same run."""

from __future__ import annotations

import click

from fnmesh.coordinator.cli.common import MeshGroup, json_option, print_json, print_table


@click.group("bench", cls=MeshGroup)
def bench() -> None:
    """Benchmarks (figures with their baselines, as ratios)."""


@bench.command("bundle")
@click.option(
    "--size-mb", "sizes", type=float, multiple=True, help="Model sizes (default 1 and 100)."
)
@click.option("--repeat", type=int, default=5, show_default=True)
@json_option
def bundle_bench(sizes: tuple[float, ...], repeat: int, as_json: bool) -> None:
    """Build, verify and decrypt throughput vs one SHA-256 pass + one AES-256-GCM decryption."""
    from fnmesh.coordinator.bench import bundle as b

    results = b.run([int(s * 1e6) for s in (sizes or (1.0, 100.0))], repeat=repeat)
    if as_json:
        print_json(
            [
                {
                    "size": r.size,
                    "build_MBps": r.build_mbs,
                    "verify_MBps": r.verify_mbs,
                    "decrypt_MBps": r.decrypt_mbs,
                    "verify_decrypt_MBps": r.verify_decrypt_mbs,
                    "baseline_MBps": r.baseline_mbs,
                    "ratio": r.ratio,
                }
                for r in results
            ]
        )
        return
    print_table(
        "bundle throughput (MB/s; baseline = SHA-256 + AES-256-GCM decrypt of the same bytes)",
        ["model", "build", "verify", "decrypt", "verify+decrypt", "baseline", "ratio"],
        [
            (
                f"{r.size / 1e6:.1f} MB",
                f"{r.build_mbs:,.0f}",
                f"{r.verify_mbs:,.0f}",
                f"{r.decrypt_mbs:,.0f}",
                f"{r.verify_decrypt_mbs:,.0f}",
                f"{r.baseline_mbs:,.0f}",
                f"{r.ratio:.2f}x",
            )
            for r in results
        ],
    )
