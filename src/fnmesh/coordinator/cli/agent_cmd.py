"""``fnmesh agent``: run a node agent, or print this machine's hardware probe."""

from __future__ import annotations

import asyncio
from pathlib import Path

import click

from fnmesh.coordinator.cli.common import (
    get_home,
    home_option,
    print_json,
    setup_logging,
    verbose_option,
)


@click.command("agent")
@home_option
@click.option("--broker", help="mqtt://HOST:PORT or mqtts://HOST:PORT (default: fnmesh.toml).")
@click.option("--name", help="Node name (its certificate is node.NAME in the home).")
@click.option(
    "--labels", default="", help="key=value,... e.g. region=eu-west,site=lyon-1,tier=edge"
)
@click.option(
    "--serve",
    "serve",
    multiple=True,
    type=click.Path(exists=True, dir_okay=False),
    help="Serve a local bundle built or re-wrapped for this node (repeatable).",
)
@click.option(
    "--http",
    "http",
    default="127.0.0.1:0",
    show_default=True,
    help="HOST:PORT of the HTTPS endpoint.",
)
@click.option(
    "--memory-budget-mb", type=int, default=0, help="Warm pool budget (default: half of memory)."
)
@click.option(
    "--idle-ttl",
    type=float,
    default=300.0,
    show_default=True,
    help="Unload a function idle this long (s).",
)
@click.option(
    "--max-queue", type=int, default=1024, show_default=True, help="Queued requests per function."
)
@click.option(
    "--heartbeat", type=float, default=2.0, show_default=True, help="Heartbeat period (s)."
)
@click.option("--threads", type=int, default=0, help="Executor threads (default: cores).")
@click.option(
    "--inline-run-us",
    type=float,
    default=30.0,
    show_default=True,
    help="Run batches measured to need at most this much CPU (us) on the event loop "
    "instead of a worker thread, which costs more to reach (0: always a worker).",
)
@click.option(
    "--discover",
    is_flag=True,
    help="Find the coordinator and broker over mDNS (automatic when fnmesh.toml names no broker).",
)
@click.option(
    "--interfaces",
    "interfaces",
    multiple=True,
    help="Interface name or address for mDNS (repeatable; default: loopback only).",
)
@click.option(
    "--coordinator", default=None, help="Coordinator API URL (default: fnmesh.toml or mDNS)."
)
@click.option(
    "--enrol",
    is_flag=True,
    help="Ask the coordinator for a certificate (automatic when this node has none).",
)
@click.option(
    "--ca",
    "ca_file",
    type=click.Path(exists=True, dir_okay=False),
    default=None,
    help="The fleet CA certificate (required to enrol: it pins the coordinator).",
)
@click.option(
    "--probe",
    "do_probe",
    is_flag=True,
    help="Print this machine's hardware probe as JSON and exit.",
)
@verbose_option
def agent(
    home: str | None,
    broker: str | None,
    name: str | None,
    labels: str,
    serve: tuple[str, ...],
    http: str,
    memory_budget_mb: int,
    idle_ttl: float,
    max_queue: int,
    heartbeat: float,
    threads: int,
    inline_run_us: float,
    discover: bool,
    interfaces: tuple[str, ...],
    coordinator: str | None,
    enrol: bool,
    ca_file: str | None,
    do_probe: bool,
    verbose: int,
) -> None:
    """Run a node agent: serve functions over MQTT and HTTPS."""
    if do_probe:
        from fnmesh.agent.probe import probe

        print_json(probe().to_dict())
        return
    from fnmesh.agent.main import AgentConfig, async_run, parse_labels

    setup_logging(verbose)
    h = get_home(home)
    cfg_file = h.load_config()
    if not name:
        raise click.UsageError("--name is required")
    configured = _configured(h.config_path)
    if not broker and "broker" not in configured:
        discover = True  # nothing says where the mesh is: look for it on the LAN
    if enrol and not ca_file and not h.ca_cert.exists():
        raise click.UsageError("--enrol needs --ca FILE (the fleet CA certificate)")
    host, _, port = http.rpartition(":")
    cfg = AgentConfig(
        home=h.root,
        name=name,
        broker=broker or ("" if discover else cfg_file.broker),
        coordinator=coordinator
        or (cfg_file.coordinator if "coordinator" in configured and not discover else ""),
        discover=discover,
        interfaces=tuple(interfaces) or None,
        enrol=enrol,
        ca_file=Path(ca_file) if ca_file else None,
        topic_root=cfg_file.topic_root,
        labels=parse_labels(labels),
        http_host=host or "127.0.0.1",
        http_port=int(port or 0),
        memory_budget_mb=memory_budget_mb,
        idle_ttl_s=idle_ttl,
        max_queue=max_queue,
        heartbeat_s=heartbeat,
        threads=threads,
        inline_run_us=inline_run_us,
        serve=tuple(Path(p) for p in serve),
    )
    asyncio.run(async_run(cfg))


def _configured(path: Path) -> set[str]:
    """The settings fnmesh.toml names (not the defaults filled in for missing ones)."""
    import tomllib

    try:
        return set(tomllib.loads(path.read_text()))
    except (OSError, tomllib.TOMLDecodeError):
        return set()
