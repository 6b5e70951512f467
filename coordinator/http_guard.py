"""What the HTTP API checks before a request reaches its handler: the body size and the API key.

Plain ASGI middleware, so a refused request costs no parsing: a body over the limit is answered
413 as soon as its Content-Length (or, for a chunked body, its running size) says so, without
reading the rest, and `/health` keeps answering other clients meanwhile. Requests to `/v1/...`
and `/metrics` need `Authorization: Bearer <key>` when the server has a key (`/health` stays
open for probes, the web page for browsers: it asks for the key itself).
Both answer in OpenAI's error shape.
"""

from __future__ import annotations

import hmac
from typing import Any

from starlette.responses import JSONResponse

Scope = dict[str, Any]
#: the paths an API key protects (the web page and /health stay open)
PROTECTED_PREFIXES = ("/v1/", "/metrics")


def error_response(status: int, message: str, param: str | None = None, code: str | None = None,
                   kind: str = "invalid_request_error", headers: dict[str, str] | None = None) -> JSONResponse:
    """An error in OpenAI's shape (the API's handlers and this middleware answer alike)."""
    return JSONResponse({"error": {"message": message, "type": kind, "param": param, "code": code}},
                        status_code=status, headers=headers)


class RequestGuard:
    """ASGI middleware: 413 for bodies over `max_body_bytes`, 401 for /v1/ requests without the key."""

    def __init__(self, app, max_body_bytes: int, api_key: str | None = None) -> None:
        self.app, self.max_body_bytes, self.api_key = app, int(max_body_bytes), api_key or None

    async def __call__(self, scope: Scope, receive, send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        headers = {k.decode("latin-1").lower(): v.decode("latin-1") for k, v in scope.get("headers", [])}
        if self.api_key and scope.get("path", "").startswith(PROTECTED_PREFIXES) and not self._authorized(headers):
            await error_response(401, "This server requires an API key: send 'Authorization: Bearer <key>'.", None,
                                 "invalid_api_key", "authentication_error", {"WWW-Authenticate": "Bearer"})(
                scope, receive, send)
            return
        length = headers.get("content-length", "")
        if length.isdigit():  # the server's HTTP parser holds the client to its Content-Length
            if int(length) > self.max_body_bytes:
                await self._too_large(int(length))(scope, receive, send)
                return
            await self.app(scope, receive, send)
            return
        # a chunked body: read it here up to the limit (refusing at once past it), then replay it
        chunks, size, more = [], 0, True
        while more:
            message = await receive()
            if message["type"] != "http.request":  # the client left
                return
            chunks.append(message.get("body", b""))
            size += len(chunks[-1])
            more = message.get("more_body", False)
            if size > self.max_body_bytes:
                await self._too_large(size)(scope, receive, send)
                return
        body = b"".join(chunks)
        replayed = False

        async def replay():
            nonlocal replayed
            if replayed:
                return await receive()  # after the body: the disconnect, when it comes
            replayed = True
            return {"type": "http.request", "body": body, "more_body": False}

        await self.app(scope, replay, send)

    def _authorized(self, headers: dict[str, str]) -> bool:
        scheme, _, token = headers.get("authorization", "").partition(" ")
        return scheme.lower() == "bearer" and hmac.compare_digest(token.strip().encode(), self.api_key.encode())

    def _too_large(self, size: int) -> JSONResponse:
        return error_response(413, f"The request body is at least {size} bytes; this server accepts at most "
                                   f"{self.max_body_bytes} (--max-body-bytes).", None, "request_too_large")
