"""The coordinator's tables (SQLAlchemy Core), the same on SQLite and PostgreSQL.

Timestamps are float epoch seconds; free-form maps are JSON columns.
"""

from __future__ import annotations

from sqlalchemy import (
    JSON,
    BigInteger,
    Boolean,
    CheckConstraint,
    Column,
    Double,
    ForeignKey,
    ForeignKeyConstraint,
    Index,
    Integer,
    MetaData,
    String,
    Table,
)

#: Bumped whenever a table changes shape; the one row of ``schema_version`` holds it.
SCHEMA_VERSION = 1

#: Counter names in ``counters``.
DEPLOYMENT_COUNTER = "deployments"
ASSIGNMENT_COUNTER = "assignments"
COUNTERS = (DEPLOYMENT_COUNTER, ASSIGNMENT_COUNTER)

metadata = MetaData()

schema_version = Table(
    "schema_version",
    metadata,
    Column("id", Integer, primary_key=True, autoincrement=False),
    Column("version", Integer, nullable=False),
    CheckConstraint("id = 1", name="schema_version_one_row"),
)

counters = Table(
    "counters",
    metadata,
    Column("name", String(64), primary_key=True),
    Column("value", BigInteger, nullable=False),
)

functions = Table(
    "functions",
    metadata,
    Column("function", String(255), primary_key=True),
    Column("created_at", Double, nullable=False),
)

versions = Table(
    "versions",
    metadata,
    Column(
        "function",
        String(255),
        ForeignKey("functions.function", ondelete="RESTRICT"),
        primary_key=True,
    ),
    Column("version", String(128), primary_key=True),
    Column("digest", String(64), nullable=False),
    Column("manifest", JSON, nullable=False),
    Column("publisher", String(255), nullable=False),
    Column("size", BigInteger, nullable=False),
    Column("pushed_by", String(255), nullable=False),
    Column("pushed_at", Double, nullable=False),
    Index("ix_versions_digest", "digest"),
)

deployments = Table(
    "deployments",
    metadata,
    Column("function", String(255), primary_key=True),
    Column("version", String(128), nullable=False),
    Column("min_replicas", Integer, nullable=False),
    Column("max_replicas", Integer, nullable=False),
    Column("where", JSON, nullable=False),
    Column("allow_spill", Boolean, nullable=False),
    Column("previous_version", String(128), nullable=True),
    Column("generation", BigInteger, nullable=False),
    Column("updated_at", Double, nullable=False),
    #: The operator-signed rollback order that allowed an older version, if any.
    Column("rollback", JSON, nullable=True),
    ForeignKeyConstraint(
        ["function", "version"], ["versions.function", "versions.version"], ondelete="RESTRICT"
    ),
)

nodes = Table(
    "nodes",
    metadata,
    Column("name", String(255), primary_key=True),
    Column("cn", String(255), nullable=False),
    Column("labels", JSON, nullable=False),
    Column("hardware", JSON, nullable=False),
    Column("state", String(32), nullable=False),
    Column("status", JSON, nullable=False),
    Column("fingerprint", String(128), nullable=False),
    Column("last_seen", Double, nullable=False),
    Column("draining", Boolean, nullable=False, default=False),
)

placements = Table(
    "placements",
    metadata,
    Column("function", String(255), primary_key=True),
    Column("node", String(255), primary_key=True),
    Column("version", String(128), nullable=False),
    Column("since", Double, nullable=False),
    ForeignKeyConstraint(
        ["function", "version"], ["versions.function", "versions.version"], ondelete="RESTRICT"
    ),
    Index("ix_placements_node", "node"),
)

assignments = Table(
    "assignments",
    metadata,
    Column("node", String(255), primary_key=True),
    Column("generation", BigInteger, nullable=False),
    Column("body_hash", String(128), nullable=False),
    Column("recorded_at", Double, nullable=False),
)


# -- who may invoke what (the broker's ACL is generated from these) ------------------

policies = Table(
    "policies",
    metadata,
    Column("name", String(255), primary_key=True),
    Column("version", BigInteger, nullable=False),
    Column("body", JSON, nullable=False),
    Column("updated_at", Double, nullable=False),
)

#: Policy versions only go up, across deletes too.
policy_versions = Table(
    "policy_versions",
    metadata,
    Column("name", String(255), primary_key=True),
    Column("version", BigInteger, nullable=False),
)

grants = Table(
    "grants",
    metadata,
    #: A device CN (``device.meter-17``) or a group (``group:NAME``).
    Column("subject", String(255), primary_key=True),
    Column("function", String(255), primary_key=True),
    Column("granted_at", Double, nullable=False),
    Index("ix_grants_function", "function"),
)

members = Table(
    "members",
    metadata,
    Column("group", String(255), primary_key=True),
    #: A device CN.
    Column("device", String(255), primary_key=True),
    Column("added_at", Double, nullable=False),
    Index("ix_members_device", "device"),
)

# -- the hash-chained audit log ---------------------------------------------------------

audit = Table(
    "audit",
    metadata,
    Column("seq", BigInteger, primary_key=True, autoincrement=False),
    Column("ts", Double, nullable=False),
    Column("who", String(255), nullable=False),
    Column("action", String(64), nullable=False),
    Column("detail", JSON, nullable=False),
    Column("prev_hash", String(64), nullable=False),
    Column("hash", String(64), nullable=False),
)

#: One row: the last entry's seq and hash, advanced in the same transaction as each append,
#: so a truncated tail is visible and appends serialise on it.
audit_head = Table(
    "audit_head",
    metadata,
    Column("id", Integer, primary_key=True, autoincrement=False),
    Column("seq", BigInteger, nullable=False),
    Column("hash", String(64), nullable=False),
    CheckConstraint("id = 1", name="audit_head_one_row"),
)

#: ``prev_hash`` of the first audit entry (and the head's hash while the log is empty).
AUDIT_GENESIS = "0" * 64
