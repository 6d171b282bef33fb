"""The OpenAPI 3.1 document served at ``/v1/openapi.json``."""

from __future__ import annotations

from typing import Any

from fnmesh import __version__
from fnmesh.functions.manifest import DTYPES


def _err(desc: str) -> dict[str, Any]:
    return {
        "description": desc,
        "content": {"application/json": {"schema": {"$ref": "#/components/schemas/Problem"}}},
    }


def _json(schema: dict[str, Any], desc: str = "OK") -> dict[str, Any]:
    return {"description": desc, "content": {"application/json": {"schema": schema}}}


def _answer(desc: str, schema: str = "Problem") -> dict[str, Any]:
    """An invocation's answer: in the request's encoding (JSON, or msgpack for any other body)."""
    return {
        "description": desc,
        "content": {
            "application/json": {"schema": {"$ref": f"#/components/schemas/{schema}"}},
            "application/msgpack": {"schema": {"type": "string", "format": "binary"}},
        },
    }


_AUTH = {"401": _err("No client certificate, or one the fleet does not trust")}
_FORBIDDEN = {"403": _err("The caller's role may not do this")}
_NS = {
    "name": "ns",
    "in": "path",
    "required": True,
    "schema": {"type": "string", "pattern": "^[a-z0-9][a-z0-9_-]{0,62}$"},
}
_NAME = {
    "name": "name",
    "in": "path",
    "required": True,
    "schema": {"type": "string", "pattern": "^[a-z0-9][a-z0-9_.-]{0,62}$"},
}

_TENSOR = {
    "type": "object",
    "required": ["dtype", "shape", "data"],
    "properties": {
        "dtype": {
            "type": "string",
            "enum": list(DTYPES),
        },
        "shape": {"type": "array", "items": {"type": "integer", "minimum": 0}},
        "data": {},
    },
}

OPENAPI: dict[str, Any] = {
    "openapi": "3.1.0",
    "info": {
        "title": "fnmesh coordinator",
        "version": __version__,
        "description": "Every call needs a client certificate from the fleet CA (mutual TLS); the role comes from the certificate.",
    },
    "paths": {
        "/v1/health": {
            "get": {
                "summary": "Liveness",
                "responses": {
                    "200": _json(
                        {
                            "type": "object",
                            "properties": {
                                "ok": {"type": "boolean"},
                                "broker": {"type": "boolean"},
                            },
                            "required": ["ok"],
                        }
                    ),
                    **_AUTH,
                },
            }
        },
        "/v1/bundles": {
            "post": {
                "summary": "Push a signed, encrypted bundle (publisher: own namespace; operator)",
                "requestBody": {
                    "required": True,
                    "content": {
                        "application/octet-stream": {
                            "schema": {"type": "string", "format": "binary"}
                        }
                    },
                },
                "responses": {
                    "201": _json(
                        {
                            "type": "object",
                            "required": ["function", "version", "digest", "size"],
                            "properties": {
                                "function": {"type": "string"},
                                "version": {"type": "string"},
                                "digest": {"type": "string"},
                                "size": {"type": "integer"},
                            },
                        },
                        "Stored",
                    ),
                    "400": _err("The bundle does not verify (the reason names the check)"),
                    **_AUTH,
                    **_FORBIDDEN,
                    "409": _err(
                        "This version exists with other content, or is older than one already pushed"
                    ),
                    "413": _err("Too large"),
                },
            }
        },
        "/v1/functions": {
            "get": {
                "summary": "Functions, versions and what is deployed",
                "responses": {
                    "200": _json(
                        {"type": "array", "items": {"$ref": "#/components/schemas/FunctionSummary"}}
                    ),
                    **_AUTH,
                },
            }
        },
        "/v1/functions/{ns}/{name}": {
            "get": {
                "summary": "One function: versions, manifests, deployment, placements",
                "parameters": [_NS, _NAME],
                "responses": {
                    "200": _json({"type": "object"}),
                    "404": _err("No such function"),
                    **_AUTH,
                },
            }
        },
        "/v1/functions/{ns}/{name}/invoke": {
            "post": {
                "summary": "Invoke a function, routed like an MQTT request",
                "parameters": [_NS, _NAME],
                "requestBody": {
                    "required": True,
                    "content": {
                        "application/json": {
                            "schema": {"$ref": "#/components/schemas/InvokeRequest"}
                        },
                        "application/msgpack": {"schema": {"type": "string", "format": "binary"}},
                    },
                },
                "responses": {
                    "200": _answer("The function's outputs", "InvokeResponse"),
                    "400": _answer(
                        "bad_request: malformed, or inputs that do not match the function"
                    ),
                    **_AUTH,
                    "403": _err("forbidden: a device without a grant for this function"),
                    "404": _answer("not_found: no such function deployed"),
                    "429": _answer("saturated: no replica can take the request in time"),
                    "500": _answer("internal: the function failed"),
                    "504": _answer("timeout: no answer before the deadline"),
                },
            }
        },
        "/v1/deployments": {
            "get": {
                "summary": "Deployments",
                "responses": {
                    "200": _json(
                        {"type": "array", "items": {"$ref": "#/components/schemas/Deployment"}}
                    ),
                    **_AUTH,
                },
            },
            "post": {
                "summary": "Deploy a pushed version (operator)",
                "requestBody": {
                    "required": True,
                    "content": {
                        "application/json": {
                            "schema": {"$ref": "#/components/schemas/DeployRequest"}
                        }
                    },
                },
                "responses": {
                    "201": _json({"$ref": "#/components/schemas/Deployment"}, "Deployed"),
                    "400": _err("Malformed request"),
                    **_AUTH,
                    **_FORBIDDEN,
                    "404": _err("That version was never pushed"),
                    "409": _err("No node can satisfy the deployment (the reason says why)"),
                },
            },
        },
        "/v1/deployments/{ns}/{name}": {
            "delete": {
                "summary": "Undeploy (operator)",
                "parameters": [_NS, _NAME],
                "responses": {
                    "200": _json({"type": "object"}),
                    **_AUTH,
                    **_FORBIDDEN,
                    "404": _err("Not deployed"),
                },
            }
        },
        "/v1/policies": {
            "get": {
                "summary": "Operator policies, with versions",
                "responses": {
                    "200": _json({"type": "array", "items": {"type": "object"}}),
                    **_AUTH,
                },
            },
            "post": {
                "summary": "Create or replace policies from YAML (operator); each apply bumps the version",
                "requestBody": {
                    "required": True,
                    "content": {"application/yaml": {"schema": {"type": "string"}}},
                },
                "responses": {
                    "201": _json({"type": "array", "items": {"type": "object"}}, "Applied"),
                    "400": _err("Not valid policy YAML (the reason names the field)"),
                    **_AUTH,
                    **_FORBIDDEN,
                },
            },
        },
        "/v1/policies/{name}": {
            "delete": {
                "summary": "Delete a policy (operator)",
                "parameters": [
                    {"name": "name", "in": "path", "required": True, "schema": {"type": "string"}}
                ],
                "responses": {
                    "200": _json({"type": "object"}),
                    **_AUTH,
                    **_FORBIDDEN,
                    "404": _err("No such policy"),
                },
            }
        },
        "/v1/placements/explain/{ns}/{name}": {
            "get": {
                "summary": "For every node: why it was excluded, or how each score part came out",
                "parameters": [_NS, _NAME],
                "responses": {
                    "200": _json({"type": "object"}),
                    **_AUTH,
                    "404": _err("No such function"),
                },
            }
        },
        "/v1/nodes/{node}/drain": {
            "post": {
                "summary": "Drain a node: its work moves elsewhere (operator)",
                "parameters": [
                    {"name": "node", "in": "path", "required": True, "schema": {"type": "string"}}
                ],
                "requestBody": {
                    "required": True,
                    "content": {
                        "application/json": {
                            "schema": {
                                "type": "object",
                                "properties": {"draining": {"type": "boolean"}},
                            }
                        }
                    },
                },
                "responses": {
                    "200": _json({"type": "object"}),
                    "400": _err("Malformed request"),
                    **_AUTH,
                    **_FORBIDDEN,
                    "404": _err("No such node"),
                },
            }
        },
        "/v1/enrol": {
            "post": {
                "summary": "A node with no certificate asks to enrol (no client certificate "
                "needed; the request is only queued as pending)",
                "security": [],
                "requestBody": {
                    "required": True,
                    "content": {
                        "application/json": {
                            "schema": {
                                "type": "object",
                                "required": ["csr"],
                                "properties": {
                                    "csr": {
                                        "type": "string",
                                        "description": "PEM CSR, CN node.NAME, SAN "
                                        "urn:fnmesh:x25519:HEX",
                                    },
                                    "hardware": {"type": "object"},
                                    "labels": {
                                        "type": "object",
                                        "additionalProperties": {"type": "string"},
                                    },
                                },
                            }
                        }
                    },
                },
                "responses": {
                    "202": _json({"type": "object"}, "Queued as pending"),
                    "400": _err("Malformed request or CSR"),
                    "404": _err("Enrolment is turned off"),
                    "409": _err("The name is already enrolled or pending with another key"),
                    "413": _err("Request too large"),
                    "429": _err("Too many pending requests"),
                },
            }
        },
        "/v1/enrol/{request_id}": {
            "get": {
                "summary": "Poll an enrolment request (no client certificate needed): pending, "
                "or approved with the signed certificate",
                "security": [],
                "parameters": [
                    {
                        "name": "request_id",
                        "in": "path",
                        "required": True,
                        "schema": {"type": "string"},
                    }
                ],
                "responses": {
                    "200": _json({"type": "object"}),
                    "404": _err("No such request"),
                },
            }
        },
        "/v1/enrolments": {
            "get": {
                "summary": "Pending enrolment requests with hardware summary and key fingerprint",
                "responses": {
                    "200": _json({"type": "array", "items": {"type": "object"}}),
                    **_AUTH,
                },
            }
        },
        "/v1/enrolments/{node}/approve": {
            "post": {
                "summary": "Approve a pending node: the fleet CA signs it (operator)",
                "parameters": [
                    {"name": "node", "in": "path", "required": True, "schema": {"type": "string"}}
                ],
                "responses": {
                    "200": _json({"type": "object"}),
                    **_AUTH,
                    **_FORBIDDEN,
                    "404": _err("No pending request for this node"),
                    "409": _err("The request cannot be signed"),
                },
            }
        },
        "/v1/tokens": {
            "post": {
                "summary": "A short-lived token for the caller's own identity (fnmesh token)",
                "requestBody": {
                    "required": False,
                    "content": {
                        "application/json": {
                            "schema": {
                                "type": "object",
                                "properties": {
                                    "ttl_s": {
                                        "type": "number",
                                        "exclusiveMinimum": 0,
                                        "maximum": 43200,
                                    }
                                },
                            }
                        }
                    },
                },
                "responses": {
                    "201": _json(
                        {
                            "type": "object",
                            "required": ["token", "expires", "cn"],
                            "properties": {
                                "token": {"type": "string"},
                                "expires": {"type": "number"},
                                "cn": {"type": "string"},
                            },
                        },
                        "Minted",
                    ),
                    "400": _err("Malformed request or lifetime out of range"),
                    **_AUTH,
                    "403": _err("Tokens are minted with a client certificate, not with a token"),
                },
            }
        },
        "/v1/nodes": {
            "get": {
                "summary": "Nodes with state, labels, hardware, load, RTT: joined ones, ones "
                "seen on the LAN (discovered), pending enrolments and untrusted LAN records",
                "responses": {
                    "200": _json({"type": "array", "items": {"type": "object"}}),
                    **_AUTH,
                },
            }
        },
        "/v1/placements": {
            "get": {
                "summary": "Which node holds which function version",
                "responses": {
                    "200": _json({"type": "array", "items": {"type": "object"}}),
                    **_AUTH,
                },
            }
        },
        "/v1/nodes/{node}/bundles/{digest}": {
            "get": {
                "summary": "A node fetches an assigned bundle, key wrapped for it alone (node role)",
                "parameters": [
                    {"name": "node", "in": "path", "required": True, "schema": {"type": "string"}},
                    {
                        "name": "digest",
                        "in": "path",
                        "required": True,
                        "schema": {"type": "string"},
                    },
                ],
                "responses": {
                    "200": {
                        "description": "The bundle",
                        "content": {
                            "application/octet-stream": {
                                "schema": {"type": "string", "format": "binary"}
                            }
                        },
                    },
                    **_AUTH,
                    "403": _err("Not this node's, or not assigned to it"),
                },
            }
        },
        "/v1/grants": {
            "get": {
                "summary": "Grants and group memberships (operator)",
                "responses": {
                    "200": _json(
                        {
                            "type": "object",
                            "required": ["grants", "members"],
                            "properties": {
                                "grants": {
                                    "type": "array",
                                    "items": {"$ref": "#/components/schemas/GrantRequest"},
                                },
                                "members": {
                                    "type": "array",
                                    "items": {
                                        "type": "object",
                                        "required": ["group", "device"],
                                        "properties": {
                                            "group": {"type": "string"},
                                            "device": {"type": "string"},
                                        },
                                    },
                                },
                            },
                        }
                    ),
                    **_AUTH,
                    **_FORBIDDEN,
                },
            },
            "post": {
                "summary": "Let a device (device.NAME) or a group (group:NAME) invoke a function "
                "(operator; the broker ACL follows)",
                "requestBody": {
                    "required": True,
                    "content": {
                        "application/json": {
                            "schema": {"$ref": "#/components/schemas/GrantRequest"}
                        }
                    },
                },
                "responses": {
                    "201": _json(
                        {
                            "type": "object",
                            "required": ["subject", "function", "added"],
                            "properties": {
                                "subject": {"type": "string"},
                                "function": {"type": "string"},
                                "added": {"type": "boolean"},
                            },
                        },
                        "Granted (added is false when it already was)",
                    ),
                    "400": _err("Malformed request, subject or function id"),
                    **_AUTH,
                    **_FORBIDDEN,
                },
            },
            "delete": {
                "summary": "Take a grant back (operator)",
                "requestBody": {
                    "required": True,
                    "content": {
                        "application/json": {
                            "schema": {"$ref": "#/components/schemas/GrantRequest"}
                        }
                    },
                },
                "responses": {
                    "200": _json(
                        {
                            "type": "object",
                            "required": ["subject", "function", "removed"],
                            "properties": {
                                "subject": {"type": "string"},
                                "function": {"type": "string"},
                                "removed": {"type": "boolean"},
                            },
                        }
                    ),
                    "400": _err("Malformed request, subject or function id"),
                    **_AUTH,
                    **_FORBIDDEN,
                    "404": _err("No such grant"),
                },
            },
        },
        "/v1/groups/{group}/members": {
            "post": {
                "summary": "Put a device in a group (operator)",
                "parameters": [
                    {"name": "group", "in": "path", "required": True, "schema": {"type": "string"}}
                ],
                "requestBody": {
                    "required": True,
                    "content": {
                        "application/json": {
                            "schema": {
                                "type": "object",
                                "required": ["device"],
                                "additionalProperties": False,
                                "properties": {
                                    "device": {"type": "string", "minLength": 1, "maxLength": 200}
                                },
                            }
                        }
                    },
                },
                "responses": {
                    "201": _json(
                        {
                            "type": "object",
                            "required": ["group", "device", "added"],
                            "properties": {
                                "group": {"type": "string"},
                                "device": {"type": "string"},
                                "added": {"type": "boolean"},
                            },
                        },
                        "A member (added is false when it already was)",
                    ),
                    "400": _err("Malformed request, group or device name"),
                    **_AUTH,
                    **_FORBIDDEN,
                },
            }
        },
        "/v1/revocations": {
            "post": {
                "summary": "Revoke an identity by name or serial (operator); the signed list "
                "reaches the broker, routers and nodes",
                "requestBody": {
                    "required": True,
                    "content": {
                        "application/json": {
                            "schema": {
                                "type": "object",
                                "required": ["name_or_serial"],
                                "additionalProperties": False,
                                "properties": {
                                    "name_or_serial": {
                                        "type": "string",
                                        "minLength": 1,
                                        "maxLength": 200,
                                    }
                                },
                            }
                        }
                    },
                },
                "responses": {
                    "201": _json(
                        {
                            "type": "object",
                            "required": ["revoked"],
                            "properties": {
                                "revoked": {
                                    "type": "array",
                                    "items": {
                                        "type": "object",
                                        "required": ["cn", "serial"],
                                        "properties": {
                                            "cn": {"type": "string"},
                                            "serial": {"type": "string"},
                                        },
                                    },
                                }
                            },
                        },
                        "Revoked",
                    ),
                    "400": _err("Malformed request, or no live certificate matches"),
                    **_AUTH,
                    **_FORBIDDEN,
                },
            }
        },
        "/v1/audit": {
            "get": {
                "summary": "The hash-chained audit log, oldest first (operator)",
                "parameters": [
                    {"name": "limit", "in": "query", "schema": {"type": "integer"}},
                    {"name": "since", "in": "query", "schema": {"type": "integer"}},
                ],
                "responses": {
                    "200": _json(
                        {"type": "array", "items": {"$ref": "#/components/schemas/AuditEntry"}}
                    ),
                    "400": _err("limit and since must be integers"),
                    **_AUTH,
                    **_FORBIDDEN,
                },
            }
        },
        "/v1/audit/verify": {
            "get": {
                "summary": "Check the audit log's hash chain (operator)",
                "responses": {
                    "200": _json(
                        {
                            "type": "object",
                            "required": ["ok", "first_bad_seq", "reason", "checked"],
                            "properties": {
                                "ok": {"type": "boolean"},
                                "first_bad_seq": {"type": ["integer", "null"]},
                                "reason": {"type": "string"},
                                "checked": {"type": "integer"},
                            },
                        }
                    ),
                    **_AUTH,
                    **_FORBIDDEN,
                },
            }
        },
    },
    "components": {
        "schemas": {
            "Problem": {
                "type": "object",
                "required": ["error"],
                "properties": {
                    "id": {"type": "string"},
                    "error": {
                        "type": "object",
                        "required": ["code", "message"],
                        "properties": {"code": {"type": "string"}, "message": {"type": "string"}},
                    },
                },
            },
            "Tensor": _TENSOR,
            "GrantRequest": {
                "type": "object",
                "required": ["subject", "function"],
                "additionalProperties": False,
                "properties": {
                    "subject": {"type": "string", "minLength": 1, "maxLength": 200},
                    "function": {"type": "string", "minLength": 3, "maxLength": 200},
                },
            },
            "AuditEntry": {
                "type": "object",
                "required": ["seq", "ts", "who", "action", "detail", "prev_hash", "hash"],
                "properties": {
                    "seq": {"type": "integer"},
                    "ts": {"type": "number"},
                    "who": {"type": "string"},
                    "action": {"type": "string"},
                    "detail": {"type": "object"},
                    "prev_hash": {"type": "string"},
                    "hash": {"type": "string"},
                },
            },
            "InvokeRequest": {
                "type": "object",
                "required": ["inputs"],
                "properties": {
                    "inputs": {
                        "type": "object",
                        "additionalProperties": {"$ref": "#/components/schemas/Tensor"},
                    },
                    "deadline_ms": {"type": "integer"},
                    "id": {"type": "string", "maxLength": 256},
                },
            },
            "InvokeResponse": {
                "type": "object",
                "required": ["id", "version", "outputs", "node", "timing"],
                "properties": {
                    "id": {"type": "string"},
                    "version": {"type": "string"},
                    "outputs": {
                        "type": "object",
                        "additionalProperties": {"$ref": "#/components/schemas/Tensor"},
                    },
                    "node": {"type": "string"},
                    "timing": {
                        "type": "object",
                        "properties": {
                            "queue_ms": {"type": "number"},
                            "run_ms": {"type": "number"},
                            "cold_start": {"type": "boolean"},
                            "spilled": {"type": "boolean"},
                        },
                    },
                },
            },
            "FunctionSummary": {
                "type": "object",
                "required": ["function", "versions"],
                "properties": {
                    "function": {"type": "string"},
                    "versions": {"type": "array", "items": {"type": "string"}},
                    "latest": {"type": ["string", "null"]},
                    "deployed": {"type": ["string", "null"]},
                },
            },
            "DeployRequest": {
                "type": "object",
                "required": ["function", "version"],
                "additionalProperties": False,
                "properties": {
                    "function": {"type": "string"},
                    "version": {"type": "string"},
                    "min": {"type": "integer", "minimum": 0, "maximum": 10000},
                    "max": {"type": "integer", "minimum": 1, "maximum": 10000},
                    "where": {"type": "object", "additionalProperties": {"type": "string"}},
                    "allow_spill": {"type": "boolean"},
                },
            },
            "Deployment": {
                "type": "object",
                "required": ["function", "version"],
                "properties": {
                    "function": {"type": "string"},
                    "version": {"type": "string"},
                    "min_replicas": {"type": "integer"},
                    "max_replicas": {"type": "integer"},
                    "where": {"type": "object"},
                    "allow_spill": {"type": "boolean"},
                    "previous_version": {"type": ["string", "null"]},
                    "generation": {"type": "integer"},
                },
            },
        }
    },
}
