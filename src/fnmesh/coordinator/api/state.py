"""What the API handlers share: built at start-up, passed in through the app."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

from aiohttp import web

from fnmesh.agent.mqtt import MqttClient
from fnmesh.certs.home import Home
from fnmesh.certs.identity import Identity
from fnmesh.certs.trust import TrustStore
from fnmesh.coordinator.audit import AuditLog
from fnmesh.coordinator.broker_control import BrokerControl
from fnmesh.coordinator.discovery import AgentBrowser
from fnmesh.coordinator.enrolment import EnrolmentQueue
from fnmesh.coordinator.grants import Grants
from fnmesh.coordinator.invoker import MqttInvoker
from fnmesh.coordinator.metrics import CoordinatorMetrics
from fnmesh.coordinator.reconciler import Reconciler
from fnmesh.coordinator.registry import Registry
from fnmesh.coordinator.revocation import CrlPublisher
from fnmesh.coordinator.store import BlobStore, Store


@dataclass
class Context:
    store: Store
    blobs: BlobStore
    registry: Registry
    reconciler: Reconciler
    mqtt: MqttClient
    invoker: MqttInvoker
    identity: Identity
    trust: Callable[[], TrustStore]
    metrics: CoordinatorMetrics
    audit: AuditLog
    grants: Grants
    broker: BrokerControl
    home: Home
    crl_publisher: CrlPublisher
    max_payload: int = 16 << 20
    invoke_timeout: float = 10.0
    #: Requests of nodes with no certificate yet (``POST /v1/enrol``).
    enrolments: EnrolmentQueue | None = None
    #: Agents seen on the LAN (mDNS), when the coordinator browses for them.
    browser: AgentBrowser | None = None


CTX: web.AppKey[Context] = web.AppKey("ctx", Context)
