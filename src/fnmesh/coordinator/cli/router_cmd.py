"""``fnmesh router``: run a router (picks a node for each request and forwards it)."""

from __future__ import annotations

import asyncio

import click

from fnmesh.coordinator.cli.common import get_home, home_option, setup_logging, verbose_option


def parse_host_port(text: str) -> tuple[str, int]:
    """``HOST:PORT`` (``[::1]:9100`` for IPv6) -> ``(host, port)``."""
    host, sep, port = text.rpartition(":")
    host = host.strip("[]")
    if not sep or not host or not port.isdigit() or not 0 <= int(port) <= 65535:
        raise click.BadParameter(f"{text!r} is not HOST:PORT", param_hint="--metrics")
    return host, int(port)


def default_name(identity: str) -> str:
    """The home's default identity's name if it is a router, else ``main``."""
    prefix = "router."
    return identity[len(prefix) :] if identity.startswith(prefix) else "main"


@click.command("router")
@home_option
@click.option("--broker", help="mqtt://HOST:PORT or mqtts://HOST:PORT (default: fnmesh.toml).")
@click.option(
    "--name",
    help="Router name: its certificate is router.NAME in the home "
    "(default: the home's identity if it is a router, else main).",
)
@click.option(
    "--metrics",
    "metrics",
    metavar="HOST:PORT",
    help="Serve Prometheus metrics at http://HOST:PORT/metrics.",
)
@click.option(
    "--heartbeat",
    type=float,
    default=2.0,
    show_default=True,
    help="Nodes' heartbeat period (s), for nodes whose status does not state it; "
    "a node silent for 3 periods gets no requests.",
)
@click.option(
    "--site",
    default=None,
    help="This router serves SITE behind a site broker: it reaches cloud replicas only "
    "through their spill inbox, the node topic the bridge carries.",
)
@verbose_option
def router(
    home: str | None,
    broker: str | None,
    name: str | None,
    metrics: str | None,
    heartbeat: float,
    site: str | None,
    verbose: int,
) -> None:
    """Run a router: take requests from the shared subscription, forward each to a replica."""
    from fnmesh.coordinator.router import RouterConfig, async_run

    if heartbeat <= 0:
        raise click.BadParameter("must be positive", param_hint="--heartbeat")
    setup_logging(verbose)
    h = get_home(home)
    cfg_file = h.load_config()
    cfg = RouterConfig(
        home=h.root,
        name=name or default_name(cfg_file.identity),
        broker=broker or cfg_file.broker,
        topic_root=cfg_file.topic_root,
        heartbeat_s=heartbeat,
        metrics=parse_host_port(metrics) if metrics else None,
        site=site,
    )
    asyncio.run(async_run(cfg))
