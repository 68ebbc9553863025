"""The protocol's error body on /v2: `{"error": "<detail>"}` as application/json, for every error there.

The service renders all its errors as problem JSON, wherever they arise (the load shedder, the API key, the
request guard, the routes, Starlette's 404 and 405). Clients of the protocol (tritonclient, KServe's) read
`error` from the body and cannot report anything else, so this outer layer rewrites problem JSON answers to
/v2 paths, keeping the status and every other header (Retry-After, WWW-Authenticate). Other paths pass
through untouched.
"""

from __future__ import annotations

import json

from starlette.datastructures import MutableHeaders
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from app.errors import PROBLEM_MEDIA_TYPE
from app.oip.routes import PROTOCOL_PREFIX


def is_protocol_path(path: str) -> bool:
    return path == PROTOCOL_PREFIX or path.startswith(PROTOCOL_PREFIX + "/")


def protocol_error_body(problem: bytes) -> bytes:
    """`{"error": detail}` from a problem JSON body."""
    detail = json.loads(problem).get("detail", "")
    return json.dumps({"error": detail}).encode()


class ProtocolErrorMiddleware:
    """Rewrite problem JSON responses to /v2 paths as the protocol's `{"error"}` body."""

    def __init__(self, app: ASGIApp) -> None:
        self.app = app

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http" or not is_protocol_path(scope["path"]):
            await self.app(scope, receive, send)
            return
        problem_start: Message | None = None
        problem = bytearray()

        async def send_protocol_error(message: Message) -> None:
            nonlocal problem_start
            if message["type"] == "http.response.start":
                content_type = MutableHeaders(raw=message.get("headers", [])).get("content-type", "")
                if content_type.startswith(PROBLEM_MEDIA_TYPE):
                    problem_start = message
                    return
            elif problem_start is not None and message["type"] == "http.response.body":
                problem.extend(message.get("body", b""))
                if message.get("more_body", False):
                    return
                body = protocol_error_body(bytes(problem))
                headers = MutableHeaders(raw=list(problem_start.get("headers", [])))
                headers["content-type"] = "application/json"
                headers["content-length"] = str(len(body))
                await send({**problem_start, "headers": headers.raw})
                await send({"type": "http.response.body", "body": body})
                return
            await send(message)

        await self.app(scope, receive, send_protocol_error)
