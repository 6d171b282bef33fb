"""The agent's HTTP endpoint (mutual TLS): invoke locally, metrics, health."""

from __future__ import annotations

import asyncio
import ssl
import time

from aiohttp import web

from fnmesh.agent.metrics import AgentMetrics
from fnmesh.agent.replies import Result, encode_result
from fnmesh.agent.service import InvocationService
from fnmesh.functions.messages import Encoding, ErrorCode, ErrorReply, Response

SERVICE_KEY = web.AppKey("service", InvocationService)
METRICS_KEY = web.AppKey("metrics", AgentMetrics)


class HttpSink:
    """Resolves a future with the answer of one HTTP request."""

    __slots__ = ("future",)

    def __init__(self) -> None:
        self.future: asyncio.Future[tuple[Result, Encoding]] = (
            asyncio.get_running_loop().create_future()
        )

    def accept(self, reply_to: str | None) -> bool:
        return True

    def send_encoded(self, payload: bytes, encoding: Encoding) -> None:
        raise AssertionError("HTTP requests are not deduplicated: nothing is replayed to them")

    def send(self, result: Result, encoding: Encoding) -> None:
        if not self.future.done():
            self.future.set_result((result, encoding))


def status_of(result: Result) -> int:
    return 200 if isinstance(result, Response) else ErrorCode(result.code).http_status


async def invoke(request: web.Request) -> web.Response:
    service = request.app[SERVICE_KEY]
    received = time.monotonic()
    fid = f"{request.match_info['ns']}/{request.match_info['name']}"
    limit = service.max_payload_for(fid)
    if request.content_length is not None and request.content_length > limit:
        result: Result = ErrorReply(
            "",
            ErrorCode.BAD_REQUEST,
            f"request is {request.content_length} bytes, over the limit of {limit}",
        )
        return _respond(result, Encoding.JSON)
    body = await request.content.read(limit + 1)
    sink = HttpSink()
    service.submit(fid, body, request.headers.get("Content-Type"), sink, received=received)
    result, encoding = await sink.future
    return _respond(result, encoding)


def _respond(result: Result, encoding: Encoding) -> web.Response:
    return web.Response(
        body=encode_result(result, encoding),
        status=status_of(result),
        content_type=encoding.content_type,
    )


async def metrics(request: web.Request) -> web.Response:
    return web.Response(body=request.app[METRICS_KEY].render(), content_type="text/plain")


async def health(request: web.Request) -> web.Response:
    return web.json_response({"ok": True, "functions": sorted(request.app[SERVICE_KEY].slots())})


def build_app(service: InvocationService, agent_metrics: AgentMetrics) -> web.Application:
    app = web.Application(client_max_size=64 << 20)
    app[SERVICE_KEY] = service
    app[METRICS_KEY] = agent_metrics
    app.router.add_post("/v1/functions/{ns}/{name}/invoke", invoke)
    app.router.add_get("/metrics", metrics)
    app.router.add_get("/healthz", health)
    return app


async def async_start_http(
    app: web.Application, host: str, port: int, ssl_context: ssl.SSLContext | None
) -> tuple[web.AppRunner, int]:
    """Start serving; returns the runner (for cleanup) and the bound port."""
    runner = web.AppRunner(app, access_log=None)
    await runner.setup()
    site = web.TCPSite(runner, host, port, ssl_context=ssl_context)
    await site.start()
    bound = port
    for addr in runner.addresses:
        if isinstance(addr, tuple) and len(addr) >= 2:
            bound = int(addr[1])
            break
    return runner, bound
