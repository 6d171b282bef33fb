"""The coordinator's REST API (``/v1``), documented in ``openapi.py``."""

from __future__ import annotations

import asyncio
import logging
import time
from dataclasses import asdict
from typing import Any

from aiohttp import web
from pydantic import BaseModel, ConfigDict, Field, ValidationError

from fnmesh.certs.identity import Role
from fnmesh.coordinator.api.auth import peer, problem, require
from fnmesh.coordinator.api.openapi import OPENAPI
from fnmesh.coordinator.api.state import CTX, Context
from fnmesh.coordinator.errors import ConflictError, NotFoundError
from fnmesh.coordinator.placement import fits
from fnmesh.errors import MeshError
from fnmesh.functions.bundle import Bundle
from fnmesh.functions.errors import BundleError
from fnmesh.functions.manifest import Manifest, semver_key, split_function_id
from fnmesh.functions.rollback import verify_order

log = logging.getLogger("fnmesh.coordinator.api")

routes = web.RouteTableDef()

#: Largest bundle accepted by push.
MAX_BUNDLE = 4 << 30


def ctx(request: web.Request) -> Context:
    return request.app[CTX]


async def json_body(request: web.Request) -> Any:
    """The request's JSON body; malformed, non-UTF-8 or too deeply nested JSON is a ValueError
    (which handlers answer 400), never an uncaught RecursionError (a 500)."""
    try:
        return await request.json()
    except RecursionError as e:
        raise ValueError("the JSON body is nested too deeply") from e


def fid_of(request: web.Request) -> str:
    return f"{request.match_info['ns']}/{request.match_info['name']}"


# -- health, docs, metrics -------------------------------------------------------------


@routes.get("/v1/health")
async def health(request: web.Request) -> web.Response:
    c = ctx(request)
    return web.json_response({"ok": True, "broker": c.mqtt.connected})


@routes.get("/v1/openapi.json")
async def openapi(request: web.Request) -> web.Response:
    return web.json_response(OPENAPI)


@routes.get("/metrics")
async def metrics(request: web.Request) -> web.Response:
    return web.Response(body=ctx(request).metrics.render(), content_type="text/plain")


# -- bundles and functions -------------------------------------------------------------


@routes.post("/v1/bundles")
@require(Role.PUBLISHER, Role.OPERATOR)
async def push(request: web.Request) -> web.Response:
    """Verify a bundle (chain, revocation, namespace, digests) and store it."""
    c = ctx(request)
    who = peer(request)
    if request.content_length is not None and request.content_length > MAX_BUNDLE:
        return problem(413, "too_large", f"bundle is over {MAX_BUNDLE} bytes")
    data = await request.read()
    loop = asyncio.get_running_loop()
    try:
        bundle = Bundle.parse(data)
        m = bundle.manifest
        if who.role == Role.PUBLISHER and who.namespace != m.namespace:
            return problem(
                403,
                "forbidden",
                f"{who.cn} may push only to namespace {who.namespace!r}, not {m.namespace!r}",
            )
        assert c.identity.enc_key is not None
        # Verify, then decrypt with the coordinator's key: proves the digests and
        # that the coordinator can re-wrap the key for nodes later.
        await loop.run_in_executor(
            None,
            lambda: bundle.open(c.trust(), c.identity.cn, c.identity.enc_key),  # type: ignore[arg-type]
        )
    except BundleError as e:
        return problem(400, "bad_bundle", str(e))
    except MeshError as e:
        return problem(400, "bad_bundle", str(e))
    highest = await _highest_version(c, m.name)
    if highest is not None and semver_key(m.version) < semver_key(highest):
        existing = await _find_version(c, m.name, m.version)
        if existing is None:
            return problem(
                409, "conflict", f"{m.name}@{m.version} is older than {highest}, already pushed"
            )
    try:
        existing = await _find_version(c, m.name, m.version)
        if existing is not None and existing.digest != bundle.digest:
            return problem(
                409, "conflict", f"{m.name}@{m.version} was already pushed with different content"
            )
        await loop.run_in_executor(None, c.blobs.put, bundle.digest, data)
        rec = await c.store.add_version(
            m.name,
            m.version,
            bundle.digest,
            dict(_manifest_json(bundle)),
            m.publisher,
            len(data),
            who.cn,
        )
    except ConflictError as e:
        return problem(409, "conflict", str(e))
    await c.audit.append(
        "push", who.cn, {"function": m.name, "version": m.version, "digest": bundle.digest}
    )
    return web.json_response(
        {"function": rec.function, "version": rec.version, "digest": rec.digest, "size": rec.size},
        status=201,
    )


def _manifest_json(bundle: Bundle) -> dict[str, Any]:
    import json

    out: dict[str, Any] = json.loads(bundle.manifest_bytes)
    return out


async def _find_version(c: Context, function: str, version: str) -> Any:
    try:
        return await c.store.get_version(function, version)
    except NotFoundError:
        return None


async def _highest_version(c: Context, function: str) -> str | None:
    for f in await c.store.list_functions():
        if f.function == function:
            return f.latest
    return None


@routes.get("/v1/functions")
async def list_functions(request: web.Request) -> web.Response:
    c = ctx(request)
    deployments = {d.function: d for d in await c.store.list_deployments()}
    out = []
    for f in await c.store.list_functions():
        d = deployments.get(f.function)
        out.append(
            {
                "function": f.function,
                "versions": f.versions,
                "latest": f.latest,
                "deployed": d.version if d else None,
            }
        )
    return web.json_response(out)


@routes.get("/v1/functions/{ns}/{name}")
async def show_function(request: web.Request) -> web.Response:
    c = ctx(request)
    fid = fid_of(request)
    versions = await c.store.versions(fid)
    if not versions:
        return problem(404, "not_found", f"no function {fid}")
    d = await c.store.get_deployment(fid)
    placements = await c.store.placements(fid)
    return web.json_response(
        {
            "function": fid,
            "versions": [
                {
                    "version": v.version,
                    "digest": v.digest,
                    "publisher": v.publisher,
                    "size": v.size,
                    "pushed_at": v.pushed_at,
                    "manifest": v.manifest,
                }
                for v in versions
            ],
            "deployment": _deployment_json(d) if d else None,
            "placements": [{"node": p.node, "version": p.version} for p in placements],
        }
    )


# -- deployments -----------------------------------------------------------------------


class DeployBody(BaseModel):
    model_config = ConfigDict(extra="forbid")

    function: str
    version: str
    min: int = Field(default=1, ge=0, le=10_000)
    max: int = Field(default=2, ge=1, le=10_000)
    where: dict[str, str] = Field(default_factory=dict)
    allow_spill: bool = False
    #: An operator-signed rollback order (``fnmesh rollback``), needed to go back a version.
    rollback: dict[str, str] | None = None


def _deployment_json(d: Any) -> dict[str, Any]:
    out = asdict(d)
    return out


@routes.post("/v1/deployments")
@require(Role.OPERATOR)
async def deploy(request: web.Request) -> web.Response:
    c = ctx(request)
    try:
        body = DeployBody.model_validate(await json_body(request))
        split_function_id(body.function)
    except (ValidationError, ValueError, MeshError) as e:
        return problem(400, "bad_request", _reason(e))
    if body.min > body.max:
        return problem(400, "bad_request", f"min ({body.min}) is over max ({body.max})")
    try:
        rec = await c.store.get_version(body.function, body.version)
    except NotFoundError:
        return problem(404, "not_found", f"{body.function}@{body.version} was never pushed")
    manifest = Manifest.model_validate(rec.manifest)
    nodes = c.registry.snapshot()
    live = [v for v in nodes.values() if v.live and not v.draining]
    fitting = [v for v in live if fits(v, manifest, body.where).ok]
    if body.min > 0 and len(fitting) < body.min:
        reasons = "; ".join(f"{v.name}: {fits(v, manifest, body.where).reason}" for v in live) or (
            "no live nodes"
        )
        return problem(
            409,
            "unsatisfiable",
            f"{body.function}@{body.version} needs {body.min} node(s), {len(fitting)} fit ({reasons})",
        )
    current = await c.store.get_deployment(body.function)
    rollback: dict[str, str] | None = None
    if current is not None and semver_key(body.version) < semver_key(current.version):
        if body.rollback is None:
            return problem(
                409,
                "conflict",
                f"{body.function}@{body.version} is older than the deployed {current.version}; "
                "going back needs an operator-signed order (fnmesh rollback)",
            )
        try:
            verify_order(body.rollback, c.trust(), function=body.function, version=body.version)
        except MeshError as e:
            return problem(403, "forbidden", str(e))
        rollback = body.rollback
    elif current is not None and current.version == body.version:
        # The version stays: so does the order that let agents accept it.
        rollback = current.rollback
    d = await c.store.set_deployment(
        body.function,
        body.version,
        body.min,
        body.max,
        body.where,
        allow_spill=body.allow_spill,
        rollback=rollback,
    )
    await c.audit.append(
        "deploy", peer(request).cn, {"function": body.function, "version": body.version}
    )
    c.reconciler.kick()
    return web.json_response(_deployment_json(d), status=201)


@routes.get("/v1/deployments")
async def list_deployments(request: web.Request) -> web.Response:
    return web.json_response(
        [_deployment_json(d) for d in await ctx(request).store.list_deployments()]
    )


@routes.delete("/v1/deployments/{ns}/{name}")
@require(Role.OPERATOR)
async def undeploy(request: web.Request) -> web.Response:
    c = ctx(request)
    fid = fid_of(request)
    if not await c.store.delete_deployment(fid):
        return problem(404, "not_found", f"{fid} is not deployed")
    await c.store.delete_placements(fid)
    await c.audit.append("undeploy", peer(request).cn, {"function": fid})
    c.reconciler.kick()
    return web.json_response({"function": fid, "deployed": False})


# -- nodes and placements --------------------------------------------------------------


@routes.get("/v1/nodes")
async def list_nodes(request: web.Request) -> web.Response:
    """Every node: joined ones (registry), LAN-discovered ones not joined yet, pending
    enrolments, and LAN records flagged ``untrusted``."""
    c = ctx(request)
    now = time.time()
    out: list[dict[str, Any]] = []
    views = c.registry.snapshot()
    for v in sorted(views.values(), key=lambda v: v.name):
        out.append(
            {
                "name": v.name,
                "cn": v.cn,
                "state": "draining" if v.draining and v.live else v.state,
                "labels": v.labels,
                "hardware": v.hardware,
                "functions": v.functions,
                "load": v.load,
                "fingerprint": v.fingerprint,
                "http": v.http,
                "rtt_ms": v.rtt_ms,
                "rtt_coordinator_ms": v.rtt_coordinator_ms,
                "last_heartbeat_s": round(now - v.last_heartbeat, 3) if v.last_heartbeat else None,
                "source": "mqtt",
            }
        )
    listed = set(views)
    if c.enrolments is not None:
        for e in c.enrolments.pending():
            if e.name in listed:
                continue
            listed.add(e.name)
            out.append(
                {
                    "name": e.name,
                    "cn": e.claim.cn,
                    "state": "pending",
                    "labels": dict(e.labels),
                    "hardware": dict(e.hardware),
                    "functions": {},
                    "load": {},
                    "fingerprint": "",
                    "key_fingerprint": e.claim.key_fingerprint,
                    "http": None,
                    "rtt_ms": None,
                    "rtt_coordinator_ms": None,
                    "last_heartbeat_s": None,
                    "source": "enrolment",
                    "enrolment": e.id,
                }
            )
    if c.browser is not None:
        for d in c.browser.nodes():
            if d.untrusted or d.name in listed:
                continue
            listed.add(d.name)
            out.append(
                {
                    "name": d.name,
                    "cn": "",
                    "state": d.state,
                    "labels": d.labels,
                    "hardware": {"summary": d.txt.get("gpu", "")},
                    "functions": {},
                    "load": {},
                    "fingerprint": d.fingerprint,
                    "http": None,
                    "rtt_ms": None,
                    "rtt_coordinator_ms": None,
                    "last_heartbeat_s": None,
                    "source": "mdns",
                    "addresses": list(d.addresses),
                }
            )
    for service, v in sorted(c.registry.untrusted.items()):
        out.append(
            {
                "name": v.name,
                "cn": "",
                "state": "untrusted",
                "labels": v.labels,
                "hardware": {},
                "functions": {},
                "load": {},
                "fingerprint": v.fingerprint,
                "http": None,
                "rtt_ms": None,
                "rtt_coordinator_ms": None,
                "last_heartbeat_s": None,
                "source": "mdns",
                "service": service,
                "untrusted_reason": v.untrusted_reason,
            }
        )
    return web.json_response(out)


@routes.get("/v1/placements")
async def list_placements(request: web.Request) -> web.Response:
    rows = await ctx(request).store.placements()
    return web.json_response([asdict(p) for p in rows])


@routes.get("/v1/nodes/{node}/bundles/{digest}")
@require(Role.NODE)
async def fetch_bundle(request: web.Request) -> web.Response:
    """A node fetches an assigned bundle, with the data key wrapped for it alone."""
    c = ctx(request)
    node = request.match_info["node"]
    digest = request.match_info["digest"]
    who = peer(request)
    if who.name != node:
        return problem(403, "forbidden", f"{who.cn} may fetch only its own bundles")
    assigned = {
        (await c.store.get_version(p.function, p.version)).digest
        for p in await c.store.placements_for_node(node)
    }
    if digest not in assigned:
        return problem(403, "forbidden", f"bundle {digest[:12]} is not assigned to {node}")
    data = await asyncio.get_running_loop().run_in_executor(
        None, c.reconciler.bundle_for_node, node, digest
    )
    return web.Response(body=data, content_type="application/octet-stream")


# -- invoke ----------------------------------------------------------------------------


@routes.post("/v1/functions/{ns}/{name}/invoke")
async def invoke(request: web.Request) -> web.Response:
    c = ctx(request)
    who = peer(request)
    fid = fid_of(request)
    try:
        # The id becomes a topic: a control character in it would make the broker drop the
        # coordinator's own connection (malformed packet).
        split_function_id(fid)
    except MeshError as e:
        return problem(404, "not_found", str(e))
    # A device invokes what it was granted, over HTTP as on the broker (whose ACL says the same).
    if who.role == Role.DEVICE and not await c.grants.may_invoke(who.cn, fid):
        return problem(403, "forbidden", f"{who.cn} has no grant for {fid}")
    body = await request.content.read(c.max_payload + 1)
    if len(body) > c.max_payload:
        return problem(
            400, "bad_request", f"request is over the coordinator's limit of {c.max_payload} bytes"
        )
    status, out, ct = await c.invoker.invoke(
        fid, body, request.headers.get("Content-Type"), c.invoke_timeout
    )
    return web.Response(body=out, status=status, content_type=ct.split(";")[0])


def _reason(e: Exception) -> str:
    if isinstance(e, ValidationError):
        err = e.errors()[0]
        return f"{'.'.join(str(p) for p in err['loc'])}: {err['msg']}"
    return str(e)


# -- grants, revocation, audit ---------------------------------------------------------


class GrantBody(BaseModel):
    model_config = ConfigDict(extra="forbid")

    subject: str = Field(min_length=1, max_length=200)
    function: str = Field(min_length=3, max_length=200)


@routes.get("/v1/grants")
@require(Role.OPERATOR)
async def list_grants(request: web.Request) -> web.Response:
    c = ctx(request)
    return web.json_response(
        {
            "grants": [{"subject": s, "function": f} for s, f in await c.grants.list_grants()],
            "members": [{"group": g, "device": d} for g, d in await c.grants.members()],
        }
    )


@routes.post("/v1/grants")
@require(Role.OPERATOR)
async def grant(request: web.Request) -> web.Response:
    """Let a device, or every device of a group, invoke a function (the broker ACL follows)."""
    c = ctx(request)
    try:
        body = GrantBody.model_validate(await json_body(request))
        added = await c.grants.grant(body.subject, body.function)
    except (ValidationError, ValueError, MeshError) as e:
        return problem(400, "bad_request", _reason(e))
    await c.audit.append(
        "grant", peer(request).cn, {"subject": body.subject, "function": body.function}
    )
    await c.broker.async_refresh()
    return web.json_response(
        {"subject": body.subject, "function": body.function, "added": added}, status=201
    )


@routes.delete("/v1/grants")
@require(Role.OPERATOR)
async def ungrant(request: web.Request) -> web.Response:
    c = ctx(request)
    try:
        body = GrantBody.model_validate(await json_body(request))
        removed = await c.grants.revoke_grant(body.subject, body.function)
    except (ValidationError, ValueError, MeshError) as e:
        return problem(400, "bad_request", _reason(e))
    if not removed:
        return problem(404, "not_found", f"{body.subject} has no grant for {body.function}")
    await c.audit.append(
        "ungrant", peer(request).cn, {"subject": body.subject, "function": body.function}
    )
    await c.broker.async_refresh()
    return web.json_response({"subject": body.subject, "function": body.function, "removed": True})


class MemberBody(BaseModel):
    model_config = ConfigDict(extra="forbid")

    device: str = Field(min_length=1, max_length=200)


@routes.post("/v1/groups/{group}/members")
@require(Role.OPERATOR)
async def add_member(request: web.Request) -> web.Response:
    c = ctx(request)
    group = request.match_info["group"]
    try:
        body = MemberBody.model_validate(await json_body(request))
        added = await c.grants.add_member(group, body.device)
    except (ValidationError, ValueError, MeshError) as e:
        return problem(400, "bad_request", _reason(e))
    await c.audit.append("member", peer(request).cn, {"group": group, "device": body.device})
    await c.broker.async_refresh()
    return web.json_response({"group": group, "device": body.device, "added": added}, status=201)


class RevokeBody(BaseModel):
    model_config = ConfigDict(extra="forbid")

    name_or_serial: str = Field(min_length=1, max_length=200)


@routes.post("/v1/revocations")
@require(Role.OPERATOR)
async def revoke(request: web.Request) -> web.Response:
    """Revoke a certificate by name or serial: the list is re-signed and published everywhere."""
    from fnmesh.certs.ca import FleetCA

    c = ctx(request)
    try:
        body = RevokeBody.model_validate(await json_body(request))
        done = FleetCA.load(c.home).revoke(body.name_or_serial)
    except (ValidationError, ValueError, MeshError) as e:
        return problem(400, "bad_request", _reason(e))
    revoked = [{"cn": r.cn, "serial": f"{r.serial:x}"} for r in done]
    await c.audit.append("revoke", peer(request).cn, {"revoked": revoked})
    await c.crl_publisher.async_check()
    return web.json_response({"revoked": revoked}, status=201)


@routes.get("/v1/audit")
@require(Role.OPERATOR)
async def audit_entries(request: web.Request) -> web.Response:
    c = ctx(request)
    try:
        limit = min(1000, max(1, int(request.query.get("limit", "100"))))
        # Clamped to SQLite's integer range: a larger one would overflow the query (500).
        since = min((1 << 63) - 1, max(0, int(request.query.get("since", "0"))))
    except ValueError:
        return problem(400, "bad_request", "limit and since must be integers")
    entries = await c.audit.entries(limit=limit, since=since)
    return web.json_response([asdict(e) for e in entries])


@routes.get("/v1/audit/verify")
@require(Role.OPERATOR)
async def audit_verify(request: web.Request) -> web.Response:
    r = await ctx(request).audit.verify()
    return web.json_response(asdict(r))
