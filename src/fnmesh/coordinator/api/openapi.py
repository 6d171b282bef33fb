"""The OpenAPI 3.1 document served at ``/v1/openapi.json``."""

from __future__ import annotations

from typing import Any

from fnmesh import __version__


def _err(desc: str) -> dict[str, Any]:
    return {
        "description": desc,
        "content": {"application/json": {"schema": {"$ref": "#/components/schemas/Problem"}}},
    }


def _json(schema: dict[str, Any], desc: str = "OK") -> dict[str, Any]:
    return {"description": desc, "content": {"application/json": {"schema": schema}}}


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
            "enum": [
                "float16",
                "float32",
                "float64",
                "int8",
                "int16",
                "int32",
                "int64",
                "uint8",
                "uint16",
                "uint32",
                "uint64",
                "bool",
            ],
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
                    "200": _json(
                        {"$ref": "#/components/schemas/InvokeResponse"}, "The function's outputs"
                    ),
                    "400": _err("bad_request: malformed, or inputs that do not match the function"),
                    **_AUTH,
                    "403": _err("forbidden"),
                    "404": _err("not_found: no such function deployed"),
                    "429": _err("saturated: no replica can take the request in time"),
                    "500": _err("internal: the function failed"),
                    "504": _err("timeout: no answer before the deadline"),
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
        "/v1/nodes": {
            "get": {
                "summary": "Nodes with state, labels, hardware, load",
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
