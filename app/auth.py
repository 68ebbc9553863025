"""API-key authentication: which paths need the key, and a pure ASGI middleware that enforces it.

Model endpoints need the key when one is configured; admin endpoints always do (403 while none is
configured); operational endpoints (probes, metrics, docs) only with `protect_ops_endpoints`.
"""

from __future__ import annotations

import hashlib
import hmac
from collections.abc import Mapping
from functools import lru_cache
from typing import Any, Literal

from pydantic import SecretStr
from starlette.datastructures import Headers
from starlette.types import ASGIApp, Receive, Scope, Send

from app.errors import AdminDisabled, Unauthorized, VaeError
from app.routing import path_templates

Access = Literal["public", "ops", "model", "admin"]
MODEL_TAG, ADMIN_TAG = "model", "admin"
# The Open Inference Protocol's model routes (app/oip): the same access as the model endpoints.
INFERENCE_PROTOCOL_TAG = "open inference protocol"
MODEL_ACCESS_TAGS = frozenset({MODEL_TAG, INFERENCE_PROTOCOL_TAG})
# The explorer's page and scripts (app/web): never behind the key, since a browser cannot send it when it
# loads a page; they hold no data, and every call they make goes to a model endpoint, which checks the key.
PUBLIC_TAG = "page"
_STRICTNESS: dict[Access, int] = {"public": 0, "ops": 1, "model": 2, "admin": 3}
BEARER_SCHEME, API_KEY_HEADER_SCHEME = "BearerAuth", "ApiKeyHeader"
# Paths with parameters whose level is remembered (least recently used first out: arbitrary paths cannot
# grow it).
TEMPLATED_LEVELS_CACHED = 4096


def route_access(routes: list[Any]) -> dict[str, Access]:
    """Access level per route path (template), from the route's tags: "admin", "model", "public" (the
    explorer's page), otherwise "ops"."""
    levels: dict[str, Access] = {}
    for route in routes:
        path, tags = getattr(route, "path", None), set(getattr(route, "tags", None) or [])
        if isinstance(path, str):
            levels[path] = (
                "admin"
                if ADMIN_TAG in tags
                else "model"
                if tags & MODEL_ACCESS_TAGS
                else "public"
                if PUBLIC_TAG in tags
                else "ops"
            )
    return levels


def presented_keys(headers: Headers) -> list[str]:
    """The keys a request presents: `Authorization: Bearer <key>` and/or `X-API-Key: <key>`."""
    keys = []
    scheme, _, credentials = headers.get("authorization", "").partition(" ")
    if scheme.lower() == "bearer" and credentials.strip():
        keys.append(credentials.strip())
    if header_key := headers.get("x-api-key", "").strip():
        keys.append(header_key)
    return keys


def key_matches(presented: list[str], api_key: SecretStr) -> bool:
    """Constant-time comparison of equal-length digests: timing reveals neither a prefix nor the length."""
    expected = hashlib.sha256(api_key.get_secret_value().encode()).digest()
    matches = [hmac.compare_digest(hashlib.sha256(key.encode()).digest(), expected) for key in presented]
    return any(matches)


class ApiKeyPolicy:
    """Which requests need the API key, and the refusal for one that lacks it.

    CORS preflights (OPTIONS) pass: browsers never send credentials with them.
    """

    def __init__(
        self, api_key: SecretStr | None, protect_ops_endpoints: bool, access: Mapping[str, Access]
    ) -> None:
        self.api_key = api_key
        self.protect_ops_endpoints = protect_ops_endpoints
        self.access = access
        # Paths with parameters, by the router's own regexes.
        self.templated = [(regex, access[path]) for regex, path in path_templates(access)]
        # Matching them all cost 3.5 us for /models/<name>/encode; the paths a server sees repeat.
        self._templated_level = lru_cache(maxsize=TEMPLATED_LEVELS_CACHED)(self._match_templates)

    def level(self, path: str) -> Access:
        """The route's level; for a path with parameters, the strictest of the templates it matches."""
        level = self.access.get(path)
        if level is not None:
            return level
        return self._templated_level(path)

    def _match_templates(self, path: str) -> Access:
        matched = [templated for regex, templated in self.templated if regex.match(path)]
        if matched:
            return max(matched, key=_STRICTNESS.__getitem__)
        return "admin" if path.startswith("/admin/") else "ops"

    def required(self, path: str) -> bool:
        level = self.level(path)
        if level == "public":
            return False
        if level == "admin":
            return True
        return self.api_key is not None and (level == "model" or self.protect_ops_endpoints)

    def refusal(self, scope: Scope) -> VaeError | None:
        """401 without the configured key, 403 for admin requests when none is set, None when it may pass."""
        if scope["method"] == "OPTIONS" or not self.required(scope["path"]):
            return None
        if self.api_key is None:
            return AdminDisabled()
        presented = presented_keys(Headers(scope=scope))
        if not presented:
            return Unauthorized(
                "this endpoint needs the API key as 'Authorization: Bearer <key>' or 'X-API-Key: <key>'"
            )
        if not key_matches(presented, self.api_key):
            return Unauthorized("the API key is not valid")
        return None


class ApiKeyMiddleware:
    """Answer requests that `policy` refuses with its 401 or 403 problem."""

    def __init__(self, app: ASGIApp, policy: ApiKeyPolicy) -> None:
        self.app = app
        self.policy = policy

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        error = self.policy.refusal(scope) if scope["type"] == "http" else None
        if error is None:
            await self.app(scope, receive, send)
            return
        await error.response()(scope, receive, send)


def document_security(
    schema: dict[str, Any], api_key_set: bool, protect_ops_endpoints: bool, problem_schema: dict[str, Any]
) -> None:
    """Add the two API-key schemes to an OpenAPI schema, mark the operations that need them, and document
    the refusal each can give: 401 without the key, or, on /admin while no key is configured, 403."""
    components = schema.setdefault("components", {})
    components["securitySchemes"] = {
        BEARER_SCHEME: {"type": "http", "scheme": "bearer", "description": "Authorization: Bearer <key>"},
        API_KEY_HEADER_SCHEME: {"type": "apiKey", "in": "header", "name": "X-API-Key"},
    }
    either: list[dict[str, list[str]]] = [{BEARER_SCHEME: []}, {API_KEY_HEADER_SCHEME: []}]
    for operations in schema.get("paths", {}).values():
        for operation in operations.values():
            tags = operation.get("tags", [])
            if (
                ADMIN_TAG in tags
                or (api_key_set and MODEL_ACCESS_TAGS.intersection(tags))
                or (api_key_set and protect_ops_endpoints)
            ):
                operation["security"] = either
                content = {"application/problem+json": {"schema": problem_schema}}
                if api_key_set:
                    refusal = {"description": "Missing or invalid API key.", "content": content}
                    operation.setdefault("responses", {})["401"] = refusal
                else:  # every request is refused before anything else is checked
                    description = "No API key is configured, so the admin endpoints are disabled."
                    operation["responses"] = {"403": {"description": description, "content": content}}
