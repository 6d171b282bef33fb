"""The ``fnmesh`` command: one CLI, verbs per job."""

from __future__ import annotations

import click

from fnmesh import __version__
from fnmesh.coordinator.cli.agent_cmd import agent
from fnmesh.coordinator.cli.bench_cmd import bench
from fnmesh.coordinator.cli.broker_cmd import broker
from fnmesh.coordinator.cli.bundle_cmd import bundle
from fnmesh.coordinator.cli.certs_cmd import certs
from fnmesh.coordinator.cli.common import MeshGroup
from fnmesh.coordinator.cli.mesh_cmds import (
    coordinator,
    deploy,
    functions,
    invoke,
    nodes,
    placements,
    push,
    rollback,
    undeploy,
)
from fnmesh.coordinator.cli.policy_cmd import policy
from fnmesh.coordinator.cli.router_cmd import router
from fnmesh.coordinator.cli.security_cmds import audit, grant, token
from fnmesh.coordinator.cli.up_cmd import up


@click.group(cls=MeshGroup, context_settings={"help_option_names": ["-h", "--help"]})
@click.version_option(__version__, prog_name="fnmesh")
def cli() -> None:
    """fnmesh: serverless AI functions across edge devices and cloud GPU nodes."""


cli.add_command(certs)
cli.add_command(bundle)
cli.add_command(bench)
cli.add_command(broker)
cli.add_command(agent)
cli.add_command(policy)
for _cmd in (
    up,
    coordinator,
    router,
    grant,
    audit,
    token,
    rollback,
    push,
    deploy,
    undeploy,
    functions,
    nodes,
    placements,
    invoke,
):
    cli.add_command(_cmd)


def main() -> None:
    cli(prog_name="fnmesh")


if __name__ == "__main__":
    main()
