"""Enrolment endpoints: a new node asks (no certificate), an operator approves.

``POST /v1/enrol`` and ``GET /v1/enrol/{request_id}`` are the only routes the identity
middleware lets through without a client certificate (:data:`auth.CERTLESS_ROUTES`): the
first only queues a size-limited request, the second reads one back by its random id.
Listing and approving need a certificate like everything else.
"""

from __future__ import annotations

import json
import logging

from aiohttp import web

from fnmesh.certs.enrolment import EnrolmentError
from fnmesh.certs.identity import Role
from fnmesh.coordinator.api.auth import peer, problem, require
from fnmesh.coordinator.api.state import CTX
from fnmesh.coordinator.enrolment import EnrolmentQueue
from fnmesh.errors import MeshError

log = logging.getLogger("fnmesh.coordinator.api.enrol")

routes = web.RouteTableDef()

#: Largest enrolment request body (a CSR is about 600 bytes; hardware summary and labels).
MAX_ENROL_BODY = 16 * 1024


def _queue(request: web.Request) -> EnrolmentQueue | None:
    return request.app[CTX].enrolments


@routes.post("/v1/enrol")
async def enrol(request: web.Request) -> web.Response:
    """Queue an enrolment request (no client certificate needed; nothing is trusted)."""
    queue = _queue(request)
    if queue is None:
        return problem(404, "not_found", "enrolment is turned off on this coordinator")
    if request.content_length is not None and request.content_length > MAX_ENROL_BODY:
        return problem(
            413, "bad_request", f"an enrolment request is at most {MAX_ENROL_BODY} bytes"
        )
    raw = await request.content.read(MAX_ENROL_BODY + 1)
    if len(raw) > MAX_ENROL_BODY:
        return problem(
            413, "bad_request", f"an enrolment request is at most {MAX_ENROL_BODY} bytes"
        )
    try:
        body = json.loads(raw)
    except (ValueError, RecursionError) as err:
        return problem(400, "bad_request", f"the body is not JSON: {err}")
    peername = request.transport.get_extra_info("peername") if request.transport else None
    try:
        e = queue.submit(body, peer=str(peername[0]) if peername else "")
    except OverflowError as err:
        return problem(429, "saturated", str(err))
    except EnrolmentError as err:
        status = 409 if "already" in str(err) else 400
        return problem(status, "conflict" if status == 409 else "bad_request", str(err))
    log.info(
        "enrolment request %s for node %s (key %s…)", e.id, e.name, e.claim.key_fingerprint[:16]
    )
    return web.json_response(e.to_json(), status=202)


@routes.get("/v1/enrol/{request_id}")
async def enrol_status(request: web.Request) -> web.Response:
    """One request by its id: ``pending``, or ``approved`` with the signed certificate."""
    queue = _queue(request)
    e = queue.get(request.match_info["request_id"]) if queue is not None else None
    if e is None:
        return problem(404, "not_found", "no such enrolment request")
    return web.json_response(e.to_json(with_certificate=True))


@routes.get("/v1/enrolments")
async def list_enrolments(request: web.Request) -> web.Response:
    queue = _queue(request)
    if queue is None:
        return web.json_response([])
    return web.json_response([e.to_json() for e in queue.pending()])


@routes.post("/v1/enrolments/{node}/approve")
@require(Role.OPERATOR)
async def approve(request: web.Request) -> web.Response:
    """Sign the node's pending request with the fleet CA and let it join."""
    c = request.app[CTX]
    queue = c.enrolments
    node = request.match_info["node"]
    if queue is None:
        return problem(404, "not_found", "enrolment is turned off on this coordinator")
    operator = peer(request).cn
    try:
        e = queue.approve(node, operator)
    except KeyError:
        return problem(404, "not_found", f"no pending enrolment for node {node!r}")
    except MeshError as err:
        return problem(409, "conflict", str(err))
    assert e.cert_fingerprint is not None
    if c.browser is not None:
        c.browser.trust(e.name, e.cert_fingerprint, key_fingerprint=e.claim.key_fingerprint)
    await c.broker.async_refresh()  # the ACL lists every identity: now this one too
    await c.audit.append(
        "enrol",
        operator,
        {"node": e.name, "key": e.claim.key_fingerprint, "cert": e.cert_fingerprint},
    )
    return web.json_response(e.to_json())
