"""Pure ASGI middleware: request metrics, load shedding, the request guard (deadline, body, disconnect)."""

from __future__ import annotations

import asyncio
import time
from collections.abc import Callable, Sequence

from fastapi.routing import APIRoute
from prometheus_client import Counter, Histogram
from starlette.datastructures import Headers
from starlette.routing import BaseRoute, Route
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from app.auth import ApiKeyPolicy
from app.errors import DeadlineExceeded, QueueFull, RequestTooLarge
from app.metrics import Metrics
from app.registry import MODEL_SCOPE_KEY, ModelRegistry
from app.routing import path_templates

KNOWN_METHODS = frozenset({"GET", "HEAD", "POST", "PUT", "PATCH", "DELETE", "OPTIONS"})
# Recorded as the status of requests whose client went away before an answer (nginx's convention).
CLIENT_CLOSED_REQUEST = 499


class RequestRecorder:
    """vae_requests_total and vae_request_duration_seconds by route template ("other" for unknown paths),
    method, status and model. A path with parameters counts under its template,
    `/models/{model_name}/encode`, routed or not (the load shedder answers before routing); the model is the
    one the request used (empty for routes of no model, and for unknown models)."""

    def __init__(self, metrics: Metrics, routes: Sequence[BaseRoute]) -> None:
        self.metrics = metrics
        paths = [path for route in routes if isinstance(path := getattr(route, "path", None), str)]
        self.route_paths = frozenset(paths)
        self.templates = path_templates(paths)
        self._cache: dict[tuple[str, str, int, str], tuple[Counter, Histogram]] = {}

    def record(self, scope: Scope, status: int, duration_seconds: float) -> None:
        model = scope.get(MODEL_SCOPE_KEY, "")
        counter, duration = self._children(self._template(scope), scope["method"], status, model)
        counter.inc()
        duration.observe(duration_seconds)

    def _template(self, scope: Scope) -> str:
        path: str = scope["path"]
        if path in self.route_paths:
            return path
        route = scope.get("route")
        if isinstance(route, Route | APIRoute):
            return route.path
        return next((template for regex, template in self.templates if regex.match(path)), path)

    def _children(self, path: str, method: str, status: int, model: str) -> tuple[Counter, Histogram]:
        """The labelled metric children for one request, cached: `labels()` costs microseconds per call.
        `model` is always a served model's name or empty, so it cannot grow the cache without bound."""
        key = (path, method, status, model)
        children = self._cache.get(key)
        if children is None:
            endpoint = path if path in self.route_paths else "other"
            method_label = method if method in KNOWN_METHODS else "other"
            children = (
                self.metrics.requests.labels(
                    endpoint=endpoint, method=method_label, status=str(status), model=model
                ),
                self.metrics.request_duration_seconds.labels(endpoint=endpoint, model=model),
            )
            if endpoint != "other" and method_label != "other":  # arbitrary paths must not grow the cache
                self._cache[key] = children
        return children


class MetricsMiddleware:
    """Count and time every HTTP request that reaches the app's middleware stack."""

    def __init__(self, app: ASGIApp, recorder: RequestRecorder) -> None:
        self.app = app
        self.recorder = recorder
        self.in_flight = recorder.metrics.requests_in_flight

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
        self.in_flight.inc()
        try:
            await self.app(scope, receive, send_recording_status)
        except Exception:
            status = 500  # Starlette's outermost error middleware answers with the 500 problem
            raise
        finally:
            self.recorder.record(scope, status, time.perf_counter() - started)
            self.in_flight.dec()


class LoadShedder:
    """While a model route's first queue (its model's encoder or decoder) is full, answer its requests with
    the 503 problem before anything else runs: they would get it anyway, after costing several times more
    CPU. Each model has its own queues, so one model's overload never refuses another's requests.

    The app's outermost layer but CORS (app/main.py), so a refusal skips FastAPI's middleware stack; cheap
    refusals keep results flowing under overload. Requests the API key policy refuses pass on, to get
    their 401 or 403: callers without the key learn nothing about load.
    """

    def __init__(
        self,
        app: ASGIApp,
        recorder: RequestRecorder,
        api_keys: ApiKeyPolicy,
        registry: Callable[[], ModelRegistry | None],
        first_queue: Callable[[str, str, ModelRegistry], tuple[str, str] | None],
    ) -> None:
        self.app = app
        self.recorder = recorder
        self.api_keys = api_keys
        self.registry = registry
        self.first_queue = first_queue

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] == "http" and (registry := self.registry()) is not None:
            queue = self.first_queue(scope["method"], scope["path"], registry)
            engine = registry.engine_if_ready(queue[0]) if queue is not None else None
            if (
                queue is not None
                and engine is not None
                and not engine.has_room(queue[1])
                and self.api_keys.refusal(scope) is None
            ):
                model, part = queue
                scope[MODEL_SCOPE_KEY] = model
                started = time.perf_counter()
                try:
                    engine.check_room(part)  # counts the rejection
                except QueueFull as error:
                    await error.response()(scope, receive, send)
                    self.recorder.record(scope, error.status, time.perf_counter() - started)
                    return
        await self.app(scope, receive, send)


# Requests answered within this time never start a disconnect watcher (a task costs ~50 us per request);
# slower ones, whose queued work is worth dropping, are watched from then on.
WATCH_FOR_DISCONNECT_AFTER_SECONDS = 0.05
# One timer for all requests checks deadlines and starts watchers this often (a timer per request cost 3%
# of /encode); so a deadline fires up to this late.
GUARD_TICK_SECONDS = 0.025


class _Guard:
    """One guarded request: its deadline, body bytes seen, response progress, disconnect watcher.

    Expiry cancels the request's task the way asyncio.timeout does; RequestGuardMiddleware's tick calls
    `want_watcher` and `expire` on requests in flight.
    """

    def __init__(
        self, receive: Receive, send: Send, max_body_bytes: int, body_expected: bool, timeout_seconds: float
    ) -> None:
        self.receive = receive
        self.send = send
        self.max_body_bytes = max_body_bytes
        self.body_bytes = 0
        self.body_done = not body_expected  # no more body messages for the app to read
        self.app_saw_body_end = False
        self.response_started = False
        self.response_complete = False
        self.task = asyncio.current_task()
        assert self.task is not None
        self.cancelling = self.task.cancelling()  # cancellation requests from elsewhere, before the guard
        self.cancelled = False  # the guard cancelled the task: deadline or disconnect
        self.started_at = asyncio.get_running_loop().time()
        self.expires_at = self.started_at + timeout_seconds
        self.watcher: asyncio.Task[None] | None = None
        self.watch_wanted = False
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

    def want_watcher(self) -> None:
        self.watch_wanted = True
        if self.body_done:  # otherwise the app still reads the body; start when it has it all
            self._start_watcher()

    def expire(self) -> None:
        """Cancel the request's work: its deadline passed, or its client left."""
        if not self.cancelled and self.task is not None:
            self.cancelled = True
            self.task.cancel()

    def _start_watcher(self) -> None:
        if self.watcher is None and self.task is not None:
            self.watcher = asyncio.get_running_loop().create_task(self._watch())

    async def _watch(self) -> None:
        while True:
            message = await self.receive()
            if message["type"] == "http.disconnect":
                break
        if not self.response_complete:
            self.client_gone.set()
            self.expire()

    def stop(self) -> bool:
        """Stop watching; True if the guard's cancellation, and no other, ended the task.

        Like asyncio.timeout's exit, a cancellation the guard requested is withdrawn (`uncancel`) either way.
        """
        task, self.task = self.task, None
        if self.watcher is not None:
            self.watcher.cancel()
        return task is not None and self.cancelled and task.uncancel() <= self.cancelling


class RequestGuardMiddleware:
    """Bound every HTTP request: body size (413), deadline (504), and cancel its work when the client leaves.

    Cancelling the request's task drops its not-yet-started items from the batcher queues.
    """

    def __init__(
        self,
        app: ASGIApp,
        metrics: Metrics,
        timeout_seconds: float,
        max_body_bytes: int,
    ) -> None:
        self.app = app
        self.metrics = metrics
        self.timeout_seconds = timeout_seconds
        self.max_body_bytes = max_body_bytes
        # Requests in flight, in arrival order, which is deadline order: every request has the same timeout.
        self._in_flight: dict[_Guard, None] = {}
        self._ticker: asyncio.TimerHandle | None = None
        self._ticker_loop: asyncio.AbstractEventLoop | None = None

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
            await RequestTooLarge(self.max_body_bytes).response()(scope, receive, send)
            return
        body_expected = content_length not in (None, "0") or "transfer-encoding" in headers
        guard = _Guard(receive, send, self.max_body_bytes, body_expected, self.timeout_seconds)
        self._track(guard)
        try:
            await self.app(scope, guard.receive_for_app, guard.send_from_app)
        except asyncio.CancelledError:
            if not guard.stop():
                raise
            if guard.client_gone.is_set() or guard.response_started:
                return  # nobody to answer, or too late to change the answer
            model = scope.get(MODEL_SCOPE_KEY, "")
            self.metrics.requests_rejected.labels(model=model, reason="timeout").inc()
            await DeadlineExceeded(self.timeout_seconds).response()(scope, receive, send)
        finally:
            guard.stop()
            del self._in_flight[guard]

    def _track(self, guard: _Guard) -> None:
        self._in_flight[guard] = None
        loop = asyncio.get_running_loop()
        if self._ticker is None or self._ticker_loop is not loop:  # e.g. a test ran the app on another loop
            self._ticker, self._ticker_loop = loop.call_later(GUARD_TICK_SECONDS, self._tick), loop

    def _tick(self) -> None:
        """Expire requests past their deadline, and watch those in flight for a while for a disconnect."""
        loop = asyncio.get_running_loop()
        now = loop.time()
        try:
            for guard in self._in_flight:  # oldest first; neither call below changes the dict
                if now - guard.started_at < WATCH_FOR_DISCONNECT_AFTER_SECONDS and now < guard.expires_at:
                    break
                if now >= guard.expires_at:
                    guard.expire()
                else:
                    guard.want_watcher()
        finally:  # whatever happened, later requests keep their deadlines
            self._ticker = loop.call_later(GUARD_TICK_SECONDS, self._tick) if self._in_flight else None
