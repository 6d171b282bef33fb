"""Shared fixtures: a fleet in a temporary home, and real Mosquitto brokers on free ports."""

from __future__ import annotations

import os
import threading
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest

from fnmesh.certs.ca import FleetCA, init_home
from fnmesh.certs.home import Home
from fnmesh.certs.identity import Identity, Role
from fnmesh.certs.trust import TrustStore
from fnmesh.coordinator.broker import Mosquitto, free_port, settings_for_home, write_config

#: Multiplies the size of long-running tests; the suite keeps it at 1.
SCALE = float(os.environ.get("FNMESH_TEST_SCALE", "1"))


@dataclass
class Fleet:
    """A fleet in a temporary home: CA, coordinator, broker, operator, a publisher, two nodes."""

    home: Home
    ca: FleetCA
    coordinator: Identity
    broker: Identity
    operator: Identity
    publisher: Identity
    nodes: dict[str, Identity]
    devices: dict[str, Identity]

    @property
    def trust(self) -> TrustStore:
        return TrustStore.from_home(self.home)

    def node(self, name: str) -> Identity:
        if name not in self.nodes:
            self.nodes[name] = self.ca.issue(Role.NODE, name)
        return self.nodes[name]

    def device(self, name: str) -> Identity:
        if name not in self.devices:
            self.devices[name] = self.ca.issue(Role.DEVICE, name)
        return self.devices[name]


def make_fleet(root: Path) -> Fleet:
    home = Home(root)
    ca, made = init_home(home)
    fleet = Fleet(
        home=home,
        ca=ca,
        coordinator=made["coordinator"],
        broker=made["broker"],
        operator=made["operator"],
        publisher=ca.issue(Role.PUBLISHER, "examples", namespace="examples"),
        nodes={},
        devices={},
    )
    fleet.node("lyon-1")
    return fleet


@pytest.fixture
def fleet(tmp_path: Path) -> Fleet:
    return make_fleet(tmp_path / "home")


@dataclass
class Broker:
    """A running Mosquitto: a mutual-TLS listener and a loopback plaintext one."""

    proc: Mosquitto
    tls_port: int
    plain_port: int
    dir: Path

    @property
    def tls_url(self) -> str:
        return f"mqtts://127.0.0.1:{self.tls_port}"

    @property
    def plain_url(self) -> str:
        return f"mqtt://127.0.0.1:{self.plain_port}"

    def restart(self) -> None:
        self.proc.stop()
        self.proc.start()


def start_broker(fleet: Fleet, where: Path) -> Broker:
    where.mkdir(parents=True, exist_ok=True)
    tls_port, plain_port = free_port(), free_port()
    settings = settings_for_home(fleet.home, where, tls_port=tls_port, plain_port=plain_port)
    conf = write_config(settings, where)
    proc = Mosquitto(conf, tls_port).start()
    return Broker(proc, tls_port, plain_port, where)


@pytest.fixture
def broker(fleet: Fleet, tmp_path: Path) -> Iterator[Broker]:
    """A fresh broker per test, so retained messages never leak between tests."""
    b = start_broker(fleet, tmp_path / "broker")
    try:
        yield b
    finally:
        b.proc.stop()


@pytest.fixture(autouse=True)
def _no_leaked_threads() -> Iterator[None]:
    """Fail a test that leaves a non-daemon thread of its own running."""
    before = set(threading.enumerate())
    yield
    leaked = [
        t
        for t in threading.enumerate()
        if t not in before
        and t.is_alive()
        and not t.daemon
        # Process-wide pools, started once and kept: the tree digest's, the sealed copies'.
        and not t.name.startswith(("fnmesh-digest", "fnmesh-seal"))
    ]
    for t in leaked:
        t.join(timeout=5)
    still = [t.name for t in leaked if t.is_alive()]
    assert not still, f"threads outlived the test: {still}"
