"""``fnmesh up``: a local mesh in one command."""

from __future__ import annotations

import click

from fnmesh.coordinator.cli.common import MeshCommand, console, err_console, get_home, home_option


@click.command("up", cls=MeshCommand)
@home_option
@click.option(
    "--agents",
    type=int,
    default=3,
    show_default=True,
    help="Agents to start (the last one is tier=cloud).",
)
@click.option("--broker", default=None, help="Use this broker instead of starting one.")
@click.option("--demo", is_flag=True, help="Invoke every example, show the results, and exit.")
@click.option("--json", "as_json", is_flag=True, help="Print one ready line as JSON.")
@click.option(
    "--mdns-interfaces",
    "mdns_interfaces",
    multiple=True,
    help="Advertise the coordinator over mDNS here (repeatable; default: loopback only).",
)
def up(
    home: str | None,
    agents: int,
    broker: str | None,
    demo: bool,
    as_json: bool,
    mdns_interfaces: tuple[str, ...],
) -> None:
    """Start a TLS-secured mesh on this machine with the example functions deployed."""
    from fnmesh.coordinator.up import run_up

    def progress(s: str) -> None:
        if not as_json:
            err_console.print(f"[dim]up: {s}[/dim]")

    def show(s: str) -> None:
        if as_json:
            print(s, flush=True)
        else:
            console.print(s, highlight=False, soft_wrap=True)

    raise SystemExit(
        run_up(
            get_home(home),
            agents=agents,
            broker=broker,
            demo=demo,
            as_json=as_json,
            mdns_interfaces=mdns_interfaces or ("127.0.0.1",),
            progress=progress,
            show=show,
        )
    )
