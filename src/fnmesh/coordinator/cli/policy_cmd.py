"""``fnmesh policy``: operator policies (apply, list, delete)."""

from __future__ import annotations

from pathlib import Path

import click

from fnmesh.coordinator.cli.common import MeshGroup, console, json_option, print_json, print_table
from fnmesh.coordinator.cli.mesh_cmds import client_options, make_client


@click.group("policy", cls=MeshGroup)
def policy() -> None:
    """Placement policies: residency, tiers, latency objective, GPU, replicas, spill."""


@policy.command("apply")
@click.argument("file", type=click.Path(exists=True, dir_okay=False))
@client_options
@json_option
def apply(
    file: str, home: str | None, coordinator: str | None, as_: str | None, as_json: bool
) -> None:
    """Create or replace the policies in FILE (YAML, several documents allowed)."""
    out = make_client(home, coordinator, as_).call(
        "POST",
        "/v1/policies",
        data=Path(file).read_bytes(),
        headers={"Content-Type": "application/yaml"},
    )
    if as_json:
        print_json(out)
    else:
        for p in out:
            console.print(f"policy [bold]{p['name']}[/bold] is now version {p['version']}")


@policy.command("list")
@client_options
@json_option
def list_(home: str | None, coordinator: str | None, as_: str | None, as_json: bool) -> None:
    """Every policy with its selector and rules."""
    out = make_client(home, coordinator, as_).call("GET", "/v1/policies")
    if as_json:
        print_json(out)
        return
    rows = []
    for p in out:
        sel, r = p["selector"], p["rules"]
        rows.append(
            (
                p["name"],
                p["version"],
                f"{sel.get('namespace') or '*'}/{sel.get('name', '*')}",
                ",".join(r.get("regions") or []) or "any",
                ",".join(r.get("tiers") or []) or "any",
                r.get("latency_p95_ms") or "-",
                r.get("gpu") or "-",
                r.get("spill"),
            )
        )
    print_table(
        None, ["name", "version", "selects", "regions", "tiers", "p95 ms", "gpu", "spill"], rows
    )


@policy.command("delete")
@click.argument("name")
@client_options
@json_option
def delete(
    name: str, home: str | None, coordinator: str | None, as_: str | None, as_json: bool
) -> None:
    """Delete a policy."""
    out = make_client(home, coordinator, as_).call("DELETE", f"/v1/policies/{name}")
    if as_json:
        print_json(out)
    else:
        console.print(f"deleted policy {name}")
