"""Pure ASGI middleware: request metrics, and the request guard (deadline, body size, disconnect)."""

from __future__ import annotations

import asyncio
import time

from starlette.datastructures import Headers
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from app.errors import DeadlineExceeded, RequestTooLarge, VaeError, problem_response
from app.metrics import Metrics

KNOWN_METHODS = frozenset({"GET", "HEAD", "POST", "PUT", "PATCH", "DELETE", "OPTIONS"})
# Recorded as the status of requests whose client went away before an answer (nginx's convention).
CLIENT_CLOSED_REQUEST = 499


class MetricsMiddleware:
    """Count and time every HTTP request by route template ("other" for unknown paths) and status."""

    def __init__(self, app: ASGIApp, metrics: Metrics, route_paths: frozenset[str]) -> None:
        self.app = app
        self.metrics = metrics
        self.route_paths = route_paths

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        status = CLIENT_CLOSED_REQUEST

        async def send_recording_status(message: Message) -> None:
            nonlocal status
            if message["type"] == "http.response.start":
                status = message["status"]
            await send(message)

        started = time.perf_counter()
        self.metrics.requests_in_flight.inc()
        try:
            await self.app(scope, receive, send_recording_status)
        except Exception:
            status = 500  # Starlette's outermost error middleware answers with the 500 problem
            raise
        finally:
            path = scope["path"]
            endpoint = path if path in self.route_paths else "other"
            method = scope["method"] if scope["method"] in KNOWN_METHODS else "other"
            self.metrics.requests.labels(endpoint=endpoint, method=method, status=str(status)).inc()
            self.metrics.request_duration_seconds.labels(endpoint=endpoint).observe(
                time.perf_counter() - started
            )
            self.metrics.requests_in_flight.dec()


class _Guard:
    """One guarded request: its deadline, body bytes seen, response progress, disconnect watcher."""

    def __init__(self, receive: Receive, send: Send, max_body_bytes: int) -> None:
        self.receive = receive
        self.send = send
        self.max_body_bytes = max_body_bytes
        self.body_bytes = 0
        self.response_started = False
        self.response_complete = False
        self.client_gone = asyncio.Event()
        self.watcher: asyncio.Task[None] | None = None
        self.app_saw_body_end = False
        self.deadline: asyncio.Timeout | None = None

    async def receive_for_app(self) -> Message:
        if self.watcher is not None:  # the watcher owns the real receive channel once the body is in
            if not self.app_saw_body_end:
                self.app_saw_body_end = True
                return {"type": "http.request", "body": b"", "more_body": False}
            await self.client_gone.wait()
            return {"type": "http.disconnect"}
        message = await self.receive()
        if message["type"] == "http.request":
            self.body_bytes += len(message.get("body", b""))
            if self.body_bytes > self.max_body_bytes:
                raise RequestTooLarge(self.max_body_bytes)
            if not message.get("more_body", False):
                self.app_saw_body_end = True
                self.watch_for_disconnect()
        return message

    async def send_from_app(self, message: Message) -> None:
        if message["type"] == "http.response.start":
            self.response_started = True
        elif message["type"] == "http.response.body" and not message.get("more_body", False):
            self.response_complete = True
        await self.send(message)

    def watch_for_disconnect(self) -> None:
        self.watcher = asyncio.get_running_loop().create_task(self._watch())

    async def _watch(self) -> None:
        while True:
            message = await self.receive()
            if message["type"] == "http.disconnect":
                break
        if self.response_complete or self.deadline is None:
            return
        self.client_gone.set()
        self.deadline.reschedule(asyncio.get_running_loop().time())  # cancel the request's work now

    def stop_watching(self) -> None:
        if self.watcher is not None:
            self.watcher.cancel()
        self.deadline = None


class RequestGuardMiddleware:
    """Bound every HTTP request: body size (413), deadline (504), and cancel its work when the client leaves.

    Cancelling the request's task drops its not-yet-started items from the batcher queues.
    """

    def __init__(self, app: ASGIApp, metrics: Metrics, timeout_seconds: float, max_body_bytes: int) -> None:
        self.app = app
        self.metrics = metrics
        self.timeout_seconds = timeout_seconds
        self.max_body_bytes = max_body_bytes

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        headers = Headers(scope=scope)
        content_length = headers.get("content-length")
        if (
            content_length is not None
            and content_length.isdigit()
            and int(content_length) > self.max_body_bytes
        ):
            await self._answer(RequestTooLarge(self.max_body_bytes), scope, receive, send)
            return
        guard = _Guard(receive, send, self.max_body_bytes)
        try:
            async with asyncio.timeout(self.timeout_seconds) as deadline:
                guard.deadline = deadline
                if content_length in (None, "0") and "transfer-encoding" not in headers:
                    guard.watch_for_disconnect()  # no body: listen for the disconnect from the start
                await self.app(scope, guard.receive_for_app, guard.send_from_app)
        except TimeoutError:
            guard.stop_watching()
            if not deadline.expired():
                raise
            if guard.client_gone.is_set() or guard.response_started:
                return  # nobody to answer, or too late to change the answer
            self.metrics.requests_rejected.labels(reason="timeout").inc()
            await self._answer(DeadlineExceeded(self.timeout_seconds), scope, receive, send)
        finally:
            guard.stop_watching()

    @staticmethod
    async def _answer(error: VaeError, scope: Scope, receive: Receive, send: Send) -> None:
        response = problem_response(error.status, error.title, error.detail, error.type, error.headers)
        await response(scope, receive, send)
