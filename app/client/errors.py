"""The service's error answers as exceptions: one class per status, each with status, title and detail, and
`UnknownModel` (a NotFound) for a model the server does not serve."""

from __future__ import annotations

import json
from typing import ClassVar

import httpx


class ServiceError(Exception):
    """An error answer: `status`, `title` and `detail` from the problem JSON (or the protocol's
    `{"error"}`), `type` when given, and `retry_after` seconds for 503s that say when to retry."""

    status_code: ClassVar[int | None] = None

    def __init__(
        self,
        status: int,
        title: str,
        detail: str,
        type_: str | None = None,
        retry_after: float | None = None,
    ) -> None:
        super().__init__(f"{status} {title}: {detail}")
        self.status = status
        self.title = title
        self.detail = detail
        self.type = type_
        self.retry_after = retry_after


class BadRequest(ServiceError):
    status_code = 400


class Unauthorized(ServiceError):
    status_code = 401


class Forbidden(ServiceError):
    status_code = 403


class NotFound(ServiceError):
    status_code = 404


class UnknownModel(NotFound):
    """404 "Unknown model": the server serves no model of the name asked for; `detail` names those it does."""


class Conflict(ServiceError):
    status_code = 409


class PayloadTooLarge(ServiceError):
    status_code = 413


class UnsupportedMediaType(ServiceError):
    status_code = 415


class InvalidInput(ServiceError):
    """422: a corrupt image, a wrong latent length, a parameter out of range or over a limit."""

    status_code = 422


class ServiceUnavailable(ServiceError):
    """503: the model is loading or not loaded ("Model not loaded"), or the queue is full; `retry_after`
    says when to try again."""

    status_code = 503


class DeadlineExceeded(ServiceError):
    status_code = 504


_BY_STATUS: dict[int, type[ServiceError]] = {
    cls.status_code: cls
    for cls in (
        BadRequest,
        Unauthorized,
        Forbidden,
        NotFound,
        Conflict,
        PayloadTooLarge,
        UnsupportedMediaType,
        InvalidInput,
        ServiceUnavailable,
        DeadlineExceeded,
    )
    if cls.status_code is not None
}


def raise_for_problem(response: httpx.Response) -> None:
    """Raise the ServiceError subclass for an error response; return for a success."""
    if response.is_success:
        return
    title, detail, type_ = response.reason_phrase or "Error", response.text.strip(), None
    try:
        body = json.loads(response.content)
    except ValueError:
        body = None
    if isinstance(body, dict):
        title = str(body.get("title", title))
        detail = str(body.get("detail", body.get("error", detail)))
        type_ = body.get("type")
    retry_after = response.headers.get("retry-after")
    seconds = float(retry_after) if retry_after and retry_after.isdigit() else None
    cls = _BY_STATUS.get(response.status_code, ServiceError)
    if cls is NotFound and title == "Unknown model":  # the one 404 told apart: by its problem title
        cls = UnknownModel
    raise cls(response.status_code, title, detail or "(no detail)", type_, seconds)
