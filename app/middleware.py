"""Pure ASGI middleware: request metrics, and the request guard (deadline, body size, disconnect)."""

from __future__ import annotations

import asyncio
import time
from collections.abc import Callable, Mapping

from prometheus_client import Counter, Histogram
from starlette.datastructures import Headers
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from app.engine import Engine
from app.errors import DeadlineExceeded, QueueFull, RequestTooLarge, VaeError, problem_response
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
        self._cache: dict[tuple[str, str, int], tuple[Counter, Histogram]] = {}

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
            counter, duration = self._children(scope["path"], scope["method"], status)
            counter.inc()
            duration.observe(time.perf_counter() - started)
            self.metrics.requests_in_flight.dec()

    def _children(self, path: str, method: str, status: int) -> tuple[Counter, Histogram]:
        """The labelled metric children for one request, cached: `labels()` costs microseconds per call."""
        key = (path, method, status)
        children = self._cache.get(key)
        if children is None:
            endpoint = path if path in self.route_paths else "other"
            method_label = method if method in KNOWN_METHODS else "other"
            children = (
                self.metrics.requests.labels(endpoint=endpoint, method=method_label, status=str(status)),
                self.metrics.request_duration_seconds.labels(endpoint=endpoint),
            )
            if endpoint != "other" and method_label != "other":  # arbitrary paths must not grow the cache
                self._cache[key] = children
        return children


# Requests answered within this time never start a disconnect watcher (a task costs ~50 us per request);
# slower ones, whose queued work is worth dropping, are watched from then on.
WATCH_FOR_DISCONNECT_AFTER_SECONDS = 0.05


class _Guard:
    """One guarded request: its deadline, body bytes seen, response progress, disconnect watcher."""

    def __init__(self, receive: Receive, send: Send, max_body_bytes: int, body_expected: bool) -> None:
        self.receive = receive
        self.send = send
        self.max_body_bytes = max_body_bytes
        self.body_bytes = 0
        self.body_done = not body_expected  # no more body messages for the app to read
        self.app_saw_body_end = False
        self.response_started = False
        self.response_complete = False
        self.deadline: asyncio.Timeout | None = None
        self.expires_at = 0.0
        self.watch_timer: asyncio.TimerHandle | None = None
        self.watch_wanted = False
        self.watcher: asyncio.Task[None] | None = None
        self.client_gone = asyncio.Event()

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
                self.app_saw_body_end = self.body_done = True
                if self.watch_wanted:
                    self._start_watcher()
        return message

    async def send_from_app(self, message: Message) -> None:
        if message["type"] == "http.response.start":
            self.response_started = True
        elif message["type"] == "http.response.body" and not message.get("more_body", False):
            self.response_complete = True
        await self.send(message)

    def watch_later(self, deadline: asyncio.Timeout, timeout_seconds: float) -> None:
        """Arm the deadline, and watch for a disconnect once the request has taken a while.

        One timer does both: most requests are answered before it fires, so they never pay for a second.
        """
        self.deadline = deadline
        loop = asyncio.get_running_loop()
        self.expires_at = loop.time() + timeout_seconds
        if timeout_seconds <= WATCH_FOR_DISCONNECT_AFTER_SECONDS:
            deadline.reschedule(self.expires_at)
        self.watch_timer = loop.call_later(WATCH_FOR_DISCONNECT_AFTER_SECONDS, self._want_watcher)

    def _want_watcher(self) -> None:
        if self.deadline is not None and self.deadline.when() is None:
            self.deadline.reschedule(self.expires_at)
        self.watch_wanted = True
        if self.body_done:  # otherwise the app still reads the body; start when it has it all
            self._start_watcher()

    def _start_watcher(self) -> None:
        if self.watcher is None and self.deadline is not None:
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
        self.deadline = None
        if self.watch_timer is not None:
            self.watch_timer.cancel()
        if self.watcher is not None:
            self.watcher.cancel()


class RequestGuardMiddleware:
    """Bound every HTTP request: full queue (503), body size (413), deadline (504), and cancel its work when
    the client leaves.

    Cancelling the request's task drops its not-yet-started items from the batcher queues.
    """

    def __init__(
        self,
        app: ASGIApp,
        metrics: Metrics,
        timeout_seconds: float,
        max_body_bytes: int,
        serving_engine: Callable[[], Engine | None],
        first_queue_by_route: Mapping[tuple[str, str], str],
    ) -> None:
        self.app = app
        self.metrics = metrics
        self.timeout_seconds = timeout_seconds
        self.max_body_bytes = max_body_bytes
        self.serving_engine = serving_engine
        self.first_queue_by_route = first_queue_by_route

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        part = self.first_queue_by_route.get((scope["method"], scope["path"]))
        if part is not None and (engine := self.serving_engine()) is not None:
            # Shed load before parsing: the request's first queue is full, so it would get this 503 anyway,
            # after costing several times more CPU. Cheap refusals keep results flowing under overload.
            try:
                engine.check_room(part)
            except QueueFull as error:
                await self._answer(error, scope, receive, send)
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
        body_expected = content_length not in (None, "0") or "transfer-encoding" in headers
        guard = _Guard(receive, send, self.max_body_bytes, body_expected)
        try:
            async with asyncio.timeout(None) as deadline:  # armed by the guard's timer
                guard.watch_later(deadline, self.timeout_seconds)
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
