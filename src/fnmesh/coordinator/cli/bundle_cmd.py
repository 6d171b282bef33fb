"""``fnmesh bundle``: build, inspect, verify and re-wrap function bundles."""

from __future__ import annotations

from pathlib import Path

import click

from fnmesh.certs import lookup
from fnmesh.certs.home import write_atomic
from fnmesh.certs.identity import Role
from fnmesh.certs.trust import TrustStore
from fnmesh.coordinator.cli.common import (
    MeshGroup,
    console,
    get_home,
    home_option,
    json_option,
    print_json,
    print_table,
)
from fnmesh.functions import bundle as fnb
from fnmesh.functions.errors import BundleError
from fnmesh.functions.manifest import GpuRequirement


@click.group("bundle", cls=MeshGroup)
def bundle() -> None:
    """Signed, encrypted function bundles (.fnb)."""


@bundle.command("build")
@click.argument("model", type=click.Path(exists=True, dir_okay=False))
@click.option("--name", required=True, help="Function id, NS/NAME.")
@click.option("--version", "version", required=True, help="Semantic version X.Y.Z.")
@click.option("--publisher", required=True, help="Publisher identity to sign with.")
@click.option("--gpu", type=click.Choice([g.value for g in GpuRequirement]), default="none")
@click.option("--region", "regions", multiple=True, help="Region the data may go to (repeatable).")
@click.option("--max-batch", type=int, default=None)
@click.option("--timeout-ms", type=int, default=None)
@click.option("--max-payload", type=int, default=None, help="Largest request, bytes.")
@click.option("--recipient", "recipients", multiple=True, help="Node to wrap the key for too.")
@click.option("--valid-days", type=int, default=365, show_default=True)
@click.option("-o", "--output", required=True, type=click.Path(dir_okay=False))
@home_option
@json_option
def build(
    model: str,
    name: str,
    version: str,
    publisher: str,
    gpu: str,
    regions: tuple[str, ...],
    max_batch: int | None,
    timeout_ms: int | None,
    max_payload: int | None,
    recipients: tuple[str, ...],
    valid_days: int,
    output: str,
    home: str | None,
    as_json: bool,
) -> None:
    """Sign and encrypt MODEL.onnx into a bundle."""
    h = get_home(home)
    trust = TrustStore.from_home(h)
    keys = dict([lookup.recipient(h, trust, Role.COORDINATOR, "main")])
    for r in recipients:
        cn, pub = lookup.recipient(h, trust, Role.NODE, r)
        keys[cn] = pub
    with console.status(f"building {name}@{version}", spinner="dots"):
        b = fnb.build(
            Path(model).read_bytes(),
            name=name,
            version=version,
            publisher=lookup.identity(h, Role.PUBLISHER, publisher),
            recipients=keys,
            gpu=GpuRequirement(gpu),
            regions=regions,
            max_batch=max_batch,
            timeout_ms=timeout_ms,
            max_payload=max_payload,
            valid_days=valid_days,
        )
        data = b.to_bytes()
        write_atomic(Path(output), data)
    if as_json:
        print_json(
            {"bundle": output, "digest": b.digest, "size": len(data), "recipients": sorted(keys)}
        )
    else:
        console.print(
            f"built [bold]{name}@{version}[/bold] -> {output} ({len(data):,} bytes, "
            f"digest {b.digest[:16]}..., keys for {', '.join(sorted(keys))})"
        )


@bundle.command("inspect")
@click.argument("file", type=click.Path(dir_okay=False))
@json_option
def inspect(file: str, as_json: bool) -> None:
    """Print a bundle's manifest (not verified: see `bundle verify`)."""
    b = fnb.Bundle.read(file)
    if as_json:
        print_json(fnb.inspect(b))
        return
    m = b.manifest
    print_table(
        f"{m.name}@{m.version}",
        ["field", "value"],
        [
            ("runtime", m.runtime.value),
            ("publisher", m.publisher),
            ("inputs", ", ".join(f"{s.name}: {s.describe()}" for s in m.inputs)),
            ("outputs", ", ".join(f"{s.name}: {s.describe()}" for s in m.outputs)),
            ("gpu", m.requirements.gpu.value),
            ("regions", ", ".join(m.data.regions) or "any"),
            ("max batch", m.limits.max_batch),
            ("max payload", m.limits.max_payload),
            ("valid", f"{m.not_before.isoformat()} .. {m.not_after.isoformat()}"),
            ("model digest", f"{m.digests.algorithm}:{m.digests.plaintext}"),
            ("size", f"{m.digests.plaintext_size:,} bytes"),
            ("recipients", ", ".join(sorted(b.wrapped))),
        ],
    )


@bundle.command("verify")
@click.argument("file", type=click.Path(dir_okay=False))
@home_option
@click.option(
    "--as", "as_", default=None, help="Also decrypt as this identity (CN) to check digests."
)
@json_option
def verify(file: str, home: str | None, as_: str | None, as_json: bool) -> None:
    """Check chain, dates, revocation, namespace and digests; exit 0 or 1 with a reason."""
    h = get_home(home)
    trust = TrustStore.from_home(h)
    b = fnb.Bundle.read(file)
    publisher = b.verify(trust).publisher
    decrypted = False
    if as_:
        ident = lookup.identity_by_cn(h, as_)
        if ident.enc_key is None:
            raise BundleError(f"{as_} has no encryption key")
        b.open(trust, ident.cn, ident.enc_key)
        decrypted = True
    if as_json:
        print_json(
            {
                "ok": True,
                "name": b.manifest.name,
                "version": b.manifest.version,
                "publisher": publisher.cn,
                "decrypted": decrypted,
            }
        )
    else:
        extra = " and decrypts" if decrypted else ""
        console.print(f"ok: {b.manifest.name}@{b.manifest.version} signed by {publisher.cn}{extra}")


@bundle.command("rewrap")
@click.argument("file", type=click.Path(dir_okay=False))
@click.option("--for", "for_", multiple=True, required=True, help="Node to wrap the key for.")
@click.option("-o", "--output", required=True, type=click.Path(dir_okay=False))
@home_option
def rewrap(file: str, for_: tuple[str, ...], output: str, home: str | None) -> None:
    """Wrap the data key for more nodes (needs the coordinator's key)."""
    h = get_home(home)
    trust = TrustStore.from_home(h)
    b = fnb.Bundle.read(file)
    b.verify(trust)
    coord = lookup.identity(h, Role.COORDINATOR, "main")
    assert coord.enc_key is not None
    dk = b.data_key(coord.cn, coord.enc_key)
    nodes = dict(lookup.recipient(h, trust, Role.NODE, n) for n in for_)
    write_atomic(Path(output), b.rewrap(dk, nodes).to_bytes())
    console.print(
        f"wrapped the key of {b.manifest.name}@{b.manifest.version} for {', '.join(nodes)}"
    )
