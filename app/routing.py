"""QueryRoute: a FastAPI route for endpoints that take the request and query parameters and return a Response.

FastAPI's generic request handler (dependency solving, one validation per parameter, response serialisation)
cost about 45 us per request, a sixth of /encode's time on the event loop. This route validates the whole
query string with one pydantic model built from the endpoint's own `Query()` declarations, so the OpenAPI
schema, the accepted values and the 422 errors stay FastAPI's, and then calls the endpoint. A query
parameter the endpoint does not take is refused with 422 naming the ones it does (FastAPI ignores them, so
`/sample?nn=4` silently answered one image); an empty query string skips both checks.
"""

from __future__ import annotations

import inspect
import re
from collections.abc import Callable, Coroutine, Iterable
from typing import Any

from fastapi.dependencies.utils import is_scalar_field
from fastapi.exceptions import RequestValidationError
from fastapi.routing import APIRoute
from pydantic import BaseModel, ValidationError, create_model
from starlette.datastructures import URLPath
from starlette.requests import Request
from starlette.responses import Response
from starlette.routing import BaseRoute, Match, NoMatchFound, compile_path
from starlette.types import Receive, Scope, Send

from app.errors import InvalidRequest


class QueryRoute(APIRoute):
    """An APIRouter's route_class; the endpoint must be `async`, take only `request: Request` and scalar query
    parameters without default factories (checked when the route is built), and return a Response.

    Add its routes to the app's own route list (app/main.py): dependencies given to include_router would
    not run.
    """

    def get_route_handler(self) -> Callable[[Request], Coroutine[Any, Any, Response]]:
        dependant = self.dependant
        unsupported = (
            dependant.path_params,
            dependant.header_params,
            dependant.cookie_params,
            dependant.body_params,
            dependant.dependencies,
            dependant.response_param_name,
            dependant.background_tasks_param_name,
            dependant.http_connection_param_name,
            dependant.websocket_param_name,
            dependant.security_scopes_param_name,
        )
        if (
            dependant.request_param_name is None
            or any(unsupported)
            or not inspect.iscoroutinefunction(self.endpoint)
        ):
            raise TypeError(
                f"{self.path}: a QueryRoute endpoint is async and takes the Request and query parameters only"
            )
        query_model = _query_model(self.unique_id, dependant.query_params)
        request_name, endpoint = dependant.request_param_name, self.endpoint
        names = [field.name for field in dependant.query_params]
        accepted = [field.alias for field in dependant.query_params]
        route = f"{'/'.join(sorted(self.methods or ()))} {self.path}"

        def query_values(query_string: dict[str, str]) -> dict[str, Any]:
            unknown = query_string.keys() - set(accepted)
            if unknown:
                raise UnknownQueryParameters(route, sorted(unknown), accepted)
            try:
                query = query_model.model_validate(query_string)
            except ValidationError as error:
                raise RequestValidationError(
                    [{**item, "loc": ("query", *item["loc"])} for item in error.errors(include_url=False)]
                ) from None
            return {name: getattr(query, name) for name in names}

        try:  # what an empty query string means, worked out once
            defaults: dict[str, Any] | None = query_values({})
        except RequestValidationError:
            defaults = None  # a parameter is required

        async def handler(request: Request) -> Response:
            if defaults is not None and not request.scope["query_string"]:
                values = defaults
            else:
                values = query_values(dict(request.query_params))
            response = await endpoint(**{request_name: request}, **values)
            if not isinstance(response, Response):
                raise TypeError(f"{self.path}: a QueryRoute endpoint must return a Response")
            return response

        return handler


class UnknownQueryParameters(InvalidRequest):
    def __init__(self, route: str, unknown: list[str], accepted: list[str]) -> None:
        names = ", ".join(repr(name) for name in unknown)
        takes = f"it takes {', '.join(accepted)}" if accepted else "it takes none"
        plural = "s" if len(unknown) > 1 else ""
        super().__init__(f"unknown query parameter{plural} {names} for {route}; {takes}")


def _query_model(name: str, fields: list[Any]) -> type[BaseModel]:
    """One model with the endpoint's query parameters as fields, each read from its URL name (alias)."""
    for field in fields:
        if not is_scalar_field(field) or field.field_info.default_factory is not None:
            raise TypeError(
                f"query parameter {field.alias!r}: a QueryRoute takes scalars with plain defaults only"
            )
    definitions: dict[str, Any] = {
        field.name: (field.field_info.annotation, field.field_info) for field in fields
    }
    return create_model(f"{name}_query", **definitions)


def path_templates(paths: Iterable[str]) -> list[tuple[re.Pattern[str], str]]:
    """The route paths with parameters (`/v2/models/{model_name}/infer`), each with the regex the router
    matches requests by, in the given order."""
    return [(compile_path(path)[0], path) for path in paths if "{" in path]


class PrefixedRoutes(BaseRoute):
    """The routes under one parameter prefix (`/models/{model_name}`), found by the rest of the path in a
    dict instead of one regex per route.

    Starlette's router tries every route in order: /models/mnist-vae/encode, listed after the ~40 other
    routes, cost 30 us of matching against 1.8 us for /encode (17% of its throughput). This route goes
    before them and matches only the route its path names, with that route's own `matches`, so the
    answer (full match, 405 partial match, path parameters) is the router's. The prefixed routes stay in
    the app's route list as well, for the OpenAPI document, the API key levels and the metrics; without
    this route (its one `insert` in app/main.py) the router finds them there, only slower.
    """

    def __init__(self, prefix: str, routes: list[APIRoute]) -> None:
        head, _, parameter = prefix.partition("{")
        if not head.endswith("/") or not parameter.endswith("}") or "/" in parameter:
            raise ValueError(f"{prefix!r}: a prefix ends with one path parameter, e.g. '/models/{{name}}'")
        self.head = head
        self.by_rest: dict[str, list[APIRoute]] = {}
        for route in routes:
            if not route.path.startswith(prefix + "/"):
                raise ValueError(f"{route.path!r} is not under {prefix!r}")
            self.by_rest.setdefault(route.path.removeprefix(prefix), []).append(route)

    def matches(self, scope: Scope) -> tuple[Match, Scope]:
        if scope["type"] != "http":
            return Match.NONE, {}
        path: str = scope["path"]
        if not path.startswith(self.head) or scope.get("root_path"):
            return Match.NONE, {}
        _, slash, rest = path[len(self.head) :].partition("/")
        partial: tuple[Match, Scope] | None = None
        for route in self.by_rest.get(slash + rest, ()):
            match, child_scope = route.matches(scope)
            if match == Match.FULL:
                return match, child_scope
            if match == Match.PARTIAL and partial is None:
                partial = match, child_scope
        return partial or (Match.NONE, {})

    async def handle(self, scope: Scope, receive: Receive, send: Send) -> None:
        route: APIRoute = scope["route"]  # the matched route, which APIRoute.matches puts in the scope
        await route.handle(scope, receive, send)

    def url_path_for(self, name: str, /, **path_params: Any) -> URLPath:
        raise NoMatchFound(name, path_params)  # the prefixed routes answer for themselves in the app's list
