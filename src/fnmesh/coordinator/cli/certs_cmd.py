"""``fnmesh certs``: create the fleet, issue and revoke identities."""

from __future__ import annotations

import click

from fnmesh.certs.ca import DEFAULT_DAYS, FleetCA, Issued, init_home
from fnmesh.certs.identity import Role
from fnmesh.coordinator.cli.common import (
    MeshGroup,
    console,
    get_home,
    home_option,
    json_option,
    print_json,
    print_table,
)


@click.group("certs", cls=MeshGroup)
def certs() -> None:
    """The fleet CA and its identities."""


@certs.command("init")
@home_option
@click.option(
    "--san", "sans", multiple=True, help="Extra DNS name or IP for the coordinator and broker."
)
@click.option(
    "--fleet", default="fnmesh", show_default=True, help="Fleet name (the CA's organisation)."
)
@json_option
def init(home: str | None, sans: tuple[str, ...], fleet: str, as_json: bool) -> None:
    """Create the fleet CA, the coordinator, the broker and a first operator."""
    h = get_home(home)
    _ca, made = init_home(h, sans=list(sans), fleet=fleet)
    if as_json:
        print_json({"home": str(h.root), **{k: v.cn for k, v in made.items()}})
        return
    console.print(f"fleet created in [bold]{h.root}[/bold]")
    print_table(None, ["identity", "certificate"], [(v.cn, v.cert_path) for v in made.values()])


@certs.command("issue")
@click.argument("role", type=click.Choice([r.value for r in Role if r != Role.COORDINATOR]))
@click.argument("name")
@home_option
@click.option("--namespace", help="Namespace a publisher may sign and push for.")
@click.option("--san", "sans", multiple=True, help="DNS name or IP (for TLS servers).")
@click.option("--days", type=int, default=DEFAULT_DAYS, show_default=True)
@json_option
def issue(
    role: str,
    name: str,
    home: str | None,
    namespace: str | None,
    sans: tuple[str, ...],
    days: int,
    as_json: bool,
) -> None:
    """Issue a certificate (and keys) for NAME in ROLE."""
    h = get_home(home)
    ident = FleetCA.load(h).issue(Role(role), name, namespace=namespace, sans=list(sans), days=days)
    d = ident.cert_path.parent
    if as_json:
        print_json(
            {
                "cn": ident.cn,
                "serial": f"{ident.info.serial:x}",
                "fingerprint": ident.info.fingerprint,
                "cert": str(ident.cert_path),
                "key": str(ident.key_path),
                "ca": str(d / "ca.pem"),
            }
        )
        return
    console.print(f"issued [bold]{ident.cn}[/bold] (serial {ident.info.serial:x}) in {d}")


@certs.command("revoke")
@click.argument("name_or_serial")
@home_option
@json_option
def revoke(name_or_serial: str, home: str | None, as_json: bool) -> None:
    """Revoke an identity by name (e.g. node.lyon-1) or by serial (hex, as `certs list` prints it)."""
    h = get_home(home)
    if not h.ca_key.exists():
        # An operator's home holds no CA key: the coordinator revokes and publishes.
        from fnmesh.coordinator.client import Client

        out = Client(h, h.load_config()).call(
            "POST", "/v1/revocations", json_body={"name_or_serial": name_or_serial}
        )
        revoked = out["revoked"]
    else:
        revoked = [
            {"cn": r.cn, "serial": f"{r.serial:x}"} for r in FleetCA.load(h).revoke(name_or_serial)
        ]
    if as_json:
        print_json(revoked)
        return
    for r in revoked:
        console.print(
            f"revoked {r['cn']} (serial {r['serial']}); the list is published to the fleet"
        )


@certs.command("list")
@home_option
@json_option
def list_(home: str | None, as_json: bool) -> None:
    """Every certificate the fleet CA has issued."""
    records = FleetCA.load(get_home(home)).issued()
    if as_json:
        print_json([_rec(r) for r in records])
        return
    print_table(
        None,
        ["cn", "role", "serial", "not after", "revoked"],
        [(r.cn, r.role, f"{r.serial:x}", r.not_after[:19], r.revoked_at or "") for r in records],
    )


def _rec(r: Issued) -> dict[str, object]:
    return {
        "cn": r.cn,
        "role": r.role,
        "serial": f"{r.serial:x}",
        "not_after": r.not_after,
        "revoked_at": r.revoked_at,
    }
