"""Who is calling: the client certificate of the mutual-TLS connection, checked against the fleet.

The TLS handshake already required a certificate from the fleet CA (and the
revocation list); this middleware reads it, checks it again against the
current trust store (revocations published since the listener started), and
attaches the caller's identity to the request. Handlers state the roles they
accept with :func:`require`.
"""

from __future__ import annotations

from collections.abc import Awaitable, Callable
from typing import Any

from aiohttp import web
from cryptography import x509

from fnmesh.certs.errors import TrustError
from fnmesh.certs.identity import CertInfo, Role
from fnmesh.certs.trust import CLIENT_AUTH, TrustStore

Handler = Callable[[web.Request], Awaitable[web.StreamResponse]]
PEER = "fnmesh.peer"
#: Turns a bearer token into the identity it stands for (raises TrustError).
TOKEN_KEY: web.AppKey[Callable[[str], CertInfo]] = web.AppKey("token", Callable[[str], CertInfo])  # type: ignore[arg-type]
TRUST_KEY: web.AppKey[Callable[[], TrustStore]] = web.AppKey("trust", Callable[[], TrustStore])  # type: ignore[arg-type]


def problem(status: int, code: str, message: str) -> web.Response:
    """An error body: ``{"error": {"code", "message"}}``."""
    return web.json_response({"error": {"code": code, "message": message}}, status=status)


def peer_certificate(request: web.Request) -> x509.Certificate | None:
    transport = request.transport
    if transport is None:
        return None
    ssl_object: Any = transport.get_extra_info("ssl_object")
    if ssl_object is None:
        return None
    der = ssl_object.getpeercert(binary_form=True)
    return x509.load_der_x509_certificate(der) if der else None


#: The only routes reachable without a client certificate: a new node asking to enrol and
#: polling its request (they only queue a request and read it back; see enrol_routes.py).
CERTLESS_ROUTES = frozenset({("POST", "/v1/enrol"), ("GET", "/v1/enrol/{request_id}")})


def certless(request: web.Request) -> bool:
    """Whether ``request`` targets one of :data:`CERTLESS_ROUTES` (by route, not by raw path)."""
    route = request.match_info.route
    resource = route.resource
    if resource is None:
        return False
    return (route.method, resource.canonical) in CERTLESS_ROUTES


@web.middleware
async def identity_middleware(request: web.Request, handler: Handler) -> web.StreamResponse:
    if certless(request):
        return await handler(request)
    cert = peer_certificate(request)
    if cert is None:
        auth = request.headers.get("Authorization", "")
        if auth.startswith("Bearer "):
            try:
                request[PEER] = request.app[TOKEN_KEY](auth[7:].strip())
            except TrustError as e:
                return problem(401, "unauthenticated", str(e))
            return await handler(request)
        return problem(
            401,
            "unauthenticated",
            "a client certificate from the fleet CA (or a token from `fnmesh token`) is required",
        )
    try:
        info = request.app[TRUST_KEY]().verify(cert, purpose=CLIENT_AUTH)
    except TrustError as e:
        return problem(401, "unauthenticated", str(e))
    request[PEER] = info
    return await handler(request)


def peer(request: web.Request) -> CertInfo:
    info: CertInfo = request[PEER]
    return info


def require(*roles: Role) -> Callable[[Handler], Handler]:
    """Only callers with one of ``roles`` reach the handler; others get 403 with the reason."""

    def wrap(handler: Handler) -> Handler:
        async def checked(request: web.Request) -> web.StreamResponse:
            info = peer(request)
            if info.role not in roles:
                allowed = ", ".join(r.value for r in roles)
                return problem(
                    403, "forbidden", f"{info.cn} has role {info.role.value}; this needs {allowed}"
                )
            return await handler(request)

        checked.__name__ = handler.__name__
        checked.__doc__ = handler.__doc__
        return checked

    return wrap
