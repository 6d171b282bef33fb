"""Verbs for operators: grant, audit."""

from __future__ import annotations

import click

from fnmesh.coordinator.cli.common import (
    MeshCommand,
    MeshGroup,
    console,
    json_option,
    print_json,
    print_table,
)
from fnmesh.coordinator.cli.mesh_cmds import client_options, make_client
from fnmesh.errors import MeshError


@click.command("grant", cls=MeshCommand)
@click.argument("subject")
@click.argument("target")
@click.option(
    "--member", is_flag=True, help="Add device SUBJECT to group TARGET (group:NAME) instead."
)
@click.option("--remove", is_flag=True, help="Take the grant back.")
@client_options
@json_option
def grant(
    subject: str,
    target: str,
    member: bool,
    remove: bool,
    home: str | None,
    coordinator: str | None,
    as_: str | None,
    as_json: bool,
) -> None:
    """Let DEVICE or group:NAME invoke NS/NAME (the broker ACL follows), or add a group member."""
    c = make_client(home, coordinator, as_)
    if member:
        if not target.startswith("group:"):
            raise click.UsageError("with --member, the second argument is group:NAME")
        out = c.call("POST", f"/v1/groups/{target[6:]}/members", json_body={"device": subject})
        msg = f"{subject} is a member of {target}"
    else:
        out = c.call(
            "DELETE" if remove else "POST",
            "/v1/grants",
            json_body={"subject": subject, "function": target},
        )
        msg = f"{subject} {'may no longer' if remove else 'may'} invoke {target}"
    if as_json:
        print_json(out)
    else:
        console.print(msg)


@click.group("audit", cls=MeshGroup, invoke_without_command=True)
@client_options
@json_option
@click.option("--limit", type=int, default=100, show_default=True)
@click.pass_context
def audit(
    ctx: click.Context,
    home: str | None,
    coordinator: str | None,
    as_: str | None,
    as_json: bool,
    limit: int,
) -> None:
    """The audit log: pushes, deploys, grants, revocations, with who and when."""
    ctx.obj = (home, coordinator, as_)
    if ctx.invoked_subcommand is not None:
        return
    out = make_client(home, coordinator, as_).call("GET", f"/v1/audit?limit={limit}")
    if as_json:
        print_json(out)
        return
    import datetime as dt

    print_table(
        None,
        ["seq", "when (UTC)", "who", "action", "detail"],
        [
            (
                e["seq"],
                dt.datetime.fromtimestamp(e["ts"], dt.UTC).strftime("%Y-%m-%d %H:%M:%S"),
                e["who"],
                e["action"],
                str(e["detail"])[:80],
            )
            for e in out
        ],
    )


@audit.command("verify", cls=MeshCommand)
@json_option
@click.pass_context
def audit_verify(ctx: click.Context, as_json: bool) -> None:
    """Check the hash chain; exit 1 naming the first entry that was edited or removed."""
    home, coordinator, as_ = ctx.obj
    out = make_client(home, coordinator, as_).call("GET", "/v1/audit/verify")
    if as_json:
        print_json(out)
    if not out["ok"]:
        raise MeshError(f"audit log fails at entry {out['first_bad_seq']}: {out['reason']}")
    if not as_json:
        console.print(f"audit log intact ({out['checked']} entries)")


@click.command("token", cls=MeshCommand)
@click.option(
    "--ttl", "ttl", default=900.0, show_default=True, type=float, help="Lifetime in seconds."
)
@client_options
@json_option
def token(
    ttl: float, home: str | None, coordinator: str | None, as_: str | None, as_json: bool
) -> None:
    """Mint a short-lived API token for your identity (send it as `Authorization: Bearer ...`)."""
    out = make_client(home, coordinator, as_).call("POST", "/v1/tokens", json_body={"ttl_s": ttl})
    if as_json:
        print_json(out)
    else:
        click.echo(out["token"])
