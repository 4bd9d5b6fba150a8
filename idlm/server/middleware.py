"""The ASGI guard in front of the app: API key, body size and body read time.

Why it exists: these checks must hold for every route and before a handler reads anything, so they
live in one pure-ASGI middleware (no per-route code, no buffering):
- `Authorization: Bearer <key>` on every path but /health, compared in constant time (`hmac`);
- the body bound: a Content-Length above `max_body_bytes` is refused before reading, and a chunked
  body is cut off as soon as it grows past it (413);
- a client that has not sent its whole body `body_timeout` seconds after its headers (slowloris)
  gets 408; idle keep-alive connections are closed by uvicorn (`--timeout-keep-alive`).
Every refusal is an OpenAI-style JSON error.
"""

from __future__ import annotations

import asyncio
import hmac

from fastapi.responses import JSONResponse

from idlm.server.protocol import ApiError, error_body


class BodyTooLarge(ApiError):
    def __init__(self, limit: int):
        super().__init__(413, f"request body is larger than {limit} bytes", code="request_too_large")


class BodyTimeout(ApiError):
    def __init__(self, timeout: float):
        super().__init__(408, f"the request body did not arrive within {timeout:g} s", code="request_timeout")


def error_response(e: ApiError) -> JSONResponse:
    return JSONResponse(e.body(), status_code=e.status, headers=e.headers)


class GuardMiddleware:
    def __init__(self, app, api_key: str | None, max_body_bytes: int, body_timeout: float = 30.0):
        self.app, self.max_body_bytes, self.body_timeout = app, max_body_bytes, body_timeout
        self.key = None if api_key is None else f"Bearer {api_key}".encode()

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        headers = dict(scope.get("headers", []))
        if self.key is not None and scope.get("path") != "/health":
            auth = headers.get(b"authorization", b"")
            if not hmac.compare_digest(auth, self.key):
                msg = "missing API key" if not auth else "invalid API key"
                resp = JSONResponse(error_body(f"{msg}: send 'Authorization: Bearer <key>'", "authentication_error",
                                               None, "invalid_api_key"), status_code=401)
                return await resp(scope, receive, send)
        limit, timeout = self.max_body_bytes, self.body_timeout
        try:
            too_big = int(headers.get(b"content-length", b"0")) > limit
        except ValueError:
            too_big = False
        if too_big:
            return await error_response(BodyTooLarge(limit))(scope, receive, send)
        seen, complete = 0, False
        deadline = asyncio.get_running_loop().time() + timeout

        async def guarded_receive():
            nonlocal seen, complete
            if complete:  # the body is in: what follows is the wait for a disconnect, however long
                return await receive()
            try:
                msg = await asyncio.wait_for(receive(), max(0.0, deadline - asyncio.get_running_loop().time()))
            except asyncio.TimeoutError:
                raise BodyTimeout(timeout) from None
            if msg["type"] == "http.request":
                seen += len(msg.get("body", b""))
                if seen > limit:
                    raise BodyTooLarge(limit)
                complete = not msg.get("more_body", False)
            return msg

        return await self.app(scope, guarded_receive, send)
