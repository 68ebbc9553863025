"""The Open Inference Protocol's HTTP endpoints: health, server and model metadata, readiness, inference, and
the repository index. The served model appears as two protocol models, `<name>-encoder` and `<name>-decoder`,
at the manifest's version; their requests go through the same batchers as /encode and /decode.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Literal

import numpy as np
from fastapi import APIRouter, Request
from pydantic import BaseModel, Field
from starlette.responses import JSONResponse, Response

from app.auth import INFERENCE_PROTOCOL_TAG
from app.engine import Engine
from app.errors import BadRequest, NonFiniteValues, UnknownModel
from app.oip.codec import (
    BINARY_MEDIA_TYPE,
    HEADER_LENGTH_HEADER,
    TensorSpec,
    decompress,
    infer_response,
    parse_infer_request,
)
from app.routes import MODEL_VERSION_HEADER, OPS_TAG, ready_engine, serving
from model.manifest import Manifest

PROTOCOL_PREFIX = "/v2"
READINESS_PATH = PROTOCOL_PREFIX + "/health/ready"
SERVER_NAME = "vae-service"
EXTENSIONS = ["binary_tensor_data"]
PLATFORM = "onnxruntime_onnx"  # Triton's name for models run by onnxruntime

router = APIRouter(prefix=PROTOCOL_PREFIX)
Part = Literal["encoder", "decoder"]


@dataclass(frozen=True)
class ProtocolModel:
    """One part of the served model as the protocol names and describes it."""

    name: str
    version: str
    part: Part
    input: TensorSpec
    outputs: tuple[TensorSpec, ...]

    def metadata(self) -> dict[str, Any]:
        return {
            "name": self.name,
            "versions": [self.version],
            "platform": PLATFORM,
            "inputs": [self.input.describe()],
            "outputs": [output.describe() for output in self.outputs],
        }


def protocol_models(manifest: Manifest) -> dict[str, ProtocolModel]:
    """The encoder and the decoder of `manifest`'s model, by protocol name."""
    names, images, latents = manifest.tensors, (-1, *manifest.image.shape), (-1, manifest.latent_dim)
    decoder_outputs = [TensorSpec(names.decoder_output, images)]
    if names.decoder_logits is not None:
        decoder_outputs.append(TensorSpec(names.decoder_logits, images))
    models = (
        ProtocolModel(
            f"{manifest.name}-encoder",
            manifest.version,
            "encoder",
            TensorSpec(names.encoder_input, images, value_range=manifest.image.value_range),
            (TensorSpec(names.encoder_mean, latents), TensorSpec(names.encoder_log_var, latents)),
        ),
        ProtocolModel(
            f"{manifest.name}-decoder",
            manifest.version,
            "decoder",
            TensorSpec(names.decoder_input, latents),
            tuple(decoder_outputs),
        ),
    )
    return {model.name: model for model in models}


def find_model(engine: Engine, name: str, version: str | None) -> ProtocolModel:
    """The protocol model `name` (at `version`, when given); UnknownModel (404) naming what is served."""
    models = protocol_models(engine.manifest)
    model = models.get(name)
    if model is None:
        served = ", ".join(repr(served) for served in models)
        raise UnknownModel(f"there is no model {name!r}; this server serves {served}")
    if version is not None and version != model.version:
        raise UnknownModel(f"model {name!r} has no version {version!r}; it serves version {model.version!r}")
    return model


def infer_queue(method: str, path: str, engine: Engine) -> Part | None:
    """The batcher queue an inference request on `path` enters first, for the load shedder; None for other
    requests, and for models this server does not serve (they get their 404)."""
    if method != "POST" or not path.startswith("/v2/models/"):
        return None
    segments = path.split("/")  # "", "v2", "models", name, ["versions", version,] "infer"
    if len(segments) not in (5, 7) or segments[-1] != "infer":
        return None
    name, prefix = segments[3], engine.manifest.name + "-"
    if name == prefix + "encoder":
        return "encoder"
    return "decoder" if name == prefix + "decoder" else None


async def run_model(engine: Engine, model: ProtocolModel, inputs: np.ndarray) -> dict[str, np.ndarray]:
    """Every output of `model` for `inputs`, through the engine's batchers, by output name."""
    names = engine.manifest.tensors
    if model.part == "encoder":
        mean, log_var = await engine.encode(inputs)
        if not (np.isfinite(mean).all() and np.isfinite(log_var).all()):
            raise BadRequest("the encoder produced non-finite values for these images")
        return {names.encoder_mean: mean, names.encoder_log_var: log_var}
    try:
        images, logits = await engine.decode_with_logits(inputs)
    except NonFiniteValues as error:
        raise BadRequest(error.detail) from None
    outputs = {names.decoder_output: images}
    if names.decoder_logits is not None and logits is not None:
        outputs[names.decoder_logits] = logits
    return outputs


class ProtocolError(BaseModel):
    """Every error on /v2, as the protocol's clients read it."""

    error: str = Field(description="What was wrong, and what is allowed.")


class TensorMetadata(BaseModel):
    name: str
    datatype: str
    shape: list[int] = Field(description="-1 for the batch axis.")


class ModelMetadata(BaseModel):
    name: str
    versions: list[str]
    platform: str
    inputs: list[TensorMetadata]
    outputs: list[TensorMetadata]


class ServerMetadata(BaseModel):
    name: str
    version: str
    extensions: list[str]


class ModelReadiness(BaseModel):
    name: str
    ready: bool


class RepositoryEntry(BaseModel):
    name: str
    version: str
    state: str
    reason: str


class InferenceTensor(BaseModel):
    name: str
    shape: list[int]
    datatype: str
    parameters: dict[str, Any] | None = None
    data: list[Any] | None = Field(default=None, description="Row-major values, flat or nested.")


class RequestedTensor(BaseModel):
    name: str
    parameters: dict[str, Any] | None = None


class InferenceRequest(BaseModel):
    id: str | None = None
    parameters: dict[str, Any] | None = None
    inputs: list[InferenceTensor]
    outputs: list[RequestedTensor] | None = None


class InferenceResponse(BaseModel):
    model_name: str
    model_version: str
    id: str | None = None
    outputs: list[InferenceTensor]


def _request_body_schema() -> tuple[dict[str, Any], dict[str, Any]]:
    """The inference request's JSON schema, its nested models referenced from the document's components
    (a schema's own `$defs` do not resolve inside an OpenAPI document), and those models."""
    schema = InferenceRequest.model_json_schema(ref_template="#/components/schemas/{model}")
    return schema, schema.pop("$defs", {})


_INFER_REQUEST_SCHEMA, _INFER_REQUEST_MODELS = _request_body_schema()


def document_protocol(schema: dict[str, Any]) -> None:
    """Finish the OpenAPI document for /v2: add the inference request's nested models to the components,
    drop the 422 FastAPI documents for every route with parameters (on /v2 a bad body is a 400, and path
    parameters take any text, so 422 never comes back), and give 401 the protocol's error body."""
    schema.setdefault("components", {}).setdefault("schemas", {}).update(_INFER_REQUEST_MODELS)
    protocol_error = {"application/json": {"schema": ProtocolError.model_json_schema()}}
    for path, operations in schema.get("paths", {}).items():
        if path.startswith(PROTOCOL_PREFIX):
            for operation in operations.values():
                responses = operation.get("responses", {})
                responses.pop("422", None)
                if "401" in responses:  # app/auth.py documents it as problem JSON, which /v2 turns into this
                    responses["401"]["content"] = protocol_error


def _errors(*statuses: int) -> dict[int | str, dict[str, Any]]:
    descriptions = {
        400: "Bad request: body, JSON, shape, datatype, element count or binary size.",
        404: "No such model or version.",
        413: "Body too large.",
        503: "Not ready, or the queue is full (see Retry-After).",
        504: "Deadline exceeded.",
    }
    schema = {"application/json": {"schema": ProtocolError.model_json_schema()}}
    return {status: {"content": schema, "description": descriptions[status]} for status in statuses}


_INFER_DOCS: dict[str, Any] = {
    "summary": "Run the encoder or the decoder (JSON, or binary tensors)",
    "description": "JSON body, or with `Inference-Header-Content-Length: <n>` a JSON header of n bytes "
    "followed by each input's raw little-endian FP32 values (`parameters.binary_data_size`). Outputs come "
    "back as binary when requested (`parameters.binary_data` per output, `binary_data_output` for all), "
    "with the JSON header's length in `Inference-Header-Content-Length`.",
    "tags": [INFERENCE_PROTOCOL_TAG],
    "response_model": InferenceResponse,
    "responses": {
        **_errors(400, 404, 413, 503, 504),
        200: {"content": {BINARY_MEDIA_TYPE: {"schema": {"type": "string", "format": "binary"}}}},
    },
    "openapi_extra": {
        "requestBody": {
            "required": True,
            "content": {
                "application/json": {"schema": _INFER_REQUEST_SCHEMA},
                BINARY_MEDIA_TYPE: {"schema": {"type": "string", "format": "binary"}},
            },
        }
    },
}
_METADATA_DOCS: dict[str, Any] = {
    "summary": "A model's inputs and outputs",
    "tags": [INFERENCE_PROTOCOL_TAG],
    "response_model": ModelMetadata,
    "responses": _errors(404, 503),
}
_READY_DOCS: dict[str, Any] = {
    "summary": "Whether a model is ready",
    "tags": [INFERENCE_PROTOCOL_TAG],
    "response_model": ModelReadiness,
    "responses": _errors(404, 503),
}


@router.get("/health/live", tags=[OPS_TAG], summary="Protocol liveness: the process answers")
async def live() -> dict[str, bool]:
    return {"live": True}


@router.get(
    READINESS_PATH.removeprefix(PROTOCOL_PREFIX),
    tags=[OPS_TAG],
    summary="Protocol readiness: the model is loaded and warmed up",
    responses={503: {"content": {"application/json": {}}, "description": "Not ready yet."}},
)
async def ready(request: Request) -> Response:
    engine: Engine | None = request.app.state.engine
    if engine is None or not engine.ready:
        return JSONResponse({"ready": False, "error": "the model is still loading"}, status_code=503)
    return JSONResponse({"ready": True})


@router.get("", tags=[OPS_TAG], summary="Protocol server metadata", response_model=ServerMetadata)
async def server_metadata(request: Request) -> dict[str, Any]:
    return {"name": SERVER_NAME, "version": request.app.version, "extensions": EXTENSIONS}


def _ready_model(request: Request, name: str, version: str | None) -> ProtocolModel:
    return find_model(ready_engine(request, READINESS_PATH), name, version)


@router.get("/models/{model_name}", **_METADATA_DOCS)
async def model_metadata(request: Request, model_name: str) -> dict[str, Any]:
    return _ready_model(request, model_name, None).metadata()


@router.get("/models/{model_name}/versions/{model_version}", **_METADATA_DOCS)
async def model_version_metadata(request: Request, model_name: str, model_version: str) -> dict[str, Any]:
    return _ready_model(request, model_name, model_version).metadata()


@router.get("/models/{model_name}/ready", **_READY_DOCS)
async def model_ready(request: Request, model_name: str) -> dict[str, Any]:
    return {"name": _ready_model(request, model_name, None).name, "ready": True}


@router.get("/models/{model_name}/versions/{model_version}/ready", **_READY_DOCS)
async def model_version_ready(request: Request, model_name: str, model_version: str) -> dict[str, Any]:
    return {"name": _ready_model(request, model_name, model_version).name, "ready": True}


@router.post("/models/{model_name}/infer", **_INFER_DOCS)
async def infer(request: Request, model_name: str) -> Response:
    return await _infer(request, model_name, None)


@router.post("/models/{model_name}/versions/{model_version}/infer", **_INFER_DOCS)
async def infer_version(request: Request, model_name: str, model_version: str) -> Response:
    return await _infer(request, model_name, model_version)


async def _infer(request: Request, model_name: str, model_version: str | None) -> Response:
    with serving(request, READINESS_PATH) as (engine, settings):
        model = find_model(engine, model_name, model_version)
        body = decompress(
            await request.body(), request.headers.get("content-encoding"), settings.max_body_bytes
        )
        parsed = parse_infer_request(
            body,
            request.headers.get(HEADER_LENGTH_HEADER),
            [model.input],
            [output.name for output in model.outputs],
            settings.max_items_per_request,
        )
        results = await run_model(engine, model, parsed.inputs[model.input.name])
        chosen = [(output, results[output.name]) for output in parsed.outputs]
        content, header_length = infer_response(model.name, model.version, parsed.id, chosen)
        headers = {MODEL_VERSION_HEADER: engine.version_label}
        if header_length is None:
            return Response(content, media_type="application/json", headers=headers)
        headers[HEADER_LENGTH_HEADER] = str(header_length)
        return Response(content, media_type=BINARY_MEDIA_TYPE, headers=headers)


@router.post(
    "/repository/index",
    tags=[INFERENCE_PROTOCOL_TAG],
    summary="The models this server serves, and their state",
    response_model=list[RepositoryEntry],
    responses=_errors(413, 503),
)
async def repository_index(request: Request) -> list[dict[str, str]]:
    engine = ready_engine(request, READINESS_PATH)
    return [
        {"name": model.name, "version": model.version, "state": "READY", "reason": ""}
        for model in protocol_models(engine.manifest).values()
    ]
