"""Admin endpoints (always behind the API key): hot reload of a served model."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from fastapi import APIRouter, Request
from pydantic import BaseModel, ConfigDict, Field

from app.auth import ADMIN_TAG
from app.control import ModelControl
from app.inputs import read_optional_json
from app.schemas import Problem

admin_router = APIRouter(prefix="/admin", tags=[ADMIN_TAG])


class ReloadRequest(BaseModel):
    model_config = ConfigDict(extra="forbid")

    model: str | None = Field(
        default=None,
        description="The model to reload, by name (GET /models); when omitted, the default model.",
    )
    model_dir: Path | None = Field(
        default=None,
        description="Model directory to load; when omitted, the directory the model is served from is read "
        "again.",
    )
    allow_shape_change: bool = Field(
        default=False,
        description="Switch even if the new model's latent_dim or image shape differs from the served one's "
        "(clients sized for the old model would break); refused with 409 otherwise.",
    )


_PROBLEM = {"content": {"application/problem+json": {"schema": Problem.model_json_schema()}}}


@admin_router.post(
    "/reload",
    summary="Load a model directory and serve it as a model of the server (default: the default model)",
    description="The new model is verified and warmed up before it replaces the old one; requests in flight "
    "finish on the old model. On failure the old model keeps serving. With several worker processes, every "
    "worker loads the model first, and all switch or none does. SIGHUP reloads the directory being served "
    "the same way.",
    responses={
        404: {**_PROBLEM, "description": "No model of that name; the detail lists the served names."},
        409: {
            **_PROBLEM,
            "description": "Another reload is in progress, or the new model's latent_dim or image shape "
            "differs and allow_shape_change is not set.",
        },
        413: {**_PROBLEM, "description": "Body too large."},
        504: {**_PROBLEM, "description": "Deadline exceeded; GET /model shows which model serves."},
        415: {**_PROBLEM, "description": "A body that is not JSON."},
        422: {
            **_PROBLEM,
            "description": "The model directory cannot be served; the old model keeps serving.",
        },
    },
    openapi_extra={
        "requestBody": {
            "required": False,
            "content": {"application/json": {"schema": ReloadRequest.model_json_schema()}},
        }
    },
)
async def reload_model(request: Request) -> dict[str, Any]:
    body = await read_optional_json(request, ReloadRequest, '{"model_dir": "/models/v2"}') or ReloadRequest()
    control: ModelControl = request.app.state.control
    done = await control.reload(body.model, body.model_dir, allow_shape_change=body.allow_shape_change)
    return {
        "status": "reloaded",
        "name": done.change.model,
        "model": done.version_label,
        "model_dir": str(done.model_dir),
        "workers": done.workers,
        "workers_switched": done.workers_switched,
    }
