"""A small client of the coordinator's REST API, for the CLI and scripts.

It finds the coordinator and the identity to act as through the home's
``fnmesh.toml`` (flags override), and talks mutual TLS with that identity's
certificate.
"""

from __future__ import annotations

import asyncio
import json
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass
from typing import Any

import aiohttp

from fnmesh.certs.home import Config, Home
from fnmesh.certs.identity import load_identity
from fnmesh.certs.tls import client_context
from fnmesh.errors import MeshError


class ApiError(MeshError):
    """The coordinator refused a call (the message is its reason)."""

    def __init__(self, status: int, message: str) -> None:
        super().__init__(f"{status}: {message}")
        self.status = status


@dataclass(frozen=True, slots=True)
class Client:
    home: Home
    config: Config

    @property
    def base(self) -> str:
        return self.config.coordinator.rstrip("/")

    def _ssl(self) -> Any:
        ident = load_identity(self.home.identity_dir(self.config.identity))
        return client_context(ident, self.home.ca_cert)

    async def async_call(
        self,
        method: str,
        path: str,
        *,
        json_body: Any = None,
        data: bytes | AsyncIterator[bytes] | None = None,
        headers: dict[str, str] | None = None,
        timeout: float = 60.0,
        raw: bool = False,
    ) -> Any:
        t = aiohttp.ClientTimeout(total=timeout, sock_connect=10)
        try:
            async with (
                aiohttp.ClientSession(timeout=t) as s,
                s.request(
                    method,
                    self.base + path,
                    json=json_body,
                    data=data,
                    headers=headers,
                    ssl=self._ssl(),
                ) as r,
            ):
                body = await r.read()
                if raw:
                    return r.status, body, r.headers.get("Content-Type", "")
                if r.status >= 400:
                    raise ApiError(r.status, _reason(body))
                return json.loads(body) if body else None
        except aiohttp.ClientError as e:
            raise MeshError(f"cannot reach the coordinator at {self.base}: {e}") from e

    def call(self, method: str, path: str, **kw: Any) -> Any:
        return asyncio.run(self.async_call(method, path, **kw))

    def push(self, data: bytes, progress: Callable[[int, int], None] | None = None) -> Any:
        async def chunks() -> AsyncIterator[bytes]:
            step = 1 << 20
            for i in range(0, len(data), step):
                yield data[i : i + step]
                if progress:
                    progress(min(i + step, len(data)), len(data))

        return self.call(
            "POST",
            "/v1/bundles",
            data=chunks(),
            headers={"Content-Type": "application/octet-stream", "Content-Length": str(len(data))},
            timeout=600,
        )


def _reason(body: bytes) -> str:
    try:
        obj = json.loads(body)
        return str(obj["error"]["message"])
    except (ValueError, KeyError, TypeError):
        return body[:300].decode(errors="replace")
