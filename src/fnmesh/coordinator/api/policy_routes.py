"""Policies and placement explanations (``/v1/policies``, ``/v1/placements/explain``)."""

from __future__ import annotations

import contextlib

from aiohttp import web

from fnmesh.certs.identity import Role
from fnmesh.coordinator import scheduling, tokens
from fnmesh.coordinator.api.auth import peer, problem, require
from fnmesh.coordinator.api.routes import json_body
from fnmesh.coordinator.api.state import CTX
from fnmesh.coordinator.errors import NotFoundError
from fnmesh.coordinator.policies import load_policies
from fnmesh.errors import MeshError
from fnmesh.functions.manifest import Manifest

routes = web.RouteTableDef()


@routes.post("/v1/policies")
@require(Role.OPERATOR)
async def apply_policies(request: web.Request) -> web.Response:
    """Create or replace policies from a YAML (or JSON) body; each apply bumps the version."""
    c = request.app[CTX]
    try:
        text = await request.text()
    except UnicodeDecodeError:
        return problem(400, "bad_request", "the policy body is not UTF-8 text")
    try:
        policies = load_policies(text)
    except MeshError as e:
        return problem(400, "bad_request", str(e))
    except RecursionError:
        return problem(400, "bad_request", "the policy document is nested too deeply")
    if not policies:
        return problem(400, "bad_request", "the body holds no policy")
    out = []
    for p in policies:
        body = p.model_dump(mode="json", exclude={"version"})
        version = await c.store.put_policy(p.name, body)
        await c.audit.append("policy", peer(request).cn, {"name": p.name, "version": version})
        out.append({"name": p.name, "version": version})
    c.reconciler.kick()
    return web.json_response(out, status=201)


@routes.get("/v1/policies")
async def list_policies(request: web.Request) -> web.Response:
    c = request.app[CTX]
    return web.json_response(
        [{"name": n, "version": v, **body} for n, v, body in await c.store.list_policies()]
    )


@routes.delete("/v1/policies/{name}")
@require(Role.OPERATOR)
async def delete_policy(request: web.Request) -> web.Response:
    c = request.app[CTX]
    name = request.match_info["name"]
    if not await c.store.delete_policy(name):
        return problem(404, "not_found", f"no policy {name}")
    await c.audit.append("policy-delete", peer(request).cn, {"name": name})
    c.reconciler.kick()
    return web.json_response({"name": name, "deleted": True})


@routes.get("/v1/placements/explain/{ns}/{name}")
async def explain(request: web.Request) -> web.Response:
    """For every node: why it was excluded, or how each score part came out."""
    c = request.app[CTX]
    fid = f"{request.match_info['ns']}/{request.match_info['name']}"
    d = await c.store.get_deployment(fid)
    try:
        if d is not None:
            rec = await c.store.get_version(fid, d.version)
        else:
            versions = await c.store.versions(fid)
            if not versions:
                raise NotFoundError(f"no function {fid}")
            rec = versions[-1]
    except NotFoundError as e:
        return problem(404, "not_found", str(e))
    manifest = Manifest.model_validate(rec.manifest)
    nodes = c.registry.snapshot()
    eff = scheduling.effective(await scheduling.load_policies(c.store), fid, manifest)
    current = [p.node for p in await c.store.placements(fid)]
    req = scheduling.request(
        fid,
        manifest,
        eff,
        replicas=d.max_replicas if d else 1,
        where=d.where if d else {},
        current=current,
    )
    return web.json_response(scheduling.ENGINE.explain(req, scheduling.snapshot(nodes)).as_dict())


@routes.post("/v1/nodes/{node}/drain")
@require(Role.OPERATOR)
async def drain(request: web.Request) -> web.Response:
    """Move a node's work elsewhere and give it no more (``{"draining": false}`` undoes it)."""
    c = request.app[CTX]
    node = request.match_info["node"]
    try:
        body = await json_body(request)
        draining = body.get("draining", True) if isinstance(body, dict) else None
        if not isinstance(draining, bool):
            raise ValueError("'draining' must be true or false")
    except ValueError as e:
        return problem(400, "bad_request", f'drain takes {{"draining": bool}}: {e}')
    if c.registry.get(node) is None:
        return problem(404, "not_found", f"no node {node}")
    c.registry.set_draining(node, draining)
    # A node known from MQTT only so far is held by the registry until it is stored.
    with contextlib.suppress(NotFoundError):
        await c.store.set_draining(node, draining)
    await c.audit.append("drain" if draining else "undrain", peer(request).cn, {"node": node})
    c.reconciler.kick()
    return web.json_response({"node": node, "draining": draining})


@routes.post("/v1/tokens")
async def token(request: web.Request) -> web.Response:
    """A short-lived token standing for the caller's own certificate (for browsers, scripts)."""
    c = request.app[CTX]
    who = peer(request)
    if not who.fingerprint:
        return problem(403, "forbidden", "a token is minted with a client certificate, not a token")
    try:
        body = await json_body(request) if request.can_read_body else {}
        ttl = float(body.get("ttl_s", tokens.DEFAULT_TTL_S)) if isinstance(body, dict) else -1.0
        text, expires = tokens.mint(c.identity, who, ttl)
    except (ValueError, TypeError, MeshError) as e:
        return problem(400, "bad_request", str(e))
    await c.audit.append("token", who.cn, {"expires": expires})
    return web.json_response({"token": text, "expires": expires, "cn": who.cn}, status=201)
