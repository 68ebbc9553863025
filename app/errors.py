"""One error hierarchy, rendered as RFC 9457 problem JSON: `{"type", "title", "status", "detail"}`.

`VaeError` subclasses Starlette's `HTTPException` so errors raised while FastAPI reads a body pass through
unchanged; one handler renders them, Starlette's own HTTP errors, validation errors and unexpected errors.
"""

from __future__ import annotations

import json
import logging
from collections.abc import Mapping
from http import HTTPStatus
from typing import Any, ClassVar

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from starlette.exceptions import HTTPException
from starlette.responses import Response

logger = logging.getLogger(__name__)

PROBLEM_MEDIA_TYPE = "application/problem+json"


class VaeError(HTTPException):
    """An error a caller can act on; subclasses fix the HTTP status and title."""

    status: ClassVar[int] = 500
    title: ClassVar[str] = "Internal server error"
    slug: ClassVar[str] = "internal-error"

    def __init__(self, detail: str, headers: Mapping[str, str] | None = None) -> None:
        super().__init__(status_code=self.status, detail=detail, headers=headers)

    @property
    def type(self) -> str:
        return f"urn:vae-service:problem:{self.slug}"

    def response(self) -> Response:
        """This error as the problem JSON response."""
        return problem_response(self.status, self.title, self.detail, self.type, self.headers)


class BadRequest(VaeError):
    """A request the Open Inference Protocol answers with 400: its body, shapes or datatypes are wrong."""

    status, title, slug = 400, "Bad request", "bad-request"


class UnknownModel(VaeError):
    status, title, slug = 404, "Unknown model", "unknown-model"


class UnsupportedMediaType(VaeError):
    status, title, slug = 415, "Unsupported media type", "unsupported-media-type"


class NotAnImage(VaeError):
    status, title, slug = 415, "Not an image", "not-an-image"


class RequestTooLarge(VaeError):
    status, title, slug = 413, "Request body too large", "request-too-large"

    def __init__(self, limit_bytes: int) -> None:
        super().__init__(f"the request body is larger than the limit of {limit_bytes} bytes")


class ImageTooLarge(VaeError):
    status, title, slug = 413, "Image too large", "image-too-large"

    def __init__(self, width: int, height: int, limit_pixels: int) -> None:
        super().__init__(
            f"the image is {width}x{height} = {width * height} pixels; "
            f"at most {limit_pixels} pixels are allowed"
        )

    @classmethod
    def from_message(cls, detail: str) -> ImageTooLarge:
        """For when only Pillow knows the size."""
        error = cls(0, 0, 0)
        error.detail = detail
        return error


class CorruptImage(VaeError):
    status, title, slug = 422, "Corrupt image", "corrupt-image"


class InvalidLatents(VaeError):
    status, title, slug = 422, "Invalid latent vectors", "invalid-latents"


class NonFiniteValues(VaeError):
    status, title, slug = 422, "Non-finite numbers", "non-finite-values"


class LimitExceeded(VaeError):
    status, title, slug = 422, "Limit exceeded", "limit-exceeded"

    def __init__(self, what: str, value: object, limit: object) -> None:
        super().__init__(f"{what} is {value}; the limit is {limit}")


class InvalidRequest(VaeError):
    status, title, slug = 422, "Invalid request", "invalid-request"


class QueueFull(VaeError):
    status, title, slug = 503, "Server busy", "queue-full"

    def __init__(self, part: str, queued_items: int, limit: int, retry_after_seconds: int = 1) -> None:
        super().__init__(
            f"the {part} queue holds {queued_items} of at most {limit} items; retry after "
            f"{retry_after_seconds} s",
            headers={"Retry-After": str(retry_after_seconds)},
        )


class Unauthorized(VaeError):
    status, title, slug = 401, "Unauthorized", "unauthorized"

    def __init__(self, detail: str) -> None:
        super().__init__(detail, headers={"WWW-Authenticate": "Bearer"})


class AdminDisabled(VaeError):
    status, title, slug = 403, "Admin endpoints disabled", "admin-disabled"

    def __init__(self) -> None:
        super().__init__(
            "the admin endpoints are disabled because no API key is configured; "
            "set VAE_API_KEY to enable them"
        )


class ReloadInProgress(VaeError):
    status, title, slug = 409, "Reload in progress", "reload-in-progress"

    def __init__(self) -> None:
        super().__init__(
            "another model reload (or load or unload) is in progress; retry when it has finished"
        )


class UnloadRefused(VaeError):
    status, title, slug = 409, "Unload refused", "unload-refused"


class ModelNotLoaded(VaeError):
    """A model of the repository that is not serving now: never loaded, unloaded, or failed to load."""

    status, title, slug = 503, "Model not loaded", "model-not-loaded"


class ReloadFailed(VaeError):
    status, title, slug = 422, "Model reload failed", "reload-failed"

    def __init__(self, model_dir: object, reason: str) -> None:
        super().__init__(f"cannot serve the model in {model_dir}: {reason}; the previous model keeps serving")


class LoadFailed(ReloadFailed):
    title, slug = "Model load failed", "load-failed"

    def __init__(self, model: str, reason: str, serving: bool) -> None:
        unchanged = "the served version keeps serving" if serving else "nothing changed"
        VaeError.__init__(self, f"cannot load model {model!r}: {reason}; {unchanged}")


class ShapeChangeRefused(VaeError):
    status, title, slug = 409, "Model shape changed", "shape-change-refused"

    def __init__(self, model_dir: object, change: str) -> None:
        super().__init__(
            f"the model in {model_dir} {change}, so clients sized for the served model would break; send "
            '{"allow_shape_change": true} to switch anyway; the served model keeps serving'
        )


class ModelNotReady(VaeError):
    status, title, slug = 503, "Model not ready", "model-not-ready"

    def __init__(self, detail: str, retry_after_seconds: int = 1) -> None:
        super().__init__(detail, headers={"Retry-After": str(retry_after_seconds)})


class DeadlineExceeded(VaeError):
    status, title, slug = 504, "Deadline exceeded", "deadline-exceeded"

    def __init__(self, timeout_seconds: float) -> None:
        super().__init__(f"the request was not answered within {timeout_seconds:g} s; retry later")


def problem_response(
    status: int, title: str, detail: str, type_: str = "about:blank", headers: Mapping[str, str] | None = None
) -> Response:
    """The one error response shape."""
    body = json.dumps({"type": type_, "title": title, "status": status, "detail": detail})
    return Response(body, status_code=status, media_type=PROBLEM_MEDIA_TYPE, headers=headers)


def _http_error_detail(request: Request, error: HTTPException) -> str:
    if error.status_code == 404:
        return f"there is no endpoint at {request.url.path}; the API is described at /docs"
    if error.status_code == 405:
        allowed = (error.headers or {}).get("Allow", "")
        return f"{request.method} is not allowed on {request.url.path}; allowed methods: {allowed}"
    return str(error.detail)


async def handle_http_error(request: Request, error: Exception) -> Response:
    """Render a VaeError or any Starlette/FastAPI HTTPException as problem JSON."""
    assert isinstance(error, HTTPException)
    if error.status_code == 400 and isinstance(error.__cause__, UnicodeDecodeError):
        # FastAPI answers a JSON body that is not UTF-8 with a bare 400; it is as invalid as any bad JSON.
        error = InvalidRequest(f"the body is not valid JSON: it is not UTF-8 text ({error.__cause__.reason})")
    if isinstance(error, VaeError):
        return error.response()
    status = error.status_code
    return problem_response(
        status, HTTPStatus(status).phrase, _http_error_detail(request, error), headers=error.headers
    )


def _describe_validation_error(item: Mapping[str, Any]) -> str:
    location = ".".join(str(part) for part in item.get("loc", ()))
    message = str(item.get("msg", "is invalid"))
    if item.get("type") == "json_invalid":
        return f"the body is not valid JSON ({item.get('ctx', {}).get('error', 'parse error')})"
    return f"{location}: {message}" if location else message


async def handle_validation_error(request: Request, error: Exception) -> Response:
    """Render FastAPI's request validation errors as one 422 problem listing every bad field."""
    assert isinstance(error, RequestValidationError)
    detail = "; ".join(_describe_validation_error(item) for item in error.errors())
    return problem_response(
        422, InvalidRequest.title, detail, f"urn:vae-service:problem:{InvalidRequest.slug}"
    )


async def handle_unexpected_error(request: Request, error: Exception) -> Response:
    """Last resort: log the traceback, tell the caller nothing internal."""
    logger.error("unhandled error on %s %s", request.method, request.url.path, exc_info=error)
    return problem_response(
        500, "Internal server error", "the server failed unexpectedly; the error has been logged"
    )


def install_error_handlers(app: FastAPI) -> None:
    """Make every error the app can produce a problem JSON response."""
    app.add_exception_handler(HTTPException, handle_http_error)
    app.add_exception_handler(RequestValidationError, handle_validation_error)
    app.add_exception_handler(Exception, handle_unexpected_error)
