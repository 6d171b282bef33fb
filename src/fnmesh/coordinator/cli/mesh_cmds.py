"""Verbs that talk to the coordinator: push, deploy, undeploy, functions, nodes, placements, invoke."""

from __future__ import annotations

import asyncio
import json
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any, TypeVar

import click
from rich.progress import BarColumn, DownloadColumn, Progress, TransferSpeedColumn

from fnmesh.coordinator.cli.common import (
    MeshCommand,
    MeshGroup,
    console,
    get_home,
    home_option,
    json_option,
    print_json,
    print_table,
    setup_logging,
    verbose_option,
)
from fnmesh.coordinator.client import Client
from fnmesh.errors import MeshError

F = TypeVar("F", bound=Callable[..., Any])


def client_options(f: F) -> F:
    f = click.option(
        "--coordinator", "coordinator", help="Coordinator URL (default: fnmesh.toml)."
    )(f)
    f = click.option("--as", "as_", help="Identity (CN) to act as (default: fnmesh.toml).")(f)
    return home_option(f)


def make_client(home: str | None, coordinator: str | None, as_: str | None) -> Client:
    h = get_home(home)
    return Client(h, h.load_config().override(coordinator=coordinator, identity=as_))


@click.command("coordinator", cls=MeshCommand)
@home_option
@click.option(
    "--listen", default=None, help="HOST:PORT (default: from fnmesh.toml's coordinator URL)."
)
@click.option("--broker", default=None, help="Broker URL (default: fnmesh.toml).")
@click.option("--db", "db", default=None, help="SQLAlchemy URL (default: SQLite in the home).")
@click.option(
    "--offline-timeout",
    type=float,
    default=300.0,
    show_default=True,
    help="Seconds an offline node keeps its assignment.",
)
@click.option(
    "--heartbeat",
    type=float,
    default=2.0,
    show_default=True,
    help="Expected node heartbeat period (s).",
)
@click.option(
    "--acl-file",
    type=click.Path(dir_okay=False),
    default=None,
    help="Broker ACL file to keep in step with grants and revocations.",
)
@click.option(
    "--broker-pid-file",
    type=click.Path(dir_okay=False),
    default=None,
    help="File with the PID of the Mosquitto to reload after ACL or CRL changes.",
)
@click.option(
    "--discover-interfaces",
    "discover_interfaces",
    multiple=True,
    help="Advertise over mDNS and list LAN agents on this interface or address (repeatable; "
    "'lo' or 127.0.0.1 for loopback only). Default: no mDNS.",
)
@click.option(
    "--advertise-broker",
    default=None,
    help="Broker URL told to agents over mDNS (default: --broker).",
)
@click.option(
    "--max-pending",
    type=int,
    default=32,
    show_default=True,
    help="Enrolment requests kept pending at once (0 turns POST /v1/enrol off).",
)
@verbose_option
def coordinator(
    home: str | None,
    listen: str | None,
    broker: str | None,
    db: str | None,
    offline_timeout: float,
    heartbeat: float,
    acl_file: str | None,
    broker_pid_file: str | None,
    discover_interfaces: tuple[str, ...],
    advertise_broker: str | None,
    max_pending: int,
    verbose: int,
) -> None:
    """Run the coordinator: REST API, registry, reconciler."""
    from urllib.parse import urlsplit

    from fnmesh.coordinator.app import CoordinatorConfig, async_run

    setup_logging(verbose)
    h = get_home(home)
    cfg_file = h.load_config()
    url = urlsplit(cfg_file.coordinator)
    host, port = url.hostname or "127.0.0.1", url.port or 8443
    if listen:
        lh, _, lp = listen.rpartition(":")
        host, port = lh or host, int(lp)
    cfg = CoordinatorConfig(
        home=h.root,
        broker=broker or cfg_file.broker,
        host=host,
        port=port,
        topic_root=cfg_file.topic_root,
        db_url=db,
        offline_timeout_s=offline_timeout,
        heartbeat_s=heartbeat,
        acl_path=Path(acl_file) if acl_file else None,
        broker_pid_file=Path(broker_pid_file) if broker_pid_file else None,
        discover_interfaces=tuple(discover_interfaces) or None,
        advertise_broker=advertise_broker,
        max_pending_enrolments=max_pending,
    )
    asyncio.run(async_run(cfg))


@click.command("push", cls=MeshCommand)
@click.argument("bundle", type=click.Path(exists=True, dir_okay=False))
@client_options
@json_option
def push(
    bundle: str, home: str | None, coordinator: str | None, as_: str | None, as_json: bool
) -> None:
    """Push a bundle to the coordinator (verified there on arrival)."""
    c = make_client(home, coordinator, as_)
    data = Path(bundle).read_bytes()
    if len(data) > (8 << 20) and not as_json:
        with Progress(
            "[progress.description]{task.description}",
            BarColumn(),
            DownloadColumn(),
            TransferSpeedColumn(),
            console=console,
        ) as prog:
            task = prog.add_task(f"pushing {Path(bundle).name}", total=len(data))
            out = c.push(data, progress=lambda done, total: prog.update(task, completed=done))
    else:
        out = c.push(data)
    if as_json:
        print_json(out)
    else:
        console.print(
            f"pushed [bold]{out['function']}@{out['version']}[/bold] (digest {out['digest'][:16]}...)"
        )


@click.command("deploy", cls=MeshCommand)
@click.argument("target")
@click.option("--min", "min_", type=int, default=1, show_default=True, help="Minimum replicas.")
@click.option("--max", "max_", type=int, default=2, show_default=True, help="Maximum replicas.")
@click.option("--where", multiple=True, help="Label constraint key=value (repeatable).")
@click.option("--allow-spill", is_flag=True, help="Let saturated edge nodes spill to the cloud.")
@click.option(
    "--wait/--no-wait", default=True, show_default=True, help="Wait until replicas are ready."
)
@click.option("--timeout", type=float, default=60.0, show_default=True)
@client_options
@json_option
def deploy(
    target: str,
    min_: int,
    max_: int,
    where: tuple[str, ...],
    allow_spill: bool,
    wait: bool,
    timeout: float,
    home: str | None,
    coordinator: str | None,
    as_: str | None,
    as_json: bool,
) -> None:
    """Deploy NS/NAME@VERSION."""
    fid, sep, version = target.partition("@")
    if not sep or not version:
        raise click.UsageError("deploy takes NS/NAME@VERSION")
    labels = {}
    for w in where:
        k, eq, v = w.partition("=")
        if not eq:
            raise click.UsageError(f"--where {w!r} must be key=value")
        labels[k] = v
    c = make_client(home, coordinator, as_)
    out = c.call(
        "POST",
        "/v1/deployments",
        json_body={
            "function": fid,
            "version": version,
            "min": min_,
            "max": max_,
            "where": labels,
            "allow_spill": allow_spill,
        },
    )
    ready: list[str] = []
    if wait:
        ready = _wait_ready(c, fid, version, max(1, min_), timeout)
    if as_json:
        print_json({**out, "ready": ready})
    else:
        where_txt = f" where {', '.join(where)}" if where else ""
        console.print(
            f"deployed [bold]{fid}@{version}[/bold] (min {min_}, max {max_}{where_txt})"
            + (f"; ready on {', '.join(ready)}" if ready else "")
        )


def _wait_ready(c: Client, fid: str, version: str, want: int, timeout: float) -> list[str]:
    end = time.monotonic() + timeout
    while True:
        nodes = c.call("GET", "/v1/nodes")
        ready = [
            n["name"] for n in nodes if n["state"] == "ready" and n["functions"].get(fid) == version
        ]
        if len(ready) >= want:
            return ready
        if time.monotonic() > end:
            raise MeshError(
                f"{fid}@{version} is ready on {len(ready)} node(s) after {timeout:.0f} s, wanted {want}"
            )
        time.sleep(0.2)


@click.command("undeploy", cls=MeshCommand)
@click.argument("function")
@client_options
@json_option
def undeploy(
    function: str, home: str | None, coordinator: str | None, as_: str | None, as_json: bool
) -> None:
    """Stop serving NS/NAME everywhere."""
    out = make_client(home, coordinator, as_).call("DELETE", f"/v1/deployments/{function}")
    if as_json:
        print_json(out)
    else:
        console.print(f"undeployed [bold]{function}[/bold]")


@click.command("functions", cls=MeshCommand)
@client_options
@json_option
def functions(home: str | None, coordinator: str | None, as_: str | None, as_json: bool) -> None:
    """Functions, their versions, and what is deployed."""
    out = make_client(home, coordinator, as_).call("GET", "/v1/functions")
    if as_json:
        print_json(out)
        return
    print_table(
        None,
        ["function", "versions", "latest", "deployed"],
        [(f["function"], ", ".join(f["versions"]), f["latest"], f["deployed"] or "-") for f in out],
    )


@click.group("nodes", cls=MeshGroup, invoke_without_command=True)
@client_options
@json_option
@click.option("--watch", is_flag=True, help="Refresh every second until Ctrl-C.")
@click.pass_context
def nodes(
    ctx: click.Context,
    home: str | None,
    coordinator: str | None,
    as_: str | None,
    as_json: bool,
    watch: bool,
) -> None:
    """Nodes: state, labels, hardware, functions, load, RTT (subcommands: drain, approve).

    Lists joined nodes, nodes seen on the LAN (mDNS) that have not joined, nodes waiting for
    approval (``pending``, with their key fingerprint) and LAN records flagged ``untrusted``.
    """
    ctx.obj = (home, coordinator, as_)
    if ctx.invoked_subcommand is not None:
        return
    c = make_client(home, coordinator, as_)

    def show() -> None:
        out = c.call("GET", "/v1/nodes")
        if as_json:
            print_json(out)
            return
        rows = []
        for n in out:
            load = sum(
                int(v.get("in_flight", 0)) + int(v.get("queued", 0)) for v in n["load"].values()
            )
            hw = n["hardware"]
            rtt = n.get("rtt_ms")
            rtt_c = n.get("rtt_coordinator_ms")
            hardware = (
                f"{hw.get('cores', '?')} cores, {len(hw.get('gpus') or [])} gpu"
                if "cores" in hw
                else hw.get("summary") or "-"
            )
            key = n.get("key_fingerprint") or n.get("fingerprint") or ""
            rows.append(
                (
                    n["name"],
                    n["state"],
                    ",".join(f"{k}={v}" for k, v in sorted(n["labels"].items())),
                    hardware,
                    ", ".join(f"{k}@{v}" for k, v in sorted(n["functions"].items())) or "-",
                    load,
                    n["last_heartbeat_s"] if n["last_heartbeat_s"] is not None else "-",
                    f"{rtt:.2f}" if rtt is not None else "-",
                    f"{rtt_c:.2f}" if rtt_c is not None else "-",
                    key[:16] or "-",
                )
            )
        print_table(
            None,
            [
                "node",
                "state",
                "labels",
                "hardware",
                "functions",
                "load",
                "heartbeat age (s)",
                "RTT broker (ms)",
                "RTT coordinator (ms)",
                "key",
            ],
            rows,
        )

    if not watch:
        show()
        return
    try:
        while True:
            console.clear()
            show()
            time.sleep(1)
    except KeyboardInterrupt:
        pass


@click.command("placements", cls=MeshCommand)
@client_options
@json_option
@click.option("--explain", "explain", metavar="NS/NAME", help="Why each node holds NS/NAME or not.")
def placements(
    home: str | None, coordinator: str | None, as_: str | None, as_json: bool, explain: str | None
) -> None:
    """Which node holds which function version; --explain shows the reasons node by node."""
    c = make_client(home, coordinator, as_)
    if explain:
        out = c.call("GET", f"/v1/placements/explain/{explain}")
        if as_json:
            print_json(out)
            return
        rows = []
        for n in out["nodes"]:
            why = "; ".join(
                f"{s['plugin']}: {s['reason']}" for s in n["statuses"] if s["code"] != "fits"
            )
            scores = ", ".join(f"{k} {v:.0f}" for k, v in n["scores"].items())
            rows.append(
                (
                    n["node"],
                    n["verdict"],
                    n["rank"] if n["rank"] is not None else "",
                    f"{n['total']:.1f}" if n["total"] is not None else "",
                    why or scores,
                )
            )
        print_table(
            f"{out['function']}: target {out['target']}"
            + (f" ({out['reason']})" if out["reason"] else ""),
            ["node", "verdict", "rank", "total", "why / scores"],
            rows,
        )
        return
    out = c.call("GET", "/v1/placements")
    if as_json:
        print_json(out)
        return
    print_table(
        None,
        ["function", "version", "node"],
        [(p["function"], p["version"], p["node"]) for p in out],
    )


@click.command("invoke", cls=MeshCommand)
@click.argument("function")
@click.option(
    "--input",
    "input_",
    required=True,
    help='Inputs as JSON ({"name": tensor} or a full request), or @FILE.',
)
@client_options
@json_option
def invoke(
    function: str,
    input_: str,
    home: str | None,
    coordinator: str | None,
    as_: str | None,
    as_json: bool,
) -> None:
    """Invoke NS/NAME over HTTP through the coordinator and print the outputs."""
    text = Path(input_[1:]).read_text() if input_.startswith("@") else input_
    try:
        obj = json.loads(text)
    except ValueError as e:
        raise click.UsageError(f"--input is not JSON: {e}") from e
    if not isinstance(obj, dict):
        raise click.UsageError("--input must be a JSON object")
    if "inputs" not in obj:
        obj = {"inputs": obj}
    c = make_client(home, coordinator, as_)
    status, body, _ct = c.call(
        "POST",
        f"/v1/functions/{function}/invoke",
        data=json.dumps(obj).encode(),
        headers={"Content-Type": "application/json"},
        raw=True,
    )
    reply = json.loads(body)
    if as_json:
        print_json(reply)
    elif status != 200:
        err = reply.get("error", {})
        raise MeshError(f"{err.get('code', status)}: {err.get('message', '')}")
    else:
        rows = []
        for name, t in reply["outputs"].items():
            data = t["data"]
            rows.append((name, f"{t['dtype']}{t['shape']}", json.dumps(data)[:200]))
        print_table(
            f"{function}@{reply['version']} on {reply['node']}", ["output", "type", "value"], rows
        )
    if status != 200:
        raise SystemExit(1)


@click.command("rollback", cls=MeshCommand)
@click.argument("function")
@click.option("--to", "to", default=None, help="Version to go back to (default: the previous one).")
@client_options
@json_option
def rollback(
    function: str,
    to: str | None,
    home: str | None,
    coordinator: str | None,
    as_: str | None,
    as_json: bool,
) -> None:
    """Go back to the previous version of NS/NAME, with an order signed by your operator key."""
    from fnmesh.certs.identity import load_identity
    from fnmesh.functions.rollback import sign_order

    c = make_client(home, coordinator, as_)
    current = next((d for d in c.call("GET", "/v1/deployments") if d["function"] == function), None)
    if current is None:
        raise MeshError(f"{function} is not deployed")
    target = to or current.get("previous_version")
    if not target:
        raise MeshError(f"{function} has no previous version to go back to (give --to)")
    operator = load_identity(c.home.identity_dir(c.config.identity))
    order = sign_order(operator, function, target, current["version"])
    out = c.call(
        "POST",
        "/v1/deployments",
        json_body={
            "function": function,
            "version": target,
            "min": current["min_replicas"],
            "max": current["max_replicas"],
            "where": current["where"],
            "allow_spill": current["allow_spill"],
            "rollback": order,
        },
    )
    if as_json:
        print_json(out)
    else:
        console.print(f"rolled [bold]{function}[/bold] back from {current['version']} to {target}")


@nodes.command("drain", cls=MeshCommand)
@click.argument("node")
@click.option("--undo", is_flag=True, help="Take the node back into service.")
@json_option
@click.pass_context
def drain(ctx: click.Context, node: str, undo: bool, as_json: bool) -> None:
    """Move NODE's work elsewhere and give it no more (operator)."""
    home, coordinator, as_ = ctx.obj
    out = make_client(home, coordinator, as_).call(
        "POST", f"/v1/nodes/{node}/drain", json_body={"draining": not undo}
    )
    if as_json:
        print_json(out)
    else:
        console.print(f"{node} is {'draining' if not undo else 'back in service'}")


@nodes.command("approve", cls=MeshCommand)
@click.argument("node")
@json_option
@click.pass_context
def approve(ctx: click.Context, node: str, as_json: bool) -> None:
    """Sign NODE's pending enrolment with the fleet CA so it joins (operator).

    Compare the key fingerprint ``fnmesh nodes`` shows with the one the new machine logged.
    """
    home, coordinator, as_ = ctx.obj
    out = make_client(home, coordinator, as_).call("POST", f"/v1/enrolments/{node}/approve")
    if as_json:
        print_json(out)
    else:
        console.print(f"{node} approved: certificate {out.get('fingerprint', '?')[:16]}…")
