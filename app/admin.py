"""Admin endpoints (always behind the API key): hot reload of the served model."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from fastapi import APIRouter, Request
from pydantic import BaseModel, ConfigDict, Field

from app.auth import ADMIN_TAG
from app.reload import ModelReloader
from app.schemas import Problem

admin_router = APIRouter(prefix="/admin", tags=[ADMIN_TAG])


class ReloadRequest(BaseModel):
    model_config = ConfigDict(extra="forbid")

    model_dir: Path | None = Field(
        default=None,
        description="Model directory to load; when omitted, the directory being served is read again.",
    )


_PROBLEM = {"content": {"application/problem+json": {"schema": Problem.model_json_schema()}}}


@admin_router.post(
    "/reload",
    summary="Load a model directory and serve it instead of the current model",
    description="The new model is verified and warmed up before it replaces the old one; requests in flight "
    "finish on the old model. On failure the old model keeps serving. With several worker processes, every "
    "worker loads the model first, and all switch or none does. SIGHUP reloads the directory being served "
    "the same way.",
    responses={
        401: {**_PROBLEM, "description": "Missing or invalid API key."},
        403: {**_PROBLEM, "description": "No API key is configured, so admin endpoints are disabled."},
        409: {**_PROBLEM, "description": "Another reload is in progress."},
        422: {
            **_PROBLEM,
            "description": "The model directory cannot be served; the old model keeps serving.",
        },
    },
)
async def reload_model(request: Request, body: ReloadRequest | None = None) -> dict[str, Any]:
    reloader: ModelReloader = request.app.state.reloader
    done = await reloader.reload(body.model_dir if body is not None else None)
    return {
        "status": "reloaded",
        "model": done.model,
        "model_dir": str(done.model_dir),
        "workers": done.workers,
        "workers_switched": done.workers_switched,
    }
