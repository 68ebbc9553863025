"""Operations: liveness, readiness and the Prometheus metrics."""

from __future__ import annotations

from fastapi import APIRouter, Request
from prometheus_client import CONTENT_TYPE_LATEST, generate_latest
from starlette.responses import Response

from app.metrics import Metrics
from app.serving import OPS_TAG, problems, ready_engine

router = APIRouter()


@router.get("/healthz", tags=[OPS_TAG], summary="Liveness: the process answers")
async def healthz() -> dict[str, str]:
    return {"status": "ok"}


@router.get(
    "/readyz", tags=[OPS_TAG], summary="Readiness: the model is loaded and warmed up", responses=problems(503)
)
async def readyz(request: Request) -> dict[str, str]:
    ready_engine(request)
    return {"status": "ready"}


@router.get(
    "/metrics",
    tags=[OPS_TAG],
    summary="Prometheus metrics of the server, every worker process included",
    response_class=Response,
)
async def metrics(request: Request) -> Response:
    app_metrics: Metrics = request.app.state.metrics
    return Response(generate_latest(app_metrics.exposition), media_type=CONTENT_TYPE_LATEST)
