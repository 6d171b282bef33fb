"""``fnmesh bench``: benchmarks, each next to its baseline measured in the same run."""

from __future__ import annotations

import signal
from types import FrameType

import click

from fnmesh.coordinator.cli.common import MeshGroup, json_option, print_json, print_table


@click.group("bench", cls=MeshGroup)
def bench() -> None:
    """Benchmarks (figures with their baselines, as ratios)."""
    # A benchmark starts brokers and agents of its own. Stopped with SIGTERM it unwinds as
    # on Ctrl-C, stopping them too, instead of leaving them running without it.
    signal.signal(signal.SIGTERM, _interrupt)


def _interrupt(signum: int, frame: FrameType | None) -> None:
    raise KeyboardInterrupt


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


@bench.command("invoke")
@click.option(
    "-n", "n", type=int, default=2000, show_default=True, help="Requests per measurement."
)
@click.option("--inflight", type=int, default=64, show_default=True)
@json_option
def invoke_bench(n: int, inflight: int, as_json: bool) -> None:
    """MQTT invocation latency, throughput and cold start vs raw ONNX Runtime and a bare echo."""
    from fnmesh.coordinator.bench import invoke as b
    from fnmesh.coordinator.cli.common import err_console

    f = b.run(n, inflight, progress=lambda s: err_console.print(f"[dim]bench: {s}[/dim]"))
    if as_json:
        print_json(f)
        return
    print_table(
        "MQTT invocation (mutual TLS, QoS 1), baselines from the same run",
        ["measure", "fnmesh", "baseline", "ratio"],
        [
            (
                "p50 round trip, digits (ms)",
                f"{f['invoke_p50_ms']:.3f}",
                f"{f['echo_p50_ms']:.3f} echo",
                f"{f['invoke_vs_echo_p50']:.2f}x",
            ),
            (
                "p99 round trip, digits (ms)",
                f"{f['invoke_p99_ms']:.3f}",
                f"{f['echo_p99_ms']:.3f} echo",
                "",
            ),
            ("raw ORT run, digits (us)", "", f"{f['raw_digits_us']:.1f}", ""),
            (
                f"throughput @{inflight}, digits (req/s)",
                f"{f['digits_rps']:,.0f}",
                f"{f['echo_rps']:,.0f} echo",
                f"{f['digits_vs_echo_rps']:.2f}x",
            ),
            (
                f"throughput @{inflight}, mlp batched vs not (req/s)",
                f"{f['mlp_rps']:,.0f}",
                f"{f['mlp_unbatched_rps']:,.0f} unbatched",
                f"{f['mlp_batching_gain']:.2f}x",
            ),
            (
                "raw ORT run, mlp (us/sample)",
                "",
                f"{f['raw_mlp_us']:.1f} alone, {f['raw_mlp_batch64_us_per_sample']:.1f} in 64",
                "",
            ),
            (
                "cold start, mlp (ms)",
                f"{f['cold_mlp_ms']:.2f}",
                f"{f['raw_cold_mlp_ms']:.2f} raw load+run after the same idle "
                f"({f['raw_cold_hot_mlp_ms']:.2f} back to back)",
                f"{f['cold_vs_raw']:.2f}x",
            ),
        ],
    )


@bench.command("e2e")
@click.option(
    "-n", "n", type=int, default=2000, show_default=True, help="Requests per measurement."
)
@click.option("--inflight", type=int, default=64, show_default=True)
@json_option
def e2e_bench(n: int, inflight: int, as_json: bool) -> None:
    """Device -> router -> agent over MQTT, and HTTP, vs raw ONNX Runtime and a bare MQTT echo."""
    from fnmesh.coordinator.bench import e2e as b
    from fnmesh.coordinator.cli.common import err_console

    f = b.run(n, inflight, progress=lambda s: err_console.print(f"[dim]bench: {s}[/dim]"))
    if as_json:
        print_json(f)
        return
    rows = [
        ("raw ORT run, digits (us)", "", f"{f['raw_digits_us']:.1f}", ""),
        (
            "MQTT p50, device->router->agent (ms)",
            f"{f['mqtt_p50_ms']:.3f}",
            f"{f['echo_p50_ms']:.3f} echo",
            f"{f['mqtt_vs_echo_p50']:.2f}x",
        ),
        ("MQTT p99 (ms)", f"{f['mqtt_p99_ms']:.3f}", f"{f['echo_p99_ms']:.3f} echo", ""),
        (
            f"MQTT throughput @{inflight} (req/s)",
            f"{f['mqtt_rps']:,.0f}",
            f"{f['echo_rps']:,.0f} echo",
            f"{f['mqtt_rps'] / f['echo_rps']:.2f}x",
        ),
        ("HTTP via coordinator p50 (ms)", f"{f['http_coord_p50_ms']:.3f}", "", ""),
        (f"HTTP via coordinator @{inflight} (req/s)", f"{f['http_coord_rps']:,.0f}", "", ""),
    ]
    if "http_agent_p50_ms" in f:
        rows += [
            ("HTTP to the agent p50 (ms)", f"{f['http_agent_p50_ms']:.3f}", "", ""),
            (f"HTTP to the agent @{inflight} (req/s)", f"{f['http_agent_rps']:,.0f}", "", ""),
        ]
    print_table(
        "end to end (mutual TLS everywhere), baselines from the same run",
        ["measure", "fnmesh", "baseline", "ratio"],
        rows,
    )


from fnmesh.coordinator.bench.soak import add_to as _add_soak_and_fuzz  # noqa: E402

_add_soak_and_fuzz(bench)

from fnmesh.coordinator.cli import bench_placement  # noqa: E402

bench_placement.add_to(bench)

from fnmesh.coordinator.cli import bench_overload  # noqa: E402

bench_overload.add_to(bench)
