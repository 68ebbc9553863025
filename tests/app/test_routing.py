"""QueryRoute reads query strings exactly as FastAPI's own route does: same values, same 422 problems;
PrefixedRoutes matches exactly as Starlette's router does."""

from __future__ import annotations

import inspect
import typing
from collections.abc import Callable
from typing import Annotated, Any
from urllib.parse import urlencode

import pytest
from fastapi import FastAPI, Query, Request
from fastapi.routing import APIRoute
from fastapi.testclient import TestClient
from hypothesis import example, given, settings
from hypothesis import strategies as st
from starlette.responses import Response
from starlette.routing import Match

from app.errors import install_error_handlers
from app.latent_routes import router as latent_router
from app.routes import query_router
from app.routing import PrefixedRoutes, QueryRoute
from app.score_routes import router as score_router
from app.serving import MODELS_PREFIX, model_routes


async def required_query(
    request: Request, count: Annotated[int, Query(ge=1, alias="n")], label: str = "x"
) -> Response:
    """Like no service endpoint (yet): a required parameter, so the empty query string is an error."""
    return Response()


ROUTES = [route for route in query_router.routes if isinstance(route, APIRoute)] + [
    APIRoute("/required", required_query, methods=["GET"])
]


def echo_endpoint(endpoint: Callable[..., Any]) -> Callable[..., Any]:
    """An endpoint with `endpoint`'s parameters that answers with the values it was called with."""

    async def echo(**values: Any) -> Response:
        values.pop("request")
        return Response(repr(sorted(values.items())))

    hints = typing.get_type_hints(endpoint, include_extras=True)
    signature = inspect.signature(endpoint)
    echo.__signature__ = signature.replace(  # type: ignore[attr-defined]
        parameters=[
            parameter.replace(annotation=hints[name]) for name, parameter in signature.parameters.items()
        ]
    )
    return echo


def client_for(route_class: type[APIRoute]) -> TestClient:
    app = FastAPI()
    install_error_handlers(app)
    for route in ROUTES:
        app.router.add_api_route(
            route.path,
            echo_endpoint(route.endpoint),
            methods=list(route.methods),
            route_class_override=route_class,
        )
    return TestClient(app)


FASTAPI_CLIENT, QUERY_ROUTE_CLIENT = client_for(APIRoute), client_for(QueryRoute)
KEYS = sorted(
    {name for route in ROUTES for field in route.dependant.query_params for name in (field.alias, field.name)}
)
VALUES = st.one_of(
    st.integers(min_value=-(2**70), max_value=2**70).map(str),
    st.floats().map(str),
    st.sampled_from(
        ["", "true", "false", "yes", "off", "2", "png", "array", "PNG", " 1", "1e3", "0x10", "nan"]
    ),
    st.text(max_size=8),
)


@pytest.mark.parametrize("route", ROUTES, ids=lambda route: route.path)
@settings(max_examples=150, deadline=None, database=None)
@given(query=st.lists(st.tuples(st.sampled_from([*KEYS, "other"]), VALUES), max_size=5))
def test_query_route_reads_queries_like_fastapi(route: APIRoute, query: list[tuple[str, str]]) -> None:
    """The same answer as FastAPI's, except that a parameter the route does not take is refused."""
    method = next(iter(route.methods))
    url = f"{route.path}?{urlencode(query)}"
    answered = QUERY_ROUTE_CLIENT.request(method, url)
    accepted = [field.alias for field in route.dependant.query_params]
    unknown = sorted({key for key, _ in query} - set(accepted))
    if unknown:
        assert answered.status_code == 422
        names = ", ".join(repr(name) for name in unknown)
        plural = "s" if len(unknown) > 1 else ""
        takes = ", ".join(accepted)
        assert answered.json()["detail"] == (
            f"unknown query parameter{plural} {names} for {method} {route.path}; it takes {takes}"
        )
        return
    expected = FASTAPI_CLIENT.request(method, url)
    assert (answered.status_code, answered.text) == (expected.status_code, expected.text)


async def with_body(request: Request, latents: list[float]) -> Response:
    return Response()


async def with_list(request: Request, seeds: Annotated[list[int], Query()]) -> Response:
    return Response()


async def with_factory(request: Request, seed: Annotated[int, Query(default_factory=lambda: 7)]) -> Response:
    return Response()


def synchronous(request: Request, seed: int = 0) -> Response:
    return Response()


@pytest.mark.parametrize("endpoint", [with_body, with_list, with_factory, synchronous])
def test_query_route_refuses_endpoints_it_cannot_serve(endpoint: Callable[..., Any]) -> None:
    app = FastAPI()
    with pytest.raises(TypeError, match="QueryRoute"):
        app.router.add_api_route("/x", endpoint, methods=["POST"], route_class_override=QueryRoute)


# PrefixedRoutes against Starlette's own matching: the prefixed model routes tried one by one in order.
PREFIXED = model_routes(query_router, latent_router, score_router)
SEGMENTS = st.sampled_from(["models", "mnist-vae", "a.b", "", "encode", "latent-map", "score", "x", "%2F"])


def starlette_match(scope: dict[str, Any]) -> tuple[Match, APIRoute | None, dict[str, Any]]:
    partial: tuple[Match, APIRoute | None, dict[str, Any]] | None = None
    for route in PREFIXED:
        match, child_scope = route.matches(scope)
        if match == Match.FULL:
            return match, route, child_scope.get("path_params", {})
        if match == Match.PARTIAL and partial is None:
            partial = match, route, child_scope.get("path_params", {})
    return partial or (Match.NONE, None, {})


@settings(max_examples=400, deadline=None)
@example(segments=["models", "mnist-vae", "encode"], trailing_slash=False, method="POST")  # full match
@example(segments=["models", "mnist-vae", "encode"], trailing_slash=False, method="GET")  # 405
@example(segments=["models", "", "score"], trailing_slash=False, method="POST")  # an empty name
@given(
    segments=st.lists(SEGMENTS, min_size=0, max_size=4),
    trailing_slash=st.booleans(),
    method=st.sampled_from(["GET", "POST", "PUT"]),
)
def test_prefixed_routes_match_exactly_as_starlette_does(
    segments: list[str], trailing_slash: bool, method: str
) -> None:
    path = "/" + "/".join(segments) + ("/" if trailing_slash else "")
    scope = {"type": "http", "path": path, "method": method, "root_path": ""}
    dispatcher = PrefixedRoutes(MODELS_PREFIX, PREFIXED)
    match, child_scope = dispatcher.matches(scope)
    expected = starlette_match(scope)
    assert (match, child_scope.get("route"), child_scope.get("path_params", {})) == expected, path


def test_prefixed_routes_refuse_what_they_cannot_dispatch() -> None:
    with pytest.raises(ValueError, match="ends with one path parameter"):
        PrefixedRoutes("/models", PREFIXED)
    with pytest.raises(ValueError, match="is not under"):
        PrefixedRoutes("/other/{name}", PREFIXED)
