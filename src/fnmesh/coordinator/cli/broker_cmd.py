"""``fnmesh broker config``: write Mosquitto's config and ACL file for this fleet.

The ACL comes from the fleet CA's live identities and the grants in the
coordinator's store (``--db``, else ``HOME/coordinator/coordinator.db`` when it
exists, else no grants). Run it again after issuing, revoking or granting, then
send the broker SIGHUP: Mosquitto 2.0 re-reads the ACL file and the CRL on
SIGHUP (connections already open keep their session, but lose every topic
their identity no longer has).
"""

from __future__ import annotations

import asyncio
from pathlib import Path

import click
from sqlalchemy.engine import make_url

from fnmesh.coordinator.acl import acl_for_home, check_root, write_acl
from fnmesh.coordinator.broker import settings_for_home, write_config
from fnmesh.coordinator.cli.common import (
    MeshGroup,
    console,
    get_home,
    home_option,
    json_option,
    print_json,
)
from fnmesh.coordinator.grants import Grants
from fnmesh.coordinator.store import Store, sqlite_url

ACL_NAME = "acl"


async def _read_grants(db_url: str) -> dict[str, set[str]]:
    async with await Store.open(db_url) as store:
        return await Grants(store).acl_subjects()


@click.group("broker", cls=MeshGroup)
def broker() -> None:
    """The MQTT broker's generated configuration."""


@broker.command("config")
@home_option
@click.option(
    "-o",
    "--out",
    "out_dir",
    required=True,
    type=click.Path(file_okay=False),
    help="Folder for mosquitto.conf, the ACL file and the broker's data.",
)
@click.option("--port", type=int, default=8883, show_default=True, help="The TLS listener's port.")
@click.option("--bind", default="127.0.0.1", show_default=True, help="The TLS listener's address.")
@click.option(
    "--plain-port",
    type=int,
    default=None,
    help="Also a plaintext listener on 127.0.0.1 with no ACL: local development only.",
)
@click.option("--root", "topic_root", default=None, help="Topic root (default: fnmesh.toml's).")
@click.option(
    "--db",
    "db_url",
    default=None,
    help="Coordinator store URL to read grants from (default: HOME/coordinator/coordinator.db).",
)
@click.option(
    "--broker-name", default="broker.main", show_default=True, help="The broker's identity."
)
@click.option("--site", default=None, help="Configure SITE's own broker (identity broker.SITE).")
@click.option(
    "--bridge-to", default=None, help="mqtts://HOST:PORT of the cloud broker to bridge to."
)
@json_option
def config(
    home: str | None,
    out_dir: str,
    port: int,
    bind: str,
    plain_port: int | None,
    topic_root: str | None,
    db_url: str | None,
    broker_name: str,
    site: str | None,
    bridge_to: str | None,
    as_json: bool,
) -> None:
    """Write mosquitto.conf and its ACL file (identities and grants) into OUT."""
    h = get_home(home)
    root = check_root(topic_root or h.load_config().topic_root)
    if site is not None:
        broker_name = f"broker.{site}"
    if bridge_to is not None and site is None:
        raise click.UsageError("--bridge-to configures a site broker: give --site too")
    if db_url is None:
        db = h.root / "coordinator" / "coordinator.db"
        db_url = sqlite_url(db) if db.exists() else None
    grants = asyncio.run(_read_grants(db_url)) if db_url else {}
    out = Path(out_dir).resolve()
    acl_path = write_acl(out / ACL_NAME, acl_for_home(h, grants, root))
    settings = settings_for_home(
        h,
        out,
        tls_port=port,
        plain_port=plain_port,
        bind=bind,
        broker_name=broker_name,
        acl_file=acl_path,
        bridge_to=bridge_to,
        root=root,
    )
    conf = write_config(settings, out)
    summary = {
        "config": str(conf),
        "acl": str(acl_path),
        "topic_root": root,
        "devices_with_grants": len(grants),
        "bridge_to": bridge_to,
        "grants_from": make_url(db_url).render_as_string(hide_password=True) if db_url else None,
    }
    if as_json:
        print_json(summary)
        return
    console.print(f"wrote {conf}")
    console.print(f"wrote {acl_path} (root {root}, {len(grants)} devices with grants)")
