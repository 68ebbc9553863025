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
        default=None, description="Model directory to load; the configured VAE_MODEL_DIR when omitted."
    )


_PROBLEM = {"content": {"application/problem+json": {"schema": Problem.model_json_schema()}}}


@admin_router.post(
    "/reload",
    summary="Load a model directory and serve it instead of the current model",
    description="The new model is verified and warmed up before it replaces the old one; requests in flight "
    "finish on the old model. On failure the old model keeps serving. SIGHUP reloads the configured "
    "directory the same way.",
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
    engine = await reloader.reload(body.model_dir if body is not None else None)
    return {"status": "reloaded", "model": engine.version_label, "model_dir": str(engine.model_dir)}
